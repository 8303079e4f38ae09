// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark: guest_memfd (this project's Rust handler) against memfd
 * (upstream's handler), measured in the same boot and the same kexec.
 *
 * For each case, a guest_memfd and a memfd of the same size with the same
 * populated bytes are preserved, each in a session of its own. Memory is
 * populated with fallocate(), whose never-used pages both handlers zero at
 * their first preserve, but in the case "1G-written", written a byte per
 * page. Stage 1 times preserve after the freeze rounds below, so without
 * that zeroing: the median of PRESERVE_ROUNDS, each kind first in turn, all
 * but the last round closing their sessions (which unpreserves). And
 * freeze: it asks for a kexec that is bound to fail (a last session holds a
 * guest_memfd without its VM), so LUO freezes every file, fails on that one
 * and unfreezes them; that is done once with the memfds only, once with the
 * guest_memfds only, and once with neither, and the difference is the
 * freeze (+ unfreeze) time. Stage 2 times, per file:
 * - usable: the retrieve ioctl, after which the VMM has its file;
 * - first touch: right after retrieve, one byte read through a mapping in
 *   each of up to 64 windows of 2 MiB from the end of the file backwards:
 *   for guest_memfd, those
 *   mincore says were not in yet; for memfd, whose pages are all in, every
 *   one (a plain page fault). Median and worst;
 * - restored: from before the retrieve until finish succeeds, which for
 *   guest_memfd is when every page is back in the file; finish is tried
 *   every millisecond. Split into the first touches above ("touching") and
 *   the rest ("settling"). The background workers start at the first try
 *   to finish, after the first touches: "touching" is first use alone, and
 *   "restored" is not comparable with runs from before 2026-12-06, when
 *   they started at the retrieve.
 * Metadata is what each handler serializes: for guest_memfd the handler
 * reports it in the kernel log; for memfd it is 48 bytes plus 16 per folio
 * (memfd-v2).
 *
 * Prints a table with ratios, one "BENCH-JSON:" line and one "ratios:" line.
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
#include <time.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define MIB		(1024UL * 1024)
#define STATE_SESSION	"bench-state"
#define STATE_TOKEN	99
#define RESULTS_TOKEN	98
#define MAX_CASES	8
#define TOUCHES		64
#define WINDOW		(2 * MIB)

struct bench_case {
	const char *name;
	size_t size;		/* file size */
	size_t populated;	/* bytes populated */
	size_t stride;		/* populate one MiB every stride bytes */
	int written;		/* by a write to each page, not fallocate() */
	int fragmented;		/* in single pages, rarely contiguous */
};

static const struct bench_case cases[] = {
	{ "64M", 64 * MIB, 64 * MIB, MIB },
	{ "256M", 256 * MIB, 256 * MIB, MIB },
	{ "1G", 1024 * MIB, 1024 * MIB, MIB },
	{ "2G", 2048 * MIB, 2048 * MIB, MIB },
	{ "sparse-1G/64M", 1024 * MIB, 64 * MIB, 16 * MIB },
	/* Written pages: preserve has no never-used folio to zero. */
	{ "1G-written", 1024 * MIB, 1024 * MIB, MIB, 1 },
	/* Fragmented memory: an extent per page, the metadata's worst case. */
	{ "fragmented-1G", 1024 * MIB, 1024 * MIB, MIB, 0, 1 },
};

/* Cases the ratios line uses. */
#define CASE_64M	0
#define CASE_1G		2
#define CASE_2G		3

#define NR_CASES ARRAY_SIZE(cases)
/* Failing kexecs per kind for the freeze time, which is below their noise. */
#define FREEZE_ROUNDS	5
#define PRESERVE_ROUNDS	5

/* What stage 1 hands to stage 2, in a preserved memfd. */
struct results {
	double preserve_ms[2][MAX_CASES];	/* [0] guest_memfd, [1] memfd */
	double freeze_ms[2];			/* all cases together */
	double freeze_spread_ms[2][2];		/* lowest and highest */
	long meta_bytes[2][MAX_CASES];
	double retrieve_ms[2][MAX_CASES];	/* usable */
	double restored_ms[2][MAX_CASES];
	double touching_ms[2][MAX_CASES];	/* the first-touch loop */
	double settling_ms[2][MAX_CASES];	/* after it, until finish */
	double touch_median_us[2][MAX_CASES];
	double touch_worst_us[2][MAX_CASES];
	int touches[2][MAX_CASES];		/* of pages not in yet */
};

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Populate @fd; for a fragmented case, @scratch is a file of its kind, to fragment with. */
static void populate(int fd, const struct bench_case *c, int scratch)
{
	uint8_t *p = NULL;
	size_t off, i;

	if (c->fragmented)
		klu_fragment(scratch, 2 * c->populated);

	if (c->written) {
		p = mmap(NULL, c->size, PROT_READ | PROT_WRITE, MAP_SHARED,
			 fd, 0);
		if (p == MAP_FAILED)
			fail_exit("mmap %s", c->name);
	}
	for (off = 0; off < c->size && off / c->stride * MIB < c->populated;
	     off += c->stride) {
		if (!p && fallocate(fd, FALLOC_FL_KEEP_SIZE, off, MIB))
			fail_exit("fallocate");
		for (i = 0; p && i < MIB; i += 4096)
			p[off + i] = 1;
	}
	if (p)
		munmap(p, c->size);
	if (c->fragmented)
		close(scratch);
}

static int make_gmem(int vm, const struct bench_case *c)
{
	struct kvm_create_guest_memfd args = {
		.size = c->size,
		.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
	};
	int fd = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args), scratch = -1;

	if (fd < 0)
		fail_exit("KVM_CREATE_GUEST_MEMFD");
	if (c->fragmented) {
		args.size = 2 * c->populated;
		scratch = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);
		if (scratch < 0)
			fail_exit("KVM_CREATE_GUEST_MEMFD of %zu bytes to fragment with",
				  (size_t)args.size);
	}
	populate(fd, c, scratch);
	return fd;
}

static int make_memfd(const struct bench_case *c)
{
	int fd = memfd_create("bench", 0);
	int scratch = c->fragmented ? memfd_create("bench-scratch", 0) : -1;

	if (fd < 0 || ftruncate(fd, c->size) ||
	    (c->fragmented && (scratch < 0 || ftruncate(scratch, 2 * c->populated))))
		fail_exit("memfd");
	populate(fd, c, scratch);
	return fd;
}

static void session_name(char *buf, size_t len, int kind, size_t i)
{
	snprintf(buf, len, "bench-%s-%zu", kind ? "memfd" : "gmem", i);
}

/* Ask for a kexec that must fail, and time it. */
static double failing_kexec_ms(int luo_fd)
{
	static const char cmdline[] = "console=ttyS0";
	int kfd, ifd, session, vm, gmem;
	struct kvm_create_guest_memfd args = { .size = MIB,
		.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED };
	double t;

	session = luo_create_session(luo_fd, "bench-fail");
	vm = ioctl(klu_kvm_dev(), KVM_CREATE_VM, 0);
	gmem = vm < 0 ? -1 : ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);
	if (session < 0 || gmem < 0 || luo_session_preserve_fd(session, gmem, 1))
		fail_exit("set up the failing session");
	kfd = open("/kernel", O_RDONLY);
	ifd = open("/initrd.img", O_RDONLY);
	if (kfd < 0 || ifd < 0 ||
	    syscall(__NR_kexec_file_load, kfd, ifd, sizeof(cmdline), cmdline, 0UL))
		fail_exit("kexec_file_load");
	t = now_ms();
	if (syscall(__NR_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
		    LINUX_REBOOT_CMD_KEXEC, NULL) == 0)
		ksft_exit_fail_msg("the kexec meant to fail succeeded\n");
	t = now_ms() - t;
	close(session);
	close(gmem);
	close(vm);
	close(kfd);
	close(ifd);
	return t;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static void stage1(int luo_fd)
{
	int sessions[2][MAX_CASES], fds[2][MAX_CASES], vms[MAX_CASES], results_fd;
	struct klu_gmem_report reports[MAX_CASES];
	double base, freeze[2][FREEZE_ROUNDS];
	double preserve[2][MAX_CASES][PRESERVE_ROUNDS];
	struct results *r;
	char name[64];
	int k, round;
	size_t i;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	results_fd = memfd_create("bench-results", 0);
	if (results_fd < 0 || ftruncate(results_fd, sizeof(*r)))
		fail_exit("results memfd");
	r = mmap(NULL, sizeof(*r), PROT_READ | PROT_WRITE, MAP_SHARED, results_fd, 0);
	if (r == MAP_FAILED)
		fail_exit("mmap results");

	/* One VM per guest_memfd: a VM goes in the session of its memory. */
	for (i = 0; i < NR_CASES; i++) {
		vms[i] = ioctl(klu_kvm_dev(), KVM_CREATE_VM, 0);
		if (vms[i] < 0)
			fail_exit("KVM_CREATE_VM");
		fds[0][i] = make_gmem(vms[i], &cases[i]);
		fds[1][i] = make_memfd(&cases[i]);
	}

	/*
	 * Freeze: fail a kexec with neither, with memfds, with guest_memfds,
	 * FREEZE_ROUNDS times in turn; each kind's freeze is the median of its
	 * differences with the kexec without either of the same round.
	 */
	for (round = 0; round < FREEZE_ROUNDS; round++) {
		base = failing_kexec_ms(luo_fd);
		for (k = 1; k >= 0; k--) {
			int s[MAX_CASES];

			for (i = 0; i < NR_CASES; i++) {
				snprintf(name, sizeof(name), "bench-freeze-%d-%zu", k, i);
				s[i] = luo_create_session(luo_fd, name);
				if (s[i] < 0 || luo_session_preserve_fd(s[i], fds[k][i], 1) ||
				    (k == 0 && luo_session_preserve_fd(s[i], vms[i], 100)))
					fail_exit("preserve for the freeze measurement");
			}
			freeze[k][round] = failing_kexec_ms(luo_fd) - base;
			for (i = 0; i < NR_CASES; i++)
				close(s[i]);
		}
	}
	for (k = 0; k < 2; k++) {
		qsort(freeze[k], FREEZE_ROUNDS, sizeof(double), cmp_double);
		r->freeze_ms[k] = freeze[k][FREEZE_ROUNDS / 2];
		r->freeze_spread_ms[k][0] = freeze[k][0];
		r->freeze_spread_ms[k][1] = freeze[k][FREEZE_ROUNDS - 1];
	}

	/*
	 * Preserve, each file in a session of its own; the VM with the gmems.
	 * The sessions of the last round stay for the kexec.
	 */
	for (round = 0; round < PRESERVE_ROUNDS; round++) {
		for (int n = 0; n < 2; n++) {
			k = (n + round) % 2;
			for (i = 0; i < NR_CASES; i++) {
				double t;

				session_name(name, sizeof(name), k, i);
				sessions[k][i] = luo_create_session(luo_fd, name);
				if (sessions[k][i] < 0)
					fail_exit("create %s", name);
				if (k == 0 && luo_session_preserve_fd(sessions[k][i],
								      vms[i], 100))
					fail_exit("preserve the VM");
				t = now_ms();
				if (luo_session_preserve_fd(sessions[k][i], fds[k][i], 1))
					fail_exit("preserve %s", name);
				preserve[k][i][round] = now_ms() - t;
				if (round < PRESERVE_ROUNDS - 1)
					close(sessions[k][i]);
			}
		}
	}
	for (k = 0; k < 2; k++) {
		for (i = 0; i < NR_CASES; i++) {
			qsort(preserve[k][i], PRESERVE_ROUNDS, sizeof(double),
			      cmp_double);
			r->preserve_ms[k][i] = preserve[k][i][PRESERVE_ROUNDS / 2];
		}
	}
	klu_gmem_reports(reports, NR_CASES);
	for (i = 0; i < NR_CASES; i++)
		r->meta_bytes[0][i] = reports[i].bytes;
	for (i = 0; i < NR_CASES; i++)
		r->meta_bytes[1][i] = 48 + 16 * (long)(cases[i].size / getpagesize());

	snprintf(name, sizeof(name), "bench-results");
	k = luo_create_session(luo_fd, name);
	if (k < 0 || luo_session_preserve_fd(k, results_fd, RESULTS_TOKEN))
		fail_exit("preserve the results");
	close(luo_fd);
	daemonize_and_wait();
}

static void print_row(const char *what, const char *name, double g, double m,
		      const char *unit)
{
	printf("BENCH: %-10s %-14s %12.1f %12.1f %8.3f  %s\n", what, name, g, m,
	       m > 0 ? g / m : 0, unit);
}

static void print_json(struct results *r, int k, size_t i)
{
	printf("\"%s\": {", k ? "memfd" : "guest_memfd");
	printf("\"preserve_ms\": %.2f, ", r->preserve_ms[k][i]);
	printf("\"usable_ms\": %.2f, ", r->retrieve_ms[k][i]);
	printf("\"restored_ms\": %.2f, ", r->restored_ms[k][i]);
	printf("\"touching_ms\": %.2f, ", r->touching_ms[k][i]);
	printf("\"settling_ms\": %.2f, ", r->settling_ms[k][i]);
	printf("\"first_touches\": %d, ", r->touches[k][i]);
	printf("\"first_touch_median_us\": %.1f, ", r->touch_median_us[k][i]);
	printf("\"first_touch_worst_us\": %.1f, ", r->touch_worst_us[k][i]);
	printf("\"metadata_bytes\": %ld}", r->meta_bytes[k][i]);
}

/*
 * Read a byte in each of up to TOUCHES windows from the end of @fd
 * backwards, right after its retrieve, timing the reads of pages that were
 * not in the file yet.
 */
static void first_touches(struct results *r, int k, size_t i, int fd)
{
	const struct bench_case *c = &cases[i];
	double lat[TOUCHES];
	uint8_t *p, v;
	unsigned char in;
	size_t off, n = 0, j;

	p = mmap(NULL, c->size, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		fail_exit("mmap %s", c->name);
	for (j = 0, off = c->size - WINDOW + 4096;
	     j < TOUCHES && off < c->size; j++, off -= WINDOW) {
		double t;

		/* Only populated memory (sparse cases: a MiB every stride). */
		if (off % c->stride >= MIB)
			continue;
		if (mincore(p + (off & ~4095UL), 4096, &in))
			fail_exit("mincore");
		if (!k && (in & 1))
			continue;
		t = now_ms();
		v = p[off];
		/* The read must happen: its value goes to the asm. */
		asm volatile("" : : "r"(v));
		lat[n++] = (now_ms() - t) * 1e3;
	}
	munmap(p, c->size);
	r->touches[k][i] = n;
	if (!n)
		return;
	qsort(lat, n, sizeof(lat[0]), cmp_double);
	r->touch_median_us[k][i] = lat[n / 2];
	r->touch_worst_us[k][i] = lat[n - 1];
}

/*
 * Finish @session as soon as the handlers let it: like klu_finish(), but
 * trying every millisecond, so that the wait adds little to "restored".
 */
static int finish_soon(int session)
{
	int r, tries = 0;

	while ((r = luo_session_finish(session)) == -EBUSY && ++tries < 60000)
		usleep(1000);
	return r;
}

static double ratio(double a, double b)
{
	return b > 0 ? a / b : 0;
}

static void stage2(int luo_fd, int state_session)
{
	struct results *r;
	char name[64];
	size_t i;
	int k, s, fd;

	s = luo_retrieve_session(luo_fd, "bench-results");
	fd = s < 0 ? -1 : luo_session_retrieve_fd(s, RESULTS_TOKEN);
	if (fd < 0)
		fail_exit("retrieve the results");
	r = mmap(NULL, sizeof(*r), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (r == MAP_FAILED)
		fail_exit("mmap results");

	for (k = 0; k < 2; k++) {
		for (i = 0; i < NR_CASES; i++) {
			int session, file;
			double t, t_touch, t_settle;

			session_name(name, sizeof(name), k, i);
			session = luo_retrieve_session(luo_fd, name);
			if (session < 0)
				fail_exit("retrieve session %s", name);
			t = now_ms();
			file = luo_session_retrieve_fd(session, 1);
			r->retrieve_ms[k][i] = now_ms() - t;
			if (file < 0)
				fail_exit("retrieve %s", name);
			t_touch = now_ms();
			first_touches(r, k, i, file);
			t_settle = now_ms();
			r->touching_ms[k][i] = t_settle - t_touch;
			if (finish_soon(session))
				fail_exit("finish %s", name);
			r->restored_ms[k][i] = now_ms() - t;
			r->settling_ms[k][i] = now_ms() - t_settle;
			/*
			 * Closed only now: with the file closed, finish would
			 * drop the last reference and free all its memory.
			 */
			close(file);
			close(session);
		}
	}

	printf("BENCH: %-10s %-14s %12s %12s %8s\n", "step", "case",
	       "guest_memfd", "memfd", "ratio");
	for (i = 0; i < NR_CASES; i++) {
		print_row("preserve", cases[i].name, r->preserve_ms[0][i],
			  r->preserve_ms[1][i], "ms");
		print_row("usable", cases[i].name, r->retrieve_ms[0][i],
			  r->retrieve_ms[1][i], "ms (retrieve)");
		print_row("restored", cases[i].name, r->restored_ms[0][i],
			  r->restored_ms[1][i], "ms (retrieve to finish)");
		print_row("touching", cases[i].name, r->touching_ms[0][i],
			  r->touching_ms[1][i], "ms (of restored: the first touches)");
		print_row("settling", cases[i].name, r->settling_ms[0][i],
			  r->settling_ms[1][i], "ms (of restored: then until finish)");
		print_row("touch-med", cases[i].name, r->touch_median_us[0][i],
			  r->touch_median_us[1][i], "us (first touch, median)");
		print_row("touch-max", cases[i].name, r->touch_worst_us[0][i],
			  r->touch_worst_us[1][i], "us (first touch, worst)");
		printf("BENCH: %-10s %-14s %12d %12d %8s  %s\n", "touches",
		       cases[i].name, r->touches[0][i], r->touches[1][i], "",
		       "pages not in yet, of up to 64");
		print_row("metadata", cases[i].name, r->meta_bytes[0][i],
			  r->meta_bytes[1][i], "bytes");
	}
	print_row("freeze", "all cases", r->freeze_ms[0], r->freeze_ms[1],
		  "ms (freeze+unfreeze, median)");
	printf("BENCH: %-10s %-14s %5.1f..%-6.1f %5.1f..%-6.1f %8s  %s\n", "", "spread",
	       r->freeze_spread_ms[0][0], r->freeze_spread_ms[0][1],
	       r->freeze_spread_ms[1][0], r->freeze_spread_ms[1][1], "",
	       "ms (a failing kexec's noise is larger than a freeze)");

	printf("BENCH-JSON: {\"cases\": [");
	for (i = 0; i < NR_CASES; i++) {
		printf("%s{\"case\": \"%s\", ", i ? ", " : "", cases[i].name);
		printf("\"size\": %zu, ", cases[i].size);
		printf("\"populated\": %zu, ", cases[i].populated);
		print_json(r, 0, i);
		printf(", ");
		print_json(r, 1, i);
		printf("}");
	}
	printf("], \"freeze_ms_all_cases\": {\"guest_memfd\": %.2f, ", r->freeze_ms[0]);
	printf("\"memfd\": %.2f}}\n", r->freeze_ms[1]);
	/* blackout_vs_bare_kexec_2G comes from the Linux guest's runs (bench.sh). */
	printf("BENCH-RATIOS: usable_2G_vs_64M=%.3f usable_vs_memfd_1G=%.3f ",
	       ratio(r->retrieve_ms[0][CASE_2G], r->retrieve_ms[0][CASE_64M]),
	       ratio(r->retrieve_ms[0][CASE_1G], r->retrieve_ms[1][CASE_1G]));
	printf("restored_vs_memfd_1G=%.3f preserve_vs_memfd_1G=%.3f ",
	       ratio(r->restored_ms[0][CASE_1G], r->restored_ms[1][CASE_1G]),
	       ratio(r->preserve_ms[0][CASE_1G], r->preserve_ms[1][CASE_1G]));
	printf("first_touch_vs_memfd=%.3f\n",
	       ratio(r->touch_median_us[0][CASE_1G], r->touch_median_us[1][CASE_1G]));
	fflush(stdout);

	if (klu_finish(s) || klu_finish(state_session))
		fail_exit("finish");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
