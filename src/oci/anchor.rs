//! The anchor: the process whose pid engines are given (`--pid-file`, `state`) and wait
//! on. Engines treat that pid as the container's init and act on it directly: podman
//! `cp` goes through `/proc/PID/root`, `top` and docker's network hook through
//! `/proc/PID/ns/*`. The monitor, which holds the VM, has to see the host, so it cannot
//! be that process. The anchor connects to the monitor, then moves into mount, network,
//! IPC and UTS namespaces of its own with the bundle's root filesystem as its root, and
//! waits until the monitor tells it the container's exit status, which it exits with
//! (dying of the signal that ended the container, if one did). What engines do through
//! its pid thus reaches the bundle and an empty network namespace, never the host.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::args::Globals;
use super::monitor::{self, NOTIFY_FD};
use super::state::StateDir;
use super::OciError;

/// The status an anchor exits with when its monitor went away without a word.
const MONITOR_LOST: i32 = 137;

pub fn run(globals: &Globals, id: &str, rootfs: &Path) -> u8 {
    // SAFETY: `create` started us with the notify pipe at NOTIFY_FD, owned by nothing
    // else in this process.
    let mut notify = unsafe { std::fs::File::from_raw_fd(NOTIFY_FD) };
    monitor::set_cloexec(NOTIFY_FD);
    let attached = (|| {
        let dir = StateDir::new(&globals.root, id)?;
        let stream = crate::uds::connect(&dir.control_socket())
            .map_err(|e| OciError::State(format!("cannot reach the container's monitor: {e}")))?;
        writeln!(&stream, "anchor {}", std::process::id())
            .map_err(|e| OciError::State(format!("cannot reach the container's monitor: {e}")))?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader
            .read_line(&mut answer)
            .map_err(|e| OciError::State(format!("no answer from the monitor: {e}")))?;
        if answer.trim_end() != "ok" {
            return Err(OciError::State(format!(
                "the monitor refused the anchor: {}",
                answer.trim_end()
            )));
        }
        isolate(rootfs)?;
        Ok(reader)
    })();
    let mut reader = match attached {
        Ok(reader) => reader,
        Err(e) => {
            let _ = writeln!(notify, "error {}", crate::error_chain(&e));
            return 1;
        }
    };
    let _ = writeln!(notify, "ok");
    drop(notify);
    let mut line = String::new();
    let status = match reader.read_line(&mut line) {
        Ok(_) => line
            .trim()
            .strip_prefix("exit ")
            .and_then(|s| s.parse().ok())
            .unwrap_or(MONITOR_LOST),
        Err(_) => MONITOR_LOST,
    };
    monitor::exit_with(status)
}

/// Own namespaces (nothing of the host's mounts, network, IPC or hostname) and the
/// bundle's root filesystem as root.
fn isolate(rootfs: &Path) -> Result<(), OciError> {
    let fail = |what: &str| {
        OciError::State(format!(
            "anchor: {what}: {}",
            std::io::Error::last_os_error()
        ))
    };
    let root = CString::new(rootfs.as_os_str().as_bytes())
        .map_err(|_| OciError::State("the rootfs path holds a NUL byte".into()))?;
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare, mount, chdir, pivot_root and umount2 with NUL-terminated paths
    // that outlive the calls or null pointers; none touches our memory.
    unsafe {
        if libc::unshare(flags) != 0 {
            return Err(fail("unshare"));
        }
        // Nothing done in the new mount namespace may reach the host's.
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail("making mounts private"));
        }
        // The namespace's root itself must be the rootfs, not just this process's
        // (a chroot): engines that join the mount namespace through /proc/PID/ns/mnt
        // (podman cp into a running container) get the namespace's root, and with a
        // chroot that root is the host's. pivot_root needs the new root to be a mount
        // point: bind it onto itself first, then stack the old root under it and detach.
        if libc::mount(
            root.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail(&format!("bind-mounting {}", rootfs.display())));
        }
        if libc::chdir(root.as_ptr()) != 0 {
            return Err(fail(&format!("chdir {}", rootfs.display())));
        }
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
            return Err(fail(&format!("pivot_root to {}", rootfs.display())));
        }
        if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(fail("detaching the host's root"));
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(fail("chdir /"));
        }
    }
    Ok(())
}
