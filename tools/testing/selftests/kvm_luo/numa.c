// SPDX-License-Identifier: GPL-2.0
/*
 * guest_memfd memory on two NUMA nodes crosses the kexec whole, each page
 * on the node it was on.
 *
 * The tests boot with numa=fake=2. Stage 1 makes a 16 MiB guest_memfd whose
 * first half is bound (mbind on its mapping) to node 0 and second half to
 * node 1, fills it through the mapping, checks where the pages are
 * (move_pages() in query mode), and preserves it with its VM. The handler
 * records extents that never cross a node, since KHO restores a run per
 * node.
 *
 * Stage 2 retrieves both and checks every byte and the node of every page.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/mempolicy.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <libliveupdate.h>

#include "klu_util.h"

#define STATE_SESSION	"numa-state"
#define STATE_TOKEN	99
#define SESSION		"numa"
#define TOKEN_VM	1
#define TOKEN_GMEM	2

#define MIB		KLU_MIB
#define PAGE		KLU_PAGE
#define GMEM_SIZE	(16 * MIB)
#define NR_PAGES	(GMEM_SIZE / PAGE)

static uint8_t byte_at(size_t i)
{
	return (uint8_t)(i * 29 + (i >> 12) * 17 + 3);
}

static int expected_node(size_t page)
{
	return page < NR_PAGES / 2 ? 0 : 1;
}

/* Fail unless every page of the mapping is on the node it should be. */
static void check_nodes(uint8_t *p, const char *when)
{
	static void *pages[NR_PAGES];
	static int status[NR_PAGES];
	size_t i, on_node[2] = { 0, 0 };

	for (i = 0; i < NR_PAGES; i++)
		pages[i] = p + i * PAGE;
	if (syscall(__NR_move_pages, 0, NR_PAGES, pages, NULL, status, 0))
		fail_exit("move_pages (query)");
	for (i = 0; i < NR_PAGES; i++) {
		if (status[i] != expected_node(i))
			ksft_exit_fail_msg("%s: page %zu is on node %d, expected %d\n",
					   when, i, status[i], expected_node(i));
		on_node[status[i]]++;
	}
	ksft_print_msg("%s: %zu pages on node 0, %zu on node 1\n", when,
		       on_node[0], on_node[1]);
}

static void stage1(int luo_fd)
{
	unsigned long node0 = 1, node1 = 2;
	struct klu_setup t;
	size_t i;

	create_state_file(luo_fd, STATE_SESSION, STATE_TOKEN, 2);
	t = klu_setup_shared(luo_fd, SESSION, GMEM_SIZE);
	if (syscall(__NR_mbind, t.p, GMEM_SIZE / 2, MPOL_BIND, &node0,
		    sizeof(node0) * 8, 0) ||
	    syscall(__NR_mbind, t.p + GMEM_SIZE / 2, GMEM_SIZE / 2, MPOL_BIND,
		    &node1, sizeof(node1) * 8, 0))
		fail_exit("mbind (is the kernel booted with numa=fake=2?)");
	for (i = 0; i < GMEM_SIZE; i++)
		t.p[i] = byte_at(i);
	check_nodes(t.p, "before kexec");

	if (luo_session_preserve_fd(t.session, t.vm, TOKEN_VM) ||
	    luo_session_preserve_fd(t.session, t.gmem, TOKEN_GMEM))
		fail_exit("preserve");
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
	gmem = luo_session_retrieve_fd(session, TOKEN_GMEM);
	vm = luo_session_retrieve_fd(session, TOKEN_VM);
	if (vm < 0 || gmem < 0)
		fail_exit("retrieve");
	p = klu_map(gmem, GMEM_SIZE);
	for (i = 0; i < GMEM_SIZE; i++)
		if (p[i] != byte_at(i))
			ksft_exit_fail_msg("byte %#zx is %#x, expected %#x\n", i,
					   p[i], byte_at(i));
	ksft_print_msg("after kexec: %lu MiB intact\n", GMEM_SIZE / MIB);
	check_nodes(p, "after kexec");
	if (klu_finish(session) || klu_finish(state_session))
		fail_exit("finish");
}

int main(int argc, char *argv[])
{
	return luo_test(argc, argv, STATE_SESSION, stage1, stage2);
}
