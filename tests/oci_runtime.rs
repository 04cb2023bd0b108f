//! `hearth oci`, the OCI runtime, driven the way engines drive runc, without an engine:
//! bundles written here (busybox-static's root filesystem and a config.json), real
//! container VMs restored from a template. This test process plays the engine: it is a
//! child subreaper, so the monitors and exec waiters `hearth oci` leaves behind become
//! its children and it waits for them as conmon and containerd's shim do.
//!
//! Two container VMs in all (one template boot): the lifecycle with stdio, exec and
//! SIGTERM; and a terminal through the console socket, ended by SIGKILL. The bad-bundle
//! test boots nothing.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::linux::MINIMAL_TIMEOUT;
use common::{describe, stderr_of, stdout_of, TempDir};
use hearth::image::sample::SampleLayer;

/// The templates this run's container VMs restore from (one boot for the shape).
fn shared_templates() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("oci-templates-{}", std::process::id()))
}

/// A test's runtime: its `--root` (short: sockets live there), its bundle and files.
struct Runtime {
    dir: TempDir,
    root: PathBuf,
    ids: Vec<String>,
}

impl Runtime {
    fn new(name: &str) -> Self {
        let dir = TempDir::short(&format!("oci-{name}"));
        let root = dir.join("root");
        Runtime {
            dir,
            root,
            ids: Vec::new(),
        }
    }

    /// `hearth oci --root ROOT ARGS...` with this build's kernel, agent and templates.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = common::container::hearth_in(
            &self.dir.join("cache"),
            &shared_templates(),
            &self.dir.join("state"),
        );
        cmd.arg("oci").arg("--root").arg(&self.root).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        common::run_with_timeout(self.command(args), MINIMAL_TIMEOUT)
    }

    /// `create` with the container's stdout and stderr in files; returns the monitor's pid.
    fn create(&mut self, id: &str, bundle: &Path, extra: &[&str]) -> i32 {
        let pid_file = self.dir.join(&format!("{id}.pid"));
        let mut cmd = self.command(&["create", "--bundle"]);
        cmd.arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(extra)
            .arg(id);
        cmd.stdout(File::create(self.dir.join(&format!("{id}.out"))).unwrap());
        cmd.stderr(File::create(self.dir.join(&format!("{id}.err"))).unwrap());
        self.ids.push(id.to_string());
        let status = status_of(cmd);
        let err = std::fs::read_to_string(self.dir.join(&format!("{id}.err"))).unwrap();
        assert!(status.success(), "create {id}: {status}: {err}");
        std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn output(&self, id: &str, stream: &str) -> String {
        std::fs::read_to_string(self.dir.join(&format!("{id}.{stream}"))).unwrap_or_default()
    }

    fn wait_for_output(&self, id: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.output(id, "out").contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} never came; stdout: {:?}; stderr: {:?}; monitor log: {:?}",
                self.output(id, "out"),
                self.output(id, "err"),
                std::fs::read_to_string(self.root.join(id).join("monitor.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn state(&self, id: &str) -> serde_json::Value {
        let out = self.run(&["state", id]);
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Runtime {
    /// A failed test leaves no VM running.
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = self.run(&["delete", "--force", id]);
        }
    }
}

/// Runs `cmd` with the stdio it was given (the container's, which outlives it: the
/// monitor keeps it), failing the test if it hangs.
fn status_of(mut cmd: Command) -> std::process::ExitStatus {
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + MINIMAL_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{cmd:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes this process the reaper of orphans, as engines are, once.
fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

/// How the process `pid` (an orphan we reap) ended: (exit code, signal).
fn wait_for(pid: i32) -> (Option<i32>, Option<i32>) {
    let deadline = Instant::now() + MINIMAL_TIMEOUT;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our integer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(
            rc >= 0,
            "waitpid {pid}: {}",
            std::io::Error::last_os_error()
        );
        if rc == pid {
            if libc::WIFEXITED(status) {
                return (Some(libc::WEXITSTATUS(status)), None);
            }
            return (None, Some(libc::WTERMSIG(status)));
        }
        assert!(Instant::now() < deadline, "process {pid} did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A bundle with busybox-static's root filesystem and this process.
fn bundle(dir: &Path, process: serde_json::Value) -> PathBuf {
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let tar = SampleLayer::busybox_base()
        .expect("busybox-static")
        .to_tar()
        .unwrap();
    tar::Archive::new(&tar[..]).unpack(&rootfs).unwrap();
    write_config(&bundle, process);
    bundle
}

fn write_config(bundle: &Path, process: serde_json::Value) {
    let host_file = bundle.join("host-file");
    std::fs::write(&host_file, "from the host\n").unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "oci-test",
        "process": process,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts",
             "options": ["rbind", "ro"]},
            {"destination": "/run/new/host-file", "type": "bind", "source": host_file,
             "options": ["rbind", "rprivate"]},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
        "annotations": {"org.example": "x"},
    });
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
}

fn process(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin:/sbin:/usr/bin", "GREETING=hi"],
        "cwd": "/",
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
    })
}

/// Whether any process's command line mentions `text`.
fn process_mentioning(text: &str) -> Option<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(text).then(|| format!("{name}: {cmdline}"))
        })
}

#[test]
fn lifecycle_stdio_exec_and_sigterm() {
    if !common::kvm_available() {
        return;
    }
    become_subreaper();
    let mut rt = Runtime::new("life");
    let script = "echo out-$GREETING-$(hostname); echo err-line >&2; echo data > /tmp/f; \
                  trap 'echo got-term; exit 3' TERM; echo ready; \
                  while true; do sleep 1; done";
    let bundle = bundle(rt.dir.path(), process(&["sh", "-c", script], false));
    std::fs::write(bundle.join("rootfs/marker"), "bundle").unwrap();
    let pid = rt.create("c1", &bundle, &[]);
    // The pid engines get is the anchor: what they do through /proc/PID (podman cp, the
    // network hook) reaches the bundle and an empty network namespace, not the host.
    let through = |what: &str| PathBuf::from(format!("/proc/{pid}/{what}"));
    assert_eq!(
        std::fs::read_to_string(through("root/marker")).unwrap(),
        "bundle"
    );
    assert_ne!(
        std::fs::read_link(through("ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap()
    );
    // Joining its mount namespace (podman cp into a running container) lands in the
    // bundle too: the namespace's own root is the rootfs, not just the anchor's chroot.
    let joined = Command::new("nsenter")
        .arg(format!("--mount=/proc/{pid}/ns/mnt"))
        .args(["/bin/busybox", "cat", "/marker"])
        .output()
        .expect("run nsenter (util-linux)");
    assert_eq!(
        String::from_utf8_lossy(&joined.stdout),
        "bundle",
        "{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    let state = rt.state("c1");
    assert_eq!(state["status"], "created", "{state}");
    assert_eq!(state["pid"], pid);
    assert_eq!(state["id"], "c1");
    assert_eq!(state["bundle"], bundle.to_str().unwrap());
    assert_eq!(state["annotations"]["org.example"], "x");
    assert!(state["created"].as_str().unwrap().ends_with('Z'));
    // A second create of the same ID is refused; the first is untouched.
    let dup = rt.run(&["create", "--bundle", bundle.to_str().unwrap(), "c1"]);
    assert_eq!(dup.status.code(), Some(1));
    assert!(
        stderr_of(&dup).contains("container ID already exists"),
        "{}",
        describe(&dup)
    );
    let list = rt.run(&["list", "--format", "json"]);
    assert!(stdout_of(&list).contains("\"c1\""), "{}", describe(&list));

    let start = rt.run(&["start", "c1"]);
    assert!(start.status.success(), "{}", describe(&start));
    assert_eq!(rt.state("c1")["status"], "running");
    rt.wait_for_output("c1", "ready");
    assert!(
        rt.output("c1", "out").contains("out-hi-oci-test"),
        "{}",
        rt.output("c1", "out")
    );
    assert!(
        rt.output("c1", "err").contains("err-line"),
        "{}",
        rt.output("c1", "err")
    );
    let again = rt.run(&["start", "c1"]);
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));

    // exec in the foreground: same container (sees the file), its own status.
    let cat = rt.run(&["exec", "c1", "cat", "/tmp/f"]);
    assert!(cat.status.success(), "{}", describe(&cat));
    assert_eq!(stdout_of(&cat), "data\n");
    // Bind-mounted host files were copied in (read-only when the mount says ro), at
    // targets made for them when the image has none.
    let files = rt.run(&[
        "exec",
        "c1",
        "sh",
        "-c",
        "cat /run/new/host-file; echo x >> /run/new/host-file && echo rw; \
         echo x >> /etc/hosts || echo hosts-ro; cat /etc/hosts",
    ]);
    assert_eq!(
        stdout_of(&files),
        format!(
            "from the host\nrw\nhosts-ro\n{}",
            std::fs::read_to_string("/etc/hosts").unwrap()
        ),
        "{}",
        describe(&files)
    );
    let status = rt.run(&["exec", "--env", "X=4", "c1", "sh", "-c", "exit $X"]);
    assert_eq!(status.status.code(), Some(4), "{}", describe(&status));
    // exec --detach, as engines call it: the waiter in the pid file ends as the process.
    let exec_pid = rt.dir.join("exec.pid");
    let exec_out = rt.dir.join("exec.out");
    let mut cmd = rt.command(&["exec", "--detach", "--pid-file"]);
    cmd.arg(&exec_pid)
        .args(["c1", "sh", "-c", "echo detached-$(cat /tmp/f); exit 5"])
        .stdout(File::create(&exec_out).unwrap());
    assert!(status_of(cmd).success());
    let waiter: i32 = std::fs::read_to_string(&exec_pid).unwrap().parse().unwrap();
    assert_eq!(wait_for(waiter), (Some(5), None));
    assert_eq!(
        std::fs::read_to_string(&exec_out).unwrap(),
        "detached-data\n"
    );

    // SIGTERM reaches the process, whose exit status is the monitor's.
    let kill = rt.run(&["kill", "c1", "TERM"]);
    assert!(kill.status.success(), "{}", describe(&kill));
    assert_eq!(wait_for(pid), (Some(3), None));
    assert!(rt.output("c1", "out").contains("got-term"));
    let state = rt.state("c1");
    assert_eq!(state["status"], "stopped", "{state}");
    let late = rt.run(&["kill", "c1", "KILL"]);
    assert_eq!(late.status.code(), Some(1), "{}", describe(&late));

    let vsock = std::fs::read_to_string(rt.root.join("c1/state.json")).unwrap();
    let delete = rt.run(&["delete", "c1"]);
    assert!(delete.status.success(), "{}", describe(&delete));
    assert!(!rt.root.join("c1").exists());
    let gone = rt.run(&["delete", "c1"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        stderr_of(&gone).contains("does not exist"),
        "{}",
        describe(&gone)
    );
    // The shim deletes again with --force: quietly fine.
    assert!(rt.run(&["delete", "--force", "c1"]).status.success());
    // Nothing the container started is left: its VM's run directory names them all.
    let record: serde_json::Value = serde_json::from_str(&vsock).unwrap();
    let run_dir = Path::new(record["vsock"].as_str().unwrap())
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    assert_eq!(process_mentioning(&run_dir.to_string_lossy()), None);
    assert!(!run_dir.exists(), "{} is left", run_dir.display());
}

#[test]
fn terminal_through_the_console_socket_and_sigkill() {
    if !common::kvm_available() {
        return;
    }
    become_subreaper();
    let mut rt = Runtime::new("tty");
    let script = "if [ -t 0 ] && [ -t 1 ]; then echo on-a-tty; fi; stty size; sleep 1000";
    let mut p = process(&["sh", "-c", script], true);
    p["consoleSize"] = serde_json::json!({"height": 33, "width": 99});
    let bundle = bundle(rt.dir.path(), p);
    // Without a console socket a terminal cannot be had: refused before anything starts.
    let refused = rt.run(&["create", "--bundle", bundle.to_str().unwrap(), "t0"]);
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    assert!(
        stderr_of(&refused).contains("--console-socket"),
        "{}",
        describe(&refused)
    );
    assert!(!rt.root.join("t0").exists());

    let socket = rt.dir.join("console.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let receiver = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        hearth::oci::console::recv_fd(&stream).unwrap()
    });
    let pid = rt.create(
        "t1",
        &bundle,
        &["--console-socket", socket.to_str().unwrap()],
    );
    let (master, name) = receiver.join().unwrap();
    assert!(name.starts_with(b"/dev/pts/"), "{name:?}");
    let start = rt.run(&["start", "t1"]);
    assert!(start.status.success(), "{}", describe(&start));
    let mut master = File::from(master);
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(120);
        while !String::from_utf8_lossy(&seen).contains("33 99") && Instant::now() < deadline {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        (String::from_utf8_lossy(&seen).into_owned(), master)
    });
    let (seen, _master) = reader.join().unwrap();
    assert!(seen.contains("on-a-tty"), "{seen:?}");
    assert!(seen.contains("33 99"), "{seen:?}");

    let kill = rt.run(&["kill", "t1", "9"]);
    assert!(kill.status.success(), "{}", describe(&kill));
    // The monitor dies of the same signal, as runc's init would.
    assert_eq!(wait_for(pid), (None, Some(libc::SIGKILL)));
    assert_eq!(rt.state("t1")["status"], "stopped");
    assert!(rt.run(&["delete", "t1"]).status.success());
}

#[test]
fn bad_bundles_fail_clearly_and_leave_nothing() {
    let rt = Runtime::new("bad");
    let good = process(&["true"], false);
    let make = |name: &str| {
        let dir = rt.dir.join(name);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        dir
    };
    let no_config = make("no-config");
    let bad_json = make("bad-json");
    std::fs::write(bad_json.join("config.json"), "{\"ociVersion\": ").unwrap();
    let no_rootfs = make("no-rootfs");
    write_config(&no_rootfs, good.clone());
    std::fs::remove_dir(no_rootfs.join("rootfs")).unwrap();
    let username = make("username");
    let mut p = good.clone();
    p["user"]["username"] = "nobody".into();
    write_config(&username, p);
    let relative_cwd = make("relative-cwd");
    let mut p = good.clone();
    p["cwd"] = "work".into();
    write_config(&relative_cwd, p);
    let cases = [
        (&no_config, "config.json: No such file"),
        (&bad_json, "invalid JSON"),
        (&no_rootfs, "root.path: "),
        (&username, "process.user.username"),
        (&relative_cwd, "process.cwd \"work\""),
    ];
    let log = rt.dir.join("log.json");
    for (i, (bundle, want)) in cases.iter().enumerate() {
        let id = format!("bad{i}");
        let out = rt.run(&[
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "create",
            "--bundle",
            bundle.to_str().unwrap(),
            "--pid-file",
            rt.dir.join("bad.pid").to_str().unwrap(),
            &id,
        ]);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(stderr.contains(want), "{want:?} not in {stderr:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        let last = std::fs::read_to_string(&log).unwrap();
        let line: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
        assert_eq!(line["level"], "error");
        assert!(line["msg"].as_str().unwrap().contains(want), "{line}");
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
        assert!(!rt.root.join(&id).exists(), "state of {id} left");
        assert!(!rt.dir.join("bad.pid").exists());
        assert_eq!(process_mentioning(&format!("__monitor {id}")), None);
    }
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        cases.len()
    );
    // A text log gets a readable line.
    let text_log = rt.dir.join("log.txt");
    let out = rt.run(&["--log", text_log.to_str().unwrap(), "state", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let text = std::fs::read_to_string(&text_log).unwrap();
    assert!(
        text.contains("error: container \"nope\" does not exist"),
        "{text}"
    );
    // Usage errors: one line, status 1, no panic.
    for args in [
        &["frob"][..],
        &["kill", "x", "SIGNOPE"],
        &["create"],
        &["create", "a/b"],
    ] {
        let out = rt.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        assert_eq!(stderr_of(&out).lines().count(), 1, "{}", describe(&out));
    }
    let version = rt.run(&["--version"]);
    assert!(stdout_of(&version).starts_with("hearth-oci version "));
    assert!(stdout_of(&version).contains("\nspec: 1."));
    let features: serde_json::Value =
        serde_json::from_slice(&rt.run(&["features"]).stdout).unwrap();
    assert_eq!(features["ociVersionMin"], "1.0.0");
}

#[test]
fn the_hearth_oci_program_name_is_the_runtime() {
    let dir = TempDir::short("oci-name");
    let link = dir.join("hearth-oci");
    std::os::unix::fs::symlink(common::HEARTH, &link).unwrap();
    let out = common::run_with_timeout(
        {
            let mut cmd = Command::new(&link);
            cmd.arg("--version");
            cmd
        },
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout_of(&out).starts_with("hearth-oci version "));
}
