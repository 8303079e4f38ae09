// SPDX-License-Identifier: GPL-2.0

//! Background workers: work items that put the memory of a retrieved file in, so that finish
//! does not wait for the VMM to touch every page.

use super::lazy::FileMemory;
use core::mem::MaybeUninit;
use kernel::{
    kvm::GmemInode,
    prelude::*,
    sync::{
        aref::ARef,
        Arc,
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
    pub(super) fn start(self, memory: &Arc<FileMemory>, inode: &ARef<GmemInode>) {
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
