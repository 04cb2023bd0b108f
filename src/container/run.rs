//! `hearth container run`: one container, in a fresh microVM or in a running machine.
//!
//! Fresh microVM, in order: prepare the image (cached ext4), build or reuse the agent
//! initramfs, listen on the vsock socket's port-1024 path, start the VMM (restored from
//! the template for VMs of this shape, made on first use, or with `--no-template`
//! booted), wait for the agent to connect (a restored agent first gets fresh entropy
//! and the time), run the process, wait for the VM to power off, clean up.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use super::publish;
use super::session::{self, Signals};
use super::template::TemplateStore;
use super::virtiofsd::{self, ShareSpec, Virtiofsd};
use super::vm::{self, VmJail, VmSpec};
use super::{ContainerError, ProcessSpec};
use crate::agent::protocol::{
    NetConfig, Network, Rootfs, RunSpec, Volume, VolumeSource, AGENT_PORT, MODE_CONTAINER,
};
use crate::cli::ContainerRunArgs;
use crate::config::parse_memory_size;
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::fs::FsConfig;
use crate::devices::virtio::net::{self, NetBackend, UserNetConfig};
use crate::image::{self, ImageCache};
use crate::net::PortForward;

/// Guest RAM on top of the container's memory limit (kernel, agent, tmpfs overlay).
const VM_OVERHEAD_MIB: u64 = 64;
/// Guest RAM of a fresh microVM without a memory limit.
const DEFAULT_VM_MIB: u64 = 256;
/// Free space in a disk image built from a writable directory volume.
const VOLUME_FREE_BYTES: u64 = 64 << 20;
/// How long a VM may take to power off after its process exited.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the VMM may take to stop on SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VM whose agent hung up may go on printing (a guest panic) before it is killed.
const GUEST_LAST_WORDS_TIMEOUT: Duration = Duration::from_secs(20);

/// A volume as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeArg {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
    /// `copy`: a directory copied into a disk image for this run instead of shared.
    pub copy: bool,
}

impl VolumeArg {
    /// Shared over virtio-fs: a directory without `copy` (an image file is a disk).
    pub fn is_share(&self) -> bool {
        !self.copy && self.host.is_dir()
    }
}

/// Parses `HOST:GUEST[:OPTS]`, OPTS being `ro`, `rw` and `copy` joined by `,` or `:`
/// (`:ro`, `:copy`, `:copy,ro`, `:ro:copy`).
pub fn parse_volume(spec: &str) -> Result<VolumeArg, ContainerError> {
    let bad = |why: &str| ContainerError::Usage(format!("-v {spec}: {why}"));
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, guest, options) = match parts.as_slice() {
        [h, g, options @ ..] => (*h, *g, options),
        _ => return Err(bad("expected HOSTPATH:GUESTDIR[:ro][:copy]")),
    };
    let (mut readonly, mut writable, mut copy) = (false, false, false);
    for option in options.iter().flat_map(|o| o.split(',')) {
        match option {
            "ro" => readonly = true,
            "rw" => writable = true,
            "copy" => copy = true,
            other => {
                return Err(bad(&format!(
                    "unknown option {other:?} (use ro, rw or copy)"
                )))
            }
        }
    }
    if readonly && writable {
        return Err(bad("ro and rw contradict each other"));
    }
    if host.is_empty() || !Path::new(host).exists() {
        return Err(bad(&format!("host path {host:?} does not exist")));
    }
    let meta = fs::metadata(host).map_err(|e| bad(&format!("host path {host:?}: {e}")))?;
    if !meta.is_dir() && !meta.is_file() {
        return Err(bad(&format!(
            "host path {host:?} is neither a directory nor an ext4 image file"
        )));
    }
    if copy && !meta.is_dir() {
        return Err(bad(
            "copy applies to a directory (an image file is a disk as it is)",
        ));
    }
    if !guest.starts_with('/') || guest == "/" || guest.split('/').any(|c| c == "..") {
        return Err(bad(
            "the container path must be absolute, not /, without ..",
        ));
    }
    Ok(VolumeArg {
        host: PathBuf::from(host),
        guest: guest.to_string(),
        readonly,
        copy,
    })
}

/// `--network`: the VM's NIC and eth0's address, if any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkArg {
    pub nic: Option<NetBackend>,
    pub net: Option<NetConfig>,
}

/// eth0 on user-mode networking: passt's fixed addresses, its DNS forwarder and its MTU.
pub(super) fn user_net_config() -> NetConfig {
    NetConfig {
        address: format!("{}/{}", crate::net::GUEST_ADDRESS, crate::net::GUEST_PREFIX),
        gateway: Some(crate::net::GATEWAY.to_string()),
        dns: vec![crate::net::DNS.to_string()],
        mtu: Some(crate::net::MTU),
    }
}

/// Parses `-p` values (docker's syntax, no ranges).
pub fn parse_ports(specs: &[String]) -> Result<Vec<PortForward>, ContainerError> {
    let ports = (specs.iter())
        .map(|spec| {
            spec.parse::<PortForward>()
                .map_err(|e| ContainerError::Usage(format!("-p: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    crate::net::check_distinct(&ports).map_err(|e| ContainerError::Usage(format!("-p: {e}")))?;
    Ok(ports)
}

/// Parses `--network` (`user`, `none` or `tap=NAME[,ip=..][,gw=..]`); `ports` (from
/// `-p`) need `user`.
pub fn parse_network(spec: &str, ports: &[PortForward]) -> Result<NetworkArg, ContainerError> {
    let bad = |why: String| ContainerError::Usage(format!("--network {spec}: {why}"));
    if spec == "user" {
        return Ok(NetworkArg {
            nic: Some(NetBackend::User(UserNetConfig {
                ports: ports.to_vec(),
            })),
            net: Some(user_net_config()),
        });
    }
    if !ports.is_empty() {
        return Err(bad("-p needs --network user (the default)".into()));
    }
    if spec == "none" {
        return Ok(NetworkArg::default());
    }
    let mut tap = None;
    let mut address = None;
    let mut gateway = None;
    for item in spec.split(',') {
        match item.split_once('=') {
            Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
            Some(("ip", v)) => {
                let (ip, prefix) = v
                    .split_once('/')
                    .ok_or_else(|| bad(format!("ip={v}: expected A.B.C.D/PREFIX")))?;
                ip.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| bad(format!("ip={v}: not an IPv4 address")))?;
                match prefix.parse::<u8>() {
                    Ok(p) if p <= 32 => {}
                    _ => return Err(bad(format!("ip={v}: prefix must be 0-32"))),
                }
                address = Some(v.to_string());
            }
            Some(("gw", v)) => {
                v.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| bad(format!("gw={v}: not an IPv4 address")))?;
                gateway = Some(v.to_string());
            }
            _ => {
                return Err(bad(format!(
                    "unknown item {item:?} (user, none, or tap=NAME[,ip=..][,gw=..])"
                )))
            }
        }
    }
    let Some(tap) = tap else {
        return Err(bad("tap=NAME is required".into()));
    };
    if gateway.is_some() && address.is_none() {
        return Err(bad("gw= needs ip=".into()));
    }
    Ok(NetworkArg {
        nic: Some(NetBackend::Tap(tap)),
        net: address.map(|address| NetConfig {
            address,
            gateway,
            dns: Vec::new(),
            mtu: None,
        }),
    })
}

/// `--network` of a container in a machine: its own place on the machine's bridge (the
/// default), or only loopback.
fn machine_network(arg: Option<&str>) -> Result<Network, ContainerError> {
    match arg {
        None | Some("bridge") | Some("user") => Ok(Network::Bridge),
        Some("none") => Ok(Network::None),
        Some(other) => Err(ContainerError::Usage(format!(
            "--network {other}: a container in a machine takes bridge (the default) or none"
        ))),
    }
}

/// Refuses a published host port another process holds, before anything starts.
fn check_ports_free(ports: &[PortForward]) -> Result<(), ContainerError> {
    for port in ports {
        port.check_free().map_err(|e| {
            ContainerError::Usage(format!(
                "-p {port}: host port {}/{} is not available ({e})",
                port.host_port,
                port.protocol.name()
            ))
        })?;
    }
    Ok(())
}

/// How many volumes a container VM has room for: every virtio device but the image's
/// disk, the NIC, the vsock and the entropy device.
fn max_volumes(nic: bool) -> usize {
    crate::device_manager::max_virtio_devices() - 3 - usize::from(nic)
}

/// The parts of a run spec both modes share.
fn base_spec(args: &ContainerRunArgs, process: ProcessSpec, rootfs: Rootfs) -> RunSpec {
    let mut spec = process.into_run_spec(&args.process, rootfs);
    spec.cpus = args.cpus;
    spec.name = args.name.clone();
    spec
}

/// Runs the container; returns its exit status.
pub fn run(args: &ContainerRunArgs) -> Result<u8, ContainerError> {
    let signals = Signals::install();
    if let Some(name) = &args.name {
        super::check_name("container", name)?;
    }
    if let Some(cpus) = args.cpus {
        if !(cpus > 0.0 && cpus <= crate::config::MAX_VCPUS as f64) {
            return Err(ContainerError::Usage(format!(
                "--cpus {cpus}: must be more than 0 and at most {}",
                crate::config::MAX_VCPUS
            )));
        }
    }
    let memory_limit = args
        .memory
        .as_deref()
        .map(parse_memory_size)
        .transpose()
        .map_err(|e| ContainerError::Usage(format!("--memory: {e}")))?;
    let volumes = args
        .volumes
        .iter()
        .map(|v| parse_volume(v))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = parse_ports(&args.publish)?;
    let network = match (&args.network, &args.machine) {
        // A machine's containers are on its bridge, or have no network (machine_network).
        (_, Some(_)) => NetworkArg::default(),
        (Some(spec), None) => parse_network(spec, &ports)?,
        // A fresh microVM gets user-mode networking unless asked otherwise (or, when
        // passt is missing and no port is published, none: said once on stderr).
        (None, None) => match crate::net::passt::find_binary(None) {
            Err(e) if ports.is_empty() => {
                eprintln!("hearth: warning: {e}; the container has no network");
                NetworkArg::default()
            }
            _ => parse_network("user", &ports)?,
        },
    };
    if matches!(network.nic, Some(NetBackend::User(_))) {
        crate::net::passt::find_binary(None)
            .map_err(|e| ContainerError::Usage(format!("--network user: {e}")))?;
    }
    let most = max_volumes(network.nic.is_some());
    if args.machine.is_none() && volumes.len() > most {
        return Err(ContainerError::Usage(format!(
            "{} volumes: a container VM takes at most {most} (with{} a NIC)",
            volumes.len(),
            if network.nic.is_some() { "" } else { "out" }
        )));
    }
    if args.process.tty && terminal_is_missing() {
        return Err(ContainerError::Usage(
            "-t needs a terminal on stdin or stdout".into(),
        ));
    }
    // Before the image is prepared: what a shared folder needs is known now.
    let virtiofsd = match &args.machine {
        None if volumes.iter().any(VolumeArg::is_share) => {
            Some(virtiofsd::preflight(args.virtiofsd.as_deref())?)
        }
        _ => None,
    };
    // Bound before anything starts: a port in use stops the run here, in one line.
    let bound = match &args.machine {
        Some(_) => ports
            .iter()
            .map(|port| publish::bind(port).map(|socket| (*port, socket)))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let cache = ImageCache::default_location()?;
    let pull_options = args
        .registry
        .options(false)
        .map_err(image::ImageError::from)?;
    let prepared = image::prepare_image_arg(&args.image, &pull_options, args.pull.into(), &cache)?;
    let process = super::process_spec(
        &prepared.config,
        &args.process,
        args.entrypoint.as_deref(),
        &args.command,
        |k| std::env::var(k).ok(),
    )?;

    let status = match &args.machine {
        Some(machine) => {
            let machine_network = machine_network(args.network.as_deref())?;
            if machine_network == Network::None && !ports.is_empty() {
                return Err(ContainerError::Usage(
                    "-p needs a network: drop --network none".into(),
                ));
            }
            let machine_volumes = super::machine::container_volumes(machine, &volumes)?;
            let mut spec = base_spec(
                args,
                process,
                Rootfs::Image {
                    digest: prepared.digest.clone(),
                },
            );
            spec.memory_limit = memory_limit;
            spec.volumes = machine_volumes;
            spec.network = machine_network;
            if spec.name.is_none() {
                spec.name = Some(super::random_id());
            }
            super::machine::run_container(machine, &prepared, spec, bound, &signals)?
        }
        None => {
            check_ports_free(&ports)?;
            let mut spec = base_spec(
                args,
                process,
                Rootfs::Device {
                    path: "/dev/vda".into(),
                    fstype: "ext4".into(),
                },
            );
            spec.memory_limit = memory_limit;
            spec.net = network.net.clone();
            if spec.hostname.is_none() {
                spec.hostname = Some(args.hostname.clone().unwrap_or_else(super::random_id));
            }
            let fresh = FreshVm {
                options: VmOptions::of(args),
                image_ext4: &prepared.ext4,
                volumes: &volumes,
                network: &network,
                virtiofsd,
            };
            fresh_vm(&fresh, spec, &signals, |stream, spec, _vmm| {
                Ok(session::run_process(stream, spec, &signals)?)
            })?
        }
    };
    Ok((status & 0xff) as u8)
}

fn terminal_is_missing() -> bool {
    // SAFETY: isatty only inspects the descriptor numbers.
    unsafe { libc::isatty(0) != 1 && libc::isatty(1) != 1 }
}

/// A per-run directory for the console log and volume images, with `vm/` for the VMM's
/// configuration, its sockets and our vsock listener (the VM's own directory, which a
/// jailed VMM shares); removed on success, kept (and named in the error) on failure.
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    fn create() -> Result<Self, ContainerError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let path = base.join(format!("hearth-c-{}", super::random_id()));
        fs::create_dir(&path)
            .map_err(ContainerError::io(format!("creating {}", path.display())))?;
        let dir = Self { path, keep: false };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.vm_dir())
            .map_err(ContainerError::io(format!(
                "creating {}",
                dir.vm_dir().display()
            )))?;
        Ok(dir)
    }

    fn vm_dir(&self) -> PathBuf {
        self.path.join("vm")
    }

    /// The VM's jail: named after the run directory, which is unique.
    fn jail(&self) -> VmJail {
        let name = self.path.file_name().unwrap_or_default();
        VmJail::new(name.to_string_lossy(), Some(self.vm_dir()))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The agent initramfs, built once per agent binary and cached.
pub fn agent_initramfs(busybox: bool) -> Result<PathBuf, ContainerError> {
    let spec = super::initramfs::InitramfsSpec {
        agent: super::agent_binary()?,
        busybox: if busybox {
            Some(
                std::env::var_os("HEARTH_BUSYBOX")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/bin/busybox")),
            )
        } else {
            None
        },
        modules: Vec::new(),
        gzip: false,
    };
    Ok(super::initramfs::cached(
        &spec,
        &super::cache_dir().join("initramfs"),
    )?)
}

/// How a fresh container VM is made, whoever asks for it (`container run`, `oci`).
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    pub kernel: Option<PathBuf>,
    pub no_jail: bool,
    /// The container's CPU limit; the VM gets that many vCPUs, rounded up.
    pub cpus: Option<f64>,
    pub boot_timeout: u64,
    pub no_template: bool,
}

impl VmOptions {
    fn of(args: &ContainerRunArgs) -> Self {
        VmOptions {
            kernel: args.kernel.clone(),
            no_jail: args.no_jail,
            cpus: args.cpus,
            boot_timeout: args.boot_timeout,
            no_template: args.no_template,
        }
    }
}

/// What a container in a fresh microVM is made of.
pub struct FreshVm<'a> {
    pub options: VmOptions,
    pub image_ext4: &'a Path,
    pub volumes: &'a [VolumeArg],
    pub network: &'a NetworkArg,
    /// The virtiofsd program, when a volume is a shared folder.
    pub virtiofsd: Option<PathBuf>,
}

/// A container VM whose agent is connected, as the session sees it.
pub struct RunningVm {
    /// The VMM's pid (a child of this process).
    pub pid: u32,
    /// The vsock device's socket, through which host programs reach guest listeners.
    pub vsock: PathBuf,
}

/// Makes the VM, waits for its agent, and hands the connected (and refreshed) agent
/// stream to `session`, which runs the container and returns its status; then stops the
/// VM and everything started for it. `session` also gets the VM (to kill one whose
/// guest does not end, or to reach its agent again).
pub fn fresh_vm(
    vm: &FreshVm,
    mut spec: RunSpec,
    signals: &Signals,
    session: impl FnOnce(UnixStream, RunSpec, &RunningVm) -> Result<i32, ContainerError>,
) -> Result<i32, ContainerError> {
    let FreshVm {
        options: ref args,
        image_ext4,
        volumes,
        network,
        ..
    } = *vm;
    let kernel = super::guest_kernel(args.kernel.as_deref())?;
    let initrd = agent_initramfs(false)?;
    let mut dir = RunDir::create()?;
    let mut jail = VmJail::wanted(args.no_jail).then(|| dir.jail());
    let mut disks = vec![BlockConfig {
        path: image_ext4.to_path_buf(),
        read_only: true,
        id: None,
        rate_limiter: Default::default(),
    }];
    let mut shares = Vec::new();
    for (i, volume) in volumes.iter().enumerate() {
        if volume.is_share() {
            let slot = shares.len();
            let tag = vm::fs_tag(slot);
            shares.push(ShareSpec {
                folder: virtiofsd::check_folder(&volume.host)?,
                read_only: volume.readonly,
                // Beside vm/, not in it: the jail binds each back end's socket in at
                // its own path.
                socket: dir.path.join(format!("fs{slot}.sock")),
                log: dir.path.join("console.log"),
                socket_owner: jail.as_ref().map(|j| (j.uid, j.gid)),
                detached: false,
            });
            spec.volumes.push(Volume {
                device: String::new(),
                target: volume.guest.clone(),
                readonly: volume.readonly,
                source: Some(VolumeSource::Virtiofs { tag }),
            });
            continue;
        }
        let disk = if volume.host.is_dir() {
            let out = dir.path.join(format!("volume{i}.ext4"));
            let free = if volume.readonly {
                0
            } else {
                VOLUME_FREE_BYTES
            };
            image::build_ext4(&volume.host, &out, free)?;
            if let Some(jail) = jail.as_mut().filter(|_| !volume.readonly) {
                jail.give.push(out.clone());
            }
            out
        } else {
            volume.host.clone()
        };
        spec.volumes.push(Volume {
            device: format!("/dev/vd{}", (b'a' + disks.len() as u8) as char),
            target: volume.guest.clone(),
            readonly: volume.readonly,
            source: None,
        });
        disks.push(BlockConfig {
            path: disk,
            read_only: volume.readonly,
            id: None,
            rate_limiter: Default::default(),
        });
    }
    let vsock = dir.vm_dir().join("v.sock");
    let listen_path = PathBuf::from(format!("{}_{AGENT_PORT}", vsock.display()));
    let listener = crate::uds::bind(&listen_path).map_err(ContainerError::io(format!(
        "listening on {}",
        listen_path.display()
    )))?;
    if let Some(jail) = &mut jail {
        // The jailed VMM connects to it for the agent.
        jail.give.push(listen_path.clone());
    }
    listener
        .set_nonblocking(true)
        .map_err(ContainerError::io("listener"))?;
    let memory_mib = match spec.memory_limit {
        Some(limit) => (limit >> 20) + VM_OVERHEAD_MIB,
        None => DEFAULT_VM_MIB,
    };
    let vm_spec = VmSpec {
        kernel,
        initrd,
        mode: MODE_CONTAINER,
        cpus: args.cpus.map(|c| c.ceil() as u64).unwrap_or(1).max(1),
        memory_mib,
        disks,
        fs: (shares.iter().enumerate())
            .map(|(slot, share)| FsConfig::new(vm::fs_tag(slot), &share.socket))
            .collect(),
        virtiofsd: vm.virtiofsd.clone(),
        nets: (network.nic.iter())
            .map(|backend| net::NetConfig::new(backend.clone()))
            .collect(),
        // Container VMs live as long as one container: nothing to give back.
        balloon: None,
        vsock_socket: vsock,
        console_log: dir.path.join("console.log"),
        state_dir: dir.vm_dir(),
        detached: false,
        jail,
    };
    let template = (!args.no_template).then(|| {
        TemplateStore::default_location()
            .obtain(&vm_spec, args.boot_timeout, &|| signals.pending() != 0)
    });
    let template = match template.transpose() {
        Err(ContainerError::Interrupted) => return Ok(128 + signals.pending()),
        // Shared folders add a device whose back end is another process; a template
        // that cannot be made with them is no reason not to run the container.
        Err(err) if !vm_spec.fs.is_empty() => {
            eprintln!(
                "hearth: cannot make a template for VMs with shared folders ({}); booting instead",
                crate::error_chain(&err)
            );
            None
        }
        other => other?,
    };
    if template.is_some() && network.nic.is_some() {
        // Every clone of the template would otherwise have the template's MAC address.
        let mac = net::random_mac().map_err(|e| ContainerError::Vm(e.to_string()))?;
        spec.mac = Some(net::format_mac(&mac));
    }
    // The back ends listen before the VMM starts; they go when this function returns,
    // however it returns (and with this process if it is killed).
    let mut backends = Vec::new();
    for share in &shares {
        if let Some(program) = &vm.virtiofsd {
            backends.push(Virtiofsd::start(program, share)?);
        }
    }
    let mut child = match &template {
        Some(template) => vm::spawn_restore(&vm_spec, template)?,
        None => vm::spawn(&vm_spec)?,
    };
    let outcome = (|| {
        let mut stream =
            wait_for_agent(&listener, &mut child, &vm_spec, args.boot_timeout, signals)?;
        if template.is_some() {
            session::refresh(&mut stream)?;
        }
        let running = RunningVm {
            pid: child.id(),
            vsock: vm_spec.vsock_socket.clone(),
        };
        session(stream, spec, &running)
    })();
    let poweroff_timeout = match &outcome {
        // The agent has the container's data on the disks (it syncs writable volumes
        // before it reports the exit): nothing in the VM is worth its orderly power-off,
        // which costs about a second of guest kernel time here.
        // (With the agent's log on, the agent writes its timeline after the exit: let
        // it, and power the VM off itself.)
        Ok(_) if std::env::var_os(vm::AGENT_LOG_ENV).is_some() => POWEROFF_TIMEOUT,
        Ok(_) => {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            STOP_TIMEOUT
        }
        // The guest side hung up on its own (its agent died, say): the guest kernel is
        // likely still telling why on the console, and stops the VM when it is done.
        Err(ContainerError::Session(session::SessionError::Closed)) => GUEST_LAST_WORDS_TIMEOUT,
        // The VM will not power off by itself: nothing runs the container any more.
        Err(_) => {
            let _ = child.kill();
            POWEROFF_TIMEOUT
        }
    };
    let stopped = wait_for_poweroff(&mut child, poweroff_timeout);
    for backend in &mut backends {
        backend.stop();
    }
    if let Some(jail) = &vm_spec.jail {
        jail.remove_leftovers();
    }
    match outcome {
        Ok(status) => {
            if let Err(reason) = stopped {
                log::warn!("{reason}");
            }
            Ok(status)
        }
        Err(ContainerError::Interrupted) => Ok(128 + signals.pending()),
        Err(err) => {
            dir.keep = true;
            Err(ContainerError::Vm(format!(
                "{} (console log: {}; last lines: {})",
                crate::error_chain(&err),
                vm_spec.console_log.display(),
                vm::log_tail(&vm_spec.console_log, 3)
            )))
        }
    }
}

/// Accepts the agent's connection and says hello, while watching the VMM, our signals
/// and the clock.
fn wait_for_agent(
    listener: &UnixListener,
    child: &mut Child,
    vm_spec: &VmSpec,
    timeout_s: u64,
    signals: &Signals,
) -> Result<std::os::unix::net::UnixStream, ContainerError> {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    session::accept_agent(listener, || {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ContainerError::Vm(format!(
                "the VM stopped ({status}) before its agent connected; console: {}",
                vm::log_tail(&vm_spec.console_log, 3)
            )));
        }
        if signals.pending() != 0 {
            return Err(ContainerError::Interrupted);
        }
        if Instant::now() >= deadline {
            return Err(ContainerError::Vm(format!(
                "the guest agent did not connect within {timeout_s} s"
            )));
        }
        Ok(())
    })
}

/// Waits for the VMM to exit after the agent powered the VM off; kills it if it hangs.
fn wait_for_poweroff(child: &mut Child, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the VM did not power off; killed it".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse() {
        let v = parse_volume("/tmp:/data:ro").unwrap();
        assert_eq!(
            v,
            VolumeArg {
                host: "/tmp".into(),
                guest: "/data".into(),
                readonly: true,
                copy: false,
            }
        );
        assert!(v.is_share());
        assert!(!parse_volume("/tmp:/data").unwrap().readonly);
        assert!(!parse_volume("/tmp:/data:rw").unwrap().readonly);
        for copy_ro in ["/tmp:/d:copy,ro", "/tmp:/d:ro,copy", "/tmp:/d:ro:copy"] {
            let v = parse_volume(copy_ro).unwrap();
            assert!(v.copy && v.readonly && !v.is_share(), "{copy_ro}");
        }
        let v = parse_volume("/tmp:/d:copy").unwrap();
        assert!(v.copy && !v.readonly);
        // An image file is a disk, never a share.
        let dir = crate::testutil::TempDir::new("volume-file");
        let image = dir.path().join("data.ext4");
        fs::write(&image, b"").unwrap();
        let v = parse_volume(&format!("{}:/d", image.display())).unwrap();
        assert!(!v.is_share());
        let image_copy = format!("{}:/d:copy", image.display());
        for bad in [
            "/tmp",
            "/tmp:data",
            "/tmp:/",
            "/tmp:/a/../b",
            "/tmp:/d:rx",
            "/nonexistent-hearth:/d",
            "/tmp:/d:ro:x",
            "/tmp:/d:ro,rw",
            "/dev/null:/d",
            &image_copy,
        ] {
            let err = parse_volume(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("-v {bad}: ")), "{err}");
        }
    }

    #[test]
    fn the_volume_limit_leaves_room_for_the_other_devices() {
        assert_eq!(max_volumes(false), 13);
        assert_eq!(max_volumes(true), 12);
    }

    #[test]
    fn machine_networks_parse() {
        assert_eq!(machine_network(None).unwrap(), Network::Bridge);
        assert_eq!(machine_network(Some("user")).unwrap(), Network::Bridge);
        assert_eq!(machine_network(Some("none")).unwrap(), Network::None);
        assert!(machine_network(Some("tap=t0")).is_err());
    }

    #[test]
    fn networks_parse() {
        assert_eq!(parse_network("none", &[]).unwrap(), NetworkArg::default());
        let n = parse_network("tap=t0,ip=10.0.0.2/24,gw=10.0.0.1", &[]).unwrap();
        assert_eq!(n.nic, Some(NetBackend::Tap("t0".into())));
        assert_eq!(
            n.net,
            Some(NetConfig {
                address: "10.0.0.2/24".into(),
                gateway: Some("10.0.0.1".into()),
                dns: Vec::new(),
                mtu: None,
            })
        );
        assert_eq!(parse_network("tap=t0", &[]).unwrap().net, None);
        let ports = parse_ports(&["127.0.0.1:8080:80".into(), "53:53/udp".into()]).unwrap();
        let user = parse_network("user", &ports).unwrap();
        assert_eq!(
            user.nic,
            Some(NetBackend::User(UserNetConfig {
                ports: ports.clone()
            }))
        );
        let net = user.net.unwrap();
        assert_eq!(net.address, "10.0.2.15/24");
        assert_eq!(net.gateway.as_deref(), Some("10.0.2.2"));
        assert_eq!(net.dns, ["10.0.2.3"]);
        for spec in ["none", "tap=t0"] {
            assert_eq!(
                parse_network(spec, &ports).unwrap_err().to_string(),
                format!("--network {spec}: -p needs --network user (the default)")
            );
        }
        for bad in [
            "bridge",
            "ip=10.0.0.2/24",
            "tap=t0,ip=10.0.0.2",
            "tap=t0,ip=10.0.0.300/24",
            "tap=t0,ip=10.0.0.2/33",
            "tap=t0,gw=10.0.0.1",
            "tap=",
            "users",
        ] {
            assert!(parse_network(bad, &[]).is_err(), "{bad}");
        }
    }

    #[test]
    fn published_ports_parse_and_are_checked() {
        assert_eq!(
            parse_ports(&["80:80".into(), "80:81".into()])
                .unwrap_err()
                .to_string(),
            "-p: host port 80/tcp is published twice"
        );
        assert_eq!(
            parse_ports(&["x".into()]).unwrap_err().to_string(),
            "-p: \"x\" is not [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]"
        );
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let ports = parse_ports(&[format!("127.0.0.1:{port}:80")]).unwrap();
        let err = check_ports_free(&ports).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "-p 127.0.0.1:{port}:80/tcp: host port {port}/tcp is not available ("
            )),
            "{err}"
        );
        drop(busy);
        check_ports_free(&ports).unwrap();
    }
}
