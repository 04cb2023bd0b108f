//! Handing descriptors to a pre-started sandbox. In a container VM the agent starts
//! `hearth-init sandbox` at boot (so a template snapshot already holds it) in a waiting
//! form: fd [`HANDOFF_FD`] is one end of a `SOCK_SEQPACKET` socket pair, and the process
//! blocks in `recvmsg` until the agent sends, in one message, the descriptors the
//! `posix_spawn` path would have moved into place, with a header that names each one's
//! number. The sandbox then moves them there ([`receive_into_place`]) and goes on like
//! one started the usual way.
//!
//! Message: data `HFD1` followed by one byte per descriptor, its target number, in the
//! order of the `SCM_RIGHTS` array. At most [`MAX_FDS`] descriptors; every target at
//! most once; 0, 1, 2, the plan and the sync pipe always present.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::sandbox::{PLAN_FD, STATUS_FD, SYNC_FD};
use super::timing::LATE_MARKS_FD;

/// The waiting sandbox's end of the socket pair (the plan's number, so that moving the
/// plan into place also closes the socket).
pub const HANDOFF_FD: RawFd = PLAN_FD;
/// Most descriptors one hand-off carries: stdio, plan, sync, late marks, status.
pub const MAX_FDS: usize = 7;
const MAGIC: &[u8; 4] = b"HFD1";
/// Every number a descriptor may be moved to.
const TARGETS: [RawFd; MAX_FDS] = [0, 1, 2, PLAN_FD, SYNC_FD, LATE_MARKS_FD, STATUS_FD];
/// The ones every hand-off has.
const REQUIRED: [RawFd; 5] = [0, 1, 2, PLAN_FD, SYNC_FD];
/// Received copies are lifted above this first, so no move clobbers a later source.
const LIFT_BASE: RawFd = 64;

/// Why a hand-off failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("cannot create the hand-off socket pair")]
    Socket(#[source] io::Error),
    #[error("cannot send the sandbox its descriptors")]
    Send(#[source] io::Error),
    #[error("cannot receive the descriptors from the agent")]
    Recv(#[source] io::Error),
    #[error("the agent closed the hand-off socket without sending descriptors")]
    Closed,
    #[error("malformed descriptor hand-off: {0}")]
    Malformed(String),
    #[error("cannot move descriptor {target} into place")]
    Move {
        target: RawFd,
        #[source]
        source: io::Error,
    },
}

fn malformed(text: impl Into<String>) -> HandoffError {
    HandoffError::Malformed(text.into())
}

/// A `SOCK_SEQPACKET` socket pair, both ends close-on-exec.
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd), HandoffError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the valid two-element array.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(HandoffError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: socketpair succeeded, so both are fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Checks a header's targets against the rules of the module documentation.
fn check_targets(targets: &[u8]) -> Result<(), HandoffError> {
    if targets.len() > MAX_FDS {
        return Err(malformed(format!(
            "{} descriptors (at most {MAX_FDS})",
            targets.len()
        )));
    }
    let mut seen = [false; MAX_FDS];
    for &t in targets {
        let Some(i) = TARGETS.iter().position(|&x| x == RawFd::from(t)) else {
            return Err(malformed(format!("descriptor number {t} is not expected")));
        };
        if std::mem::replace(&mut seen[i], true) {
            return Err(malformed(format!("descriptor number {t} named twice")));
        }
    }
    if let Some(missing) = REQUIRED.iter().find(|&&r| !targets.contains(&(r as u8))) {
        return Err(malformed(format!("descriptor {missing} is missing")));
    }
    Ok(())
}

/// Room for the `SCM_RIGHTS` message of [`MAX_FDS`] descriptors, suitably aligned.
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

fn iovec(data: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }
}

/// A message of the one buffer `iov` and the first `controllen` bytes of `cmsg`; both
/// must outlive every use of it.
fn msghdr(iov: &mut libc::iovec, cmsg: &mut CmsgBuf, controllen: usize) -> libc::msghdr {
    // SAFETY: a zeroed msghdr is valid (null names, no iovecs) before it is filled in.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = controllen as _;
    msg
}

/// Sends `moves` (source descriptor, target number) over `sock` in one message.
pub fn send(sock: &OwnedFd, moves: &[(RawFd, RawFd)]) -> Result<(), HandoffError> {
    let mut data = MAGIC.to_vec();
    for &(_, target) in moves {
        data.push(u8::try_from(target).map_err(|_| malformed("target out of range"))?);
    }
    check_targets(&data[MAGIC.len()..])?;
    let mut cmsg = CmsgBuf([0; 128]);
    let space = cmsg_space(moves.len());
    debug_assert!(space <= cmsg.0.len());
    let mut iov = iovec(&mut data);
    let msg = msghdr(&mut iov, &mut cmsg, space);
    // SAFETY: msg_control points at `space` bytes of the aligned buffer (at most its
    // size: MAX_FDS descriptors need 48), so CMSG_FIRSTHDR returns a header inside it
    // and CMSG_DATA has room for `moves.len()` descriptors, written unaligned.
    unsafe {
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN((moves.len() * std::mem::size_of::<RawFd>()) as u32) as _;
        let out = libc::CMSG_DATA(hdr) as *mut RawFd;
        for (i, &(fd, _)) in moves.iter().enumerate() {
            out.add(i).write_unaligned(fd);
        }
    }
    // SAFETY: msg and everything it points to (iov, data, cmsg) outlive the call.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(HandoffError::Send(io::Error::last_os_error()));
    }
    if sent as usize != data.len() {
        return Err(HandoffError::Send(io::Error::other("short send")));
    }
    Ok(())
}

/// Receives one hand-off from `sock`: the descriptors (close-on-exec) with their targets.
pub fn receive(sock: RawFd) -> Result<Vec<(RawFd, OwnedFd)>, HandoffError> {
    let mut data = [0u8; 64];
    let mut cmsg = CmsgBuf([0; 128]);
    let mut iov = iovec(&mut data);
    let mut msg = msghdr(&mut iov, &mut cmsg, cmsg_space(MAX_FDS));
    let got = loop {
        // SAFETY: msg points at the live data and control buffers, sized as declared.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(HandoffError::Recv(err));
        }
    };
    // Take ownership of whatever arrived before judging it, so refused ones get closed.
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed
    // control messages; CMSG_FIRSTHDR/NXTHDR stay inside them, and each SCM_RIGHTS
    // payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors just installed in this
    // process, owned by nothing else; they are read unaligned.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let len = (*hdr).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let src = libc::CMSG_DATA(hdr) as *const RawFd;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(src.add(i).read_unaligned()));
                }
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    if got == 0 && fds.is_empty() {
        return Err(HandoffError::Closed);
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(malformed(format!(
            "more than {MAX_FDS} descriptors or data"
        )));
    }
    let Some(targets) = data[..got].strip_prefix(MAGIC) else {
        return Err(malformed("bad header"));
    };
    check_targets(targets)?;
    if targets.len() != fds.len() {
        return Err(malformed(format!(
            "{} descriptors for {} numbers",
            fds.len(),
            targets.len()
        )));
    }
    Ok(targets.iter().map(|&t| RawFd::from(t)).zip(fds).collect())
}

/// Receives a hand-off on [`HANDOFF_FD`] and moves each descriptor to its number (not
/// close-on-exec there, like `posix_spawn`'s dup2). The socket goes: the plan takes its
/// number.
pub fn receive_into_place() -> Result<(), HandoffError> {
    let received = receive(HANDOFF_FD)?;
    let mut lifted = Vec::with_capacity(received.len());
    for (target, fd) in received {
        // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor from an open one.
        let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, LIFT_BASE) };
        if copy < 0 {
            let source = io::Error::last_os_error();
            return Err(HandoffError::Move { target, source });
        }
        // SAFETY: fcntl returned a fresh descriptor nothing else owns.
        lifted.push((target, unsafe { OwnedFd::from_raw_fd(copy) }));
        // `fd` closes here, freeing a low number that may be a later target.
    }
    for (target, fd) in lifted {
        // SAFETY: dup2 onto a small number this process reserves for the hand-off; the
        // target's old descriptor (the socket for the plan's number) is closed by it.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            let source = io::Error::last_os_error();
            return Err(HandoffError::Move { target, source });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};

    fn pipes(n: usize) -> Vec<(OwnedFd, OwnedFd)> {
        (0..n).map(|_| super::super::sys::pipe().unwrap()).collect()
    }

    #[test]
    fn descriptors_round_trip_with_their_numbers() {
        let (a, b) = socket_pair().unwrap();
        let ps = pipes(7);
        let moves: Vec<(RawFd, RawFd)> = ps
            .iter()
            .zip([0, 1, 2, PLAN_FD, SYNC_FD, LATE_MARKS_FD, STATUS_FD])
            .map(|((_, w), t)| (w.as_raw_fd(), t))
            .collect();
        send(&a, &moves).unwrap();
        let got = receive(b.as_raw_fd()).unwrap();
        assert_eq!(
            got.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![0, 1, 2, PLAN_FD, SYNC_FD, LATE_MARKS_FD, STATUS_FD]
        );
        // Each received descriptor is the write end of the matching pipe.
        for ((r, _), (t, w)) in ps.into_iter().zip(got) {
            // SAFETY: F_GETFD only queries the descriptor.
            let flags = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
            File::from(w).write_all(&[t as u8]).unwrap();
            let mut byte = [0u8];
            File::from(r).read_exact(&mut byte).unwrap();
            assert_eq!(byte[0] as RawFd, t);
        }
    }

    #[test]
    fn the_minimal_set_is_enough_and_less_is_refused() {
        let (a, b) = socket_pair().unwrap();
        let ps = pipes(5);
        let moves: Vec<(RawFd, RawFd)> = ps
            .iter()
            .zip(REQUIRED)
            .map(|((r, _), t)| (r.as_raw_fd(), t))
            .collect();
        send(&a, &moves).unwrap();
        assert_eq!(receive(b.as_raw_fd()).unwrap().len(), 5);
        // The sender refuses to leave out the sync pipe, to repeat or invent a number.
        assert!(matches!(
            send(&a, &moves[..4]),
            Err(HandoffError::Malformed(_))
        ));
        let mut twice = moves.clone();
        twice.push((moves[0].0, 0));
        assert!(send(&a, &twice).is_err());
        let mut odd = moves.clone();
        odd.push((moves[0].0, 9));
        assert!(send(&a, &odd).is_err());
    }

    #[test]
    fn bad_messages_are_refused_and_their_descriptors_closed() {
        let (a, b) = socket_pair().unwrap();
        // Plain data without the header.
        File::from(a.try_clone().unwrap())
            .write_all(b"hello")
            .unwrap();
        assert!(matches!(
            receive(b.as_raw_fd()),
            Err(HandoffError::Malformed(_))
        ));
        // More descriptors than the header names: a raw sendmsg bypassing `send`'s checks.
        let (r, w) = super::super::sys::pipe().unwrap();
        let fds = [w.as_raw_fd(); 6];
        let mut data = MAGIC.to_vec();
        data.extend([0, 1, 2, 3, 4]);
        let mut cmsg = CmsgBuf([0; 128]);
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: as in `send`: the buffers outlive the call, six fds fit in 128 bytes.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.0.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = cmsg_space(fds.len()) as _;
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(hdr) as *mut RawFd, 6);
            assert!(libc::sendmsg(a.as_raw_fd(), &msg, 0) > 0);
        }
        assert!(matches!(
            receive(b.as_raw_fd()),
            Err(HandoffError::Malformed(_))
        ));
        // The refused copies were closed: with ours gone too, the reader sees the end.
        drop(w);
        let mut rest = Vec::new();
        File::from(r).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // A closed peer is not a hand-off.
        drop(a);
        assert!(matches!(receive(b.as_raw_fd()), Err(HandoffError::Closed)));
    }
}
