// SPDX-License-Identifier: GPL-2.0
/*
 * guest_memfd memory in single pages, rarely contiguous, as on a host that
 * has been up for weeks: it crosses the kexec whole, and its metadata costs
 * no more per page than memfd's (16 bytes per folio).
 *
 * Stage 1 fragments free memory (klu_fragment(): every other page of a
 * scratch guest_memfd punched out), fills a 64 MiB guest_memfd through its
 * mapping, a page at a time, then closes the scratch file. It checks that the
 * fragmenting worked (at least 3/4 of the pages an extent of their own:
 * otherwise the test proves nothing and fails), preserves the file with its
 * VM, and checks what the handler reports: every page, and at most 16 bytes
 * per extent on top of one head.
 *
 * Stage 2 retrieves the VM, then the guest_memfd from inside a memory cgroup
 * with 16 MiB of room for its 64 MiB: its memory, taken back late, would be
 * charged there and could not be, so the retrieve must fail with ENOMEM and
 * keep the file retrievable. With the limit lifted, it is retrieved, and
 * every byte is checked.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define STATE_SESSION	"fragmented-state"
#define STATE_TOKEN	99
#define SESSION		"fragmented"
#define TOKEN_VM	1
#define TOKEN_GMEM	2

#define GMEM_SIZE	(64 * KLU_MIB)
#define MEMCG		"klu-fragmented"
#define MEMCG_ROOM	(16 * KLU_MIB)
#define NR_PAGES	(GMEM_SIZE / KLU_PAGE)
/* What a page may cost, as memfd's folio does, and one head object. */
#define BYTES_PER_EXTENT 16
#define HEAD_BYTES	64

/* Each page holds its own index, so a page in the wrong place shows. */
static void fill_page(uint8_t *page, size_t i)
{
	uint64_t *w = (uint64_t *)page;
	size_t j;

	for (j = 0; j < KLU_PAGE / sizeof(*w); j++)
		w[j] = (uint64_t)i << 32 | j;
}

static void check_page(const uint8_t *page, size_t i)
{
	const uint64_t *w = (const uint64_t *)page;
	size_t j;

	for (j = 0; j < KLU_PAGE / sizeof(*w); j++)
		if (w[j] != ((uint64_t)i << 32 | j))
			ksft_exit_fail_msg("page %zu word %zu is %#llx\n", i, j,
					   (unsigned long long)w[j]);
}

static void pin_to_cpu0(void)
{
	cpu_set_t cpus;

	CPU_ZERO(&cpus);
	CPU_SET(0, &cpus);
	if (sched_setaffinity(0, sizeof(cpus), &cpus))
		fail_exit("sched_setaffinity");
}

static void stage1(int luo_fd)
{
	struct klu_gmem_report report;
	struct klu_setup t;
	size_t i;
	int scratch;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	t = klu_setup_shared(luo_fd, SESSION, GMEM_SIZE);
	scratch = klu_create_gmem(t.vm, 2 * GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP |
				  GUEST_MEMFD_FLAG_INIT_SHARED);
	/*
	 * The pages punched out go to this CPU's free page list, where the
	 * fill must find them: filled from another CPU, its list is refilled
	 * from higher orders, contiguous (measured: 7601 extents for 16384
	 * pages with the punching on CPU 0 and the fill on CPU 1).
	 */
	pin_to_cpu0();
	klu_fragment(scratch, 2 * GMEM_SIZE);
	for (i = 0; i < NR_PAGES; i++)
		fill_page(t.p + i * KLU_PAGE, i);
	close(scratch);

	if (luo_session_preserve_fd(t.session, t.vm, TOKEN_VM) ||
	    luo_session_preserve_fd(t.session, t.gmem, TOKEN_GMEM))
		fail_exit("preserve");
	klu_gmem_reports(&report, 1);
	ksft_print_msg("preserved %ld pages in %ld extents, %ld bytes of metadata (memfd: %lu)\n",
		       report.pages, report.extents, report.bytes,
		       48 + 16 * NR_PAGES);
	if (report.pages != (long)NR_PAGES)
		ksft_exit_fail_msg("%ld pages preserved, expected %lu\n",
				   report.pages, NR_PAGES);
	if (report.extents < (long)(NR_PAGES * 3 / 4))
		ksft_exit_fail_msg("memory was not fragmented: %ld extents for %lu pages\n",
				   report.extents, NR_PAGES);
	if (report.bytes > HEAD_BYTES + BYTES_PER_EXTENT * report.extents)
		ksft_exit_fail_msg("%ld metadata bytes for %ld extents: over %d per extent\n",
				   report.bytes, report.extents, BYTES_PER_EXTENT);
	close(luo_fd);
	daemonize_and_wait();
}

static void stage2(int luo_fd, int state_session)
{
	int session, vm, gmem;
	uint8_t *p;
	size_t i;

	session = luo_retrieve_session(luo_fd, SESSION);
	if (session < 0)
		fail_exit("retrieve session");
	vm = luo_session_retrieve_fd(session, TOKEN_VM);
	if (vm < 0)
		fail_exit("retrieve the VM");

	klu_memcg_enter(MEMCG);
	klu_memcg_set_max(MEMCG, klu_memcg_read(MEMCG, "memory.current") + MEMCG_ROOM);
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	klu_memcg_set_max(MEMCG, -1);
	if (gmem >= 0)
		ksft_exit_fail_msg("retrieved %lu MiB of guest memory with %lu MiB of memcg room\n",
				   GMEM_SIZE / KLU_MIB, MEMCG_ROOM / KLU_MIB);
	if (gmem != -ENOMEM)
		ksft_exit_fail_msg("retrieve in a small memory cgroup: %s, expected ENOMEM\n",
				   strerror(-gmem));
	ksft_print_msg("retrieve with %lu MiB of room: %s\n", MEMCG_ROOM / KLU_MIB,
		       strerror(-gmem));
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	if (gmem < 0)
		ksft_exit_fail_msg("retrieve with the limit lifted: %s\n", strerror(-gmem));
	p = klu_map(gmem, GMEM_SIZE);
	for (i = 0; i < NR_PAGES; i++)
		check_page(p + i * KLU_PAGE, i);
	ksft_print_msg("after kexec: %lu MiB intact\n", GMEM_SIZE / KLU_MIB);
	klu_memcg_leave();
	if (klu_finish(session) || klu_finish(state_session))
		fail_exit("finish");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
