//! Starting the VMM for a container VM or a machine: `hearth run` as a child process.
//!
//! The container front end stays a separate process from the VMM so that it can own the
//! user's terminal and signals (Ctrl-C goes to the container, not to the VM) while the
//! VMM keeps its own event loop, and so that a machine outlives the command that started
//! it. The child gets its own process group (the terminal's Ctrl-C does not reach it),
//! an unblocked signal mask, and for container VMs `PR_SET_PDEATHSIG`, so the VM dies
//! with its front end.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Boot options of every agent VM; `hearth.mode=` selects the agent's role.
pub const AGENT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet";

/// The guest CID of agent VMs (each VM has its own vsock device, so one value suffices).
pub const GUEST_CID: u32 = 3;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `hearth.mode=` value.
    pub mode: &'static str,
    pub cpus: u64,
    pub memory_mib: u64,
    /// (image, read-only), attached in order as /dev/vda, /dev/vdb, ...
    pub disks: Vec<(PathBuf, bool)>,
    /// `--net` specs.
    pub nets: Vec<String>,
    pub vsock_socket: PathBuf,
    /// Serial console and VMM diagnostics go here.
    pub console_log: PathBuf,
    /// A machine: new session, no parent-death signal.
    pub detached: bool,
}

impl VmSpec {
    /// The `hearth run` arguments for this VM.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "run".to_string(),
            "--kernel".into(),
            self.kernel.display().to_string(),
            "--initrd".into(),
            self.initrd.display().to_string(),
            "--cmdline".into(),
            format!("{AGENT_CMDLINE} hearth.mode={}", self.mode),
            "--cpus".into(),
            self.cpus.to_string(),
            "--memory".into(),
            format!("{}M", self.memory_mib),
            "--serial".into(),
            format!("file={}", self.console_log.display()),
            "--vsock".into(),
            format!("cid={GUEST_CID},socket={}", self.vsock_socket.display()),
        ];
        for (path, ro) in &self.disks {
            args.push("--disk".into());
            let ro = if *ro { ",ro=on" } else { "" };
            args.push(format!("path={}{ro}", path.display()));
        }
        for net in &self.nets {
            args.push("--net".into());
            args.push(net.clone());
        }
        args
    }
}

/// Starts the VMM. Its stderr is appended to the console log.
pub fn spawn(spec: &VmSpec) -> io::Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.console_log)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(spec.args())
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
    cmd.spawn()
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

    #[test]
    fn args_describe_the_vm() {
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i.cpio".into(),
            mode: "container",
            cpus: 2,
            memory_mib: 320,
            disks: vec![("/img.ext4".into(), true), ("/vol.ext4".into(), false)],
            nets: vec!["tap=t0".into()],
            vsock_socket: "/run/v.sock".into(),
            console_log: "/run/console.log".into(),
            detached: false,
        };
        let args = spec.args().join(" ");
        assert!(args.starts_with("run --kernel /k --initrd /i.cpio --cmdline console=ttyS0"));
        assert!(args.contains("hearth.mode=container --cpus 2 --memory 320M"));
        assert!(args.contains("--serial file=/run/console.log"));
        assert!(args.contains("--vsock cid=3,socket=/run/v.sock"));
        assert!(args.contains("--disk path=/img.ext4,ro=on --disk path=/vol.ext4 --net tap=t0"));
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
