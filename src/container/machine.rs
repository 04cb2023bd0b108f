//! `hearth machine`: named long-lived VMs that host several containers, the Docker
//! Desktop / Lima model.
//!
//! State lives in `<state dir>/machines/NAME/` (see `super::state_dir`):
//! `vsock.sock` (the VM's vsock device; the agent listens on port 1024), `pid` (the
//! VMM's pid), `machine.json` (how it was started), `vm.json` (the VMM's configuration
//! file) and `console.log` (serial console and VMM diagnostics). The VMM runs detached
//! (its own session) and outlives `hearth machine start`; `hearth machine stop` asks the
//! agent to power off and waits. Started as root, the VMM is jailed (unless
//! `--no-jail`): it makes its sockets in the jail, and the host reaches them through
//! links at their usual paths.

use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::publish::{self, Destination, HostSocket};
use super::run::VolumeArg;
use super::session::{self, Signals};
use super::template::TemplateStore;
use super::virtiofsd::{self, BackendPid, ShareSpec, SocketDir, Virtiofsd};
use super::vm::{self, VmJail, VmSpec};
use super::ContainerError;
use crate::agent::protocol::{
    MountSpec, NetSetup, Rootfs, RunSpec, Volume, VolumeSource, MODE_MACHINE,
};
use crate::cli::{MachineCommand, MachineStartArgs, ProcessArgs};
use crate::config::parse_memory_size;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::devices::virtio::fs::FsConfig;
use crate::devices::virtio::net::{NetBackend, NetConfig, UserNetConfig};
use crate::image::PreparedImage;
use crate::net::PortForward;

/// How long `stop` waits for the VM to power off before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client waits for a running machine's agent to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a machine's guest refreshes its memory statistics.
pub const MACHINE_STATS_INTERVAL_S: u16 = 5;

/// Every machine's balloon: it holds nothing (the guest keeps all its memory) but the
/// guest reports the memory it frees, so an idle machine gives back what a finished
/// build or container used; its statistics refresh every few seconds
/// (`hearth remote`'s `GET /balloon/statistics` on the machine's API socket).
pub fn machine_balloon() -> BalloonConfig {
    BalloonConfig {
        amount_mib: 0,
        deflate_on_oom: false,
        stats_polling_interval_s: MACHINE_STATS_INTERVAL_S,
        free_page_reporting: true,
    }
}

/// The resident memory of process `pid` in MiB (`VmRSS` of /proc/PID/status): what the
/// host pays for the VM, guest RAM it touched and did not give back included.
pub fn resident_mib(pid: i32) -> Option<u64> {
    parse_vm_rss(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `VmRSS:  123456 kB` in MiB, rounded to the nearest.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some((kib + 512) / 1024)
}

/// What `machine.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineInfo {
    pub name: String,
    pub pid: i32,
    pub cpus: u64,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    /// Seconds since the epoch.
    pub started: u64,
    /// The template it was restored from (`None`: booted).
    #[serde(default)]
    pub template: Option<String>,
    /// Host folders shared with it (`--share`), each served by its own virtiofsd.
    #[serde(default)]
    pub shares: Vec<MachineShare>,
    /// Where the back ends' sockets are (removed by `machine stop`).
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
}

/// A folder a machine shares, as `machine.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShare {
    /// The host folder, resolved.
    pub host: PathBuf,
    /// Where it is mounted in the machine.
    pub guest: String,
    pub readonly: bool,
    /// The virtio-fs tag of its device.
    pub tag: String,
    /// Its back end, which `machine stop` stops if the VMM's end did not already.
    pub backend: Option<BackendPid>,
}

/// `--share HOST[:GUEST][:ro]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareArg {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
}

/// Parses `HOST[:GUEST][:ro|:rw]`; GUEST defaults to HOST (resolved), as Docker Desktop
/// and Lima mount shared folders at the host's path.
pub fn parse_share(spec: &str) -> Result<ShareArg, ContainerError> {
    let bad = |why: &str| ContainerError::Usage(format!("--share {spec}: {why}"));
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, guest, readonly) = match parts.as_slice() {
        [h] => (*h, None, false),
        [h, "ro"] => (*h, None, true),
        [h, "rw"] => (*h, None, false),
        [h, g] => (*h, Some(*g), false),
        [h, g, "ro"] => (*h, Some(*g), true),
        [h, g, "rw"] => (*h, Some(*g), false),
        _ => return Err(bad("expected HOST[:GUEST][:ro]")),
    };
    if host.is_empty() {
        return Err(bad("the host folder is empty"));
    }
    let host = virtiofsd::check_folder(Path::new(host))?;
    let guest = match guest {
        Some(g) => g.to_string(),
        None => host
            .to_str()
            .ok_or_else(|| bad("the host path is not UTF-8: give GUEST"))?
            .to_string(),
    };
    if !guest.starts_with('/') || guest == "/" || guest.split('/').any(|c| c == "..") {
        return Err(bad("the machine path must be absolute, not /, without .."));
    }
    Ok(ShareArg {
        host,
        guest,
        readonly,
    })
}

/// The volumes of a container run in machine `name`: each host folder must lie under
/// one of the machine's shared folders, and is bound from the machine's view of it.
pub fn container_volumes(name: &str, volumes: &[VolumeArg]) -> Result<Vec<Volume>, ContainerError> {
    if volumes.is_empty() {
        return Ok(Vec::new());
    }
    let machine = Machine::new(name)?;
    let info = machine
        .info()
        .ok_or_else(|| machine.err("is not running (start it with `hearth machine start`)"))?;
    volumes_under_shares(name, &info.shares, volumes)
}

/// [`container_volumes`] for a machine that shares `shares`.
fn volumes_under_shares(
    name: &str,
    shares: &[MachineShare],
    volumes: &[VolumeArg],
) -> Result<Vec<Volume>, ContainerError> {
    volumes
        .iter()
        .map(|volume| {
            let host = volume.host.display();
            if volume.copy || !volume.host.is_dir() {
                return Err(ContainerError::Usage(format!(
                    "-v {host}: a machine's containers take folders it shares (no :copy, no image files)"
                )));
            }
            let resolved = fs::canonicalize(&volume.host)
                .map_err(ContainerError::io(format!("resolving {host}")))?;
            let share = (shares.iter())
                .filter(|s| resolved.starts_with(&s.host))
                .max_by_key(|s| s.host.components().count())
                .ok_or_else(|| {
                    let shared: Vec<String> = (shares.iter())
                        .map(|s| s.host.display().to_string())
                        .collect();
                    ContainerError::Usage(format!(
                        "-v {host}: machine {name} does not share it ({}); start the machine with --share",
                        if shared.is_empty() {
                            "it shares no folder".to_string()
                        } else {
                            format!("it shares {}", shared.join(", "))
                        }
                    ))
                })?;
            let below = resolved.strip_prefix(&share.host).unwrap_or(Path::new(""));
            let path = match below.as_os_str().is_empty() {
                true => PathBuf::from(&share.guest),
                false => Path::new(&share.guest).join(below),
            };
            Ok(Volume {
                device: String::new(),
                target: volume.guest.clone(),
                readonly: volume.readonly || share.readonly,
                source: Some(VolumeSource::Path {
                    path: path.to_string_lossy().into_owned(),
                }),
            })
        })
        .collect()
}

/// A machine's state directory and files.
pub struct Machine {
    pub name: String,
    pub dir: PathBuf,
}

impl Machine {
    pub fn new(name: &str) -> Result<Self, ContainerError> {
        super::check_name("machine", name)?;
        Ok(Self {
            name: name.to_string(),
            dir: super::state_dir().join("machines").join(name),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    fn info_path(&self) -> PathBuf {
        self.dir.join("machine.json")
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The machine's jail (if its VMM is jailed): named after the state directory, so
    /// that machines of the same name under other state directories do not meet.
    fn jail(&self) -> VmJail {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.dir.as_os_str().as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        VmJail::new(format!("hearth-m-{hex}"), None)
    }

    /// The VMM's API socket; its path on the VMM's command line identifies the VMM
    /// (booted with `hearth run --config` or restored with `hearth restore`).
    fn api_socket(&self) -> PathBuf {
        self.dir.join(vm::API_SOCKET)
    }

    pub fn info(&self) -> Option<MachineInfo> {
        let text = fs::read(self.info_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The VMM's pid, if that process is alive and still this machine's VMM.
    pub fn running_pid(&self) -> Option<i32> {
        let info = self.info()?;
        pid_is_vmm(info.pid, &self.api_socket()).then_some(info.pid)
    }

    fn err(&self, reason: impl Into<String>) -> ContainerError {
        ContainerError::Machine {
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Connects to the running machine's agent.
    pub fn connect(&self) -> Result<std::os::unix::net::UnixStream, ContainerError> {
        if self.running_pid().is_none() {
            return Err(self.err("is not running (start it with `hearth machine start`)"));
        }
        Ok(session::connect_agent(&self.socket(), CONNECT_TIMEOUT)?)
    }
}

/// True when `pid` is a live (not zombie) VMM serving the API socket `api_socket`.
fn pid_is_vmm(pid: i32, api_socket: &Path) -> bool {
    if pid <= 0 {
        return false;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let expected = api_socket.as_os_str().as_bytes();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|pair| pair[0] == b"--api-sock" && pair[1] == expected)
}

/// Dispatches `hearth machine ...`.
pub fn command(cmd: &MachineCommand) -> Result<u8, ContainerError> {
    match cmd {
        MachineCommand::Start(args) => start(args).map(|_| 0),
        MachineCommand::Stop { name } => stop(name).map(|_| 0),
        MachineCommand::List => list().map(|_| 0),
        MachineCommand::Run {
            process,
            name,
            command,
        } => run_in_machine(name, process, command, Rootfs::Host),
        MachineCommand::Exec {
            process,
            name,
            container,
            command,
        } => {
            super::check_name("container", container)?;
            run_in_machine(
                name,
                process,
                command,
                Rootfs::Container {
                    name: container.clone(),
                },
            )
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Boots the machine and waits until its agent answers.
pub fn start(args: &MachineStartArgs) -> Result<(), ContainerError> {
    let machine = Machine::new(&args.name)?;
    if machine.running_pid().is_some() {
        return Err(machine.err("is already running"));
    }
    if !(1..=crate::config::MAX_VCPUS).contains(&args.cpus) {
        return Err(ContainerError::Usage(format!(
            "--cpus {}: must be 1 to {}",
            args.cpus,
            crate::config::MAX_VCPUS
        )));
    }
    let memory = parse_memory_size(&args.memory)
        .map_err(|e| ContainerError::Usage(format!("--memory: {e}")))?;
    let ports = super::run::parse_ports(&args.publish)?;
    let user = match args.network.as_str() {
        // Without passt, a machine that publishes nothing starts without a network, as a
        // fresh container VM does (said once on stderr).
        "user" => match crate::net::passt::find_binary(None) {
            Ok(_) => true,
            Err(e) if ports.is_empty() => {
                eprintln!("hearth: warning: {e}; the machine has no network");
                false
            }
            Err(e) => return Err(ContainerError::Usage(format!("--network user: {e}"))),
        },
        "none" if ports.is_empty() => false,
        "none" => {
            return Err(ContainerError::Usage(
                "-p needs --network user (the default)".into(),
            ))
        }
        other => {
            return Err(ContainerError::Usage(format!(
                "--network {other}: a machine takes user (the default) or none"
            )))
        }
    };
    for port in &ports {
        port.check_free().map_err(|e| {
            ContainerError::Usage(format!(
                "-p {port}: host port {}/{} is not available ({e})",
                port.host_port,
                port.protocol.name()
            ))
        })?;
    }
    let share_args = (args.shares.iter())
        .map(|s| parse_share(s))
        .collect::<Result<Vec<_>, _>>()?;
    let program = if share_args.is_empty() {
        None
    } else {
        Some(virtiofsd::preflight(args.virtiofsd.as_deref())?)
    };
    let kernel = super::guest_kernel(args.kernel.as_deref())?;
    let initrd = super::run::agent_initramfs(true)?;
    let _ = fs::remove_dir_all(&machine.dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&machine.dir)
        .map_err(ContainerError::io(format!(
            "creating {}",
            machine.dir.display()
        )))?;
    // The back ends' sockets get a short directory of their own (the state directory
    // may be too deep for a socket address); the jail binds each into a jailed VMM's
    // view at its own path.
    let jail = VmJail::wanted(args.no_jail).then(|| machine.jail());
    let mut shares = Vec::new();
    let socket_dir = match share_args.is_empty() {
        true => None,
        false => Some(SocketDir::create().map_err(ContainerError::io(
            "creating a directory for virtio-fs sockets",
        ))?),
    };
    if let Some(fs_dir) = socket_dir.as_ref().map(SocketDir::path) {
        for (slot, share) in share_args.iter().enumerate() {
            shares.push(ShareSpec {
                folder: share.host.clone(),
                read_only: share.readonly,
                socket: fs_dir.join(format!("fs{slot}.sock")),
                log: machine.console_log(),
                socket_owner: jail.as_ref().map(|j| (j.uid, j.gid)),
                detached: true,
            });
        }
    }
    let spec = VmSpec {
        kernel: kernel.clone(),
        initrd,
        mode: MODE_MACHINE,
        cpus: args.cpus,
        memory_mib: memory >> 20,
        disks: Vec::new(),
        nets: if user {
            vec![NetConfig::new(NetBackend::User(UserNetConfig { ports }))]
        } else {
            Vec::new()
        },
        fs: (shares.iter().enumerate())
            .map(|(slot, share)| FsConfig::new(vm::fs_tag(slot), &share.socket))
            .collect(),
        virtiofsd: program.clone(),
        balloon: Some(machine_balloon()),
        vsock_socket: machine.socket(),
        console_log: machine.console_log(),
        state_dir: machine.dir.clone(),
        detached: true,
        jail,
    };
    // A jail left behind by a VMM of this machine killed outright.
    machine.jail().remove_leftovers();
    let template = if args.no_template {
        None
    } else {
        let template_spec = VmSpec {
            // A machine's agent needs no per-machine data until its first session.
            detached: true,
            ..spec.clone()
        };
        match TemplateStore::default_location().obtain(&template_spec, args.boot_timeout, &|| false)
        {
            Ok(template) => Some(template),
            // Shared folders add a device whose back end is another process; a
            // template that cannot be made with them is no reason not to start.
            Err(err) if !spec.fs.is_empty() => {
                eprintln!(
                    "hearth: cannot make a template for machines with shared folders ({}); booting instead",
                    crate::error_chain(&err)
                );
                None
            }
            Err(err) => return Err(err),
        }
    };
    // Until the machine is up, these handles own the back ends (a failed start stops
    // them); then they are released to live as long as the VMM.
    let mut backends = Vec::new();
    for share in &shares {
        if let Some(program) = &program {
            backends.push(Virtiofsd::start(program, share)?);
        }
    }
    let mut child = match &template {
        Some(template) => vm::spawn_restore(&spec, template)?,
        None => vm::spawn(&spec)?,
    };
    let info = MachineInfo {
        name: machine.name.clone(),
        pid: child.id() as i32,
        cpus: args.cpus,
        memory_mib: spec.memory_mib,
        kernel,
        started: now_secs(),
        template: template.as_ref().map(|t| t.id.clone()),
        shares: (share_args.iter().zip(&backends).enumerate())
            .map(|(slot, (share, backend))| MachineShare {
                host: share.host.clone(),
                guest: share.guest.clone(),
                readonly: share.readonly,
                tag: vm::fs_tag(slot),
                backend: Some(backend.backend_pid()),
            })
            .collect(),
        socket_dir: socket_dir.as_ref().map(|d| d.path().to_path_buf()),
    };
    let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
    fs::write(machine.info_path(), json).map_err(ContainerError::io("writing machine.json"))?;

    let deadline = Instant::now() + Duration::from_secs(args.boot_timeout);
    let mut stream = loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(machine.err(format!(
                "the VM stopped ({status}) while booting; console: {}",
                vm::log_tail(&machine.console_log(), 3)
            )));
        }
        if machine.socket().exists() {
            if let Ok(mut stream) =
                session::connect_agent(&machine.socket(), Duration::from_secs(3))
            {
                // A clone of a template shares its RNG state and clock with the others.
                if template.is_some() {
                    session::refresh(&mut stream)?;
                }
                if user {
                    // ... and its MAC address.
                    let mac = match template {
                        Some(_) => {
                            Some(crate::devices::virtio::net::random_mac().map_err(|e| {
                                ContainerError::Vm(format!("cannot make a MAC address: {e}"))
                            })?)
                        }
                        None => None,
                    };
                    let setup = NetSetup {
                        mac: mac.map(|m| crate::devices::virtio::net::format_mac(&m)),
                        net: super::run::user_net_config(),
                    };
                    session::configure_network(&mut stream, setup)?;
                }
                break stream;
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(machine.err(format!(
                "the agent did not answer within {} s; console log: {}",
                args.boot_timeout,
                machine.console_log().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for share in &info.shares {
        let mount = MountSpec {
            tag: share.tag.clone(),
            target: share.guest.clone(),
            readonly: share.readonly,
        };
        if let Err(e) = session::mount(&mut stream, mount) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(machine.err(format!(
                "cannot mount {} at {}: {}",
                share.host.display(),
                share.guest,
                crate::error_chain(&e)
            )));
        }
    }
    for backend in backends {
        backend.release();
    }
    if let Some(dir) = socket_dir {
        dir.keep();
    }
    println!("machine {} is running (pid {})", machine.name, info.pid);
    Ok(())
}

/// Powers the machine off through its agent, or kills the VMM if the agent is gone.
pub fn stop(name: &str) -> Result<(), ContainerError> {
    let machine = Machine::new(name)?;
    let info = machine.info();
    let backends: Vec<BackendPid> = (info.iter())
        .flat_map(|info| &info.shares)
        .filter_map(|share| share.backend)
        .collect();
    let socket_dir = info.and_then(|info| info.socket_dir);
    // Each back end exits when the VMM's connection closes; one whose VMM never
    // connected (or any left for another reason) is stopped here.
    let stop_backends = || {
        backends.iter().for_each(BackendPid::stop);
        if let Some(dir) = &socket_dir {
            let _ = fs::remove_dir_all(dir);
        }
    };
    let Some(pid) = machine.running_pid() else {
        stop_backends();
        let _ = fs::remove_dir_all(&machine.dir);
        return Err(machine.err("is not running"));
    };
    let asked = session::connect_agent(&machine.socket(), CONNECT_TIMEOUT)
        .map_err(ContainerError::from)
        .and_then(|mut s| Ok(session::shutdown(&mut s)?));
    if let Err(e) = &asked {
        log::warn!(
            "machine {name}: the agent did not take the shutdown ({e}); terminating the VMM"
        );
        // SAFETY: plain kill(2) on a pid we just checked is this machine's VMM.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while pid_is_vmm(pid, &machine.api_socket()) {
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(200));
            stop_backends();
            let _ = fs::remove_dir_all(&machine.dir);
            machine.jail().remove_leftovers();
            return Err(machine.err("did not power off; killed it"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_backends();
    let _ = fs::remove_dir_all(&machine.dir);
    println!("machine {name} stopped");
    Ok(())
}

/// Prints the machines with state directories.
pub fn list() -> Result<(), ContainerError> {
    let root = super::state_dir().join("machines");
    let mut names: Vec<String> = fs::read_dir(&root)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<20} {:<8} {:>4} {:>8} {:>8} {:>8}  SHARES",
        "NAME", "STATUS", "CPUS", "MEMORY", "RSS", "PID"
    );
    for name in names {
        let Ok(machine) = Machine::new(&name) else {
            continue;
        };
        let Some(info) = machine.info() else {
            continue;
        };
        let (status, pid, rss) = match machine.running_pid() {
            Some(pid) => (
                "running",
                pid.to_string(),
                resident_mib(pid).map_or("-".to_string(), |mib| format!("{mib}M")),
            ),
            None => ("stopped", "-".to_string(), "-".to_string()),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:>4} {:>7}M {:>8} {:>8}  {}",
            name,
            status,
            info.cpus,
            info.memory_mib,
            rss,
            pid,
            shares_column(&info.shares)
        );
    }
    Ok(())
}

/// `HOST:GUEST[:ro]` of each share, `-` for none.
fn shares_column(shares: &[MachineShare]) -> String {
    if shares.is_empty() {
        return "-".into();
    }
    (shares.iter())
        .map(|s| {
            let ro = if s.readonly { ":ro" } else { "" };
            if s.host.as_os_str() == s.guest.as_str() {
                format!("{}{ro}", s.guest)
            } else {
                format!("{}:{}{ro}", s.host.display(), s.guest)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The run spec of a command run directly in a machine or in one of its containers.
fn machine_spec(
    process: &ProcessArgs,
    command: &[String],
    rootfs: Rootfs,
) -> Result<RunSpec, ContainerError> {
    let defaults = super::ImageConfig {
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..Default::default()
    };
    let p = super::process_spec(&defaults, process, None, command, |k| std::env::var(k).ok())?;
    Ok(p.into_run_spec(process, rootfs))
}

fn run_in_machine(
    name: &str,
    process: &ProcessArgs,
    command: &[String],
    rootfs: Rootfs,
) -> Result<u8, ContainerError> {
    let signals = Signals::install();
    let machine = Machine::new(name)?;
    let spec = machine_spec(process, command, rootfs)?;
    let stream = machine.connect()?;
    let status = session::run_process(stream, spec, &signals)?;
    Ok((status & 0xff) as u8)
}

/// Runs a container in a machine, sending it the image first if the machine lacks it,
/// and forwards its published ports (`bound`: host sockets already bound) while it runs.
pub fn run_container(
    name: &str,
    image: &PreparedImage,
    spec: RunSpec,
    bound: Vec<(PortForward, HostSocket)>,
    signals: &Signals,
) -> Result<i32, ContainerError> {
    let machine = Machine::new(name)?;
    let mut stream = machine.connect()?;
    if !bound.is_empty() {
        let destination = Destination {
            socket: machine.socket(),
            container: spec.name.clone().unwrap_or_default(),
        };
        publish::start(bound, &destination)
            .map_err(ContainerError::io("starting the port forwarders"))?;
    }
    let rootfs = image.rootfs.clone();
    session::ensure_image(&mut stream, &image.digest, move |w| {
        let mut tar = tar::Builder::new(w);
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        tar.append_dir_all(".", &rootfs)?;
        tar.finish()
    })?;
    Ok(session::run_process(stream, spec, signals)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_comes_from_vm_rss() {
        let status = "Name:\thearth\nVmPeak:\t  900000 kB\nVmRSS:\t  52736 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(52));
        assert_eq!(parse_vm_rss("VmRSS:\t 1536 kB"), Some(2));
        assert_eq!(parse_vm_rss("VmRSS:\t lots"), None);
        assert_eq!(parse_vm_rss("Name: x"), None);
        // This process has some.
        assert!(resident_mib(std::process::id() as i32).is_some_and(|mib| mib > 0));
        assert_eq!(resident_mib(-1), None);
    }

    /// Machines give memory back by default, with statistics; the template key carries
    /// the balloon, so a machine restored from a template has the same device.
    #[test]
    fn machines_have_a_balloon_that_reports_free_pages() {
        let balloon = machine_balloon();
        assert_eq!(balloon.amount_mib, 0);
        assert!(balloon.free_page_reporting && balloon.stats_polling_interval_s > 0);
    }

    #[test]
    fn machine_paths_live_under_the_state_dir() {
        let m = Machine::new("dev").unwrap();
        assert!(m.dir.ends_with("machines/dev"));
        assert_eq!(m.socket(), m.dir.join("vsock.sock"));
        assert!(Machine::new("../x").is_err());
    }

    #[test]
    fn only_a_live_vmm_counts_as_running() {
        let config = Path::new("/x/machines/dev/api.sock");
        assert!(!pid_is_vmm(0, config));
        assert!(!pid_is_vmm(-1, config));
        // Our own process is alive but not a VMM serving that socket.
        assert!(!pid_is_vmm(std::process::id() as i32, config));
        // A process started with `--api-sock PATH` is, while it lives.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; true", "--api-sock"])
            .arg(config)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // The parent learns of the exec before the new image's arguments are in place.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(pid_is_vmm(pid, config));
        assert!(!pid_is_vmm(pid, Path::new("/x/machines/other/api.sock")));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!pid_is_vmm(pid, config));
    }

    #[test]
    fn shares_parse_with_the_host_path_as_default() {
        let dir = crate::testutil::TempDir::new("machine-share");
        let host = fs::canonicalize(dir.path()).unwrap();
        let h = host.to_str().unwrap();
        let share = parse_share(h).unwrap();
        assert_eq!(
            (share.host.as_path(), share.guest.as_str()),
            (host.as_path(), h)
        );
        assert!(!share.readonly);
        assert!(parse_share(&format!("{h}:ro")).unwrap().readonly);
        let share = parse_share(&format!("{h}:/work:ro")).unwrap();
        assert_eq!((share.guest.as_str(), share.readonly), ("/work", true));
        let file = host.join("file");
        fs::write(&file, b"x").unwrap();
        for (bad, why) in [
            (format!("{h}/missing"), "does not exist"),
            (file.display().to_string(), "is not a directory"),
            (format!("{h}:work"), "must be absolute"),
            (format!("{h}:/"), "must be absolute"),
            (format!("{h}:/a:ro:x"), "expected HOST"),
            (format!("{h}:/a:rx"), "expected HOST"),
        ] {
            let err = crate::error_chain(&parse_share(&bad).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn container_volumes_must_lie_under_a_share() {
        let dir = crate::testutil::TempDir::new("machine-volumes");
        let home = fs::canonicalize(dir.path()).unwrap();
        let proj = home.join("proj");
        fs::create_dir_all(proj.join("sub")).unwrap();
        let share = |host: &Path, guest: &str, readonly| MachineShare {
            host: host.to_path_buf(),
            guest: guest.into(),
            readonly,
            tag: "hearthfs0".into(),
            backend: None,
        };
        let shares = [share(&home, "/h", false), share(&proj, "/p", true)];
        let volume = |host: &Path, copy| VolumeArg {
            host: host.to_path_buf(),
            guest: "/src".into(),
            readonly: false,
            copy,
        };
        // The closest share wins, and its read-only flag carries over.
        let got =
            volumes_under_shares("dev", &shares, &[volume(&proj.join("sub"), false)]).unwrap();
        assert_eq!(
            got[0].source,
            Some(VolumeSource::Path {
                path: "/p/sub".into()
            })
        );
        assert!(got[0].readonly);
        let got = volumes_under_shares("dev", &shares, &[volume(&home, false)]).unwrap();
        assert_eq!(
            got[0].source,
            Some(VolumeSource::Path { path: "/h".into() })
        );
        assert!(!got[0].readonly);
        let err = volumes_under_shares("dev", &shares[1..], &[volume(&home, false)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("machine dev does not share it") && err.contains("--share"),
            "{err}"
        );
        let err = volumes_under_shares("dev", &shares, &[volume(&home, true)]).unwrap_err();
        assert!(err.to_string().contains("no :copy"), "{err}");
    }

    #[test]
    fn machine_commands_get_a_default_path() {
        let spec = machine_spec(&ProcessArgs::default(), &["uname".into()], Rootfs::Host).unwrap();
        assert_eq!(spec.argv, ["uname"]);
        assert!(spec.env[0].starts_with("PATH=/usr/local/sbin"));
        assert_eq!(spec.cwd, "/");
    }
}
