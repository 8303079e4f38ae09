// SPDX-License-Identifier: GPL-2.0
//! The complete state of a paused VM, as KVM gives it, saved before the host kexecs and put
//! back after: per vCPU and per VM, in an order that KVM accepts. Serialized with serde (the
//! `kvm-bindings` types implement it), in a memfd the VMM preserves with the VM (its format:
//! `linux::machine`'s `STATE_VERSION`).
//!
//! The new kernel's KVM is not the old one: an MSR it does not take is skipped and said, a
//! CPUID feature it does not offer is said, and the XSAVE area is as large as either kernel
//! needs.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_config,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId,
    Msrs, Xsave, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// TSC deadlines the test hook saved as 0, and lost deadlines re-armed, since the start.
pub static DEADLINES_ZEROED: AtomicU32 = AtomicU32::new(0);
pub static DEADLINES_REARMED: AtomicU32 = AtomicU32::new(0);
/// A restore skipped `MSR_NOBODY_KNOWS` (the test hook's) because KVM refused it.
pub static REFUSED_MSR_SKIPPED: AtomicBool = AtomicBool::new(false);

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_IA32_DEBUGCTLMSR: u32 = 0x1d9;
/// An MSR index no KVM knows: the test's stand-in for an MSR the new kernel's KVM no longer
/// takes. In the middle of KVM's own range (0x4b564d00 to 0x4b564dff), which KVM fills from
/// both ends: its public MSRs from the bottom, internal ones from the top (the guest's
/// shadow-stack pointer is 0x4b564dff).
pub const MSR_NOBODY_KNOWS: u32 = 0x4b56_4d80;

const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVTT: usize = 0x320;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_LVT_TIMER_TSCDEADLINE: u32 = 2 << 17;
const APIC_LVT_TIMER_MODE: u32 = 3 << 17;

fn os(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> io::Error {
    move |e| {
        io::Error::new(
            io::Error::from_raw_os_error(e.errno()).kind(),
            format!("{what}: {e}"),
        )
    }
}

fn fam(what: &'static str) -> impl Fn(vmm_sys_util::fam::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e:?}"))
}

/// How the vCPUs save their state.
#[derive(Clone, Debug)]
pub struct SaveOpts {
    /// The MSRs to save: those KVM lists, and the MTRRs ([`msr_indices`]).
    pub msrs: Arc<Vec<u32>>,
    /// `KVM_CAP_XSAVE2`: the size of the XSAVE area in bytes, or 0 without the capability.
    pub xsave_size: usize,
    /// How many vCPUs the VM has.
    pub vcpus: usize,
    /// Test hook: save the TSC deadline of every vCPU whose timer is armed as 0, as if it fired
    /// between the vCPU's stop and its save.
    pub zero_deadline: bool,
    /// Repair a TSC deadline lost that way (always, but in a test that shows why).
    pub deadline_fixup: bool,
    /// Test hook: add an MSR the new kernel's KVM refuses.
    pub refused_msr: bool,
    /// Why the guest cannot be saved, known before it is stopped ([`unsaveable`]): an update
    /// is refused without pausing it.
    pub cannot_save: Option<String>,
}

impl SaveOpts {
    pub fn new(kvm: &Kvm, vm: &VmFd, vcpus: usize) -> io::Result<Self> {
        Ok(Self {
            msrs: Arc::new(msr_indices(kvm)?),
            xsave_size: xsave_size(vm),
            vcpus,
            zero_deadline: false,
            deadline_fixup: true,
            refused_msr: false,
            cannot_save: None,
        })
    }
}

/// `KVM_CAP_XSAVE2` of `vm`: the bytes `KVM_GET_XSAVE2` writes, or 0.
fn xsave_size(vm: &VmFd) -> usize {
    usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0)
}

/// An XSAVE buffer of at least `size` bytes (and never less than `kvm_xsave`), holding
/// `from` if given, zeros after it.
fn xsave_buffer(size: usize, from: Option<&Xsave>) -> io::Result<Xsave> {
    let mut header = kvm_xsave::default();
    if let Some(x) = from {
        header.region = x.as_fam_struct_ref().xsave.region;
    }
    let mut x = Xsave::from_header(kvm_xsave2::from(header)).map_err(fam("XSAVE area"))?;
    let entries = size.saturating_sub(size_of::<kvm_xsave>()).div_ceil(4);
    let saved = from.map_or(&[][..], |x| x.as_slice());
    for i in 0..entries.max(saved.len()) {
        x.push(saved.get(i).copied().unwrap_or(0))
            .map_err(fam("XSAVE area"))?;
    }
    Ok(x)
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: CpuId,
    pub tsc_khz: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The whole XSAVE area, `KVM_GET_XSAVE2`'s size (AMX state included).
    pub xsave: Xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Msrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// Reads every MSR of `indices` that the vCPU has; an MSR KVM lists but cannot read for this
/// vCPU is left out (KVM_GET_MSRS stops at the first it cannot read).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> io::Result<Vec<kvm_bindings::kvm_msr_entry>> {
    let mut have = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<_> = rest
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(fam("MSRs"))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(os("KVM_GET_MSRS"))?;
        have.extend_from_slice(&msrs.as_slice()[..n]);
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(have)
}

/// One 32-bit register of the local APIC's page.
fn apic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[off + i] as u8))
}

/// Whether `vector` is set in the 256-bit APIC register array at `base` (IRR, ISR).
fn apic_bit(lapic: &kvm_lapic_state, base: usize, vector: u32) -> bool {
    apic_reg(lapic, base + 0x10 * (vector as usize / 32)) & (1 << (vector % 32)) != 0
}

/// Whether the local APIC timer is armed in TSC-deadline mode: unmasked, and its interrupt
/// neither requested nor in service (the guest waits for it).
fn deadline_armed(lapic: &kvm_lapic_state) -> bool {
    let lvtt = apic_reg(lapic, APIC_LVTT);
    let vector = lvtt & 0xff;
    lvtt & APIC_LVT_MASKED == 0
        && lvtt & APIC_LVT_TIMER_MODE == APIC_LVT_TIMER_TSCDEADLINE
        && !apic_bit(lapic, APIC_IRR, vector)
        && !apic_bit(lapic, APIC_ISR, vector)
}

/// A TSC-deadline timer that is armed with a deadline of 0 has lost its interrupt: the guest
/// waits for a tick that never comes. KVM zeroes the deadline when it injects the timer
/// interrupt; a save between the two (a posted timer interrupt not yet in the IRR, older
/// kernels) leaves exactly that. Firecracker repairs it the same way: a deadline of the saved
/// TSC, which fires as soon as the vCPU runs; a spurious tick is harmless to the guest.
fn repair_lost_deadline(lapic: &kvm_lapic_state, msrs: &mut [kvm_bindings::kvm_msr_entry]) -> bool {
    if !deadline_armed(lapic) {
        return false;
    }
    let Some(tsc) = msrs
        .iter()
        .find(|e| e.index == MSR_IA32_TSC)
        .map(|e| e.data)
    else {
        return false;
    };
    match msrs.iter_mut().find(|e| e.index == MSR_IA32_TSC_DEADLINE) {
        Some(deadline) if deadline.data == 0 => {
            deadline.data = tsc;
            true
        }
        _ => false,
    }
}

/// What a restore could not put back as it was, to be said.
#[derive(Default)]
pub struct RestoreReport {
    /// MSRs the new kernel's KVM refused, skipped: (index, value).
    pub skipped_msrs: Vec<(u32, u64)>,
    /// The guest's TSC rate could not be set: it runs at the host's.
    pub tsc_khz: Option<String>,
}

/// Sets `msrs` in order; one KVM refuses is skipped and the rest set. Returns the skipped.
fn set_msrs_skipping(
    vcpu: &VcpuFd,
    msrs: &[kvm_bindings::kvm_msr_entry],
) -> io::Result<Vec<(u32, u64)>> {
    let mut skipped = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let batch = Msrs::from_entries(rest).map_err(fam("MSRs"))?;
        let n = vcpu.set_msrs(&batch).map_err(os("KVM_SET_MSRS"))?;
        if n >= rest.len() {
            break;
        }
        skipped.push((rest[n].index, rest[n].data));
        if rest[n].index == MSR_NOBODY_KNOWS {
            REFUSED_MSR_SKIPPED.store(true, Ordering::Relaxed);
        }
        rest = &rest[n + 1..];
    }
    Ok(skipped)
}

/// Why vCPU `id`, of CPUID `cpuid`, cannot be saved, if it cannot: shadow stacks.
pub fn unsaveable(id: usize, cpuid: &CpuId) -> Option<String> {
    crate::boot::has_shadow_stack(cpuid).then(|| {
        format!(
            "vCPU {id}: the guest has shadow stacks, whose current pointer \
             (KVM_REG_GUEST_SSP) this VMM does not save: boot it again with this VMM, which \
             does not offer them"
        )
    })
}

impl VcpuState {
    /// Saves the state of vCPU `id`, which is not running; refuses a vCPU with shadow stacks
    /// ([`crate::boot::has_shadow_stack`]). The MP state first of what it saves: reading it
    /// makes KVM act on a latched INIT or SIPI, which changes the registers.
    pub fn save(vcpu: &VcpuFd, id: usize, opts: &SaveOpts) -> io::Result<Self> {
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(os("KVM_GET_CPUID2"))?;
        if let Some(why) = unsaveable(id, &cpuid) {
            return Err(io::Error::other(why));
        }
        let mp_state = vcpu.get_mp_state().map_err(os("KVM_GET_MP_STATE"))?;
        let xsave = if opts.xsave_size > 0 {
            let mut x = xsave_buffer(opts.xsave_size, None)?;
            // SAFETY: `x` holds `KVM_CAP_XSAVE2` bytes, the size of this VM's XSAVE area; the
            // VMM never asks for more XSTATE features (arch_prctl), so it cannot grow.
            unsafe { vcpu.get_xsave2(&mut x) }.map_err(os("KVM_GET_XSAVE2"))?;
            x
        } else {
            let x = vcpu.get_xsave().map_err(os("KVM_GET_XSAVE"))?;
            Xsave::from_header(kvm_xsave2::from(x)).map_err(fam("XSAVE area"))?
        };
        let lapic = vcpu.get_lapic().map_err(os("KVM_GET_LAPIC"))?;
        let mut msrs = read_msrs(vcpu, &opts.msrs)?;
        let last = id + 1 == opts.vcpus;
        if opts.zero_deadline && deadline_armed(&lapic) {
            for e in msrs.iter_mut().filter(|e| e.index == MSR_IA32_TSC_DEADLINE) {
                e.data = 0;
                DEADLINES_ZEROED.fetch_add(1, Ordering::Relaxed);
                crate::say(format!(
                    "vCPU {id}: its TSC deadline saved as 0 (injected by the test)"
                ));
            }
        }
        if opts.deadline_fixup && repair_lost_deadline(&lapic, &mut msrs) {
            DEADLINES_REARMED.fetch_add(1, Ordering::Relaxed);
            crate::say(format!(
                "vCPU {id}: its TSC-deadline timer had lost its interrupt; re-armed"
            ));
        }
        if opts.refused_msr && last {
            msrs.push(kvm_bindings::kvm_msr_entry {
                index: MSR_NOBODY_KNOWS,
                data: 0x5a5a,
                ..Default::default()
            });
        }
        // TSC first, so that the TSC deadline is set against the restored TSC.
        msrs.sort_by_key(|e| match e.index {
            MSR_IA32_TSC => 0,
            MSR_IA32_TSC_DEADLINE => 2,
            _ => 1,
        });
        Ok(Self {
            cpuid,
            tsc_khz: vcpu.get_tsc_khz().map_err(os("KVM_GET_TSC_KHZ"))?,
            regs: vcpu.get_regs().map_err(os("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(os("KVM_GET_SREGS"))?,
            xsave,
            xcrs: vcpu.get_xcrs().map_err(os("KVM_GET_XCRS"))?,
            msrs: Msrs::from_entries(&msrs).map_err(fam("MSRs"))?,
            lapic,
            mp_state,
            events: vcpu.get_vcpu_events().map_err(os("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu.get_debug_regs().map_err(os("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Puts the state back into a new vCPU of `vm`: CPUID first (it decides what the rest may
    /// hold), the TSC frequency, segment registers (with the APIC base) before the local APIC,
    /// the local APIC before the MSRs (the TSC deadline needs the timer mode), the TSC before
    /// the TSC deadline, events and MP state last. An MSR KVM refuses is skipped (KVM's
    /// parameters and defaults change between kernels, e.g. `enable_pmu`), and a TSC rate it
    /// cannot set leaves the guest's TSC at the host's rate, as QEMU and Cloud Hypervisor do:
    /// both said in `report` rather than losing the guest (also when a later step fails).
    pub fn restore(&self, vm: &VmFd, vcpu: &VcpuFd, report: &mut RestoreReport) -> io::Result<()> {
        vcpu.set_cpuid2(&self.cpuid).map_err(os("KVM_SET_CPUID2"))?;
        let now = vcpu.get_tsc_khz().map_err(os("KVM_GET_TSC_KHZ"))?;
        if now != self.tsc_khz {
            // Only a KVM that can scale the TSC takes another rate. Without scaling,
            // KVM_SET_TSC_KHZ fails, but only after it took the rate as the vCPU's virtual
            // one, which then no longer matches the rate the TSC runs at nor the other vCPUs'
            // at their creation: their TSCs fall into different generations, KVM stops using
            // its master clock, and the guest's kvmclock was seen to jump by seconds on resume.
            if vm.check_extension(Cap::TscControl) {
                if let Err(e) = vcpu.set_tsc_khz(self.tsc_khz) {
                    report.tsc_khz = Some(format!(
                        "the guest's TSC runs at {now} kHz, not {} kHz: {e}",
                        self.tsc_khz
                    ));
                }
            } else {
                report.tsc_khz = Some(format!(
                    "the guest's TSC runs at {now} kHz, not {} kHz: this KVM cannot scale it",
                    self.tsc_khz
                ));
            }
        }
        vcpu.set_sregs(&self.sregs).map_err(os("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(os("KVM_SET_REGS"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(os("KVM_SET_XCRS"))?;
        let xsave = xsave_buffer(xsave_size(vm), Some(&self.xsave))?;
        // SAFETY: `xsave` is at least `KVM_CAP_XSAVE2` bytes of this kernel (and at least
        // `kvm_xsave`), all KVM reads.
        unsafe { vcpu.set_xsave2(&xsave) }.map_err(os("KVM_SET_XSAVE"))?;
        vcpu.set_lapic(&self.lapic).map_err(os("KVM_SET_LAPIC"))?;
        report.skipped_msrs = set_msrs_skipping(vcpu, &self.msrs_to_set(vcpu))?;
        // KVM_GET_VCPU_EVENTS fills the SIPI vector without flagging it; KVM_SET_VCPU_EVENTS
        // takes it only when flagged (QEMU sets the flag too).
        let mut events = self.events;
        events.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        vcpu.set_vcpu_events(&events)
            .map_err(os("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(os("KVM_SET_MP_STATE"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(os("KVM_SET_DEBUGREGS"))
    }

    /// The saved MSRs to set, in order: all but those of [`QUIET_IF_HELD`] that the vCPU
    /// already holds at their saved values. Without reading them (an error), all.
    fn msrs_to_set(&self, vcpu: &VcpuFd) -> Vec<kvm_bindings::kvm_msr_entry> {
        let held = read_msrs(vcpu, QUIET_IF_HELD).unwrap_or_default();
        without_held(self.msrs.as_slice(), &held)
    }
}

/// MSRs that are not written when the vCPU holds them at their saved values already, since KVM
/// logs a write there as unhandled even when it changes nothing: `DEBUGCTL` on AMD without LBR
/// virtualization (which reads as 0), "Unhandled WRMSR(0x1d9) = 0x0", a console line per vCPU
/// that took 8-15 ms of blackout on a serial console (measured 2026-12-06, `make bench`, TCG).
/// Only these: that a write of the value an MSR holds changes nothing is not something KVM
/// promises for every MSR, and the next kernel's KVM is not this one.
const QUIET_IF_HELD: &[u32] = &[MSR_IA32_DEBUGCTLMSR];

/// `saved`, in order, but for the MSRs of [`QUIET_IF_HELD`] that `held` (as read from the
/// vCPU) has at the saved value.
fn without_held(
    saved: &[kvm_bindings::kvm_msr_entry],
    held: &[kvm_bindings::kvm_msr_entry],
) -> Vec<kvm_bindings::kvm_msr_entry> {
    saved
        .iter()
        .filter(|e| {
            !QUIET_IF_HELD.contains(&e.index)
                || !held.iter().any(|h| h.index == e.index && h.data == e.data)
        })
        .copied()
        .collect()
}

/// The CPUID registers that list features, as (leaf, subleaf, register name, which register).
type Reg = fn(&kvm_bindings::kvm_cpuid_entry2) -> u32;
const FEATURE_REGS: &[(u32, u32, &str, Reg)] = &[
    (0x1, 0, "ECX", |e| e.ecx),
    (0x1, 0, "EDX", |e| e.edx),
    (0x6, 0, "EAX", |e| e.eax),
    (0x7, 0, "EBX", |e| e.ebx),
    (0x7, 0, "ECX", |e| e.ecx),
    (0x7, 0, "EDX", |e| e.edx),
    (0x7, 1, "EAX", |e| e.eax),
    (0x7, 1, "EBX", |e| e.ebx),
    (0x7, 1, "ECX", |e| e.ecx),
    (0x7, 1, "EDX", |e| e.edx),
    (0x7, 2, "EDX", |e| e.edx),
    (0xd, 0, "EAX", |e| e.eax),
    (0xd, 0, "EDX", |e| e.edx),
    (0xd, 1, "EAX", |e| e.eax),
    (0x14, 0, "EBX", |e| e.ebx),
    (0x19, 0, "EBX", |e| e.ebx),
    (0x8000_0001, 0, "ECX", |e| e.ecx),
    (0x8000_0001, 0, "EDX", |e| e.edx),
    (0x8000_0007, 0, "EDX", |e| e.edx),
    (0x8000_0008, 0, "EBX", |e| e.ebx),
    (0x8000_0021, 0, "EAX", |e| e.eax),
    (0x4000_0001, 0, "EAX", |e| e.eax),
];

/// Bits KVM sets in a vCPU's CPUID from the guest's own state (OSXSAVE from CR4.OSXSAVE,
/// OSPKE from CR4.PKE), which `KVM_GET_SUPPORTED_CPUID` never lists.
fn runtime_bits(leaf: u32, sub: u32, name: &str) -> u32 {
    match (leaf, sub, name) {
        (0x1, 0, "ECX") => 1 << 27,
        (0x7, 0, "ECX") => 1 << 4,
        _ => 0,
    }
}

/// The features the guest's CPUID `saved` has that `supported` (this kernel's
/// `KVM_GET_SUPPORTED_CPUID`) does not offer, one line per register. The guest keeps the
/// CPUID it booted with (it read it then); a feature the new KVM withdrew may fault in it.
pub fn cpuid_differences(saved: &CpuId, supported: &CpuId) -> Vec<String> {
    let find = |c: &CpuId, leaf: u32, sub: u32| {
        c.as_slice()
            .iter()
            .find(|e| e.function == leaf && e.index == sub)
            .copied()
    };
    let mut out = Vec::new();
    for &(leaf, sub, name, reg) in FEATURE_REGS {
        let Some(s) = find(saved, leaf, sub) else {
            continue;
        };
        let have = find(supported, leaf, sub).map_or(0, |e| reg(&e));
        let extra = reg(&s) & !have & !runtime_bits(leaf, sub, name);
        if extra != 0 {
            out.push(format!(
                "CPUID {leaf:#x}.{sub} {name}: {extra:#010x} not offered by this kernel's KVM"
            ));
        }
    }
    out
}

/// What KVM holds for the whole VM: the in-kernel PICs and I/O APIC, the PIT, kvmclock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// The host's CLOCK_REALTIME when the clock was read, in ns, for a clock that moves on by
    /// the pause where KVM cannot do it (`KVM_CLOCK_REALTIME` not in the saved flags).
    pub realtime_ns: u64,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Creates the in-kernel interrupt controllers and the PIT of a new VM.
pub fn create_irqchip_and_pit(vm: &VmFd) -> io::Result<()> {
    vm.create_irq_chip().map_err(os("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(os("KVM_CREATE_PIT2"))
}

fn realtime_ns() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl VmState {
    /// Saves the VM's state; its vCPUs must be stopped. The clock first, as close to the stop
    /// as can be.
    pub fn save(vm: &VmFd) -> io::Result<Self> {
        let clock = vm.get_clock().map_err(os("KVM_GET_CLOCK"))?;
        let realtime_ns = realtime_ns();
        let mut irqchips = Vec::new();
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map_err(os("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(Self {
            irqchips,
            pit: vm.get_pit2().map_err(os("KVM_GET_PIT2"))?,
            clock,
            realtime_ns,
        })
    }

    /// Puts the interrupt controllers and the PIT back into a VM that has them, once its vCPUs
    /// exist (interrupts they replay need somewhere to go).
    pub fn restore_devices(&self, vm: &VmFd) -> io::Result<()> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(os("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(os("KVM_SET_PIT2"))
    }

    /// Puts the clock back, last before the vCPUs run: where it stopped (`advance` false: the
    /// guest does not see the pause), or moved on by the time the host's CLOCK_REALTIME moved
    /// since (KVM does it with `KVM_CLOCK_REALTIME` when the saved clock has it, at the same
    /// instant as it sets the clock; the VMM otherwise).
    pub fn restore_clock(&self, vm: &VmFd, advance: bool) -> io::Result<()> {
        let mut clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        if advance {
            if self.clock.flags & KVM_CLOCK_REALTIME != 0 {
                clock.flags = KVM_CLOCK_REALTIME;
                clock.realtime = self.clock.realtime;
            } else {
                clock.clock += realtime_ns().saturating_sub(self.realtime_ns);
            }
        }
        vm.set_clock(&clock).map_err(os("KVM_SET_CLOCK"))
    }
}

/// The MSRs to save: those KVM says it saves and restores, and the MTRRs ([`with_mtrrs`]).
pub fn msr_indices(kvm: &Kvm) -> io::Result<Vec<u32>> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(os("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(with_mtrrs(listed.as_slice()))
}

/// `listed` and, after it, the MTRRs it leaves out. KVM keeps the guest's MTRRs as MSRs but
/// does not list them (QEMU saves them explicitly): the default type, the variable ranges
/// (KVM has 8 pairs; a save leaves out those it cannot read) and the fixed ones. Not
/// `MTRRcap`, which KVM does not take back.
fn with_mtrrs(listed: &[u32]) -> Vec<u32> {
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    let variable = 0x200..0x210;
    let fixed = [0x250, 0x258, 0x259].into_iter().chain(0x268..0x270);
    let mut all = listed.to_vec();
    for index in std::iter::once(MTRR_DEF_TYPE).chain(variable).chain(fixed) {
        if !all.contains(&index) {
            all.push(index);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn msr(index: u32, data: u64) -> kvm_bindings::kvm_msr_entry {
        kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn the_mtrrs_are_saved_once_each_after_what_kvm_lists() {
        let listed = [0x10, 0x2ff, 0x1d9];
        // What KVM listed, then (the default type being listed already) the 16 MSRs of the
        // eight variable ranges and the 11 fixed-range ones; not MTRRcap (0xfe).
        let mut expected = listed.to_vec();
        expected.extend(0x200..0x210);
        expected.extend([0x250, 0x258, 0x259]);
        expected.extend(0x268..0x270);
        assert_eq!(with_mtrrs(&listed), expected);
    }

    #[test]
    fn only_a_quiet_msr_held_at_its_saved_value_is_left_alone() {
        let saved = [
            msr(MSR_IA32_TSC, 5),
            msr(MSR_IA32_DEBUGCTLMSR, 0),
            msr(0xc000_0080, 0xd01),
            msr(MSR_IA32_TSC_DEADLINE, 0),
        ];
        // Each entry as it is, data included.
        let entries = |v: &[kvm_bindings::kvm_msr_entry]| -> Vec<(u32, u64)> {
            v.iter().map(|e| (e.index, e.data)).collect()
        };
        // Held at its saved value: not written; every other, in order, even when held too.
        let held = [
            msr(MSR_IA32_DEBUGCTLMSR, 0),
            msr(0xc000_0080, 0xd01),
            msr(MSR_IA32_TSC, 5),
        ];
        assert_eq!(
            entries(&without_held(&saved, &held)),
            [
                (MSR_IA32_TSC, 5),
                (0xc000_0080, 0xd01),
                (MSR_IA32_TSC_DEADLINE, 0)
            ]
        );
        // Another MSR held at the saved value of this one does not count; held at another
        // value, or not read: written.
        for held in [
            &[msr(MSR_IA32_TSC, 0)][..],
            &[msr(MSR_IA32_DEBUGCTLMSR, 1)],
            &[],
        ] {
            assert_eq!(entries(&without_held(&saved, held)), entries(&saved));
        }
    }

    fn cpuid(entries: &[(u32, u32, u32, u32)]) -> CpuId {
        let e: Vec<_> = entries
            .iter()
            .map(|&(function, index, ebx, ecx)| kvm_cpuid_entry2 {
                function,
                index,
                ebx,
                ecx,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&e).unwrap()
    }

    #[test]
    fn cpuid_differences_name_what_is_withdrawn() {
        let saved = cpuid(&[
            (0x7, 0, 0b1011, 0),
            (0x1, 0, 0xffff_ffff, 1 << 5 | 1 << 27),
            (0x2, 0, 7, 7),
        ]);
        let supported = cpuid(&[(0x7, 0, 0b0011, 0), (0x1, 0, 0, 1 << 5)]);
        // Leaf 1 EBX holds APIC IDs, not features, OSXSAVE is the guest's own; leaf 2 is no
        // feature leaf.
        assert_eq!(
            cpuid_differences(&saved, &supported),
            ["CPUID 0x7.0 EBX: 0x00000008 not offered by this kernel's KVM"]
        );
        assert!(cpuid_differences(&saved, &saved).is_empty());
    }

    fn lapic(lvtt: u32, irr_vector: Option<u32>) -> kvm_lapic_state {
        let mut l = kvm_lapic_state::default();
        let mut set = |off: usize, v: u32| {
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                l.regs[off + i] = *b as _;
            }
        };
        set(APIC_LVTT, lvtt);
        if let Some(v) = irr_vector {
            set(APIC_IRR + 0x10 * (v as usize / 32), 1 << (v % 32));
        }
        l
    }

    fn msrs(deadline: u64) -> Vec<kvm_bindings::kvm_msr_entry> {
        [(MSR_IA32_TSC, 1000), (MSR_IA32_TSC_DEADLINE, deadline)]
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_lost_deadline_is_rearmed_and_nothing_else() {
        let armed = APIC_LVT_TIMER_TSCDEADLINE | 0xec;
        let mut m = msrs(0);
        assert!(repair_lost_deadline(&lapic(armed, None), &mut m));
        assert_eq!(m[1].data, 1000);
        // Its interrupt requested: not lost.
        let mut m = msrs(0);
        assert!(!repair_lost_deadline(&lapic(armed, Some(0xec)), &mut m));
        // Masked (the guest stopped its timer), one-shot mode, or a deadline set: left alone.
        for (lvtt, deadline) in [(armed | APIC_LVT_MASKED, 0), (0xec, 0), (armed, 5000)] {
            let mut m = msrs(deadline);
            assert!(!repair_lost_deadline(&lapic(lvtt, None), &mut m));
            assert_eq!(m[1].data, deadline);
        }
    }

    #[test]
    fn xsave_buffers_grow_to_what_the_kernel_reads() {
        let small = xsave_buffer(0, None).unwrap();
        assert_eq!(small.as_slice().len(), 0);
        let mut big = xsave_buffer(4096 + 8192, None).unwrap();
        assert_eq!(big.as_slice().len(), 2048);
        big.as_mut_slice()[7] = 42;
        // Restoring into a kernel with a smaller area keeps everything saved.
        let copy = xsave_buffer(4096, Some(&big)).unwrap();
        assert_eq!(copy.as_slice().len(), 2048);
        assert_eq!(copy.as_slice()[7], 42);
    }
}
