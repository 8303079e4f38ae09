// SPDX-License-Identifier: GPL-2.0
/*
 * init for the kvm_luo test initramfs.
 *
 * The kernel command line names one test (klu.test=NAME) from /etc/klu-tests,
 * the test table the runner packed into the initramfs. Single-boot tests run
 * once and the machine powers off. Two-stage tests run with "-s 1", then init
 * kexecs into /kernel with /initrd.img and "klu.stage=2" appended, and the
 * new kernel runs the same test with "-s 2". Every stage prints one line the
 * runner looks for:
 *
 *	KLU: stage S of NAME: PASS|FAIL (exit status E, expected X)
 *
 * Upstream's tools/testing/selftests/liveupdate/init.c only runs one
 * two-stage binary at a fixed path; this one also mounts sysfs (the KVM
 * selftest library reads /sys/module/kvm/parameters), passes each test its
 * real path as argv[0] (the KVM library loads guest code from its own ELF),
 * and runs single-boot tests.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define CMDLINE_MAX	4096
#define MAX_ARGS	32
#define TEST_TABLE	"/etc/klu-tests"
#define NEXT_KERNEL	"/kernel"
#define NEXT_INITRD	"/initrd.img"

static char cmdline[CMDLINE_MAX];
static char *const test_env[] = { "PATH=/bin:/sbin", "HOME=/", NULL };

static void say(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("KLU: ");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	fflush(stdout);
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
		while (t->argc < MAX_ARGS &&
		       (tok = strtok_r(NULL, " \t", &save)))
			t->argv[t->argc++] = tok;
		t->argv[t->argc] = NULL;
		fclose(f);
		return t->kind && t->argc ? 0 : -1;
	}
	fclose(f);
	return -1;
}

static int run(struct test *t, int stage)
{
	char stage_arg[16];
	int status;
	pid_t pid;

	if (!strcmp(t->kind, "kexec")) {
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

static int load_next_kernel(void)
{
	char next[CMDLINE_MAX + 32];
	int kfd, ifd;
	long ret;

	snprintf(next, sizeof(next), "%s klu.stage=2", cmdline);
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

	say("stage %d of %s: starting %s", stage, name, t.argv[0]);
	rc = run(&t, stage);
	say("stage %d of %s: %s (exit status %d, expected %d)", stage, name,
	    rc == expected ? "PASS" : "FAIL", rc, expected);

	if (rc == expected && stage == 1 && !strcmp(t.kind, "kexec") &&
	    !load_next_kernel()) {
		say("kexec into stage 2");
		sync();
		reboot(RB_KEXEC);
		say("kexec failed: %s", strerror(errno));
	}
	halt();
	return 0;
}
