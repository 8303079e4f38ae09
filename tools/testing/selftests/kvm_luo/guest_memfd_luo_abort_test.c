// SPDX-License-Identifier: GPL-2.0
/*
 * guest_memfd live update, the paths that do not kexec.
 *
 * - A guest_memfd preserved without its VM makes the kexec fail: reboot()
 *   returns an error and the system keeps running, with the file still
 *   frozen until its session is closed.
 * - Closing the session before the kexec unfreezes the file (fallocate works
 *   again) and holds nothing back: once the files are closed, free memory is
 *   back where it was before 64 MiB of guest memory were allocated and
 *   preserved.
 */
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kexec.h>
#include <linux/kvm.h>
#include <linux/reboot.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define MIB		(1024UL * 1024)
#define GMEM_SIZE	(64 * MIB)

static int create_vm_and_gmem(int *vm)
{
	struct kvm_create_guest_memfd args = {
		.size = GMEM_SIZE,
		.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
	};
	int gmem;

	*vm = ioctl(klu_kvm_dev(), KVM_CREATE_VM, 0);
	if (*vm < 0)
		fail_exit("KVM_CREATE_VM");
	gmem = ioctl(*vm, KVM_CREATE_GUEST_MEMFD, &args);
	if (gmem < 0)
		fail_exit("KVM_CREATE_GUEST_MEMFD");
	if (fallocate(gmem, FALLOC_FL_KEEP_SIZE, 0, GMEM_SIZE))
		fail_exit("fallocate");
	return gmem;
}

static void load_next_kernel(void)
{
	static const char cmdline[] = "console=ttyS0 klu.test=none";
	int kfd = open("/kernel", O_RDONLY), ifd = open("/initrd.img", O_RDONLY);

	if (kfd < 0 || ifd < 0)
		fail_exit("open /kernel or /initrd.img");
	if (syscall(__NR_kexec_file_load, kfd, ifd, sizeof(cmdline), cmdline, 0UL))
		fail_exit("kexec_file_load");
	close(kfd);
	close(ifd);
}

static void kexec_without_vm(int luo_fd)
{
	int session, vm, gmem;

	session = luo_create_session(luo_fd, "gmem-without-vm");
	if (session < 0)
		fail_exit("create session");
	gmem = create_vm_and_gmem(&vm);
	if (luo_session_preserve_fd(session, gmem, 1))
		fail_exit("preserve guest_memfd");

	load_next_kernel();
	sync();
	if (syscall(__NR_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
		    LINUX_REBOOT_CMD_KEXEC, NULL) == 0)
		ksft_exit_fail_msg("kexec returned success\n");
	ksft_print_msg("kexec with a guest_memfd preserved without its VM fails: %s\n",
		       strerror(errno));

	if (fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, MIB) == 0 ||
	    errno != EPERM)
		ksft_exit_fail_msg("the guest_memfd is not frozen after the failed kexec\n");
	close(session);
	if (fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, MIB))
		fail_exit("punch hole after the session was closed");
	ksft_print_msg("closing the session unfroze the guest_memfd\n");
	close(gmem);
	close(vm);
}

static void close_before_kexec(int luo_fd)
{
	long before, after;
	int session, vm, gmem;

	before = klu_mem_free_kb();
	session = luo_create_session(luo_fd, "gmem-closed");
	if (session < 0)
		fail_exit("create session");
	gmem = create_vm_and_gmem(&vm);
	if (luo_session_preserve_fd(session, vm, 1) ||
	    luo_session_preserve_fd(session, gmem, 2))
		fail_exit("preserve");
	close(session);
	close(gmem);
	close(vm);
	after = klu_mem_free_kb();
	ksft_print_msg("free memory %ld kB before, %ld kB after preserve and close\n",
		       before, after);
	if (before - after > 2048)
		ksft_exit_fail_msg("%ld kB were not given back\n", before - after);
}

int main(void)
{
	int luo_fd = luo_open_device();

	if (luo_fd < 0)
		fail_exit("open /dev/liveupdate");
	kexec_without_vm(luo_fd);
	close_before_kexec(luo_fd);
	ksft_print_msg("all checks passed\n");
	return 0;
}
