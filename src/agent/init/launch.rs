//! Starting a session's process: its stdio (pipes, or a pty), the [`Plan`] for the
//! sandbox role, the fork/exec of the agent binary as that role (or the hand-off of the
//! descriptors to one [`Launcher::prestart`] started earlier), and the sync pipe that
//! says whether setup worked. The fork happens in the multi-threaded agent, so the
//! child does nothing but move descriptors into place and exec (all prepared before).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Mutex;

use super::handoff;
use super::reaper::Reaper;
use super::sandbox::{Plan, Target, PLAN_FD, SANDBOX_ARG, STATUS_FD, SYNC_FD, WAIT_ARG};
use super::sys;
use super::timing::{self, Marks};

/// How the agent re-executes itself as the sandbox.
pub struct Launcher {
    exe: CString,
    env: Vec<CString>,
    /// A sandbox started ahead of time, waiting for its descriptors (see [`handoff`]);
    /// the next launch takes it.
    prestarted: Mutex<Option<Prestarted>>,
}

/// A waiting sandbox: registered with the reaper when it was spawned.
struct Prestarted {
    pid: i32,
    exit: Receiver<i32>,
    sock: OwnedFd,
}

impl Launcher {
    /// The running agent binary (`/proc/self/exe`), with an empty environment.
    pub fn current() -> Self {
        Self {
            exe: c"/proc/self/exe".to_owned(),
            env: Vec::new(),
            prestarted: Mutex::new(None),
        }
    }

    /// Starts a sandbox process that waits for its descriptors, for the next [`launch`]
    /// to hand them over instead of spawning one. A container VM does this before it
    /// connects to the host, so that a template snapshot already holds the process.
    /// It runs in the same session, with the same signal state, directory and (empty)
    /// environment as one spawned at launch: the same [`spawn_child`] starts it.
    pub fn prestart(&self, reaper: &Reaper) -> Result<(), LaunchError> {
        let (ours, theirs) = handoff::socket_pair().map_err(LaunchError::Prestart)?;
        let moves = [(theirs.as_raw_fd(), handoff::HANDOFF_FD)];
        let wait = sys::cstr(WAIT_ARG).map_err(LaunchError::Plan)?;
        let (pid, exit) = self.spawn(reaper, &moves, Some(&wait))?;
        drop(theirs);
        let mut slot = self.prestarted.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(Prestarted {
            pid,
            exit,
            sock: ours,
        });
        Ok(())
    }

    /// The pre-started sandbox, if there is one and it is still waiting.
    fn take_prestarted(&self) -> Option<Prestarted> {
        let taken = self
            .prestarted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        match taken.exit.try_recv() {
            Err(std::sync::mpsc::TryRecvError::Empty) => Some(taken),
            Ok(raw) => {
                log::warn!(
                    "the pre-started sandbox (pid {}) ended ({}); starting a new one",
                    taken.pid,
                    sys::describe_status(raw)
                );
                None
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
        }
    }

    /// Pid of the waiting sandbox, if any (tests check which process ran).
    #[cfg(test)]
    pub fn prestarted_pid(&self) -> Option<i32> {
        let slot = self.prestarted.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|p| p.pid)
    }

    /// Spawns `hearth-init sandbox [extra]` with `moves` in place.
    fn spawn(
        &self,
        reaper: &Reaper,
        moves: &[(RawFd, RawFd)],
        extra: Option<&CString>,
    ) -> Result<(i32, Receiver<i32>), LaunchError> {
        let arg0 = c"hearth-init";
        let arg1 = sys::cstr(SANDBOX_ARG).map_err(LaunchError::Plan)?;
        let mut argv = vec![arg0.as_ptr(), arg1.as_ptr()];
        argv.extend(extra.map(|a| a.as_ptr()));
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        reaper
            .spawn(|| spawn_child(moves, self.exe.as_ptr(), &argv, &envp))
            .map_err(LaunchError::Fork)
    }

    /// The unit-test binary, whose constructor turns into the sandbox (see `sandbox`).
    #[cfg(test)]
    pub fn for_tests() -> Self {
        let exe = std::env::current_exe().expect("test binary path");
        Self {
            exe: sys::cstr(exe).expect("test binary path"),
            env: vec![sys::cstr(format!("{}=1", super::sandbox::TEST_SANDBOX_ENV)).unwrap()],
            prestarted: Mutex::new(None),
        }
    }
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot create the process's {what}")]
    Stdio {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot pass the sandbox plan")]
    Plan(#[source] io::Error),
    #[error("cannot fork")]
    Fork(#[source] io::Error),
    #[error("cannot pre-start the sandbox")]
    Prestart(#[source] handoff::HandoffError),
    #[error("cannot read the sandbox's status")]
    Sync(#[source] io::Error),
}

/// The agent's ends of the process's stdio.
pub struct ParentIo {
    /// Where `Stdin` data goes (pipe write end or the pty master); `None` when the process
    /// reads /dev/null.
    pub stdin: Option<File>,
    /// Pipe read end, or the pty master (stdout and stderr merged).
    pub stdout: File,
    pub stderr: Option<File>,
    /// The pty master, for `Resize`.
    pub pty: Option<File>,
}

/// A process whose setup worked.
pub struct Running {
    /// The process the agent forked (the sandbox supervisor, or the program itself).
    pub pid: i32,
    /// The process to signal: the program itself (container PID 1 for sandboxes).
    pub target: i32,
    /// Raw wait status of `pid`.
    pub exit: Receiver<i32>,
    /// A container alone in its VM: the pipe its exit status (4 bytes, little endian)
    /// comes through before its supervisor has ended (which it never does).
    pub status: Option<File>,
    pub io: ParentIo,
}

/// The result of [`launch`].
pub enum Launch {
    Running(Running),
    /// Setup failed with this message; `exit` still reports the sandbox's end.
    Failed {
        message: String,
        pid: i32,
        exit: Receiver<i32>,
    },
}

/// What the sandbox said on the sync pipe.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub pid: Option<i32>,
    pub ok: bool,
    pub error: Option<String>,
    /// Step marks of the sandbox (see [`timing`]).
    pub marks: Vec<(u64, String)>,
}

/// Parses the sync pipe's lines (`pid N`, `ok`, `error TEXT`, `mark US STEP`) in any order.
pub fn parse_sync(text: &str) -> SyncReport {
    let mut report = SyncReport::default();
    for line in text.lines() {
        if let Some(pid) = line.strip_prefix("pid ") {
            report.pid = pid.trim().parse().ok();
        } else if line == "ok" {
            report.ok = true;
        } else if let Some(err) = line.strip_prefix("error ") {
            report.error.get_or_insert_with(|| err.to_string());
        } else if let Some(mark) = timing::parse_mark_line(line) {
            report.marks.push(mark);
        }
    }
    report
}

fn stdio_err(what: &'static str) -> impl FnOnce(io::Error) -> LaunchError {
    move |source| LaunchError::Stdio { what, source }
}

/// Opens a pty pair (master, slave), both close-on-exec, sized `rows`×`cols`.
pub fn open_pty(size: Option<(u16, u16)>) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = sys::open(Path::new("/dev/ptmx"), libc::O_RDWR | libc::O_NOCTTY)?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let fd = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let slave = if fd >= 0 {
        // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    } else {
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes the pty number into the valid pointer.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) } < 0 {
            return Err(io::Error::last_os_error());
        }
        sys::open(
            Path::new(&format!("/dev/pts/{n}")),
            libc::O_RDWR | libc::O_NOCTTY,
        )?
    };
    if let Some((rows, cols)) = size {
        set_winsize(master.as_raw_fd(), rows, cols)?;
    }
    Ok((master, slave))
}

/// TIOCSWINSZ on a pty master (the kernel then signals SIGWINCH to the foreground group).
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the valid pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts `plan` through the sandbox role and waits until it has either failed or is
/// about to exec the program. The steps go into `marks`, the sandbox's too when
/// `plan.marks` asks for them.
pub fn launch(
    reaper: &Reaper,
    launcher: &Launcher,
    plan: &Plan,
    marks: &Marks,
) -> Result<Launch, LaunchError> {
    let spec = &plan.spec;
    // Child ends (stdin, stdout, stderr) and the agent's ends.
    let (child_in, child_out, child_err, io) = if spec.tty {
        let (master, slave) = open_pty(spec.term_size).map_err(stdio_err("terminal"))?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(stdio_err("terminal"));
        let (in_, err) = (dup(&slave)?, dup(&slave)?);
        let master_in = spec.stdin.then(|| dup(&master)).transpose()?;
        let pty = Some(File::from(dup(&master)?));
        (
            in_,
            slave,
            err,
            ParentIo {
                stdin: master_in.map(File::from),
                stdout: File::from(master),
                stderr: None,
                pty,
            },
        )
    } else {
        let (stdin_r, stdin_w) = if spec.stdin {
            let (r, w) = sys::pipe().map_err(stdio_err("stdin pipe"))?;
            (r, Some(w))
        } else {
            (
                sys::open(Path::new("/dev/null"), libc::O_RDONLY)
                    .map_err(stdio_err("stdin (/dev/null)"))?,
                None,
            )
        };
        let (out_r, out_w) = sys::pipe().map_err(stdio_err("stdout pipe"))?;
        let (err_r, err_w) = sys::pipe().map_err(stdio_err("stderr pipe"))?;
        (
            stdin_r,
            out_w,
            err_w,
            ParentIo {
                stdin: stdin_w.map(File::from),
                stdout: File::from(out_r),
                stderr: Some(File::from(err_r)),
                pty: None,
            },
        )
    };

    marks.mark("launch: stdio ready");
    let plan_fd = write_plan(plan).map_err(LaunchError::Plan)?;
    let (sync_r, sync_w) = sys::pipe().map_err(LaunchError::Sync)?;
    let late = if plan.marks {
        let (r, w) = sys::pipe().map_err(LaunchError::Sync)?;
        marks.set_late(File::from(r));
        Some(w)
    } else {
        None
    };
    let early_status = match plan.target {
        Target::Sandbox { alone: true, .. } => Some(sys::pipe().map_err(LaunchError::Sync)?),
        _ => None,
    };
    marks.mark("launch: plan written");

    // Everything the child needs is prepared here.
    let mut moves = vec![
        (child_in.as_raw_fd(), 0),
        (child_out.as_raw_fd(), 1),
        (child_err.as_raw_fd(), 2),
        (plan_fd.as_raw_fd(), PLAN_FD),
        (sync_w.as_raw_fd(), SYNC_FD),
    ];
    if let Some(w) = &late {
        moves.push((w.as_raw_fd(), timing::LATE_MARKS_FD));
    }
    if let Some((_, w)) = &early_status {
        moves.push((w.as_raw_fd(), STATUS_FD));
    }
    let handed = launcher.take_prestarted().and_then(|p| {
        match handoff::send(&p.sock, &moves) {
            Ok(()) => Some((p.pid, p.exit)),
            Err(e) => {
                // Dropping our end lets the waiting process see the end and exit.
                log::warn!("pre-started sandbox: {}", crate::error_chain(&e));
                None
            }
        }
    });
    let (pid, exit) = match handed {
        Some(started) => {
            marks.mark("launch: sandbox handed its descriptors");
            started
        }
        None => {
            let started = launcher.spawn(reaper, &moves, None)?;
            marks.mark("launch: sandbox spawned (posix_spawn returned)");
            started
        }
    };
    let status = early_status.map(|(r, w)| {
        drop(w);
        File::from(r)
    });
    drop((child_in, child_out, child_err, plan_fd, sync_w, late));

    let mut text = Vec::new();
    File::from(sync_r)
        .take(64 * 1024)
        .read_to_end(&mut text)
        .map_err(LaunchError::Sync)?;
    let report = parse_sync(&String::from_utf8_lossy(&text));
    marks.mark("launch: sync pipe closed (setup over)");
    for (us, step) in &report.marks {
        marks.at(*us, format!("sandbox: {step}"));
    }
    if report.ok && report.error.is_none() {
        return Ok(Launch::Running(Running {
            pid,
            target: report.pid.unwrap_or(pid),
            exit,
            status,
            io,
        }));
    }
    let message = match report.error {
        Some(message) => message,
        None => silent_failure(&io, &exit),
    };
    Ok(Launch::Failed { message, pid, exit })
}

/// Describes a sandbox that closed the sync pipe without a word: what it printed on
/// stderr (a panic, say) and how it ended, so that the rare crash can be told apart.
fn silent_failure(io: &ParentIo, exit: &Receiver<i32>) -> String {
    let mut message = String::from("the sandbox ended before starting the process");
    // The sandbox's end is near (the sync pipe closed): wait for it, but not forever.
    let status = exit.recv_timeout(std::time::Duration::from_secs(5)).ok();
    let stderr = io.stderr.as_ref().unwrap_or(&io.stdout);
    if let Ok(clone) = stderr.try_clone() {
        let _ = sys::set_nonblocking(clone.as_raw_fd(), true);
        let mut buf = Vec::new();
        let _ = clone.take(1024).read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if !text.is_empty() {
            message.push_str(&format!(": {text}"));
        }
    }
    if let Some(raw) = status {
        message.push_str(&format!(" ({})", sys::describe_status(raw)));
    }
    message
}

/// Starts the sandbox process with `posix_spawn`: descriptors moved into place, a session
/// of its own, exec.
///
/// glibc's posix_spawn clones with CLONE_VM | CLONE_VFORK, so the agent's address space
/// is never copy-on-write shared with the child. That matters here: PID 1 is
/// multi-threaded, and after a plain fork() on a nested-PVM host the agent's other
/// threads were seen (rarely) to find their stacks corrupted.
fn spawn_child(
    moves: &[(RawFd, RawFd)],
    exe: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> io::Result<i32> {
    /// Sources are lifted here first, so no dup2 onto a target clobbers a later source.
    const LIFT_BASE: RawFd = 200;
    // SAFETY: posix_spawn_file_actions_t and posix_spawnattr_t are plain C structs that
    // the init functions fill in; every pointer passed is valid for the call, argv and
    // envp are NULL-terminated arrays of NUL-terminated strings that outlive the call,
    // and both objects are destroyed before returning.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        if libc::posix_spawn_file_actions_init(&mut actions) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::posix_spawnattr_init(&mut attr) != 0 {
            libc::posix_spawn_file_actions_destroy(&mut actions);
            return Err(io::Error::last_os_error());
        }
        let mut rc = 0;
        for (i, (src, _)) in moves.iter().enumerate() {
            rc |=
                libc::posix_spawn_file_actions_adddup2(&mut actions, *src, LIFT_BASE + i as RawFd);
        }
        for (i, (_, dst)) in moves.iter().enumerate() {
            rc |=
                libc::posix_spawn_file_actions_adddup2(&mut actions, LIFT_BASE + i as RawFd, *dst);
            rc |= libc::posix_spawn_file_actions_addclose(&mut actions, LIFT_BASE + i as RawFd);
        }
        rc |= libc::posix_spawnattr_setflags(&mut attr, libc::POSIX_SPAWN_SETSID as libc::c_short);
        let mut pid: libc::pid_t = 0;
        if rc == 0 {
            rc = libc::posix_spawn(
                &mut pid,
                exe,
                &actions,
                &attr,
                argv.as_ptr() as *const *mut libc::c_char,
                envp.as_ptr() as *const *mut libc::c_char,
            );
        }
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(pid)
    }
}

fn write_plan(plan: &Plan) -> io::Result<OwnedFd> {
    let json = serde_json::to_vec(plan).map_err(io::Error::other)?;
    // SAFETY: the name is a valid C string; MFD_CLOEXEC keeps it out of other children.
    let fd = unsafe { libc::memfd_create(c"hearth-plan".as_ptr(), libc::MFD_CLOEXEC) };
    let mut file = if fd >= 0 {
        // SAFETY: memfd_create returned a fresh descriptor.
        unsafe { File::from_raw_fd(fd) }
    } else {
        // No memfd support: an unlinked file in /tmp does the same.
        let path = format!("/tmp/.hearth-plan-{}-{:p}", sys::getpid(), plan);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let _ = std::fs::remove_file(&path);
        file
    };
    file.write_all(&json)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_lines_parse_in_any_order() {
        assert_eq!(
            parse_sync("ok\npid 42\n"),
            SyncReport {
                pid: Some(42),
                ok: true,
                error: None,
                marks: Vec::new(),
            }
        );
        let r = parse_sync("mark 10 plan read\npid 3\nmark 12 forked\nok\n");
        assert_eq!(
            r.marks,
            vec![(10, "plan read".to_string()), (12, "forked".to_string())]
        );
        let r = parse_sync("pid 7\nerror cannot mount: EBUSY\n");
        assert_eq!(r.error.as_deref(), Some("cannot mount: EBUSY"));
        assert!(!r.ok);
        assert_eq!(parse_sync(""), SyncReport::default());
    }

    #[test]
    fn pty_pairs_open() {
        let Ok((master, slave)) = open_pty(Some((30, 100))) else {
            eprintln!("note: no usable /dev/ptmx here; skipping");
            return;
        };
        // SAFETY: isatty only inspects the descriptor.
        assert_eq!(unsafe { libc::isatty(slave.as_raw_fd()) }, 1);
        let mut ws: libc::winsize = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a winsize into the valid pointer.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!((ws.ws_row, ws.ws_col), (30, 100));
    }
}
