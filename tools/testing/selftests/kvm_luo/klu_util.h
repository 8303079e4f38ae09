/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers shared by the kvm_luo selftests: /dev/kvm, free memory, and a vCPU
 * in real mode that reads or writes one byte anywhere below 4 GiB.
 */
#ifndef SELFTESTS_KVM_LUO_KLU_UTIL_H
#define SELFTESTS_KVM_LUO_KLU_UTIL_H

#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>

#define KLU_MIB		(1024UL * 1024)
#define KLU_PAGE	4096UL

struct klu_vcpu {
	int fd;
	struct kvm_run *run;
	uint8_t *slot0;		/* memslot 0, with the vCPU's code */
};

/* The /dev/kvm fd, opened once. */
int klu_kvm_dev(void);

/* A new VM of @type; exits the test on failure. */
int klu_create_vm(unsigned long type);

/* A new guest_memfd of @size bytes with @flags on @vm; exits on failure. */
int klu_create_gmem(int vm, uint64_t size, uint64_t flags);

/* A shared read-write mapping of @size bytes of @fd; exits on failure. */
uint8_t *klu_map(int fd, size_t size);

/* What a test preserves: a session, a VM and a guest_memfd mapped at @p. */
struct klu_setup {
	int session, vm, gmem;
	uint8_t *p;
};

/*
 * Create session @name, a VM, and a shared guest_memfd (MMAP | INIT_SHARED)
 * of @size bytes, mapped; exits on failure.
 */
struct klu_setup klu_setup_shared(int luo_fd, const char *name, size_t size);

/*
 * Bind @size bytes of guest_memfd @gmem, mapped at @p, at guest physical @gpa
 * as memslot 1; exits on failure.
 */
void klu_bind_gmem(int vm, int gmem, uint64_t gpa, size_t size, uint8_t *p);

/*
 * The pages of [@p, @p + @size) in the page cache (mincore); if @first_hole,
 * set it to the index of the first page that is not, or @size / KLU_PAGE.
 */
size_t klu_resident_pages(uint8_t *p, size_t size, size_t *first_hole);

/*
 * Finish an incoming session, as a VMM does: while a handler is still putting
 * retrieved memory back (EBUSY), try again every 10 ms, for up to 60 s.
 * Returns 0 or -errno, like luo_session_finish().
 */
int klu_finish(int session);

/*
 * The main() of a two-stage test: with "-s 1" or "-s 2", opens
 * /dev/liveupdate and gives its fd to @stage1 or @stage2; exits the test on
 * a bad command line or when the device does not open.
 */
int klu_two_stages(int argc, char *argv[], void (*stage1)(int luo_fd),
		   void (*stage2)(int luo_fd));

/*
 * Free memory in kB: free pages and the pages on per-CPU free lists, read
 * together (see klu_util.c). Not reentrant.
 */
long klu_mem_free_kb(void);

/*
 * The fields of /proc/meminfo (kB, but counts for HugePages_*), read after
 * the vm counters are folded, and "FreeWithPerCpu": klu_mem_free_kb().
 */
#define KLU_MEMINFO_MAX 80
struct klu_meminfo {
	int n;
	char name[KLU_MEMINFO_MAX][32];
	long kb[KLU_MEMINFO_MAX];
};

void klu_meminfo_read(struct klu_meminfo *m);

/* Field @name of @m; fails the test when /proc/meminfo has none. */
long klu_meminfo_kb(const struct klu_meminfo *m, const char *name);

/*
 * Print, as one test message, each field that moved by @min_kb or more from
 * @a to @b: where memory a test expected back went instead.
 */
void klu_meminfo_print_moved(const struct klu_meminfo *a,
			     const struct klu_meminfo *b, long min_kb);

/*
 * Create vCPU 0 of @vm, with memslot 0 (1 MiB of anonymous memory at guest
 * physical 0) holding its code. Memslot 0 must be free.
 */
struct klu_vcpu klu_vcpu_create(int vm);

/*
 * Run one access at @gpa: a read into *@val, or a write of *@val. DS is
 * based at @gpa, so any address below 4 GiB works. Returns the exit reason:
 * KVM_EXIT_HLT when the access completed, KVM_EXIT_MEMORY_FAULT (with
 * run->memory_fault filled) when KVM could not map the memory.
 */
unsigned int klu_vcpu_access(struct klu_vcpu *v, uint64_t gpa, int write,
			     uint8_t *val);

/*
 * Create vCPU 0 of @vm in 64-bit mode: memslot 0 (1 MiB of anonymous memory at
 * guest physical 0) holds a GDT, page tables identity-mapping the first 2 MiB
 * and the GiB at 4 GiB with 2 MiB pages, and room for code. Memslot 0 must be
 * free.
 */
struct klu_vcpu klu_vcpu64_create(int vm);

/*
 * Copy @code (at most 4 KiB) into memslot 0, run it in 64-bit mode with
 * @regs (rip is set to the code) until it halts, and return the registers.
 */
void klu_vcpu64_run(struct klu_vcpu *v, const uint8_t *code, size_t len,
		    struct kvm_regs *regs);

/* What the guest_memfd handler reported for a file it preserved. */
struct klu_gmem_report {
	long pages, extents, bytes;	/* bytes of metadata */
};

/*
 * The last @n reports of the guest_memfd handler in the kernel log for files
 * with memory, oldest first; exits unless there are @n.
 */
void klu_gmem_reports(struct klu_gmem_report *out, size_t n);

/*
 * Fragment free memory of the kind @fd's pages are (guest_memfd's pages are
 * unmovable and memfd's movable, and each kind has free lists of its own):
 * fill @fd, a file of @size bytes, and punch out every other page, so that
 * the next @size / 2 bytes the kernel allocates of that kind in single pages
 * are rarely contiguous. Close @fd once that memory is allocated.
 */
void klu_fragment(int fd, size_t size);

/* Write @val to the file at @path; exits on failure. */
void klu_write_str(const char *path, const char *val);

/* How many lines of the kernel log so far contain @needle. */
int klu_kmsg_count(const char *needle);

/*
 * Memory cgroups: klu_memcg_enter() moves this process into the cgroup
 * /sys/fs/cgroup/@name (made, with cgroup2 mounted and the memory controller
 * on, if need be), where the OOM killer may not pick it, so that charges
 * beyond the limit fail instead; klu_memcg_leave() moves it back to the root.
 */
void klu_memcg_enter(const char *name);
void klu_memcg_leave(void);
/* A number read from @file of the cgroup @name. */
long klu_memcg_read(const char *name, const char *file);
/* Set memory.max of the cgroup @name to @bytes, or no limit if negative. */
void klu_memcg_set_max(const char *name, long bytes);

#endif /* SELFTESTS_KVM_LUO_KLU_UTIL_H */
