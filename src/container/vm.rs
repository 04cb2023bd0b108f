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

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::template::Template;
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::devices::virtio::block::BlockConfig;
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
    pub vsock_socket: PathBuf,
    /// Serial console and VMM diagnostics go here.
    pub console_log: PathBuf,
    /// Where the VMM's configuration file is written; lives as long as the VM.
    pub state_dir: PathBuf,
    /// A machine: new session, no parent-death signal.
    pub detached: bool,
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
        config.vsock = Some(VsockConfig {
            guest_cid: GUEST_CID.into(),
            uds_path: self.vsock_socket.clone(),
        });
        // Guests never wait for entropy (clones of a template least of all).
        config.rng = Some(RngConfig::default());
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
    launch(spec, args)
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
    for (index, nic) in spec.nets.iter().enumerate() {
        flag("--net-override", format!("net{index}={}", nic.tap).into());
    }
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
    launch(spec, args)
}

fn launch(spec: &VmSpec, args: Vec<OsString>) -> Result<Child, SpawnError> {
    let log = append(&spec.console_log).map_err(SpawnError::Start)?;
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
            vsock_socket: dir.join("v.sock"),
            console_log: dir.join("console.log"),
            state_dir: dir.to_path_buf(),
            detached: false,
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
        assert_eq!(
            config.vsock.unwrap().to_string(),
            format!("cid=3,socket={}", dir.join("v.sock").display())
        );
        assert_eq!(spec.config_path(), dir.join(CONFIG_FILE));

        spec.cpus = 300;
        assert!(matches!(spec.vm_config(), Err(ConfigError::VcpuCount(300))));
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
