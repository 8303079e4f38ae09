/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Loading KVM's modules from the initramfs, where the runner puts them when
 * the kernel builds KVM as modules (as distributions do): for init, which
 * loads them before a test runs, and for the tests that load them late
 * (klu.kvm=late). Header-only, since init.c is built on its own.
 */
#ifndef KLU_KVM_MODULES_H
#define KLU_KVM_MODULES_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KLU_MODULES_DIR	"/modules"

/* Loads KLU_MODULES_DIR/@name.ko: 0 if it loaded or was loaded, or -errno. */
static inline int klu_insmod(const char *name)
{
	char path[64];
	int fd, ret = 0;

	snprintf(path, sizeof(path), KLU_MODULES_DIR "/%s.ko", name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (syscall(SYS_finit_module, fd, "", 0) && errno != EEXIST)
		ret = -errno;
	close(fd);
	if (ret)
		fprintf(stderr, "KLU: loading %s: %s\n", path, strerror(-ret));
	return ret;
}

/*
 * Loads irqbypass.ko (which kvm.ko needs, when it is a module too), kvm.ko,
 * then the vendor module the CPU takes (kvm-amd under QEMU's TCG with -cpu
 * max). Returns that module's name as the kernel knows it
 * ("kvm_amd"), "" if the kernel has KVM built in (no kvm.ko in the image),
 * or NULL with errno set if KVM could not be loaded.
 */
static inline const char *klu_load_kvm(void)
{
	static const char * const files[] = { "kvm-amd", "kvm-intel" };
	static const char * const names[] = { "kvm_amd", "kvm_intel" };
	int ret, i;

	if (access(KLU_MODULES_DIR "/kvm.ko", F_OK))
		return "";
	ret = 0;
	if (!access(KLU_MODULES_DIR "/irqbypass.ko", F_OK))
		ret = klu_insmod("irqbypass");
	if (!ret)
		ret = klu_insmod("kvm");
	if (ret) {
		errno = -ret;
		return NULL;
	}
	for (i = 0; i < 2; i++)
		if (!klu_insmod(files[i]))
			return names[i];
	errno = ENODEV;
	return NULL;
}

#endif /* KLU_KVM_MODULES_H */
