//! `terminal: true`: a pty whose master goes to the engine over `--console-socket`
//! (SCM_RIGHTS, with the slave's name as the message, as runc sends it) and whose slave
//! becomes the stdio and controlling terminal of the process that relays the
//! container's terminal (the monitor, or an exec's waiter).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::OciError;

/// A new pty pair: (master, slave, the slave's path).
pub fn open_pty() -> Result<(OwnedFd, OwnedFd, String), OciError> {
    let (mut master, mut slave) = (-1, -1);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty writes two descriptors and a NUL-terminated name of at most
    // 128 bytes (glibc's and musl's bound for pty names) into our buffers.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(OciError::Console(format!(
            "cannot open a pty: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: openpty succeeded: both descriptors are open and ours alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: openpty NUL-terminated the name inside the buffer.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
        // SAFETY: fcntl on a descriptor we own; no memory is involved.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave, name))
}

/// Makes the pty's slave side the stdin, stdout and stderr of a helper about to be
/// spawned (the monitor, an exec waiter): its terminal is the container's.
pub fn stdio_to(command: &mut std::process::Command, slave: &OwnedFd) -> Result<(), OciError> {
    use std::process::{Command, Stdio};
    for set in [Command::stdin, Command::stdout, Command::stderr] {
        let fd = slave
            .try_clone()
            .map_err(|e| OciError::Console(e.to_string()))?;
        set(command, Stdio::from(fd));
    }
    Ok(())
}

/// Sets a terminal's window size (`consoleSize`).
pub fn set_size(fd: RawFd, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own; a non-terminal fd fails cleanly.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) };
}

/// Sends `fd` over the Unix socket at `socket`, with `name` as the message.
pub fn send_fd(socket: &Path, fd: RawFd, name: &str) -> Result<(), OciError> {
    let err =
        |e: std::io::Error| OciError::Console(format!("console socket {}: {e}", socket.display()));
    let stream = crate::uds::connect(socket).map_err(err)?;
    let mut payload = name.as_bytes().to_vec();
    if payload.is_empty() {
        payload.push(0);
    }
    // rust-vmm's SCM_RIGHTS sender (vmm-sys-util, already a dependency); MSG_NOSIGNAL
    // spares us a SIGPIPE from an engine that closed its end.
    stream
        .send_with_fd(payload.as_slice(), fd)
        .map_err(|e| err(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(())
}

/// Receives one descriptor sent by [`send_fd`] (tests, and engines' side of the socket).
pub fn recv_fd(stream: &std::os::unix::net::UnixStream) -> std::io::Result<(OwnedFd, Vec<u8>)> {
    let mut payload = vec![0u8; 4096];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; the buffers it points to outlive recvmsg,
    // and the control message is read only within the length the kernel wrote.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        payload.truncate(n as usize);
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        if hdr.is_null() || (*hdr).cmsg_type != libc::SCM_RIGHTS {
            return Err(std::io::Error::other("no descriptor in the message"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(hdr).cast::<RawFd>());
        Ok((OwnedFd::from_raw_fd(fd), payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_pty_master_crosses_the_console_socket() {
        let dir = crate::testutil::TempDir::new("oci-console");
        let path = dir.path().join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (master, slave, name) = open_pty().unwrap();
        assert!(name.starts_with("/dev/pts/"), "{name}");
        set_size(slave.as_raw_fd(), 40, 120);
        let sender = std::thread::spawn(move || send_fd(&path, master.as_raw_fd(), &name));
        let (stream, _) = listener.accept().unwrap();
        let (received, payload) = recv_fd(&stream).unwrap();
        sender.join().unwrap().unwrap();
        assert!(payload.starts_with(b"/dev/pts/"));
        let mut slave_file = std::fs::File::from(slave);
        slave_file.write_all(b"hi\n").unwrap();
        let mut master_file = std::fs::File::from(received);
        let mut buf = [0u8; 16];
        let n = master_file.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"hi"), "{:?}", &buf[..n]);
    }

    #[test]
    fn a_missing_console_socket_is_an_error() {
        let e = send_fd(Path::new("/nonexistent/console.sock"), 0, "x").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("console socket /nonexistent/console.sock: "));
    }
}
