//! The system calls that build a jail, in the jailed child: namespaces, mounts, device
//! nodes, pivot_root, and dropping privileges. Each step's failure names the step.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use super::JailError;

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Step {
        step: "a path with a NUL byte",
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// Turns a -1 return into the step's error with errno.
fn check(step: &'static str, ret: libc::c_long) -> Result<(), JailError> {
    if ret < 0 {
        return Err(JailError::Step {
            step,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn step(step: &'static str) -> impl Fn(io::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

pub fn set_parent_death_signal() -> Result<(), JailError> {
    // SAFETY: prctl with constant arguments.
    let ret = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    check("PR_SET_PDEATHSIG", ret.into())
}

/// Closes every inherited descriptor but stdin, stdout, stderr and `keep`.
pub fn close_inherited_fds(keep: &[RawFd]) -> Result<(), JailError> {
    for (first, last) in ranges_to_close(keep) {
        // SAFETY: close_range only closes descriptors; in this freshly forked,
        // single-threaded child nothing owns those in the range.
        let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        check("closing inherited file descriptors", ret)?;
    }
    Ok(())
}

/// The ranges of descriptors from 3 up that are not in `keep`.
fn ranges_to_close(keep: &[RawFd]) -> Vec<(u32, u32)> {
    let mut keep: Vec<u32> = (keep.iter())
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut ranges = Vec::new();
    let mut first = 3u32;
    for fd in keep {
        if fd > first {
            ranges.push((first, fd - 1));
        }
        first = fd + 1;
    }
    ranges.push((first, u32::MAX));
    ranges
}

pub fn join_netns(path: &Path) -> Result<(), JailError> {
    let file = File::open(path).map_err(|source| JailError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: setns on an open descriptor; the kernel checks it is a network namespace.
    let ret = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    if ret < 0 {
        return Err(JailError::Netns {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub fn unshare(flags: libc::c_int) -> Result<(), JailError> {
    // SAFETY: unshare takes only flags.
    let ret = unsafe { libc::unshare(flags) };
    check("unshare", ret.into())
}

pub fn set_hostname(name: &str) -> Result<(), JailError> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let ret = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    check("sethostname", ret.into())
}

pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let source = source.map(c_path).transpose()?;
    let target_c = c_path(target)?;
    let fstype = fstype.map(|t| CString::new(t).expect("file system names have no NUL"));
    let data = data.map(|d| CString::new(d).expect("mount options have no NUL"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if ret < 0 {
        return Err(JailError::Mount {
            target: target.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Bind-mounts `source` at `target`, then remounts it with `flags` (MS_RDONLY, MS_NOSUID,
/// ...), which a bind mount only takes on a remount.
pub fn bind(source: &Path, target: &Path, flags: libc::c_ulong) -> Result<(), JailError> {
    mount(Some(source), target, None, libc::MS_BIND, None)?;
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

/// Makes the directories down to `dir` (root-owned, 0755).
pub fn make_dirs(dir: &Path) -> Result<(), JailError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| JailError::Make {
            path: dir.to_path_buf(),
            source,
        })
}

/// An empty file to mount a file over.
pub fn make_mount_point(path: &Path) -> Result<(), JailError> {
    if let Some(parent) = path.parent() {
        make_dirs(parent)?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|source| JailError::Make {
            path: path.to_path_buf(),
            source,
        })
}

/// A character device node owned by `uid:gid`, mode 0600.
pub fn make_char_device(
    path: &Path,
    major: u32,
    minor: u32,
    uid: u32,
    gid: u32,
) -> Result<(), JailError> {
    if let Some(parent) = path.parent() {
        make_dirs(parent)?;
    }
    let c = c_path(path)?;
    let make = |ret: libc::c_int| {
        if ret < 0 {
            Err(JailError::Make {
                path: path.to_path_buf(),
                source: io::Error::last_os_error(),
            })
        } else {
            Ok(())
        }
    };
    // SAFETY: `c` is a NUL-terminated path.
    make(unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    })?;
    // SAFETY: as above.
    make(unsafe { libc::chown(c.as_ptr(), uid, gid) })
}

/// Makes `root` the root directory and detaches the old one.
pub fn pivot_root(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(step("chdir into the jail"))?;
    let dot = c".";
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one; both pointers are
    // NUL-terminated strings.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check("pivot_root", ret)?;
    // SAFETY: "." is NUL-terminated; the detached old root stays reachable to nobody.
    let ret = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check("detaching the old root", ret.into())?;
    std::env::set_current_dir("/").map_err(step("chdir to /"))
}

pub fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), JailError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    let ret = unsafe { libc::setrlimit(resource, &limit) };
    check("setrlimit", ret.into())
}

/// The highest capability number this kernel knows.
pub fn last_capability() -> u32 {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Drops every capability from the bounding and ambient sets, becomes `uid:gid` with no
/// supplementary groups (which empties the permitted and effective sets), then clears
/// the inheritable set, and sets no_new_privs.
pub fn drop_privileges(uid: u32, gid: u32, last_cap: u32) -> Result<(), JailError> {
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments; an unknown capability fails with EINVAL.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return check("dropping the capability bounding set", ret.into());
        }
    }
    // SAFETY: prctl with integer arguments.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check("clearing ambient capabilities", ret.into())?;
    // SAFETY: an empty group list.
    let ret = unsafe { libc::setgroups(0, std::ptr::null()) };
    check("setgroups", ret.into())?;
    // SAFETY: integer arguments.
    let ret = unsafe { libc::setresgid(gid, gid, gid) };
    check("setresgid", ret.into())?;
    // SAFETY: integer arguments.
    let ret = unsafe { libc::setresuid(uid, uid, uid) };
    check("setresuid", ret.into())?;
    clear_capabilities()?;
    // SAFETY: prctl with constant arguments.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check("PR_SET_NO_NEW_PRIVS", ret.into())
}

/// Empties the effective, permitted and inheritable sets (capset, version 3).
fn clear_capabilities() -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: version 3 takes a header and two data elements, all valid for the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    check("capset", ret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_descriptors_split_the_ranges() {
        assert_eq!(ranges_to_close(&[]), [(3, u32::MAX)]);
        assert_eq!(ranges_to_close(&[1, 3]), [(4, u32::MAX)]);
        assert_eq!(
            ranges_to_close(&[9, 5, 5]),
            [(3, 4), (6, 8), (10, u32::MAX)]
        );
    }
}
