// SPDX-License-Identifier: GPL-2.0
//! Booting a Linux bzImage on x86-64: the image and the initramfs are loaded with
//! `linux-loader`, which also writes the boot parameters; this module lays out guest physical
//! memory, the MP table that describes the vCPUs and the interrupt routing (the guest has no
//! ACPI), and the first state of each vCPU (64-bit boot protocol).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use std::fs::File;
use std::io;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the boot structures go (below 1 MiB, as a BIOS would leave them).
const GDT_ADDR: u64 = 0x500;
const BOOT_STACK: u64 = 0x8ff0;
const ZERO_PAGE: u64 = 0x7000;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
const CMDLINE_ADDR: u64 = 0x20000;
const CMDLINE_MAX: usize = 2048;
/// The MP floating pointer and table go to the last KiB of base memory, where Linux looks.
const MPTABLE_ADDR: u64 = 0x9fc00;
const BASE_MEM_END: u64 = 0xa0000;
/// The protected-mode kernel is loaded at 1 MiB; its 64-bit entry point is 0x200 further.
const KERNEL_ADDR: u64 = 0x10_0000;
const ENTRY_64: u64 = 0x200;
/// `xloadflags`: the kernel has that 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Guest RAM below 4 GiB ends here, below the I/O APIC and the local APICs; the rest of it
/// starts at 4 GiB.
pub const LOW_RAM_END: u64 = 3 << 30;
const HIGH_RAM_START: u64 = 4 << 30;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// GDT entries: null, null, 64-bit code (selector 0x10), data (0x18), as the boot protocol
/// wants `__BOOT_CS` and `__BOOT_DS`.
const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Where the byte of guest RAM `offset` bytes from its start (counting RAM alone) is in the
/// guest's physical address space.
pub fn ram_gpa(offset: u64) -> u64 {
    if offset < LOW_RAM_END {
        offset
    } else {
        offset - LOW_RAM_END + HIGH_RAM_START
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Loads the bzImage at `kernel` and the initramfs at `initrd` into `mem`, writes the command
/// line, the boot parameters, the MP table for `vcpus` vCPUs, the GDT and the page tables.
/// Returns the 64-bit entry point.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &str,
    initrd: &str,
    cmdline: &str,
    vcpus: u8,
) -> io::Result<u64> {
    let mut image = File::open(kernel)?;
    let loaded = BzImage::load(mem, Some(GuestAddress(KERNEL_ADDR)), &mut image, None)
        .map_err(|e| err("loading the bzImage", e))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| err("bzImage", "no setup header"))?;
    if hdr.version < 0x20c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(err("bzImage", "no 64-bit entry point (boot protocol 2.12)"));
    }
    if cmdline.len() >= hdr.cmdline_size as usize {
        return Err(err("command line", "longer than the kernel takes"));
    }

    // The initramfs at the top of what the kernel can reach, above where the kernel
    // decompresses itself (`init_size` bytes from its preferred address).
    let initrd_data = std::fs::read(initrd)?;
    let low_end = mem_size.min(LOW_RAM_END);
    let initrd_max = u64::from(hdr.initrd_addr_max).min(low_end - 1);
    let kernel_top = (hdr.pref_address + u64::from(hdr.init_size)).max(loaded.kernel_end);
    let initrd_addr = (initrd_max + 1)
        .checked_sub(initrd_data.len() as u64)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_top)
        .ok_or_else(|| err("initramfs", "does not fit above the kernel"))?;
    mem.write_slice(&initrd_data, GuestAddress(initrd_addr))
        .map_err(|e| err("writing the initramfs", e))?;

    let mut line =
        linux_loader::cmdline::Cmdline::new(CMDLINE_MAX).map_err(|e| err("cmdline", e))?;
    line.insert_str(cmdline).map_err(|e| err("cmdline", e))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &line)
        .map_err(|e| err("writing the command line", e))?;

    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.ramdisk_image = initrd_addr as u32;
    hdr.ramdisk_size = initrd_data.len() as u32;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let ram = |addr: u64, size: u64| boot_e820_entry {
        addr,
        size,
        r#type: 1,
    };
    params.e820_table[0] = ram(0, MPTABLE_ADDR);
    params.e820_table[1] = ram(KERNEL_ADDR, low_end - KERNEL_ADDR);
    params.e820_entries = 2;
    if mem_size > LOW_RAM_END {
        params.e820_table[2] = ram(HIGH_RAM_START, mem_size - LOW_RAM_END);
        params.e820_entries = 3;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| err("writing the boot parameters", e))?;

    write_mptable(mem, vcpus)?;
    write_u64s(mem, GDT_ADDR, &GDT)?;
    // Identity-map the first GiB with 2 MiB pages: enough for the kernel to decompress itself,
    // after which it builds its own page tables.
    write_u64s(mem, PML4_ADDR, &[PDPT_ADDR | 0x3])?;
    write_u64s(mem, PDPT_ADDR, &[PD_ADDR | 0x3])?;
    let pd: Vec<u64> = (0..512u64).map(|i| (i << 21) | 0x83).collect();
    write_u64s(mem, PD_ADDR, &pd)?;
    Ok(loaded.kernel_load.0 + ENTRY_64)
}

fn write_u64s(mem: &GuestMemoryMmap, addr: u64, words: &[u64]) -> io::Result<()> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| err("writing boot structures", e))
}

/// The byte that makes `bytes` sum to zero, for MP table checksums.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// An MP table (Intel MultiProcessor Specification 1.4): one processor entry per vCPU, an ISA
/// bus, the I/O APIC with ISA IRQ n on pin n, and the local interrupts (ExtINT on LINT0, NMI on
/// LINT1).
fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> io::Result<()> {
    const CPU_ENABLED: u8 = 1;
    const CPU_BOOT: u8 = 2;
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 };
        entries.extend_from_slice(&[0, id, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        // I/O interrupt: INT, conforming polarity and trigger, ISA bus.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts to every local APIC (0xff): ExtINT on LINT0, NMI on LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR + 16;
    let mut table: Vec<u8> = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"KLUVMM  ");
    table.extend_from_slice(b"LINUX GUEST ");
    table.extend_from_slice(&[0; 6]); // OEM table pointer and size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp: Vec<u8> = Vec::new();
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    if table_addr + table.len() as u64 > BASE_MEM_END {
        return Err(err("MP table", "too many vCPUs"));
    }
    mem.write_slice(&fp, GuestAddress(MPTABLE_ADDR))
        .and_then(|()| mem.write_slice(&table, GuestAddress(table_addr)))
        .map_err(|e| err("writing the MP table", e))
}

/// What the guest's CPUID offers beyond the basics, for the soak's comparisons.
pub struct CpuFeatures {
    /// The TSC-deadline mode of the local APIC timer (leaf 1 ECX bit 24); without it Linux
    /// runs the timer in one-shot mode.
    pub tsc_deadline: bool,
    /// kvmclock (KVM leaf 0x4000_0001 EAX bits 0 and 3).
    pub kvmclock: bool,
}

/// Shadow stacks: leaf 7 subleaf 0 ECX.
const SHSTK: u32 = 1 << 7;

/// Whether `cpuid` offers the guest shadow stacks. A vCPU's current shadow-stack pointer is
/// not an MSR but a register of its own (`KVM_REG_GUEST_SSP`, `KVM_GET_ONE_REG`), which this
/// VMM does not save: a guest process using a shadow stack would resume with it zeroed and
/// fault at its next return. The VMM hides them from the guests it boots, and refuses to
/// save a vCPU that has them (a guest booted by an older VMM).
pub fn has_shadow_stack(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 7 && e.index == 0 && e.ecx & SHSTK != 0)
}

/// The CPUID of vCPU `id` of `count`: what KVM supports, with its APIC ID and the number of
/// logical processors, and the hypervisor bit so the guest uses kvmclock. Never VMX or SVM:
/// this VMM does not save nested state (`KVM_GET_NESTED_STATE`), so a guest that turned
/// virtualization on (a distribution kernel loads kvm_intel or kvm_amd, which enables it at
/// load) would lose it across an update. Nor shadow stacks ([`has_shadow_stack`]), nor the
/// XSAVE state that only they use (CET's user and supervisor components, leaf 0xd subleaf 1
/// ECX bits 11 and 12: Linux ties both to shadow stacks). IBT stays: its state is the
/// `U_CET` and `S_CET` MSRs, which the VMM saves.
pub fn vcpu_cpuid(supported: &CpuId, id: u8, count: u8, features: &CpuFeatures) -> CpuId {
    const VMX: u32 = 1 << 5; // leaf 1 ECX
    const XSS_CET: u32 = 1 << 11 | 1 << 12; // leaf 0xd subleaf 1 ECX
    const TSC_DEADLINE: u32 = 1 << 24; // leaf 1 ECX
    const HYPERVISOR: u32 = 1 << 31; // leaf 1 ECX
    const SVM: u32 = 1 << 2; // leaf 0x8000_0001 ECX
    const KVMCLOCK: u32 = 1 << 0 | 1 << 3; // leaf 0x4000_0001 EAX
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xffff) | (u32::from(count) << 16) | (u32::from(id) << 24);
                e.ecx = (e.ecx | HYPERVISOR) & !VMX;
                if !features.tsc_deadline {
                    e.ecx &= !TSC_DEADLINE;
                }
            }
            7 if e.index == 0 => e.ecx &= !SHSTK,
            0xd if e.index == 1 => e.ecx &= !XSS_CET,
            0xb | 0x1f => e.edx = u32::from(id),
            0x8000_0001 => e.ecx &= !SVM,
            // SVM's own leaf: with SVM hidden it says nothing.
            0x8000_000a => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            0x4000_0001 if !features.kvmclock => e.eax &= !KVMCLOCK,
            _ => {}
        }
    }
    cpuid
}

/// The state of a vCPU at reset for the 64-bit boot protocol: long mode, flat segments from
/// the GDT, `rsi` pointing at the boot parameters. Only vCPU 0 runs from `entry`; the others
/// wait for the boot CPU's INIT/SIPI like real ones.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> io::Result<()> {
    let os = |e: kvm_ioctls::Error| io::Error::from_raw_os_error(e.errno());
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(os)?;
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    };
    sregs.cs = seg(0x10, 0xb, 1, 0);
    let data = seg(0x18, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 31); // PE, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).map_err(os)?;
    vcpu.set_regs(&kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 2,
        ..Default::default()
    })
    .map_err(os)?;
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })
    .map_err(os)
}

/// Local APIC LINT0 in ExtINT mode and LINT1 in NMI mode, as firmware leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> io::Result<()> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let os = |e: kvm_ioctls::Error| io::Error::from_raw_os_error(e.errno());
    let mut lapic = vcpu.get_lapic().map_err(os)?;
    let mut set = |off: usize, mode: u32| {
        let bytes: Vec<u8> = lapic.regs[off..off + 4].iter().map(|b| *b as u8).collect();
        let v = u32::from_le_bytes(bytes.try_into().unwrap());
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    };
    set(LVT_LINT0, 0x7); // ExtINT
    set(LVT_LINT1, 0x4); // NMI
    vcpu.set_lapic(&lapic).map_err(os)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn the_guest_gets_no_shadow_stack_nor_nested_virtualization() {
        let leaf = |function, index, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            edx,
            ..Default::default()
        };
        let all = u32::MAX;
        let supported = CpuId::from_entries(&[
            leaf(1, 0, all, all),
            leaf(7, 0, all, all),
            leaf(7, 1, all, all),
            leaf(0xd, 1, all, all),
            leaf(0x8000_0001, 0, all, all),
            leaf(0x8000_000a, 0, all, all),
        ])
        .unwrap();
        assert!(has_shadow_stack(&supported));
        let features = CpuFeatures {
            tsc_deadline: true,
            kvmclock: true,
        };
        let cpuid = vcpu_cpuid(&supported, 1, 2, &features);
        let got = |function, index| {
            *cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == function && e.index == index)
                .unwrap()
        };
        // SHSTK (leaf 7 ECX bit 7) hidden; IBT (EDX bit 20) and the rest as KVM offers them.
        assert_eq!(got(7, 0).ecx, all & !(1 << 7));
        assert_eq!(got(7, 0).edx, all);
        // Subleaf 1 of leaf 7 lists other features in ECX.
        assert_eq!(got(7, 1).ecx, all);
        assert!(!has_shadow_stack(&cpuid));
        // A guest booted with them (by an older VMM) is refused before it is stopped.
        assert!(crate::state::unsaveable(1, &cpuid).is_none());
        let why = crate::state::unsaveable(1, &supported).unwrap();
        assert!(
            why.starts_with("vCPU 1: the guest has shadow stacks"),
            "{why}"
        );
        // CET's XSAVE components (0xd subleaf 1 ECX bits 11 and 12) go with the shadow stacks.
        assert_eq!(got(0xd, 1).ecx, all & !(1 << 11 | 1 << 12));
        assert_eq!(got(1, 0).ecx & (1 << 5), 0, "VMX hidden");
        assert_eq!(got(0x8000_0001, 0).ecx & (1 << 2), 0, "SVM hidden");
        assert_eq!(got(0x8000_000a, 0).eax, 0, "SVM's leaf empty");
    }
}
