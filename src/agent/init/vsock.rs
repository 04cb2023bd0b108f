//! The agent's vsock sockets: connecting to the host (container VMs) and listening for
//! the host's connections (machines). Raw `libc` calls, as the standard library has no
//! vsock sockets.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::devices::virtio::vsock::VSOCK_HOST_CID;

/// How long a container VM keeps trying to reach the host.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// The address of `port` on `cid`.
fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// A fresh close-on-exec vsock stream socket.
fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to the host, retrying while its listener or the transport is not ready.
pub(super) fn connect_host(port: u32) -> io::Result<File> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        let attempt = socket().and_then(|sock| {
            let addr = addr(VSOCK_HOST_CID as u32, port);
            // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
            let ret = unsafe {
                libc::connect(
                    sock.as_raw_fd(),
                    &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            if ret < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(File::from(sock))
            }
        });
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.raw_os_error(),
                        Some(
                            libc::ECONNRESET
                                | libc::ECONNREFUSED
                                | libc::ETIMEDOUT
                                | libc::ENODEV
                                | libc::EHOSTUNREACH
                                | libc::EINTR
                        )
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A listener on `port` of any local CID, backlog 16.
pub(super) fn listen(port: u32) -> io::Result<OwnedFd> {
    let sock = socket()?;
    let addr = addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
    let ret = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket.
    if unsafe { libc::listen(sock.as_raw_fd(), 16) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// The next connection on `listener`, close-on-exec.
pub(super) fn accept(listener: &OwnedFd) -> io::Result<File> {
    // SAFETY: null address pointers are allowed; the new socket is close-on-exec.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a fresh descriptor.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::AGENT_PORT;

    #[test]
    fn vsock_address_layout() {
        let a = addr(VSOCK_HOST_CID as u32, AGENT_PORT);
        assert_eq!(a.svm_family, libc::AF_VSOCK as libc::sa_family_t);
        assert_eq!((a.svm_cid, a.svm_port), (2, 1024));
    }
}
