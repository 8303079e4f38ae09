// SPDX-License-Identifier: GPL-2.0

//! Folios: the page cache's units of memory.
//!
//! C headers: [`include/linux/mm.h`](srctree/include/linux/mm.h),
//! [`include/linux/pagemap.h`](srctree/include/linux/pagemap.h).
//!
//! A folio is a physically contiguous, naturally aligned block of `2^order` pages. A file's page
//! cache holds folios by index (in pages); each folio in it has a reference held by the page
//! cache. [`Folio`] is a folio; `ARef<Folio>` owns one reference, taken with `folio_get()` and
//! dropped with `folio_put()`, which frees the folio when it was the last.

use crate::{bindings, fs::File, prelude::*, sync::aref::AlwaysRefCounted, types::Opaque};
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

    /// Creates a reference to a folio from a raw pointer.
    ///
    /// # Safety
    ///
    /// `ptr` must be a valid folio whose reference count stays non-zero for `'a`.
    pub unsafe fn from_raw<'a>(ptr: *mut bindings::folio) -> &'a Folio {
        // SAFETY: `Folio` is `repr(transparent)`; the caller guarantees validity for `'a`.
        unsafe { &*ptr.cast() }
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

    /// The order of the folio: it holds `2^order` pages.
    pub fn order(&self) -> u32 {
        // SAFETY: `self` is a valid folio.
        unsafe { bindings::folio_order(self.as_ptr()) }
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

impl Drop for FolioLockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: The folio is locked by us, by the type invariants.
        unsafe { bindings::folio_unlock(self.folio.as_ptr()) };
    }
}

/// Calls `f` for every folio in the page cache of `file`, in index order.
///
/// The folios are the ones present when the walk reaches them; the caller keeps the page cache
/// from changing if it needs an exact snapshot. `f` may sleep.
///
/// # Errors
///
/// Stops at, and returns, the first error of `f`.
pub fn for_each_in_file<F>(file: &File, mut f: F) -> Result
where
    F: FnMut(&Folio) -> Result,
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
            // SAFETY: The batch holds a reference on each of its folios until released below.
            result = f(unsafe { Folio::from_raw(ptr) });
            if result.is_err() {
                break;
            }
        }
        // SAFETY: Drops the references the batch holds, and empties it.
        unsafe { bindings::folio_batch_release(&mut batch) };
        result?;
    }
}
