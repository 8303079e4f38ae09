// SPDX-License-Identifier: GPL-2.0

//! Live update of guest_memfd files: guest RAM that survives a kexec.
//!
//! A LUO file handler for the files `KVM_CREATE_GUEST_MEMFD` returns. Preserving a file freezes
//! it (no memory is added or removed until it is unpreserved or the kexec happens), walks its
//! page cache and records *extents*: runs of folios that are contiguous both in the file and in
//! physical memory, on one NUMA node. Each extent holds a reference to each of its folios, costs
//! 16 bytes of metadata (per 4 GiB) and is preserved in windows: its part in each naturally
//! aligned 2 MiB of physical memory is one KHO preservation. Holes cost nothing, and a file whose
//! every page is an extent of its own costs what memfd costs per page. Folios that were
//! allocated but never used are zeroed then, as their first use would, so every preserved folio
//! is uptodate: the guest and the VMM may go on writing to guest memory until the kexec, and the
//! new kernel sees exactly what the memory holds at kexec time. Folios with a hardware memory
//! error are refused. At freeze time the handler records the token of the file's VM, which must
//! be preserved in the same session.
//!
//! In the new kernel, retrieve gets the VM (through the session, so the VMM may retrieve the two
//! files in any order) and creates a guest_memfd of the same size and flags for it before it
//! takes any memory back: if either fails, the file stays retrievable and nothing is lost. Then
//! it takes the extent records back and returns the file, with its memory still preserved: each
//! window goes into the file the first time something needs memory there (a vCPU fault, a fault
//! through a mapping, `fallocate()`), or when background work items (unbound, as many as CPUs, at
//! most 16) get to it, started right after retrieve; at most 512 pages per fault, in a time that
//! does not depend on the size of the file. A punch-hole frees the pending memory in the hole.
//! LUO's finish is refused (`EBUSY`) until every window is settled: in, punched out, or lost (KHO
//! or the page cache refused it, which is logged, and said again at finish). Faults on lost memory
//! fail with `EIO`, until a punch-hole takes it out: the hole then reads zeros like any other. A
//! session closed without finish finishes at once, and the file keeps putting its memory in, or
//! frees it when it goes. The module parameter `background_restore=0` leaves it all to first use.
//! Lockdep checks a window being put in as a lock, held by whoever puts it in and waited for by
//! the others.
//!
//! Private memory is supported for software-protected VMs, whose private memory is plain memory;
//! VMs whose private memory is encrypted by hardware are refused.
//!
//! The ABI is documented in `Documentation/virt/kvm/luo.rst`.

use core::{
    convert::Infallible,
    mem::MaybeUninit, //
};
use kernel::{
    folio::{
        FolioRun,
        Span,
        SpannedFolio, //
    },
    fs::File,
    kho::{
        self,
        Preserved,
        PreservedPages,
        PreservedVec,
        Restored,
        RestoredPages,
        RestoredVec,
        VmallocDesc, //
    },
    kvm::{
        self,
        filler_of,
        memcg_has_room,
        FillerSlot,
        FrozenGuestMemfd,
        GmemFiller,
        GmemInode,
        GuestMemfd,
        GuestMemfdFile,
        Kvm, //
    },
    liveupdate::{
        retry_on_enomem,
        FileHandler,
        IncomingSession,
        Outgoing,
        OutgoingSession,
        RetrieveError,
        RetrieveStatus,
        Unconsumed,
        FINISH_TRIES, //
    },
    new_condvar, new_mutex,
    page::PAGE_SIZE,
    prelude::*,
    sync::{
        aref::ARef,
        lockdep::LockdepMap,
        static_lock_class,
        Arc,
        CondVar,
        Mutex,
        UniqueArc, //
    },
    task::cond_resched,
    workqueue::{
        self,
        impl_has_work,
        new_work,
        Work,
        WorkItem, //
    },
};
use zerocopy::byteorder::little_endian::{
    U32,
    U64, //
};

kernel::module_liveupdate_handler! {
    type: GmemHandler,
    name: "guest_memfd_luo",
    authors: ["KVM live update in Rust developers"],
    description: "Live update of KVM guest_memfd files",
    license: "GPL",
    params: {
        background_restore: bool {
            default: true,
            description: "Put retrieved guest memory back in the background, not only on first use",
        },
    },
}

/// The handler's compatible string. The number is the version of the ABI below.
const COMPATIBLE: &CStr = c"kvm-gmem-rs-v3";

/// Extents are preserved in naturally aligned windows of `2^WINDOW_ORDER` physical pages (2 MiB):
/// the next kernel takes back, and puts in, one window at a time (ABI, since v2).
const WINDOW_ORDER: u32 = 9;

/// How many times a background worker, or a preserve of a retrieved file, tries a window when
/// memory is short ([`retry_on_enomem`]: 10 ms apart).
const WORKER_TRIES: u32 = 100;

/// The most background workers a file gets.
const MAX_WORKERS: u32 = 16;

/// File flags in the ABI, owned by it and mapped to and from the kernel's `GUEST_MEMFD_FLAG_*`.
const SER_FLAG_MMAP: u32 = 1 << 0;
const SER_FLAG_INIT_SHARED: u32 = 1 << 1;
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
fn flags_to_ser(flags: u64) -> Result<u32> {
    let ser = translate_flags(
        flags,
        SER_FLAGS.iter().map(|&(ser, flag)| (flag, ser.into())),
    )?;
    u32::try_from(ser).map_err(|_| EOPNOTSUPP)
}

/// The kernel's guest_memfd flags for ABI flags `ser`; `EOPNOTSUPP` for an unknown bit.
fn flags_from_ser(ser: u32) -> Result<u64> {
    translate_flags(
        ser.into(),
        SER_FLAGS.iter().map(|&(ser, flag)| (ser.into(), flag)),
    )
}

/// Extent flag: the folios are uptodate (their contents are valid guest memory). Every extent
/// this version preserves has it.
const EXTENT_UPTODATE: u64 = 1 << 0;
const KNOWN_EXTENT_FLAGS: u64 = EXTENT_UPTODATE;

/// Bits of [`ExtentSer::pfn_flags`] that hold the flags.
const FLAG_BITS: u32 = 12;

/// Bits of [`ExtentSer::index_len`] that hold the length: a record describes at most
/// `2^LEN_BITS` pages (4 GiB), and a longer extent takes several, cut where a window starts.
const LEN_BITS: u32 = 20;

/// The most pages a record describes.
const MAX_RECORD_PAGES: u64 = 1 << LEN_BITS;

/// The largest file carried over, in pages (64 PiB): its page indexes fit in a record.
const MAX_FILE_PAGES: u64 = 1 << (u64::BITS - LEN_BITS);

/// The preserved head of a guest_memfd (ABI, little-endian, 64 bytes).
#[repr(C)]
#[derive(FromBytes, IntoBytes)]
pub struct GmemSer {
    /// Size of the file in bytes.
    size: U64,
    /// Its `GUEST_MEMFD_FLAG_*` flags.
    flags: U32,
    /// Zero.
    reserved: U32,
    /// Number of [`ExtentSer`] records in `extents`: at most one per page of the file.
    nr_extents: U64,
    /// Number of pages the records describe together.
    nr_pages: U64,
    /// Number of windows the records make together.
    nr_windows: U64,
    /// Token of the file's VM in the same session, recorded at freeze.
    vm_token: U64,
    /// The vmalloc'ed array of extents, ordered by index, non-overlapping.
    extents: VmallocDesc,
}

/// One to `2^LEN_BITS` pages at file index `index`, at physical frames `pfn..` (ABI, 16 bytes).
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes)]
pub struct ExtentSer {
    /// `index << LEN_BITS | (nr_pages - 1)`.
    index_len: U64,
    /// `pfn << FLAG_BITS | flags`.
    pfn_flags: U64,
}

/// An extent, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    index: u64,
    pfn: u64,
    nr_pages: u64,
    flags: u64,
}

impl Extent {
    /// The record of this extent, which has at most [`MAX_RECORD_PAGES`] pages at an index below
    /// [`MAX_FILE_PAGES`] (the bits that do not fit are dropped).
    fn encode(&self) -> ExtentSer {
        let len = self.nr_pages.wrapping_sub(1) & (MAX_RECORD_PAGES - 1);
        ExtentSer {
            index_len: (self.index << LEN_BITS | len).into(),
            pfn_flags: (self.pfn << FLAG_BITS | self.flags).into(),
        }
    }

    fn decode(ser: &ExtentSer) -> Self {
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
fn records_of(span: Span) -> impl Iterator<Item = ExtentSer> {
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

/// Lets other tasks run every 4096 steps of a loop over a table of extents or windows, which for
/// memory in single pages has an entry per page.
fn pace(step: usize) {
    if step % 4096 == 4095 {
        cond_resched();
    }
}

/// What the head of a file says its records hold, checked against each other and the size of
/// the file (no more than [`MAX_FILE_PAGES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    extents: usize,
    pages: u64,
    windows: usize,
}

/// The counts of a head object: records are non-empty, of at most [`MAX_RECORD_PAGES`] pages,
/// and do not overlap in the file, so there are no more records than pages, no fewer than the
/// pages need, and no more pages than the file has; they make at least a window each and no more
/// than [`max_windows`] (`EINVAL`).
fn counts(serialized: &GmemSer) -> Result<Counts> {
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

/// Checks the extents the previous kernel recorded before any memory is touched: each inside
/// the file, in increasing index order without overlap, with a pfn other than 0 and known flags,
/// `nr_pages` pages together. Decodes them into `extents`, which has room for all of them.
fn validate_extents(
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

/// Runtime state of a preserved guest_memfd.
struct GmemState {
    /// Keeps the file frozen until it is unpreserved or the kexec happens.
    _frozen: FrozenGuestMemfd,
    /// One preservation per extent, in windows.
    _pages: VVec<PreservedPages>,
    /// The extent records.
    _extents: PreservedVec<ExtentSer>,
}

/// One window of an extent: the pages of the extent inside one naturally aligned window of
/// `2^WINDOW_ORDER` physical pages, which the previous kernel preserved on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    /// Where the first page goes in the file.
    index: u64,
    pfn: u64,
    nr_pages: u64,
    /// Whether the pages hold guest memory ([`EXTENT_UPTODATE`]).
    uptodate: bool,
}

/// How many windows `nr_pages` pages from `pfn` (at least one) make, as [`windows_of`] cuts them.
fn window_count(pfn: u64, nr_pages: u64) -> u64 {
    let last = pfn + (nr_pages - 1);
    (last >> WINDOW_ORDER) - (pfn >> WINDOW_ORDER) + 1
}

/// The windows of `extent`, in order: the pieces the previous kernel preserved it in.
fn windows_of(extent: &Extent) -> impl Iterator<Item = Window> + '_ {
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
fn sort_by_key<T, K: Ord>(v: &mut [T], key: impl Fn(&T) -> K) {
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
fn check_disjoint(extents: &mut [Extent]) -> Result {
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
fn windows_in(windows: &[Window], start: u64, end: u64) -> core::ops::Range<usize> {
    let first = windows.partition_point(|w| w.index + w.nr_pages <= start);
    let last = first + windows[first..].partition_point(|w| w.index < end);
    first..last
}

/// One bit per page of a window.
type PageBits = [u64; (1 << WINDOW_ORDER) / u64::BITS as usize];

/// Whether the bit of file page `index` of `window` is set in `bits`.
fn page_bit(bits: &PageBits, window: &Window, index: u64) -> bool {
    let Some(n) = index
        .checked_sub(window.index)
        .filter(|&n| n < window.nr_pages)
    else {
        return false;
    };
    bits[(n / u64::from(u64::BITS)) as usize] & (1 << (n % u64::from(u64::BITS))) != 0
}

/// Sets the bits of the file pages of `window` in `[start, end)`.
fn set_page_bits(bits: &mut PageBits, window: &Window, start: u64, end: u64) {
    for n in start.max(window.index)..end.min(window.index + window.nr_pages) {
        let n = n - window.index;
        bits[(n / u64::from(u64::BITS)) as usize] |= 1 << (n % u64::from(u64::BITS));
    }
}

/// The first lost page of `window`, with `bits` set for those that are not, if any.
fn first_lost(bits: Option<&PageBits>, window: &Window) -> Option<u64> {
    (window.index..window.index + window.nr_pages)
        .find(|&n| !bits.is_some_and(|b| page_bit(b, window, n)))
}

/// How many pages of `window` are lost, with `bits` set for those that are not.
fn lost_pages(bits: Option<&PageBits>, window: &Window) -> u64 {
    let kept = bits.map_or(0, |bits| {
        bits.iter().map(|w| u64::from(w.count_ones())).sum()
    });
    window.nr_pages - kept
}

/// The state of `window` lost after its first `nr_in` pages were put in the file.
fn lost_after(window: &Window, nr_in: u64) -> WindowState {
    if nr_in == 0 {
        return WindowState::Lost(None);
    }
    // Without memory for the bits, the pages put in count as lost too: faults on them find them
    // in the file all the same, and only the log and finish's count are pessimistic.
    WindowState::Lost(
        KBox::new(PageBits::default(), GFP_KERNEL)
            .ok()
            .map(|mut bits| {
                set_page_bits(&mut bits, window, window.index, window.index + nr_in);
                bits
            }),
    )
}

/// Where a window's memory is.
enum WindowState {
    /// Preserved by the previous kernel, not taken back yet.
    Pending,
    /// Being put in by one thread; the others wait for it.
    Filling,
    /// Taken back, partly put in: the rest, for the next try (memory was short).
    Partial(RestoredPages),
    /// In the file.
    In,
    /// Discarded by a punch-hole: its pages were freed.
    Gone,
    /// Lost: KHO refused its pages, or the page cache refused them. Faults on it fail, but on
    /// the pages whose bit is set: put in before the rest failed, or punched out since.
    Lost(Option<KBox<PageBits>>),
}

impl WindowState {
    /// Whether nothing more will happen to the window but a punch-hole.
    fn is_settled(&self) -> bool {
        matches!(self, Self::In | Self::Gone | Self::Lost(_))
    }
}

/// How far the memory of a retrieved file is put in.
struct Progress {
    states: VVec<WindowState>,
    /// Windows not settled.
    left: usize,
    /// Lost memory was reported.
    reported: bool,
    /// The next window the background workers look at.
    cursor: usize,
    /// The last file was released: the workers stop.
    stopped: bool,
}

/// The memory of a retrieved guest_memfd not put in yet: the file's filler.
///
/// A window goes from `Pending` to `In` once, through `Filling`, claimed under the lock by
/// whoever needs it first (a fault, `fallocate()`, a background worker) and put in outside it;
/// everyone else waits for the claimer. A punch-hole claims the pending windows in the hole and
/// frees them, and puts in the windows partly in it, before the truncation. Whatever is pending
/// when the inode goes is freed with it.
#[pin_data(PinnedDrop)]
struct LazyMemory {
    windows: VVec<Window>,
    #[pin]
    progress: Mutex<Progress>,
    /// Signalled whenever a window leaves `Filling`.
    #[pin]
    settled: CondVar,
    /// Lets lockdep check a `Filling` claim as the lock it is: held by the claimer until the
    /// window settles, waited for by the others (from fault, `fallocate()` and punch-hole paths).
    #[pin]
    filling: LockdepMap,
}

/// At most how many windows `nr_extents` valid extents of `nr_pages` pages together make: each
/// has a window per `2^WINDOW_ORDER` of its pages and at most two more for its ends, and there
/// are no more windows than pages.
fn max_windows(nr_extents: usize, nr_pages: u64) -> usize {
    (nr_extents as u64)
        .saturating_mul(2)
        .saturating_add(nr_pages >> WINDOW_ORDER)
        .min(nr_pages)
        .try_into()
        .unwrap_or(usize::MAX)
}

/// The memory a [`LazyMemory`] needs, taken before the retrieve consumes the preserved records:
/// after that, a failed allocation would lose the guest's memory.
struct LazyReserve {
    windows: VVec<Window>,
    states: VVec<WindowState>,
    memory: UniqueArc<MaybeUninit<LazyMemory>>,
}

impl LazyReserve {
    /// Room for `nr_windows` windows.
    fn new(nr_windows: usize) -> Result<Self> {
        Ok(Self {
            windows: VVec::with_capacity(nr_windows, GFP_KERNEL)?,
            states: VVec::with_capacity(nr_windows, GFP_KERNEL)?,
            memory: UniqueArc::new_uninit(GFP_KERNEL)?,
        })
    }

    /// The pending memory of `extents`, valid and ordered (see [`validate_extents`]), in the
    /// reserved memory: allocates nothing.
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` if the extents do not make exactly as many windows as there is room for,
    /// or overlap in physical memory: records from the previous kernel may be hostile.
    fn build(mut self, extents: &mut [Extent]) -> Result<Arc<LazyMemory>> {
        check_disjoint(extents)?;
        let room = self.windows.capacity();
        for (step, window) in extents.iter().flat_map(windows_of).enumerate() {
            pace(step);
            self.windows
                .push_within_capacity(window)
                .map_err(|_| EINVAL)?;
        }
        if self.windows.len() != room {
            pr_err!("preserved guest_memfd extents do not make the windows the head says\n");
            return Err(EINVAL);
        }
        for _ in 0..self.windows.len() {
            self.states
                .push_within_capacity(WindowState::Pending)
                .map_err(|_| EINVAL)?;
        }
        let left = self.windows.len();
        let memory = self.memory.pin_init_with(pin_init!(LazyMemory {
            windows: self.windows,
            progress <- new_mutex!(Progress {
                states: self.states,
                left,
                reported: false,
                cursor: 0,
                stopped: false,
            }),
            settled <- new_condvar!(),
            filling <- LockdepMap::new(c"guest_memfd_luo_filling", static_lock_class!()),
        }))?;
        Ok(memory.into())
    }
}

impl LazyMemory {
    /// Marks window `i`, which the caller claimed, as `state`, and wakes those waiting for it.
    fn settle(&self, i: usize, state: WindowState) {
        let mut progress = self.progress.lock();
        if state.is_settled() {
            progress.left -= 1;
        }
        progress.states[i] = state;
        drop(progress);
        self.settled.notify_all();
    }

    /// Claims window `i` if it is pending (returns its state, `Filling` now), or waits for whoever
    /// claimed it; returns `None` when there is nothing to put in for the file page `at` (all of
    /// the window when `None`).
    ///
    /// # Errors
    ///
    /// Returns `EIO` if the memory needed is lost.
    fn claim(&self, i: usize, at: Option<u64>) -> Result<Option<WindowState>> {
        self.filling.might_wait();
        let mut progress = self.progress.lock();
        loop {
            match progress.states[i] {
                WindowState::Filling => self.settled.wait(&mut progress),
                WindowState::In | WindowState::Gone => return Ok(None),
                WindowState::Lost(ref punched) => {
                    let window = &self.windows[i];
                    return match (at, punched) {
                        (Some(index), Some(bits)) if page_bit(bits, window, index) => Ok(None),
                        _ => Err(EIO),
                    };
                }
                WindowState::Pending | WindowState::Partial(_) => {
                    let taken = core::mem::replace(&mut progress.states[i], WindowState::Filling);
                    return Ok(Some(taken));
                }
            }
        }
    }

    /// Takes file pages `[start, end)` out of window `i` if it is lost, for a punch-hole: they
    /// read as zeros from then on. A window with no page lost is `Gone`. `spare` holds the bits
    /// if the window has none yet.
    fn punch_lost(&self, i: usize, start: u64, end: u64, spare: KBox<PageBits>) {
        let window = &self.windows[i];
        let mut progress = self.progress.lock();
        // Lost is final: only a punch-hole changes it, and they are serialized by the mapping's
        // invalidate_lock.
        let WindowState::Lost(bits) = &mut progress.states[i] else {
            return;
        };
        let bits = bits.get_or_insert(spare);
        set_page_bits(bits, window, start, end);
        if lost_pages(Some(bits), window) == 0 {
            progress.states[i] = WindowState::Gone;
        }
    }

    /// Puts window `i` in if it is pending, or waits for whoever does.
    ///
    /// # Errors
    ///
    /// Returns `ENOMEM` and `EBUSY` (the file is frozen): the window stays pending, for another
    /// try; `EIO` if its memory is lost.
    fn fill_window(&self, inode: &GmemInode, i: usize, at: Option<u64>) -> Result {
        let Some(taken) = self.claim(i, at)? else {
            return Ok(());
        };
        // Until the window settles, at the end of this function.
        let _filling = self.filling.acquire();
        let window = self.windows[i];
        let mut run = match taken {
            WindowState::Partial(run) => run,
            _ => match RestoredPages::restore(window.pfn, window.nr_pages) {
                Ok(run) => run,
                Err(err) => {
                    pr_err!(
                        "guest memory at index {} was not preserved: {:?}\n",
                        window.index,
                        err
                    );
                    self.settle(i, WindowState::Lost(None));
                    return Err(EIO);
                }
            },
        };
        let (next, _) = run.remaining();
        match inode.fill_pages(
            &mut run,
            window.index + (next - window.pfn),
            window.uptodate,
        ) {
            Ok(()) => {
                self.settle(i, WindowState::In);
                Ok(())
            }
            // Memory is short, or the file is frozen (which preserve does only once every
            // window is in): the rest stays for the next try.
            Err(err) if err == ENOMEM || err == EBUSY => {
                self.settle(i, WindowState::Partial(run));
                Err(err)
            }
            Err(err) => {
                let (next, _) = run.remaining();
                pr_err!(
                    "could not put back guest memory at index {}: {:?}\n",
                    window.index + (next - window.pfn),
                    err
                );
                // The pages not put in are freed with `run`.
                self.settle(i, lost_after(&window, next - window.pfn));
                Err(EIO)
            }
        }
    }

    /// Puts in every window still pending, trying each a few times when memory is short.
    ///
    /// # Errors
    ///
    /// Returns `EIO` if memory was lost (the other windows are put in all the same), `ENOMEM`.
    fn fill_all(&self, inode: &GmemInode) -> Result {
        let mut result = Ok(());
        for i in 0..self.windows.len() {
            match retry_on_enomem(WORKER_TRIES, || self.fill_window(inode, i, None)) {
                Ok(()) => (),
                Err(EIO) => result = Err(EIO),
                Err(err) => return Err(err),
            }
        }
        result
    }

    /// Frees the memory of window `i`, which the caller claimed and took out of `Pending`.
    fn free_window(&self, i: usize) {
        let window = self.windows[i];
        if let Err(err) = RestoredPages::restore(window.pfn, window.nr_pages) {
            pr_warn!(
                "could not free guest memory at index {}: {:?}\n",
                window.index,
                err
            );
        }
    }

    /// Whether every window is settled: nothing more will come in. Says once how much memory was
    /// lost, if any: finish does not wait for it, since nothing would bring it back, and the VMM
    /// learns of it from faults there (`EIO`) and from the log.
    fn is_done(&self) -> bool {
        let mut progress = self.progress.lock();
        if progress.left != 0 {
            return false;
        }
        if !progress.reported {
            progress.reported = true;
            let mut lost = progress
                .states
                .iter()
                .zip(self.windows.iter())
                .filter_map(|(state, window)| match state {
                    WindowState::Lost(bits) => Some((bits.as_deref(), window)),
                    _ => None,
                })
                .filter(|&(bits, window)| lost_pages(bits, window) != 0);
            if let Some((bits, window)) = lost.next() {
                let first = first_lost(bits, window).unwrap_or(window.index);
                let total = lost.fold(lost_pages(bits, window), |total, (bits, window)| {
                    total + lost_pages(bits, window)
                });
                pr_err!(
                    "{} pages of guest memory were lost, the first at page {} of the file\n",
                    total,
                    first
                );
            }
        }
        true
    }

    /// Background work: puts in pending windows from the shared cursor on, until none is left
    /// or the file is gone.
    fn restore_in_background(&self, inode: &GmemInode) {
        loop {
            let mut progress = self.progress.lock();
            if progress.stopped {
                return;
            }
            // From the shared cursor; at the end, once more from the start, for windows a fault
            // left partly in when memory was short.
            let unclaimed =
                |s: &WindowState| matches!(s, WindowState::Pending | WindowState::Partial(_));
            let start = progress.cursor;
            let Some(i) = progress.states[start..]
                .iter()
                .position(unclaimed)
                .map(|i| start + i)
                .or_else(|| progress.states.iter().position(unclaimed))
            else {
                return;
            };
            progress.cursor = i + 1;
            drop(progress);
            match retry_on_enomem(WORKER_TRIES, || self.fill_window(inode, i, None)) {
                // Frozen: nothing goes in until it is not.
                Err(EBUSY) => return,
                Err(ENOMEM) => {
                    pr_warn!("memory is short: guest memory is put back on first use only\n");
                    return;
                }
                _ => (),
            }
        }
    }
}

#[pinned_drop]
impl PinnedDrop for LazyMemory {
    fn drop(self: Pin<&mut Self>) {
        // Nothing else is left to claim a window: free what is still preserved. Partly put in
        // windows free their pages with their state.
        let states = core::mem::take(&mut self.progress.lock().states);
        for (i, state) in states.iter().enumerate() {
            if matches!(state, WindowState::Pending) {
                self.free_window(i);
                cond_resched();
            } else {
                pace(i);
            }
        }
    }
}

impl GmemFiller for LazyMemory {
    fn fill(&self, inode: &GmemInode, index: u64) -> Result {
        match windows_in(&self.windows, index, index.saturating_add(1)) {
            range if range.is_empty() => Ok(()),
            range => self.fill_window(inode, range.start, Some(index)),
        }
    }

    fn discard(&self, inode: &GmemInode, start: u64, end: u64) -> Result {
        let range = windows_in(&self.windows, start, end);
        let inside = |w: &Window| w.index >= start && w.index + w.nr_pages <= end;
        // Windows partly in the hole go in first: the truncation that follows takes the part in
        // the hole, and keeps the rest. Lost memory stays lost, but for the pages in the hole.
        // At most the first and the last window are partly in the hole.
        let mut lost = [None, None];
        for i in range.clone() {
            if !inside(&self.windows[i]) {
                match self.fill_window(inode, i, None) {
                    Ok(()) => (),
                    Err(EIO) => {
                        let edge = usize::from(i != range.start);
                        lost[edge] = Some((i, KBox::new(PageBits::default(), GFP_KERNEL)?));
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        // Nothing below fails: a punch-hole that fails changes nothing.
        for (i, spare) in lost.into_iter().flatten() {
            self.punch_lost(i, start, end, spare);
        }
        for i in range {
            if !inside(&self.windows[i]) {
                continue;
            }
            self.filling.might_wait();
            let mut progress = self.progress.lock();
            let taken = loop {
                match progress.states[i] {
                    WindowState::Filling => self.settled.wait(&mut progress),
                    _ => break core::mem::replace(&mut progress.states[i], WindowState::Gone),
                }
            };
            if !taken.is_settled() {
                progress.left -= 1;
            }
            drop(progress);
            // In: the truncation frees the pages. Partial: dropping `taken` frees the rest.
            if matches!(taken, WindowState::Pending) {
                self.free_window(i);
            }
        }
        Ok(())
    }

    fn stop(&self) {
        self.progress.lock().stopped = true;
    }
}

/// A background worker putting in the memory of a retrieved file; it holds the inode until it is
/// done.
#[pin_data]
struct Worker {
    memory: Arc<LazyMemory>,
    inode: ARef<GmemInode>,
    #[pin]
    work: Work<Worker>,
}

impl_has_work! {
    impl HasWork<Self> for Worker { self.work }
}

impl WorkItem for Worker {
    type Pointer = Arc<Worker>;

    fn run(this: Arc<Worker>) {
        this.memory.restore_in_background(&this.inode);
    }
}

/// Memory for the background workers of a retrieved file, taken before the retrieve consumes
/// the preserved records: without a worker, finish would wait for the VMM to touch every page.
struct WorkerSlots(KVVec<UniqueArc<MaybeUninit<Worker>>>);

impl WorkerSlots {
    /// Room for one worker per CPU (at most [`MAX_WORKERS`]), or none without background restore.
    fn new() -> Result<Self> {
        let nr = if module_parameters::background_restore.value() {
            kernel::cpu::nr_cpu_ids().min(MAX_WORKERS) as usize
        } else {
            0
        };
        let mut slots = KVVec::with_capacity(nr, GFP_KERNEL)?;
        for _ in 0..nr {
            slots
                .push_within_capacity(UniqueArc::new_uninit(GFP_KERNEL)?)
                .map_err(|_| ENOMEM)?;
        }
        Ok(Self(slots))
    }

    /// Starts the workers, no more than `memory` has windows.
    fn start(self, memory: &Arc<LazyMemory>, inode: &ARef<GmemInode>) {
        for slot in self.0.into_iter().take(memory.windows.len()) {
            let worker = slot.pin_init_with(pin_init!(Worker {
                memory: memory.clone(),
                inode: inode.clone(),
                work <- new_work!("guest_memfd_luo::Worker"),
            }));
            match worker {
                Ok(worker) => {
                    let _ = workqueue::system_dfl().enqueue(Arc::from(worker));
                }
                Err(err) => match err {},
            }
        }
    }
}

struct GmemHandler;

fn check_vm(gmem: &GuestMemfd<'_>) -> Result {
    if gmem.kvm.is_dead() {
        pr_err!("refusing to preserve the guest_memfd of a dead or bugged VM\n");
        return Err(EIO);
    }
    if !gmem.kvm.has_plain_memory() {
        pr_err!("refusing to preserve guest_memfd of a VM with encrypted memory\n");
        return Err(EOPNOTSUPP);
    }
    flags_to_ser(gmem.flags).map(|_| ())
}

/// Collects the folios of a frozen file into runs, each holding references to its folios.
fn collect_runs(frozen: &FrozenGuestMemfd) -> Result<VVec<FolioRun>> {
    let mut runs: VVec<FolioRun> = VVec::new();
    let mut step = 0;
    frozen
        .for_each_folio(|folio: SpannedFolio| {
            pace(step);
            step += 1;
            let folio = match runs.last_mut() {
                Some(last) => match last.try_append(folio) {
                    Ok(()) => return Ok(()),
                    Err(folio) => folio,
                },
                None => folio,
            };
            runs.push(FolioRun::new(folio), GFP_KERNEL)?;
            Ok(())
        })
        .inspect_err(|err| {
            if *err == EHWPOISON {
                pr_err!("refusing to preserve guest memory with a hardware error\n");
            }
        })?;
    Ok(runs)
}

/// The preserved memory of a file and its records.
struct PreservedMemory {
    /// One preservation per run, in windows.
    pages: VVec<PreservedPages>,
    records: PreservedVec<ExtentSer>,
    nr_pages: u64,
    /// How many windows the records make.
    nr_windows: u64,
}

/// Preserves the folios of a frozen file, an extent per run, and records the extents.
fn preserve_memory(frozen: &FrozenGuestMemfd) -> Result<PreservedMemory> {
    let runs = collect_runs(frozen)?;
    let nr = runs
        .iter()
        .map(|run| records_of(run.span()).count())
        .sum::<usize>();
    let mut pages = VVec::with_capacity(runs.len(), GFP_KERNEL)?;
    let mut records = VVec::with_capacity(nr, GFP_KERNEL)?;
    let (mut nr_pages, mut nr_windows) = (0, 0);
    for (step, run) in runs.into_iter().enumerate() {
        pace(step);
        for record in records_of(run.span()) {
            // The new kernel cuts the windows of each record, as this does.
            let extent = Extent::decode(&record);
            nr_pages += extent.nr_pages;
            nr_windows += window_count(extent.pfn, extent.nr_pages);
            records.push(record, GFP_KERNEL)?;
        }
        pages.push(PreservedPages::new(run, WINDOW_ORDER)?, GFP_KERNEL)?;
    }
    Ok(PreservedMemory {
        pages,
        records: PreservedVec::new(records)?,
        nr_pages,
        nr_windows,
    })
}

/// Takes back and validates the extent records into `extents`, which has room for all of them;
/// once they are taken back, the preserved state is consumed (not on `ENOMEM`). When the records
/// are inconsistent, what can be of their memory is freed ([`free_extents`]).
fn restore_extents(serialized: &mut Restored<GmemSer>, extents: &mut VVec<Extent>) -> Result {
    let Counts {
        extents: nr, pages, ..
    } = counts(serialized)?;
    let size = serialized.size.get();
    let records: RestoredVec<ExtentSer> = RestoredVec::restore(&mut serialized.extents, nr)?;
    validate_extents(&records, size, pages, extents).inspect_err(|err| {
        decode_into(&records, extents);
        let kept = free_extents(extents, size, free_pages);
        pr_err!(
            "preserved guest_memfd extents are inconsistent ({:?}): {} of {} records not freed\n",
            err,
            kept,
            nr
        );
    })
}

/// Frees the memory of extents that will not be restored into a file ([`free_extents`]).
/// Allocates room for the extents, and what KHO needs to map the records.
fn release_extents(serialized: &mut Restored<GmemSer>) -> Result {
    // The head's counts and the records' own consistency do not matter here, only that the
    // records can be found.
    let nr = usize::try_from(serialized.nr_extents.get()).map_err(|_| EINVAL)?;
    if !serialized.extents.fits::<ExtentSer>(nr) {
        return Err(EINVAL);
    }
    let mut extents = VVec::with_capacity(nr, GFP_KERNEL)?;
    let records: RestoredVec<ExtentSer> = RestoredVec::restore(&mut serialized.extents, nr)?;
    decode_into(&records, &mut extents);
    let kept = free_extents(&mut extents, serialized.size.get(), free_pages);
    if kept != 0 {
        pr_warn!(
            "{} of {} extent records of an unretrieved guest_memfd not freed\n",
            kept,
            nr
        );
    }
    Ok(())
}

/// Decodes `records` into `extents`, which has room for all of them.
fn decode_into(records: &[ExtentSer], extents: &mut VVec<Extent>) {
    extents.clear();
    for record in records {
        // Cannot fail: there is room.
        let _ = extents.push_within_capacity(Extent::decode(record));
    }
}

/// Takes back pages `[pfn, pfn + nr_pages)` from KHO and frees them.
fn free_pages(pfn: u64, nr_pages: u64) -> Result {
    RestoredPages::restore(pfn, nr_pages).map(drop)
}

/// Frees, with `free`, window by window as they were preserved, the memory of every extent that
/// is well-formed on its own (inside a file of `size` bytes, at a pfn other than 0) and shares no
/// page with another, whatever else holds: an extent the file cannot use (out of order, with
/// flags this kernel does not know, not adding up to the head's counts) still names memory the
/// previous kernel preserved for the file. Of two extents that share memory, nothing says which
/// names the file's: neither is freed. KHO refuses what it did not preserve. Leaves `extents`
/// ordered by pfn. Returns how many extents were not freed whole: their memory, or the part KHO
/// refused, stays reserved until the next reboot.
fn free_extents(
    extents: &mut [Extent],
    size: u64,
    mut free: impl FnMut(u64, u64) -> Result,
) -> usize {
    let file_pages = size / PAGE_SIZE as u64;
    sort_by_key(extents, |e| e.pfn);
    let mut kept = 0;
    // The end of the extents before the current one that ends last.
    let mut end_before = 0;
    for (i, extent) in extents.iter().enumerate() {
        pace(i);
        // Decoded extents neither overflow their file index nor their pfn.
        let end = extent.pfn + extent.nr_pages;
        let shared = end_before > extent.pfn || extents.get(i + 1).is_some_and(|n| end > n.pfn);
        end_before = end_before.max(end);
        let whole = !shared
            && extent.pfn != 0
            && extent.index + extent.nr_pages <= file_pages
            // Every window, even after one KHO refused.
            && windows_of(extent)
                .filter(|w| {
                    cond_resched();
                    free(w.pfn, w.nr_pages).is_err()
                })
                .count()
                == 0;
        if !whole {
            kept += 1;
        }
    }
    kept
}

/// What retrieve needs before it takes any memory back.
struct Prepared {
    gmem: GuestMemfdFile,
    extents: VVec<Extent>,
    reserve: LazyReserve,
    slot: FillerSlot<LazyMemory>,
    workers: WorkerSlots,
}

/// Everything of a retrieve that can fail for an ordinary reason: the VM, the new file, memory
/// for the extents, the windows, the filler and the workers. Nothing of the preserved state is
/// consumed.
fn prepare_retrieve(serialized: &GmemSer, session: &IncomingSession<'_>) -> Result<Prepared> {
    let counts = counts(serialized)?;
    // Before anything is allocated for them.
    if !serialized.extents.fits::<ExtentSer>(counts.extents) {
        return Err(EINVAL);
    }
    let flags = flags_from_ser(serialized.flags.get())?;
    if serialized.reserved.get() != 0 {
        return Err(EOPNOTSUPP);
    }
    // What the file takes back late is charged to the caller's memory cgroup: one without room
    // for it would lose it (the file goes with its VMM when the charges fail).
    if !memcg_has_room(counts.pages) {
        pr_err!(
            "no room for {} MiB of guest memory in the memory cgroup of the retrieving task\n",
            counts.pages >> (20 - kernel::page::PAGE_SHIFT)
        );
        return Err(ENOMEM);
    }
    let vm_file = session.file(serialized.vm_token.get())?;
    let kvm = Kvm::from_file(&vm_file).ok_or(EINVAL)?;
    let size = serialized.size.get();
    Ok(Prepared {
        gmem: GuestMemfdFile::create(kvm, size, flags)?,
        extents: VVec::with_capacity(counts.extents, GFP_KERNEL)?,
        reserve: LazyReserve::new(counts.windows)?,
        slot: FillerSlot::new()?,
        workers: WorkerSlots::new()?,
    })
}

#[vtable]
impl FileHandler for GmemHandler {
    const COMPATIBLE: &'static CStr = COMPATIBLE;
    type Serialized = GmemSer;
    type State = GmemState;
    /// Everything that can fail for an ordinary reason comes before the records are taken back.
    type Partial = Infallible;

    fn can_preserve(file: &File) -> bool {
        GuestMemfd::of(file).is_some()
    }

    fn preserve(file: &File, _session: &OutgoingSession<'_>) -> Result<Outgoing<Self>> {
        let gmem = GuestMemfd::of(file).ok_or(EBADF)?;
        check_vm(&gmem)?;
        if gmem.size / PAGE_SIZE as u64 > MAX_FILE_PAGES {
            pr_err!("refusing to preserve a guest_memfd of more than {MAX_FILE_PAGES} pages\n");
            return Err(EFBIG);
        }
        // A file retrieved in this kernel may still have memory to put in: all of it must be in
        // the page cache before it is frozen and walked.
        if let Some((memory, inode)) = filler_of::<LazyMemory>(file) {
            memory.fill_all(&inode)?;
        }
        let frozen = FrozenGuestMemfd::freeze(file)?;
        let PreservedMemory {
            pages,
            records: extents,
            nr_pages,
            nr_windows,
        } = preserve_memory(&frozen)?;
        pr_info!(
            "preserving {} pages in {} extents, {} bytes of metadata\n",
            nr_pages,
            extents.len(),
            size_of::<GmemSer>() + extents.len() * size_of::<ExtentSer>()
        );
        let serialized = Preserved::new(GmemSer {
            size: gmem.size.into(),
            flags: flags_to_ser(gmem.flags)?.into(),
            reserved: 0.into(),
            nr_extents: (extents.len() as u64).into(),
            nr_pages: nr_pages.into(),
            nr_windows: nr_windows.into(),
            vm_token: 0.into(),
            extents: extents.desc(),
        })?;
        Ok(Outgoing::new(
            serialized,
            GmemState {
                _frozen: frozen,
                _pages: pages,
                _extents: extents,
            },
        ))
    }

    fn freeze(file: &File, outgoing: &mut Outgoing<Self>, session: &OutgoingSession<'_>) -> Result {
        let gmem = GuestMemfd::of(file).ok_or(EBADF)?;
        let vm_file = gmem.kvm.file().ok_or(ENOENT)?;
        let token = session.token_of(&vm_file).inspect_err(|_| {
            pr_err!("a guest_memfd is preserved without its VM in the same session\n");
        })?;
        outgoing.vm_token = token.into();
        Ok(())
    }

    fn retrieve(
        mut serialized: Restored<GmemSer>,
        _partial: Option<Infallible>,
        session: &IncomingSession<'_>,
    ) -> Result<ARef<File>, RetrieveError<Self>> {
        let Prepared {
            gmem,
            mut extents,
            reserve,
            slot,
            workers,
        } = match prepare_retrieve(&serialized, session) {
            Ok(prepared) => prepared,
            Err(err) => return Err(RetrieveError::retry(err, serialized)),
        };

        // Taking the records back consumes the preserved state, unless KHO could not allocate
        // what it needs to map them: then nothing is lost either.
        match restore_extents(&mut serialized, &mut extents) {
            Ok(()) => (),
            Err(ENOMEM) => return Err(RetrieveError::retry(ENOMEM, serialized)),
            Err(err) => return Err(err.into()),
        }
        // From here on the preserved state is consumed, and nothing needs memory. The memory goes
        // in on first use or in the background. Only hostile records fail, and what can be of
        // their memory is freed, by `free_extents` or with `memory`.
        let size = serialized.size.get();
        let memory = reserve.build(&mut extents).inspect_err(|_| {
            let kept = free_extents(&mut extents, size, free_pages);
            pr_err!(
                "{} of {} preserved guest_memfd extents not freed\n",
                kept,
                extents.len()
            );
        })?;
        gmem.set_filler(slot, memory.clone())?;
        workers.start(&memory, &gmem.inode());
        Ok(gmem.into_file())
    }

    fn can_finish(file: Option<&File>, _status: RetrieveStatus, releasing: bool) -> bool {
        // Finish means all memory is settled: not before every window is. When the session is
        // released, a refusal would keep it and the file until reboot; the pending memory
        // belongs to the file, which puts it in as it is used, or frees it when it goes.
        if releasing {
            return true;
        }
        match file.and_then(filler_of::<LazyMemory>) {
            Some((memory, _)) => memory.is_done(),
            None => true,
        }
    }

    fn finish(_status: RetrieveStatus, unretrieved: Option<Unconsumed<Self>>) {
        if let Some(Unconsumed { mut serialized, .. }) = unretrieved {
            if let Err(err) = retry_on_enomem(FINISH_TRIES, || release_extents(&mut serialized)) {
                pr_warn!(
                    "could not free the memory of an unretrieved guest_memfd: {:?}\n",
                    err
                );
            }
        }
    }
}

#[kunit_tests(guest_memfd_luo)]
mod tests {
    use super::*;

    fn extent(index: u64, pfn: u64, nr_pages: u64, flags: u64) -> Extent {
        Extent {
            index,
            pfn,
            nr_pages,
            flags,
        }
    }

    fn span(index: u64, pfn: u64, nr_pages: u64, nid: i32) -> Span {
        Span {
            index,
            pfn,
            nr_pages,
            nid,
        }
    }

    /// Merges spans the way `collect_runs` merges folios into runs.
    fn merge(spans: &[Span]) -> Result<KVVec<Span>> {
        let mut out: KVVec<Span> = KVVec::new();
        for next in spans {
            if let Some(last) = out.last_mut() {
                if last.continues_with(next) {
                    last.nr_pages += next.nr_pages;
                    continue;
                }
            }
            out.push(*next, GFP_KERNEL)?;
        }
        Ok(out)
    }

    fn records(list: &[Extent]) -> Result<KVVec<ExtentSer>> {
        let mut out = KVVec::new();
        for e in list {
            out.push(e.encode(), GFP_KERNEL)?;
        }
        Ok(out)
    }

    const U: u64 = EXTENT_UPTODATE;

    #[test]
    fn contiguous_folios_make_one_extent() -> Result {
        let out = merge(&[span(0, 100, 1, 0), span(1, 101, 1, 0), span(2, 102, 2, 0)])?;
        assert_eq!(&out[..], &[span(0, 100, 4, 0)]);
        Ok(())
    }

    #[test]
    fn breaks_split_extents() -> Result {
        // A hole in the file, a jump in physical memory, a NUMA node boundary.
        let out = merge(&[
            span(0, 100, 1, 0),
            span(2, 102, 1, 0),
            span(3, 200, 1, 0),
            span(4, 201, 1, 1),
            span(5, 202, 1, 1),
        ])?;
        assert_eq!(
            &out[..],
            &[
                span(0, 100, 1, 0),
                span(2, 102, 1, 0),
                span(3, 200, 1, 0),
                span(4, 201, 2, 1)
            ]
        );
        Ok(())
    }

    #[test]
    fn spans_do_not_wrap() {
        assert!(!span(0, u64::MAX, 1, 0).continues_with(&span(1, 0, 1, 0)));
        assert!(!span(u64::MAX, 5, 1, 0).continues_with(&span(0, 6, 1, 0)));
    }

    #[test]
    fn file_flags_map_both_ways() -> Result {
        let both = kvm::GUEST_MEMFD_FLAG_MMAP | kvm::GUEST_MEMFD_FLAG_INIT_SHARED;
        assert_eq!(flags_to_ser(both)?, SER_FLAG_MMAP | SER_FLAG_INIT_SHARED);
        assert_eq!(flags_from_ser(flags_to_ser(both)?)?, both);
        assert_eq!(flags_to_ser(1 << 40).err(), Some(EOPNOTSUPP));
        assert_eq!(flags_from_ser(1 << 7).err(), Some(EOPNOTSUPP));
        Ok(())
    }

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

    fn windows(list: &[Extent]) -> Result<KVVec<Window>> {
        let mut out = KVVec::new();
        for w in list.iter().flat_map(windows_of) {
            out.push(w, GFP_KERNEL)?;
        }
        Ok(out)
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

    /// A file in single pages scattered over physical memory: a quarter of a million extents,
    /// sorted by pfn and back by index on a kernel stack (the first sort `core` offers recurses
    /// with frames of over 1.5 KiB, 16 KiB of stack were not enough on a release kernel).
    #[test]
    fn many_scattered_extents_sort_on_a_kernel_stack() -> Result {
        const N: u64 = 1 << 18;
        let mut extents = VVec::with_capacity(N as usize, GFP_KERNEL)?;
        for index in 0..N {
            // An odd multiplier permutes the pfns modulo N.
            let pfn = (index * 40503 % N) * 2 + 1;
            extents.push(extent(index, pfn, 1, U), GFP_KERNEL)?;
        }
        assert_eq!(check_disjoint(&mut extents), Ok(()));
        assert!(extents.iter().enumerate().all(|(i, e)| e.index == i as u64));
        assert_eq!(
            free_extents(&mut extents, N * PAGE_SIZE as u64, |_, _| Ok(())),
            0
        );
        assert!(extents.windows(2).all(|pair| pair[0].pfn < pair[1].pfn));
        Ok(())
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
        // What luo.rst says a window costs until it is in.
        assert!(size_of::<Window>() + size_of::<WindowState>() <= 56);
        Ok(())
    }

    #[test]
    fn reserve_refuses_more_windows_or_overlaps() -> Result {
        // These make 4 windows: room for 3 or 5 is refused, room for 4 is filled.
        let mut four = [extent(0, 1000, 1100, U)];
        assert_eq!(LazyReserve::new(3)?.build(&mut four).err(), Some(EINVAL));
        assert_eq!(LazyReserve::new(5)?.build(&mut four).err(), Some(EINVAL));
        assert_eq!(LazyReserve::new(4)?.build(&mut four)?.windows.len(), 4);
        let reserve = LazyReserve::new(2)?;
        let mut overlap = [extent(0, 100, 10, U), extent(20, 95, 6, U)];
        assert_eq!(reserve.build(&mut overlap).err(), Some(EINVAL));
        Ok(())
    }

    /// A lost window (KHO or the page cache refused its memory) fails faults with `EIO`, but
    /// not on the pages a punch-hole took out since, which read as zeros then, nor on those put
    /// in before the rest failed; finish does not wait for lost memory, which does not come back.
    #[test]
    fn punched_pages_of_a_lost_window_read_as_zeros() -> Result {
        let mut list = [
            extent(0, 0x1000, 512, EXTENT_UPTODATE),
            extent(512, 0x3000, 8, EXTENT_UPTODATE),
        ];
        let memory = LazyReserve::new(2)?.build(&mut list)?;
        let spare = || KBox::new(PageBits::default(), GFP_KERNEL);
        let lost = |memory: &LazyMemory| match &memory.progress.lock().states[0] {
            WindowState::Lost(bits) => lost_pages(bits.as_deref(), &memory.windows[0]),
            _ => 0,
        };
        memory.settle(0, WindowState::Lost(None));
        assert!(!memory.is_done());
        memory.settle(1, WindowState::In);
        assert!(memory.is_done());
        assert_eq!(lost(&memory), 512);
        assert_eq!(memory.claim(0, Some(100)).err(), Some(EIO));
        assert_eq!(first_lost(None, &memory.windows[0]), Some(0));
        memory.punch_lost(0, 0, 2, spare()?);
        memory.punch_lost(0, 64, 128, spare()?);
        assert_eq!(lost(&memory), 446);
        {
            let progress = memory.progress.lock();
            // A window partly punched is still lost.
            let WindowState::Lost(bits) = &progress.states[0] else {
                return Err(EINVAL);
            };
            assert_eq!(first_lost(bits.as_deref(), &memory.windows[0]), Some(2));
        }
        assert!(memory.claim(0, Some(100))?.is_none());
        assert!(memory.claim(0, Some(64))?.is_none());
        assert!(memory.claim(0, Some(127))?.is_none());
        assert_eq!(memory.claim(0, Some(63)).err(), Some(EIO));
        assert_eq!(memory.claim(0, Some(128)).err(), Some(EIO));
        assert_eq!(memory.claim(0, None).err(), Some(EIO));
        // A hole over the window's end and the next window's start.
        memory.punch_lost(0, 0, 64, spare()?);
        memory.punch_lost(0, 128, 1000, spare()?);
        assert!(matches!(
            memory.progress.lock().states[0],
            WindowState::Gone
        ));
        assert!(memory.claim(0, None)?.is_none());
        assert_eq!(lost(&memory), 0);

        // Lost after 3 pages went in: those are not lost.
        let state = lost_after(&memory.windows[1], 3);
        memory.progress.lock().states[1] = state;
        assert!(memory.claim(1, Some(512 + 2))?.is_none());
        assert_eq!(memory.claim(1, Some(512 + 3)).err(), Some(EIO));
        memory.punch_lost(1, 515, 520, spare()?);
        assert!(memory.claim(1, None)?.is_none());
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

    fn validate(list: &[ExtentSer], size: u64, nr_pages: u64) -> Result<VVec<Extent>> {
        let mut out = VVec::with_capacity(list.len(), GFP_KERNEL)?;
        validate_extents(list, size, nr_pages, &mut out)?;
        Ok(out)
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
    fn what_can_be_of_bad_records_is_freed() -> Result {
        // Inconsistent as a whole (out of order, an unknown flag, twice the same memory, pfn 0,
        // outside the file): what is well-formed on its own and shares no memory is freed, by
        // window, and only that.
        let list = records(&[
            extent(8, 100, 4, U),
            extent(0, 200, 2, U | 1 << 7),
            extent(20, 102, 4, U),
            extent(30, 0, 1, U),
            extent(40, 300, 3, U),
            extent(50, 510, 4, U),
            extent(1 << 20, 600, 1, U),
        ])?;
        assert!(validate(&list, 1 << 30, 19).is_err());
        let mut extents = VVec::with_capacity(list.len(), GFP_KERNEL)?;
        decode_into(&list, &mut extents);
        let mut freed = KVVec::new();
        let kept = free_extents(&mut extents, 1 << 30, |pfn, nr| {
            freed.push((pfn, nr), GFP_KERNEL)?;
            // KHO refuses a window, which the others of the extent do not stop.
            if pfn == 512 {
                return Err(EINVAL);
            }
            Ok(())
        });
        assert_eq!(&freed[..], &[(200, 2), (300, 3), (510, 2), (512, 2)]);
        // The two sharing memory, pfn 0, outside, the one KHO refused part of.
        assert_eq!(kept, 5);
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
