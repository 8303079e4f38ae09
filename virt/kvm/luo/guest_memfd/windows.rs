// SPDX-License-Identifier: GPL-2.0

//! Windows: the pieces, one per naturally aligned `2^WINDOW_ORDER` pages of physical memory, in
//! which the previous kernel preserved each extent and the next one takes it back and puts it in
//! (ABI: both kernels must cut them alike, which [`kho::windows`] does for both).

use super::{
    abi::{
        Extent,
        EXTENT_UPTODATE,
        WINDOW_ORDER, //
    },
    pace,
};
use kernel::{
    kho,
    prelude::*, //
};

/// One window of an extent: the pages of the extent inside one naturally aligned window of
/// `2^WINDOW_ORDER` physical pages, which the previous kernel preserved on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Window {
    /// Where the first page goes in the file.
    pub(super) index: u64,
    pub(super) pfn: u64,
    pub(super) nr_pages: u64,
    /// Whether the pages hold guest memory ([`EXTENT_UPTODATE`]).
    pub(super) uptodate: bool,
}

/// How many windows `nr_pages` pages from `pfn` (at least one) make, as [`windows_of`] cuts them.
pub(super) fn window_count(pfn: u64, nr_pages: u64) -> u64 {
    let last = pfn + (nr_pages - 1);
    (last >> WINDOW_ORDER) - (pfn >> WINDOW_ORDER) + 1
}

/// The windows of `extent`, in order: the pieces the previous kernel preserved it in.
pub(super) fn windows_of(extent: &Extent) -> impl Iterator<Item = Window> + '_ {
    kho::windows(extent.pfn, extent.nr_pages, WINDOW_ORDER).map(|(pfn, nr_pages)| Window {
        index: extent.index + (pfn - extent.pfn),
        pfn,
        nr_pages,
        uptodate: extent.flags & EXTENT_UPTODATE != 0,
    })
}

/// Sorts `v` by `key` in place, in `O(n log n)` time and constant stack: a heapsort. `core`'s
/// sorts recurse, with frames of over 1.5 KiB for an [`Extent`]; a quarter of a million extents
/// (a 1 GiB guest in scattered single pages) overflowed a 16 KiB kernel stack in retrieve.
pub(super) fn sort_by_key<T, K: Ord>(v: &mut [T], key: impl Fn(&T) -> K) {
    // A slice of sized elements is shorter than `isize::MAX`: `2 * node + 1` cannot overflow.
    const { assert!(core::mem::size_of::<T>() != 0) };
    let sift_down = |v: &mut [T], mut node: usize, end: usize| loop {
        let mut child = 2 * node + 1;
        if child >= end {
            break;
        }
        if child + 1 < end && key(&v[child]) < key(&v[child + 1]) {
            child += 1;
        }
        if key(&v[node]) >= key(&v[child]) {
            break;
        }
        v.swap(node, child);
        node = child;
    };
    let len = v.len();
    for node in (0..len / 2).rev() {
        sift_down(v, node, len);
    }
    for end in (1..len).rev() {
        v.swap(0, end);
        sift_down(v, 0, end);
        pace(end);
    }
}

/// Checks that no two extents (ordered by index, not overlapping in the file) share a page of
/// physical memory: one page must not go to two places in the file (KHO does not stop two
/// concurrent takers of one page). Leaves them ordered by index.
pub(super) fn check_disjoint(extents: &mut [Extent]) -> Result {
    sort_by_key(extents, |e| e.pfn);
    let overlap = extents
        .windows(2)
        .any(|pair| pair[0].pfn + pair[0].nr_pages > pair[1].pfn);
    sort_by_key(extents, |e| e.index);
    if overlap {
        pr_err!("preserved guest_memfd extents overlap in physical memory\n");
        return Err(EINVAL);
    }
    Ok(())
}

/// The windows of `windows` (ordered by index, not overlapping) that hold memory of file pages
/// `[start, end)`, as a range of positions.
pub(super) fn windows_in(windows: &[Window], start: u64, end: u64) -> core::ops::Range<usize> {
    let first = windows.partition_point(|w| w.index + w.nr_pages <= start);
    let last = first + windows[first..].partition_point(|w| w.index < end);
    first..last
}

#[kunit_tests(guest_memfd_luo_windows)]
mod tests {
    use super::*;
    use crate::{
        abi::max_windows,
        test_helpers::*, //
    };

    fn window(index: u64, pfn: u64, nr_pages: u64) -> Window {
        Window {
            index,
            pfn,
            nr_pages,
            uptodate: true,
        }
    }

    #[test]
    fn windows_stop_at_physical_boundaries() -> Result {
        // Pages 500..1100: the windows of 512 pages end at 512 and 1024.
        let mut out = KVVec::new();
        for w in windows_of(&extent(10, 500, 600, U)) {
            out.push(w, GFP_KERNEL)?;
        }
        assert_eq!(
            &out[..],
            &[
                window(10, 500, 12),
                window(22, 512, 512),
                window(534, 1024, 76)
            ]
        );
        // An aligned extent of one window, and one at the top of the pfn space.
        let aligned = extent(0, 1024, 512, U);
        let mut one = windows_of(&aligned);
        assert_eq!(one.next(), Some(window(0, 1024, 512)));
        assert_eq!(one.next(), None);
        let top = u64::MAX - 4;
        let at_top = extent(3, top, 4, 0);
        let mut last = windows_of(&at_top);
        assert_eq!(
            last.next(),
            Some(Window {
                uptodate: false,
                ..window(3, top, 4)
            })
        );
        assert_eq!(last.next(), None);
        Ok(())
    }

    #[test]
    fn sort_by_key_sorts() {
        let mut empty: [u32; 0] = [];
        sort_by_key(&mut empty, |&x| x);
        let mut one = [7u32];
        sort_by_key(&mut one, |&x| x);
        assert_eq!(one, [7]);
        let mut v = [5u32, 1, 4, 1, 5, 9, 2, 6, 5, 3];
        sort_by_key(&mut v, |&x| x);
        assert_eq!(v, [1, 1, 2, 3, 4, 5, 5, 5, 6, 9]);
        let mut reversed = [9u32, 8, 7, 6, 5, 4, 3, 2, 1, 0];
        sort_by_key(&mut reversed, |&x| x);
        assert_eq!(reversed, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        // By a key, descending.
        sort_by_key(&mut reversed, |&x| u32::MAX - x);
        assert_eq!(reversed, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn overlapping_physical_ranges_are_refused() {
        let list = [
            extent(0, 100, 10, U),
            extent(20, 110, 5, U),
            extent(30, 50, 50, U),
        ];
        let mut apart = list;
        assert_eq!(check_disjoint(&mut apart), Ok(()));
        // Left in file order.
        assert_eq!(apart, list);
        let mut overlap = [extent(0, 100, 10, U), extent(20, 95, 6, U)];
        assert_eq!(check_disjoint(&mut overlap), Err(EINVAL));
    }

    #[test]
    fn window_count_is_what_windows_of_makes() {
        let top = u64::MAX - 4;
        for (pfn, nr) in [(500, 600), (512, 512), (511, 2), (1, 1), (top - 1000, 1004)] {
            let count = windows_of(&extent(0, pfn, nr, U)).count() as u64;
            assert_eq!(window_count(pfn, nr), count);
        }
    }

    #[test]
    fn reserve_holds_the_worst_case() -> Result {
        // Two-page extents across window boundaries, two windows each, and one of the rest of
        // the file starting just before a boundary.
        let file_pages = 4096;
        let list = [
            extent(0, 511, 2, U),
            extent(2, 1023, 2, U),
            extent(4, 4095, file_pages - 4, U),
        ];
        let count = windows(&list)?.len();
        assert_eq!(count, 13);
        assert!(count <= max_windows(list.len(), file_pages));
        // Reached: two two-page extents across boundaries, four pages.
        let list = [extent(0, 511, 2, U), extent(2, 1023, 2, U)];
        assert_eq!(windows(&list)?.len(), max_windows(list.len(), 4));
        // Reached: a page per extent, a window per page, however many there are.
        let list = [
            extent(0, 100, 1, U),
            extent(1, 300, 1, U),
            extent(5, 99, 1, U),
        ];
        assert_eq!(windows(&list)?.len(), max_windows(list.len(), 3));
        assert_eq!(max_windows(1 << 30, 1 << 30), 1 << 30);
        assert_eq!(max_windows(usize::MAX, u64::MAX), usize::MAX);
        Ok(())
    }

    #[test]
    fn windows_in_finds_what_a_range_touches() {
        let list = [
            window(0, 100, 12),
            window(12, 512, 512),
            window(600, 2048, 10),
        ];
        assert_eq!(windows_in(&list, 0, 1), 0..1);
        assert_eq!(windows_in(&list, 11, 13), 0..2);
        assert_eq!(windows_in(&list, 524, 600), 2..2);
        assert_eq!(windows_in(&list, 524, 601), 2..3);
        assert_eq!(windows_in(&list, 609, 700), 2..3);
        assert_eq!(windows_in(&list, 610, u64::MAX), 3..3);
        assert_eq!(windows_in(&list, 0, u64::MAX), 0..3);
    }
}
