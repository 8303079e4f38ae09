// SPDX-License-Identifier: GPL-2.0

//! Live update of guest_memfd files: guest RAM that survives a kexec.
//!
//! A LUO file handler for the files `KVM_CREATE_GUEST_MEMFD` returns. Preserving a file freezes
//! it (no memory is added or removed until it is unpreserved or the kexec happens), walks its
//! page cache and records *extents*: runs of folios that are contiguous both in the file and in
//! physical memory and have the same state. Each extent is one KHO preservation and 24 bytes of
//! metadata; holes cost nothing. At freeze time the handler records the token of the file's VM,
//! which must be preserved in the same session.
//!
//! In the new kernel, retrieve gets the VM (through the session, so the VMM may retrieve the two
//! files in any order), creates a guest_memfd of the same size and flags for it, and puts every
//! page back at its index with its uptodate state.
//!
//! Private memory is supported for software-protected VMs, whose private memory is plain memory;
//! VMs whose private memory is encrypted by hardware are refused.
//!
//! The ABI is documented in `Documentation/virt/kvm/luo.rst`.

use kernel::{
    folio::{
        self,
        Folio, //
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
        FileHandler,
        IncomingSession,
        Outgoing,
        OutgoingSession,
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

/// VM types whose guest_memfd memory is plain memory, private or shared.
const PLAIN_MEMORY_VM_TYPES: [u64; 2] = [kvm::VM_TYPE_X86_DEFAULT, kvm::VM_TYPE_X86_SW_PROTECTED];

/// File flags in the ABI, owned by it and mapped to and from the kernel's `GUEST_MEMFD_FLAG_*`.
const SER_FLAG_MMAP: u32 = 1 << 0;
const SER_FLAG_INIT_SHARED: u32 = 1 << 1;
const SER_FLAGS: [(u32, u64); 2] = [
    (SER_FLAG_MMAP, kvm::GUEST_MEMFD_FLAG_MMAP),
    (SER_FLAG_INIT_SHARED, kvm::GUEST_MEMFD_FLAG_INIT_SHARED),
];

/// The ABI flags for the kernel's guest_memfd `flags`; `EOPNOTSUPP` for a flag this version
/// does not carry over.
fn flags_to_ser(flags: u64) -> Result<u32> {
    let mut left = flags;
    let mut ser = 0;
    for (ser_flag, flag) in SER_FLAGS {
        if flags & flag != 0 {
            ser |= ser_flag;
            left &= !flag;
        }
    }
    if left != 0 {
        return Err(EOPNOTSUPP);
    }
    Ok(ser)
}

/// The kernel's guest_memfd flags for ABI flags `ser`; `EOPNOTSUPP` for an unknown bit.
fn flags_from_ser(ser: u32) -> Result<u64> {
    let mut left = ser;
    let mut flags = 0;
    for (ser_flag, flag) in SER_FLAGS {
        if ser & ser_flag != 0 {
            flags |= flag;
            left &= !ser_flag;
        }
    }
    if left != 0 {
        return Err(EOPNOTSUPP);
    }
    Ok(flags)
}

/// Extent flag: the folios are uptodate (their contents are valid guest memory).
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

    /// Whether `next` continues this extent in the file and in physical memory, with the same
    /// flags.
    fn continues_with(&self, next: &Extent) -> bool {
        self.flags == next.flags
            && self.index.checked_add(self.nr_pages) == Some(next.index)
            && self.pfn.checked_add(self.nr_pages) == Some(next.pfn)
    }
}

/// Builds extents from folios seen in increasing index order.
struct ExtentBuilder {
    extents: VVec<Extent>,
}

impl ExtentBuilder {
    fn new() -> Self {
        Self {
            extents: VVec::new(),
        }
    }

    fn push(&mut self, next: Extent) -> Result {
        if let Some(last) = self.extents.last_mut() {
            if next.index < last.index.saturating_add(last.nr_pages) {
                return Err(EINVAL);
            }
            if last.continues_with(&next) {
                last.nr_pages += next.nr_pages;
                return Ok(());
            }
        }
        if self.extents.len() as u64 >= MAX_EXTENTS {
            return Err(E2BIG);
        }
        self.extents.push(next, GFP_KERNEL)?;
        Ok(())
    }
}

/// Checks the extents the previous kernel recorded before any memory is touched: `nr` of them,
/// within what was restored, each non-empty, inside the file, in increasing index order without
/// overlap, with a pfn other than 0 and known flags.
fn validate_extents(restored: &[ExtentSer], nr: u64, size: u64) -> Result<KVVec<Extent>> {
    if nr > MAX_EXTENTS {
        return Err(E2BIG);
    }
    let records = restored.get(..nr as usize).ok_or(EINVAL)?;
    let file_pages = size / PAGE_SIZE as u64;
    let mut extents = KVVec::with_capacity(records.len(), GFP_KERNEL)?;
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
        extents.push(extent, GFP_KERNEL)?;
    }
    Ok(extents)
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
    if !PLAIN_MEMORY_VM_TYPES.contains(&gmem.kvm.vm_type()) {
        pr_err!("refusing to preserve guest_memfd of a VM with encrypted memory\n");
        return Err(EOPNOTSUPP);
    }
    flags_to_ser(gmem.flags).map(|_| ())
}

/// Records the extents of a frozen file and preserves their pages.
fn preserve_memory(file: &File) -> Result<(KVVec<PreservedPages>, PreservedVec<ExtentSer>)> {
    let mut builder = ExtentBuilder::new();
    folio::for_each_in_file(file, |folio: &Folio| {
        builder.push(Extent {
            index: folio.index(),
            pfn: folio.pfn(),
            nr_pages: folio.nr_pages(),
            flags: if folio.is_uptodate() {
                EXTENT_UPTODATE
            } else {
                0
            },
        })
    })?;
    let mut pages = KVVec::with_capacity(builder.extents.len(), GFP_KERNEL)?;
    let mut records = VVec::with_capacity(builder.extents.len(), GFP_KERNEL)?;
    for extent in builder.extents.iter() {
        pages.push(
            PreservedPages::new(extent.pfn, extent.nr_pages)?,
            GFP_KERNEL,
        )?;
        records.push(extent.encode(), GFP_KERNEL)?;
    }
    Ok((pages, PreservedVec::new(records)?))
}

/// Frees the memory of extents that will not be restored into a file.
fn release_extents(serialized: &GmemSer) -> Result {
    let restored = RestoredVec::<ExtentSer>::restore(&serialized.extents)?;
    let extents = validate_extents(
        &restored,
        u64::from(serialized.nr_extents.get()),
        serialized.size.get(),
    )?;
    for extent in extents.iter() {
        drop(RestoredPages::restore(extent.pfn, extent.nr_pages)?);
    }
    Ok(())
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
        let (pages, extents) = preserve_memory(file)?;
        let nr_pages: u64 = pages.iter().map(PreservedPages::nr_pages).sum();
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
        Ok(Outgoing {
            serialized,
            state: GmemState {
                _frozen: frozen,
                _pages: pages,
                _extents: extents,
            },
        })
    }

    fn freeze(file: &File, outgoing: &mut Outgoing<Self>, session: &OutgoingSession<'_>) -> Result {
        let gmem = GuestMemfd::of(file).ok_or(EBADF)?;
        let vm_file = gmem.kvm.file().ok_or(ENOENT)?;
        let token = session.token_of(&vm_file).inspect_err(|_| {
            pr_err!("a guest_memfd is preserved without its VM in the same session\n");
        })?;
        outgoing.serialized.vm_token = token.into();
        Ok(())
    }

    fn retrieve(
        serialized: Restored<GmemSer>,
        session: &IncomingSession<'_>,
    ) -> Result<ARef<File>> {
        // Take all the memory back before anything can fail, so that every error below frees
        // it: the records, then the pages of every extent.
        let restored = RestoredVec::<ExtentSer>::restore(&serialized.extents)?;
        let size = serialized.size.get();
        let extents = validate_extents(&restored, u64::from(serialized.nr_extents.get()), size)
            .inspect_err(|_| pr_err!("preserved guest_memfd extents are inconsistent\n"))?;
        let mut runs = KVVec::with_capacity(extents.len(), GFP_KERNEL)?;
        for extent in extents.iter() {
            runs.push(
                RestoredPages::restore(extent.pfn, extent.nr_pages)?,
                GFP_KERNEL,
            )?;
        }
        let flags = flags_from_ser(serialized.flags.get())?;

        let vm_file = session.file(serialized.vm_token.get())?;
        let kvm = Kvm::from_file(&vm_file).ok_or(EINVAL)?;
        let gmem = GuestMemfdFile::create(kvm, size, flags)?;

        // On error, the pages not inserted yet are freed, and those already inserted go with
        // the new file.
        for (extent, run) in extents.iter().zip(runs) {
            gmem.insert_pages(run, extent.index, extent.flags & EXTENT_UPTODATE != 0)?;
        }
        Ok(gmem.into_file())
    }

    fn finish(_status: RetrieveStatus, unretrieved: Option<Restored<GmemSer>>) {
        if let Some(serialized) = unretrieved {
            if release_extents(&serialized).is_err() {
                pr_warn!("could not free the memory of an unretrieved guest_memfd\n");
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

    fn build(folios: &[Extent]) -> Result<KVVec<Extent>> {
        let mut builder = ExtentBuilder::new();
        for f in folios {
            builder.push(*f)?;
        }
        let mut out = KVVec::new();
        for e in builder.extents.iter() {
            out.push(*e, GFP_KERNEL)?;
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
        let out = build(&[
            extent(0, 100, 1, U),
            extent(1, 101, 1, U),
            extent(2, 102, 2, U),
        ])?;
        assert_eq!(&out[..], &[extent(0, 100, 4, U)]);
        Ok(())
    }

    #[test]
    fn breaks_split_extents() -> Result {
        // A hole in the file, a jump in physical memory, a change of state.
        let out = build(&[
            extent(0, 100, 1, U),
            extent(2, 102, 1, U),
            extent(3, 200, 1, U),
            extent(4, 201, 1, 0),
        ])?;
        assert_eq!(
            &out[..],
            &[
                extent(0, 100, 1, U),
                extent(2, 102, 1, U),
                extent(3, 200, 1, U),
                extent(4, 201, 1, 0)
            ]
        );
        Ok(())
    }

    #[test]
    fn builder_rejects_overlap() {
        assert_eq!(
            build(&[extent(0, 100, 4, U), extent(2, 300, 1, U)]).err(),
            Some(EINVAL)
        );
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

    #[test]
    fn validate_accepts_good_extents() -> Result {
        let list = records(&[extent(0, 100, 4, U), extent(8, 300, 8, 0)])?;
        assert_eq!(validate_extents(&list, 2, 16 * 4096)?.len(), 2);
        Ok(())
    }

    #[test]
    fn validate_rejects_bad_counts() -> Result {
        let list = records(&[extent(0, 100, 4, U)])?;
        assert_eq!(validate_extents(&list, 2, 1 << 30).err(), Some(EINVAL));
        assert_eq!(
            validate_extents(&list, MAX_EXTENTS + 1, 1 << 30).err(),
            Some(E2BIG)
        );
        Ok(())
    }

    #[test]
    fn validate_rejects_outside_overlapping_unordered() -> Result {
        let outside = records(&[extent(14, 100, 4, U)])?;
        assert_eq!(validate_extents(&outside, 1, 16 * 4096).err(), Some(EINVAL));
        let overlap = records(&[extent(0, 100, 4, U), extent(3, 200, 1, U)])?;
        assert_eq!(validate_extents(&overlap, 2, 1 << 30).err(), Some(EINVAL));
        let unordered = records(&[extent(8, 100, 1, U), extent(0, 200, 1, U)])?;
        assert_eq!(validate_extents(&unordered, 2, 1 << 30).err(), Some(EINVAL));
        let wrapping = records(&[extent(u64::MAX, 100, 2, U)])?;
        assert_eq!(validate_extents(&wrapping, 1, 1 << 30).err(), Some(EINVAL));
        Ok(())
    }

    #[test]
    fn validate_rejects_pfn_zero_empty_and_unknown_flags() -> Result {
        let zero = records(&[extent(0, 0, 1, U)])?;
        assert_eq!(validate_extents(&zero, 1, 1 << 30).err(), Some(EINVAL));
        let empty = records(&[extent(0, 100, 0, U)])?;
        assert_eq!(validate_extents(&empty, 1, 1 << 30).err(), Some(EINVAL));
        let unknown = records(&[extent(0, 100, 1, 1 << 5)])?;
        assert_eq!(
            validate_extents(&unknown, 1, 1 << 30).err(),
            Some(EOPNOTSUPP)
        );
        Ok(())
    }
}
