// SPDX-License-Identifier: GPL-2.0
/*
 * Two live updates in a row: three kernels, the same guests in all of them.
 *
 * Stage 1 makes two VMs, each with a guest_memfd: a default VM whose 8 MiB
 * shared guest_memfd holds a pattern written through its mapping, and a
 * software-protected VM whose private guest_memfd holds bytes its vCPU wrote
 * (the whole range private, set with KVM_SET_MEMORY_ATTRIBUTES). All four
 * files go in session "chain-1", and the kernel kexecs.
 *
 * Stage 2 retrieves them, the default pair guest_memfd first and the
 * protected pair VM first, checks both, changes both (half of the pattern
 * rewritten, the private bytes rewritten by a new vCPU), finishes
 * "chain-1", preserves the retrieved files again in session "chain-2", and
 * the kernel kexecs again.
 *
 * Stage 3 retrieves "chain-2" and checks what stage 2 left: the rewritten
 * half, the untouched half, the private bytes, which the vCPU can only reach
 * if the memory attributes crossed both kexecs. It finishes, closes
 * everything, and checks that the memory comes back.
 *
 * The second kernel plays a kernel older than the third: stage 1 boots it
 * with the handlers' preserve_legacy parameters, so that it preserves under
 * the names kernels before the ABI header gave the same layouts
 * (kvm-vm-rs-v2, kvm-gmem-rs-v3), and the third kernel must read them. Each
 * stage checks in the kernel log that its retrieves went through the names it
 * expects: none of the earlier names in kernel 2, all four files in kernel 3.
 */
#include <fcntl.h>
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

#define MIB		KLU_MIB
#define GMEM_SIZE	(8 * MIB)
#define PGMEM_GPA	0x100000UL	/* above memslot 0 */
#define TOKEN_VM	1
#define TOKEN_GMEM	2
#define TOKEN_PVM	3
#define TOKEN_PGMEM	4
#define NEXT_ARGS	"/tmp/klu-next-args"
#define LEGACY_VM	"an earlier kernel preserved as \"kvm-vm-rs-v2\""
#define LEGACY_GMEM	"an earlier kernel preserved as \"kvm-gmem-rs-v3\""

/* The kernel log says @want retrieves of each kind went through the earlier names. */
static void check_legacy_retrieves(int want, const char *when)
{
	int vms = klu_kmsg_count(LEGACY_VM), gmems = klu_kmsg_count(LEGACY_GMEM);

	ksft_print_msg("%s: %d VMs and %d guest_memfds retrieved under earlier names\n",
		       when, vms, gmems);
	if (vms != want || gmems != want)
		ksft_exit_fail_msg("%s: expected %d of each\n", when, want);
}

static const size_t private_offsets[] = { 0, 7, 4096 + 3, 3 * MIB + 5, GMEM_SIZE - 1 };

static uint8_t shared_byte(size_t i, int gen)
{
	return (uint8_t)(i * 11 + (i >> 12) * 3 + gen * 37 + 1);
}

static uint8_t private_byte(size_t i, int gen)
{
	return (uint8_t)(i * 5 + gen * 71 + 9);
}

/* Shared memory: [0, half) holds generation @lo, [half, end) generation 0. */
static void check_shared(const uint8_t *p, int lo, const char *when)
{
	size_t i;

	for (i = 0; i < GMEM_SIZE; i++) {
		int gen = i < GMEM_SIZE / 2 ? lo : 0;

		if (p[i] != shared_byte(i, gen))
			ksft_exit_fail_msg("%s: shared byte %#zx is %#x, expected %#x\n",
					   when, i, p[i], shared_byte(i, gen));
	}
	ksft_print_msg("%s: %lu MiB of shared memory intact\n", when,
		       GMEM_SIZE / MIB);
}

/* Put the private guest_memfd in memslot 1 and a vCPU in the VM. */
static struct klu_vcpu private_vcpu(int pvm, int pgmem)
{
	struct kvm_userspace_memory_region2 slot = {
		.slot = 1,
		.flags = KVM_MEM_GUEST_MEMFD,
		.guest_phys_addr = PGMEM_GPA,
		.memory_size = GMEM_SIZE,
		.guest_memfd = pgmem,
	};

	if (ioctl(pvm, KVM_SET_USER_MEMORY_REGION2, &slot))
		fail_exit("private memslot");
	return klu_vcpu_create(pvm);
}

static void private_io(struct klu_vcpu *v, int gen, int write, const char *when)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(private_offsets); i++) {
		size_t off = private_offsets[i];
		uint8_t val = private_byte(off, gen);

		if (klu_vcpu_access(v, PGMEM_GPA + off, write, &val) != KVM_EXIT_HLT)
			ksft_exit_fail_msg("%s: vCPU exit %u at private offset %#zx\n",
					   when, v->run->exit_reason, off);
		if (!write && val != private_byte(off, gen))
			ksft_exit_fail_msg("%s: private byte %#zx is %#x, expected %#x\n",
					   when, off, val, private_byte(off, gen));
	}
	ksft_print_msg("%s: %s private memory through a vCPU\n", when,
		       write ? "wrote" : "read back");
}

static void preserve_all(int luo_fd, const char *name, int vm, int gmem,
			 int pvm, int pgmem)
{
	int session = luo_create_session(luo_fd, name);

	if (session < 0)
		fail_exit("create session %s", name);
	if (luo_session_preserve_fd(session, vm, TOKEN_VM) ||
	    luo_session_preserve_fd(session, gmem, TOKEN_GMEM) ||
	    luo_session_preserve_fd(session, pvm, TOKEN_PVM) ||
	    luo_session_preserve_fd(session, pgmem, TOKEN_PGMEM))
		fail_exit("preserve in %s", name);
}

static int retrieve_token(int session, uint64_t token)
{
	int fd = luo_session_retrieve_fd(session, token);

	if (fd < 0)
		fail_exit("retrieve token %llu", (unsigned long long)token);
	return fd;
}

static void stage1(int luo_fd)
{
	struct kvm_memory_attributes attr = {
		.address = PGMEM_GPA,
		.size = GMEM_SIZE,
		.attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE,
	};
	int vm, gmem, pvm, pgmem;
	struct klu_vcpu v;
	FILE *args;
	uint8_t *p;
	size_t i;

	vm = klu_create_vm(0);
	pvm = klu_create_vm(KVM_X86_SW_PROTECTED_VM);
	gmem = klu_create_gmem(vm, GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP |
			       GUEST_MEMFD_FLAG_INIT_SHARED);
	pgmem = klu_create_gmem(pvm, GMEM_SIZE, 0);

	p = klu_map(gmem, GMEM_SIZE);
	for (i = 0; i < GMEM_SIZE; i++)
		p[i] = shared_byte(i, 0);
	v = private_vcpu(pvm, pgmem);
	if (ioctl(pvm, KVM_SET_MEMORY_ATTRIBUTES, &attr))
		fail_exit("KVM_SET_MEMORY_ATTRIBUTES");
	private_io(&v, 1, 1, "kernel 1");
	private_io(&v, 1, 0, "kernel 1");

	preserve_all(luo_fd, "chain-1", vm, gmem, pvm, pgmem);
	args = fopen(NEXT_ARGS, "w");
	if (!args ||
	    fprintf(args, "kvm_vm_luo.preserve_legacy=1 guest_memfd_luo.preserve_legacy=1\n") < 0 ||
	    fclose(args))
		fail_exit(NEXT_ARGS);
	ksft_print_msg("kernel 1: preserved two VMs and their guest_memfds; kexec into a kernel\n");
	ksft_print_msg("that preserves them under their earlier names\n");
	close(luo_fd);
	daemonize_and_wait();
}

static void stage2(int luo_fd)
{
	int session, vm, gmem, pvm, pgmem;
	struct klu_vcpu v;
	uint8_t *p;
	size_t i;

	session = luo_retrieve_session(luo_fd, "chain-1");
	if (session < 0)
		fail_exit("retrieve session chain-1");
	gmem = retrieve_token(session, TOKEN_GMEM);
	vm = retrieve_token(session, TOKEN_VM);
	pvm = retrieve_token(session, TOKEN_PVM);
	pgmem = retrieve_token(session, TOKEN_PGMEM);

	check_legacy_retrieves(0, "kernel 2");
	p = klu_map(gmem, GMEM_SIZE);
	check_shared(p, 0, "kernel 2");
	v = private_vcpu(pvm, pgmem);
	private_io(&v, 1, 0, "kernel 2");

	for (i = 0; i < GMEM_SIZE / 2; i++)
		p[i] = shared_byte(i, 2);
	private_io(&v, 2, 1, "kernel 2");

	if (klu_finish(session))
		fail_exit("finish chain-1");
	close(session);
	preserve_all(luo_fd, "chain-2", vm, gmem, pvm, pgmem);
	ksft_print_msg("kernel 2: changed both guests, preserved them again; kexec\n");
	close(luo_fd);
	daemonize_and_wait();
}

static void stage3(int luo_fd)
{
	int session, vm, gmem, pvm, pgmem;
	long before, after;
	struct klu_vcpu v;
	uint8_t *p;

	session = luo_retrieve_session(luo_fd, "chain-2");
	if (session < 0)
		fail_exit("retrieve session chain-2");
	pvm = retrieve_token(session, TOKEN_PVM);
	gmem = retrieve_token(session, TOKEN_GMEM);
	pgmem = retrieve_token(session, TOKEN_PGMEM);
	vm = retrieve_token(session, TOKEN_VM);

	check_legacy_retrieves(2, "kernel 3");
	p = klu_map(gmem, GMEM_SIZE);
	check_shared(p, 2, "kernel 3");
	v = private_vcpu(pvm, pgmem);
	private_io(&v, 2, 0, "kernel 3");

	if (klu_finish(session))
		fail_exit("finish chain-2");
	close(session);
	before = klu_mem_free_kb();
	munmap(p, GMEM_SIZE);
	munmap(v.run, ioctl(klu_kvm_dev(), KVM_GET_VCPU_MMAP_SIZE, 0));
	close(v.fd);
	close(gmem);
	close(pgmem);
	close(vm);
	close(pvm);
	after = klu_mem_free_kb();
	/* The shared file is fully populated, the private one a few pages. */
	ksft_print_msg("kernel 3: closing both guests gave back %ld kB (expected %lu kB or more)\n",
		       after - before, GMEM_SIZE >> 10);
	if (after - before < (long)(GMEM_SIZE >> 10) * 15 / 16)
		ksft_exit_fail_msg("the guests' memory did not come back\n");
	ksft_print_msg("kernel 3: both guests crossed two live updates\n");
}

int main(int argc, char *argv[])
{
	int stage = 0, opt, luo_fd;

	while ((opt = getopt(argc, argv, "s:")) != -1)
		if (opt == 's')
			stage = atoi(optarg);
	if (stage < 1 || stage > 3)
		ksft_exit_fail_msg("usage: %s -s 1|2|3\n", argv[0]);
	luo_fd = luo_open_device();
	if (luo_fd < 0)
		fail_exit("open /dev/liveupdate");
	if (stage == 1)
		stage1(luo_fd);
	else if (stage == 2)
		stage2(luo_fd);
	else
		stage3(luo_fd);
	return 0;
}
