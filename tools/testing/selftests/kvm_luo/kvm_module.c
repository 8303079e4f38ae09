// SPDX-License-Identifier: GPL-2.0
/*
 * KVM built as modules, as distributions build it. The handlers are built
 * in, so /dev/liveupdate opens and the sessions come back before any module
 * loads; they reach KVM through what it lends them when it loads. The test
 * runs with klu.kvm=late, so init loads KVM in neither kernel.
 *
 * Stage 1 loads KVM, preserves a VM and its guest_memfd (8 MiB, a pattern)
 * in session "kvm-module", and kexecs.
 *
 * Stage 2 starts without KVM (no /dev/kvm): /dev/liveupdate opens and the
 * session comes back, and the guest_memfd and the VM fail with ENODEV, twice
 * each, and stay retrievable. Then it loads KVM: the guest_memfd comes back
 * (retrieving its VM), then the VM, and the memory is whole. While they are
 * open, the vendor module cannot be unloaded. Once they are closed and the
 * session finished, it and kvm.ko unload: nothing the handlers or their
 * background workers took still pins them.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_kvm_modules.h"
#include "klu_util.h"

#define MIB		KLU_MIB
#define GMEM_SIZE	(8 * MIB)
#define TOKEN_VM	1
#define TOKEN_GMEM	2
#define SESSION		"kvm-module"
/* How long the background workers may take to drop the last guest_memfd inode. */
#define UNLOAD_SECS	30

static uint8_t pattern(size_t i)
{
	return (uint8_t)(i * 29 + (i >> 12) * 3 + 11);
}

static const char *load_kvm(void)
{
	const char *vendor = klu_load_kvm();

	if (!vendor)
		fail_exit("load KVM's modules");
	if (!*vendor)
		ksft_exit_fail_msg("this kernel has KVM built in: the test needs it as modules\n");
	ksft_print_msg("loaded kvm and %s\n", vendor);
	return vendor;
}

static void stage1(int luo_fd)
{
	struct klu_setup s;
	size_t i;

	load_kvm();
	s = klu_setup_shared(luo_fd, SESSION, GMEM_SIZE);
	for (i = 0; i < GMEM_SIZE; i++)
		s.p[i] = pattern(i);
	if (luo_session_preserve_fd(s.session, s.vm, TOKEN_VM) ||
	    luo_session_preserve_fd(s.session, s.gmem, TOKEN_GMEM))
		fail_exit("preserve");
	ksft_print_msg("kernel 1: preserved a VM and its guest_memfd; next kernel: no KVM\n");
	close(luo_fd);
	daemonize_and_wait();
}

static void expect_enodev(int session, uint64_t token, const char *what)
{
	int try, fd;

	for (try = 1; try <= 2; try++) {
		fd = luo_session_retrieve_fd(session, token);
		if (fd >= 0)
			ksft_exit_fail_msg("%s came back without KVM loaded\n", what);
		if (fd != -ENODEV)
			ksft_exit_fail_msg("%s: retrieve %d without KVM: %s, expected ENODEV\n",
					   what, try, strerror(-fd));
	}
	ksft_print_msg("%s: ENODEV without KVM, twice\n", what);
}

static int delete_module(const char *name)
{
	return syscall(SYS_delete_module, name, O_NONBLOCK) ? -errno : 0;
}

/* Unloads @name, waiting up to UNLOAD_SECS for what still holds it to go. */
static void unload_module(const char *name)
{
	time_t end = time(NULL) + UNLOAD_SECS;
	int r;

	while ((r = delete_module(name)) == -EWOULDBLOCK && time(NULL) < end)
		usleep(10000);
	if (r)
		ksft_exit_fail_msg("%s does not unload: %s\n", name, strerror(-r));
	ksft_print_msg("%s unloaded\n", name);
}

static void stage2(int luo_fd)
{
	int session, gmem, vm, r;
	const char *vendor;
	uint8_t *p;
	size_t i;

	if (!access("/dev/kvm", F_OK))
		ksft_exit_fail_msg("/dev/kvm exists before the test loads KVM\n");
	ksft_print_msg("kernel 2: /dev/liveupdate opens without KVM\n");
	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session " SESSION);
	expect_enodev(session, TOKEN_GMEM, "the guest_memfd");
	expect_enodev(session, TOKEN_VM, "the VM");

	vendor = load_kvm();
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	if (gmem < 0)
		fail_exit("retrieve the guest_memfd with KVM loaded");
	vm = luo_session_retrieve_fd(session, TOKEN_VM);
	if (vm < 0)
		fail_exit("retrieve the VM with KVM loaded");
	p = klu_map(gmem, GMEM_SIZE);
	for (i = 0; i < GMEM_SIZE; i++)
		if (p[i] != pattern(i))
			ksft_exit_fail_msg("byte %#zx is %#x, expected %#x\n", i,
					   p[i], pattern(i));
	ksft_print_msg("the guest_memfd and the VM came back, %lu MiB intact\n",
		       GMEM_SIZE / MIB);

	r = delete_module(vendor);
	if (r != -EWOULDBLOCK)
		ksft_exit_fail_msg("unloading %s with a VM open: %s, expected EWOULDBLOCK\n",
				   vendor, r ? strerror(-r) : "it unloaded");
	ksft_print_msg("%s stays while the VM is open\n", vendor);

	if (munmap(p, GMEM_SIZE) || close(gmem) || close(vm))
		fail_exit("close");
	if (klu_finish(session) || close(session))
		fail_exit("finish");
	unload_module(vendor);
	unload_module("kvm");
	ksft_print_msg("kernel 2: KVM unloaded once the files closed and the session finished\n");
}

int main(int argc, char *argv[])
{
	return klu_two_stages(argc, argv, stage1, stage2);
}
