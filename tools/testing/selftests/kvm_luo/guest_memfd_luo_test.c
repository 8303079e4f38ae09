// SPDX-License-Identifier: GPL-2.0
/*
 * Live update of guest_memfd: guest RAM preserved across a kexec.
 *
 * Stage 1 creates a VM with two shared guest_memfds: a 16 MiB one mapped at
 * guest physical 4 GiB, whose first 5 MiB a vCPU in 64-bit mode fills with a
 * pattern (each 8 bytes hold their own guest physical address), and a 64 MiB
 * sparse one with one page in every MiB, written by userspace.
 * It checks that a preserved guest_memfd is frozen (fallocate and punch hole
 * fail with EPERM) and preserves the VM and both files.
 *
 * A second, software-protected VM gets a private guest_memfd, whose memory a
 * vCPU fills (userspace cannot map private memory). A third VM with 64 MiB of
 * guest_memfd memory goes in a session that is never retrieved.
 *
 * Stage 2 retrieves the guest_memfd before its VM (the handler fetches the
 * VM through the session), then the VM, and checks: the retrieved VM is the
 * one the guest_memfd is bound to (a memslot accepts it); the pattern is
 * intact when read through mmap and by a vCPU; the holes are still holes
 * (mincore), in both files. The protected VM is retrieved before its
 * guest_memfd, and a vCPU reads its private memory back. Finishing the
 * unretrieved session gives its 64 MiB back (free memory).
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

#define STATE_SESSION	"gmem-luo-state"
#define STATE_TOKEN	99
#define SESSION		"gmem-luo"
#define TOKEN_VM	1
#define TOKEN_GMEM	2
#define TOKEN_SPARSE	3
#define TOKEN_PVM	4
#define TOKEN_PGMEM	5
#define UNRETRIEVED	"gmem-luo-unretrieved"
#define UNRETRIEVED_SIZE (64 * MIB)

#define MIB		KLU_MIB
#define PAGE		KLU_PAGE
#define GMEM_SIZE	(16 * MIB)
#define PATTERN_SIZE	(5 * MIB)
#define SPARSE_SIZE	(64 * MIB)
#define GMEM_GPA	0x100000UL	/* private memory, above memslot 0 */
#define GMEM64_GPA	(4UL << 30)	/* shared memory, at 4 GiB */

/* Fill, then check, 5 MiB at 4 GiB with each quadword's own address. */
static const uint8_t fill_code[] = {
	0x48, 0xbf, 0, 0, 0, 0, 1, 0, 0, 0,	/* mov rdi, 4 GiB */
	0x48, 0xb9, 0, 0, 0x0a, 0, 0, 0, 0, 0,	/* mov rcx, 5 MiB / 8 */
	0x48, 0x89, 0x3f,			/* 1: mov [rdi], rdi */
	0x48, 0x83, 0xc7, 0x08,			/* add rdi, 8 */
	0x48, 0xff, 0xc9,			/* dec rcx */
	0x75, 0xf4,				/* jnz 1b */
	0xf4,					/* hlt */
};

static const uint8_t check_code[] = {
	0x48, 0xbf, 0, 0, 0, 0, 1, 0, 0, 0,	/* mov rdi, 4 GiB */
	0x48, 0xb9, 0, 0, 0x0a, 0, 0, 0, 0, 0,	/* mov rcx, 5 MiB / 8 */
	0x48, 0x39, 0x3f,			/* 1: cmp [rdi], rdi */
	0x75, 0x09,				/* jne 2f */
	0x48, 0x83, 0xc7, 0x08,			/* add rdi, 8 */
	0x48, 0xff, 0xc9,			/* dec rcx */
	0x75, 0xf2,				/* jnz 1b */
	0xf4,					/* 2: hlt (rcx = 0 if all matched) */
};

static uint8_t pattern(size_t i)
{
	return (uint8_t)(i * 7 + (i >> 12) * 13 + 1);
}

static int create_gmem(int vm, size_t size)
{
	struct kvm_create_guest_memfd args = {
		.size = size,
		.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
	};
	int fd = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);

	if (fd < 0)
		fail_exit("KVM_CREATE_GUEST_MEMFD");
	return fd;
}

static uint8_t *map(int fd, size_t size)
{
	uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		fail_exit("mmap guest_memfd");
	return p;
}

static void expect_errno(int ret, int err, const char *what)
{
	if (ret == 0 || errno != err)
		ksft_exit_fail_msg("%s: returned %d (%s), expected %s\n", what,
				   ret, strerror(errno), strerror(err));
	ksft_print_msg("%s fails with %s\n", what, strerror(err));
}

/* A private guest_memfd of a protected VM, in memslot 1, all private. */
static int private_gmem_slot(int vm, int gmem_or_neg)
{
	struct kvm_create_guest_memfd args = { .size = GMEM_SIZE };
	struct kvm_userspace_memory_region2 slot = { 0 };
	struct kvm_memory_attributes attr = {
		.address = GMEM_GPA,
		.size = GMEM_SIZE,
		.attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE,
	};
	int gmem = gmem_or_neg;

	if (gmem < 0)
		gmem = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);
	if (gmem < 0)
		fail_exit("KVM_CREATE_GUEST_MEMFD (private)");
	slot.slot = 1;
	slot.flags = KVM_MEM_GUEST_MEMFD;
	slot.guest_phys_addr = GMEM_GPA;
	slot.memory_size = GMEM_SIZE;
	slot.guest_memfd = gmem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &slot))
		fail_exit("private memslot");
	if (ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &attr))
		fail_exit("KVM_SET_MEMORY_ATTRIBUTES");
	return gmem;
}

static const size_t private_offsets[] = { 0, 3, PAGE + 9, 2 * MIB + 1, GMEM_SIZE - 1 };

/* Bind @gmem at 4 GiB in @vm and run @code there on a 64-bit vCPU. */
static struct kvm_regs run_at_4g(int vm, int gmem, uint8_t *gmem_map,
				 const uint8_t *code, size_t len)
{
	struct kvm_userspace_memory_region2 slot = { 0 };
	struct kvm_regs regs = { 0 };
	struct klu_vcpu v;

	slot.slot = 1;
	slot.flags = KVM_MEM_GUEST_MEMFD;
	slot.guest_phys_addr = GMEM64_GPA;
	slot.memory_size = GMEM_SIZE;
	slot.userspace_addr = (uintptr_t)gmem_map;
	slot.guest_memfd = gmem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &slot))
		fail_exit("a memslot at 4 GiB refuses the guest_memfd");
	v = klu_vcpu64_create(vm);
	klu_vcpu64_run(&v, code, len, &regs);
	return regs;
}

/* Check from userspace that each quadword holds its guest physical address. */
static void check_pattern(const uint8_t *p)
{
	const uint64_t *q = (const uint64_t *)p;
	size_t i;

	for (i = 0; i < PATTERN_SIZE / 8; i++)
		if (q[i] != GMEM64_GPA + 8 * i)
			ksft_exit_fail_msg("quadword %zu is %#llx, expected %#lx\n",
					   i, (unsigned long long)q[i],
					   GMEM64_GPA + 8 * i);
}

/* Access private memory with a vCPU, and fail on anything but success. */
static uint8_t private_access(struct klu_vcpu *v, size_t offset, int write)
{
	uint8_t val = pattern(offset);

	if (klu_vcpu_access(v, GMEM_GPA + offset, write, &val) != KVM_EXIT_HLT)
		ksft_exit_fail_msg("vCPU exit %u at private offset %#zx\n",
				   v->run->exit_reason, offset);
	return val;
}

static void stage1(int luo_fd)
{
	int session, vm, gmem, sparse, pvm, pgmem, unretrieved, uvm, ugmem;
	struct klu_vcpu v;
	uint8_t *p, *s;
	size_t i;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	session = luo_create_session(luo_fd, SESSION);
	unretrieved = luo_create_session(luo_fd, UNRETRIEVED);
	if (session < 0 || unretrieved < 0)
		fail_exit("create session");

	/* A protected VM whose guest writes its private memory. */
	pvm = ioctl(klu_kvm_dev(), KVM_CREATE_VM, KVM_X86_SW_PROTECTED_VM);
	if (pvm < 0)
		fail_exit("KVM_CREATE_VM (protected)");
	pgmem = private_gmem_slot(pvm, -1);
	v = klu_vcpu_create(pvm);
	for (i = 0; i < ARRAY_SIZE(private_offsets); i++)
		private_access(&v, private_offsets[i], 1);
	if (private_access(&v, 0, 0) != pattern(0))
		ksft_exit_fail_msg("private memory does not hold what the guest wrote\n");
	if (luo_session_preserve_fd(session, pvm, TOKEN_PVM) ||
	    luo_session_preserve_fd(session, pgmem, TOKEN_PGMEM))
		fail_exit("preserve the protected VM and its private guest_memfd");

	/* A VM with 64 MiB that is never retrieved. */
	uvm = ioctl(klu_kvm_dev(), KVM_CREATE_VM, 0);
	if (uvm < 0)
		fail_exit("KVM_CREATE_VM");
	ugmem = create_gmem(uvm, UNRETRIEVED_SIZE);
	if (fallocate(ugmem, FALLOC_FL_KEEP_SIZE, 0, UNRETRIEVED_SIZE))
		fail_exit("fallocate");
	if (luo_session_preserve_fd(unretrieved, uvm, TOKEN_VM) ||
	    luo_session_preserve_fd(unretrieved, ugmem, TOKEN_GMEM))
		fail_exit("preserve the unretrieved VM");

	vm = ioctl(klu_kvm_dev(), KVM_CREATE_VM, 0);
	if (vm < 0)
		fail_exit("KVM_CREATE_VM");
	gmem = create_gmem(vm, GMEM_SIZE);
	sparse = create_gmem(vm, SPARSE_SIZE);
	p = map(gmem, GMEM_SIZE);
	run_at_4g(vm, gmem, p, fill_code, sizeof(fill_code));
	check_pattern(p);
	ksft_print_msg("a vCPU wrote %lu MiB at guest physical 4 GiB\n",
		       PATTERN_SIZE / MIB);
	s = map(sparse, SPARSE_SIZE);
	for (i = 0; i < SPARSE_SIZE; i += MIB)
		s[i] = pattern(i);

	if (luo_session_preserve_fd(session, vm, TOKEN_VM) ||
	    luo_session_preserve_fd(session, gmem, TOKEN_GMEM) ||
	    luo_session_preserve_fd(session, sparse, TOKEN_SPARSE))
		fail_exit("preserve");

	expect_errno(fallocate(gmem, FALLOC_FL_KEEP_SIZE, PATTERN_SIZE, PAGE),
		     EPERM, "fallocate on a preserved guest_memfd");
	expect_errno(fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
			       0, PAGE),
		     EPERM, "punching a hole in a preserved guest_memfd");
	check_pattern(p);

	ksft_print_msg("[STAGE 1] preserved 3 VMs and 4 guest_memfds in 2 sessions\n");
	close(luo_fd);
	daemonize_and_wait();
}

static void stage2(int luo_fd, int state_session)
{
	int session, vm, gmem, sparse, pvm, pgmem, unretrieved;
	long before, after;
	size_t i, n, hole;
	struct kvm_regs regs;
	struct klu_vcpu v;
	uint8_t *p, *s;

	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session");
	/* guest_memfd first: its handler fetches the VM through the session. */
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	if (gmem < 0)
		fail_exit("retrieve guest_memfd before its VM");
	vm = luo_session_retrieve_fd(session, TOKEN_VM);
	sparse = luo_session_retrieve_fd(session, TOKEN_SPARSE);
	if (vm < 0 || sparse < 0)
		fail_exit("retrieve VM and sparse guest_memfd");

	/*
	 * Memory goes back in on first use or in the background: read what
	 * was written first, then look for holes.
	 */
	p = map(gmem, GMEM_SIZE);
	check_pattern(p);
	n = klu_resident_pages(p, GMEM_SIZE, &hole);
	if (n != PATTERN_SIZE / PAGE || hole != PATTERN_SIZE / PAGE)
		ksft_exit_fail_msg("%zu pages present, first hole at %zu; expected %lu and %lu\n",
				   n, hole, PATTERN_SIZE / PAGE, PATTERN_SIZE / PAGE);
	ksft_print_msg("the %lu MiB pattern survived; the rest is still a hole\n",
		       PATTERN_SIZE / MIB);

	s = map(sparse, SPARSE_SIZE);
	for (i = 0; i < SPARSE_SIZE; i += MIB)
		if (s[i] != pattern(i))
			ksft_exit_fail_msg("sparse byte %#zx lost\n", i);
	n = klu_resident_pages(s, SPARSE_SIZE, &hole);
	if (n != SPARSE_SIZE / MIB)
		ksft_exit_fail_msg("sparse file: %zu pages present, expected %lu\n",
				   n, SPARSE_SIZE / MIB);
	ksft_print_msg("sparse file: %zu pages, holes kept\n", n);

	regs = run_at_4g(vm, gmem, p, check_code, sizeof(check_code));
	if (regs.rcx)
		ksft_exit_fail_msg("the vCPU found %#llx at %#llx\n",
				   *(unsigned long long *)(p + regs.rdi - GMEM64_GPA),
				   (unsigned long long)regs.rdi);
	ksft_print_msg("a new vCPU reads the %lu MiB back at 4 GiB\n",
		       PATTERN_SIZE / MIB);

	/* The protected VM first, then its guest_memfd. */
	pvm = luo_session_retrieve_fd(session, TOKEN_PVM);
	pgmem = luo_session_retrieve_fd(session, TOKEN_PGMEM);
	if (pvm < 0 || pgmem < 0)
		fail_exit("retrieve the protected VM and its guest_memfd");
	private_gmem_slot(pvm, pgmem);
	v = klu_vcpu_create(pvm);
	for (i = 0; i < ARRAY_SIZE(private_offsets); i++)
		if (private_access(&v, private_offsets[i], 0) !=
		    pattern(private_offsets[i]))
			ksft_exit_fail_msg("private byte %#zx lost\n",
					   private_offsets[i]);
	ksft_print_msg("the guest reads its private memory back\n");

	if (klu_finish(session) || klu_finish(state_session))
		fail_exit("finish");

	unretrieved = luo_retrieve_session(luo_fd, UNRETRIEVED);
	if (unretrieved < 0)
		fail_exit("retrieve the unretrieved session");
	before = klu_mem_free_kb();
	if (klu_finish(unretrieved))
		fail_exit("finish without retrieve");
	after = klu_mem_free_kb();
	ksft_print_msg("finish without retrieve freed %ld kB of %lu kB\n",
		       after - before, UNRETRIEVED_SIZE >> 10);
	if (after - before < (long)(UNRETRIEVED_SIZE >> 10) * 15 / 16)
		ksft_exit_fail_msg("the unretrieved guest memory was not freed\n");
	ksft_print_msg("[STAGE 2] all checks passed\n");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
