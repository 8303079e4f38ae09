// SPDX-License-Identifier: GPL-2.0

//! Folios: the page cache's units of memory.
//!
//! C headers: [`include/linux/mm.h`](srctree/include/linux/mm.h),
//! [`include/linux/pagemap.h`](srctree/include/linux/pagemap.h).
//!
//! A folio is a physically contiguous, naturally aligned block of `2^order` pages. A file's page
//! cache holds folios by index (in pages); each folio in it has a reference held by the page
//! cache. [`Folio`] is a folio; `ARef<Folio>` owns one reference (taken with `folio_get()`, or by
//! the page cache lookup of a walk), dropped with `folio_put()`, which frees the folio when it was
//! the last.

use crate::{
    bindings,
    sync::aref::AlwaysRefCounted,
    types::Opaque, //
};
use core::ptr::NonNull;

/// A folio.
///
/// # Invariants
///
/// The object is a valid `struct folio` with a non-zero reference count while a reference to it
/// exists.
#[repr(transparent)]
pub struct Folio {
    inner: Opaque<bindings::folio>,
}

// SAFETY: Folio references may be taken and dropped on any thread.
unsafe impl Send for Folio {}
// SAFETY: The methods on `&Folio` only read state that is safe to read concurrently.
unsafe impl Sync for Folio {}

// SAFETY: The reference count is managed by `folio_get()` and `folio_put()`; a `&Folio` implies
// a non-zero count.
unsafe impl AlwaysRefCounted for Folio {
    fn inc_ref(&self) {
        // SAFETY: The existence of `&self` means the count is non-zero.
        unsafe { bindings::folio_get(self.as_ptr()) };
    }

    unsafe fn dec_ref(obj: NonNull<Self>) {
        // SAFETY: The caller owns a reference to give back.
        unsafe { bindings::folio_put(obj.cast().as_ptr()) };
    }
}

impl Folio {
    /// Returns a raw pointer to the `struct folio`.
    pub fn as_ptr(&self) -> *mut bindings::folio {
        self.inner.get()
    }
}

/// Where a run of pages is: its first index in a file, its first page frame, its length and its
/// NUMA node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Index (in pages) of the first page in the file.
    pub index: u64,
    /// Page frame number of the first page.
    pub pfn: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// The NUMA node of the pages.
    pub nid: i32,
}

impl Span {
    /// Whether `next` starts where this span ends, both in the file and in physical memory, on
    /// the same NUMA node.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::folio::Span;
    ///
    /// let span = |index, pfn, nr_pages, nid| Span { index, pfn, nr_pages, nid };
    /// let first = span(0, 100, 4, 0);
    /// assert!(first.continues_with(&span(4, 104, 1, 0)));
    /// // A hole in the file, a jump in physical memory, another node.
    /// assert!(!first.continues_with(&span(5, 104, 1, 0)));
    /// assert!(!first.continues_with(&span(4, 105, 1, 0)));
    /// assert!(!first.continues_with(&span(4, 104, 1, 1)));
    /// // Nothing follows the last page of a file or of the pfn space.
    /// assert!(!span(u64::MAX, 5, 1, 0).continues_with(&span(0, 6, 1, 0)));
    /// assert!(!span(0, u64::MAX, 1, 0).continues_with(&span(1, 0, 1, 0)));
    /// ```
    pub fn continues_with(&self, next: &Span) -> bool {
        self.nid == next.nid
            && self.index.checked_add(self.nr_pages) == Some(next.index)
            && self.pfn.checked_add(self.nr_pages) == Some(next.pfn)
    }
}

/// Folios that follow each other in a file and in physical memory, all on one NUMA node, each
/// held by a reference the run owns.
///
/// While the run exists its folios cannot be freed, whatever happens to the file. Dropping it
/// drops the references.
///
/// # Invariants
///
/// `span` starts at the first page of a folio and covers whole folios; this object owns one
/// reference to each of them. Their pfns, sizes and node stay true while the references are
/// held: a referenced folio is neither split nor freed (nor moved, which needs its references
/// frozen). The index is the one read with the references held: the folios may leave their
/// page cache since.
pub struct FolioRun {
    span: Span,
}

impl FolioRun {
    /// Makes a run of the folios of `span`, whose references the caller gives to the run.
    ///
    /// # Safety
    ///
    /// `span` must start at the first page of a folio and cover whole folios that follow each
    /// other from `span.index` in a file and from `span.pfn` in physical memory, on node
    /// `span.nid`, as read while the caller held a reference to each; the caller gives those
    /// references to the run.
    pub unsafe fn from_raw(span: Span) -> Self {
        // INVARIANT: By the safety requirements.
        Self { span }
    }

    /// Appends `next`, with its references, if it continues the run (see
    /// [`Span::continues_with`]); gives it back otherwise.
    pub fn try_join(&mut self, next: FolioRun) -> core::result::Result<(), FolioRun> {
        if !self.span.continues_with(&next.span) {
            return Err(next);
        }
        // INVARIANT: `next` starts where the run ended and covers whole folios; its references
        // are the run's now.
        self.span.nr_pages += next.span.nr_pages;
        core::mem::forget(next);
        Ok(())
    }

    /// Where the run is.
    pub fn span(&self) -> Span {
        self.span
    }
}

impl Drop for FolioRun {
    fn drop(&mut self) {
        let mut pfn = self.span.pfn;
        let end = self.span.pfn + self.span.nr_pages;
        while pfn < end {
            // SAFETY: `pfn` is the first page of a folio of the run, which our reference keeps
            // allocated (and unsplit), by the type invariants.
            let folio = unsafe { bindings::page_folio(bindings::pfn_to_page(pfn as usize)) };
            // SAFETY: As above.
            let nr = unsafe { bindings::folio_nr_pages(folio) } as u64;
            // SAFETY: We own a reference to the folio, by the type invariants; this gives it
            // back, and the folio is not used after.
            unsafe { bindings::folio_put(folio) };
            pfn += nr;
        }
    }
}
