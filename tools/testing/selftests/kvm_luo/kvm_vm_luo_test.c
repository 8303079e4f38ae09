// SPDX-License-Identifier: GPL-2.0
/*
 * Live update of KVM VM files: preserve VMs in a LUO session, kexec, and
 * check that the retrieved VMs have the same type and memory attributes.
 *
 * The attributes are checked by behaviour, before and after the kexec: a
 * vCPU in real mode reads one byte at a probe address in a memslot without
 * guest_memfd. If the frame is private, KVM exits with a private memory fault
 * at that address; if it is shared, the read succeeds and the vCPU halts.
 *
 * Also checked: a VM preserved in a session that is closed before the kexec
 * is released (it can be preserved again and retrieved); a VM that is never
 * retrieved has its preserved data freed by finish (free memory grows by at
 * least the size of its many attribute ranges, and VmallocUsed, which counts
 * them while they are restored, ends where it began); fds that are not VMs
 * are not claimed; a VM whose retrieve runs out of memory while KVM sets its
 * attributes (a memory cgroup too small for them: KVM keeps one entry per
 * private page) can be retrieved again, whole, once memory is there.
 */

#include <errno.h>
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

#define STATE_SESSION	"kvm-vm-luo-state"
#define STATE_TOKEN	99
#define MAIN_SESSION	"kvm-vm-luo"
#define LEAK_SESSION	"kvm-vm-luo-unretrieved"
#define TOKEN_DEFAULT	1
#define TOKEN_SW	2
#define TOKEN_REPRESERVED 3
#define TOKEN_MANY	4
#define TOKEN_BIG	5

/*
 * The VM retrieved in a small memory cgroup: one private range from BIG_GPA
 * to 4 GiB, nearly 2^20 pages (one record; KVM's attribute xarray for it
 * takes about 9 MiB). It starts inside memslot 0 and ends inside a memslot
 * of its own, so that a vCPU can probe both ends.
 */
#define BIG_GPA		0x2000UL
#define BIG_END		(4UL << 30)
#define BIG_PAGES	((BIG_END - BIG_GPA) / PAGE)
#define END_SLOT	1
#define END_SLOT_SIZE	(2UL << 20)
#define MEMCG		"klu"
/* Room left in the cgroup beyond what a new VM takes: far less than 9 MiB. */
#define MEMCG_ROOM	(2UL << 20)

#define MANY_RANGES	80000UL
#define PAGE		KLU_PAGE

/* Private ranges of the software-protected VM, as (gpa, size). */
static const struct { uint64_t gpa, size; } private_ranges[] = {
	{ 0x10000, PAGE },
	{ 0x20000, 4 * PAGE },
	{ 0x80000, 32 * PAGE },
	{ 1UL << 30, 2UL << 20 },	/* outside any memslot */
};

/* Probe addresses and whether they are private in the protected VM. */
static const struct { uint64_t gpa; int private; } probes[] = {
	{ 0x10000, 1 }, { 0x11000, 0 }, { 0x23000, 1 }, { 0x24000, 0 },
	{ 0x7f000, 0 }, { 0x80000, 1 }, { 0x9f000, 1 }, { 0xa0000, 0 },
};

static int create_vm(unsigned long type)
{
	int fd = ioctl(klu_kvm_dev(), KVM_CREATE_VM, type);

	if (fd < 0)
		fail_exit("KVM_CREATE_VM type %lu", type);
	return fd;
}

static void set_private(int vm, uint64_t gpa, uint64_t size)
{
	struct kvm_memory_attributes attr = {
		.address = gpa,
		.size = size,
		.attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE,
	};

	if (ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &attr))
		fail_exit("KVM_SET_MEMORY_ATTRIBUTES %#llx+%#llx",
			  (unsigned long long)gpa, (unsigned long long)size);
}

/*
 * Run one vCPU read at each probe address and compare the outcome with what
 * the VM's type and attributes say. Creates memslot 0 and vCPU 0 in the VM.
 */
static void check_vm(int vm, int protected, const char *what)
{
	long attrs, want = protected ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0;
	struct klu_vcpu v;
	unsigned int exit;
	uint8_t val = 0;
	size_t i;

	attrs = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_ATTRIBUTES);
	if (attrs != want)
		ksft_exit_fail_msg("%s: supported attributes %#lx, expected %#lx\n",
				   what, attrs, want);

	v = klu_vcpu_create(vm);
	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		int want_fault = protected && probes[i].private;

		exit = klu_vcpu_access(&v, probes[i].gpa, 0, &val);
		if (want_fault) {
			if (exit != KVM_EXIT_MEMORY_FAULT ||
			    v.run->memory_fault.gpa != probes[i].gpa ||
			    !(v.run->memory_fault.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE))
				ksft_exit_fail_msg("%s: %#llx: exit %u, expected a private fault\n",
						   what, (unsigned long long)probes[i].gpa,
						   exit);
		} else if (exit != KVM_EXIT_HLT) {
			ksft_exit_fail_msg("%s: %#llx: exit %u, expected hlt\n", what,
					   (unsigned long long)probes[i].gpa, exit);
		}
	}
	ksft_print_msg("%s: %zu probes behave as a %s VM\n", what, i,
		       protected ? "software-protected" : "default");
	close(v.fd);
}

/*
 * The big VM's attributes, probed by a vCPU: shared below BIG_GPA, private
 * from it to its last page.
 */
static void check_big(int vm, const char *what)
{
	static const struct { uint64_t gpa; int private; } big_probes[] = {
		{ 0x0, 0 }, { 0x1000, 0 }, { BIG_GPA, 1 }, { 0xff000, 1 },
		{ BIG_END - END_SLOT_SIZE, 1 }, { BIG_END - PAGE, 1 },
	};
	struct kvm_userspace_memory_region end = {
		.slot = END_SLOT,
		.guest_phys_addr = BIG_END - END_SLOT_SIZE,
		.memory_size = END_SLOT_SIZE,
	};
	struct klu_vcpu v = klu_vcpu_create(vm);
	unsigned int exit, want;
	uint8_t *mem, val = 0;
	size_t i;

	mem = mmap(NULL, END_SLOT_SIZE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		fail_exit("mmap");
	end.userspace_addr = (uintptr_t)mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &end))
		fail_exit("KVM_SET_USER_MEMORY_REGION at the end of the big range");

	for (i = 0; i < ARRAY_SIZE(big_probes); i++) {
		want = big_probes[i].private ? KVM_EXIT_MEMORY_FAULT : KVM_EXIT_HLT;
		exit = klu_vcpu_access(&v, big_probes[i].gpa, 0, &val);
		if (exit != want)
			ksft_exit_fail_msg("%s: %#llx: exit %u, expected %u\n", what,
					   (unsigned long long)big_probes[i].gpa, exit, want);
	}
	ksft_print_msg("%s: %zu probes behave as preserved\n", what, i);
	close(v.fd);
	munmap(v.slot0, KLU_MIB);
	munmap(mem, END_SLOT_SIZE);
}

/*
 * Retrieve the big VM from inside a memory cgroup with room for a new VM but
 * not for its attributes: KVM runs out of memory setting them, after the
 * handler took the ranges back. The retrieve must fail with ENOMEM and keep
 * the VM retrievable; with the limit lifted, it must succeed, whole. This
 * process alone is in the cgroup and the OOM killer may not pick it, so the
 * charges fail instead.
 */
static int retrieve_big_in_small_memcg(int session)
{
	long cost, base;
	int vm, err;

	klu_memcg_enter(MEMCG);

	/* What a new protected VM costs the cgroup. */
	base = klu_memcg_read(MEMCG, "memory.current");
	vm = create_vm(KVM_X86_SW_PROTECTED_VM);
	cost = klu_memcg_read(MEMCG, "memory.current") - base;
	close(vm);
	base = klu_memcg_read(MEMCG, "memory.current");
	klu_memcg_set_max(MEMCG, base + cost + (long)MEMCG_ROOM);

	vm = luo_session_retrieve_fd(session, TOKEN_BIG);
	err = -vm;
	klu_memcg_set_max(MEMCG, -1);
	if (vm >= 0)
		ksft_exit_fail_msg("big VM retrieved within %lu kB of room: the test sees no OOM\n",
				   (cost + MEMCG_ROOM) >> 10);
	if (err != ENOMEM)
		ksft_exit_fail_msg("the big VM in a small cgroup: %s, expected ENOMEM\n",
				   strerror(err));
	ksft_print_msg("the big VM in a cgroup with %ld kB of room: %s\n",
		       (cost + (long)MEMCG_ROOM) >> 10, strerror(err));
	vm = luo_session_retrieve_fd(session, TOKEN_BIG);
	if (vm < 0)
		ksft_exit_fail_msg("the big VM, limit lifted: %s: lost to an out-of-memory\n",
				   strerror(-vm));

	/* The rest of the test runs as before. */
	klu_memcg_leave();
	return vm;
}

static void expect_not_claimed(int session, int fd, const char *what)
{
	int ret = luo_session_preserve_fd(session, fd, 1000 + fd);

	if (ret == 0)
		ksft_exit_fail_msg("%s was preserved; no handler should claim it\n", what);
	ksft_print_msg("%s is not claimed: %s\n", what, strerror(-ret));
}

static void stage1(int luo_fd)
{
	int session, tmp, leak, vm_default, vm_sw, vm_again, vm_many, vm_big, vcpu;
	unsigned long i;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	session = luo_create_session(luo_fd, MAIN_SESSION);
	leak = luo_create_session(luo_fd, LEAK_SESSION);
	if (session < 0 || leak < 0)
		fail_exit("luo_create_session");

	vm_default = create_vm(0);
	vm_sw = create_vm(KVM_X86_SW_PROTECTED_VM);
	for (i = 0; i < ARRAY_SIZE(private_ranges); i++)
		set_private(vm_sw, private_ranges[i].gpa, private_ranges[i].size);
	check_vm(vm_default, 0, "default VM before kexec");
	check_vm(vm_sw, 1, "protected VM before kexec");
	vm_big = create_vm(KVM_X86_SW_PROTECTED_VM);
	set_private(vm_big, BIG_GPA, BIG_PAGES * PAGE);
	check_big(vm_big, "big VM before kexec");

	/* Files that are not VMs. */
	vcpu = ioctl(vm_default, KVM_CREATE_VCPU, 1);
	if (vcpu < 0)
		fail_exit("KVM_CREATE_VCPU");
	expect_not_claimed(session, vcpu, "a vCPU fd");
	expect_not_claimed(session, klu_kvm_dev(), "/dev/kvm");

	/* A session closed before the kexec releases its VM. */
	vm_again = create_vm(0);
	tmp = luo_create_session(luo_fd, "kvm-vm-luo-closed");
	if (tmp < 0 || luo_session_preserve_fd(tmp, vm_again, 1))
		fail_exit("preserve in a session to be closed");
	if (luo_session_preserve_fd(session, vm_again, TOKEN_REPRESERVED) != -EBUSY)
		ksft_exit_fail_msg("a VM preserved twice was accepted\n");
	close(tmp);
	if (luo_session_preserve_fd(session, vm_again, TOKEN_REPRESERVED))
		fail_exit("preserve again after the session was closed");

	/* A VM with many ranges, never retrieved. */
	vm_many = create_vm(KVM_X86_SW_PROTECTED_VM);
	for (i = 0; i < MANY_RANGES; i++)
		set_private(vm_many, 2 * i * PAGE, PAGE);
	if (luo_session_preserve_fd(leak, vm_many, TOKEN_MANY))
		fail_exit("preserve the VM with many ranges");

	if (luo_session_preserve_fd(session, vm_default, TOKEN_DEFAULT) ||
	    luo_session_preserve_fd(session, vm_sw, TOKEN_SW) ||
	    luo_session_preserve_fd(session, vm_big, TOKEN_BIG))
		fail_exit("preserve VMs");
	ksft_print_msg("[STAGE 1] preserved 5 VMs\n");
	close(luo_fd);
	daemonize_and_wait();
}

static void stage2(int luo_fd, int state_session)
{
	int session, leak, vm_default, vm_sw, vm_again, vm_big, tries;
	struct klu_meminfo mem_before, mem_after;
	long before, after, want_kb, vmalloc_kb;

	session = luo_retrieve_session(luo_fd, MAIN_SESSION);
	if (session < 0)
		fail_exit("retrieve session");
	/* Retrieve in the other order than preserved. */
	vm_sw = luo_session_retrieve_fd(session, TOKEN_SW);
	vm_default = luo_session_retrieve_fd(session, TOKEN_DEFAULT);
	vm_again = luo_session_retrieve_fd(session, TOKEN_REPRESERVED);
	if (vm_sw < 0 || vm_default < 0 || vm_again < 0)
		fail_exit("retrieve VMs");

	check_vm(vm_default, 0, "default VM after kexec");
	check_vm(vm_sw, 1, "protected VM after kexec");
	check_vm(vm_again, 0, "re-preserved VM after kexec");
	vm_big = retrieve_big_in_small_memcg(session);
	check_big(vm_big, "big VM after kexec");

	if (klu_finish(session) || klu_finish(state_session))
		fail_exit("finish");

	leak = luo_retrieve_session(luo_fd, LEAK_SESSION);
	if (leak < 0)
		fail_exit("retrieve the unretrieved session");
	klu_meminfo_read(&mem_before);
	before = klu_mem_free_kb();
	if (klu_finish(leak))
		fail_exit("finish without retrieve");
	/*
	 * 24 bytes per range. A quarter is left for what the kernel takes
	 * meanwhile: KASAN's shadow of the area the ranges are restored in
	 * (an eighth of it, until vmalloc purges the area) and what each read
	 * of /proc takes on a debug kernel (tens of kB, held by KASAN's
	 * quarantine and kmemleak for a while).
	 * klu_mem_free_kb() also counts the pages on per-CPU lists, to within
	 * a few hundred kB (see klu_util.c); look again, up to 2 s, for what
	 * is freed late (RCU, workqueues).
	 */
	want_kb = MANY_RANGES * 24 / 1024 * 3 / 4;
	for (tries = 0; (after = klu_mem_free_kb()) - before < want_kb &&
	     tries < 20; tries++)
		usleep(100000);
	klu_meminfo_read(&mem_after);
	ksft_print_msg("finish without retrieve freed %ld kB (at least %ld expected)\n",
		       after - before, want_kb);
	klu_meminfo_print_moved(&mem_before, &mem_after, 64);
	if (after - before < want_kb)
		ksft_exit_fail_msg("the unretrieved VM's ranges were not freed\n");
	/*
	 * Restored, the ranges were a vmalloc area until freed: VmallocUsed
	 * counts them while they live, so it ends where it began, not lower
	 * by their size.
	 */
	vmalloc_kb = klu_meminfo_kb(&mem_after, "VmallocUsed") -
		     klu_meminfo_kb(&mem_before, "VmallocUsed");
	if (labs(vmalloc_kb) > (long)(MANY_RANGES * 24 / 1024 / 2))
		ksft_exit_fail_msg("VmallocUsed moved by %ld kB in the finish (at most %lu)\n",
				   vmalloc_kb, MANY_RANGES * 24 / 1024 / 2);
	ksft_print_msg("[STAGE 2] all checks passed\n");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
