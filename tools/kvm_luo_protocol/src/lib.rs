// SPDX-License-Identifier: GPL-2.0
//! The protocol between `kvm-luo-agent` (tools/kvm_luo_agent), the live-update agent of a KVM
//! host with several VMs, and its clients: the VMMs and the operator's `kvm-luo-ctl`.
//!
//! Only one process can hold `/dev/liveupdate`. The agent holds it, hands each VMM a LUO session
//! of its own over a Unix socket, and performs the live update once every VMM says its guest is
//! preserved; in the new kernel it hands each restarted VMM the session the previous kernel kept
//! for it. The messages are in [`protocol`], the socket in [`socket`]; [`Client`] speaks it. A
//! VMM depends on this crate, not on the agent.

#![deny(missing_docs)]

pub mod protocol;
pub mod socket;

use liveupdate::{Session, SessionName};
use protocol::{FromAgent, Status, ToAgent, UpdateRequest, VmmState};
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// An error a client sees.
#[derive(Debug)]
pub enum Error {
    /// Talking to the agent failed, or it went away (`ErrorKind::ConnectionAborted`).
    Io(io::Error),
    /// The agent refused the request.
    Refused {
        /// The errno that says best why.
        errno: i32,
        /// What the agent said.
        message: String,
    },
    /// The agent answered something this client did not expect.
    Protocol(String),
    /// The session the agent handed over is not a usable session.
    Session(liveupdate::Error),
}

impl Error {
    /// The errno that says best what happened.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Refused { errno, .. } => *errno,
            Error::Protocol(_) => libc::EPROTO,
            Error::Session(e) => e.errno(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "talking to the agent: {e}"),
            Error::Refused { message, errno } => write!(
                f,
                "the agent refused: {message} ({})",
                io::Error::from_raw_os_error(*errno)
            ),
            Error::Protocol(m) => write!(f, "unexpected answer from the agent: {m}"),
            Error::Session(e) => write!(f, "the session from the agent: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// The result type of the client.
pub type Result<T> = std::result::Result<T, Error>;

/// A connection to the agent.
#[derive(Debug)]
pub struct Client {
    sock: UnixStream,
}

/// An update every VMM is ready for: commit it (the host kexecs) or cancel it.
#[derive(Debug)]
pub struct Armed<'a> {
    client: &'a Client,
    /// The VMMs that are ready.
    pub vmms: Vec<String>,
}

impl Client {
    /// Connects to the agent listening at `path`, and says hello: an agent that does not speak
    /// this client's [`protocol::PROTOCOL_VERSION`] refuses it (`EPROTONOSUPPORT`).
    pub fn connect(path: &Path) -> Result<Self> {
        let sock = socket::connect(path).map_err(|e| {
            Error::Io(io::Error::new(
                e.kind(),
                format!("connecting to the agent at {}: {e}", path.display()),
            ))
        })?;
        let client = Self { sock };
        client.send(&ToAgent::Hello {
            version: protocol::PROTOCOL_VERSION,
        })?;
        match client.answer()? {
            (FromAgent::Hello { .. }, _) => Ok(client),
            (m, _) => Err(Error::Protocol(format!("{m:?}"))),
        }
    }

    fn send(&self, msg: &ToAgent) -> Result<()> {
        socket::send(&self.sock, msg, None::<&OwnedFd>)?;
        Ok(())
    }

    /// The answer to the last request. An abort for an update this client has already let
    /// go of, and messages it does not know, are skipped.
    fn answer(&self) -> Result<(FromAgent, Option<OwnedFd>)> {
        loop {
            match socket::recv(&self.sock)? {
                Some((FromAgent::Error { errno, message }, _)) => {
                    return Err(Error::Refused { errno, message })
                }
                Some((FromAgent::Abort { .. } | FromAgent::Unknown, _)) => {}
                Some(m) => return Ok(m),
                None => {
                    return Err(Error::Io(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the agent went away",
                    )))
                }
            }
        }
    }

    /// Asks for the session `name`: the one the previous kernel kept (`true`), or a new one.
    pub fn session(&self, name: &SessionName) -> Result<(Session, bool)> {
        self.send(&ToAgent::Session {
            name: name.as_str().into(),
            pid: std::process::id(),
        })?;
        match self.answer()? {
            (FromAgent::Session { retrieved }, Some(fd)) => {
                let session = Session::from_fd(fd).map_err(Error::Session)?;
                let got = session.name().map_err(Error::Session)?;
                if &got != name {
                    return Err(Error::Protocol(format!("asked for {name}, got {got}")));
                }
                Ok((session, retrieved))
            }
            (m, _) => Err(Error::Protocol(format!("{m:?}"))),
        }
    }

    /// Tells the agent how this VMM is doing.
    pub fn report(&self, state: VmmState, detail: impl Into<String>) -> Result<()> {
        self.send(&ToAgent::State {
            state,
            detail: protocol::bounded(detail.into()),
        })
    }

    /// Answers a [`FromAgent::Prepare`].
    pub fn ready(&self, ready: std::result::Result<(), String>) -> Result<()> {
        match ready {
            Ok(()) => self.send(&ToAgent::Ready),
            Err(reason) => self.send(&ToAgent::NotReady {
                reason: protocol::bounded(reason),
            }),
        }
    }

    /// Gives the previous kernel's session back to the agent, which keeps it for another VMM
    /// (this one could not use it, and touched nothing but what it retrieved). Refused by an
    /// agent that cannot keep it: then the VMM must hold the session itself.
    pub fn give_back(&self) -> Result<()> {
        self.send(&ToAgent::GiveBack)?;
        match self.answer()? {
            (FromAgent::Done, _) => Ok(()),
            (m, _) => Err(Error::Protocol(format!("{m:?}"))),
        }
    }

    /// Says this VMM closed its session fd (after a [`FromAgent::Abort`], or after finishing
    /// a retrieved session); ask for a session again next.
    pub fn release(&self) -> Result<()> {
        self.send(&ToAgent::Release)
    }

    /// The next event for this VMM; `None` when the agent went away. A message that is not
    /// of the protocol is an `InvalidData` error.
    pub fn next_event(&self) -> Result<Option<FromAgent>> {
        Ok(socket::recv(&self.sock)?.map(|(m, _)| m))
    }

    /// Cuts the connection: the agent sees this client go (and refuses an update it was
    /// part of, unless the kexec is under way already).
    pub fn disconnect(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// What the agent knows.
    pub fn status(&self) -> Result<Status> {
        self.send(&ToAgent::Status)?;
        match self.answer()? {
            (FromAgent::Status(s), _) => Ok(s),
            (m, _) => Err(Error::Protocol(format!("{m:?}"))),
        }
    }

    /// Tells the agent the VM `name` is gone for good: updates stop waiting for its VMM.
    pub fn forget(&self, name: &str) -> Result<()> {
        self.send(&ToAgent::Forget { name: name.into() })?;
        match self.answer()? {
            (FromAgent::Done, _) => Ok(()),
            (m, _) => Err(Error::Protocol(format!("{m:?}"))),
        }
    }

    /// Starts an update; returns once every VMM is ready (then commit or cancel it), or with
    /// the reason it was refused (every VMM was then told to resume).
    pub fn update(
        &self,
        kernel: Option<&str>,
        initrd: Option<&str>,
        cmdline: Option<&str>,
        timeout: Duration,
    ) -> Result<Armed<'_>> {
        self.send(&ToAgent::Update(request(kernel, initrd, cmdline, timeout)))?;
        match self.answer()? {
            (FromAgent::Armed { vmms }, _) => Ok(Armed { client: self, vmms }),
            (m, _) => Err(Error::Protocol(format!("{m:?}"))),
        }
    }
}

impl Client {
    /// Makes every check of [`Client::update`] and stops nothing: the VMMs an update would
    /// prepare, or the reason it would be refused. Without `kernel`, a kernel not loaded yet is
    /// not a refusal: [`DryRun::kernel_loaded`] says.
    pub fn update_dry_run(
        &self,
        kernel: Option<&str>,
        initrd: Option<&str>,
        cmdline: Option<&str>,
        timeout: Duration,
    ) -> Result<DryRun> {
        self.send(&ToAgent::CheckUpdate(request(
            kernel, initrd, cmdline, timeout,
        )))?;
        match self.answer()? {
            (
                FromAgent::WouldUpdate {
                    vmms,
                    kernel_loaded,
                },
                _,
            ) => Ok(DryRun {
                vmms,
                kernel_loaded,
            }),
            (m, _) => Err(Error::Protocol(format!("{m:?}"))),
        }
    }
}

fn request(
    kernel: Option<&str>,
    initrd: Option<&str>,
    cmdline: Option<&str>,
    timeout: Duration,
) -> UpdateRequest {
    UpdateRequest {
        kernel: kernel.map(Into::into),
        initrd: initrd.map(Into::into),
        cmdline: cmdline.map(Into::into),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        dry_run: false,
    }
}

/// What an update would do ([`Client::update_dry_run`]).
#[derive(Debug)]
pub struct DryRun {
    /// The VMMs it would tell to prepare.
    pub vmms: Vec<String>,
    /// Whether a kernel is loaded for kexec.
    pub kernel_loaded: bool,
}

impl Armed<'_> {
    /// Kexecs. Returns only if that failed (every VMM was then told to resume).
    pub fn commit(self) -> Error {
        if let Err(e) = self.client.send(&ToAgent::Commit) {
            return e;
        }
        match self.client.answer() {
            Err(e) => e,
            Ok((m, _)) => Error::Protocol(format!("{m:?}")),
        }
    }

    /// Gives up the update: every VMM is told to resume.
    pub fn cancel(self) -> Result<()> {
        self.client.send(&ToAgent::Cancel)?;
        match self.client.answer()? {
            (FromAgent::Done, _) => Ok(()),
            (m, _) => Err(Error::Protocol(format!("{m:?}"))),
        }
    }
}
