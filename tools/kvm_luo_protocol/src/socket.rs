// SPDX-License-Identifier: GPL-2.0
//! `SOCK_SEQPACKET` Unix sockets (message boundaries kept, peers' disconnects seen) carrying
//! one encoded message each, with at most one file descriptor attached.

use crate::protocol::{decode, encode, MAX_MESSAGE};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: No pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: A new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: All-zero is a valid `sockaddr_un`.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} cannot name a Unix socket", path.display()),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Listens on `path` (which must not exist).
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    let fd = socket()?;
    let (addr, len) = address(path)?;
    // SAFETY: `addr` is a valid `sockaddr_un` of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: No pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixListener::from(fd))
}

/// Connects to the socket at `path`.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let fd = socket()?;
    let (addr, len) = address(path)?;
    // SAFETY: `addr` is a valid `sockaddr_un` of `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Who is at the other end of a connection, as the kernel saw it when it connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its process ID, in the agent's PID namespace (0 when it has none there).
    pub pid: u32,
    /// Its effective user ID.
    pub uid: u32,
    /// Its effective group ID.
    pub gid: u32,
}

/// The credentials of `sock`'s peer (`SO_PEERCRED`).
///
/// Read with `libc` rather than `rustix::net::sockopt::socket_peercred`, whose `UCred` holds a
/// non-zero `Pid`: the kernel reports a PID of 0 for a peer outside the reader's PID namespace.
pub fn peer(sock: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a `ucred` of `len` bytes, which the kernel writes at most.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: u32::try_from(cred.pid).unwrap_or(0),
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Sends `msg`, with `fd` attached if given.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fd: Option<&impl AsFd>) -> io::Result<()> {
    let buf = encode(msg);
    if buf.len() >= MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a message too long for the protocol",
        ));
    }
    let fds: Vec<_> = fd.iter().map(|f| f.as_fd().as_raw_fd()).collect();
    let n = sock
        .send_with_fds(&[&buf[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if n != buf.len() {
        return Err(io::Error::other("a message went out cut short"));
    }
    Ok(())
}

/// Receives a message and the fd attached to it, if any; `None` when the peer has gone.
pub fn recv<T: for<'a> Deserialize<'a>>(
    sock: &UnixStream,
) -> io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut buf = vec![0; MAX_MESSAGE];
    let (n, file) = sock
        .recv_with_fd(&mut buf)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fd = file.map(OwnedFd::from);
    if let Some(fd) = &fd {
        // recvmsg() here does not ask for MSG_CMSG_CLOEXEC: a child the receiver starts must
        // not inherit a session (its copy would keep what the session preserves alive).
        // SAFETY: F_SETFD on an fd we own, no pointers.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if n == 0 {
        return Ok(None);
    }
    if n >= MAX_MESSAGE {
        // Cut short by the buffer (the rest of a datagram is dropped).
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message too long for the protocol",
        ));
    }
    let msg = decode(&buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FromAgent, ToAgent};
    use std::io::{Read, Seek, Write};

    fn pair() -> (UnixStream, UnixStream) {
        let dir = std::env::temp_dir().join(format!("kvm-luo-agent-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("s{}", rand_suffix()));
        let l = listen(&path).unwrap();
        let c = connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        std::fs::remove_file(&path).unwrap();
        (c, s)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn messages_and_fds_go_through_with_their_boundaries() {
        let (c, s) = pair();
        let mut f = std::fs::File::from(OwnedFd::from(
            std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(std::env::temp_dir().join(format!("kvm-luo-fd-{}", std::process::id())))
                .unwrap(),
        ));
        f.write_all(b"hello").unwrap();
        send(&c, &ToAgent::Ready, None::<&OwnedFd>).unwrap();
        send(&c, &ToAgent::Release, Some(&f)).unwrap();
        let (m, fd) = recv::<ToAgent>(&s).unwrap().unwrap();
        assert_eq!(m, ToAgent::Ready);
        assert!(fd.is_none());
        let (m, fd) = recv::<ToAgent>(&s).unwrap().unwrap();
        assert_eq!(m, ToAgent::Release);
        let fd = fd.unwrap();
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(
            flags & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC,
            "received fds are CLOEXEC"
        );
        let mut g = std::fs::File::from(fd);
        g.rewind().unwrap();
        let mut text = String::new();
        g.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello");
        drop(c);
        assert!(
            recv::<ToAgent>(&s).unwrap().is_none(),
            "a closed peer reads as None"
        );
    }

    #[test]
    fn the_peer_is_who_the_kernel_says() {
        let (c, s) = pair();
        let me = peer(&s).unwrap();
        assert_eq!(me.pid, std::process::id());
        // SAFETY: No arguments.
        assert_eq!(me.uid, unsafe { libc::geteuid() });
        // SAFETY: No arguments.
        assert_eq!(me.gid, unsafe { libc::getegid() });
        assert_eq!(peer(&c).unwrap(), me);
    }

    #[test]
    fn a_message_of_the_wrong_kind_is_an_error() {
        let (c, s) = pair();
        send(&c, &FromAgent::Prepare, None::<&OwnedFd>).unwrap();
        let e = recv::<ToAgent>(&s).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn paths_that_cannot_name_a_socket_are_refused() {
        assert!(connect(Path::new("")).is_err());
        let long = "/tmp/".to_string() + &"x".repeat(200);
        assert_eq!(
            connect(Path::new(&long)).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            connect(Path::new("/nonexistent/socket"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }
}
