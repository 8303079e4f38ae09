/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers shared by the kvm_luo selftests: /dev/kvm, MemFree, and a vCPU in
 * real mode that reads or writes one byte anywhere below 4 GiB.
 */
#ifndef SELFTESTS_KVM_LUO_KLU_UTIL_H
#define SELFTESTS_KVM_LUO_KLU_UTIL_H

#include <linux/kvm.h>
#include <stdint.h>

#define KLU_MIB		(1UL << 20)
#define KLU_PAGE	4096UL

struct klu_vcpu {
	int fd;
	struct kvm_run *run;
};

/* The /dev/kvm fd, opened once. */
int klu_kvm_dev(void);

/* MemFree from /proc/meminfo, in kB. */
long klu_mem_free_kb(void);

/*
 * Create vCPU 0 of @vm, with memslot 0 (1 MiB of anonymous memory at guest
 * physical 0) holding its code. Memslot 0 must be free.
 */
struct klu_vcpu klu_vcpu_create(int vm);

/*
 * Run one access at @gpa: a read into *@val, or a write of *@val. DS is
 * based at @gpa, so any address below 4 GiB works. Returns the exit reason:
 * KVM_EXIT_HLT when the access completed, KVM_EXIT_MEMORY_FAULT (with
 * run->memory_fault filled) when KVM could not map the memory.
 */
unsigned int klu_vcpu_access(struct klu_vcpu *v, uint64_t gpa, int write,
			     uint8_t *val);

#endif /* SELFTESTS_KVM_LUO_KLU_UTIL_H */
