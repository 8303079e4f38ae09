// SPDX-License-Identifier: GPL-2.0
//! `kvm-luo-fleet`: a host with several VMs through a live update, for the tests and the
//! demo. Starts `kvm-luo-agent` and one `kvm-luo-vmm` per memory size, each with a Linux guest,
//! and then:
//!
//! - `-s 1` (old kernel): waits until every guest runs, asks the agent for the update into
//!   `--kernel`/`--initrd` with this kernel's command line and `klu.stage=2`, and once the
//!   agent is armed (every VMM ready) prints the stage's PASS line and commits: the agent
//!   kexecs;
//! - `-s 2` (new kernel): starts the agent and the VMMs again; the agent must know the
//!   sessions its predecessor handed over, every VMM must get its own back and resume its
//!   guest, with the guest's checks passing;
//! - `--refuses` (one kernel): one VMM never becomes ready; the update must be refused, the
//!   other guests keep running on the old kernel, nothing is loaded for kexec any more, a session
//!   asked for twice and a kernel that does not exist are refused, and after the agent is
//!   restarted every VMM gets a session again;
//! - `--creds` (one kernel, no guests): who may do what is decided by the credentials the
//!   kernel gives the agent, not by what a client says. Clients run as other users (this
//!   binary again, `--creds-client`, dropping root itself);
//! - `--stalls` (one kernel, no guests): no client holds the agent up. A client that floods
//!   requests and never reads is cut off while others are served; connections above the
//!   bound are refused; an update's timeout above the bound is refused; an update armed and
//!   never committed is cancelled after the commit wait, and its (guest-less) VMM resumes;
//! - `--handover -s 1|2` (a kexec, no guests: two VMMs that preserve a memfd each): nothing
//!   of the previous kernel is lost in the agent's own failures. A session that could not be
//!   handed to its VMM (it went away before the answer) is kept and handed to the next VMM
//!   that asks, its memfd whole.

use kvm_luo_agent::fleet::{Registry, Stored};
use kvm_luo_protocol::protocol::{FromAgent, Status, ToAgent, VmmState};
use kvm_luo_protocol::{socket, Client};
use liveupdate::SessionName;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{exit, Child, Command};
use std::time::{Duration, Instant};

const SOCKET: &str = "/tmp/kvm-luo-agent.sock";

fn say(msg: impl AsRef<str>) {
    println!("fleet: {}", msg.as_ref());
}

struct Fleet {
    agent_bin: PathBuf,
    agent: Option<Child>,
    vmms: Vec<(String, Child)>,
    test: String,
    /// A VMM detail that fails the wait (a fresh boot where a resume is due).
    forbid: Option<&'static str>,
}

impl Fleet {
    /// The fleet of test `test`, with the agent next to this binary.
    fn new(test: String) -> Self {
        let here = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        Fleet {
            agent_bin: here.join("kvm-luo-agent"),
            agent: None,
            vmms: Vec::new(),
            test,
            forbid: None,
        }
    }

    fn fail(&mut self, msg: impl AsRef<str>) -> ! {
        say(format!("FAILED: {}", msg.as_ref()));
        self.stop_all();
        exit(1)
    }

    fn stop_all(&mut self) {
        for (_, c) in &mut self.vmms {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop_agent();
    }

    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    fn start_agent_with(&mut self, args: &[&str]) {
        let _ = std::fs::remove_file(SOCKET);
        let child = Command::new(&self.agent_bin)
            .args(["--socket", SOCKET])
            .args(args)
            .spawn()
            .unwrap_or_else(|e| self.fail(format!("starting the agent: {e}")));
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Client::connect(Path::new(SOCKET)).is_err() {
            if Instant::now() > deadline {
                self.fail("the agent does not listen");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    fn client(&mut self) -> Client {
        Client::connect(Path::new(SOCKET)).unwrap_or_else(|e| self.fail(format!("{e}")))
    }

    fn status(&mut self) -> Status {
        let c = self.client();
        c.status()
            .unwrap_or_else(|e| self.fail(format!("status: {e}")))
    }

    /// Fails if a VMM exited.
    fn check_alive(&mut self) {
        let mut dead = None;
        for (name, c) in &mut self.vmms {
            if let Ok(Some(status)) = c.try_wait() {
                dead = Some(format!("the VMM of {name} exited ({status})"));
            }
        }
        if let Some(d) = dead {
            self.fail(d);
        }
    }

    /// Waits until every VMM named in `want` reports its state there.
    fn wait_states(&mut self, want: &[(String, VmmState)], secs: u64) -> Status {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.check_alive();
            let s = self.status();
            let state_of = |n: &str| s.vmms.iter().find(|v| v.name == n).map(|v| v.state);
            if let Some(v) = s
                .vmms
                .iter()
                .find(|v| self.forbid.is_some_and(|x| v.detail.contains(x)))
            {
                let msg = format!("{}: {}, not what this stage expects", v.name, v.detail);
                self.fail(msg);
            }
            if !s.lost.is_empty() {
                let msg = format!("the agent lost {}", s.lost.join(", "));
                self.fail(msg);
            }
            if let Some(v) = s.vmms.iter().find(|v| v.state == VmmState::Failed) {
                let msg = format!("{} failed: {}", v.name, v.detail);
                self.fail(msg);
            }
            if want.iter().all(|(n, st)| state_of(n) == Some(*st)) {
                return s;
            }
            if Instant::now() > deadline {
                let have: Vec<String> = s
                    .vmms
                    .iter()
                    .map(|v| format!("{} {:?}", v.name, v.state))
                    .collect();
                self.fail(format!(
                    "waited {secs} s for {want:?}; the agent has {}",
                    have.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

struct Args {
    vmm: PathBuf,
    guest: PathBuf,
    mems: Vec<u64>,
    vcpus: u8,
    kernel: String,
    initrd: String,
    stage: u8,
    refuses: bool,
    /// Passed on to the VMMs as `--clock-gap`.
    clock_gap: Option<String>,
    /// More arguments for every VMM (`--vmm-arg`, repeatable).
    vmm_args: Vec<String>,
}

const USAGE: &str = "usage: kvm-luo-fleet --vmm PATH --guest DIR [--mem MIB,MIB,...] [--vcpus N]
                     [--kernel PATH --initrd PATH] [--clock-gap SECS] [--vmm-arg ARG]...
                     (-s 1|2 | --refuses)";

fn args() -> Args {
    let mut a = Args {
        vmm: PathBuf::new(),
        guest: PathBuf::new(),
        mems: vec![128, 160, 192],
        vcpus: 1,
        kernel: "/kernel".into(),
        initrd: "/initrd.img".into(),
        stage: 0,
        refuses: false,
        clock_gap: None,
        vmm_args: Vec::new(),
    };
    let usage = || -> ! {
        eprintln!("{USAGE}");
        exit(2)
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--vmm" => a.vmm = value().into(),
            "--guest" => a.guest = value().into(),
            "--mem" => {
                a.mems = value()
                    .split(',')
                    .map(|m| m.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--vcpus" => a.vcpus = value().parse().unwrap_or_else(|_| usage()),
            "--kernel" => a.kernel = value(),
            "--initrd" => a.initrd = value(),
            "-s" => a.stage = value().parse().unwrap_or_else(|_| usage()),
            "--refuses" => a.refuses = true,
            "--vmm-arg" => a.vmm_args.push(value()),
            "--clock-gap" => {
                let gap = value();
                match gap.parse::<f64>() {
                    Ok(secs) if secs > 0.0 && secs <= 10.0 => a.clock_gap = Some(gap),
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    if a.vmm.as_os_str().is_empty()
        || a.guest.as_os_str().is_empty()
        || a.mems.is_empty()
        || (a.refuses && a.mems.len() < 2)
        || (a.refuses == (a.stage != 0))
        || a.stage > 2
    {
        usage();
    }
    a
}

/// The `klu.test=` of this kernel's command line.
fn test_name(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("klu.test="))
        .unwrap_or("fleet")
        .to_string()
}

/// A line for the test runner, as the test machine's init writes its own: a record of the kernel
/// log, which a kernel message cannot cut in two on the console as it can a line written there.
fn klu_line(line: &str) {
    let record = format!("<5>KLU: {line}\n");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| kmsg.write_all(record.as_bytes()));
    if written.is_err() {
        println!("KLU: {line}");
    }
}

/// This kernel's command line for the next one: `klu.stage=2` instead of this stage's.
fn next_cmdline(cmdline: &str) -> String {
    let mut words: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("klu.stage=") && !w.starts_with("klu.arg."))
        .collect();
    words.push("klu.stage=2");
    words.join(" ")
}

/// Starts a VMM per memory size; with `one_by_one`, each only once the previous one's guest
/// runs (the hosts of the tests boot guests one at a time: early boots of several nested
/// guests at once under TCG are where the emulation is least reliable).
fn start_vmms(f: &mut Fleet, a: &Args, never_ready: Option<&str>, one_by_one: bool) -> Vec<String> {
    let mut names = Vec::new();
    for (i, mem) in a.mems.iter().enumerate() {
        let name = format!("vm{}", i + 1);
        let mut cmd = Command::new(&a.vmm);
        cmd.arg("--linux")
            .arg(a.guest.join("bzImage"))
            .arg("--initrd")
            .arg(a.guest.join("initrd.cpio"))
            .args(["--mem", &mem.to_string(), "--vcpus", &a.vcpus.to_string()])
            .args(["--agent", SOCKET, "--name", &name]);
        if let Some(gap) = &a.clock_gap {
            cmd.args(["--clock-gap", gap]);
        }
        cmd.args(&a.vmm_args);
        if never_ready == Some(name.as_str()) {
            cmd.arg("--never-ready");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| f.fail(format!("starting the VMM of {name}: {e}")));
        say(format!(
            "started the VMM of {name}: {mem} MiB, {} vCPUs",
            a.vcpus
        ));
        f.vmms.push((name.clone(), child));
        if one_by_one {
            f.wait_states(&[(name.clone(), VmmState::Running)], 900);
        }
        names.push(name);
    }
    names
}

fn all(names: &[String], st: VmmState) -> Vec<(String, VmmState)> {
    names.iter().map(|n| (n.clone(), st)).collect()
}

fn stage1(f: &mut Fleet, a: &Args, cmdline: &str) {
    f.start_agent();
    let t0 = Instant::now();
    let names = start_vmms(f, a, None, true);
    f.wait_states(&all(&names, VmmState::Running), 1500);
    say(format!(
        "[kernel 1] every guest runs ({:.0} s); asking the agent for the live update",
        t0.elapsed().as_secs_f64()
    ));
    let client = f.client();
    let next = next_cmdline(cmdline);
    let t1 = Instant::now();
    let armed = client
        .update(
            Some(&a.kernel),
            Some(&a.initrd),
            Some(&next),
            Duration::from_secs(300),
        )
        .unwrap_or_else(|e| f.fail(format!("the update: {e}")));
    let mut got = armed.vmms.clone();
    got.sort();
    if got != names {
        f.fail(format!("armed with {got:?}, expected {names:?}"));
    }
    say(format!(
        "[kernel 1] the agent is armed: {} ready in {:.1} s; commit",
        armed.vmms.join(", "),
        t1.elapsed().as_secs_f64()
    ));
    klu_line(&format!(
        "stage 1 of {}: PASS (every VMM ready, the agent kexecs)",
        f.test
    ));
    let e = armed.commit();
    f.fail(format!("the kexec: {e}"));
}

fn stage2(f: &mut Fleet, a: &Args) {
    f.start_agent();
    let expected: Vec<String> = (1..=a.mems.len()).map(|i| format!("vm{i}")).collect();
    let s = f.status();
    let mut incoming = s.incoming.clone();
    incoming.sort();
    if incoming != expected {
        f.fail(format!(
            "the agent knows the sessions {:?} from the previous kernel, expected {expected:?}",
            s.incoming
        ));
    }
    say(format!(
        "[kernel 2] the agent has the previous kernel's sessions {}",
        s.incoming.join(", ")
    ));
    let names = start_vmms(f, a, None, false);
    f.forbid = Some("booting its guest");
    let s = f.wait_states(&all(&names, VmmState::Resumed), 1500);
    if !s.incoming.is_empty() || s.vmms.iter().any(|v| !v.has_session) {
        f.fail(format!("after the resume: {s:?}"));
    }
    say(format!(
        "[kernel 2] every guest resumed after the live update: {}",
        names.join(", ")
    ));
}

fn refuses(f: &mut Fleet, a: &Args, cmdline: &str) {
    f.start_agent();
    let last = format!("vm{}", a.mems.len());
    let names = start_vmms(f, a, Some(&last), true);
    f.wait_states(&all(&names, VmmState::Running), 1500);
    say("every guest runs");

    // A session asked for twice.
    let c = f.client();
    match c.session(&SessionName::new("vm1").expect("a valid name")) {
        Err(e) if e.errno() == libc::EBUSY => say(format!("a session asked for twice: {e}")),
        Err(e) => f.fail(format!("a session asked for twice: {e}")),
        Ok(_) => f.fail("the agent handed out vm1 twice"),
    }
    // A kernel that does not exist: refused before any guest stops.
    match c.update(Some("/nonexistent"), None, None, Duration::from_secs(5)) {
        Err(e) if e.errno() == libc::ENOENT => say(format!("a missing kernel: {e}")),
        Err(e) => f.fail(format!("a missing kernel: {e}")),
        Ok(_) => f.fail("the agent armed an update with a kernel that does not exist"),
    }
    drop(c);

    // One VMM never becomes ready. Meanwhile a second update is refused without
    // disturbing the first.
    let (a_client, b_client) = (f.client(), f.client());
    let t0 = Instant::now();
    let next = next_cmdline(cmdline);
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            a_client
                .update(
                    Some(&a.kernel),
                    Some(&a.initrd),
                    Some(&next),
                    Duration::from_secs(15),
                )
                .map(|armed| armed.vmms.clone())
        });
        std::thread::sleep(Duration::from_secs(3));
        let second = b_client
            .update(None, None, None, Duration::from_secs(5))
            .map(|armed| armed.vmms.clone());
        (first.join().expect("the update thread"), second)
    });
    match second {
        Err(e) if e.errno() == libc::EBUSY => say(format!("a second update meanwhile: {e}")),
        Err(e) => f.fail(format!("a second update meanwhile failed otherwise: {e}")),
        Ok(_) => f.fail("the agent armed a second update during the first"),
    }
    match first {
        // Exactly the one that never answers: the second update did not disturb the first.
        Err(kvm_luo_protocol::Error::Refused { errno, message })
            if errno == libc::ETIMEDOUT
                && message == format!("{last} did not become ready within 15 s") =>
        {
            say(format!(
                "the update was refused after {:.1} s: {message}",
                t0.elapsed().as_secs_f64()
            ))
        }
        Err(e) => f.fail(format!("the update failed otherwise: {e}")),
        Ok(_) => f.fail("the agent armed an update a VMM was not ready for"),
    }
    drop((a_client, b_client));
    // Every guest goes on: those that were stopped resume from where they stopped, checks
    // passing, and the one that was never stopped; each with a new session.
    let s = f.wait_states(&all(&names, VmmState::Continued), 900);
    if s.vmms.iter().any(|v| !v.has_session) {
        f.fail(format!("after the refused update: {s:?}"));
    }
    let loaded = std::fs::read_to_string("/sys/kernel/kexec_loaded").unwrap_or_default();
    if loaded.trim() != "0" {
        f.fail("a kernel is still loaded for kexec after the refused update");
    }
    say("every other guest kept running on the old kernel, checks passing; no kernel is loaded");

    // The agent restarted: every VMM notices, and gets a new session from the new agent.
    f.stop_agent();
    f.start_agent();
    let s = f.wait_states(&all(&names, VmmState::Running), 120);
    if s.vmms.iter().any(|v| !v.has_session) {
        f.fail(format!("after the agent restarted: {s:?}"));
    }
    say("the agent restarted: every VMM has a session again");
    let c = f.client();
    match c.forget("vm1") {
        Err(e) if e.errno() == libc::EBUSY => say(format!("forgetting a connected VM: {e}")),
        other => f.fail(format!("forgetting a connected VM: {other:?}")),
    }
}

/// The group whose members may connect, and the operators' group, in `--creds`.
const VMM_GID: u32 = 2000;
const OPERATOR_GID: u32 = 3000;

/// A connection to the agent that said hello, for requests [`Client`] does not make.
fn raw_client() -> std::io::Result<std::os::unix::net::UnixStream> {
    let sock = socket::connect(Path::new(SOCKET))?;
    let hello = ToAgent::Hello {
        version: kvm_luo_protocol::protocol::PROTOCOL_VERSION,
    };
    socket::send(&sock, &hello, None::<&std::os::fd::OwnedFd>)?;
    match socket::recv::<FromAgent>(&sock)? {
        Some((FromAgent::Hello { .. }, _)) => Ok(sock),
        m => Err(std::io::Error::other(format!("the agent's hello: {m:?}"))),
    }
}

/// What the agent answers on a new connection to `first`: the refusal's errno and message,
/// and whether it then closed the connection.
fn first_answer(first: &ToAgent) -> std::io::Result<(i32, String, bool)> {
    let sock = socket::connect(Path::new(SOCKET))?;
    socket::send(&sock, first, None::<&std::os::fd::OwnedFd>)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (errno, message) = match socket::recv::<FromAgent>(&sock)? {
        Some((FromAgent::Error { errno, message }, _)) => (errno, message),
        m => return Err(std::io::Error::other(format!("{m:?}"))),
    };
    let closed = matches!(socket::recv::<FromAgent>(&sock), Ok(None));
    Ok((errno, message, closed))
}

/// `--creds-client UID GID SUPP ACTION [NAME]`: becomes user `UID` (group `GID`, supplementary
/// group `SUPP` unless 0), asks the agent for `ACTION` and prints `creds: ok` or `creds: errno
/// N (what the agent said)`.
fn creds_client(args: &[String]) -> ! {
    let [uid, gid, supp, action, rest @ ..] = args else {
        exit(2)
    };
    let id = |s: &String| s.parse::<u32>().unwrap_or_else(|_| exit(2));
    let (uid, gid, supp) = (id(uid), id(gid), id(supp));
    let groups: Vec<libc::gid_t> = if supp == 0 { vec![] } else { vec![supp] };
    // SAFETY: `groups` holds `groups.len()` group IDs; the other calls take no pointers. The
    // order (groups, group, then user) is the one in which root can drop all three.
    let dropped = unsafe {
        libc::setgroups(groups.len(), groups.as_ptr()) == 0
            && libc::setgid(gid) == 0
            && libc::setuid(uid) == 0
    };
    if !dropped {
        println!(
            "creds: cannot become {uid}:{gid}: {}",
            std::io::Error::last_os_error()
        );
        exit(1)
    }
    let name = rest.first().map(String::as_str).unwrap_or("vm");
    // Client::connect() says where it failed to connect, without the errno.
    let result = socket::connect(Path::new(SOCKET))
        .map_err(kvm_luo_protocol::Error::Io)
        .and_then(|_| Client::connect(Path::new(SOCKET)))
        .and_then(|c| match action.as_str() {
            "session" => c
                .session(&SessionName::new(name).expect("a valid name"))
                .map(drop),
            "status" => c.status().map(drop),
            "forget" => c.forget(name),
            "update" => c
                .update(Some("/nonexistent"), None, None, Duration::from_secs(5))
                .map(drop),
            "wrong-pid" => {
                let msg = ToAgent::Session {
                    name: name.into(),
                    pid: std::process::id() + 1,
                };
                let sock = raw_client().map_err(kvm_luo_protocol::Error::Io)?;
                socket::send(&sock, &msg, None::<&std::os::fd::OwnedFd>)
                    .map_err(kvm_luo_protocol::Error::Io)?;
                match socket::recv::<FromAgent>(&sock).map_err(kvm_luo_protocol::Error::Io)? {
                    Some((FromAgent::Error { errno, message }, _)) => {
                        Err(kvm_luo_protocol::Error::Refused { errno, message })
                    }
                    m => Err(kvm_luo_protocol::Error::Protocol(format!("{m:?}"))),
                }
            }
            _ => exit(2),
        });
    match result {
        Ok(()) => println!("creds: ok"),
        Err(e) => println!("creds: errno {} ({e})", e.errno()),
    }
    exit(0)
}

/// What `action` on `name` as `uid:gid` (+`supp`) got from the agent: 0, or the errno (this
/// binary again, as `--creds-client`).
fn ask_as(f: &mut Fleet, me: &Path, who: (u32, u32, u32), action: &str, name: &str) -> i32 {
    let out = Command::new(me)
        .arg("--creds-client")
        .args([who.0, who.1, who.2].map(|n| n.to_string()))
        .args([action, name])
        .output()
        .unwrap_or_else(|e| f.fail(format!("a client: {e}")));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("").to_string();
    say(format!("{action} {name} as {}:{}: {line}", who.0, who.1));
    if line == "creds: ok" {
        0
    } else if let Some(rest) = line.strip_prefix("creds: errno ") {
        rest.split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    } else {
        f.fail(format!("a client as {who:?} printed {text:?}"))
    }
}

/// `--creds`: see the module's documentation.
fn creds(f: &mut Fleet) {
    let _ = std::fs::remove_file(Path::new(SOCKET).with_extension("registry"));
    let agent_args = [
        "--group",
        &VMM_GID.to_string(),
        "--operator-group",
        &OPERATOR_GID.to_string(),
    ];
    f.start_agent_with(&agent_args);
    let me = std::env::current_exe().unwrap_or_else(|e| f.fail(format!("{e}")));
    // What `ACTION` on `name` as `uid:gid` (+`supp`) got: 0, or the errno.
    let ask = |f: &mut Fleet, who, action: &str, name: &str| ask_as(f, &me, who, action, name);
    let expect = |f: &mut Fleet, who, action: &str, name: &str, want: i32| {
        let got = ask(f, who, action, name);
        if got != want {
            f.fail(format!(
                "{action} {name} as {who:?}: errno {got}, expected {want}"
            ));
        }
    };
    let (alice, bob) = ((1000, VMM_GID, 0), (1001, VMM_GID, 0));
    let (stranger, operator) = ((1002, 1002, 0), (1003, OPERATOR_GID, VMM_GID));
    // The socket is the group's: others cannot connect at all.
    expect(f, stranger, "status", "", libc::EACCES);
    expect(f, alice, "status", "", 0);
    // A VM is its first claimer's, connected or not.
    expect(f, alice, "session", "vm-a", 0);
    expect(f, bob, "session", "vm-a", libc::EPERM);
    expect(f, bob, "session", "vm-b", 0);
    expect(f, alice, "session", "vm-b", libc::EPERM);
    // The pid is the kernel's, not the client's word.
    expect(f, alice, "wrong-pid", "vm-c", libc::EPERM);
    // Updates and forgetting are the operators'.
    expect(f, alice, "update", "", libc::EPERM);
    expect(f, alice, "forget", "vm-a", libc::EPERM);
    expect(f, bob, "forget", "vm-a", libc::EPERM);
    // An operator (by group) may: vm-b is forgotten and anyone's to claim again.
    expect(f, operator, "forget", "vm-b", 0);
    expect(f, alice, "session", "vm-b", 0);
    // Root may too; an update by an operator goes past the check (refused for what it is:
    // VMMs not connected).
    expect(f, (0, 0, 0), "forget", "vm-a", 0);
    expect(f, bob, "session", "vm-a", 0);
    expect(f, operator, "update", "", libc::EAGAIN);
    // The operators' group counts as the effective group only.
    expect(f, (1004, VMM_GID, OPERATOR_GID), "update", "", libc::EPERM);
    // Who owns what outlives the agent.
    f.stop_agent();
    f.start_agent_with(&agent_args);
    expect(f, alice, "session", "vm-a", libc::EPERM);
    expect(f, bob, "session", "vm-a", 0);
}

/// A VMM without a guest for `--stalls`: claims `name`, reports running, answers every
/// prepare with ready, and after an abort asks for a session again and reports `continued`.
fn fake_vmm(name: &str) -> Result<(), kvm_luo_protocol::Error> {
    let c = Client::connect(Path::new(SOCKET))?;
    let name = SessionName::new(name).expect("a valid name");
    let mut session = Some(c.session(&name)?.0);
    c.report(VmmState::Running, "no guest")?;
    while let Some(event) = c.next_event()? {
        match event {
            FromAgent::Prepare => {
                c.report(VmmState::Ready, "nothing to preserve")?;
                c.ready(Ok(()))?;
            }
            FromAgent::Abort { .. } => {
                drop(session.take());
                c.release()?;
                // Until the agent is done with the update.
                let deadline = Instant::now() + Duration::from_secs(10);
                session = loop {
                    match c.session(&name) {
                        Err(e) if e.errno() == libc::EAGAIN && Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(100))
                        }
                        r => break Some(r?.0),
                    }
                };
                c.report(VmmState::Continued, "no guest")?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs `kvm-luo-ctl` (next to the agent) with `args` (and the test's socket unless they name
/// one): its exit code and standard output.
fn ctl(f: &mut Fleet, args: &[&str]) -> (Option<i32>, String) {
    let socket: &[&str] = if args.contains(&"--socket") {
        &[]
    } else {
        &["--socket", SOCKET]
    };
    let out = Command::new(f.agent_bin.with_file_name("kvm-luo-ctl"))
        .args(socket)
        .args(args)
        .output()
        .unwrap_or_else(|e| f.fail(format!("running kvm-luo-ctl: {e}")));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    say(format!(
        "kvm-luo-ctl {}: exit {:?}: {}{}",
        args.join(" "),
        out.status.code(),
        text.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ));
    (out.status.code(), text)
}

/// `kvm-luo-ctl` as an operator's script uses it, with one VMM (`vm-s`) running: status as
/// JSON, an update's dry run that stops nothing, `wait`, and distinct exit codes.
fn operator_cli(f: &mut Fleet) {
    let (code, json) = ctl(f, &["status", "--json"]);
    let s: Status = kvm_luo_protocol::protocol::decode(json.trim().as_bytes())
        .unwrap_or_else(|e| f.fail(format!("status --json: {e}: {json}")));
    if code != Some(0) || s.phase != "idle" || s.vmms.len() != 1 || s.vmms[0].name != "vm-s" {
        f.fail(format!("status --json: exit {code:?}, {s:?}"));
    }
    // A dry run with the test's timeout (below the agent's maximum), and what follows.
    let dry =
        |rest: &[&'static str]| [&["update", "--dry-run", "--timeout", "10"][..], rest].concat();
    let cases: [(Vec<&str>, i32, &str); 9] = [
        (
            dry(&["--kernel", "/kernel", "--initrd", "/initrd.img"]),
            0,
            "an update would prepare vm-s",
        ),
        (dry(&["--kernel", "/nonexistent"]), 1, ""),
        // A next kernel that would not find the sessions.
        (
            dry(&[
                "--kernel",
                "/kernel",
                "--cmdline",
                "console=ttyS0 liveupdate=off",
            ]),
            1,
            "",
        ),
        // The kernel is the agent's to load (kexec_file_load carries the sessions): required.
        (dry(&[]), 2, ""),
        // Above the agent's --max-timeout, as a real update would be.
        (vec!["update", "--dry-run", "--kernel", "/kernel"], 1, ""),
        (
            vec!["wait", "--timeout", "5"],
            0,
            "ready for an update of 1 VMMs",
        ),
        (vec!["--help"], 0, "Exit codes"),
        (vec!["reboot"], 2, ""),
        (vec!["--socket", "/nonexistent", "status"], 3, ""),
    ];
    for (args, want, says) in cases {
        let (code, out) = ctl(f, &args);
        if code != Some(want) || !out.contains(says) {
            f.fail(format!(
                "kvm-luo-ctl {}: exit {code:?}, expected {want}: {out}",
                args.join(" ")
            ));
        }
    }
    // The dry run stopped nothing: the VMM was never told to prepare.
    let s = f.status();
    if s.phase != "idle" || s.vmms.iter().any(|v| v.state != VmmState::Running) {
        f.fail(format!("after the dry runs: {s:?}"));
    }
    if std::fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|s| s.trim() == "1") {
        f.fail("a dry run loaded a kernel");
    }
}

/// `--stalls`: see the module's documentation.
fn stalls(f: &mut Fleet) {
    const MAX_CONNECTIONS: usize = 8;
    let _ = std::fs::remove_file(Path::new(SOCKET).with_extension("registry"));
    f.start_agent_with(&[
        "--max-connections",
        &MAX_CONNECTIONS.to_string(),
        "--max-timeout",
        "20",
        "--commit-wait",
        "3",
    ]);
    // A client that sends and never reads; meanwhile the others are answered at once.
    let flood = raw_client().unwrap_or_else(|e| f.fail(format!("{e}")));
    let _ = flood.set_write_timeout(Some(Duration::from_secs(1)));
    let flooder = std::thread::spawn(move || {
        let mut sent = 0u32;
        while sent < 1_000_000
            && socket::send(&flood, &ToAgent::Status, None::<&std::os::fd::OwnedFd>).is_ok()
        {
            sent += 1;
        }
        (flood, sent)
    });
    // Its sends stop when the agent, blocked on an answer, no longer reads; the agent cuts
    // it off once that answer has waited 2 s. Others are served all along.
    let t0 = Instant::now();
    let mut stopped: Option<Instant> = None;
    while stopped.is_none_or(|at| at.elapsed() < Duration::from_secs(4)) {
        if stopped.is_none() && flooder.is_finished() {
            stopped = Some(Instant::now());
        }
        let t = Instant::now();
        f.status();
        if t.elapsed() > Duration::from_secs(1) {
            f.fail(format!(
                "a status took {:?} while a client did not read",
                t.elapsed()
            ));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            f.fail("a client that does not read is still sending after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (flood, sent) = flooder.join().unwrap_or_else(|_| f.fail("the flood"));
    let mut answers = 0u32;
    // The answers it was sent, then the end; a wait means the agent still serves it.
    let _ = flood.set_read_timeout(Some(Duration::from_secs(10)));
    loop {
        match socket::recv::<FromAgent>(&flood) {
            Ok(Some(_)) => answers += 1,
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => f.fail(format!("a client that does not read is not cut off: {e}")),
        }
    }
    say(format!(
        "a client that did not read: cut off after {sent} requests, {answers} answers queued"
    ));
    drop(flood);

    // The connections over the bound are refused, and served again once some close.
    // The connections of the requests above go away a little after they close.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < MAX_CONNECTIONS {
        // Refused, a client that said hello at once may see the connection reset rather than
        // EAGAIN.
        match Client::connect(Path::new(SOCKET)).and_then(|c| c.status().map(|_| c)) {
            Ok(c) => held.push(c),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => f.fail(format!(
                "connection {} of {MAX_CONNECTIONS}: {e}",
                held.len() + 1
            )),
        }
    }
    let over = socket::connect(Path::new(SOCKET)).unwrap_or_else(|e| f.fail(format!("{e}")));
    match socket::recv::<FromAgent>(&over) {
        Ok(Some((FromAgent::Error { errno, message }, _))) if errno == libc::EAGAIN => {
            say(format!("connection {}: {message}", MAX_CONNECTIONS + 1))
        }
        r => f.fail(format!("a connection over the bound got {r:?}")),
    }
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(Path::new(SOCKET)).and_then(|c| c.status()) {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => f.fail(format!("no connection once one closed: {e}")),
        }
    }
    drop(held);

    // A VMM (without a guest), and an update the operator arms and then forgets.
    std::thread::spawn(|| {
        if let Err(e) = fake_vmm("vm-s") {
            println!("fleet: the VMM: {e}");
        }
    });
    f.wait_states(&[("vm-s".into(), VmmState::Running)], 30);
    operator_cli(f);
    let op = f.client();
    match op.update(
        Some("/kernel"),
        Some("/initrd.img"),
        None,
        Duration::from_secs(30),
    ) {
        Err(e) if e.errno() == libc::EINVAL && e.to_string().contains("maximum") => {
            say(format!("a timeout over the bound: {e}"))
        }
        r => f.fail(format!(
            "a timeout over the bound: {:?}",
            r.map(|a| a.vmms.clone())
        )),
    }
    let armed = op
        .update(
            Some("/kernel"),
            Some("/initrd.img"),
            None,
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| f.fail(format!("the update: {e}")));
    say(format!("armed: {}", armed.vmms.join(", ")));
    let t = Instant::now();
    // Neither commit nor cancel (any request would be taken as neither): the next message is
    // the agent giving up, after its commit wait of 3 s.
    match op.next_event() {
        Ok(Some(FromAgent::Error { errno, message })) if errno == libc::ECANCELED => say(format!(
            "after {:.1} s: {message}",
            t.elapsed().as_secs_f64()
        )),
        r => f.fail(format!("an update never committed: {r:?}")),
    }
    if t.elapsed() < Duration::from_millis(2500) || t.elapsed() > Duration::from_secs(10) {
        f.fail(format!(
            "the update was cancelled after {:?}, with a commit wait of 3 s",
            t.elapsed()
        ));
    }
    f.wait_states(&[("vm-s".into(), VmmState::Continued)], 30);
    if std::fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|s| s.trim() == "1") {
        f.fail("the kernel the cancelled update loaded is still loaded");
    }
}

/// The VMs of `--handover`, each a memfd of [`HANDOVER_BYTES`] in its session.
const HANDOVER_VMS: [&str; 3] = ["vm-h1", "vm-h2", "vm-h3"];
const HANDOVER_BYTES: usize = 1 << 20;
const HANDOVER_TOKEN: u64 = 1;

/// What the memfd of `name` holds.
fn handover_pattern(name: &str) -> Vec<u8> {
    let seed = name
        .bytes()
        .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..HANDOVER_BYTES)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed ^ (i >> 12) as u8)
        .collect()
}

/// A VMM without a guest for `--handover`'s first kernel: preserves a memfd of its pattern in
/// its session, reports running and answers the prepare with ready; then waits for the kexec.
fn handover_vmm(name: &str) -> Result<(), kvm_luo_protocol::Error> {
    use std::io::Write;
    let c = Client::connect(Path::new(SOCKET))?;
    let (session, _) = c.session(&SessionName::new(name).expect("a valid name"))?;
    let mut ram = std::fs::File::from(
        rustix::fs::memfd_create("vm-ram", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(std::io::Error::from)?,
    );
    ram.write_all(&handover_pattern(name))?;
    session
        .preserve(&ram, HANDOVER_TOKEN)
        .map_err(kvm_luo_protocol::Error::Session)?;
    c.report(VmmState::Running, "a memfd preserved")?;
    while let Some(event) = c.next_event()? {
        if event == FromAgent::Prepare {
            c.report(VmmState::Ready, "nothing more to preserve")?;
            c.ready(Ok(()))?;
        }
    }
    drop((session, ram));
    Ok(())
}

/// Takes over the session `name` in the second kernel, as its VMM would: it must be the
/// previous kernel's, with the memfd's content whole. Returns the connection, which holds the
/// VM's name.
fn handover_resume(f: &mut Fleet, name: &str) -> Client {
    use std::io::{Read, Seek};
    let c = f.client();
    let (session, retrieved) = c
        .session(&SessionName::new(name).expect("a valid name"))
        .unwrap_or_else(|e| f.fail(format!("{name}: {e}")));
    if !retrieved {
        f.fail(format!("{name}: a new session, not the previous kernel's"));
    }
    let mut ram = std::fs::File::from(
        session
            .retrieve(HANDOVER_TOKEN)
            .unwrap_or_else(|e| f.fail(format!("{name}: retrieving the memfd: {e}"))),
    );
    let mut got = Vec::new();
    if let Err(e) = ram.rewind().and_then(|_| ram.read_to_end(&mut got)) {
        f.fail(format!("{name}: reading the memfd: {e}"));
    }
    if got != handover_pattern(name) {
        f.fail(format!(
            "{name}: the memfd holds {} bytes, not what was preserved",
            got.len()
        ));
    }
    if let Err(e) = session.finish() {
        f.fail(format!("{name}: finishing the session: {e}"));
    }
    drop(session);
    if let Err(e) = c
        .report(VmmState::Resumed, "the memfd is whole")
        .and_then(|()| c.release())
    {
        f.fail(format!("{name}: {e}"));
    }
    say(format!(
        "{name}: the previous kernel's session, its memfd whole"
    ));
    c
}

/// `--handover -s 1|2`: see the module's documentation.
fn handover(f: &mut Fleet, stage: u8, cmdline: &str) {
    let names: Vec<String> = HANDOVER_VMS.iter().map(|n| n.to_string()).collect();
    if stage == 1 {
        let _ = std::fs::remove_file(Path::new(SOCKET).with_extension("registry"));
        f.start_agent();
        for name in HANDOVER_VMS {
            std::thread::spawn(move || {
                if let Err(e) = handover_vmm(name) {
                    println!("fleet: the VMM of {name}: {e}");
                }
            });
        }
        f.wait_states(&all(&names, VmmState::Running), 30);
        let client = f.client();
        let armed = client
            .update(
                Some("/kernel"),
                Some("/initrd.img"),
                Some(&next_cmdline(cmdline)),
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| f.fail(format!("the update: {e}")));
        klu_line(&format!(
            "stage 1 of {}: PASS ({} ready, the agent kexecs)",
            f.test,
            armed.vmms.join(", ")
        ));
        let e = armed.commit();
        f.fail(format!("the kexec: {e}"));
    }
    f.start_agent_with(&["--group", &VMM_GID.to_string()]);
    let s = f.status();
    if s.incoming != names {
        f.fail(format!(
            "the agent has the sessions {:?} from the previous kernel",
            s.incoming
        ));
    }
    // Not ready for an update while they wait to be taken over: `wait` says so, and times out.
    let (code, out) = ctl(f, &["wait", "--timeout", "1"]);
    if code != Some(4) || !out.contains("no VMM has taken over") {
        f.fail(format!("kvm-luo-ctl wait: exit {code:?}: {out}"));
    }
    // Each session the agent retrieves and cannot hand over for good must stay with the agent,
    // whole, for the next VMM.
    // Waits until the agent keeps the first `n` sessions; `what` happened to `names[vm]`.
    let kept = |f: &mut Fleet, n: usize, vm: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = f.status();
            if !s.lost.is_empty() || s.incoming != names {
                f.fail(format!(
                    "{what}: incoming {:?}, lost {:?}",
                    s.incoming, s.lost
                ));
            }
            if s.kept == names[..n] {
                break;
            }
            if Instant::now() > deadline {
                f.fail(format!("{what}: the agent keeps {:?}", s.kept));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        say(format!("{}: kept ({what})", names[vm]));
    };
    // vm-h1: its VMM asks and goes away before the answer can be sent (the agent is stopped
    // meanwhile, so that the answer does not go out first).
    let gone = raw_client().unwrap_or_else(|e| f.fail(format!("{e}")));
    let ask = ToAgent::Session {
        name: names[0].clone(),
        pid: std::process::id(),
    };
    let agent = f
        .agent
        .as_ref()
        .and_then(|a| rustix::process::Pid::from_raw(a.id() as i32))
        .unwrap_or_else(|| f.fail("no agent to stop"));
    let mut signal = |sig| {
        rustix::process::kill_process(agent, sig)
            .unwrap_or_else(|e| f.fail(format!("signalling the agent: {e}")))
    };
    signal(rustix::process::Signal::STOP);
    let sent = socket::send(&gone, &ask, None::<&std::os::fd::OwnedFd>);
    drop(gone);
    signal(rustix::process::Signal::CONT);
    if let Err(e) = sent {
        f.fail(format!("asking for {}: {e}", names[0]));
    }
    kept(f, 1, 0, "its VMM went away before the answer");
    // vm-h2: its VMM gets the session, retrieves the memfd, and dies before it releases it.
    {
        use std::io::{Read, Seek};
        let c = f.client();
        let (session, retrieved) = c
            .session(&SessionName::new(&names[1]).expect("a valid name"))
            .unwrap_or_else(|e| f.fail(format!("{}: {e}", names[1])));
        let mut ram = std::fs::File::from(
            session
                .retrieve(HANDOVER_TOKEN)
                .unwrap_or_else(|e| f.fail(format!("{}: retrieving: {e}", names[1]))),
        );
        let mut page = [0u8; 4096];
        // The memfd comes back where its previous kernel's writer left it: at its end.
        if !retrieved
            || ram
                .rewind()
                .and_then(|()| ram.read_exact(&mut page))
                .is_err()
        {
            f.fail(format!("{}: not the previous kernel's memfd", names[1]));
        }
    }
    kept(f, 2, 1, "its VMM died after retrieving its memfd");
    // vm-h3: forgotten before anyone took it over, so no user owns it; a user of the VMMs'
    // group asks for it: refused, and the agent keeps it for root.
    if let Err(e) = f.client().forget(&names[2]) {
        f.fail(format!("forgetting {}: {e}", names[2]));
    }
    let me = std::env::current_exe().unwrap_or_else(|e| f.fail(format!("{e}")));
    let got = ask_as(f, &me, (1000, VMM_GID, 0), "session", &names[2]);
    if got != libc::EPERM {
        f.fail(format!("user 1000 asking for {}: errno {got}", names[2]));
    }
    kept(f, 3, 2, "no user owns it, and a user asked");
    // vm-h1 again: its VMM gets it and gives it back on purpose (as a VMM that cannot read its
    // guest's state does); the agent says it keeps it.
    {
        let c = f.client();
        let got = c
            .session(&SessionName::new(&names[0]).expect("a valid name"))
            .and_then(|(session, retrieved)| {
                c.give_back()?;
                Ok((session, retrieved))
            });
        match got {
            Ok((_, true)) => {}
            r => f.fail(format!("{}: taken and given back: {r:?}", names[0])),
        }
        // Its second give-back is refused: it holds nothing of the previous kernel any more.
        if c.give_back().is_ok() {
            f.fail("a second give-back was taken");
        }
    }
    kept(f, 3, 0, "its VMM gave it back");
    let resumed: Vec<Client> = names.iter().map(|n| handover_resume(f, n)).collect();
    let s = f.status();
    if !s.lost.is_empty() || !s.incoming.is_empty() || !s.kept.is_empty() {
        f.fail(format!("after the resumes: {s:?}"));
    }
    // The registry, kept before the previous agent's session was finished: this boot's, in
    // this agent's format.
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_else(|e| f.fail(format!("boot_id: {e}")));
    let boot_id = boot_id.trim();
    let registry = Path::new(SOCKET).with_extension("registry");
    let data = std::fs::read(&registry).unwrap_or_else(|e| f.fail(format!("the registry: {e}")));
    match Registry::decode(&data, boot_id) {
        Ok(Stored::ThisBoot(r))
            if r.known.iter().eq(&names)
                && r.incoming.is_empty()
                && r.owners.len() == names.len()
                && r.owners.values().all(|&uid| uid == 0) => {}
        r => f.fail(format!("the registry reads {r:?}")),
    }
    if !matches!(Registry::decode(&data, "another"), Ok(Stored::OtherBoot(b)) if b == boot_id) {
        f.fail("the registry does not say its boot");
    }
    say("the registry is this boot's and knows its VMs");

    // Clients that do not speak the agent's protocol.
    for (first, want, what) in [
        (
            ToAgent::Status,
            libc::EPROTO,
            "a client that does not say hello",
        ),
        (
            ToAgent::Hello {
                version: kvm_luo_protocol::protocol::PROTOCOL_VERSION + 1,
            },
            libc::EPROTONOSUPPORT,
            "a client of a later version",
        ),
    ] {
        match first_answer(&first) {
            Ok((errno, message, true)) if errno == want => say(format!("{what}: {message}")),
            r => f.fail(format!("{what}: {r:?}")),
        }
    }
    drop(resumed);

    // A registry this agent cannot read stops it before it serves; one of another boot is
    // not read.
    f.stop_agent();
    let text = String::from_utf8_lossy(&data).into_owned();
    let later = text.replacen(r#""version":1"#, r#""version":2"#, 1);
    for bad in [later, text[..text.len() / 2].to_string()] {
        if let Err(e) = std::fs::write(&registry, &bad) {
            f.fail(format!("writing the registry: {e}"));
        }
        let (code, out) = agent_exits(f);
        if code != Some(1) || !out.contains("move the file aside") {
            f.fail(format!(
                "an agent with the registry {bad:?}: exit {code:?}, {out:?}"
            ));
        }
        say(format!("a registry it cannot read: {}", out.trim()));
    }
    if let Err(e) = std::fs::write(&registry, text.replacen(boot_id, "another-boot", 1)) {
        f.fail(format!("writing the registry: {e}"));
    }
    f.start_agent();
    let s = f.status();
    if !s.incoming.is_empty() || !s.lost.is_empty() {
        f.fail(format!("with another boot's registry: {s:?}"));
    }
    // Its VMs are not this kernel's: the file is this boot's again, without them.
    let now = std::fs::read_to_string(&registry).unwrap_or_default();
    if !now.contains(boot_id) || now.contains("vm-h") {
        f.fail(format!("the registry after another boot's: {now}"));
    }
    say("another boot's registry was not read");
}

/// Runs the agent, which must exit within 10 s: its exit code and what it logged.
fn agent_exits(f: &mut Fleet) -> (Option<i32>, String) {
    use std::io::Read;
    let _ = std::fs::remove_file(SOCKET);
    let mut child = Command::new(&f.agent_bin)
        .args(["--socket", SOCKET])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| f.fail(format!("starting the agent: {e}")));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                f.fail("the agent did not exit");
            }
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stderr.take() {
        let _ = o.read_to_string(&mut out);
    }
    (status.code(), out)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("--creds-client") => creds_client(&argv[2..]),
        Some(mode @ ("--creds" | "--stalls")) => {
            let mut f = Fleet::new(format!("agent_{}", mode.trim_start_matches("--")));
            if mode == "--creds" {
                creds(&mut f);
            } else {
                stalls(&mut f);
            }
            f.stop_all();
            say("PASS");
            return;
        }
        Some("--handover") => {
            let stage = match argv.get(2..).unwrap_or_default() {
                [s, n] if s == "-s" => n.parse().unwrap_or(0),
                _ => 0,
            };
            if !(1..=2).contains(&stage) {
                eprintln!("usage: kvm-luo-fleet --handover -s 1|2");
                exit(2)
            }
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            let mut f = Fleet::new(test_name(&cmdline));
            handover(&mut f, stage, &cmdline);
            f.stop_all();
            say("PASS");
            return;
        }
        _ => {}
    }
    let a = args();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut f = Fleet::new(test_name(&cmdline));
    if a.refuses {
        refuses(&mut f, &a, &cmdline);
    } else if a.stage == 1 {
        stage1(&mut f, &a, &cmdline);
    } else {
        stage2(&mut f, &a);
    }
    f.stop_all();
    say("PASS");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_kernel_gets_stage_2() {
        assert_eq!(
            next_cmdline("console=ttyS0 klu.test=x klu.stage=1 klu.arg.a=1 quiet\n"),
            "console=ttyS0 klu.test=x quiet klu.stage=2"
        );
        assert_eq!(test_name("a klu.test=agent_fleet b"), "agent_fleet");
    }
}
