//! Starting the VMM for a container VM or a machine: `hearth run --config` as a child
//! process, on a `VmConfig` written into the VM's state directory (typed configuration,
//! checked here first, so a bad one is reported by the front end rather than in the
//! console log).
//!
//! The container front end stays a separate process from the VMM so that it can own the
//! user's terminal and signals (Ctrl-C goes to the container, not to the VM) while the
//! VMM keeps its own event loop, and so that a machine outlives the command that started
//! it. The child gets its own process group (the terminal's Ctrl-C does not reach it),
//! an unblocked signal mask, and for container VMs `PR_SET_PDEATHSIG`, so the VM dies
//! with its front end.
//!
//! Started as root, the VMM runs in a jail ([`VmJail`], `hearth run --jail`; README
//! "Security: the jail") unless the user says `--no-jail`: the front end gives the
//! jail's uid what it must write or connect to, checks that it can open every file of
//! the VM, and adds the jail's flags.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::template::Template;
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::devices::virtio::balloon::BalloonConfig;
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::fs::FsConfig;
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::rng::RngConfig;
use crate::devices::virtio::vsock::VsockConfig;

/// Boot options of every agent VM; `hearth.mode=` selects the agent's role.
pub const AGENT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet";

/// Environment variable with the agent's log level (`hearth.log=`; e.g. `debug` logs the
/// timed steps of every container start to the VM's console log).
pub const AGENT_LOG_ENV: &str = "HEARTH_AGENT_LOG";

/// The levels the agent knows (see `agent::init`).
const AGENT_LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The guest command line for an agent in `mode`, with `hearth.log=` when `agent_log`
/// names a level.
pub fn boot_args(mode: &str, agent_log: Option<&str>) -> String {
    let mut args = format!("{AGENT_CMDLINE} hearth.mode={mode}");
    match agent_log.map(str::trim).filter(|l| !l.is_empty()) {
        Some(level) if AGENT_LOG_LEVELS.contains(&level) => {
            args.push_str(&format!(" hearth.log={level}"));
        }
        Some(level) => log::warn!(
            "ignoring {AGENT_LOG_ENV}={level:?} (expected one of {})",
            AGENT_LOG_LEVELS.join(", ")
        ),
        None => {}
    }
    args
}

/// The virtio-fs tag of fs slot `index`: fixed per slot, so that a template made with
/// N fs devices serves every VM with N shared folders.
pub fn fs_tag(index: usize) -> String {
    format!("hearthfs{index}")
}

/// The guest CID of agent VMs (each VM has its own vsock device, so one value suffices).
pub const GUEST_CID: u32 = 3;

/// The VMM's configuration file, in the VM's state directory.
pub const CONFIG_FILE: &str = "vm.json";

/// The VMM's API socket, in the VM's state directory.
pub const API_SOCKET: &str = "api.sock";

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `hearth.mode=` value.
    pub mode: &'static str,
    pub cpus: u64,
    pub memory_mib: u64,
    /// Attached in order as /dev/vda, /dev/vdb, ...
    pub disks: Vec<BlockConfig>,
    pub nets: Vec<NetConfig>,
    /// virtio-fs devices: tag `hearthfsN` in slot N, the socket of a back end started
    /// for this VM (see `virtiofsd`).
    pub fs: Vec<FsConfig>,
    /// The virtiofsd program, when `fs` is not empty (a template of this shape is made
    /// with throwaway back ends of its own).
    pub virtiofsd: Option<PathBuf>,
    /// A virtio-balloon (machines have one: see `machine::machine_balloon`).
    pub balloon: Option<BalloonConfig>,
    pub vsock_socket: PathBuf,
    /// Serial console and VMM diagnostics go here.
    pub console_log: PathBuf,
    /// Where the VMM's configuration file and API socket go; lives as long as the VM.
    pub state_dir: PathBuf,
    /// A machine: new session, no parent-death signal.
    pub detached: bool,
    /// Run the VMM in this jail (`None`: unjailed).
    pub jail: Option<VmJail>,
}

/// How the VMM of a container VM or a machine is jailed: as the jail's default uid and
/// gid (`nobody`), in its own jail directory, with the VM's own directory bound in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmJail {
    /// `--jail-id`: names the jail directory, so unique on the host.
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    /// `--vm-dir`: the directory of the VM's sockets and of the host's vsock listener,
    /// reachable from both sides.
    pub vm_dir: Option<PathBuf>,
    /// Files the front end made for this VM that the jailed uid writes or connects to
    /// (writable volume images, the vsock listener): given to it before the VMM starts.
    pub give: Vec<PathBuf>,
}

impl VmJail {
    pub fn new(id: impl Into<String>, vm_dir: Option<PathBuf>) -> Self {
        Self {
            id: id.into(),
            uid: crate::jail::DEFAULT_UID,
            gid: crate::jail::DEFAULT_GID,
            vm_dir,
            give: Vec::new(),
        }
    }

    /// Whether VMs are jailed: when hearth runs as root, unless `--no-jail`.
    pub fn wanted(no_jail: bool) -> bool {
        // SAFETY: geteuid has no preconditions.
        !no_jail && unsafe { libc::geteuid() } == 0
    }

    /// The jail directory on the host.
    pub fn dir(&self) -> PathBuf {
        Path::new(crate::jail::DEFAULT_JAIL_PARENT).join(&self.id)
    }

    /// Removes what a jailed VMM killed outright (SIGKILL leaves its jail's supervisor no
    /// time to clean up) left of its jail directory. Call once the VMM has exited.
    pub fn remove_leftovers(&self) {
        let dir = self.dir();
        if dir.symlink_metadata().is_ok() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                log::warn!("cannot remove the jail {}: {e}", dir.display());
            }
        }
    }

    fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--jail".into(), "--jail-id".into(), (&self.id).into()];
        if let Some(dir) = &self.vm_dir {
            args.extend(["--vm-dir".into(), dir.into()]);
        }
        args
    }

    /// Gives the jail's uid the console log and the files it was promised, then checks
    /// that it may open each file the VMM opens (`reads`, `writes`), so that a file it
    /// cannot use is named now, with what to do, rather than in the console log.
    fn prepare(
        &self,
        console_log: &Path,
        reads: &[&Path],
        writes: &[&Path],
    ) -> Result<(), SpawnError> {
        for path in std::iter::once(console_log).chain(self.give.iter().map(PathBuf::as_path)) {
            std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid)).map_err(|source| {
                SpawnError::Give {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        }
        self.check(reads, writes)
    }

    /// Checks that the jail's uid may open `reads` and `writes` as the VMM will.
    fn check(&self, reads: &[&Path], writes: &[&Path]) -> Result<(), SpawnError> {
        let checks = (reads.iter().map(|p| (p, false))).chain(writes.iter().map(|p| (p, true)));
        for (path, write) in checks {
            let meta = std::fs::metadata(path).map_err(|source| SpawnError::JailCheck {
                path: path.to_path_buf(),
                source,
            })?;
            if !may_open(&meta, self.uid, self.gid, write) {
                return Err(SpawnError::JailAccess {
                    uid: self.uid,
                    gid: self.gid,
                    verb: if write { "read and write" } else { "read" },
                    path: path.to_path_buf(),
                });
            }
        }
        Ok(())
    }
}

/// Whether the permission bits of a file let `uid`/`gid` (without supplementary groups,
/// as in the jail) read it, and write it if `write`. ACLs are not looked at: the jail
/// checks again by opening each file as the VMM will.
fn may_open(meta: &std::fs::Metadata, uid: u32, gid: u32, write: bool) -> bool {
    let shift = if meta.uid() == uid {
        6
    } else if meta.gid() == gid {
        3
    } else {
        0
    };
    let wanted = if write { 0o6 } else { 0o4 };
    (meta.mode() >> shift) & wanted == wanted
}

/// Why the VMM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("invalid VM configuration")]
    Config(#[source] ConfigError),
    #[error("cannot write the VM configuration \"{path}\"")]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the VMM")]
    Start(#[source] io::Error),
    #[error("cannot give \"{path}\" to the jailed VMM")]
    Give {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot check \"{path}\" for the jailed VMM")]
    JailCheck {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the jailed VMM (uid {uid}, gid {gid}) cannot {verb} \"{path}\": chown it to {uid}:{gid}, make it accessible to others, or use --no-jail")]
    JailAccess {
        uid: u32,
        gid: u32,
        verb: &'static str,
        path: PathBuf,
    },
}

impl VmSpec {
    /// The VMM's configuration for this VM, checked as `hearth run` will check it.
    pub fn vm_config(&self) -> Result<VmConfig, ConfigError> {
        let mut config = VmConfig::new(&self.kernel);
        config.initrd = Some(self.initrd.clone());
        config.boot_args = boot_args(self.mode, std::env::var(AGENT_LOG_ENV).ok().as_deref());
        config.vcpu_count =
            u8::try_from(self.cpus).map_err(|_| ConfigError::VcpuCount(self.cpus))?;
        config.mem_size = self.memory_mib << 20;
        config.serial = SerialConfig::File(self.console_log.clone());
        config.disks = self.disks.clone();
        config.nets = self.nets.clone();
        config.fs = self.fs.clone();
        config.vsock = Some(VsockConfig {
            guest_cid: GUEST_CID.into(),
            uds_path: self.vsock_socket.clone(),
        });
        // Guests never wait for entropy (clones of a template least of all).
        config.rng = Some(RngConfig::default());
        config.balloon = self.balloon.clone();
        config.validate()?;
        Ok(config)
    }

    pub fn config_path(&self) -> PathBuf {
        self.state_dir.join(CONFIG_FILE)
    }

    /// The VMM's API socket (Firecracker's API: `hearth remote`, pause, snapshot, ...).
    pub fn api_socket(&self) -> PathBuf {
        self.state_dir.join(API_SOCKET)
    }

    fn read_only_disks(&self) -> impl Iterator<Item = &Path> {
        (self.disks.iter())
            .filter(|d| d.read_only)
            .map(|d| d.path.as_path())
    }
}

/// Writes the VM's configuration file and starts `hearth run --config` on it, serving
/// the API on [`VmSpec::api_socket`]. The VMM's stderr is appended to the console log.
pub fn spawn(spec: &VmSpec) -> Result<Child, SpawnError> {
    let config = spec.vm_config().map_err(SpawnError::Config)?;
    let json = config.to_json().map_err(SpawnError::Config)?;
    let config_path = spec.config_path();
    std::fs::write(&config_path, json).map_err(|source| SpawnError::WriteConfig {
        path: config_path.clone(),
        source,
    })?;
    let mut args: Vec<OsString> = vec!["run".into(), "--config".into(), config_path.into()];
    args.extend(["--api-sock".into(), spec.api_socket().into()]);
    let mut reads = vec![spec.kernel.as_path(), spec.initrd.as_path()];
    reads.extend(spec.read_only_disks());
    launch(spec, args, &reads)
}

/// Starts `hearth restore` of `template` as the VM `spec` describes: its disks, taps,
/// vsock socket, console and API socket replace the template's (which must have the
/// same device slots: see `template::TemplateKey`).
pub fn spawn_restore(spec: &VmSpec, template: &Template) -> Result<Child, SpawnError> {
    spec.vm_config().map_err(SpawnError::Config)?;
    let mut args: Vec<OsString> = vec!["restore".into()];
    let mut flag = |name: &str, value: OsString| {
        args.push(name.into());
        args.push(value);
    };
    flag("--state", template.state.clone().into());
    flag("--mem", template.mem.clone().into());
    flag("--api-sock", spec.api_socket().into());
    flag("--vsock-override", spec.vsock_socket.clone().into());
    flag("--serial-out", spec.console_log.clone().into());
    // The ids `hearth run --config` gives unnamed disks and NICs (see api::resources).
    for (index, disk) in spec.disks.iter().enumerate() {
        let mut value = OsString::from(format!("disk{index}="));
        value.push(&disk.path);
        flag("--disk-override", value);
    }
    // Each NIC gets a back end of its own: the tap named, or a fresh passt (with this
    // VM's published ports) that the restoring process starts.
    for (index, nic) in spec.nets.iter().enumerate() {
        let backend = NetConfig::new(nic.backend.clone());
        flag("--net-override", format!("net{index}={backend}").into());
    }
    // Every back end is new: the template's went with the VM it was made from.
    for fs in &spec.fs {
        let mut value = OsString::from(format!("{}=", fs.tag));
        value.push(&fs.socket);
        flag("--fs-override", value);
    }
    let mut reads = vec![template.state.as_path(), template.mem.as_path()];
    reads.extend(spec.read_only_disks());
    // The guest's boot messages are the template's; say where they are.
    if let Ok(mut log) = append(&spec.console_log) {
        let boot_log = template.state.with_file_name("boot.log");
        let _ = writeln!(
            log,
            "hearth: restored from template {}; its boot messages are in {}",
            template.id,
            boot_log.display()
        );
    }
    launch(spec, args, &reads)
}

/// Starts `hearth ARGS`, jailed if the spec says so; `reads` are the files the VMM only
/// reads (the writable disks are the spec's).
fn launch(spec: &VmSpec, mut args: Vec<OsString>, reads: &[&Path]) -> Result<Child, SpawnError> {
    let log = append(&spec.console_log).map_err(SpawnError::Start)?;
    if let Some(jail) = &spec.jail {
        let writes: Vec<&Path> = (spec.disks.iter())
            .filter(|d| !d.read_only)
            .map(|d| d.path.as_path())
            .collect();
        jail.prepare(&spec.console_log, reads, &writes)?;
        args.extend(jail.args());
    }
    let mut cmd = Command::new(std::env::current_exe().map_err(SpawnError::Start)?);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let detached = spec.detached;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (sigprocmask, setsid/setpgid, prctl).
    unsafe {
        cmd.pre_exec(move || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if detached {
                libc::setsid();
            } else {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(SpawnError::Start)
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Opens a file for appending (creating it).
pub fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-vmspec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn spec(dir: &Path) -> VmSpec {
        let file = |name: &str| {
            let path = dir.join(name);
            std::fs::write(&path, vec![0u8; 4096]).unwrap();
            path
        };
        VmSpec {
            kernel: file("vmlinux"),
            initrd: file("i.cpio"),
            mode: "container",
            cpus: 2,
            memory_mib: 320,
            disks: vec![
                "path=/dev/null,ro=on".parse().unwrap(),
                BlockConfig {
                    path: file("vol.ext4"),
                    read_only: false,
                    id: None,
                    rate_limiter: Default::default(),
                },
            ],
            nets: vec!["tap=t0".parse().unwrap()],
            fs: vec![FsConfig::new(fs_tag(0), dir.join("fs0.sock"))],
            virtiofsd: None,
            balloon: None,
            vsock_socket: dir.join("v.sock"),
            console_log: dir.join("console.log"),
            state_dir: dir.to_path_buf(),
            detached: false,
            jail: None,
        }
    }

    #[test]
    fn config_describes_the_vm() {
        let dir = temp_dir();
        let mut spec = spec(&dir);
        // /dev/null is not a regular file.
        assert!(matches!(
            spec.vm_config(),
            Err(ConfigError::NotAFile { .. })
        ));
        spec.disks[0].path = dir.join("vmlinux");
        let config = spec.vm_config().unwrap();
        assert_eq!(
            config.boot_args,
            boot_args("container", std::env::var(AGENT_LOG_ENV).ok().as_deref())
        );
        assert_eq!(config.init_args, None);
        assert_eq!((config.vcpu_count, config.mem_size), (2, 320 << 20));
        assert_eq!(config.initrd.as_deref(), Some(dir.join("i.cpio").as_path()));
        assert_eq!(config.serial, SerialConfig::File(dir.join("console.log")));
        assert_eq!(config.disks, spec.disks);
        assert_eq!(config.nets, spec.nets);
        assert_eq!(config.fs, spec.fs);
        assert_eq!(
            config.vsock.unwrap().to_string(),
            format!("cid=3,socket={}", dir.join("v.sock").display())
        );
        assert_eq!(spec.config_path(), dir.join(CONFIG_FILE));
        assert_eq!(config.balloon, None);
        spec.balloon = Some(super::super::machine::machine_balloon());
        assert_eq!(spec.vm_config().unwrap().balloon, spec.balloon);
        // A target larger than the VM is refused before the VMM starts.
        spec.balloon = Some("amount_mib=321".parse().unwrap());
        assert!(matches!(spec.vm_config(), Err(ConfigError::Balloon(_))));

        spec.cpus = 300;
        assert!(matches!(spec.vm_config(), Err(ConfigError::VcpuCount(300))));
    }

    #[test]
    fn jail_flags_and_permission_bits() {
        let mut jail = VmJail::new("hearth-c-1", Some("/run/x/vm".into()));
        assert_eq!((jail.uid, jail.gid), (65534, 65534));
        assert_eq!(jail.dir(), Path::new("/run/hearth/jail/hearth-c-1"));
        assert_eq!(
            jail.args(),
            ["--jail", "--jail-id", "hearth-c-1", "--vm-dir", "/run/x/vm"]
        );
        jail.vm_dir = None;
        assert_eq!(jail.args(), ["--jail", "--jail-id", "hearth-c-1"]);

        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir();
        let file = dir.join("bits");
        std::fs::write(&file, b"x").unwrap();
        let bits = |mode: u32| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let meta = std::fs::metadata(&file).unwrap();
            let (uid, gid) = (meta.uid(), meta.gid());
            // As the owner, as a member of the group, as anyone else.
            [
                (
                    may_open(&meta, uid, gid + 1, false),
                    may_open(&meta, uid, gid + 1, true),
                ),
                (
                    may_open(&meta, uid + 1, gid, false),
                    may_open(&meta, uid + 1, gid, true),
                ),
                (
                    may_open(&meta, uid + 1, gid + 1, false),
                    may_open(&meta, uid + 1, gid + 1, true),
                ),
            ]
        };
        assert_eq!(bits(0o644), [(true, true), (true, false), (true, false)]);
        assert_eq!(bits(0o600), [(true, true), (false, false), (false, false)]);
        assert_eq!(bits(0o066), [(false, false), (true, true), (true, true)]);
        assert_eq!(
            bits(0o200),
            [(false, false), (false, false), (false, false)]
        );

        // A file only its owner may use is named, with what to do.
        let jail = VmJail::new("x", None);
        let meta = std::fs::metadata(&file).unwrap();
        if meta.uid() != jail.uid {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(jail.check(&[&file], &[]).is_ok());
            let err = jail.check(&[], &[&file]).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "the jailed VMM (uid 65534, gid 65534) cannot read and write \"{}\": \
                     chown it to 65534:65534, make it accessible to others, or use --no-jail",
                    file.display()
                )
            );
        }
        let err = jail.check(&[&dir.join("missing")], &[]).unwrap_err();
        assert!(matches!(err, SpawnError::JailCheck { .. }), "{err}");
    }

    #[test]
    fn agent_log_level_goes_on_the_command_line() {
        assert_eq!(
            boot_args("machine", None),
            format!("{AGENT_CMDLINE} hearth.mode=machine")
        );
        assert_eq!(
            boot_args("container", Some("debug")),
            format!("{AGENT_CMDLINE} hearth.mode=container hearth.log=debug")
        );
        // Words that are not levels never reach the kernel command line.
        for bad in ["", "loud", "debug hearth.mode=machine"] {
            assert_eq!(
                boot_args("container", Some(bad)),
                format!("{AGENT_CMDLINE} hearth.mode=container")
            );
        }
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("hearth-logtail-{}", std::process::id()));
        std::fs::write(&path, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&path, 2), "c | d");
        assert_eq!(log_tail(Path::new("/nonexistent/x"), 2), "");
        std::fs::remove_file(path).unwrap();
    }
}
