//! The container engines of Debian 12 driving `hearth oci` as their OCI runtime: podman
//! (with conmon), dockerd (with the containerd it starts) and containerd (with ctr). Each
//! engine here gets its own short temporary directory for its data root, state, sockets and
//! runtime root, so a test never meets another test's engine or the host's own; dropping an
//! engine stops its containers, its daemon and what the daemon started.
//!
//! The engines reach hearth through a symlink named `hearth-oci` to the binary under test
//! (hearth reads its file name and behaves as `hearth oci`). The runtime finds the guest
//! kernel, this build's agent and the test process's templates through `HEARTH_*`
//! variables: dockerd and containerd pass their environment down to the runtime; podman
//! passes conmon only what `containers.conf` lists in `conmon_env_vars`.
//!
//! `HEARTH_ENGINES_RUNTIME=PATH` puts another runtime behind the symlink (e.g. a runc
//! wrapper), to tell an engine-side problem from a hearth one.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use hearth::image::sample;

use super::linux::{minimal_kernel, MINIMAL_TIMEOUT};
use super::{announce_skip, describe, kvm_available, run_with_timeout, Need, TempDir};

/// The sample image as every engine names it after loading it: the docker-save tag
/// `hearth-sample/busybox:latest`, which docker and containerd qualify with docker.io
/// (podman with localhost: [`Podman::new`] adds this name).
pub const IMAGE: &str = "docker.io/hearth-sample/busybox:latest";

/// A command that may create the runtime's VM template (a boot): the Linux-guest timeout.
pub const ENGINE_TIMEOUT: Duration = MINIMAL_TIMEOUT;

/// How long a daemon may take to answer on its socket.
const DAEMON_START: Duration = Duration::from_secs(120);

const PODMAN: &str = "/usr/bin/podman";
const CONMON: &str = "/usr/bin/conmon";
const DOCKERD: &str = "/usr/sbin/dockerd";
/// Debian's client by its full path: a client-only `docker` may come first on PATH.
const DOCKER: &str = "/usr/bin/docker";
const CONTAINERD: &str = "/usr/bin/containerd";
const CTR: &str = "/usr/bin/ctr";
const SHIM: &str = "/usr/bin/containerd-shim-runc-v2";

/// One of the engines under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Podman,
    Docker,
    Containerd,
}

impl Engine {
    fn programs(self) -> &'static [&'static str] {
        match self {
            Engine::Podman => &[PODMAN, CONMON],
            Engine::Docker => &[DOCKERD, DOCKER, CONTAINERD, SHIM],
            Engine::Containerd => &[CONTAINERD, CTR, SHIM],
        }
    }
}

/// Whether `engine`'s tests can run here: KVM, root (the engines run rootful) and the
/// engine's programs. Otherwise prints a loud SKIPPED line (a failure when
/// `HEARTH_REQUIRE` names the missing need).
pub fn can_run(engine: Engine) -> bool {
    if !kvm_available() {
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        announce_skip(Need::Root, "the engines run as root here");
        return false;
    }
    if let Some(missing) = engine.programs().iter().find(|p| !Path::new(p).exists()) {
        announce_skip(
            Need::Engines,
            &format!("{missing} not found (Debian packages podman, conmon, docker.io, containerd)"),
        );
        return false;
    }
    true
}

/// Serialises the engine tests of a test process: each VM costs a share of two cores,
/// and the first one also makes the template the others restore from.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test still gets its turn.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where this test process keeps the runtime's templates, cache and state: one template
/// directory for all engines, so the VM shape boots once per run. Those of earlier test
/// processes (tens of MB each) are removed on first use.
fn shared_dir(what: &str) -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    SWEPT.get_or_init(|| remove_stale_shared_dirs(base));
    base.join(format!("oci-engines-{what}-{}", std::process::id()))
}

/// Removes the `oci-engines-*-PID` entries of test processes that have ended.
fn remove_stale_shared_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("oci-engines-")
            .and_then(|rest| rest.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let path = entry.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }
}

/// The variables that point `hearth oci` at the guest kernel, this build's agent and the
/// shared templates.
fn hearth_env() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("HEARTH_GUEST_KERNEL", minimal_kernel()),
        (
            "HEARTH_INIT",
            PathBuf::from(env!("CARGO_BIN_EXE_hearth-init")),
        ),
        ("HEARTH_TEMPLATES", shared_dir("templates")),
        ("HEARTH_CACHE", shared_dir("cache")),
        ("HEARTH_STATE", shared_dir("state")),
    ]
}

/// The busybox-static sample image as a `docker save` tarball, built once per process.
fn image_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let path = shared_dir("busybox.tar");
        sample::busybox_docker_save(&path, &[]).expect("build the busybox docker-save tarball");
        path
    })
}

/// `dir/hearth-oci`, a symlink to the hearth binary under test (or to
/// `$HEARTH_ENGINES_RUNTIME`).
fn runtime_link(dir: &TempDir) -> PathBuf {
    let target = std::env::var_os("HEARTH_ENGINES_RUNTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(super::HEARTH));
    let link = dir.join("hearth-oci");
    symlink(&target, &link).unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
    link
}

/// Runs `cmd` with stdin closed and asserts it succeeded; returns its stdout.
#[track_caller]
pub fn succeed(cmd: Command, timeout: Duration) -> String {
    let out = run_with_timeout(cmd, timeout);
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command line for `sh -c`, each word single-quoted.
pub fn shell_words<I, S>(words: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    words
        .into_iter()
        .map(|w| format!("'{}'", w.as_ref().to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Polls `ready` every 200 ms until it says yes; panics with `context()` after `timeout`.
/// Waits until `client version` succeeds against a daemon the harness started
/// (`NAME.log` in `dir` holds its output); a daemon that exits or never answers fails
/// the test with its log.
fn wait_for_daemon(name: &str, daemon: &mut Child, dir: &Path, mut client: Command) {
    let log = dir.join(format!("{name}.log"));
    let context = || {
        format!(
            "{name} did not answer on its socket:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        )
    };
    client
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    wait_until(
        DAEMON_START,
        || {
            if let Ok(Some(status)) = daemon.try_wait() {
                panic!("{name} exited with {status}: {}", context());
            }
            client.status().is_ok_and(|s| s.success())
        },
        context,
    );
}

fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "{}", context());
        thread::sleep(Duration::from_millis(200));
    }
}

/// Stops a daemon: SIGTERM, then SIGKILL if it has not ended within `grace`.
fn stop_daemon(daemon: &mut Child, grace: Duration) {
    let pid = daemon.id() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own child, not yet
    // reaped, so it cannot name another process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = daemon.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// The processes whose command line has `needle` as one of its words, by pid (e.g. the
/// containerd shims a daemon of ours started, which outlive it by design).
fn processes_with_arg(needle: &str) -> Vec<libc::pid_t> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: libc::pid_t = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|&b| b == 0)
                .any(|word| word == needle.as_bytes())
                .then_some(pid)
        })
        .collect()
}

fn kill_all(pids: &[libc::pid_t]) {
    for &pid in pids {
        // SAFETY: kill has no memory-safety preconditions; the pid was just read from
        // /proc with our daemon's socket in its command line.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// podman (and conmon) on a private root, run root, tmpdir and containers.conf, with the
/// sample image loaded. podman has no daemon: each command is a process.
pub struct Podman {
    dir: TempDir,
    runtime: PathBuf,
}

impl Podman {
    pub fn new() -> Self {
        let dir = TempDir::short("hearth-podman");
        let runtime = runtime_link(&dir);
        let env: Vec<String> = hearth_env()
            .into_iter()
            .map(|(name, value)| format!("\"{name}={}\"", value.display()))
            .collect();
        // cgroupfs and file events: no systemd or journald here. conmon starts the
        // runtime with only the variables listed here (and HOME, PATH).
        let conf = format!(
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             conmon_env_vars = [{}]\n",
            env.join(", ")
        );
        fs::write(dir.join("containers.conf"), conf).expect("write containers.conf");
        let podman = Podman { dir, runtime };
        let mut load = podman.command();
        load.arg("load").arg("-i").arg(image_archive());
        succeed(load, ENGINE_TIMEOUT);
        let mut tag = podman.command();
        tag.args(["tag", "localhost/hearth-sample/busybox:latest", IMAGE]);
        succeed(tag, ENGINE_TIMEOUT);
        podman
    }

    /// The `hearth-oci` symlink podman runs.
    pub fn runtime(&self) -> &Path {
        &self.runtime
    }

    /// `podman` with this instance's storage (vfs: no overlay mounts needed), state,
    /// configuration and `--runtime hearth-oci`.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(PODMAN);
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .arg("--runtime")
            .arg(&self.runtime);
        cmd
    }

    /// `podman ARGS...` with stdin closed, to its end.
    pub fn output<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command();
        cmd.args(args);
        run_with_timeout(cmd, ENGINE_TIMEOUT)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Stops and deletes whatever a failed test left (runtime kill + delete), so no
        // conmon or VM outlives the test.
        let mut rm = self.command();
        rm.args(["rm", "--all", "--force", "--time", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = rm.status();
    }
}

/// dockerd with its own data root, exec root, socket and the containerd it starts, no
/// bridge and no iptables (nothing on the host's network), hearth registered in
/// `daemon.json` as the runtime `hearth`, and the sample image loaded.
pub struct Dockerd {
    dir: TempDir,
    daemon: Child,
}

impl Dockerd {
    pub fn start() -> Self {
        let dir = TempDir::short("hearth-dockerd");
        let runtime = runtime_link(&dir);
        let config = serde_json::json!({"runtimes": {"hearth": {"path": runtime}}});
        fs::write(dir.join("daemon.json"), config.to_string()).expect("write daemon.json");
        let log = fs::File::create(dir.join("dockerd.log")).expect("create dockerd.log");
        let mut cmd = Command::new(DOCKERD);
        cmd.envs(hearth_env())
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .args(["--ip-masq=false", "--storage-driver", "vfs"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup dockerd.log"))
            .stderr(log);
        let daemon = cmd.spawn().expect("start dockerd");
        let mut dockerd = Dockerd { dir, daemon };
        dockerd.wait_ready();
        let mut load = dockerd.docker();
        load.arg("load").arg("-i").arg(image_archive());
        succeed(load, ENGINE_TIMEOUT);
        dockerd
    }

    fn wait_ready(&mut self) {
        let version = self.docker();
        wait_for_daemon("dockerd", &mut self.daemon, self.dir.path(), version);
    }

    /// Debian's `docker` client on this daemon's socket.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.arg("--host")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()));
        cmd
    }

    /// `docker ARGS...` with stdin closed, to its end.
    pub fn output<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.docker();
        cmd.args(args);
        run_with_timeout(cmd, ENGINE_TIMEOUT)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let mut ids = self.docker();
        ids.args(["ps", "--all", "--quiet"]);
        if let Ok(out) = ids.output() {
            let ids = String::from_utf8_lossy(&out.stdout).into_owned();
            if !ids.trim().is_empty() {
                let mut rm = self.docker();
                rm.args(["rm", "--force"]).args(ids.split_whitespace());
                rm.stdout(Stdio::null()).stderr(Stdio::null());
                let _ = rm.status();
            }
        }
        // dockerd stops the containerd it started; its shims end with their containers,
        // and any left over carry our containerd socket in their command line.
        stop_daemon(&mut self.daemon, Duration::from_secs(30));
        let exec = self.dir.join("exec/containerd");
        kill_all(&processes_with_arg(
            &exec.join("containerd.sock").to_string_lossy(),
        ));
        if let Some(pid) = fs::read_to_string(exec.join("containerd.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
        {
            // Only if that pid is still a containerd on our config (dockerd was killed
            // before it could stop it).
            let config = exec.join("containerd.toml");
            if processes_with_arg(&config.to_string_lossy()).contains(&pid) {
                kill_all(&[pid]);
            }
        }
    }
}

/// containerd with its own root, state, socket and runtime root; the native snapshotter
/// (a bind mount per container, no overlay) and no CRI plugin; the sample image imported.
pub struct Containerd {
    dir: TempDir,
    daemon: Child,
    runtime: PathBuf,
}

impl Containerd {
    pub fn start() -> Self {
        let dir = TempDir::short("hearth-containerd");
        let runtime = runtime_link(&dir);
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = dir.join("containerd.sock").display(),
        );
        fs::write(dir.join("config.toml"), config).expect("write config.toml");
        let log = fs::File::create(dir.join("containerd.log")).expect("create containerd.log");
        let mut cmd = Command::new(CONTAINERD);
        cmd.envs(hearth_env())
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup containerd.log"))
            .stderr(log);
        let daemon = cmd.spawn().expect("start containerd");
        let mut containerd = Containerd {
            dir,
            daemon,
            runtime,
        };
        containerd.wait_ready();
        let mut import = containerd.ctr();
        import
            .args(["image", "import", "--snapshotter", "native"])
            .arg(image_archive());
        succeed(import, ENGINE_TIMEOUT);
        containerd
    }

    fn wait_ready(&mut self) {
        let version = self.ctr();
        wait_for_daemon("containerd", &mut self.daemon, self.dir.path(), version);
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr` on this daemon's socket.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(CTR);
        cmd.arg("--address").arg(self.socket());
        cmd
    }

    /// `ctr run --rm` of the sample image as container `id`, with the runc shim running
    /// `hearth-oci` as its runc binary, on this instance's runtime root.
    pub fn run<I, S>(&self, id: &str, command: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.ctr();
        cmd.args(["run", "--rm", "--runtime", "io.containerd.runc.v2"])
            .arg("--runc-binary")
            .arg(&self.runtime)
            .arg("--runc-root")
            .arg(self.dir.join("runtime-root"))
            .args(["--snapshotter", "native", IMAGE, id])
            .args(command);
        run_with_timeout(cmd, ENGINE_TIMEOUT)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let mut tasks = self.ctr();
        tasks.args(["tasks", "list", "--quiet"]);
        let tasks = tasks.output().map(|out| out.stdout).unwrap_or_default();
        for task in String::from_utf8_lossy(&tasks).split_whitespace() {
            let mut delete = self.ctr();
            delete.args(["tasks", "delete", "--force", task]);
            delete.stdout(Stdio::null()).stderr(Stdio::null());
            let _ = delete.status();
        }
        let mut containers = self.ctr();
        containers.args(["containers", "list", "--quiet"]);
        let containers = containers
            .output()
            .map(|out| out.stdout)
            .unwrap_or_default();
        for container in String::from_utf8_lossy(&containers).split_whitespace() {
            let mut delete = self.ctr();
            delete.args(["containers", "delete", container]);
            delete.stdout(Stdio::null()).stderr(Stdio::null());
            let _ = delete.status();
        }
        stop_daemon(&mut self.daemon, Duration::from_secs(30));
        // Shims outlive containerd by design; ours name our socket.
        kill_all(&processes_with_arg(&self.socket().to_string_lossy()));
    }
}
