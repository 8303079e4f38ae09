// SPDX-License-Identifier: GPL-2.0

//! Background workers: work items that put the memory of a retrieved file in, so that finish
//! does not wait for the VMM to touch every page.
//!
//! They start when the VMM first tries to finish the session (or releases it), not at the
//! retrieve: until the VMM says it is done with its restore, the CPUs are the VMM's and memory goes
//! in on first use only. On a host with few CPUs to spare, workers started at the retrieve took
//! them from the VMM's restore and the guest's first instructions.

use super::lazy::FileMemory;
use core::mem::MaybeUninit;
use kernel::{
    kvm::{
        GmemFiller,
        GmemInode, //
    },
    new_spinlock,
    prelude::*,
    sync::{
        aref::ARef,
        Arc,
        SpinLock,
        UniqueArc, //
    },
    workqueue::{
        self,
        impl_has_work,
        new_work,
        Work,
        WorkItem, //
    },
};

/// The most background workers a file gets.
const MAX_WORKERS: u32 = 16;

/// A background worker putting in the memory of a retrieved file; it holds the inode until it is
/// done.
#[pin_data]
struct Worker {
    memory: Arc<FileMemory>,
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
pub(super) struct WorkerSlots(KVVec<UniqueArc<MaybeUninit<Worker>>>);

impl WorkerSlots {
    /// Room for one worker per CPU (at most [`MAX_WORKERS`]), or none without background restore.
    pub(super) fn new() -> Result<Self> {
        let nr = if super::module_parameters::background_restore.value() {
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
    fn start(self, memory: &Arc<FileMemory>, inode: &ARef<GmemInode>) {
        for slot in self.0.into_iter().take(memory.nr_windows()) {
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

/// The filler of a retrieved file: its memory, and its background workers until they start.
#[pin_data]
pub(super) struct Retrieved {
    memory: Arc<FileMemory>,
    /// The workers that have not started yet.
    #[pin]
    idle: SpinLock<Option<WorkerSlots>>,
}

impl Retrieved {
    /// The memory of the file.
    pub(super) fn memory(&self) -> &Arc<FileMemory> {
        &self.memory
    }

    /// Starts the background workers, unless they have started already.
    pub(super) fn start_workers(&self, inode: &ARef<GmemInode>) {
        let idle = self.idle.lock().take();
        if let Some(workers) = idle {
            workers.start(&self.memory, inode);
        }
    }
}

impl GmemFiller for Retrieved {
    fn fill(&self, inode: &GmemInode, index: u64) -> Result {
        self.memory.fill_at(inode, index)
    }

    fn discard(&self, inode: &GmemInode, start: u64, end: u64) -> Result {
        self.memory.discard_range(inode, start, end)
    }

    fn stop(&self) {
        // Nothing starts them any more (freed outside the lock); those that run stop.
        let idle = self.idle.lock().take();
        drop(idle);
        self.memory.stop_workers();
    }
}

/// Memory for a [`Retrieved`] and its workers, taken before the retrieve consumes the preserved
/// records.
pub(super) struct RetrievedSlot {
    slot: UniqueArc<MaybeUninit<Retrieved>>,
    workers: WorkerSlots,
}

impl RetrievedSlot {
    /// Room for the filler and its workers.
    pub(super) fn new() -> Result<Self> {
        Ok(Self {
            slot: UniqueArc::new_uninit(GFP_KERNEL)?,
            workers: WorkerSlots::new()?,
        })
    }

    /// The filler of `memory`, its workers idle: allocates nothing.
    pub(super) fn fill(self, memory: Arc<FileMemory>) -> Arc<Retrieved> {
        let workers = self.workers;
        match self.slot.pin_init_with(pin_init!(Retrieved {
            memory,
            idle <- new_spinlock!(Some(workers), "guest_memfd_luo::Retrieved::idle"),
        })) {
            Ok(retrieved) => Arc::from(retrieved),
            Err(err) => match err {},
        }
    }
}
