//! The jail (`hearth run --jail`, `hearth restore --jail`), in the spirit of Firecracker's
//! jailer: before any guest input is read and before any thread starts, hearth forks into
//! new PID, mount, IPC and UTS namespaces (and a given or new network namespace), bind-
//! mounts only the files the VM needs into a per-VM directory, makes /dev/kvm,
//! /dev/net/tun, /dev/urandom and /dev/null there for the jail's uid, pivot_roots into it,
//! opens the taps, joins an optional cgroup, applies resource limits, drops to an
//! unprivileged uid/gid without capabilities and with no_new_privs, and adds a Landlock
//! rule set where the kernel has Landlock. The parent stays outside: it waits, forwards
//! SIGTERM/SIGINT/SIGHUP, removes the jail afterwards and exits as the child did.
//! README "Security: the jail" has the layout and the threat model.

mod cgroup;
mod landlock;
mod plan;
mod sys;

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cgroup::{CgroupLimits, Hierarchy, CGROUP_ROOT};
pub use plan::{absolute_socket_path, canonical_file, host_path, Access, JailFile, JailPlan};

use crate::config::VmConfig;

/// The uid and gid a jailed VMM runs as unless told otherwise (`nobody`/`nogroup`).
pub const DEFAULT_UID: u32 = 65534;
pub const DEFAULT_GID: u32 = 65534;
/// Jail directories go to `<this>/<id>` unless `--jail-dir` says otherwise.
pub const DEFAULT_JAIL_PARENT: &str = "/run/hearth/jail";
/// RLIMIT_NOFILE of a jailed VMM (Firecracker's jailer uses the same default).
pub const DEFAULT_NOFILE: u64 = 2048;
/// The jail's UTS namespace gets this host name.
const HOSTNAME: &str = "hearth-jail";

/// Which network namespace the jailed VMM lives in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetnsChoice {
    /// The caller's (where taps made by root on this host are).
    #[default]
    Inherit,
    /// The namespace behind this file (e.g. /run/netns/NAME).
    Join(PathBuf),
    /// A new, empty one (a VM without a network, or with taps made inside it later).
    New,
}

/// Resource limits, each applied as both soft and hard limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    pub nofile: u64,
    /// Largest file the VMM may write, in bytes; `None`: unlimited.
    #[serde(default)]
    pub fsize: Option<u64>,
}

impl Default for Rlimits {
    fn default() -> Self {
        Self {
            nofile: DEFAULT_NOFILE,
            fsize: None,
        }
    }
}

impl Rlimits {
    /// `nofile=N,fsize=SIZE`, any subset, over the defaults.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut limits = Self::default();
        let options = crate::config::specs::parse_options(spec, &["nofile", "fsize"])
            .map_err(|e| e.to_string())?;
        for (key, value) in &options {
            match key.as_str() {
                "nofile" => {
                    limits.nofile = value
                        .parse()
                        .ok()
                        .filter(|n| *n >= 64)
                        .ok_or_else(|| format!("nofile \"{value}\" is not a number >= 64"))?;
                }
                "fsize" => {
                    limits.fsize = Some(
                        crate::config::parse_byte_size(value)
                            .map_err(|e| format!("fsize \"{value}\": {e}"))?,
                    );
                }
                _ => unreachable!("parse_options admits only the keys above"),
            }
        }
        Ok(limits)
    }
}

/// Everything about a jail, as inert data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JailConfig {
    /// Names the jail directory's default and the cgroups: [A-Za-z0-9_-], 1-64 bytes.
    pub id: String,
    /// The jail directory (must not exist yet; removed when the VMM exits).
    pub dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub netns: NetnsChoice,
    #[serde(default)]
    pub cgroup: CgroupLimits,
    #[serde(default)]
    pub rlimits: Rlimits,
    /// A directory of the VM's own, bound into the jail at its own path (`--vm-dir`).
    #[serde(default)]
    pub vm_dir: Option<PathBuf>,
}

/// The jail's command-line options, shared by `hearth run` and `hearth restore`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct JailArgs {
    /// Run the VMM in a jail (needs root): its own namespaces, only the VM's files, an
    /// unprivileged uid without capabilities. See README, "Security: the jail".
    #[arg(long)]
    pub jail: bool,
    /// The jail's name: [A-Za-z0-9_-], up to 64 (default: hearth-<pid>).
    #[arg(long, value_name = "ID", requires = "jail")]
    pub jail_id: Option<String>,
    /// The jail directory, which must not exist (default: /run/hearth/jail/<id>).
    #[arg(long, value_name = "DIR", requires = "jail")]
    pub jail_dir: Option<PathBuf>,
    /// The jailed VMM's uid (default: 65534).
    #[arg(long, value_name = "UID", requires = "jail")]
    pub uid: Option<u32>,
    /// The jailed VMM's gid (default: 65534).
    #[arg(long, value_name = "GID", requires = "jail")]
    pub gid: Option<u32>,
    /// Join this network namespace (e.g. /run/netns/NAME) instead of staying in ours.
    #[arg(
        long,
        value_name = "PATH",
        requires = "jail",
        conflicts_with = "new_netns"
    )]
    pub netns: Option<PathBuf>,
    /// Start in a new, empty network namespace.
    #[arg(long, requires = "jail")]
    pub new_netns: bool,
    /// Place the VMM in the cgroup hearth/<id> with limits: cpu=CPUS,memory=SIZE,pids=N.
    #[arg(long, value_name = "SPEC", requires = "jail")]
    pub cgroup: Option<String>,
    /// Resource limits: nofile=N,fsize=SIZE (default: nofile=2048, fsize unlimited).
    #[arg(long, value_name = "SPEC", requires = "jail")]
    pub rlimit: Option<String>,
    /// A directory of this VM's alone (its sockets, the host's vsock listeners), bound
    /// into the jail read-write at its own path and given to the jail's uid.
    #[arg(long, value_name = "DIR", requires = "jail")]
    pub vm_dir: Option<PathBuf>,
}

impl JailArgs {
    /// The jail these options describe, or `None` without `--jail`.
    pub fn config(&self) -> Result<Option<JailConfig>, JailError> {
        if !self.jail {
            return Ok(None);
        }
        let id = match &self.jail_id {
            Some(id) => id.clone(),
            None => format!("hearth-{}", std::process::id()),
        };
        check_id(&id)?;
        let netns = match (&self.netns, self.new_netns) {
            (Some(path), _) => NetnsChoice::Join(path.clone()),
            (None, true) => NetnsChoice::New,
            (None, false) => NetnsChoice::Inherit,
        };
        let option = |flag: &'static str, spec: &str, reason: String| JailError::Option {
            flag,
            spec: spec.to_string(),
            reason,
        };
        let cgroup = match &self.cgroup {
            Some(spec) => {
                CgroupLimits::parse(spec).map_err(|reason| option("--cgroup", spec, reason))?
            }
            None => CgroupLimits::default(),
        };
        let rlimits = match &self.rlimit {
            Some(spec) => {
                Rlimits::parse(spec).map_err(|reason| option("--rlimit", spec, reason))?
            }
            None => Rlimits::default(),
        };
        let dir = match &self.jail_dir {
            Some(dir) if dir.is_relative() => {
                return Err(option(
                    "--jail-dir",
                    &dir.display().to_string(),
                    "must be an absolute path".into(),
                ))
            }
            Some(dir) => dir.clone(),
            None => Path::new(DEFAULT_JAIL_PARENT).join(&id),
        };
        Ok(Some(JailConfig {
            id,
            dir,
            uid: self.uid.unwrap_or(DEFAULT_UID),
            gid: self.gid.unwrap_or(DEFAULT_GID),
            netns,
            cgroup,
            rlimits,
            vm_dir: self.vm_dir.clone(),
        }))
    }
}

fn check_id(id: &str) -> Result<(), JailError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(JailError::Option {
            flag: "--jail-id",
            spec: id.to_string(),
            reason: "use 1 to 64 of A-Z a-z 0-9 - _".into(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("invalid {flag} \"{spec}\": {reason}")]
    Option {
        flag: &'static str,
        spec: String,
        reason: String,
    },
    #[error("the jail needs root (hearth runs as uid {0})")]
    NotRoot(u32),
    #[error("cannot use {what} \"{path}\"", path = path.display())]
    File {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("\"{path}\" is under {reserved}, which the jail makes itself", path = path.display())]
    Reserved {
        path: PathBuf,
        reserved: &'static str,
    },
    #[error("\"{}\" is inside (or holds) the jail directory", .0.display())]
    InsideJail(PathBuf),
    #[error("\"{}\" is named twice", .0.display())]
    Twice(PathBuf),
    #[error("jail directory \"{}\" exists (another VM's, or left over): remove it or choose another --jail-id", .0.display())]
    DirExists(PathBuf),
    #[error("cannot make \"{path}\"", path = path.display())]
    Make {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("\"{}\" is in use by a running VM", .0.display())]
    SocketInUse(PathBuf),
    #[error("cannot join network namespace \"{path}\"", path = path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount \"{target}\"", target = target.display())]
    Mount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the cgroup")]
    Cgroup(#[source] io::Error),
    #[error("jail: {step} failed")]
    Step {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("uid {uid}/gid {gid} cannot {verb} \"{path}\" (chown it, or choose --uid/--gid)", path = path.display())]
    NoAccess {
        uid: u32,
        gid: u32,
        verb: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::tap::TapError),
    #[error("Landlock")]
    Landlock(#[source] io::Error),
}

/// Which side of the fork [`enter`] returned on.
#[derive(Debug)]
pub enum Side {
    /// The jailed child: build and run the VM as usual.
    Jailed,
    /// The parent, after the child exited: exit with this status.
    Parent(u8),
}

/// Jails the process for the VM `config` (whose file paths become absolute; its CPU
/// profile is resolved here, as /sys is not in the jail) with the extra sockets
/// `sockets` (the API socket). Call before reading any guest input and before starting
/// any thread.
pub fn enter(
    jail: &JailConfig,
    config: &mut VmConfig,
    sockets: &mut [&mut PathBuf],
) -> Result<Side, JailError> {
    check_root()?;
    let plan = JailPlan::new(&jail.dir, config, sockets)?.with_vm_dirs(jail)?;
    config.cpu_profile = match config.resolved_cpu_profile() {
        crate::config::CpuProfile::Host => crate::config::CpuProfileChoice::Host,
        crate::config::CpuProfile::Compat => crate::config::CpuProfileChoice::Compat,
    };
    let taps: Vec<String> = (config.nets.iter())
        .filter_map(|n| n.tap().map(str::to_string))
        .collect();
    enter_plan(jail, &plan, &taps)
}

/// The jailed VMM must be started by root (it makes namespaces and mounts).
pub fn check_root() -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    Ok(())
}

/// Jails the process with `plan`, opening the taps `taps` before privileges go.
pub fn enter_plan(jail: &JailConfig, plan: &JailPlan, taps: &[String]) -> Result<Side, JailError> {
    check_root()?;
    // Host facts the VMM looks up in /sys, which the jail does not have: cached now.
    crate::arch::pvm::host_is_pvm();
    let host = HostSide::prepare(jail, plan)?;
    let pid = match fork_into_pid_namespace() {
        Ok(pid) => pid,
        Err(e) => {
            host.clean_up();
            return Err(e);
        }
    };
    if pid == 0 {
        inside(jail, plan, taps)?;
        return Ok(Side::Jailed);
    }
    log::info!("jailed VMM is pid {pid} in {}", jail.dir.display());
    let status = supervise(pid);
    host.clean_up();
    Ok(Side::Parent(exit_status(status)))
}

/// What the front end makes on the host, and removes when the VMM has exited.
struct HostSide {
    dir: PathBuf,
    links: Vec<(PathBuf, PathBuf)>,
    cgroups: Vec<cgroup::Group>,
}

impl HostSide {
    fn prepare(jail: &JailConfig, plan: &JailPlan) -> Result<Self, JailError> {
        let make_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JailError::Make { path, source }
        };
        if jail.dir.symlink_metadata().is_ok() {
            return Err(JailError::DirExists(jail.dir.clone()));
        }
        if let Some(parent) = jail.dir.parent() {
            sys::make_dirs(parent)?;
        }
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&jail.dir)
            .map_err(make_err(&jail.dir))?;
        let mut host = Self {
            dir: jail.dir.clone(),
            links: Vec::new(),
            cgroups: Vec::new(),
        };
        if let Err(e) = host.fill(jail, plan) {
            host.clean_up();
            return Err(e);
        }
        Ok(host)
    }

    fn fill(&mut self, jail: &JailConfig, plan: &JailPlan) -> Result<(), JailError> {
        let make_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JailError::Make { path, source }
        };
        // Socket directories belong to the jail's uid, and only it and root get in.
        for dir in plan.socket_dirs() {
            let host_dir = plan.host_path(&dir);
            sys::make_dirs(&host_dir)?;
            std::os::unix::fs::chown(&host_dir, Some(jail.uid), Some(jail.gid))
                .map_err(make_err(&host_dir))?;
            std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(make_err(&host_dir))?;
        }
        // The VM's own directories are its uid's, and only it and root get in.
        for dir in &plan.vm_dirs {
            std::os::unix::fs::chown(dir, Some(jail.uid), Some(jail.gid)).map_err(make_err(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(make_err(dir))?;
        }
        for socket in plan.linked_sockets() {
            claim_socket_path(socket)?;
            let target = plan.host_path(socket);
            std::os::unix::fs::symlink(&target, socket).map_err(make_err(socket))?;
            self.links.push((socket.clone(), target));
        }
        // The console file is made here if missing, so the jailed uid can append to it.
        for file in plan.files.iter().filter(|f| f.access == Access::Append) {
            if let Ok(new) = std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&file.path)
            {
                std::os::unix::fs::fchown(&new, Some(jail.uid), Some(jail.gid))
                    .map_err(make_err(&file.path))?;
            }
        }
        if !jail.cgroup.is_empty() {
            let hierarchy = Hierarchy::detect(Path::new(CGROUP_ROOT));
            let groups = cgroup::plan(&hierarchy, &jail.id, &jail.cgroup);
            cgroup::create(&hierarchy, &groups, &jail.cgroup).map_err(JailError::Cgroup)?;
            self.cgroups = groups;
        }
        Ok(())
    }

    fn clean_up(&self) {
        for (link, target) in &self.links {
            // Only our own link: another VM may have taken the path since.
            if std::fs::read_link(link).is_ok_and(|t| &t == target) {
                let _ = std::fs::remove_file(link);
            }
        }
        cgroup::remove(&self.cgroups);
        // The jail's tree lived in the child's mount namespace only: here the directory
        // holds the socket directories and the sockets.
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            log::warn!("cannot remove the jail {}: {e}", self.dir.display());
        }
    }
}

/// Refuses a live socket at `path` (another VM's); removes a stale socket or link.
fn claim_socket_path(path: &Path) -> Result<(), JailError> {
    let Ok(meta) = path.symlink_metadata() else {
        return Ok(());
    };
    use std::os::unix::fs::FileTypeExt;
    if !(meta.file_type().is_socket() || meta.file_type().is_symlink()) {
        return Err(JailError::File {
            what: "socket path".into(),
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::EEXIST),
        });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(JailError::SocketInUse(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|source| JailError::Make {
        path: path.to_path_buf(),
        source,
    })
}

/// The signals the parent forwards to the jailed child.
const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &signo in signals {
        // SAFETY: as above; valid signal numbers.
        unsafe { libc::sigaddset(&mut set, signo) };
    }
    set
}

/// Forks a child that is PID 1 of a new PID namespace. The forwarded signals stay
/// blocked in both (the parent waits for them; the child, as a namespace's init, would
/// otherwise drop them until the VMM reads them from its signalfd), and SIGCHLD is
/// blocked in the parent for `supervise`.
fn fork_into_pid_namespace() -> Result<libc::pid_t, JailError> {
    let mut blocked = FORWARDED.to_vec();
    blocked.push(libc::SIGCHLD);
    let set = signal_set(&blocked);
    // SAFETY: `set` is initialised; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    sys::unshare(libc::CLONE_NEWPID)?;
    // SAFETY: hearth is single-threaded here (the jail is entered before any thread
    // starts), so the child may go on running Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::Step {
            step: "fork",
            source: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        let chld = signal_set(&[libc::SIGCHLD]);
        // SAFETY: `chld` is initialised.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &chld, std::ptr::null_mut()) };
    }
    Ok(pid)
}

/// Waits for the child, forwarding SIGTERM/SIGINT/SIGHUP; returns its wait status.
fn supervise(child: libc::pid_t) -> libc::c_int {
    let mut waited = FORWARDED.to_vec();
    waited.push(libc::SIGCHLD);
    let set = signal_set(&waited);
    loop {
        // SAFETY: `set` is initialised; no siginfo wanted.
        let signo = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if signo < 0 {
            continue; // EINTR
        }
        if signo != libc::SIGCHLD {
            // SAFETY: kill with a pid we forked.
            unsafe { libc::kill(child, signo) };
            continue;
        }
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let ret = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if ret == child {
            return status;
        }
        if ret < 0 {
            return 1 << 8;
        }
    }
}

/// The child's exit status as ours; a child killed by a signal kills us the same way,
/// so whoever waits for `hearth` sees what it would have seen without the jail.
fn exit_status(status: libc::c_int) -> u8 {
    if libc::WIFEXITED(status) {
        return libc::WEXITSTATUS(status) as u8;
    }
    let signo = libc::WTERMSIG(status);
    // SAFETY: resetting a handler to its default, unblocking and raising: no memory is
    // touched.
    unsafe {
        libc::signal(signo, libc::SIG_DFL);
        let set = signal_set(&[signo]);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signo);
    }
    128 + signo as u8
}

/// The jailed child's half: everything from the namespaces to Landlock.
fn inside(jail: &JailConfig, plan: &JailPlan, taps: &[String]) -> Result<(), JailError> {
    sys::set_parent_death_signal()?;
    // The metrics file, if any, was opened by the front end, and the NICs' stream
    // sockets (passt's, or connected by path) were made ready by it: their descriptors
    // stay.
    let mut keep: Vec<_> = crate::metrics::raw_fd().into_iter().collect();
    keep.extend(crate::devices::virtio::net::stream::prepared_fds());
    sys::close_inherited_fds(&keep)?;
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    match &jail.netns {
        NetnsChoice::Inherit => {}
        NetnsChoice::Join(path) => sys::join_netns(path)?,
        NetnsChoice::New => flags |= libc::CLONE_NEWNET,
    }
    sys::unshare(flags)?;
    sys::set_hostname(HOSTNAME)?;
    build_tree(jail, plan)?;
    for name in taps {
        crate::devices::virtio::net::tap::preopen(name)?;
    }
    if !jail.cgroup.is_empty() {
        let hierarchy = Hierarchy::detect(Path::new(CGROUP_ROOT));
        cgroup::join(&cgroup::plan(&hierarchy, &jail.id, &jail.cgroup))
            .map_err(JailError::Cgroup)?;
    }
    let last_cap = sys::last_capability();
    sys::pivot_root(&plan.root)?;
    // Only the socket directories (and the mounts of their own) stay writable.
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | NO_SUID_DEV_EXEC,
        None,
    )?;
    sys::set_rlimit(libc::RLIMIT_NOFILE, jail.rlimits.nofile)?;
    if let Some(fsize) = jail.rlimits.fsize {
        sys::set_rlimit(libc::RLIMIT_FSIZE, fsize)?;
    }
    sys::drop_privileges(jail.uid, jail.gid, last_cap)?;
    // The kernel clears the parent-death signal when the credentials change: set it
    // again, or a VMM whose supervisor is killed outright would outlive it. (The window
    // between setresuid and here is a few instructions.)
    sys::set_parent_death_signal()?;
    match landlock::restrict(&landlock_rules(plan)).map_err(JailError::Landlock)? {
        landlock::Outcome::Enforced { abi } => log::info!("Landlock ABI {abi} enforced"),
        landlock::Outcome::Unsupported => log::warn!("no Landlock in this kernel"),
    }
    check_access(jail, plan)
}

const NO_SUID_DEV_EXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// The devices a VMM opens: /dev/kvm, /dev/net/tun, /dev/urandom and /dev/null.
const DEVICES: [(&str, u32, u32); 4] = [
    ("/dev/kvm", 10, 232),
    ("/dev/net/tun", 10, 200),
    ("/dev/urandom", 1, 9),
    ("/dev/null", 1, 3),
];

/// Mounts, in the child's own mount namespace, the jail's tree: a small tmpfs over the
/// jail directory (so the mount points of the files cost nothing on the host and vanish
/// with the namespace), a /dev, /proc of the new PID namespace, the host's socket
/// directories, each file.
fn build_tree(jail: &JailConfig, plan: &JailPlan) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let root = &plan.root;
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    // The host side of each socket directory, held open while the tmpfs covers it.
    let socket_dirs = (plan.socket_dirs().into_iter())
        .map(|dir| {
            let host_dir = plan.host_path(&dir);
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(&host_dir)
                .map(|fd| (host_dir.clone(), fd))
                .map_err(|source| JailError::Make {
                    path: host_dir,
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    sys::mount(
        None,
        root,
        Some("tmpfs"),
        NO_SUID_DEV_EXEC,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )?;
    let dev = root.join("dev");
    sys::make_dirs(&dev)?;
    sys::mount(
        None,
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=64"),
    )?;
    for (path, major, minor) in DEVICES {
        let node = plan.host_path(Path::new(path));
        sys::make_char_device(&node, major, minor, jail.uid, jail.gid)?;
    }
    sys::mount(
        None,
        &dev,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )?;
    let proc = root.join("proc");
    sys::make_dirs(&proc)?;
    sys::mount(None, &proc, Some("proc"), NO_SUID_DEV_EXEC, None)?;
    // Socket directories first: a file in one is mounted on top of the directory's bind.
    for (target, host_dir) in &socket_dirs {
        sys::make_dirs(target)?;
        let source = PathBuf::from(format!("/proc/self/fd/{}", host_dir.as_raw_fd()));
        sys::bind(&source, target, NO_SUID_DEV_EXEC)?;
    }
    drop(socket_dirs);
    // The VM's own directories after the socket directories (one may lie in one).
    for dir in &plan.vm_dirs {
        let target = plan.host_path(dir);
        sys::make_dirs(&target)?;
        sys::bind(dir, &target, NO_SUID_DEV_EXEC)?;
    }
    for file in &plan.files {
        let target = plan.host_path(&file.path);
        sys::make_mount_point(&target)?;
        let mut flags = libc::MS_NOSUID | libc::MS_NOEXEC;
        if !is_block_device(&file.path) {
            flags |= libc::MS_NODEV;
        }
        if file.access == Access::Read {
            flags |= libc::MS_RDONLY;
        }
        sys::bind(&file.path, &target, flags)?;
    }
    // A back end's socket: connecting needs the inode, which a bind mount brings along.
    for socket in &plan.backend_sockets {
        let target = plan.host_path(socket);
        sys::make_mount_point(&target)?;
        sys::bind(socket, &target, NO_SUID_DEV_EXEC)?;
    }
    Ok(())
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    path.metadata()
        .is_ok_and(|m| m.file_type().is_block_device())
}

/// Each file its access, the devices read/write with ioctls, /proc readable, the socket
/// directories for making and removing sockets; nothing executable, nothing else made.
fn landlock_rules(plan: &JailPlan) -> Vec<(PathBuf, u64)> {
    use landlock::{IOCTL_DEV, MAKE_SOCK, READ_DIR, READ_FILE, REMOVE_FILE, WRITE_FILE};
    let mut rules: Vec<(PathBuf, u64)> = (plan.files.iter())
        .map(|f| {
            let access = match f.access {
                Access::Read => READ_FILE | IOCTL_DEV,
                Access::Append => WRITE_FILE,
                Access::ReadWrite => READ_FILE | WRITE_FILE | IOCTL_DEV,
            };
            (f.path.clone(), access)
        })
        .collect();
    for (device, _, _) in DEVICES {
        rules.push((device.into(), READ_FILE | WRITE_FILE | IOCTL_DEV));
    }
    rules.push(("/proc".into(), READ_FILE | READ_DIR));
    for dir in plan.socket_dirs().into_iter().chain(plan.vm_dirs.clone()) {
        rules.push((dir, MAKE_SOCK | REMOVE_FILE));
    }
    rules
}

/// Opens each file as the jailed uid will, so a file it may not use is named now rather
/// than as a device error later.
fn check_access(jail: &JailConfig, plan: &JailPlan) -> Result<(), JailError> {
    for file in &plan.files {
        let mut options = std::fs::OpenOptions::new();
        let verb = match file.access {
            Access::Read => {
                options.read(true);
                "read"
            }
            Access::Append => {
                options.append(true);
                "append to"
            }
            Access::ReadWrite => {
                options.read(true).write(true);
                "read and write"
            }
        };
        options
            .open(&file.path)
            .map_err(|source| JailError::NoAccess {
                uid: jail.uid,
                gid: jail.gid,
                verb,
                path: file.path.clone(),
                source,
            })?;
    }
    // Connecting to a Unix socket takes write permission on it; a test connection would
    // use up the one a virtiofsd accepts.
    for socket in &plan.backend_sockets {
        let no_access = |source| JailError::NoAccess {
            uid: jail.uid,
            gid: jail.gid,
            verb: "connect to",
            path: socket.clone(),
            source,
        };
        let path = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes())
            .map_err(|_| no_access(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        if unsafe { libc::access(path.as_ptr(), libc::W_OK) } != 0 {
            return Err(no_access(io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        jail: JailArgs,
    }

    fn config(argv: &[&str]) -> Result<Option<JailConfig>, JailError> {
        let cli = Cli::try_parse_from(std::iter::once("hearth").chain(argv.iter().copied()))
            .expect("clap accepts these");
        cli.jail.config()
    }

    #[test]
    fn defaults() {
        assert!(config(&[]).unwrap().is_none());
        let jail = config(&["--jail", "--jail-id", "vm1"]).unwrap().unwrap();
        assert_eq!(
            jail,
            JailConfig {
                id: "vm1".into(),
                dir: "/run/hearth/jail/vm1".into(),
                uid: 65534,
                gid: 65534,
                netns: NetnsChoice::Inherit,
                cgroup: CgroupLimits::default(),
                rlimits: Rlimits {
                    nofile: 2048,
                    fsize: None
                },
                vm_dir: None,
            }
        );
        let default_id = config(&["--jail"]).unwrap().unwrap().id;
        assert_eq!(default_id, format!("hearth-{}", std::process::id()));
    }

    #[test]
    fn every_option() {
        let jail = config(&[
            "--jail",
            "--jail-id",
            "a_b-1",
            "--jail-dir",
            "/srv/j",
            "--uid",
            "1000",
            "--gid",
            "100",
            "--netns",
            "/run/netns/x",
            "--cgroup",
            "pids=32",
            "--rlimit",
            "nofile=512,fsize=1G",
            "--vm-dir",
            "/run/vm1",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(jail.dir, PathBuf::from("/srv/j"));
        assert_eq!((jail.uid, jail.gid), (1000, 100));
        assert_eq!(jail.netns, NetnsChoice::Join("/run/netns/x".into()));
        assert_eq!(jail.cgroup.pids, Some(32));
        assert_eq!(jail.vm_dir, Some(PathBuf::from("/run/vm1")));
        assert_eq!(
            jail.rlimits,
            Rlimits {
                nofile: 512,
                fsize: Some(1 << 30)
            }
        );
        let jail = config(&["--jail", "--new-netns"]).unwrap().unwrap();
        assert_eq!(jail.netns, NetnsChoice::New);
        let json = serde_json::to_string(&jail).unwrap();
        assert_eq!(serde_json::from_str::<JailConfig>(&json).unwrap(), jail);
    }

    #[test]
    fn bad_options_are_one_line() {
        for (argv, expected) in [
            (
                &["--jail", "--jail-id", "../x"][..],
                "invalid --jail-id \"../x\": use 1 to 64 of A-Z a-z 0-9 - _",
            ),
            (
                &["--jail", "--jail-dir", "rel"],
                "invalid --jail-dir \"rel\": must be an absolute path",
            ),
            (
                &["--jail", "--cgroup", "cpu=lots"],
                "invalid --cgroup \"cpu=lots\": cpu \"lots\" is not a CPU count (0.01-1024)",
            ),
            (
                &["--jail", "--rlimit", "nofile=3"],
                "invalid --rlimit \"nofile=3\": nofile \"3\" is not a number >= 64",
            ),
            (
                &["--jail", "--rlimit", "core=0"],
                "invalid --rlimit \"core=0\": unknown option \"core\" (expected nofile, fsize)",
            ),
        ] {
            let err = config(argv).unwrap_err();
            assert_eq!(crate::error_chain(&err), expected);
        }
        // Jail options without --jail, and both netns choices, are clap's errors.
        assert!(Cli::try_parse_from(["hearth", "--uid", "1"]).is_err());
        assert!(Cli::try_parse_from(["hearth", "--jail", "--netns", "/x", "--new-netns"]).is_err());
    }

    #[test]
    fn landlock_rules_cover_the_plan() {
        let plan = JailPlan {
            backend_sockets: Vec::new(),
            root: "/j".into(),
            files: vec![
                JailFile {
                    path: "/k".into(),
                    access: Access::Read,
                },
                JailFile {
                    path: "/d".into(),
                    access: Access::ReadWrite,
                },
            ],
            sockets: vec![
                "/s/api.sock".into(),
                "/s/v.sock".into(),
                "/vm/v.sock".into(),
            ],
            vm_dirs: vec!["/vm".into()],
        };
        let rules = landlock_rules(&plan);
        let rule = |p: &str| {
            rules
                .iter()
                .find(|(path, _)| path == Path::new(p))
                .unwrap()
                .1
        };
        assert_eq!(rule("/k") & landlock::WRITE_FILE, 0);
        assert_ne!(rule("/d") & landlock::WRITE_FILE, 0);
        assert_eq!(rule("/s"), landlock::MAKE_SOCK | landlock::REMOVE_FILE);
        assert_eq!(rule("/vm"), landlock::MAKE_SOCK | landlock::REMOVE_FILE);
        // A socket in the VM's own directory needs no socket directory besides it.
        assert_eq!(
            rules.iter().filter(|(p, _)| p == Path::new("/vm")).count(),
            1
        );
        assert_eq!(
            rules.iter().filter(|(p, _)| p == Path::new("/s")).count(),
            1
        );
        assert!(rules.iter().all(|(_, a)| a & landlock::EXECUTE == 0));
    }
}
