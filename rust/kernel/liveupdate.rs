// SPDX-License-Identifier: GPL-2.0

//! Live Update Orchestrator (LUO) file handlers.
//!
//! C header: [`include/linux/liveupdate.h`](srctree/include/linux/liveupdate.h).
//!
//! LUO lets userspace preserve file descriptors across a kexec: a process puts files in a
//! *session* of `/dev/liveupdate` under 64-bit tokens, the kernel kexecs, and the process takes
//! them back by token in the new kernel. Each kind of file is supported by a *file handler*,
//! which LUO calls at each step:
//!
//! - `can_preserve`: is this file one of mine?
//! - `preserve`: save the file's state into memory preserved with [KHO](crate::kho). The handler
//!   returns a small preserved head object, whose physical address LUO passes to the next
//!   kernel, and runtime state that lives until the kexec.
//! - `freeze` / `unfreeze`: last actions right before the kexec, and their undo when the kexec is
//!   aborted.
//! - `unpreserve`: the session was closed before the kexec; release everything.
//! - `retrieve`: in the new kernel, rebuild a file from the preserved head object. A retrieve
//!   that fails without losing anything (it took nothing back, or keeps what it took) can be
//!   tried again.
//! - `can_finish` / `finish`: the session is done; free whatever was not retrieved.
//!
//! In this abstraction, the serialized head object and the runtime state have their own types
//! ([`FileHandler::Serialized`] and [`FileHandler::State`]), kept together in [`Outgoing`] in the
//! old kernel and handed back as a [`Restored`] object in the new one, so a handler cannot mix
//! up the two or lose track of what it preserved.

use crate::{
    alloc::AllocError,
    bindings,
    error::{
        to_result,
        VTABLE_DEFAULT_ERROR, //
    },
    fs::File,
    kho::{
        Preserved,
        Restored, //
    },
    module::{
        this_module,
        ModuleMetadata, //
    },
    prelude::*,
    sync::aref::ARef,
    types::{
        ForeignOwnable,
        Opaque, //
    },
};
use core::{
    marker::PhantomData,
    ops::{
        Deref,
        DerefMut, //
    },
    ptr::NonNull, //
};

/// Length of the compatible string, including its terminating NUL.
pub const COMPATIBLE_LEN: usize = bindings::LIVEUPDATE_HNDL_COMPAT_LENGTH as usize;

/// A compatible string from the bytes of a C string macro of an ABI header, as bindgen gives it
/// (NUL-terminated). Meant for constants: the build fails if `name` is not one NUL-terminated
/// string of at most [`COMPATIBLE_LEN`] bytes.
///
/// # Examples
///
/// ```
/// use kernel::liveupdate::compatible;
///
/// const NAME: &kernel::str::CStr = compatible(b"example-v1\0");
/// assert_eq!(NAME, c"example-v1");
/// ```
#[inline(always)]
pub const fn compatible(name: &'static [u8]) -> &'static CStr {
    match CStr::from_bytes_with_nul(name) {
        Ok(c) if name.len() <= COMPATIBLE_LEN => c,
        _ => build_error!("a compatible string must be NUL-terminated and fit LUO's field"),
    }
}

/// What a handler keeps for a preserved file until the kexec (or until it is unpreserved): the
/// serialized head object, preserved with KHO, and runtime state that is not carried across.
///
/// LUO passes the physical address of the head object to the next kernel, so the object itself
/// cannot be replaced once the file is preserved: its contents are reachable through `Deref` and
/// `DerefMut`, the state through [`Outgoing::state_mut`].
pub struct Outgoing<T: FileHandler> {
    serialized: Preserved<T::Serialized>,
    state: T::State,
}

impl<T: FileHandler> Outgoing<T> {
    /// Puts together a preserved head object and the runtime state of a file.
    pub fn new(serialized: Preserved<T::Serialized>, state: T::State) -> Self {
        Self { serialized, state }
    }

    /// The runtime state, to change.
    pub fn state_mut(&mut self) -> &mut T::State {
        &mut self.state
    }
}

impl<T: FileHandler> Deref for Outgoing<T> {
    type Target = T::Serialized;

    fn deref(&self) -> &T::Serialized {
        &self.serialized
    }
}

impl<T: FileHandler> DerefMut for Outgoing<T> {
    fn deref_mut(&mut self) -> &mut T::Serialized {
        &mut self.serialized
    }
}

/// What is left of a preserved file that was not retrieved: its head object, and what a failed
/// retrieve took back of the rest and kept.
pub struct Unconsumed<T: FileHandler> {
    /// The head object the previous kernel preserved.
    pub serialized: Restored<T::Serialized>,
    /// What a failed retrieve took back of the preserved state and handed back with
    /// [`RetrieveError::retry_with`], if anything.
    pub partial: Option<T::Partial>,
}

/// Why a retrieve failed, and whether the preserved state is still whole.
///
/// A handler that fails before it has consumed anything of the preserved state (beyond the head
/// object it was given) hands the head object back with [`RetrieveError::retry`]; one that took
/// part of the state back also hands that back, with [`RetrieveError::retry_with`]. The file then
/// stays not retrieved, userspace may retrieve it again, and [`FileHandler::finish`] gets both
/// back if it never is. Any other error (built from an [`Error`], e.g. with `?`) means the state
/// was consumed; the error is then final.
pub struct RetrieveError<T: FileHandler> {
    error: Error,
    unconsumed: Option<Unconsumed<T>>,
}

impl<T: FileHandler> RetrieveError<T> {
    /// A failure that consumed nothing: `serialized` is kept for a later retrieve or finish.
    pub fn retry(error: Error, serialized: Restored<T::Serialized>) -> Self {
        Self {
            error,
            unconsumed: Some(Unconsumed {
                serialized,
                partial: None,
            }),
        }
    }

    /// A failure after part of the preserved state was taken back: `serialized`, and `partial`
    /// if any, are kept for a later retrieve or finish.
    pub fn retry_with(
        error: Error,
        serialized: Restored<T::Serialized>,
        partial: Option<T::Partial>,
    ) -> Self {
        Self {
            error,
            unconsumed: Some(Unconsumed {
                serialized,
                partial,
            }),
        }
    }
}

impl<T: FileHandler> From<Error> for RetrieveError<T> {
    fn from(error: Error) -> Self {
        Self {
            error,
            unconsumed: None,
        }
    }
}

impl<T: FileHandler> From<AllocError> for RetrieveError<T> {
    fn from(error: AllocError) -> Self {
        Error::from(error).into()
    }
}

/// Whether and how a preserved file was retrieved in the new kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetrieveStatus {
    /// Retrieve was never attempted, or failed only in ways that kept the preserved state (see
    /// [`RetrieveError`]).
    NotAttempted,
    /// Retrieve succeeded.
    Retrieved,
    /// Retrieve failed with this error, and will not be tried again.
    Failed(Error),
}

impl RetrieveStatus {
    fn from_raw(status: c_int) -> Self {
        match status {
            0 => Self::NotAttempted,
            s if s > 0 => Self::Retrieved,
            s => Self::Failed(Error::from_errno(s)),
        }
    }
}

/// The session a file is being preserved in, in the old kernel.
///
/// # Invariants
///
/// `ptr` is a valid outgoing session whose lock LUO holds for the lifetime `'a`.
pub struct OutgoingSession<'a> {
    ptr: NonNull<bindings::liveupdate_session>,
    _p: PhantomData<&'a ()>,
}

impl OutgoingSession<'_> {
    /// Returns the token under which `file` is preserved in this session.
    ///
    /// # Errors
    ///
    /// Returns `ENOENT` when `file` is not preserved in this session.
    pub fn token_of(&self, file: &File) -> Result<u64> {
        let mut token = 0u64;
        // SAFETY: The session is valid and locked by the type invariants; `file` is valid.
        to_result(unsafe {
            bindings::liveupdate_get_token_outgoing(self.ptr.as_ptr(), file.as_ptr(), &mut token)
        })?;
        Ok(token)
    }
}

/// The session a file is being retrieved from, in the new kernel.
///
/// # Invariants
///
/// `ptr` is a valid incoming session whose lock LUO holds for the lifetime `'a`.
pub struct IncomingSession<'a> {
    ptr: NonNull<bindings::liveupdate_session>,
    _p: PhantomData<&'a ()>,
}

impl IncomingSession<'_> {
    /// Retrieves the file preserved under `token` in this session, or returns it again if it
    /// was already retrieved.
    ///
    /// # Errors
    ///
    /// Returns `ENOENT` when there is no such token, and the error of the file's retrieve when it
    /// failed (now or earlier).
    pub fn file(&self, token: u64) -> Result<ARef<File>> {
        let mut file: *mut bindings::file = core::ptr::null_mut();
        // SAFETY: The session is valid and locked by the type invariants.
        to_result(unsafe {
            bindings::liveupdate_get_file_incoming(self.ptr.as_ptr(), token, &mut file)
        })?;
        let file = NonNull::new(file).ok_or(EINVAL)?;
        // SAFETY: On success `liveupdate_get_file_incoming` returns a new reference, which we
        // now own.
        Ok(unsafe { ARef::from_raw(file.cast()) })
    }
}

/// A LUO file handler.
///
/// Implement this trait and register it with [`Registration`].
#[vtable]
pub trait FileHandler: Sized + 'static {
    /// The string that matches preserved files to this handler in the next kernel. Change it
    /// whenever the layout of [`Self::Serialized`] changes.
    const COMPATIBLE: &'static CStr;

    /// The head object preserved for each file; its physical address is the handle LUO passes
    /// to the next kernel.
    type Serialized: FromBytes + IntoBytes + Send + Sync;

    /// Runtime state kept for each preserved file until the kexec.
    type State: Send + Sync;

    /// What a retrieve that failed part-way took back of the preserved state and keeps for the
    /// next try ([`RetrieveError::retry_with`]); [`core::convert::Infallible`] for a handler that
    /// never does. Dropping it must release what it holds: it is dropped when the file is
    /// finished without being retrieved.
    type Partial: Send;

    /// Whether this handler supports `file`. Must be cheap: LUO asks every handler in turn.
    fn can_preserve(file: &File) -> bool;

    /// Preserves `file`.
    fn preserve(file: &File, session: &OutgoingSession<'_>) -> Result<Outgoing<Self>>;

    /// Releases a file that was preserved and will not be handed over (its session was closed
    /// before the kexec). The default drops `outgoing`, which unpreserves the head object.
    fn unpreserve(_file: &File, outgoing: Outgoing<Self>) {
        drop(outgoing);
    }

    /// Last actions right before the kexec. An error aborts the kexec.
    fn freeze(
        _file: &File,
        _outgoing: &mut Outgoing<Self>,
        _session: &OutgoingSession<'_>,
    ) -> Result {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Undoes [`FileHandler::freeze`] when the kexec is aborted.
    fn unfreeze(_file: &File, _outgoing: &mut Outgoing<Self>) {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Rebuilds the file in the new kernel. `serialized` is the head object the previous kernel
    /// preserved, and `partial` what an earlier, failed retrieve of the file took back and kept;
    /// the handler owns them and everything they refer to, on success and on failure, unless it
    /// hands them back with [`RetrieveError::retry`] or [`RetrieveError::retry_with`].
    fn retrieve(
        serialized: Restored<Self::Serialized>,
        partial: Option<Self::Partial>,
        session: &IncomingSession<'_>,
    ) -> Result<ARef<File>, RetrieveError<Self>>;

    /// Whether the session may finish now. `file` is the file [`FileHandler::retrieve`] made,
    /// when it succeeded. `releasing` says the session's last file descriptor is being closed:
    /// a refusal then keeps the session and its files until the next reboot, so a handler should
    /// not refuse then unless it must. Every file of the session is asked, even after one
    /// refused: a handler may start here what it waits for, but must not wait for it.
    fn can_finish(_file: Option<&File>, _status: RetrieveStatus, _releasing: bool) -> bool {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// The session is finished. When the file was never retrieved, `unretrieved` holds what is
    /// left of it, and the handler must release everything that refers to.
    fn finish(status: RetrieveStatus, unretrieved: Option<Unconsumed<Self>>);
}

/// A registration of a LUO file handler.
///
/// # Invariants
///
/// `inner` holds a `struct liveupdate_file_handler`. When its `ops` is not null, it was built
/// from `T` and registered with `liveupdate_register_file_handler()`, and is unregistered exactly
/// once, in `drop`.
#[pin_data(PinnedDrop)]
pub struct Registration<T: FileHandler> {
    #[pin]
    inner: Opaque<bindings::liveupdate_file_handler>,
    _t: PhantomData<T>,
}

// SAFETY: Registration and unregistration may happen on any thread.
unsafe impl<T: FileHandler> Send for Registration<T> {}
// SAFETY: `&Registration<T>` exposes nothing.
unsafe impl<T: FileHandler> Sync for Registration<T> {}

impl<T: FileHandler> Registration<T> {
    /// Registers the handler `T` with LUO.
    ///
    /// # Errors
    ///
    /// Returns `EOPNOTSUPP` when live update is disabled, `EEXIST` when another handler uses the
    /// same compatible string, and `EINVAL` when the compatible string is too long.
    ///
    /// # Safety
    ///
    /// Files LUO binds to the handler keep pointing at it: the registration must be dropped only
    /// when the module `T::OwnerModule` goes away, which LUO prevents while it holds such files,
    /// and must not be dropped once LUO may have bound a file to it if the module's
    /// initialisation fails (so nothing that can fail may follow it in the module's `init`).
    /// [`module_liveupdate_handler!`] does this.
    pub unsafe fn register() -> impl PinInit<Self, Error> {
        // SAFETY: The caller keeps the promise of `register_if`.
        unsafe { Self::register_if(true) }
    }

    /// Registers the handler `T` with LUO if `enabled`; otherwise the registration holds
    /// nothing.
    ///
    /// # Errors
    ///
    /// As [`Self::register`].
    ///
    /// # Safety
    ///
    /// As [`Self::register`].
    pub unsafe fn register_if(enabled: bool) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            inner <- Opaque::try_ffi_init(move |slot: *mut bindings::liveupdate_file_handler| {
                if !enabled {
                    // INVARIANT: A null `ops` says nothing was registered.
                    // SAFETY: The initializer may write to `slot`.
                    unsafe { slot.write(pin_init::zeroed()) };
                    return Ok(());
                }
                // SAFETY: The initializer may write to `slot`, which stays pinned until `drop`
                // unregisters it. `VTABLE` is static.
                // INVARIANT: On success, the handler is registered, and its `ops` is not null.
                unsafe { register_at(slot, T::COMPATIBLE, &HandlerVTable::<T>::VTABLE) }
            }),
            _t: PhantomData,
        })
    }
}

/// Writes a handler named `name` with `ops` into `slot` and registers it with LUO.
///
/// # Safety
///
/// `slot` must be valid for writes, not hold a registered handler, and stay at its place and
/// valid until the handler is unregistered, which the caller must do before the memory goes away
/// if this succeeds.
unsafe fn register_at(
    slot: *mut bindings::liveupdate_file_handler,
    name: &CStr,
    ops: &'static bindings::liveupdate_file_ops,
) -> Result {
    let name = name.to_bytes_with_nul();
    if name.len() > COMPATIBLE_LEN {
        return Err(EINVAL);
    }
    let mut handler: bindings::liveupdate_file_handler = pin_init::zeroed();
    handler.ops = ops;
    for (dst, src) in handler.compatible.iter_mut().zip(name) {
        *dst = *src as c_char;
    }
    // SAFETY: `slot` is valid for writes by the function's safety requirements.
    unsafe { slot.write(handler) };
    // SAFETY: `slot` holds a fully initialized handler whose ops are static, and stays where it
    // is until it is unregistered, by the function's safety requirements.
    to_result(unsafe { bindings::liveupdate_register_file_handler(slot) })
}

#[pinned_drop]
impl<T: FileHandler> PinnedDrop for Registration<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: `inner` was initialized by `register_if`, and is only read here.
        let registered = unsafe { !(*self.inner.get()).ops.is_null() };
        if registered {
            // SAFETY: The handler is registered, by the type invariants, and is unregistered
            // only here.
            unsafe { bindings::liveupdate_unregister_file_handler(self.inner.get()) };
        }
    }
}

/// Refusals of files that kernels before this one preserved in layouts it no longer reads.
///
/// LUO fails every open of `/dev/liveupdate` when the previous kernel preserved a file under a
/// compatible string that no handler has, so one such file would cost userspace every preserved
/// session. Under a compatible string registered here, the device opens and each retrieve of
/// such a file fails with `EOPNOTSUPP`. Neither the retrieve nor the session's finish takes back
/// anything the previous kernel preserved for the file: like any preserved memory nobody takes
/// back, it stays reserved until the next boot that does not inherit it.
///
/// `M` is the module that registers them: LUO holds a reference to it while an incoming session
/// has a file of one of these names. A refusal stands in for a handler without file-lifecycle
/// bound objects (FLBs) only: those of an old handler would never be finished.
///
/// Refusals are registered by [`module_liveupdate_handler!`], with its `refused` key.
///
/// # Invariants
///
/// Each element of `handlers` whose `ops` is not null is registered with
/// `liveupdate_register_file_handler()`, with [`Self::OPS`], and is unregistered exactly once, in
/// `drop`.
#[pin_data(PinnedDrop)]
pub struct Refusals<M: ModuleMetadata, const N: usize> {
    #[pin]
    handlers: Opaque<[bindings::liveupdate_file_handler; N]>,
    _m: PhantomData<M>,
}

// SAFETY: Registration and unregistration may happen on any thread.
unsafe impl<M: ModuleMetadata, const N: usize> Send for Refusals<M, N> {}
// SAFETY: `&Refusals<M, N>` exposes nothing.
unsafe impl<M: ModuleMetadata, const N: usize> Sync for Refusals<M, N> {}

impl<M: ModuleMetadata, const N: usize> Refusals<M, N> {
    const OPS: bindings::liveupdate_file_ops = bindings::liveupdate_file_ops {
        can_preserve: Some(refused_can_preserve),
        preserve: Some(refused_preserve),
        unpreserve: Some(refused_unpreserve),
        freeze: None,
        unfreeze: None,
        retrieve: Some(refused_retrieve),
        can_finish: None,
        finish: Some(refused_finish),
        get_id: None,
        owner: this_module::<M>().as_ptr(),
    };

    /// Registers a refusal for each name of `names` that is not `None`, as far as it can: a name
    /// that cannot be registered (another handler has it, say) is left out and logged, so that
    /// the handlers the module registers with it stay.
    ///
    /// # Safety
    ///
    /// As [`Registration::register`], with `M` for the module.
    pub unsafe fn register(names: [Option<&'static CStr>; N]) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            handlers <- Opaque::try_ffi_init(
                move |slots: *mut [bindings::liveupdate_file_handler; N]| {
                    let slots = slots.cast::<bindings::liveupdate_file_handler>();
                    for (i, name) in names.iter().enumerate() {
                        // SAFETY: `i < N`: within the array the initializer may write to.
                        let slot = unsafe { slots.add(i) };
                        let Some(name) = name else {
                            // INVARIANT: A null `ops` marks an element never registered.
                            // SAFETY: `slot` is valid for writes.
                            unsafe { slot.write(pin_init::zeroed()) };
                            continue;
                        };
                        // SAFETY: `slot` is valid for writes, holds no registered handler, and
                        // is pinned until `drop` unregisters it; `OPS` is static.
                        // INVARIANT: On success, the handler is registered.
                        if let Err(err) = unsafe { register_at(slot, name, &Self::OPS) } {
                            pr_warn!("{name}: cannot refuse files of this name: {err:?}\n");
                            // INVARIANT: A null `ops` marks an element never registered.
                            // SAFETY: `slot` is valid for writes, and LUO did not keep it.
                            unsafe { slot.write(pin_init::zeroed()) };
                        }
                    }
                    Ok::<(), Error>(())
                }
            ),
            _m: PhantomData,
        })
    }
}

#[pinned_drop]
impl<M: ModuleMetadata, const N: usize> PinnedDrop for Refusals<M, N> {
    fn drop(self: Pin<&mut Self>) {
        let slots = self
            .handlers
            .get()
            .cast::<bindings::liveupdate_file_handler>();
        for i in 0..N {
            // SAFETY: `i < N`, and every element was initialized by `register`.
            let slot = unsafe { slots.add(i) };
            // SAFETY: By the type invariants, an element whose `ops` is not null is registered,
            // and is unregistered only here.
            if unsafe { !(*slot).ops.is_null() } {
                // SAFETY: As above.
                unsafe { bindings::liveupdate_unregister_file_handler(slot) };
            }
        }
    }
}

/// The compatible string of the handler `args` names.
///
/// # Safety
///
/// `args` must be valid, and its `handler` a handler written by [`register_at`] (whose name is
/// NUL-terminated) that stays registered for `'a`.
unsafe fn handler_name<'a>(args: *mut bindings::liveupdate_file_op_args) -> &'a CStr {
    // SAFETY: `args` and its handler are valid; `register_at` wrote a NUL-terminated name.
    unsafe { CStr::from_char_ptr((*(*args).handler).compatible.as_ptr()) }
}

extern "C" fn refused_can_preserve(
    _handler: *mut bindings::liveupdate_file_handler,
    _file: *mut bindings::file,
) -> bool {
    false
}

extern "C" fn refused_preserve(_args: *mut bindings::liveupdate_file_op_args) -> c_int {
    EOPNOTSUPP.to_errno()
}

extern "C" fn refused_unpreserve(_args: *mut bindings::liveupdate_file_op_args) {}

/// # Safety
///
/// `args` must be valid, for a file of an incoming session, with its handler.
unsafe extern "C" fn refused_retrieve(args: *mut bindings::liveupdate_file_op_args) -> c_int {
    // SAFETY: `args` is valid, with its handler, by the function's safety requirements.
    let name = unsafe { handler_name(args) };
    pr_err!(
        "{name}: a file an earlier kernel preserved in a layout this kernel does not read; \
         refused, its memory stays reserved\n"
    );
    EOPNOTSUPP.to_errno()
}

/// # Safety
///
/// `args` must be valid, for a file of an incoming session, with its handler.
unsafe extern "C" fn refused_finish(args: *mut bindings::liveupdate_file_op_args) {
    // SAFETY: `args` is valid, with its handler, by the function's safety requirements.
    let name = unsafe { handler_name(args) };
    pr_warn!("{name}: finished unread; the memory it preserved stays reserved\n");
}

struct HandlerVTable<T: FileHandler>(PhantomData<T>);

impl<T: FileHandler> HandlerVTable<T> {
    const VTABLE: bindings::liveupdate_file_ops = bindings::liveupdate_file_ops {
        can_preserve: Some(Self::can_preserve),
        preserve: Some(Self::preserve),
        unpreserve: Some(Self::unpreserve),
        freeze: if T::HAS_FREEZE {
            Some(Self::freeze)
        } else {
            None
        },
        unfreeze: if T::HAS_UNFREEZE {
            Some(Self::unfreeze)
        } else {
            None
        },
        retrieve: Some(Self::retrieve),
        can_finish: if T::HAS_CAN_FINISH {
            Some(Self::can_finish)
        } else {
            None
        },
        finish: Some(Self::finish),
        get_id: None,
        owner: this_module::<T::OwnerModule>().as_ptr(),
    };

    /// # Safety
    ///
    /// `file` must be a valid file for the duration of the call.
    unsafe extern "C" fn can_preserve(
        _handler: *mut bindings::liveupdate_file_handler,
        file: *mut bindings::file,
    ) -> bool {
        // SAFETY: The caller guarantees `file` is valid for the duration of the call.
        T::can_preserve(unsafe { File::from_raw_file(file) })
    }

    /// # Safety
    ///
    /// `args` must be valid, with a valid `file` and a locked outgoing `session`.
    unsafe fn outgoing_session<'a>(
        args: *mut bindings::liveupdate_file_op_args,
    ) -> Option<OutgoingSession<'a>> {
        // SAFETY: `args` is valid by the function's safety requirements.
        let ptr = NonNull::new(unsafe { (*args).session })?;
        // INVARIANT: LUO holds the session lock while it calls the handler.
        Some(OutgoingSession {
            ptr,
            _p: PhantomData,
        })
    }

    /// # Safety
    ///
    /// `args` must be valid, with a valid `file` and a locked outgoing `session`.
    unsafe extern "C" fn preserve(args: *mut bindings::liveupdate_file_op_args) -> c_int {
        // SAFETY: `args` is valid by the function's safety requirements.
        let Some(session) = (unsafe { Self::outgoing_session(args) }) else {
            return EINVAL.to_errno();
        };
        // SAFETY: `args` and its `file` are valid for the duration of the call.
        let file = unsafe { File::from_raw_file((*args).file) };
        let outgoing = match T::preserve(file, &session) {
            Ok(outgoing) => outgoing,
            Err(err) => return err.to_errno(),
        };
        let phys = outgoing.serialized.phys();
        let outgoing = match KBox::new(outgoing, GFP_KERNEL) {
            Ok(outgoing) => outgoing,
            Err(err) => return Error::from(err).to_errno(),
        };
        // SAFETY: `args` is valid; LUO keeps these two fields until `unpreserve` or the kexec.
        unsafe {
            (*args).serialized_data = phys;
            (*args).private_data = outgoing.into_foreign().cast();
        }
        0
    }

    /// # Safety
    ///
    /// `args` must be valid, with the `private_data` set by a successful [`Self::preserve`].
    unsafe fn outgoing<'a>(args: *mut bindings::liveupdate_file_op_args) -> &'a mut Outgoing<T> {
        // SAFETY: `private_data` came from `KBox::into_foreign` in `preserve` and is not yet
        // freed; LUO serializes the calls for one file, so this is the only reference.
        unsafe { KBox::<Outgoing<T>>::borrow_mut((*args).private_data.cast()) }
    }

    /// # Safety
    ///
    /// `args` must be valid, for a file preserved by [`Self::preserve`].
    unsafe extern "C" fn unpreserve(args: *mut bindings::liveupdate_file_op_args) {
        // SAFETY: `private_data` came from `KBox::into_foreign` in `preserve`; LUO calls
        // `unpreserve` once, after which it does not use `private_data` again.
        let outgoing = unsafe { KBox::<Outgoing<T>>::from_foreign((*args).private_data.cast()) };
        // SAFETY: `args` and its `file` are valid for the duration of the call.
        let file = unsafe { File::from_raw_file((*args).file) };
        T::unpreserve(file, KBox::into_inner(outgoing));
        // SAFETY: `args` is valid.
        unsafe { (*args).private_data = core::ptr::null_mut() };
    }

    /// # Safety
    ///
    /// `args` must be valid, for a file preserved by [`Self::preserve`], with a locked outgoing
    /// `session`.
    unsafe extern "C" fn freeze(args: *mut bindings::liveupdate_file_op_args) -> c_int {
        // SAFETY: `args` is valid by the function's safety requirements.
        let Some(session) = (unsafe { Self::outgoing_session(args) }) else {
            return EINVAL.to_errno();
        };
        // SAFETY: `args` is valid for a preserved file.
        let outgoing = unsafe { Self::outgoing(args) };
        // SAFETY: `args` and its `file` are valid for the duration of the call.
        let file = unsafe { File::from_raw_file((*args).file) };
        match T::freeze(file, outgoing, &session) {
            Ok(()) => 0,
            Err(err) => err.to_errno(),
        }
    }

    /// # Safety
    ///
    /// `args` must be valid, for a file preserved by [`Self::preserve`].
    unsafe extern "C" fn unfreeze(args: *mut bindings::liveupdate_file_op_args) {
        // SAFETY: `args` is valid for a preserved file.
        let outgoing = unsafe { Self::outgoing(args) };
        // SAFETY: `args` and its `file` are valid for the duration of the call.
        let file = unsafe { File::from_raw_file((*args).file) };
        T::unfreeze(file, outgoing);
    }

    /// # Safety
    ///
    /// `args` must be valid, with a locked incoming `session`.
    unsafe extern "C" fn retrieve(args: *mut bindings::liveupdate_file_op_args) -> c_int {
        // SAFETY: `args` is valid by the function's safety requirements.
        let (session, phys) = unsafe { ((*args).session, (*args).serialized_data) };
        let Some(ptr) = NonNull::new(session) else {
            return EINVAL.to_errno();
        };
        // INVARIANT: LUO holds the session lock while it calls the handler.
        let session = IncomingSession {
            ptr,
            _p: PhantomData,
        };
        // Room to keep what is left if this try fails, taken before anything of the preserved
        // state is: a failure here loses nothing, whatever an earlier try left stays where it is.
        let Ok(room) = KBox::<Unconsumed<T>>::new_uninit(GFP_KERNEL) else {
            // SAFETY: `args` is valid.
            unsafe { (*args).retryable = true };
            return ENOMEM.to_errno();
        };
        // SAFETY: `args` is valid; LUO passes back what an earlier retryable retrieve left.
        let (serialized, partial) = match unsafe { Self::take_unconsumed(args) } {
            Some(Unconsumed {
                serialized,
                partial,
            }) => (serialized, partial),
            None => match Restored::restore(phys) {
                Ok(serialized) => (serialized, None),
                Err(err) => return err.to_errno(),
            },
        };
        match T::retrieve(serialized, partial, &session) {
            Ok(file) => {
                // SAFETY: `args` is valid; LUO takes over our reference to the new file.
                unsafe { (*args).file = ARef::into_raw(file).as_ptr().cast() };
                0
            }
            Err(RetrieveError {
                error,
                unconsumed: Some(unconsumed),
            }) => {
                let kept = KBox::write(room, unconsumed);
                // SAFETY: `args` is valid; LUO keeps `private_data` for the next retrieve,
                // can_finish and finish of this file, which take it back with
                // `take_unconsumed`.
                unsafe {
                    (*args).private_data = kept.into_foreign().cast();
                    (*args).retryable = true;
                }
                error.to_errno()
            }
            Err(RetrieveError { error, .. }) => error.to_errno(),
        }
    }

    /// Takes back what a retryable retrieve left in `private_data`, if anything.
    ///
    /// # Safety
    ///
    /// `args` must be valid, for a file of an incoming session, whose `private_data` is null or
    /// was set by [`Self::retrieve`] and not taken back since.
    unsafe fn take_unconsumed(
        args: *mut bindings::liveupdate_file_op_args,
    ) -> Option<Unconsumed<T>> {
        // SAFETY: `args` is valid by the function's safety requirements.
        let ptr = unsafe { (*args).private_data };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `args` is valid; the pointer is taken back below, once.
        unsafe { (*args).private_data = core::ptr::null_mut() };
        // SAFETY: A non-null `private_data` came from `KBox::into_foreign` in `retrieve`, for a
        // `KBox<Unconsumed<T>>`, and is taken back only here.
        let kept = unsafe { KBox::<Unconsumed<T>>::from_foreign(ptr.cast()) };
        Some(KBox::into_inner(kept))
    }

    /// # Safety
    ///
    /// `args` must be valid.
    unsafe extern "C" fn can_finish(args: *mut bindings::liveupdate_file_op_args) -> bool {
        // SAFETY: `args` is valid by the function's safety requirements.
        let (status, file, releasing) =
            unsafe { ((*args).retrieve_status, (*args).file, (*args).releasing) };
        let status = RetrieveStatus::from_raw(status);
        let file = match status {
            RetrieveStatus::Retrieved if !file.is_null() => {
                // SAFETY: After a successful retrieve, LUO holds a reference to the file it made
                // until finish, and passes it here.
                Some(unsafe { File::from_raw_file(file) })
            }
            _ => None,
        };
        T::can_finish(file, status, releasing)
    }

    /// # Safety
    ///
    /// `args` must be valid; LUO calls `finish` once per preserved file.
    unsafe extern "C" fn finish(args: *mut bindings::liveupdate_file_op_args) {
        // SAFETY: `args` is valid by the function's safety requirements.
        let (status, phys) = unsafe { ((*args).retrieve_status, (*args).serialized_data) };
        let status = RetrieveStatus::from_raw(status);
        // What a retryable retrieve handed back; LUO leaves `private_data` null otherwise, but
        // whatever is there is ours to free.
        // SAFETY: `args` is valid, for a file of an incoming session; LUO does not use
        // `private_data` after finish.
        let kept = unsafe { Self::take_unconsumed(args) };
        // A retrieve, successful or not, consumed the head object already, except one that
        // handed it back.
        let unretrieved = match (status, kept) {
            (_, Some(unconsumed)) => Some(unconsumed),
            (RetrieveStatus::NotAttempted, None) => match Restored::restore(phys) {
                Ok(serialized) => Some(Unconsumed {
                    serialized,
                    partial: None,
                }),
                Err(err) => {
                    pr_err!(
                        "{}: cannot restore preserved data: {:?}\n",
                        T::COMPATIBLE,
                        err
                    );
                    None
                }
            },
            (_, None) => None,
        };
        T::finish(status, unretrieved);
    }
}

/// How many times [`FileHandler::finish`] tries to release a file when memory is short, with
/// [`retry_on_enomem`].
pub const FINISH_TRIES: u32 = 10;

/// Runs `f` again, up to `tries` times in all, 10 ms apart, while it fails with `ENOMEM`.
///
/// For [`FileHandler::finish`], which cannot fail: releasing what a file preserved may need
/// memory (KHO maps a preserved vector), and a release that failed with `ENOMEM` before taking
/// anything back can be tried again rather than leak the file's memory. Also for handlers that
/// put preserved memory back in the background, where there is no caller to give `ENOMEM` to.
///
/// # Examples
///
/// ```
/// use kernel::liveupdate::retry_on_enomem;
///
/// // Memory short twice, then enough.
/// let mut calls = 0;
/// let got = retry_on_enomem(5, || {
///     calls += 1;
///     if calls < 3 { Err(ENOMEM) } else { Ok(calls) }
/// });
/// assert_eq!(got, Ok(3));
/// // Other errors are not tried again, and ENOMEM only so many times.
/// calls = 0;
/// assert_eq!(retry_on_enomem(5, || { calls += 1; Err::<(), _>(EIO) }), Err(EIO));
/// assert_eq!(calls, 1);
/// calls = 0;
/// assert_eq!(retry_on_enomem(2, || { calls += 1; Err::<(), _>(ENOMEM) }), Err(ENOMEM));
/// assert_eq!(calls, 2);
/// ```
pub fn retry_on_enomem<T>(tries: u32, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut result = f();
    for _ in 1..tries {
        if !matches!(result, Err(ENOMEM)) {
            break;
        }
        crate::time::delay::fsleep(crate::time::Delta::from_millis(10));
        result = f();
    }
    result
}

/// Declares a kernel module that registers a LUO file handler.
///
/// The module registers the handler when it is initialised and unregisters it when it is
/// removed. With `legacy`, it also registers, if `legacy_if` is true when the module is
/// initialised, a second handler for files that kernels before this one preserved under another
/// compatible string in a layout it reads. With `refused`, it registers [`Refusals`] for the
/// names given as `Some` (`Option<&'static CStr>` expressions, evaluated at initialisation): the
/// compatible strings of layouts it no longer reads. The fields that follow are those of
/// [`module!`](crate::prelude::module).
///
/// # Examples
///
/// ```ignore
/// kernel::module_liveupdate_handler! {
///     type: MyHandler,
///     name: "my_luo",
///     authors: ["Rust for Linux Contributors"],
///     description: "Live update of my files",
///     license: "GPL",
/// }
///
/// kernel::module_liveupdate_handler! {
///     type: MyHandler<false>,
///     legacy: MyHandler<true>,
///     legacy_if: true,
///     refused: [Some(c"my-file-v1")],
///     name: "my_luo",
///     authors: ["Rust for Linux Contributors"],
///     description: "Live update of my files",
///     license: "GPL",
/// }
/// ```
#[macro_export]
macro_rules! module_liveupdate_handler {
    (
        type: $type:ty,
        legacy: $legacy:ty,
        legacy_if: $reads:expr,
        refused: [$($refused:expr),* $(,)?],
        $($f:tt)*
    ) => {
        $crate::module_liveupdate_handler!(
            @module [$type] [$legacy, $reads] [$($refused),*] $($f)*
        );
    };
    (type: $type:ty, $($f:tt)*) => {
        $crate::module_liveupdate_handler!(@module [$type] [] [] $($f)*);
    };
    (@module [$type:ty] [$($legacy:ty, $reads:expr)?] [$($refused:expr),*] $($f:tt)*) => {
        #[$crate::prelude::pin_data]
        struct LiveUpdateHandlerModule {
            #[pin]
            _registration: $crate::liveupdate::Registration<$type>,
            $(
                #[pin]
                _legacy: $crate::liveupdate::Registration<$legacy>,
            )?
            #[pin]
            _refused: $crate::liveupdate::Refusals<
                LiveUpdateHandlerModule,
                { <[&str]>::len(&[$(stringify!($refused)),*]) },
            >,
        }

        impl $crate::InPlaceModule for LiveUpdateHandlerModule {
            fn init(
                _module: &'static $crate::ThisModule,
            ) -> impl ::pin_init::PinInit<Self, $crate::error::Error> {
                // SAFETY: The registrations are dropped when the module goes away, and only the
                // refusals, which cannot fail, follow the handlers in `init`.
                $crate::try_pin_init!(Self {
                    _registration <- unsafe { $crate::liveupdate::Registration::register() },
                    $(
                        _legacy <- unsafe {
                            $crate::liveupdate::Registration::<$legacy>::register_if($reads)
                        },
                    )?
                    _refused <- unsafe {
                        $crate::liveupdate::Refusals::register([$($refused),*])
                    },
                })
            }
        }

        $crate::prelude::module! {
            type: LiveUpdateHandlerModule,
            $($f)*
        }
    };
}
