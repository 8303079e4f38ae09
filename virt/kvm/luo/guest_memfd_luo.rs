// SPDX-License-Identifier: GPL-2.0

//! Live update of guest_memfd files: guest RAM that survives a kexec.
//!
//! A LUO file handler for the files `KVM_CREATE_GUEST_MEMFD` returns. Preserving a file freezes
//! it (no memory is added or removed until it is unpreserved or the kexec happens), walks its
//! page cache and records *extents*: runs of folios that are contiguous both in the file and in
//! physical memory, on one NUMA node. Each extent holds a reference to each of its folios, costs
//! 24 bytes of metadata and is preserved in windows: its part in each naturally aligned 2 MiB of
//! physical memory is one KHO preservation. Holes cost nothing. Folios that were
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
//! LUO's finish is refused (`EBUSY`) until every window is settled: in, punched out, or lost
//! (KHO or the page cache refused it, which is logged and makes faults there fail with `EIO`);
//! a session closed without finish finishes at once, and the file keeps putting its memory in,
//! or frees it when it goes. The module parameter `background_restore=0` leaves it all to first
//! use.
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
    alloc::flags::__GFP_NOWARN,
    folio::{
        FolioRun,
        Span,
        SpannedFolio, //
    },
    fs::File,
    kho::{
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
        Arc,
        CondVar,
        Mutex,
        UniqueArc, //
    },
    time::{
        delay::fsleep,
        Delta, //
    },
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
const COMPATIBLE: &CStr = c"kvm-gmem-rs-v2";

/// Extents are preserved in naturally aligned windows of `2^WINDOW_ORDER` physical pages (2 MiB):
/// the next kernel takes back, and puts in, one window at a time (ABI, since v2).
const WINDOW_ORDER: u32 = 9;

/// How many times a background worker tries a window when memory is short, 10 ms apart.
const WORKER_TRIES: u32 = 100;

/// The most windows a file may have (32 TiB of memory).
const MAX_WINDOWS: u64 = 1 << 24;

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

/// The most extents a file may carry across (24 MiB of records).
const MAX_EXTENTS: u64 = 1 << 20;

/// The preserved head of a guest_memfd (ABI, little-endian, 40 bytes).
#[repr(C)]
#[derive(FromBytes, IntoBytes)]
pub struct GmemSer {
    /// Size of the file in bytes.
    size: U64,
    /// Its `GUEST_MEMFD_FLAG_*` flags.
    flags: U32,
    /// Number of [`ExtentSer`] records in `extents`.
    nr_extents: U32,
    /// Token of the file's VM in the same session, recorded at freeze.
    vm_token: U64,
    /// The vmalloc'ed array of extents, ordered by index, non-overlapping.
    extents: VmallocDesc,
}

/// `nr_pages` pages at file index `index`, at physical frames `pfn..` (ABI, 24 bytes).
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes)]
pub struct ExtentSer {
    index: U64,
    /// `pfn << 12 | flags`.
    pfn_flags: U64,
    nr_pages: U64,
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
    fn uptodate(span: Span) -> Self {
        Self {
            index: span.index,
            pfn: span.pfn,
            nr_pages: span.nr_pages,
            flags: EXTENT_UPTODATE,
        }
    }

    fn encode(&self) -> ExtentSer {
        ExtentSer {
            index: self.index.into(),
            pfn_flags: (self.pfn << FLAG_BITS | self.flags).into(),
            nr_pages: self.nr_pages.into(),
        }
    }

    fn decode(ser: &ExtentSer) -> Self {
        let pfn_flags = ser.pfn_flags.get();
        Self {
            index: ser.index.get(),
            pfn: pfn_flags >> FLAG_BITS,
            nr_pages: ser.nr_pages.get(),
            flags: pfn_flags & ((1 << FLAG_BITS) - 1),
        }
    }
}

/// The number of extents of a head object, checked against the limit.
fn extent_count(serialized: &GmemSer) -> Result<usize> {
    let nr = u64::from(serialized.nr_extents.get());
    if nr > MAX_EXTENTS {
        return Err(E2BIG);
    }
    Ok(nr as usize)
}

/// Checks the extents the previous kernel recorded before any memory is touched: each
/// non-empty, inside the file, in increasing index order without overlap, with a pfn other than
/// 0 and known flags. Decodes them into `extents`, which has room for all of them.
fn validate_extents(records: &[ExtentSer], size: u64, extents: &mut KVVec<Extent>) -> Result {
    for_each_valid_extent(records, size, |extent| {
        extents.push_within_capacity(extent).map_err(|_| EINVAL)
    })
}

/// Checks every record as [`validate_extents`] does, then calls `f` with each extent.
fn for_each_valid_extent(
    records: &[ExtentSer],
    size: u64,
    mut f: impl FnMut(Extent) -> Result,
) -> Result {
    let file_pages = size / PAGE_SIZE as u64;
    let mut next_index = 0;
    for record in records {
        let extent = Extent::decode(record);
        let end = extent.index.checked_add(extent.nr_pages).ok_or(EINVAL)?;
        if extent.nr_pages == 0
            || extent.index < next_index
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
    }
    records
        .iter()
        .try_for_each(|record| f(Extent::decode(record)))
}

/// Runtime state of a preserved guest_memfd.
struct GmemState {
    /// Keeps the file frozen until it is unpreserved or the kexec happens.
    _frozen: FrozenGuestMemfd,
    /// One preservation per extent, in windows.
    _pages: KVVec<PreservedPages>,
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

/// The windows of `extent`, in order.
fn windows_of(extent: &Extent) -> impl Iterator<Item = Window> + '_ {
    let end = extent.pfn + extent.nr_pages;
    let mut pfn = extent.pfn;
    core::iter::from_fn(move || {
        if pfn >= end {
            return None;
        }
        // The start of the next window, unless that is past the top of the pfn space.
        let next = ((pfn >> WINDOW_ORDER) + 1)
            .checked_mul(1 << WINDOW_ORDER)
            .map_or(end, |next| next.min(end));
        let window = Window {
            index: extent.index + (pfn - extent.pfn),
            pfn,
            nr_pages: next - pfn,
            uptodate: extent.flags & EXTENT_UPTODATE != 0,
        };
        pfn = next;
        Some(window)
    })
}

/// Checks that no two extents (ordered by index, not overlapping in the file) share a page of
/// physical memory: one page must not go to two places in the file (KHO does not stop two
/// concurrent takers of one page). Leaves them ordered by index.
fn check_disjoint(extents: &mut [Extent]) -> Result {
    extents.sort_unstable_by_key(|e| e.pfn);
    let overlap = extents
        .windows(2)
        .any(|pair| pair[0].pfn + pair[0].nr_pages > pair[1].pfn);
    extents.sort_unstable_by_key(|e| e.index);
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
    /// Lost: KHO refused its pages, or the page cache refused them. Faults on it fail.
    Lost,
}

impl WindowState {
    /// Whether nothing more will happen to the window but a punch-hole.
    fn is_settled(&self) -> bool {
        matches!(self, Self::In | Self::Gone | Self::Lost)
    }
}

/// How far the memory of a retrieved file is put in.
struct Progress {
    states: KVVec<WindowState>,
    /// Windows not settled.
    left: usize,
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
    windows: KVVec<Window>,
    #[pin]
    progress: Mutex<Progress>,
    /// Signalled whenever a window leaves `Filling`.
    #[pin]
    settled: CondVar,
}

/// At most how many windows `nr_extents` valid extents in a file of `file_pages` pages make, or
/// [`MAX_WINDOWS`]. Valid extents do not overlap in the file: each has a window per
/// `2^WINDOW_ORDER` of its pages, and at most two more for its ends.
fn max_windows(nr_extents: usize, file_pages: u64) -> usize {
    (nr_extents as u64)
        .saturating_mul(2)
        .saturating_add(file_pages >> WINDOW_ORDER)
        .min(MAX_WINDOWS) as usize
}

/// The memory a [`LazyMemory`] needs, taken before the retrieve consumes the preserved records:
/// after that, a failed allocation would lose the guest's memory.
struct LazyReserve {
    windows: KVVec<Window>,
    states: KVVec<WindowState>,
    memory: UniqueArc<MaybeUninit<LazyMemory>>,
}

impl LazyReserve {
    /// Room for the windows of `nr_extents` extents in a file of `file_pages` pages, at most
    /// [`MAX_WINDOWS`].
    fn new(nr_extents: usize, file_pages: u64) -> Result<Self> {
        let max = max_windows(nr_extents, file_pages);
        Ok(Self {
            windows: KVVec::with_capacity(max, GFP_KERNEL)?,
            states: KVVec::with_capacity(max, GFP_KERNEL)?,
            memory: UniqueArc::new_uninit(GFP_KERNEL)?,
        })
    }

    /// The pending memory of `extents`, valid and ordered (see [`validate_extents`]), in the
    /// reserved memory: allocates nothing it needs (it gives back unused room if it can).
    ///
    /// # Errors
    ///
    /// Returns `E2BIG` if the extents make more windows than there is room for, and `EINVAL` if
    /// they overlap in physical memory: records from the previous kernel may be hostile.
    fn build(mut self, extents: &mut [Extent]) -> Result<Arc<LazyMemory>> {
        check_disjoint(extents)?;
        for window in extents.iter().flat_map(windows_of) {
            self.windows.push_within_capacity(window).map_err(|_| {
                pr_err!("preserved guest_memfd extents describe too much memory\n");
                E2BIG
            })?;
        }
        // Room was made for the worst case the file's size allows: give back what a sparse file
        // does not use, if the allocator can (the table lives as long as the file).
        let _ = self.windows.shrink_to(0, GFP_KERNEL | __GFP_NOWARN);
        let _ = self
            .states
            .shrink_to(self.windows.len(), GFP_KERNEL | __GFP_NOWARN);
        for _ in 0..self.windows.len() {
            self.states
                .push_within_capacity(WindowState::Pending)
                .map_err(|_| E2BIG)?;
        }
        let left = self.windows.len();
        let memory = self.memory.pin_init_with(pin_init!(LazyMemory {
            windows: self.windows,
            progress <- new_mutex!(Progress {
                states: self.states,
                left,
                cursor: 0,
                stopped: false,
            }),
            settled <- new_condvar!(),
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

    /// Puts window `i` in if it is pending, or waits for whoever does.
    ///
    /// # Errors
    ///
    /// Returns `ENOMEM` (the window stays pending, for another try) and `EIO` if its memory is
    /// lost.
    fn fill_window(&self, inode: &GmemInode, i: usize) -> Result {
        let mut progress = self.progress.lock();
        let taken = loop {
            match progress.states[i] {
                WindowState::Filling => self.settled.wait(&mut progress),
                WindowState::In | WindowState::Gone => return Ok(()),
                WindowState::Lost => return Err(EIO),
                WindowState::Pending | WindowState::Partial(_) => {
                    break core::mem::replace(&mut progress.states[i], WindowState::Filling)
                }
            }
        };
        drop(progress);

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
                    self.settle(i, WindowState::Lost);
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
            Err(ENOMEM) => {
                self.settle(i, WindowState::Partial(run));
                Err(ENOMEM)
            }
            Err(err) => {
                pr_err!(
                    "could not put back guest memory at index {}: {:?}\n",
                    window.index,
                    err
                );
                // The pages not put in are freed with `run`.
                self.settle(i, WindowState::Lost);
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
            let mut tries = 0;
            loop {
                match self.fill_window(inode, i) {
                    Err(ENOMEM) if tries < WORKER_TRIES => {
                        tries += 1;
                        fsleep(Delta::from_millis(10));
                    }
                    Err(EIO) => {
                        result = Err(EIO);
                        break;
                    }
                    Err(err) => return Err(err),
                    Ok(()) => break,
                }
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

    /// Whether every window is settled.
    fn is_done(&self) -> bool {
        self.progress.lock().left == 0
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
            let mut tries = 0;
            while self.fill_window(inode, i) == Err(ENOMEM) {
                tries += 1;
                if tries == WORKER_TRIES {
                    pr_warn!("memory is short: guest memory is put back on first use only\n");
                    return;
                }
                fsleep(Delta::from_millis(10));
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
            }
        }
    }
}

impl GmemFiller for LazyMemory {
    fn fill(&self, inode: &GmemInode, index: u64) -> Result {
        match windows_in(&self.windows, index, index.saturating_add(1)) {
            range if range.is_empty() => Ok(()),
            range => self.fill_window(inode, range.start),
        }
    }

    fn discard(&self, inode: &GmemInode, start: u64, end: u64) -> Result {
        let range = windows_in(&self.windows, start, end);
        let inside = |w: &Window| w.index >= start && w.index + w.nr_pages <= end;
        // Windows partly in the hole go in first: the truncation that follows takes the part in
        // the hole, and keeps the rest. Lost memory stays lost.
        for i in range.clone() {
            if !inside(&self.windows[i]) {
                match self.fill_window(inode, i) {
                    Ok(()) | Err(EIO) => (),
                    Err(err) => return Err(err),
                }
            }
        }
        for i in range {
            if !inside(&self.windows[i]) {
                continue;
            }
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
fn collect_runs(frozen: &FrozenGuestMemfd) -> Result<KVVec<FolioRun>> {
    let mut runs: KVVec<FolioRun> = KVVec::new();
    frozen
        .for_each_folio(|folio: SpannedFolio| {
            let folio = match runs.last_mut() {
                Some(last) => match last.try_append(folio) {
                    Ok(()) => return Ok(()),
                    Err(folio) => folio,
                },
                None => folio,
            };
            if runs.len() as u64 >= MAX_EXTENTS {
                return Err(E2BIG);
            }
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

/// Preserves the folios of a frozen file, an extent per run, and records the extents.
fn preserve_memory(
    frozen: &FrozenGuestMemfd,
) -> Result<(KVVec<PreservedPages>, PreservedVec<ExtentSer>)> {
    let runs = collect_runs(frozen)?;
    // The new kernel takes back at most `MAX_WINDOWS` windows: refuse here what it would refuse
    // there, after the memory was handed over.
    let windows = runs.iter().fold(0u64, |sum, run| {
        let span = run.span();
        sum + window_count(span.pfn, span.nr_pages)
    });
    if windows > MAX_WINDOWS {
        pr_err!("refusing to preserve a guest_memfd of more than {MAX_WINDOWS} windows\n");
        return Err(E2BIG);
    }
    let mut pages = KVVec::with_capacity(runs.len(), GFP_KERNEL)?;
    let mut records = VVec::with_capacity(runs.len(), GFP_KERNEL)?;
    for run in runs {
        records.push(Extent::uptodate(run.span()).encode(), GFP_KERNEL)?;
        pages.push(PreservedPages::new(run, WINDOW_ORDER)?, GFP_KERNEL)?;
    }
    Ok((pages, PreservedVec::new(records)?))
}

/// Takes back and validates the extent records; from here on, the preserved state is consumed.
fn restore_extents(serialized: &mut Restored<GmemSer>, extents: &mut KVVec<Extent>) -> Result {
    let nr = extent_count(serialized)?;
    let records: RestoredVec<ExtentSer> = serialized.restore_vec(|s| &s.extents, nr)?;
    validate_extents(&records, serialized.size.get(), extents)
        .inspect_err(|_| pr_err!("preserved guest_memfd extents are inconsistent\n"))
}

/// Frees the memory of extents that will not be restored into a file. Allocates nothing but
/// what KHO needs to map the records, and frees every extent it can even when one fails.
fn release_extents(serialized: &mut Restored<GmemSer>) -> Result {
    let nr = extent_count(serialized)?;
    let records: RestoredVec<ExtentSer> = serialized.restore_vec(|s| &s.extents, nr)?;
    let mut result = Ok(());
    for_each_valid_extent(&records, serialized.size.get(), |extent| {
        match RestoredPages::restore(extent.pfn, extent.nr_pages) {
            Ok(run) => drop(run),
            Err(err) => result = Err(err),
        }
        Ok(())
    })?;
    result
}

/// Frees the memory of validated extents whose records were taken back.
fn release_pages(extents: &[Extent]) {
    for extent in extents {
        drop(RestoredPages::restore(extent.pfn, extent.nr_pages));
    }
}

/// What retrieve needs before it takes any memory back.
struct Prepared {
    gmem: GuestMemfdFile,
    extents: KVVec<Extent>,
    reserve: LazyReserve,
    slot: FillerSlot<LazyMemory>,
    workers: WorkerSlots,
}

/// Everything of a retrieve that can fail for an ordinary reason: the VM, the new file, memory
/// for the extents, the windows, the filler and the workers. Nothing of the preserved state is
/// consumed.
fn prepare_retrieve(serialized: &GmemSer, session: &IncomingSession<'_>) -> Result<Prepared> {
    let nr = extent_count(serialized)?;
    let flags = flags_from_ser(serialized.flags.get())?;
    let vm_file = session.file(serialized.vm_token.get())?;
    let kvm = Kvm::from_file(&vm_file).ok_or(EINVAL)?;
    let size = serialized.size.get();
    Ok(Prepared {
        gmem: GuestMemfdFile::create(kvm, size, flags)?,
        extents: KVVec::with_capacity(nr, GFP_KERNEL)?,
        reserve: LazyReserve::new(nr, size / PAGE_SIZE as u64)?,
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
        // A file retrieved in this kernel may still have memory to put in: all of it must be in
        // the page cache before it is frozen and walked.
        if let Some((memory, inode)) = filler_of::<LazyMemory>(file) {
            memory.fill_all(&inode)?;
        }
        let frozen = FrozenGuestMemfd::freeze(file)?;
        let (pages, extents) = preserve_memory(&frozen)?;
        let nr_pages: u64 = pages.iter().map(|p| p.span().nr_pages).sum();
        pr_info!(
            "preserving {} pages in {} extents, {} bytes of metadata\n",
            nr_pages,
            extents.len(),
            size_of::<GmemSer>() + extents.len() * size_of::<ExtentSer>()
        );
        let serialized = Preserved::new(GmemSer {
            size: gmem.size.into(),
            flags: flags_to_ser(gmem.flags)?.into(),
            nr_extents: u32::try_from(extents.len()).map_err(|_| E2BIG)?.into(),
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
        // in on first use or in the background. Only hostile records fail, and their memory is
        // freed, by `release_pages` or with `memory`.
        let memory = reserve
            .build(&mut extents)
            .inspect_err(|_| release_pages(&extents))?;
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
        // Reached: two two-page extents across boundaries in a four-page file.
        let list = [extent(0, 511, 2, U), extent(2, 1023, 2, U)];
        assert_eq!(windows(&list)?.len(), max_windows(list.len(), 4));
        assert_eq!(max_windows(usize::MAX, u64::MAX), MAX_WINDOWS as usize);
        Ok(())
    }

    #[test]
    fn reserve_refuses_more_windows_or_overlaps() -> Result {
        // Room for 2 + 1 windows; these make 4.
        let reserve = LazyReserve::new(1, 512)?;
        let mut many = [extent(0, 1000, 1100, U)];
        assert_eq!(reserve.build(&mut many).err(), Some(E2BIG));
        let reserve = LazyReserve::new(2, 512)?;
        let mut overlap = [extent(0, 100, 10, U), extent(20, 95, 6, U)];
        assert_eq!(reserve.build(&mut overlap).err(), Some(EINVAL));
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
        let e = extent(7, (1 << 40) + 3, 512, U);
        assert_eq!(Extent::decode(&e.encode()), e);
    }

    fn validate(list: &[ExtentSer], size: u64) -> Result<KVVec<Extent>> {
        let mut out = KVVec::with_capacity(list.len(), GFP_KERNEL)?;
        validate_extents(list, size, &mut out)?;
        Ok(out)
    }

    fn head(nr_extents: u32) -> GmemSer {
        GmemSer {
            size: (1u64 << 30).into(),
            flags: 0.into(),
            nr_extents: nr_extents.into(),
            vm_token: 0.into(),
            extents: VmallocDesc::default(),
        }
    }

    #[test]
    fn validate_accepts_good_extents() -> Result {
        let list = records(&[extent(0, 100, 4, U), extent(8, 300, 8, 0)])?;
        assert_eq!(validate(&list, 16 * 4096)?.len(), 2);
        Ok(())
    }

    #[test]
    fn validate_rejects_bad_counts() -> Result {
        assert_eq!(extent_count(&head(3))?, 3);
        assert_eq!(extent_count(&head(1 << 20))?, 1 << 20);
        assert_eq!(extent_count(&head((1 << 20) + 1)).err(), Some(E2BIG));
        assert_eq!(extent_count(&head(u32::MAX)).err(), Some(E2BIG));
        Ok(())
    }

    #[test]
    fn validate_rejects_outside_overlapping_unordered() -> Result {
        let outside = records(&[extent(14, 100, 4, U)])?;
        assert_eq!(validate(&outside, 16 * 4096).err(), Some(EINVAL));
        let overlap = records(&[extent(0, 100, 4, U), extent(3, 200, 1, U)])?;
        assert_eq!(validate(&overlap, 1 << 30).err(), Some(EINVAL));
        let unordered = records(&[extent(8, 100, 1, U), extent(0, 200, 1, U)])?;
        assert_eq!(validate(&unordered, 1 << 30).err(), Some(EINVAL));
        let wrapping = records(&[extent(u64::MAX, 100, 2, U)])?;
        assert_eq!(validate(&wrapping, 1 << 30).err(), Some(EINVAL));
        Ok(())
    }

    #[test]
    fn validate_rejects_pfn_zero_empty_and_unknown_flags() -> Result {
        let zero = records(&[extent(0, 0, 1, U)])?;
        assert_eq!(validate(&zero, 1 << 30).err(), Some(EINVAL));
        let empty = records(&[extent(0, 100, 0, U)])?;
        assert_eq!(validate(&empty, 1 << 30).err(), Some(EINVAL));
        let unknown = records(&[extent(0, 100, 1, 1 << 5)])?;
        assert_eq!(validate(&unknown, 1 << 30).err(), Some(EOPNOTSUPP));
        Ok(())
    }
}
