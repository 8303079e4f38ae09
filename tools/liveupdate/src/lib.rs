// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Safe access to Linux's Live Update Orchestrator, `/dev/liveupdate`
//! (`include/uapi/linux/liveupdate.h`).
//!
//! A live update kexecs a host into a new kernel while chosen files keep their content: a
//! process opens the device ([`Device`]), creates named sessions ([`Session`]), preserves file
//! descriptors in them under tokens, and keeps the sessions open until the kexec. In the new
//! kernel a process opens the device again, retrieves each session by name, retrieves its files
//! by token, and finishes the session, which frees what was not retrieved.
//!
//! ```no_run
//! use liveupdate::{Device, SessionName};
//!
//! let name = SessionName::new("vm-1")?;
//! let luo = Device::open()?;
//! // Before the kexec.
//! let session = luo.create_session(&name)?;
//! # fn a_memfd() -> std::fs::File { unimplemented!() }
//! let memfd = a_memfd(); // a memfd, or any file a LUO handler takes
//! session.preserve(&memfd, 7)?;
//! // After it, in the new kernel.
//! let session = luo.retrieve_session(&name)?;
//! let memfd = session.retrieve(7)?;
//! session.finish()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Only one process at a time can hold the device open. Session file descriptors are ordinary
//! file descriptors: another process that receives one (over a Unix socket, or by
//! inheritance) uses it through [`Session::from_fd`]. A session is released, and everything
//! preserved in it unpreserved, when its last file descriptor is closed before the kexec.

#![deny(missing_docs)]

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The path of the device.
pub const DEVICE_PATH: &str = "/dev/liveupdate";
/// `LIVEUPDATE_SESSION_NAME_LENGTH`: a name's bytes and its terminating NUL.
pub const NAME_LENGTH: usize = 64;

/// The request type of `ioctl()` in this libc.
#[cfg(target_env = "musl")]
type Request = std::ffi::c_int;
#[cfg(not(target_env = "musl"))]
type Request = std::ffi::c_ulong;

const IOCTL_TYPE: Request = 0xba;

/// `_IO(LIVEUPDATE_IOCTL_TYPE, nr)`: LUO's commands carry their argument's size in the
/// argument, not in the command number.
const fn io(nr: Request) -> Request {
    (IOCTL_TYPE << 8) | nr
}

const CREATE_SESSION: Request = io(0x00);
const RETRIEVE_SESSION: Request = io(0x01);
const PRESERVE_FD: Request = io(0x40);
const RETRIEVE_FD: Request = io(0x41);
const FINISH: Request = io(0x42);
const GET_NAME: Request = io(0x43);

/// `struct liveupdate_ioctl_create_session` and `..._retrieve_session`.
#[repr(C)]
struct SessionArg {
    size: u32,
    fd: i32,
    name: [u8; NAME_LENGTH],
}

/// `struct liveupdate_session_preserve_fd` and `..._retrieve_fd`.
#[repr(C)]
struct FdArg {
    size: u32,
    fd: i32,
    token: u64,
}

/// `struct liveupdate_session_finish`.
#[repr(C)]
struct FinishArg {
    size: u32,
    reserved: u32,
}

/// `struct liveupdate_session_get_name`.
#[repr(C)]
struct GetNameArg {
    size: u32,
    reserved: u32,
    name: [u8; NAME_LENGTH],
}

/// What the crate was doing when an [`Error`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Opening `/dev/liveupdate`.
    Open,
    /// `LIVEUPDATE_IOCTL_CREATE_SESSION`.
    CreateSession,
    /// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`.
    RetrieveSession,
    /// `LIVEUPDATE_SESSION_PRESERVE_FD`.
    Preserve,
    /// `LIVEUPDATE_SESSION_RETRIEVE_FD`.
    Retrieve,
    /// `LIVEUPDATE_SESSION_FINISH`.
    Finish,
    /// `LIVEUPDATE_SESSION_GET_NAME`.
    GetName,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "opening /dev/liveupdate",
            Op::CreateSession => "creating a session",
            Op::RetrieveSession => "retrieving a session",
            Op::Preserve => "preserving a file",
            Op::Retrieve => "retrieving a file",
            Op::Finish => "finishing a session",
            Op::GetName => "reading a session's name",
        })
    }
}

/// An error of this crate.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused `op` with `errno`.
    Os {
        /// What failed.
        op: Op,
        /// The errno the kernel returned.
        errno: i32,
    },
    /// A session name that LUO cannot take: empty, longer than [`NAME_LENGTH`] - 1 bytes, or
    /// with a NUL byte.
    InvalidName(String),
    /// A file that is not what it was taken for: a file descriptor that is not a LUO session
    /// ([`Session::from_fd`]), or a device that is not LUO's ([`Device::open_path`]). No
    /// LUO ioctl was sent to it.
    NotLuo(&'static str),
}

impl Error {
    fn last(op: Op) -> Self {
        Self::from_io(op, &io::Error::last_os_error())
    }

    fn from_io(op: Op, e: &io::Error) -> Self {
        Error::Os {
            op,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// The errno of a failed call, `EINVAL` for an invalid name.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Os { errno, .. } => *errno,
            Error::InvalidName(_) => libc::EINVAL,
            Error::NotLuo(_) => libc::ENOTTY,
        }
    }

    /// Another process holds `/dev/liveupdate` (`EBUSY` at open).
    pub fn is_busy(&self) -> bool {
        self.errno() == libc::EBUSY
    }

    /// No such session or token (`ENOENT`).
    pub fn is_not_found(&self) -> bool {
        self.errno() == libc::ENOENT
    }

    /// A session of that name, or a file under that token, exists already (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.errno() == libc::EEXIST
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Os { op, errno } => {
                write!(f, "{op}: {}", io::Error::from_raw_os_error(*errno))
            }
            Error::InvalidName(name) => write!(
                f,
                "invalid session name {name:?}: 1 to {} bytes, no NUL",
                NAME_LENGTH - 1
            ),
            Error::NotLuo(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::new(io::Error::from_raw_os_error(e.errno()).kind(), e)
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A session name LUO accepts: 1 to 63 bytes, no NUL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionName(String);

impl SessionName {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Self> {
        if name.is_empty() || name.len() >= NAME_LENGTH || name.contains('\0') {
            return Err(Error::InvalidName(name.into()));
        }
        Ok(Self(name.into()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn to_bytes(&self) -> [u8; NAME_LENGTH] {
        let mut buf = [0; NAME_LENGTH];
        buf[..self.0.len()].copy_from_slice(self.0.as_bytes());
        buf
    }

    /// The name in a NUL-terminated buffer from the kernel (names that are not UTF-8, which
    /// a C program may have made, are refused).
    fn from_bytes(buf: &[u8; NAME_LENGTH]) -> Result<Self> {
        let len = buf.iter().position(|&b| b == 0).unwrap_or(NAME_LENGTH);
        let raw = &buf[..len];
        match std::str::from_utf8(raw) {
            Ok(name) => Self::new(name),
            Err(_) => Err(Error::InvalidName(String::from_utf8_lossy(raw).into())),
        }
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SessionName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// Calls `ioctl(fd, request, arg)`.
fn ioctl<T>(fd: BorrowedFd<'_>, request: Request, arg: &mut T, op: Op) -> Result<()> {
    // SAFETY: `fd` is LUO's device or one of its sessions (`Device` and `Session` are only
    // made from files checked to be, or returned by LUO), every caller passes the
    // `#[repr(C)]` argument struct that `request` takes there, and `arg` is a live, exclusive
    // reference to it for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if ret < 0 {
        Err(Error::last(op))
    } else {
        Ok(())
    }
}

/// Takes ownership of a file descriptor the kernel has just returned to us.
fn owned(fd: i32, op: Op) -> Result<OwnedFd> {
    if fd < 0 {
        return Err(Error::Os {
            op,
            errno: libc::EIO,
        });
    }
    // SAFETY: The ioctl succeeded and installed `fd` in our table for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The open `/dev/liveupdate`. One process at a time can hold it; the next open fails with
/// `EBUSY` ([`Error::is_busy`]).
#[derive(Debug)]
pub struct Device {
    dev: File,
}

impl Device {
    /// Opens [`DEVICE_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_checked(DEVICE_PATH, false)
    }

    /// Opens the device at `path` (a device node elsewhere than `/dev`). Checks, before any
    /// ioctl, that it is LUO's: the character device `/sys/class/misc/liveupdate/dev` names
    /// (another driver would take LUO's ioctls its own way).
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_checked(path, true)
    }

    fn open_checked(path: impl AsRef<Path>, check: bool) -> Result<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::from_io(Op::Open, &e))?;
        if !check {
            return Ok(Self { dev });
        }
        let meta = dev.metadata().map_err(|e| Error::from_io(Op::Open, &e))?;
        let luo = std::fs::read_to_string("/sys/class/misc/liveupdate/dev").unwrap_or_default();
        let rdev = meta.rdev();
        let this = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
        if !meta.file_type().is_char_device() || luo.trim() != this {
            return Err(Error::NotLuo("not the /dev/liveupdate device"));
        }
        Ok(Self { dev })
    }

    fn session_ioctl(&self, request: Request, name: &SessionName, op: Op) -> Result<Session> {
        let mut arg = SessionArg {
            size: size_of::<SessionArg>() as u32,
            fd: -1,
            name: name.to_bytes(),
        };
        ioctl(self.dev.as_fd(), request, &mut arg, op)?;
        Ok(Session(owned(arg.fd, op)?))
    }

    /// Creates an outgoing session, to preserve files in before the kexec. Fails with
    /// `EEXIST` ([`Error::is_exists`]) if a session of that name is open already.
    pub fn create_session(&self, name: &SessionName) -> Result<Session> {
        self.session_ioctl(CREATE_SESSION, name, Op::CreateSession)
    }

    /// Retrieves a session the previous kernel preserved. Fails with `ENOENT`
    /// ([`Error::is_not_found`]) if there is none of that name, `EINVAL` if it was retrieved
    /// already (a retrieve cannot be repeated).
    pub fn retrieve_session(&self, name: &SessionName) -> Result<Session> {
        self.session_ioctl(RETRIEVE_SESSION, name, Op::RetrieveSession)
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

/// A LUO session: outgoing (created before the kexec) or incoming (retrieved after it).
///
/// Dropping the last file descriptor of an outgoing session unpreserves everything in it;
/// [`Session::unpreserve`] says so explicitly. Dropping an incoming session that was not
/// finished gives what it still holds back to the kernel, which frees it.
#[derive(Debug)]
pub struct Session(OwnedFd);

impl Session {
    /// A session from a file descriptor received from elsewhere (another process, a Unix
    /// socket). Checks, before any ioctl, that it is a session (the kernel names its files
    /// `anon_inode:[luo_session] NAME`, as `/proc/self/fd` shows): another file gives
    /// [`Error::NotLuo`].
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| Error::NotLuo("cannot tell what the file is (is /proc mounted?)"))?;
        if !link
            .to_string_lossy()
            .starts_with("anon_inode:[luo_session] ")
        {
            return Err(Error::NotLuo("not a LUO session"));
        }
        let session = Self(fd);
        session.name()?;
        Ok(session)
    }

    /// The session's name, as the kernel knows it.
    pub fn name(&self) -> Result<SessionName> {
        let mut arg = GetNameArg {
            size: size_of::<GetNameArg>() as u32,
            reserved: 0,
            name: [0; NAME_LENGTH],
        };
        ioctl(self.0.as_fd(), GET_NAME, &mut arg, Op::GetName)?;
        SessionName::from_bytes(&arg.name)
    }

    /// Preserves the file `fd` under `token`; LUO keeps a reference to the file until the
    /// kexec, the session's release, or a retrieve in the next kernel. Fails with `EEXIST` if
    /// the token is taken, `ENOENT` or `EOPNOTSUPP` if no handler takes the file.
    pub fn preserve(&self, fd: &impl AsFd, token: u64) -> Result<()> {
        let mut arg = FdArg {
            size: size_of::<FdArg>() as u32,
            fd: fd.as_fd().as_raw_fd(),
            token,
        };
        ioctl(self.0.as_fd(), PRESERVE_FD, &mut arg, Op::Preserve)
    }

    /// Retrieves the file preserved under `token` (in the new kernel).
    pub fn retrieve(&self, token: u64) -> Result<OwnedFd> {
        let mut arg = FdArg {
            size: size_of::<FdArg>() as u32,
            fd: -1,
            token,
        };
        ioctl(self.0.as_fd(), RETRIEVE_FD, &mut arg, Op::Retrieve)?;
        owned(arg.fd, Op::Retrieve)
    }

    /// Ends an incoming session: what was not retrieved is freed. Fails (`EBUSY`) while a
    /// handler still needs time, and can be called again.
    pub fn finish(&self) -> Result<()> {
        let mut arg = FinishArg {
            size: size_of::<FinishArg>() as u32,
            reserved: 0,
        };
        ioctl(self.0.as_fd(), FINISH, &mut arg, Op::Finish)
    }

    /// [`Session::finish`], tried again every 10 ms while a handler still needs time (`EBUSY`,
    /// e.g. guest memory still being put back), for up to `timeout`; then the last error.
    ///
    /// ```no_run
    /// # fn f(session: &liveupdate::Session) -> liveupdate::Result<()> {
    /// session.finish_waiting(std::time::Duration::from_secs(60))?;
    /// # Ok(()) }
    /// ```
    pub fn finish_waiting(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            match self.finish() {
                Err(e) if e.errno() == libc::EBUSY && start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    /// Closes this file descriptor of the session. If it was the last one, and the session
    /// is outgoing, everything preserved in it is unpreserved and the name is free again.
    pub fn unpreserve(self) {
        drop(self);
    }

    /// The session's file descriptor, to hand to another process.
    pub fn into_fd(self) -> OwnedFd {
        self.0
    }
}

impl AsFd for Session {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    /// The numbers `_IO(0xBA, nr)` expands to in C.
    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(CREATE_SESSION, 0xba00);
        assert_eq!(RETRIEVE_SESSION, 0xba01);
        assert_eq!(PRESERVE_FD, 0xba40);
        assert_eq!(RETRIEVE_FD, 0xba41);
        assert_eq!(FINISH, 0xba42);
        assert_eq!(GET_NAME, 0xba43);
    }

    /// Sizes and offsets of the uAPI structs (the kernel checks `size`).
    #[test]
    fn argument_layouts_match_the_uapi() {
        assert_eq!(size_of::<SessionArg>(), 72);
        assert_eq!(std::mem::offset_of!(SessionArg, fd), 4);
        assert_eq!(std::mem::offset_of!(SessionArg, name), 8);
        assert_eq!(size_of::<FdArg>(), 16);
        assert_eq!(std::mem::offset_of!(FdArg, token), 8);
        assert_eq!(size_of::<FinishArg>(), 8);
        assert_eq!(size_of::<GetNameArg>(), 72);
        assert_eq!(std::mem::offset_of!(GetNameArg, name), 8);
    }

    #[test]
    fn names() {
        assert!(SessionName::new("vm-1").is_ok());
        assert!(SessionName::new(&"x".repeat(63)).is_ok());
        for bad in ["", "a\0b", &"x".repeat(64)] {
            let e = SessionName::new(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidName(_)), "{bad:?}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
        let n: SessionName = "vm-2".parse().unwrap();
        assert_eq!(n.as_str(), "vm-2");
        assert_eq!(n.to_string(), "vm-2");
    }

    #[test]
    fn names_round_trip_through_the_kernel_buffer() {
        let n = SessionName::new("a-63-byte-name-is-the-longest-one-that-fits-with-its-NUL-xxxxxx")
            .unwrap();
        assert_eq!(n.as_str().len(), 63);
        let buf = n.to_bytes();
        assert_eq!(buf[63], 0);
        assert_eq!(SessionName::from_bytes(&buf).unwrap(), n);
        // A buffer from the kernel without NUL, with nothing in it, or not UTF-8 is refused.
        assert!(SessionName::from_bytes(&[b'x'; NAME_LENGTH]).is_err());
        assert!(SessionName::from_bytes(&[0; NAME_LENGTH]).is_err());
        let mut bad = [0; NAME_LENGTH];
        bad[..3].copy_from_slice(&[b'v', 0xff, b'm']);
        assert!(matches!(
            SessionName::from_bytes(&bad),
            Err(Error::InvalidName(_))
        ));
    }

    #[test]
    fn errors_carry_the_errno_and_say_what_failed() {
        let e = Error::Os {
            op: Op::CreateSession,
            errno: libc::EEXIST,
        };
        assert!(e.is_exists() && !e.is_busy() && !e.is_not_found());
        assert_eq!(e.errno(), libc::EEXIST);
        let text = e.to_string();
        assert!(text.starts_with("creating a session: "), "{text}");
        assert!(text.contains("exists"), "{text}");
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn opening_a_device_that_is_not_luo_fails_before_any_ioctl() {
        let e = Device::open_path("/dev/null").unwrap_err();
        assert!(matches!(e, Error::NotLuo(_)), "{e}");
        assert_eq!(e.errno(), libc::ENOTTY);
    }

    #[test]
    fn opening_a_missing_device_fails_with_its_errno() {
        let e = Device::open_path("/nonexistent/liveupdate").unwrap_err();
        assert!(matches!(
            e,
            Error::Os {
                op: Op::Open,
                errno: libc::ENOENT
            }
        ));
    }

    /// Session ioctls on a file that is not a session are refused by the kernel, and
    /// `from_fd` refuses such a file.
    #[test]
    fn a_file_that_is_not_a_session_is_refused() {
        let f = File::open("/proc/self/exe").unwrap();
        let e = Session::from_fd(OwnedFd::from(f)).unwrap_err();
        assert_eq!(e.errno(), libc::ENOTTY, "{e}");
        assert!(matches!(e, Error::NotLuo(_)));

        // The ioctls themselves on a device that is not /dev/liveupdate (only this module
        // can make such a `Device` or `Session`): they fail, nothing leaks.
        let dev = Device {
            dev: File::open("/dev/null").unwrap(),
        };
        let name = SessionName::new("x").unwrap();
        let e = dev.create_session(&name).unwrap_err();
        assert_eq!(e.errno(), libc::ENOTTY);
        let e = dev.retrieve_session(&name).unwrap_err();
        assert!(matches!(
            e,
            Error::Os {
                op: Op::RetrieveSession,
                ..
            }
        ));
        let s = Session(OwnedFd::from(File::open("/dev/null").unwrap()));
        assert_eq!(s.preserve(&dev, 1).unwrap_err().errno(), libc::ENOTTY);
        assert_eq!(s.retrieve(1).unwrap_err().errno(), libc::ENOTTY);
        assert_eq!(s.finish().unwrap_err().errno(), libc::ENOTTY);
        // Only EBUSY is waited for.
        let t = Instant::now();
        let e = s.finish_waiting(Duration::from_secs(30)).unwrap_err();
        assert_eq!(e.errno(), libc::ENOTTY);
        assert!(t.elapsed() < Duration::from_secs(5));
        let raw = s.into_fd().into_raw_fd();
        assert!(raw >= 0);
        // SAFETY: `raw` came from `into_raw_fd` just above and nothing else owns it.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
    }
}
