//! One passt process per user-mode NIC.
//!
//! hearth makes a Unix socket pair, gives passt one end with `--fd` (so there is no socket
//! path to share with a jailed VMM, and no connect after seccomp) and keeps the other for
//! the virtio-net device. passt runs in the foreground (`-f`) as our child, with `-1`:
//! it exits as soon as the VMM's end is closed, which the kernel does however the VMM
//! ends (exit, crash, SIGKILL of a jailed VMM whose supervisor died). [`Passt`]'s drop
//! also stops it outright and reaps it, for the ordinary exits, on a thread that seccomp
//! lets do so (a jail's supervisor; not the filtered thread of an unjailed VMM, which
//! leaves it to `--one-off`). A pid file is not needed: the process is our child.
//!
//! Started as root, passt drops to `nobody` on its own (its default for `--runas`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{PortForward, Protocol, DNS, GATEWAY, GUEST_ADDRESS, GUEST_PREFIX};

/// Environment variable naming the passt binary (a test or packaging override; the
/// `--passt` option wins over it).
pub const PASST_ENV: &str = "HEARTH_PASST";

#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("passt was not found on PATH (install the passt package, or name it with --passt)")]
    NotFound,
    #[error("cannot start passt \"{path}\"")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make the socket pair for passt")]
    SocketPair(#[source] io::Error),
    #[error("cannot publish port {port}: the host port is in use or cannot be bound")]
    PortBusy {
        port: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Port(#[from] super::PortError),
    #[error("cannot connect to the network back end's socket")]
    Connect(#[source] io::Error),
}

/// What a passt process is started with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PasstOptions {
    /// The binary; `None`: `$HEARTH_PASST`, else `passt` on PATH.
    pub binary: Option<PathBuf>,
    /// Host ports forwarded to the guest.
    pub ports: Vec<PortForward>,
}

/// A running passt, stopped (SIGKILL, then reaped) when dropped.
#[derive(Debug)]
pub struct Passt {
    child: Option<Child>,
}

/// The first executable `name` in the directories of `path` (a `PATH` value).
fn search_path(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The passt binary: `explicit`, else `$HEARTH_PASST`, else `passt` on PATH.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, PasstError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os(PASST_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    search_path("passt", &path).ok_or(PasstError::NotFound)
}

/// passt's arguments for `ports`, talking on descriptor `fd`.
pub fn arguments(fd: i32, ports: &[PortForward]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--foreground",
        "--quiet",
        "--stderr",
        "--one-off",
        "--ipv4-only",
        "--fd",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(fd.to_string());
    for (flag, value) in [
        ("--address", GUEST_ADDRESS.to_string()),
        ("--netmask", GUEST_PREFIX.to_string()),
        ("--gateway", GATEWAY.to_string()),
        ("--dns-forward", DNS.to_string()),
    ] {
        args.push(flag.into());
        args.push(value);
    }
    for port in ports {
        args.push(
            match port.protocol {
                Protocol::Tcp => "--tcp-ports",
                Protocol::Udp => "--udp-ports",
            }
            .into(),
        );
        args.push(port.passt_spec());
    }
    args
}

impl Passt {
    /// Checks that the published ports are free, starts passt and returns it with the
    /// VMM's end of its socket (blocking; the device makes it non-blocking).
    pub fn start(options: &PasstOptions) -> Result<(Self, OwnedFd), PasstError> {
        let binary = find_binary(options.binary.as_deref())?;
        super::check_distinct(&options.ports)?;
        // A port taken by someone else is said plainly now, not as a passt message in a
        // log after the VM started. (Released at once: passt binds it a moment later.)
        for port in &options.ports {
            port.check_free().map_err(|source| PasstError::PortBusy {
                port: port.to_string(),
                source,
            })?;
        }
        let (ours, theirs) = UnixStream::pair().map_err(PasstError::SocketPair)?;
        let fd = theirs.as_raw_fd();
        let mut command = Command::new(&binary);
        command
            .args(arguments(fd, &options.ports))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (fcntl, prctl, sigprocmask).
        unsafe {
            command.pre_exec(move || {
                // Our end of the pair is close-on-exec; passt's must stay open.
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Until passt changes its credentials (which clears this), it dies with
                // us; after that, `--one-off` ends it when our end closes.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| PasstError::Spawn {
            path: binary.clone(),
            source,
        })?;
        drop(theirs);
        log::info!(
            "passt (pid {}) started for a user-mode NIC{}",
            child.id(),
            if options.ports.is_empty() {
                String::new()
            } else {
                format!(
                    ", publishing {}",
                    (options.ports.iter())
                        .map(PortForward::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
        );
        Ok((Self { child: Some(child) }, OwnedFd::from(ours)))
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Leaves the process alone (a forked copy of this handle is not its owner).
    pub fn forget(mut self) {
        self.child = None;
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if crate::seccomp::thread_is_filtered() {
            // The unjailed VMM's own thread may not signal or reap: passt ends by itself
            // (`--one-off`) when this process's end of the socket closes, at its exit at
            // the latest, and init reaps it.
            return;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// passt, or `None` (after saying so) when it is not installed and the test may skip.
    pub(crate) fn passt_or_skip() -> Option<PathBuf> {
        match find_binary(None) {
            Ok(path) if path.exists() => Some(path),
            _ if std::env::var("HEARTH_REQUIRE")
                .unwrap_or_default()
                .split(',')
                .any(|need| matches!(need.trim(), "all" | "passt")) =>
            {
                panic!("HEARTH_REQUIRE requires passt, but it was not found")
            }
            _ => {
                eprintln!("skipped: passt is not installed");
                None
            }
        }
    }

    #[test]
    fn arguments_fix_the_guest_addresses() {
        let args = arguments(7, &["127.0.0.1:8080:80".parse().unwrap()]);
        let text = args.join(" ");
        assert!(text.starts_with("--foreground --quiet --stderr --one-off --ipv4-only --fd 7 "));
        assert!(text.contains("--address 10.0.2.15 --netmask 24 --gateway 10.0.2.2"));
        assert!(text.contains("--dns-forward 10.0.2.3"));
        assert!(text.ends_with("--tcp-ports 127.0.0.1/8080:80"));
        let udp = arguments(3, &["5353:53/udp".parse().unwrap()]);
        assert_eq!(udp[udp.len() - 2..], ["--udp-ports", "5353:53"]);
    }

    #[test]
    fn search_finds_executables_only() {
        let dir = std::env::temp_dir().join(format!("hearth-passt-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("passt");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(search_path("passt", dir.as_os_str()), None);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(search_path("passt", dir.as_os_str()), Some(file));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            Passt::start(&PasstOptions {
                binary: Some("/nonexistent/passt".into()),
                ports: Vec::new()
            }),
            Err(PasstError::Spawn { .. })
        ));
    }

    /// passt answers an ARP request for the gateway, refuses nothing when the port is
    /// free, and exits when our end of the socket closes.
    #[test]
    fn passt_talks_and_goes_away_with_its_socket() {
        let Some(binary) = passt_or_skip() else {
            return;
        };
        let options = PasstOptions {
            binary: Some(binary),
            ports: Vec::new(),
        };
        let (mut passt, socket) = Passt::start(&options).unwrap();
        let mut socket = UnixStream::from(socket);
        let mac = [2, 0, 0, 0, 0, 1];
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&GUEST_ADDRESS.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&GATEWAY.octets());
        socket.write_all(&(arp.len() as u32).to_be_bytes()).unwrap();
        socket.write_all(&arp).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut length = [0u8; 4];
        socket.read_exact(&mut length).unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(length) as usize];
        socket.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..6], mac);
        assert_eq!(reply[12..14], [0x08, 0x06]);
        assert_eq!(reply[20..22], [0, 2]); // ARP reply
        assert_eq!(reply[28..32], GATEWAY.octets());

        drop(socket);
        let mut child = passt.child.take().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "passt did not exit");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_busy_port_is_refused_before_passt_starts() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = busy.local_addr().unwrap().port();
        let options = PasstOptions {
            binary: Some("/nonexistent/passt".into()),
            ports: vec![format!("127.0.0.1:{taken}:80").parse().unwrap()],
        };
        let err = Passt::start(&options).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot publish port 127.0.0.1:{taken}:80/tcp: the host port is in use or cannot be bound"
            )
        );
    }
}
