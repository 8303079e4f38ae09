// SPDX-License-Identifier: GPL-2.0
/*
 * Helpers shared by the kvm_luo selftests.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/const.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define CODE_GPA	0x1000UL

/* Layout of memslot 0 for 64-bit vCPUs. */
#define GDT_GPA		0x6000UL
#define PML4_GPA	0x2000UL
#define PDPT_GPA	0x3000UL
#define PD0_GPA		0x4000UL
#define PD4_GPA		0x5000UL
#define CODE64_GPA	0x10000UL

#define PTE_PRESENT	_BITULL(0)
#define PTE_WRITE	_BITULL(1)
#define PTE_LARGE	_BITULL(7)

/* What guest_memfd_luo prints for each file it preserves. */
#define GMEM_REPORT	"guest_memfd_luo: preserving"

int klu_kvm_dev(void)
{
	static int fd = -1;

	if (fd < 0)
		fd = open("/dev/kvm", O_RDWR);
	if (fd < 0)
		fail_exit("open /dev/kvm");
	return fd;
}

int klu_create_vm(unsigned long type)
{
	int vm = ioctl(klu_kvm_dev(), KVM_CREATE_VM, type);

	if (vm < 0)
		fail_exit("KVM_CREATE_VM");
	return vm;
}

int klu_create_gmem(int vm, uint64_t size, uint64_t flags)
{
	struct kvm_create_guest_memfd args = { .size = size, .flags = flags };
	int gmem = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);

	if (gmem < 0)
		fail_exit("KVM_CREATE_GUEST_MEMFD");
	return gmem;
}

uint8_t *klu_map(int fd, size_t size)
{
	uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
			  0);

	if (p == MAP_FAILED)
		fail_exit("mmap");
	return p;
}

struct klu_setup klu_setup_shared(int luo_fd, const char *name, size_t size)
{
	struct klu_setup t;

	t.session = luo_create_session(luo_fd, name);
	if (t.session < 0)
		fail_exit("create session %s", name);
	t.vm = klu_create_vm(0);
	t.gmem = klu_create_gmem(t.vm, size, GUEST_MEMFD_FLAG_MMAP |
				 GUEST_MEMFD_FLAG_INIT_SHARED);
	t.p = klu_map(t.gmem, size);
	return t;
}

void klu_bind_gmem(int vm, int gmem, uint64_t gpa, size_t size, uint8_t *p)
{
	struct kvm_userspace_memory_region2 slot = {
		.slot = 1,
		.flags = KVM_MEM_GUEST_MEMFD,
		.guest_phys_addr = gpa,
		.memory_size = size,
		.userspace_addr = (uintptr_t)p,
		.guest_memfd = gmem,
	};

	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &slot))
		fail_exit("guest_memfd memslot at %#llx", (unsigned long long)gpa);
}

size_t klu_resident_pages(uint8_t *p, size_t size, size_t *first_hole)
{
	size_t i, n = 0, pages = size / KLU_PAGE, hole = pages;
	unsigned char *vec = calloc(pages, 1);

	if (!vec || mincore(p, size, vec))
		fail_exit("mincore");
	for (i = 0; i < pages; i++) {
		if (vec[i] & 1)
			n++;
		else if (hole == pages)
			hole = i;
	}
	free(vec);
	if (first_hole)
		*first_hole = hole;
	return n;
}

int klu_finish(int session)
{
	int r, tries = 0;

	while ((r = luo_session_finish(session)) == -EBUSY && ++tries < 6000)
		usleep(10000);
	return r;
}

int klu_two_stages(int argc, char *argv[], void (*stage1)(int luo_fd),
		   void (*stage2)(int luo_fd))
{
	int stage = 0, opt, luo_fd;

	while ((opt = getopt(argc, argv, "s:")) != -1)
		if (opt == 's')
			stage = atoi(optarg);
	if (stage < 1 || stage > 2)
		ksft_exit_fail_msg("usage: %s -s 1|2\n", argv[0]);
	luo_fd = luo_open_device();
	if (luo_fd < 0)
		fail_exit("open /dev/liveupdate");
	if (stage == 1)
		stage1(luo_fd);
	else
		stage2(luo_fd);
	return 0;
}

void klu_gmem_reports(struct klu_gmem_report *out, size_t n)
{
	struct klu_gmem_report seen[64];
	size_t i, count = 0;
	char line[512];
	FILE *f = fopen("/dev/kmsg", "r");

	if (!f)
		fail_exit("open /dev/kmsg");
	if (n > ARRAY_SIZE(seen))
		ksft_exit_fail_msg("at most %zu reports\n", ARRAY_SIZE(seen));
	fcntl(fileno(f), F_SETFL, fcntl(fileno(f), F_GETFL) | O_NONBLOCK);
	while (fgets(line, sizeof(line), f)) {
		char *p = strstr(line, GMEM_REPORT);
		struct klu_gmem_report r;

		if (p && sscanf(p, GMEM_REPORT " %ld pages in %ld extents, %ld bytes",
				&r.pages, &r.extents, &r.bytes) == 3 && r.pages > 0)
			seen[count++ % ARRAY_SIZE(seen)] = r;
	}
	fclose(f);
	if (count < n)
		ksft_exit_fail_msg("found %zu guest_memfd metadata reports, expected %zu\n",
				   count, n);
	for (i = 0; i < n; i++)
		out[i] = seen[(count - n + i) % ARRAY_SIZE(seen)];
}

int klu_kmsg_count(const char *needle)
{
	FILE *f = fopen("/dev/kmsg", "r");
	char line[1024];
	int n = 0;

	if (!f)
		fail_exit("open /dev/kmsg");
	fcntl(fileno(f), F_SETFL, fcntl(fileno(f), F_GETFL) | O_NONBLOCK);
	while (fgets(line, sizeof(line), f))
		if (strstr(line, needle))
			n++;
	fclose(f);
	return n;
}

void klu_fragment(int fd, size_t size)
{
	size_t off;

	if (fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size))
		fail_exit("fill the file to fragment memory with");
	for (off = 0; off < size; off += 2 * KLU_PAGE)
		if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			      off, KLU_PAGE))
			fail_exit("punch a hole at %#zx", off);
}

void klu_write_str(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0 || write(fd, val, strlen(val)) != (ssize_t)strlen(val))
		fail_exit("write %s to %s", val, path);
	close(fd);
}

void klu_memcg_enter(const char *name)
{
	char path[128], val[32];

	mkdir("/sys/fs/cgroup", 0755);
	if (mount("none", "/sys/fs/cgroup", "cgroup2", 0, NULL) && errno != EBUSY)
		fail_exit("mount cgroup2");
	klu_write_str("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
	snprintf(path, sizeof(path), "/sys/fs/cgroup/%s", name);
	if (mkdir(path, 0755) && errno != EEXIST)
		fail_exit("mkdir %s", path);
	snprintf(path, sizeof(path), "/sys/fs/cgroup/%s/cgroup.procs", name);
	snprintf(val, sizeof(val), "%d", getpid());
	klu_write_str(path, val);
	klu_write_str("/proc/self/oom_score_adj", "-1000");
}

void klu_memcg_leave(void)
{
	char val[32];

	klu_write_str("/proc/self/oom_score_adj", "0");
	snprintf(val, sizeof(val), "%d", getpid());
	klu_write_str("/sys/fs/cgroup/cgroup.procs", val);
}

long klu_memcg_read(const char *name, const char *file)
{
	char path[128], buf[32] = { 0 };
	int fd;

	snprintf(path, sizeof(path), "/sys/fs/cgroup/%s/%s", name, file);
	fd = open(path, O_RDONLY);
	if (fd < 0 || read(fd, buf, sizeof(buf) - 1) <= 0)
		fail_exit("read %s", path);
	close(fd);
	return atol(buf);
}

void klu_memcg_set_max(const char *name, long bytes)
{
	char path[128], val[32] = "max";

	snprintf(path, sizeof(path), "/sys/fs/cgroup/%s/memory.max", name);
	if (bytes >= 0)
		snprintf(val, sizeof(val), "%ld", bytes);
	klu_write_str(path, val);
}

void klu_meminfo_read(struct klu_meminfo *m)
{
	long free_kb = klu_mem_free_kb();
	char line[128];
	FILE *f;

	f = fopen("/proc/meminfo", "r");
	if (!f)
		fail_exit("open /proc/meminfo");
	m->n = 0;
	while (m->n < KLU_MEMINFO_MAX - 1 && fgets(line, sizeof(line), f))
		if (sscanf(line, "%31[^:]: %ld", m->name[m->n], &m->kb[m->n]) == 2)
			m->n++;
	fclose(f);
	snprintf(m->name[m->n], sizeof(m->name[0]), "FreeWithPerCpu");
	m->kb[m->n++] = free_kb;
}

long klu_meminfo_kb(const struct klu_meminfo *m, const char *name)
{
	int i;

	for (i = 0; i < m->n; i++)
		if (!strcmp(m->name[i], name))
			return m->kb[i];
	ksft_exit_fail_msg("no %s in /proc/meminfo\n", name);
}

void klu_meminfo_print_moved(const struct klu_meminfo *a,
			     const struct klu_meminfo *b, long min_kb)
{
	char msg[1024] = "";
	size_t len = 0;
	int i;

	for (i = 0; i < a->n && i < b->n && len < sizeof(msg); i++) {
		long d = b->kb[i] - a->kb[i];

		if (strcmp(a->name[i], b->name[i]) || (d < min_kb && -d < min_kb))
			continue;
		len += snprintf(msg + len, sizeof(msg) - len, " %s %+ld",
				a->name[i], d);
	}
	ksft_print_msg("moved (kB):%s\n", len ? msg : " nothing");
}

/*
 * Fold the per-CPU deltas of the vm counters into them (vm.stat_refresh; a
 * kernel without SMP has none and no such file).
 */
static void vm_stat_refresh(void)
{
	int fd = open("/proc/sys/vm/stat_refresh", O_WRONLY);

	if (fd < 0 && errno == ENOENT)
		return;
	if (fd < 0 || write(fd, "1", 1) != 1)
		fail_exit("write /proc/sys/vm/stat_refresh");
	close(fd);
}

/*
 * Free memory: each zone's free pages and the pages on its per-CPU free
 * lists (which MemFree does not count: megabytes on an SMP machine). Read
 * from /proc/meminfo and /proc/zoneinfo apart, the two drift by as much: a
 * per-CPU list refilled between the reads (by this process's own
 * allocations, up to its high mark) is counted twice, one drained is not
 * counted. Here both come from one pass over /proc/zoneinfo, just after the
 * vm counters are folded, with nothing of this process but read() in
 * between, and no page fault (seq_file prints a record again from scratch
 * when its buffer overflows, so each zone's lines come from one pass).
 * What other CPUs do meanwhile, and the deltas of the free count that the
 * fold leaves or makes (it drains per-CPU lists too), still move the
 * result: by a stat threshold per CPU and zone and a batch, 168 kB at most
 * in 400 reads on a 2-CPU debug machine. Not reentrant (one static buffer).
 */
long klu_mem_free_kb(void)
{
	static char buf[256 << 10];
	static int touched;
	long pages = 0, n;
	char *line, *save;
	size_t len = 0;
	ssize_t got;
	int fd;

	/* Touched before the fold, so that no page fault allocates after it. */
	if (!touched) {
		memset(buf, 1, sizeof(buf));
		touched = 1;
	}
	vm_stat_refresh();
	fd = open("/proc/zoneinfo", O_RDONLY);
	if (fd < 0)
		fail_exit("open /proc/zoneinfo");
	while ((got = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += got;
	if (got < 0)
		fail_exit("read /proc/zoneinfo");
	if (len == sizeof(buf) - 1)
		ksft_exit_fail_msg("/proc/zoneinfo is larger than %zu kB\n",
				   sizeof(buf) >> 10);
	close(fd);
	buf[len] = 0;
	for (line = strtok_r(buf, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save))
		if (sscanf(line, " pages free %ld", &n) == 1 ||
		    sscanf(line, " count: %ld", &n) == 1)
			pages += n;
	return pages * (KLU_PAGE / 1024);
}

static uint8_t *slot0_create(int vm)
{
	struct kvm_userspace_memory_region low = { 0 };
	uint8_t *mem;

	mem = mmap(NULL, KLU_MIB, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		fail_exit("mmap");
	low.memory_size = KLU_MIB;
	low.userspace_addr = (uintptr_t)mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &low))
		fail_exit("memslot 0");
	return mem;
}

static struct klu_vcpu vcpu_add(int vm, uint8_t *slot0)
{
	struct klu_vcpu v = { .slot0 = slot0 };
	int size;

	v.fd = ioctl(vm, KVM_CREATE_VCPU, 0);
	size = ioctl(klu_kvm_dev(), KVM_GET_VCPU_MMAP_SIZE, 0);
	if (v.fd < 0 || size <= 0)
		fail_exit("KVM_CREATE_VCPU");
	v.run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, v.fd, 0);
	if (v.run == MAP_FAILED)
		fail_exit("mmap kvm_run");
	return v;
}

/* Give the vCPU every CPUID feature KVM supports (long mode among them). */
static void set_supported_cpuid(int vcpu)
{
	int nent = 256;
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) +
					  nent * sizeof(struct kvm_cpuid_entry2));

	if (!cpuid)
		fail_exit("calloc");
	cpuid->nent = nent;
	if (ioctl(klu_kvm_dev(), KVM_GET_SUPPORTED_CPUID, cpuid) ||
	    ioctl(vcpu, KVM_SET_CPUID2, cpuid))
		fail_exit("CPUID");
	free(cpuid);
}

struct klu_vcpu klu_vcpu64_create(int vm)
{
	static const uint64_t gdt[] = {
		0,
		0x00209a0000000000ULL,	/* 0x08: 64-bit code */
		0x00cf92000000ffffULL,	/* 0x10: data */
	};
	struct kvm_segment code = {
		.selector = 0x08, .limit = 0xffffffff, .type = 11, .present = 1,
		.s = 1, .l = 1, .g = 1,
	};
	struct kvm_segment data = {
		.selector = 0x10, .limit = 0xffffffff, .type = 3, .present = 1,
		.s = 1, .db = 1, .g = 1,
	};
	uint8_t *mem = slot0_create(vm);
	struct kvm_sregs sregs;
	struct klu_vcpu v;
	uint64_t *pt;
	int i;

	memcpy(mem + GDT_GPA, gdt, sizeof(gdt));
	pt = (uint64_t *)(mem + PML4_GPA);
	pt[0] = PDPT_GPA | PTE_PRESENT | PTE_WRITE;
	pt = (uint64_t *)(mem + PDPT_GPA);
	pt[0] = PD0_GPA | PTE_PRESENT | PTE_WRITE;
	pt[4] = PD4_GPA | PTE_PRESENT | PTE_WRITE;
	pt = (uint64_t *)(mem + PD0_GPA);
	pt[0] = PTE_PRESENT | PTE_WRITE | PTE_LARGE;
	pt = (uint64_t *)(mem + PD4_GPA);
	for (i = 0; i < 512; i++)
		pt[i] = ((4ULL << 30) + ((uint64_t)i << 21)) |
			PTE_PRESENT | PTE_WRITE | PTE_LARGE;

	v = vcpu_add(vm, mem);
	set_supported_cpuid(v.fd);
	if (ioctl(v.fd, KVM_GET_SREGS, &sregs))
		fail_exit("KVM_GET_SREGS");
	sregs.cs = code;
	sregs.ds = data;
	sregs.es = data;
	sregs.fs = data;
	sregs.gs = data;
	sregs.ss = data;
	sregs.gdt.base = GDT_GPA;
	sregs.gdt.limit = sizeof(gdt) - 1;
	sregs.cr3 = PML4_GPA;
	sregs.cr4 = 1 << 5;			/* PAE */
	sregs.cr0 = 0x80000001 | (1 << 4);	/* PG, PE, ET */
	sregs.efer = (1 << 8) | (1 << 10);	/* LME, LMA */
	if (ioctl(v.fd, KVM_SET_SREGS, &sregs))
		fail_exit("KVM_SET_SREGS (64-bit)");
	return v;
}

void klu_vcpu64_run(struct klu_vcpu *v, const uint8_t *code, size_t len,
		    struct kvm_regs *regs)
{
	if (len > 4096)
		ksft_exit_fail_msg("guest code too long\n");
	memcpy(v->slot0 + CODE64_GPA, code, len);
	regs->rip = CODE64_GPA;
	regs->rflags = 2;
	if (ioctl(v->fd, KVM_SET_REGS, regs) || ioctl(v->fd, KVM_RUN, 0))
		fail_exit("KVM_RUN (64-bit)");
	if (v->run->exit_reason != KVM_EXIT_HLT)
		ksft_exit_fail_msg("64-bit vCPU exit %u\n", v->run->exit_reason);
	if (ioctl(v->fd, KVM_GET_REGS, regs))
		fail_exit("KVM_GET_REGS");
}

struct klu_vcpu klu_vcpu_create(int vm)
{
	/* mov al,[si]; hlt; mov [si],al; hlt */
	static const uint8_t code[] = { 0x8a, 0x04, 0xf4, 0x88, 0x04, 0xf4 };
	uint8_t *mem = slot0_create(vm);

	memcpy(mem + CODE_GPA, code, sizeof(code));
	return vcpu_add(vm, mem);
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
