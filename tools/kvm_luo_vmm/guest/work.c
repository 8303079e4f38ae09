// SPDX-License-Identifier: GPL-2.0
/*
 * The work of the Linux guest that the Rust VMM keeps running across a host
 * live update (tools/kvm_luo_vmm): what the VMM checks to know that the guest
 * went on as if nothing had happened.
 *
 * Usage: work MIB
 *
 * - One worker per CPU, pinned, each owning an equal share of MIB MiB of
 *   memory: for each generation it checks that every page still holds the
 *   previous generation's pattern and overwrites it with this one's, then
 *   reads every page back and checks it again, and prints a line per
 *   generation. Every page is thus checked twice per generation, whenever a
 *   pause happens. A page that comes back different (lost, zeroed, another
 *   page's data) is reported as CORRUPT and the program exits 1.
 * - A heartbeat, four times a second: a counter, CLOCK_MONOTONIC, and how
 *   many times a ticker pinned to each CPU has woken from a 50 ms sleep. A
 *   CPU whose local timer stopped delivering interrupts stops waking its
 *   ticker, while the others go on: the VMM sees which CPU lost its timer
 *   long before the guest's own stall detectors would say so.
 *
 * Every line starts with "WORK:" so the VMM can pick them out of the console.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE		4096UL
#define WORDS		(PAGE / sizeof(uint64_t))

struct worker {
	int cpu;
	uint8_t *mem;
	size_t pages;
};

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/* Wake-ups of each CPU's ticker (atomic: read by the heartbeat). */
static unsigned long *ticks;

static void say(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&out_lock);
	fputs("WORK: ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 31;
	x *= 0x9e3779b97f4a7c15ULL;
	x ^= x >> 29;
	return x;
}

/* Every word but the last from (cpu, gen, page); the last is their sum. */
static void fill(uint64_t *w, int cpu, uint64_t gen, size_t page)
{
	uint64_t seed = mix(((uint64_t)cpu << 56) ^ (gen << 32) ^ page), sum = 0;
	size_t i;

	for (i = 0; i < WORDS - 1; i++) {
		w[i] = seed + i * 0x100000001b3ULL;
		sum += w[i];
	}
	w[WORDS - 1] = sum;
}

static int check(const uint64_t *w, int cpu, uint64_t gen, size_t page)
{
	uint64_t want[WORDS];

	fill(want, cpu, gen, page);
	return memcmp(w, want, PAGE) == 0;
}

static void corrupt(int cpu, uint64_t gen, size_t page)
{
	say("CORRUPT cpu %d generation %llu page %zu\n", cpu,
	    (unsigned long long)gen, page);
	exit(1);
}

static void pin(int cpu, const char *what)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set)) {
		say("FAILED: cannot keep the %s of cpu %d on it\n", what, cpu);
		exit(1);
	}
}

/* Sleeps on its CPU, whose timer alone can wake it, and counts. */
static void *ticker(void *arg)
{
	int cpu = (int)(intptr_t)arg;

	pin(cpu, "ticker");
	for (;;) {
		usleep(50000);
		__atomic_fetch_add(&ticks[cpu], 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static void *work(void *arg)
{
	struct worker *wk = arg;
	uint64_t gen;
	size_t p;

	pin(wk->cpu, "worker");
	for (gen = 1;; gen++) {
		double t0 = now();

		for (p = 0; p < wk->pages; p++) {
			uint64_t *w = (uint64_t *)(wk->mem + p * PAGE);

			if (gen > 1 && !check(w, wk->cpu, gen - 1, p))
				corrupt(wk->cpu, gen - 1, p);
			fill(w, wk->cpu, gen, p);
		}
		for (p = 0; p < wk->pages; p++)
			if (!check((uint64_t *)(wk->mem + p * PAGE), wk->cpu,
				   gen, p))
				corrupt(wk->cpu, gen, p);
		say("cpu %d generation %llu: %zu MiB written and verified in %.2f s\n",
		    wk->cpu, (unsigned long long)gen, wk->pages * PAGE >> 20,
		    now() - t0);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 0;
	struct worker *wk;
	unsigned long beat;
	uint8_t *mem;
	long c;

	if (!mib || cpus < 1) {
		fprintf(stderr, "usage: work MIB\n");
		return 2;
	}
	mem = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	wk = calloc(cpus, sizeof(*wk));
	ticks = calloc(cpus, sizeof(*ticks));
	if (mem == MAP_FAILED || !wk || !ticks) {
		say("FAILED: no memory for %zu MiB\n", mib);
		return 1;
	}
	say("%ld CPUs, %zu MiB\n", cpus, mib);
	for (c = 0; c < cpus; c++) {
		pthread_t t;

		wk[c].cpu = c;
		wk[c].pages = (mib << 20) / PAGE / cpus;
		wk[c].mem = mem + c * wk[c].pages * PAGE;
		if (pthread_create(&t, NULL, work, &wk[c]) ||
		    pthread_create(&t, NULL, ticker, (void *)(intptr_t)c)) {
			say("FAILED: cannot start worker %ld\n", c);
			return 1;
		}
	}
	for (beat = 1;; beat++) {
		char line[256];
		int n;

		usleep(250000);
		n = snprintf(line, sizeof(line), "beat %lu at %.3f ticks", beat,
			     now());
		for (c = 0; c < cpus && n < (int)sizeof(line) - 24; c++)
			n += snprintf(line + n, sizeof(line) - n, " %lu",
				      __atomic_load_n(&ticks[c], __ATOMIC_RELAXED));
		say("%s\n", line);
	}
}
