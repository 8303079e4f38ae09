// SPDX-License-Identifier: GPL-2.0
/*
 * Live update of guest_memfd: guest RAM preserved across a kexec.
 *
 * Stage 1 creates a VM with two shared guest_memfds: a 16 MiB one whose first
 * 5 MiB hold a pattern, and a 64 MiB sparse one with one page in every MiB.
 * It checks that a preserved guest_memfd is frozen (fallocate and punch hole
 * fail with EPERM) and preserves the VM and both files.
 *
 * A second, software-protected VM gets a private guest_memfd, whose memory a
 * vCPU fills (userspace cannot map private memory). A third VM with 64 MiB of
 * guest_memfd memory goes in a session that is never retrieved.
 *
 * Stage 2 retrieves the guest_memfd before its VM (the handler fetches the
 * VM through the session), then the VM, and checks: the retrieved VM is the
 * one the guest_memfd is bound to (a memslot accepts it); the pattern is
 * intact when read through mmap and by a vCPU; the holes are still holes
 * (mincore), in both files. The protected VM is retrieved before its
 * guest_memfd, and a vCPU reads its private memory back. Finishing the
 * unretrieved session gives its 64 MiB back (MemFree).
 */
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <libliveupdate.h>

#define STATE_SESSION	"gmem-luo-state"
#define STATE_TOKEN	99
#define SESSION		"gmem-luo"
#define TOKEN_VM	1
#define TOKEN_GMEM	2
#define TOKEN_SPARSE	3
#define TOKEN_PVM	4
#define TOKEN_PGMEM	5
#define UNRETRIEVED	"gmem-luo-unretrieved"
#define UNRETRIEVED_SIZE (64 * MIB)

#define MIB		(1UL << 20)
#define PAGE		4096UL
#define GMEM_SIZE	(16 * MIB)
#define PATTERN_SIZE	(5 * MIB)
#define SPARSE_SIZE	(64 * MIB)
#define GMEM_GPA	0x100000UL	/* reachable from real mode */
#define CODE_GPA	0x1000UL

static int kvm_fd = -1;

static uint8_t pattern(size_t i)
{
	return (uint8_t)(i * 7 + (i >> 12) * 13 + 1);
}

static int kvm_dev(void)
{
	if (kvm_fd < 0)
		kvm_fd = open("/dev/kvm", O_RDWR);
	if (kvm_fd < 0)
		fail_exit("open /dev/kvm");
	return kvm_fd;
}

static int create_gmem(int vm, size_t size)
{
	struct kvm_create_guest_memfd args = {
		.size = size,
		.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
	};
	int fd = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);

	if (fd < 0)
		fail_exit("KVM_CREATE_GUEST_MEMFD");
	return fd;
}

static uint8_t *map(int fd, size_t size)
{
	uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		fail_exit("mmap guest_memfd");
	return p;
}

/* Number of pages of [p, p + size) present in the page cache. */
static size_t resident_pages(uint8_t *p, size_t size, size_t *first_hole)
{
	size_t i, n = 0, pages = size / PAGE;
	unsigned char *vec = calloc(pages, 1);

	if (!vec || mincore(p, size, vec))
		fail_exit("mincore");
	*first_hole = pages;
	for (i = 0; i < pages; i++) {
		if (vec[i] & 1)
			n++;
		else if (*first_hole == pages)
			*first_hole = i;
	}
	free(vec);
	return n;
}

static void expect_errno(int ret, int err, const char *what)
{
	if (ret == 0 || errno != err)
		ksft_exit_fail_msg("%s: returned %d (%s), expected %s\n", what,
				   ret, strerror(errno), strerror(err));
	ksft_print_msg("%s fails with %s\n", what, strerror(err));
}

struct vcpu {
	int fd;
	struct kvm_run *run;
};

/*
 * A vCPU in real mode that reads or writes one byte at any guest physical
 * address below 4 GiB: DS is based at the address, the code at CODE_GPA in
 * memslot 0 is "mov al,[si]; hlt" or "mov [si],al; hlt".
 */
static struct vcpu vcpu_create(int vm)
{
	static const uint8_t code[] = { 0x8a, 0x04, 0xf4, 0x88, 0x04, 0xf4 };
	struct kvm_userspace_memory_region low = { 0 };
	struct vcpu v;
	uint8_t *mem;
	int size;

	mem = mmap(NULL, MIB, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		fail_exit("mmap");
	memcpy(mem + CODE_GPA, code, sizeof(code));
	low.memory_size = MIB;
	low.userspace_addr = (uintptr_t)mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &low))
		fail_exit("memslot 0");
	v.fd = ioctl(vm, KVM_CREATE_VCPU, 0);
	size = ioctl(kvm_dev(), KVM_GET_VCPU_MMAP_SIZE, 0);
	if (v.fd < 0 || size <= 0)
		fail_exit("KVM_CREATE_VCPU");
	v.run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, v.fd, 0);
	if (v.run == MAP_FAILED)
		fail_exit("mmap kvm_run");
	return v;
}

static uint8_t vcpu_access(struct vcpu *v, uint64_t gpa, int write, uint8_t val)
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
	regs.rax = val;
	regs.rflags = 2;
	if (ioctl(v->fd, KVM_SET_REGS, &regs) || ioctl(v->fd, KVM_RUN, 0))
		fail_exit("KVM_RUN at %#llx", (unsigned long long)gpa);
	if (v->run->exit_reason != KVM_EXIT_HLT)
		ksft_exit_fail_msg("vCPU exit %u at %#llx\n", v->run->exit_reason,
				   (unsigned long long)gpa);
	if (ioctl(v->fd, KVM_GET_REGS, &regs))
		fail_exit("KVM_GET_REGS");
	return (uint8_t)regs.rax;
}

/* A private guest_memfd of a protected VM, in memslot 1, all private. */
static int private_gmem_slot(int vm, int gmem_or_neg)
{
	struct kvm_create_guest_memfd args = { .size = GMEM_SIZE };
	struct kvm_userspace_memory_region2 slot = { 0 };
	struct kvm_memory_attributes attr = {
		.address = GMEM_GPA,
		.size = GMEM_SIZE,
		.attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE,
	};
	int gmem = gmem_or_neg;

	if (gmem < 0)
		gmem = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);
	if (gmem < 0)
		fail_exit("KVM_CREATE_GUEST_MEMFD (private)");
	slot.slot = 1;
	slot.flags = KVM_MEM_GUEST_MEMFD;
	slot.guest_phys_addr = GMEM_GPA;
	slot.memory_size = GMEM_SIZE;
	slot.guest_memfd = gmem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &slot))
		fail_exit("private memslot");
	if (ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &attr))
		fail_exit("KVM_SET_MEMORY_ATTRIBUTES");
	return gmem;
}

static const size_t private_offsets[] = { 0, 3, PAGE + 9, 2 * MIB + 1, GMEM_SIZE - 1 };

static long mem_free_kb(void)
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

/* Read bytes of guest memory with a vCPU in real mode, through a memslot. */
static void vcpu_check(int vm, int gmem, uint8_t *gmem_map)
{
	static const uint8_t code[] = { 0x8a, 0x04, 0xf4 }; /* mov al,[si]; hlt */
	struct kvm_userspace_memory_region2 slot = { 0 };
	struct kvm_userspace_memory_region low = { 0 };
	size_t offsets[] = { 0, 1, PAGE + 5, MIB + 17, PATTERN_SIZE - 1 };
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	int vcpu, run_size;
	uint8_t *code_mem;
	size_t i;

	code_mem = mmap(NULL, MIB, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (code_mem == MAP_FAILED)
		fail_exit("mmap");
	memcpy(code_mem + CODE_GPA, code, sizeof(code));
	low.memory_size = MIB;
	low.userspace_addr = (uintptr_t)code_mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &low))
		fail_exit("memslot 0");

	slot.slot = 1;
	slot.flags = KVM_MEM_GUEST_MEMFD;
	slot.guest_phys_addr = GMEM_GPA;
	slot.memory_size = GMEM_SIZE;
	slot.userspace_addr = (uintptr_t)gmem_map;
	slot.guest_memfd = gmem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &slot))
		fail_exit("a memslot refuses the retrieved guest_memfd");

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	run_size = ioctl(kvm_dev(), KVM_GET_VCPU_MMAP_SIZE, 0);
	if (vcpu < 0 || run_size <= 0)
		fail_exit("KVM_CREATE_VCPU");
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		fail_exit("mmap kvm_run");

	for (i = 0; i < ARRAY_SIZE(offsets); i++) {
		if (ioctl(vcpu, KVM_GET_SREGS, &sregs))
			fail_exit("KVM_GET_SREGS");
		sregs.cs.base = 0;
		sregs.cs.selector = 0;
		sregs.ds.base = GMEM_GPA + offsets[i];
		sregs.ds.selector = 0;
		if (ioctl(vcpu, KVM_SET_SREGS, &sregs))
			fail_exit("KVM_SET_SREGS");
		memset(&regs, 0, sizeof(regs));
		regs.rip = CODE_GPA;
		regs.rflags = 2;
		if (ioctl(vcpu, KVM_SET_REGS, &regs) || ioctl(vcpu, KVM_RUN, 0))
			fail_exit("KVM_RUN");
		if (run->exit_reason != KVM_EXIT_HLT)
			ksft_exit_fail_msg("vCPU exit %u reading offset %#zx\n",
					   run->exit_reason, offsets[i]);
		if (ioctl(vcpu, KVM_GET_REGS, &regs))
			fail_exit("KVM_GET_REGS");
		if ((uint8_t)regs.rax != pattern(offsets[i]))
			ksft_exit_fail_msg("vCPU read %#x at %#zx, expected %#x\n",
					   (uint8_t)regs.rax, offsets[i],
					   pattern(offsets[i]));
	}
	ksft_print_msg("a vCPU reads the pattern at %zu offsets\n", i);
}

static void stage1(int luo_fd)
{
	int session, vm, gmem, sparse, pvm, pgmem, unretrieved, uvm, ugmem;
	struct vcpu v;
	uint8_t *p, *s;
	size_t i;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	session = luo_create_session(luo_fd, SESSION);
	unretrieved = luo_create_session(luo_fd, UNRETRIEVED);
	if (session < 0 || unretrieved < 0)
		fail_exit("create session");

	/* A protected VM whose guest writes its private memory. */
	pvm = ioctl(kvm_dev(), KVM_CREATE_VM, KVM_X86_SW_PROTECTED_VM);
	if (pvm < 0)
		fail_exit("KVM_CREATE_VM (protected)");
	pgmem = private_gmem_slot(pvm, -1);
	v = vcpu_create(pvm);
	for (i = 0; i < ARRAY_SIZE(private_offsets); i++)
		vcpu_access(&v, GMEM_GPA + private_offsets[i], 1,
			    pattern(private_offsets[i]));
	if (vcpu_access(&v, GMEM_GPA, 0, 0) != pattern(0))
		ksft_exit_fail_msg("private memory does not hold what the guest wrote\n");
	if (luo_session_preserve_fd(session, pvm, TOKEN_PVM) ||
	    luo_session_preserve_fd(session, pgmem, TOKEN_PGMEM))
		fail_exit("preserve the protected VM and its private guest_memfd");

	/* A VM with 64 MiB that is never retrieved. */
	uvm = ioctl(kvm_dev(), KVM_CREATE_VM, 0);
	if (uvm < 0)
		fail_exit("KVM_CREATE_VM");
	ugmem = create_gmem(uvm, UNRETRIEVED_SIZE);
	if (fallocate(ugmem, FALLOC_FL_KEEP_SIZE, 0, UNRETRIEVED_SIZE))
		fail_exit("fallocate");
	if (luo_session_preserve_fd(unretrieved, uvm, TOKEN_VM) ||
	    luo_session_preserve_fd(unretrieved, ugmem, TOKEN_GMEM))
		fail_exit("preserve the unretrieved VM");

	vm = ioctl(kvm_dev(), KVM_CREATE_VM, 0);
	if (vm < 0)
		fail_exit("KVM_CREATE_VM");
	gmem = create_gmem(vm, GMEM_SIZE);
	sparse = create_gmem(vm, SPARSE_SIZE);
	p = map(gmem, GMEM_SIZE);
	for (i = 0; i < PATTERN_SIZE; i++)
		p[i] = pattern(i);
	s = map(sparse, SPARSE_SIZE);
	for (i = 0; i < SPARSE_SIZE; i += MIB)
		s[i] = pattern(i);

	if (luo_session_preserve_fd(session, vm, TOKEN_VM) ||
	    luo_session_preserve_fd(session, gmem, TOKEN_GMEM) ||
	    luo_session_preserve_fd(session, sparse, TOKEN_SPARSE))
		fail_exit("preserve");

	expect_errno(fallocate(gmem, FALLOC_FL_KEEP_SIZE, PATTERN_SIZE, PAGE),
		     EPERM, "fallocate on a preserved guest_memfd");
	expect_errno(fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
			       0, PAGE),
		     EPERM, "punching a hole in a preserved guest_memfd");
	if (p[0] != pattern(0))
		ksft_exit_fail_msg("a failed punch hole changed the memory\n");

	ksft_print_msg("[STAGE 1] preserved 3 VMs and 4 guest_memfds in 2 sessions\n");
	close(luo_fd);
	daemonize_and_wait();
}

static void stage2(int luo_fd, int state_session)
{
	int session, vm, gmem, sparse, pvm, pgmem, unretrieved;
	long before, after;
	size_t i, n, hole;
	struct vcpu v;
	uint8_t *p, *s;

	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session");
	/* guest_memfd first: its handler fetches the VM through the session. */
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	if (gmem < 0)
		fail_exit("retrieve guest_memfd before its VM");
	vm = luo_session_retrieve_fd(session, TOKEN_VM);
	sparse = luo_session_retrieve_fd(session, TOKEN_SPARSE);
	if (vm < 0 || sparse < 0)
		fail_exit("retrieve VM and sparse guest_memfd");

	p = map(gmem, GMEM_SIZE);
	n = resident_pages(p, GMEM_SIZE, &hole);
	if (n != PATTERN_SIZE / PAGE || hole != PATTERN_SIZE / PAGE)
		ksft_exit_fail_msg("%zu pages present, first hole at page %zu; expected %lu and %lu\n",
				   n, hole, PATTERN_SIZE / PAGE, PATTERN_SIZE / PAGE);
	for (i = 0; i < PATTERN_SIZE; i++)
		if (p[i] != pattern(i))
			ksft_exit_fail_msg("byte %#zx is %#x, expected %#x\n",
					   i, p[i], pattern(i));
	ksft_print_msg("the %lu MiB pattern survived; the rest is still a hole\n",
		       PATTERN_SIZE / MIB);

	s = map(sparse, SPARSE_SIZE);
	n = resident_pages(s, SPARSE_SIZE, &hole);
	if (n != SPARSE_SIZE / MIB)
		ksft_exit_fail_msg("sparse file: %zu pages present, expected %lu\n",
				   n, SPARSE_SIZE / MIB);
	for (i = 0; i < SPARSE_SIZE; i += MIB)
		if (s[i] != pattern(i))
			ksft_exit_fail_msg("sparse byte %#zx lost\n", i);
	ksft_print_msg("sparse file: %zu pages, holes kept\n", n);

	vcpu_check(vm, gmem, p);

	/* The protected VM first, then its guest_memfd. */
	pvm = luo_session_retrieve_fd(session, TOKEN_PVM);
	pgmem = luo_session_retrieve_fd(session, TOKEN_PGMEM);
	if (pvm < 0 || pgmem < 0)
		fail_exit("retrieve the protected VM and its guest_memfd");
	private_gmem_slot(pvm, pgmem);
	v = vcpu_create(pvm);
	for (i = 0; i < ARRAY_SIZE(private_offsets); i++)
		if (vcpu_access(&v, GMEM_GPA + private_offsets[i], 0, 0) !=
		    pattern(private_offsets[i]))
			ksft_exit_fail_msg("private byte %#zx lost\n",
					   private_offsets[i]);
	ksft_print_msg("the guest reads its private memory back\n");

	if (luo_session_finish(session) || luo_session_finish(state_session))
		fail_exit("finish");

	unretrieved = luo_retrieve_session(luo_fd, UNRETRIEVED);
	if (unretrieved < 0)
		fail_exit("retrieve the unretrieved session");
	before = mem_free_kb();
	if (luo_session_finish(unretrieved))
		fail_exit("finish without retrieve");
	after = mem_free_kb();
	ksft_print_msg("finish without retrieve freed %ld kB of %lu kB\n",
		       after - before, UNRETRIEVED_SIZE >> 10);
	if (after - before < (long)(UNRETRIEVED_SIZE >> 10) * 15 / 16)
		ksft_exit_fail_msg("the unretrieved guest memory was not freed\n");
	ksft_print_msg("[STAGE 2] all checks passed\n");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
