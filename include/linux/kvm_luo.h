/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * KVM's interface for live update (virt/kvm/luo/): VMs and guest_memfd files
 * made without a file descriptor, the VM of a file and a file of a VM, memory
 * attributes read and set in ranges, guest_memfd frozen while its memory is
 * handed over, and filled late in the new kernel.
 *
 * The handlers are built in, and KVM may be a module: KVM lends its part as a
 * struct kvm_luo_ops when it loads, and the handlers call it through the
 * kvm_luo_*() functions (virt/kvm/luo/kvm_luo.c).
 *
 * Only opaque pointers cross it, so it can be used, and given to bindgen for
 * the Rust abstractions, without <linux/kvm_host.h>, which includes it.
 */
#ifndef __LINUX_KVM_LUO_H
#define __LINUX_KVM_LUO_H

#include <linux/kvm_types.h>
#include <linux/types.h>

struct file;
struct folio;
struct inode;
struct kvm;
struct module;

typedef int (*kvm_mem_attr_range_fn)(void *opaque, gfn_t start, gfn_t end,
				     unsigned long attrs);

/**
 * struct kvm_gmem_folio_desc - A run of folios of a guest_memfd, and where.
 * @folio:    Its first folio, never NULL; the caller has a reference to each
 *            of its folios.
 * @index:    The index (in pages) of its first page in the file.
 * @pfn:      Its first page frame.
 * @nr_pages: Its number of pages, at least one folio's: its folios follow
 *            each other in the file and in physical memory.
 * @nid:      The NUMA node of its memory.
 * @uptodate: Whether it holds data: guest_memfd zeroes a folio on first use.
 *            A run of more than one folio is uptodate.
 * @hwpoison: Whether memory failure handling found an error in it. A run of
 *            more than one folio has none.
 */
struct kvm_gmem_folio_desc {
	struct folio *folio;
	pgoff_t index;
	unsigned long pfn;
	unsigned long nr_pages;
	int nid;
	bool uptodate;
	bool hwpoison;
};

/**
 * struct kvm_gmem_filler_ops - Putting handed-over memory in a guest_memfd late.
 * @fill:    Put in the memory at @index, if some is pending, or wait for
 *           whoever does; 0 when there is none left at @index.
 * @discard: Punch-hole of [@start, @end): drop what is pending there, put in
 *           what is partly in it; an error fails the punch-hole.
 * @stop:    The last file of the inode was released.
 * @release: The inode is being destroyed.
 *
 * See kvm_gmem_set_filler().
 */
struct kvm_gmem_filler_ops {
	int (*fill)(void *filler, struct inode *inode, pgoff_t index);
	int (*discard)(void *filler, struct inode *inode, pgoff_t start,
		       pgoff_t end);
	void (*stop)(void *filler);
	void (*release)(void *filler);
};

/**
 * struct kvm_luo_ops - What KVM lends live update, registered by kvm_init().
 * @get_kvm:                  kvm_get_kvm().
 * @put_kvm:                  kvm_put_kvm().
 * @from_vm_file:             kvm_from_vm_file().
 * @vm_type:                  kvm_vm_type().
 * @vm_is_dead:               kvm_vm_is_dead().
 * @create_vm_file:           kvm_create_vm_file().
 * @get_vm_file:              kvm_get_vm_file().
 * @supported_mem_attributes: kvm_supported_mem_attributes().
 * @set_mem_attributes_range: kvm_set_mem_attributes_range().
 * @walk_mem_attr_ranges:     kvm_walk_mem_attr_ranges().
 * @gmem_create_file:         kvm_gmem_create_file().
 * @gmem_file_info:           kvm_gmem_file_info().
 * @gmem_freeze:              kvm_gmem_freeze().
 * @gmem_unfreeze:            kvm_gmem_unfreeze().
 * @gmem_get_folio_descs:     kvm_gmem_get_folio_descs().
 * @gmem_set_filler:          kvm_gmem_set_filler().
 * @gmem_filler:              kvm_gmem_filler().
 * @gmem_fill_pages:          kvm_gmem_fill_pages().
 * @gmem_memcg_has_room:      kvm_gmem_memcg_has_room().
 *
 * The handlers are built in, and KVM may be a module: they reach KVM only
 * through these, by way of the kvm_luo_*() functions below, which return an
 * error when no KVM is loaded. See each function's comment in virt/kvm/.
 */
struct kvm_luo_ops {
	void (*get_kvm)(struct kvm *kvm);
	void (*put_kvm)(struct kvm *kvm);
	struct kvm *(*from_vm_file)(struct file *file);
	unsigned long (*vm_type)(struct kvm *kvm);
	bool (*vm_is_dead)(struct kvm *kvm);
	struct file *(*create_vm_file)(unsigned long type, const char *fdname);
	struct file *(*get_vm_file)(struct kvm *kvm);
#ifdef CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
	u64 (*supported_mem_attributes)(struct kvm *kvm);
	int (*set_mem_attributes_range)(struct kvm *kvm, gfn_t start,
					gfn_t end, unsigned long attrs);
	int (*walk_mem_attr_ranges)(struct kvm *kvm, kvm_mem_attr_range_fn fn,
				    void *opaque);
#endif
#ifdef CONFIG_KVM_GUEST_MEMFD
	struct file *(*gmem_create_file)(struct kvm *kvm, loff_t size,
					 u64 flags);
	bool (*gmem_file_info)(struct file *file, struct kvm **kvm,
			       loff_t *size, u64 *flags);
	int (*gmem_freeze)(struct file *file);
	void (*gmem_unfreeze)(struct file *file);
	long (*gmem_get_folio_descs)(struct file *file, pgoff_t *start,
				     struct kvm_gmem_folio_desc *descs,
				     unsigned int nr);
	int (*gmem_set_filler)(struct file *file,
			       const struct kvm_gmem_filler_ops *ops,
			       void *filler, const void *owner);
	void *(*gmem_filler)(struct file *file, const void *owner);
	int (*gmem_fill_pages)(struct inode *inode, unsigned long pfn,
			       unsigned long nr, pgoff_t index, bool uptodate,
			       unsigned long *done);
	bool (*gmem_memcg_has_room)(unsigned long nr_pages);
#endif
};

#ifdef CONFIG_LIVEUPDATE_GUEST_MEMFD
void kvm_luo_register(const struct kvm_luo_ops *ops, struct module *owner);
void kvm_luo_unregister(const struct kvm_luo_ops *ops, struct module *owner);

/*
 * For the Rust abstraction (rust/kernel/kvm.rs). Those given a file or an
 * inode of KVM's, or a VM of which the caller holds a reference taken with
 * kvm_luo_get_kvm() or the file, need no error: it pins KVM.
 */
void kvm_luo_get_kvm(struct kvm *kvm);
void kvm_luo_put_kvm(struct kvm *kvm);
struct kvm *kvm_luo_from_vm_file(struct file *file);
unsigned long kvm_luo_vm_type(struct kvm *kvm);
bool kvm_luo_vm_is_dead(struct kvm *kvm);
struct file *kvm_luo_create_vm_file(unsigned long type, const char *fdname);
struct file *kvm_luo_get_vm_file(struct kvm *kvm);
#ifdef CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
u64 kvm_luo_supported_mem_attributes(struct kvm *kvm);
int kvm_luo_set_mem_attributes_range(struct kvm *kvm, gfn_t start, gfn_t end,
				     unsigned long attrs);
int kvm_luo_walk_mem_attr_ranges(struct kvm *kvm, kvm_mem_attr_range_fn fn,
				 void *opaque);
#endif
#ifdef CONFIG_KVM_GUEST_MEMFD
struct file *kvm_luo_gmem_create_file(struct kvm *kvm, loff_t size,
				      u64 flags);
bool kvm_luo_gmem_file_info(struct file *file, struct kvm **kvm,
			    loff_t *size, u64 *flags);
int kvm_luo_gmem_freeze(struct file *file);
void kvm_luo_gmem_unfreeze(struct file *file);
long kvm_luo_gmem_get_folio_descs(struct file *file, pgoff_t *start,
				  struct kvm_gmem_folio_desc *descs,
				  unsigned int nr);
int kvm_luo_gmem_set_filler(struct file *file,
			    const struct kvm_gmem_filler_ops *ops,
			    void *filler, const void *owner);
void *kvm_luo_gmem_filler(struct file *file, const void *owner);
int kvm_luo_gmem_fill_pages(struct inode *inode, unsigned long pfn,
			    unsigned long nr, pgoff_t index, bool uptodate,
			    unsigned long *done);
bool kvm_luo_gmem_memcg_has_room(unsigned long nr_pages);
void kvm_luo_gmem_inode_get(struct inode *inode);
void kvm_luo_gmem_inode_put(struct inode *inode);
#endif
#endif /* CONFIG_LIVEUPDATE_GUEST_MEMFD */

#endif /* __LINUX_KVM_LUO_H */
