// SPDX-License-Identifier: GPL-2.0-only
/*
 * KUnit tests of how KHO restores memory handed over by the previous kernel:
 * what it claims, and what it gives back when the previous kernel's data does
 * not describe whole preservations. Included at the end of kexec_handover.c,
 * so that the tests can see its static functions and its page magic.
 *
 * The tests do not kexec: they allocate pages and mark them the way
 * deserialization marks preserved memory (the magic and the order in the head
 * page's private field), then restore them. A restore counts a block as
 * managed memory again, so marking a block takes it out of the count first.
 */

#include <kunit/test.h>

/* A block marked as preserved, given back at the end of the test if still so. */
struct kho_test_block {
	struct page *page;
	unsigned int order;
};

static unsigned long kho_test_magic(unsigned int order)
{
	union kho_page_info info = { .order = order, .magic = KHO_PAGE_MAGIC };

	return info.page_private;
}

static bool kho_test_preserved(struct page *page, unsigned int order)
{
	return READ_ONCE(page->private) == kho_test_magic(order);
}

static void kho_test_unmark(void *data)
{
	struct kho_test_block *block = data;

	/*
	 * Restored blocks belong to whoever restored them, and may have been
	 * freed since: only KHO writes its magic into page->private, so one
	 * that still has it was never restored.
	 */
	if (!kho_test_preserved(block->page, block->order))
		return;
	block->page->private = 0;
	adjust_managed_page_count(block->page, 1L << block->order);
	for (unsigned long i = 0; i < 1UL << block->order; i++)
		__free_page(block->page + i);
}

/* Mark the order-@order block at @page, order-0 pages, as preserved. */
static void kho_test_mark(struct kunit *test, struct page *page,
			  unsigned int order)
{
	struct kho_test_block *block;

	block = kunit_kzalloc(test, sizeof(*block), GFP_KERNEL);
	KUNIT_ASSERT_NOT_NULL(test, block);
	block->page = page;
	block->order = order;
	adjust_managed_page_count(page, -(1L << order));
	WRITE_ONCE(page->private, kho_test_magic(order));
	KUNIT_ASSERT_EQ(test, 0,
			kunit_add_action_or_reset(test, kho_test_unmark, block));
}

/* @nr_pages physically contiguous order-0 pages (a power of two). */
static struct page *kho_test_pages(struct kunit *test, unsigned long nr_pages)
{
	unsigned int order = ilog2(nr_pages);
	struct page *page = alloc_pages(GFP_KERNEL | __GFP_ZERO, order);

	KUNIT_ASSERT_NOT_NULL(test, page);
	split_page(page, order);
	return page;
}

static void kho_test_free_page(void *page)
{
	__free_page(page);
}

/* One order-0 page marked as preserved. */
static struct page *kho_test_page(struct kunit *test)
{
	struct page *page = kho_test_pages(test, 1);

	kho_test_mark(test, page, 0);
	return page;
}

/* A chunk of a vmalloc preservation, marked as preserved. */
static struct kho_vmalloc_chunk *kho_test_chunk(struct kunit *test)
{
	return page_address(kho_test_page(test));
}

static void kho_test_desc(struct kho_vmalloc *desc,
			  struct kho_vmalloc_chunk *first,
			  unsigned int total_pages)
{
	*desc = (struct kho_vmalloc){
		.first.phys = virt_to_phys(first),
		.total_pages = total_pages,
		.flags = KHO_VMALLOC_ALLOC,
	};
}

static void kho_test_expect_untouched(struct kunit *test,
				      struct kho_vmalloc_chunk *chunk,
				      struct page **blocks, int nr_blocks)
{
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(virt_to_page(chunk), 0));
	for (int i = 0; i < nr_blocks; i++)
		KUNIT_EXPECT_TRUE(test, kho_test_preserved(blocks[i], 0));
}

static void vmalloc_restores_a_whole_preservation(struct kunit *test)
{
	const unsigned int nr = KHO_VMALLOC_SIZE + 2;
	struct kho_vmalloc_chunk *chunks[2];
	struct kho_vmalloc desc;
	struct page *page;
	u64 *area;

	chunks[0] = kho_test_chunk(test);
	chunks[1] = kho_test_chunk(test);
	chunks[0]->hdr.next.phys = virt_to_phys(chunks[1]);
	for (unsigned int i = 0; i < nr; i++) {
		page = kho_test_page(test);
		*(u64 *)page_address(page) = i;
		chunks[i / KHO_VMALLOC_SIZE]->phys[i % KHO_VMALLOC_SIZE] =
			page_to_phys(page);
	}
	kho_test_desc(&desc, chunks[0], nr);

	area = kho_restore_vmalloc(&desc);
	KUNIT_ASSERT_FALSE(test, IS_ERR(area));
	for (unsigned int i = 0; i < nr; i++) {
		page = vmalloc_to_page((char *)area + i * PAGE_SIZE);
		KUNIT_EXPECT_EQ(test, area[i * PAGE_SIZE / sizeof(u64)], i);
		KUNIT_EXPECT_EQ(test, page->private, 0UL);
		KUNIT_EXPECT_EQ(test, page_ref_count(page), 1);
	}
	vfree(area);
}

static void vmalloc_refuses_a_looping_list(struct kunit *test)
{
	struct kho_vmalloc_chunk *chunk = kho_test_chunk(test);
	struct kho_vmalloc desc;

	/*
	 * No block to trip on, and room for four chunks: the chunk's own claim
	 * stops the loop (without it, the count of chunks would, later).
	 */
	chunk->hdr.next.phys = virt_to_phys(chunk);
	kho_test_desc(&desc, chunk, 3 * KHO_VMALLOC_SIZE);

	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunk, NULL, 0);
}

static void vmalloc_refuses_a_chunk_named_as_a_block(struct kunit *test)
{
	struct kho_vmalloc_chunk *chunk = kho_test_chunk(test);
	struct page *block = kho_test_page(test);
	struct kho_vmalloc desc;

	chunk->phys[0] = page_to_phys(block);
	chunk->phys[1] = virt_to_phys(chunk);
	kho_test_desc(&desc, chunk, 2);

	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunk, &block, 1);
}

static void vmalloc_refuses_a_block_named_twice(struct kunit *test)
{
	struct kho_vmalloc_chunk *chunk = kho_test_chunk(test);
	struct page *blocks[2] = { kho_test_page(test), kho_test_page(test) };
	struct kho_vmalloc desc;

	chunk->phys[0] = page_to_phys(blocks[0]);
	chunk->phys[1] = page_to_phys(blocks[1]);
	chunk->phys[2] = page_to_phys(blocks[0]);
	kho_test_desc(&desc, chunk, 3);

	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunk, blocks, 2);
}

static void vmalloc_refuses_a_wrong_size_before_allocating(struct kunit *test)
{
	struct kho_vmalloc_chunk *chunk = kho_test_chunk(test);
	struct page *block = kho_test_pages(test, 2);
	struct kho_vmalloc desc;
	void *area;

	/* The page after the block is this test's, and not preserved. */
	kho_test_mark(test, block, 0);
	KUNIT_ASSERT_EQ(test, 0, kunit_add_action_or_reset(test,
							   kho_test_free_page,
							   block + 1));
	chunk->phys[0] = page_to_phys(block);

	/* Far too large to allocate: refused as corrupt, not as ENOMEM. */
	kho_test_desc(&desc, chunk, UINT_MAX);
	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunk, &block, 1);

	kho_test_desc(&desc, chunk, 2);
	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunk, &block, 1);

	/* Blocks of two pages named, one-page blocks preserved. */
	kho_test_desc(&desc, chunk, 2);
	desc.order = 1;
	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunk, &block, 1);

	/* What is left is whole. */
	kho_test_desc(&desc, chunk, 1);
	area = kho_restore_vmalloc(&desc);
	KUNIT_ASSERT_FALSE(test, IS_ERR(area));
	KUNIT_EXPECT_EQ(test, block->private, 0UL);
	vfree(area);
}

static void vmalloc_refuses_an_entry_inside_a_page(struct kunit *test)
{
	struct kho_vmalloc_chunk *chunk = kho_test_chunk(test);
	struct page *block = kho_test_page(test);
	struct kho_vmalloc desc;

	chunk->phys[0] = page_to_phys(block) + 8;
	kho_test_desc(&desc, chunk, 1);

	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunk, &block, 1);
}

/*
 * A chunk's entries end at the first zero: what follows is not part of the
 * preservation, on success or failure. Two chunks need more blocks than one
 * holds.
 */
static void vmalloc_ends_a_chunk_at_its_first_zero(struct kunit *test)
{
	const unsigned int nr = KHO_VMALLOC_SIZE;
	struct kho_vmalloc_chunk *chunks[2] = {
		kho_test_chunk(test), kho_test_chunk(test)
	};
	struct page *after_zero = kho_test_page(test);
	struct kho_vmalloc desc;
	struct page **blocks;
	void *area;

	blocks = kunit_kcalloc(test, nr, sizeof(*blocks), GFP_KERNEL);
	KUNIT_ASSERT_NOT_NULL(test, blocks);
	for (unsigned int i = 0; i < nr; i++)
		blocks[i] = kho_test_page(test);
	chunks[0]->hdr.next.phys = virt_to_phys(chunks[1]);
	chunks[0]->phys[0] = page_to_phys(blocks[0]);
	chunks[0]->phys[2] = page_to_phys(after_zero);
	for (unsigned int i = 1; i < nr; i++)
		chunks[1]->phys[i - 1] = page_to_phys(blocks[i]);
	kho_test_desc(&desc, chunks[0], nr);

	/* Fails on the last entry, with blocks of both chunks claimed. */
	chunks[1]->phys[nr - 2] = page_to_phys(blocks[0]);
	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunks[0], blocks, nr);
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(virt_to_page(chunks[1]), 0));
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(after_zero, 0));

	chunks[1]->phys[nr - 2] = page_to_phys(blocks[nr - 1]);
	area = kho_restore_vmalloc(&desc);
	KUNIT_ASSERT_FALSE(test, IS_ERR(area));
	for (unsigned int i = 0; i < nr; i++)
		KUNIT_EXPECT_PTR_EQ(test, vmalloc_to_page(area + i * PAGE_SIZE),
				    blocks[i]);
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(after_zero, 0));
	vfree(area);
}

static void vmalloc_restores_blocks_of_two_pages(struct kunit *test)
{
	struct kho_vmalloc_chunk *chunk = kho_test_chunk(test);
	struct page *blocks[2] = {
		kho_test_pages(test, 2), kho_test_pages(test, 2)
	};
	struct kho_vmalloc desc;
	char *area;

	for (int i = 0; i < 2; i++) {
		kho_test_mark(test, blocks[i], 1);
		strscpy(page_address(blocks[i] + 1), "tail", 8);
		chunk->phys[i] = page_to_phys(blocks[i]);
	}
	kho_test_desc(&desc, chunk, 4);
	desc.order = 1;

	area = kho_restore_vmalloc(&desc);
	KUNIT_ASSERT_FALSE(test, IS_ERR(area));
	for (int i = 0; i < 4; i++) {
		struct page *page = vmalloc_to_page(area + i * PAGE_SIZE);

		KUNIT_EXPECT_PTR_EQ(test, page, blocks[i / 2] + i % 2);
		KUNIT_EXPECT_EQ(test, page->private, 0UL);
		KUNIT_EXPECT_EQ(test, page_ref_count(page), 1);
	}
	KUNIT_EXPECT_STREQ(test, area + 3 * PAGE_SIZE, "tail");
	vfree(area);
}

static void vmalloc_refuses_a_chunk_another_restored(struct kunit *test)
{
	struct kho_vmalloc_chunk *shared = kho_test_chunk(test);
	struct kho_vmalloc_chunk *chunk = kho_test_chunk(test);
	struct page *blocks[2] = { kho_test_page(test), kho_test_page(test) };
	struct kho_vmalloc desc;
	void *area;

	shared->phys[0] = page_to_phys(blocks[1]);
	chunk->phys[0] = page_to_phys(blocks[0]);
	chunk->hdr.next.phys = virt_to_phys(shared);

	/* Restoring @shared frees it. */
	kho_test_desc(&desc, shared, 1);
	area = kho_restore_vmalloc(&desc);
	KUNIT_ASSERT_FALSE(test, IS_ERR(area));

	kho_test_desc(&desc, chunk, 2);
	KUNIT_EXPECT_PTR_EQ(test, kho_restore_vmalloc(&desc), ERR_PTR(-EINVAL));
	kho_test_expect_untouched(test, chunk, blocks, 1);
	vfree(area);
}

/*
 * Four contiguous pages preserved as blocks of order 1, 0 and 0, as
 * kho_preserve_pages() records a run it splits.
 */
static struct page *kho_test_run(struct kunit *test)
{
	struct page *page = kho_test_pages(test, 4);

	kho_test_mark(test, page, 1);
	kho_test_mark(test, page + 2, 0);
	kho_test_mark(test, page + 3, 0);
	return page;
}

static void pages_restore_a_run_of_mixed_blocks(struct kunit *test)
{
	struct page *run = kho_test_run(test);

	KUNIT_ASSERT_PTR_EQ(test, kho_restore_pages(page_to_phys(run), 4), run);
	for (int i = 0; i < 4; i++) {
		KUNIT_EXPECT_EQ(test, run[i].private, 0UL);
		KUNIT_EXPECT_EQ(test, page_ref_count(run + i), 1);
		__free_page(run + i);
	}
}

static void pages_give_back_only_their_own_claims(struct kunit *test)
{
	struct page *run = kho_test_run(test);

	/* Another owner holds the last block. */
	KUNIT_ASSERT_PTR_EQ(test, kho_restore_pages(page_to_phys(run + 3), 1),
			    run + 3);
	KUNIT_EXPECT_NULL(test, kho_restore_pages(page_to_phys(run), 4));
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run, 1));
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run + 2, 0));
	KUNIT_EXPECT_EQ(test, run[3].private, 0UL);
	KUNIT_EXPECT_EQ(test, page_ref_count(run + 3), 1);

	/* A run that ends inside a block is not what was preserved. */
	KUNIT_EXPECT_NULL(test, kho_restore_pages(page_to_phys(run), 1));
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run, 1));

	/* The claims of the first restore left no trace. */
	KUNIT_ASSERT_PTR_EQ(test, kho_restore_pages(page_to_phys(run), 3), run);
	for (int i = 0; i < 4; i++)
		__free_page(run + i);
}

static void pages_claim_runs_for_one_owner(struct kunit *test)
{
	struct page *run = kho_test_run(test);
	const unsigned long pfn = page_to_pfn(run);

	/* The claim a concurrent restorer would lose to. */
	KUNIT_ASSERT_TRUE(test, kho_claim_run(pfn + 2, pfn + 3));
	KUNIT_EXPECT_FALSE(test, kho_claim_run(pfn, pfn + 4));
	KUNIT_EXPECT_FALSE(test, kho_claim_run(pfn + 2, pfn + 3));
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run, 1));
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run + 3, 0));

	/* The owner of a claim can give it back whole. */
	kho_unclaim_run(pfn + 2, pfn + 3);
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run + 2, 0));
	KUNIT_ASSERT_TRUE(test, kho_claim_run(pfn, pfn + 4));
	kho_unclaim_run(pfn, pfn + 4);
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run, 1));
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run + 2, 0));
	KUNIT_EXPECT_TRUE(test, kho_test_preserved(run + 3, 0));
}

static struct kunit_case kho_restore_test_cases[] = {
	KUNIT_CASE(vmalloc_restores_a_whole_preservation),
	KUNIT_CASE(vmalloc_refuses_a_looping_list),
	KUNIT_CASE(vmalloc_refuses_a_chunk_named_as_a_block),
	KUNIT_CASE(vmalloc_refuses_a_block_named_twice),
	KUNIT_CASE(vmalloc_refuses_a_wrong_size_before_allocating),
	KUNIT_CASE(vmalloc_refuses_an_entry_inside_a_page),
	KUNIT_CASE(vmalloc_ends_a_chunk_at_its_first_zero),
	KUNIT_CASE(vmalloc_restores_blocks_of_two_pages),
	KUNIT_CASE(vmalloc_refuses_a_chunk_another_restored),
	KUNIT_CASE(pages_restore_a_run_of_mixed_blocks),
	KUNIT_CASE(pages_give_back_only_their_own_claims),
	KUNIT_CASE(pages_claim_runs_for_one_owner),
	{}
};

static struct kunit_suite kho_restore_test_suite = {
	.name = "kho_restore",
	.test_cases = kho_restore_test_cases,
};

kunit_test_suite(kho_restore_test_suite);
