// SPDX-License-Identifier: GPL-2.0

//! KVM virtual machines, as seen by in-kernel users such as live update handlers.
//!
//! C header: [`include/linux/kvm_luo.h`](srctree/include/linux/kvm_luo.h).
//!
//! A VM is a `struct kvm`. Userspace holds it through the file `KVM_CREATE_VM` returns, whose
//! private data is the VM; the file pins one reference on it. More references are taken with
//! `kvm_luo_get_kvm()` and dropped with `kvm_luo_put_kvm()` (which also pin KVM, a VM does not);
//! the VM is destroyed when the last one goes. [`Kvm`] is that object; `ARef<Kvm>` owns one
//! reference.
//!
//! Guest memory lives in guest_memfd files (`KVM_CREATE_GUEST_MEMFD`), each bound to one VM;
//! [`GuestMemfd`] describes one, [`FrozenGuestMemfd`] stops its memory from changing, and
//! [`GuestMemfdFile`] is a new one the kernel hands out and fills later, as its memory is used.
//!
//! KVM may be a module, and this crate is built in: it reaches KVM through the `kvm_luo_*()`
//! functions of [`include/linux/kvm_luo.h`](srctree/include/linux/kvm_luo.h), which call what
//! KVM registered when it loaded. Until then no file is KVM's, and making a VM fails with
//! `ENODEV`.
//!
//! Memory attributes (`KVM_SET_MEMORY_ATTRIBUTES`) are per guest frame. Only VMs with private
//! memory support them (e.g. `KVM_X86_SW_PROTECTED_VM`); for other VMs every frame is shared.

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
use crate::folio::{
    FolioRun,
    Span, //
};
use crate::{
    bindings,
    error::{
        from_err_ptr,
        to_result, //
    },
    fs::File,
    prelude::*,
    sync::aref::{
        ARef,
        AlwaysRefCounted, //
    },
    types::Opaque,
};
use core::ptr::NonNull;

/// `KVM_CREATE_VM` type of an ordinary x86 VM.
#[cfg(CONFIG_X86)]
pub const VM_TYPE_X86_DEFAULT: u64 = bindings::KVM_X86_DEFAULT_VM as u64;

/// `KVM_CREATE_VM` type of an x86 software-protected VM: private memory without encryption.
#[cfg(CONFIG_X86)]
pub const VM_TYPE_X86_SW_PROTECTED: u64 = bindings::KVM_X86_SW_PROTECTED_VM as u64;

/// guest_memfd flag: the file can be mapped by userspace.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = bindings::GUEST_MEMFD_FLAG_MMAP as u64;

/// guest_memfd flag: the memory starts out shared, not private.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = bindings::GUEST_MEMFD_FLAG_INIT_SHARED as u64;

/// The memory attribute that makes a guest frame private.
pub const MEMORY_ATTRIBUTE_PRIVATE: u64 = bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE as u64;

/// A KVM virtual machine.
///
/// # Invariants
///
/// The object is a valid `struct kvm` whose refcount is non-zero while a reference to it exists.
#[repr(transparent)]
pub struct Kvm {
    inner: Opaque<bindings::kvm>,
}

// SAFETY: `kvm_luo_get_kvm()` and `kvm_luo_put_kvm()` may be called from any thread.
unsafe impl Send for Kvm {}
// SAFETY: The methods on `&Kvm` take KVM's own locks where they need them.
unsafe impl Sync for Kvm {}

// SAFETY: The refcount is managed by `kvm_luo_get_kvm()` and `kvm_luo_put_kvm()`; a `&Kvm`
// implies a non-zero count, held by a file of the VM or an `ARef<Kvm>`, either of which pins KVM.
unsafe impl AlwaysRefCounted for Kvm {
    fn inc_ref(&self) {
        // SAFETY: The existence of `&self` means the refcount is non-zero, and KVM is pinned.
        unsafe { bindings::kvm_luo_get_kvm(self.as_ptr()) };
    }

    unsafe fn dec_ref(obj: NonNull<Self>) {
        // SAFETY: The caller owns a reference to give back.
        unsafe { bindings::kvm_luo_put_kvm(obj.cast().as_ptr()) };
    }
}

impl Kvm {
    fn as_ptr(&self) -> *mut bindings::kvm {
        self.inner.get()
    }

    /// Returns the VM of a file from `KVM_CREATE_VM`, or `None` for any other file.
    ///
    /// The VM lives at least as long as the file.
    pub fn from_file(file: &File) -> Option<&Kvm> {
        // SAFETY: `file` is a valid file.
        let kvm = unsafe { bindings::kvm_luo_from_vm_file(file.as_ptr()) };
        if kvm.is_null() {
            return None;
        }
        // SAFETY: `kvm` is the VM of `file`, on which the file holds a reference until it is
        // released, which cannot happen while `file` is borrowed; `Kvm` is `repr(transparent)`
        // over `struct kvm`.
        Some(unsafe { &*kvm.cast::<Kvm>() })
    }

    /// The type this VM was created with (the argument of `KVM_CREATE_VM`).
    pub fn vm_type(&self) -> u64 {
        // SAFETY: `self` is a valid VM.
        unsafe { bindings::kvm_luo_vm_type(self.as_ptr()) as u64 }
    }

    /// Whether the guest memory of this VM is plain memory, private or shared: its pages hold
    /// what the guest wrote, unencrypted, and the host may write them. False for VMs whose
    /// private memory the hardware encrypts or protects (SEV-SNP, TDX).
    pub fn has_plain_memory(&self) -> bool {
        const PLAIN: [u64; 2] = [VM_TYPE_X86_DEFAULT, VM_TYPE_X86_SW_PROTECTED];
        PLAIN.contains(&self.vm_type())
    }

    /// Whether KVM has marked this VM dead or bugged; such a VM only fails its ioctls.
    pub fn is_dead(&self) -> bool {
        // SAFETY: `self` is a valid VM.
        unsafe { bindings::kvm_luo_vm_is_dead(self.as_ptr()) }
    }

    /// The memory attributes this VM supports.
    #[cfg(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES)]
    pub fn supported_mem_attributes(&self) -> u64 {
        // SAFETY: `self` is a valid VM.
        unsafe { bindings::kvm_luo_supported_mem_attributes(self.as_ptr()) }
    }

    /// The memory attributes this VM supports: none, without memory attribute support.
    #[cfg(not(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES))]
    pub fn supported_mem_attributes(&self) -> u64 {
        0
    }

    /// Calls `f(start, end, attributes)` for each maximal run of guest frames
    /// `[start, end)` with equal non-zero attributes, in increasing order.
    ///
    /// # Errors
    ///
    /// Stops at, and returns, the first error of `f`.
    #[cfg(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES)]
    pub fn for_each_mem_attr_range<F>(&self, mut f: F) -> Result
    where
        F: FnMut(u64, u64, u64) -> Result,
    {
        let mut closure: &mut dyn FnMut(u64, u64, u64) -> Result = &mut f;
        // SAFETY: `self` is a valid VM; `trampoline` receives a pointer to `closure`, which
        // outlives the call.
        to_result(unsafe {
            bindings::kvm_luo_walk_mem_attr_ranges(
                self.as_ptr(),
                Some(trampoline),
                (&raw mut closure).cast(),
            )
        })
    }

    /// Without memory attribute support, all frames are shared: `f` is never called.
    #[cfg(not(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES))]
    pub fn for_each_mem_attr_range<F>(&self, _f: F) -> Result
    where
        F: FnMut(u64, u64, u64) -> Result,
    {
        Ok(())
    }

    /// Sets the attributes of guest frames `[start, end)` to `attributes`, as
    /// `KVM_SET_MEMORY_ATTRIBUTES` does.
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` for an empty range or attributes the VM does not support, and `ENOMEM`
    /// when KVM cannot allocate.
    pub fn set_mem_attributes(&self, start: u64, end: u64, attributes: u64) -> Result {
        #[cfg(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES)]
        {
            let attributes = c_ulong::try_from(attributes).map_err(|_| EINVAL)?;
            // SAFETY: `self` is a valid VM; the function validates its arguments.
            to_result(unsafe {
                bindings::kvm_luo_set_mem_attributes_range(self.as_ptr(), start, end, attributes)
            })
        }
        #[cfg(not(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES))]
        {
            let _ = (start, end, attributes);
            Err(EINVAL)
        }
    }

    /// Returns the file of this VM, if it is still open.
    pub fn file(&self) -> Option<ARef<File>> {
        // SAFETY: `self` is a valid VM.
        let file = NonNull::new(unsafe { bindings::kvm_luo_get_vm_file(self.as_ptr()) })?;
        // SAFETY: `kvm_luo_get_vm_file` returned a new reference, which we now own.
        Some(unsafe { ARef::from_raw(file.cast()) })
    }
}

/// # Safety
///
/// `opaque` must point to a `&mut dyn FnMut(u64, u64, u64) -> Result`.
#[cfg(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES)]
unsafe extern "C" fn trampoline(
    opaque: *mut c_void,
    start: bindings::gfn_t,
    end: bindings::gfn_t,
    attrs: c_ulong,
) -> c_int {
    // SAFETY: By the function's safety requirements.
    let f = unsafe { &mut *opaque.cast::<&mut dyn FnMut(u64, u64, u64) -> Result>() };
    match f(start, end, attrs as u64) {
        Ok(()) => 0,
        Err(err) => err.to_errno(),
    }
}

/// Creates a VM of type `vm_type` and its file, as `KVM_CREATE_VM` does. `name` names its
/// debugfs and stats entries. The VM belongs to the address space of the calling process.
///
/// # Errors
///
/// Returns `ENODEV` if no KVM is loaded (neither kvm-intel nor kvm-amd, when KVM is a module),
/// `EINVAL` for a type this host does not support or a caller without an address space (a kernel
/// thread), and the errors of VM creation.
///
/// # Examples
///
/// ```
/// use kernel::kvm::{create_vm_file, VM_TYPE_X86_DEFAULT};
///
/// // KUnit runs this in a kernel thread: it has no address space (`mm`) for a VM to belong to.
/// // At boot, a KVM (or its vendor part) built as a module is not loaded yet either.
/// let vm = create_vm_file(VM_TYPE_X86_DEFAULT, c"doctest");
/// assert!(matches!(vm.err(), Some(EINVAL | ENODEV)));
/// ```
pub fn create_vm_file(vm_type: u64, name: &CStr) -> Result<ARef<File>> {
    let vm_type = usize::try_from(vm_type).map_err(|_| EINVAL)?;
    // SAFETY: `name` is a valid C string for the duration of the call.
    let file =
        from_err_ptr(unsafe { bindings::kvm_luo_create_vm_file(vm_type, name.as_char_ptr()) })?;
    let file = NonNull::new(file).ok_or(EINVAL)?;
    // SAFETY: `kvm_luo_create_vm_file` returned a new file, whose reference we now own.
    Ok(unsafe { ARef::from_raw(file.cast()) })
}

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
/// What a guest_memfd file (from `KVM_CREATE_GUEST_MEMFD`) is.
pub struct GuestMemfd<'a> {
    /// The VM the file belongs to; the file holds a reference on it.
    pub kvm: &'a Kvm,
    /// The size of the file, in bytes.
    pub size: u64,
    /// Its `GUEST_MEMFD_FLAG_*` flags.
    pub flags: u64,
}

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
impl<'a> GuestMemfd<'a> {
    /// Describes `file` if it is a guest_memfd, or returns `None`.
    pub fn of(file: &'a File) -> Option<Self> {
        let mut kvm: *mut bindings::kvm = core::ptr::null_mut();
        let mut size: bindings::loff_t = 0;
        let mut flags = 0u64;
        // SAFETY: `file` is valid; the outputs are valid for writes.
        if !unsafe {
            bindings::kvm_luo_gmem_file_info(file.as_ptr(), &mut kvm, &mut size, &mut flags)
        } {
            return None;
        }
        // SAFETY: The file holds a reference on its VM for as long as it lives, which is at
        // least `'a`.
        let kvm = unsafe { &*kvm.cast::<Kvm>() };
        Some(Self {
            kvm,
            size: size as u64,
            flags,
        })
    }
}

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
/// A frozen guest_memfd of a VM with plain memory: no folio is added to or removed from it until
/// this is dropped.
///
/// Allocating memory in the file (including by guest faults) and `fallocate()` fail with
/// `EPERM` while it is frozen.
///
/// # Invariants
///
/// `file` is a guest_memfd frozen by this object, of a VM with plain memory
/// ([`Kvm::has_plain_memory`]).
pub struct FrozenGuestMemfd {
    file: ARef<File>,
}

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
impl FrozenGuestMemfd {
    /// Freezes the guest_memfd `file`, waiting for allocations in progress.
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` if `file` is not a guest_memfd, `EOPNOTSUPP` if its VM's memory is not
    /// plain memory, `EBUSY` if it is already frozen.
    pub fn freeze(file: &File) -> Result<Self> {
        let gmem = GuestMemfd::of(file).ok_or(EINVAL)?;
        if !gmem.kvm.has_plain_memory() {
            return Err(EOPNOTSUPP);
        }
        // SAFETY: `file` is a guest_memfd.
        to_result(unsafe { bindings::kvm_luo_gmem_freeze(file.as_ptr()) })?;
        // INVARIANT: Frozen above; the VM's memory is plain, checked above.
        Ok(Self { file: file.into() })
    }
}

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
impl FrozenGuestMemfd {
    /// Calls `f` for every run of folios of the file (see [`FolioRun`]), in index order: the run
    /// holds a reference to each of its folios, and `f` keeps or drops it. The runs are as long as
    /// one call to C finds them: `f` may see a run that continues the one before.
    ///
    /// A folio with a hardware memory error stops the walk with `EHWPOISON` before anything
    /// touches it (memory failure handling may have unmapped it from the kernel).
    ///
    /// Every folio `f` sees is uptodate. In guest_memfd a folio that is not uptodate was
    /// allocated (e.g. by `fallocate()`) but never used: it is zeroed on first use by the guest
    /// or through a mapping. The lookup does that first use for such folios, under the folio
    /// lock, so that what the folio holds no longer depends on whether it is used later; contents
    /// written after this call are in the folio's memory like any others. (That is sound because
    /// the file is frozen, so its VM's memory is plain, by the type invariants.)
    ///
    /// The folios are looked up, used and gathered in runs a batch at a time, in one call to C:
    /// the walk does nothing per folio in Rust.
    ///
    /// # Errors
    ///
    /// Returns `EHWPOISON` for a poisoned folio, `ENOMEM`, and stops at, and returns, the first
    /// error of `f`.
    pub fn for_each_run<F>(&self, mut f: F) -> Result
    where
        F: FnMut(FolioRun) -> Result,
    {
        let mut descs = KVVec::<bindings::kvm_gmem_folio_desc>::with_capacity(
            FOLIO_BATCH as usize,
            GFP_KERNEL,
        )?;
        let mut start: usize = 0;
        loop {
            // SAFETY: `self.file` is a frozen guest_memfd of a VM whose memory is plain, by the
            // type invariants, where zeroing a folio that is not uptodate under its lock is its
            // first use; `descs` has room for `FOLIO_BATCH` descriptions, at most as many as the
            // function writes.
            let found = unsafe {
                bindings::kvm_luo_gmem_get_folio_descs(
                    self.file.as_ptr(),
                    &mut start,
                    descs.as_mut_ptr(),
                    FOLIO_BATCH,
                )
            };
            let found = match usize::try_from(found) {
                Ok(found) => found,
                Err(_) => return Err(i32::try_from(found).map_or(EINVAL, Error::from_errno)),
            };
            if found == 0 {
                return Ok(());
            }
            // Never: the function describes at most `FOLIO_BATCH` runs.
            if crate::warn_on!(found > descs.capacity()) {
                return Err(EINVAL);
            }
            // SAFETY: The function initialized the first `found` descriptions, at most the
            // capacity (checked above); the vector is empty, and they are plain data.
            unsafe { descs.inc_len(found) };
            let mut result = Ok(());
            for desc in descs.drain_all() {
                // Never: a run has a first folio (`kvm_luo.h`). Fail the walk rather than leave
                // memory out; the references of such a description are left alone, since it
                // cannot be trusted to say which they are.
                if crate::warn_on!(desc.folio.is_null() || desc.nr_pages == 0) {
                    result = result.and(Err(EINVAL));
                    continue;
                }
                let span = Span {
                    index: desc.index as u64,
                    pfn: desc.pfn as u64,
                    nr_pages: desc.nr_pages as u64,
                    nid: desc.nid,
                };
                // SAFETY: `kvm_gmem_get_folio_descs()` describes a run of whole folios that follow
                // each other in the file and in physical memory on one node, read with a
                // reference to each taken for us, which moves into the run; the description is
                // not used for them again.
                let run = unsafe { FolioRun::from_raw(span) };
                // After an error, the rest of the batch is only dropped. Not uptodate after the
                // lookup's first use: poisoned.
                if result.is_ok() {
                    result = if desc.hwpoison || !desc.uptodate {
                        Err(EHWPOISON)
                    } else {
                        f(run)
                    };
                }
            }
            result?;
        }
    }
}

/// How many runs of folios [`FrozenGuestMemfd::for_each_run`] has room for in one call to C: a
/// multiple of the page cache's batch, which the C function needs at least.
#[cfg(CONFIG_KVM_GUEST_MEMFD)]
const FOLIO_BATCH: u32 = bindings::FOLIO_BATCH_SIZE * 8;

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
impl Drop for FrozenGuestMemfd {
    fn drop(&mut self) {
        // SAFETY: The file is a guest_memfd frozen by us, by the type invariants.
        unsafe { bindings::kvm_luo_gmem_unfreeze(self.file.as_ptr()) };
    }
}

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
/// A guest_memfd file created by the kernel, handed to userspace with a filler that puts its
/// memory in later.
///
/// # Invariants
///
/// `file` is a guest_memfd.
pub struct GuestMemfdFile {
    file: ARef<File>,
}

#[cfg(CONFIG_KVM_GUEST_MEMFD)]
impl GuestMemfdFile {
    /// Creates a guest_memfd file of `size` bytes with `flags` for `kvm`.
    ///
    /// # Errors
    ///
    /// Returns `EINVAL` for a size that is not a positive multiple of the page size or flags the
    /// VM does not support, and `ENOMEM`.
    pub fn create(kvm: &Kvm, size: u64, flags: u64) -> Result<Self> {
        let size = bindings::loff_t::try_from(size).map_err(|_| EINVAL)?;
        // SAFETY: `kvm` is a valid VM; the function validates `size` and `flags`.
        let file =
            from_err_ptr(unsafe { bindings::kvm_luo_gmem_create_file(kvm.as_ptr(), size, flags) })?;
        let file = NonNull::new(file).ok_or(EINVAL)?;
        // SAFETY: `kvm_luo_gmem_create_file` returned a new file, whose reference we now own.
        let file = unsafe { ARef::from_raw(file.cast()) };
        // INVARIANT: `kvm_luo_gmem_create_file` creates guest_memfd files.
        Ok(Self { file })
    }

    /// The file, to hand to userspace.
    pub fn into_file(self) -> ARef<File> {
        self.file
    }
}

#[cfg(all(CONFIG_KVM_GUEST_MEMFD, CONFIG_KEXEC_HANDOVER))]
pub use filler::{
    filler_of,
    memcg_has_room,
    FillerSlot,
    GmemFiller,
    GmemInode, //
};

/// Memory a live update puts in a guest_memfd after the file is handed out.
///
/// A [`GmemFiller`] set on a new guest_memfd ([`GuestMemfdFile::set_filler`]) is asked for the
/// memory at an index whenever guest_memfd would allocate memory there, and is told about
/// punch-holes, the release of the last file and the end of the inode. It puts the memory in
/// through the [`GmemInode`] it is given, the pages of a [`RestoredPages`] run at a time.
///
/// [`RestoredPages`]: crate::kho::RestoredPages
#[cfg(all(CONFIG_KVM_GUEST_MEMFD, CONFIG_KEXEC_HANDOVER))]
mod filler {
    use super::GuestMemfdFile;
    use crate::{
        bindings,
        error::to_result,
        fs::File,
        kho::RestoredPages,
        prelude::*,
        sync::{
            aref::{
                ARef,
                AlwaysRefCounted, //
            },
            Arc,
            ArcBorrow, //
        },
        types::{
            ForeignOwnable,
            Opaque, //
        },
    };
    use core::{
        any::TypeId,
        mem::MaybeUninit,
        ptr::NonNull, //
    };

    /// The inode of a guest_memfd: its memory, which lives as long as the last file or mapping
    /// of it, or a reference taken with [`ARef`].
    ///
    /// # Invariants
    ///
    /// The object is a valid `struct inode` of a guest_memfd.
    #[repr(transparent)]
    pub struct GmemInode {
        inner: Opaque<bindings::inode>,
    }

    // SAFETY: `kvm_luo_gmem_inode_get()` and `kvm_luo_gmem_inode_put()` may be called from any
    // thread.
    unsafe impl Send for GmemInode {}
    // SAFETY: The methods on `&GmemInode` take the page cache's own locks.
    unsafe impl Sync for GmemInode {}

    // SAFETY: The refcount is managed by `kvm_luo_gmem_inode_get()` and `kvm_luo_gmem_inode_put()`
    // (`ihold()` and `iput()`, each reference also pinning KVM); a `&GmemInode` implies a non-zero
    // count.
    unsafe impl AlwaysRefCounted for GmemInode {
        fn inc_ref(&self) {
            // SAFETY: The existence of `&self` means the inode is alive, with a reference.
            unsafe { bindings::kvm_luo_gmem_inode_get(self.inner.get()) };
        }

        unsafe fn dec_ref(obj: NonNull<Self>) {
            // SAFETY: The caller owns a reference to give back.
            unsafe { bindings::kvm_luo_gmem_inode_put(obj.cast().as_ptr()) };
        }
    }

    impl GmemInode {
        /// # Safety
        ///
        /// `ptr` must be the inode of a guest_memfd, alive for `'a`.
        unsafe fn from_raw<'a>(ptr: *mut bindings::inode) -> &'a Self {
            // SAFETY: By the function's safety requirements; `GmemInode` is `repr(transparent)`.
            unsafe { &*ptr.cast::<Self>() }
        }

        /// Puts the first `max` pages of `run` (all of them if it has fewer) in the page cache,
        /// the first at `index` and the others after it, marked uptodate if `uptodate` (their
        /// contents are valid guest memory; if not, guest_memfd zeroes them on first use). The
        /// pages put in leave `run`, from its first; the others stay in it, for a later call.
        ///
        /// # Errors
        ///
        /// Returns `EINVAL` if the file has no filler (nothing would keep punch-hole out of the
        /// pages) or the run does not fit in it, `EBUSY` if the file is frozen, `EEXIST` if an
        /// index is populated, `ENOMEM`.
        pub fn fill_pages(
            &self,
            run: &mut RestoredPages,
            index: u64,
            uptodate: bool,
            max: u64,
        ) -> Result {
            let (pfn, nr) = run.remaining();
            let nr = nr.min(max);
            let (Ok(pfn), Ok(nr), Ok(index)) = (
                usize::try_from(pfn),
                usize::try_from(nr),
                usize::try_from(index),
            ) else {
                return Err(EINVAL);
            };
            let mut done = 0;
            // SAFETY: The inode is a valid guest_memfd inode by the type invariants; the pages
            // are restored order-0 pages whose references `run` owns; the function takes the
            // references of the first `done` pages, which `run` gives up below.
            let result = to_result(unsafe {
                bindings::kvm_luo_gmem_fill_pages(
                    self.inner.get(),
                    pfn,
                    nr,
                    index,
                    uptodate,
                    &mut done,
                )
            });
            run.give_up_front(done as u64);
            result
        }
    }

    /// What puts handed-over memory in a guest_memfd after the file is handed out.
    ///
    /// Its methods run wherever guest_memfd allocates memory (vCPU and user-mapping faults,
    /// `fallocate()`), may sleep, and must not take the mapping's `invalidate_lock`.
    pub trait GmemFiller: Send + Sync + 'static {
        /// Puts in the memory at `index` if some is pending there, or waits for whoever does.
        /// `Ok(())` means guest_memfd may allocate at `index` if the page cache still has
        /// nothing there.
        fn fill(&self, inode: &GmemInode, index: u64) -> Result;

        /// A punch-hole of `[start, end)`, under the `invalidate_lock`: nothing pending there may
        /// be put in later. Pages partly in the hole must be put in first, since the hole's
        /// truncation follows.
        fn discard(&self, inode: &GmemInode, start: u64, end: u64) -> Result;

        /// The last file of the inode was released: nothing needs the memory any more.
        fn stop(&self);
    }

    /// The owner of every filler [`GuestMemfdFile::set_filler`] sets: guest_memfd hands a filler
    /// back only to its owner, so that [`filler_of`] reads no filler another user of the C API
    /// set.
    static FILLER_OWNER: u8 = 0;

    /// A filler, with the type it was set as, which [`filler_of`] checks.
    #[repr(C)]
    struct Typed<T> {
        type_id: TypeId,
        filler: Arc<T>,
    }

    struct Ops<T>(core::marker::PhantomData<T>);

    impl<T: GmemFiller> Ops<T> {
        const OPS: bindings::kvm_gmem_filler_ops = bindings::kvm_gmem_filler_ops {
            fill: Some(Self::fill),
            discard: Some(Self::discard),
            stop: Some(Self::stop),
            release: Some(Self::release),
        };

        /// # Safety
        ///
        /// `filler` must come from [`GuestMemfdFile::set_filler`] for `T`, not released yet.
        unsafe fn borrow<'a>(filler: *mut c_void) -> &'a T {
            // SAFETY: `filler` is a `KBox<Typed<T>>` owned by the inode until `release`.
            unsafe { &(*filler.cast::<Typed<T>>()).filler }
        }

        /// # Safety
        ///
        /// Called by guest_memfd with the filler of `inode`, alive.
        unsafe extern "C" fn fill(
            filler: *mut c_void,
            inode: *mut bindings::inode,
            index: c_ulong,
        ) -> c_int {
            // SAFETY: By the function's safety requirements.
            let (filler, inode) = unsafe { (Self::borrow(filler), GmemInode::from_raw(inode)) };
            match filler.fill(inode, index as u64) {
                Ok(()) => 0,
                Err(err) => err.to_errno(),
            }
        }

        /// # Safety
        ///
        /// As for [`Self::fill`].
        unsafe extern "C" fn discard(
            filler: *mut c_void,
            inode: *mut bindings::inode,
            start: c_ulong,
            end: c_ulong,
        ) -> c_int {
            // SAFETY: By the function's safety requirements.
            let (filler, inode) = unsafe { (Self::borrow(filler), GmemInode::from_raw(inode)) };
            match filler.discard(inode, start as u64, end as u64) {
                Ok(()) => 0,
                Err(err) => err.to_errno(),
            }
        }

        /// # Safety
        ///
        /// As for [`Self::fill`].
        unsafe extern "C" fn stop(filler: *mut c_void) {
            // SAFETY: By the function's safety requirements.
            unsafe { Self::borrow(filler) }.stop();
        }

        /// # Safety
        ///
        /// Called once, by the destruction of the inode, after every other call.
        unsafe extern "C" fn release(filler: *mut c_void) {
            // SAFETY: `filler` came from `KBox::into_foreign` in `set_filler`, and is not used
            // after this.
            drop(unsafe { KBox::<Typed<T>>::from_foreign(filler) });
        }
    }

    /// Memory for a filler of type `T`, taken before [`GuestMemfdFile::set_filler`] so that
    /// setting it cannot fail for want of memory.
    pub struct FillerSlot<T: GmemFiller>(KBox<MaybeUninit<Typed<T>>>);

    impl<T: GmemFiller> FillerSlot<T> {
        /// Allocates the slot.
        pub fn new() -> Result<Self> {
            Ok(Self(KBox::new_uninit(GFP_KERNEL)?))
        }
    }

    impl GuestMemfdFile {
        /// Sets the filler of this new file, before it is handed out, in `slot`.
        ///
        /// # Errors
        ///
        /// Returns `EBUSY` if the file has a filler already.
        pub fn set_filler<T: GmemFiller>(&self, slot: FillerSlot<T>, filler: Arc<T>) -> Result {
            let typed = slot.0.write(Typed {
                type_id: TypeId::of::<T>(),
                filler,
            });
            let ptr = typed.into_foreign();
            let owner = core::ptr::from_ref(&FILLER_OWNER).cast();
            // SAFETY: The file is a guest_memfd by the type invariants; `OPS` is a constant
            // promoted to a static; `ptr` is ours until `release` takes it back; `owner` is a
            // static.
            let r = unsafe {
                bindings::kvm_luo_gmem_set_filler(
                    self.file.as_ptr(),
                    &Ops::<T>::OPS,
                    ptr.cast(),
                    owner,
                )
            };
            if r != 0 {
                // SAFETY: Not taken by the file: still ours.
                drop(unsafe { KBox::<Typed<T>>::from_foreign(ptr) });
            }
            to_result(r)
        }

        /// The inode of this file, with a reference.
        pub fn inode(&self) -> ARef<GmemInode> {
            inode_of(&self.file)
        }
    }

    fn inode_of(file: &File) -> ARef<GmemInode> {
        // SAFETY: `file` is valid, so is its inode.
        let inode = unsafe { (*file.as_ptr()).f_inode };
        // SAFETY: The inode is alive while `file` is; `inc_ref` takes our own reference.
        ARef::from(unsafe { GmemInode::from_raw(inode) })
    }

    /// Whether `nr_pages` more pages fit in the memory cgroup of the calling task and in its
    /// ancestors, as their limits and usage are now: what a filler puts in is charged there.
    pub fn memcg_has_room(nr_pages: u64) -> bool {
        let Ok(nr_pages) = usize::try_from(nr_pages) else {
            return false;
        };
        // SAFETY: The function only reads the cgroups of the calling task.
        unsafe { bindings::kvm_luo_gmem_memcg_has_room(nr_pages) }
    }

    /// The filler of `file` and its inode, if `file` is a guest_memfd whose filler is a `T`.
    pub fn filler_of<T: GmemFiller>(file: &File) -> Option<(ArcBorrow<'_, T>, ARef<GmemInode>)> {
        let owner = core::ptr::from_ref(&FILLER_OWNER).cast();
        // SAFETY: `file` is valid; the function returns the filler argument of a guest_memfd that
        // `owner` set, or NULL.
        let ptr = unsafe { bindings::kvm_luo_gmem_filler(file.as_ptr(), owner) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: Every filler whose owner is `FILLER_OWNER` is a `KBox<Typed<_>>` from
        // `set_filler`, alive as long as the inode, so as long as `file`; its first field is a
        // `TypeId` (`repr(C)`), whatever the type.
        if unsafe { *ptr.cast::<TypeId>() } != TypeId::of::<T>() {
            return None;
        }
        // SAFETY: As above, and the filler is a `Typed<T>`, checked above.
        let typed = unsafe { &*ptr.cast::<Typed<T>>() };
        Some((typed.filler.as_arc_borrow(), inode_of(file)))
    }
}
