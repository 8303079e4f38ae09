// SPDX-License-Identifier: GPL-2.0
/*
 * A live update, told step by step: a memfd full of data is preserved in a
 * LUO session with the upstream memfd handler, the kernel kexecs, and the new
 * kernel retrieves the memfd and checks every byte.
 *
 * Stage 1 fills the memfd, records its checksum and the TSC in a small notes
 * memfd preserved in the same session, and leaves a child holding the session
 * while init kexecs. Stage 2 retrieves both, verifies the checksum and prints
 * how long each step took. The TSC keeps counting across the kexec, so the
 * gap between the two kernels is measured with it.
 */

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define SESSION		"klu-demo"
#define STATE_SESSION	"klu-demo-state"
#define DATA_TOKEN	1
#define NOTES_TOKEN	2
#define STATE_TOKEN	3
#define DATA_SIZE	(256UL << 20)
#define NOTES_MAGIC	0x4b4c55444d4f3031ULL	/* "KLUDMO01" */

struct notes {
	uint64_t magic;
	uint64_t size;
	uint64_t checksum;
	uint64_t tsc_hz;
	uint64_t tsc_handoff;
};

static void say(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("demo: ");
	vprintf(fmt, ap);
	va_end(ap);
	fflush(stdout);
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* TSC ticks per second, measured against CLOCK_MONOTONIC. */
static uint64_t tsc_hz(void)
{
	struct timespec req = { .tv_nsec = 100 * 1000 * 1000 };
	double t0 = now_ms();
	uint64_t c0 = __rdtsc();

	nanosleep(&req, NULL);
	return (__rdtsc() - c0) / ((now_ms() - t0) / 1e3);
}

static uint64_t word(uint64_t i)
{
	uint64_t x = i * 0x9e3779b97f4a7c15ULL;

	return x ^ (x >> 29);
}

static uint64_t checksum(const uint64_t *p, size_t n)
{
	uint64_t sum = 0;
	size_t i;

	for (i = 0; i < n; i++)
		sum = (sum ^ p[i]) * 0x100000001b3ULL;
	return sum;
}

static void *map_fd(int fd, size_t size, int prot)
{
	void *p = mmap(NULL, size, prot, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		fail_exit("mmap");
	return p;
}

static void stage1(int luo_fd)
{
	size_t i, n = DATA_SIZE / sizeof(uint64_t);
	int session, data, notes_fd;
	struct notes *notes;
	uint64_t *p;
	double t;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	session = luo_create_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("create session");

	say("[old kernel] filling a %lu MiB memfd with a pattern\n", DATA_SIZE >> 20);
	data = memfd_create("demo-data", 0);
	notes_fd = memfd_create("demo-notes", 0);
	if (data < 0 || notes_fd < 0 || ftruncate(data, DATA_SIZE) ||
	    ftruncate(notes_fd, getpagesize()))
		fail_exit("memfd");
	p = map_fd(data, DATA_SIZE, PROT_READ | PROT_WRITE);
	for (i = 0; i < n; i++)
		p[i] = word(i);
	notes = map_fd(notes_fd, getpagesize(), PROT_READ | PROT_WRITE);
	notes->magic = NOTES_MAGIC;
	notes->size = DATA_SIZE;
	notes->checksum = checksum(p, n);
	notes->tsc_hz = tsc_hz();
	munmap(p, DATA_SIZE);
	say("[old kernel] checksum %016llx\n", (unsigned long long)notes->checksum);

	t = now_ms();
	if (luo_session_preserve_fd(session, data, DATA_TOKEN))
		fail_exit("preserve data memfd");
	say("[old kernel] preserved the memfd in session '%s' in %.1f ms\n",
	    SESSION, now_ms() - t);
	if (luo_session_preserve_fd(session, notes_fd, NOTES_TOKEN))
		fail_exit("preserve notes memfd");

	say("[old kernel] handing over to the new kernel (kexec)\n");
	notes->tsc_handoff = __rdtsc();
	close(luo_fd);
	daemonize_and_wait();
}

static void stage2(int luo_fd, int state_session)
{
	uint64_t now = __rdtsc(), sum, hz;
	int session, data, notes_fd;
	struct notes *notes;
	double t, t_ret, t_sum;
	uint64_t *p;

	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session");
	notes_fd = luo_session_retrieve_fd(session, NOTES_TOKEN);
	if (notes_fd < 0)
		fail_exit("retrieve notes");
	notes = map_fd(notes_fd, getpagesize(), PROT_READ);
	if (notes->magic != NOTES_MAGIC)
		ksft_exit_fail_msg("notes memfd lost its contents\n");
	hz = notes->tsc_hz;
	say("[new kernel] back %.0f ms after the hand-off (TSC at %.2f GHz)\n",
	    (now - notes->tsc_handoff) * 1e3 / hz, hz / 1e9);

	t = now_ms();
	data = luo_session_retrieve_fd(session, DATA_TOKEN);
	if (data < 0)
		fail_exit("retrieve data");
	t_ret = now_ms() - t;
	say("[new kernel] retrieved the %llu MiB memfd in %.1f ms\n",
	    (unsigned long long)notes->size >> 20, t_ret);

	t = now_ms();
	p = map_fd(data, notes->size, PROT_READ);
	sum = checksum(p, notes->size / sizeof(uint64_t));
	t_sum = now_ms() - t;
	if (sum != notes->checksum)
		ksft_exit_fail_msg("demo: checksum %016llx, expected %016llx: data lost\n",
				   (unsigned long long)sum,
				   (unsigned long long)notes->checksum);
	say("[new kernel] checksum %016llx matches: every byte survived (%.0f ms to read)\n",
	    (unsigned long long)sum, t_sum);

	t = now_ms();
	if (klu_finish(session) || klu_finish(state_session))
		fail_exit("finish");
	say("[new kernel] finished the sessions in %.1f ms\n", now_ms() - t);
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
