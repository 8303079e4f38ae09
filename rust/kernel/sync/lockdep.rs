// SPDX-License-Identifier: GPL-2.0

//! Lockdep maps: lockdep checks for waits that are not locks.
//!
//! C header: [`include/linux/lockdep.h`](srctree/include/linux/lockdep.h)
//!
//! Some synchronisation is not a lock, but is one in effect: a state that one task claims and
//! others sleep on until it is given back (as `flush_work()` waits for a work item). Lockdep
//! cannot see such a wait, and so cannot see a deadlock through it. A [`LockdepMap`] lets the
//! claimer tell lockdep that it holds something, and the waiters that they may wait for it:
//! lockdep then checks the claim against every lock taken around it, as it checks a lock.
//!
//! Without `CONFIG_LOCKDEP` all of this does nothing.

use crate::{
    bindings,
    prelude::*,
    sync::LockClassKey,
    types::{
        NotThreadSafe,
        Opaque, //
    },
};

/// Something lockdep checks as a lock that it is not: see the [module documentation](self).
///
/// Wraps the kernel's `struct lockdep_map`.
///
/// # Examples
///
/// ```
/// use kernel::sync::{lockdep::LockdepMap, static_lock_class};
///
/// #[pin_data]
/// struct Claim {
///     #[pin]
///     map: LockdepMap,
/// }
///
/// let claim = KBox::pin_init(
///     pin_init!(Claim {
///         map <- LockdepMap::new(c"claim", static_lock_class!()),
///     }),
///     GFP_KERNEL,
/// )?;
/// // Those who wait for the holder say so first.
/// claim.map.might_wait();
/// // The holder holds it as long as the guard lives.
/// let held = claim.map.acquire();
/// drop(held);
/// # Ok::<(), Error>(())
/// ```
#[pin_data]
pub struct LockdepMap {
    #[pin]
    map: Opaque<bindings::lockdep_map>,
}

// SAFETY: Lockdep maps are used by any task; lockdep serialises what it records about them.
unsafe impl Send for LockdepMap {}

// SAFETY: As for `Send`: every operation on a lockdep map can run concurrently with others.
unsafe impl Sync for LockdepMap {}

impl LockdepMap {
    /// Creates a lockdep map of class `key`, called `name` in lockdep's reports.
    pub fn new(name: &'static CStr, key: Pin<&'static LockClassKey>) -> impl PinInit<Self> {
        pin_init!(Self {
            // SAFETY: `slot` is valid for writes and pinned; `name` and `key` live forever, as
            // lockdep keeps pointers to both.
            map <- Opaque::ffi_init(|slot| unsafe {
                bindings::lockdep_init_map(slot, name.as_char_ptr(), key.as_ptr(), 0)
            }),
        })
    }

    /// Tells lockdep that the current task holds `self` until the returned guard is dropped.
    ///
    /// Lockdep checks it as an exclusive lock: the locks the task holds now must not be taken,
    /// anywhere, by a task that holds `self`, and so on.
    // Inlined, so that lockdep's reports name the caller, not this function.
    #[inline(always)]
    pub fn acquire(&self) -> LockdepMapGuard<'_> {
        // SAFETY: The map was initialised by `new` and is pinned.
        unsafe { bindings::lock_map_acquire(self.map.get()) };
        LockdepMapGuard {
            map: self,
            _not_send: NotThreadSafe,
        }
    }

    /// Tells lockdep that the current task may wait for a holder of `self`: as taking and
    /// releasing it at once. Call it before every such wait, and also where a wait is only
    /// possible, so that lockdep sees the dependency even when nobody is waiting.
    #[inline(always)]
    pub fn might_wait(&self) {
        drop(self.acquire());
    }
}

/// The current task holds a [`LockdepMap`], for lockdep, until this guard is dropped.
///
/// It stays with the task that acquired the map: lockdep tracks what each task holds.
#[must_use = "the map is released as soon as the guard is dropped"]
pub struct LockdepMapGuard<'a> {
    map: &'a LockdepMap,
    _not_send: NotThreadSafe,
}

impl Drop for LockdepMapGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: The current task acquired the map when it created this guard, which cannot
        // leave it.
        unsafe { bindings::lock_map_release(self.map.map.get()) };
    }
}
