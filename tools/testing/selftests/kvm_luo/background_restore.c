// SPDX-License-Identifier: GPL-2.0
/*
 * A retrieved guest_memfd's memory goes back in the background while the
 * guest, userspace and punch-hole all use the file: nothing lost, nothing
 * put in twice, and finish waits for the workers.
 *
 * Stage 1 writes all 128 MiB of a guest_memfd (MMAP | INIT_SHARED, bound at
 * guest physical 4 GiB) with a pattern, and a second one of 8 MiB, and
 * preserves the VM and the files; the next kernel restores in the
 * background (the default).
 *
 * Stage 2 retrieves them, checks that the workers wait for the first try to
 * finish (nothing is in 300 ms after the retrieve), starts them with that
 * try, and at once, while they put memory in from the start of the file,
 * races them where they get last:
 * - a second thread punches a hole [x + 12 KiB, x + 1 MiB + 20 KiB) at
 *   every 4th MiB x of the top quarter, [96 MiB, 128 MiB): not 2 MiB-aligned,
 *   so each cuts windows the workers may be putting in;
 * - a third reads the byte at offset 2 KiB of every page of the top quarter
 *   outside the holes through the mapping, from the middle outwards;
 * - a vCPU walks [32 MiB, 96 MiB) from the top down, one page at a time,
 *   reading the first quadword of each page, xoring it with a key and
 *   writing it back: its faults race the workers for windows, and a write
 *   must neither be lost nor be made on zeros;
 * then, with no other finish, the second file must come in whole, and the
 * first 32 MiB of the first: the first try was refused by whichever file LUO
 * asked first, and must have started the other's workers all the same.
 * Then finish is retried until the workers are done. Afterwards every page
 * of the file is in but the holes' (so the first 32 MiB, which nothing but
 * the workers touched, are in: background restore did that); each byte is
 * the pattern, but the quadwords the vCPU xored and the holes, which read
 * zero. The test logs how much of the top quarter the workers had put in
 * when the threads started: the rest is what the threads raced them for.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define STATE_SESSION	"background-restore-state"
#define STATE_TOKEN	99
#define SESSION		"background-restore"
#define TOKEN_VM	1
#define TOKEN_GMEM	2
#define TOKEN_SECOND	3

#define MIB		KLU_MIB
#define PAGE		KLU_PAGE
#define GMEM_SIZE	(128 * MIB)
#define GMEM_GPA	(4UL << 30)
#define KEY		0x5aa5c33c0ff0e11eULL
/* The user thread's range, and where in each page it reads. */
/* The top quarter, which the workers get to last: holes, the user thread. */
#define TOP		(96 * MIB)
#define USER_OFFSET	2048
#define HOLE_EVERY	(4 * MIB)
/* The vCPU's range, below the top quarter. */
#define VCPU_START	(32 * MIB)
#define HOLE_HEAD	(3 * PAGE)
#define HOLE_LEN	(MIB + 2 * PAGE)
/* How long after the retrieve the workers must still not have started. */
#define WORKERS_WAIT_US	300000
/* A second guest_memfd of the VM, preserved after the first, not bound. */
#define SECOND_SIZE	(8 * MIB)
/* How long its workers may take to put it in after the first finish. */
#define SECOND_WAIT_S	60

/*
 * 1: mov rax, [rdi]; xor rax, rdx; mov [rdi], rax; sub rdi, 4096;
 *    dec rcx; jnz 1b; hlt
 */
static const uint8_t xor_down_code[] = {
	0x48, 0x8b, 0x07,
	0x48, 0x31, 0xd0,
	0x48, 0x89, 0x07,
	0x48, 0x81, 0xef, 0x00, 0x10, 0x00, 0x00,
	0x48, 0xff, 0xc9,
	0x75, 0xeb,
	0xf4,
};

struct stage2_ctx {
	int vm, gmem, second;
	uint8_t *p, *q;
	uint64_t sum;		/* of the bytes the user thread read */
};

static uint8_t pattern(size_t offset)
{
	return (uint8_t)(offset * 13 + (offset >> 12) * 7 + 5);
}

static uint64_t pattern_qword(size_t offset)
{
	uint64_t q = 0;
	int i;

	for (i = 8; i-- > 0;)
		q = q << 8 | pattern(offset + i);
	return q;
}

static int in_hole(size_t offset)
{
	return offset >= TOP && offset % HOLE_EVERY >= HOLE_HEAD &&
	       offset % HOLE_EVERY < HOLE_HEAD + HOLE_LEN;
}

/* The vCPU's xored quadwords: the first of each page of its range. */
static int xored(size_t offset)
{
	return offset >= VCPU_START && offset < TOP && offset % PAGE < 8;
}

/* Pages of [p, p + size) in, once all are or after SECOND_WAIT_S seconds. */
static size_t wait_resident(uint8_t *p, size_t size)
{
	size_t in = klu_resident_pages(p, size, NULL);
	int waited;

	for (waited = 0; in < size / PAGE && waited < SECOND_WAIT_S * 10; waited++) {
		usleep(100000);
		in = klu_resident_pages(p, size, NULL);
	}
	return in;
}

static void stage1(int luo_fd)
{
	struct klu_setup t;
	int second;
	uint8_t *q;
	size_t i;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	t = klu_setup_shared(luo_fd, SESSION, GMEM_SIZE);
	klu_bind_gmem(t.vm, t.gmem, GMEM_GPA, GMEM_SIZE, t.p);
	for (i = 0; i < GMEM_SIZE; i++)
		t.p[i] = pattern(i);
	second = klu_create_gmem(t.vm, SECOND_SIZE, GUEST_MEMFD_FLAG_MMAP |
				 GUEST_MEMFD_FLAG_INIT_SHARED);
	q = klu_map(second, SECOND_SIZE);
	for (i = 0; i < SECOND_SIZE; i++)
		q[i] = ~pattern(i);
	if (luo_session_preserve_fd(t.session, t.vm, TOKEN_VM) ||
	    luo_session_preserve_fd(t.session, t.gmem, TOKEN_GMEM) ||
	    luo_session_preserve_fd(t.session, second, TOKEN_SECOND))
		fail_exit("preserve");
	ksft_print_msg("[STAGE 1] wrote %lu MiB; kexec with background restore\n",
		       GMEM_SIZE / MIB);
	close(luo_fd);
	daemonize_and_wait();
}

static void *vcpu_thread(void *arg)
{
	struct stage2_ctx *c = arg;
	struct kvm_regs regs = {
		.rdi = GMEM_GPA + TOP - PAGE,
		.rcx = (TOP - VCPU_START) / PAGE,
		.rdx = KEY,
	};
	struct klu_vcpu v = klu_vcpu64_create(c->vm);

	klu_vcpu64_run(&v, xor_down_code, sizeof(xor_down_code), &regs);
	if (regs.rcx || regs.rdi != GMEM_GPA + VCPU_START - PAGE)
		ksft_exit_fail_msg("the vCPU stopped at %#llx with %llu pages left\n",
				   (unsigned long long)regs.rdi,
				   (unsigned long long)regs.rcx);
	return NULL;
}

static void *user_thread(void *arg)
{
	struct stage2_ctx *c = arg;
	size_t half = (GMEM_SIZE - TOP) / 2, i;
	uint64_t sum = 0;

	/* From the middle outwards, but the holes, whose contents race. */
	for (i = 0; i < half; i += PAGE) {
		size_t up = TOP + half + i + USER_OFFSET;
		size_t down = TOP + half - PAGE - i + USER_OFFSET;

		if (!in_hole(up))
			sum += c->p[up];
		if (!in_hole(down))
			sum += c->p[down];
	}
	c->sum = sum;
	return NULL;
}

static void *punch_thread(void *arg)
{
	struct stage2_ctx *c = arg;
	size_t x;

	for (x = TOP; x < GMEM_SIZE; x += HOLE_EVERY)
		if (fallocate(c->gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
			      x + HOLE_HEAD, HOLE_LEN))
			fail_exit("punch hole at %#zx", x + HOLE_HEAD);
	return NULL;
}

static void check(struct stage2_ctx *c)
{
	size_t i, bad = 0, first = 0, hole_pages = 0, n;
	uint64_t sum = 0;

	/* Before any read: a read of a hole puts a zeroed page in. */
	for (i = 0; i < GMEM_SIZE; i += PAGE)
		hole_pages += in_hole(i);
	n = klu_resident_pages(c->p, GMEM_SIZE, NULL);
	if (n != GMEM_SIZE / PAGE - hole_pages)
		ksft_exit_fail_msg("%zu pages in after finish, expected %zu (all but the holes)\n",
				   n, GMEM_SIZE / PAGE - hole_pages);

	for (i = 0; i < GMEM_SIZE; i += 8) {
		uint64_t want = pattern_qword(i), got;

		if (in_hole(i))
			want = 0;
		else if (xored(i))
			want ^= KEY;
		memcpy(&got, c->p + i, 8);
		if (got != want && !bad++)
			first = i;
	}
	if (bad)
		ksft_exit_fail_msg("%zu quadwords wrong, first at %#zx: %#llx\n",
				   bad, first,
				   (unsigned long long)*(uint64_t *)(c->p + first));
	for (i = TOP + USER_OFFSET; i < GMEM_SIZE; i += PAGE)
		if (!in_hole(i))
			sum += pattern(i);
	if (sum != c->sum)
		ksft_exit_fail_msg("the user thread read a sum of %llu, expected %llu\n",
				   (unsigned long long)c->sum,
				   (unsigned long long)sum);
	ksft_print_msg("all in but %zu hole pages: pattern, %lu vCPU quadwords, zero holes right\n",
		       hole_pages, (TOP - VCPU_START) / PAGE);
}

static void stage2(int luo_fd, int state_session)
{
	pthread_t vcpu, user, punch;
	struct stage2_ctx c;
	int session, r;
	size_t in, i;

	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session");
	c.vm = luo_session_retrieve_fd(session, TOKEN_VM);
	c.gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	c.second = luo_session_retrieve_fd(session, TOKEN_SECOND);
	if (c.vm < 0 || c.gmem < 0 || c.second < 0)
		fail_exit("retrieve the VM and its guest_memfds");
	c.p = klu_map(c.gmem, GMEM_SIZE);
	c.q = klu_map(c.second, SECOND_SIZE);
	klu_bind_gmem(c.vm, c.gmem, GMEM_GPA, GMEM_SIZE, c.p);

	/*
	 * The workers wait for the VMM's first try to finish: a while after
	 * the retrieve, nothing of the first 32 MiB, which only they touch,
	 * is in. That try starts them, and is refused.
	 */
	usleep(WORKERS_WAIT_US);
	in = klu_resident_pages(c.p, VCPU_START, NULL) +
	     klu_resident_pages(c.q, SECOND_SIZE, NULL);
	if (in)
		ksft_exit_fail_msg("%zu pages in before finish: the workers did not wait for it\n",
				   in);
	r = luo_session_finish(session);
	if (r != -EBUSY)
		ksft_exit_fail_msg("first finish: %d (%s), expected EBUSY\n", r,
				   r < 0 ? strerror(-r) : "success");
	ksft_print_msg("nothing in %d ms after the retrieve; the first finish starts the workers\n",
		       WORKERS_WAIT_US / 1000);

	/* How much of the top quarter the workers put in before the race. */
	ksft_print_msg("at the start: %zu of %lu pages of the top quarter in\n",
		       klu_resident_pages(c.p + TOP, GMEM_SIZE - TOP, NULL),
		       (GMEM_SIZE - TOP) / PAGE);
	if (pthread_create(&punch, NULL, punch_thread, &c) ||
	    pthread_create(&user, NULL, user_thread, &c) ||
	    pthread_create(&vcpu, NULL, vcpu_thread, &c))
		fail_exit("pthread_create");
	if (pthread_join(vcpu, NULL) || pthread_join(user, NULL) ||
	    pthread_join(punch, NULL))
		fail_exit("pthread_join");
	ksft_print_msg("the vCPU, the user thread and the punch-holes are done\n");

	/*
	 * The first finish was refused by a busy guest_memfd: it must have
	 * asked the other one too, and started its workers, which put in the
	 * second file and the first 32 MiB of the first with no other finish.
	 */
	in = wait_resident(c.q, SECOND_SIZE);
	if (in < SECOND_SIZE / PAGE)
		ksft_exit_fail_msg("second file: %zu of %lu pages in: no workers\n",
				   in, SECOND_SIZE / PAGE);
	in = wait_resident(c.p, VCPU_START);
	if (in < VCPU_START / PAGE)
		ksft_exit_fail_msg("first file: %zu of %lu pages in: no workers\n",
				   in, VCPU_START / PAGE);
	for (i = 0; i < SECOND_SIZE; i++)
		if (c.q[i] != (uint8_t)~pattern(i))
			ksft_exit_fail_msg("second guest_memfd: byte %zu is %#x, not %#x\n",
					   i, c.q[i], (uint8_t)~pattern(i));
	ksft_print_msg("the second guest_memfd came back whole with no other finish\n");

	if (klu_finish(session))
		fail_exit("finish");
	ksft_print_msg("finish succeeded\n");
	check(&c);

	if (klu_finish(state_session))
		fail_exit("finish the state session");
	ksft_print_msg("[STAGE 2] memory went back in the background under use\n");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
