//! Unix domain sockets at any path.
//!
//! A socket address holds at most 107 path bytes (`sun_path`), and state directories
//! under a deep checkout or `$XDG_RUNTIME_DIR` easily exceed that. A longer path is
//! reached through the directory instead: it is opened with `O_PATH` and the socket is
//! bound or connected as `/proc/self/fd/<fd>/<name>`, which the kernel resolves to the
//! same directory. The socket still lives at (and is removed from) its real path.

use std::ffi::CString;
use std::io::{Error, ErrorKind, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Path bytes a `sockaddr_un` holds, leaving room for the terminating NUL.
const MAX_PATH_BYTES: usize = 107;

/// Listens on `path`, however long it is.
pub fn bind(path: &Path) -> Result<UnixListener> {
    via_short_path(path, |p| UnixListener::bind(p))
}

/// Why [`listen_fresh`] would not listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("\"{path}\" exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("\"{path}\" is in use by another process")]
    InUse { path: PathBuf },
    #[error("cannot inspect \"{path}\"")]
    Inspect {
        path: PathBuf,
        #[source]
        source: Error,
    },
    #[error("cannot remove stale socket \"{path}\"")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: Error,
    },
    #[error("cannot listen on \"{path}\"")]
    Bind {
        path: PathBuf,
        #[source]
        source: Error,
    },
}

/// Listens on `path` like [`bind`], first removing a stale socket there (one nothing
/// listens on, left by an earlier run) but refusing a live one (another VM's console or
/// vsock: taking it over would cut that VM off) and any other kind of file.
pub fn listen_fresh(path: &Path) -> std::result::Result<UnixListener, ListenError> {
    use std::os::unix::fs::FileTypeExt;
    let owned = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket { path: owned() })
        }
        Ok(_) => match connect_nonblocking(path) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path)
                .map_err(|source| ListenError::RemoveStale {
                    path: owned(),
                    source,
                })?,
            _ => return Err(ListenError::InUse { path: owned() }),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ListenError::Inspect {
                path: owned(),
                source,
            })
        }
    }
    bind(path).map_err(|source| ListenError::Bind {
        path: owned(),
        source,
    })
}

/// Connects to the listener at `path`, however long it is.
pub fn connect(path: &Path) -> Result<UnixStream> {
    via_short_path(path, |p| UnixStream::connect(p))
}

/// Connects to the listener at `path` without blocking: a listener whose backlog is full
/// counts as refusing (`WouldBlock`), like one that is not there.
pub fn connect_nonblocking(path: &Path) -> Result<UnixStream> {
    via_short_path(path, connect_nonblocking_short)
}

/// Runs `op` on `path`, or on an equivalent path short enough for a socket address.
fn via_short_path<T>(path: &Path, op: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if path.as_os_str().len() <= MAX_PATH_BYTES {
        return op(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(too_long());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dir_fd = open_path_dir(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir_fd.as_raw_fd())).join(name);
    if short.as_os_str().len() > MAX_PATH_BYTES {
        return Err(too_long());
    }
    // The descriptor only has to live until the address is resolved by bind/connect.
    op(&short)
}

fn too_long() -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        "the socket's file name is too long for a Unix socket address",
    )
}

/// Opens `dir` as a path-only descriptor (no read permission needed, nothing to inherit).
fn open_path_dir(dir: &Path) -> Result<OwnedFd> {
    let c_dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `c_dir` is a valid NUL-terminated string; the result is checked.
    let fd = unsafe {
        libc::open(
            c_dir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect_nonblocking_short(path: &Path) -> Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of at least `len` bytes, and
    // `fd` is open.
    let result = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if result < 0 {
        return Err(Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// Waits up to `timeout_ms` (-1: forever) for any of `fds` to be readable or hung up;
/// returns whether one is. Retried on `EINTR`.
pub fn poll_readable(fds: &[std::os::fd::RawFd], timeout_ms: i32) -> Result<bool> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polls` is a valid array of pollfd of the given length.
        let ret =
            unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
        if ret >= 0 {
            return Ok(ret > 0);
        }
        let err = Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A directory whose socket paths are longer than a socket address holds.
    fn deep_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir()
            .join(format!("hearth-uds-{tag}-{}", std::process::id()))
            .join("d".repeat(60))
            .join("e".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn listen_fresh_replaces_stale_sockets_only() {
        let dir = deep_dir("fresh");
        let path = dir.join("c.sock");
        // Stale: bound, then its listener gone.
        drop(bind(&path).unwrap());
        let live = listen_fresh(&path).unwrap();
        // Live: refused, and left working.
        assert!(matches!(
            listen_fresh(&path),
            Err(ListenError::InUse { path: p }) if p == path
        ));
        assert!(connect(&path).is_ok());
        drop(live);
        std::fs::remove_file(&path).unwrap();
        // Not a socket: refused, untouched.
        std::fs::write(&path, b"keep").unwrap();
        assert!(matches!(
            listen_fresh(&path),
            Err(ListenError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("hearth-uds-fresh-{}", std::process::id())),
        )
        .unwrap();
    }

    #[test]
    fn long_paths_bind_and_connect_at_the_real_location() {
        let dir = deep_dir("long");
        let path = dir.join("v.sock");
        assert!(path.as_os_str().len() > MAX_PATH_BYTES);
        let listener = bind(&path).unwrap();
        assert!(path.exists(), "the socket lives where it was asked for");
        let mut client = connect(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let nonblocking = connect_nonblocking(&path).unwrap();
        assert!(listener.accept().is_ok());
        drop(nonblocking);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            connect(&path).unwrap_err().kind(),
            ErrorKind::NotFound,
            "a removed socket is gone at its real path"
        );
        let _ = std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn short_paths_are_used_as_they_are() {
        let path = std::env::temp_dir().join(format!("hearth-uds-s-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let _listener = bind(&path).unwrap();
        assert!(connect_nonblocking(&path).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(connect_nonblocking(&path).is_err());
    }

    #[test]
    fn impossible_paths_are_refused() {
        let name = "x".repeat(200);
        assert_eq!(
            connect_nonblocking(Path::new(&name)).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "a file name alone can be too long"
        );
        let missing_dir = std::env::temp_dir().join("f".repeat(120)).join("v.sock");
        assert_eq!(bind(&missing_dir).unwrap_err().kind(), ErrorKind::NotFound);
    }
}
