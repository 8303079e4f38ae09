/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * KVM's interface for live update (virt/kvm/luo/): VMs and guest_memfd files
 * made without a file descriptor, the VM of a file and a file of a VM, memory
 * attributes read and set in ranges, and guest_memfd frozen while its memory
 * is handed over.
 *
 * Only opaque pointers cross it, so it can be used, and given to bindgen for
 * the Rust abstractions, without <linux/kvm_host.h>, which includes it.
 */
#ifndef __LINUX_KVM_LUO_H
#define __LINUX_KVM_LUO_H

#include <linux/kvm_types.h>
#include <linux/types.h>

struct file;
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
int kvm_gmem_insert_pages(struct file *file, unsigned long pfn,
			  unsigned long nr, pgoff_t index, bool uptodate);
#endif /* CONFIG_KVM_GUEST_MEMFD */

#endif /* __LINUX_KVM_LUO_H */
