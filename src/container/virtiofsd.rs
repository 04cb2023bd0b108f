//! virtiofsd back ends for the folders that container VMs and machines share over
//! virtio-fs: finding the program, starting one per folder, and stopping them.
//!
//! hearth binds each back end's vhost-user socket itself (in the VM's directory, owned by
//! the jailed VMM's uid when there is a jail) and hands the listening descriptor to
//! virtiofsd with `--fd`, so the socket exists, with the right owner, before the VMM
//! starts, and no one else's process can have taken the path. virtiofsd accepts one
//! connection and exits when that connection closes, so a back end never outlives the
//! VMM that used it; one whose VMM never connected is killed by its owner (the
//! [`Virtiofsd`] handle on drop, with `PR_SET_PDEATHSIG` as the backstop for a
//! container run, or `hearth machine stop` from the pids a machine records).
//!
//! Sandboxing: QEMU's virtiofsd (Debian 12's `qemu-system-common`) runs with `-o
//! sandbox=namespace`: new mount, PID and network namespaces, `pivot_root` into the
//! shared folder, capabilities cut to the file-serving ones. It has no read-only
//! option, so a read-only share is enforced on the host: virtiofsd starts in a private
//! mount namespace of its own in which the folder is bind-mounted onto itself and made
//! read-only, recursively (`mount_setattr`); what virtiofsd then binds and pivots into
//! is that read-only mount, and without `CAP_SYS_ADMIN` it cannot make it writable
//! again, whatever the guest asks. The guest's own read-only mount only spares it the
//! errors.
//!
//! `-o cache=auto`: the guest caches names and attributes for a second and revalidates
//! a file's data when it opens it (close-to-open), so what the host changes is seen in
//! the guest, while repeated lookups stay cheap; `cache=always` would let the guest go
//! on seeing stale data, `cache=none` would send every read to the host.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian and Fedora install QEMU's virtiofsd, tried after `PATH`.
const WELL_KNOWN: [&str; 2] = ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"];

/// The descriptor number the listening socket gets in virtiofsd.
const SOCKET_FD: i32 = 3;

/// How long a back end has to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a back end could not be found or started.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("virtiofsd not found (looked on PATH, in {}): install qemu-system-common, pass --virtiofsd PATH, or copy the folder into a disk image with -v HOST:GUEST:copy", WELL_KNOWN.join(" and "))]
    NotFound,
    #[error("--virtiofsd {0}: not an executable file")]
    NotExecutable(PathBuf),
    #[error("shared folder \"{0}\" does not exist")]
    Missing(PathBuf),
    #[error("shared folder \"{0}\" is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot resolve the shared folder \"{path}\"")]
    Resolve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("virtio-fs shares need root: QEMU's virtiofsd sandboxes itself in namespaces only root may create (run as root, or use -v HOST:GUEST:copy)")]
    NeedsRoot,
    #[error("cannot listen on the virtio-fs socket \"{path}\"")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot give the virtio-fs socket \"{path}\" to the jailed VMM")]
    Give {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start virtiofsd {program} for \"{folder}\"")]
    Start {
        program: PathBuf,
        folder: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("virtiofsd for \"{folder}\" exited at once ({status}); see {log}")]
    Exited {
        folder: PathBuf,
        status: std::process::ExitStatus,
        log: PathBuf,
    },
}

/// The virtiofsd program: `--virtiofsd PATH`, else `virtiofsd` on `PATH`, else QEMU's.
pub fn find(explicit: Option<&Path>) -> Result<PathBuf, VirtiofsdError> {
    if let Some(path) = explicit {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(VirtiofsdError::NotExecutable(path.to_path_buf()))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|dirs| {
            std::env::split_paths(&dirs)
                .map(|dir| dir.join("virtiofsd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(WELL_KNOWN.iter().map(PathBuf::from))
        .find(|p| is_executable(p))
        .ok_or(VirtiofsdError::NotFound)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The folder to share, resolved (symlinks followed), checked to be a directory.
pub fn check_folder(path: &Path) -> Result<PathBuf, VirtiofsdError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(VirtiofsdError::Missing(path.to_path_buf()))
        }
        Ok(meta) if !meta.is_dir() => {
            return Err(VirtiofsdError::NotADirectory(path.to_path_buf()))
        }
        _ => {}
    }
    std::fs::canonicalize(path).map_err(|source| VirtiofsdError::Resolve {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks what a virtio-fs share needs before anything is started: root (for
/// virtiofsd's namespaces) and the program itself.
pub fn preflight(explicit: Option<&Path>) -> Result<PathBuf, VirtiofsdError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(VirtiofsdError::NeedsRoot);
    }
    find(explicit)
}

/// A directory for back ends' sockets at a short path (`hearth-fs-<random>` in
/// `$XDG_RUNTIME_DIR` or the temporary directory): a socket address holds at most 107
/// path bytes, and a machine's state directory or the template store can be deeper.
/// Removed on drop unless [`SocketDir::keep`] is called.
#[derive(Debug)]
pub struct SocketDir {
    path: PathBuf,
    keep: bool,
}

impl SocketDir {
    pub fn create() -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let path = base.join(format!("hearth-fs-{}", super::random_id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place (a machine's: `machine stop` removes it).
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One back end to start.
#[derive(Debug, Clone)]
pub struct ShareSpec {
    /// The folder, as [`check_folder`] resolved it.
    pub folder: PathBuf,
    pub read_only: bool,
    /// The vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    /// virtiofsd's stderr is appended here.
    pub log: PathBuf,
    /// The socket's owner (the jailed VMM's uid and gid), if not ours.
    pub socket_owner: Option<(u32, u32)>,
    /// A machine's back end: its own session, no parent-death signal (it lives as long
    /// as the detached VMM, which outlives `hearth machine start`).
    pub detached: bool,
}

/// A running virtiofsd, stopped on drop unless [`Virtiofsd::release`]d.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Option<Child>,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Listens on the spec's socket and starts `program` serving the folder on it.
    pub fn start(program: &Path, spec: &ShareSpec) -> Result<Self, VirtiofsdError> {
        let _ = std::fs::remove_file(&spec.socket);
        let listener = crate::uds::bind(&spec.socket).map_err(|source| VirtiofsdError::Listen {
            path: spec.socket.clone(),
            source,
        })?;
        if let Some((uid, gid)) = spec.socket_owner {
            std::os::unix::fs::lchown(&spec.socket, Some(uid), Some(gid)).map_err(|source| {
                VirtiofsdError::Give {
                    path: spec.socket.clone(),
                    source,
                }
            })?;
        }
        let socket = spec.socket.clone();
        let fail = |source| VirtiofsdError::Start {
            program: program.to_path_buf(),
            folder: spec.folder.clone(),
            source,
        };
        let log = crate::container::vm::append(&spec.log).map_err(fail)?;
        let listen_fd: OwnedFd = listener.into();
        let mut cmd = Command::new(program);
        cmd.args(args(&spec.folder))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let setup = ChildSetup {
            listen_fd: listen_fd.as_raw_fd(),
            read_only: spec
                .read_only
                .then(|| CString::new(spec.folder.as_os_str().as_bytes()))
                .transpose()
                .map_err(|e| fail(io::Error::new(io::ErrorKind::InvalidInput, e)))?,
            detached: spec.detached,
        };
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe system calls (dup2, setsid/setpgid, prctl, unshare, mount,
        // mount_setattr) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || setup.run());
        }
        let child = cmd.spawn().map_err(fail)?;
        // Our copy of the listener goes; virtiofsd holds its own.
        drop(listen_fd);
        Ok(Self {
            child: Some(child),
            socket,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The pid and start time to record for a later [`BackendPid::stop`].
    pub fn backend_pid(&self) -> BackendPid {
        BackendPid::of(self.pid())
    }

    /// Fails if the back end has already exited (a bad option, a folder it cannot open).
    pub fn check_alive(&mut self, folder: &Path, log: &Path) -> Result<(), VirtiofsdError> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(VirtiofsdError::Exited {
                    folder: folder.to_path_buf(),
                    status,
                    log: log.to_path_buf(),
                });
            }
        }
        Ok(())
    }

    /// Lets the back end live on after this handle (a machine's: `machine stop` reaps
    /// it by pid, and it exits by itself when the VMM's connection closes).
    pub fn release(mut self) -> BackendPid {
        let pid = BackendPid::of(self.pid());
        self.child = None;
        pid
    }

    /// Stops the back end and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                stop_pid(child.id() as i32, || matches!(child.try_wait(), Ok(None)));
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`] while `alive` says so.
fn stop_pid(pid: i32, mut alive: impl FnMut() -> bool) {
    // SAFETY: kill(2) on a process the caller identified as a back end of its own.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while alive() {
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A released back end, named so that a later `hearth machine stop` signals that
/// process and no other that got its pid since: the pid and its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendPid {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat` (clock ticks after boot).
    pub start_time: u64,
}

impl BackendPid {
    fn of(pid: i32) -> Self {
        Self {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether the process is still this back end and alive (not a zombie).
    pub fn is_running(&self) -> bool {
        self.pid > 0 && start_time(self.pid) == Some(self.start_time)
    }

    /// Stops it (SIGTERM, then SIGKILL) if it still runs.
    pub fn stop(&self) {
        if self.is_running() {
            stop_pid(self.pid, || self.is_running());
        }
    }
}

/// The start time of a live (not zombie) process.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name: state is the first (field 3),
    // the start time field 22.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?;
    if matches!(state, "Z" | "X") {
        return None;
    }
    rest.nth(18)?.parse().ok()
}

/// virtiofsd's arguments for `folder`: the listening socket is descriptor 3.
fn args(folder: &Path) -> Vec<OsString> {
    let mut source = OsString::from("source=");
    source.push(folder);
    vec![
        format!("--fd={SOCKET_FD}").into(),
        "-o".into(),
        source,
        "-o".into(),
        "sandbox=namespace".into(),
        "-o".into(),
        "cache=auto".into(),
        "-o".into(),
        "log_level=warn".into(),
    ]
}

/// What the forked child does before it becomes virtiofsd.
struct ChildSetup {
    listen_fd: i32,
    /// The folder, when it is shared read-only.
    read_only: Option<CString>,
    detached: bool,
}

impl ChildSetup {
    /// Runs in the forked child: async-signal-safe calls only.
    fn run(&self) -> io::Result<()> {
        let check = |ret: libc::c_int| {
            if ret < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on descriptors and strings this process owns; see
        // each call's comment for why the arguments are valid.
        unsafe {
            // virtiofsd inherits the listener as descriptor 3: dup2 makes a copy without
            // close-on-exec, but leaves the flag alone when the listener is 3 already.
            if self.listen_fd == SOCKET_FD {
                check(libc::fcntl(SOCKET_FD, libc::F_SETFD, 0))?;
            } else {
                check(libc::dup2(self.listen_fd, SOCKET_FD))?;
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if self.detached {
                libc::setsid();
            } else {
                // Out of the terminal's process group (Ctrl-C is for the container),
                // and gone with the front end whatever kills it.
                libc::setpgid(0, 0);
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            }
            if let Some(folder) = &self.read_only {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                // Nothing done here may reach the host's mount table.
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    folder.as_ptr(),
                    folder.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                make_read_only(folder)?;
            }
        }
        Ok(())
    }
}

/// Makes the mount at `folder` and every mount below it read-only.
///
/// # Safety
/// Async-signal-safe: only system calls.
unsafe fn make_read_only(folder: &CString) -> io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `folder` is a NUL-terminated path and `attr` a mount_attr of the size
    // passed; the kernel only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            folder.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret == 0 {
        return Ok(());
    }
    if io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        return Err(io::Error::last_os_error());
    }
    // Before Linux 5.12: only the top mount can be remounted read-only, so the mounts
    // below it are taken away rather than left writable.
    // SAFETY: as above, NUL-terminated paths.
    unsafe {
        if libc::umount2(folder.as_ptr(), libc::MNT_DETACH) < 0
            || libc::mount(
                folder.as_ptr(),
                folder.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) < 0
            || libc::mount(
                std::ptr::null(),
                folder.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn folders_are_checked_before_anything_starts() {
        let dir = TempDir::new("virtiofsd-folder");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            check_folder(&dir.path().join("missing"))
                .unwrap_err()
                .to_string(),
            format!(
                "shared folder \"{}\" does not exist",
                dir.path().join("missing").display()
            )
        );
        assert!(matches!(
            check_folder(&file),
            Err(VirtiofsdError::NotADirectory(_))
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert_eq!(
            check_folder(&link).unwrap(),
            std::fs::canonicalize(dir.path()).unwrap()
        );
    }

    #[test]
    fn an_explicit_program_must_be_executable() {
        let dir = TempDir::new("virtiofsd-find");
        let file = dir.path().join("virtiofsd");
        std::fs::write(&file, b"#!/bin/sh\n").unwrap();
        assert!(matches!(
            find(Some(&file)),
            Err(VirtiofsdError::NotExecutable(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find(Some(&file)).unwrap(), file);
        let err = VirtiofsdError::NotFound.to_string();
        assert!(
            err.contains("--virtiofsd") && err.contains(":copy"),
            "{err}"
        );
    }

    #[test]
    fn arguments_share_the_folder_alone() {
        let args = args(Path::new("/srv/a b"));
        let text: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            text,
            [
                "--fd=3",
                "-o",
                "source=/srv/a b",
                "-o",
                "sandbox=namespace",
                "-o",
                "cache=auto",
                "-o",
                "log_level=warn"
            ]
        );
    }

    #[test]
    fn a_recorded_pid_names_one_process() {
        let me = BackendPid::of(std::process::id() as i32);
        assert!(me.is_running());
        let reused = BackendPid {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_running());
        assert!(!BackendPid {
            pid: 0,
            start_time: 0
        }
        .is_running());
    }

    /// Starts QEMU's virtiofsd for real (as root, where installed): the socket is there
    /// before it runs, a read-only share is a read-only mount in its namespace, and the
    /// handle leaves no process behind.
    #[test]
    fn a_backend_starts_shares_read_only_and_stops() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let Ok(program) = find(None) else {
            eprintln!("skipped: no virtiofsd");
            return;
        };
        let dir = TempDir::new("virtiofsd-run");
        let folder = dir.path().join("shared");
        std::fs::create_dir(&folder).unwrap();
        let folder = check_folder(&folder).unwrap();
        let spec = ShareSpec {
            folder: folder.clone(),
            read_only: true,
            socket: dir.path().join("fs0.sock"),
            log: dir.path().join("fs.log"),
            socket_owner: Some((65534, 65534)),
            detached: false,
        };
        let mut backend = Virtiofsd::start(&program, &spec).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&spec.socket).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        let pid = backend.pid();
        // The mount table of its namespace shows the folder read-only; ours does not
        // have it at all.
        let deadline = Instant::now() + Duration::from_secs(10);
        let line = loop {
            let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
            let found = info
                .lines()
                .find(|l| l.split(' ').nth(4) == Some(folder.to_str().unwrap()))
                .map(str::to_string);
            match found {
                Some(line) => break line,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                None => panic!("no mount of {} in {info}", folder.display()),
            }
        };
        let options = line.split(' ').nth(5).unwrap();
        assert!(options.split(',').any(|o| o == "ro"), "{line}");
        let ours = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!ours.contains(folder.to_str().unwrap()));
        backend.check_alive(&folder, &spec.log).unwrap();
        let recorded = BackendPid::of(pid);
        assert!(recorded.is_running());
        drop(backend);
        assert!(!recorded.is_running());
        assert!(!spec.socket.exists());
    }
}
