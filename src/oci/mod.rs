//! `hearth oci`: an OCI runtime with runc's command line, so that podman (conmon),
//! containerd (its runc shim) and dockerd run each container in a hearth microVM.
//!
//! A front end over the container engine (`crate::container`), not a new engine:
//! `create` checks the bundle ([`bundle`]), makes the state directory ([`state`]) and
//! starts the [`monitor`], a re-exec of this binary that restores a container VM from
//! its template and waits for `start`, and the [`anchor`], the process engines wait on,
//! which exits with the container's status. The other commands talk to the monitor over
//! its control socket, or read the state. `exec` ([`exec`]) runs a further process in the
//! VM through the agent's vsock listener.

pub mod anchor;
pub mod args;
pub mod bundle;
pub mod console;
pub mod exec;
pub mod hooks;
pub mod log;
pub mod monitor;
pub mod state;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use args::{Command as OciCommand, CreateArgs, Globals, Invocation, LogFormat};
use state::{Record, StateDir, Status};

/// The runtime-spec version this runtime implements.
pub const SPEC_VERSION: &str = "1.2.0";
/// The name the agent knows the container by (the VM runs one), which `exec` joins.
pub const CONTAINER_NAME: &str = "oci";
/// The program name that means `hearth oci` (a symlink to the hearth binary).
pub const PROGRAM_NAME: &str = "hearth-oci";
/// How long `delete` waits for a killed container's anchor to end.
const STOP_WAIT: Duration = Duration::from_secs(20);

/// Everything `hearth oci` reports as a failure (one line, exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Bundle(String),
    #[error("{0}")]
    State(String),
    #[error("container \"{0}\" does not exist")]
    NotFound(String),
    #[error("{0}")]
    Console(String),
    #[error("{0}")]
    Vm(String),
    #[error("{0}")]
    Hook(String),
}

/// Whether this process was started as `hearth-oci` (through a symlink).
pub fn invoked_as_runtime(argv0: &str) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|name| name == PROGRAM_NAME)
}

/// Runs `hearth oci ARGS...` (the words after `oci`); returns the exit status.
pub fn main(argv: &[String]) -> u8 {
    let invocation = match args::parse(argv) {
        Ok(invocation) => invocation,
        Err(err) => {
            let globals = loose_globals(argv);
            report(&globals, &err);
            return 1;
        }
    };
    let globals = &invocation.globals;
    match command(&invocation) {
        Ok(status) => status,
        Err(err) => {
            report(globals, &err);
            1
        }
    }
}

/// The `--log` options of a command line that did not parse, so that even a usage
/// error reaches the engine's log.
fn loose_globals(argv: &[String]) -> Globals {
    let mut globals = Globals::default();
    let mut i = 0;
    while let Some(word) = argv.get(i).filter(|w| w.starts_with('-')) {
        let (name, inline) = match word.trim_start_matches('-').split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (word.trim_start_matches('-'), None),
        };
        let takes_value = ["root", "log", "log-format", "criu", "rootless"].contains(&name);
        let value = inline.or_else(|| argv.get(i + 1).filter(|_| takes_value).cloned());
        i += if takes_value && !word.contains('=') {
            2
        } else {
            1
        };
        match name {
            "log" => globals.log = value.map(Into::into),
            "log-format" if value.as_deref() == Some("json") => {
                globals.log_format = LogFormat::Json
            }
            _ => {}
        }
    }
    globals
}

/// One line on stderr, and the same in `--log`.
fn report(globals: &Globals, err: &OciError) {
    let text = crate::error_chain(err);
    eprintln!("hearth oci: {text}");
    if let Some(path) = &globals.log {
        log::append(path, globals.log_format, "error", &text);
    }
}

fn command(invocation: &Invocation) -> Result<u8, OciError> {
    let globals = &invocation.globals;
    let dir = |id: &str| StateDir::new(&globals.root, id);
    match &invocation.command {
        OciCommand::Version => {
            println!(
                "{PROGRAM_NAME} version {}\nspec: {SPEC_VERSION}",
                env!("CARGO_PKG_VERSION")
            );
            Ok(0)
        }
        OciCommand::Features => {
            println!("{}", features());
            Ok(0)
        }
        OciCommand::Create(create_args) => {
            create(globals, create_args)?;
            Ok(0)
        }
        OciCommand::Run(create_args) => run(globals, create_args),
        OciCommand::Start { id } => {
            start(&dir(id)?)?;
            Ok(0)
        }
        OciCommand::State { id } => {
            let record = dir(id)?.load()?;
            let text = serde_json::to_string_pretty(&record.spec_state())
                .map_err(|e| OciError::State(e.to_string()))?;
            println!("{text}");
            Ok(0)
        }
        OciCommand::Kill { id, signal } => {
            kill(&dir(id)?, *signal)?;
            Ok(0)
        }
        OciCommand::Delete { id, force } => {
            delete(&dir(id)?, *force)?;
            Ok(0)
        }
        OciCommand::List { json, quiet } => {
            list(globals, *json, *quiet);
            Ok(0)
        }
        OciCommand::Ps { id, json } => {
            // The container's processes live in the guest; on the host there is its
            // monitor, the process engines wait on.
            let record = dir(id)?.load()?;
            let pids: Vec<i32> = (record.current_status() != Status::Stopped)
                .then_some(record.pid)
                .into_iter()
                .collect();
            if *json {
                println!("{}", serde_json::json!(pids));
            } else {
                println!("PID");
                for pid in pids {
                    println!("{pid}");
                }
            }
            Ok(0)
        }
        OciCommand::Exec(exec_args) => exec::exec(globals, exec_args),
        OciCommand::Monitor { id } => Ok(monitor::run(globals, id)),
        OciCommand::ExecWaiter { id, process } => Ok(exec::waiter(globals, id, process)),
        OciCommand::Anchor { id, rootfs } => Ok(anchor::run(globals, id, rootfs)),
    }
}

/// The runtime-spec features document.
fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": SPEC_VERSION,
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw"],
        "linux": {
            "namespaces": ["pid", "network", "ipc", "uts", "mount"],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": false, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
        },
        "annotations": {
            "org.hearth.isolation": "microvm",
        },
    })
}

/// Removes a state directory unless disarmed: a create that fails leaves nothing.
struct Cleanup<'a> {
    dir: &'a StateDir,
    monitor: Option<Child>,
    armed: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(mut child) = self.monitor.take() {
            // A monitor that is ready holds a VM: the control socket stops it in order;
            // one that is not ends when its VM setup fails or on SIGKILL.
            if monitor::request(self.dir, &format!("kill {}", libc::SIGKILL)).is_err() {
                let _ = child.kill();
            }
            let deadline = Instant::now() + STOP_WAIT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.dir.remove();
    }
}

/// `create`: returns once the monitor holds a created container; the child returned is
/// the anchor, whose pid is the container's.
fn create(globals: &Globals, args: &CreateArgs) -> Result<Child, OciError> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    if dir.exists() {
        return Err(OciError::State("container ID already exists".into()));
    }
    let bundle = bundle::load(&args.bundle)?;
    let tty = bundle.run.tty;
    match (tty, &args.console_socket) {
        (true, None) => {
            return Err(OciError::Usage(
                "process.terminal is true: --console-socket is required".into(),
            ))
        }
        (false, Some(_)) => {
            return Err(OciError::Usage(
                "--console-socket is only for process.terminal: true".into(),
            ))
        }
        _ => {}
    }
    crate::container::guest_kernel(None).map_err(|e| OciError::Vm(e.to_string()))?;
    dir.create()?;
    let mut cleanup = Cleanup {
        dir: &dir,
        monitor: None,
        armed: true,
    };
    let mut record = Record {
        id: args.id.clone(),
        pid: 0,
        pid_start: 0,
        bundle: bundle.dir.clone(),
        created: state::now_rfc3339(),
        status: Status::Creating,
        annotations: bundle.annotations.clone(),
        exit_status: None,
        vsock: None,
    };
    dir.save(&record)?;
    let pty = if tty {
        let (master, slave, name) = console::open_pty()?;
        if let Some((rows, cols)) = bundle.run.term_size {
            console::set_size(slave.as_raw_fd(), rows, cols);
        }
        Some((master, slave, name))
    } else {
        None
    };
    let mut command = self_command(globals)?;
    command.args(["__monitor", &args.id]);
    if let Some((_, slave, _)) = &pty {
        console::stdio_to(&mut command, slave)?;
    }
    let (monitor, outcome) = spawn_notified(&mut command, tty)?;
    cleanup.monitor = Some(monitor);
    outcome?;
    let mut command = self_command(globals)?;
    command
        .arg("__anchor")
        .arg(&args.id)
        .arg(&bundle.rootfs)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (anchor, outcome) = spawn_notified(&mut command, false)?;
    outcome?;
    record = dir.load()?;
    if let (Some((master, _, name)), Some(socket)) = (&pty, &args.console_socket) {
        console::send_fd(socket, master.as_raw_fd(), name)?;
    }
    if let Some(path) = &args.pid_file {
        write_pid_file(path, record.pid)?;
    }
    if let Some(hooks) = &bundle.hooks {
        let state = record.spec_state();
        hooks::run(
            "createRuntime",
            hooks.create_runtime().as_deref().unwrap_or(&[]),
            &state,
        )?;
        hooks::run(
            "prestart",
            hooks.prestart().as_deref().unwrap_or(&[]),
            &state,
        )?;
    }
    cleanup.armed = false;
    Ok(anchor)
}

/// This binary as `hearth oci` with the same globals.
fn self_command(globals: &Globals) -> Result<Command, OciError> {
    let exe = std::env::current_exe()
        .map_err(|e| OciError::Vm(format!("locating the hearth executable: {e}")))?;
    let mut command = Command::new(exe);
    command.arg("oci").arg("--root").arg(&globals.root);
    if let Some(log) = &globals.log {
        command.arg("--log").arg(log);
        if globals.log_format == LogFormat::Json {
            command.args(["--log-format", "json"]);
        }
    }
    Ok(command)
}

/// Starts a helper process (monitor or exec waiter) in a session of its own (engines'
/// signals to their process group are not its), with a pipe at
/// [`monitor::NOTIFY_FD`], and waits until it reports `ok` or its error. With `tty`,
/// its stdin (a pty slave) becomes its controlling terminal.
fn spawn_notified(
    command: &mut Command,
    tty: bool,
) -> Result<(Child, Result<(), OciError>), OciError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(OciError::Vm(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: pipe2 succeeded; both descriptors are ours alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = write_end.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, ioctl, dup2,
    // fcntl, close_range) are made, on descriptors the child owns.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if write_fd == monitor::NOTIFY_FD {
                libc::fcntl(write_fd, libc::F_SETFD, 0);
            } else if libc::dup2(write_fd, monitor::NOTIFY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Engines leak descriptors into the runtime (conmon's sync pipe, the shim's
            // socket) and may wait for their EOF: the long-lived helper keeps none.
            libc::syscall(
                libc::SYS_close_range,
                monitor::NOTIFY_FD as libc::c_uint + 1,
                libc::c_uint::MAX,
                0 as libc::c_uint,
            );
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| OciError::Vm(format!("cannot start the monitor: {e}")))?;
    drop(write_end);
    let mut answer = String::new();
    let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
    let answer = answer.trim_end();
    let outcome = if answer == "ok" {
        Ok(())
    } else if let Some(text) = answer.strip_prefix("error ") {
        let _ = child.wait();
        Err(OciError::Vm(text.to_string()))
    } else {
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        Err(OciError::Vm(format!(
            "the monitor ended ({status}) before the container was created"
        )))
    };
    Ok((child, outcome))
}

/// Writes the pid file atomically (engines poll for it).
fn write_pid_file(path: &std::path::Path, pid: i32) -> Result<(), OciError> {
    state::write_atomically(path, pid.to_string().as_bytes())
        .map_err(|e| OciError::State(format!("cannot write {}: {e}", path.display())))
}

fn start(dir: &StateDir) -> Result<(), OciError> {
    let record = dir.load()?;
    match record.current_status() {
        Status::Created => {}
        Status::Running => {
            return Err(OciError::State(
                "cannot start an already running container".into(),
            ))
        }
        Status::Stopped => {
            return Err(OciError::State(
                "cannot start a container that has stopped".into(),
            ))
        }
        Status::Creating => {
            return Err(OciError::State(
                "the container is still being created".into(),
            ))
        }
    }
    monitor::request(dir, "start")?;
    let bundle = bundle::load(&record.bundle);
    if let Ok(Some(hooks)) = bundle.map(|b| b.hooks) {
        let mut running = record;
        running.status = Status::Running;
        // Poststart failures are reported, but the container keeps running (the spec).
        if let Err(e) = hooks::run(
            "poststart",
            hooks.poststart().as_deref().unwrap_or(&[]),
            &running.spec_state(),
        ) {
            eprintln!("hearth oci: warning: {e}");
        }
    }
    Ok(())
}

fn kill(dir: &StateDir, signal: i32) -> Result<(), OciError> {
    let record = dir.load()?;
    match record.current_status() {
        Status::Created | Status::Running => monitor::request(dir, &format!("kill {signal}")),
        _ => Err(OciError::State("container not running".into())),
    }
}

fn delete(dir: &StateDir, force: bool) -> Result<(), OciError> {
    let record = match dir.load() {
        Ok(record) => record,
        // A create that died half-way (no state.json yet): tidy it away.
        Err(OciError::NotFound(_)) if dir.exists() => return dir.remove(),
        Err(OciError::NotFound(_)) if force => return Ok(()),
        Err(e) => return Err(e),
    };
    match record.current_status() {
        Status::Stopped => {}
        Status::Running if !force => {
            return Err(OciError::State(format!(
                "cannot delete container {} that is not stopped: running (use --force)",
                record.id
            )))
        }
        Status::Created | Status::Running | Status::Creating => {
            let _ = monitor::request(dir, &format!("kill {}", libc::SIGKILL));
        }
    }
    let deadline = Instant::now() + STOP_WAIT;
    while record.anchor_alive() {
        if Instant::now() >= deadline {
            if !force {
                return Err(OciError::State("the container does not stop".into()));
            }
            // SAFETY: kill(2) of the anchor, whose pid and start time were just checked;
            // its monitor stops the VM when the anchor's connection ends.
            unsafe { libc::kill(record.pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    dir.remove()?;
    if let Ok(Some(hooks)) = bundle::load(&record.bundle).map(|b| b.hooks) {
        let mut stopped = record;
        stopped.status = Status::Stopped;
        if let Err(e) = hooks::run(
            "poststop",
            hooks.poststop().as_deref().unwrap_or(&[]),
            &stopped.spec_state(),
        ) {
            eprintln!("hearth oci: warning: {e}");
        }
    }
    Ok(())
}

/// `run`: create, start, and wait (in the foreground) for the container's end.
fn run(globals: &Globals, args: &CreateArgs) -> Result<u8, OciError> {
    let mut child = create(globals, args)?;
    let dir = StateDir::new(&globals.root, &args.id)?;
    if let Err(e) = start(&dir) {
        let _ = child.kill();
        let _ = child.wait();
        let _ = dir.remove();
        return Err(e);
    }
    let status = child
        .wait()
        .map_err(|e| OciError::State(format!("waiting for the container: {e}")))?;
    let _ = delete(&dir, true);
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        _ => 1,
    })
}

fn list(globals: &Globals, json: bool, quiet: bool) {
    let records = state::list(&globals.root);
    if json {
        let all: Vec<serde_json::Value> = records.iter().map(Record::spec_state).collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    if quiet {
        for r in &records {
            println!("{}", r.id);
        }
        return;
    }
    println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED");
    for r in &records {
        let status = r.current_status();
        let pid = if status == Status::Stopped { 0 } else { r.pid };
        println!(
            "{}\t{pid}\t{}\t{}\t{}",
            r.id,
            status.name(),
            r.bundle.display(),
            r.created
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_found_by_its_program_name() {
        assert!(invoked_as_runtime("/usr/local/bin/hearth-oci"));
        assert!(invoked_as_runtime("hearth-oci"));
        assert!(!invoked_as_runtime("/usr/bin/hearth"));
        assert!(!invoked_as_runtime("hearth-oci-x"));
    }

    #[test]
    fn usage_errors_still_reach_the_log() {
        let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let g = loose_globals(&words("--root /r --log /l.json --log-format json bogus x"));
        assert_eq!(g.log, Some("/l.json".into()));
        assert_eq!(g.log_format, LogFormat::Json);
        let g = loose_globals(&words("--log=/l --bad"));
        assert_eq!(g.log, Some("/l".into()));
        assert_eq!(g.log_format, LogFormat::Text);
    }

    #[test]
    fn a_json_log_gets_the_error() {
        let dir = crate::testutil::TempDir::new("oci-main");
        let log_path = dir.path().join("log.json");
        let root = dir.path().join("root");
        let argv: Vec<String> = [
            "--root",
            root.to_str().unwrap(),
            "--log",
            log_path.to_str().unwrap(),
            "--log-format",
            "json",
            "state",
            "nope",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(main(&argv), 1);
        let text = std::fs::read_to_string(&log_path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["level"], "error");
        assert_eq!(line["msg"], "container \"nope\" does not exist");
    }

    #[test]
    fn features_name_the_spec() {
        let f = features();
        assert_eq!(f["ociVersionMax"], SPEC_VERSION);
        assert!(f["hooks"].as_array().unwrap().contains(&"prestart".into()));
    }
}
