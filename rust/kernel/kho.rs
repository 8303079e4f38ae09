// SPDX-License-Identifier: GPL-2.0

//! Kexec HandOver (KHO): memory that survives a kexec.
//!
//! C header: [`include/linux/kexec_handover.h`](srctree/include/linux/kexec_handover.h).
//!
//! KHO marks physical memory as preserved so that the next kernel, booted by kexec, does not
//! reuse it, and lets the next kernel take that memory back ("restore" it). A live update file
//! handler serializes its state into preserved memory and passes the physical address of that
//! state to the next kernel through LUO.
//!
//! The types here pair every preservation with exactly one way out:
//!
//! - [`Preserved<T>`] and [`PreservedVec<T>`] are the outgoing side. While they exist, their
//!   memory is preserved; dropping them unpreserves and frees it (the live update was cancelled
//!   before the kexec). If the kexec happens while they exist, the memory is handed over.
//! - [`PreservedPages`] preserves a [`FolioRun`]: folios it holds references to until the kexec.
//! - [`Restored<T>`], [`RestoredVec<T>`] and [`RestoredPages`] are the incoming side. Creating
//!   them takes the memory back from KHO, which refuses memory that was not preserved or was
//!   already restored (its claim of a block is atomic: of two restorers of the same block, one
//!   gets it and the other an error); dropping them frees it.
//!
//! Preserved data is plain old data: `T` must be [`FromBytes`] and [`IntoBytes`], so any bytes
//! left by the previous kernel are a valid `T` and the caller only has to check their meaning.
//! Use the little-endian types of [`zerocopy::byteorder`] for fields: the layout is an ABI
//! between two kernels.

use crate::{
    alloc::VVec,
    bindings,
    error::{
        from_err_ptr,
        to_result, //
    },
    folio::{
        Folio,
        FolioRun,
        Span, //
    },
    page::PAGE_SIZE,
    prelude::*,
    sync::aref::ARef,
};
use core::{
    marker::PhantomData,
    mem::{
        size_of,
        size_of_val, //
    },
    num::NonZeroU64,
    ops::{
        Deref,
        DerefMut, //
    },
    ptr::NonNull,
};
use zerocopy::byteorder::little_endian::{
    U16,
    U32,
    U64, //
};

/// Number of pages that hold `bytes` bytes.
fn pages_for(bytes: usize) -> usize {
    bytes.div_ceil(PAGE_SIZE)
}

/// A `T` in memory preserved across kexec, allocated with `kho_alloc_preserve()`.
///
/// The memory is zeroed when allocated, and is handed over to the next kernel if a kexec happens
/// while this object exists. Dropping it unpreserves and frees the memory.
///
/// # Invariants
///
/// `ptr` was returned by a successful `kho_alloc_preserve(size_of::<T>())`, is preserved, and is
/// exclusively owned by this object.
pub struct Preserved<T: FromBytes + IntoBytes> {
    ptr: NonNull<T>,
}

impl<T: FromBytes + IntoBytes> Preserved<T> {
    /// Allocates preserved, zeroed memory for a `T` and stores `value` in it.
    ///
    /// # Errors
    ///
    /// Returns `ENOMEM` when memory cannot be allocated and the error of `kho_preserve_folio()`
    /// when it cannot be preserved.
    pub fn new(value: T) -> Result<Self> {
        const { assert!(size_of::<T>() > 0 && core::mem::align_of::<T>() <= PAGE_SIZE) };
        // SAFETY: `kho_alloc_preserve` can be called with any non-zero size.
        let ptr = from_err_ptr(unsafe { bindings::kho_alloc_preserve(size_of::<T>()) })?;
        let ptr = NonNull::new(ptr.cast::<T>()).ok_or(ENOMEM)?;
        // SAFETY: The memory is page-aligned, at least `size_of::<T>()` bytes long, and owned by
        // us; any `T` may be written to it.
        unsafe { ptr.as_ptr().write(value) };
        // INVARIANT: `ptr` comes from a successful `kho_alloc_preserve()`.
        Ok(Self { ptr })
    }

    /// The physical address to pass to the next kernel, for [`Restored::restore`].
    pub fn phys(&self) -> u64 {
        // SAFETY: `ptr` is a valid direct-map address by the type invariants.
        unsafe { bindings::virt_to_phys(self.ptr.as_ptr().cast()) }
    }
}

impl<T: FromBytes + IntoBytes> Deref for Preserved<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `ptr` points to a `T` owned by `self`, by the type invariants.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: FromBytes + IntoBytes> DerefMut for Preserved<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: `ptr` points to a `T` exclusively owned by `self`, by the type invariants.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: FromBytes + IntoBytes> Drop for Preserved<T> {
    fn drop(&mut self) {
        // SAFETY: By the type invariants `ptr` came from `kho_alloc_preserve()` and is still
        // preserved; this is the only place that gives it back.
        unsafe { bindings::kho_unpreserve_free(self.ptr.as_ptr().cast()) };
    }
}

// SAFETY: `Preserved<T>` owns its `T` like a `Box<T>`; it can be sent to another thread if `T`
// can.
unsafe impl<T: FromBytes + IntoBytes + Send> Send for Preserved<T> {}
// SAFETY: `&Preserved<T>` only gives out `&T`.
unsafe impl<T: FromBytes + IntoBytes + Sync> Sync for Preserved<T> {}

/// A `T` the previous kernel preserved with [`Preserved`], taken back from KHO.
///
/// The bytes are whatever the previous kernel left; `T: FromBytes` makes any of them a valid `T`,
/// and the caller validates their meaning. Dropping this object frees the memory.
///
/// # Invariants
///
/// `folio` was returned by `kho_restore_folio()`, we own its only reference, and it is at least
/// `size_of::<T>()` bytes long.
pub struct Restored<T: FromBytes> {
    folio: NonNull<bindings::folio>,
    _t: PhantomData<T>,
}

impl<T: FromBytes> Restored<T> {
    /// Takes back the `T` at physical address `phys` that the previous kernel preserved.
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` when `phys` is not the start of memory preserved by the previous kernel,
    /// was already restored, or is too small for a `T`.
    pub fn restore(phys: u64) -> Result<Self> {
        const { assert!(core::mem::align_of::<T>() <= PAGE_SIZE) };
        // KHO looks at the page `phys` is in.
        if phys % PAGE_SIZE as u64 != 0 {
            return Err(EINVAL);
        }
        // SAFETY: `kho_restore_folio` accepts any address: it checks that `phys` is the head of
        // a folio preserved by the previous kernel and not yet restored, claims it atomically,
        // and returns NULL otherwise.
        let folio = NonNull::new(unsafe { bindings::kho_restore_folio(phys) }).ok_or(EINVAL)?;
        // SAFETY: `folio` is a valid folio we hold the only reference to.
        let size = unsafe { bindings::folio_size(folio.as_ptr()) };
        if size < size_of::<T>() {
            // SAFETY: We own the reference returned by `kho_restore_folio`.
            unsafe { bindings::folio_put(folio.as_ptr()) };
            return Err(EINVAL);
        }
        // INVARIANT: Checked above.
        Ok(Self {
            folio,
            _t: PhantomData,
        })
    }
}

impl<T: FromBytes> Deref for Restored<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: The folio is in the direct map (KHO folios are never highmem on 64-bit), at
        // least `size_of::<T>()` long by the type invariants, page-aligned, and any bytes are a
        // valid `T`.
        unsafe { &*bindings::folio_address(self.folio.as_ptr()).cast::<T>() }
    }
}

impl<T: FromBytes> DerefMut for Restored<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: As for `deref`; we own the only reference to the folio, so nothing else
        // reads or writes the `T` while the returned reference lives.
        unsafe { &mut *bindings::folio_address(self.folio.as_ptr()).cast::<T>() }
    }
}

impl<T: FromBytes> Drop for Restored<T> {
    fn drop(&mut self) {
        // SAFETY: We own the only reference to the restored folio; dropping it frees the memory.
        unsafe { bindings::folio_put(self.folio.as_ptr()) };
    }
}

// SAFETY: `Restored<T>` owns its `T` like a `Box<T>`.
unsafe impl<T: FromBytes + Send> Send for Restored<T> {}
// SAFETY: `&Restored<T>` only gives out `&T`.
unsafe impl<T: FromBytes + Sync> Sync for Restored<T> {}

/// Checks at build time that `$rust`, the Rust form of a structure `$c` of a C ABI header
/// (`include/linux/kho/abi/`), has its size and each of the named fields at the same offset, so
/// that the two cannot drift apart. Name every field: a field left out is not checked.
///
/// Serialized state is read through `zerocopy` (any bytes the previous kernel left are a valid
/// value), which the generated bindings do not derive: the handlers keep a Rust form of each
/// structure, with its fields in little-endian types, and check it against the C header with this.
///
/// # Examples
///
/// ```
/// /// As bindgen gives a C structure.
/// #[repr(C)]
/// struct Header {
///     size: u64,
///     flags: u32,
///     reserved: u32,
/// }
///
/// /// Its Rust form, here in bytes (a handler's uses `zerocopy`'s little-endian types).
/// #[repr(C)]
/// struct HeaderSer {
///     size: [u8; 8],
///     flags: [u8; 4],
///     reserved: [u8; 4],
/// }
///
/// kernel::assert_abi_layout!(HeaderSer, Header, [size, flags, reserved]);
/// ```
#[macro_export]
macro_rules! assert_abi_layout {
    ($rust:ty, $c:ty, [$($field:ident),+ $(,)?]) => {
        const _: () = {
            ::core::assert!(::core::mem::size_of::<$rust>() == ::core::mem::size_of::<$c>());
            $(
                ::core::assert!(
                    ::core::mem::offset_of!($rust, $field) == ::core::mem::offset_of!($c, $field)
                );
            )+
        };
    };
}

/// How the previous kernel describes a preserved vmalloc area, in the layout of
/// `struct kho_vmalloc`, to embed in a handler's serialized state.
#[repr(C)]
#[derive(Clone, Copy, Default, FromBytes, IntoBytes)]
pub struct VmallocDesc {
    first: U64,
    total_pages: U32,
    flags: U16,
    order: U16,
}

crate::assert_abi_layout!(
    VmallocDesc,
    bindings::kho_vmalloc,
    [first, total_pages, flags, order]
);

impl VmallocDesc {
    fn from_raw(raw: &bindings::kho_vmalloc) -> Self {
        // SAFETY: `first` is a union of a pointer and its physical address; KHO stores the
        // physical address in it, and both are 64 bits wide.
        let first = unsafe { raw.first.phys };
        Self {
            first: first.into(),
            total_pages: raw.total_pages.into(),
            flags: raw.flags.into(),
            order: raw.order.into(),
        }
    }

    fn to_raw(self) -> bindings::kho_vmalloc {
        let mut raw: bindings::kho_vmalloc = pin_init::zeroed();
        raw.first.phys = self.first.get();
        raw.total_pages = self.total_pages.get();
        raw.flags = self.flags.get();
        raw.order = self.order.get();
        raw
    }

    /// Whether this describes no memory at all (an empty vector).
    pub fn is_empty(&self) -> bool {
        self.first.get() == 0
    }

    /// Whether this describes as many pages as a vector of `len` elements of type `E` takes, as
    /// [`RestoredVec::restore`] requires: a cheap check of a length from the same serialized data
    /// before anything is allocated for it.
    pub fn fits<E>(&self, len: usize) -> bool {
        match len.checked_mul(size_of::<E>()) {
            Some(0) => self.is_empty(),
            Some(bytes) => !self.is_empty() && self.total_pages.get() as usize == pages_for(bytes),
            None => false,
        }
    }
}

/// A vector in vmalloc memory preserved across kexec with `kho_preserve_vmalloc()`.
///
/// Build the contents in a [`VVec`], then preserve it. The elements cannot change length while
/// preserved. Dropping this object unpreserves the memory and frees the vector.
///
/// # Invariants
///
/// If `vec` is not empty, its whole vmalloc area is preserved and `desc` describes it.
pub struct PreservedVec<T: FromBytes + IntoBytes> {
    vec: VVec<T>,
    desc: bindings::kho_vmalloc,
}

impl<T: FromBytes + IntoBytes + Copy> PreservedVec<T> {
    /// Preserves the memory of `vec`.
    ///
    /// The preserved area is exactly as many pages as the elements need (the vector is copied
    /// into one of that size first if its capacity is larger), which is what
    /// [`RestoredVec::restore`] checks in the next kernel.
    ///
    /// # Errors
    ///
    /// Returns `ENOMEM` and the error of `kho_preserve_vmalloc()`, in which case `vec` is
    /// dropped.
    pub fn new(vec: VVec<T>) -> Result<Self> {
        let vec = if pages_for(vec.capacity() * size_of::<T>()) > pages_for(size_of_val(&*vec)) {
            let mut exact = VVec::with_capacity(vec.len(), GFP_KERNEL)?;
            exact.extend_from_slice(&vec, GFP_KERNEL)?;
            exact
        } else {
            vec
        };
        let mut desc: bindings::kho_vmalloc = pin_init::zeroed();
        if !vec.is_empty() && size_of::<T>() != 0 {
            // SAFETY: A non-empty `VVec` is the start of its own vmalloc area, which stays alive
            // (and unchanged in size) as long as `self`.
            to_result(unsafe {
                bindings::kho_preserve_vmalloc(vec.as_ptr().cast_mut().cast(), &mut desc)
            })?;
        }
        let bytes = size_of_val(&*vec);
        // INVARIANT: Preserved above, or empty.
        let preserved = Self { vec, desc };
        // What the next kernel will check, checked now, while the error is still harmless.
        if bytes != 0 && preserved.desc.total_pages as usize != pages_for(bytes) {
            return Err(EINVAL);
        }
        Ok(preserved)
    }

    /// The descriptor to pass to the next kernel, for [`RestoredVec::restore`].
    pub fn desc(&self) -> VmallocDesc {
        VmallocDesc::from_raw(&self.desc)
    }
}

impl<T: FromBytes + IntoBytes> Deref for PreservedVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.vec
    }
}

impl<T: FromBytes + IntoBytes> Drop for PreservedVec<T> {
    fn drop(&mut self) {
        if !self.vec.is_empty() && size_of::<T>() != 0 {
            // SAFETY: The area was preserved in `new` and `desc` describes it, by the type
            // invariants. The vector itself is freed after this, by dropping `vec`.
            unsafe { bindings::kho_unpreserve_vmalloc(&mut self.desc) };
        }
    }
}

// SAFETY: `PreservedVec<T>` owns its elements like a `VVec<T>`; the descriptor is only used by
// `drop`, which has exclusive access.
unsafe impl<T: FromBytes + IntoBytes + Send> Send for PreservedVec<T> {}
// SAFETY: `&PreservedVec<T>` only gives out `&[T]` and a copy of the descriptor.
unsafe impl<T: FromBytes + IntoBytes + Sync> Sync for PreservedVec<T> {}

/// A vector the previous kernel preserved with [`PreservedVec`], taken back from KHO.
///
/// # Invariants
///
/// `ptr` is null (and `len` zero), or a vmalloc address returned by `kho_restore_vmalloc()`
/// that we own, holding at least `len` elements of `T`.
pub struct RestoredVec<T: FromBytes> {
    ptr: *mut T,
    len: usize,
}

impl<T: FromBytes> RestoredVec<T> {
    /// Takes back the vector of `len` elements described by `desc`, a descriptor the previous
    /// kernel serialized.
    ///
    /// `len` comes from the caller's own serialized data, which it has bounded. The descriptor
    /// must describe exactly the pages `len` elements need (as [`PreservedVec`] preserves them),
    /// in blocks of a valid order. KHO checks the rest: it claims every chunk of the
    /// descriptor's list before it reads it and every block atomically, so any descriptor is
    /// safe to pass, however corrupted, and memory that was not preserved or that someone else
    /// restored is refused.
    ///
    /// A failure takes nothing. On success `desc` is emptied, since the memory it named is this
    /// kernel's now, and when KHO refuses it as not a whole vector (or as shared with another
    /// restorer, which only corrupt data can cause), since no later call is meant to restore it;
    /// after `ENOMEM` it is kept, to be restored again later.
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` when the descriptor does not match `len` or when KHO refuses the memory
    /// (not preserved, already restored, inconsistent descriptor), and `ENOMEM` when memory to
    /// map the vector could not be allocated: it can be restored again later.
    pub fn restore(desc: &mut VmallocDesc, len: usize) -> Result<Self> {
        // vmalloc memory is page-aligned.
        const { assert!(core::mem::align_of::<T>() <= PAGE_SIZE) };
        if !desc.fits::<T>(len) {
            return Err(EINVAL);
        }
        if desc.is_empty() {
            return Ok(Self {
                ptr: core::ptr::null_mut(),
                len: 0,
            });
        }
        let raw = desc.to_raw();
        // SAFETY: `kho_restore_vmalloc` accepts any descriptor: it claims each chunk of the list
        // before it reads it and each block atomically before it maps it, so it neither reads
        // memory it does not own nor hands us such memory. (That relies on the previous
        // kernel's record of preserved memory naming each page in one block only, which KHO
        // does not check when it boots: a KHO limitation shared by every restore.)
        let restored = from_err_ptr(unsafe { bindings::kho_restore_vmalloc(&raw) });
        if !matches!(restored, Err(ENOMEM)) {
            *desc = VmallocDesc::default();
        }
        // INVARIANT: The area is ours and `total_pages` pages long, which hold `len` elements,
        // as checked above.
        restored.map(|ptr| Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl<T: FromBytes> Deref for RestoredVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: By the type invariants `ptr` holds `len` elements; any bytes are a valid `T`,
        // and vmalloc memory is page-aligned.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: FromBytes> Drop for RestoredVec<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` is a vmalloc area we own, by the type invariants.
            unsafe { bindings::vfree(self.ptr.cast()) };
        }
    }
}

// SAFETY: `RestoredVec<T>` owns its elements like a `VVec<T>`.
unsafe impl<T: FromBytes + Send> Send for RestoredVec<T> {}
// SAFETY: `&RestoredVec<T>` only gives out `&[T]`.
unsafe impl<T: FromBytes + Sync> Sync for RestoredVec<T> {}

/// A run of folios preserved across kexec with `kho_preserve_pages()`, in windows.
///
/// The run holds a reference to each of its folios, so their memory stays allocated until the
/// kexec hands it over, whatever happens to the file they are in. Dropping this object
/// unpreserves the pages and drops the references.
///
/// The run is preserved one naturally aligned window of `2^window_order` physical pages at a
/// time (the part of the run inside it), so that no KHO block crosses a window: the next kernel
/// can take back any window of the run on its own with [`RestoredPages::restore`], and never has
/// to take back more than a window at once.
///
/// # Invariants
///
/// The pages of `run` are preserved, by this object only, each window of `2^window_order` pages
/// with one `kho_preserve_pages()`; `window_order < 64`.
pub struct PreservedPages {
    run: FolioRun,
    window_order: u32,
}

/// The naturally aligned windows of `2^order` pages that the `nr_pages` pages from `pfn` cross,
/// as `(pfn, nr_pages)` of the part of the run inside each, in order.
///
/// [`PreservedPages`] preserves a run one such part at a time, so this is also how the next
/// kernel finds the pieces it can take back with [`RestoredPages::restore`].
///
/// # Examples
///
/// ```
/// use kernel::kho::windows;
///
/// // 600 pages from page frame 500, in windows of 512 pages: cut at 512 and 1024.
/// let mut pieces = windows(500, 600, 9);
/// assert_eq!(pieces.next(), Some((500, 12)));
/// assert_eq!(pieces.next(), Some((512, 512)));
/// assert_eq!(pieces.next(), Some((1024, 76)));
/// assert_eq!(pieces.next(), None);
///
/// // An aligned window is one piece; the top of the pfn space ends the last one.
/// assert_eq!(windows(1024, 512, 9).count(), 1);
/// assert_eq!(windows(u64::MAX - 4, 4, 9).count(), 1);
/// ```
pub fn windows(pfn: u64, nr_pages: u64, order: u32) -> impl Iterator<Item = (u64, u64)> {
    let end = pfn.saturating_add(nr_pages);
    let mut pfn = pfn;
    core::iter::from_fn(move || {
        if pfn >= end {
            return None;
        }
        // The start of the next window, unless that is past the top of the pfn space (or the
        // windows are larger than it).
        let next = pfn
            .checked_shr(order)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(1u64.checked_shl(order)?))
            .map_or(end, |n| n.min(end));
        let window = (pfn, next - pfn);
        pfn = next;
        Some(window)
    })
}

/// Unpreserves the pages of windows preserved by `kho_preserve_pages()`.
///
/// # Safety
///
/// Each window must have been preserved, as it is, with `kho_preserve_pages()` by the caller,
/// which gives the preservation up.
unsafe fn unpreserve_windows(windows: impl Iterator<Item = (u64, u64)>) {
    for (pfn, nr) in windows {
        // SAFETY: By the function's safety requirements.
        unsafe { bindings::kho_unpreserve_pages(bindings::pfn_to_page(pfn as usize), nr as usize) };
    }
}

impl PreservedPages {
    /// Preserves the pages of `run`, in windows of `2^window_order` pages (at most 63).
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` for an order over 63, the error of `kho_preserve_pages()` (`EINVAL` if
    /// the run overlaps KHO scratch memory, `ENOMEM`); `run` is dropped then, nothing preserved.
    pub fn new(run: FolioRun, window_order: u32) -> Result<Self> {
        if window_order >= u64::BITS {
            return Err(EINVAL);
        }
        let span = run.span();
        for (done, (pfn, nr)) in windows(span.pfn, span.nr_pages, window_order).enumerate() {
            // SAFETY: The run's folios are allocated memory we hold references to; KHO only
            // records the range.
            let r = to_result(unsafe {
                bindings::kho_preserve_pages(bindings::pfn_to_page(pfn as usize), nr as usize)
            });
            if let Err(err) = r {
                // SAFETY: The first `done` windows were preserved above, and are given up.
                unsafe {
                    unpreserve_windows(windows(span.pfn, span.nr_pages, window_order).take(done))
                };
                return Err(err);
            }
        }
        // INVARIANT: Preserved above, window by window.
        Ok(Self { run, window_order })
    }

    /// Where the preserved pages are.
    pub fn span(&self) -> Span {
        self.run.span()
    }
}

impl Drop for PreservedPages {
    fn drop(&mut self) {
        // SAFETY: The windows were preserved by `new`, by the type invariants, and this object
        // goes. The references to the folios are dropped after this, with `run`.
        unsafe {
            unpreserve_windows(windows(
                self.run.span().pfn,
                self.run.span().nr_pages,
                self.window_order,
            ))
        };
    }
}

/// A run of pages the previous kernel preserved with [`PreservedPages`], taken back from KHO.
///
/// Each page comes back as an order-0 folio with one reference, owned by this object until
/// [`RestoredPages::take`] hands it out, or [`RestoredPages::split_off`] gives it to another run;
/// dropping this object frees the pages it still owns.
///
/// # Invariants
///
/// Pages `[next, end)` are restored order-0 folios whose only reference this object owns;
/// `next <= end`. (`end` is never 0: pfn 0 is never restored, so an `Option<RestoredPages>` is no
/// larger than a `RestoredPages`.)
pub struct RestoredPages {
    next: u64,
    end: NonZeroU64,
}

impl RestoredPages {
    /// Takes back pages `[pfn, pfn + nr_pages)`.
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` for an empty run or pfn 0, or when KHO refuses a page (not preserved,
    /// already restored); nothing of the run was taken then.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::kho::RestoredPages;
    ///
    /// // Page frame 0 is never preserved, nor is an empty run, one whose end wraps around or one
    /// // whose address does not fit in 64 bits: refused before KHO is asked.
    /// assert_eq!(RestoredPages::restore(0, 1).err(), Some(EINVAL));
    /// assert_eq!(RestoredPages::restore(1, 0).err(), Some(EINVAL));
    /// assert_eq!(RestoredPages::restore(u64::MAX, 2).err(), Some(EINVAL));
    /// assert_eq!(RestoredPages::restore(1 << 52, 1).err(), Some(EINVAL));
    /// ```
    pub fn restore(pfn: u64, nr_pages: u64) -> Result<Self> {
        let end = pfn.checked_add(nr_pages).ok_or(EINVAL)?;
        let end = NonZeroU64::new(end).ok_or(EINVAL)?;
        if nr_pages == 0 || pfn == 0 {
            return Err(EINVAL);
        }
        let phys = pfn
            .checked_mul(PAGE_SIZE as u64)
            .filter(|_| end.get().checked_mul(PAGE_SIZE as u64).is_some())
            .ok_or(EINVAL)?;
        let nr = usize::try_from(nr_pages).map_err(|_| EINVAL)?;
        // SAFETY: `kho_restore_pages` claims every block of the run atomically, for this caller
        // alone, and returns NULL, with nothing taken, when one is not preserved or is held by
        // someone else.
        if unsafe { bindings::kho_restore_pages(phys, nr) }.is_null() {
            return Err(EINVAL);
        }
        // INVARIANT: Every page of the run was restored with one reference.
        Ok(Self { next: pfn, end })
    }

    /// Forgets the first `n` pages not handed out yet (at most all of them), whose references
    /// the caller handed on.
    #[cfg(CONFIG_LIVEUPDATE_GUEST_MEMFD)]
    pub(crate) fn give_up_front(&mut self, n: u64) {
        // INVARIANT: The pages left are still ours.
        self.next += n.min(self.end.get() - self.next);
    }

    /// Splits the run in two at page frame `at`: returns the pages not handed out yet from `at`
    /// on, which the returned run owns from then on, and keeps those before it. Returns `None`,
    /// and keeps every page, when none is at or after `at`.
    ///
    /// A caller that hands out pages from the middle of a run splits it around them first.
    pub fn split_off(&mut self, at: u64) -> Option<Self> {
        let at = at.max(self.next);
        if at >= self.end.get() {
            return None;
        }
        let end = self.end;
        // INVARIANT: The pages of `[next, at)` stay ours; `at >= next > 0`, since pfn 0 is never
        // restored.
        self.end = NonZeroU64::new(at)?;
        // INVARIANT: Those of `[at, end)` are the tail's, and no longer ours.
        Some(Self { next: at, end })
    }

    /// The first page frame number and the number of pages not handed out yet.
    pub fn remaining(&self) -> (u64, u64) {
        (self.next, self.end.get() - self.next)
    }

    /// Hands out the next page of the run as a folio, with its reference.
    pub fn take(&mut self) -> Option<ARef<Folio>> {
        if self.next == self.end.get() {
            return None;
        }
        // SAFETY: `next` is a restored page, by the type invariants.
        let folio = unsafe { bindings::page_folio(bindings::pfn_to_page(self.next as usize)) };
        self.next += 1;
        // SAFETY: We owned the page's only reference; it is transferred to the `ARef`.
        Some(unsafe { ARef::from_raw(NonNull::new(folio)?.cast()) })
    }
}

impl Drop for RestoredPages {
    fn drop(&mut self) {
        while let Some(folio) = self.take() {
            drop(folio);
        }
    }
}
