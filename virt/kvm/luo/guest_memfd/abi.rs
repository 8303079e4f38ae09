// SPDX-License-Identifier: GPL-2.0

//! The preserved state of a guest_memfd (ABI): a head object per file and an array of extent
//! records; how a run of folios becomes records; the checks a retrieve makes on what the previous
//! kernel left before it touches any memory. Documented in `Documentation/virt/kvm/luo.rst`.

use super::pace;
use kernel::{
    bindings,
    folio::Span,
    kho::VmallocDesc,
    kvm,
    liveupdate::compatible,
    page::PAGE_SIZE,
    prelude::*, //
};
use zerocopy::byteorder::little_endian::{
    U32,
    U64, //
};

// The ABI is `include/linux/kho/abi/kvm.h`: its constants come from there, and the structures
// below are checked against it at build time.

/// The handler's compatible string. The number is the version of the ABI below.
pub(super) const COMPATIBLE: &CStr = compatible(bindings::KVM_GMEM_LUO_COMPATIBLE);

/// The name kernels before this one gave the same layout: files preserved under it are read as
/// this version's.
pub(super) const LEGACY_COMPATIBLE: &CStr = compatible(bindings::KVM_GMEM_LUO_COMPATIBLE_LEGACY);

/// The names of the layouts before, which this kernel does not read: such files are refused one
/// by one rather than fail every open of `/dev/liveupdate`.
pub(super) const REFUSED_V1: &CStr = compatible(bindings::KVM_GMEM_LUO_COMPATIBLE_REFUSED_V1);
pub(super) const REFUSED_V2: &CStr = compatible(bindings::KVM_GMEM_LUO_COMPATIBLE_REFUSED_V2);

/// Extents are preserved in naturally aligned windows of `2^WINDOW_ORDER` physical pages (2 MiB):
/// the next kernel takes back one window at a time (ABI, since v2), and puts it in a chunk or a
/// window at a time.
pub(super) const WINDOW_ORDER: u32 = bindings::KVM_GMEM_LUO_WINDOW_ORDER;

/// File flags in the ABI, owned by it and mapped to and from the kernel's `GUEST_MEMFD_FLAG_*`.
const SER_FLAG_MMAP: u32 = bindings::KVM_GMEM_LUO_FLAG_MMAP;
const SER_FLAG_INIT_SHARED: u32 = bindings::KVM_GMEM_LUO_FLAG_INIT_SHARED;
const SER_FLAGS: [(u32, u64); 2] = [
    (SER_FLAG_MMAP, kvm::GUEST_MEMFD_FLAG_MMAP),
    (SER_FLAG_INIT_SHARED, kvm::GUEST_MEMFD_FLAG_INIT_SHARED),
];

/// Translates `bits` through `(from, to)` flag pairs; `EOPNOTSUPP` for a bit no pair covers.
fn translate_flags(bits: u64, pairs: impl Iterator<Item = (u64, u64)>) -> Result<u64> {
    let mut left = bits;
    let mut out = 0;
    for (from, to) in pairs {
        if bits & from != 0 {
            out |= to;
            left &= !from;
        }
    }
    if left != 0 {
        return Err(EOPNOTSUPP);
    }
    Ok(out)
}

/// The ABI flags for the kernel's guest_memfd `flags`; `EOPNOTSUPP` for a flag this version
/// does not carry over.
pub(super) fn flags_to_ser(flags: u64) -> Result<u32> {
    let ser = translate_flags(
        flags,
        SER_FLAGS.iter().map(|&(ser, flag)| (flag, ser.into())),
    )?;
    u32::try_from(ser).map_err(|_| EOPNOTSUPP)
}

/// The kernel's guest_memfd flags for ABI flags `ser`; `EOPNOTSUPP` for an unknown bit.
pub(super) fn flags_from_ser(ser: u32) -> Result<u64> {
    translate_flags(
        ser.into(),
        SER_FLAGS.iter().map(|&(ser, flag)| (ser.into(), flag)),
    )
}

/// Extent flag: the folios are uptodate (their contents are valid guest memory). Every extent
/// this version preserves has it.
pub(super) const EXTENT_UPTODATE: u64 = bindings::KVM_GMEM_LUO_EXTENT_UPTODATE;
const KNOWN_EXTENT_FLAGS: u64 = EXTENT_UPTODATE;

/// Bits of [`ExtentSer::pfn_flags`] that hold the flags.
const FLAG_BITS: u32 = bindings::KVM_GMEM_LUO_FLAG_BITS;

/// Bits of [`ExtentSer::index_len`] that hold the length: a record describes at most
/// `2^LEN_BITS` pages (4 GiB), and a longer extent takes several, cut where a window starts.
const LEN_BITS: u32 = bindings::KVM_GMEM_LUO_LEN_BITS;

/// The most pages a record describes.
const MAX_RECORD_PAGES: u64 = 1 << LEN_BITS;

/// The largest file carried over, in pages (64 PiB): its page indexes fit in a record.
pub(super) const MAX_FILE_PAGES: u64 = 1 << (u64::BITS - LEN_BITS);

/// The preserved head of a guest_memfd: `struct kvm_gmem_luo_ser`.
#[repr(C)]
#[derive(FromBytes, IntoBytes)]
pub(super) struct GmemSer {
    /// Size of the file in bytes.
    pub(super) size: U64,
    /// Its `GUEST_MEMFD_FLAG_*` flags.
    pub(super) flags: U32,
    /// Zero.
    pub(super) reserved: U32,
    /// Number of [`ExtentSer`] records in `extents`: at most one per page of the file.
    pub(super) nr_extents: U64,
    /// Number of pages the records describe together.
    pub(super) nr_pages: U64,
    /// Number of windows the records make together.
    pub(super) nr_windows: U64,
    /// Token of the file's VM in the same session, recorded at freeze.
    pub(super) vm_token: U64,
    /// The vmalloc'ed array of extents, ordered by index, non-overlapping.
    pub(super) extents: VmallocDesc,
}

/// One to `2^LEN_BITS` pages at file index `index`, at physical frames `pfn..`:
/// `struct kvm_gmem_luo_extent`.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes)]
pub(super) struct ExtentSer {
    /// `index << LEN_BITS | (nr_pages - 1)`.
    index_len: U64,
    /// `pfn << FLAG_BITS | flags`.
    pfn_flags: U64,
}

kernel::assert_abi_layout!(
    GmemSer,
    bindings::kvm_gmem_luo_ser,
    [size, flags, reserved, nr_extents, nr_pages, nr_windows, vm_token, extents]
);
kernel::assert_abi_layout!(
    ExtentSer,
    bindings::kvm_gmem_luo_extent,
    [index_len, pfn_flags]
);

/// An extent, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Extent {
    pub(super) index: u64,
    pub(super) pfn: u64,
    pub(super) nr_pages: u64,
    pub(super) flags: u64,
}

impl Extent {
    /// The record of this extent, which has at most [`MAX_RECORD_PAGES`] pages at an index below
    /// [`MAX_FILE_PAGES`] (the bits that do not fit are dropped).
    pub(super) fn encode(&self) -> ExtentSer {
        let len = self.nr_pages.wrapping_sub(1) & (MAX_RECORD_PAGES - 1);
        ExtentSer {
            index_len: (self.index << LEN_BITS | len).into(),
            pfn_flags: (self.pfn << FLAG_BITS | self.flags).into(),
        }
    }

    pub(super) fn decode(ser: &ExtentSer) -> Self {
        let index_len = ser.index_len.get();
        let pfn_flags = ser.pfn_flags.get();
        Self {
            index: index_len >> LEN_BITS,
            pfn: pfn_flags >> FLAG_BITS,
            nr_pages: (index_len & (MAX_RECORD_PAGES - 1)) + 1,
            flags: pfn_flags & ((1 << FLAG_BITS) - 1),
        }
    }
}

/// Cuts the pages `[pfn, end)` in pieces `[start, next(start).min(end))`, in order; `next(p)` is
/// past `p`.
fn cut(pfn: u64, end: u64, next: impl Fn(u64) -> u64) -> impl Iterator<Item = (u64, u64)> {
    let mut at = pfn;
    core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let piece = (at, next(at).min(end));
        at = piece.1;
        Some(piece)
    })
}

/// Where a record from `pfn` may end: after at most [`MAX_RECORD_PAGES`] pages, at the start of a
/// window, since the memory was preserved in whole windows and a record takes back whole ones.
fn next_record(pfn: u64) -> u64 {
    pfn.saturating_add(MAX_RECORD_PAGES) & !((1 << WINDOW_ORDER) - 1)
}

/// The records of the uptodate pages of `span`, whose indexes are below [`MAX_FILE_PAGES`].
pub(super) fn records_of(span: Span) -> impl Iterator<Item = ExtentSer> {
    cut(span.pfn, span.pfn + span.nr_pages, next_record).map(move |(pfn, end)| {
        Extent {
            index: span.index + (pfn - span.pfn),
            pfn,
            nr_pages: end - pfn,
            flags: EXTENT_UPTODATE,
        }
        .encode()
    })
}

/// What the head of a file says its records hold, checked against each other and the size of
/// the file (no more than [`MAX_FILE_PAGES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) extents: usize,
    pub(super) pages: u64,
    pub(super) windows: usize,
}

/// The counts of a head object: records are non-empty, of at most [`MAX_RECORD_PAGES`] pages,
/// and do not overlap in the file, so there are no more records than pages, no fewer than the
/// pages need, and no more pages than the file has; they make at least a window each and no more
/// than [`max_windows`] (`EINVAL`).
pub(super) fn counts(serialized: &GmemSer) -> Result<Counts> {
    let file_pages = serialized.size.get() / PAGE_SIZE as u64;
    let nr = usize::try_from(serialized.nr_extents.get()).map_err(|_| EINVAL)?;
    let pages = serialized.nr_pages.get();
    let windows = usize::try_from(serialized.nr_windows.get()).map_err(|_| EINVAL)?;
    if file_pages > MAX_FILE_PAGES
        || nr as u64 > pages
        || pages > (nr as u64).saturating_mul(MAX_RECORD_PAGES)
        || pages > file_pages
        || windows < nr
        || windows > max_windows(nr, pages)
    {
        return Err(EINVAL);
    }
    Ok(Counts {
        extents: nr,
        pages,
        windows,
    })
}

/// At most how many windows `nr_extents` valid extents of `nr_pages` pages together make: each
/// has a window per `2^WINDOW_ORDER` of its pages and at most two more for its ends, and there
/// are no more windows than pages.
pub(super) fn max_windows(nr_extents: usize, nr_pages: u64) -> usize {
    (nr_extents as u64)
        .saturating_mul(2)
        .saturating_add(nr_pages >> WINDOW_ORDER)
        .min(nr_pages)
        .try_into()
        .unwrap_or(usize::MAX)
}

/// Checks the extents the previous kernel recorded before any memory is touched: each inside
/// the file, in increasing index order without overlap, with a pfn other than 0 and known flags,
/// `nr_pages` pages together. Decodes them into `extents`, which has room for all of them.
pub(super) fn validate_extents(
    records: &[ExtentSer],
    size: u64,
    nr_pages: u64,
    extents: &mut VVec<Extent>,
) -> Result {
    let file_pages = size / PAGE_SIZE as u64;
    let mut next_index = 0;
    let mut pages: u64 = 0;
    for (step, record) in records.iter().enumerate() {
        pace(step);
        // Decoded, an extent has 1 to `MAX_RECORD_PAGES` pages at an index below
        // `MAX_FILE_PAGES`: its end does not overflow.
        let extent = Extent::decode(record);
        let end = extent.index + extent.nr_pages;
        if extent.index < next_index
            || end > file_pages
            || extent.pfn == 0
            || extent.pfn.checked_add(extent.nr_pages).is_none()
        {
            return Err(EINVAL);
        }
        if extent.flags & !KNOWN_EXTENT_FLAGS != 0 {
            return Err(EOPNOTSUPP);
        }
        next_index = end;
        pages = pages.saturating_add(extent.nr_pages);
    }
    if pages != nr_pages {
        return Err(EINVAL);
    }
    records.iter().try_for_each(|record| {
        extents
            .push_within_capacity(Extent::decode(record))
            .map_err(|_| EINVAL)
    })
}

#[kunit_tests(guest_memfd_luo_abi)]
mod tests {
    use super::*;
    use crate::{
        test_helpers::*,
        windows::windows_of, //
    };

    #[test]
    fn file_flags_map_both_ways() -> Result {
        let both = kvm::GUEST_MEMFD_FLAG_MMAP | kvm::GUEST_MEMFD_FLAG_INIT_SHARED;
        assert_eq!(flags_to_ser(both)?, SER_FLAG_MMAP | SER_FLAG_INIT_SHARED);
        assert_eq!(flags_from_ser(flags_to_ser(both)?)?, both);
        assert_eq!(flags_to_ser(1 << 40).err(), Some(EOPNOTSUPP));
        assert_eq!(flags_from_ser(1 << 7).err(), Some(EOPNOTSUPP));
        Ok(())
    }

    #[test]
    fn encoding_round_trips() {
        for e in [
            extent(7, (1 << 40) + 3, 512, U),
            extent(MAX_FILE_PAGES - 1, 1, 1, U),
            extent(0, (1 << 52) - 1, MAX_RECORD_PAGES, 0),
        ] {
            assert_eq!(Extent::decode(&e.encode()), e);
        }
        // A record is 16 bytes: a page per extent costs what a folio costs memfd.
        assert_eq!(size_of::<ExtentSer>(), 16);
        assert_eq!(size_of::<GmemSer>(), 64);
    }

    #[test]
    fn long_runs_take_a_record_per_4g_cut_at_windows() -> Result {
        // A run that starts inside a window: every record but the first starts at a window, so
        // the records' windows are the run's, each preserved whole.
        let m = MAX_RECORD_PAGES;
        let long = span(10, 1000, 2 * m + 3, 0);
        let mut out = KVVec::new();
        for record in records_of(long) {
            out.push(Extent::decode(&record), GFP_KERNEL)?;
        }
        let first = (1000 + m) / 512 * 512 - 1000;
        assert_eq!(
            &out[..],
            &[
                extent(10, 1000, first, U),
                extent(10 + first, 1000 + first, m, U),
                extent(10 + first + m, 1000 + first + m, 2 * m + 3 - first - m, U)
            ]
        );
        let mut cut = KVVec::new();
        for w in out.iter().flat_map(windows_of) {
            cut.push(w, GFP_KERNEL)?;
        }
        assert_eq!(&cut[..], &windows(&[extent(10, 1000, 2 * m + 3, U)])?[..]);
        // Short runs, and an aligned one of exactly a record.
        assert_eq!(records_of(span(0, 1, 1, 0)).count(), 1);
        assert_eq!(records_of(span(0, 512, m, 0)).count(), 1);
        assert_eq!(records_of(span(0, 511, m, 0)).count(), 2);
        Ok(())
    }

    fn head(size: u64, nr_extents: u64, nr_pages: u64, nr_windows: u64) -> GmemSer {
        GmemSer {
            size: size.into(),
            flags: 0.into(),
            reserved: 0.into(),
            nr_extents: nr_extents.into(),
            nr_pages: nr_pages.into(),
            nr_windows: nr_windows.into(),
            vm_token: 0.into(),
            extents: VmallocDesc::default(),
        }
    }

    #[test]
    fn validate_accepts_good_extents() -> Result {
        let list = records(&[extent(0, 100, 4, U), extent(8, 300, 8, 0)])?;
        assert_eq!(validate(&list, 16 * 4096, 12)?.len(), 2);
        Ok(())
    }

    fn count(extents: usize, pages: u64, windows: usize) -> Counts {
        Counts {
            extents,
            pages,
            windows,
        }
    }

    #[test]
    fn counts_follow_from_the_file_size() -> Result {
        // A 16 GiB file whose every page is an extent of its own: 4M records, past the 2^20
        // the previous version allowed.
        let pages = 1u64 << 22;
        let all = head(pages * 4096, pages, pages, pages);
        assert_eq!(counts(&all)?, count(1 << 22, pages, 1 << 22));
        assert_eq!(counts(&head(1 << 30, 3, 10, 4))?, count(3, 10, 4));
        // More records than pages, or more pages than the file has.
        assert_eq!(counts(&head(1 << 30, 11, 10, 11)).err(), Some(EINVAL));
        assert_eq!(counts(&head(4096, 1, 2, 1)).err(), Some(EINVAL));
        let huge = head(u64::MAX, u64::MAX, u64::MAX >> 12, u64::MAX);
        assert_eq!(counts(&huge).err(), Some(EINVAL));
        // Fewer records than the pages need, a file too large for the ABI.
        assert_eq!(
            counts(&head(1 << 40, 1, (1 << 20) + 1, 2)).err(),
            Some(EINVAL)
        );
        let top = MAX_FILE_PAGES * 4096;
        assert_eq!(counts(&head(top, 1, 1, 1))?, count(1, 1, 1));
        assert_eq!(counts(&head(top + 4096, 1, 1, 1)).err(), Some(EINVAL));
        // Fewer windows than records, more than they can make.
        assert_eq!(counts(&head(1 << 30, 3, 10, 2)).err(), Some(EINVAL));
        assert_eq!(counts(&head(1 << 30, 3, 10, 7)).err(), Some(EINVAL));
        assert_eq!(counts(&head(1 << 30, 3, 10, 6))?, count(3, 10, 6));
        Ok(())
    }

    #[test]
    fn validate_rejects_outside_overlapping_unordered() -> Result {
        let outside = records(&[extent(14, 100, 4, U)])?;
        assert_eq!(validate(&outside, 16 * 4096, 4).err(), Some(EINVAL));
        let overlap = records(&[extent(0, 100, 4, U), extent(3, 200, 1, U)])?;
        assert_eq!(validate(&overlap, 1 << 30, 5).err(), Some(EINVAL));
        let unordered = records(&[extent(8, 100, 1, U), extent(0, 200, 1, U)])?;
        assert_eq!(validate(&unordered, 1 << 30, 2).err(), Some(EINVAL));
        let top = records(&[extent(MAX_FILE_PAGES - 1, 100, 2, U)])?;
        assert_eq!(validate(&top, MAX_FILE_PAGES * 4096, 2).err(), Some(EINVAL));
        Ok(())
    }

    #[test]
    fn validate_rejects_pfn_zero_wrong_total_and_unknown_flags() -> Result {
        let zero = records(&[extent(0, 0, 1, U)])?;
        assert_eq!(validate(&zero, 1 << 30, 1).err(), Some(EINVAL));
        let list = records(&[extent(0, 100, 4, U), extent(8, 300, 8, U)])?;
        assert_eq!(validate(&list, 1 << 30, 13).err(), Some(EINVAL));
        assert_eq!(validate(&list, 1 << 30, 11).err(), Some(EINVAL));
        let unknown = records(&[extent(0, 100, 1, 1 << 5)])?;
        assert_eq!(validate(&unknown, 1 << 30, 1).err(), Some(EOPNOTSUPP));
        Ok(())
    }
}
