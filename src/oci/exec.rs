//! `exec`: a further process in a running container's VM. The container VM's agent
//! listens on vsock besides serving the container's own session; `exec` connects to it
//! through the VM's vsock socket and runs the process in the container's namespaces
//! (`Rootfs::Container`). In the foreground without a terminal `exec` relays the
//! process itself; with `--detach` or `--tty` a waiter (a re-exec of this binary, like
//! the monitor) does, and its pid is the one engines wait on.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Duration;

use oci_spec::runtime::{Process, Spec};

use super::args::{ExecArgs, Globals};
use super::state::{StateDir, Status};
use super::{bundle, console, monitor, OciError};
use crate::agent::protocol::{Rootfs, RunSpec};
use crate::container::session::{self, Signals};

/// How long connecting to the VM's agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn exec(globals: &Globals, args: &ExecArgs) -> Result<u8, OciError> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    let record = dir.load()?;
    if record.current_status() != Status::Running {
        return Err(OciError::State(format!(
            "cannot exec in a {} container",
            record.current_status().name()
        )));
    }
    let process = match &args.process {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| OciError::Bundle(format!("cannot read {}: {e}", path.display())))?;
            serde_json::from_str::<Process>(&text).map_err(|e| {
                OciError::Bundle(format!("{}: invalid process JSON: {e}", path.display()))
            })?
        }
        None => base_process(&record.bundle)?,
    };
    let spec = exec_spec(process, args)?;
    if spec.tty && args.console_socket.is_none() {
        return Err(OciError::Usage("a terminal needs --console-socket".into()));
    }
    if !args.detach && !spec.tty {
        let signals = Signals::install();
        let stream = connect(&dir)?;
        let status = session::run_process(stream, spec, &signals)
            .map_err(|e| OciError::Vm(format!("exec: {}", crate::error_chain(&e))))?;
        return Ok((status & 0xff) as u8);
    }
    // The waiter reads the spec from a file in the state directory (and removes it).
    let spec_file = dir
        .path
        .join(format!("exec-{}.json", crate::container::random_id()));
    let text = serde_json::to_vec(&spec).map_err(|e| OciError::State(e.to_string()))?;
    super::state::write_atomically(&spec_file, &text)
        .map_err(|e| OciError::State(format!("cannot write {}: {e}", spec_file.display())))?;
    let pty = if spec.tty {
        let (master, slave, name) = console::open_pty()?;
        if let Some((rows, cols)) = spec.term_size {
            console::set_size(slave.as_raw_fd(), rows, cols);
        }
        Some((master, slave, name))
    } else {
        None
    };
    let mut command = super::self_command(globals)?;
    command.arg("__exec-waiter").arg(&args.id).arg(&spec_file);
    if let Some((_, slave, _)) = &pty {
        super::console::stdio_to(&mut command, slave)?;
    }
    let (mut child, outcome) = super::spawn_notified(&mut command, spec.tty)?;
    if let Err(e) = outcome {
        let _ = std::fs::remove_file(&spec_file);
        return Err(e);
    }
    if let (Some((master, _, name)), Some(socket)) = (&pty, &args.console_socket) {
        if let Err(e) = console::send_fd(socket, master.as_raw_fd(), name) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    }
    if let Some(path) = &args.pid_file {
        super::write_pid_file(path, child.id() as i32)?;
    }
    if args.detach {
        return Ok(0);
    }
    let status = child
        .wait()
        .map_err(|e| OciError::State(format!("waiting for the exec: {e}")))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        _ => 1,
    })
}

/// The container's own process from its bundle: an exec given only a command runs it
/// with that process's environment, directory and user, as runc does.
fn base_process(bundle: &Path) -> Result<Process, OciError> {
    let config = bundle.join("config.json");
    let text = std::fs::read_to_string(&config)
        .map_err(|e| OciError::Bundle(format!("cannot read {}: {e}", config.display())))?;
    let spec: Spec = serde_json::from_str(&text)
        .map_err(|e| OciError::Bundle(format!("{}: invalid JSON: {e}", config.display())))?;
    spec.process()
        .clone()
        .ok_or_else(|| OciError::Bundle("process: missing".into()))
}

/// The agent's spec for the exec: the process with the command line's overrides, in
/// the container.
pub fn exec_spec(mut process: Process, args: &ExecArgs) -> Result<RunSpec, OciError> {
    if !args.command.is_empty() {
        process.set_args(Some(args.command.clone()));
    }
    if args.process.is_none() {
        process.set_terminal(Some(args.tty));
    }
    if let Some(cwd) = &args.cwd {
        process.set_cwd(cwd.into());
    }
    if !args.env.is_empty() {
        let mut env = process.env().clone().unwrap_or_default();
        for item in &args.env {
            let key = item.split_once('=').map_or(item.as_str(), |(k, _)| k);
            env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key));
            env.push(item.clone());
        }
        process.set_env(Some(env));
    }
    let mut spec = bundle::process_spec(&process)?;
    if let Some(user) = &args.user {
        let valid = user
            .split(':')
            .all(|part| !part.is_empty() && part.parse::<u32>().is_ok());
        if !valid || user.split(':').count() > 2 {
            return Err(OciError::Usage(format!(
                "--user {user:?}: expected UID[:GID] (numbers)"
            )));
        }
        spec.user = Some(user.clone());
    }
    spec.rootfs = Rootfs::Container {
        name: super::CONTAINER_NAME.into(),
    };
    spec.name = None;
    Ok(spec)
}

/// Connects to the agent of the container's VM.
fn connect(dir: &StateDir) -> Result<std::os::unix::net::UnixStream, OciError> {
    let record = dir.load()?;
    let vsock = record
        .vsock
        .ok_or_else(|| OciError::State("the container's VM has no vsock socket yet".into()))?;
    session::connect_agent(&vsock, CONNECT_TIMEOUT)
        .map_err(|e| OciError::Vm(format!("exec: {}", crate::error_chain(&e))))
}

/// The waiter's main: runs the process in `spec_file` and exits as it did.
pub fn waiter(globals: &Globals, id: &str, spec_file: &Path) -> u8 {
    let signals = Signals::install();
    // SAFETY: `exec` started us with the notify pipe at NOTIFY_FD, owned by nothing
    // else in this process.
    let mut notify = Some(unsafe { std::fs::File::from_raw_fd(monitor::NOTIFY_FD) });
    monitor::set_cloexec(monitor::NOTIFY_FD);
    let result = (|| {
        let dir = StateDir::new(&globals.root, id)?;
        let text = std::fs::read(spec_file)
            .map_err(|e| OciError::State(format!("cannot read {}: {e}", spec_file.display())));
        let _ = std::fs::remove_file(spec_file);
        let spec: RunSpec = serde_json::from_slice(&text?)
            .map_err(|e| OciError::State(format!("{}: {e}", spec_file.display())))?;
        let stream = connect(&dir)?;
        if let Some(mut pipe) = notify.take() {
            let _ = writeln!(pipe, "ok");
        }
        session::run_process(stream, spec, &signals)
            .map_err(|e| OciError::Vm(format!("exec: {}", crate::error_chain(&e))))
    })();
    match result {
        Ok(status) => monitor::exit_with(status),
        Err(e) => {
            monitor::report_failure(&mut notify, globals, &crate::error_chain(&e));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process() -> Process {
        serde_json::from_str(
            r#"{"user": {"uid": 0, "gid": 0}, "args": ["sleep", "100"], "cwd": "/",
                "env": ["PATH=/bin", "A=1"]}"#,
        )
        .unwrap()
    }

    #[test]
    fn command_line_overrides_the_base_process() {
        let args = ExecArgs {
            id: "c".into(),
            env: vec!["A=2".into(), "B=3".into()],
            cwd: Some("/tmp".into()),
            user: Some("1000:1000".into()),
            command: vec!["cat".into(), "/f".into()],
            ..Default::default()
        };
        let spec = exec_spec(process(), &args).unwrap();
        assert_eq!(spec.argv, ["cat", "/f"]);
        assert_eq!(spec.env, ["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(spec.cwd, "/tmp");
        assert_eq!(spec.user.as_deref(), Some("1000:1000"));
        assert_eq!(
            spec.rootfs,
            Rootfs::Container {
                name: super::super::CONTAINER_NAME.into()
            }
        );
        assert!(!spec.tty);
        let tty = ExecArgs {
            tty: true,
            command: vec!["sh".into()],
            ..Default::default()
        };
        assert!(exec_spec(process(), &tty).unwrap().tty);
    }

    #[test]
    fn bad_exec_options_are_refused() {
        let args = |user: &str| ExecArgs {
            user: Some(user.into()),
            command: vec!["true".into()],
            ..Default::default()
        };
        for bad in ["root", "1:2:3", "1:", ":1"] {
            assert!(exec_spec(process(), &args(bad)).is_err(), "{bad}");
        }
        let rel = ExecArgs {
            cwd: Some("rel".into()),
            command: vec!["true".into()],
            ..Default::default()
        };
        assert!(exec_spec(process(), &rel).is_err());
    }
}
