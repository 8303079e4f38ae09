// SPDX-License-Identifier: GPL-2.0
/*
 * Allocation failures at every step of a live update give clean errors, lose
 * nothing and leak nothing.
 *
 * failslab and fail_page_alloc are driven through
 * /proc/thread-self/fail-nth: writing N makes the N-th allocation of this
 * thread fail. Each step is tried with N = 1, 2, ... until a try makes fewer
 * than N allocations, so every allocation of the step fails once:
 *
 * Stage 1
 *   preserve  PRESERVE_FD of a guest_memfd and of a software-protected VM
 *             with private ranges; a failure must leave the file unfrozen
 *             and preservable again.
 *   freeze    reboot(LINUX_REBOOT_CMD_KEXEC), which freezes every preserved
 *             file; a second session holds a guest_memfd without its VM, so
 *             every reboot fails (ENOENT, or the injected ENOMEM) and the
 *             system keeps running. The session is then closed and init
 *             kexecs for real.
 * Stage 2
 *   retrieve  RETRIEVE_FD of guest_memfds (their VMs retrieved first) and of
 *             VMs with private ranges (past what KVM_CREATE_VM itself
 *             allocates, which is KVM's): a failure must be retryable with the
 *             data intact, never final (a final failure loses the file: a
 *             guest_memfd's memory, or a VM's attributes and with them every
 *             guest_memfd bound to it); a retrieved file must hold exactly
 *             what was preserved (a VM's private ranges are probed by a
 *             vCPU). A retrieve that gets over a failure (KVM does without a
 *             debugfs entry, vmalloc falls back to single pages, kmemleak
 *             does without a scan area, for instance) uses up a file, so
 *             stage 1 preserves many; the protected VMs go in a session made after
 *             the freeze loop, which would otherwise freeze them at every try.
 *   finish    FINISH of sessions that hold a guest_memfd never retrieved,
 *             one session per failing allocation (finish tries again when
 *             one fails, and vmalloc's and kmemleak's own allocations make
 *             many): the memory of each must come back.
 *
 * Leaks: init scans kmemleak after each stage and the runner fails the test
 * on any report.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kexec.h>
#include <linux/kvm.h>
#include <linux/reboot.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define STATE_SESSION	"fi-state"
#define STATE_TOKEN	99
#define SESSION		"fi"
#define PAIRS		64
#define PVMS		256
#define FINISHES	32
#define GMEM_SIZE	(256 * 1024UL)
#define FINISH_SIZE	(8 * KLU_MIB)
/* What other allocations may hold meanwhile (slab pages, KASAN quarantine). */
#define FREE_SLACK_KB	1024
#define MAX_TRIES	4000
/* The private ranges of a protected VM, inside memslot 0 of klu_vcpu_create(). */
#define PRIVATE_A	0x10000UL
#define PRIVATE_B	0x80000UL
#define PRIVATE_SIZE	(16 * KLU_PAGE)

/* Tokens: pair i is VM 2i + 1 and guest_memfd 2i + 2; protected VMs after. */
#define TOKEN_VM(i)	(2 * (i) + 1)
#define TOKEN_GMEM(i)	(2 * (i) + 2)
#define TOKEN_PVM(i)	(1000 + (i))

static void write_file(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0 || write(fd, val, strlen(val)) != (ssize_t)strlen(val))
		fail_exit("write %s to %s", val, path);
	close(fd);
}

/* Make failslab and fail_page_alloc fail any allocation fail-nth picks. */
static void setup_fault_injection(void)
{
	write_file("/sys/kernel/debug/failslab/ignore-gfp-wait", "N");
	write_file("/sys/kernel/debug/failslab/verbose", "0");
	write_file("/sys/kernel/debug/fail_page_alloc/ignore-gfp-wait", "N");
	write_file("/sys/kernel/debug/fail_page_alloc/ignore-gfp-highmem", "N");
	write_file("/sys/kernel/debug/fail_page_alloc/min-order", "0");
	write_file("/sys/kernel/debug/fail_page_alloc/verbose", "0");
}

static int fail_nth_fd = -1;

static void fail_nth_set(int n)
{
	char buf[16];
	int len = snprintf(buf, sizeof(buf), "%d", n);

	if (fail_nth_fd < 0)
		fail_nth_fd = open("/proc/thread-self/fail-nth", O_RDWR);
	if (fail_nth_fd < 0 || pwrite(fail_nth_fd, buf, len, 0) != len)
		fail_exit("fail-nth");
}

/* Number of allocations fail-nth counts in fn(arg). */
static int count_allocations(int (*fn)(int), int arg)
{
	char buf[16] = { 0 };

	fail_nth_set(1000000);
	fn(arg);
	if (pread(fail_nth_fd, buf, sizeof(buf) - 1, 0) <= 0)
		fail_exit("read fail-nth");
	fail_nth_set(0);
	return 1000000 - atoi(buf);
}

static int create_pvm_and_close(int unused)
{
	return close(ioctl(klu_kvm_dev(), KVM_CREATE_VM, KVM_X86_SW_PROTECTED_VM));
}

static int vms_session = -1;

static int retrieve_pvm(int token)
{
	return luo_session_retrieve_fd(vms_session, token);
}

/* Whether the failure set up with fail_nth_set() happened; disarms it. */
static int fail_nth_hit(void)
{
	char buf[16] = { 0 };

	if (pread(fail_nth_fd, buf, sizeof(buf) - 1, 0) <= 0)
		fail_exit("read fail-nth");
	fail_nth_set(0);
	return atoi(buf) == 0;
}

static void expect_clean(int err, const char *what, int n)
{
	if (err != ENOMEM && err != ENOENT && err != EINTR)
		ksft_exit_fail_msg("%s with allocation %d failing: unexpected %s\n",
				   what, n, strerror(err));
}

static uint8_t byte_at(int pair, size_t i)
{
	return (uint8_t)(i * 3 + (i >> 12) + pair * 17 + 1);
}

/* A shared guest_memfd of @vm filled with the pattern of @pair. */
static int make_gmem(int vm, int pair)
{
	int gmem = klu_create_gmem(vm, GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP |
				   GUEST_MEMFD_FLAG_INIT_SHARED);
	uint8_t *p = klu_map(gmem, GMEM_SIZE);
	size_t i;

	for (i = 0; i < GMEM_SIZE; i++)
		p[i] = byte_at(pair, i);
	munmap(p, GMEM_SIZE);
	return gmem;
}

/* A software-protected VM with two private ranges. */
static int make_pvm(void)
{
	struct kvm_memory_attributes attr = {
		.size = PRIVATE_SIZE,
		.attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE,
	};
	int vm = klu_create_vm(KVM_X86_SW_PROTECTED_VM);

	attr.address = PRIVATE_A;
	if (ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &attr))
		fail_exit("KVM_SET_MEMORY_ATTRIBUTES");
	attr.address = PRIVATE_B;
	if (ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &attr))
		fail_exit("KVM_SET_MEMORY_ATTRIBUTES");
	return vm;
}

/*
 * A vCPU reads each probe of a retrieved protected VM: in a private range it
 * must take a private memory fault (no guest_memfd backs it), in shared
 * memory it must read.
 */
static void check_pvm(int vm, int token)
{
	static const struct { uint64_t gpa; int private; } probes[] = {
		{ PRIVATE_A - KLU_PAGE, 0 }, { PRIVATE_A, 1 },
		{ PRIVATE_A + PRIVATE_SIZE - KLU_PAGE, 1 },
		{ PRIVATE_A + PRIVATE_SIZE, 0 }, { PRIVATE_B, 1 },
		{ PRIVATE_B + PRIVATE_SIZE - KLU_PAGE, 1 },
		{ PRIVATE_B + PRIVATE_SIZE, 0 },
	};
	struct klu_vcpu v = klu_vcpu_create(vm);
	unsigned int exit, want;
	uint8_t val = 0;
	size_t i;

	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		want = probes[i].private ? KVM_EXIT_MEMORY_FAULT : KVM_EXIT_HLT;
		exit = klu_vcpu_access(&v, probes[i].gpa, 0, &val);
		if (exit != want)
			ksft_exit_fail_msg("VM %d after failures: %#llx: exit %u, want %u (%s)\n",
					   token, (unsigned long long)probes[i].gpa,
					   exit, want, probes[i].private ? "private" : "shared");
	}
	close(v.fd);
	munmap(v.slot0, KLU_MIB);
}

static void check_gmem(int gmem, int pair, const char *when)
{
	uint8_t *p = mmap(NULL, GMEM_SIZE, PROT_READ, MAP_SHARED, gmem, 0);
	size_t i;

	if (p == MAP_FAILED)
		fail_exit("mmap retrieved guest_memfd");
	for (i = 0; i < GMEM_SIZE; i++)
		if (p[i] != byte_at(pair, i))
			ksft_exit_fail_msg("%s: pair %d byte %#zx is %#x, expected %#x\n",
					   when, pair, i, p[i], byte_at(pair, i));
	munmap(p, GMEM_SIZE);
}

/* Whether @gmem is frozen: fallocate() of allocated memory fails with EPERM. */
static int frozen(int gmem)
{
	return fallocate(gmem, FALLOC_FL_KEEP_SIZE, 0, 4096) && errno == EPERM;
}

/* Preserve @fd in a new session with allocation N failing, N = 1, 2, ... */
static int preserve_loop(int luo_fd, int (*make)(int *vm), const char *what)
{
	int n, vm, fd, session, ret, err, hit;

	for (n = 1; n < MAX_TRIES; n++) {
		session = luo_create_session(luo_fd, "fi-preserve");
		if (session < 0)
			fail_exit("create session");
		fd = make(&vm);
		fail_nth_set(n);
		ret = luo_session_preserve_fd(session, fd, 1);
		err = errno;
		hit = fail_nth_hit();
		if (!hit) {
			if (ret)
				fail_exit("%s without a failure", what);
			close(session);
			close(fd);
			close(vm);
			return n - 1;
		}
		if (ret) {
			expect_clean(err, what, n);
			if (vm != fd && frozen(fd))
				ksft_exit_fail_msg("%s failed (%s) but left the file frozen\n",
						   what, strerror(err));
			if (luo_session_preserve_fd(session, fd, 1))
				fail_exit("%s again after failure %d", what, n);
		}
		close(session);
		if (vm != fd && frozen(fd))
			ksft_exit_fail_msg("closing the session left the file frozen\n");
		close(fd);
		if (vm != fd)
			close(vm);
	}
	ksft_exit_fail_msg("%s: still failing after %d tries\n", what, n);
}

static int make_gmem_for_preserve(int *vm)
{
	*vm = klu_create_vm(0);
	return make_gmem(*vm, 0);
}

static int make_pvm_for_preserve(int *vm)
{
	*vm = make_pvm();
	return *vm;
}

static void load_next_kernel(void)
{
	char cmdline[4096], next[4200];
	int fd, kfd, ifd, len;
	char *p;

	fd = open("/proc/cmdline", O_RDONLY);
	len = fd < 0 ? -1 : read(fd, cmdline, sizeof(cmdline) - 1);
	if (len <= 0)
		fail_exit("read /proc/cmdline");
	close(fd);
	cmdline[len] = '\0';
	cmdline[strcspn(cmdline, "\n")] = '\0';
	p = strstr(cmdline, " klu.stage=");
	if (p)
		*p = '\0';
	snprintf(next, sizeof(next), "%s klu.stage=2", cmdline);
	kfd = open("/kernel", O_RDONLY);
	ifd = open("/initrd.img", O_RDONLY);
	if (kfd < 0 || ifd < 0 ||
	    syscall(__NR_kexec_file_load, kfd, ifd, strlen(next) + 1, next, 0UL))
		fail_exit("kexec_file_load");
	close(kfd);
	close(ifd);
}

static int freeze_loop(void)
{
	int n, ret, err;

	for (n = 1; n < MAX_TRIES; n++) {
		fail_nth_set(n);
		ret = syscall(__NR_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
			      LINUX_REBOOT_CMD_KEXEC, NULL);
		err = errno;
		if (!ret)
			ksft_exit_fail_msg("reboot went on with a guest_memfd without its VM\n");
		if (!fail_nth_hit()) {
			if (err != ENOENT)
				ksft_exit_fail_msg("reboot, no failure: %s, expected ENOENT\n",
						   strerror(err));
			return n - 1;
		}
		expect_clean(err, "freeze", n);
	}
	ksft_exit_fail_msg("freeze: still failing after %d tries\n", n);
}

static void stage1(int luo_fd)
{
	int session, bad, vm, gmem, bad_vm, bad_gmem, i, n;
	int finish, fvm, fgmem;
	char name[32];

	setup_fault_injection();
	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);

	n = preserve_loop(luo_fd, make_gmem_for_preserve, "guest_memfd preserve");
	ksft_print_msg("guest_memfd preserve: %d allocations, each failed once, cleanly\n", n);
	n = preserve_loop(luo_fd, make_pvm_for_preserve, "VM preserve");
	ksft_print_msg("VM preserve: %d allocations, each failed once, cleanly\n", n);

	session = luo_create_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("create session");
	for (i = 0; i < PAIRS; i++) {
		vm = klu_create_vm(0);
		gmem = make_gmem(vm, i);
		if (luo_session_preserve_fd(session, vm, TOKEN_VM(i)) ||
		    luo_session_preserve_fd(session, gmem, TOKEN_GMEM(i)))
			fail_exit("preserve pair %d", i);
		if (i < 4 && luo_session_preserve_fd(session, make_pvm(),
						     TOKEN_PVM(i)))
			fail_exit("preserve protected VM %d", i);
	}
	for (i = 0; i < FINISHES; i++) {
		snprintf(name, sizeof(name), "fi-finish-%d", i);
		finish = luo_create_session(luo_fd, name);
		fvm = klu_create_vm(0);
		fgmem = klu_create_gmem(fvm, FINISH_SIZE, 0);
		if (finish < 0 ||
		    fallocate(fgmem, FALLOC_FL_KEEP_SIZE, 0, FINISH_SIZE) ||
		    luo_session_preserve_fd(finish, fvm, 1) ||
		    luo_session_preserve_fd(finish, fgmem, 2))
			fail_exit("preserve session %s", name);
	}

	/* Every reboot fails: this guest_memfd's VM is in no session. */
	bad = luo_create_session(luo_fd, "fi-bad");
	bad_vm = klu_create_vm(0);
	bad_gmem = make_gmem(bad_vm, 0);
	if (bad < 0 || luo_session_preserve_fd(bad, bad_gmem, 1))
		fail_exit("preserve a guest_memfd without its VM");
	load_next_kernel();
	n = freeze_loop();
	ksft_print_msg("freeze: %d allocations each failed cleanly once; reboots all refused\n",
		       n);
	close(bad);
	if (frozen(bad_gmem))
		ksft_exit_fail_msg("closing the session left the file frozen\n");
	close(bad_gmem);
	close(bad_vm);

	/* The protected VMs the retrieve loop uses up. */
	session = luo_create_session(luo_fd, "fi-vms");
	if (session < 0)
		fail_exit("create session fi-vms");
	for (i = 0; i < PVMS; i++)
		if (luo_session_preserve_fd(session, make_pvm(), TOKEN_PVM(i)))
			fail_exit("preserve protected VM %d", i);

	close(luo_fd);
	daemonize_and_wait();
}

/*
 * Retrieve @token with allocation N failing, N = *n, *n + 1, ...: a failure
 * that consumed nothing leaves the file retrievable, and the next try makes
 * the next allocation fail. Stops when the file is retrieved, or when a try
 * fails without reaching any allocation: an earlier failure was final, and
 * the retrieve keeps returning its error. Returns the fd or -1; *n is the
 * next allocation to fail, *exhausted set when a try made no allocation fail.
 */
static int retrieve_with_failures(int session, int token, int *n, int *exhausted)
{
	int fd, err, hit, last_err = 0;

	for (; *n < MAX_TRIES; (*n)++) {
		fail_nth_set(*n);
		fd = luo_session_retrieve_fd(session, token);
		err = errno;
		hit = fail_nth_hit();
		if (fd >= 0) {
			*exhausted = !hit;
			(*n)++;
			return fd;
		}
		if (!hit) {
			/* Final: the error of an earlier try, returned again. */
			if (!last_err || err != last_err)
				ksft_exit_fail_msg("retrieve token %d without a failure: %s\n",
						   token, strerror(err));
			return -1;
		}
		expect_clean(err, "retrieve", *n);
		last_err = err;
	}
	ksft_exit_fail_msg("retrieve: still failing after %d tries\n", *n);
}

static void stage2(int luo_fd, int state_session)
{
	int session, vms, finish, i, n, exhausted, fd, vm, done_gmem = 0, done_vm = 0;
	int retrieved = 0, lost = 0, ret, err, hit, skip, total;
	long before, after;
	char name[32];

	setup_fault_injection();
	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session");

	/* guest_memfds, their VMs retrieved first without failures. */
	for (i = 0, n = 1, exhausted = 0; i < PAIRS && !exhausted; i++) {
		vm = luo_session_retrieve_fd(session, TOKEN_VM(i));
		if (vm < 0)
			fail_exit("retrieve VM %d", i);
		fd = retrieve_with_failures(session, TOKEN_GMEM(i), &n, &exhausted);
		if (fd >= 0) {
			check_gmem(fd, i, "retrieved after failures");
			retrieved++;
		} else {
			lost++;
		}
		done_gmem = i + 1;
	}
	if (!exhausted)
		ksft_exit_fail_msg("guest_memfd retrieve: %d files: not every allocation failed\n",
				   PAIRS);
	/* What it allocates, it allocates before it takes anything back. */
	if (lost)
		ksft_exit_fail_msg("guest_memfd retrieve: %d of %d files lost for good\n",
				   lost, done_gmem);
	ksft_print_msg("guest_memfd retrieve: %d allocations failed once each: %d files intact\n",
		       n - 2, retrieved);

	vms = luo_retrieve_session(luo_fd, "fi-vms");
	if (vms < 0)
		fail_exit("retrieve session fi-vms");
	/*
	 * KVM gets over most failures while it creates a VM (a debugfs entry
	 * less), and each such try uses up a VM: hundreds. Fail only what a
	 * retrieve does beyond what KVM_CREATE_VM does, with a margin.
	 */
	vms_session = vms;
	skip = count_allocations(create_pvm_and_close, 0) - 16;
	total = count_allocations(retrieve_pvm, TOKEN_PVM(0));
	if (skip < 0)
		skip = 0;
	ksft_print_msg("VM retrieve: %d allocations, %d of them KVM_CREATE_VM's\n",
		       total, skip + 16);
	for (i = 1, n = skip + 1, exhausted = 0, lost = 0; i < PVMS && !exhausted; i++) {
		fd = retrieve_with_failures(vms, TOKEN_PVM(i), &n, &exhausted);
		if (fd >= 0) {
			check_pvm(fd, TOKEN_PVM(i));
			close(fd);
		} else {
			lost++;
		}
		done_vm = i + 1;
	}
	if (!exhausted)
		ksft_exit_fail_msg("VM retrieve: %d VMs used up before every allocation failed\n",
				   PVMS);
	/* A VM that fails for good takes its guest_memfds with it. */
	if (lost)
		ksft_exit_fail_msg("VM retrieve: %d of %d VMs failed for good: guests lost\n",
				   lost, done_vm - 1);
	ksft_print_msg("VM retrieve: allocations %d to %d failed once each: %d VMs intact\n",
		       skip + 1, n - 2, done_vm - 1);

	/* What the loops did not use is freed by finish, as never retrieved. */
	ksft_print_msg("%d of %d pairs used\n", done_gmem, PAIRS);
	if (klu_finish(session) || klu_finish(vms))
		fail_exit("finish");

	/* Each session gets one failure; finish cannot fail, it must free. */
	for (i = 0, n = 1; i < FINISHES; i++, n++) {
		snprintf(name, sizeof(name), "fi-finish-%d", i);
		finish = luo_retrieve_session(luo_fd, name);
		if (finish < 0)
			fail_exit("retrieve session %s", name);
		before = klu_mem_free_kb();
		fail_nth_set(n);
		ret = luo_session_finish(finish);
		err = errno;
		hit = fail_nth_hit();
		if (ret)
			ksft_exit_fail_msg("finish with allocation %d failing: %s\n",
					   n, strerror(err));
		after = klu_mem_free_kb();
		if (after - before < (long)(FINISH_SIZE >> 10) - FREE_SLACK_KB)
			ksft_exit_fail_msg("finish, allocation %d failing: freed %ld of %lu kB\n",
					   n, after - before, FINISH_SIZE >> 10);
		close(finish);
		if (!hit)
			break;
	}
	if (i == FINISHES)
		ksft_exit_fail_msg("finish: %d sessions used up before every allocation failed\n",
				   FINISHES);
	ksft_print_msg("finish: %d allocations, each failed once; unretrieved guest_memfds freed\n",
		       n - 1);
	if (klu_finish(state_session))
		fail_exit("finish the state session");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
