// SPDX-License-Identifier: GPL-2.0
//! `SOCK_SEQPACKET` Unix sockets (message boundaries kept, peers' disconnects seen) carrying
//! one encoded message each, with at most one file descriptor attached.

use crate::protocol::{decode, encode, MAX_MESSAGE};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

fn socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// The room for a path in a Unix socket address, its NUL included.
const SUN_PATH_LEN: usize =
    size_of::<libc::sockaddr_un>() - std::mem::offset_of!(libc::sockaddr_un, sun_path);

fn address(path: &Path) -> io::Result<SocketAddrUnix> {
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    // A path that fills `sun_path` without a NUL is a valid address, but not one the other
    // side can print or `connect()` with a C string: refused along with the others.
    if bytes.is_empty() || bytes.len() >= SUN_PATH_LEN || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} cannot name a Unix socket", path.display()),
        ));
    }
    Ok(SocketAddrUnix::new(path)?)
}

/// Listens on `path` (which must not exist).
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    let fd = socket()?;
    rustix::net::bind(&fd, &address(path)?)?;
    rustix::net::listen(&fd, 16)?;
    Ok(UnixListener::from(fd))
}

/// Connects to the socket at `path`.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let fd = socket()?;
    rustix::net::connect(&fd, &address(path)?)?;
    let sock = UnixStream::from(fd);
    make_room(&sock)?;
    Ok(sock)
}

/// Lets `sock` send messages of up to [`MAX_MESSAGE`] bytes: the kernel refuses (`EMSGSIZE`) a
/// message longer than the send buffer, whose default (`net.core.wmem_default`) is smaller.
/// For every connection, on both sides ([`connect`] does it).
pub fn make_room(sock: &UnixStream) -> io::Result<()> {
    // The kernel doubles what it is given, up to net.core.wmem_max (208 KiB by default): the
    // room a message needs beside its bytes is far below the slack.
    Ok(rustix::net::sockopt::set_socket_send_buffer_size(
        sock,
        MAX_MESSAGE + 4096,
    )?)
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
    use std::os::fd::AsRawFd;
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
    let fd: Option<BorrowedFd<'_>> = fd.map(AsFd::as_fd);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if let Some(fd) = &fd {
        // The space is for exactly one fd.
        let pushed = control.push(SendAncillaryMessage::ScmRights(std::slice::from_ref(fd)));
        debug_assert!(pushed);
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&buf)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if n != buf.len() {
        return Err(io::Error::other("a message went out cut short"));
    }
    Ok(())
}

/// Receives a message and the fd attached to it, if any; `None` when the peer has gone (with or
/// without messages of ours it did not read).
///
/// The fd arrives close-on-exec (`MSG_CMSG_CLOEXEC`): a child the receiver starts must not
/// inherit a session, whose copy would keep what the session preserves alive.
pub fn recv<T: for<'a> Deserialize<'a>>(
    sock: &UnixStream,
) -> io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut buf = vec![0; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = match rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    ) {
        Ok(got) => got,
        // The peer closed the connection before it read all we sent.
        Err(rustix::io::Errno::CONNRESET) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    // What did not fit was closed by the kernel; what did is closed when `fds` drops.
    if fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message with more than one fd attached",
        ));
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        // No room for even one (three fit), or no fd left in our table, or an LSM refused it.
        return Err(io::Error::other(
            "the fd attached to a message could not be received (out of fds?)",
        ));
    }
    if got.flags.contains(ReturnFlags::TRUNC) || got.bytes >= MAX_MESSAGE {
        // Cut short by the buffer (the rest of a datagram is dropped).
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message too long for the protocol",
        ));
    }
    let fd = fds.pop();
    if got.bytes == 0 {
        // A SOCK_SEQPACKET peer that closed; the protocol never sends an empty message.
        return Ok(None);
    }
    let msg =
        decode(&buf[..got.bytes]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
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
        make_room(&s).unwrap();
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
        assert!(
            rustix::io::fcntl_getfd(&fd)
                .unwrap()
                .contains(rustix::io::FdFlags::CLOEXEC),
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
        assert_eq!(me.uid, rustix::process::geteuid().as_raw());
        assert_eq!(me.gid, rustix::process::getegid().as_raw());
        assert_eq!(peer(&c).unwrap(), me);
    }

    #[test]
    fn a_message_with_two_fds_is_refused_and_both_are_closed() {
        let (c, s) = pair();
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let buf = encode(&ToAgent::Release);
        let fds = [r.as_fd(), w.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(&c, &[IoSlice::new(&buf)], &mut control, SendFlags::empty()).unwrap();
        drop(r);
        let e = recv::<ToAgent>(&s).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Neither copy of the read end is left open: writing to the pipe now fails.
        assert_eq!(
            rustix::io::write(&w, b"x").unwrap_err(),
            rustix::io::Errno::PIPE
        );
    }

    /// A valid message padded to `len` bytes (JSON allows trailing blanks).
    fn padded(len: usize) -> Vec<u8> {
        let mut msg = encode(&ToAgent::Release);
        msg.resize(len, b' ');
        msg
    }

    #[test]
    fn a_message_just_under_the_limit_goes_through() {
        let (c, s) = pair();
        let (m, _) = socket_recv_raw(&c, &s, &padded(MAX_MESSAGE - 1))
            .unwrap()
            .unwrap();
        assert_eq!(m, ToAgent::Release);
        // Both ways: the accepting side makes room too.
        let (m, _) = socket_recv_raw(&s, &c, &padded(MAX_MESSAGE - 1))
            .unwrap()
            .unwrap();
        assert_eq!(m, ToAgent::Release);
    }

    #[test]
    fn a_message_too_long_is_refused() {
        let (c, s) = pair();
        for len in [MAX_MESSAGE, MAX_MESSAGE + 10] {
            let e = socket_recv_raw(&c, &s, &padded(len)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{len} bytes");
        }
        // And the connection goes on.
        send(&c, &ToAgent::Ready, None::<&OwnedFd>).unwrap();
        assert_eq!(recv::<ToAgent>(&s).unwrap().unwrap().0, ToAgent::Ready);
    }

    /// Sends `bytes` as they are from `from`, and receives them as a message at `to`.
    fn socket_recv_raw(
        from: &UnixStream,
        to: &UnixStream,
        bytes: &[u8],
    ) -> io::Result<Option<(ToAgent, Option<OwnedFd>)>> {
        rustix::net::send(from, bytes, SendFlags::empty()).unwrap();
        recv::<ToAgent>(to)
    }

    #[test]
    fn a_peer_that_goes_away_unread_is_gone() {
        let (c, s) = pair();
        send(&c, &ToAgent::Ready, None::<&OwnedFd>).unwrap();
        drop(s);
        assert!(recv::<ToAgent>(&c).unwrap().is_none());
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
