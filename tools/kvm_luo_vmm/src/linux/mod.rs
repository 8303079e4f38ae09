// SPDX-License-Identifier: GPL-2.0
//! A Linux guest across a host live update, in three host kernels:
//!
//! 1. boot the guest (bzImage, initramfs, RAM in guest_memfds, 2 vCPUs, in-kernel irqchip and
//!    PIT, a 16550 console) and let it work; stop the vCPUs, save the whole VM state, preserve
//!    the VM, its guest_memfds and the state in a LUO session; the host kexecs;
//! 2. retrieve everything, rebuild the VM's devices and vCPUs from the state, resume, and check
//!    that the guest went on: its heartbeat and clock continue, every vCPU still takes timer
//!    interrupts, its memory checksums verify, its console answers, and it complains about
//!    nothing; then a bare kexec;
//! 3. how long that bare kexec took, next to the guest's blackout.
//!
//! Or, under the live-update agent, the same for as many updates as the agent asks for; or,
//! for the soak (`build/soak.sh`), only the first boot, watched for a while.
//!
//! The parts, each readable alone:
//! - [`vcpu`]: the vCPU threads and the stop protocol;
//! - [`machine`]: the VM, its RAM and devices; boot, stop and save, preserve, go on, restore;
//! - [`checks`]: what the VMM reads in the guest's console to know it is well;
//! - [`stages`]: the three host kernels of the test and the demo, and the soak's boot;
//! - [`agent`]: the VMM under `kvm-luo-agent`.
//!
//! A guest is never dropped while it could be kept: a stop or save that fails in the old
//! kernel runs the guest again (the update is refused); in the new kernel an MSR the new KVM
//! refuses is skipped, a CPUID the new KVM does not offer is reported, a slow finish is waited
//! for while the guest runs, and a step that cannot be done leaves the session unfinished with
//! everything in it held.

mod agent;
mod checks;
mod machine;
mod stages;
mod vcpu;

pub use agent::{serve, AgentOpts};
pub use stages::{bare_kexec_done, boot_and_preserve, boot_in_qemu, boot_only, resume};

use crate::rdtsc;
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const SESSION: &str = "kvm-luo-vmm-linux";
const TOKEN_VM: u64 = 1;
const TOKEN_STATE: u64 = 2;
const TOKEN_RAM: u64 = 16;
/// A new guest's RAM comes in guest_memfds of at most this size (`--region`), one memslot
/// each. Its state records their sizes, and a restore takes those, whatever size the VMM that
/// booted the guest chose.
pub const DEFAULT_REGION_MIB: u64 = 1024;
/// The smallest `--region`.
pub const MIN_REGION_MIB: u64 = 16;
const MAGIC: &str = "kvm-luo-vmm linux guest v1";
const NEXT_ARGS: &str = "/tmp/klu-next-args";

/// Where the guest's RAM is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ram {
    /// guest_memfds, mapped (`GUEST_MEMFD_FLAG_MMAP`): what a live update preserves.
    GuestMemfd,
    /// Anonymous memory (`KVM_SET_USER_MEMORY_REGION`): for comparison; cannot be preserved.
    Anonymous,
}

/// How the guest's clock takes the pause of an update.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum ClockMode {
    /// kvmclock goes on from where it stopped: the guest does not see the pause (its
    /// CLOCK_REALTIME falls behind by it, as after any paused VM in QEMU). The default: the
    /// pause is a few seconds, the guest's NTP corrects it, and nothing in the guest sees time
    /// jump (timers, watchdogs, timeouts).
    #[default]
    Hide,
    /// kvmclock moves on by the pause (`KVM_CLOCK_REALTIME`): CLOCK_REALTIME stays right and
    /// CLOCK_MONOTONIC jumps by the blackout.
    Advance,
}

/// Faults a test injects, to see the VMM keep the guest through them.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Inject {
    /// The first this many stop-and-save attempts fail (a vCPU's save).
    pub save_failures: u32,
    /// The saved state carries an MSR the new kernel's KVM refuses.
    pub refused_msr: bool,
    /// A vCPU's TSC deadline is saved as 0 with no timer interrupt pending, as when its timer
    /// fires between its stop and its save.
    pub zero_deadline: bool,
    /// The new kernel puts guest memory in on first use only
    /// (`guest_memfd_luo.background_restore=0`): finish waits for the VMM to touch it all.
    pub slow_finish: bool,
    /// Leave out the repair of a TSC deadline lost at save (to see the test fail without it).
    pub no_deadline_fixup: bool,
}

/// How the VMM runs the guest.
#[derive(Clone, Debug)]
pub struct Opts {
    pub kernel: String,
    pub initrd: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub ram: Ram,
    /// The guest's CPUID offers the TSC-deadline timer (as KVM does).
    pub tsc_deadline: bool,
    /// The guest's CPUID offers kvmclock.
    pub kvmclock: bool,
    pub clock: ClockMode,
    /// How long one try to finish the previous kernel's session waits for the handlers before
    /// the VMM says so and tries again (the guest runs meanwhile).
    pub finish_timeout: Duration,
    pub inject: Inject,
    /// Allocate all of the guest's RAM at boot (`fallocate()`): a guest whose RAM is all
    /// allocated can be preserved while it runs, outside the blackout.
    pub prealloc: bool,
    /// The RAM the guest's work fills and checks, in MiB (default: most of it).
    pub work_mib: Option<u64>,
    /// Say where the VMM's share of the blackout went, step by step ([`steps_between`]).
    pub steps: bool,
    /// The size of a new guest's guest_memfds, in MiB: it divides the RAM below the hole
    /// ([`region_fits`]).
    pub region_mib: u64,
}

/// The guest RAM this VMM gives a guest, in MiB.
pub const MEM_MIB: std::ops::RangeInclusive<u64> = 64..=4096;

/// "1 guest_memfd", "N guest_memfds".
pub fn guest_memfds(n: usize) -> String {
    match n {
        1 => "1 guest_memfd".to_string(),
        n => format!("{n} guest_memfds"),
    }
}

/// Whether guest_memfds of `mib` MiB tile the RAM below the hole at 3 GiB, so that none
/// straddles it, and are not so small that a guest needs more than 256.
pub fn region_fits(mib: u64) -> bool {
    mib >= MIN_REGION_MIB && (crate::boot::LOW_RAM_END >> 20).is_multiple_of(mib)
}

impl Opts {
    fn cmdline(&self) -> String {
        // Most of the RAM for the work; the rest for the kernel and the initramfs, and above
        // 2 GiB for what grows with the RAM (its struct pages, the work's page tables).
        let most = self
            .mem_mib
            .saturating_sub(96 + self.mem_mib.saturating_sub(2048) / 16)
            .max(16);
        let work_mib = self.work_mib.map_or(most, |w| w.min(most));
        format!(
            "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 nokaslr tsc=reliable \
             8250.nr_uarts=1 work_mib={work_mib}"
        )
    }
}

/// Stop-and-save attempts still to fail (`Inject::save_failures`).
static SAVE_FAILURES: AtomicU32 = AtomicU32::new(0);

/// Takes one injected save failure, if any is left.
fn injected_save_failure() -> bool {
    SAVE_FAILURES
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

fn os(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

fn ms(ticks: u64, hz: u64) -> f64 {
    ticks as f64 * 1e3 / hz as f64
}

/// Where the VMM's share of a blackout goes (`--steps`): the TSC at which each of its steps
/// ended, with the step's name and the vCPU it was of, if one. Noted only with `--steps`
/// ([`note_steps`]); forgotten once said ([`steps_between`]).
static STEPS: Mutex<Vec<(&str, Option<usize>, u64)>> = Mutex::new(Vec::new());
static NOTE_STEPS: AtomicBool = AtomicBool::new(false);

/// From now on, note the steps of each blackout (`--steps`).
pub fn note_steps() {
    NOTE_STEPS.store(true, Ordering::Relaxed);
}

/// Notes that step `what` (of vCPU `vcpu`, if given) ended at TSC `at`; with `--steps` only.
fn mark_step_at(what: &'static str, vcpu: Option<usize>, at: u64) {
    if NOTE_STEPS.load(Ordering::Relaxed) {
        STEPS.lock().unwrap().push((what, vcpu, at));
    }
}

/// Notes that step `what` of the blackout ended now.
fn mark_step(what: &'static str) {
    mark_step_at(what, None, rdtsc());
}

/// Notes that step `what` of vCPU `vcpu` ended now.
fn mark_vcpu_step(what: &'static str, vcpu: usize) {
    mark_step_at(what, Some(vcpu), rdtsc());
}

/// The steps that ended from TSC `from` to `until`, in the order they ended, each as "name ms"
/// with the time since the one before it ended (the first: since `from`); forgets every step
/// noted so far. Steps of different vCPUs may overlap: each is then the time since whatever
/// ended before it.
fn steps_between(from: u64, until: u64, hz: u64) -> Vec<String> {
    let mut steps = std::mem::take(&mut *STEPS.lock().unwrap());
    steps.retain(|&(_, _, t)| (from..=until).contains(&t));
    steps.sort_by_key(|&(_, _, t)| t);
    let mut last = from;
    steps
        .into_iter()
        .map(|(what, vcpu, t)| {
            let took = ms(t - last, hz);
            last = t;
            match vcpu {
                Some(id) => format!("vCPU {id} {what} {took:.2}"),
                None => format!("{what} {took:.2}"),
            }
        })
        .collect()
}

/// TSC stamps of the update, in the old kernel.
#[derive(Serialize, Deserialize, Default, Clone, Copy)]
struct Stamps {
    hz: u64,
    kick: u64,
    stopped: u64,
    saved: u64,
    preserved: u64,
}
