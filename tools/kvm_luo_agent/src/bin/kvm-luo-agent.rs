// SPDX-License-Identifier: GPL-2.0
//! `kvm-luo-agent [--socket PATH] [--group GID] [--operator-group GID]`: holds
//! `/dev/liveupdate` for a KVM host, hands each VMM a LUO session of its own over a Unix socket,
//! performs the live update when an operator asks and every VMM is ready, and in the new kernel
//! hands each VMM the session kept for it. The protocol: `kvm_luo_protocol::protocol`.
//!
//! Who may do what follows from the credentials the kernel gives for each connection
//! (`SO_PEERCRED`), not from what a client says: the socket is open to root, and to the group
//! `--group` if given (for VMMs that do not run as root); a VM belongs to the user whose VMM
//! first asked for its session, and no other user gets its session; updates and `forget` are
//! for root and the group `--operator-group` (the peer's effective group).
//!
//! No client can hold the others up for long: the agent's lock is not held while it sends
//! events and answers, but for the answer that hands a VMM its session (sent under it, so that
//! the session is either handed over and recorded or neither); a send that blocks for
//! [`SEND_TIMEOUT`] cuts its client off; at most
//! `--max-connections` are served at once, an update's `timeout_ms` is refused above
//! `--max-timeout` seconds, and an armed update the operator neither commits nor cancels
//! within `--commit-wait` seconds is cancelled (every VMM resumes its guest).
//!
//! Nothing of the previous kernel is lost in the agent's own failures: the registry (what it
//! knows, in a file next to its socket, with its format and the boot it belongs to) is written
//! before the previous agent's handover session is finished; a session of the previous kernel
//! that could not be handed to its VMM is kept and handed to the next VMM that asks for it.

use kvm_luo_agent::fleet::{ConnId, Fleet, Gone, Readiness, Refusal, Registry, Stored};
use kvm_luo_protocol::protocol::{
    FromAgent, Handover, ToAgent, UpdateRequest, AGENT_SESSION, DEFAULT_SOCKET, HANDOVER_VERSION,
    PROTOCOL_MIN_VERSION, PROTOCOL_VERSION,
};
use kvm_luo_protocol::socket::{self, Peer};
use liveupdate::{Device, Session, SessionName};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::exit;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long an armed update waits for the operator's commit, unless told otherwise.
const COMMIT_WAIT: Duration = Duration::from_secs(60);
/// The longest an update may wait for its VMMs to prepare, unless told otherwise.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// How many connections are served at once, unless told otherwise.
const MAX_CONNECTIONS: u64 = 256;
/// How many of them only root may take.
const ROOT_CONNECTIONS: usize = 4;
/// The token of the agent's own state in its session.
const HANDOVER_TOKEN: u64 = 1;

/// Logs what the agent does (`log`'s info level). A write that fails is dropped: the agent
/// does not depend on anyone reading (a panic would close every session it holds).
fn say(msg: impl AsRef<str>) {
    log::info!("{}", msg.as_ref());
}

/// Logs something that went wrong and that the agent got over.
fn warn(msg: impl AsRef<str>) {
    log::warn!("{}", msg.as_ref());
}

/// Logs why the agent stops, and stops it.
fn die(msg: impl AsRef<str>) -> ! {
    log::error!("{}", msg.as_ref());
    exit(1)
}

/// Logs on standard error with levels and timestamps (`RUST_LOG` chooses the level, `info`
/// unless told otherwise). Under systemd, whose journal keeps the time, each line carries its
/// priority instead (`<N>`, sd-daemon(3)).
fn init_log() {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .format(move |buf, record| {
            if journal {
                let priority = match record.level() {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    log::Level::Debug | log::Level::Trace => 7,
                };
                writeln!(buf, "<{priority}>{}", record.args())
            } else {
                writeln!(
                    buf,
                    "{} {:<5} agent: {}",
                    buf.timestamp_millis(),
                    record.level(),
                    record.args()
                )
            }
        })
        .init();
}

struct Shared {
    fleet: Fleet<Session>,
    /// Each connection's socket, to send it events.
    conns: HashMap<ConnId, Arc<UnixStream>>,
    /// The agent's own session while an update is armed.
    handover: Option<Session>,
}

struct Agent {
    dev: Device,
    /// Besides root, the group whose members may start updates and forget VMs.
    operator_gid: Option<u32>,
    /// The longest `timeout_ms` of an update.
    max_timeout: Duration,
    /// How long an armed update waits for the operator's commit or cancel.
    commit_wait: Duration,
    /// Where the registry is kept, and what was written there last.
    registry_path: PathBuf,
    saved: Mutex<Option<Registry>>,
    /// This kernel's boot ID, which the registry carries.
    boot_id: String,
    /// The previous kernel's agent's session: finished once the registry that takes its
    /// place is written.
    previous: Mutex<Option<Session>>,
    shared: Mutex<Shared>,
    /// Signalled when a VMM answers, reports or goes away.
    changed: Condvar,
}

fn refusal(errno: i32, message: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        message: message.into(),
    }
}

fn io_refusal(what: &str, e: &io::Error) -> Refusal {
    refusal(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

fn lu_refusal(what: &str, e: &liveupdate::Error) -> Refusal {
    refusal(e.errno(), format!("{what}: {e}"))
}

/// How often an update says which VMMs it still waits for.
const PROGRESS: Duration = Duration::from_secs(5);

/// Tells systemd (if it started the agent) what the agent is doing.
fn notify_status(line: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(line)]);
}

/// How long a send may block on a client that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

fn send(sock: &UnixStream, msg: &FromAgent) {
    // A client that went away is seen by its connection's reader. One that does not read
    // (the send timed out) is cut off, so that its reader sees it go.
    if socket::send(sock, msg, None::<&OwnedFd>).is_err() {
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
}

fn send_refusal(sock: &UnixStream, r: Refusal) {
    send(
        sock,
        &FromAgent::Error {
            errno: r.errno,
            message: r.message,
        },
    );
}

/// Opens `path`, which must be a regular file: the agent (root) does not open a FIFO or a
/// device an operator names, which could block it or do something on open.
fn open_regular(path: &str) -> io::Result<File> {
    // O_PATH opens nothing: the file's type is checked before it is opened for reading.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)?;
    if !handle.metadata()?.is_file() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    File::open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

/// What loading `kernel` takes: the kernel and the initramfs, open, and the command line.
fn kernel_files(
    kernel: &str,
    initrd: Option<&str>,
    cmdline: Option<&str>,
) -> Result<(File, Option<File>, CString), Refusal> {
    let k = open_regular(kernel).map_err(|e| io_refusal(&format!("kernel {kernel}"), &e))?;
    let i = initrd
        .map(|p| open_regular(p).map_err(|e| io_refusal(&format!("initrd {p}"), &e)))
        .transpose()?;
    let current = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| io_refusal("/proc/cmdline", &e))?
        .trim_end()
        .to_string();
    let cmdline = cmdline.map_or_else(|| current.clone(), str::to_string);
    kvm_luo_agent::fleet::check_next_cmdline(&cmdline, &current)?;
    let cmd =
        CString::new(cmdline).map_err(|_| refusal(libc::EINVAL, "NUL in the command line"))?;
    Ok((k, i, cmd))
}

/// The refusal of an update without a kernel. The agent loads it itself: only an image loaded
/// with `kexec_file_load()` carries KHO, and so the sessions (`kexec -l` may use
/// `kexec_load()`), and only then is its command line checked.
fn no_kernel() -> Refusal {
    refusal(
        libc::EINVAL,
        "give the kernel to update into: the agent loads it itself (with kexec_file_load(), \
         which hands the sessions over, and with a command line it checks)",
    )
}

/// Loads `kernel` for the kexec (`kexec_file_load`).
///
/// Through `libc::syscall`: neither rustix nor nix wraps `kexec_file_load`.
fn load_kernel(kernel: &str, initrd: Option<&str>, cmdline: Option<&str>) -> Result<(), Refusal> {
    let (k, i, cmd) = kernel_files(kernel, initrd, cmdline)?;
    const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 4;
    let flags = if i.is_none() {
        KEXEC_FILE_NO_INITRAMFS
    } else {
        0
    };
    let kernel_fd = libc::c_long::from(k.as_raw_fd());
    let initrd_fd = libc::c_long::from(i.as_ref().map_or(-1, |f| f.as_raw_fd()));
    let len = cmd.as_bytes_with_nul().len() as libc::c_ulong;
    // SAFETY: Open fds (or -1 with NO_INITRAMFS) and a NUL-terminated command line of the
    // length given, which the kernel only reads; every argument is register-sized.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel_fd,
            initrd_fd,
            len,
            cmd.as_ptr(),
            flags,
        )
    };
    if ret < 0 {
        return Err(io_refusal("kexec_file_load", &io::Error::last_os_error()));
    }
    Ok(())
}

fn unload_kernel() {
    const KEXEC_FILE_UNLOAD: libc::c_ulong = 1;
    // SAFETY: Unloading reads no fd and no pointer; every argument is register-sized.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1 as libc::c_long,
            -1 as libc::c_long,
            0 as libc::c_ulong,
            std::ptr::null::<libc::c_char>(),
            KEXEC_FILE_UNLOAD,
        )
    };
    if ret < 0 {
        warn(format!(
            "unloading the kernel: {}",
            io::Error::last_os_error()
        ));
    }
}

fn kernel_loaded() -> bool {
    std::fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|s| s.trim() == "1")
}

/// A memfd holding `data`.
fn memfd_with(data: &[u8]) -> io::Result<File> {
    let mut f = File::from(rustix::fs::memfd_create(
        "kvm-luo-agent",
        rustix::fs::MemfdFlags::CLOEXEC,
    )?);
    f.write_all(data)?;
    Ok(f)
}

impl Shared {
    /// The sockets of `conns`, to send to them without the lock.
    fn socks(&self, conns: &[ConnId]) -> Vec<Arc<UnixStream>> {
        conns
            .iter()
            .filter_map(|c| self.conns.get(c).cloned())
            .collect()
    }
}

impl Agent {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the registry in its file when it changed, for an agent restarted in this kernel;
    /// once it is written, the previous kernel's agent's session is finished.
    fn save(&self, sh: &Shared) {
        let reg = sh.fleet.registry();
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        if saved.as_ref() == Some(reg) {
            return;
        }
        let data = reg.encode(&self.boot_id);
        // Written whole in a new file of the agent's alone (mode 0600, a name nobody can have
        // put a link at), then renamed over the registry.
        let dir = self
            .registry_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let written = tempfile::Builder::new()
            .prefix(".kvm-luo-agent.registry")
            .tempfile_in(dir)
            .and_then(|mut f| {
                // No fsync: the file outlives a restart of the agent, not of the kernel.
                f.write_all(&data)?;
                f.persist(&self.registry_path).map_err(|e| e.error)?;
                Ok(())
            });
        match written {
            Ok(()) => {
                *saved = Some(reg.clone());
                let previous = self
                    .previous
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(Err(e)) = previous.map(|s| s.finish()) {
                    warn(format!("finishing the previous agent's session: {e}"));
                }
            }
            Err(e) => warn(format!(
                "keeping the registry in {}: {e}",
                self.registry_path.display()
            )),
        }
    }

    /// The session `name` for `conn`: the previous kernel's if there is one, a new one
    /// otherwise.
    fn session(
        &self,
        conn: ConnId,
        sock: &UnixStream,
        name: &str,
        peer: Peer,
    ) -> Result<(), Refusal> {
        let pid = peer.pid;
        let n = SessionName::new(name).map_err(|e| lu_refusal("session name", &e))?;
        if name.starts_with(AGENT_SESSION) {
            return Err(refusal(
                libc::EPERM,
                format!("names that start with {AGENT_SESSION} are the agent's own"),
            ));
        }
        let mut sh = self.lock();
        sh.fleet.may_claim(conn, name, peer.uid)?;
        let (session, retrieved) = match sh.fleet.take_kept(name) {
            Some(kept) => (kept, true),
            None => self.obtain(&mut sh, name, &n, peer.uid)?,
        };
        // Under the lock, so without waiting: a VMM that cannot take the answer at once (it left
        // earlier answers unread) is refused.
        let handed = sock.set_nonblocking(true).and_then(|()| {
            let sent = socket::send(sock, &FromAgent::Session { retrieved }, Some(&session));
            // A socket that cannot wait again could not be served: cut it off.
            if sock.set_nonblocking(false).is_err() {
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
            sent
        });
        if let Err(e) = handed {
            if retrieved {
                // A session is retrieved once: the agent keeps it for the next VMM that asks.
                sh.fleet.keep(name, peer.uid, session);
                self.save(&sh);
                say(format!(
                    "{name}: the previous kernel's session could not be handed over ({e}); \
                     kept for the next VMM that asks for it"
                ));
            }
            return Err(io_refusal("handing over the session", &e));
        }
        say(format!(
            "{name} (pid {pid}, user {}): {} session",
            peer.uid,
            if retrieved {
                "the previous kernel's"
            } else {
                "a new"
            }
        ));
        sh.fleet
            .attach(conn, name, pid, peer.uid, session, retrieved);
        Ok(())
    }

    /// The session `name` (`n`) for a VMM of user `uid` that may have it: the previous
    /// kernel's if there is one (`true`), a new one otherwise.
    fn obtain(
        &self,
        sh: &mut Shared,
        name: &str,
        n: &SessionName,
        uid: u32,
    ) -> Result<(Session, bool), Refusal> {
        // Looked for whoever asks: a session the kernel kept under a name no user owns (the
        // handover was unreadable, or an operator forgot the VM) is root's to take over. Another
        // user must not get a new session of that name (the kernel would allow it), nor may the
        // kept one stay where nobody knows it: the agent keeps it, root's.
        let may_retrieve = uid == 0 || sh.fleet.has_owner(name);
        Ok(match self.dev.retrieve_session(n) {
            Ok(s) if may_retrieve => (s, true),
            Ok(s) => {
                sh.fleet.keep(name, 0, s);
                self.save(sh);
                say(format!(
                    "{name}: a session of the previous kernel that no user owns, asked for by \
                     user {uid}: kept for root"
                ));
                return Err(refusal(
                    libc::EPERM,
                    format!("a session named {name} is kept that no user owns: root may claim it"),
                ));
            }
            Err(e) if sh.fleet.is_incoming(name) => {
                // The previous kernel's agent handed it over, and it is not there.
                sh.fleet.mark_lost(name);
                self.save(sh);
                return Err(refusal(
                    libc::EIO,
                    format!(
                        "the previous kernel's session {name} cannot be taken over ({e}): \
                         its guest is lost; ask again for a new session"
                    ),
                ));
            }
            Err(e) if !e.is_not_found() && e.errno() != libc::EINVAL => {
                return Err(lu_refusal("retrieving the session", &e))
            }
            // None (or already retrieved, by an agent that did not keep its registry).
            Err(_) => match self.dev.create_session(n) {
                Ok(s) => (s, false),
                Err(e) if e.is_exists() => {
                    return Err(refusal(
                        libc::EEXIST,
                        format!(
                            "a session named {name} is open already, held by a process this \
                             agent does not know (was the agent restarted while a VMM held it?)"
                        ),
                    ))
                }
                Err(e) => return Err(lu_refusal("creating the session", &e)),
            },
        })
    }

    /// Tells every VMM the update will not happen, and closes the sessions the agent holds
    /// (before telling them, so that a VMM asking again at once gets a new one).
    fn abort(&self, reason: &str) {
        let socks = {
            let mut sh = self.lock();
            let (conns, sessions) = sh.fleet.abort();
            drop(sessions);
            sh.handover = None;
            sh.socks(&conns)
        };
        for s in &socks {
            send(
                s,
                &FromAgent::Abort {
                    reason: reason.into(),
                },
            );
        }
        let line = format!("update refused: {reason}; every VMM told to resume");
        notify_status(&line);
        say(line);
    }

    /// Tells the VMMs `conns` of the update this thread owns to prepare, and waits until
    /// all are ready; then the agent's own state goes into its session.
    fn prepare(&self, conns: &[ConnId], timeout: Duration) -> Result<Vec<String>, Refusal> {
        let deadline = Instant::now() + timeout;
        let socks = self.lock().socks(conns);
        say(format!("update: {} VMMs told to prepare", conns.len()));
        for s in &socks {
            send(s, &FromAgent::Prepare);
        }
        let start = Instant::now();
        let mut progress = start + PROGRESS;
        let mut sh = self.lock();
        loop {
            match sh.fleet.readiness() {
                Readiness::AllReady(_) => break,
                Readiness::Refused(r) => return Err(r),
                Readiness::Waiting(names) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(sh.fleet.timed_out(timeout.as_secs_f64()));
                    }
                    if now >= progress {
                        // Which VMM the update waits for, and what it last said.
                        let status = sh.fleet.status();
                        let waiting: Vec<String> = names
                            .iter()
                            .map(|n| match status.vmms.iter().find(|v| &v.name == n) {
                                Some(v) if !v.detail.is_empty() => {
                                    format!("{n} ({:?}: {})", v.state, v.detail)
                                }
                                Some(v) => format!("{n} ({:?})", v.state),
                                None => n.clone(),
                            })
                            .collect();
                        let line = format!(
                            "update: waiting {:.0} s for {}",
                            start.elapsed().as_secs_f64(),
                            waiting.join(", ")
                        );
                        progress = now + PROGRESS;
                        // Said without the lock: a log or systemd that blocks holds up no VMM.
                        drop(sh);
                        notify_status(&line);
                        say(line);
                        sh = self.lock();
                        continue;
                    }
                    let wait = (deadline - now).min(progress - now);
                    sh = self
                        .changed
                        .wait_timeout(sh, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        let sessions = sh.fleet.names();
        let owners = sessions
            .iter()
            .filter_map(|n| Some((n.clone(), *sh.fleet.registry().owners.get(n)?)))
            .collect();
        let handover = Handover {
            version: HANDOVER_VERSION,
            sessions,
            owners,
        };
        let name = SessionName::new(AGENT_SESSION).map_err(|e| lu_refusal("name", &e))?;
        let own = self
            .dev
            .create_session(&name)
            .map_err(|e| lu_refusal("the agent's session", &e))?;
        let data = memfd_with(&kvm_luo_protocol::protocol::encode(&handover))
            .map_err(|e| io_refusal("the agent's state", &e))?;
        own.preserve(&data, HANDOVER_TOKEN)
            .map_err(|e| lu_refusal("preserving the agent's state", &e))?;
        let names = sh.fleet.arm()?;
        sh.handover = Some(own);
        Ok(names)
    }

    /// Refused if an update may not wait `timeout_ms` for its VMMs.
    fn check_timeout(&self, timeout_ms: u64) -> Result<Duration, Refusal> {
        let timeout = Duration::from_millis(timeout_ms);
        if timeout > self.max_timeout {
            return Err(refusal(
                libc::EINVAL,
                format!(
                    "a timeout of {timeout_ms} ms is above this agent's maximum of {} ms",
                    self.max_timeout.as_millis()
                ),
            ));
        }
        Ok(timeout)
    }

    /// Every check of an update, with nothing loaded or stopped: answers what it would do.
    fn check_update(&self, sock: &UnixStream, req: UpdateRequest) -> Result<(), Refusal> {
        self.check_timeout(req.timeout_ms)?;
        let vmms = {
            let sh = self.lock();
            sh.fleet.check_update()?;
            sh.fleet.names()
        };
        let kernel_loaded = match &req.kernel {
            Some(k) => {
                kernel_files(k, req.initrd.as_deref(), req.cmdline.as_deref()).map(|_| true)?
            }
            None => kernel_loaded(),
        };
        send(
            sock,
            &FromAgent::WouldUpdate {
                vmms,
                kernel_loaded,
            },
        );
        Ok(())
    }

    /// An operator's update, on its connection.
    fn update(&self, sock: &UnixStream, req: UpdateRequest) -> Result<(), Refusal> {
        if req.dry_run {
            // A client of before check_update: it wants nothing done.
            return Err(refusal(
                libc::EINVAL,
                "a dry run is asked with check_update: use a client of this agent's version",
            ));
        }
        let UpdateRequest {
            kernel,
            initrd,
            cmdline,
            timeout_ms,
            ..
        } = req;
        let timeout = self.check_timeout(timeout_ms)?;
        // The fleet belongs to this update from here; another update is refused without
        // touching this one.
        let conns = self.lock().fleet.begin_update()?;
        let result = self.run_update(sock, &conns, kernel, initrd, cmdline, timeout);
        notify_status(&match &result {
            Ok(()) => "serving; the last update was cancelled".to_string(),
            Err(r) => format!("serving; the last update was refused: {r}"),
        });
        result
    }

    /// The update `conns` were reserved for ([`Fleet::begin_update`]), from loading the kernel
    /// on: returns only if it does not happen.
    fn run_update(
        &self,
        sock: &UnixStream,
        conns: &[ConnId],
        kernel: Option<String>,
        initrd: Option<String>,
        cmdline: Option<String>,
        timeout: Duration,
    ) -> Result<(), Refusal> {
        // The kernel before any guest stops: a wrong path refuses the update with nothing
        // done.
        let loaded = match &kernel {
            Some(k) => load_kernel(k, initrd.as_deref(), cmdline.as_deref()),
            None => Err(no_kernel()),
        };
        if let Err(r) = loaded {
            let gone = self.lock().fleet.unreserve();
            drop(gone);
            return Err(r);
        }
        // Whatever writes back slowly does so before any guest stops, not between the commit
        // and the kexec, when a VMM that went away waits for the update to be over.
        rustix::fs::sync();
        // The kernel goes before the fleet is free for another update to load its own.
        let fail = |r: Refusal| {
            unload_kernel();
            self.abort(&r.message);
            r
        };
        let names = self.prepare(conns, timeout).map_err(fail)?;
        let line = format!("update armed: {} ready", names.join(", "));
        notify_status(&line);
        say(line);
        send(sock, &FromAgent::Armed { vmms: names });
        // The operator commits or cancels on the same connection.
        let _ = sock.set_read_timeout(Some(self.commit_wait));
        let next = socket::recv::<ToAgent>(sock);
        let _ = sock.set_read_timeout(None);
        match next {
            Ok(Some((ToAgent::Commit, _))) => {
                let committing = self.lock().fleet.commit();
                if let Err(r) = committing {
                    return Err(fail(r));
                }
                say("kexec");
                rustix::fs::sync();
                let e = rustix::system::reboot(rustix::system::RebootCommand::Kexec)
                    .map_or_else(io::Error::from, |()| io::Error::other("reboot returned"));
                Err(fail(io_refusal("kexec", &e)))
            }
            Ok(Some((ToAgent::Cancel, _))) => {
                fail(refusal(libc::ECANCELED, "the operator cancelled it"));
                send(sock, &FromAgent::Done);
                Ok(())
            }
            _ => Err(fail(refusal(
                libc::ECANCELED,
                format!(
                    "the operator neither committed nor cancelled within {} s",
                    self.commit_wait.as_secs()
                ),
            ))),
        }
    }

    /// Refused unless `peer` may start updates and forget VMs.
    fn operator(&self, peer: Peer, what: &str) -> Result<(), Refusal> {
        if peer.uid == 0 || Some(peer.gid) == self.operator_gid {
            return Ok(());
        }
        Err(refusal(
            libc::EPERM,
            format!(
                "{what} is for root{}: user {} (group {}) may not",
                self.operator_gid
                    .map_or(String::new(), |g| format!(" and group {g}")),
                peer.uid,
                peer.gid
            ),
        ))
    }

    fn handle(&self, conn: ConnId, sock: &UnixStream, peer: Peer, msg: ToAgent) {
        match msg {
            ToAgent::Session { name, pid } => {
                let result = if pid != peer.pid {
                    Err(refusal(
                        libc::EPERM,
                        format!("pid {pid} is not the caller's ({})", peer.pid),
                    ))
                } else {
                    self.session(conn, sock, &name, peer)
                };
                if let Err(r) = result {
                    say(format!(
                        "{name} (pid {}, user {}): refused: {r}",
                        peer.pid, peer.uid
                    ));
                    send_refusal(sock, r);
                }
            }
            ToAgent::State { state, detail } => {
                let mut sh = self.lock();
                sh.fleet.report(conn, state, detail);
                self.changed.notify_all();
            }
            ToAgent::Ready | ToAgent::NotReady { .. } => {
                let ready = match msg {
                    ToAgent::NotReady { reason } => Err(reason),
                    _ => Ok(()),
                };
                let mut sh = self.lock();
                if let Err(r) = sh.fleet.answer(conn, ready) {
                    say(format!("ignored an answer: {r}"));
                }
                self.changed.notify_all();
            }
            ToAgent::Release => {
                let released = self.lock().fleet.release(conn);
                match released {
                    Ok(session) => drop(session),
                    Err(r) => say(format!("ignored a release: {r}")),
                }
            }
            ToAgent::Status => {
                let status = self.lock().fleet.status();
                send(sock, &FromAgent::Status(status));
            }
            ToAgent::Update(req) => {
                let is_vmm = self.lock().fleet.has_vmm(conn);
                let result = if is_vmm {
                    Err(refusal(
                        libc::EINVAL,
                        "a VMM's connection cannot start an update",
                    ))
                } else {
                    self.operator(peer, "an update")
                        .and_then(|()| self.update(sock, req))
                };
                if let Err(r) = result {
                    send_refusal(sock, r);
                }
            }
            ToAgent::CheckUpdate(req) => {
                // Anyone who may see the status may ask whether an update could start; the
                // kernel's files are looked at for operators only.
                let result = if req.kernel.is_some() {
                    self.operator(peer, "checking a kernel")
                } else {
                    Ok(())
                };
                if let Err(r) = result.and_then(|()| self.check_update(sock, req)) {
                    send_refusal(sock, r);
                }
            }
            ToAgent::GiveBack => {
                let given = {
                    let mut sh = self.lock();
                    let given = sh.fleet.give_back(conn);
                    if given.is_ok() {
                        self.save(&sh);
                    }
                    given
                };
                match given {
                    Ok(name) => {
                        say(format!(
                            "{name}: its VMM gave the previous kernel's session back: kept for \
                             the next VMM that asks for it"
                        ));
                        send(sock, &FromAgent::Done);
                    }
                    Err(r) => send_refusal(sock, r),
                }
            }
            ToAgent::Forget { name } => {
                if let Err(r) = self.operator(peer, "forgetting a VM") {
                    send_refusal(sock, r);
                    return;
                }
                let forgotten = {
                    let mut sh = self.lock();
                    let forgotten = sh.fleet.forget(&name);
                    if forgotten.is_ok() {
                        self.save(&sh);
                    }
                    forgotten
                };
                match forgotten {
                    Ok(kept) => {
                        // What the previous kernel preserved for it is freed.
                        drop(kept);
                        say(format!("forgot {name}"));
                        send(sock, &FromAgent::Done);
                    }
                    Err(r) => send_refusal(sock, r),
                }
            }
            ToAgent::Commit | ToAgent::Cancel => send_refusal(
                sock,
                refusal(libc::EINVAL, "no update is armed on this connection"),
            ),
            ToAgent::Hello { .. } => send_refusal(
                sock,
                refusal(libc::EINVAL, "hello was said on this connection already"),
            ),
        }
    }

    fn serve(&self, conn: ConnId, sock: UnixStream, peer: Peer) {
        if let Err(e) = sock.set_write_timeout(Some(SEND_TIMEOUT)) {
            say(format!("a connection: {e}"));
            return;
        }
        let sock = Arc::new(sock);
        self.lock().conns.insert(conn, sock.clone());
        let mut greeted = false;
        loop {
            match socket::recv::<ToAgent>(&sock) {
                Ok(Some((msg, _fd))) if !greeted => match hello(&msg) {
                    Ok(version) => {
                        greeted = true;
                        send(&sock, &FromAgent::Hello { version });
                    }
                    Err(r) => {
                        send_refusal(&sock, r);
                        break;
                    }
                },
                Ok(Some((msg, _fd))) => {
                    self.handle(conn, &sock, peer, msg);
                    self.save(&self.lock());
                }
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    send_refusal(&sock, refusal(libc::EPROTO, format!("bad request: {e}")));
                    if !greeted {
                        break;
                    }
                }
                Err(e) => {
                    say(format!("a connection: {e}"));
                    break;
                }
            }
        }
        let gone = {
            let mut sh = self.lock();
            sh.conns.remove(&conn);
            let gone = sh.fleet.disconnect(conn);
            if matches!(gone, Gone::Kept(_)) {
                self.save(&sh);
            }
            gone
        };
        self.changed.notify_all();
        match gone {
            Gone::Close(session) => {
                say("a VMM went away; its session is closed");
                drop(session);
            }
            Gone::Kept(name) => say(format!(
                "{name}: its VMM went away before it released the previous kernel's session: \
                 kept for the next VMM that asks for it"
            )),
            Gone::Nothing => {}
        }
    }
}

/// Refused unless `msg` is the hello of a client that speaks this agent's protocol.
/// Returns the version both speak.
fn hello(msg: &ToAgent) -> Result<u32, Refusal> {
    match msg {
        ToAgent::Hello { version }
            if (PROTOCOL_MIN_VERSION..=PROTOCOL_VERSION).contains(version) =>
        {
            Ok(*version)
        }
        ToAgent::Hello { version } => Err(refusal(
            libc::EPROTONOSUPPORT,
            format!(
                "this agent speaks versions {PROTOCOL_MIN_VERSION} to {PROTOCOL_VERSION} of the \
                 protocol, the client version {version}: use a client of one of those"
            ),
        )),
        _ => Err(refusal(
            libc::EPROTO,
            format!("say hello first (version {PROTOCOL_VERSION} of the protocol)"),
        )),
    }
}

/// The registry an agent of this kernel kept at `path`, if any. It says who owns which VM, so
/// it must be a file of the agent's user that nobody else can write, not a link.
fn read_registry(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_file() || meta.nlink() != 1 || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "not a file of user {me} that only it can write: remove it if it is not the agent's"
        )));
    }
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(Some(data))
}

/// What the previous kernel's agent handed over: the VMMs' session names and owners, and its
/// session, to finish once the registry is written (`Ok`). A handover that cannot be read
/// (`Err`) is not finished: its session is held open as long as this agent runs, and updates
/// wait for an operator.
fn handover(dev: &Device) -> (Handover, Result<Option<Session>, Session>) {
    // Two builds of the agent kept format 1 in a session named after it; it is read the same.
    let mut found = None;
    for name in [AGENT_SESSION, "kvm-luo-agent-v1"] {
        match dev.retrieve_session(&SessionName::new(name).expect("a valid name")) {
            Ok(s) => {
                found = Some((name, s));
                break;
            }
            Err(e) if e.is_not_found() => {}
            // Nothing is taken yet: refusing to start loses nothing, going on without it would
            // (an agent restarted later no longer looks for it).
            Err(e) => die(format!(
                "retrieving the previous agent's session {name}: {e}; start the agent again"
            )),
        }
    }
    let Some((name, session)) = found else {
        return (Handover::default(), Ok(None));
    };
    let read = || -> io::Result<Handover> {
        let mut f = File::from(session.retrieve(HANDOVER_TOKEN)?);
        let mut buf = Vec::new();
        f.rewind()?;
        f.read_to_end(&mut buf)?;
        kvm_luo_protocol::protocol::decode_versioned(
            &buf,
            HANDOVER_VERSION,
            "the previous kernel's agent's handover",
        )
        .map_err(io::Error::other)
    };
    match read() {
        Ok(h) => (h, Ok(Some(session))),
        Err(e) => {
            log::error!(
                "{name}: {e}. The VMs' sessions it names stay in the kernel, but this agent \
                 does not know their names or owners: root's VMMs can claim them by name, and \
                 updates wait until an operator forgets {AGENT_SESSION}. Its session is held \
                 unfinished until this agent stops"
            );
            let unread = Handover {
                version: HANDOVER_VERSION,
                sessions: Vec::new(),
                owners: Default::default(),
            };
            (unread, Err(session))
        }
    }
}

/// This kernel's boot ID.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| die(format!("/proc/sys/kernel/random/boot_id: {e}")))
}

/// The agent's command line.
#[derive(clap::Parser)]
#[command(
    name = "kvm-luo-agent",
    version,
    about = "Holds /dev/liveupdate for a KVM host: hands each VMM a LUO session of its own, \
             performs the live update when an operator asks and every VMM is ready, and hands \
             each VMM its session back in the new kernel (Documentation/virt/kvm/luo.rst)"
)]
struct Args {
    /// The Unix socket to listen on; the registry is kept next to it.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The group whose members may connect (the socket is then mode 0660); root only
    /// otherwise.
    #[arg(long, value_name = "GID")]
    group: Option<u32>,
    /// The group whose members may start updates and forget VMs, besides root.
    #[arg(long, value_name = "GID")]
    operator_group: Option<u32>,
    /// How many connections are served at once (the last 4 for root only).
    #[arg(long, value_name = "N", default_value_t = MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u64).range(ROOT_CONNECTIONS as u64 + 1..))]
    max_connections: u64,
    /// The longest an update may wait for its VMMs, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = MAX_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    max_timeout: u64,
    /// How long an armed update waits for the operator's commit, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = COMMIT_WAIT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    commit_wait: u64,
}

fn main() {
    init_log();
    let args = <Args as clap::Parser>::parse();
    let path = args.socket;
    let (group, operator_gid) = (args.group, args.operator_group);
    let max_connections = usize::try_from(args.max_connections).unwrap_or(usize::MAX);
    let max_timeout = Duration::from_secs(args.max_timeout);
    let commit_wait = Duration::from_secs(args.commit_wait);
    let dev = Device::open().unwrap_or_else(|e| {
        if e.is_busy() {
            die(
                "another process holds /dev/liveupdate (another agent, or a VMM using it directly)",
            );
        }
        die(format!("{e}"))
    });
    if Path::new(&path).exists() {
        if socket::connect(&path).is_ok() {
            die(format!("an agent listens on {} already", path.display()))
        }
        let _ = std::fs::remove_file(&path);
    }
    // The socket is made without access for others, and opened to `--group` only once it
    // belongs to that group.
    let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listening = socket::listen(&path);
    rustix::process::umask(umask);
    let listener = listening
        .and_then(|l| {
            if let Some(gid) = group {
                std::os::unix::fs::chown(&path, None, Some(gid))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
            }
            Ok(l)
        })
        .unwrap_or_else(|e| die(format!("listening on {}: {e}", path.display())));
    // Only once nothing can stop the agent from serving: the state is read once. An agent
    // restarted in the same kernel finds its registry in its file (a kexec clears it); the
    // first agent of a kernel finds what the previous kernel's agent handed over.
    let registry_path = path.with_extension("registry");
    let boot_id = boot_id();
    let kept = match read_registry(&registry_path) {
        Ok(Some(data)) => Registry::decode(&data, &boot_id)
            .unwrap_or_else(|e| die(format!("{}: {e}", registry_path.display()))),
        Err(e) => die(format!("{}: {e}", registry_path.display())),
        Ok(None) => Stored::OtherBoot(String::new()),
    };
    let (registry, previous, unreadable) = match kept {
        Stored::ThisBoot(r) => (r, None, None),
        Stored::OtherBoot(other) => {
            if !other.is_empty() {
                say(format!(
                    "{}: kept in boot {other}, not this one ({boot_id}): not read",
                    registry_path.display()
                ));
            }
            let (
                Handover {
                    sessions, owners, ..
                },
                previous,
            ) = handover(&dev);
            let registry = Registry {
                owners: owners
                    .into_iter()
                    .filter(|(name, _)| sessions.contains(name))
                    .collect(),
                incoming: sessions.into_iter().collect(),
                ..Default::default()
            };
            match previous {
                Ok(p) => (registry, p, None),
                Err(held) => (
                    Registry {
                        handover_unread: true,
                        ..registry
                    },
                    None,
                    Some(held),
                ),
            }
        }
    };
    let list = |names: &std::collections::BTreeSet<String>| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    say(format!(
        "listening on {}; sessions from the previous kernel: {}; VMs known: {}; lost: {}",
        path.display(),
        list(&registry.incoming),
        list(&registry.known),
        list(&registry.lost)
    ));
    let agent = Arc::new(Agent {
        dev,
        operator_gid,
        max_timeout,
        commit_wait,
        registry_path,
        saved: Mutex::new(None),
        boot_id,
        previous: Mutex::new(previous),
        shared: Mutex::new(Shared {
            fleet: Fleet::new(registry),
            conns: HashMap::new(),
            handover: None,
        }),
        changed: Condvar::new(),
    });
    agent.save(&agent.lock());
    // Held, unfinished, as long as the agent runs.
    let _unreadable = unreadable;
    // Serving from here: systemd (Type=notify) may start what needs the agent.
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("serving"),
        ],
    );
    let next = AtomicU64::new(1);
    let live = Arc::new(AtomicUsize::new(0));
    for sock in listener.incoming() {
        match sock {
            Ok(sock) => {
                let peer = match socket::peer(&sock).and_then(|p| {
                    socket::make_room(&sock)?;
                    Ok(p)
                }) {
                    Ok(peer) => peer,
                    Err(e) => {
                        say(format!("a connection: {e}"));
                        continue;
                    }
                };
                // The last few connections are root's, so that an operator can always step in.
                let bound = if peer.uid == 0 {
                    max_connections
                } else {
                    max_connections.saturating_sub(ROOT_CONNECTIONS)
                };
                if live.load(Ordering::Relaxed) >= bound {
                    let _ = sock.set_write_timeout(Some(Duration::from_millis(100)));
                    send_refusal(
                        &sock,
                        refusal(
                            libc::EAGAIN,
                            format!("{bound} connections already: try again later"),
                        ),
                    );
                    continue;
                }
                let agent = agent.clone();
                let conn = next.fetch_add(1, Ordering::Relaxed);
                live.fetch_add(1, Ordering::Relaxed);
                let served = live.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name(format!("conn{conn}"))
                    .spawn(move || {
                        agent.serve(conn, sock, peer);
                        served.fetch_sub(1, Ordering::Relaxed);
                    })
                {
                    live.fetch_sub(1, Ordering::Relaxed);
                    say(format!("a connection: {e}"));
                }
            }
            Err(e) => {
                say(format!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
