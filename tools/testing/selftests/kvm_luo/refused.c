// SPDX-License-Identifier: GPL-2.0
/*
 * A kernel that does not read the layout a VM or guest_memfd was preserved
 * in refuses those files one by one, and everything else preserved with
 * them still comes back.
 *
 * In 7.3, LUO fails every open of /dev/liveupdate when the previous kernel
 * preserved a file under a compatible string no handler registered, so a
 * single file of an unknown layout would cost userspace every session. The
 * handlers register the names of the layouts before theirs (kvm-vm-rs-v1,
 * kvm-gmem-rs-v1, kvm-gmem-rs-v2) to refuse them instead.
 *
 * No kernel that writes those layouts is built any more, so the test plays
 * both sides with the names of the layout before the ABI header, which this
 * kernel reads unless told not to: the first kernel boots with the handlers'
 * preserve_legacy parameters (boot: arguments in tests.list), so that its VM
 * and guest_memfd go under kvm-vm-rs-v2 and kvm-gmem-rs-v3, and stage 1 boots
 * the second kernel with refuse_legacy, under which the handlers register
 * those two names as refused layouts, exactly as they do the older ones.
 *
 * Stage 1 puts a VM, its guest_memfd (4 MiB, a pattern) and a memfd (1 MiB,
 * another pattern) in session "refused-1", a memfd in session "refused-2",
 * and a second VM in session "refused-3", and kexecs.
 *
 * Stage 2 must open /dev/liveupdate. Every name the handlers refuse has a
 * handler (the liveupdate test module, CONFIG_LIVEUPDATE_TEST, logs each
 * registration). It gets "refused-2" and its memfd back whole; in
 * "refused-1", the VM and the guest_memfd are refused with EOPNOTSUPP, a
 * second time too, and the memfd comes back whole; "refused-3" is closed
 * with its VM never retrieved, which finishes it. The kernel log names each
 * refused layout once per refused retrieve and once per refused file
 * finished, and every session finishes.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define MIB		KLU_MIB
#define GMEM_SIZE	(4 * MIB)
#define MEMFD_SIZE	(1 * MIB)
#define TOKEN_VM	1
#define TOKEN_GMEM	2
#define TOKEN_MEMFD	3
#define TOKEN_VM2	4
#define NEXT_ARGS	"/tmp/klu-next-args"
#define REFUSED		"a file an earlier kernel preserved in a layout this kernel does not read"
#define UNREAD		"finished unread; the memory it preserved stays reserved"

static uint8_t pattern(size_t i, int which)
{
	return (uint8_t)(i * 13 + (i >> 12) * 7 + which * 59 + 3);
}

static void fill(uint8_t *p, size_t size, int which)
{
	size_t i;

	for (i = 0; i < size; i++)
		p[i] = pattern(i, which);
}

static void check(const uint8_t *p, size_t size, int which, const char *what)
{
	size_t i;

	for (i = 0; i < size; i++)
		if (p[i] != pattern(i, which))
			ksft_exit_fail_msg("%s: byte %#zx is %#x, expected %#x\n",
					   what, i, p[i], pattern(i, which));
	ksft_print_msg("%s: %zu kB intact\n", what, size >> 10);
}

static int new_memfd(int which)
{
	int fd = memfd_create("refused", 0);

	if (fd < 0 || ftruncate(fd, MEMFD_SIZE))
		fail_exit("memfd");
	fill(klu_map(fd, MEMFD_SIZE), MEMFD_SIZE, which);
	return fd;
}

static void stage1(int luo_fd)
{
	int s1, s2, s3, vm, gmem;
	FILE *args;

	vm = klu_create_vm(0);
	gmem = klu_create_gmem(vm, GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP |
			       GUEST_MEMFD_FLAG_INIT_SHARED);
	fill(klu_map(gmem, GMEM_SIZE), GMEM_SIZE, 0);

	s1 = luo_create_session(luo_fd, "refused-1");
	s2 = luo_create_session(luo_fd, "refused-2");
	s3 = luo_create_session(luo_fd, "refused-3");
	if (s1 < 0 || s2 < 0 || s3 < 0)
		fail_exit("create sessions");
	if (luo_session_preserve_fd(s1, vm, TOKEN_VM) ||
	    luo_session_preserve_fd(s1, gmem, TOKEN_GMEM) ||
	    luo_session_preserve_fd(s1, new_memfd(1), TOKEN_MEMFD) ||
	    luo_session_preserve_fd(s2, new_memfd(2), TOKEN_MEMFD) ||
	    luo_session_preserve_fd(s3, klu_create_vm(0), TOKEN_VM2))
		fail_exit("preserve");

	args = fopen(NEXT_ARGS, "w");
	if (!args ||
	    fprintf(args, "kvm_vm_luo.refuse_legacy=1 guest_memfd_luo.refuse_legacy=1\n") < 0 ||
	    fclose(args))
		fail_exit(NEXT_ARGS);
	ksft_print_msg("kernel 1: 2 VMs, a guest_memfd as before, 2 memfds; next kernel refuses\n");
	close(luo_fd);
	daemonize_and_wait();
}

static void retrieve_memfd(int session, int which, const char *what)
{
	int fd = luo_session_retrieve_fd(session, TOKEN_MEMFD);

	if (fd < 0)
		fail_exit("retrieve the memfd of %s", what);
	check(klu_map(fd, MEMFD_SIZE), MEMFD_SIZE, which, what);
}

static void expect_refused(int session, uint64_t token, const char *what)
{
	int try, fd;

	for (try = 1; try <= 2; try++) {
		fd = luo_session_retrieve_fd(session, token);
		if (fd >= 0)
			ksft_exit_fail_msg("%s came back from a layout this kernel must refuse\n",
					   what);
		if (fd != -EOPNOTSUPP)
			ksft_exit_fail_msg("%s: retrieve %d failed with %s, expected EOPNOTSUPP\n",
					   what, try, strerror(-fd));
	}
	ksft_print_msg("%s: refused with EOPNOTSUPP, twice\n", what);
}

static void expect_log(const char *name, const char *msg, int want)
{
	char needle[160];
	int got;

	snprintf(needle, sizeof(needle), "%s: %s", name, msg);
	got = klu_kmsg_count(needle);
	if (got != want)
		ksft_exit_fail_msg("the kernel log has \"%s\" %d times, expected %d\n",
				   needle, got, want);
}

/* A handler has @name: the liveupdate test module logs every registration. */
static void expect_handler(const char *name)
{
	char needle[96];

	snprintf(needle, sizeof(needle), "Registered 3 FLBs with file handler: [%s]", name);
	if (klu_kmsg_count(needle) != 1)
		ksft_exit_fail_msg("no handler has the name %s\n", name);
}

static void stage2(int luo_fd)
{
	static const char * const refused[] = {
		"kvm-vm-rs-v1", "kvm-gmem-rs-v1", "kvm-gmem-rs-v2",
		"kvm-vm-rs-v2", "kvm-gmem-rs-v3",
	};
	int s1, s2, s3;
	size_t i;

	ksft_print_msg("kernel 2: /dev/liveupdate opens\n");
	for (i = 0; i < ARRAY_SIZE(refused); i++)
		expect_handler(refused[i]);
	s2 = luo_retrieve_session(luo_fd, "refused-2");
	if (s2 < 0)
		fail_exit("retrieve session refused-2");
	retrieve_memfd(s2, 2, "the memfd of the other session");

	s1 = luo_retrieve_session(luo_fd, "refused-1");
	if (s1 < 0)
		fail_exit("retrieve session refused-1");
	expect_refused(s1, TOKEN_GMEM, "the guest_memfd");
	expect_refused(s1, TOKEN_VM, "the VM");
	retrieve_memfd(s1, 1, "the memfd beside them");
	expect_log("kvm-vm-rs-v2", REFUSED, 1);
	expect_log("kvm-gmem-rs-v3", REFUSED, 1);

	s3 = luo_retrieve_session(luo_fd, "refused-3");
	if (s3 < 0)
		fail_exit("retrieve session refused-3");
	if (klu_finish(s1) || klu_finish(s2) || close(s3))
		fail_exit("finish");
	expect_log("kvm-vm-rs-v2", REFUSED, 1);
	expect_log("kvm-vm-rs-v2", UNREAD, 2);
	expect_log("kvm-gmem-rs-v3", UNREAD, 1);
	ksft_print_msg("kernel 2: sessions finished, one unread; refused memory stays reserved\n");
}

int main(int argc, char *argv[])
{
	return klu_two_stages(argc, argv, stage1, stage2);
}
