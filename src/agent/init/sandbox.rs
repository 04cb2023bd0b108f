//! The sandbox process: a fresh, single-threaded re-execution of the agent binary
//! (`/proc/self/exe sandbox`, plan on fd 3, sync pipe on fd 4) that sets up one process
//! and execs it. Doing the setup here, not after a fork of the multi-threaded agent, lets
//! it allocate, read files and fork again freely. A container VM's agent starts one at
//! boot with [`WAIT_ARG`]: it receives those descriptors later ([`handoff`]) and then
//! goes on exactly like one started with them in place.
//!
//! * [`Target::Host`]: apply user, environment and cwd, then exec in place.
//! * [`Target::Sandbox`]: join a new cgroup (if the plan names one), `unshare` mount,
//!   PID, UTS and IPC (the last two not for a container alone in its VM) and network
//!   namespaces (a new one for `Network::None`, the agent's prepared one for
//!   `Network::Bridge`) and fork. The child, PID 1 of the new PID namespace, builds the overlay
//!   root, pivots into it and execs; this process stays as its supervisor: it forwards
//!   signals and exits with the child's status.
//! * [`Target::Join`]: enter a running container's namespaces and cgroup, fork, exec.
//!
//! Sync pipe lines (each one `write`, parsed by the agent in any order): `pid <n>` (the
//! process that will exec, as seen by the VM), `ok` (setup done, exec follows) and
//! `error <text>` (setup failed; the process exits 125). Exec failures after `ok` are
//! reported like a shell does: one line on stderr and status 127 or 126.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::bridge::ContainerNet;
use super::handoff;
use super::net;
use super::resolve::{self, Candidate, Identity, LookupError, ResolveError};
use super::sys;
use super::timing;
use crate::agent::protocol::{Network, RunSpec, Volume, VolumeSource};

/// First argument that selects the sandbox role of the binary.
pub const SANDBOX_ARG: &str = "sandbox";
/// Descriptor carrying the JSON [`Plan`].
pub const PLAN_FD: RawFd = 3;
/// Descriptor of the sync pipe to the agent.
pub const SYNC_FD: RawFd = 4;
/// A container alone in its VM: where the supervisor reports the container's exit status
/// (4 bytes, little endian) the moment it is known; see [`supervise`].
pub const STATUS_FD: RawFd = 6;
/// Exit status of a sandbox whose setup failed (docker's "daemon error" status).
pub const SETUP_FAILED: i32 = 125;

/// What the sandbox process is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub spec: RunSpec,
    pub target: Target,
    /// Send step marks on the sync pipe (debug logging, see [`timing`]).
    #[serde(default)]
    pub marks: bool,
}

/// Where the process runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Target {
    /// In the VM's own root and namespaces; `PATH` defaults to `default_path`.
    Host { default_path: String },
    /// A new container on an overlay of `lower`; mount points live under `state_dir`.
    Sandbox {
        lower: Lower,
        state_dir: PathBuf,
        cgroup: Option<PathBuf>,
        /// The only container of its VM (a container VM): the UTS and IPC namespaces,
        /// which only keep sibling containers apart, are the VM's own.
        #[serde(default)]
        alone: bool,
        /// The network namespace the agent prepared (`Network::Bridge`).
        #[serde(default)]
        net: Option<ContainerNet>,
    },
    /// Inside the running container whose PID-namespace init is `pid` (VM pid).
    Join { pid: i32, cgroup: Option<PathBuf> },
}

/// The read-only layer of a container root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Lower {
    /// A block device, mounted read-only.
    Device { path: String, fstype: String },
    /// A directory that already holds a root filesystem (an image of the store).
    Dir(PathBuf),
}

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot read the sandbox plan")]
    Plan(#[source] io::Error),
    #[error("malformed sandbox plan")]
    PlanJson(#[source] serde_json::Error),
    #[error("{what}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("invalid {what} {path:?}: must be an absolute path without ..")]
    BadPath { what: &'static str, path: String },
    #[error("memory limit requested but the kernel has no memory cgroup controller")]
    NoMemoryController,
    #[error("CPU limit requested but the kernel has no cpu cgroup controller")]
    NoCpuController,
}

fn ctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> Result<T, SandboxError> {
    r.map_err(|source| SandboxError::Sys {
        what: what(),
        source,
    })
}

/// This process's step marks not yet sent; `None` when the plan asks for none.
static MARKS: Mutex<Option<Vec<(u64, String)>>> = Mutex::new(None);

fn marks() -> std::sync::MutexGuard<'static, Option<Vec<(u64, String)>>> {
    MARKS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records that `step` has just ended (the text is only built when marks are on).
fn mark(step: impl FnOnce() -> String) {
    if let Some(list) = marks().as_mut() {
        list.push((sys::monotonic_us(), step()));
    }
}

/// Sends a mark on the late-marks pipe (the supervisor, after the sync pipe closed).
fn late_mark(step: &str) {
    if marks().is_some() {
        let line = timing::mark_line(sys::monotonic_us(), step);
        // SAFETY: writes from a valid buffer; the descriptor was passed by the agent
        // along with a plan that asks for marks (a closed one only fails the write).
        unsafe {
            libc::write(
                timing::LATE_MARKS_FD,
                line.as_ptr() as *const libc::c_void,
                line.len(),
            )
        };
    }
}

/// The writing end of the sync pipe.
struct SyncPipe(Option<File>);

impl SyncPipe {
    /// Writes `line`, after the marks recorded so far, in one `write`.
    fn send(&mut self, line: &str) {
        let mut text = String::new();
        if let Some(list) = marks().as_mut() {
            for (us, step) in list.drain(..) {
                text.push_str(&timing::mark_line(us, &step));
            }
        }
        text.push_str(line);
        text.push('\n');
        if let Some(f) = &mut self.0 {
            let _ = f.write_all(text.as_bytes());
        }
    }

    fn error(&mut self, err: &dyn std::error::Error) {
        let text = crate::error_chain(err).replace('\n', " ");
        self.send(&format!("error {text}"));
    }

    fn close(&mut self) {
        self.0 = None;
    }
}

/// Second argument of a sandbox pre-started by the agent: its descriptors arrive on a
/// socket (see [`handoff`]) instead of being in place at exec.
pub const WAIT_ARG: &str = "--wait-for-descriptors";

/// Entry point of `hearth-init sandbox`; returns the exit status.
pub fn main() -> i32 {
    let waited = std::env::args_os().nth(2).as_deref() == Some(OsStr::new(WAIT_ARG));
    if waited {
        if let Err(e) = handoff::receive_into_place() {
            eprintln!("hearth-init: {}", crate::error_chain(&e));
            return 2;
        }
    }
    let started = sys::monotonic_us();
    // The agent passes fds 3 and 4; refuse to adopt descriptors that are not open.
    for fd in [PLAN_FD, SYNC_FD] {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            eprintln!("hearth-init: the sandbox role is started by the agent only");
            return 2;
        }
    }
    // SAFETY: the agent set up fd 3 and 4 for this process alone; they are open (checked
    // above) and nothing else in this process owns them.
    let (plan_file, sync_file) =
        unsafe { (File::from_raw_fd(PLAN_FD), File::from_raw_fd(SYNC_FD)) };
    let _ = sys::set_cloexec(SYNC_FD);
    sys::cloexec_from(SYNC_FD + 1);
    let mut sync = SyncPipe(Some(sync_file));
    let plan = match read_plan(plan_file) {
        Ok(plan) => plan,
        Err(e) => {
            sync.error(&e);
            return SETUP_FAILED;
        }
    };
    if plan.marks {
        let step = if waited {
            "started (descriptors received)"
        } else {
            "started (exec done)"
        };
        *marks() = Some(vec![(started, step.into())]);
        mark(|| "plan read".into());
    }
    run(plan, sync)
}

fn read_plan(mut file: File) -> Result<Plan, SandboxError> {
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(SandboxError::Plan)?;
    serde_json::from_slice(&text).map_err(SandboxError::PlanJson)
}

fn run(plan: Plan, mut sync: SyncPipe) -> i32 {
    let spec = &plan.spec;
    match &plan.target {
        Target::Host { default_path } => exec_process(spec, &mut sync, default_path),
        Target::Sandbox {
            lower,
            state_dir,
            cgroup,
            alone,
            net,
        } => match start_sandbox(spec, cgroup.as_deref(), *alone, net.as_ref()) {
            Err(e) => {
                sync.error(&e);
                SETUP_FAILED
            }
            Ok(0) => {
                forked_child();
                let setup = setup_container(spec, lower, state_dir, cgroup.is_some(), net.as_ref());
                if let Err(e) = setup {
                    sync.error(&e);
                    std::process::exit(SETUP_FAILED);
                }
                exec_process(spec, &mut sync, resolve::DEFAULT_PATH)
            }
            Ok(child) => {
                mark(|| "forked the container's init".into());
                sync.send(&format!("pid {child}"));
                sync.close();
                supervise(child, *alone)
            }
        },
        Target::Join { pid, cgroup } => match join(*pid, cgroup.as_deref()) {
            Err(e) => {
                sync.error(&e);
                SETUP_FAILED
            }
            Ok(0) => {
                forked_child();
                exec_process(spec, &mut sync, resolve::DEFAULT_PATH)
            }
            Ok(child) => {
                mark(|| "forked the container's init".into());
                sync.send(&format!("pid {child}"));
                sync.close();
                supervise(child, false)
            }
        },
    }
}

/// In a forked child: the marks inherited from the parent are the parent's to send.
fn forked_child() {
    if let Some(list) = marks().as_mut() {
        list.clear();
    }
    mark(|| "container init runs (fork done)".into());
}

/// Joins the cgroup, unshares the namespaces and forks; returns 0 in the child.
fn start_sandbox(
    spec: &RunSpec,
    cgroup: Option<&Path>,
    alone: bool,
    net: Option<&ContainerNet>,
) -> Result<i32, SandboxError> {
    if let Some(dir) = cgroup {
        enter_new_cgroup(dir, spec)?;
        mark(|| format!("cgroup {} created and joined", dir.display()));
    }
    // The mount and PID namespaces give the container its own root and PID 1 even
    // alone in its VM; UTS and IPC ones only matter next to other containers.
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID;
    if !alone {
        flags |= libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    }
    if spec.network == Network::None {
        flags |= libc::CLONE_NEWNET;
    }
    if let Some(net) = net {
        enter_netns(&net.netns)?;
        mark(|| "entered the prepared network namespace".into());
    }
    if cgroup.is_some() {
        // Rooted at the cgroup just joined: the container sees itself at "/".
        flags |= libc::CLONE_NEWCGROUP;
    }
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(flags) } < 0 {
        return Err(sys_err("cannot create the container namespaces"));
    }
    mark(|| format!("unshare {}", namespace_names(flags)));
    // SAFETY: this process is single-threaded (a fresh exec), so the child may do anything.
    ctx(unsafe { sys::fork() }, || {
        "cannot fork the container".into()
    })
}

/// Enters the network namespace the agent made for the container (with its veth).
fn enter_netns(path: &Path) -> Result<(), SandboxError> {
    let file = ctx(File::open(path), || {
        format!("cannot open the network namespace {}", path.display())
    })?;
    // SAFETY: the descriptor is an open file; setns checks it is a network namespace.
    if unsafe { libc::setns(sys::raw(&file), libc::CLONE_NEWNET) } < 0 {
        return Err(sys_err("cannot enter the container's network namespace"));
    }
    Ok(())
}

/// The namespaces in `flags`, for the marks.
fn namespace_names(flags: libc::c_int) -> String {
    [
        (libc::CLONE_NEWNS, "mnt"),
        (libc::CLONE_NEWUTS, "uts"),
        (libc::CLONE_NEWIPC, "ipc"),
        (libc::CLONE_NEWPID, "pid"),
        (libc::CLONE_NEWNET, "net"),
        (libc::CLONE_NEWCGROUP, "cgroup"),
    ]
    .iter()
    .filter(|(flag, _)| flags & flag != 0)
    .map(|(_, name)| *name)
    .collect::<Vec<_>>()
    .join(",")
}

fn enter_new_cgroup(dir: &Path, spec: &RunSpec) -> Result<(), SandboxError> {
    ctx(
        std::fs::create_dir(dir).or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        }),
        || format!("cannot create cgroup {}", dir.display()),
    )?;
    if let Some(bytes) = spec.memory_limit {
        let file = dir.join("memory.max");
        if !file.exists() {
            return Err(SandboxError::NoMemoryController);
        }
        ctx(sys::write_text(&file, &bytes.to_string()), || {
            format!("cannot set memory.max to {bytes}")
        })?;
    }
    if let Some(cpus) = spec.cpus {
        let text = resolve::cpu_max(cpus)?;
        let file = dir.join("cpu.max");
        if !file.exists() {
            return Err(SandboxError::NoCpuController);
        }
        ctx(sys::write_text(&file, &text), || {
            format!("cannot set cpu.max to {text}")
        })?;
    }
    ctx(sys::write_text(&dir.join("cgroup.procs"), "0"), || {
        format!("cannot join cgroup {}", dir.display())
    })
}

fn check_abs(what: &'static str, path: &str) -> Result<PathBuf, SandboxError> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(SandboxError::BadPath {
            what,
            path: path.to_string(),
        });
    }
    Ok(p.to_path_buf())
}

fn mount_ctx(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), SandboxError> {
    let what = || {
        format!(
            "mount {} on {}",
            source.or(fstype).unwrap_or("none"),
            target.display()
        )
    };
    ctx(sys::mount(source, target, fstype, flags, data), || {
        format!("cannot {}", what())
    })?;
    mark(what);
    Ok(())
}

fn mkdir(path: &Path) -> Result<(), SandboxError> {
    ctx(sys::mkdir_all(path), || {
        format!("cannot create {}", path.display())
    })
}

/// Runs in the container's PID 1 before exec: builds and enters the root filesystem.
fn setup_container(
    spec: &RunSpec,
    lower: &Lower,
    state: &Path,
    own_cgroup: bool,
    net: Option<&ContainerNet>,
) -> Result<(), SandboxError> {
    mount_ctx(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let (lower_mnt, rw, rootfs) = (state.join("lower"), state.join("rw"), state.join("rootfs"));
    for dir in [&lower_mnt, &rw, &rootfs] {
        mkdir(dir)?;
    }
    mark(|| "state dirs created".into());
    let lower_dir = match lower {
        Lower::Device { path, fstype } => {
            mount_ctx(Some(path), &lower_mnt, Some(fstype), libc::MS_RDONLY, None)?;
            lower_mnt.clone()
        }
        Lower::Dir(dir) => dir.clone(),
    };
    mount_ctx(Some("tmpfs"), &rw, Some("tmpfs"), 0, Some("mode=0755"))?;
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    mkdir(&upper)?;
    mkdir(&work)?;
    mark(|| "upper and work dirs created".into());
    for dir in [&lower_dir, &upper, &work] {
        let text = dir.to_string_lossy();
        if text.contains([',', ':']) || !dir.is_absolute() {
            return Err(SandboxError::BadPath {
                what: "overlay directory",
                path: text.into_owned(),
            });
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower_dir.display(),
        upper.display(),
        work.display()
    );
    mount_ctx(Some("overlay"), &rootfs, Some("overlay"), 0, Some(&opts))?;

    // Enter the new root; the old one stays reachable at /.hearth-old until the device
    // nodes and volumes have been mounted from it.
    let old = Path::new("/.hearth-old");
    ctx(std::env::set_current_dir(&rootfs), || {
        "cannot enter the container root".into()
    })?;
    mkdir(Path::new(".hearth-old"))?;
    ctx(
        sys::pivot_root(Path::new("."), Path::new(".hearth-old")),
        || "cannot pivot_root into the container root".into(),
    )?;
    ctx(std::env::set_current_dir("/"), || {
        "cannot chdir to /".into()
    })?;
    mark(|| "pivot_root".into());

    mount_special(own_cgroup)?;
    // Files bound in (an OCI runtime's /etc/hosts, /etc/hostname, ...) go over what the
    // agent writes below, as they would over the image's; folders go first.
    let (files, folders): (Vec<&Volume>, Vec<&Volume>) =
        spec.volumes.iter().partition(|v| binds_a_file(v, old));
    for volume in folders {
        mount_volume(volume, old)?;
    }
    if let Some(name) = &spec.hostname {
        write_host_files(name, spec, net.map(|n| n.address))?;
        mark(|| "/etc/hostname and /etc/hosts written".into());
    }
    if let Some(text) = net.and_then(|n| n.resolv_conf.as_deref()) {
        mkdir(Path::new("/etc"))?;
        // A link (often into /run) would send the write outside the container's files.
        let _ = std::fs::remove_file("/etc/resolv.conf");
        ctx(std::fs::write("/etc/resolv.conf", text), || {
            "cannot write /etc/resolv.conf".into()
        })?;
        mark(|| "/etc/resolv.conf written".into());
    }
    for volume in files {
        mount_volume(volume, old)?;
    }
    ctx(sys::umount_detach(old), || {
        "cannot detach the old root".into()
    })?;
    let _ = std::fs::remove_dir(old);
    mark(|| "old root detached".into());

    if let Some(name) = &spec.hostname {
        // SAFETY: the pointer and length describe the bytes of `name`.
        let ret = unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) };
        if ret < 0 {
            return Err(SandboxError::Sys {
                what: format!("cannot set hostname {name:?}"),
                source: io::Error::last_os_error(),
            });
        }
        mark(|| "sethostname".into());
    }
    if spec.network == Network::None {
        net::set_up("lo")?;
        mark(|| "lo up".into());
    }
    Ok(())
}

/// Whether `volume` binds a file of the VM (see `RunSpec::files`), seen from the old
/// root at `old`.
fn binds_a_file(volume: &Volume, old: &Path) -> bool {
    match &volume.source {
        Some(VolumeSource::Path { path }) => {
            old.join(path.strip_prefix('/').unwrap_or(path)).is_file()
        }
        _ => false,
    }
}

/// Mounts one volume at its target in the new root, from the old root at `old`: an
/// ext4 disk, or a directory of the VM (a shared folder) bound in.
fn mount_volume(volume: &Volume, old: &Path) -> Result<(), SandboxError> {
    let target = check_abs("volume target", &volume.target)?;
    let in_old = |path: &Path| old.join(path.strip_prefix("/").unwrap_or(path));
    match &volume.source {
        None => {
            let device = check_abs("volume device", &volume.device)?;
            mkdir(&target)?;
            let flags = if volume.readonly { libc::MS_RDONLY } else { 0 };
            mount_ctx(
                Some(&in_old(&device).to_string_lossy()),
                &target,
                Some("ext4"),
                flags,
                None,
            )
        }
        Some(VolumeSource::Path { path }) => {
            let source = in_old(&check_abs("volume source", path)?);
            if source.is_file() {
                // A file is bound over a file: make one if the image has none.
                if let Some(parent) = target.parent() {
                    mkdir(parent)?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&target)
                    .map_err(|source| SandboxError::Sys {
                        what: format!("cannot create {}", target.display()),
                        source,
                    })?;
            } else {
                mkdir(&target)?;
            }
            let source = source.to_string_lossy();
            mount_ctx(
                Some(&source),
                &target,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?;
            if volume.readonly {
                // A bind mount takes MS_RDONLY only on a remount.
                mount_ctx(
                    None,
                    &target,
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    None,
                )?;
            }
            Ok(())
        }
        // The agent mounts these in the VM and passes them on as paths.
        Some(VolumeSource::Virtiofs { tag }) => Err(SandboxError::BadPath {
            what: "unmounted virtio-fs volume",
            path: tag.clone(),
        }),
    }
}

/// The character devices of a container's /dev: name, major, minor, mode (as docker's).
const DEV_NODES: [(&str, u32, u32, u32); 6] = [
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
    ("tty", 5, 0, 0o666),
];

/// /proc, /sys (with the container's cgroup, read-only) and a minimal /dev in the new
/// root.
fn mount_special(own_cgroup: bool) -> Result<(), SandboxError> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mkdir(Path::new("/proc"))?;
    mount_ctx(Some("proc"), Path::new("/proc"), Some("proc"), nosuid, None)?;
    mkdir(Path::new("/sys"))?;
    mount_ctx(
        Some("sysfs"),
        Path::new("/sys"),
        Some("sysfs"),
        nosuid | libc::MS_RDONLY,
        None,
    )?;
    if own_cgroup {
        // Best effort: limits apply whether or not the container can read them.
        let _ = sys::mount(
            Some("cgroup2"),
            Path::new("/sys/fs/cgroup"),
            Some("cgroup2"),
            nosuid | libc::MS_RDONLY,
            None,
        );
    }
    let dev = Path::new("/dev");
    mkdir(dev)?;
    mount_ctx(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    // Fresh nodes of the same devices as the VM's: one mknod each, where a bind mount
    // of the VM's node takes a file and a mount.
    // Without a umask for the nodes: every user may use them, as in the VM.
    let umask = sys::umask(0);
    let made = DEV_NODES
        .iter()
        .try_for_each(|&(node, major, minor, mode)| {
            let target = dev.join(node);
            ctx(sys::mknod_char(&target, mode, major, minor), || {
                format!("cannot create {}", target.display())
            })
        });
    sys::umask(umask);
    made?;
    mark(|| "/dev nodes created".into());
    let pts = dev.join("pts");
    mkdir(&pts)?;
    mount_ctx(
        Some("devpts"),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    let shm = dev.join("shm");
    mkdir(&shm)?;
    mount_ctx(Some("shm"), &shm, Some("tmpfs"), nosuid, Some("mode=1777"))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(std::os::unix::fs::symlink(target, dev.join(link)), || {
            format!("cannot create /dev/{link}")
        })?;
    }
    mark(|| "/dev links".into());
    Ok(())
}

fn write_host_files(
    hostname: &str,
    spec: &RunSpec,
    address: Option<std::net::Ipv4Addr>,
) -> Result<(), SandboxError> {
    mkdir(Path::new("/etc"))?;
    let ip = spec
        .net
        .as_ref()
        .and_then(|n| net::parse_cidr(&n.address).ok())
        .map(|(addr, _)| addr)
        .or(address)
        .map(|addr| addr.to_string())
        .unwrap_or_else(|| "127.0.1.1".to_string());
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{hostname}\n"
    );
    ctx(
        std::fs::write("/etc/hostname", format!("{hostname}\n")),
        || "cannot write /etc/hostname".into(),
    )?;
    ctx(std::fs::write("/etc/hosts", hosts), || {
        "cannot write /etc/hosts".into()
    })?;
    // As docker does, the container gets the network's name servers in place of the
    // image's own.
    if let Some(resolv) = spec.net.as_ref().and_then(|n| resolv_conf(&n.dns)) {
        // An image may ship /etc/resolv.conf as a symlink (to systemd-resolved's file):
        // replace the link, not its target.
        let _ = std::fs::remove_file("/etc/resolv.conf");
        ctx(std::fs::write("/etc/resolv.conf", resolv), || {
            "cannot write /etc/resolv.conf".into()
        })?;
    }
    Ok(())
}

/// /etc/resolv.conf for `servers`; `None` when there are none.
fn resolv_conf(servers: &[String]) -> Option<String> {
    if servers.is_empty() {
        return None;
    }
    Some(
        servers
            .iter()
            .map(|server| format!("nameserver {server}\n"))
            .collect(),
    )
}

/// Enters the namespaces (and cgroup) of the container whose init is `pid`; forks and
/// returns 0 in the child, which is then inside the container's PID namespace.
fn join(pid: i32, cgroup: Option<&Path>) -> Result<i32, SandboxError> {
    if let Some(dir) = cgroup {
        ctx(sys::write_text(&dir.join("cgroup.procs"), "0"), || {
            format!("cannot join cgroup {}", dir.display())
        })?;
    }
    // Open them all first: entering the mount namespace changes what /proc shows.
    let mut files = Vec::new();
    for ns in ["ipc", "uts", "net", "pid", "mnt"] {
        let path = PathBuf::from(format!("/proc/{pid}/ns/{ns}"));
        files.push((
            ns,
            ctx(File::open(&path), || {
                format!("cannot open {}", path.display())
            })?,
        ));
    }
    for (ns, file) in &files {
        // SAFETY: the descriptor is an open namespace file; nstype 0 accepts any kind.
        if unsafe { libc::setns(sys::raw(file), 0) } < 0 {
            return Err(SandboxError::Sys {
                what: format!("cannot enter the container's {ns} namespace"),
                source: io::Error::last_os_error(),
            });
        }
    }
    drop(files);
    // SAFETY: this process is single-threaded (a fresh exec), so the child may do anything.
    ctx(unsafe { sys::fork() }, || "cannot fork".into())
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Stays with the container process: forwards signals, exits with its status.
fn supervise(child: i32, alone: bool) -> i32 {
    CHILD.store(child, Ordering::Relaxed);
    // Hold no copy of the container's stdio: the agent sees EOF when the container ends.
    if let Ok(null) = sys::open(Path::new("/dev/null"), libc::O_RDWR) {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe { libc::dup2(sys::raw(&null), fd) };
        }
    }
    for sig in crate::agent::protocol::FORWARDED_SIGNALS {
        // SAFETY: an all-zero sigaction is valid; the handler only calls kill.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    let status = match sys::waitpid(child) {
        Ok(status) => sys::status_code(status),
        Err(_) => SETUP_FAILED,
    };
    late_mark("the container's init exited (supervisor's waitpid returned)");
    if alone {
        // The VM ends with its only container. Were the supervisor to exit, the kernel
        // would tear the container's mount namespace down first (every mount of its
        // root: most of a second in an emulated guest kernel) before anyone learnt the
        // status. So it reports the status and stays until the VM stops.
        let bytes = status.to_le_bytes();
        // SAFETY: writes 4 bytes from a valid buffer to the agent's status pipe.
        let written = unsafe { libc::write(STATUS_FD, bytes.as_ptr().cast(), bytes.len()) };
        if written == bytes.len() as isize {
            loop {
                // SAFETY: pause has no preconditions; forwarded signals interrupt it.
                unsafe { libc::pause() };
            }
        }
    }
    status
}

fn probe(path: &Path) -> Candidate {
    let Ok(meta) = std::fs::metadata(path) else {
        return Candidate::Missing;
    };
    let Ok(c) = sys::cstr(path) else {
        return Candidate::Missing;
    };
    // SAFETY: `c` is a valid C string.
    let executable = unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0;
    if meta.is_dir() || !executable {
        Candidate::NotExecutable
    } else {
        Candidate::Executable
    }
}

fn current_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its full length.
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } < 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// What exec needs, resolved before dropping privileges.
struct Prepared {
    identity: Identity,
    env: Vec<String>,
    cwd: PathBuf,
}

fn prepare(spec: &RunSpec, default_path: &str) -> Result<Prepared, SandboxError> {
    let passwd = sys::read_text(Path::new("/etc/passwd")).ok();
    let group = sys::read_text(Path::new("/etc/group")).ok();
    let identity =
        resolve::resolve_user(spec.user.as_deref(), passwd.as_deref(), group.as_deref())?;
    let hostname = spec.hostname.clone().or_else(current_hostname);
    let env = resolve::final_env(&spec.env, &identity.home, hostname.as_deref(), default_path);
    let cwd = if spec.cwd.is_empty() {
        PathBuf::from("/")
    } else {
        Path::new("/").join(&spec.cwd)
    };
    mkdir(&cwd)?;
    Ok(Prepared { identity, env, cwd })
}

fn sys_err(what: &str) -> SandboxError {
    SandboxError::Sys {
        what: what.to_string(),
        source: io::Error::last_os_error(),
    }
}

fn become_user(spec: &RunSpec, p: &Prepared) -> Result<(), SandboxError> {
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    if spec.tty {
        // SAFETY: fd 0 is the pty slave; this process just became a session leader.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(sys_err("cannot make the terminal the controlling terminal"));
        }
    }
    let id = &p.identity;
    // SAFETY: the pointer and length describe `id.groups`.
    if unsafe { libc::setgroups(id.groups.len(), id.groups.as_ptr()) } < 0 {
        return Err(sys_err("cannot set supplementary groups"));
    }
    // SAFETY: plain id changes in a single-threaded process.
    if unsafe { libc::setgid(id.gid) } < 0 {
        return Err(sys_err(&format!("cannot set group id {}", id.gid)));
    }
    // SAFETY: as above.
    if unsafe { libc::setuid(id.uid) } < 0 {
        return Err(sys_err(&format!("cannot set user id {}", id.uid)));
    }
    ctx(std::env::set_current_dir(&p.cwd), || {
        format!("cannot change to directory {}", p.cwd.display())
    })
}

fn reset_signals() {
    for sig in 1..libc::SIGRTMIN() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: restoring the default disposition is always allowed.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // SAFETY: an emptied sigset_t is valid input for sigprocmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn cstrings(items: &[String]) -> Vec<CString> {
    items
        .iter()
        .map(|s| CString::new(s.replace('\0', "")).unwrap_or_default())
        .collect()
}

fn fail(err: LookupError) -> ! {
    eprintln!("hearth-init: {err}");
    std::process::exit(err.status());
}

/// Applies user, cwd and environment and execs the spec's program; never returns.
fn exec_process(spec: &RunSpec, sync: &mut SyncPipe, default_path: &str) -> ! {
    let prepared = match prepare(spec, default_path).and_then(|p| {
        mark(|| "user, environment and cwd resolved".into());
        become_user(spec, &p)?;
        mark(|| "became the user".into());
        Ok(p)
    }) {
        Ok(p) => p,
        Err(e) => {
            sync.error(&e);
            std::process::exit(SETUP_FAILED);
        }
    };
    let program = spec.argv.first().map(String::as_str).unwrap_or("");
    let path = resolve::search_path(program, resolve::env_get(&prepared.env, "PATH"), probe);
    mark(|| format!("found {program:?} in PATH, exec follows"));
    // From here on the process is the container's: report what goes wrong on its stderr.
    sync.send("ok");
    sync.close();
    let path = path.unwrap_or_else(|e| fail(e));
    let argv = cstrings(&spec.argv);
    let env = cstrings(&prepared.env);
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap_or_default();
    reset_signals();
    // SAFETY: all three arrays are NUL-terminated and point to live C strings.
    unsafe { libc::execve(c_path.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
    let err = io::Error::last_os_error();
    let program = program.to_string();
    fail(match err.raw_os_error() {
        Some(libc::ENOENT) => LookupError::NoSuchFile(program),
        Some(libc::EACCES) => LookupError::PermissionDenied(program),
        _ => {
            eprintln!("hearth-init: exec: {program:?}: {err}");
            std::process::exit(126);
        }
    })
}

/// Environment variable that makes a unit-test binary act as the sandbox (see below).
#[cfg(test)]
pub const TEST_SANDBOX_ENV: &str = "HEARTH_INIT_TEST_SANDBOX";

// Unit tests re-execute the test binary itself as the sandbox: this constructor runs
// before the test harness (so still single-threaded) and takes over when the agent's
// launcher set the variable.
#[cfg(test)]
#[used]
#[link_section = ".init_array"]
static TEST_SANDBOX_ENTRY: extern "C" fn() = {
    extern "C" fn entry() {
        if std::env::var_os(TEST_SANDBOX_ENV).is_some() {
            std::process::exit(main());
        }
    }
    entry
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_the_servers() {
        assert_eq!(resolv_conf(&[]), None);
        assert_eq!(
            resolv_conf(&["10.0.2.3".into(), "1.1.1.1".into()]).unwrap(),
            "nameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn plan_round_trips_through_json() {
        let spec: RunSpec = serde_json::from_str(
            r#"{"argv":["sh"],"env":[],"cwd":"/","user":null,"hostname":null,"tty":false,
            "stdin":false,"rootfs":{"kind":"host"},"volumes":[],"memory_limit":null,
            "cpus":null,"network":"vm","net":null,"name":null,"term_size":null}"#,
        )
        .unwrap();
        let plan = Plan {
            spec,
            target: Target::Sandbox {
                lower: Lower::Device {
                    path: "/dev/vda".into(),
                    fstype: "ext4".into(),
                },
                state_dir: "/run/hearth/c/1".into(),
                cgroup: Some("/sys/fs/cgroup/hearth-1".into()),
                alone: false,
                net: None,
            },
            marks: false,
        };
        let text = serde_json::to_vec(&plan).unwrap();
        let back: Plan = serde_json::from_slice(&text).unwrap();
        assert!(matches!(back.target, Target::Sandbox { .. }));
    }

    #[test]
    fn volume_paths_must_be_absolute_and_clean() {
        assert!(check_abs("t", "/data").is_ok());
        assert!(check_abs("t", "data").is_err());
        assert!(check_abs("t", "/a/../b").is_err());
    }

    #[test]
    fn volumes_that_are_not_clean_paths_are_refused_before_mounting() {
        let volume = |target: &str, source| Volume {
            device: String::new(),
            target: target.into(),
            readonly: true,
            source,
        };
        let old = Path::new("/nonexistent-old-root");
        let path = |p: &str| Some(VolumeSource::Path { path: p.into() });
        for bad in [
            volume("data", path("/x")),
            volume("/data", path("x")),
            volume("/data", path("/a/../../etc")),
            volume(
                "/data",
                Some(VolumeSource::Virtiofs {
                    tag: "hearthfs0".into(),
                }),
            ),
        ] {
            assert!(
                matches!(mount_volume(&bad, old), Err(SandboxError::BadPath { .. })),
                "{bad:?}"
            );
        }
    }
}
