// SPDX-License-Identifier: GPL-2.0
//! The `/dev/liveupdate` uAPI (`include/uapi/linux/liveupdate.h`), typed.
//!
//! A [`Orchestrator`] is the open device; it creates sessions (old kernel) and retrieves them
//! (new kernel). A [`Session`] preserves file descriptors under tokens, retrieves them, and
//! finishes. Errors are `std::io::Error` carrying the errno.

use std::ffi::c_ulong;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const IOCTL_TYPE: c_ulong = 0xba;
const NAME_LEN: usize = 64;

/// `_IO(0xba, nr)`.
const fn io(nr: c_ulong) -> c_ulong {
    (IOCTL_TYPE << 8) | nr
}

const CREATE_SESSION: c_ulong = io(0x00);
const RETRIEVE_SESSION: c_ulong = io(0x01);
const PRESERVE_FD: c_ulong = io(0x40);
const RETRIEVE_FD: c_ulong = io(0x41);
const FINISH: c_ulong = io(0x42);

#[repr(C)]
struct SessionArg {
    size: u32,
    fd: i32,
    name: [u8; NAME_LEN],
}

#[repr(C)]
struct FdArg {
    size: u32,
    fd: i32,
    token: u64,
}

#[repr(C)]
struct FinishArg {
    size: u32,
    reserved: u32,
}

fn ioctl<T>(fd: RawFd, request: c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, properly sized `#[repr(C)]` struct of the kind `request` takes.
    let ret = unsafe { libc::ioctl(fd, request, arg as *mut T) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn session_arg(name: &str) -> io::Result<SessionArg> {
    let mut arg = SessionArg {
        size: size_of::<SessionArg>() as u32,
        fd: -1,
        name: [0; NAME_LEN],
    };
    if name.is_empty() || name.len() >= NAME_LEN {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    arg.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(arg)
}

/// The open `/dev/liveupdate` device (one process at a time may hold it).
pub struct Orchestrator {
    dev: File,
}

impl Orchestrator {
    /// Opens `/dev/liveupdate`.
    pub fn open() -> io::Result<Self> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/liveupdate")?;
        Ok(Self { dev })
    }

    /// Creates an outgoing session named `name`.
    pub fn create_session(&self, name: &str) -> io::Result<Session> {
        let mut arg = session_arg(name)?;
        ioctl(self.dev.as_raw_fd(), CREATE_SESSION, &mut arg)?;
        // SAFETY: On success the kernel returned a new fd that we now own.
        Ok(Session(unsafe { OwnedFd::from_raw_fd(arg.fd) }))
    }

    /// Retrieves the incoming session named `name` (after the kexec).
    pub fn retrieve_session(&self, name: &str) -> io::Result<Session> {
        let mut arg = session_arg(name)?;
        ioctl(self.dev.as_raw_fd(), RETRIEVE_SESSION, &mut arg)?;
        // SAFETY: On success the kernel returned a new fd that we now own.
        Ok(Session(unsafe { OwnedFd::from_raw_fd(arg.fd) }))
    }
}

/// A LUO session. Closing it before the kexec unpreserves its files.
pub struct Session(OwnedFd);

impl Session {
    /// Preserves `fd` under `token`.
    pub fn preserve(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        let mut arg = FdArg {
            size: size_of::<FdArg>() as u32,
            fd: fd.as_raw_fd(),
            token,
        };
        ioctl(self.0.as_raw_fd(), PRESERVE_FD, &mut arg)
    }

    /// Retrieves the file preserved under `token`.
    pub fn retrieve(&self, token: u64) -> io::Result<OwnedFd> {
        let mut arg = FdArg {
            size: size_of::<FdArg>() as u32,
            fd: -1,
            token,
        };
        ioctl(self.0.as_raw_fd(), RETRIEVE_FD, &mut arg)?;
        // SAFETY: On success the kernel returned a new fd that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(arg.fd) })
    }

    /// Ends the session in the new kernel: what was not retrieved is freed.
    pub fn finish(&self) -> io::Result<()> {
        let mut arg = FinishArg {
            size: size_of::<FinishArg>() as u32,
            reserved: 0,
        };
        ioctl(self.0.as_raw_fd(), FINISH, &mut arg)
    }
}
