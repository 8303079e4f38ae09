// SPDX-License-Identifier: GPL-2.0
/*
 * init for the kvm_luo test initramfs.
 *
 * The kernel command line names one test (klu.test=NAME) from /etc/klu-tests,
 * the test table the runner packed into the initramfs. Single-boot tests run
 * once and the machine powers off. Two-stage tests run with "-s 1", then init
 * kexecs into /kernel with /initrd.img and "klu.stage=2" on the command line,
 * and the new kernel runs the same test with "-s 2". Tests of kind "kexecN"
 * kexec N times, each kernel running the test with its stage number ("-s 3"
 * and on). /initrd.img is the image this kernel booted from (the runner's
 * symbolic link to /sys/firmware/initrd, which retain_initrd keeps), so
 * every kernel of a test boots the same kernel and image. In "agent" tests
 * the test kexecs by itself (through the live-update agent) in stage 1 and
 * prints that stage's line itself before it does; init never kexecs for it,
 * and halts if it returns. Every stage prints one line the runner looks for:
 *
 *	KLU: stage S of NAME: PASS|FAIL (exit status E, expected X)
 *
 * Upstream's tools/testing/selftests/liveupdate/init.c only runs one
 * two-stage binary at a fixed path; this one also mounts sysfs (the KVM
 * selftest library reads /sys/module/kvm/parameters), passes each test its
 * real path as argv[0] (the KVM library loads guest code from its own ELF),
 * and runs single-boot tests.
 *
 * When the kernel builds KVM as modules, init loads them (klu_kvm_modules.h)
 * before the test runs, as a host's initramfs or systemd-modules-load would
 * before its VMMs start; with klu.kvm=late on the command line it leaves that
 * to the test.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "klu_kvm_modules.h"

#define CMDLINE_MAX	4096
#define MAX_ARGS	32
#define TEST_TABLE	"/etc/klu-tests"
#define NEXT_KERNEL	"/kernel"
#define NEXT_INITRD	"/initrd.img"
/* A stage may leave klu.arg.NAME=VALUE words here for the next kernel. */
#define NEXT_ARGS	"/tmp/klu-next-args"

static char cmdline[CMDLINE_MAX];
static char *const test_env[] = { "PATH=/bin:/sbin", "HOME=/", NULL };

/*
 * Where init's own lines go once it can: the kernel log, one record per line.
 * Written to the console directly, a line can be cut in two by a kernel
 * message printed meanwhile, and the runner then does not find it (seen:
 * "KLU: kmemleak: s", a clocksource watchdog warning, "tage 1 of ...").
 */
static int kmsg_fd = -1;

static void say(const char *fmt, ...)
{
	char line[900], record[920];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	/* One write(), which is one record (dprintf() seeks, which kmsg refuses). */
	n = snprintf(record, sizeof(record), "<5>KLU: %s\n", line);
	if (kmsg_fd >= 0) {
		if (write(kmsg_fd, record, n) == n)
			return;
		printf("KLU: cannot write to /dev/kmsg (%s): lines go to the console\n",
		       strerror(errno));
		close(kmsg_fd);
		kmsg_fd = -1;
	}
	printf("KLU: %s\n", line);
	fflush(stdout);
}

/* Sends say()'s lines to the kernel log, with no rate limit on them. */
static void say_to_kmsg(void)
{
	int fd = open("/proc/sys/kernel/printk_devkmsg", O_WRONLY);

	if (fd < 0 || write(fd, "on\n", 3) != 3) {
		say("cannot lift /dev/kmsg's rate limit: %s", strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	kmsg_fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (kmsg_fd < 0)
		say("cannot open /dev/kmsg: %s", strerror(errno));
}

/* QEMU runs with -no-reboot, so a reset ends it; power-off needs ACPI. */
static void halt(void)
{
	sync();
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

static void do_mount(const char *src, const char *dir, const char *type)
{
	mkdir(dir, 0755);
	if (mount(src, dir, type, 0, NULL) && errno != EBUSY)
		say("warning: cannot mount %s on %s: %s", type, dir, strerror(errno));
}

static int read_cmdline(void)
{
	ssize_t len;
	int fd;

	fd = open("/proc/cmdline", O_RDONLY);
	if (fd < 0)
		return -1;
	len = read(fd, cmdline, sizeof(cmdline) - 1);
	close(fd);
	if (len < 0)
		return -1;
	while (len > 0 && cmdline[len - 1] == '\n')
		len--;
	cmdline[len] = '\0';
	return 0;
}

/* Value of "key=value" on the command line, copied to buf, or NULL. */
static const char *cmdline_get(const char *key, char *buf, size_t size)
{
	size_t klen = strlen(key);
	const char *p = cmdline;

	while ((p = strstr(p, key))) {
		if ((p == cmdline || p[-1] == ' ') && p[klen] == '=') {
			size_t n = strcspn(p + klen + 1, " ");

			if (n >= size)
				n = size - 1;
			memcpy(buf, p + klen + 1, n);
			buf[n] = '\0';
			return buf;
		}
		p += klen;
	}
	return NULL;
}

struct test {
	char line[1024];
	char *kind;
	char *argv[MAX_ARGS + 3];
	int argc;
};

/*
 * Find NAME in the test table. A line is: name kind timeout path [args...].
 * Lines starting with '#' are comments.
 */
static int find_test(const char *name, struct test *t)
{
	FILE *f = fopen(TEST_TABLE, "r");
	char *tok, *save;

	if (!f)
		return -1;
	while (fgets(t->line, sizeof(t->line), f)) {
		t->line[strcspn(t->line, "\n")] = '\0';
		tok = strtok_r(t->line, " \t", &save);
		if (!tok || tok[0] == '#' || strcmp(tok, name))
			continue;
		t->kind = strtok_r(NULL, " \t", &save);
		strtok_r(NULL, " \t", &save);	/* the runner's timeout */
		t->argc = 0;
		/*
		 * boot:WORD arguments are the runner's: WORD is on the first
		 * kernel's command line (and the next ones', but for what
		 * next_only() keeps back).
		 */
		while (t->argc < MAX_ARGS &&
		       (tok = strtok_r(NULL, " \t", &save)))
			if (strncmp(tok, "boot:", 5))
				t->argv[t->argc++] = tok;
		t->argv[t->argc] = NULL;
		fclose(f);
		return t->kind && t->argc ? 0 : -1;
	}
	fclose(f);
	return -1;
}

/*
 * Number of kernels a test runs in: "kexec" and "agent" tests run in two,
 * "kexecN" tests in N + 1 (N kexecs, 2 to 20).
 */
static int stages_of(const struct test *t)
{
	char *end;
	long n;

	if (!strcmp(t->kind, "kexec") || !strcmp(t->kind, "agent"))
		return 2;
	if (!strncmp(t->kind, "kexec", 5)) {
		n = strtol(t->kind + 5, &end, 10);
		if (end != t->kind + 5 && !*end && n >= 2 && n <= 20)
			return n + 1;
	}
	return 1;
}

static int run(struct test *t, int stage)
{
	char stage_arg[16];
	int status;
	pid_t pid;

	if (stages_of(t) > 1) {
		snprintf(stage_arg, sizeof(stage_arg), "%d", stage);
		t->argv[t->argc] = "-s";
		t->argv[t->argc + 1] = stage_arg;
		t->argv[t->argc + 2] = NULL;
	}

	pid = fork();
	if (pid < 0)
		return -1;
	if (!pid) {
		char *slash = strrchr(t->argv[0], '/');

		if (slash && slash != t->argv[0]) {
			*slash = '\0';
			if (chdir(t->argv[0]))
				_exit(126);
			*slash = '/';
		}
		execve(t->argv[0], t->argv, test_env);
		fprintf(stderr, "KLU: cannot execute %s: %s\n", t->argv[0],
			strerror(errno));
		_exit(127);
	}
	if (waitpid(pid, &status, 0) < 0)
		return -1;
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

#define KMEMLEAK	"/sys/kernel/debug/kmemleak"
/* kmemleak does not report objects younger than this (its min_age). */
#define KMEMLEAK_AGE_S	5

/* Forget what kmemleak suspects so far: only what a test leaks counts. */
static void kmemleak_clear(void)
{
	int fd = open(KMEMLEAK, O_WRONLY);

	if (fd < 0)
		return;
	if (write(fd, "clear", 5) != 5)
		say("kmemleak: clear failed: %s", strerror(errno));
	close(fd);
}

/*
 * On a kernel with kmemleak, scan for leaks once the objects the test freed
 * or leaked are old enough to be reported, print every report, and one line
 * the runner checks: "KLU: kmemleak: N unreferenced objects".
 */
static void kmemleak_check(const char *name, int stage)
{
	struct timespec t0, t1;
	char line[512];
	int fd, leaks = 0;
	FILE *f;

	fd = open(KMEMLEAK, O_WRONLY);
	if (fd < 0)
		return;
	sleep(KMEMLEAK_AGE_S + 1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (write(fd, "scan", 4) != 4) {
		say("kmemleak: scan failed: %s", strerror(errno));
		close(fd);
		return;
	}
	close(fd);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	f = fopen(KMEMLEAK, "r");
	if (!f) {
		say("kmemleak: cannot read the report: %s", strerror(errno));
		return;
	}
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = '\0';
		if (strstr(line, "unreferenced object"))
			leaks++;
		say("kmemleak: %s", line);
	}
	fclose(f);
	say("kmemleak: stage %d of %s: %d unreferenced objects (scan %.1f s)",
	    stage, name, leaks,
	    t1.tv_sec - t0.tv_sec + (t1.tv_nsec - t0.tv_nsec) / 1e9);
}

/*
 * Words a stage may leave for the next kernel's command line, and only for
 * it: klu.arg.NAME=VALUE for the next stage, and parameters of the handlers
 * (guest_memfd_luo.NAME=VALUE, kvm_vm_luo.NAME=VALUE).
 */
static bool next_only(const char *word)
{
	return !strncmp(word, "klu.arg.", 8) ||
	       !strncmp(word, "guest_memfd_luo.", 16) ||
	       !strncmp(word, "kvm_vm_luo.", 11);
}

/*
 * The TSC rate this kernel calibrated, in kHz, from its log ("tsc: Refined
 * TSC clocksource calibration" or "tsc: Detected"), or 0.
 */
static unsigned long tsc_khz_of_this_kernel(void)
{
	unsigned int mhz, frac;
	unsigned long khz = 0;
	char rec[8192], *msg;
	int end;
	ssize_t n;
	int fd;

	fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);
	if (fd < 0)
		return 0;
	/* EPIPE: records were overwritten before this read; go on. */
	while ((n = read(fd, rec, sizeof(rec) - 1)) > 0 || (n < 0 && errno == EPIPE)) {
		if (n <= 0)
			continue;
		rec[n] = '\0';
		msg = strchr(rec, ';');
		if (!msg)
			continue;
		/*
		 * The TSC's own line if the CPU's differs; refined later. The
		 * %n after each literal says the whole of it matched.
		 */
		end = 0;
		if ((sscanf(msg + 1, "tsc: Refined TSC clocksource calibration: %u.%3u MHz%n",
			    &mhz, &frac, &end) == 2 && end) ||
		    (sscanf(msg + 1, "tsc: Detected %u.%3u MHz TSC%n", &mhz, &frac, &end) == 2 &&
		     end) ||
		    (!khz && sscanf(msg + 1, "tsc: Detected %u.%3u MHz processor%n", &mhz, &frac,
				    &end) == 2 && end))
			khz = mhz * 1000UL + frac;
	}
	close(fd);
	return khz;
}

/*
 * Load the next kernel, with this command line but klu.stage=@stage. With
 * klu.early_tsc=1 on it, the next kernel also gets the TSC rate this one
 * calibrated (tsc_early_khz=): its clock then starts early in setup_arch()
 * rather than at tsc_init(), which QEMU's TCG leaves to, and the timestamps
 * of its early boot say where the time goes (boot_phases.py).
 */
static int load_next_kernel(int stage)
{
	unsigned long tsc_khz = 0;
	char buf[8];
	char next[CMDLINE_MAX + 32];
	const char *p = cmdline;
	size_t len = 0;
	int kfd, ifd;
	FILE *args;
	long ret;

	if (cmdline_get("klu.early_tsc", buf, sizeof(buf)) && !strcmp(buf, "1"))
		tsc_khz = tsc_khz_of_this_kernel();
	while (*p) {
		size_t n = strcspn(p, " ");

		if (strncmp(p, "klu.stage=", 10) && !next_only(p) &&
		    (!tsc_khz || strncmp(p, "tsc_early_khz=", 14)) &&
		    len + n + 1 < CMDLINE_MAX) {
			memcpy(next + len, p, n);
			len += n;
			next[len++] = ' ';
		}
		p += n;
		p += strspn(p, " ");
	}
	len += snprintf(next + len, sizeof(next) - len, "klu.stage=%d", stage);
	if (tsc_khz && len + 32 < CMDLINE_MAX)
		len += snprintf(next + len, sizeof(next) - len, " tsc_early_khz=%lu", tsc_khz);
	/* What the stage left for the next one: klu.arg.NAME=VALUE words. */
	args = fopen(NEXT_ARGS, "r");
	if (args) {
		char word[128];

		while (fscanf(args, "%127s", word) == 1)
			if (next_only(word) &&
			    len + strlen(word) + 1 < CMDLINE_MAX)
				len += snprintf(next + len, sizeof(next) - len,
						" %s", word);
		fclose(args);
		unlink(NEXT_ARGS);
	}
	kfd = open(NEXT_KERNEL, O_RDONLY);
	ifd = open(NEXT_INITRD, O_RDONLY);
	if (kfd < 0 || ifd < 0) {
		say("cannot open %s or %s", NEXT_KERNEL, NEXT_INITRD);
		return -1;
	}
	ret = syscall(__NR_kexec_file_load, kfd, ifd, strlen(next) + 1, next, 0UL);
	if (ret)
		say("kexec_file_load failed: %s", strerror(errno));
	close(kfd);
	close(ifd);
	return ret ? -1 : 0;
}

int main(void)
{
	char name[128], buf[32];
	int stage, expected, rc;
	struct test t;

	do_mount("devtmpfs", "/dev", "devtmpfs");
	do_mount("proc", "/proc", "proc");
	do_mount("sysfs", "/sys", "sysfs");
	do_mount("debugfs", "/sys/kernel/debug", "debugfs");
	do_mount("tmpfs", "/tmp", "tmpfs");
	say_to_kmsg();

	if (read_cmdline()) {
		say("cannot read /proc/cmdline");
		halt();
	}
	if (!cmdline_get("klu.test", name, sizeof(name))) {
		say("no klu.test= on the command line");
		halt();
	}
	stage = cmdline_get("klu.stage", buf, sizeof(buf)) ? atoi(buf) : 1;
	expected = cmdline_get("klu.expect", buf, sizeof(buf)) ? atoi(buf) : 0;

	if (find_test(name, &t)) {
		say("test %s is not in %s", name, TEST_TABLE);
		halt();
	}
	if (!strcmp(t.kind, "boot")) {
		/* Nothing to run: the runner reads what the kernel printed. */
		say("stage 1 of %s: PASS (booted)", name);
		halt();
	}

	if (!cmdline_get("klu.kvm", buf, sizeof(buf)) || strcmp(buf, "late")) {
		const char *vendor = klu_load_kvm();

		if (!vendor) {
			say("stage %d of %s: FAIL (cannot load KVM's modules: %s)",
			    stage, name, strerror(errno));
			halt();
		}
		if (*vendor)
			say("loaded kvm and %s", vendor);
	}
	kmemleak_clear();
	say("stage %d of %s: starting %s", stage, name, t.argv[0]);
	rc = run(&t, stage);
	if (!strcmp(t.kind, "agent") && stage == 1) {
		/* Only a test that failed comes back: its kexec did not happen. */
		say("stage 1 of %s: FAIL (it returned, exit status %d, instead of kexecing)",
		    name, rc);
		halt();
	}
	say("stage %d of %s: %s (exit status %d, expected %d)", stage, name,
	    rc == expected ? "PASS" : "FAIL", rc, expected);
	kmemleak_check(name, stage);

	if (rc == expected && stage < stages_of(&t) &&
	    !load_next_kernel(stage + 1)) {
		say("kexec into stage %d", stage + 1);
		sync();
		reboot(RB_KEXEC);
		say("kexec failed: %s", strerror(errno));
	}
	halt();
	return 0;
}
