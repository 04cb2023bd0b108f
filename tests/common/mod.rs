//! Shared helpers for hearth's integration tests: building the tiny guest payloads in
//! `tests/payloads/`, running the hearth binary with a timeout (or talking to it while it
//! runs), and skipping KVM tests on machines without `/dev/kvm`.

// Each test crate includes this module and uses a different part of it.
#![allow(dead_code)]

pub mod linux;
pub mod netns;

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

/// Guest RAM the `memtouch` payload is built for, in MiB: 3 GiB below the MMIO hole and
/// 1.5 GiB above 4 GiB. A macro so that the payload's define and [`MEMTOUCH_MEMORY`] are
/// spelt from the same literal.
macro_rules! memtouch_memory_mib {
    () => {
        "4608"
    };
}

/// The `--memory` to run the `memtouch` payload with.
pub const MEMTOUCH_MEMORY: &str = concat!(memtouch_memory_mib!(), "M");

/// Guest RAM the `virtio_evil` payload is built for, in MiB: it points descriptors just
/// past the end of RAM. A macro for the same reason as `memtouch_memory_mib`.
macro_rules! virtio_evil_memory_mib {
    () => {
        "64"
    };
}

/// The `--memory` to run the `virtio_evil` payload with.
pub const VIRTIO_EVIL_MEMORY: &str = concat!(virtio_evil_memory_mib!(), "M");

const PAYLOAD_SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/payloads");
const PAYLOAD_OUTPUT: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/payloads");

/// How a payload is packaged for hearth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// ELF64 entered in long mode at `e_entry`.
    Elf64,
    /// ELF64 with a Xen PHYS32_ENTRY note, entered in 32-bit protected mode.
    Pvh,
    /// Linux bzImage: setup header + flat protected-mode code, entered at load + 0x200.
    BzImage,
}

impl Format {
    fn file_suffix(self) -> &'static str {
        match self {
            Format::Elf64 => "elf",
            Format::Pvh => "pvh.elf",
            Format::BzImage => "bzImage",
        }
    }

    fn linker_script(self) -> &'static str {
        match self {
            Format::Elf64 => "elf64.ld",
            Format::Pvh => "pvh.ld",
            Format::BzImage => "bzimage.ld",
        }
    }

    /// Sources linked into every payload of this format, besides its own.
    fn runtime_sources(self) -> &'static [&'static str] {
        match self {
            Format::Elf64 => &["lib64.S"],
            Format::Pvh => &["lib64.S", "lib32.S"],
            Format::BzImage => &["lib64.S", "lib32.S", "bzhead.S"],
        }
    }
}

/// One payload artifact: a name, a format, its own source and preprocessor defines.
struct PayloadSpec {
    name: &'static str,
    format: Format,
    source: &'static str,
    defines: &'static [&'static str],
}

const fn spec(
    name: &'static str,
    format: Format,
    source: &'static str,
    defines: &'static [&'static str],
) -> PayloadSpec {
    PayloadSpec {
        name,
        format,
        source,
        defines,
    }
}

/// Every payload the tests use; [`payload`] hands out their paths.
const PAYLOADS: &[PayloadSpec] = &[
    spec("hello", Format::Elf64, "hello.S", &[]),
    spec("hello", Format::Pvh, "hello_pvh.S", &[]),
    spec("hello", Format::BzImage, "hello.S", &[]),
    spec("exit_0", Format::Elf64, "exit_code.S", &["EXIT_CODE=0"]),
    spec("exit_7", Format::Elf64, "exit_code.S", &["EXIT_CODE=7"]),
    spec("exit_255", Format::Elf64, "exit_code.S", &["EXIT_CODE=255"]),
    spec(
        "exit_port_42",
        Format::Elf64,
        "exit_code.S",
        &["EXIT_CODE=42", "EXIT_VIA_PORT"],
    ),
    spec("boot_signal_mmio", Format::Elf64, "boot_signal.S", &[]),
    spec(
        "boot_signal_port",
        Format::Elf64,
        "boot_signal.S",
        &["BOOT_SIGNAL_VIA_PORT"],
    ),
    spec("reset", Format::Elf64, "reset.S", &[]),
    spec("triple_fault", Format::Elf64, "triple_fault.S", &[]),
    spec("int3", Format::Elf64, "int3.S", &[]),
    spec("fwait", Format::Elf64, "fwait.S", &[]),
    spec("syscall", Format::Elf64, "syscall.S", &[]),
    spec(
        "syscall_endbr64",
        Format::Elf64,
        "syscall.S",
        &["PF_ENTRY_ENDBR64"],
    ),
    spec("smp", Format::Elf64, "smp.S", &["NCPUS=2"]),
    spec("echo", Format::Elf64, "echo.S", &[]),
    spec(
        "memtouch",
        Format::Elf64,
        "memtouch.S",
        &[concat!("MEMORY_MIB=", memtouch_memory_mib!())],
    ),
    spec(
        "virtio_evil",
        Format::Elf64,
        "virtio_evil.c",
        &[concat!("GUEST_MEMORY_MIB=", virtio_evil_memory_mib!())],
    ),
];

/// The path of a built payload, building all of them on first use in this process.
///
/// Panics (failing the test with the toolchain's output) if they cannot be built, or if
/// no payload `name` exists in `format`.
pub fn payload(name: &str, format: Format) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(build_payloads) {
        panic!("cannot build the test payloads: {e}");
    }
    assert!(
        PAYLOADS
            .iter()
            .any(|p| p.name == name && p.format == format),
        "no payload {name:?} in format {format:?}"
    );
    payload_path(name, format)
}

fn payload_path(name: &str, format: Format) -> PathBuf {
    Path::new(PAYLOAD_OUTPUT).join(format!("{name}.{}", format.file_suffix()))
}

/// Builds every payload into a scratch directory private to this process, then renames
/// each artifact into [`PAYLOAD_OUTPUT`], so concurrent test binaries never see a
/// half-written file.
fn build_payloads() -> Result<(), String> {
    let scratch = Path::new(PAYLOAD_OUTPUT).join(format!(".build-{}", std::process::id()));
    fs::create_dir_all(&scratch).map_err(|e| format!("create {}: {e}", scratch.display()))?;
    let result = thread::scope(|scope| {
        let builders: Vec<_> = PAYLOADS
            .iter()
            .map(|spec| scope.spawn(|| build_payload(spec, &scratch)))
            .collect();
        builders
            .into_iter()
            .map(|b| b.join().unwrap_or_else(|_| Err("builder panicked".into())))
            .collect::<Result<Vec<()>, String>>()
    });
    // Best effort: a leftover scratch directory is harmless.
    let _ = fs::remove_dir_all(&scratch);
    result.map(|_| ())
}

fn build_payload(spec: &PayloadSpec, scratch: &Path) -> Result<(), String> {
    let stem = format!("{}.{}", spec.name, spec.format.file_suffix());
    let work = scratch.join(&stem);
    fs::create_dir_all(&work).map_err(|e| format!("create {}: {e}", work.display()))?;
    let src_dir = Path::new(PAYLOAD_SOURCES);

    let mut objects = Vec::new();
    let sources = spec.format.runtime_sources().iter().chain([&spec.source]);
    for source in sources {
        let object = work.join(Path::new(source).with_extension("o"));
        let mut gcc = Command::new("gcc");
        gcc.args(["-c", "-nostdlib", "-ffreestanding", "-Wa,--fatal-warnings"])
            .arg("-I")
            .arg(src_dir)
            .args(spec.defines.iter().map(|d| format!("-D{d}")))
            .arg("-o")
            .arg(&object)
            .arg(src_dir.join(source));
        run_tool(gcc)?;
        objects.push(object);
    }

    let elf = work.join("payload.elf");
    let mut ld = Command::new("ld");
    ld.args([
        "-nostdlib",
        "-static",
        "--build-id=none",
        "--fatal-warnings",
    ])
    .args(["--no-warn-rwx-segments", "-z", "noexecstack", "-T"])
    .arg(src_dir.join(spec.format.linker_script()))
    .arg("-o")
    .arg(&elf)
    .args(&objects);
    run_tool(ld)?;

    let artifact = if spec.format == Format::BzImage {
        let flat = work.join("payload.bin");
        let mut objcopy = Command::new("objcopy");
        objcopy.args(["-O", "binary"]).arg(&elf).arg(&flat);
        run_tool(objcopy)?;
        let code = fs::read(&flat).map_err(|e| format!("read {}: {e}", flat.display()))?;
        let image = work.join("payload.bzImage");
        fs::write(&image, bzimage(&code)).map_err(|e| format!("write {}: {e}", image.display()))?;
        image
    } else {
        elf
    };

    let dest = payload_path(spec.name, spec.format);
    fs::rename(&artifact, &dest)
        .map_err(|e| format!("rename {} to {}: {e}", artifact.display(), dest.display()))
}

fn run_tool(mut cmd: Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Where the bzImage's protected-mode code is loaded (`code32_start`, `pref_address`).
const BZIMAGE_LOAD_ADDRESS: u32 = 0x10_0000;
/// Real-mode setup sectors after the boot sector: the header runs past the first sector.
const BZIMAGE_SETUP_SECTS: u8 = 1;

/// Wraps flat protected-mode code (linked at [`BZIMAGE_LOAD_ADDRESS`], `startup_64` at
/// +0x200) in a Linux boot protocol 2.15 setup area, as the kernel's `header.S` lays it out.
/// The real-mode setup code is never run: hearth loads the code at `code32_start` and
/// enters its 64-bit entry.
pub fn bzimage(code: &[u8]) -> Vec<u8> {
    let setup_len = (usize::from(BZIMAGE_SETUP_SECTS) + 1) * 512;
    let mut image = vec![0u8; setup_len];
    let mut put = |offset: usize, bytes: &[u8]| {
        image[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    let code_len = u32::try_from(code.len()).expect("payload fits a bzImage");
    let init_size = code_len.next_multiple_of(0x1000);

    put(0x1f1, &[BZIMAGE_SETUP_SECTS]); // setup_sects
    put(0x1f4, &code_len.div_ceil(16).to_le_bytes()); // syssize, 16-byte paragraphs
    put(0x1fa, &0xffffu16.to_le_bytes()); // vid_mode: "normal"
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x200, &[0xeb, 0x6e]); // jump: over the header to 0x270
    put(0x202, b"HdrS"); // header magic
    put(0x206, &0x020fu16.to_le_bytes()); // version 2.15
    put(0x20c, &0x1000u16.to_le_bytes()); // start_sys_seg (obsolete)
    put(0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(0x212, &0x8000u16.to_le_bytes()); // setup_move_size
    put(0x214, &BZIMAGE_LOAD_ADDRESS.to_le_bytes()); // code32_start
    put(0x22c, &0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(0x234, &[0, 12]); // relocatable_kernel: no; min_alignment: 4 KiB
    put(0x236, &0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(0x258, &u64::from(BZIMAGE_LOAD_ADDRESS).to_le_bytes()); // pref_address
    put(0x260, &init_size.to_le_bytes()); // init_size
    put(0x270, &[0xfa, 0xf4, 0xeb, 0xfd]); // "setup code": cli; 1: hlt; jmp 1b

    image.extend_from_slice(code);
    image
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
            announce_skip(&format!("{KVM} not available ({e})"));
            false
        }
    }
}

/// Prints a loud SKIPPED line naming the current test and why it is not running.
pub fn announce_skip(reason: &str) {
    let test = thread::current().name().unwrap_or("<unknown>").to_owned();
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
