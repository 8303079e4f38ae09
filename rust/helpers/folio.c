// SPDX-License-Identifier: GPL-2.0

#include <linux/mm.h>
#include <linux/pagemap.h>

__rust_helper void rust_helper_folio_get(struct folio *folio)
{
	folio_get(folio);
}

__rust_helper unsigned long rust_helper_folio_pfn(const struct folio *folio)
{
	return folio_pfn(folio);
}

__rust_helper pgoff_t rust_helper_folio_index(const struct folio *folio)
{
	return folio->index;
}

__rust_helper long rust_helper_folio_nr_pages(const struct folio *folio)
{
	return folio_nr_pages(folio);
}

__rust_helper bool rust_helper_folio_test_uptodate(const struct folio *folio)
{
	return folio_test_uptodate(folio);
}

__rust_helper int rust_helper_folio_nid(const struct folio *folio)
{
	return folio_nid(folio);
}

__rust_helper bool rust_helper_folio_contain_hwpoisoned_page(struct folio *folio)
{
	return folio_contain_hwpoisoned_page(folio);
}

__rust_helper struct page *rust_helper_pfn_to_page(unsigned long pfn)
{
	return pfn_to_page(pfn);
}

__rust_helper struct folio *rust_helper_page_folio(struct page *page)
{
	return page_folio(page);
}
