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
    fs::File,
    prelude::*,
    sync::aref::{
        ARef,
        AlwaysRefCounted, //
    },
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

    /// The page frame number of the folio's first page.
    pub fn pfn(&self) -> u64 {
        // SAFETY: `self` is a valid folio.
        unsafe { bindings::folio_pfn(self.as_ptr()) as u64 }
    }

    /// The index (in pages) of the folio in its file.
    pub fn index(&self) -> u64 {
        // SAFETY: `self` is a valid folio.
        unsafe { bindings::folio_index(self.as_ptr()) as u64 }
    }

    /// The number of pages in the folio (`2^order`).
    pub fn nr_pages(&self) -> u64 {
        // SAFETY: `self` is a valid folio.
        unsafe { bindings::folio_nr_pages(self.as_ptr()) as u64 }
    }

    /// Whether the folio's contents are valid.
    pub fn is_uptodate(&self) -> bool {
        // SAFETY: `self` is a valid folio.
        unsafe { bindings::folio_test_uptodate(self.as_ptr()) }
    }

    /// The NUMA node the folio's memory is on.
    pub fn nid(&self) -> i32 {
        // SAFETY: `self` is a valid folio.
        unsafe { bindings::folio_nid(self.as_ptr()) }
    }

    /// Whether memory failure handling found a hardware error in one of the folio's pages.
    pub fn is_hwpoisoned(&self) -> bool {
        // SAFETY: `self` is a valid folio.
        unsafe { bindings::folio_contain_hwpoisoned_page(self.as_ptr()) }
    }

    /// Where the folio is, in its file and in physical memory.
    pub fn span(&self) -> Span {
        Span {
            index: self.index(),
            pfn: self.pfn(),
            nr_pages: self.nr_pages(),
            nid: self.nid(),
        }
    }
}

impl Folio {
    /// Locks the folio, sleeping until it is available, and returns a guard that unlocks it.
    ///
    /// A locked folio cannot be removed from its page cache or change state under the holder.
    pub fn lock(&self) -> FolioLockGuard<'_> {
        // SAFETY: `self` is a valid folio; `folio_lock` may sleep, which a `&Folio` allows.
        unsafe { bindings::folio_lock(self.as_ptr()) };
        // INVARIANT: Locked above.
        FolioLockGuard { folio: self }
    }
}

/// A locked folio; dropping the guard unlocks it.
///
/// # Invariants
///
/// `folio` is locked by this guard.
#[must_use = "the folio is unlocked when the guard is dropped"]
pub struct FolioLockGuard<'a> {
    folio: &'a Folio,
}

impl core::ops::Deref for FolioLockGuard<'_> {
    type Target = Folio;

    fn deref(&self) -> &Folio {
        self.folio
    }
}

// For guest_memfd (kernel::kvm), whose folios are zeroed on first use.
#[cfg(all(CONFIG_KVM_X86 = "y", CONFIG_KVM_GUEST_MEMFD))]
impl FolioLockGuard<'_> {
    /// Fills the folio with zeroes and marks it uptodate, unless it is uptodate already; this is
    /// the first use of a folio whose file zeroes folios on first use. Returns whether it did.
    ///
    /// # Safety
    ///
    /// In the folio's file, a folio that is not uptodate must hold no data yet, and whatever
    /// fills it or maps it must do so under the folio lock and mark it uptodate first.
    pub(crate) unsafe fn zero_unless_uptodate(&self) -> bool {
        // A poisoned page may be unmapped from the kernel: never write it.
        if self.is_uptodate() || self.is_hwpoisoned() {
            return false;
        }
        let folio = self.as_ptr();
        // SAFETY: The folio is valid and locked by us, and not uptodate: by the function's
        // safety requirements nobody reads, writes or maps its contents until it is marked
        // uptodate under the lock we hold.
        unsafe {
            bindings::folio_zero_range(folio, 0, bindings::folio_size(folio));
            bindings::folio_mark_uptodate(folio);
        }
        true
    }
}

impl Drop for FolioLockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: The folio is locked by us, by the type invariants.
        unsafe { bindings::folio_unlock(self.folio.as_ptr()) };
    }
}

/// Calls `f` for every folio in the page cache of `file`, in index order, with the reference the
/// page cache lookup took on it: `f` keeps it or drops it (no reference is taken or dropped
/// per folio otherwise).
///
/// The folios are the ones present when the walk reaches them; the caller keeps the page cache
/// from changing if it needs an exact snapshot. `f` may sleep.
///
/// # Errors
///
/// Stops at, and returns, the first error of `f`.
pub fn for_each_in_file<F>(file: &File, mut f: F) -> Result
where
    F: FnMut(ARef<Folio>) -> Result,
{
    // SAFETY: `file` is valid, so is its mapping, for the duration of the walk.
    let mapping = unsafe { (*file.as_ptr()).f_mapping };
    let mut batch: bindings::folio_batch = pin_init::zeroed();
    let mut start: usize = 0;
    // SAFETY: `batch` is a valid, exclusively owned batch.
    unsafe { bindings::folio_batch_init(&mut batch) };
    loop {
        // SAFETY: `mapping` is valid; the function fills `batch` with referenced folios and
        // advances `start` past them.
        let nr =
            unsafe { bindings::filemap_get_folios(mapping, &mut start, usize::MAX, &mut batch) };
        if nr == 0 {
            return Ok(());
        }
        let mut result = Ok(());
        for &ptr in batch.folios.iter().take(nr as usize) {
            // The lookup adds no NULL entry; `ARef` needs that checked.
            let Some(ptr) = NonNull::new(ptr.cast::<Folio>()) else {
                continue;
            };
            // SAFETY: The lookup took a reference on each folio of the batch; it moves into
            // this `ARef` (the batch is emptied below without dropping any).
            let folio = unsafe { ARef::from_raw(ptr) };
            // After an error, the rest of the batch is only dropped.
            if result.is_ok() {
                result = f(folio);
            }
        }
        // Every reference of the batch went to an `ARef` above (`folio_batch_reinit()`).
        batch.nr = 0;
        batch.i = 0;
        result?;
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
/// reference to each of them.
pub struct FolioRun {
    span: Span,
}

impl FolioRun {
    /// Starts a run with `folio`, whose reference the run keeps.
    pub fn new(folio: ARef<Folio>) -> Self {
        let span = folio.span();
        // INVARIANT: `folio_pfn()` is the folio's first page; the reference `folio` held is the
        // run's now.
        let _ = ARef::into_raw(folio);
        Self { span }
    }

    /// Appends `folio`, keeping its reference, if it continues the run (see
    /// [`Span::continues_with`]); gives it back otherwise.
    pub fn try_append(&mut self, folio: ARef<Folio>) -> core::result::Result<(), ARef<Folio>> {
        let next = folio.span();
        if !self.span.continues_with(&next) {
            return Err(folio);
        }
        // INVARIANT: `folio` starts where the run ended and is whole; its reference is the
        // run's now.
        let _ = ARef::into_raw(folio);
        self.span.nr_pages += next.nr_pages;
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
