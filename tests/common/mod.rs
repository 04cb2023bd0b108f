//! Shared helpers for hearth's integration tests: building the tiny guest payloads in
//! `tests/payloads/`, running the hearth binary with a timeout (or talking to it while it
//! runs), and skipping KVM tests on machines without `/dev/kvm`.

// Each test crate includes this module and uses a different part of it.
#![allow(dead_code)]

pub mod api_client;
pub mod container;
pub mod engines;
pub mod linux;
pub mod netns;
pub mod snapshot;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Timeout for a whole hearth run against a tiny payload. Generous: the nested PVM host
/// emulates every guest kernel-mode instruction, and tests never assert on timing.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Guest memory for payload runs: small, so VM setup stays cheap.
pub const PAYLOAD_MEMORY: &str = "32M";

/// The greeting the `hello` payloads print.
pub const HELLO: &str = "Hello from hearth payload\n";

pub use hearth::bench::fixtures::payloads::Format;

use hearth::bench::fixtures::payloads;

/// The `--memory` to run the `memtouch` payload with.
pub const MEMTOUCH_MEMORY: &str = payloads::MEMTOUCH_MEMORY;
/// The `--memory` to run the `virtio_evil` payload with.
pub const VIRTIO_EVIL_MEMORY: &str = payloads::VIRTIO_EVIL_MEMORY;

/// Where the payloads are built, once per test process (see [`payload`]).
const PAYLOAD_OUTPUT: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/payloads");

/// The path of a built payload, building all of them on first use in this process with
/// the library's payload builder (the one `hearth bench` uses).
///
/// Panics (failing the test with the toolchain's output) if they cannot be built, or if
/// no payload `name` exists in `format`.
pub fn payload(name: &str, format: Format) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let all: Vec<_> = payloads::PAYLOADS.iter().collect();
        payloads::build(&all, Path::new(PAYLOAD_OUTPUT)).map_err(|e| hearth::error_chain(&e))
    });
    if let Err(e) = built {
        panic!("cannot build the test payloads: {e}");
    }
    if let Err(e) = payloads::find(name, format) {
        panic!("{e}");
    }
    payloads::path(Path::new(PAYLOAD_OUTPUT), name, format)
}

/// The hearth binary under test.
pub const HEARTH: &str = env!("CARGO_BIN_EXE_hearth");

/// A `Command` for the hearth binary under test.
pub fn hearth() -> Command {
    Command::new(HEARTH)
}

/// Runs `hearth ARGS...`, killing it after `timeout`; see [`run_with_timeout`].
pub fn run_hearth<I, S>(args: I, timeout: Duration) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = hearth();
    cmd.args(args);
    run_with_timeout(cmd, timeout)
}

/// `hearth run --kernel KERNEL EXTRA...`, adding `--memory` [`PAYLOAD_MEMORY`] unless
/// `extra` sets the memory itself.
pub fn payload_command(kernel: &Path, extra: &[&str]) -> Command {
    let mut cmd = hearth();
    cmd.arg("run").arg("--kernel").arg(kernel).args(extra);
    if !extra.contains(&"--memory") {
        cmd.args(["--memory", PAYLOAD_MEMORY]);
    }
    cmd
}

/// Runs [`payload_command`] with [`RUN_TIMEOUT`].
pub fn run_payload(kernel: &Path, extra: &[&str]) -> Output {
    run_with_timeout(payload_command(kernel, extra), RUN_TIMEOUT)
}

/// Runs `cmd` with stdin closed and stdout/stderr captured. If it outlives `timeout`, kills
/// it and panics with what it printed so far, so a hung VM fails its test instead of
/// hanging the suite.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Output {
    Running::start(cmd, Stdio::null()).finish(timeout)
}

/// A child process with captured stdout and stderr, for tests that talk to it while it
/// runs. Dropping it kills the child if it is still running, so a failing test never
/// leaves a VM behind.
pub struct Running {
    command: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Capture,
    stderr: Capture,
}

impl Running {
    /// Starts `cmd` with `stdin` (piped for [`Running::send`]) and stdout and stderr
    /// captured.
    pub fn start(mut cmd: Command, stdin: Stdio) -> Self {
        let command = format!("{cmd:?}");
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        let stdout = Capture::start(child.stdout.take().expect("piped stdout"));
        let stderr = Capture::start(child.stderr.take().expect("piped stderr"));
        let stdin = child.stdin.take();
        Running {
            command,
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// The child's process id (for `/proc/PID`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the child (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill only sends a signal to our own, still-unreaped child process.
        let ret = unsafe { libc::kill(pid, signal) };
        assert_eq!(ret, 0, "cannot signal {}", self.command);
    }

    /// Writes `bytes` to the child's stdin at once.
    #[track_caller]
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("child started with stdin piped");
        if let Err(e) = stdin.write_all(bytes).and_then(|()| stdin.flush()) {
            panic!(
                "cannot write {bytes:?} to {}: {e}\n{}",
                self.command,
                self.describe_so_far()
            );
        }
    }

    /// Closes the child's stdin (it reads end of file).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits (up to [`RUN_TIMEOUT`]) until the child's stdout contains `expected`; panics
    /// with everything it printed if it does not, or if it ends first.
    #[track_caller]
    pub fn expect_stdout(&self, expected: &[u8]) {
        assert!(
            self.stdout.wait_for(expected, RUN_TIMEOUT),
            "{} did not print {:?} within {RUN_TIMEOUT:?}\n{}",
            self.command,
            String::from_utf8_lossy(expected),
            self.describe_so_far()
        );
    }

    /// Like [`Running::expect_stdout`], with its own `timeout` (for Linux guests, which
    /// take far longer than [`RUN_TIMEOUT`] on a nested-PVM host).
    #[track_caller]
    pub fn expect_stdout_within(&self, expected: &[u8], timeout: Duration) {
        assert!(
            self.stdout.wait_for(expected, timeout),
            "{} did not print {:?} within {timeout:?}\n{}",
            self.command,
            String::from_utf8_lossy(expected),
            self.describe_so_far()
        );
    }

    /// Whether the child is still running (not yet exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the child has written to stdout so far.
    pub fn stdout_so_far(&self) -> Vec<u8> {
        self.stdout.contents()
    }

    /// What the child has printed so far, for failure messages.
    pub fn describe_so_far(&self) -> String {
        format!(
            "--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
            String::from_utf8_lossy(&self.stdout.contents()),
            String::from_utf8_lossy(&self.stderr.contents())
        )
    }

    /// Waits for the child to end, with stdin still open, and returns its status and
    /// everything it printed. If it outlives `timeout`, kills it and panics with its output.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let (status, timed_out) = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break (status, false),
                Ok(None) if Instant::now() >= deadline => {
                    // The child may exit between try_wait and kill; either way wait reaps it.
                    let _ = self.child.kill();
                    break (self.child.wait().expect("wait for killed child"), true);
                }
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("waiting for {}: {e}", self.command),
            }
        };
        self.stdin = None;
        let eof_deadline = Instant::now() + Capture::EOF_GRACE;
        let output = Output {
            status,
            stdout: self.stdout.finish(eof_deadline),
            stderr: self.stderr.finish(eof_deadline),
        };
        assert!(
            !timed_out,
            "{} did not finish within {timeout:?}; killed it\n{}",
            self.command,
            describe(&output)
        );
        output
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A byte stream (a child's output pipe, a socket) read on its own thread, so that the
/// writer never stalls on a full pipe while the test waits for something else.
pub struct Capture {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: thread::JoinHandle<()>,
}

impl Capture {
    /// How long to wait for end-of-file once the child has exited: longer only if something
    /// else (a grandchild) still holds the pipe open, and then we stop waiting.
    const EOF_GRACE: Duration = Duration::from_secs(2);

    /// Starts reading `source` until end-of-file or a read error.
    pub fn start(mut source: impl Read + Send + 'static) -> Self {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        let reader = thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            // A read error just ends the capture; what was read so far is kept.
            while let Ok(n @ 1..) = source.read(&mut chunk) {
                sink.lock()
                    .expect("capture lock")
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Capture { bytes, reader }
    }

    /// Everything read so far.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().expect("capture lock").clone()
    }

    /// Whether `expected` shows up within `timeout`; false as soon as the stream ends
    /// without it.
    pub fn wait_for(&self, expected: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // Checked before the contents, so that bytes read just before the end count.
            let ended = self.reader.is_finished();
            if contains(&self.contents(), expected) {
                return true;
            }
            if ended || Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// What was read, once the stream reached end-of-file or at `deadline`.
    pub fn finish(&self, deadline: Instant) -> Vec<u8> {
        while !self.reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.contents()
    }
}

/// Whether `haystack` contains `needle` as a contiguous byte string.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Exit status, stdout and stderr of a run, for assertion messages.
pub fn describe(out: &Output) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "status: {}", out.status);
    let _ = writeln!(
        s,
        "--- stdout ---\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = write!(
        s,
        "--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
pub fn assert_stdout_contains(out: &Output, expected: &str) {
    assert!(
        stdout_of(out).contains(expected),
        "expected {expected:?} on stdout\n{}",
        describe(out)
    );
}

/// Asserts that hearth exited with `code` (not killed by a signal).
#[track_caller]
pub fn assert_exit_code(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit status {code}\n{}",
        describe(out)
    );
}

/// Whether `/dev/kvm` can be opened for reading and writing. When it cannot, prints a loud
/// SKIPPED line naming the test, which should then return early (skip, not fail).
pub fn kvm_available() -> bool {
    const KVM: &str = "/dev/kvm";
    match OpenOptions::new().read(true).write(true).open(KVM) {
        Ok(_) => true,
        Err(e) => {
            announce_skip(Need::Kvm, &format!("{KVM} not available ({e})"));
            false
        }
    }
}

/// Whether /dev/kvm is the nested PVM module; announces the skip of a PVM-only test when not.
#[track_caller]
pub fn pvm_host() -> bool {
    let pvm = hearth::arch::pvm::host_is_pvm();
    if !pvm {
        announce_skip(Need::Pvm, "not a nested PVM host (no /sys/module/kvm_pvm)");
    }
    pvm
}

/// What a test may find missing and skip for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `/dev/kvm`, read-write.
    Kvm,
    /// Running as root (taps, namespaces, mounts, other users).
    Root,
    /// Network namespaces and taps (iproute2).
    Netns,
    /// The tools the tests run (busybox, mkfs.ext4, curl, script, setpriv).
    Tools,
    /// A nested-PVM host (tests of the compat layer's PVM-only paths).
    Pvm,
    /// passt (user-mode networking).
    Passt,
    /// A local image registry and tools to fill it (docker-registry, skopeo, htpasswd).
    Registry,
    /// The container engines that drive `hearth oci`: podman with conmon, dockerd,
    /// containerd with ctr.
    Engines,
}

impl Need {
    fn name(self) -> &'static str {
        match self {
            Need::Kvm => "kvm",
            Need::Root => "root",
            Need::Netns => "netns",
            Need::Tools => "tools",
            Need::Pvm => "pvm",
            Need::Passt => "passt",
            Need::Registry => "registry",
            Need::Engines => "engines",
        }
    }
}

/// Whether `$HEARTH_REQUIRE` (a comma-separated list of [`Need`] names, or `all`) says
/// `need` must be there. `.ci/run` sets it, so that CI proves the tiers it claims to run.
fn required(need: Need) -> bool {
    std::env::var("HEARTH_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .any(|word| word == "all" || word == need.name())
}

/// Prints a loud SKIPPED line naming the current test and why it is not running; fails
/// the test instead when `$HEARTH_REQUIRE` requires `need`.
#[track_caller]
pub fn announce_skip(need: Need, reason: &str) {
    let test = thread::current().name().unwrap_or("<unknown>").to_owned();
    assert!(
        !required(need),
        "HEARTH_REQUIRE requires {}, but {reason}: test `{test}` cannot run",
        need.name()
    );
    eprintln!("SKIPPED: {reason}; test `{test}` did not run");
}

/// A uniquely named directory, removed (best effort) when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory under the cargo target's tmp dir.
    pub fn new(prefix: &str) -> Self {
        Self::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")), prefix)
    }

    /// Creates a fresh directory under the system temp dir (`/tmp`), for sockets that
    /// clients other than hearth's must reach: curl and firecracker-rs-sdk cannot connect
    /// to a path longer than a socket address holds (107 bytes), which a deep checkout's
    /// target dir exceeds. (hearth's own clients can: `hearth::uds`.)
    pub fn short(prefix: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// Creates a fresh directory under `base`.
    pub fn new_in(base: &Path, prefix: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{prefix}-{}-{n}", std::process::id()));
        // A leftover from an earlier process with the same pid is stale.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The numbers the `counter` payload printed in `text`, in order ("count N" lines; a line
/// still being written is left out).
pub fn counter_counts(text: &str) -> Vec<u32> {
    let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    complete
        .lines()
        .map(|line| {
            line.strip_prefix("count ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected serial line {line:?} in {text:?}"))
        })
        .collect()
}

/// The `Seccomp:` mode of every thread of `pid`, by thread name.
pub fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return modes;
    };
    for task in tasks.flatten() {
        // A thread may end between the listing and the reads.
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_string())
                .unwrap_or_default()
        };
        modes.push((field("Name:"), field("Seccomp:")));
    }
    modes.sort();
    modes
}

/// Waits until every thread of `pid` shows `Seccomp: mode` and the `threads` named are
/// there; panics with what it last saw (and `context()`) otherwise.
pub fn wait_for_seccomp(
    pid: u32,
    mode: &str,
    threads: &[&str],
    context: impl Fn() -> String,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let modes = thread_modes(pid);
        let names: Vec<&str> = modes.iter().map(|(name, _)| name.as_str()).collect();
        let complete = threads.iter().all(|thread| names.contains(thread));
        if complete && modes.iter().all(|(_, seen)| seen == mode) {
            return modes;
        }
        assert!(
            Instant::now() < deadline,
            "threads of process {pid} never all showed Seccomp: {mode}: {modes:?}\n{}",
            context()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Builds `tests/programs/NAME.c` into a static executable at `out` (guest programs run
/// in an initramfs or an image with no C library).
pub fn build_static_program(name: &str, out: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(format!("{name}.c"));
    let built = Command::new("cc")
        .args(["-O2", "-static", "-o"])
        .arg(out)
        .arg(&source)
        .output()
        .expect("run cc (build-essential)");
    assert!(
        built.status.success(),
        "cc {}: {}",
        source.display(),
        describe(&built)
    );
}
