// SPDX-License-Identifier: GPL-2.0
//! A Linux guest across a host live update, in three host kernels:
//!
//! 1. boot the guest (bzImage, initramfs, RAM in guest_memfds, 2 vCPUs, in-kernel irqchip and
//!    PIT, a 16550 console) and let it work; stop the vCPUs, save the whole VM state, preserve
//!    the VM, its guest_memfds and the state in a LUO session; the host kexecs;
//! 2. retrieve everything, rebuild the VM's devices and vCPUs from the state, resume, and check
//!    that the guest went on: its heartbeat and clock continue, its memory checksums verify,
//!    its console answers, and it complains about nothing; then a bare kexec;
//! 3. how long that bare kexec took, next to the guest's blackout. (The bare kexec boots a
//!    smaller initramfs than the live update's, which makes the ratio err on the high side.)

use crate::boot;
use crate::devices::{Console, ConsoleOut, IrqTrigger, PortIo, UartState, COM1_IRQ};
use crate::state::{self, VcpuState, VmState};
use crate::{fail, hold_and_exit, rdtsc, say, tsc_hz};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region2, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use kvm_luo_agent::protocol::{FromAgent, VmmState};
use kvm_luo_agent::Client;
use liveupdate::{Device, Session, SessionName};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

const SESSION: &str = "kvm-luo-vmm-linux";
const TOKEN_VM: u64 = 1;
const TOKEN_STATE: u64 = 2;
const TOKEN_RAM: u64 = 16;
/// Guest RAM comes in guest_memfds of at most this size, one memslot each.
const REGION: u64 = 128 << 20;
const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
const MAGIC: &str = "kvm-luo-vmm linux guest v1";
const NEXT_ARGS: &str = "/tmp/klu-next-args";

/// How long finishing the previous kernel's session may wait for the handlers (guest memory is
/// put back in the background after retrieve).
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);
/// What in the guest's console after resume means it is not well.
const TROUBLE: &[&str] = &[
    "Oops",
    "BUG:",
    "WARNING:",
    "Kernel panic",
    "soft lockup",
    "hard LOCKUP",
    "rcu_sched detected stall",
    "rcu: INFO",
    "blocked for more than",
    "CORRUPT",
    "FAILED",
];
/// What in the guest's console after resume means it started again instead of going on, or
/// that its clocks did not take the pause well (at boot, the kernel names its clocksources).
const AFTER_RESUME: &[&str] = &["Linux version", "GUEST: init", "clocksource", "unstable"];

/// How the VMM runs the guest.
pub struct Opts {
    pub kernel: String,
    pub initrd: String,
    pub mem_mib: u64,
    pub vcpus: u8,
}

impl Opts {
    fn cmdline(&self) -> String {
        // Most of the RAM for the work; the rest for the kernel and the initramfs.
        let work_mib = self.mem_mib.saturating_sub(96).max(16);
        format!(
            "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 nokaslr tsc=reliable \
             8250.nr_uarts=1 work_mib={work_mib}"
        )
    }
}

/// Where the guest's work was when it was paused.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Progress {
    beat: u64,
    mono: f64,
    generations: Vec<u64>,
}

impl Progress {
    /// Reads the heartbeat and the generations out of console lines.
    fn scan(lines: &[String], vcpus: usize) -> Self {
        let mut p = Self {
            generations: vec![0; vcpus],
            ..Default::default()
        };
        for line in lines {
            let mut w = line.split_whitespace();
            match (w.next(), w.next(), w.next(), w.next(), w.next()) {
                (Some("WORK:"), Some("beat"), Some(n), Some("at"), Some(t)) => {
                    if let (Ok(n), Ok(t)) = (n.parse(), t.parse()) {
                        p.beat = n;
                        p.mono = t;
                    }
                }
                (Some("WORK:"), Some("cpu"), Some(c), Some("generation"), Some(g)) => {
                    let g = g.trim_end_matches(':');
                    if let (Ok(c), Ok(g)) = (c.parse::<usize>(), g.parse()) {
                        if c < vcpus {
                            p.generations[c] = g;
                        }
                    }
                }
                _ => {}
            }
        }
        p
    }
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

/// What stage 2 hands to stage 3, in a preserved memfd.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    magic: String,
    mem_mib: u64,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    uart: UartState,
    /// What the guest had written of its current console line.
    console_line: Vec<u8>,
    progress: Progress,
    stamps: Stamps,
}

fn os(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

fn check<T>(what: &str, r: io::Result<T>) -> T {
    r.unwrap_or_else(|e| fail(format!("{what}: {e}")))
}

fn ms(ticks: u64, hz: u64) -> f64 {
    ticks as f64 * 1e3 / hz as f64
}

/// The guest's heartbeat period, in seconds (its workload, guest/work.c, sleeps 250 ms between beats).
const BEAT_SECS: f64 = 0.25;

/// A VM with its RAM, its console and its port I/O.
struct Machine {
    vm: VmFd,
    ram: Vec<File>,
    mem: GuestMemoryMmap,
    io: Arc<PortIo>,
    console: Arc<Console>,
    /// The UART's interrupt, as registered with KVM.
    irq: EventFd,
}

impl Machine {
    /// Maps the guest_memfds `ram` as guest RAM from address 0, one memslot each.
    fn map_ram(vm: &VmFd, ram: &[File]) -> io::Result<GuestMemoryMmap> {
        let mut ranges = Vec::new();
        for (i, f) in ram.iter().enumerate() {
            let size = f.metadata()?.len();
            ranges.push((
                GuestAddress(i as u64 * REGION),
                size as usize,
                Some(FileOffset::new(f.try_clone()?, 0)),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(&ranges)
            .map_err(|e| io::Error::other(format!("mapping guest RAM: {e}")))?;
        for (i, f) in ram.iter().enumerate() {
            let gpa = i as u64 * REGION;
            let host = mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|e| io::Error::other(format!("guest RAM: {e}")))?;
            let region = kvm_userspace_memory_region2 {
                slot: i as u32,
                flags: KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: gpa,
                memory_size: f.metadata()?.len(),
                userspace_addr: host as u64,
                guest_memfd_offset: 0,
                guest_memfd: f.as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: The region is a mapping `mem` owns; the VMM runs vCPUs only while `mem` exists.
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
}

/// Running vCPU threads. Stopping them gives back each vCPU with its saved state.
struct Running {
    threads: Vec<JoinHandle<io::Result<(VcpuFd, VcpuState)>>>,
    ctl: Arc<VcpuCtl>,
}

/// What the vCPU threads share with each other and with the VMM.
struct VcpuCtl {
    io: Arc<PortIo>,
    msrs: Arc<Vec<u32>>,
    stop: AtomicBool,
    /// A vCPU left its run loop on an error.
    failed: AtomicBool,
    /// vCPUs out of `KVM_RUN` for good, with no I/O pending.
    stopped: AtomicUsize,
    /// Passed once nothing can inject an interrupt any more: the vCPUs may save their state.
    may_save: Barrier,
    /// TSC at the first `KVM_RUN`.
    first_entry: AtomicU64,
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

fn run_vcpu(id: usize, mut vcpu: VcpuFd, ctl: &VcpuCtl) -> io::Result<(VcpuFd, VcpuState)> {
    let _ = ctl
        .first_entry
        .compare_exchange(0, rdtsc(), Ordering::SeqCst, Ordering::SeqCst);
    let mut result = Ok(());
    while result.is_ok() && !ctl.stop.load(Ordering::Acquire) {
        result = match vcpu.run() {
            Ok(exit) => handle_exit(id, &ctl.io, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(io::Error::other(format!("vCPU {id}: KVM_RUN: {e}"))),
        };
    }
    if let Err(e) = &result {
        say(format!("vCPU {id} stopped: {e}"));
        // Where it was, for the post-mortem (a triple fault says little else).
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
        ctl.failed.store(true, Ordering::Release);
    }
    // Let KVM complete an I/O instruction the last exit left pending, without entering the
    // guest (a string instruction may need several rounds): the state saved below is then
    // between two instructions.
    vcpu.set_kvm_immediate_exit(1);
    while result.is_ok() {
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => break,
            Ok(exit) => result = handle_exit(id, &ctl.io, exit),
            Err(e) => result = Err(io::Error::other(format!("vCPU {id}: last KVM_RUN: {e}"))),
        }
    }
    vcpu.set_kvm_immediate_exit(0);
    // Save only once no vCPU runs and nothing injects interrupts any more: an IPI from another
    // vCPU, or the UART's irqfd, would otherwise land after this vCPU's LAPIC was saved.
    ctl.stopped.fetch_add(1, Ordering::AcqRel);
    ctl.may_save.wait();
    result?;
    let state = VcpuState::save(&vcpu, &ctl.msrs)?;
    Ok((vcpu, state))
}

impl Running {
    fn start(vcpus: Vec<VcpuFd>, io: &Arc<PortIo>, msrs: &Arc<Vec<u32>>) -> io::Result<Self> {
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| io::Error::other(format!("signal handler: {e}")))?;
        let ctl = Arc::new(VcpuCtl {
            io: io.clone(),
            msrs: msrs.clone(),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            stopped: AtomicUsize::new(0),
            may_save: Barrier::new(vcpus.len() + 1),
            first_entry: AtomicU64::new(0),
        });
        let threads = vcpus
            .into_iter()
            .enumerate()
            .map(|(id, vcpu)| {
                let ctl = ctl.clone();
                std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || run_vcpu(id, vcpu, &ctl))
            })
            .collect::<io::Result<_>>()?;
        Ok(Self { threads, ctl })
    }

    /// Whether a vCPU left its run loop on an error.
    fn any_failed(&self) -> bool {
        self.ctl.failed.load(Ordering::Acquire)
    }

    /// TSC when the first vCPU entered the guest, once one has.
    fn first_entry(&self) -> u64 {
        self.ctl.first_entry.load(Ordering::SeqCst)
    }

    /// Stops every vCPU; once none runs, `quiesce` runs (to stop what injects interrupts),
    /// then each vCPU saves its state. Returns them with their states, in vCPU order.
    fn stop<T>(
        self,
        quiesce: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<(T, Vec<(VcpuFd, VcpuState)>)> {
        self.ctl.stop.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.ctl.stopped.load(Ordering::Acquire) < self.threads.len() {
            if std::time::Instant::now() > deadline {
                return Err(io::Error::other("a vCPU does not stop"));
            }
            for t in &self.threads {
                // A thread already waiting at the barrier just goes back to waiting.
                let _ = t.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let quiesced = quiesce();
        self.ctl.may_save.wait();
        let states = self
            .threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(io::Error::other("vCPU thread panicked")))
            })
            .collect::<io::Result<Vec<_>>>();
        Ok((quiesced?, states?))
    }
}

/// Stage 3 of 3: how long the bare kexec that stage 2 started took, next to the blackout.
pub fn bare_kexec_done() {
    let now = rdtsc();
    let (Some(start), Some(hz), Some(blackout_us)) = (
        kernel_arg("bare_tsc"),
        kernel_arg("tsc_hz"),
        kernel_arg("blackout_us"),
    ) else {
        fail("no klu.arg.bare_tsc, tsc_hz and blackout_us on the command line: run stage 2 first")
    };
    let bare = ms(now.saturating_sub(start), hz);
    let blackout = blackout_us as f64 / 1e3;
    say(format!(
        "[kernel 3] a bare kexec of the same kernel, nothing preserved, took {bare:.0} ms"
    ));
    say(format!(
        "blackout {blackout:.0} ms / bare kexec {bare:.0} ms = {:.2}",
        blackout / bare
    ));
}

/// A `klu.arg.NAME=` value from the kernel command line.
fn kernel_arg(name: &str) -> Option<u64> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    let key = format!("klu.arg.{name}=");
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()))
        .and_then(|v| v.parse().ok())
}

/// Waits for the guest's console to show what `what` describes, or fails.
fn wait_console(
    console: &Console,
    running: &Running,
    from: usize,
    secs: u64,
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let problem = loop {
        if console.wait_for(from, Duration::from_millis(500), &pred) {
            return;
        }
        if let Some(t) = console.since(from).iter().find(|l| trouble(l)) {
            break format!("the guest reports trouble: {t}");
        }
        if running.any_failed() {
            break format!("a vCPU stopped while waiting for {what}");
        }
        if std::time::Instant::now() >= deadline {
            break format!("no {what} from the guest in {secs} s");
        }
    };
    // What the guest said before the failure goes to the log first.
    std::thread::sleep(Duration::from_millis(500));
    console.flush();
    fail(problem)
}

fn trouble(line: &str) -> bool {
    TROUBLE.iter().any(|t| line.contains(t))
}

/// Both workers have verified generation `gen` or a later one.
fn generations_reached(lines: &[String], vcpus: usize, gen: &[u64]) -> bool {
    let p = Progress::scan(lines, vcpus);
    p.generations
        .iter()
        .zip(gen)
        .all(|(have, want)| have >= want)
}

/// Asks the guest's shell to answer, and waits for the answer.
fn ping(m: &Machine, running: &Running, n: u32) {
    let from = m.console.len();
    check("serial input", m.io.type_in(&format!("ping {n}\n")));
    let want = format!("GUEST: pong {n}");
    wait_console(
        &m.console,
        running,
        from,
        60,
        "answer on the serial console",
        |l| l.iter().any(|x| x.contains(&want)),
    );
}

/// A guest whose vCPUs run.
struct Guest {
    m: Machine,
    running: Running,
    msrs: Arc<Vec<u32>>,
    mem_mib: u64,
    /// Its last `ping`.
    pings: u32,
}

/// A guest whose vCPUs are stopped and whose state is saved.
struct Stopped {
    m: Machine,
    vcpus: Vec<VcpuFd>,
    msrs: Arc<Vec<u32>>,
    snapshot: Snapshot,
    pings: u32,
}

impl Guest {
    fn vcpus(&self) -> usize {
        self.running.threads.len()
    }

    fn ping(&mut self) {
        self.pings += 1;
        ping(&self.m, &self.running, self.pings);
    }

    /// Stops the vCPUs and saves the whole VM state.
    fn stop(self, hz: u64) -> Stopped {
        let Guest {
            m,
            running,
            msrs,
            mem_mib,
            pings,
        } = self;
        let n = running.threads.len();
        // From here the guest does not run until it is resumed.
        let kick = rdtsc();
        let (vm_state, stopped_vcpus) = check(
            "stopping the vCPUs and saving the VM",
            running.stop(|| {
                // Nothing raises the UART's interrupt after this (KVM waits for injections in
                // flight); then the VM-wide state.
                m.vm.unregister_irqfd(&m.irq, COM1_IRQ)
                    .map_err(os("KVM_IRQFD deassign"))?;
                VmState::save(&m.vm)
            }),
        );
        let stopped = rdtsc();
        let progress = Progress::scan(&m.console.since(0), n);
        let uart = UartState::save(&m.io.uart.lock().unwrap());
        let (vcpus, vcpu_states): (Vec<_>, Vec<_>) = stopped_vcpus.into_iter().unzip();
        let saved = rdtsc();
        let snapshot = Snapshot {
            magic: MAGIC.into(),
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
        };
        Stopped {
            m,
            vcpus,
            msrs,
            snapshot,
            pings,
        }
    }
}

/// Boots the guest and waits until it works on every vCPU and answers on its console.
fn boot(opts: &Opts, label: &str) -> Guest {
    let kvm = check("open /dev/kvm", Kvm::new().map_err(os("open /dev/kvm")));
    let vm = check(
        "KVM_CREATE_VM",
        kvm.create_vm().map_err(os("KVM_CREATE_VM")),
    );
    let mem_size = opts.mem_mib << 20;
    let mut ram = Vec::new();
    let mut gpa = 0;
    while gpa < mem_size {
        let size = REGION.min(mem_size - gpa);
        let fd = check(
            "KVM_CREATE_GUEST_MEMFD",
            vm.create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                ..Default::default()
            })
            .map_err(os("KVM_CREATE_GUEST_MEMFD")),
        );
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new fd that we now own.
        ram.push(unsafe { File::from_raw_fd(fd) });
        gpa += size;
    }
    let mem = check("guest RAM", Machine::map_ram(&vm, &ram));
    check("irqchip and PIT", state::create_irqchip_and_pit(&vm));
    check("XSAVE size", state::check_xsave_fits(&vm));
    let (io, console, irq) = check("devices", Machine::devices(&vm, None, Vec::new()));
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
    );
    let supported = check(
        "KVM_GET_SUPPORTED_CPUID",
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(os("KVM_GET_SUPPORTED_CPUID")),
    );
    let mut vcpus = Vec::new();
    for id in 0..opts.vcpus {
        let vcpu = check(
            "KVM_CREATE_VCPU",
            vm.create_vcpu(u64::from(id)).map_err(os("KVM_CREATE_VCPU")),
        );
        check(
            "KVM_SET_CPUID2",
            vcpu.set_cpuid2(&boot::vcpu_cpuid(&supported, id, opts.vcpus))
                .map_err(os("KVM_SET_CPUID2")),
        );
        check("LAPIC LINT", boot::setup_lint(&vcpu));
        if id == 0 {
            check("boot vCPU", boot::setup_boot_vcpu(&vcpu, entry));
        }
        vcpus.push(vcpu);
    }
    let msrs = Arc::new(check("MSR list", state::msr_indices(&kvm)));
    let m = Machine {
        vm,
        ram,
        mem,
        io,
        console,
        irq,
    };
    say(format!(
        "{label}booting Linux: {} MiB of RAM in {} guest_memfds, {} vCPUs, {} MSRs saved per vCPU",
        opts.mem_mib,
        m.ram.len(),
        opts.vcpus,
        msrs.len()
    ));
    let t0 = std::time::Instant::now();
    let running = check("vCPU threads", Running::start(vcpus, &m.io, &msrs));
    let n = usize::from(opts.vcpus);
    wait_console(&m.console, &running, 0, 900, "work", |l| {
        generations_reached(l, n, &vec![1; n]) && Progress::scan(l, n).beat >= 4
    });
    say(format!(
        "{label}the guest booted and its work verified a generation on every vCPU ({:.1} s)",
        t0.elapsed().as_secs_f64()
    ));
    let mut g = Guest {
        m,
        running,
        msrs,
        mem_mib: opts.mem_mib,
        pings: 0,
    };
    g.ping();
    say(format!("{label}the guest's console answers"));
    g
}

impl Stopped {
    /// Preserves the VM, its guest_memfds and its state in `session`; returns the memfd that
    /// holds the state.
    fn preserve(&mut self, session: &Session) -> io::Result<File> {
        let lu = |what: &'static str| {
            move |e: liveupdate::Error| io::Error::other(format!("{what}: {e}"))
        };
        // SAFETY: The VM fd stays open while `self.m.vm` lives, beyond this borrow.
        let vm = unsafe { BorrowedFd::borrow_raw(self.m.vm.as_raw_fd()) };
        session
            .preserve(&vm, TOKEN_VM)
            .map_err(lu("preserving the VM"))?;
        for (i, f) in self.m.ram.iter().enumerate() {
            session
                .preserve(f, TOKEN_RAM + i as u64)
                .map_err(lu("preserving a guest_memfd"))?;
        }
        self.snapshot.stamps.preserved = rdtsc();
        let state_fd = write_snapshot(&self.snapshot)?;
        session
            .preserve(&state_fd, TOKEN_STATE)
            .map_err(lu("preserving the state"))?;
        Ok(state_fd)
    }

    /// Runs the guest again from the state it was saved in, on the same host kernel (the
    /// update did not happen). Restoring that state hides the pause from the guest, as the
    /// new kernel's restore does.
    fn go_on(self, label: &str) -> Guest {
        let Stopped {
            m,
            vcpus,
            msrs,
            snapshot: s,
            pings,
        } = self;
        for (vcpu, state) in vcpus.iter().zip(&s.vcpus) {
            check("restoring a vCPU", state.restore(&m.vm, vcpu));
        }
        check("restoring the irqchip and PIT", s.vm.restore_devices(&m.vm));
        check(
            "KVM_IRQFD",
            m.vm.register_irqfd(&m.irq, COM1_IRQ)
                .map_err(os("KVM_IRQFD")),
        );
        check("restoring the clock", s.vm.restore_clock(&m.vm));
        kvmclock_paused(&vcpus);
        let from = m.console.len();
        let running = check("vCPU threads", Running::start(vcpus, &m.io, &msrs));
        let mut g = Guest {
            m,
            running,
            msrs,
            mem_mib: s.mem_mib,
            pings,
        };
        g.check_went_on(&s, from, label);
        g
    }
}

/// Tells the guest it was paused, so that its watchdogs do not take the pause for a lockup.
/// Only a guest that set up kvmclock has anything to tell.
fn kvmclock_paused(vcpus: &[VcpuFd]) {
    for vcpu in vcpus {
        if let Err(e) = vcpu.kvmclock_ctrl() {
            if e.errno() != libc::EINVAL {
                fail(format!("KVM_KVMCLOCK_CTRL: {e}"));
            }
        }
    }
}

/// When the steps of a restore ended (TSC).
struct Restored {
    start: u64,
    retrieved: u64,
    restored: u64,
}

/// Retrieves a guest from `session` and runs it again.
fn restore(session: &Session, label: &str) -> (Guest, Snapshot, Restored) {
    let start = rdtsc();
    let retrieve = |token: u64, what: &str| -> OwnedFd {
        session
            .retrieve(token)
            .unwrap_or_else(|e| fail(format!("retrieve {what}: {e}")))
    };
    let s = check(
        "read the state",
        read_snapshot(retrieve(TOKEN_STATE, "state")),
    );
    let regions = s.mem_mib.div_ceil(REGION >> 20);
    // The first guest_memfd before its VM, the others after it: any order works.
    let mut ram = vec![File::from(retrieve(TOKEN_RAM, "guest_memfd 0"))];
    let vm_fd = retrieve(TOKEN_VM, "VM");
    for i in 1..regions {
        ram.push(File::from(retrieve(TOKEN_RAM + i, "guest_memfd")));
    }
    let retrieved = rdtsc();

    let kvm = check("open /dev/kvm", Kvm::new().map_err(os("open /dev/kvm")));
    // SAFETY: `vm_fd` is a VM fd retrieved from LUO, owned by the new `VmFd`.
    let vm = check(
        "adopt the VM",
        unsafe { kvm.create_vmfd_from_rawfd(vm_fd.into_raw_fd()) }.map_err(os("VM fd")),
    );
    let mem = check("guest RAM", Machine::map_ram(&vm, &ram));
    // The irqchip and PIT must exist before the vCPUs; their state goes in once the vCPUs
    // are there to take what they replay; the clock last.
    check("irqchip and PIT", state::create_irqchip_and_pit(&vm));
    let mut vcpus = Vec::new();
    for (id, state) in s.vcpus.iter().enumerate() {
        let vcpu = check(
            "KVM_CREATE_VCPU",
            vm.create_vcpu(id as u64).map_err(os("KVM_CREATE_VCPU")),
        );
        check("restoring a vCPU", state.restore(&vm, &vcpu));
        vcpus.push(vcpu);
    }
    check("restoring the irqchip and PIT", s.vm.restore_devices(&vm));
    let (io, console, irq) = check(
        "devices",
        Machine::devices(&vm, Some(&s.uart), s.console_line.clone()),
    );
    check("restoring the clock", s.vm.restore_clock(&vm));
    kvmclock_paused(&vcpus);
    let msrs = Arc::new(check("MSR list", state::msr_indices(&kvm)));
    let m = Machine {
        vm,
        ram,
        mem,
        io,
        console,
        irq,
    };
    let restored = rdtsc();
    say(format!(
        "{label}retrieved the VM, {} guest_memfds and the state; restored {} vCPUs \
         (regs, sregs, XSAVE, XCRs, {} MSRs, LAPIC, MP state, events, debug registers), \
         PIC, IOAPIC, PIT, kvmclock and the UART",
        m.ram.len(),
        s.vcpus.len(),
        s.vcpus.first().map_or(0, |v| v.msrs.as_slice().len())
    ));
    let running = check("vCPU threads", Running::start(vcpus, &m.io, &msrs));
    let g = Guest {
        m,
        running,
        msrs,
        mem_mib: s.mem_mib,
        // The guest answered one ping before it was saved.
        pings: 1,
    };
    (
        g,
        s,
        Restored {
            start,
            retrieved,
            restored,
        },
    )
}

impl Guest {
    /// Checks that the guest, resumed from snapshot `s`, went on: its console lines from `from`
    /// on show the next heartbeat with a clock that hid the pause, two more verified
    /// generations on every vCPU, an answer on the console, and no complaint for 5 s.
    fn check_went_on(&mut self, s: &Snapshot, from: usize, label: &str) {
        // How long the guest was stopped (the TSC goes on across a kexec): its clock may move
        // by a beat and half of that at most, so a pause it saw (a beat and all of the pause)
        // always fails.
        let paused = ms(crate::rdtsc().saturating_sub(s.stamps.stopped), s.stamps.hz) / 1e3;
        let max_gap = crate::clock_gap().min(BEAT_SECS + paused / 2.0);
        let p0 = &s.progress;
        let n = self.vcpus();
        let (console, running) = (&self.m.console, &self.running);
        // The heartbeat goes on from where it was: the next beat, not a reboot's first.
        wait_console(console, running, from, 120, "heartbeat", |l| {
            Progress::scan(l, n).beat > p0.beat
        });
        let first_beat = console
            .since(from)
            .iter()
            .find_map(|l| {
                let p = Progress::scan(std::slice::from_ref(l), n);
                (p.beat != 0).then_some(p)
            })
            .unwrap_or_default();
        // The next beat, or the one after if a kernel message garbled the next one's line; a
        // guest that started again counts from 1.
        if !(p0.beat + 1..=p0.beat + 2).contains(&first_beat.beat) {
            fail(format!(
                "the heartbeat went from {} to {}: the guest did not simply go on",
                p0.beat, first_beat.beat
            ));
        }
        // Beats are 0.25 s apart; the restored clock hides the pause, so the gap is a beat
        // plus however long the vCPU waited for a host CPU.
        let gap = first_beat.mono - p0.mono;
        if !(0.0..max_gap).contains(&gap) {
            fail(format!(
                "the guest's clock jumped by {gap:.3} s across a pause of {paused:.1} s \
                 (at most {max_gap:.3} s allowed)"
            ));
        }
        say(format!(
            "{label}the guest went on: heartbeat {} -> {}, its clock {:.3} -> {:.3} s",
            p0.beat, first_beat.beat, p0.mono, first_beat.mono
        ));
        // Two more generations on every vCPU: the one the pause interrupted, whose check reads
        // what was written before the pause, and a whole one after.
        let want: Vec<u64> = p0.generations.iter().map(|g| g + 2).collect();
        wait_console(console, running, from, 900, "verified generations", |l| {
            generations_reached(l, n, &want)
        });
        say(format!(
            "{label}its memory checks verify: generations {:?} -> {:?}",
            p0.generations, want
        ));
        self.ping();
        say(format!("{label}its console answers"));
        let (console, quiet_from) = (&self.m.console, self.m.console.len());
        std::thread::sleep(Duration::from_secs(5));
        if let Some(t) = console.since(quiet_from).iter().find(|l| trouble(l)) {
            fail(format!("the guest reports trouble: {t}"));
        }
        if let Some(t) = console
            .since(from)
            .iter()
            .find(|l| trouble(l) || AFTER_RESUME.iter().any(|r| l.contains(r)))
        {
            fail(format!("after resume, the guest's console has: {t}"));
        }
        say(format!(
            "{label}nothing in the guest's console about lockups, stalls, clocks or oopses"
        ));
    }
}

/// Stage 1 of 3: boot the guest, let it work, stop it and preserve it.
pub fn boot_and_preserve(opts: &Opts) {
    let hz = tsc_hz();
    let g = boot(opts, "[kernel 1] ");
    let mut s = g.stop(hz);
    let name = SessionName::new(SESSION).expect("a valid name");
    let luo = check(
        "open /dev/liveupdate",
        Device::open().map_err(io::Error::from),
    );
    let session = check(
        "create session",
        luo.create_session(&name).map_err(io::Error::from),
    );
    let state_fd = check("preserving", s.preserve(&session));
    let p = &s.snapshot.progress;
    say(format!(
        "[kernel 1] paused at heartbeat {} (guest clock {:.3} s), generations {:?}; \
         preserved the VM, {} guest_memfds and its state; kexec",
        p.beat,
        p.mono,
        p.generations,
        s.m.ram.len()
    ));
    s.m.console.flush();
    let Stopped { m, vcpus, .. } = s;
    drop(vcpus);
    let Machine { vm, ram, mem, .. } = m;
    // No vCPU runs any more: the mapping can go.
    drop(mem);
    let mut keep: Vec<Box<dyn std::any::Any>> = vec![Box::new(vm), Box::new(state_fd)];
    keep.extend(
        ram.into_iter()
            .map(|f| Box::new(f) as Box<dyn std::any::Any>),
    );
    hold_and_exit(luo, session, keep);
}

fn write_snapshot(s: &Snapshot) -> io::Result<File> {
    let json = serde_json::to_vec(s).map_err(io::Error::other)?;
    // SAFETY: memfd_create with a valid name.
    let fd = unsafe { libc::memfd_create(c"vm-state".as_ptr(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and ours.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(&json)?;
    Ok(f)
}

fn read_snapshot(fd: OwnedFd) -> io::Result<Snapshot> {
    let mut f = File::from(fd);
    let mut json = Vec::new();
    f.rewind()?;
    f.read_to_end(&mut json)?;
    let s: Snapshot = serde_json::from_slice(&json).map_err(io::Error::other)?;
    if s.magic != MAGIC {
        return Err(io::Error::other("not a state this VMM saved"));
    }
    Ok(s)
}

/// Stage 2 of 3: retrieve, restore, resume and check; then leave what stage 3 needs to time
/// a bare kexec.
pub fn resume() {
    let name = SessionName::new(SESSION).expect("a valid name");
    let luo = check(
        "open /dev/liveupdate",
        Device::open().map_err(io::Error::from),
    );
    let session = check(
        "retrieve session",
        luo.retrieve_session(&name).map_err(io::Error::from),
    );
    let (mut g, s, t) = restore(&session, "[kernel 2] ");
    g.check_went_on(&s, 0, "[kernel 2] ");
    let resumed = g.running.first_entry();
    check("stopping the guest", g.running.stop(|| Ok(())).map(|_| ()));
    g.m.console.flush();
    check(
        "finish",
        session
            .finish_waiting(FINISH_TIMEOUT)
            .map_err(io::Error::from),
    );

    let st = s.stamps;
    let hz = st.hz;
    let blackout = ms(resumed.saturating_sub(st.kick), hz);
    say(format!(
        "blackout {blackout:.0} ms (TSC, guest's last instruction in the old kernel to its first in the new):"
    ));
    for (what, ms_) in [
        ("stop + save", ms(st.saved - st.kick, hz)),
        ("preserve", ms(st.preserved - st.saved, hz)),
        (
            "freeze + kexec + boot to init",
            ms(t.start.saturating_sub(st.preserved), hz),
        ),
        ("retrieve", ms(t.retrieved - t.start, hz)),
        ("restore", ms(t.restored - t.retrieved, hz)),
        ("resume", ms(resumed.saturating_sub(t.restored), hz)),
    ] {
        say(format!("  {what:<32} {ms_:>8.1} ms"));
    }
    let args = format!(
        "klu.arg.blackout_us={} klu.arg.bare_tsc={} klu.arg.tsc_hz={hz}\n",
        (blackout * 1e3) as u64,
        rdtsc(),
    );
    check(
        "write the next kernel's arguments",
        std::fs::write(NEXT_ARGS, args),
    );
    say("PASS: the Linux guest kept running across the host kernel live update");
}

/// How a VMM under the agent behaves.
pub struct AgentOpts {
    /// The agent's socket.
    pub socket: std::path::PathBuf,
    /// The session's name, one per VM.
    pub name: SessionName,
    /// Test hook: never answer the agent's prepare (a VMM that does not become ready).
    pub never_ready: bool,
}

/// Connects to the agent and gets this VM's session. Waits as long as it takes: agent
/// trouble never stops a guest.
fn agent_session(a: &AgentOpts) -> (Client, Session, bool) {
    let mut wait = Duration::from_millis(200);
    let mut tries = 0u32;
    loop {
        let got = Client::connect(&a.socket).and_then(|c| {
            let (s, retrieved) = c.session(&a.name)?;
            Ok((c, s, retrieved))
        });
        match got {
            Ok(x) => return x,
            Err(e) => {
                if tries.is_multiple_of(10) {
                    say(format!("waiting for a session from the agent: {e}"));
                }
                tries += 1;
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn tell(client: &Client, state: VmmState, detail: impl Into<String>) {
    if let Err(e) = client.report(state, detail) {
        say(format!("telling the agent: {e}"));
    }
}

/// What came from the agent.
enum Heard {
    Event(FromAgent),
    /// The agent closed the connection: it is gone.
    Gone,
    /// The connection failed otherwise; this side cut it.
    Broken,
}

/// The agent's next event. Messages this VMM does not understand are skipped.
fn next_event(client: &Client) -> Heard {
    loop {
        match client.next_event() {
            Ok(Some(FromAgent::Unknown)) => {}
            Ok(Some(m)) => return Heard::Event(m),
            Ok(None) => return Heard::Gone,
            Err(kvm_luo_agent::Error::Io(e)) if e.kind() == io::ErrorKind::InvalidData => {
                say(format!("skipping a message from the agent: {e}"));
            }
            Err(kvm_luo_agent::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                say(format!("from the agent: {e}; disconnecting"));
                client.disconnect();
                return Heard::Broken;
            }
        }
    }
}

/// After the connection to the agent ended while this VMM was ready: waits while an update
/// that may still carry its session is armed or under way (an agent that lost a VMM refuses
/// to commit, but one already committing kexecs), and returns once none is, or no agent
/// answers. The guest must not run again before.
fn wait_update_off(a: &AgentOpts) {
    loop {
        match Client::connect(&a.socket).and_then(|c| c.status()) {
            Ok(s) if s.phase == "armed" || s.phase == "committing" => {
                say(format!(
                    "the update is {}: the guest stays stopped",
                    s.phase
                ));
                std::thread::sleep(Duration::from_secs(1));
            }
            _ => return,
        }
    }
}

/// After this VMM closed its session: tell the agent and get a new one, from a new
/// connection (or a new agent) if that fails.
fn renew(client: Client, a: &AgentOpts) -> (Client, Session) {
    let again = client.release().and_then(|()| client.session(&a.name));
    match again {
        Ok((session, _)) => (client, session),
        Err(e) => {
            say(format!("a new session: {e}; connecting again"));
            // The agent must see this connection go, or it keeps the name for it.
            client.disconnect();
            drop(client);
            let (c, s, _) = agent_session(a);
            (c, s)
        }
    }
}

/// A VMM under `kvm-luo-agent`: gets its session from the agent; if it came from the previous
/// kernel, resumes the guest from it, otherwise boots the guest; then does what the agent
/// says: prepare (stop, save, preserve, say ready: the host may kexec), or abort (close the
/// session, get a new one, and run the guest again from where it stopped). If the agent goes
/// away, the guest goes on and the VMM waits for an agent again. Returns only on failure.
pub fn serve(opts: &Opts, a: &AgentOpts) {
    let hz = tsc_hz();
    let (mut client, mut session, retrieved) = agent_session(a);
    let mut guest = if retrieved {
        tell(
            &client,
            VmmState::Starting,
            "restoring its guest from the previous kernel",
        );
        let (mut g, snap, _) = restore(&session, "");
        g.check_went_on(&snap, 0, "");
        // A handler may not be done yet (EBUSY): finish is retried.
        if let Err(e) = session.finish_waiting(FINISH_TIMEOUT) {
            fail(format!("finish: {e}"));
        }
        // The next update needs a session of this kernel.
        drop(session);
        (client, session) = renew(client, a);
        say("finished the previous kernel's session; a new one for the next update");
        tell(
            &client,
            VmmState::Resumed,
            "guest resumed after the live update, checks pass",
        );
        g
    } else {
        tell(&client, VmmState::Starting, "booting its guest");
        let g = boot(opts, "");
        tell(&client, VmmState::Running, "guest booted, checks pass");
        g
    };
    loop {
        match next_event(&client) {
            Heard::Event(FromAgent::Prepare) if a.never_ready => {
                say("the agent asks to prepare; this VMM never answers (--never-ready)");
            }
            Heard::Event(FromAgent::Prepare) => {
                tell(
                    &client,
                    VmmState::Preparing,
                    "stopping and preserving its guest",
                );
                let mut stopped = guest.stop(hz);
                let state_fd = match stopped.preserve(&session) {
                    Ok(f) => {
                        let p = &stopped.snapshot.progress;
                        say(format!(
                            "paused at heartbeat {} (guest clock {:.3} s), generations {:?}; \
                             preserved the VM, {} guest_memfds and its state; ready",
                            p.beat,
                            p.mono,
                            p.generations,
                            stopped.m.ram.len()
                        ));
                        stopped.m.console.flush();
                        tell(&client, VmmState::Ready, "everything preserved");
                        let _ = client.ready(Ok(()));
                        Some(f)
                    }
                    Err(e) => {
                        say(format!("cannot be updated: {e}"));
                        let _ = client.ready(Err(e.to_string()));
                        None
                    }
                };
                // The guest stays stopped until the kexec, or until the update is off.
                let (reason, agent_there) = loop {
                    match next_event(&client) {
                        Heard::Event(FromAgent::Abort { reason }) => break (reason, true),
                        Heard::Event(m) => say(format!("ignoring a message from the agent: {m:?}")),
                        Heard::Gone | Heard::Broken => {
                            wait_update_off(a);
                            break ("the connection to the agent ended".to_string(), false);
                        }
                    }
                };
                say(format!(
                    "the update is off ({reason}): closing the session, the guest goes on"
                ));
                // Closing the session (the agent closed its copy) unpreserves everything in it.
                drop(state_fd);
                drop(session);
                if agent_there {
                    // A session for the next update first, then the guest.
                    (client, session) = renew(client, a);
                    guest = stopped.go_on("");
                } else {
                    // The guest first: it does not wait for an agent.
                    client.disconnect();
                    guest = stopped.go_on("");
                    let (c, s, _) = agent_session(a);
                    (client, session) = (c, s);
                }
                tell(
                    &client,
                    VmmState::Continued,
                    "guest went on after the update was off, checks pass",
                );
            }
            Heard::Event(FromAgent::Abort { reason }) => {
                say(format!(
                    "the update is off ({reason}); the guest was not stopped"
                ));
                drop(session);
                (client, session) = renew(client, a);
                tell(
                    &client,
                    VmmState::Continued,
                    "the update was off before this VMM prepared; the guest runs on",
                );
            }
            Heard::Event(m) => say(format!("ignoring a message from the agent: {m:?}")),
            Heard::Gone | Heard::Broken => {
                say("the agent went away (restarted?): the guest goes on; waiting for an agent");
                client.disconnect();
                drop(client);
                drop(session);
                let (c, s, _) = agent_session(a);
                (client, session) = (c, s);
                tell(&client, VmmState::Running, "guest runs, checks passed");
            }
        }
        if guest.running.any_failed() {
            fail("a vCPU stopped");
        }
    }
}
