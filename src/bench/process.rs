//! Running one benchmark process: spawn, watch its stderr for a boot marker, reap it
//! with `wait4` for its exit status and peak RSS, and time all of it with `Instant`.
//!
//! Each child leads its own process group, so a timeout kills everything it started.
//!
//! **Peak RSS** is `ru_maxrss` from `wait4` on the direct child: the largest resident set
//! of the child *or of any descendant it reaped itself* (Linux folds the maxrss of reaped
//! children into their parent's). It is the largest single process of the tree, not the
//! sum of processes alive at once, and misses descendants reaped by someone else (e.g.
//! reparented to init).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How much of each output stream is kept for error messages.
const TAIL_BYTES: usize = 8192;
/// How long to wait for a stream's end-of-file once the child has exited (longer only if
/// a grandchild still holds the pipe).
const EOF_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wait4 failed")]
    Wait(#[source] std::io::Error),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// A line on stderr containing this marks boot complete (hearth's `--boot-timer`).
    pub boot_marker: Option<&'static str>,
    /// A line on stdout that is exactly this (surrounding white space aside) marks the
    /// guest's program running.
    pub output_line: Option<&'static str>,
}

impl Invocation {
    pub fn new(program: impl Into<OsString>) -> Self {
        Invocation {
            program: program.into(),
            args: Vec::new(),
            boot_marker: None,
            output_line: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn boot_marker(mut self, marker: &'static str) -> Self {
        self.boot_marker = Some(marker);
        self
    }

    pub fn output_line(mut self, line: &'static str) -> Self {
        self.output_line = Some(line);
        self
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How a reaped process ended.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    pub status: ExitStatus,
    /// From spawn to reaping.
    pub wall: Duration,
    /// `ru_maxrss` in KiB (see the module documentation).
    pub max_rss_kib: u64,
    /// Killed by us after a timeout.
    pub timed_out: bool,
}

/// Which lines of a stream mark an event.
#[derive(Clone, Copy, Debug)]
enum Marker {
    /// A line containing this.
    Contains(&'static str),
    /// A line that is this, surrounding white space (a console's `\r`) aside.
    Line(&'static str),
}

impl Marker {
    fn matches(self, line: &[u8]) -> bool {
        match self {
            Marker::Contains(text) => contains(line, text.as_bytes()),
            Marker::Line(text) => line.trim_ascii() == text.as_bytes(),
        }
    }
}

/// A stream read on its own thread, keeping its last [`TAIL_BYTES`], the moment its first
/// byte arrived and the moment a line matching the marker arrived.
struct StreamWatch {
    tail: Arc<Mutex<Vec<u8>>>,
    first_byte_at: Arc<Mutex<Option<Instant>>>,
    marker_at: Arc<Mutex<Option<Instant>>>,
    done: Receiver<()>,
}

impl StreamWatch {
    fn start(source: impl Read + Send + 'static, marker: Option<Marker>) -> Self {
        let tail = Arc::new(Mutex::new(Vec::new()));
        let first_byte_at = Arc::new(Mutex::new(None));
        let marker_at = Arc::new(Mutex::new(None));
        let (tx, done) = mpsc::channel();
        let (sink, first, seen) = (
            Arc::clone(&tail),
            Arc::clone(&first_byte_at),
            Arc::clone(&marker_at),
        );
        thread::spawn(move || {
            let mut reader = BufReader::new(source);
            let mut line = Vec::new();
            let mut line_at = Instant::now();
            let check = |line: &[u8], at: Instant| {
                if let Some(marker) = marker {
                    let mut seen = lock(&seen);
                    if seen.is_none() && marker.matches(line) {
                        *seen = Some(at);
                    }
                }
            };
            loop {
                // Chunk by chunk rather than line by line, so that the first byte is
                // timed when it arrives, not when its line is complete.
                let chunk = match reader.fill_buf() {
                    Ok([]) => break,
                    Ok(chunk) => chunk,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // A read error ends the watch like end-of-file.
                    Err(_) => break,
                };
                line_at = Instant::now();
                lock(&first).get_or_insert(line_at);
                let (used, complete) = match chunk.iter().position(|&b| b == b'\n') {
                    Some(newline) => (newline + 1, true),
                    None => (chunk.len(), false),
                };
                line.extend_from_slice(&chunk[..used]);
                reader.consume(used);
                // A line without an end is kept whole only up to the tail's size.
                if !complete && line.len() < TAIL_BYTES {
                    continue;
                }
                if complete {
                    check(&line, line_at);
                }
                push_tail(&mut lock(&sink), &line);
                line.clear();
            }
            // The last line may end without a newline.
            check(&line, line_at);
            push_tail(&mut lock(&sink), &line);
            let _ = tx.send(());
        });
        StreamWatch {
            tail,
            first_byte_at,
            marker_at,
            done,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.tail)).into_owned()
    }
}

/// Appends `bytes` to `tail`, keeping its last [`TAIL_BYTES`].
fn push_tail(tail: &mut Vec<u8>, bytes: &[u8]) {
    tail.extend_from_slice(bytes);
    if tail.len() > TAIL_BYTES {
        let cut = tail.len() - TAIL_BYTES;
        tail.drain(..cut);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// A started child process.
pub struct Spawned {
    pid: libc::pid_t,
    started: Instant,
    stdout: StreamWatch,
    stderr: StreamWatch,
    reaped: Receiver<Result<(i32, libc::rusage, Instant), std::io::Error>>,
    exit: Option<Exit>,
}

impl Spawned {
    /// Starts `inv` with stdin closed and stdout and stderr watched.
    pub fn start(inv: &Invocation) -> Result<Self, ProcessError> {
        let mut cmd = Command::new(&inv.program);
        cmd.args(&inv.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: inv.program.to_string_lossy().into_owned(),
            source,
        })?;
        let pid = child.id() as libc::pid_t;
        // Both streams were piped just above.
        let stdout = StreamWatch::start(
            child.stdout.take().expect("piped stdout"),
            inv.output_line.map(Marker::Line),
        );
        let stderr = StreamWatch::start(
            child.stderr.take().expect("piped stderr"),
            inv.boot_marker.map(Marker::Contains),
        );
        // The child is reaped here with wait4, never through `child`, which is dropped
        // without waiting.
        drop(child);
        let (tx, reaped) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(wait4(pid));
        });
        Ok(Spawned {
            pid,
            started,
            stdout,
            stderr,
            reaped,
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Just before the child was spawned: what the other times count from.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the first byte came on stdout, if one did.
    pub fn first_output_at(&self) -> Option<Instant> {
        *lock(&self.stdout.first_byte_at)
    }

    /// When the invocation's `output_line` came on stdout, if it did.
    pub fn output_line_at(&self) -> Option<Instant> {
        *lock(&self.stdout.marker_at)
    }

    /// When the boot marker came on stderr, if it did.
    pub fn boot_at(&self) -> Option<Instant> {
        *lock(&self.stderr.marker_at)
    }

    /// From spawn to the boot marker on stderr, if it came.
    pub fn boot_time(&self) -> Option<Duration> {
        lock(&self.stderr.marker_at).map(|t| t.duration_since(self.started))
    }

    /// Sends `signal` to the child's process group, unless it has been reaped.
    pub fn signal_group(&self, signal: i32) {
        if self.exit.is_none() {
            // SAFETY: kill only sends a signal; the group is the one our still-unreaped
            // child leads, so its id cannot have been reused.
            unsafe { libc::kill(-self.pid, signal) };
        }
    }

    /// Waits up to `timeout` for the child to end, leaving it running if it does not.
    pub fn poll(&mut self, timeout: Duration) -> Result<Option<Exit>, ProcessError> {
        if let Some(exit) = self.exit {
            return Ok(Some(exit));
        }
        match self.reaped.recv_timeout(timeout) {
            Ok(result) => self.reaped(result, false).map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(ProcessError::Wait(std::io::Error::other(
                "waiter thread died",
            ))),
        }
    }

    /// Waits up to `timeout` for the child to end; then kills its process group and reaps
    /// it (`timed_out` set).
    pub fn wait(&mut self, timeout: Duration) -> Result<Exit, ProcessError> {
        if let Some(exit) = self.poll(timeout)? {
            return Ok(exit);
        }
        self.signal_group(libc::SIGKILL);
        let result = self
            .reaped
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("waiter thread died")));
        self.reaped(result, true)
    }

    fn reaped(
        &mut self,
        result: Result<(i32, libc::rusage, Instant), std::io::Error>,
        timed_out: bool,
    ) -> Result<Exit, ProcessError> {
        let (raw, usage, at) = result.map_err(ProcessError::Wait)?;
        // Whatever the child started and left in its group (a runtime's container) goes
        // with it.
        // SAFETY: kill only sends a signal. The group id was our child's pid; a group
        // outlives its leader while members remain, so the id is not reused before they
        // are all gone, and a stale id makes kill fail with ESRCH, harmlessly.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        let exit = Exit {
            status: ExitStatus::from_raw(raw),
            wall: at.duration_since(self.started),
            max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            timed_out,
        };
        self.exit = Some(exit);
        Ok(exit)
    }

    /// Waits (at most [`EOF_GRACE`]) until the child's stdout and stderr have been read to
    /// the end: a child that has exited may still have output, a boot marker among it, in
    /// the pipes.
    fn read_to_end(&self) {
        let deadline = Instant::now() + EOF_GRACE;
        for watch in [&self.stdout, &self.stderr] {
            let _ = watch
                .done
                .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
    }

    /// The last lines the child wrote on stderr, then stdout (after waiting briefly for
    /// them to close), for error messages.
    pub fn output_tail(&self, lines: usize) -> String {
        self.read_to_end();
        let pick = |text: String| {
            let kept: Vec<&str> = text
                .lines()
                .map(str::trim_end)
                .filter(|l| !l.is_empty())
                .collect();
            kept[kept.len().saturating_sub(lines)..].join(" | ")
        };
        let err = pick(self.stderr.text());
        if err.is_empty() {
            pick(self.stdout.text())
        } else {
            err
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.wait(Duration::ZERO);
        }
    }
}

/// Blocks until `pid` ends; returns its raw wait status, its resource usage and when.
fn wait4(pid: libc::pid_t) -> Result<(i32, libc::rusage, Instant), std::io::Error> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our own child; status and usage are valid for writes.
        let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if ret == pid {
            return Ok((status, usage, Instant::now()));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One measured run of a benchmark case.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub wall: Duration,
    pub boot: Option<Duration>,
    pub max_rss_kib: u64,
}

/// Runs `inv` to its end (at most `timeout`) and checks it exited with `expected`.
/// Failure messages name the status and the last lines the process printed.
pub fn measure(inv: &Invocation, expected: i32, timeout: Duration) -> Result<Measured, String> {
    let mut child = Spawned::start(inv).map_err(|e| crate::error_chain(&e))?;
    let exit = child.wait(timeout).map_err(|e| crate::error_chain(&e))?;
    let describe = |what: String| {
        let tail = child.output_tail(3);
        if tail.is_empty() {
            what
        } else {
            format!("{what}: {tail}")
        }
    };
    if exit.timed_out {
        return Err(describe(format!(
            "did not finish within {} s; killed",
            timeout.as_secs()
        )));
    }
    if exit.status.code() != Some(expected) {
        return Err(describe(format!(
            "{} (expected exit status {expected})",
            exit.status
        )));
    }
    // The marker can still be in the pipe when the child has been reaped already.
    child.read_to_end();
    if inv.boot_marker.is_some() && child.boot_time().is_none() {
        return Err(describe("never signalled boot complete".to_owned()));
    }
    Ok(Measured {
        wall: exit.wall,
        // The marker is timestamped when the reader thread gets to it, which on a busy
        // machine can be after the child was reaped; it was printed before the exit.
        boot: child.boot_time().map(|boot| boot.min(exit.wall)),
        max_rss_kib: exit.max_rss_kib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Invocation {
        Invocation::new("/bin/sh").arg("-c").arg(script)
    }

    #[test]
    fn measures_a_successful_run() {
        let inv = sh("echo boot-timer: yes >&2; exit 0").boot_marker("boot-timer:");
        let run = measure(&inv, 0, Duration::from_secs(10)).unwrap();
        assert!(run.boot.unwrap() <= run.wall);
        assert!(run.max_rss_kib > 0);
    }

    #[test]
    fn wrong_status_names_it_and_the_output() {
        let err = measure(&sh("echo oops >&2; exit 3"), 0, Duration::from_secs(10)).unwrap_err();
        assert!(err.contains("3") && err.contains("oops"), "{err}");
    }

    #[test]
    fn missing_boot_marker_fails() {
        let inv = sh("exit 0").boot_marker("boot-timer:");
        let err = measure(&inv, 0, Duration::from_secs(10)).unwrap_err();
        assert!(err.contains("boot"), "{err}");
    }

    #[test]
    fn timeout_kills_the_group() {
        let err = measure(&sh("sleep 30 & wait"), 0, Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("killed"), "{err}");
    }

    #[test]
    fn times_the_first_byte_and_a_whole_marked_line() {
        let inv = sh(
            "printf 'no newline yet'; sleep 0.2; echo; echo 'not ready'; \
                      printf '  ready\\r\\n'; exec sleep 30",
        )
        .output_line("ready");
        let mut child = Spawned::start(&inv).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.output_line_at().is_none() && Instant::now() < deadline {
            assert!(child.poll(Duration::from_millis(10)).unwrap().is_none());
        }
        let first = child.first_output_at().expect("first byte");
        let ready = child.output_line_at().expect("the marked line");
        // The first byte came 0.2 s before its line was complete.
        assert!(ready.duration_since(first) >= Duration::from_millis(150));
        assert!(first >= child.started());
        child.signal_group(libc::SIGKILL);
        assert!(child.wait(Duration::from_secs(10)).unwrap().status.signal() == Some(9));
    }

    #[test]
    fn spawn_failure_is_an_error() {
        let inv = Invocation::new("/nonexistent/program");
        assert!(measure(&inv, 0, Duration::from_secs(1)).is_err());
    }
}
