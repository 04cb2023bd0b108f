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

use super::session::{self, Signals};
use super::template::TemplateStore;
use super::vm::{self, VmJail, VmSpec};
use super::ContainerError;
use crate::agent::protocol::{Rootfs, RunSpec, MODE_MACHINE};
use crate::cli::{MachineCommand, MachineStartArgs, ProcessArgs};
use crate::config::parse_memory_size;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::image::PreparedImage;

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
    let spec = VmSpec {
        kernel: kernel.clone(),
        initrd,
        mode: MODE_MACHINE,
        cpus: args.cpus,
        memory_mib: memory >> 20,
        disks: Vec::new(),
        nets: Vec::new(),
        balloon: Some(machine_balloon()),
        vsock_socket: machine.socket(),
        console_log: machine.console_log(),
        state_dir: machine.dir.clone(),
        detached: true,
        jail: VmJail::wanted(args.no_jail).then(|| machine.jail()),
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
        Some(TemplateStore::default_location().obtain(
            &template_spec,
            args.boot_timeout,
            &|| false,
        )?)
    };
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
    };
    let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
    fs::write(machine.info_path(), json).map_err(ContainerError::io("writing machine.json"))?;

    let deadline = Instant::now() + Duration::from_secs(args.boot_timeout);
    loop {
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
                break;
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
    }
    println!("machine {} is running (pid {})", machine.name, info.pid);
    Ok(())
}

/// Powers the machine off through its agent, or kills the VMM if the agent is gone.
pub fn stop(name: &str) -> Result<(), ContainerError> {
    let machine = Machine::new(name)?;
    let Some(pid) = machine.running_pid() else {
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
            let _ = fs::remove_dir_all(&machine.dir);
            machine.jail().remove_leftovers();
            return Err(machine.err("did not power off; killed it"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
        "{:<20} {:<8} {:>4} {:>8} {:>8} {:>8}",
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
            "{:<20} {:<8} {:>4} {:>7}M {:>8} {:>8}",
            name, status, info.cpus, info.memory_mib, rss, pid
        );
    }
    Ok(())
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

/// Runs a container in a machine, sending it the image first if the machine lacks it.
pub fn run_container(
    name: &str,
    image: &PreparedImage,
    spec: RunSpec,
    signals: &Signals,
) -> Result<i32, ContainerError> {
    let machine = Machine::new(name)?;
    let mut stream = machine.connect()?;
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
    fn machine_commands_get_a_default_path() {
        let spec = machine_spec(&ProcessArgs::default(), &["uname".into()], Rootfs::Host).unwrap();
        assert_eq!(spec.argv, ["uname"]);
        assert!(spec.env[0].starts_with("PATH=/usr/local/sbin"));
        assert_eq!(spec.cwd, "/");
    }
}
