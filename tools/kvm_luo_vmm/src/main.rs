// SPDX-License-Identifier: GPL-2.0
//! A tiny VMM whose guest keeps running across a host kernel live update.
//!
//! Stage 1 (old kernel): start a VM whose RAM is a guest_memfd, load a guest that counts and
//! keeps a running checksum of its count in its own memory, run it, pause it at an exit,
//! save its registers in a memfd, preserve the VM, the guest_memfd and the memfd in a LUO
//! session, and leave a child holding the session while the host kexecs.
//!
//! Stage 2 (new kernel): retrieve the files, rebuild the memslot and the vCPU from the saved
//! state, resume the guest, and check that its work continued from where it stopped.

mod boot;
mod devices;
mod linux;
mod state;

use kvm_bindings::{
    kvm_create_guest_memfd, kvm_regs, kvm_sregs, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use liveupdate::{Device, Session, SessionName};
use std::io::{self, Error};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::exit;
use std::time::{Duration, Instant};

const SESSION: &str = "kvm-luo-vmm";
const TOKEN_VM: u64 = 1;
const TOKEN_RAM: u64 = 2;
const TOKEN_STATE: u64 = 3;

const RAM_SIZE: u64 = 2 << 20;
const CODE_GPA: u64 = 0x1000;
const COUNTER_GPA: usize = 0x8000;
const CHECKSUM_GPA: usize = 0x8004;
/// The guest exits to the VMM every this many iterations.
const EXIT_EVERY: u32 = 0x10000;
const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// 16-bit real-mode guest: forever { counter += 1; checksum = checksum * 31 + counter;
/// every 65536 iterations, out 0x10 }.
const GUEST: &[u8] = &[
    0x66, 0xff, 0x06, 0x00, 0x80, // inc dword [0x8000]
    0x66, 0xa1, 0x00, 0x80, // mov eax, [0x8000]
    0x66, 0x8b, 0x1e, 0x04, 0x80, // mov ebx, [0x8004]
    0x66, 0x6b, 0xdb, 0x1f, // imul ebx, ebx, 31
    0x66, 0x01, 0xc3, // add ebx, eax
    0x66, 0x89, 0x1e, 0x04, 0x80, // mov [0x8004], ebx
    0x66, 0xa9, 0xff, 0xff, 0x00, 0x00, // test eax, 0xffff
    0x75, 0xde, // jnz start
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xda, // jmp start
];

/// What stage 1 hands to stage 2, in a preserved memfd.
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
struct SavedState {
    magic: u64,
    regs: kvm_regs,
    sregs: kvm_sregs,
    counter: u32,
    checksum: u32,
    ram_checksum: u64,
    tsc_paused: u64,
    tsc_hz: u64,
}

const MAGIC: u64 = 0x4b4c_5556_4d4d_3031; // "KLUVMM01"

/// The VM's name under the agent, if any: it goes into every line the VMM prints.
static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--clock-gap`: how far, in seconds, a resumed guest's clock may move between its last
/// heartbeat before the pause and its first after (and never more than a beat and half the
/// pause).
static CLOCK_GAP: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
const DEFAULT_CLOCK_GAP: f64 = 1.0;

fn clock_gap() -> f64 {
    CLOCK_GAP.get().copied().unwrap_or(DEFAULT_CLOCK_GAP)
}

/// `" NAME"` under the agent, nothing otherwise.
fn name_suffix() -> String {
    NAME.get().map(|n| format!(" {n}")).unwrap_or_default()
}

/// Prints a line on standard output. A write that fails (the terminal or pipe that started the
/// VMM went away) is dropped: the guest does not depend on anyone reading.
fn out_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn say(msg: impl AsRef<str>) {
    out_line(format_args!("vmm{}: {}", name_suffix(), msg.as_ref()));
}

fn fail(msg: impl AsRef<str>) -> ! {
    out_line(format_args!(
        "vmm{}: FAILED: {}",
        name_suffix(),
        msg.as_ref()
    ));
    exit(1)
}

fn check<T>(what: &str, r: Result<T, impl std::fmt::Display>) -> T {
    r.unwrap_or_else(|e| fail(format!("{what}: {e}")))
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Writes the TSC into the kernel log, as `kvm-luo-vmm: tsc T EVENT`: the log's own timestamp
/// of that line (`printk.time=1` shows it) places the kernel's timestamps on the TSC, on which
/// the VMM measures the blackout. `build/bench.sh` splits the kexec into phases with it. Best
/// effort: without `/dev/kmsg`, nothing is written.
fn mark_tsc(event: &str) {
    use std::io::Write;
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        // One write, one line of the log.
        let _ = kmsg.write_all(format!("kvm-luo-vmm: tsc {} {event}", rdtsc()).as_bytes());
    }
}

/// The kernel log from a point on (`/dev/kmsg`), to read what the kernel said during a step.
struct KernelLog(std::fs::File);

impl KernelLog {
    /// From now on.
    fn from_now() -> io::Result<Self> {
        use std::io::Seek;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        f.seek(io::SeekFrom::End(0))?;
        Ok(Self(f))
    }

    /// The messages logged since, up to now, that contain `what`.
    fn lines_with(&mut self, what: &str) -> Vec<String> {
        use std::io::Read;
        let mut found = Vec::new();
        let mut record = vec![0u8; 8192];
        loop {
            // One record per read: "level,seq,time,flags;message", then its dictionary.
            match self.0.read(&mut record) {
                Ok(0) => break,
                Ok(n) => {
                    let text = String::from_utf8_lossy(&record[..n]);
                    let first = text.lines().next().unwrap_or_default();
                    let message = first.split_once(';').map_or(first, |(_, m)| m);
                    if message.contains(what) {
                        found.push(message.to_string());
                    }
                }
                // Overwritten before it was read: the next one.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(_) => break,
            }
        }
        found
    }
}

fn tsc_hz() -> u64 {
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(100));
    ((rdtsc() - c0) as f64 / t0.elapsed().as_secs_f64()) as u64
}

/// The checksum the guest must have after counting to `n`.
fn expected_checksum(n: u32) -> u32 {
    (1..=n).fold(0u32, |c, i| c.wrapping_mul(31).wrapping_add(i))
}

/// FNV-1a over the guest's RAM.
fn ram_checksum(ram: &[u8]) -> u64 {
    ram.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The guest RAM as seen through the guest_memfd's mapping.
struct Ram {
    ptr: *mut u8,
}

impl Ram {
    fn map(gmem: &OwnedFd) -> io::Result<Self> {
        // SAFETY: Mapping a shared guest_memfd of RAM_SIZE bytes; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                gmem.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast() })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: The mapping is RAM_SIZE bytes and lives as long as the process.
        unsafe { std::slice::from_raw_parts(self.ptr, RAM_SIZE as usize) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: The mapping is RAM_SIZE bytes and lives as long as the process; the vCPU
        // does not run while the VMM writes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, RAM_SIZE as usize) }
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes()[off..off + 4].try_into().unwrap())
    }
}

/// Binds the guest_memfd as the guest's RAM at guest physical 0.
fn add_ram(vm: &VmFd, gmem: &OwnedFd, ram: &Ram) -> io::Result<()> {
    let region = kvm_userspace_memory_region2 {
        slot: 0,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: 0,
        memory_size: RAM_SIZE,
        userspace_addr: ram.ptr as u64,
        guest_memfd_offset: 0,
        guest_memfd: gmem.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: The region describes memory that stays mapped for the life of the VM.
    unsafe { vm.set_user_memory_region2(region) }.map_err(|e| Error::from_raw_os_error(e.errno()))
}

/// Runs the guest until its next `out`, and returns the counter then.
fn run_to_exit(vcpu: &mut VcpuFd, ram: &Ram) -> u32 {
    match check("KVM_RUN", vcpu.run()) {
        VcpuExit::IoOut(0x10, _) => ram.u32_at(COUNTER_GPA),
        exit => fail(format!("unexpected exit {exit:?}")),
    }
}

fn stage1() {
    let kvm = check("open /dev/kvm", Kvm::new());
    let vm = check("KVM_CREATE_VM", kvm.create_vm());
    let gmem_fd = check(
        "KVM_CREATE_GUEST_MEMFD",
        vm.create_guest_memfd(kvm_create_guest_memfd {
            size: RAM_SIZE,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            ..Default::default()
        }),
    );
    // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new fd that we now own.
    let gmem = unsafe { OwnedFd::from_raw_fd(gmem_fd) };
    let mut ram = check("mmap guest_memfd", Ram::map(&gmem));
    ram.bytes_mut()[CODE_GPA as usize..CODE_GPA as usize + GUEST.len()].copy_from_slice(GUEST);
    check("memslot", add_ram(&vm, &gmem, &ram));
    say(format!(
        "[old kernel] started a VM with {} MiB of guest_memfd RAM",
        RAM_SIZE >> 20
    ));

    let mut vcpu = check("KVM_CREATE_VCPU", vm.create_vcpu(0));
    let mut sregs = check("KVM_GET_SREGS", vcpu.get_sregs());
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    check("KVM_SET_SREGS", vcpu.set_sregs(&sregs));
    let regs = kvm_regs {
        rip: CODE_GPA,
        rflags: 2,
        ..Default::default()
    };
    check("KVM_SET_REGS", vcpu.set_regs(&regs));

    let start = Instant::now();
    let mut counter = 0;
    while start.elapsed() < Duration::from_secs(2) {
        counter = run_to_exit(&mut vcpu, &ram);
    }
    let checksum = ram.u32_at(CHECKSUM_GPA);
    if checksum != expected_checksum(counter) {
        fail(format!(
            "guest checksum {checksum:#x} is wrong for counter {counter}"
        ));
    }
    say(format!(
        "[old kernel] the guest counted to {counter} in {:.1} s; its checksum {checksum:#010x} is right",
        start.elapsed().as_secs_f64()
    ));

    // Pause: the vCPU is stopped at an exit. Let KVM complete the pending `out` without
    // entering the guest again, so that the saved state is between two instructions.
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        other => fail(format!("completing the pending exit: {other:?}")),
    }
    vcpu.set_kvm_immediate_exit(0);
    let hz = tsc_hz();
    let state = SavedState {
        magic: MAGIC,
        regs: check("KVM_GET_REGS", vcpu.get_regs()),
        sregs: check("KVM_GET_SREGS", vcpu.get_sregs()),
        counter,
        checksum,
        ram_checksum: ram_checksum(ram.bytes()),
        tsc_paused: rdtsc(),
        tsc_hz: hz,
    };
    let state_fd = check("memfd", save_state(&state));
    say(format!(
        "[old kernel] paused the vCPU at rip {:#x}; RAM checksum {:016x}",
        state.regs.rip, state.ram_checksum
    ));

    let name = check("session name", SessionName::new(SESSION));
    let luo = check("open /dev/liveupdate", Device::open());
    let session = check("create session", luo.create_session(&name));
    // SAFETY: The VM fd stays open while `vm` lives, beyond this borrow.
    let vm_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(vm.as_raw_fd()) };
    check("preserve VM", session.preserve(&vm_fd, TOKEN_VM));
    check("preserve guest_memfd", session.preserve(&gmem, TOKEN_RAM));
    check(
        "preserve vCPU state",
        session.preserve(&state_fd, TOKEN_STATE),
    );
    say("[old kernel] preserved the VM, its guest_memfd and the vCPU state; kexec");
    hold_and_exit(
        luo,
        session,
        vec![Box::new(vm), Box::new(gmem), Box::new(state_fd)],
    );
}

fn save_state(state: &SavedState) -> io::Result<OwnedFd> {
    let json = serde_json::to_vec(state).map_err(Error::other)?;
    let mut f = std::fs::File::from(rustix::fs::memfd_create(
        "vcpu-state",
        rustix::fs::MemfdFlags::CLOEXEC,
    )?);
    io::Write::write_all(&mut f, &json)?;
    Ok(f.into())
}

fn load_state(fd: &OwnedFd) -> io::Result<SavedState> {
    use std::os::unix::fs::FileExt;
    // At offset 0, whatever the fd's own offset.
    let f = std::fs::File::from(fd.try_clone()?);
    let len = usize::try_from(f.metadata()?.len()).map_err(Error::other)?;
    let mut json = vec![0; len];
    f.read_exact_at(&mut json, 0)?;
    let state: SavedState =
        serde_json::from_slice(&json).map_err(|e| Error::new(io::ErrorKind::InvalidData, e))?;
    if state.magic != MAGIC {
        return Err(Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(state)
}

/// Keeps the session (and the files) open in a child while the host kexecs.
fn hold_and_exit(luo: Device, session: Session, files: Vec<Box<dyn std::any::Any>>) -> ! {
    // SAFETY: The child only closes fds it owns and sleeps: it takes no lock another thread
    // of the parent might have held at the fork.
    match unsafe { libc::fork() } {
        -1 => fail(format!("fork: {}", Error::last_os_error())),
        0 => {
            drop(luo);
            let _ = rustix::process::setsid();
            let _keep = (session, files);
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        _ => exit(0),
    }
}

fn stage2() {
    let name = check("session name", SessionName::new(SESSION));
    let luo = check("open /dev/liveupdate", Device::open());
    let session = check("retrieve session", luo.retrieve_session(&name));
    let state_fd = check("retrieve vCPU state", session.retrieve(TOKEN_STATE));
    let state = check("read vCPU state", load_state(&state_fd));
    let paused_ms = (rdtsc() - state.tsc_paused) as f64 * 1e3 / state.tsc_hz as f64;
    // The guest_memfd first: its handler fetches the VM through the session.
    let gmem = check("retrieve guest_memfd", session.retrieve(TOKEN_RAM));
    let vm_fd = check("retrieve VM", session.retrieve(TOKEN_VM));
    say("[new kernel] retrieved the session, the vCPU state, the guest_memfd and the VM");

    let ram = check("mmap guest_memfd", Ram::map(&gmem));
    let sum = ram_checksum(ram.bytes());
    if sum != state.ram_checksum {
        fail(format!(
            "RAM checksum {sum:016x}, expected {:016x}",
            state.ram_checksum
        ));
    }
    let counter = ram.u32_at(COUNTER_GPA);
    if counter != state.counter {
        fail(format!(
            "counter {counter} in RAM, {} when paused",
            state.counter
        ));
    }
    say(format!(
        "[new kernel] RAM checksum {sum:016x} matches; the counter still reads {counter}"
    ));

    let kvm = check("open /dev/kvm", Kvm::new());
    // SAFETY: `vm_fd` is a VM fd retrieved from LUO, owned by the new `VmFd`.
    let vm = check("adopt VM fd", unsafe {
        kvm.create_vmfd_from_rawfd(std::os::fd::IntoRawFd::into_raw_fd(vm_fd))
    });
    check("memslot", add_ram(&vm, &gmem, &ram));
    let mut vcpu = check("KVM_CREATE_VCPU", vm.create_vcpu(0));
    check("KVM_SET_SREGS", vcpu.set_sregs(&state.sregs));
    check("KVM_SET_REGS", vcpu.set_regs(&state.regs));

    let next = run_to_exit(&mut vcpu, &ram);
    let checksum = ram.u32_at(CHECKSUM_GPA);
    if next != state.counter.wrapping_add(EXIT_EVERY) {
        fail(format!(
            "the guest reached {next}, expected {}",
            state.counter + EXIT_EVERY
        ));
    }
    if checksum != expected_checksum(next) {
        fail(format!(
            "guest checksum {checksum:#x} is wrong for counter {next}"
        ));
    }
    say(format!(
        "[new kernel] resumed the guest: it went on from {} to {next}, no reset and no gap; checksum {checksum:#010x} is right",
        state.counter
    ));
    say(format!(
        "[new kernel] the guest was paused for {paused_ms:.0} ms (TSC) across the kexec"
    ));
    check(
        "finish",
        session.finish_waiting(std::time::Duration::from_secs(60)),
    );
    say("PASS: the guest survived the host kernel live update");
}

const USAGE: &str = "usage: kvm-luo-vmm [--linux BZIMAGE --initrd INITRAMFS [OPTIONS]] -s STAGE
       kvm-luo-vmm --linux BZIMAGE --initrd INITRAMFS [OPTIONS] --agent SOCKET --name NAME \
       [--never-ready]
  without --linux: the quick real-mode guest, stages 1 (preserve) and 2 (resume)
  with --linux: a Linux guest, stages 1 (boot and preserve), 2 (resume), 3 (a bare kexec), or
    boot (boot it and watch it for --watch SECS, default 30: the soak's first boot); with
    --updates N (1 to 9, default 1), stages 1 to 2N+1: N times a live update then a bare
    kexec, each odd stage after the first booting a new guest
  with --agent: a Linux guest under kvm-luo-agent, in session NAME: resumed from it if the
    previous kernel kept it, booted otherwise; prepared for an update when the agent says
    (--never-ready: a test hook, never answer)
OPTIONS (with --linux):
  --mem MIB, --vcpus N    guest RAM (64 to 4096, default 256) and vCPUs (1 to 4, default 2)
  --ram gmem|anon         RAM in guest_memfds (default) or anonymous memory (only -s boot)
  --region MIB            the RAM in guest_memfds of MIB each, one memslot each (default
                          1024; at least 16, and it divides 3072: none straddles the hole at
                          3 GiB); the state records their sizes, and a restore takes them
                          from it
  --prealloc              allocate all of the guest's RAM at boot: the guest_memfds are then
                          preserved while the guest runs, before it is stopped (outside the
                          blackout); without it, after the stop (not under --agent)
  --work MIB              the RAM the guest's work fills and checks (at least 16; default and
                          most: all but what its kernel needs)
  --steps                 say how long each of the VMM's steps in the blackout took, once the
                          guest runs in the new kernel (the stop's steps reach it on the
                          kernel command line, as klu.arg.stop_step= words)
  --no-tsc-deadline       hide the TSC-deadline timer from the guest's CPUID
  --no-kvmclock           hide kvmclock from the guest's CPUID
  --clock hide|advance    across the pause, the guest's clock stops (default: nothing in the
                          guest sees time jump; its CLOCK_REALTIME falls behind by the pause)
                          or moves on by it (KVM_CLOCK_REALTIME)
  --finish-timeout SECS   how long one try to finish the previous kernel's session waits
                          before the VMM says so and tries again (default 60; the guest runs)
  --clock-gap SECS        how far a resumed guest's clock may move across the pause with
                          --clock hide, more than 0 and at most 10 s (default 1 s; never
                          more than 0.25 s and half the pause)
  --inner-qemu DIR        with -s boot: run the guest in QEMU from DIR (the soak's runner packs
                          it) instead of this VMM, with the same checks
  --inject LIST           test hooks, comma-separated: save-fails (the first stop and save
                          fails), refused-msr, zero-deadline, slow-finish, no-deadline-fixup";

fn parse_inject(list: &str) -> linux::Inject {
    let mut i = linux::Inject::default();
    for what in list.split(',') {
        match what {
            "save-fails" => i.save_failures += 1,
            "refused-msr" => i.refused_msr = true,
            "zero-deadline" => i.zero_deadline = true,
            "slow-finish" => i.slow_finish = true,
            "no-deadline-fixup" => i.no_deadline_fixup = true,
            _ => fail(format!("--inject: unknown fault {what}\n{USAGE}")),
        }
    }
    i
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut stage = None;
    let (mut kernel, mut initrd) = (None, None);
    let (mut mem_mib, mut vcpus) = (256, 2);
    let (mut agent, mut name, mut never_ready) = (None, None, false);
    let mut ram = linux::Ram::GuestMemfd;
    let (mut tsc_deadline, mut kvmclock) = (true, true);
    let mut clock = linux::ClockMode::default();
    let mut finish_timeout = Duration::from_secs(60);
    let mut inject = linux::Inject::default();
    let mut watch = 30;
    let mut inner_qemu = None;
    let mut linux_only = false;
    let mut updates = 1;
    let mut prealloc = false;
    let mut work_mib = None;
    let mut steps = false;
    let mut region_mib = linux::DEFAULT_REGION_MIB;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| fail(USAGE));
        match arg.as_str() {
            "-s" => stage = Some(value()),
            "--linux" => kernel = Some(value()),
            "--initrd" => initrd = Some(value()),
            "--mem" => mem_mib = value().parse().unwrap_or_else(|_| fail(USAGE)),
            "--vcpus" => vcpus = value().parse().unwrap_or_else(|_| fail(USAGE)),
            "--agent" => agent = Some(value()),
            "--name" => name = Some(value()),
            "--never-ready" => never_ready = true,
            "--clock-gap" => {
                let gap: f64 = value().parse().unwrap_or_else(|_| fail(USAGE));
                if !(gap > 0.0 && gap <= 10.0) || CLOCK_GAP.set(gap).is_err() {
                    fail("--clock-gap must be given once, more than 0 and at most 10 s");
                }
                linux_only = true;
            }
            "--ram" => {
                ram = match value().as_str() {
                    "gmem" => linux::Ram::GuestMemfd,
                    "anon" => linux::Ram::Anonymous,
                    _ => fail(USAGE),
                };
                linux_only = true;
            }
            "--no-tsc-deadline" => (tsc_deadline, linux_only) = (false, true),
            "--no-kvmclock" => (kvmclock, linux_only) = (false, true),
            "--clock" => {
                clock = match value().as_str() {
                    "hide" => linux::ClockMode::Hide,
                    "advance" => linux::ClockMode::Advance,
                    _ => fail(USAGE),
                };
                linux_only = true;
            }
            "--finish-timeout" => {
                let secs: f64 = value().parse().unwrap_or_else(|_| fail(USAGE));
                if !(secs > 0.0 && secs <= 3600.0) {
                    fail("--finish-timeout must be more than 0 and at most 3600 s");
                }
                finish_timeout = Duration::from_secs_f64(secs);
                linux_only = true;
            }
            "--inject" => (inject, linux_only) = (parse_inject(&value()), true),
            "--inner-qemu" => (inner_qemu, linux_only) = (Some(value()), true),
            "--prealloc" => (prealloc, linux_only) = (true, true),
            "--steps" => (steps, linux_only) = (true, true),
            "--region" => {
                region_mib = value().parse().unwrap_or_else(|_| fail(USAGE));
                if !linux::region_fits(region_mib) {
                    fail("--region must be at least 16 MiB and divide 3072 MiB");
                }
                linux_only = true;
            }
            "--work" => {
                let mib: u64 = value().parse().unwrap_or_else(|_| fail(USAGE));
                if mib < 16 {
                    fail("--work must be at least 16 MiB");
                }
                (work_mib, linux_only) = (Some(mib), true);
            }
            "--updates" => {
                updates = value().parse().unwrap_or_else(|_| fail(USAGE));
                if !(1..=9).contains(&updates) {
                    fail("--updates must be 1 to 9");
                }
                linux_only = true;
            }
            "--watch" => {
                watch = value().parse().unwrap_or_else(|_| fail(USAGE));
                linux_only = true;
            }
            _ => fail(USAGE),
        }
    }
    match (kernel, initrd) {
        (Some(kernel), Some(initrd)) => {
            // The guest's kernel is built for at most 4 CPUs (CONFIG_NR_CPUS).
            if !(1..=4).contains(&vcpus) || !linux::MEM_MIB.contains(&mem_mib) {
                fail("--vcpus must be 1 to 4 and --mem 64 to 4096");
            }
            let opts = linux::Opts {
                kernel,
                initrd,
                mem_mib,
                vcpus,
                ram,
                tsc_deadline,
                kvmclock,
                clock,
                finish_timeout,
                inject,
                prealloc,
                work_mib,
                steps,
                region_mib,
            };
            if ram == linux::Ram::Anonymous && stage.as_deref() != Some("boot") {
                fail("--ram anon is only for -s boot: anonymous memory cannot be preserved");
            }
            // Advancing moves kvmclock on; a guest without it keeps time with its TSC or its
            // ticks, which the restore does not move.
            if clock == linux::ClockMode::Advance && !kvmclock {
                fail("--clock advance needs kvmclock: it cannot go with --no-kvmclock");
            }
            // The test hooks belong to the test stages (-s 1, 2).
            if agent.is_some() && inject != linux::Inject::default() {
                fail("--inject is for the test stages (-s 1, -s 2), not under --agent");
            }
            // Under the agent the VMM preserves after the stop.
            if agent.is_some() && prealloc {
                fail("--prealloc is for the test stages, not under --agent");
            }
            if agent.is_some() && steps {
                fail("--steps is for the test stages, not under --agent");
            }
            if steps {
                linux::note_steps();
            }
            if let (Some(socket), Some(name), None) = (&agent, &name, &stage) {
                let name = check("--name", SessionName::new(name));
                let _ = NAME.set(name.to_string());
                let a = linux::AgentOpts {
                    socket: socket.into(),
                    name,
                    never_ready,
                };
                linux::serve(&opts, &a);
                fail("the VMM stopped serving");
            }
            if agent.is_some() || name.is_some() || never_ready {
                fail(USAGE);
            }
            let last = 2 * updates + 1;
            match stage.as_deref() {
                Some("boot") => match &inner_qemu {
                    Some(dir) => linux::boot_in_qemu(&opts, dir, watch),
                    None => linux::boot_only(&opts, watch),
                },
                Some(s) => match s.parse::<u32>() {
                    Ok(n) if n >= 1 && n <= last => {
                        // An odd stage times the bare kexec that brought it (but the first),
                        // then boots a guest for the next update (but the last); an even one
                        // resumes the guest.
                        if n.is_multiple_of(2) {
                            linux::resume(&opts, n);
                        } else {
                            if n > 1 {
                                linux::bare_kexec_done(n);
                            }
                            if n < last {
                                linux::boot_and_preserve(&opts, n);
                            }
                        }
                    }
                    _ => fail(format!("-s takes 1 to {last} or boot\n{USAGE}")),
                },
                None => fail(USAGE),
            }
        }
        (None, None) if linux_only => fail(USAGE),
        (None, None) => match stage.as_deref() {
            Some("1") => stage1(),
            Some("2") => stage2(),
            _ => fail(USAGE),
        },
        _ => fail(USAGE),
    }
}
