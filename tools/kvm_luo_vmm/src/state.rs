// SPDX-License-Identifier: GPL-2.0
//! The complete state of a paused VM, as KVM gives it, saved before the host kexecs and put
//! back after: per vCPU and per VM, in an order that KVM accepts. Serialized with serde (the
//! `kvm-bindings` types implement it) into JSON, in a memfd the VMM preserves with the VM.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_config,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::io;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

fn os(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> io::Error {
    move |e| {
        io::Error::new(
            io::Error::from_raw_os_error(e.errno()).kind(),
            format!("{what}: {e}"),
        )
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: CpuId,
    pub tsc_khz: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Msrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// Reads every MSR of `indices` that the vCPU has; an MSR KVM lists but cannot read for this
/// vCPU is left out (KVM_GET_MSRS stops at the first it cannot read).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> io::Result<Msrs> {
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
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| io::Error::other(format!("{e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(os("KVM_GET_MSRS"))?;
        have.extend_from_slice(&msrs.as_slice()[..n]);
        rest = &rest[(n + 1).min(rest.len())..];
    }
    // TSC first, so that the TSC deadline is set against the restored TSC.
    have.sort_by_key(|e| match e.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    Msrs::from_entries(&have).map_err(|e| io::Error::other(format!("{e:?}")))
}

/// Gives the vCPU the TSC frequency it had. KVM takes a frequency within its tolerance of the
/// host's as it is; another one needs TSC scaling, and without it the guest's TSC runs at the
/// host's rate: warn, as QEMU does, rather than lose the guest.
fn set_tsc_khz(vcpu: &VcpuFd, khz: u32) -> io::Result<()> {
    let now = vcpu.get_tsc_khz().map_err(os("KVM_GET_TSC_KHZ"))?;
    if now != khz {
        if let Err(e) = vcpu.set_tsc_khz(khz) {
            println!("vmm: warning: the guest's TSC runs at {now} kHz, not {khz} kHz: {e}");
        }
    }
    Ok(())
}

/// Fails unless `kvm_xsave` holds every state component the VM may enable: with dynamic
/// features (AMX), KVM needs `KVM_GET_XSAVE2`, which this VMM does not use.
pub fn check_xsave_fits(vm: &VmFd) -> io::Result<()> {
    let size = vm.check_extension_int(Cap::Xsave2);
    if size > 0 && size as usize > size_of::<kvm_xsave>() {
        return Err(io::Error::other(format!(
            "the XSAVE area is {size} bytes, more than KVM_GET_XSAVE carries"
        )));
    }
    Ok(())
}

impl VcpuState {
    /// Saves the state of a vCPU that is not running. The MP state first: reading it makes
    /// KVM act on a latched INIT or SIPI, which changes the registers.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> io::Result<Self> {
        let mp_state = vcpu.get_mp_state().map_err(os("KVM_GET_MP_STATE"))?;
        Ok(Self {
            cpuid: vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(os("KVM_GET_CPUID2"))?,
            tsc_khz: vcpu.get_tsc_khz().map_err(os("KVM_GET_TSC_KHZ"))?,
            regs: vcpu.get_regs().map_err(os("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(os("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(os("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(os("KVM_GET_XCRS"))?,
            msrs: read_msrs(vcpu, msr_indices)?,
            lapic: vcpu.get_lapic().map_err(os("KVM_GET_LAPIC"))?,
            mp_state,
            events: vcpu.get_vcpu_events().map_err(os("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu.get_debug_regs().map_err(os("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Puts the state back into a new vCPU of `vm`: CPUID first (it decides what the rest may
    /// hold), the TSC frequency, segment registers (with the APIC base) before the local APIC,
    /// the local APIC before the MSRs (the TSC deadline needs the timer mode), the TSC before
    /// the TSC deadline, events and MP state last.
    pub fn restore(&self, vm: &VmFd, vcpu: &VcpuFd) -> io::Result<()> {
        check_xsave_fits(vm)?;
        vcpu.set_cpuid2(&self.cpuid).map_err(os("KVM_SET_CPUID2"))?;
        set_tsc_khz(vcpu, self.tsc_khz)?;
        vcpu.set_sregs(&self.sregs).map_err(os("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(os("KVM_SET_REGS"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(os("KVM_SET_XCRS"))?;
        // SAFETY: `check_xsave_fits` above: the VM enables no state component beyond what
        // `kvm_xsave` holds, so KVM reads no more than its size.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(os("KVM_SET_XSAVE"))?;
        vcpu.set_lapic(&self.lapic).map_err(os("KVM_SET_LAPIC"))?;
        let n = vcpu.set_msrs(&self.msrs).map_err(os("KVM_SET_MSRS"))?;
        if n != self.msrs.as_slice().len() {
            return Err(io::Error::other(format!(
                "KVM_SET_MSRS: MSR {:#x} refused",
                self.msrs.as_slice()[n].index
            )));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(os("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(os("KVM_SET_MP_STATE"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(os("KVM_SET_DEBUGREGS"))
    }
}

/// What KVM holds for the whole VM: the in-kernel PICs and I/O APIC, the PIT, kvmclock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
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

impl VmState {
    /// Saves the VM's state; its vCPUs must be stopped. The clock first, as close to the stop
    /// as can be.
    pub fn save(vm: &VmFd) -> io::Result<Self> {
        let clock = vm.get_clock().map_err(os("KVM_GET_CLOCK"))?;
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

    /// Puts the clock back to where it stopped, last before the vCPUs run: the guest does not
    /// see the time it was paused.
    pub fn restore_clock(&self, vm: &VmFd) -> io::Result<()> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(os("KVM_SET_CLOCK"))
    }
}

/// The MSRs KVM says it saves and restores.
pub fn msr_indices(kvm: &Kvm) -> io::Result<Vec<u32>> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(os("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}
