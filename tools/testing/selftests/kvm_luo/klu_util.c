// SPDX-License-Identifier: GPL-2.0
/*
 * Helpers shared by the kvm_luo selftests.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define CODE_GPA	0x1000UL

int klu_kvm_dev(void)
{
	static int fd = -1;

	if (fd < 0)
		fd = open("/dev/kvm", O_RDWR);
	if (fd < 0)
		fail_exit("open /dev/kvm");
	return fd;
}

long klu_mem_free_kb(void)
{
	char line[128];
	long kb = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		fail_exit("open /proc/meminfo");
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemFree: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

struct klu_vcpu klu_vcpu_create(int vm)
{
	/* mov al,[si]; hlt; mov [si],al; hlt */
	static const uint8_t code[] = { 0x8a, 0x04, 0xf4, 0x88, 0x04, 0xf4 };
	struct kvm_userspace_memory_region low = { 0 };
	struct klu_vcpu v;
	uint8_t *mem;
	int size;

	mem = mmap(NULL, KLU_MIB, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		fail_exit("mmap");
	memcpy(mem + CODE_GPA, code, sizeof(code));
	low.memory_size = KLU_MIB;
	low.userspace_addr = (uintptr_t)mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &low))
		fail_exit("memslot 0");
	v.fd = ioctl(vm, KVM_CREATE_VCPU, 0);
	size = ioctl(klu_kvm_dev(), KVM_GET_VCPU_MMAP_SIZE, 0);
	if (v.fd < 0 || size <= 0)
		fail_exit("KVM_CREATE_VCPU");
	v.run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, v.fd, 0);
	if (v.run == MAP_FAILED)
		fail_exit("mmap kvm_run");
	return v;
}

unsigned int klu_vcpu_access(struct klu_vcpu *v, uint64_t gpa, int write,
			     uint8_t *val)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	if (ioctl(v->fd, KVM_GET_SREGS, &sregs))
		fail_exit("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.ds.base = gpa;
	sregs.ds.selector = 0;
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs))
		fail_exit("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA + (write ? 3 : 0);
	regs.rax = *val;
	regs.rflags = 2;
	if (ioctl(v->fd, KVM_SET_REGS, &regs))
		fail_exit("KVM_SET_REGS");
	if (ioctl(v->fd, KVM_RUN, 0) &&
	    !(errno == EFAULT && v->run->exit_reason == KVM_EXIT_MEMORY_FAULT))
		fail_exit("KVM_RUN at %#llx", (unsigned long long)gpa);
	if (v->run->exit_reason == KVM_EXIT_HLT) {
		if (ioctl(v->fd, KVM_GET_REGS, &regs))
			fail_exit("KVM_GET_REGS");
		*val = (uint8_t)regs.rax;
	}
	return v->run->exit_reason;
}
