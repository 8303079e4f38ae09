// SPDX-License-Identifier: GPL-2.0

//! The memory of a retrieved guest_memfd that is not in its page cache yet, and how it gets
//! there: a state per window, claimed by whoever needs it first.
//!
//! ```text
//!   Pending, Partial, Chunked --claim--> Filling --all of it put in------------------> In
//!                                        Filling --a worker's chunk put in, or memory
//!                                                  short, or frozen, not cut----------> Partial
//!                                        Filling --a chunk put in, or memory short, or
//!                                                  frozen, once a fault cut it--------> Chunked
//!                                        Filling --KHO or the page cache refused-----> Lost
//!   any but Filling --a punch-hole over the whole window----------------------------> Gone
//!   Lost --a punch-hole over the last of its lost pages-----------------------------> Gone
//! ```
//!
//! A fault waits for its chunk only: the `2^CHUNK_ORDER` pages around it, aligned in physical
//! memory. It takes the window back from KHO (a block, or the few blocks of an unaligned window:
//! cheap to take back), cuts what is left of it in chunks, puts its own in and leaves the
//! others, `Chunked`, to later faults and the background workers. When what is left of the
//! window lies in two chunks or one, the fault does not cut it, and puts it all in. The workers
//! put in a chunk per claim, and leave a window for later when a fault waits for it, so a fault on
//! a window they are putting in waits for one chunk too; a preserve and a punch-hole put in whole
//! windows.
//!
//! `In`, `Gone` and `Lost` are settled: [`Progress::left`] counts the windows that are not, and
//! LUO's finish is refused (`EBUSY`) until it is zero (unless the session is being released).
//! Only a punch-hole changes a settled window (`In` or `Lost` to `Gone`); one over part of a lost
//! window leaves it `Lost`, with fewer pages lost. What is `Pending`, `Partial` or `Chunked` when
//! the file goes is freed with it.
//!
//! Memory is reserved before it is needed: [`LazyReserve`] takes all a [`LazyMemory`] needs before
//! the retrieve consumes the preserved records, since after that a failed allocation would lose
//! the guest's memory.

use super::{
    abi::{
        Extent,
        WINDOW_ORDER, //
    },
    pace,
    windows::{
        check_disjoint,
        windows_in,
        windows_of,
        Window, //
    },
};
use core::mem::MaybeUninit;
use kernel::{
    kho::RestoredPages,
    kvm::GmemInode,
    liveupdate::retry_on_enomem,
    new_condvar, new_mutex,
    prelude::*,
    sync::{
        lockdep::LockdepMap,
        static_lock_class,
        Arc,
        CondVar,
        Mutex,
        UniqueArc, //
    },
    task::cond_resched,
};

/// Where the memory of a window comes from, and where it goes: KHO and the file's page cache for
/// a file ([`GmemInode`]), a recorder in the tests.
pub(super) trait PageSink {
    /// Pages taken back from the previous kernel: those not put in are freed with them.
    type Pages;

    /// Takes back pages `[pfn, pfn + nr_pages)`, preserved as one window: all of them or none.
    fn take_back(pfn: u64, nr_pages: u64) -> Result<Self::Pages>;

    /// The first of `pages` not put in yet.
    fn next_pfn(pages: &Self::Pages) -> u64;

    /// Splits `pages` at page frame `pfn`: returns those from `pfn` on, if any, and keeps the
    /// others.
    fn split_off(pages: &mut Self::Pages, pfn: u64) -> Option<Self::Pages>;

    /// Puts the first `max` of `pages` in (all of them if there are fewer), the first at file
    /// page `index`: on success, all of those. Those put in are no longer in `pages`, and the
    /// others are. On failure, with `ENOMEM` (memory short) or `EBUSY` (the file is frozen) they
    /// are for a later try; any other error loses them.
    fn put_in(&self, pages: &mut Self::Pages, index: u64, uptodate: bool, max: u64) -> Result;
}

impl PageSink for GmemInode {
    type Pages = RestoredPages;

    fn take_back(pfn: u64, nr_pages: u64) -> Result<RestoredPages> {
        RestoredPages::restore(pfn, nr_pages)
    }

    fn next_pfn(pages: &RestoredPages) -> u64 {
        pages.remaining().0
    }

    fn split_off(pages: &mut RestoredPages, pfn: u64) -> Option<RestoredPages> {
        pages.split_off(pfn)
    }

    fn put_in(&self, pages: &mut RestoredPages, index: u64, uptodate: bool, max: u64) -> Result {
        self.fill_pages(pages, index, uptodate, max)
    }
}

/// The filler of a retrieved guest_memfd.
pub(super) type FileMemory = LazyMemory<GmemInode>;

/// How many times a background worker, or a preserve of a retrieved file, tries a window when
/// memory is short ([`retry_on_enomem`]: 10 ms apart).
const WORKER_TRIES: u32 = 100;

/// A fault puts in the `2^CHUNK_ORDER` pages (64 KiB) around it, aligned in physical memory.
const CHUNK_ORDER: u32 = 4;

/// The chunks of a window.
const CHUNKS: usize = 1 << (WINDOW_ORDER - CHUNK_ORDER);

/// The rest of each chunk of a window, in order: `None` once it is in (or for chunks that hold no
/// page of the window, or were put in before the window was cut).
type Chunks<S> = [Option<<S as PageSink>::Pages>; CHUNKS];

/// The first page frame of the naturally aligned `2^WINDOW_ORDER` pages `window` is in.
fn window_base(window: &Window) -> u64 {
    window.pfn & !((1 << WINDOW_ORDER) - 1)
}

/// The chunk of `window` that file page `index` is in, if the window holds it.
fn chunk_of(window: &Window, index: u64) -> Option<usize> {
    let n = index
        .checked_sub(window.index)
        .filter(|&n| n < window.nr_pages)?;
    // The window is inside its aligned `2^WINDOW_ORDER` pages: below `CHUNKS`.
    usize::try_from((window.pfn - window_base(window) + n) >> CHUNK_ORDER)
        .ok()
        .filter(|&k| k < CHUNKS)
}

/// The file pages of chunk `k` of `window`, as `[start, end)`: empty if it holds none.
fn chunk_pages(window: &Window, k: usize) -> (u64, u64) {
    let start = window_base(window) + ((k as u64) << CHUNK_ORDER);
    let first = start.max(window.pfn);
    let last = (start + (1 << CHUNK_ORDER)).min(window.pfn + window.nr_pages);
    if first >= last {
        return (window.index, window.index);
    }
    (
        window.index + (first - window.pfn),
        window.index + (last - window.pfn),
    )
}

/// Cuts `run`, what is left of `window`, in its chunks.
fn cut<S: PageSink>(window: &Window, run: S::Pages, chunks: &mut Chunks<S>) {
    let base = window_base(window);
    let mut rest = Some(run);
    for (k, chunk) in chunks.iter_mut().enumerate().rev() {
        let Some(run) = rest.as_mut() else {
            break;
        };
        let start = base + ((k as u64) << CHUNK_ORDER);
        // Chunk 0 starts at `base`, at or before the run: it takes the rest, if any is left.
        *chunk = if S::next_pfn(run) >= start {
            rest.take()
        } else {
            S::split_off(run, start)
        };
    }
}

/// How many chunks the rest of `window`, from page frame `next` on, is in (0 if none is left).
fn chunk_span(window: &Window, next: u64) -> u64 {
    let end = window.pfn + window.nr_pages;
    if next >= end {
        return 0;
    }
    ((end - 1) >> CHUNK_ORDER) - (next >> CHUNK_ORDER) + 1
}

/// What a claim of a window puts in.
#[derive(Clone, Copy)]
enum Want {
    /// A fault on file page `.0`: its chunk, if the window is worth cutting.
    Page(u64),
    /// A background worker's step: the next chunk not in.
    Step,
    /// All of the window: for a preserve, and for the windows a punch-hole cuts.
    All,
}

impl Want {
    /// The file page a fault needs.
    fn page(self) -> Option<u64> {
        match self {
            Self::Page(index) => Some(index),
            _ => None,
        }
    }
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

/// The state of `window`, cut in `chunks`, lost after chunk `k` was put in up to file page `end`:
/// the chunks that are `None` are in, and the others up to their first page left.
fn lost_in_chunk<S: PageSink>(
    window: &Window,
    chunks: &Chunks<S>,
    k: usize,
    end: u64,
) -> WindowState<S> {
    // Without memory for the bits, the pages put in count as lost (see `lost_after`).
    WindowState::Lost(
        KBox::new(PageBits::default(), GFP_KERNEL)
            .ok()
            .map(|mut bits| {
                for (j, chunk) in chunks.iter().enumerate() {
                    let (start, chunk_end) = chunk_pages(window, j);
                    let in_end = match chunk {
                        _ if j == k => end,
                        None => chunk_end,
                        Some(run) => window.index + (S::next_pfn(run) - window.pfn),
                    };
                    set_page_bits(&mut bits, window, start, in_end);
                }
                bits
            }),
    )
}

/// The state of `window` lost after its first `nr_in` pages were put in the file.
fn lost_after<S: PageSink>(window: &Window, nr_in: u64) -> WindowState<S> {
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
enum WindowState<S: PageSink> {
    /// Preserved by the previous kernel, not taken back yet.
    Pending,
    /// Being put in by one thread; the others wait for it.
    Filling,
    /// Taken back, partly put in: the rest, for the next try (memory was short).
    Partial(S::Pages),
    /// Taken back and cut in chunks, some of them put in by faults: the rest.
    Chunked(KBox<Chunks<S>>),
    /// In the file.
    In,
    /// Discarded by a punch-hole: its pages were freed.
    Gone,
    /// Lost: KHO refused its pages, or the page cache refused them. Faults on it fail, but on
    /// the pages whose bit is set: put in before the rest failed, or punched out since.
    Lost(Option<KBox<PageBits>>),
}

// What luo.rst says a window costs until it is in, and a window cut in chunks more.
const _: () = assert!(size_of::<Window>() + size_of::<WindowState<GmemInode>>() <= 56);
const _: () = assert!(size_of::<Chunks<GmemInode>>() <= 512);

impl<S: PageSink> WindowState<S> {
    /// Whether nothing more will happen to the window but a punch-hole.
    fn is_settled(&self) -> bool {
        matches!(self, Self::In | Self::Gone | Self::Lost(_))
    }
}

/// How far the memory of a retrieved file is put in.
struct Progress<S: PageSink> {
    states: VVec<WindowState<S>>,
    /// Windows not settled.
    left: usize,
    /// Lost memory was reported.
    reported: bool,
    /// The next window the background workers look at.
    cursor: usize,
    /// Faults waiting for a window someone is putting in: a worker leaves its window to them.
    waiting: usize,
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
pub(super) struct LazyMemory<S: PageSink> {
    windows: VVec<Window>,
    #[pin]
    progress: Mutex<Progress<S>>,
    /// Signalled whenever a window leaves `Filling`.
    #[pin]
    settled: CondVar,
    /// Lets lockdep check a `Filling` claim as the lock it is: held by the claimer until the
    /// window settles, waited for by the others (from fault, `fallocate()` and punch-hole paths).
    #[pin]
    filling: LockdepMap,
}

/// The memory a [`LazyMemory`] needs, taken before the retrieve consumes the preserved records:
/// after that, a failed allocation would lose the guest's memory.
pub(super) struct LazyReserve<S: PageSink> {
    windows: VVec<Window>,
    states: VVec<WindowState<S>>,
    memory: UniqueArc<MaybeUninit<LazyMemory<S>>>,
}

impl<S: PageSink> LazyReserve<S> {
    /// Room for `nr_windows` windows.
    pub(super) fn new(nr_windows: usize) -> Result<Self> {
        Ok(Self {
            windows: VVec::with_capacity(nr_windows, GFP_KERNEL)?,
            states: VVec::with_capacity(nr_windows, GFP_KERNEL)?,
            memory: UniqueArc::new_uninit(GFP_KERNEL)?,
        })
    }

    /// The pending memory of `extents`, valid and ordered (see
    /// [`validate_extents`](super::abi::validate_extents)), in the reserved memory: allocates
    /// nothing.
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` if the extents do not make exactly as many windows as there is room for,
    /// or overlap in physical memory: records from the previous kernel may be hostile.
    pub(super) fn build(mut self, extents: &mut [Extent]) -> Result<Arc<LazyMemory<S>>> {
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
            progress <- new_mutex!(
                Progress {
                    states: self.states,
                    left,
                    reported: false,
                    cursor: 0,
                    waiting: 0,
                    stopped: false,
                },
                "guest_memfd_luo::progress"
            ),
            settled <- new_condvar!("guest_memfd_luo::settled"),
            filling <- LockdepMap::new(c"guest_memfd_luo_filling", static_lock_class!()),
        }))?;
        Ok(memory.into())
    }
}

impl<S: PageSink> LazyMemory<S> {
    /// How many windows the memory is in.
    pub(super) fn nr_windows(&self) -> usize {
        self.windows.len()
    }

    /// Marks window `i`, which the caller claimed, as `state`, and wakes those waiting for it.
    fn settle(&self, i: usize, state: WindowState<S>) {
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
    fn claim(&self, i: usize, at: Option<u64>) -> Result<Option<WindowState<S>>> {
        self.filling.might_wait();
        let mut progress = self.progress.lock();
        loop {
            match progress.states[i] {
                WindowState::Filling if at.is_some() => {
                    progress.waiting += 1;
                    self.settled.wait(&mut progress);
                    progress.waiting -= 1;
                }
                WindowState::Filling => self.settled.wait(&mut progress),
                WindowState::In | WindowState::Gone => return Ok(None),
                // A fault on a chunk that is in: a lookup that raced with the fill.
                WindowState::Chunked(ref chunks)
                    if at
                        .and_then(|index| chunk_of(&self.windows[i], index))
                        .is_some_and(|k| chunks[k].is_none()) =>
                {
                    return Ok(None)
                }
                WindowState::Lost(ref punched) => {
                    let window = &self.windows[i];
                    return match (at, punched) {
                        (Some(index), Some(bits)) if page_bit(bits, window, index) => Ok(None),
                        _ => Err(EIO),
                    };
                }
                WindowState::Pending | WindowState::Partial(_) | WindowState::Chunked(_) => {
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

    /// Puts in what `want` asks of window `i`, if it is pending, or waits for whoever does.
    ///
    /// # Errors
    ///
    /// Returns `ENOMEM` and `EBUSY` (the file is frozen): the window stays pending, for another
    /// try; `EIO` if its memory is lost.
    fn fill_window(&self, sink: &S, i: usize, want: Want) -> Result {
        let Some(taken) = self.claim(i, want.page())? else {
            return Ok(());
        };
        // Until the window settles, at the end of this function.
        let _filling = self.filling.acquire();
        let window = self.windows[i];
        let run = match taken {
            WindowState::Chunked(chunks) => return self.fill_chunks(sink, i, chunks, want),
            WindowState::Partial(run) => run,
            _ => match S::take_back(window.pfn, window.nr_pages) {
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
        let next = S::next_pfn(&run);
        let max = match want {
            // A fault on a run of more than two chunks cuts it and waits for its own chunk;
            // without memory for the table at once (it is worth no reclaim), for all of the run.
            Want::Page(_) if chunk_span(&window, next) > 2 => {
                let table = KBox::new([const { None }; CHUNKS], GFP_NOWAIT | __GFP_NOWARN);
                if let Ok(mut chunks) = table {
                    cut::<S>(&window, run, &mut chunks);
                    return self.fill_chunks(sink, i, chunks, want);
                }
                u64::MAX
            }
            // To the end of the chunk `next` is in.
            Want::Step => (((next >> CHUNK_ORDER) + 1) << CHUNK_ORDER) - next,
            _ => u64::MAX,
        };
        self.fill_run(sink, i, run, max)
    }

    /// Puts in the first `max` pages of `run`, the rest of window `i`, which the caller claimed.
    fn fill_run(&self, sink: &S, i: usize, mut run: S::Pages, max: u64) -> Result {
        let window = self.windows[i];
        let end = window.pfn + window.nr_pages;
        let next = S::next_pfn(&run);
        match sink.put_in(
            &mut run,
            window.index + (next - window.pfn),
            window.uptodate,
            max,
        ) {
            Ok(()) if S::next_pfn(&run) == end => {
                self.settle(i, WindowState::In);
                Ok(())
            }
            Ok(()) => {
                self.settle(i, WindowState::Partial(run));
                Ok(())
            }
            // Memory is short, or the file is frozen (which preserve does only once every
            // window is in): the rest stays for the next try.
            Err(err) if err == ENOMEM || err == EBUSY => {
                self.settle(i, WindowState::Partial(run));
                Err(err)
            }
            Err(err) => {
                let next = S::next_pfn(&run);
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

    /// Puts in the chunks of window `i` that `want` asks for: the window, which the caller
    /// claimed, is cut in `chunks`.
    fn fill_chunks(&self, sink: &S, i: usize, mut chunks: KBox<Chunks<S>>, want: Want) -> Result {
        let window = self.windows[i];
        let wanted = match want {
            // Nothing for a page not in the window (which `fill_at()` does not ask for).
            Want::Page(index) => chunk_of(&window, index).map_or(0..0, |k| k..k + 1),
            Want::Step => chunks
                .iter()
                .position(Option::is_some)
                .map_or(0..0, |k| k..k + 1),
            Want::All => 0..CHUNKS,
        };
        for k in wanted {
            let Some(mut run) = chunks[k].take() else {
                continue;
            };
            let next = S::next_pfn(&run);
            match sink.put_in(
                &mut run,
                window.index + (next - window.pfn),
                window.uptodate,
                u64::MAX,
            ) {
                Ok(()) => (),
                // As for a whole window, the rest stays for the next try.
                Err(err) if err == ENOMEM || err == EBUSY => {
                    chunks[k] = Some(run);
                    self.settle(i, WindowState::Chunked(chunks));
                    return Err(err);
                }
                Err(err) => {
                    let end = window.index + (S::next_pfn(&run) - window.pfn);
                    pr_err!(
                        "could not put back guest memory at index {}: {:?}\n",
                        end,
                        err
                    );
                    // The pages not put in are freed with `run` and `chunks`.
                    let lost = lost_in_chunk(&window, &chunks, k, end);
                    self.settle(i, lost);
                    return Err(EIO);
                }
            }
        }
        if chunks.iter().all(Option::is_none) {
            self.settle(i, WindowState::In);
        } else {
            self.settle(i, WindowState::Chunked(chunks));
        }
        Ok(())
    }

    /// Puts in every window still pending, trying each a few times when memory is short.
    ///
    /// # Errors
    ///
    /// Returns `EIO` if memory was lost (the other windows are put in all the same), `ENOMEM`.
    pub(super) fn fill_all(&self, sink: &S) -> Result {
        let mut result = Ok(());
        for i in 0..self.windows.len() {
            match retry_on_enomem(WORKER_TRIES, || self.fill_window(sink, i, Want::All)) {
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
        if let Err(err) = S::take_back(window.pfn, window.nr_pages) {
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
    pub(super) fn is_done(&self) -> bool {
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
    pub(super) fn restore_in_background(&self, sink: &S) {
        loop {
            let mut progress = self.progress.lock();
            if progress.stopped {
                return;
            }
            // From the shared cursor; at the end, once more from the start, for windows a fault
            // left partly in (cut in chunks, or when memory was short).
            let unclaimed = |s: &WindowState<S>| {
                matches!(
                    s,
                    WindowState::Pending | WindowState::Partial(_) | WindowState::Chunked(_)
                )
            };
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
            // A chunk per claim: a fault on the window waits for one chunk, not for the window.
            loop {
                match retry_on_enomem(WORKER_TRIES, || self.fill_window(sink, i, Want::Step)) {
                    // Frozen: nothing goes in until it is not.
                    Err(EBUSY) => return,
                    Err(ENOMEM) => {
                        pr_warn!("memory is short: guest memory is put back on first use only\n");
                        return;
                    }
                    Err(_) => break,
                    Ok(()) => {
                        let progress = self.progress.lock();
                        if progress.stopped {
                            return;
                        }
                        // Settled, or a fault waits for it: the scan comes back to it.
                        if progress.states[i].is_settled() || progress.waiting != 0 {
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[pinned_drop]
impl<S: PageSink> PinnedDrop for LazyMemory<S> {
    fn drop(self: Pin<&mut Self>) {
        // Nothing else is left to claim a window: free what is still preserved. Partly put in
        // windows free their pages with their state.
        let mut states = core::mem::take(&mut self.progress.lock().states);
        for (i, state) in states.iter_mut().enumerate() {
            let state = core::mem::replace(state, WindowState::Gone);
            let pending = matches!(state, WindowState::Pending);
            let held = matches!(state, WindowState::Partial(_) | WindowState::Chunked(_));
            drop(state);
            if pending {
                self.free_window(i);
            }
            if pending || held {
                cond_resched();
            } else {
                pace(i);
            }
        }
    }
}

impl<S: PageSink> LazyMemory<S> {
    /// Puts in the memory of file page `index`, if it is not in yet (`GmemFiller::fill()`).
    pub(super) fn fill_at(&self, sink: &S, index: u64) -> Result {
        match windows_in(&self.windows, index, index.saturating_add(1)) {
            range if range.is_empty() => Ok(()),
            range => self.fill_window(sink, range.start, Want::Page(index)),
        }
    }

    /// Frees the memory of file pages `[start, end)` not put in yet, and puts in the rest of the
    /// windows partly in that range, for a punch-hole (`GmemFiller::discard()`).
    pub(super) fn discard_range(&self, sink: &S, start: u64, end: u64) -> Result {
        let range = windows_in(&self.windows, start, end);
        let inside = |w: &Window| w.index >= start && w.index + w.nr_pages <= end;
        // Windows partly in the hole go in first: the truncation that follows takes the part in
        // the hole, and keeps the rest. Lost memory stays lost, but for the pages in the hole.
        // At most the first and the last window are partly in the hole.
        let mut lost = [None, None];
        for i in range.clone() {
            if !inside(&self.windows[i]) {
                match self.fill_window(sink, i, Want::All) {
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
            // In: the truncation frees the pages. Partial, Chunked: dropping `taken` frees the
            // rest.
            if matches!(taken, WindowState::Pending) {
                self.free_window(i);
            }
            drop(taken);
            cond_resched();
        }
        Ok(())
    }

    /// Stops the background workers (`GmemFiller::stop()`).
    pub(super) fn stop_workers(&self) {
        self.progress.lock().stopped = true;
    }
}

#[kunit_tests(guest_memfd_luo_lazy)]
mod tests {
    use super::*;
    use crate::test_helpers::*;
    use crate::windows::sort_by_key;
    use core::cell::RefCell;
    use kernel::sync::atomic::{
        Atomic,
        Relaxed, //
    };

    #[test]
    fn reserve_refuses_more_windows_or_overlaps() -> Result {
        // These make 4 windows: room for 3 or 5 is refused, room for 4 is filled.
        let mut four = [extent(0, 1000, 1100, U)];
        assert_eq!(
            LazyReserve::<Fake>::new(3)?.build(&mut four).err(),
            Some(EINVAL)
        );
        assert_eq!(
            LazyReserve::<Fake>::new(5)?.build(&mut four).err(),
            Some(EINVAL)
        );
        assert_eq!(
            LazyReserve::<Fake>::new(4)?.build(&mut four)?.windows.len(),
            4
        );
        let reserve = LazyReserve::<Fake>::new(2)?;
        let mut overlap = [extent(0, 100, 10, U), extent(20, 95, 6, U)];
        assert_eq!(reserve.build(&mut overlap).err(), Some(EINVAL));
        Ok(())
    }

    /// A lost window (KHO or the page cache refused its memory) fails faults with `EIO`, but
    /// not on the pages a punch-hole took out since, which read as zeros then, nor on those put
    /// in before the rest failed; finish does not wait for lost memory, which does not come back.
    #[test]
    fn punched_pages_of_a_lost_window_read_as_zeros() -> Result {
        let mut list = [extent(0, 0x1000, 512, U), extent(512, 0x3000, 8, U)];
        let memory = LazyReserve::<Fake>::new(2)?.build(&mut list)?;
        let spare = || KBox::new(PageBits::default(), GFP_KERNEL);
        let lost = |memory: &LazyMemory<Fake>| match &memory.progress.lock().states[0] {
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

    /// Pages the fake sink freed, in every test (KUnit runs one at a time).
    static FREED: Atomic<u64> = Atomic::new(0);

    /// The windows below pfn `64 << WINDOW_ORDER` the fake KHO handed out since the last
    /// [`lazy_memory`], a bit each: like KHO, it hands out a window once.
    static TAKEN: Atomic<u64> = Atomic::new(0);

    /// Pfns from here on were not preserved: the fake KHO refuses them.
    const NOT_PRESERVED: u64 = 1 << 30;

    /// Pages taken back, as far as the fake knows: what is left of them is freed when they go.
    struct FakePages {
        next: u64,
        end: u64,
    }

    impl Drop for FakePages {
        fn drop(&mut self) {
            FREED.add(self.end - self.next, Relaxed);
        }
    }

    /// A file that records the pages put in it, and fails when told to.
    #[derive(Default)]
    struct Fake {
        /// (file page, pfn, uptodate) of each page put in, in order.
        put: RefCell<KVVec<(u64, u64, bool)>>,
        /// What the next calls of `put_in` do, the next last: put so many pages in, then fail.
        /// Without one, a call puts every page in.
        script: RefCell<KVVec<(u64, Error)>>,
    }

    impl Fake {
        fn failing(steps: &[(u64, Error)]) -> Result<Self> {
            let fake = Self::default();
            for step in steps.iter().rev() {
                fake.script.borrow_mut().push(*step, GFP_KERNEL)?;
            }
            Ok(fake)
        }

        fn count(&self) -> usize {
            self.put.borrow().len()
        }

        /// Whether the pages put in are `[index, index + nr)` of the file, from `pfn` on, each
        /// once, uptodate.
        fn holds(&self, index: u64, pfn: u64, nr: u64) -> bool {
            self.holds_as(index, pfn, nr, true)
        }

        fn holds_as(&self, index: u64, pfn: u64, nr: u64, uptodate: bool) -> bool {
            let mut put = self.put.borrow_mut();
            sort_by_key(&mut put, |page| page.0);
            let first = put.partition_point(|page| page.0 < index);
            let Ok(len) = usize::try_from(nr) else {
                return false;
            };
            put.len() >= first + len
                && put[first..first + len]
                    .iter()
                    .zip(0..)
                    .all(|(&page, i)| page == (index + i, pfn + i, uptodate))
                && put
                    .get(first + len)
                    .is_none_or(|page| page.0 != index + nr - 1)
        }
    }

    impl PageSink for Fake {
        type Pages = FakePages;

        fn take_back(pfn: u64, nr_pages: u64) -> Result<FakePages> {
            if pfn + nr_pages > NOT_PRESERVED {
                return Err(EINVAL);
            }
            let window = pfn >> WINDOW_ORDER;
            if window < 64 {
                let taken = TAKEN.load(Relaxed);
                if taken & (1 << window) != 0 {
                    return Err(EINVAL);
                }
                TAKEN.store(taken | 1 << window, Relaxed);
            }
            Ok(FakePages {
                next: pfn,
                end: pfn + nr_pages,
            })
        }

        fn next_pfn(pages: &FakePages) -> u64 {
            pages.next
        }

        fn split_off(pages: &mut FakePages, pfn: u64) -> Option<FakePages> {
            let at = pfn.max(pages.next);
            if at >= pages.end {
                return None;
            }
            let tail = FakePages {
                next: at,
                end: pages.end,
            };
            pages.end = at;
            Some(tail)
        }

        fn put_in(&self, pages: &mut FakePages, index: u64, uptodate: bool, max: u64) -> Result {
            // Like the page cache: a call that put in all it was asked to succeeded.
            let asked = max.min(pages.end - pages.next);
            let (limit, err) = match self.script.borrow_mut().pop() {
                Some((limit, _)) if limit >= asked => (asked, Ok(())),
                Some((limit, err)) => (limit, Err(err)),
                None => (asked, Ok(())),
            };
            let mut n = 0;
            while pages.next < pages.end && n < limit {
                self.put
                    .borrow_mut()
                    .push((index + n, pages.next, uptodate), GFP_KERNEL)?;
                pages.next += 1;
                n += 1;
            }
            err
        }
    }

    /// The memory of `list`, which the fake KHO has handed out nothing of yet.
    fn lazy_memory(list: &[Extent]) -> Result<Arc<LazyMemory<Fake>>> {
        TAKEN.store(0, Relaxed);
        let mut extents = KVVec::with_capacity(list.len(), GFP_KERNEL)?;
        for extent in list {
            extents.push(*extent, GFP_KERNEL)?;
        }
        LazyReserve::<Fake>::new(windows(list)?.len())?.build(&mut extents)
    }

    /// 1536 pages at pfn 0x1000: three windows of 512.
    fn three_windows() -> Result<Arc<LazyMemory<Fake>>> {
        lazy_memory(&[extent(0, 0x1000, 1536, U)])
    }

    #[test]
    fn a_fault_puts_in_its_chunk_once() -> Result {
        let fake = Fake::default();
        let freed = FREED.load(Relaxed);
        let memory = three_windows()?;
        // Page 700 is page 188 of the second window: in its chunk 11, pages 176 to 191.
        memory.fill_at(&fake, 700)?;
        assert_eq!(fake.count(), 16);
        assert!(fake.holds(688, 0x12b0, 16));
        // A chunk that is in is not claimed again.
        assert!(memory.claim(1, Some(690))?.is_none());
        memory.fill_at(&fake, 690)?;
        assert_eq!(fake.count(), 16);
        memory.fill_at(&fake, 600)?;
        assert_eq!(fake.count(), 32);
        assert!(fake.holds(592, 0x1250, 16));
        // A page of no window: a hole in the file, nothing to put in.
        memory.fill_at(&fake, 5000)?;
        assert!(!memory.is_done());
        memory.fill_at(&fake, 0)?;
        memory.fill_at(&fake, 1535)?;
        assert_eq!(fake.count(), 64);
        assert!(fake.holds(1520, 0x15f0, 16));
        // The rest of each window, once.
        memory.fill_all(&fake)?;
        assert_eq!(fake.count(), 1536);
        assert!(fake.holds(0, 0x1000, 1536));
        assert!(memory.is_done());
        drop(memory);
        assert_eq!(FREED.load(Relaxed), freed);
        Ok(())
    }

    #[test]
    fn a_chunk_is_aligned_in_physical_memory() -> Result {
        let fake = Fake::default();
        let freed = FREED.load(Relaxed);
        // Windows of 504 pages from pfn 0x1008, and of 497 from 0x1200: its last chunk has one.
        let memory = lazy_memory(&[extent(0, 0x1008, 1001, U)])?;
        memory.fill_at(&fake, 0)?;
        assert_eq!(fake.count(), 8);
        assert!(fake.holds(0, 0x1008, 8));
        memory.fill_at(&fake, 8)?;
        assert!(fake.holds(8, 0x1010, 16));
        memory.fill_at(&fake, 503)?;
        assert!(fake.holds(488, 0x11f0, 16));
        memory.fill_at(&fake, 999)?;
        assert!(fake.holds(984, 0x13e0, 16));
        memory.fill_at(&fake, 1000)?;
        assert!(fake.holds(1000, 0x13f0, 1));
        assert_eq!(fake.count(), 57);
        memory.restore_in_background(&fake);
        assert_eq!(fake.count(), 1001);
        assert!(fake.holds(0, 0x1008, 1001));
        assert!(memory.is_done());
        drop(memory);
        assert_eq!(FREED.load(Relaxed), freed);
        Ok(())
    }

    #[test]
    fn a_small_window_is_not_cut() -> Result {
        let fake = Fake::default();
        // Windows of 20 pages (two chunks) and 40 (three chunks).
        let memory = lazy_memory(&[extent(0, 0x11ec, 60, U)])?;
        memory.fill_at(&fake, 0)?;
        assert_eq!(fake.count(), 20);
        memory.fill_at(&fake, 59)?;
        assert!(fake.holds(52, 0x1220, 8));
        assert_eq!(fake.count(), 28);
        Ok(())
    }

    #[test]
    fn a_worker_puts_in_a_chunk_per_claim() -> Result {
        let fake = Fake::default();
        let freed = FREED.load(Relaxed);
        // From pfn 0x1008: the first chunk has 8 pages.
        let memory = lazy_memory(&[extent(0, 0x1008, 504, U)])?;
        memory.fill_window(&fake, 0, Want::Step)?;
        assert_eq!(fake.count(), 8);
        memory.fill_window(&fake, 0, Want::Step)?;
        assert!(fake.holds(0, 0x1008, 24));
        assert!(!memory.progress.lock().states[0].is_settled());
        // A fault in the middle cuts the rest; the next steps take the chunks in order.
        memory.fill_at(&fake, 300)?;
        assert!(fake.holds(296, 0x1130, 16));
        memory.fill_window(&fake, 0, Want::Step)?;
        assert!(fake.holds(0, 0x1008, 40));
        assert_eq!(fake.count(), 56);
        memory.restore_in_background(&fake);
        assert!(fake.holds(0, 0x1008, 504));
        assert!(memory.progress.lock().states[0].is_settled());
        drop(memory);
        assert_eq!(FREED.load(Relaxed), freed);

        // With a fault waiting, a worker leaves each window after a chunk: it comes back to them.
        let fake = Fake::default();
        let memory = three_windows()?;
        memory.progress.lock().waiting = 1;
        memory.fill_window(&fake, 1, Want::Step)?;
        memory.restore_in_background(&fake);
        assert!(fake.holds(0, 0x1000, 1536));
        assert!(memory.is_done());
        Ok(())
    }

    #[test]
    fn memory_short_or_a_freeze_leaves_the_rest_for_the_next_try() -> Result {
        let fake = Fake::failing(&[(5, ENOMEM), (0, EBUSY)])?;
        let freed = FREED.load(Relaxed);
        let memory = three_windows()?;
        assert_eq!(memory.fill_at(&fake, 0).err(), Some(ENOMEM));
        assert_eq!(fake.count(), 5);
        assert_eq!(memory.fill_at(&fake, 6).err(), Some(EBUSY));
        assert!(!memory.is_done());
        // The rest of the chunk goes in where it belongs, after its first 5 pages.
        memory.fill_at(&fake, 7)?;
        assert_eq!(fake.count(), 16);
        assert!(fake.holds(0, 0x1000, 16));
        // A worker stops at a frozen file; memory short is tried again, 10 ms later.
        let worker = Fake::failing(&[(0, EBUSY)])?;
        memory.restore_in_background(&worker);
        assert_eq!(worker.count(), 0);
        let worker = Fake::failing(&[(7, ENOMEM)])?;
        memory.restore_in_background(&worker);
        assert_eq!(worker.count(), 1520);
        assert!(worker.holds(16, 0x1010, 1520));
        assert!(memory.is_done());
        drop(memory);
        assert_eq!(FREED.load(Relaxed), freed);
        // Memory short for a whole window (a preserve's): a fault then cuts what is left of it.
        let memory = three_windows()?;
        let fake = Fake::failing(&[(100, ENOMEM)])?;
        assert_eq!(memory.fill_window(&fake, 0, Want::All).err(), Some(ENOMEM));
        assert_eq!(fake.count(), 100);
        memory.fill_at(&fake, 300)?;
        assert_eq!(fake.count(), 100 + 16);
        assert!(fake.holds(288, 0x1120, 16));
        memory.fill_all(&fake)?;
        assert!(fake.holds(0, 0x1000, 1536));
        drop(memory);
        assert_eq!(FREED.load(Relaxed), freed);
        Ok(())
    }

    #[test]
    fn a_refused_fill_loses_only_what_did_not_go_in() -> Result {
        let fake = Fake::failing(&[(3, EFAULT)])?;
        let freed = FREED.load(Relaxed);
        let memory = three_windows()?;
        assert_eq!(memory.fill_at(&fake, 10).err(), Some(EIO));
        assert_eq!(fake.count(), 3);
        // The pages that went in are there; the others fail, now and later.
        memory.fill_at(&fake, 2)?;
        assert_eq!(memory.fill_at(&fake, 3).err(), Some(EIO));
        assert_eq!(memory.fill_at(&fake, 511).err(), Some(EIO));
        assert_eq!(fake.count(), 3);
        // Freed with the run: nothing would put them in.
        assert_eq!(FREED.load(Relaxed), freed + 509);
        // Memory KHO refuses is lost whole.
        let lost = lazy_memory(&[extent(0, NOT_PRESERVED, 1024, U)])?;
        assert_eq!(lost.fill_at(&fake, 0).err(), Some(EIO));
        assert_eq!(lost.fill_at(&fake, 700).err(), Some(EIO));
        assert_eq!(fake.count(), 3);
        // Lost memory is settled: finish does not wait for it.
        assert_eq!(memory.fill_all(&fake).err(), Some(EIO));
        assert_eq!(fake.count(), 3 + 1024);
        assert!(memory.is_done());
        Ok(())
    }

    #[test]
    fn a_punch_hole_frees_what_is_pending_and_fills_its_edges() -> Result {
        let fake = Fake::default();
        let freed = FREED.load(Relaxed);
        let memory = three_windows()?;
        memory.discard_range(&fake, 100, 1100)?;
        // The edges went in, for the truncation to take their part in the hole; the middle
        // window was freed, and settles.
        assert_eq!(fake.count(), 1024);
        assert!(fake.holds(0, 0x1000, 512));
        assert!(fake.holds(1024, 0x1400, 512));
        assert_eq!(FREED.load(Relaxed), freed + 512);
        assert!(memory.is_done());
        // Nothing comes back into the hole.
        memory.fill_at(&fake, 600)?;
        assert_eq!(fake.count(), 1024);
        drop(memory);
        assert_eq!(FREED.load(Relaxed), freed + 512);
        Ok(())
    }

    #[test]
    fn what_is_not_in_when_the_file_goes_is_freed() -> Result {
        let fake = Fake::failing(&[(10, ENOMEM)])?;
        let freed = FREED.load(Relaxed);
        let memory = three_windows()?;
        assert_eq!(memory.fill_at(&fake, 600).err(), Some(ENOMEM));
        memory.fill_at(&fake, 0)?;
        assert_eq!(fake.count(), 26);
        drop(memory);
        // The window never touched, and the rest of the two partly in.
        assert_eq!(FREED.load(Relaxed), freed + 512 + 502 + 496);
        Ok(())
    }

    #[test]
    fn a_punch_hole_frees_the_rest_of_a_window_partly_in() -> Result {
        let fake = Fake::failing(&[(10, ENOMEM)])?;
        let freed = FREED.load(Relaxed);
        let memory = three_windows()?;
        assert_eq!(memory.fill_at(&fake, 600).err(), Some(ENOMEM));
        memory.discard_range(&fake, 512, 1024)?;
        assert_eq!(FREED.load(Relaxed), freed + 502);
        memory.fill_at(&fake, 600)?;
        assert_eq!(fake.count(), 10);
        memory.fill_all(&fake)?;
        assert!(memory.is_done());
        Ok(())
    }

    #[test]
    fn a_refused_chunk_keeps_the_chunks_that_are_in() -> Result {
        let fake = Fake::default();
        let bad = Fake::failing(&[(3, EFAULT), (0, EBUSY)])?;
        let freed = FREED.load(Relaxed);
        let memory = three_windows()?;
        // Chunk 5 goes in; chunk 0 is refused after 3 pages.
        memory.fill_at(&fake, 85)?;
        assert_eq!(memory.fill_at(&bad, 10).err(), Some(EIO));
        assert_eq!(bad.count(), 3);
        assert!(bad.holds(0, 0x1000, 3));
        assert!(fake.holds(80, 0x1050, 16));
        // The pages that went in are there; the others of the window are lost, and freed.
        assert!(memory.claim(0, Some(2))?.is_none());
        assert!(memory.claim(0, Some(95))?.is_none());
        assert_eq!(memory.claim(0, Some(3)).err(), Some(EIO));
        assert_eq!(memory.claim(0, Some(96)).err(), Some(EIO));
        assert_eq!(memory.fill_at(&bad, 200).err(), Some(EIO));
        assert_eq!(FREED.load(Relaxed), freed + 512 - 19);
        // A frozen file leaves the chunk for the next try.
        assert_eq!(memory.fill_at(&bad, 512).err(), Some(EBUSY));
        assert_eq!(memory.fill_all(&fake).err(), Some(EIO));
        assert_eq!(fake.count(), 16 + 1024);
        assert!(fake.holds(512, 0x1200, 1024));
        assert!(memory.is_done());

        // In an unaligned window, chunk 1 (pages 8-23) in, chunk 2 refused after 3 pages.
        let bad = Fake::failing(&[(3, EFAULT)])?;
        let memory = lazy_memory(&[extent(0, 0x1008, 504, U)])?;
        memory.fill_at(&fake, 8)?;
        assert_eq!(memory.fill_at(&bad, 30).err(), Some(EIO));
        assert!(bad.holds(24, 0x1020, 3));
        assert!(memory.claim(0, Some(8))?.is_none());
        assert!(memory.claim(0, Some(26))?.is_none());
        assert_eq!(memory.claim(0, Some(7)).err(), Some(EIO));
        assert_eq!(memory.claim(0, Some(27)).err(), Some(EIO));

        // A chunk partly in (memory was short) keeps what went in when another is refused.
        let short = Fake::failing(&[(5, ENOMEM)])?;
        let bad = Fake::failing(&[(3, EFAULT)])?;
        let memory = three_windows()?;
        assert_eq!(memory.fill_at(&short, 0).err(), Some(ENOMEM));
        assert_eq!(memory.fill_at(&bad, 40).err(), Some(EIO));
        assert!(bad.holds(32, 0x1020, 3));
        assert!(memory.claim(0, Some(4))?.is_none());
        assert!(memory.claim(0, Some(34))?.is_none());
        assert_eq!(memory.claim(0, Some(5)).err(), Some(EIO));
        assert_eq!(memory.claim(0, Some(35)).err(), Some(EIO));

        // Cut after a preserve put in 100 pages, in the middle of chunk 6: those count as in,
        // with the 3 of the refused chunk 7.
        let short = Fake::failing(&[(100, ENOMEM)])?;
        let bad = Fake::failing(&[(3, EFAULT)])?;
        let memory = three_windows()?;
        assert_eq!(memory.fill_window(&short, 0, Want::All).err(), Some(ENOMEM));
        assert_eq!(memory.fill_at(&bad, 120).err(), Some(EIO));
        assert!(bad.holds(112, 0x1070, 3));
        assert!(memory.claim(0, Some(95))?.is_none());
        assert!(memory.claim(0, Some(99))?.is_none());
        assert_eq!(memory.claim(0, Some(100)).err(), Some(EIO));
        assert_eq!(memory.claim(0, Some(111)).err(), Some(EIO));
        assert!(memory.claim(0, Some(114))?.is_none());
        assert_eq!(memory.claim(0, Some(115)).err(), Some(EIO));
        Ok(())
    }

    #[test]
    fn a_punch_hole_frees_the_rest_of_a_window_cut_in_chunks() -> Result {
        let fake = Fake::default();
        let freed = FREED.load(Relaxed);
        let memory = three_windows()?;
        memory.fill_at(&fake, 600)?;
        memory.fill_at(&fake, 100)?;
        // The middle window is in the hole; the first one is an edge, and goes in.
        memory.discard_range(&fake, 200, 1024)?;
        assert_eq!(FREED.load(Relaxed), freed + 512 - 16);
        assert!(fake.holds(0, 0x1000, 512));
        memory.fill_at(&fake, 700)?;
        assert_eq!(fake.count(), 16 + 512);
        memory.fill_all(&fake)?;
        assert!(memory.is_done());
        Ok(())
    }

    #[test]
    fn a_lost_edge_of_a_punch_hole_stays_lost_outside_it() -> Result {
        let fake = Fake::failing(&[(3, EFAULT)])?;
        let memory = three_windows()?;
        memory.discard_range(&fake, 100, 1100)?;
        // Pages 0-2 went in before the failure, 100-511 are in the hole: 3-99 are lost.
        assert!(fake.holds(0, 0x1000, 3));
        memory.fill_at(&fake, 2)?;
        memory.fill_at(&fake, 100)?;
        assert_eq!(memory.fill_at(&fake, 3).err(), Some(EIO));
        assert_eq!(memory.fill_at(&fake, 99).err(), Some(EIO));
        // The other edge went in whole, the middle was freed.
        assert!(fake.holds(1024, 0x1400, 512));
        memory.fill_at(&fake, 600)?;
        assert_eq!(fake.count(), 3 + 512);
        assert!(memory.is_done());
        Ok(())
    }

    #[test]
    fn memory_that_is_not_guest_memory_goes_in_not_uptodate() -> Result {
        let fake = Fake::default();
        let memory = lazy_memory(&[extent(0, 0x1000, 512, 0), extent(512, 0x1200, 8, U)])?;
        memory.fill_all(&fake)?;
        assert!(fake.holds_as(0, 0x1000, 512, false));
        assert!(fake.holds(512, 0x1200, 8));
        Ok(())
    }

    #[test]
    fn a_window_is_taken_back_once() -> Result {
        let fake = Fake::default();
        let memory = three_windows()?;
        memory.fill_at(&fake, 0)?;
        // What the fake KHO has handed out, it refuses: as a second fill or free would find.
        assert_eq!(Fake::take_back(0x1000, 512).err(), Some(EINVAL));
        assert!(Fake::take_back(0x2000, 512).is_ok());
        Ok(())
    }

    #[test]
    fn stopped_workers_put_nothing_in() -> Result {
        let fake = Fake::default();
        let memory = three_windows()?;
        memory.stop_workers();
        memory.restore_in_background(&fake);
        assert_eq!(fake.count(), 0);
        // First use still works.
        memory.fill_all(&fake)?;
        assert_eq!(fake.count(), 1536);
        assert!(memory.is_done());
        Ok(())
    }
}
