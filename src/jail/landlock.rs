//! A Landlock rule set for the jailed VMM, where the kernel has Landlock: on top of what
//! the mount namespace already hides, each jail file gets only the access it needs (the
//! kernel image cannot be written, nothing can be executed or created except sockets in
//! their directories), TCP bind/connect is refused (ABI 4+), and abstract Unix sockets and
//! signals outside the jail are out of reach (ABI 6+). Best effort: each right the running
//! kernel does not know is left out, and without Landlock at all the jail still stands on
//! namespaces, uid and capabilities.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

#[cfg(test)]
pub const EXECUTE: u64 = 1 << 0;
pub const WRITE_FILE: u64 = 1 << 1;
pub const READ_FILE: u64 = 1 << 2;
pub const READ_DIR: u64 = 1 << 3;
pub const REMOVE_FILE: u64 = 1 << 5;
pub const MAKE_SOCK: u64 = 1 << 9;
/// Every filesystem right of ABI 1 (bits 0-12).
const ABI1_FS: u64 = (1 << 13) - 1;
const REFER: u64 = 1 << 13;
pub const TRUNCATE: u64 = 1 << 14;
pub const IOCTL_DEV: u64 = 1 << 15;
const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version of the running kernel, or `None` without Landlock.
pub fn abi_version() -> Option<u32> {
    // SAFETY: a null attribute with size 0 and the VERSION flag only queries the ABI.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    (ret > 0).then_some(ret as u32)
}

/// The filesystem rights this ABI knows.
fn fs_rights(abi: u32) -> u64 {
    let mut rights = ABI1_FS;
    if abi >= 2 {
        rights |= REFER;
    }
    if abi >= 3 {
        rights |= TRUNCATE;
    }
    if abi >= 5 {
        rights |= IOCTL_DEV;
    }
    rights
}

/// What [`restrict`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Enforced { abi: u32 },
    Unsupported,
}

/// Restricts the calling thread (and the threads it starts later) to `rules`: each is
/// the access allowed to a file, or to a directory and what is beneath it. Needs
/// no_new_privs (or CAP_SYS_ADMIN) already set.
pub fn restrict(rules: &[(PathBuf, u64)]) -> io::Result<Outcome> {
    let Some(abi) = abi_version() else {
        return Ok(Outcome::Unsupported);
    };
    let handled = fs_rights(abi);
    let attr = RulesetAttr {
        handled_access_fs: handled,
        handled_access_net: if abi >= 4 {
            NET_BIND_TCP | NET_CONNECT_TCP
        } else {
            0
        },
        scoped: if abi >= 6 {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            0
        },
    };
    // Older kernels accept a larger attribute as long as the fields they lack are zero.
    // SAFETY: `attr` is a valid, initialised attribute of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for (path, access) in rules {
        add_rule(&ruleset, path, *access, handled)?;
    }
    // SAFETY: `ruleset` is an open Landlock rule set; flags must be 0.
    let ret = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Outcome::Enforced { abi })
}

fn add_rule(ruleset: &OwnedFd, path: &Path, access: u64, handled: u64) -> io::Result<()> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| with_path(io::Error::other("NUL in path")))?;
    // SAFETY: `c_path` is NUL-terminated; O_PATH opens no file contents.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(with_path(io::Error::last_os_error()));
    }
    // SAFETY: open returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = PathBeneathAttr {
        allowed_access: access & handled,
        parent_fd: fd.as_raw_fd(),
    };
    // SAFETY: `attr` is a valid path-beneath attribute; `ruleset` is a rule set.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    if ret < 0 {
        return Err(with_path(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_grow_with_the_abi() {
        assert_eq!(fs_rights(1), ABI1_FS);
        assert_eq!(fs_rights(2) & REFER, REFER);
        assert_eq!(fs_rights(4) & (TRUNCATE | IOCTL_DEV), TRUNCATE);
        assert_eq!(fs_rights(6) & IOCTL_DEV, IOCTL_DEV);
    }

    #[test]
    fn restricted_child_cannot_read_outside_its_rules() {
        if abi_version().is_none() {
            eprintln!("skipping: this kernel has no Landlock");
            return;
        }
        let dir = std::env::temp_dir().join(format!("hearth-landlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let allowed = dir.join("allowed");
        let denied = dir.join("denied");
        std::fs::write(&allowed, b"a").unwrap();
        std::fs::write(&denied, b"d").unwrap();
        // Landlock applies to the thread; a thread of our own keeps the test runner free.
        let (a, d) = (allowed.clone(), denied.clone());
        let result = std::thread::spawn(move || {
            // SAFETY: prctl with constant arguments on this thread.
            let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(ret, 0);
            let rules = [(a.clone(), READ_FILE)];
            assert!(matches!(
                restrict(&rules).unwrap(),
                Outcome::Enforced { .. }
            ));
            (std::fs::read(&a).is_ok(), std::fs::read(&d).is_ok())
        })
        .join()
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(result, (true, false));
    }
}
