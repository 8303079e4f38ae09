/* SPDX-License-Identifier: GPL-2.0 */

#ifndef _LINUX_KHO_ABI_KVM_H
#define _LINUX_KHO_ABI_KVM_H

#include <linux/bits.h>
#include <linux/build_bug.h>
#include <linux/stddef.h>
#include <linux/types.h>
#include <linux/kho/abi/kexec_handover.h>

/**
 * DOC: KVM Live Update ABI
 *
 * The live update handlers of KVM VM files and of guest_memfd files hand
 * their state to the next kernel in the structures below: one head object
 * per file, whose physical address LUO passes on, and arrays of records in
 * preserved vmalloc memory. Their own fields are little-endian (struct
 * kho_vmalloc's are the CPU's), and no structure has padding.
 *
 * This is a contract between two kernels. A change of any layout or of the
 * meaning of any field needs a new compatible string; the handlers then
 * read or refuse, with an error that frees nothing, what an older kernel
 * preserved. Documentation/virt/kvm/luo.rst describes the checks the next
 * kernel makes on every field.
 */

/*
 * The VM handler's compatible string: the number is the layout's version.
 * Kernels before this header named the same layout "kvm-vm-rs-v2": files
 * preserved under that name are read as this version, and written only by
 * a kernel told to (kvm_vm_luo.preserve_legacy: for an update back to such
 * a kernel, and for tests).
 */
#define KVM_VM_LUO_COMPATIBLE		"kvm-vm-v2"
#define KVM_VM_LUO_COMPATIBLE_LEGACY	"kvm-vm-rs-v2"

/*
 * The name of the layout before: not read. The handler registers it only to
 * refuse such files one by one (a retrieve fails with EOPNOTSUPP and takes
 * nothing back), because LUO fails every open of /dev/liveupdate when a
 * preserved file has a name no handler registered.
 */
#define KVM_VM_LUO_COMPATIBLE_REFUSED_V1	"kvm-vm-rs-v1"

/* Flags of struct kvm_vm_luo_ser: KVM had marked the VM dead or bugged. */
#define KVM_VM_LUO_DEAD			BIT_ULL(0)

/**
 * struct kvm_vm_luo_attr_range - Guest frames with the same attributes.
 * @start:    The first guest frame number.
 * @nr_pages: The number of frames, more than zero.
 * @attrs:    Their KVM_MEMORY_ATTRIBUTE_* bits, not zero.
 */
struct kvm_vm_luo_attr_range {
	__le64 start;
	__le64 nr_pages;
	__le64 attrs;
};

/**
 * struct kvm_vm_luo_ser - The preserved head of a VM file.
 * @vm_type:   The type given to KVM_CREATE_VM.
 * @flags:     KVM_VM_LUO_* flags.
 * @nr_ranges: The number of records in @ranges.
 * @ranges:    A vmalloc'ed array of struct kvm_vm_luo_attr_range, ordered by
 *             start and not overlapping; frames without attributes have
 *             none.
 */
struct kvm_vm_luo_ser {
	__le64 vm_type;
	__le64 flags;
	__le64 nr_ranges;
	struct kho_vmalloc ranges;
};

/*
 * The guest_memfd handler's compatible string, and the name kernels before
 * this header gave the same layout (read; written only by a kernel told to,
 * with guest_memfd_luo.preserve_legacy).
 */
#define KVM_GMEM_LUO_COMPATIBLE		"kvm-gmem-v3"
#define KVM_GMEM_LUO_COMPATIBLE_LEGACY	"kvm-gmem-rs-v3"

/* The names of the layouts before, refused as KVM_VM_LUO_COMPATIBLE_REFUSED_V1. */
#define KVM_GMEM_LUO_COMPATIBLE_REFUSED_V1	"kvm-gmem-rs-v1"
#define KVM_GMEM_LUO_COMPATIBLE_REFUSED_V2	"kvm-gmem-rs-v2"

/*
 * File flags of struct kvm_gmem_luo_ser, the ABI's own, mapped to and from
 * GUEST_MEMFD_FLAG_*: a change of the uAPI values cannot change the ABI.
 */
#define KVM_GMEM_LUO_FLAG_MMAP		BIT(0)
#define KVM_GMEM_LUO_FLAG_INIT_SHARED	BIT(1)

/*
 * Memory is preserved in naturally aligned windows of 1 << this many pages
 * (2 MiB): no KHO block crosses one, and the next kernel takes back each
 * window on its own.
 */
#define KVM_GMEM_LUO_WINDOW_ORDER	9

/*
 * struct kvm_gmem_luo_extent packs the first page's index in the file with
 * the number of pages minus one in its low KVM_GMEM_LUO_LEN_BITS bits, and
 * the first pfn with the extent's flags in its low KVM_GMEM_LUO_FLAG_BITS.
 */
#define KVM_GMEM_LUO_LEN_BITS		20
#define KVM_GMEM_LUO_FLAG_BITS		12

/* Extent flag: the pages hold valid contents (set on every extent). */
#define KVM_GMEM_LUO_EXTENT_UPTODATE	BIT_ULL(0)

/**
 * struct kvm_gmem_luo_extent - Pages contiguous in the file and in memory.
 * @index_len: The index of the first page in the file << KVM_GMEM_LUO_LEN_BITS
 *             | the number of pages - 1.
 * @pfn_flags: The first page's pfn << KVM_GMEM_LUO_FLAG_BITS | flags.
 *
 * The pages are on one NUMA node. An extent may cross a window but is cut
 * where one starts when it is longer than 1 << KVM_GMEM_LUO_LEN_BITS pages.
 */
struct kvm_gmem_luo_extent {
	__le64 index_len;
	__le64 pfn_flags;
};

/**
 * struct kvm_gmem_luo_ser - The preserved head of a guest_memfd.
 * @size:       The size of the file in bytes.
 * @flags:      KVM_GMEM_LUO_FLAG_* flags.
 * @reserved:   Zero.
 * @nr_extents: The number of records in @extents.
 * @nr_pages:   The number of pages of all extents together.
 * @nr_windows: The number of windows of all extents together.
 * @vm_token:   The token of the file's VM, preserved in the same session.
 * @extents:    A vmalloc'ed array of struct kvm_gmem_luo_extent, ordered by
 *              index and not overlapping.
 */
struct kvm_gmem_luo_ser {
	__le64 size;
	__le32 flags;
	__le32 reserved;
	__le64 nr_extents;
	__le64 nr_pages;
	__le64 nr_windows;
	__le64 vm_token;
	struct kho_vmalloc extents;
};

static_assert(sizeof(struct kho_vmalloc) == 16);
static_assert(sizeof(struct kvm_vm_luo_attr_range) == 24);
static_assert(sizeof(struct kvm_vm_luo_ser) == 40);
static_assert(offsetof(struct kvm_vm_luo_ser, ranges) == 24);
static_assert(sizeof(struct kvm_gmem_luo_extent) == 16);
static_assert(sizeof(struct kvm_gmem_luo_ser) == 64);
static_assert(offsetof(struct kvm_gmem_luo_ser, vm_token) == 40);
static_assert(offsetof(struct kvm_gmem_luo_ser, extents) == 48);

#endif /* _LINUX_KHO_ABI_KVM_H */
