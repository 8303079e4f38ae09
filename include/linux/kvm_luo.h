/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * KVM's interface for live update (virt/kvm/luo/): VMs and guest_memfd files
 * made without a file descriptor, the VM of a file and a file of a VM, memory
 * attributes read and set in ranges, guest_memfd frozen while its memory is
 * handed over, and filled late in the new kernel.
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

/* Also declared in <linux/kvm_host.h>; the compiler checks that both agree. */
void kvm_get_kvm(struct kvm *kvm);
void kvm_put_kvm(struct kvm *kvm);

struct kvm *kvm_from_vm_file(struct file *file);
unsigned long kvm_vm_type(struct kvm *kvm);
bool kvm_vm_is_dead(struct kvm *kvm);
struct file *kvm_create_vm_file(unsigned long type, const char *fdname);
struct file *kvm_get_vm_file(struct kvm *kvm);

#ifdef CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
u64 kvm_supported_mem_attributes(struct kvm *kvm);
int kvm_set_mem_attributes_range(struct kvm *kvm, gfn_t start, gfn_t end,
				 unsigned long attrs);
typedef int (*kvm_mem_attr_range_fn)(void *opaque, gfn_t start, gfn_t end,
				     unsigned long attrs);
int kvm_walk_mem_attr_ranges(struct kvm *kvm, kvm_mem_attr_range_fn fn,
			     void *opaque);
#endif /* CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES */

#ifdef CONFIG_KVM_GUEST_MEMFD
struct file *kvm_gmem_create_file(struct kvm *kvm, loff_t size, u64 flags);
bool kvm_gmem_file_info(struct file *file, struct kvm **kvm, loff_t *size,
			u64 *flags);
int kvm_gmem_freeze(struct file *file);
void kvm_gmem_unfreeze(struct file *file);

/**
 * struct kvm_gmem_folio_desc - A folio of a guest_memfd, and where it is.
 * @folio:    The folio, with a reference for the caller.
 * @index:    Its index (in pages) in the file.
 * @pfn:      Its first page frame.
 * @nr_pages: Its number of pages.
 * @nid:      The NUMA node of its memory.
 * @uptodate: Whether it holds data: guest_memfd zeroes a folio on first use.
 * @hwpoison: Whether memory failure handling found an error in it.
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

long kvm_gmem_get_folio_descs(struct file *file, pgoff_t *start,
			      struct kvm_gmem_folio_desc *descs,
			      unsigned int nr);

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

/* Only for the Rust abstraction (rust/kernel/kvm.rs), which owns @filler's layout. */
int kvm_gmem_set_filler(struct file *file,
			const struct kvm_gmem_filler_ops *ops, void *filler,
			const void *owner);
void *kvm_gmem_filler(struct file *file, const void *owner);
int kvm_gmem_fill_pages(struct inode *inode, unsigned long pfn,
			unsigned long nr, pgoff_t index, bool uptodate,
			unsigned long *done);
bool kvm_gmem_memcg_has_room(unsigned long nr_pages);
#endif /* CONFIG_KVM_GUEST_MEMFD */

#endif /* __LINUX_KVM_LUO_H */
