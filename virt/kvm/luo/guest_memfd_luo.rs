// SPDX-License-Identifier: GPL-2.0

//! Live update of guest_memfd files: guest RAM that survives a kexec.
//!
//! A LUO file handler for the files `KVM_CREATE_GUEST_MEMFD` returns. Preserving a file freezes
//! it (no memory is added or removed until it is unpreserved or the kexec happens), walks its
//! page cache and records *extents*: runs of folios that are contiguous both in the file and in
//! physical memory, on one NUMA node. Each extent is one KHO preservation, holding a reference
//! to each of its folios, and 24 bytes of metadata; holes cost nothing. Folios that were
//! allocated but never used are zeroed then, as their first use would, so every preserved folio
//! is uptodate: the guest and the VMM may go on writing to guest memory until the kexec, and the
//! new kernel sees exactly what the memory holds at kexec time. Folios with a hardware memory
//! error are refused. At freeze time the handler records the token of the file's VM, which must
//! be preserved in the same session.
//!
//! In the new kernel, retrieve gets the VM (through the session, so the VMM may retrieve the two
//! files in any order) and creates a guest_memfd of the same size and flags for it before it
//! takes any memory back: if either fails, the file stays retrievable and nothing is lost. Then
//! it puts every page back at its index.
//!
//! Private memory is supported for software-protected VMs, whose private memory is plain memory;
//! VMs whose private memory is encrypted by hardware are refused.
//!
//! The ABI is documented in `Documentation/virt/kvm/luo.rst`.

use kernel::{
    folio::{
        Folio,
        FolioRun,
        Span, //
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
        FrozenGuestMemfd,
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
        RetrieveStatus, //
    },
    page::PAGE_SIZE,
    prelude::*,
    sync::aref::ARef,
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
}

/// The handler's compatible string. The number is the version of the ABI below.
const COMPATIBLE: &CStr = c"kvm-gmem-rs-v1";

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

/// How many times finish tries to free an unretrieved file when memory is short.
const FINISH_TRIES: u32 = 10;

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
    /// One preservation per extent.
    _pages: KVVec<PreservedPages>,
    /// The extent records.
    _extents: PreservedVec<ExtentSer>,
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
        .for_each_folio(|folio: ARef<Folio>| {
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
    let mut pages = KVVec::with_capacity(runs.len(), GFP_KERNEL)?;
    let mut records = VVec::with_capacity(runs.len(), GFP_KERNEL)?;
    for run in runs {
        records.push(Extent::uptodate(run.span()).encode(), GFP_KERNEL)?;
        pages.push(PreservedPages::new(run)?, GFP_KERNEL)?;
    }
    Ok((pages, PreservedVec::new(records)?))
}

/// Takes back and validates the extent records; from here on, the preserved state is consumed.
fn restore_extents(serialized: &GmemSer, extents: &mut KVVec<Extent>) -> Result {
    let nr = extent_count(serialized)?;
    let records = RestoredVec::<ExtentSer>::restore(&serialized.extents, nr)?;
    validate_extents(&records, serialized.size.get(), extents)
        .inspect_err(|_| pr_err!("preserved guest_memfd extents are inconsistent\n"))
}

/// Frees the memory of extents that will not be restored into a file. Allocates nothing but
/// what KHO needs to map the records, and frees every extent it can even when one fails.
fn release_extents(serialized: &GmemSer) -> Result {
    let nr = extent_count(serialized)?;
    let records = RestoredVec::<ExtentSer>::restore(&serialized.extents, nr)?;
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

/// What retrieve needs before it takes any memory back.
struct Prepared {
    gmem: GuestMemfdFile,
    extents: KVVec<Extent>,
    runs: KVVec<RestoredPages>,
}

/// Everything of a retrieve that can fail for an ordinary reason: the VM, the new file, memory
/// for the lists. Nothing of the preserved state is consumed.
fn prepare_retrieve(serialized: &GmemSer, session: &IncomingSession<'_>) -> Result<Prepared> {
    let nr = extent_count(serialized)?;
    let flags = flags_from_ser(serialized.flags.get())?;
    let vm_file = session.file(serialized.vm_token.get())?;
    let kvm = Kvm::from_file(&vm_file).ok_or(EINVAL)?;
    Ok(Prepared {
        gmem: GuestMemfdFile::create(kvm, serialized.size.get(), flags)?,
        extents: KVVec::with_capacity(nr, GFP_KERNEL)?,
        runs: KVVec::with_capacity(nr, GFP_KERNEL)?,
    })
}

#[vtable]
impl FileHandler for GmemHandler {
    const COMPATIBLE: &'static CStr = COMPATIBLE;
    type Serialized = GmemSer;
    type State = GmemState;

    fn can_preserve(file: &File) -> bool {
        GuestMemfd::of(file).is_some()
    }

    fn preserve(file: &File, _session: &OutgoingSession<'_>) -> Result<Outgoing<Self>> {
        let gmem = GuestMemfd::of(file).ok_or(EBADF)?;
        check_vm(&gmem)?;
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
        serialized: Restored<GmemSer>,
        session: &IncomingSession<'_>,
    ) -> Result<ARef<File>, RetrieveError<Self>> {
        let Prepared {
            gmem,
            mut extents,
            mut runs,
        } = match prepare_retrieve(&serialized, session) {
            Ok(prepared) => prepared,
            Err(err) => return Err(RetrieveError::retry(err, serialized)),
        };

        // Taking the records back consumes the preserved state, unless KHO could not allocate
        // what it needs to map them: then nothing is lost either.
        match restore_extents(&serialized, &mut extents) {
            Ok(()) => (),
            Err(ENOMEM) => return Err(RetrieveError::retry(ENOMEM, serialized)),
            Err(err) => return Err(err.into()),
        }
        // From here on the preserved state is consumed: take back the pages of every extent, so
        // that every error below frees them. An extent KHO refuses fails the retrieve, and the
        // pages of the extents after it are freed as well.
        for (i, extent) in extents.iter().enumerate() {
            match RestoredPages::restore(extent.pfn, extent.nr_pages) {
                Ok(run) => runs.push_within_capacity(run).map_err(|_| EINVAL)?,
                Err(err) => {
                    pr_err!("preserved guest_memfd pages are inconsistent\n");
                    extents[i + 1..]
                        .iter()
                        .filter_map(|rest| RestoredPages::restore(rest.pfn, rest.nr_pages).ok())
                        .for_each(drop);
                    return Err(err.into());
                }
            }
        }
        // On error, the pages not inserted yet are freed, and those already inserted go with
        // the new file.
        for (extent, run) in extents.iter().zip(runs) {
            gmem.insert_pages(run, extent.index, extent.flags & EXTENT_UPTODATE != 0)?;
        }
        Ok(gmem.into_file())
    }

    fn finish(_status: RetrieveStatus, unretrieved: Option<Restored<GmemSer>>) {
        if let Some(serialized) = unretrieved {
            if let Err(err) = retry_on_enomem(FINISH_TRIES, || release_extents(&serialized)) {
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
