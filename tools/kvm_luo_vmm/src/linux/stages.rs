// SPDX-License-Identifier: GPL-2.0
//! The Linux guest test and demo, one host kernel each (`-s 1`, `-s 2`, `-s 3`, and on for a
//! chain of updates), and the soak's first boot (`-s boot`).

use super::checks;
use super::machine::{self, Guest, Held, Restored, Stopped};
use super::{ms, Opts, NEXT_ARGS, SESSION};
use crate::state::{DEADLINES_REARMED, DEADLINES_ZEROED, REFUSED_MSR_SKIPPED};
use crate::{fail, hold_and_exit, mark_tsc, rdtsc, say, tsc_hz};
use liveupdate::{Device, Session, SessionName};
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a test's VMM keeps a guest it could not restore (and the session it came in)
/// before it gives up; under the agent it keeps it for good.
const TEST_HOLD: Duration = Duration::from_secs(30);

fn or_fail<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| fail(e))
}

/// A restore that could not be completed: the session stays unfinished and everything
/// retrieved stays open, so nothing of the guest is freed; says so, and waits `hold` (for
/// ever if `None`) for an operator to look.
pub fn hold(session: &Session, held: Held, hold: Option<Duration>) -> ! {
    say(format!(
        "FAILED: cannot restore the guest: {}; its session stays unfinished and \
         everything retrieved stays open, so nothing of it is freed; waiting {}",
        held.why,
        hold.map_or(
            "for an operator (kill this VMM to give the guest up: under kvm-luo-agent, \
             the agent then keeps the session until the operator forgets the VM)"
                .into(),
            |d| format!(
                "{} s (a test: then it exits, and the session is finished)",
                d.as_secs()
            )
        ),
    ));
    let _ = io::stdout().flush();
    let _keep = (session, held.files);
    match hold {
        Some(d) => {
            std::thread::sleep(d);
            std::process::exit(1)
        }
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}

/// Finishes the previous kernel's session while the guest runs: a handler that is not done
/// (`EBUSY`: guest memory still coming back) is waited for, `timeout` at a time, saying so
/// each time. Returns how many times it was not done, or the error that ends it (the session
/// then stays unfinished; the guest runs on).
pub fn finish(
    session: &Session,
    timeout: Duration,
    g: &Guest,
    touch: bool,
    label: &str,
) -> Result<u32, String> {
    let mut busy = 0;
    loop {
        match session.finish_waiting(timeout) {
            Ok(()) => return Ok(busy),
            Err(e) if e.errno() == libc::EBUSY => {
                busy += 1;
                say(format!(
                    "{label}finish: guest memory still coming back after {:.1} s more \
                     (try {busy}); the guest runs on, trying again",
                    timeout.as_secs_f64()
                ));
                if touch && busy == 1 {
                    say(format!(
                        "{label}putting in the guest memory nothing has used yet, by touching it"
                    ));
                    g.m.touch_all();
                }
            }
            Err(e) => return Err(format!("finish: {e}")),
        }
    }
}

/// Stops the guest and saves it, for as many tries as the test injects failures, and one more:
/// a stop that fails runs the guest again, which must go on unharmed (the update would be
/// refused).
fn stop_until_saved(mut g: Guest, hz: u64, label: &str, failures: u32) -> Stopped {
    for _ in 0..=failures {
        match g.stop(hz) {
            Ok(s) => return s,
            Err(failed) => {
                let (again, e) = *failed;
                say(format!(
                    "{label}cannot be updated: {e}; the guest runs again"
                ));
                g = again;
                let from = g.m.console.len();
                or_fail(checks::timers_tick(&g.m.console, &g.running, from));
                or_fail(g.ping());
                say(format!(
                    "{label}the guest went on after the failed stop: its timers tick and its \
                     console answers"
                ));
            }
        }
    }
    fail(format!(
        "{label}the guest could not be stopped and saved in {} tries",
        failures + 1
    ))
}

/// Stage 1 (and every odd stage of a chain, after [`bare_kexec_done`]): boot the guest, let it
/// work, stop it and preserve it.
pub fn boot_and_preserve(opts: &Opts, stage: u32) {
    let label = format!("[kernel {stage}] ");
    let label = label.as_str();
    let hz = tsc_hz();
    super::SAVE_FAILURES.store(opts.inject.save_failures, Ordering::Release);
    let g = or_fail(machine::boot(opts, label));
    // The session first: nothing that can fail after the guest stopped is left undone.
    let name = SessionName::new(SESSION).expect("a valid name");
    let luo = Device::open().unwrap_or_else(|e| fail(format!("open /dev/liveupdate: {e}")));
    let create = || {
        luo.create_session(&name)
            .unwrap_or_else(|e| fail(format!("create session: {e}")))
    };
    let mut session = create();
    // A guest whose RAM is all allocated is preserved while it runs: the blackout is left with
    // the stop, the save and the state. Otherwise a page the guest touches after the preserve
    // could not be added (the guest_memfds are frozen), so it waits for the stop.
    let mut early = opts.prealloc;
    if early {
        let t = rdtsc();
        match g.m.preserve_vm_and_ram(&session) {
            Ok(()) => say(format!(
                "{label}preserved the VM and its {} while the guest runs (its RAM is all \
                 allocated), in {:.1} ms, outside the blackout",
                super::guest_memfds(g.m.ram.len()),
                super::ms(rdtsc() - t, hz)
            )),
            Err(e) => {
                // Closing the session gives up what it preserved; the guest runs on.
                say(format!(
                    "{label}preserving while the guest runs: {e}; preserving after the stop"
                ));
                drop(session);
                session = create();
                early = false;
            }
        }
    }
    let mut s = stop_until_saved(g, hz, label, opts.inject.save_failures);
    if super::SAVE_FAILURES.load(Ordering::Acquire) != 0 {
        fail("an injected save failure never happened: the test did not test");
    }
    if opts.inject.zero_deadline {
        let zeroed = DEADLINES_ZEROED.load(Ordering::Relaxed);
        let rearmed = DEADLINES_REARMED.load(Ordering::Relaxed);
        if zeroed == 0 {
            fail("no vCPU's timer was armed when it was saved: the test did not test");
        }
        if !opts.inject.no_deadline_fixup && rearmed != zeroed {
            fail(format!(
                "{zeroed} TSC deadlines lost at the save, only {rearmed} re-armed"
            ));
        }
        say(format!(
            "{label}{zeroed} TSC deadlines saved as 0 by the test, {rearmed} re-armed"
        ));
    }
    let state_fd = s
        .preserve(&session, early)
        .unwrap_or_else(|e| fail(format!("preserving: {e}")));
    if opts.inject.slow_finish {
        // The next kernel puts guest memory in on first use only: finish must wait for it.
        std::fs::write(NEXT_ARGS, "guest_memfd_luo.background_restore=0\n")
            .unwrap_or_else(|e| fail(format!("{NEXT_ARGS}: {e}")));
    }
    if opts.steps {
        // Said by the next kernel's VMM once the guest runs: a console line here would be
        // blackout. One word for the next kernel's command line per step.
        let words: String = super::steps_between(s.snapshot.stamps.kick, rdtsc(), hz)
            .iter()
            .map(|step| format!("klu.arg.stop_step={}\n", step.replace(' ', "_")))
            .collect();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(NEXT_ARGS)
            .unwrap_or_else(|e| fail(format!("{NEXT_ARGS}: {e}")));
        f.write_all(words.as_bytes())
            .unwrap_or_else(|e| fail(format!("{NEXT_ARGS}: {e}")));
    }
    let p = &s.snapshot.progress;
    say(format!(
        "{label}paused at heartbeat {} (guest clock {:.3} s), generations {:?}; \
         preserved the VM, {} and its state; kexec",
        p.beat,
        p.mono,
        p.generations,
        super::guest_memfds(s.m.ram.len())
    ));
    s.m.console.flush();
    let (vm, ram) = s.into_files();
    let mut keep: Vec<Box<dyn std::any::Any>> = vec![Box::new(vm), Box::new(state_fd)];
    keep.extend(
        ram.into_iter()
            .map(|f| Box::new(f) as Box<dyn std::any::Any>),
    );
    mark_tsc("exit");
    hold_and_exit(luo, session, keep);
}

/// Stage 2 (and every even stage of a chain): retrieve, restore, resume and check; finish the
/// session while the guest runs; then leave what the next stage needs to time a bare kexec, for
/// the tests that have one.
pub fn resume(opts: &Opts, stage: u32) {
    mark_tsc("start");
    let label = format!("[kernel {stage}] ");
    let label = label.as_str();
    let name = SessionName::new(SESSION).expect("a valid name");
    let luo = Device::open().unwrap_or_else(|e| fail(format!("open /dev/liveupdate: {e}")));
    let session = luo
        .retrieve_session(&name)
        .unwrap_or_else(|e| fail(format!("retrieve session: {e}")));
    let (mut g, s, t) = match machine::restore(&session, opts.clock, label) {
        Ok(r) => r,
        Err(held) => hold(&session, held, Some(TEST_HOLD)),
    };
    if opts.inject.refused_msr && !REFUSED_MSR_SKIPPED.load(Ordering::Relaxed) {
        fail("the MSR no KVM knows was not skipped: the test did not test");
    }
    // Finishing waits for the guest's memory to be back; the guest runs meanwhile.
    let busy = or_fail(finish(
        &session,
        opts.finish_timeout,
        &g,
        opts.inject.slow_finish,
        label,
    ));
    if opts.inject.slow_finish {
        if busy == 0 {
            fail("finish was not slower than its timeout: the test did not test it");
        }
        say(format!(
            "{label}finished the session after {busy} timeouts, the guest running all along"
        ));
    }
    or_fail(g.check_went_on(&s.progress, &s.stamps, opts.clock, 0, label));
    // The guest went on; but a restore should leave KVM nothing to log as unhandled, a line on
    // the host's console in the blackout for each.
    if !t.kvm_said.is_empty() {
        fail(format!(
            "{label}restoring the vCPUs, KVM logged what it ignored: {}",
            t.kvm_said.join("; ")
        ));
    }
    let resumed = g.running.first_entry();
    if let Err((_, e)) = g.running.stop(|| Ok(())) {
        fail(format!("stopping the guest: {e}"));
    }
    g.m.console.flush();
    report_blackout(&s.stamps, &t, resumed);
    let hz = s.stamps.hz;
    if opts.steps {
        let stop: Vec<String> = kernel_args("stop_step")
            .iter()
            .map(|w| w.replace('_', " "))
            .collect();
        say(format!("{label}the stop's steps (ms): {}", stop.join("; ")));
        say(format!(
            "{label}the restore's steps (ms): {}",
            super::steps_between(t.start, resumed, hz).join("; ")
        ));
    }
    let blackout = ms(resumed.saturating_sub(s.stamps.kick), hz);
    // The guest goes, and its memory with it, before the bare kexec is timed: what that kexec
    // is compared with carried the memory over instead of freeing it.
    drop(g.m);
    drop(session);
    let args = format!(
        "klu.arg.blackout_us={} klu.arg.bare_tsc={} klu.arg.tsc_hz={hz}\n",
        (blackout * 1e3) as u64,
        rdtsc(),
    );
    std::fs::write(NEXT_ARGS, args)
        .unwrap_or_else(|e| fail(format!("write the next kernel's arguments: {e}")));
    say("PASS: the Linux guest kept running across the host kernel live update");
    mark_tsc("exit");
}

fn report_blackout(st: &super::Stamps, t: &Restored, resumed: u64) {
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
}

/// Stage 3 (and every odd stage of a chain after the first): how long the bare kexec that the
/// previous stage started took, next to the blackout.
pub fn bare_kexec_done(stage: u32) {
    let now = rdtsc();
    mark_tsc("start");
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
        "[kernel {stage}] a bare kexec of the same kernel, nothing preserved, took {bare:.0} ms"
    ));
    say(format!(
        "blackout {blackout:.0} ms / bare kexec {bare:.0} ms = {:.2}",
        blackout / bare
    ));
}

/// A `klu.arg.NAME=` value from the kernel command line.
fn kernel_arg(name: &str) -> Option<u64> {
    kernel_args(name).first().and_then(|v| v.parse().ok())
}

/// Every `klu.arg.NAME=` value of the kernel command line, in order.
fn kernel_args(name: &str) -> Vec<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let key = format!("klu.arg.{name}=");
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(key.as_str()))
        .map(str::to_string)
        .collect()
}

/// The soak's boot (`-s boot`): boot the guest, check it, and watch it for `watch_secs`: every
/// vCPU keeps taking timer interrupts and the guest reports no trouble.
pub fn boot_only(opts: &Opts, watch_secs: u64) {
    let mut g = or_fail(machine::boot(opts, ""));
    say(format!(
        "watching the guest for {watch_secs} s: timer interrupts on every vCPU, no trouble"
    ));
    or_fail(checks::watch(&g.m.console, &g.running, watch_secs));
    or_fail(g.ping());
    // The vCPUs stop before the RAM goes.
    if let Err((_, e)) = g.running.stop(|| Ok(())) {
        fail(format!("stopping the guest: {e}"));
    }
    g.m.console.flush();
    say("PASS: the guest booted and ran");
}

/// QEMU as the inner VMM (the soak's comparison): its vCPUs as the checks see them.
struct InnerQemu {
    child: std::sync::Mutex<std::process::Child>,
    vcpus: usize,
}

impl checks::Vcpus for InnerQemu {
    fn count(&self) -> usize {
        self.vcpus
    }

    fn any_failed(&self) -> bool {
        !matches!(self.child.lock().unwrap().try_wait(), Ok(None))
    }
}

/// The soak's first boot with QEMU from `dir` (packed by the runner's `-q`: the binary, its
/// libraries and loader in `lib/`, firmware in `share/`) as the inner VMM instead of this
/// one, with the same guest kernel, initramfs and command line, and the same checks.
pub fn boot_in_qemu(opts: &Opts, dir: &str, watch_secs: u64) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut cpu = "host,-svm,-vmx".to_string();
    if !opts.tsc_deadline {
        cpu.push_str(",-tsc-deadline");
    }
    if !opts.kvmclock {
        cpu.push_str(",-kvmclock");
    }
    let mut child = Command::new(format!("{dir}/lib/ld-linux-x86-64.so.2"))
        .args(["--library-path", &format!("{dir}/lib")])
        .arg(format!("{dir}/qemu-system-x86_64"))
        .args(["-L", &format!("{dir}/share"), "-accel", "kvm", "-cpu", &cpu])
        .args(["-smp", &opts.vcpus.to_string()])
        .args(["-m", &opts.mem_mib.to_string()])
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .args(["-kernel", &opts.kernel, "-initrd", &opts.initrd])
        .args(["-append", &opts.cmdline()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(format!("starting QEMU from {dir}: {e}")));
    let mut out = child.stdout.take().expect("piped");
    let mut input = child.stdin.take().expect("piped");
    let console = std::sync::Arc::new(crate::devices::Console::continuing(Vec::new()));
    let c = console.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            c.push(&buf[..n]);
        }
    });
    let qemu = InnerQemu {
        child: std::sync::Mutex::new(child),
        vcpus: usize::from(opts.vcpus),
    };
    say(format!(
        "booting Linux in QEMU: {} MiB, {} vCPUs, -cpu {cpu}",
        opts.mem_mib, opts.vcpus
    ));
    let t0 = std::time::Instant::now();
    let result = checks::booted(&console, &qemu)
        .inspect(|()| {
            say(format!(
                "the guest booted, its work verified a generation on every vCPU, and every \
                 vCPU takes timer interrupts ({:.1} s)",
                t0.elapsed().as_secs_f64()
            ))
        })
        .and_then(|()| checks::ping(&console, &qemu, |t| input.write_all(t.as_bytes()), 1))
        .and_then(|()| {
            say(format!(
                "watching the guest for {watch_secs} s: timer interrupts on every vCPU, no trouble"
            ));
            checks::watch(&console, &qemu, watch_secs)
        });
    let _ = qemu.child.lock().unwrap().kill();
    console.flush();
    or_fail(result);
    say("PASS: the guest booted and ran");
}
