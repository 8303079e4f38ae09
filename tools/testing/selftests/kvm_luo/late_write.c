// SPDX-License-Identifier: GPL-2.0
/*
 * Guest memory changed between preserve and kexec crosses over as it was at
 * kexec time.
 *
 * A VMM preserves its VM and guest_memfd, then lets the VM run until the
 * kexec. Stage 1 lays out an 8 MiB guest_memfd (MMAP | INIT_SHARED), bound
 * at guest physical 4 GiB, as:
 *
 *   [0, 1M)   written by the VMM before preserve; after preserve the VMM
 *             overwrites its first half through its mapping
 *   [1M, 3M)  fallocated, never touched before preserve; written by the VMM
 *             through its mapping after preserve
 *   [3M, 5M)  fallocated, never touched before preserve; written by a
 *             64-bit vCPU after preserve
 *   [5M, 6M)  written by the vCPU before preserve, and again, with other
 *             values, after preserve
 *   [6M, 8M)  never allocated: holes
 *
 * Stage 2 retrieves the VM and the file and checks every byte of the first
 * 6 MiB against what was written last, and that the last 2 MiB are holes.
 */
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define STATE_SESSION	"late-write-state"
#define STATE_TOKEN	99
#define SESSION		"late-write"
#define TOKEN_VM	1
#define TOKEN_GMEM	2

#define MIB		KLU_MIB
#define PAGE		KLU_PAGE
#define GMEM_SIZE	(8 * MIB)
#define GMEM_GPA	(4UL << 30)

/* Keys the vCPU xors each quadword's guest physical address with. */
#define KEY_EARLY	0x1111111111111111ULL
#define KEY_LATE	0x2222222222222222ULL
#define KEY_UNTOUCHED	0x3333333333333333ULL

/*
 * for (; rcx; rcx--, rdi += 8) *(u64 *)rdi = rdi ^ rax;
 */
static const uint8_t fill_code[] = {
	0x48, 0x89, 0xfa,		/* 1: mov rdx, rdi */
	0x48, 0x31, 0xc2,		/* xor rdx, rax */
	0x48, 0x89, 0x17,		/* mov [rdi], rdx */
	0x48, 0x83, 0xc7, 0x08,		/* add rdi, 8 */
	0x48, 0xff, 0xc9,		/* dec rcx */
	0x75, 0xee,			/* jnz 1b */
	0xf4,				/* hlt */
};

/* What the VMM writes: @gen tells writes before and after preserve apart. */
static uint8_t vmm_byte(size_t offset, int gen)
{
	return (uint8_t)(offset * 13 + (offset >> 12) * 7 + gen * 101 + 5);
}

static void vcpu_fill(struct klu_vcpu *v, size_t offset, size_t len,
		      uint64_t key)
{
	struct kvm_regs regs = {
		.rdi = GMEM_GPA + offset,
		.rcx = len / 8,
		.rax = key,
		.rflags = 2,
	};

	klu_vcpu64_run(v, fill_code, sizeof(fill_code), &regs);
	if (regs.rcx)
		ksft_exit_fail_msg("the vCPU stopped with %llu quadwords left\n",
				   (unsigned long long)regs.rcx);
}

static void vmm_fill(uint8_t *p, size_t offset, size_t len, int gen)
{
	size_t i;

	for (i = offset; i < offset + len; i++)
		p[i] = vmm_byte(i, gen);
}

static void check_vmm(const uint8_t *p, size_t offset, size_t len, int gen,
		      const char *what)
{
	size_t i, bad = 0, first = 0;

	for (i = offset; i < offset + len; i++)
		if (p[i] != vmm_byte(i, gen) && !bad++)
			first = i;
	if (bad)
		ksft_exit_fail_msg("%s: %zu of %zu bytes lost, first at %#zx (%#x, expected %#x)\n",
				   what, bad, len, first, p[first],
				   vmm_byte(first, gen));
	ksft_print_msg("%s: %zu bytes intact\n", what, len);
}

static void check_vcpu(const uint8_t *p, size_t offset, size_t len,
		       uint64_t key, const char *what)
{
	const uint64_t *q = (const uint64_t *)(p + offset);
	size_t i, bad = 0, first = 0;

	for (i = 0; i < len / 8; i++)
		if (q[i] != ((GMEM_GPA + offset + 8 * i) ^ key) && !bad++)
			first = i;
	if (bad)
		ksft_exit_fail_msg("%s: %zu of %zu quadwords lost, first at %#zx (%#llx)\n",
				   what, bad, len / 8, offset + 8 * first,
				   (unsigned long long)q[first]);
	ksft_print_msg("%s: %zu bytes intact\n", what, len);
}

static void stage1(int luo_fd)
{
	struct klu_setup t;
	struct klu_vcpu v;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	t = klu_setup_shared(luo_fd, SESSION, GMEM_SIZE);
	klu_bind_gmem(t.vm, t.gmem, GMEM_GPA, GMEM_SIZE, t.p);
	v = klu_vcpu64_create(t.vm);

	/* Before preserve. */
	vmm_fill(t.p, 0, MIB, 0);
	if (fallocate(t.gmem, FALLOC_FL_KEEP_SIZE, MIB, 4 * MIB))
		fail_exit("fallocate");
	vcpu_fill(&v, 5 * MIB, MIB, KEY_EARLY);

	if (luo_session_preserve_fd(t.session, t.vm, TOKEN_VM) ||
	    luo_session_preserve_fd(t.session, t.gmem, TOKEN_GMEM))
		fail_exit("preserve");

	/* After preserve: the VM keeps running until the kexec. */
	vmm_fill(t.p, 0, MIB / 2, 1);
	vmm_fill(t.p, MIB, 2 * MIB, 1);
	vcpu_fill(&v, 3 * MIB, 2 * MIB, KEY_UNTOUCHED);
	vcpu_fill(&v, 5 * MIB, MIB, KEY_LATE);
	check_vmm(t.p, MIB, 2 * MIB, 1, "before kexec, VMM write to fallocated pages");
	check_vcpu(t.p, 3 * MIB, 2 * MIB, KEY_UNTOUCHED,
		   "before kexec, vCPU write to fallocated pages");

	ksft_print_msg("[STAGE 1] wrote after preserve; kexec\n");
	close(luo_fd);
	daemonize_and_wait();
}

static void stage2(int luo_fd, int state_session)
{
	unsigned char vec[GMEM_SIZE / PAGE];
	int session, vm, gmem;
	size_t i, present = 0;
	uint8_t *p;

	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session");
	vm = luo_session_retrieve_fd(session, TOKEN_VM);
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	if (vm < 0 || gmem < 0)
		fail_exit("retrieve the VM and its guest_memfd");
	p = klu_map(gmem, GMEM_SIZE);

	check_vmm(p, 0, MIB / 2, 1, "VMM rewrite of written pages");
	check_vmm(p, MIB / 2, MIB / 2, 0, "VMM write before preserve");
	check_vmm(p, MIB, 2 * MIB, 1, "VMM write to fallocated pages");
	check_vcpu(p, 3 * MIB, 2 * MIB, KEY_UNTOUCHED,
		   "vCPU write to fallocated pages");
	check_vcpu(p, 5 * MIB, MIB, KEY_LATE, "vCPU rewrite of written pages");

	if (mincore(p, GMEM_SIZE, vec))
		fail_exit("mincore");
	for (i = 0; i < GMEM_SIZE / PAGE; i++)
		present += vec[i] & 1;
	if (present != 6 * MIB / PAGE)
		ksft_exit_fail_msg("%zu pages present, expected %lu\n", present,
				   6 * MIB / PAGE);
	for (i = 6 * MIB / PAGE; i < GMEM_SIZE / PAGE; i++)
		if (vec[i] & 1)
			ksft_exit_fail_msg("page %zu should be a hole\n", i);

	if (klu_finish(session) || klu_finish(state_session))
		fail_exit("finish");
	ksft_print_msg("[STAGE 2] every byte written after preserve crossed over\n");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
