//! The monitor: the process `create` leaves behind to hold the container VM (restored
//! from the template, the agent connected). It answers the control socket, runs the
//! container's process on `start`, relays its stdio (its own fds 0/1/2, which `create`
//! inherited from the engine), and tells the anchor (see `anchor`), the process engines
//! wait on, the process's exit status.
//!
//! Control protocol (`ROOT/ID/ctl.sock`, one request per connection, one line each way):
//! `start` and `kill SIGNAL` (a number); the answer is `ok` or `error MESSAGE`. The
//! anchor sends `anchor PID`, gets `ok`, and keeps the connection to read `exit STATUS`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::args::Globals;
use super::state::{self, Record, StateDir, Status};
use super::{bundle, OciError};
use crate::container::run::{self as container_run, FreshVm, NetworkArg, VmOptions};
use crate::container::session::{self, Signals};
use crate::container::ContainerError;

/// The descriptor on which the monitor tells `create` it is ready (`ok`) or why it
/// failed (`error MESSAGE`); `create` reads it to its end.
pub const NOTIFY_FD: i32 = 3;
/// How long a guest gets to end after a forwarded SIGKILL before its VM is killed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Boot timeout of a container VM (a first create makes the template).
const BOOT_TIMEOUT_S: u64 = 600;

/// Where the container is in its life, as the control thread sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Created, waiting for `start`; holds the VMM's pid.
    Created(u32),
    Running(u32),
    Stopped,
}

/// What the control thread asks of the main thread before the process started.
enum Control {
    /// Start the process; the sender hears once the state says running.
    Start(mpsc::Sender<()>),
    Stop(i32),
}

/// The monitor's main: returns only on failure to die the container's death.
pub fn run(globals: &Globals, id: &str) -> u8 {
    let signals = Signals::install();
    // SAFETY: `create` started us with the notify pipe at NOTIFY_FD, which nothing
    // else in this process owns.
    let mut notify = Some(unsafe { File::from_raw_fd(NOTIFY_FD) });
    // The VMM and its helpers must not hold `create`'s pipe open.
    set_cloexec(NOTIFY_FD);
    let dir = match StateDir::new(&globals.root, id) {
        Ok(dir) => dir,
        Err(e) => return fail(&mut notify, globals, None, &e),
    };
    match monitor(globals, &dir, &signals, &mut notify) {
        Ok(status) => exit_with(status),
        Err(e) => fail(&mut notify, globals, Some(&dir), &e),
    }
}

/// Marks a descriptor close-on-exec.
pub(super) fn set_cloexec(fd: i32) {
    // SAFETY: fcntl on a descriptor number; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// While the VM is made, what hearth and the VMM print (template notes, warnings) goes
/// to the monitor's log, not to the container's stderr; dropping this puts the
/// container's stderr back.
struct StderrToLog {
    saved: Option<std::os::fd::OwnedFd>,
}

impl StderrToLog {
    fn redirect(log: &std::path::Path) -> Self {
        let saved = (|| {
            let file = crate::container::vm::append(log).ok()?;
            let saved = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
            // SAFETY: dup2 onto fd 2, which stays open throughout.
            (unsafe { libc::dup2(file.as_raw_fd(), 2) } >= 0).then_some(saved)
        })();
        StderrToLog { saved }
    }
}

impl Drop for StderrToLog {
    fn drop(&mut self) {
        if let Some(saved) = self.saved.take() {
            // SAFETY: dup2 of a descriptor we own onto fd 2.
            unsafe { libc::dup2(saved.as_raw_fd(), 2) };
        }
    }
}

/// Tells the command that started a helper (if it still waits on the notify pipe) why
/// the helper gives up; once that command has returned, the engine's `--log` is told.
pub(super) fn report_failure(notify: &mut Option<File>, globals: &Globals, text: &str) {
    match notify.take() {
        Some(mut pipe) => {
            let _ = writeln!(pipe, "error {text}");
        }
        None => {
            if let Some(path) = &globals.log {
                super::log::append(path, globals.log_format, "error", text);
            }
        }
    }
}

/// Tells `create` (if it still waits) or the logs why the monitor gives up.
fn fail(
    notify: &mut Option<File>,
    globals: &Globals,
    dir: Option<&StateDir>,
    err: &OciError,
) -> u8 {
    let text = crate::error_chain(err);
    report_failure(notify, globals, &text);
    if let Some(dir) = dir {
        super::log::append(
            &dir.monitor_log(),
            super::args::LogFormat::Text,
            "error",
            &text,
        );
        if let Ok(mut record) = dir.load() {
            record.status = Status::Stopped;
            let _ = dir.save(&record);
        }
    }
    // The VM is gone (fresh_vm stops it on every path); the engine sees a failure.
    137
}

fn monitor(
    globals: &Globals,
    dir: &StateDir,
    signals: &Signals,
    notify: &mut Option<File>,
) -> Result<i32, OciError> {
    let record = Arc::new(Mutex::new(dir.load()?));
    let mut quiet = Some(StderrToLog::redirect(&dir.monitor_log()));
    let bundle = bundle::load(&lock(&record).bundle)?;
    let log = |text: &str| {
        super::log::append(
            &dir.monitor_log(),
            super::args::LogFormat::Text,
            "info",
            text,
        );
    };
    for skipped in &bundle.skipped_mounts {
        log(&format!("mount {skipped}"));
    }
    // The bundle's root filesystem is copied into a disk image for the VM: writes go to
    // the container's in-memory overlay and do not reach the bundle.
    let image = dir.path.join("rootfs.ext4");
    crate::image::build_ext4(&bundle.rootfs, &image, 0).map_err(|e| {
        OciError::Vm(format!(
            "cannot copy {} into a disk image: {}",
            bundle.rootfs.display(),
            crate::error_chain(&e)
        ))
    })?;
    let listener = crate::uds::bind(&dir.control_socket())
        .map_err(|e| OciError::State(format!("control socket: {e}")))?;
    let phase = Arc::new(Mutex::new(Phase::Stopped));
    let killed = Arc::new(AtomicBool::new(false));
    let anchor = Arc::new(Mutex::new(None));
    let (to_main, from_control) = mpsc::channel();
    {
        let control = Arc::new(ControlState {
            phase: phase.clone(),
            killed: killed.clone(),
            to_main,
            signals: signals.clone(),
            record: record.clone(),
            state_dir: StateDir {
                path: dir.path.clone(),
            },
            anchor: anchor.clone(),
        });
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                serve_control(stream, &control);
            }
        });
    }
    let network = NetworkArg::default();
    let fresh = FreshVm {
        options: VmOptions {
            kernel: None,
            no_jail: false,
            cpus: bundle.run.cpus,
            boot_timeout: BOOT_TIMEOUT_S,
            no_template: false,
        },
        image_ext4: &image,
        volumes: &[],
        network: &network,
        virtiofsd: None,
    };
    let me = std::process::id() as i32;
    let status =
        container_run::fresh_vm(&fresh, bundle.run.clone(), signals, |stream, spec, vm| {
            update(dir, &record, |r| {
                r.pid = me;
                r.pid_start = state::process_start(me).unwrap_or(0);
                r.status = Status::Created;
                r.vsock = Some(vm.vsock.clone());
            })
            .map_err(|e| ContainerError::Vm(e.to_string()))?;
            *lock(&phase) = Phase::Created(vm.pid);
            drop(quiet.take());
            if let Some(mut pipe) = notify.take() {
                let _ = writeln!(pipe, "ok");
            }
            match from_control.recv() {
                Ok(Control::Start(started)) => {
                    let saved = update(dir, &record, |r| r.status = Status::Running);
                    let _ = started.send(());
                    saved.map_err(|e| ContainerError::Vm(e.to_string()))?;
                    let status = session::run_process(stream, spec, signals);
                    *lock(&phase) = Phase::Stopped;
                    Ok(status?)
                }
                Ok(Control::Stop(sig)) => Ok(128 + sig),
                Err(_) => Err(ContainerError::Vm("the control thread ended".into())),
            }
        });
    *lock(&phase) = Phase::Stopped;
    drop(quiet);
    let status = match status {
        Ok(status) => status,
        // A VM that a SIGKILL tore down ends its session abruptly: that is the kill.
        Err(_) if killed.load(Ordering::SeqCst) => 128 + libc::SIGKILL,
        Err(e) => {
            if notify.is_some() {
                return Err(OciError::Vm(crate::error_chain(&e)));
            }
            // After `start` returned, the container's stderr and the engine's log are
            // where a user looks for why it ended.
            let text = format!("the container failed: {}", crate::error_chain(&e));
            log(&text);
            eprintln!("hearth oci: {text}");
            if let Some(path) = &globals.log {
                super::log::append(path, globals.log_format, "error", &text);
            }
            128 + libc::SIGKILL
        }
    };
    update(dir, &record, |r| {
        r.status = Status::Stopped;
        r.exit_status = Some(status);
    })?;
    // The anchor, the process the engine waits on, ends as the container did.
    if let Some(stream) = lock(&anchor).take() {
        let _ = writeln!(&stream, "exit {status}");
    }
    Ok(status)
}

/// Changes the shared record and saves it.
fn update(
    dir: &StateDir,
    record: &Mutex<Record>,
    change: impl FnOnce(&mut Record),
) -> Result<(), OciError> {
    let mut record = lock(record);
    change(&mut record);
    dir.save(&record)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Signals whose default action does not end a process: sent to a created container
/// (no process yet), they do nothing, as they would to runc's waiting init.
fn harmless(sig: i32) -> bool {
    [
        libc::SIGCHLD,
        libc::SIGCONT,
        libc::SIGURG,
        libc::SIGWINCH,
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ]
    .contains(&sig)
}

/// What the control thread shares with the main thread.
struct ControlState {
    phase: Arc<Mutex<Phase>>,
    /// Set when a SIGKILL went to the running process: a session that then ends
    /// abruptly (the VM killed) is that kill, not a failure.
    killed: Arc<AtomicBool>,
    to_main: mpsc::Sender<Control>,
    signals: Signals,
    record: Arc<Mutex<Record>>,
    state_dir: StateDir,
    /// The connection of the anchor (see `anchor`), which is told the exit status.
    anchor: Arc<Mutex<Option<UnixStream>>>,
}

fn serve_control(stream: UnixStream, control: &Arc<ControlState>) {
    let mut line = String::new();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    if let Some(pid) = line.trim().strip_prefix("anchor ") {
        let answer = match attach_anchor(pid, &stream, control) {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error {e}"),
        };
        let _ = writeln!(&stream, "{answer}");
        return;
    }
    let answer = match handle(line.trim(), control) {
        Ok(()) => "ok".to_string(),
        Err(text) => format!("error {text}"),
    };
    let _ = writeln!(&stream, "{answer}");
}

fn handle(request: &str, control: &ControlState) -> Result<(), String> {
    let to_main = &control.to_main;
    let mut phase = lock(&control.phase);
    let words: Vec<&str> = request.split_whitespace().collect();
    match (words.as_slice(), *phase) {
        (["start"], Phase::Created(vmm)) => {
            *phase = Phase::Running(vmm);
            let (started, wait) = mpsc::channel();
            to_main
                .send(Control::Start(started))
                .map_err(|_| "the monitor is stopping".to_string())?;
            drop(phase);
            wait.recv_timeout(Duration::from_secs(10))
                .map_err(|_| "the monitor did not start the process".to_string())
        }
        (["start"], Phase::Running(_)) => Err("container is already running".into()),
        (["kill", sig], current) => {
            let sig: i32 = sig.parse().map_err(|_| format!("bad signal {sig:?}"))?;
            match current {
                Phase::Created(_) if harmless(sig) => Ok(()),
                Phase::Created(_) => {
                    *phase = Phase::Stopped;
                    to_main
                        .send(Control::Stop(sig))
                        .map_err(|_| "the monitor is stopping".to_string())
                }
                Phase::Running(vmm) => {
                    control.signals.forward(sig);
                    if sig == libc::SIGKILL {
                        control.killed.store(true, Ordering::SeqCst);
                        kill_vm_later(vmm);
                    }
                    Ok(())
                }
                Phase::Stopped => Err("container not running".into()),
            }
        }
        (_, Phase::Stopped) => Err("container not running".into()),
        _ => Err(format!("unknown request {request:?}")),
    }
}

/// Records the anchor `pid` as the container's pid and keeps its connection. An anchor
/// that goes away (killed by the engine, say) takes the container with it: nothing
/// would report its end.
fn attach_anchor(
    pid: &str,
    stream: &UnixStream,
    control: &Arc<ControlState>,
) -> Result<(), String> {
    let pid: i32 = pid.parse().map_err(|_| format!("bad pid {pid:?}"))?;
    let start = state::process_start(pid).ok_or_else(|| format!("no process {pid}"))?;
    let keep = stream.try_clone().map_err(|e| e.to_string())?;
    let watch = stream.try_clone().map_err(|e| e.to_string())?;
    update(&control.state_dir, &control.record, |r| {
        r.pid = pid;
        r.pid_start = start;
    })
    .map_err(|e| e.to_string())?;
    *lock(&control.anchor) = Some(keep);
    let control = control.clone();
    std::thread::spawn(move || {
        let _ = watch.set_read_timeout(None);
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &watch, &mut rest);
        if *lock(&control.phase) != Phase::Stopped {
            let _ = handle(&format!("kill {}", libc::SIGKILL), &control);
        }
    });
    Ok(())
}

/// A guest that does not end after SIGKILL (a hung kernel) has its VM killed, as a
/// SIGKILL to runc's init would end the container at once.
fn kill_vm_later(vmm: u32) {
    std::thread::spawn(move || {
        std::thread::sleep(KILL_GRACE);
        // SAFETY: kill(2) on the VMM, our child, which is not reaped before fresh_vm
        // returns (and then the process exits): the pid cannot have been reused.
        unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
    });
}

/// Exits the way the container's process ended: status 128+N from a signal N that ends
/// processes is re-raised, so the engine's wait sees the signal, like runc's init.
pub(super) fn exit_with(status: i32) -> ! {
    let sig = status - 128;
    if (1..=31).contains(&sig) && !harmless(sig) && sig != libc::SIGSTOP {
        // SAFETY: resetting a disposition, unblocking signals in this thread and
        // raising: none touches memory we own.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            // No core dump of the monitor for a container's SIGQUIT or SIGSEGV.
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::raise(sig);
        }
    }
    std::process::exit(status & 0xff)
}

/// Sends one control request to the monitor of `dir`.
pub fn request(dir: &StateDir, line: &str) -> Result<(), OciError> {
    let path: PathBuf = dir.control_socket();
    let stream = crate::uds::connect(&path)
        .map_err(|e| OciError::State(format!("cannot reach the container's monitor: {e}")))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    writeln!(&stream, "{line}")
        .map_err(|e| OciError::State(format!("cannot reach the container's monitor: {e}")))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| OciError::State(format!("no answer from the container's monitor: {e}")))?;
    match answer.trim_end().split_once(' ') {
        _ if answer.trim_end() == "ok" => Ok(()),
        Some(("error", text)) => Err(OciError::State(text.to_string())),
        _ => Err(OciError::State(format!(
            "the container's monitor answered {:?}",
            answer.trim_end()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn control_state(start: Phase, state_dir: &Path) -> (ControlState, mpsc::Receiver<Control>) {
        let (to_main, rx) = mpsc::channel();
        let control = ControlState {
            phase: Arc::new(Mutex::new(start)),
            killed: Arc::new(AtomicBool::new(false)),
            to_main,
            signals: Signals::default(),
            record: Arc::new(Mutex::new(Record {
                id: "c".into(),
                pid: 0,
                pid_start: 0,
                bundle: "/b".into(),
                created: String::new(),
                status: Status::Created,
                annotations: Default::default(),
                exit_status: None,
                vsock: None,
            })),
            state_dir: StateDir {
                path: state_dir.to_path_buf(),
            },
            anchor: Arc::new(Mutex::new(None)),
        };
        (control, rx)
    }

    fn answer(request: &str, start: Phase) -> (Result<(), String>, Phase, Option<i32>) {
        let (control, rx) = control_state(start, Path::new("/nonexistent"));
        // The main thread's side: acknowledge a start.
        let main = std::thread::spawn(move || {
            rx.recv_timeout(Duration::from_secs(1))
                .ok()
                .map(|c| match c {
                    Control::Start(started) => {
                        started.send(()).unwrap();
                        0
                    }
                    Control::Stop(sig) => sig,
                })
        });
        let phase = control.phase.clone();
        let result = handle(request, &control);
        drop(control);
        let sent = main.join().unwrap();
        let end = *lock(&phase);
        (result, end, sent)
    }

    #[test]
    fn control_requests_follow_the_lifecycle() {
        assert_eq!(
            answer("start", Phase::Created(5)),
            (Ok(()), Phase::Running(5), Some(0))
        );
        assert_eq!(
            answer("start", Phase::Running(5)).0,
            Err("container is already running".into())
        );
        assert_eq!(
            answer("start", Phase::Stopped).0,
            Err("container not running".into())
        );
        assert_eq!(
            answer("kill 15", Phase::Created(5)),
            (Ok(()), Phase::Stopped, Some(15))
        );
        assert_eq!(
            answer("kill 28", Phase::Created(5)),
            (Ok(()), Phase::Created(5), None)
        );
        assert_eq!(
            answer("kill 15", Phase::Running(5)),
            (Ok(()), Phase::Running(5), None)
        );
        assert_eq!(
            answer("kill 15", Phase::Stopped).0,
            Err("container not running".into())
        );
        assert!(answer("kill x", Phase::Running(5)).0.is_err());
        assert!(answer("frob", Phase::Running(5))
            .0
            .unwrap_err()
            .contains("unknown request"));
    }

    #[test]
    fn an_anchor_becomes_the_pid_and_its_end_stops_the_container() {
        let dir = crate::testutil::TempDir::new("oci-anchor");
        let (control, rx) = control_state(Phase::Created(1), dir.path());
        let control = Arc::new(control);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let me = std::process::id().to_string();
        assert!(attach_anchor("x", &ours, &control).is_err());
        attach_anchor(&me, &ours, &control).unwrap();
        let saved = StateDir {
            path: dir.path().to_path_buf(),
        }
        .load()
        .unwrap();
        assert_eq!(saved.pid.to_string(), me);
        assert_eq!(saved.pid_start, state::process_start(saved.pid).unwrap());
        assert!(lock(&control.anchor).is_some());
        // The anchor goes away: the created container is stopped with SIGKILL.
        drop(theirs);
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Control::Stop(sig)) => assert_eq!(sig, libc::SIGKILL),
            _ => panic!("the container was not stopped"),
        }
    }
}
