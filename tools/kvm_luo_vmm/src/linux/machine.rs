// SPDX-License-Identifier: GPL-2.0
//! The VM: its RAM (guest_memfds, or anonymous memory for comparison), its devices, its vCPUs;
//! and what happens to it: boot, stop and save, preserve, go on (the update was off), restore
//! (in the new kernel).

use super::checks::{self, Progress};
use super::vcpu::Running;
use super::{os, Opts, Ram, Stamps, MAGIC, TOKEN_RAM, TOKEN_STATE, TOKEN_VM};
use crate::boot::{self, CpuFeatures};
use crate::devices::{Console, ConsoleOut, IrqTrigger, PortIo, UartState, COM1_IRQ};
use crate::state::{self, SaveOpts, VcpuState, VmState};
use crate::{rdtsc, say};
use base64::prelude::{Engine, BASE64_STANDARD};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region2, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use liveupdate::Session;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// The version of the format of [`Snapshot`] this VMM writes, and the latest it reads: the new
/// kernel's VMM may be an older build than the one that saved the state, or a newer one.
///
/// - 1: the [`Snapshot`] in JSON.
/// - 2: JSON of `magic`, `version` and `state`, the [`Snapshot`] in postcard, in base64. The
///   `kvm-bindings` types serialize as bytes, which JSON writes as arrays of numbers: 40 KiB for
///   two vCPUs, which took 7 ms to write and 18 ms to read under TCG, all in the blackout
///   (measured 2026-12-06, `make bench`'s 256 MiB guest). A VMM that reads format 1 only still
///   finds `magic` and `version`, and refuses format 2 as later than it reads (so a rollback to
///   such a VMM holds the guest, or gives its session back under the agent).
///
/// - 3: format 2, and the sizes of the guest_memfds in the JSON (`guest_memfds`). Formats 1 and
///   2 had one per 128 MiB of RAM, the last one what was left, which a VMM that reads them
///   assumes: a guest laid out otherwise must not reach it (with smaller guest_memfds, it would
///   map them where they are not and leave some unretrieved, to be freed at finish).
///
/// Postcard is positional: any change to what [`Snapshot`] holds, down to the `kvm-bindings`
/// types in it, raises the version, or the older VMM would misread the state without noticing.
/// So does any change to what the state means to the VMM that reads it, as format 3's did.
/// A later format keeps `magic` and `version` in a JSON object, so that the older VMM refuses
/// it as later before reading anything else.
const STATE_VERSION: u32 = 3;

/// The guest_memfds of the guests that formats 1 and 2 saved: one per 128 MiB.
const EARLIER_REGION: u64 = 128 << 20;

fn first_version() -> u32 {
    1
}

/// What stage 1 hands to stage 2, in a preserved memfd.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    magic: String,
    /// [`STATE_VERSION`] (absent from the first format's).
    #[serde(default = "first_version")]
    version: u32,
    pub mem_mib: u64,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    uart: UartState,
    /// What the guest had written of its current console line.
    console_line: Vec<u8>,
    pub progress: Progress,
    pub stamps: Stamps,
    /// The sizes of the guest_memfds, in the order of their tokens: in format 3's JSON, not in
    /// postcard.
    #[serde(skip)]
    pub guest_memfds: Vec<u64>,
}

/// A VM with its RAM, its console and its port I/O.
pub struct Machine {
    pub vm: VmFd,
    /// The guest_memfds that hold the RAM (none for anonymous RAM).
    pub ram: Vec<File>,
    /// Their sizes.
    ram_sizes: Vec<u64>,
    pub mem: GuestMemoryMmap,
    pub io: Arc<PortIo>,
    pub console: Arc<Console>,
    /// The UART's interrupt, as registered with KVM.
    irq: EventFd,
}

impl Machine {
    /// Maps the guest_memfds `ram`, of `sizes`, as guest RAM from address 0, one memslot each,
    /// one after the other ([`ram_layout`]).
    fn map_ram(vm: &VmFd, ram: &[File], sizes: &[u64]) -> io::Result<GuestMemoryMmap> {
        let layout = ram_layout(sizes)?;
        let mut ranges = Vec::new();
        for (f, &(gpa, size)) in ram.iter().zip(&layout) {
            ranges.push((
                GuestAddress(gpa),
                size as usize,
                Some(FileOffset::new(f.try_clone()?, 0)),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(&ranges)
            .map_err(|e| io::Error::other(format!("mapping guest RAM: {e}")))?;
        super::mark_step("mmap");
        for (i, (f, &(gpa, size))) in ram.iter().zip(&layout).enumerate() {
            let host = mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|e| io::Error::other(format!("guest RAM: {e}")))?;
            let region = kvm_userspace_memory_region2 {
                slot: i as u32,
                flags: KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host as u64,
                guest_memfd_offset: 0,
                guest_memfd: f.as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: The region is a mapping `mem` owns; the VMM runs vCPUs only while `mem`
            // exists.
            unsafe { vm.set_user_memory_region2(region) }.map_err(os("memslot"))?;
        }
        Ok(mem)
    }

    /// Anonymous memory as guest RAM from address 0, in memslots of `region` bytes as with
    /// guest_memfds.
    fn map_anonymous(vm: &VmFd, size: u64, region: u64) -> io::Result<GuestMemoryMmap> {
        let layout = ram_layout(&region_sizes(size, region))?;
        let ranges: Vec<_> = layout
            .iter()
            .map(|&(gpa, len)| (GuestAddress(gpa), len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| io::Error::other(format!("mapping guest RAM: {e}")))?;
        for (i, &(gpa, len)) in ranges.iter().enumerate() {
            let host = mem
                .get_host_address(gpa)
                .map_err(|e| io::Error::other(format!("guest RAM: {e}")))?;
            let region = kvm_userspace_memory_region2 {
                slot: i as u32,
                guest_phys_addr: gpa.0,
                memory_size: len as u64,
                userspace_addr: host as u64,
                ..Default::default()
            };
            // SAFETY: As in `map_ram`.
            unsafe { vm.set_user_memory_region2(region) }.map_err(os("memslot"))?;
        }
        Ok(mem)
    }

    /// The console and the UART, from `uart` if given (a restored VM) or new.
    fn devices(
        vm: &VmFd,
        uart: Option<&UartState>,
        partial: Vec<u8>,
    ) -> io::Result<(Arc<PortIo>, Arc<Console>, EventFd)> {
        let console = Arc::new(Console::continuing(partial));
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&evt, COM1_IRQ).map_err(os("KVM_IRQFD"))?;
        super::mark_step("irqfd");
        let irq = evt.try_clone()?;
        let trigger = IrqTrigger(evt);
        let out = ConsoleOut(console.clone());
        let uart = match uart {
            Some(state) => state.restore(trigger, out)?,
            None => vm_superio::Serial::new(trigger, out),
        };
        Ok((
            Arc::new(PortIo {
                uart: Mutex::new(uart),
            }),
            console,
            irq,
        ))
    }

    /// Puts in every page of guest RAM that is not in yet, by reading a byte of each through
    /// the VMM's mapping.
    pub fn touch_all(&self) {
        use vm_memory::GuestMemoryRegion;
        for region in self.mem.iter() {
            let mut off = 0;
            while off < region.len() {
                let _ = self
                    .mem
                    .read_obj::<u8>(GuestAddress(region.start_addr().0 + off));
                off += 4096;
            }
        }
    }
}

/// A guest whose vCPUs run.
pub struct Guest {
    pub m: Machine,
    pub running: Running,
    save: SaveOpts,
    mem_mib: u64,
    /// Its last `ping`.
    pub pings: u32,
}

/// A guest whose vCPUs are stopped and whose state is saved.
pub struct Stopped {
    pub m: Machine,
    vcpus: Vec<VcpuFd>,
    save: SaveOpts,
    pub snapshot: Snapshot,
    pings: u32,
}

/// The sizes of the guest_memfds of a new guest of `mem_size` bytes: `region` bytes each, the
/// last one what is left.
fn region_sizes(mem_size: u64, region: u64) -> Vec<u64> {
    (0..mem_size.div_ceil(region))
        .map(|i| region.min(mem_size - i * region))
        .collect()
}

/// Where guest_memfds of `sizes` go in guest memory, one after the other from address 0 (RAM
/// past 3 GiB goes on at 4 GiB: [`boot::ram_gpa`]): the guest address and size of each.
fn ram_layout(sizes: &[u64]) -> io::Result<Vec<(u64, u64)>> {
    let mut offset = 0;
    let mut layout = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        let gpa;
        (gpa, offset) = place_region(i, offset, size)?;
        layout.push((gpa, size));
    }
    Ok(layout)
}

/// Places guest_memfd `i`, of `size` bytes, at RAM offset `offset`: its guest address and the
/// RAM offset after it. It must be whole pages, and must not straddle the hole below 4 GiB.
fn place_region(i: usize, offset: u64, size: u64) -> io::Result<(u64, u64)> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(io::Error::other(format!(
            "guest_memfd {i} holds {size} bytes, not whole pages"
        )));
    }
    match offset.checked_add(size) {
        None => Err(io::Error::other(format!(
            "guest_memfd {i} ({size} bytes at RAM offset {offset:#x}) ends past any address"
        ))),
        Some(end) if offset < boot::LOW_RAM_END && end > boot::LOW_RAM_END => {
            Err(io::Error::other(format!(
                "guest_memfd {i} ({size} bytes at RAM offset {offset:#x}) straddles the hole \
                 below 4 GiB"
            )))
        }
        Some(end) => Ok((boot::ram_gpa(offset), end)),
    }
}

fn check<T>(what: &str, r: io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Boots the guest and waits until it works on every vCPU, takes timer interrupts everywhere,
/// and answers on its console.
pub fn boot(opts: &Opts, label: &str) -> Result<Guest, String> {
    let kvm = check("open /dev/kvm", Kvm::new().map_err(os("open /dev/kvm")))?;
    let vm = check(
        "KVM_CREATE_VM",
        kvm.create_vm().map_err(os("KVM_CREATE_VM")),
    )?;
    let mem_size = opts.mem_mib << 20;
    let mut ram = Vec::new();
    let mut ram_sizes = Vec::new();
    let mem = match opts.ram {
        Ram::GuestMemfd => {
            ram_sizes = region_sizes(mem_size, opts.region_mib << 20);
            for &size in &ram_sizes {
                let fd = check(
                    "KVM_CREATE_GUEST_MEMFD",
                    vm.create_guest_memfd(kvm_create_guest_memfd {
                        size,
                        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                        ..Default::default()
                    })
                    .map_err(os("KVM_CREATE_GUEST_MEMFD")),
                )?;
                // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new fd that we now own.
                let f = unsafe { File::from_raw_fd(fd) };
                if opts.prealloc {
                    check(
                        "allocating guest RAM",
                        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::KEEP_SIZE, 0, size)
                            .map_err(io::Error::from),
                    )?;
                }
                ram.push(f);
            }
            check("guest RAM", Machine::map_ram(&vm, &ram, &ram_sizes))?
        }
        Ram::Anonymous => check(
            "guest RAM",
            Machine::map_anonymous(&vm, mem_size, opts.region_mib << 20),
        )?,
    };
    check("irqchip and PIT", state::create_irqchip_and_pit(&vm))?;
    let (io, console, irq) = check("devices", Machine::devices(&vm, None, Vec::new()))?;
    let entry = check(
        "loading Linux",
        boot::load_linux(
            &mem,
            mem_size,
            &opts.kernel,
            &opts.initrd,
            &opts.cmdline(),
            opts.vcpus,
        ),
    )?;
    let supported = check(
        "KVM_GET_SUPPORTED_CPUID",
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(os("KVM_GET_SUPPORTED_CPUID")),
    )?;
    let features = CpuFeatures {
        tsc_deadline: opts.tsc_deadline,
        kvmclock: opts.kvmclock,
    };
    let mut vcpus = Vec::new();
    for id in 0..opts.vcpus {
        let vcpu = check(
            "KVM_CREATE_VCPU",
            vm.create_vcpu(u64::from(id)).map_err(os("KVM_CREATE_VCPU")),
        )?;
        check(
            "KVM_SET_CPUID2",
            vcpu.set_cpuid2(&boot::vcpu_cpuid(&supported, id, opts.vcpus, &features))
                .map_err(os("KVM_SET_CPUID2")),
        )?;
        check("LAPIC LINT", boot::setup_lint(&vcpu))?;
        if id == 0 {
            check("boot vCPU", boot::setup_boot_vcpu(&vcpu, entry))?;
        }
        vcpus.push(vcpu);
    }
    let mut save = check(
        "MSR list",
        SaveOpts::new(&kvm, &vm, usize::from(opts.vcpus)),
    )?;
    save.zero_deadline = opts.inject.zero_deadline;
    save.deadline_fixup = !opts.inject.no_deadline_fixup;
    save.refused_msr = opts.inject.refused_msr;
    let m = Machine {
        vm,
        ram,
        ram_sizes,
        mem,
        io,
        console,
        irq,
    };
    say(format!(
        "{label}booting Linux: {} MiB of RAM in {}, {} vCPUs, {} MSRs saved per vCPU, \
         XSAVE area {} bytes{}{}",
        opts.mem_mib,
        match opts.ram {
            Ram::GuestMemfd => super::guest_memfds(m.ram.len()),
            Ram::Anonymous => "anonymous memory".to_string(),
        },
        opts.vcpus,
        save.msrs.len(),
        save.xsave_size.max(4096),
        if opts.tsc_deadline {
            ""
        } else {
            ", no TSC-deadline timer"
        },
        if opts.kvmclock { "" } else { ", no kvmclock" },
    ));
    let t0 = std::time::Instant::now();
    let running = check("vCPU threads", Running::start(vcpus, &m.io, &save))?;
    checks::booted(&m.console, &running)?;
    say(format!(
        "{label}the guest booted, its work verified a generation on every vCPU, and every \
         vCPU takes timer interrupts ({:.1} s)",
        t0.elapsed().as_secs_f64()
    ));
    let mut g = Guest {
        m,
        running,
        save,
        mem_mib: opts.mem_mib,
        pings: 0,
    };
    g.ping()?;
    say(format!("{label}the guest's console answers"));
    Ok(g)
}

impl Guest {
    /// Stops the vCPUs and saves the whole VM state. If that cannot be done, the guest runs
    /// again and comes back with the reason; if that is known before, it is not stopped.
    pub fn stop(self, hz: u64) -> Result<Stopped, Box<(Guest, String)>> {
        if let Some(why) = self.save.cannot_save.clone() {
            return Err(Box::new((self, why)));
        }
        // Never found at the restore, after the kexec, when the guest could have run on.
        if let Err(e) = check_guest_memfds(self.mem_mib, &self.m.ram_sizes) {
            return Err(Box::new((self, format!("the guest's RAM: {e}"))));
        }
        let Guest {
            m,
            running,
            save,
            mem_mib,
            pings,
        } = self;
        let n = checks::Vcpus::count(&running);
        // What the guest wrote so far is read while it still runs; only the rest after the stop.
        let lines = m.console.since(0);
        let mut progress = Progress::scan(&lines, n);
        let read = lines.len();
        drop(lines);
        // From here the guest does not run until it is resumed.
        let kick = rdtsc();
        let stopped = running.stop(|| {
            // Nothing raises the UART's interrupt after this (KVM waits for injections in
            // flight); then the VM-wide state.
            m.vm.unregister_irqfd(&m.irq, COM1_IRQ)
                .map_err(os("KVM_IRQFD deassign"))?;
            super::mark_step("irqfd off");
            let vm_state = VmState::save(&m.vm);
            super::mark_step("VM state");
            vm_state
        });
        let (vm_state, stopped_vcpus) = match stopped {
            Ok(s) => s,
            Err((running, e)) => {
                // The UART's interrupt again, if the stop got as far as taking it away (the
                // eventfd's count carries an interrupt raised meanwhile).
                if let Err(e2) = m.vm.register_irqfd(&m.irq, COM1_IRQ) {
                    if e2.errno() != libc::EBUSY {
                        say(format!("the UART's interrupt is lost: KVM_IRQFD: {e2}"));
                    }
                }
                let g = Guest {
                    m,
                    running,
                    save,
                    mem_mib,
                    pings,
                };
                return Err(Box::new((
                    g,
                    format!("stopping the vCPUs and saving the VM: {e}"),
                )));
            }
        };
        let stopped = rdtsc();
        progress.scan_more(&m.console.since(read));
        let uart = UartState::save(&m.io.uart.lock().unwrap());
        let (vcpus, vcpu_states): (Vec<_>, Vec<_>) = stopped_vcpus.into_iter().unzip();
        super::mark_step("console and UART");
        let saved = rdtsc();
        let snapshot = Snapshot {
            magic: MAGIC.into(),
            version: state_version(mem_mib, &m.ram_sizes),
            mem_mib,
            vm: vm_state,
            vcpus: vcpu_states,
            uart,
            console_line: m.console.partial(),
            progress,
            stamps: Stamps {
                hz,
                kick,
                stopped,
                saved,
                preserved: 0,
            },
            guest_memfds: m.ram_sizes.clone(),
        };
        Ok(Stopped {
            m,
            vcpus,
            save,
            snapshot,
            pings,
        })
    }
}

fn lu(what: &'static str) -> impl Fn(liveupdate::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

impl Machine {
    /// Preserves the VM and its guest_memfds in `session`. From then on the guest_memfds are
    /// frozen: the guest may write its memory (what it writes is carried over) but no page can
    /// be added, so a running guest must have all of its RAM allocated.
    pub fn preserve_vm_and_ram(&self, session: &Session) -> io::Result<()> {
        if self.ram.is_empty() {
            return Err(io::Error::other(
                "the guest's RAM is anonymous memory, which cannot be preserved",
            ));
        }
        // SAFETY: The VM fd stays open while `self.vm` lives, beyond this borrow.
        let vm = unsafe { BorrowedFd::borrow_raw(self.vm.as_raw_fd()) };
        session
            .preserve(&vm, TOKEN_VM)
            .map_err(lu("preserving the VM"))?;
        for (i, f) in self.ram.iter().enumerate() {
            session
                .preserve(f, TOKEN_RAM + i as u64)
                .map_err(lu("preserving a guest_memfd"))?;
        }
        Ok(())
    }
}

impl Stopped {
    /// Preserves the VM, its guest_memfds (unless `preserve_vm_and_ram` did while the guest
    /// ran: `vm_and_ram`) and its state in `session`; returns the memfd that holds the state.
    pub fn preserve(&mut self, session: &Session, vm_and_ram: bool) -> io::Result<File> {
        if !vm_and_ram {
            self.m.preserve_vm_and_ram(session)?;
            super::mark_step("VM and RAM preserved");
        }
        self.snapshot.stamps.preserved = rdtsc();
        let state_fd = write_snapshot(&self.snapshot)?;
        super::mark_step("state written");
        session
            .preserve(&state_fd, TOKEN_STATE)
            .map_err(lu("preserving the state"))?;
        super::mark_step("state preserved");
        Ok(state_fd)
    }

    /// Runs the guest again from the state it was saved in, on the same host kernel (the
    /// update did not happen), and checks it went on. Restoring that state hides the pause from
    /// the guest, or moves its clock on by the pause, as the new kernel's restore does. The
    /// guest comes back running even when a check fails (with what failed); only a restore
    /// that cannot be done loses it.
    pub fn go_on(
        self,
        clock: super::ClockMode,
        label: &str,
    ) -> Result<(Guest, Result<(), String>), String> {
        let Stopped {
            m,
            vcpus,
            save,
            snapshot: s,
            pings,
        } = self;
        // The vCPUs have not run since they were saved, so they still hold that state: what is
        // restored here only hides the pause. A step that fails is said, and the guest goes on
        // without it; only vCPU threads that cannot start lose it.
        let said = |what: &str, r: Result<(), String>| {
            if let Err(e) = r {
                say(format!("{label}{what}: {e}; the guest goes on without it"));
            }
        };
        for (id, (vcpu, state)) in vcpus.iter().zip(&s.vcpus).enumerate() {
            let mut report = state::RestoreReport::default();
            let r = state.restore(&m.vm, vcpu, &mut report);
            for l in report_lines(id, &report) {
                say(format!("{label}{l}"));
            }
            if let Err(e) = r {
                said(&format!("restoring vCPU {id}"), Err(e.to_string()));
            }
        }
        said(
            "restoring the irqchip and PIT",
            s.vm.restore_devices(&m.vm).map_err(|e| e.to_string()),
        );
        said(
            "KVM_IRQFD",
            m.vm.register_irqfd(&m.irq, COM1_IRQ)
                .map_err(|e| format!("KVM_IRQFD: {e}")),
        );
        said(
            "restoring the clock",
            s.vm.restore_clock(&m.vm, clock == super::ClockMode::Advance)
                .map_err(|e| e.to_string()),
        );
        said(
            "telling the guest its clock was paused",
            kvmclock_paused(&vcpus),
        );
        let from = m.console.len();
        let running = check("vCPU threads", Running::start(vcpus, &m.io, &save))?;
        let mut g = Guest {
            m,
            running,
            save,
            mem_mib: s.mem_mib,
            pings,
        };
        let checked = g.check_went_on(&s.progress, &s.stamps, clock, from, label);
        Ok((g, checked))
    }

    /// Gives up the guest: its VM, RAM and vCPUs, once they are preserved or no longer needed.
    pub fn into_files(self) -> (VmFd, Vec<File>) {
        let Stopped { m, vcpus, .. } = self;
        drop(vcpus);
        let Machine { vm, ram, mem, .. } = m;
        // No vCPU runs any more: the mapping can go.
        drop(mem);
        (vm, ram)
    }
}

/// What a vCPU's restore has to say: the MSRs KVM refused, a TSC rate it could not set.
fn report_lines(id: usize, report: &state::RestoreReport) -> Vec<String> {
    let mut lines: Vec<String> = report
        .skipped_msrs
        .iter()
        .map(|(index, value)| {
            format!(
                "vCPU {id}: MSR {index:#x} (value {value:#x}) refused by this kernel's KVM: \
                 skipped"
            )
        })
        .collect();
    if let Some(w) = &report.tsc_khz {
        lines.push(format!("vCPU {id}: warning: {w}"));
    }
    lines
}

/// Tells the guest it was paused, so that its watchdogs do not take the pause for a lockup.
/// Only a guest that set up kvmclock has anything to tell.
fn kvmclock_paused(vcpus: &[VcpuFd]) -> Result<(), String> {
    for vcpu in vcpus {
        if let Err(e) = vcpu.kvmclock_ctrl() {
            if e.errno() != libc::EINVAL {
                return Err(format!("KVM_KVMCLOCK_CTRL: {e}"));
            }
        }
    }
    Ok(())
}

/// When the steps of a restore ended (TSC).
pub struct Restored {
    pub start: u64,
    pub retrieved: u64,
    pub restored: u64,
    /// What KVM logged about this process ignoring an MSR write while the vCPUs were
    /// restored ([`kvm_complaint`]): a write it ignored, and a line on the host's console in
    /// the blackout. Best effort: empty without `/dev/kmsg`, in a PID namespace (KVM names
    /// the process by its pid outside), or past the log's rate limit.
    pub kvm_said: Vec<String>,
}

/// A step of a restore that could not be done: everything retrieved so far stays open (the
/// caller holds it, and the session stays unfinished), so nothing of the guest is freed.
pub struct Held {
    pub why: String,
    /// What was retrieved, kept open.
    pub files: Vec<Box<dyn std::any::Any + Send>>,
    /// Nothing of the guest was touched: another VMM (one that reads its state) can take the
    /// session over as it is.
    pub untouched: bool,
}

/// Retrieves a guest from `session` and runs it again.
pub fn restore(
    session: &Session,
    clock: super::ClockMode,
    label: &str,
) -> Result<(Guest, Snapshot, Restored), Held> {
    let start = rdtsc();
    let mut files: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    macro_rules! or_hold {
        ($what:expr, $r:expr) => {
            match $r {
                Ok(x) => x,
                Err(e) => {
                    return Err(Held {
                        why: format!("{}: {e}", $what),
                        files,
                        untouched: false,
                    })
                }
            }
        };
    }
    let state_fd = or_hold!("retrieve the state", session.retrieve(TOKEN_STATE));
    super::mark_step("state retrieved");
    let s = read_snapshot(&state_fd);
    super::mark_step("state read");
    files.push(Box::new(state_fd));
    let s = match s {
        // Of a later format: only the state was retrieved, and it stays in the session.
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            return Err(Held {
                why: format!("read the state: {e}"),
                files,
                untouched: true,
            })
        }
        s => or_hold!("read the state", s),
    };
    // The first guest_memfd before its VM, the others after it: any order works.
    let first = or_hold!("retrieve guest_memfd 0", session.retrieve(TOKEN_RAM));
    let mut ram = vec![File::from(first)];
    super::mark_step("guest_memfd 0");
    let vm_fd = match session.retrieve(TOKEN_VM) {
        Ok(fd) => fd,
        Err(e) => {
            files.push(Box::new(ram));
            return Err(Held {
                why: format!("retrieve the VM: {e}"),
                files,
                untouched: false,
            });
        }
    };
    // As many guest_memfds as the state says, each of the size it says (checked when it was
    // read: they hold the RAM, and none straddles the hole).
    let all = (1..s.guest_memfds.len())
        .try_for_each(|i| {
            let f = session
                .retrieve(TOKEN_RAM + i as u64)
                .map_err(|e| format!("retrieve guest_memfd {i}: {e}"))?;
            ram.push(File::from(f));
            Ok(())
        })
        .and_then(|()| {
            for (i, (f, &want)) in ram.iter().zip(&s.guest_memfds).enumerate() {
                let have = f
                    .metadata()
                    .map_err(|e| format!("the size of guest_memfd {i}: {e}"))?
                    .len();
                if have != want {
                    return Err(format!(
                        "guest_memfd {i} holds {have} bytes, the state says {want}"
                    ));
                }
            }
            Ok(())
        });
    if let Err(why) = all {
        files.push(Box::new(vm_fd));
        files.push(Box::new(ram));
        return Err(Held {
            why,
            files,
            untouched: false,
        });
    }
    super::mark_step("the VM and the other guest_memfds");
    let retrieved = rdtsc();
    // From here the VM and its RAM are held by what holds them below, or given to the caller.
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            files.push(Box::new(vm_fd));
            files.push(Box::new(ram));
            return Err(Held {
                why: format!("open /dev/kvm: {e}"),
                files,
                untouched: false,
            });
        }
    };
    // SAFETY: `vm_fd` is a VM fd retrieved from LUO, owned by the new `VmFd`.
    let vm = match unsafe { kvm.create_vmfd_from_rawfd(vm_fd.into_raw_fd()) } {
        Ok(vm) => vm,
        Err(e) => {
            // `create_vmfd_from_rawfd` fails only before it takes the fd, which then stays
            // open, held, for the life of the process; the RAM is held here.
            files.push(Box::new(ram));
            return Err(Held {
                why: format!("adopt the VM: {e}"),
                files,
                untouched: false,
            });
        }
    };
    super::mark_step("VM adopted");
    match rebuild(&kvm, vm, ram, &s, clock, label) {
        Ok((g, restored, kvm_said)) => Ok((
            g,
            s,
            Restored {
                start,
                retrieved,
                restored,
                kvm_said,
            },
        )),
        Err((why, vm, ram)) => {
            files.push(Box::new(vm));
            files.push(Box::new(ram));
            Err(Held {
                why,
                files,
                untouched: false,
            })
        }
    }
}

/// Whether a kernel log message is KVM's about process `pid` writing an MSR it ignored:
/// "Unhandled WRMSR" (`vcpu_unimpl()`, a write it does not implement, after the module's
/// prefix, "kvm_amd: "), or "ignored wrmsr" (`kvm_pr_unimpl()`, with `ignore_msrs`). Both
/// start with "kvm [PID]: ", PID the VMM's process outside any PID namespace.
fn kvm_complaint(message: &str, pid: u32) -> bool {
    let tag = format!("kvm [{pid}]: ");
    let rest = message.strip_prefix(&tag).or_else(|| {
        let (module, rest) = message.split_once(": ")?;
        let module_like = !module.is_empty()
            && module
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        rest.strip_prefix(&tag).filter(|_| module_like)
    });
    rest.is_some_and(|r| r.contains("Unhandled WRMSR") || r.starts_with("ignored wrmsr"))
}

/// The guest, the TSC when it was restored, and what KVM logged meanwhile.
type Rebuilt = (Guest, u64, Vec<String>);

/// Rebuilds the VM's memory, devices and vCPUs from `s` and runs them; on failure gives the
/// VM and its RAM back.
#[allow(clippy::type_complexity)]
fn rebuild(
    kvm: &Kvm,
    vm: VmFd,
    ram: Vec<File>,
    s: &Snapshot,
    clock: super::ClockMode,
    label: &str,
) -> Result<Rebuilt, (String, VmFd, Vec<File>)> {
    // What the restore has to say, said once the vCPUs run, or before its failure. The CPUID
    // features the guest has that this KVM lacks only feed warnings, so
    // KVM_GET_SUPPORTED_CPUID is asked once the vCPUs run, or to explain a failure.
    let mut notes: Vec<String> = Vec::new();
    let cpuid_notes = || -> Vec<String> {
        let Some(v) = s.vcpus.first() else {
            return Vec::new();
        };
        match kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
            Ok(supported) => state::cpuid_differences(&v.cpuid, &supported)
                .into_iter()
                .map(|d| format!("warning: the guest's {d}"))
                .collect(),
            Err(e) => vec![format!(
                "warning: KVM_GET_SUPPORTED_CPUID: {e}: what the guest had that this KVM \
                 does not offer is not known"
            )],
        }
    };
    macro_rules! step {
        ($what:expr, $r:expr) => {
            match $r {
                Ok(x) => x,
                Err(e) => {
                    for n in cpuid_notes().iter().chain(&notes) {
                        say(format!("{label}{n}"));
                    }
                    return Err((format!("{}: {e}", $what), vm, ram));
                }
            }
        };
    }
    let mem = step!("guest RAM", Machine::map_ram(&vm, &ram, &s.guest_memfds));
    super::mark_step("memslots");
    // The irqchip and PIT must exist before the vCPUs; their state goes in once the vCPUs
    // are there to take what they replay; the clock last.
    step!("irqchip and PIT", state::create_irqchip_and_pit(&vm));
    super::mark_step("irqchip");
    // What KVM logs for this VM while its vCPUs are restored, before any runs: about the
    // restore only (`vcpu_unimpl()` names the VMM's process).
    let mut log = crate::KernelLog::from_now();
    let mut vcpus = Vec::new();
    for (id, st) in s.vcpus.iter().enumerate() {
        let vcpu = step!("KVM_CREATE_VCPU", vm.create_vcpu(id as u64));
        super::mark_vcpu_step("created", id);
        let mut report = state::RestoreReport::default();
        let r = st.restore(&vm, &vcpu, &mut report);
        super::mark_vcpu_step("restored", id);
        notes.extend(report_lines(id, &report));
        step!(format!("restoring vCPU {id}"), r);
        vcpus.push(vcpu);
    }
    let kvm_said: Vec<String> = match log.as_mut() {
        Ok(l) => {
            let pid = std::process::id();
            l.lines_with("kvm [")
                .into_iter()
                .filter(|m| kvm_complaint(m, pid))
                .collect()
        }
        Err(e) => {
            notes.push(format!(
                "warning: /dev/kmsg: {e}: what KVM logged while restoring is not known"
            ));
            Vec::new()
        }
    };
    for r in &kvm_said {
        notes.push(format!("warning: restoring the vCPUs, KVM said: {r}"));
    }
    super::mark_step("KVM's log");
    step!("restoring the irqchip and PIT", s.vm.restore_devices(&vm));
    super::mark_step("irqchip state");
    let (io, console, irq) = step!(
        "devices",
        Machine::devices(&vm, Some(&s.uart), s.console_line.clone())
    );
    super::mark_step("UART");
    step!(
        "restoring the clock",
        s.vm.restore_clock(&vm, clock == super::ClockMode::Advance)
    );
    super::mark_step("clock");
    step!("KVM_KVMCLOCK_CTRL", kvmclock_paused(&vcpus));
    super::mark_step("kvmclock");
    let mut save = step!("MSR list", SaveOpts::new(kvm, &vm, s.vcpus.len()));
    // A guest an older VMM booted with shadow stacks runs, but is not stopped for an update
    // that its save would refuse.
    save.cannot_save = s
        .vcpus
        .iter()
        .enumerate()
        .find_map(|(id, v)| state::unsaveable(id, &v.cpuid));
    super::mark_step("MSR list");
    let restored = rdtsc();
    let running = step!("vCPU threads", Running::start(vcpus, &io, &save));
    super::mark_step("threads started");
    // The vCPU threads get to KVM_RUN first, then the VMM says what it has to say and goes on
    // (finishing the session starts the kernel's background restore): on a host with few
    // CPUs, either took the CPU from the vCPU threads just started, which delayed the blackout's
    // end by up to 16 ms (measured 2026-12-06, `make bench`'s guests on one CPU).
    if !running.wait_entered(Duration::from_secs(1)) && !running.any_failed() {
        say(format!("{label}not every vCPU came to run in 1 s"));
    }
    for n in cpuid_notes().iter().chain(&notes) {
        say(format!("{label}{n}"));
    }
    say(format!(
        "{label}retrieved the VM, {} and the state; restored {} vCPUs (regs, sregs, \
         XSAVE, XCRs, {} MSRs, LAPIC, MP state, events, debug registers), PIC, IOAPIC, PIT, \
         kvmclock and the UART",
        super::guest_memfds(ram.len()),
        s.vcpus.len(),
        s.vcpus.first().map_or(0, |v| v.msrs.as_slice().len())
    ));
    let m = Machine {
        vm,
        ram,
        ram_sizes: s.guest_memfds.clone(),
        mem,
        io,
        console,
        irq,
    };
    let g = Guest {
        m,
        running,
        save,
        mem_mib: s.mem_mib,
        // The guest answered one ping before it was saved.
        pings: 1,
    };
    Ok((g, restored, kvm_said))
}

fn write_snapshot(s: &Snapshot) -> io::Result<File> {
    let bytes = encode_snapshot(s)?;
    let mut f = File::from(rustix::fs::memfd_create(
        "vm-state",
        rustix::fs::MemfdFlags::CLOEXEC,
    )?);
    f.write_all(&bytes)?;
    Ok(f)
}

fn read_snapshot(fd: &OwnedFd) -> io::Result<Snapshot> {
    let mut f = File::from(fd.try_clone()?);
    let mut bytes = Vec::new();
    f.rewind()?;
    f.read_to_end(&mut bytes)?;
    decode_snapshot(&bytes)
}

/// The kind and format of a saved state, read before the rest: a later format may not parse
/// as this one, or parse and mean something else.
#[derive(Deserialize)]
struct SnapshotHeader {
    magic: String,
    #[serde(default = "first_version")]
    version: u32,
}

/// What formats 2 and 3 write: its [`SnapshotHeader`], the sizes of the guest_memfds (format
/// 3), and the [`Snapshot`] in postcard, in base64.
#[derive(Serialize)]
struct Envelope<'a> {
    magic: &'a str,
    version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_memfds: Option<&'a Vec<u64>>,
    state: &'a str,
}

/// Format 2's and 3's state, read once its header is.
#[derive(Deserialize)]
struct Packed {
    /// Format 3's only.
    guest_memfds: Option<Vec<u64>>,
    state: String,
}

/// The format to save a guest's state in: format 2 while its guest_memfds are those format 2
/// assumes, so that a VMM of the build before can still restore it; format 3 otherwise.
fn state_version(mem_mib: u64, guest_memfds: &[u64]) -> u32 {
    if guest_memfds == region_sizes(mem_mib << 20, EARLIER_REGION) {
        2
    } else {
        STATE_VERSION
    }
}

fn encode_snapshot(s: &Snapshot) -> io::Result<Vec<u8>> {
    let state = postcard::to_stdvec(s).map_err(|e| io::Error::other(format!("the state: {e}")))?;
    let envelope = Envelope {
        magic: MAGIC,
        version: s.version,
        guest_memfds: (s.version >= 3).then_some(&s.guest_memfds),
        state: &BASE64_STANDARD.encode(state),
    };
    serde_json::to_vec(&envelope).map_err(io::Error::other)
}

fn decode_snapshot(bytes: &[u8]) -> io::Result<Snapshot> {
    let not_ours = |e: String| io::Error::other(format!("not a state this VMM saved{e}"));
    let h: SnapshotHeader =
        serde_json::from_slice(bytes).map_err(|e| not_ours(format!(": {e}")))?;
    if h.magic != MAGIC {
        return Err(not_ours(String::new()));
    }
    if h.version > STATE_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the state is of format {}, later than this VMM reads (up to {STATE_VERSION}): \
                 resume the guest with a VMM that reads it",
                h.version
            ),
        ));
    }
    let bad = |e: String| io::Error::other(format!("the state: {e}"));
    let mut s: Snapshot = match h.version {
        1 => serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?,
        2 | 3 => {
            let p: Packed = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
            let sizes = match (h.version, p.guest_memfds) {
                (2, None) => Vec::new(),
                (3, Some(sizes)) => sizes,
                (2, Some(_)) => return Err(bad("`guest_memfds` in format 2".into())),
                (_, _) => return Err(bad("format 3 without `guest_memfds`".into())),
            };
            let state = BASE64_STANDARD
                .decode(p.state)
                .map_err(|e| bad(format!("not base64: {e}")))?;
            let (s, rest): (Snapshot, _) =
                postcard::take_from_bytes(&state).map_err(|e| bad(e.to_string()))?;
            if !rest.is_empty() {
                return Err(bad(format!("bytes past its end: {}", rest.len())));
            }
            if s.magic != MAGIC {
                return Err(bad("not this VMM's inside".into()));
            }
            if s.version != h.version {
                return Err(bad(format!(
                    "of format {} inside format {}",
                    s.version, h.version
                )));
            }
            Snapshot {
                guest_memfds: sizes,
                ..s
            }
        }
        v => return Err(bad(format!("of format {v}, which no VMM writes"))),
    };
    if h.version < 3 && super::MEM_MIB.contains(&s.mem_mib) {
        s.guest_memfds = region_sizes(s.mem_mib << 20, EARLIER_REGION);
    }
    check_guest_memfds(s.mem_mib, &s.guest_memfds).map_err(bad)?;
    Ok(s)
}

/// Whether guest_memfds of `sizes` can hold a guest's `mem_mib` MiB of RAM: as much RAM as this
/// VMM gives a guest, in no more guest_memfds than `--region`'s smallest size makes, whole
/// pages, none straddling the hole below 4 GiB, and adding up to the RAM.
fn check_guest_memfds(mem_mib: u64, sizes: &[u64]) -> Result<(), String> {
    if !super::MEM_MIB.contains(&mem_mib) {
        return Err(format!("{mem_mib} MiB of RAM"));
    }
    if sizes.len() as u64 > super::MEM_MIB.end() / super::MIN_REGION_MIB {
        return Err(format!("{} guest_memfds", sizes.len()));
    }
    ram_layout(sizes).map_err(|e| e.to_string())?;
    let held = sizes
        .iter()
        .try_fold(0u64, |sum, &size| sum.checked_add(size));
    if held != Some(mem_mib << 20) {
        return Err(format!(
            "its guest_memfds do not hold its {mem_mib} MiB of RAM"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{CpuId, Msrs, Xsave};

    /// Why `json` is refused.
    fn refusal(json: &[u8]) -> String {
        match decode_snapshot(json) {
            Ok(_) => panic!("{} was read", String::from_utf8_lossy(json)),
            Err(e) => e.to_string(),
        }
    }

    /// A state of one vCPU with a few values that are not zero.
    fn sample() -> Snapshot {
        let mut cpuid = CpuId::new(2).unwrap();
        cpuid.as_mut_slice()[1].function = 0x8000_0001;
        let mut xsave = Xsave::new(3).unwrap();
        xsave.as_mut_slice()[1] = 0xdead_beef;
        let msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 1 << 40,
            ..Default::default()
        }])
        .unwrap();
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x320] = 0x40;
        let vcpu = VcpuState {
            cpuid,
            tsc_khz: 2_600_000,
            regs: kvm_bindings::kvm_regs {
                rip: 0xffff_ffff_8100_0000,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave,
            xcrs: Default::default(),
            msrs,
            lapic,
            mp_state: Default::default(),
            events: Default::default(),
            debugregs: Default::default(),
        };
        Snapshot {
            magic: MAGIC.into(),
            version: STATE_VERSION,
            mem_mib: 256,
            vm: VmState {
                irqchips: vec![Default::default()],
                pit: Default::default(),
                clock: Default::default(),
                realtime_ns: 42,
            },
            vcpus: vec![vcpu],
            uart: UartState::default(),
            console_line: b"half a li".to_vec(),
            progress: Progress {
                beat: 7,
                mono: 1.5,
                generations: vec![3],
            },
            stamps: Stamps {
                hz: 2_600_000_000,
                kick: 11,
                stopped: 12,
                saved: 13,
                preserved: 14,
            },
            // 256 MiB in guest_memfds of 64 and 192 MiB: not what formats 1 and 2 assume.
            guest_memfds: vec![64 << 20, 192 << 20],
        }
    }

    /// What a state says, to compare two (the `kvm-bindings` types have no `PartialEq`).
    fn said(s: &Snapshot) -> String {
        serde_json::to_string(s).unwrap()
    }

    #[test]
    fn only_this_process_ignored_writes_are_complaints() {
        let line = "kvm_amd: kvm [1234]: vcpu0, guest rIP: 0x401940 Unhandled WRMSR(0x1d9) = 0x0";
        assert!(kvm_complaint(line, 1234));
        assert!(!kvm_complaint(line, 123));
        assert!(!kvm_complaint(line, 12345));
        assert!(kvm_complaint(
            "kvm [7]: ignored wrmsr: 0x4b564d80 data 0x5a5a",
            7
        ));
        assert!(!kvm_complaint(
            "kvm [7]: ignored rdmsr: 0x4b564d80 data 0x0",
            7
        ));
        assert!(!kvm_complaint(
            "kvm_amd: kvm [7]: vcpu0 Unhandled RDMSR(0x1d9)",
            7
        ));
        // The tag where KVM puts it, not anywhere.
        assert!(!kvm_complaint(
            "x: y kvm [7]: Unhandled WRMSR(0x1d9) = 0x0",
            7
        ));
        assert!(!kvm_complaint("Unhandled WRMSR, kvm [7]: ", 7));
    }

    /// The layout of this format: a change to what the `Snapshot` holds changes it, and must
    /// raise [`STATE_VERSION`] (postcard is positional), then this test's numbers.
    #[test]
    fn the_layout_of_the_state_is_that_of_its_version() {
        let bytes = postcard::to_stdvec(&sample()).unwrap();
        let sum = bytes
            .iter()
            .fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        assert_eq!((STATE_VERSION, bytes.len(), sum), (3, 7074, 4_234_657_708));
        // Format 3 holds in postcard what format 2 did (the numbers of the build before).
        let mut s = sample();
        s.version = 2;
        let bytes = postcard::to_stdvec(&s).unwrap();
        let sum = bytes
            .iter()
            .fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        assert_eq!((bytes.len(), sum), (7074, 48_755_819));
    }

    #[test]
    fn a_state_reads_back_as_it_was_written() {
        let s = sample();
        let bytes = encode_snapshot(&s).unwrap();
        let back = decode_snapshot(&bytes).unwrap();
        assert_eq!(said(&back), said(&s));
        assert_eq!(back.vcpus[0].xsave.as_slice()[1], 0xdead_beef);
        assert_eq!(back.vcpus[0].msrs.as_slice()[0].data, 1 << 40);
        assert_eq!(back.vcpus[0].cpuid.as_slice()[1].function, 0x8000_0001);
        assert_eq!(back.guest_memfds, [64 << 20, 192 << 20]);
        // Format 2 does not write bytes as JSON arrays of numbers: it is the smaller.
        let v1 = serde_json::to_vec(&s).unwrap();
        assert!(
            bytes.len() < v1.len(),
            "{} against {}",
            bytes.len(),
            v1.len()
        );
    }

    #[test]
    fn a_state_of_the_first_format_is_still_read() {
        let mut s = sample();
        s.version = 1;
        let back = decode_snapshot(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(said(&back), said(&s));
        // Unversioned is the first format.
        let mut v: serde_json::Value = serde_json::to_value(&s).unwrap();
        v.as_object_mut().unwrap().remove("version");
        let back = decode_snapshot(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(back.version, 1);
    }

    #[test]
    fn states_of_other_kinds_and_later_formats_are_refused_before_they_are_read() {
        assert_eq!(
            refusal(br#"{"magic":"something else"}"#),
            "not a state this VMM saved"
        );
        assert!(refusal(b"\x00\x01").starts_with("not a state this VMM saved: "));
        // A later format: refused by its version, even though what follows would not parse.
        let later = format!(r#"{{"magic":"{MAGIC}","version":4,"state":7}}"#);
        let e = refusal(later.as_bytes());
        assert!(
            e.starts_with("the state is of format 4, later than this VMM reads (up to 3)"),
            "{e}"
        );
        // The first format (versioned or not) with a field missing: an error of the state.
        for v in ["", r#","version":1"#] {
            let e = refusal(format!(r#"{{"magic":"{MAGIC}"{v},"mem_mib":256}}"#).as_bytes());
            assert!(e.starts_with("the state: missing field"), "{e}");
        }
    }

    /// Format 2 around `state`, as it is.
    fn packed(state: &[u8]) -> Vec<u8> {
        let state = BASE64_STANDARD.encode(state);
        format!(r#"{{"magic":"{MAGIC}","version":2,"state":"{state}"}}"#).into_bytes()
    }

    #[test]
    fn a_broken_state_of_this_format_is_refused() {
        let e = refusal(format!(r#"{{"magic":"{MAGIC}","version":2}}"#).as_bytes());
        assert!(e.starts_with("the state: missing field `state`"), "{e}");
        let e = refusal(format!(r#"{{"magic":"{MAGIC}","version":2,"state":"%%"}}"#).as_bytes());
        assert!(e.starts_with("the state: not base64: "), "{e}");
        // Cut short, or with a format inside that is not the one outside.
        let mut s = sample();
        let full = postcard::to_stdvec(&s).unwrap();
        let e = refusal(&packed(&full[..full.len() / 2]));
        assert!(e.starts_with("the state: Hit the end of buffer"), "{e}");
        let mut longer = full.clone();
        longer.push(0);
        assert_eq!(
            refusal(&packed(&longer)),
            "the state: bytes past its end: 1"
        );
        let e = refusal(format!(r#"{{"magic":"{MAGIC}","version":0}}"#).as_bytes());
        assert_eq!(e, "the state: of format 0, which no VMM writes");
        s.magic = "another VMM's".into();
        let e = refusal(&packed(&postcard::to_stdvec(&s).unwrap()));
        assert_eq!(e, "the state: not this VMM's inside");
        s.magic = MAGIC.into();
        s.version = 1;
        let e = refusal(&packed(&postcard::to_stdvec(&s).unwrap()));
        assert_eq!(e, "the state: of format 1 inside format 2");
    }

    /// `s` in format 3's envelope with `guest_memfds` as given (JSON).
    fn with_guest_memfds(s: &Snapshot, guest_memfds: &str) -> Vec<u8> {
        let state = BASE64_STANDARD.encode(postcard::to_stdvec(s).unwrap());
        format!(
            r#"{{"magic":"{MAGIC}","version":3,"guest_memfds":{guest_memfds},"state":"{state}"}}"#
        )
        .into_bytes()
    }

    #[test]
    fn the_guest_memfds_are_those_the_state_says() {
        const MIB: u64 = 1 << 20;
        // Formats 1 and 2 had one per 128 MiB, the last what was left.
        let mut s = sample();
        s.mem_mib = 300;
        s.version = 2;
        let back = decode_snapshot(&packed(&postcard::to_stdvec(&s).unwrap())).unwrap();
        assert_eq!(back.guest_memfds, [128 * MIB, 128 * MIB, 44 * MIB]);
        s.version = 1;
        let back = decode_snapshot(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back.guest_memfds, [128 * MIB, 128 * MIB, 44 * MIB]);
        // Format 3 says them, and they must hold the RAM, no more, no less, in whole pages,
        // none across the hole.
        let mut s = sample();
        s.mem_mib = 4096;
        let sizes = "[1073741824,2147483648,1073741824]";
        let back = decode_snapshot(&with_guest_memfds(&s, sizes)).unwrap();
        assert_eq!(back.guest_memfds, [1024 * MIB, 2048 * MIB, 1024 * MIB]);
        for (sizes, why) in [
            ("[1073741824,1073741824]", "do not hold its 4096 MiB"),
            ("[4294967296,1073741824]", "straddles the hole"),
            ("[2147483648,2147483648]", "straddles the hole"),
            ("[1073741824,4096,3221221376]", "straddles the hole"),
            ("[3221225472,18446744073709547520]", "ends past any address"),
            ("[3221225472,0,1073741824]", "holds 0 bytes"),
            ("[3221225472,1073741823,1]", "not whole pages"),
            ("[]", "do not hold its 4096 MiB"),
        ] {
            let e = refusal(&with_guest_memfds(&s, sizes));
            assert!(
                e.starts_with("the state: ") && e.contains(why),
                "{sizes}: {e}"
            );
        }
        // Format 3 without them, format 2 with them: refused.
        let v3 = String::from_utf8(with_guest_memfds(&s, "[4294967296]")).unwrap();
        let e = refusal(v3.replace(r#""guest_memfds":[4294967296],"#, "").as_bytes());
        assert_eq!(e, "the state: format 3 without `guest_memfds`");
        s.version = 2;
        let v2 = String::from_utf8(with_guest_memfds(&s, "[4294967296]")).unwrap();
        let e = refusal(v2.replace(r#""version":3"#, r#""version":2"#).as_bytes());
        assert_eq!(e, "the state: `guest_memfds` in format 2");
        // More guest_memfds than 16 MiB ones would make.
        let mut s = sample();
        s.mem_mib = 4096;
        let many = format!("[{}]", vec!["16777216"; 257].join(","));
        assert_eq!(
            refusal(&with_guest_memfds(&s, &many)),
            "the state: 257 guest_memfds"
        );
        let many = format!("[{}]", vec!["16777216"; 256].join(","));
        let back = decode_snapshot(&with_guest_memfds(&s, &many)).unwrap();
        assert_eq!(back.guest_memfds.len(), 256);
        // RAM this VMM never gives a guest, whose size would wrap; in format 2 too.
        let mut s = sample();
        s.mem_mib = (1 << 44) + 256;
        let e = refusal(&with_guest_memfds(&s, "[268435456]"));
        assert_eq!(e, format!("the state: {} MiB of RAM", (1u64 << 44) + 256));
        for mib in [63, 4097] {
            s.mem_mib = mib;
            s.version = 2;
            let e = refusal(&packed(&postcard::to_stdvec(&s).unwrap()));
            assert_eq!(e, format!("the state: {mib} MiB of RAM"));
        }
    }

    #[test]
    fn a_guest_in_128_mib_guest_memfds_is_saved_for_the_build_before() {
        const MIB: u64 = 1 << 20;
        let mut s = sample();
        s.guest_memfds = vec![128 * MIB, 128 * MIB];
        s.version = state_version(s.mem_mib, &s.guest_memfds);
        let json = String::from_utf8(encode_snapshot(&s).unwrap()).unwrap();
        assert!(json.contains(r#""version":2,"state":"#), "{json}");
        assert!(!json.contains("guest_memfds"), "{json}");
        let back = decode_snapshot(json.as_bytes()).unwrap();
        assert_eq!(back.guest_memfds, s.guest_memfds);
        // Any other layout is format 3's.
        for sizes in [vec![256 * MIB], vec![128 * MIB, 64 * MIB, 64 * MIB]] {
            s.guest_memfds = sizes;
            s.version = state_version(s.mem_mib, &s.guest_memfds);
            let json = String::from_utf8(encode_snapshot(&s).unwrap()).unwrap();
            assert!(json.contains(r#""version":3,"guest_memfds":["#), "{json}");
            let back = decode_snapshot(json.as_bytes()).unwrap();
            assert_eq!(back.guest_memfds, s.guest_memfds);
        }
    }

    #[test]
    fn guest_ram_goes_on_above_the_hole_whatever_the_guest_memfds_sizes() {
        const MIB: u64 = 1 << 20;
        // A new guest of 4 GiB in 1 GiB guest_memfds: three below the hole, one above.
        let sizes = region_sizes(4096 * MIB, 1024 * MIB);
        assert_eq!(sizes, [1024 * MIB; 4]);
        let gpas: Vec<u64> = ram_layout(&sizes).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(gpas, [0, 1024 * MIB, 2048 * MIB, 4096 * MIB]);
        // What an earlier VMM made, 128 MiB each, and a last one that is smaller.
        let sizes = region_sizes(3100 * MIB, 128 * MIB);
        assert_eq!(sizes.len(), 25);
        let layout = ram_layout(&sizes).unwrap();
        assert_eq!(layout[23], (2944 * MIB, 128 * MIB));
        assert_eq!(layout[24], (4096 * MIB, 28 * MIB));
        assert_eq!(region_sizes(100 * MIB, 64 * MIB), [64 * MIB, 36 * MIB]);
        // Refused: a guest_memfd across the hole, one of no pages, one of part of a page.
        let e = ram_layout(&[2048 * MIB, 2048 * MIB]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest_memfd 1 (2147483648 bytes at RAM offset 0x80000000) straddles the hole \
             below 4 GiB"
        );
        let e = ram_layout(&[MIB, 0]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest_memfd 1 holds 0 bytes, not whole pages"
        );
        assert!(ram_layout(&[MIB + 512]).is_err());
        assert!(ram_layout(&[3072 * MIB, !0xfff]).is_err());
        for mib in [16, 64, 128, 1024, 1536, 3072] {
            assert!(super::super::region_fits(mib), "{mib}");
        }
        for mib in [0, 1, 8, 100, 2048, 4096] {
            assert!(!super::super::region_fits(mib), "{mib}");
        }
    }
}
