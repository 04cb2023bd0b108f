//! Containers in microVMs: `hearth container run` and `hearth machine`.
//!
//! A container is an OCI image's root filesystem, run by the guest agent `hearth-init`
//! (see `agent`) in its own mount/PID/UTS/IPC namespaces and cgroup, with a tmpfs overlay
//! over the read-only image. Either
//! * **one container per microVM** ([`run`]): the image is an ext4 disk, the VM boots
//!   the agent from an initramfs hearth builds ([`initramfs`]), the agent connects back
//!   over vsock and the VM powers off when the process exits; or
//! * **several containers per machine** ([`machine`]): a named long-lived VM whose agent
//!   listens on vsock; images are sent to it once (by digest) and containers start
//!   there at container speed.
//!
//! The VMM itself runs as a `hearth run` child process ([`vm`]); this module is the front
//! end that owns the terminal, forwards stdio and signals ([`session`]) and returns the
//! process's exit status.

pub mod initramfs;
pub mod machine;
pub mod publish;
pub mod run;
pub mod session;
pub mod template;
pub mod virtiofsd;
pub mod vm;

use std::path::{Path, PathBuf};

use crate::agent::protocol::{Network, Rootfs, RunSpec};
use crate::cli::ProcessArgs;

/// Everything that can go wrong in the container front end.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error("initramfs: {0}")]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error(transparent)]
    Session(#[from] session::SessionError),
    #[error(transparent)]
    Spawn(#[from] vm::SpawnError),
    #[error(transparent)]
    Virtiofsd(#[from] virtiofsd::VirtiofsdError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Vm(String),
    /// A signal came while the VM was being made or booted; hearth exits 128+signal.
    #[error("interrupted while booting")]
    Interrupted,
    #[error("machine {name}: {reason}")]
    Machine { name: String, reason: String },
}

impl ContainerError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
        let what = what.into();
        move |source| ContainerError::Io { what, source }
    }
}

/// `$HEARTH_CACHE`, or `~/.cache/hearth` (shared with resources/ scripts).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_CACHE") {
        return PathBuf::from(dir);
    }
    home().join(".cache/hearth")
}

/// `$HEARTH_STATE`, or `$XDG_STATE_HOME/hearth`, or `~/.local/state/hearth`.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_STATE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("hearth");
    }
    home().join(".local/state/hearth")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The guest kernel: `--kernel`, `$HEARTH_GUEST_KERNEL`, or resources' minimal kernel.
pub fn guest_kernel(explicit: Option<&Path>) -> Result<PathBuf, ContainerError> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("HEARTH_GUEST_KERNEL").map(PathBuf::from))
        .unwrap_or_else(|| cache_dir().join("kernel/current/vmlinux"));
    if !path.is_file() {
        return Err(ContainerError::Usage(format!(
            "guest kernel {} not found: build it with resources/build-guest-kernel.sh or pass --kernel",
            path.display()
        )));
    }
    Ok(path)
}

/// The static guest agent: `$HEARTH_INIT`, or `hearth-init` next to this executable.
pub fn agent_binary() -> Result<PathBuf, ContainerError> {
    let path = match std::env::var_os("HEARTH_INIT") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .map_err(ContainerError::io("locating the hearth executable"))?
            .with_file_name("hearth-init"),
    };
    if !path.is_file() {
        return Err(ContainerError::Usage(format!(
            "guest agent {} not found: build it with `cargo build --bins` (or set HEARTH_INIT)",
            path.display()
        )));
    }
    Ok(path)
}

/// The image's process defaults, as `crate::image` reads them from its config.
pub use crate::image::ImageConfig;

/// Applies docker's rules for combining the image config with the command line:
/// `--entrypoint` replaces the entrypoint and drops the image's cmd; CMD arguments
/// replace the cmd; `-e KEY=VAL` overrides the image's KEY; `-e KEY` copies our value
/// (and is ignored when we have none); `-w` and `-u` replace the image's.
pub fn process_spec(
    config: &ImageConfig,
    process: &ProcessArgs,
    entrypoint: Option<&str>,
    command: &[String],
    host_env: impl Fn(&str) -> Option<String>,
) -> Result<ProcessSpec, ContainerError> {
    let mut argv: Vec<String> = match entrypoint {
        Some("") => Vec::new(),
        Some(e) => vec![e.to_string()],
        None => config.entrypoint.clone(),
    };
    if !command.is_empty() {
        argv.extend(command.iter().cloned());
    } else if entrypoint.is_none() {
        argv.extend(config.cmd.iter().cloned());
    }
    if argv.is_empty() {
        return Err(ContainerError::Usage(
            "no command: the image has no entrypoint or cmd and none was given".into(),
        ));
    }
    let mut env = config.env.clone();
    for item in &process.env {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match host_env(item) {
                Some(v) => (item.clone(), v),
                None => continue,
            },
        };
        if key.is_empty() || key.contains('\0') || value.contains('\0') {
            return Err(ContainerError::Usage(format!(
                "-e {item:?}: invalid variable"
            )));
        }
        env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key.as_str()));
        env.push(format!("{key}={value}"));
    }
    let cwd = process
        .workdir
        .clone()
        .or_else(|| config.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') {
        return Err(ContainerError::Usage(format!(
            "-w {cwd}: the working directory must be an absolute path"
        )));
    }
    let user = process
        .user
        .clone()
        .or_else(|| config.user.clone())
        .filter(|u| !u.is_empty());
    Ok(ProcessSpec {
        argv,
        env,
        cwd,
        user,
    })
}

/// The process part of a [`RunSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: Option<String>,
}

impl ProcessSpec {
    /// A run spec for this process with the terminal options of `args` and everything
    /// else at its default (no limits, the VM's network, no volumes, no name).
    pub fn into_run_spec(self, args: &ProcessArgs, rootfs: Rootfs) -> RunSpec {
        RunSpec {
            argv: self.argv,
            env: self.env,
            cwd: self.cwd,
            user: self.user,
            hostname: None,
            tty: args.tty,
            stdin: args.interactive,
            rootfs,
            volumes: Vec::new(),
            memory_limit: None,
            cpus: None,
            network: Network::Vm,
            net: None,
            name: None,
            term_size: if args.tty {
                session::terminal_size()
            } else {
                None
            },
            mac: None,
            files: Vec::new(),
        }
    }
}

/// A short random identifier (container names and hostnames, like docker's ids).
pub fn random_id() -> String {
    let mut bytes = [0u8; 6];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&(nanos as u64 ^ std::process::id() as u64).to_le_bytes()[..6]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a machine or container name: 1-32 of `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn check_name(kind: &str, name: &str) -> Result<(), ContainerError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::Usage(format!(
            "{kind} name {name:?} is invalid: use 1-32 letters, digits, '_', '.' or '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            working_dir: Some("/app".into()),
            user: Some("app".into()),
        }
    }

    fn spec(process: &ProcessArgs, ep: Option<&str>, cmd: &[&str]) -> ProcessSpec {
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        process_spec(&config(), process, ep, &cmd, |k| {
            (k == "HOSTVAR").then(|| "fromhost".to_string())
        })
        .unwrap()
    }

    #[test]
    fn image_defaults_apply() {
        let s = spec(&ProcessArgs::default(), None, &[]);
        assert_eq!(s.argv, ["/entry", "default"]);
        assert_eq!(s.env, ["PATH=/bin", "A=image"]);
        assert_eq!(s.cwd, "/app");
        assert_eq!(s.user.as_deref(), Some("app"));
    }

    #[test]
    fn command_line_overrides_like_docker() {
        let process = ProcessArgs {
            env: vec![
                "A=cli".into(),
                "HOSTVAR".into(),
                "MISSING".into(),
                "B=x=y".into(),
            ],
            workdir: Some("/tmp".into()),
            user: Some("1000:1000".into()),
            ..Default::default()
        };
        let s = spec(&process, None, &["echo", "hi"]);
        assert_eq!(s.argv, ["/entry", "echo", "hi"]);
        assert_eq!(s.env, ["PATH=/bin", "A=cli", "HOSTVAR=fromhost", "B=x=y"]);
        assert_eq!(s.cwd, "/tmp");
        assert_eq!(s.user.as_deref(), Some("1000:1000"));
        // --entrypoint drops the image's cmd; "" clears the entrypoint.
        assert_eq!(spec(&process, Some("/bin/sh"), &[]).argv, ["/bin/sh"]);
        assert_eq!(spec(&process, Some(""), &["ls"]).argv, ["ls"]);
    }

    #[test]
    fn bad_process_options_are_usage_errors() {
        let empty = ImageConfig {
            entrypoint: vec![],
            cmd: vec![],
            env: vec![],
            working_dir: None,
            user: None,
        };
        let err = process_spec(&empty, &ProcessArgs::default(), None, &[], |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("no command"), "{err}");
        let rel = ProcessArgs {
            workdir: Some("rel".into()),
            ..Default::default()
        };
        assert!(process_spec(&config(), &rel, None, &[], |_| None).is_err());
        let bad_env = ProcessArgs {
            env: vec!["=x".into()],
            ..Default::default()
        };
        assert!(process_spec(&config(), &bad_env, None, &[], |_| None).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("machine", "dev-1.a_b").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(33)] {
            assert!(check_name("machine", bad).is_err(), "{bad}");
        }
        assert_eq!(random_id().len(), 12);
    }
}
