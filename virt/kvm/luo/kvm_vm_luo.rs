// SPDX-License-Identifier: GPL-2.0

//! Live update of KVM VM files.
//!
//! A LUO file handler for the file `KVM_CREATE_VM` returns. It preserves the VM type and the
//! memory attributes of every guest frame (private or shared, for VMs with
//! `KVM_CAP_MEMORY_ATTRIBUTES`), and in the new kernel creates a fresh VM of that type with
//! those attributes. Guest memory itself is preserved by the guest_memfd handler; vCPUs,
//! memslots and devices are rebuilt by the VMM.
//!
//! The attributes are recorded when LUO freezes the file, right before the kexec, so the ones
//! that reach the new kernel are those in force at kexec time: a `KVM_SET_MEMORY_ATTRIBUTES`
//! after `LIVEUPDATE_SESSION_PRESERVE_FD` is carried over as long as it completes before the
//! reboot. They are stored as ranges of frames with equal attributes, not one entry per page,
//! as many as there are: the guest decides how many (by converting memory), and freeze, inside
//! `reboot()`, must not fail because of it for every VM of the host. A VM that KVM marked dead
//! or bugged after it was preserved does not fail the freeze either: it is recorded as such, and
//! the new kernel refuses to retrieve it.
//!
//! A retrieve that fails for want of memory, before or after it took the ranges back, can be
//! tried again: the ranges it took back are kept with the file until it is.
//!
//! The ABI is documented in `Documentation/virt/kvm/luo.rst`.

use kernel::{
    bindings,
    fs::File,
    kho::{
        Preserved,
        PreservedVec,
        Restored,
        RestoredVec,
        VmallocDesc, //
    },
    kvm::{
        self,
        Kvm, //
    },
    liveupdate::{
        compatible,
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
    prelude::*,
    str::CString,
    sync::{
        aref::ARef,
        atomic::{
            Atomic,
            Relaxed, //
        },
    },
};
use zerocopy::byteorder::little_endian::U64;

kernel::module_liveupdate_handler! {
    type: VmHandler<false>,
    legacy: VmHandler<true>,
    legacy_if: !module_parameters::refuse_legacy.value(),
    refused: [
        Some(REFUSED_V1),
        module_parameters::refuse_legacy.value().then_some(LEGACY_COMPATIBLE),
    ],
    name: "kvm_vm_luo",
    authors: ["KVM live update in Rust developers"],
    description: "Live update of KVM VM files",
    license: "GPL",
    params: {
        preserve_legacy: bool {
            default: false,
            description: "Preserve VMs under their earlier name, kvm-vm-rs-v2 (tests)",
        },
        refuse_legacy: bool {
            default: false,
            description: "Refuse kvm-vm-rs-v2 VMs, as a kernel without their reader (tests)",
        },
    },
}

/// The handler's compatible string. The number is the version of the ABI below.
const COMPATIBLE: &CStr = compatible(bindings::KVM_VM_LUO_COMPATIBLE);

/// The name kernels before this one gave the same layout: files preserved under it are read as
/// this version's.
const LEGACY_COMPATIBLE: &CStr = compatible(bindings::KVM_VM_LUO_COMPATIBLE_LEGACY);

/// The name of the layout before, which this kernel does not read: such VMs are refused one by
/// one rather than fail every open of `/dev/liveupdate`.
const REFUSED_V1: &CStr = compatible(bindings::KVM_VM_LUO_COMPATIBLE_REFUSED_V1);

/// Flag of [`VmSer::flags`]: KVM had marked the VM dead or bugged when it was frozen.
const VM_SER_DEAD: u64 = bindings::KVM_VM_LUO_DEAD;

/// Guest frame numbers must stay below this (52-bit guest physical addresses).
const GFN_LIMIT: u64 = 1 << (52 - kernel::page::PAGE_SHIFT);

/// The preserved head of a VM: `struct kvm_vm_luo_ser` of `include/linux/kho/abi/kvm.h`.
#[repr(C)]
#[derive(FromBytes, IntoBytes)]
pub struct VmSer {
    /// The type passed to `KVM_CREATE_VM`.
    vm_type: U64,
    /// `VM_SER_*` flags.
    flags: U64,
    /// Number of [`AttrRange`] records in `ranges`.
    nr_ranges: U64,
    /// The vmalloc'ed array of [`AttrRange`], ordered by `start`, non-overlapping.
    ranges: VmallocDesc,
}

/// Frames `[start, start + nr_pages)` all have the memory attributes `attrs`:
/// `struct kvm_vm_luo_attr_range` of the ABI header.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes)]
pub struct AttrRange {
    start: U64,
    nr_pages: U64,
    attrs: U64,
}

kernel::assert_abi_layout!(
    VmSer,
    bindings::kvm_vm_luo_ser,
    [vm_type, flags, nr_ranges, ranges]
);
kernel::assert_abi_layout!(
    AttrRange,
    bindings::kvm_vm_luo_attr_range,
    [start, nr_pages, attrs]
);

impl AttrRange {
    fn new(start: u64, nr_pages: u64, attrs: u64) -> Self {
        Self {
            start: start.into(),
            nr_pages: nr_pages.into(),
            attrs: attrs.into(),
        }
    }

    fn end(&self) -> Option<u64> {
        self.start.get().checked_add(self.nr_pages.get())
    }
}

/// Builds the list of attribute ranges from runs reported in increasing frame order, merging
/// adjacent runs with equal attributes.
struct RangeEncoder {
    ranges: VVec<AttrRange>,
}

impl RangeEncoder {
    fn new() -> Self {
        Self {
            ranges: VVec::new(),
        }
    }

    /// Adds frames `[start, end)` with attributes `attrs`; frames without attributes are not
    /// recorded.
    fn push(&mut self, start: u64, end: u64, attrs: u64) -> Result {
        if start >= end {
            return Err(EINVAL);
        }
        if let Some(last) = self.ranges.last_mut() {
            let last_end = last.end().ok_or(EINVAL)?;
            if start < last_end {
                return Err(EINVAL);
            }
            if start == last_end && last.attrs.get() == attrs {
                last.nr_pages = (end - last.start.get()).into();
                return Ok(());
            }
        }
        if attrs == 0 {
            return Ok(());
        }
        self.ranges
            .push(AttrRange::new(start, end - start, attrs), GFP_KERNEL)?;
        Ok(())
    }
}

/// Checks the ranges the previous kernel recorded: each non-empty, inside the guest physical
/// address space, in increasing order without overlap, with known attribute bits only.
fn validate_ranges(ranges: &[AttrRange], supported: u64) -> Result {
    let mut prev_end = 0;
    for range in ranges {
        let end = range.end().ok_or(EINVAL)?;
        if range.nr_pages.get() == 0 || range.start.get() < prev_end || end > GFN_LIMIT {
            return Err(EINVAL);
        }
        let attrs = range.attrs.get();
        if attrs == 0 {
            return Err(EINVAL);
        }
        if attrs & !supported != 0 {
            return Err(EOPNOTSUPP);
        }
        prev_end = end;
    }
    Ok(())
}

/// Records the memory attributes of `kvm` as ranges, preserved for the next kernel.
fn preserve_attributes(kvm: &Kvm) -> Result<PreservedVec<AttrRange>> {
    let mut encoder = RangeEncoder::new();
    kvm.for_each_mem_attr_range(|start, end, attrs| encoder.push(start, end, attrs))?;
    PreservedVec::new(encoder.ranges)
}

/// Gives the frames of each of `ranges` its attributes.
fn set_ranges(kvm: &Kvm, ranges: &[AttrRange]) -> Result {
    for range in ranges {
        let start = range.start.get();
        kvm.set_mem_attributes(start, start + range.nr_pages.get(), range.attrs.get())?;
    }
    Ok(())
}

/// Makes a VM of the type of `serialized`.
fn new_vm_file(serialized: &VmSer) -> Result<ARef<File>> {
    let id = RETRIEVED.fetch_add(1, Relaxed);
    let name = CString::try_from_fmt(fmt!("luo-{id}"))?;
    kvm::create_vm_file(serialized.vm_type.get(), &name)
}

/// Runtime state of a preserved VM file.
struct VmState {
    /// The attribute ranges recorded at freeze, while frozen.
    ranges: Option<PreservedVec<AttrRange>>,
}

/// Counter for the names of retrieved VMs.
static RETRIEVED: Atomic<u64> = Atomic::new(0);

/// The VM handler: under [`COMPATIBLE`], or when `LEGACY`, under [`LEGACY_COMPATIBLE`], which
/// it reads but writes only with the `preserve_legacy` parameter (the tests' older kernel).
struct VmHandler<const LEGACY: bool>;

fn vm_of(file: &File) -> Result<&Kvm> {
    let kvm = Kvm::from_file(file).ok_or(EBADF)?;
    if kvm.is_dead() {
        pr_err!("refusing to preserve a dead or bugged VM\n");
        return Err(EIO);
    }
    Ok(kvm)
}

#[vtable]
impl<const LEGACY: bool> FileHandler for VmHandler<LEGACY> {
    const COMPATIBLE: &'static CStr = if LEGACY {
        LEGACY_COMPATIBLE
    } else {
        COMPATIBLE
    };
    type Serialized = VmSer;
    type State = VmState;
    /// The ranges, once taken back.
    type Partial = RestoredVec<AttrRange>;

    fn can_preserve(file: &File) -> bool {
        LEGACY == module_parameters::preserve_legacy.value() && Kvm::from_file(file).is_some()
    }

    fn preserve(file: &File, _session: &OutgoingSession<'_>) -> Result<Outgoing<Self>> {
        let kvm = vm_of(file)?;
        let serialized = Preserved::new(VmSer {
            vm_type: kvm.vm_type().into(),
            flags: 0.into(),
            nr_ranges: 0.into(),
            ranges: VmallocDesc::default(),
        })?;
        Ok(Outgoing::new(serialized, VmState { ranges: None }))
    }

    fn freeze(
        file: &File,
        outgoing: &mut Outgoing<Self>,
        _session: &OutgoingSession<'_>,
    ) -> Result {
        let kvm = Kvm::from_file(file).ok_or(EBADF)?;
        if kvm.is_dead() {
            pr_warn!(
                "a preserved VM was marked dead or bugged: the next kernel will not retrieve it\n"
            );
            outgoing.flags = VM_SER_DEAD.into();
            return Ok(());
        }
        let ranges = preserve_attributes(kvm)?;
        outgoing.nr_ranges = (ranges.len() as u64).into();
        outgoing.ranges = ranges.desc();
        outgoing.state_mut().ranges = Some(ranges);
        Ok(())
    }

    fn unfreeze(_file: &File, outgoing: &mut Outgoing<Self>) {
        outgoing.flags = 0.into();
        outgoing.nr_ranges = 0.into();
        outgoing.ranges = VmallocDesc::default();
        outgoing.state_mut().ranges = None;
    }

    fn retrieve(
        mut serialized: Restored<VmSer>,
        partial: Option<RestoredVec<AttrRange>>,
        _session: &IncomingSession<'_>,
    ) -> Result<ARef<File>, RetrieveError<Self>> {
        // A VM that was dead at the kexec stays so (it has no ranges), and unknown flags fail for
        // good.
        let flags = serialized.flags.get();
        if flags & VM_SER_DEAD != 0 {
            pr_err!("not retrieving a VM that KVM had marked dead or bugged before the kexec\n");
            return Err(EIO.into());
        }
        if flags != 0 {
            return Err(EOPNOTSUPP.into());
        }
        // The count is checked against the ranges' descriptor when they are taken back.
        let nr = usize::try_from(serialized.nr_ranges.get()).map_err(|_| EINVAL)?;
        // What can fail for want of memory (making the VM, mapping the ranges, setting them)
        // hands back what it was given and took: the file can be retrieved again.
        let file = match new_vm_file(&serialized) {
            Ok(file) => file,
            Err(err) => return Err(RetrieveError::retry_with(err, serialized, partial)),
        };
        let restored = match partial {
            Some(restored) => restored,
            None => match RestoredVec::restore(&mut serialized.ranges, nr) {
                Ok(restored) => restored,
                // KHO could not map the ranges and took nothing back.
                Err(ENOMEM) => return Err(RetrieveError::retry(ENOMEM, serialized)),
                Err(err) => return Err(err.into()),
            },
        };
        // Hostile or unknown records fail for good; dropping `restored` frees them.
        validate_ranges(&restored, kvm::MEMORY_ATTRIBUTE_PRIVATE)?;
        let ranges = &restored[..];
        let kvm = Kvm::from_file(&file).ok_or(EINVAL)?;
        let supported = kvm.supported_mem_attributes();
        if ranges
            .iter()
            .any(|range| range.attrs.get() & !supported != 0)
        {
            pr_err!("preserved memory attributes not supported by a VM of this type\n");
            return Err(EOPNOTSUPP.into());
        }
        // KVM allocates as it sets them. When it runs out, the new VM goes, and the next try sets
        // every range again on a VM of its own.
        match set_ranges(kvm, ranges) {
            Ok(()) => {
                if LEGACY {
                    pr_info!(
                        "retrieved a VM an earlier kernel preserved as {LEGACY_COMPATIBLE:?}\n"
                    );
                }
                Ok(file)
            }
            Err(ENOMEM) => Err(RetrieveError::retry_with(
                ENOMEM,
                serialized,
                Some(restored),
            )),
            Err(err) => Err(err.into()),
        }
    }

    fn finish(_status: RetrieveStatus, unretrieved: Option<Unconsumed<Self>>) {
        // Ranges a failed retrieve took back are freed with `unretrieved`.
        if let Some(Unconsumed {
            mut serialized,
            partial: None,
        }) = unretrieved
        {
            let nr = usize::try_from(serialized.nr_ranges.get()).map_err(|_| EINVAL);
            if nr
                .and_then(|nr| {
                    retry_on_enomem(FINISH_TRIES, || {
                        RestoredVec::<AttrRange>::restore(&mut serialized.ranges, nr)
                    })
                })
                .is_err()
            {
                pr_warn!("could not free the attribute ranges of an unretrieved VM\n");
            }
        }
    }
}

#[kunit_tests(kvm_vm_luo)]
mod tests {
    use super::*;

    const PRIVATE: u64 = 1 << 3;

    fn encode(runs: &[(u64, u64, u64)]) -> Result<KVVec<(u64, u64, u64)>> {
        let mut encoder = RangeEncoder::new();
        for &(start, end, attrs) in runs {
            encoder.push(start, end, attrs)?;
        }
        let mut out = KVVec::new();
        for r in encoder.ranges.iter() {
            out.push((r.start.get(), r.nr_pages.get(), r.attrs.get()), GFP_KERNEL)?;
        }
        Ok(out)
    }

    fn ranges(list: &[(u64, u64, u64)]) -> KVVec<AttrRange> {
        let mut out = KVVec::new();
        for &(start, nr, attrs) in list {
            out.push(AttrRange::new(start, nr, attrs), GFP_KERNEL)
                .expect("allocation failed");
        }
        out
    }

    #[test]
    fn encoder_merges_adjacent_equal_runs() -> Result {
        let out = encode(&[(0, 4, PRIVATE), (4, 6, PRIVATE), (6, 10, PRIVATE)])?;
        assert_eq!(&out[..], &[(0, 10, PRIVATE)]);
        Ok(())
    }

    #[test]
    fn encoder_keeps_gaps_and_attribute_changes() -> Result {
        let out = encode(&[(0, 4, PRIVATE), (8, 9, PRIVATE), (9, 12, 1 << 1)])?;
        assert_eq!(
            &out[..],
            &[(0, 4, PRIVATE), (8, 1, PRIVATE), (9, 3, 1 << 1)]
        );
        Ok(())
    }

    #[test]
    fn encoder_skips_shared_runs() -> Result {
        let out = encode(&[(0, 4, 0), (4, 8, PRIVATE), (8, 16, 0)])?;
        assert_eq!(&out[..], &[(4, 4, PRIVATE)]);
        Ok(())
    }

    #[test]
    fn encoder_rejects_unordered_or_empty_runs() {
        assert_eq!(
            encode(&[(8, 10, PRIVATE), (0, 4, PRIVATE)]).err(),
            Some(EINVAL)
        );
        assert_eq!(
            encode(&[(0, 10, PRIVATE), (5, 12, PRIVATE)]).err(),
            Some(EINVAL)
        );
        assert_eq!(encode(&[(4, 4, PRIVATE)]).err(), Some(EINVAL));
    }

    #[test]
    fn encoder_has_no_cap_but_memory() -> Result {
        // A guest that alternates private and shared pages over 8 GiB: 2^20 + 1 ranges, which
        // the previous version refused at freeze, failing the host's kexec.
        let mut encoder = RangeEncoder::new();
        for i in 0..(1u64 << 20) + 1 {
            encoder.push(2 * i, 2 * i + 1, PRIVATE)?;
            encoder.push(2 * i + 1, 2 * i + 2, 0)?;
        }
        assert_eq!(encoder.ranges.len(), (1 << 20) + 1);
        assert_eq!(validate_ranges(&encoder.ranges, PRIVATE), Ok(()));
        Ok(())
    }

    #[test]
    fn no_vm_for_a_kernel_thread() {
        // KUnit runs tests in a kernel thread, which has no address space for a VM to belong to.
        // At boot, a KVM (or its vendor part) built as a module is not loaded yet either.
        let err = kvm::create_vm_file(0, c"kunit").err();
        assert!(matches!(err, Some(EINVAL | ENODEV)));
    }

    #[test]
    fn validate_accepts_good_ranges() {
        let list = ranges(&[(0, 4, PRIVATE), (4, 4, PRIVATE), (100, 1, PRIVATE)]);
        assert_eq!(validate_ranges(&list, PRIVATE), Ok(()));
        assert_eq!(validate_ranges(&list[..0], PRIVATE), Ok(()));
    }

    #[test]
    fn validate_rejects_overlapping_and_unordered_ranges() {
        let overlapping = ranges(&[(0, 8, PRIVATE), (4, 8, PRIVATE)]);
        assert_eq!(validate_ranges(&overlapping, PRIVATE).err(), Some(EINVAL));
        let unordered = ranges(&[(16, 4, PRIVATE), (0, 4, PRIVATE)]);
        assert_eq!(validate_ranges(&unordered, PRIVATE).err(), Some(EINVAL));
    }

    #[test]
    fn validate_rejects_empty_huge_and_wrapping_ranges() {
        let empty = ranges(&[(0, 0, PRIVATE)]);
        assert_eq!(validate_ranges(&empty, PRIVATE).err(), Some(EINVAL));
        let beyond = ranges(&[(GFN_LIMIT - 1, 2, PRIVATE)]);
        assert_eq!(validate_ranges(&beyond, PRIVATE).err(), Some(EINVAL));
        let wrapping = ranges(&[(u64::MAX, 2, PRIVATE)]);
        assert_eq!(validate_ranges(&wrapping, PRIVATE).err(), Some(EINVAL));
    }

    #[test]
    fn validate_rejects_unknown_or_missing_attributes() {
        let unknown = ranges(&[(0, 1, PRIVATE | 1 << 40)]);
        assert_eq!(validate_ranges(&unknown, PRIVATE).err(), Some(EOPNOTSUPP));
        let none = ranges(&[(0, 1, 0)]);
        assert_eq!(validate_ranges(&none, PRIVATE).err(), Some(EINVAL));
    }
}
