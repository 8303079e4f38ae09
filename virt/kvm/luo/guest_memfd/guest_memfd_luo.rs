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
//! it takes the extent records back and returns the file, with its memory still preserved: it
//! goes into the file the first time something needs memory there (a vCPU fault, a fault through
//! a mapping, `fallocate()`), 16 pages around the fault (a chunk, aligned in physical memory),
//! or when background work items (unbound, as many as CPUs, at most 16) get to it, a chunk at a
//! time, started by the first try to finish the session (or its release): until the VMM says it
//! is done with its restore, the CPUs are its own. A fault waits for at most 32 pages (what is
//! left of its window when that lies in two chunks; 512 without memory for a window's chunk
//! table, or behind a preserve or a punch-hole, which put in whole windows), in a time that does
//! not depend on the size of the file. A punch-hole frees the pending memory in the hole. LUO's
//! finish is refused (`EBUSY`) until every window is settled: in, punched out, or lost (KHO or
//! the page cache refused it, which is logged, and said again at finish). Faults
//! on lost memory fail with `EIO`, until a punch-hole takes it out: the hole then reads zeros like
//! any other. A session closed without finish finishes at once, and the file keeps putting its
//! memory in, or frees it when it goes. The module parameter `background_restore=0` leaves it all
//! to first use.
//! Lockdep checks a window being put in as a lock, held by whoever puts it in and waited for by
//! the others.
//!
//! Private memory is supported for software-protected VMs, whose private memory is plain memory;
//! VMs whose private memory is encrypted by hardware are refused.
//!
//! The ABI is documented in `Documentation/virt/kvm/luo.rst`.
//!
//! # Parts
//!
//! - [`abi`]: the preserved head and extent records, and their validation.
//! - [`windows`]: the pieces the memory was preserved in, and their order and overlap checks.
//! - [`lazy`]: the state of each window of a retrieved file, and how memory goes in.
//! - [`workers`]: the background work items.
//! - This file: the handler (preserve, freeze, retrieve, finish) and the freeing of memory that
//!   no file will take.
//!
//! # Locks
//!
//! Taken in this order (C and Rust):
//!
//! 0. What the callers of the filler hold: `mmap_lock` or the VMA lock (faults through a
//!    mapping), `kvm->srcu` and `vcpu->mutex` (vCPU faults).
//! 1. LUO's session and file mutexes (every handler callback).
//! 2. The mapping's `invalidate_lock`: exclusive in a punch-hole (`GmemFiller::discard()`) and in
//!    `kvm_gmem_populate()` (only for VMs with encrypted memory, which are refused), shared in
//!    `fallocate()` (`GmemFiller::fill()`); not held by vCPU or user faults, nor by workers.
//! 3. A window being put in (`Filling`): held from the claim until it settles, waited for by
//!    everyone else who needs it; lockdep sees it as `guest_memfd_luo_filling`. Whoever holds it
//!    needs neither `invalidate_lock` nor a LUO mutex to finish, which is why waiting for it under
//!    them is safe: `GmemInode::fill_pages()` must never take `invalidate_lock`.
//! 4. The file's `freeze_lock`, for read, inside `GmemInode::fill_pages()` (a freeze cannot start
//!    half way through a call; a frozen file gives `EBUSY`) and in the faults' own folio
//!    allocation after the fill; for write by freeze and unfreeze, under `invalidate_lock` (a
//!    preserve freezes only once every window is in).
//! 5. The page cache's own locks, inside `GmemInode::fill_pages()`.
//!
//! `workers::Retrieved`'s `idle` spinlock is a leaf: nothing is taken, freed or started under it.
//! [`lazy::LazyMemory`]'s `progress` mutex is a leaf among the sleeping locks: under it nothing
//! sleeps but its condvar's wait, which drops it, and only spinlocks are taken (`kfree()` of
//! page bits, `printk()`).

use abi::{
    counts,
    flags_from_ser,
    flags_to_ser,
    records_of,
    validate_extents,
    Counts,
    Extent,
    ExtentSer,
    GmemSer,
    COMPATIBLE,
    LEGACY_COMPATIBLE,
    MAX_FILE_PAGES,
    REFUSED_V1,
    REFUSED_V2,
    WINDOW_ORDER, //
};
use core::convert::Infallible;
use kernel::{
    folio::FolioRun,
    fs::File,
    kho::{
        Preserved,
        PreservedPages,
        PreservedVec,
        Restored,
        RestoredPages,
        RestoredVec, //
    },
    kvm::{
        filler_of,
        memcg_has_room,
        FillerSlot,
        FrozenGuestMemfd,
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
    page::PAGE_SIZE,
    prelude::*,
    sync::aref::ARef,
    task::cond_resched,
};
use lazy::LazyReserve;
use windows::{
    sort_by_key,
    window_count,
    windows_of, //
};
use workers::{
    Retrieved,
    RetrievedSlot, //
};

mod abi;
mod lazy;
mod windows;
mod workers;

kernel::module_liveupdate_handler! {
    type: GmemHandler<false>,
    legacy: GmemHandler<true>,
    legacy_if: !module_parameters::refuse_legacy.value(),
    refused: [
        Some(REFUSED_V1),
        Some(REFUSED_V2),
        module_parameters::refuse_legacy.value().then_some(LEGACY_COMPATIBLE),
    ],
    name: "guest_memfd_luo",
    authors: ["KVM live update in Rust developers"],
    description: "Live update of KVM guest_memfd files",
    license: "GPL",
    params: {
        background_restore: bool {
            default: true,
            description: "Put retrieved guest memory back in the background, not only on first use",
        },
        preserve_legacy: bool {
            default: false,
            description: "Preserve under the earlier name, kvm-gmem-rs-v3 (an update back, tests)",
        },
        refuse_legacy: bool {
            default: false,
            description: "Refuse kvm-gmem-rs-v3 files, as a kernel without their reader (tests)",
        },
    },
}

/// Lets other tasks run every 4096 steps of a loop over a table of extents or windows, which for
/// memory in single pages has an entry per page.
fn pace(step: usize) {
    if step % 4096 == 4095 {
        cond_resched();
    }
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

/// The guest_memfd handler: under [`COMPATIBLE`], or when `LEGACY`, under
/// [`LEGACY_COMPATIBLE`], which it reads but writes only with the `preserve_legacy` parameter (the
/// tests' older kernel).
struct GmemHandler<const LEGACY: bool>;

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
        .for_each_run(|run: FolioRun| {
            pace(step);
            step += 1;
            // The walk cuts runs where its calls to C end.
            let run = match runs.last_mut() {
                Some(last) => match last.try_join(run) {
                    Ok(()) => return Ok(()),
                    Err(run) => run,
                },
                None => run,
            };
            runs.push(run, GFP_KERNEL)?;
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
    reserve: LazyReserve<GmemInode>,
    slot: FillerSlot<Retrieved>,
    filler: RetrievedSlot,
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
        filler: RetrievedSlot::new()?,
    })
}

#[vtable]
impl<const LEGACY: bool> FileHandler for GmemHandler<LEGACY> {
    const COMPATIBLE: &'static CStr = if LEGACY {
        LEGACY_COMPATIBLE
    } else {
        COMPATIBLE
    };
    type Serialized = GmemSer;
    type State = GmemState;
    /// Everything that can fail for an ordinary reason comes before the records are taken back.
    type Partial = Infallible;

    fn can_preserve(file: &File) -> bool {
        LEGACY == module_parameters::preserve_legacy.value() && GuestMemfd::of(file).is_some()
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
        if let Some((retrieved, inode)) = filler_of::<Retrieved>(file) {
            retrieved.memory().fill_all(&inode)?;
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
            filler,
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
        // The background workers wait for the session's finish (see `can_finish`).
        gmem.set_filler(slot, filler.fill(memory))?;
        if LEGACY {
            pr_info!(
                "retrieved a guest_memfd an earlier kernel preserved as {LEGACY_COMPATIBLE:?}\n"
            );
        }
        Ok(gmem.into_file())
    }

    fn can_finish(file: Option<&File>, _status: RetrieveStatus, releasing: bool) -> bool {
        let Some((retrieved, inode)) = file.and_then(filler_of::<Retrieved>) else {
            return true;
        };
        // The VMM is done with its restore: from now on the workers put the rest of the memory
        // in, while the guest runs.
        retrieved.start_workers(&inode);
        // Finish means all memory is settled: not before every window is. When the session is
        // released, a refusal would keep it and the file until reboot; the pending memory
        // belongs to the file, which puts it in as it is used (and by the workers), or frees it
        // when it goes.
        releasing || retrieved.memory().is_done()
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

/// What the KUnit tests of every part build their cases from.
#[cfg(CONFIG_KUNIT = "y")]
mod test_helpers {
    use super::{
        abi::{
            validate_extents,
            Extent,
            ExtentSer,
            EXTENT_UPTODATE, //
        },
        windows::{
            windows_of,
            Window, //
        },
    };
    use kernel::{
        folio::Span,
        prelude::*, //
    };

    pub(crate) fn extent(index: u64, pfn: u64, nr_pages: u64, flags: u64) -> Extent {
        Extent {
            index,
            pfn,
            nr_pages,
            flags,
        }
    }

    pub(crate) fn span(index: u64, pfn: u64, nr_pages: u64, nid: i32) -> Span {
        Span {
            index,
            pfn,
            nr_pages,
            nid,
        }
    }

    pub(crate) fn records(list: &[Extent]) -> Result<KVVec<ExtentSer>> {
        let mut out = KVVec::new();
        for e in list {
            out.push(e.encode(), GFP_KERNEL)?;
        }
        Ok(out)
    }

    pub(crate) const U: u64 = EXTENT_UPTODATE;

    pub(crate) fn windows(list: &[Extent]) -> Result<KVVec<Window>> {
        let mut out = KVVec::new();
        for w in list.iter().flat_map(windows_of) {
            out.push(w, GFP_KERNEL)?;
        }
        Ok(out)
    }

    pub(crate) fn validate(list: &[ExtentSer], size: u64, nr_pages: u64) -> Result<VVec<Extent>> {
        let mut out = VVec::with_capacity(list.len(), GFP_KERNEL)?;
        validate_extents(list, size, nr_pages, &mut out)?;
        Ok(out)
    }
}

#[kunit_tests(guest_memfd_luo)]
mod tests {
    use super::*;
    use crate::{
        test_helpers::*,
        windows::check_disjoint, //
    };
    use kernel::folio::Span;

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
}
