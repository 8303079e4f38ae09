// SPDX-License-Identifier: GPL-2.0
//! The vCPU threads, and how they stop: a flag, a signal to get each out of `KVM_RUN`,
//! `immediate_exit` to complete an exit's pending I/O without entering the guest, then a
//! verdict from the VMM once every vCPU is out and nothing injects interrupts any more: save,
//! or run again. A stop that does not complete (a vCPU that does not come out in time, a save
//! that fails) gives back running vCPUs: the guest goes on.

use crate::devices::PortIo;
use crate::rdtsc;
use crate::say;
use crate::state::{SaveOpts, VcpuState};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// How long the vCPUs have to come out of `KVM_RUN` once asked to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where stop number `cycle` is: how many vCPUs stopped in it, and what the VMM decided for
/// them. Counted under the mutex, per stop: a vCPU counts itself only once it is out of
/// `KVM_RUN` for this stop, never for an earlier one.
#[derive(Clone, Copy, Default)]
struct Verdict {
    cycle: u64,
    stopped: usize,
    /// `Some(true)`: save and end; `Some(false)`: run again; `None`: not decided yet.
    save: Option<bool>,
}

/// What the vCPU threads share with each other and with the VMM.
struct VcpuCtl {
    io: Arc<PortIo>,
    save: SaveOpts,
    stop: AtomicBool,
    /// A vCPU left its run loop on an error.
    failed: AtomicBool,
    verdict: Mutex<Verdict>,
    told: Condvar,
    /// TSC at the first `KVM_RUN`.
    first_entry: AtomicU64,
    /// How many vCPU threads came to their first `KVM_RUN` (counted just before it).
    entered: AtomicUsize,
}

impl VcpuCtl {
    fn decide(&self, save: bool) {
        if !save {
            // Before the verdict: a vCPU that goes back must find the flag down.
            self.stop.store(false, Ordering::Release);
        }
        self.verdict.lock().unwrap().save = Some(save);
        self.told.notify_all();
    }
}

/// What a stop gives: what `quiesce` returned, and each vCPU with its saved state.
pub type Saved<T> = (T, Vec<(VcpuFd, VcpuState)>);

/// Running vCPU threads. Stopping them gives back each vCPU with its saved state.
pub struct Running {
    threads: Vec<JoinHandle<(VcpuFd, io::Result<VcpuState>)>>,
    ctl: Arc<VcpuCtl>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn handle_exit(id: usize, io: &PortIo, exit: VcpuExit<'_>) -> io::Result<()> {
    match exit {
        VcpuExit::IoIn(port, data) => io.read(port, data),
        VcpuExit::IoOut(port, data) => io.write(port, data),
        // No device behind it (the guest probes): reads see all ones, writes go nowhere.
        VcpuExit::MmioRead(addr, data) => {
            say(format!(
                "vCPU {id}: MMIO read at {addr:#x}, no device there"
            ));
            data.fill(0xff);
        }
        VcpuExit::MmioWrite(addr, _) => {
            say(format!(
                "vCPU {id}: MMIO write at {addr:#x}, no device there"
            ));
        }
        VcpuExit::Intr => {}
        exit => return Err(io::Error::other(format!("vCPU {id}: exit {exit:?}"))),
    }
    Ok(())
}

/// Says where a vCPU that failed was, for the post-mortem (a triple fault says little else).
fn post_mortem(id: usize, vcpu: &VcpuFd, e: &io::Error) {
    say(format!("vCPU {id} stopped: {e}"));
    if let (Ok(r), Ok(sr)) = (vcpu.get_regs(), vcpu.get_sregs()) {
        say(format!(
            "vCPU {id}: rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} \
             cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}+{:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            sr.cs.selector,
            sr.cr0,
            sr.cr2,
            sr.cr3,
            sr.cr4,
            sr.efer,
            sr.idt.base,
            sr.idt.limit
        ));
    }
    if let Ok(ev) = vcpu.get_vcpu_events() {
        say(format!(
            "vCPU {id}: exception injected {} nr {} error code {:#x}, nmi pending {}",
            ev.exception.injected, ev.exception.nr, ev.exception.error_code, ev.nmi.pending
        ));
    }
}

fn run_vcpu(id: usize, mut vcpu: VcpuFd, ctl: &VcpuCtl) -> (VcpuFd, io::Result<VcpuState>) {
    let now = rdtsc();
    if ctl
        .first_entry
        .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        super::mark_step_at("enters", Some(id), now);
    }
    ctl.entered.fetch_add(1, Ordering::Release);
    let mut result = Ok(());
    loop {
        while result.is_ok() && !ctl.stop.load(Ordering::Acquire) {
            result = match vcpu.run() {
                Ok(exit) => handle_exit(id, &ctl.io, exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
                Err(e) => Err(io::Error::other(format!("vCPU {id}: KVM_RUN: {e}"))),
            };
            if let Err(e) = &result {
                post_mortem(id, &vcpu, e);
                ctl.failed.store(true, Ordering::Release);
            }
        }
        // Let KVM complete an I/O instruction the last exit left pending, without entering
        // the guest (a string instruction may need several rounds): the state saved below is
        // then between two instructions.
        vcpu.set_kvm_immediate_exit(1);
        while result.is_ok() {
            match vcpu.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) if e.errno() == libc::EAGAIN => {}
                Ok(exit) => result = handle_exit(id, &ctl.io, exit),
                Err(e) => result = Err(io::Error::other(format!("vCPU {id}: last KVM_RUN: {e}"))),
            }
            if let Err(e) = &result {
                post_mortem(id, &vcpu, e);
                ctl.failed.store(true, Ordering::Release);
            }
        }
        vcpu.set_kvm_immediate_exit(0);
        // Wait for the verdict: save only once no vCPU runs and nothing injects interrupts any
        // more (an IPI from another vCPU, or the UART's irqfd, would otherwise land after this
        // vCPU's LAPIC was saved), or run again.
        let mut v = ctl.verdict.lock().unwrap();
        let cycle = v.cycle;
        v.stopped += 1;
        ctl.told.notify_all();
        // A vCPU that failed cannot run again: it waits for a save or the next stop.
        while v.cycle == cycle && (v.save.is_none() || (result.is_err() && v.save == Some(false))) {
            v = ctl.told.wait(v).unwrap();
        }
        if v.cycle == cycle && v.save == Some(true) {
            break;
        }
    }
    let state = result.and_then(|()| {
        if id + 1 == ctl.save.vcpus && super::injected_save_failure() {
            return Err(io::Error::other(format!(
                "vCPU {id}: saving its state failed (injected by the test)"
            )));
        }
        VcpuState::save(&vcpu, id, &ctl.save)
    });
    super::mark_vcpu_step("saved", id);
    (vcpu, state)
}

impl Drop for Running {
    /// vCPUs must not run once what they use can go (the guest's memory mapping, the devices):
    /// a `Running` dropped without [`Running::stop`], on an error path, stops its vCPUs first,
    /// and the VMM aborts if they do not stop.
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        if let Err(left) = self.bring_out() {
            say(format!(
                "{left} vCPUs do not stop, and what they use is going: aborting"
            ));
            std::process::abort();
        }
        self.ctl.decide(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl super::checks::Vcpus for Running {
    fn count(&self) -> usize {
        self.threads.len()
    }

    fn any_failed(&self) -> bool {
        Running::any_failed(self)
    }
}

impl Running {
    pub fn start(vcpus: Vec<VcpuFd>, io: &Arc<PortIo>, save: &SaveOpts) -> io::Result<Self> {
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| io::Error::other(format!("signal handler: {e}")))?;
        let ctl = Arc::new(VcpuCtl {
            io: io.clone(),
            save: save.clone(),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            verdict: Mutex::default(),
            told: Condvar::new(),
            first_entry: AtomicU64::new(0),
            entered: AtomicUsize::new(0),
        });
        let mut running = Self {
            threads: Vec::new(),
            ctl,
        };
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let ctl = running.ctl.clone();
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(id, vcpu, &ctl))
            {
                Ok(t) => running.threads.push(t),
                Err(e) => {
                    // The vCPUs that run stop again, before anything they use can go.
                    if running.stop(|| Ok(())).is_err() {
                        crate::fail(format!("vCPU threads: {e}; and they do not stop"));
                    }
                    return Err(e);
                }
            }
        }
        Ok(running)
    }

    /// Whether a vCPU left its run loop on an error.
    pub fn any_failed(&self) -> bool {
        self.ctl.failed.load(Ordering::Acquire)
    }

    /// TSC when the first vCPU entered the guest, once one has.
    pub fn first_entry(&self) -> u64 {
        self.ctl.first_entry.load(Ordering::SeqCst)
    }

    /// Waits until every vCPU thread came to its first `KVM_RUN` (counted just before the
    /// ioctl), one failed, or `timeout` passed; whether they all did. On a host with few CPUs,
    /// what the VMM does next (its console output, finishing the session, which starts the
    /// kernel's background restore) would otherwise run before the threads just started.
    pub fn wait_entered(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ctl.entered.load(Ordering::Acquire) >= self.threads.len() {
                return true;
            }
            if self.any_failed() || Instant::now() > deadline {
                return false;
            }
            // Sleeping, not yielding: the vCPU threads get this CPU whatever their order.
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Starts stop number `cycle + 1` and gets every vCPU out of `KVM_RUN`, waiting for its
    /// verdict. Returns how many did not come out in time.
    fn bring_out(&self) -> Result<(), usize> {
        {
            let mut v = self.ctl.verdict.lock().unwrap();
            *v = Verdict {
                cycle: v.cycle + 1,
                stopped: 0,
                save: None,
            };
        }
        // A vCPU that failed waits for the next stop: this is it.
        self.ctl.told.notify_all();
        self.ctl.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let stopped = self.ctl.verdict.lock().unwrap().stopped;
            if stopped >= self.threads.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.threads.len() - stopped);
            }
            for t in &self.threads {
                // A thread already waiting for the verdict just goes back to waiting.
                let _ = t.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stops every vCPU; once none runs, `quiesce` runs (to stop what injects interrupts, and
    /// save what belongs to the whole VM), then each vCPU saves its state. Returns them with
    /// their states, in vCPU order. On failure the vCPUs run again, and come back with the
    /// error: a vCPU that does not stop in time, `quiesce` failing (whatever it undid must be
    /// redone by the caller), or a vCPU whose state cannot be read.
    pub fn stop<T>(
        mut self,
        quiesce: impl FnOnce() -> io::Result<T>,
    ) -> Result<Saved<T>, (Self, io::Error)> {
        if let Err(left) = self.bring_out() {
            self.ctl.decide(false);
            let e = io::Error::other(format!(
                "{left} of {} vCPUs did not stop in {} s",
                self.threads.len(),
                STOP_TIMEOUT.as_secs()
            ));
            return Err((self, e));
        }
        super::mark_step("vCPUs out");
        let quiesced = match quiesce() {
            Ok(q) => q,
            Err(e) => {
                self.ctl.decide(false);
                return Err((self, e));
            }
        };
        self.ctl.decide(true);
        let threads = std::mem::take(&mut self.threads);
        let mut vcpus = Vec::with_capacity(threads.len());
        let mut states = Vec::with_capacity(threads.len());
        let mut error = None;
        for t in threads {
            // A vCPU thread does not panic (panic = "abort" for this binary).
            let (vcpu, state) = t.join().expect("a vCPU thread panicked");
            match state {
                Ok(s) => states.push(s),
                Err(e) => error = error.or(Some(e)),
            }
            vcpus.push(vcpu);
        }
        super::mark_step("joined");
        let failed = self.ctl.failed.load(Ordering::Acquire);
        match error {
            None => Ok((quiesced, vcpus.into_iter().zip(states).collect())),
            Some(e) => match Self::start(vcpus, &self.ctl.io, &self.ctl.save) {
                Ok(running) => {
                    // A vCPU that had failed still counts as failed.
                    running.ctl.failed.fetch_or(failed, Ordering::AcqRel);
                    Err((running, e))
                }
                Err(e2) => crate::fail(format!("{e}; and the vCPUs cannot run again: {e2}")),
            },
        }
    }
}
