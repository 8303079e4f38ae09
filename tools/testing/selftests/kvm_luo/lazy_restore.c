// SPDX-License-Identifier: GPL-2.0
/*
 * A retrieved guest_memfd's memory goes in on first use, a chunk at a time,
 * and finish waits for all of it.
 *
 * Stage 1 writes the first 24 MiB of a 32 MiB guest_memfd (MMAP |
 * INIT_SHARED, bound at guest physical 4 GiB) with a pattern, leaves the last
 * 8 MiB holes, preserves the VM and the file, and has the next kernel boot
 * with guest_memfd_luo.background_restore=0: only first use puts memory in.
 *
 * Stage 2 retrieves both and checks:
 * - nothing of the file is in the page cache yet (mincore), and finish is
 *   refused (EBUSY);
 * - a vCPU reading one quadword gets what was written, and that fault put in
 *   the 64 KiB-aligned chunk around it (two, at the edge of a run of pages
 *   preserved), nothing else: not the 2 MiB window the chunk is in;
 * - punching a hole [8M + 12K, 10M - 20K) reads back as zeros afterwards,
 *   while the memory on both sides of it, in windows the hole cuts, is
 *   intact;
 * - finish is still refused while memory is pending;
 * - reading the whole file through the mapping gets every byte written in
 *   stage 1 outside the hole, and puts in exactly the preserved pages
 *   outside the hole; the 8 MiB that were holes read as zeros;
 * - then finish succeeds;
 * - with lockdep, lockdep checked the window claims as locks: it knows their
 *   class, and a lock taken while one was held;
 * - a second session, with a 16 MiB guest_memfd retrieved and closed before
 *   any of its memory was put in, is released by closing its fd: the release
 *   finishes (it cannot refuse), and the file, gone, frees the memory still
 *   pending: free memory comes back up by the 16 MiB.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define STATE_SESSION	"lazy-restore-state"
#define STATE_TOKEN	99
#define SESSION		"lazy-restore"
#define TOKEN_VM	1
#define TOKEN_GMEM	2

#define MIB		KLU_MIB
#define PAGE		KLU_PAGE
#define GMEM_SIZE	(32 * MIB)
#define WRITTEN		(24 * MIB)
/* Not 2 MiB-aligned: it cuts windows, which go in before the hole is cut. */
#define HOLE_START	(8 * MIB + 3 * PAGE)
#define HOLE_LEN	(2 * MIB - 8 * PAGE)
#define TOUCH		(17 * MIB + 5 * PAGE + 8)
#define GMEM_GPA	(4UL << 30)
/*
 * What a fault puts in: the 64 KiB-aligned physical chunk around it, or all
 * that is left of its window if that is in two chunks or one. (The whole
 * window, were a 512-byte GFP_NOWAIT allocation to fail: not seen here.)
 */
#define CHUNK_PAGES	16
#define FAULT_PAGES	(2 * CHUNK_PAGES)
#define NEXT_ARGS	"/tmp/klu-next-args"
#define RELEASE_SESSION	"lazy-release"
#define RELEASE_SIZE	(16 * MIB)
#define FREE_SLACK_KB	2048

/* mov rax, [rdi]; hlt */
static const uint8_t read_code[] = { 0x48, 0x8b, 0x07, 0xf4 };

static uint8_t pattern(size_t offset)
{
	return (uint8_t)(offset * 29 + (offset >> 12) * 3 + 11);
}

static int in_hole(size_t offset)
{
	return offset >= HOLE_START && offset < HOLE_START + HOLE_LEN;
}

/* Pages of [@offset, @offset + @len) of the mapping in the page cache. */
static size_t present(uint8_t *p, size_t offset, size_t len)
{
	return klu_resident_pages(p + offset, len, NULL);
}

static void expect_finish_refused(int session, const char *when)
{
	int r = luo_session_finish(session);

	if (r != -EBUSY)
		ksft_exit_fail_msg("finish %s: %d (%s), expected EBUSY\n", when,
				   r, r < 0 ? strerror(-r) : "success");
	ksft_print_msg("finish %s: refused (EBUSY)\n", when);
}

/*
 * Faults, the punch-hole and reads above claimed windows and waited for
 * claims: on a kernel with lockdep, lockdep must have checked those claims
 * as locks, so it knows their class, and what was taken while one was held.
 */
static void expect_lockdep_saw_claims(void)
{
	FILE *f = fopen("/proc/lockdep", "r");
	int found = 0, deps = 0;
	char line[512];

	/* Dependencies are tracked, and listed, with PROVE_LOCKING only. */
	if (!f || access("/proc/lockdep_chains", R_OK)) {
		ksft_print_msg("no PROVE_LOCKING, no lock dependencies: claims not checked\n");
		if (f)
			fclose(f);
		return;
	}
	/* A class's line, then a " -> " line per lock taken while it is held. */
	while (fgets(line, sizeof(line), f)) {
		int dep = !!strstr(line, " -> ");

		if (found && !dep)
			break;
		if (!found && !dep && strstr(line, "guest_memfd_luo_filling")) {
			found = 1;
			ksft_print_msg("lockdep: %s", line);
		} else if (found && deps++ < 8) {
			ksft_print_msg("lockdep:   %s", line);
		}
	}
	fclose(f);
	if (!found)
		ksft_exit_fail_msg("lockdep knows no guest_memfd_luo_filling (window claims)\n");
	if (!deps)
		ksft_exit_fail_msg("lockdep recorded no lock taken while a window was claimed\n");
}

static void stage1(int luo_fd)
{
	struct klu_setup t;
	FILE *args;
	size_t i;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	t = klu_setup_shared(luo_fd, SESSION, GMEM_SIZE);
	klu_bind_gmem(t.vm, t.gmem, GMEM_GPA, GMEM_SIZE, t.p);
	for (i = 0; i < WRITTEN; i++)
		t.p[i] = pattern(i);
	if (luo_session_preserve_fd(t.session, t.vm, TOKEN_VM) ||
	    luo_session_preserve_fd(t.session, t.gmem, TOKEN_GMEM))
		fail_exit("preserve");

	/* The second session's file, to close before its memory is in. */
	t = klu_setup_shared(luo_fd, RELEASE_SESSION, RELEASE_SIZE);
	memset(t.p, 0x5a, RELEASE_SIZE);
	if (luo_session_preserve_fd(t.session, t.vm, TOKEN_VM) ||
	    luo_session_preserve_fd(t.session, t.gmem, TOKEN_GMEM))
		fail_exit("preserve the second session");

	args = fopen(NEXT_ARGS, "w");
	if (!args || fprintf(args, "guest_memfd_luo.background_restore=0\n") < 0 ||
	    fclose(args))
		fail_exit(NEXT_ARGS);
	ksft_print_msg("[STAGE 1] wrote %lu MiB of %lu; kexec without background restore\n",
		       WRITTEN / MIB, GMEM_SIZE / MIB);
	close(luo_fd);
	daemonize_and_wait();
}

/* Retrieve a file, then close it and its session before its memory is in. */
static void release_before_restored(int luo_fd)
{
	long before, after;
	int session, gmem;
	uint8_t *p;

	before = klu_mem_free_kb();
	session = luo_retrieve_session(luo_fd, RELEASE_SESSION);
	if (session < 0)
		fail_exit("retrieve session %s", RELEASE_SESSION);
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	if (gmem < 0)
		fail_exit("retrieve the second guest_memfd");
	p = klu_map(gmem, RELEASE_SIZE);
	if (present(p, 0, RELEASE_SIZE))
		ksft_exit_fail_msg("memory of the second file is in before any use\n");
	munmap(p, RELEASE_SIZE);
	close(gmem);
	close(session);
	after = klu_mem_free_kb();
	if (after - before < (long)(RELEASE_SIZE >> 10) - FREE_SLACK_KB)
		ksft_exit_fail_msg("closing a file not yet in freed %ld kB, expected %lu\n",
				   after - before, RELEASE_SIZE >> 10);
	ksft_print_msg("closing a session and file before its memory was in freed %ld kB\n",
		       after - before);
}

static void stage2(int luo_fd, int state_session)
{
	struct kvm_regs regs = { .rdi = GMEM_GPA + TOUCH, .rflags = 2 };
	size_t i, bad = 0, first = 0, n;
	int session, vm, gmem;
	struct klu_vcpu v;
	uint64_t expect;
	uint8_t *p;

	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session");
	vm = luo_session_retrieve_fd(session, TOKEN_VM);
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	if (vm < 0 || gmem < 0)
		fail_exit("retrieve the VM and its guest_memfd");
	p = klu_map(gmem, GMEM_SIZE);

	n = present(p, 0, GMEM_SIZE);
	if (n)
		ksft_exit_fail_msg("%zu pages in the file right after retrieve, expected none\n",
				   n);
	ksft_print_msg("right after retrieve: no page of the file is in\n");
	expect_finish_refused(session, "before any memory is in");

	/* A vCPU's first touch. */
	klu_bind_gmem(vm, gmem, GMEM_GPA, GMEM_SIZE, p);
	v = klu_vcpu64_create(vm);
	klu_vcpu64_run(&v, read_code, sizeof(read_code), &regs);
	for (i = 8, expect = 0; i-- > 0;)
		expect = expect << 8 | pattern(TOUCH + i);
	if (regs.rax != expect)
		ksft_exit_fail_msg("the vCPU read %#llx at %#lx, expected %#llx\n",
				   (unsigned long long)regs.rax, TOUCH,
				   (unsigned long long)expect);
	/*
	 * Chunks are aligned in physical memory, and the file's pages are
	 * contiguous there only within an extent: what went in is within
	 * FAULT_PAGES - 1 pages on either side of the page read.
	 */
	n = present(p, 0, GMEM_SIZE);
	if (n < 1 || n > FAULT_PAGES || !present(p, TOUCH & ~(PAGE - 1), PAGE) ||
	    present(p, (TOUCH & ~(PAGE - 1)) - (FAULT_PAGES - 1) * PAGE,
		    (2 * FAULT_PAGES - 1) * PAGE) != n)
		ksft_exit_fail_msg("%zu pages in after a vCPU read, expected 1 to %d around it\n",
				   n, FAULT_PAGES);
	ksft_print_msg("a vCPU read the right quadword; its fault put in %zu pages\n", n);

	/* A hole punched in memory not put in yet. */
	if (fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
		      HOLE_START, HOLE_LEN))
		fail_exit("punch hole");
	expect_finish_refused(session, "with memory pending");

	/* The rest through the mapping, but the hole: user faults put it in. */
	for (i = 0; i < WRITTEN; i++)
		if (!in_hole(i) && p[i] != pattern(i) && !bad++)
			first = i;
	if (bad)
		ksft_exit_fail_msg("%zu of %lu bytes lost, first at %#zx (%#x, expected %#x)\n",
				   bad, WRITTEN - HOLE_LEN, first, p[first],
				   pattern(first));
	n = present(p, 0, GMEM_SIZE);
	if (n != (WRITTEN - HOLE_LEN) / PAGE || present(p, HOLE_START, HOLE_LEN))
		ksft_exit_fail_msg("%zu pages in (%zu in the hole), expected the %lu outside it\n",
				   n, present(p, HOLE_START, HOLE_LEN),
				   (WRITTEN - HOLE_LEN) / PAGE);
	for (i = HOLE_START; i < GMEM_SIZE; i++)
		if ((in_hole(i) || i >= WRITTEN) && p[i])
			ksft_exit_fail_msg("byte %#zx of a hole is %#x\n", i, p[i]);
	ksft_print_msg("every byte written before the kexec is back; the holes read zero\n");

	if (klu_finish(session))
		fail_exit("finish");
	ksft_print_msg("finish succeeded once all memory was in\n");

	expect_lockdep_saw_claims();

	release_before_restored(luo_fd);
	if (klu_finish(state_session))
		fail_exit("finish the state session");
	ksft_print_msg("[STAGE 2] memory went in on first use, and finish waited for all of it\n");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
