//! `hearth container run` and `hearth machine` end to end: OCI images built here from
//! Debian's busybox-static, run by the guest agent in real microVMs with the minimal
//! kernel. Each test boots at most one VM (a boot takes ~30-60 s on a nested-PVM host).
//!
//! The vsock paths are exercised both ways: a container VM's agent connects out to the
//! host listener `<socket>_1024`; a machine's agent listens and every host command
//! reaches it with `CONNECT 1024`.
//!
//! Fresh container VMs and machines are restored from templates (snapshots of booted
//! agent VMs) unless `--no-template`; the tests share one template directory, so each
//! VM shape boots once per run, and the tests that matter on both paths run on both.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::container::{assert_status, run};
use common::linux::{minimal_kernel, MINIMAL_TIMEOUT};
use common::{describe, stderr_of, stdout_of, Running};
use hearth::image::sample::{self, SampleLayer};

/// Where this test process keeps images, initramfs and machine state.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("container-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The state directory of this test run. It is deliberately deeper than a Unix socket
/// address holds (107 bytes), as a deep checkout or home directory makes it: a machine's
/// sockets live there.
fn state_dir(scratch: &Path) -> PathBuf {
    scratch
        .join("state")
        .join("deeper-than-a-unix-socket-address".repeat(3))
}

/// The templates every test of this run restores from (one boot per VM shape).
fn shared_templates() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("container-templates-{}", std::process::id()))
}

/// `hearth ARGS` with the cache, state and artifacts of this test run.
fn hearth(scratch: &Path) -> Command {
    common::container::hearth_in(
        &scratch.join("cache"),
        &shared_templates(),
        &state_dir(scratch),
    )
}

fn oci_image(dir: &Path, layers: &[SampleLayer]) -> PathBuf {
    let image = dir.join("busybox-oci");
    sample::busybox_oci_layout(&image, layers).expect("build the busybox OCI layout");
    image
}

#[test]
fn options_stdin_and_separate_streams_reach_a_restored_container() {
    options_stdin_and_separate_streams(&[]);
}

#[test]
fn options_stdin_and_separate_streams_reach_a_booted_container() {
    options_stdin_and_separate_streams(&["--no-template"]);
}

fn options_stdin_and_separate_streams(path: &[&str]) {
    let dir = scratch(&format!("options{}", path.join("")));
    let image = oci_image(&dir, &[]);
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run"])
        .args(path)
        .args(["-i", "-e", "GREETING=hi", "-w", "/work"])
        .args(["-u", "1000:1000"])
        .arg(&image)
        .args([
            "sh",
            "-c",
            "echo \"$GREETING $(pwd) $(id -u):$(id -g) pid=$$ host=$(hostname)\"; \
             echo to-stderr >&2; cat; exit 7",
        ]);
    let mut running = Running::start(cmd, Stdio::piped());
    running.send(b"piped through stdin\n");
    running.close_stdin();
    let out = running.finish(MINIMAL_TIMEOUT);
    assert_status(&out, 7);
    let stdout = stdout_of(&out);
    let mut lines = stdout.lines();
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with("hi /work 1000:1000 pid=1 host="),
        "{}",
        describe(&out)
    );
    assert_eq!(
        lines.next(),
        Some("piped through stdin"),
        "{}",
        describe(&out)
    );
    assert!(!stdout.contains("to-stderr"), "{}", describe(&out));
    assert!(stderr_of(&out).contains("to-stderr"), "{}", describe(&out));
}

#[test]
fn docker_save_tarball_runs_echo() {
    let dir = scratch("docker-save");
    let tarball = dir.join("busybox.tar");
    // A second layer deletes a file of the first: the container must not see it.
    let layers = [
        SampleLayer::new().file("etc/doomed", b"lower\n"),
        SampleLayer::new().whiteout("etc/doomed"),
    ];
    sample::busybox_docker_save(&tarball, &layers).expect("build the docker-save tarball");
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run"]).arg(&tarball).args([
        "sh",
        "-c",
        "echo hello; test -e /etc/doomed && echo doomed-visible; exit 0",
    ]);
    let out = run(cmd);
    assert_status(&out, 0);
    assert_eq!(stdout_of(&out), "hello\n", "{}", describe(&out));
}

#[test]
fn a_layer_that_leaves_the_root_is_refused() {
    let dir = scratch("traversal");
    let image = oci_image(&dir, &[SampleLayer::new().raw_file("../escaped", b"x")]);
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run"]).arg(&image).arg("true");
    let out = run(cmd);
    assert_status(&out, 125);
    let stderr = stderr_of(&out);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&out));
    assert!(stderr.contains("../escaped"), "{}", describe(&out));
    assert!(!dir.join("escaped").exists() && !dir.join("cache/escaped").exists());
}

#[test]
fn bad_container_arguments_fail_cleanly() {
    let dir = scratch("bad-args");
    for (args, expected) in [
        (
            vec!["container", "run", "/nonexistent/image", "true"],
            "/nonexistent/image",
        ),
        (
            vec!["container", "run", "-v", "/nonexistent:/x", "/tmp", "true"],
            "-v /nonexistent:/x",
        ),
        (
            vec!["container", "run", "--network", "bridge", "/tmp", "true"],
            "--network bridge",
        ),
        (
            vec!["container", "run", "--memory", "lots", "/tmp", "true"],
            "--memory",
        ),
        (vec!["machine", "stop", "no-such-machine"], "is not running"),
        (
            vec!["machine", "run", "no-such-machine", "--", "true"],
            "is not running",
        ),
        (vec!["machine", "start", "bad/name"], "invalid"),
        (
            vec![
                "container",
                "run",
                "--network",
                "none",
                "-p",
                "8080:80",
                "/tmp",
                "true",
            ],
            "--network none: -p needs --network user (the default)",
        ),
        (
            vec!["container", "run", "-p", "80", "/tmp", "true"],
            "-p: \"80\" is not [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]",
        ),
        (
            [
                &["container", "run", "--network", "none"][..],
                &["-v", "/tmp:/data"].repeat(14),
                &["/tmp", "true"],
            ]
            .concat(),
            "14 volumes: a container VM takes at most 13",
        ),
    ] {
        let mut cmd = hearth(&dir);
        cmd.args(&args);
        let out = run(cmd);
        assert_status(&out, 125);
        let stderr = stderr_of(&out);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {}", describe(&out));
        assert!(stderr.contains(expected), "{args:?}: {}", describe(&out));
    }
}

/// Where `hearth machine` keeps machine `name`'s state (console log, pid) for this test.
fn machine_dir(scratch: &Path, name: &str) -> PathBuf {
    state_dir(scratch).join("machines").join(name)
}

/// What machine `name`'s guest printed on its console so far ("" if nothing yet).
fn machine_console(scratch: &Path, name: &str) -> String {
    std::fs::read_to_string(machine_dir(scratch, name).join("console.log")).unwrap_or_default()
}

/// Kills a machine's VMM if the test fails before stopping it, so no VM outlives the test.
struct MachineGuard {
    scratch: PathBuf,
    name: String,
}

impl Drop for MachineGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the guest kernel said is the best clue to a failure inside the VM.
            let log = machine_console(&self.scratch, &self.name);
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- machine console (last 60 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let info = machine_dir(&self.scratch, &self.name).join("machine.json");
        let pid = std::fs::read_to_string(info)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["pid"].as_i64());
        if let Some(pid) = pid {
            // SAFETY: kill(2) on the pid hearth recorded for this test's own machine.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// A root filesystem directory holding `/avx_state` (tests/programs/avx_state.c, static).
fn avx_state_rootfs(scratch: &Path) -> PathBuf {
    let root = scratch.join("avx-root");
    std::fs::create_dir_all(&root).unwrap();
    common::build_static_program("avx_state", &root.join("avx_state"));
    root
}

#[test]
fn a_machine_hosts_isolated_containers() {
    let dir = scratch("machine");
    let image = oci_image(&dir, &[]);
    let name = format!("t{}", std::process::id());
    let mut start = hearth(&dir);
    start.args(["machine", "start", &name, "--memory", "384M"]);
    let guard = MachineGuard {
        scratch: dir.clone(),
        name: name.clone(),
    };
    let out = run(start);
    assert_status(&out, 0);

    // The machine's VMM serves Firecracker's API in the machine's state directory.
    let mut cmd = hearth(&dir);
    cmd.args(["remote", "--api-sock"])
        .arg(machine_dir(&dir, &name).join("api.sock"))
        .arg("info");
    let out = run(cmd);
    assert_status(&out, 0);
    assert!(stdout_of(&out).contains("Running"), "{}", describe(&out));

    // ... and user space's AVX registers survive task switches and signal handlers.
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "--machine", &name])
        .arg(avx_state_rootfs(&dir))
        .args(["/avx_state", "3", "3"]);
    let out = run(cmd);
    assert_status(&out, 0);
    let verdict = stdout_of(&out);
    assert!(
        verdict.contains("avx state intact") || verdict.contains("no AVX here"),
        "{}",
        describe(&out)
    );

    // The machine itself runs Linux.
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "run", &name, "--", "uname", "-s"]);
    let out = run(cmd);
    assert_status(&out, 0);
    assert_eq!(stdout_of(&out), "Linux\n");

    // Container a keeps running (and marks its filesystem) while b looks around.
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "--machine", &name, "--name", "a"])
        .arg(&image)
        .args([
            "sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; touch /only-in-a; echo ready; sleep 600 & wait",
        ]);
    let a = Running::start(cmd, Stdio::null());
    a.expect_stdout_within(b"ready\n", Duration::from_secs(120));

    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "--machine", &name, "--name", "b"])
        .arg(&image)
        .args([
            "sh",
            "-c",
            "echo pid=$$; ls /only-in-a 2>/dev/null || echo no-file; ps -o pid,args",
        ]);
    let out = run(cmd);
    assert_status(&out, 0);
    let stdout = stdout_of(&out);
    assert!(stdout.starts_with("pid=1\nno-file\n"), "{}", describe(&out));
    assert!(
        !stdout.contains("sleep"),
        "b sees a's process\n{}",
        describe(&out)
    );

    // Inside a, its own processes and files are there.
    let mut cmd = hearth(&dir);
    cmd.args([
        "machine",
        "exec",
        &name,
        "a",
        "--",
        "sh",
        "-c",
        "ls /only-in-a; ps -o pid,args",
    ]);
    let out = run(cmd);
    assert_status(&out, 0);
    assert!(stdout_of(&out).contains("/only-in-a"), "{}", describe(&out));
    assert!(stdout_of(&out).contains("sleep 600"), "{}", describe(&out));

    // SIGTERM to the front end reaches the container's process.
    a.signal(libc::SIGTERM);
    let a = a.finish(Duration::from_secs(60));
    assert_status(&a, 42);
    assert!(stdout_of(&a).contains("got-term"), "{}", describe(&a));

    // `list` shows the machine; `stop` ends it.
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "list"]);
    let out = run(cmd);
    assert!(
        stdout_of(&out)
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("running")),
        "{}",
        describe(&out)
    );
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "stop", &name]);
    let out = run(cmd);
    assert_status(&out, 0);
    std::mem::forget(guard);
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "list"]);
    let out = run(cmd);
    assert!(!stdout_of(&out).contains(&name), "{}", describe(&out));
}

/// Volumes (a directory copied into a writable disk with `:copy`, an ext4 image
/// read-only) and a NIC
/// on a tap in a network namespace this test creates, with the address given on the
/// command line: the container sees and uses each, restored or booted alike.
fn volumes_and_network(path: &[&str]) -> Option<String> {
    use common::netns::{net_tests_possible, NetNs};
    if !net_tests_possible() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must be able to run the network tests"
        );
        return None;
    }
    let dir = scratch(&format!("volumes{}{}", path.join(""), random_suffix()));
    let image = oci_image(&dir, &[]);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("in"), "from the host\n").unwrap();
    let ro_image = dir.join("ro.ext4");
    let ro_source = dir.join("ro-source");
    std::fs::create_dir_all(&ro_source).unwrap();
    std::fs::write(ro_source.join("fixed"), "read-only\n").unwrap();
    hearth::image::build_ext4(&ro_source, &ro_image, 1 << 20).expect("build an ext4 image");

    let ns = NetNs::new("hearth-ctest-");
    ns.add_tap("tap0", "10.77.0.1/24");
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run"])
        .args(path)
        .args(["--network", "tap=tap0,ip=10.77.0.2/24"])
        .arg("-v")
        .arg(format!("{}:/data:copy", data.display()))
        .arg("-v")
        .arg(format!("{}:/ro:ro", ro_image.display()))
        .arg(&image)
        .args([
            "sh",
            "-c",
            "cat /data/in /ro/fixed; echo written > /data/new && cat /data/new; \
             touch /ro/nope 2>/dev/null || echo ro-refused; \
             ping -c 1 -W 10 10.77.0.1 >/dev/null && echo ping-ok; \
             cat /sys/class/net/eth0/address",
        ]);
    let mut wrapped = ns.exec(&cmd);
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            wrapped.env(key, value);
        }
    }
    let out = run(wrapped);
    assert_status(&out, 0);
    let stdout = stdout_of(&out);
    let (expected, mac) = stdout.rsplit_once("ping-ok\n").unwrap_or_default();
    assert_eq!(
        expected,
        "from the host\nread-only\nwritten\nro-refused\n",
        "{}",
        describe(&out)
    );
    let mac = mac.trim().to_string();
    let first = u8::from_str_radix(mac.get(..2).unwrap_or_default(), 16).unwrap_or(1);
    assert!(
        mac.len() == 17 && first & 1 == 0 && first & 2 == 2,
        "eth0 has no local unicast MAC address: {mac:?}"
    );
    Some(mac)
}

/// A distinct suffix for the scratch directory of each call.
fn random_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("-{}", NEXT.fetch_add(1, Ordering::SeqCst))
}

#[test]
fn volumes_and_network_reach_restored_containers_with_macs_of_their_own() {
    if let Some(first) = volumes_and_network(&[]) {
        let second = volumes_and_network(&[]);
        assert_ne!(
            Some(first),
            second,
            "two clones of one template share a MAC address"
        );
    }
}

#[test]
fn volumes_and_network_reach_a_booted_container() {
    volumes_and_network(&["--no-template"]);
}

/// The bytes a container printed on the line after `prefix`.
fn line_after<'a>(stdout: &'a str, prefix: &str) -> Option<&'a str> {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .map(str::trim)
}

#[test]
fn two_clones_of_one_template_are_isolated_and_random() {
    let dir = scratch("clones");
    let image = oci_image(&dir, &[]);
    // Whichever clone starts first may make the template; both are restored from it.
    let script = "echo random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
                  echo boot=$(cat /proc/sys/kernel/random/boot_id)";
    let mut a = hearth(&dir);
    a.args(["container", "run"]).arg(&image).args([
        "sh",
        "-c",
        // PID 1 of its namespace: SIGTERM does nothing unless trapped.
        &format!("trap 'exit 0' TERM; {script}; touch /only-in-a; sleep 600 & echo ready; wait"),
    ]);
    let a = Running::start(a, Stdio::null());
    a.expect_stdout_within(b"ready\n", MINIMAL_TIMEOUT);

    let mut b = hearth(&dir);
    b.args(["container", "run"]).arg(&image).args([
        "sh",
        "-c",
        &format!("{script}; ls /only-in-a 2>/dev/null || echo no-file; ps -o args"),
    ]);
    let b = run(b);
    assert_status(&b, 0);
    assert!(
        !stderr_of(&b).contains("making template"),
        "the second clone made a template\n{}",
        describe(&b)
    );
    a.signal(libc::SIGTERM);
    let a = a.finish(Duration::from_secs(60));

    let (a_out, b_out) = (stdout_of(&a), stdout_of(&b));
    let random = |out: &str| line_after(out, "random=").unwrap_or_default().to_string();
    assert_eq!(random(&a_out).len(), 32, "{}", describe(&a));
    assert_eq!(random(&b_out).len(), 32, "{}", describe(&b));
    assert_ne!(
        random(&a_out),
        random(&b_out),
        "two clones read the same bytes from /dev/urandom"
    );
    assert!(
        b_out.contains("no-file\n"),
        "b sees a's file\n{}",
        describe(&b)
    );
    assert!(
        !b_out.contains("sleep 600"),
        "b sees a's process\n{}",
        describe(&b)
    );
}

#[test]
fn templates_follow_the_kernel_and_corrupt_ones_are_made_again() {
    let dir = scratch("template-life");
    let image = oci_image(&dir, &[]);
    // A template directory of this test's own: it corrupts and outdates its templates.
    let templates = dir.join("templates");
    let kernel = dir.join("vmlinux");
    std::fs::copy(minimal_kernel(), &kernel).unwrap();
    let container_run = |expect_making: bool, expect_warning: bool| {
        let mut cmd = hearth(&dir);
        cmd.env("HEARTH_TEMPLATES", &templates)
            .args(["container", "run", "--kernel"])
            .arg(&kernel)
            .arg(&image)
            .args(["echo", "ran"]);
        let out = run(cmd);
        assert_status(&out, 0);
        assert_eq!(stdout_of(&out), "ran\n", "{}", describe(&out));
        let stderr = stderr_of(&out);
        assert_eq!(
            stderr.contains("making template"),
            expect_making,
            "{}",
            describe(&out)
        );
        assert_eq!(
            stderr.contains("is unusable"),
            expect_warning,
            "{}",
            describe(&out)
        );
    };
    let template_list = || {
        let mut cmd = hearth(&dir);
        cmd.env("HEARTH_TEMPLATES", &templates)
            .args(["template", "list"]);
        let out = run(cmd);
        assert_status(&out, 0);
        stdout_of(&out)
    };
    container_run(true, false);
    container_run(false, false);
    let list = template_list();
    let ids: Vec<String> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{list}");
    assert!(list.contains("current"), "{list}");

    // A damaged state file is found out before it is used, and the template is made again.
    let state = templates.join(&ids[0]).join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    container_run(true, true);

    // Another kernel (here the same file, rewritten) gets a template of its own.
    let content = std::fs::read(&kernel).unwrap();
    std::fs::remove_file(&kernel).unwrap();
    std::fs::write(&kernel, content).unwrap();
    container_run(true, false);
    let list = template_list();
    assert_eq!(list.lines().count(), 3, "{list}");
    assert_eq!(list.matches("stale").count(), 1, "{list}");
    let mut prune = hearth(&dir);
    prune
        .env("HEARTH_TEMPLATES", &templates)
        .args(["template", "prune", "--stale"]);
    assert_status(&run(prune), 0);
    let list = template_list();
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(!list.contains("stale"), "{list}");
}

#[test]
fn a_booted_machine_runs_commands() {
    let dir = scratch("machine-booted");
    let name = format!("b{}", std::process::id());
    let guard = MachineGuard {
        scratch: dir.clone(),
        name: name.clone(),
    };
    let mut start = hearth(&dir);
    start.args(["machine", "start", &name, "--no-template"]);
    let out = run(start);
    assert_status(&out, 0);
    assert!(!stderr_of(&out).contains("template"), "{}", describe(&out));

    // The guest kernel keeps user space to the register state it saves: the agent warns
    // at boot otherwise (on nested PVM, AVX state would leak between guest tasks).
    let console = machine_console(&dir, &name);
    assert!(
        !console.contains("extended register state"),
        "console:\n{console}"
    );
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "run", &name, "--", "uname", "-s"]);
    let out = run(cmd);
    assert_status(&out, 0);
    assert_eq!(stdout_of(&out), "Linux\n");
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "stop", &name]);
    assert_status(&run(cmd), 0);
    std::mem::forget(guard);
}

/// The VMM of the container front end `front_end`: its child (`--no-jail`), or that
/// child's child once it has dropped root (the jailed VMM under the jail's supervisor).
fn container_vmm(front_end: u32, jailed: bool) -> u32 {
    let children = |pid: u32| -> Vec<u32> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        tasks
            .flatten()
            .map(|task| std::fs::read_to_string(task.path().join("children")).unwrap_or_default())
            .flat_map(|text| {
                text.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // The VMM's passt (user-mode networking) is its sibling under the jail's supervisor.
    let is_hearth = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "hearth")
    };
    loop {
        for child in children(front_end) {
            let candidates = if jailed { children(child) } else { vec![child] };
            if let Some(vmm) = candidates.into_iter().find(is_hearth) {
                if !jailed || status_field(vmm, "Uid:") != "0\t0\t0\t0" {
                    return vmm;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no VMM under the front end {front_end}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (status.lines())
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// Started as root, a container's VMM runs jailed: as `nobody`, without capabilities,
/// in a root that holds none of the host's files, and still mapping the template's
/// memory file (shared with every other clone); `--no-jail` runs it as hearth itself.
#[test]
fn a_container_vmm_is_jailed_unless_no_jail() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::announce_skip(common::Need::Root, "not root, so nothing is jailed");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = scratch("jailed");
    let image = oci_image(&dir, &[]);
    for jailed in [true, false] {
        let mut cmd = hearth(&dir);
        cmd.args(["container", "run", "-i"]);
        if !jailed {
            cmd.arg("--no-jail");
        }
        cmd.arg(&image)
            .args(["sh", "-c", "echo ready; read line; echo got $line"]);
        let mut running = Running::start(cmd, Stdio::piped());
        running.expect_stdout_within(b"ready\n", MINIMAL_TIMEOUT);
        let vmm = container_vmm(running.pid(), jailed);
        let uid = status_field(vmm, "Uid:");
        let cap_eff = status_field(vmm, "CapEff:");
        let host_etc = Path::new(&format!("/proc/{vmm}/root/etc")).exists();
        // The template's memory, mapped privately from the same file (so page cache
        // pages stay shared), jailed or not.
        let maps = std::fs::read_to_string(format!("/proc/{vmm}/maps")).unwrap_or_default();
        let mem_inodes: Vec<u64> = std::fs::read_dir(shared_templates())
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::metadata(t.path().join("mem")).ok())
            .map(|m| m.ino())
            .collect();
        let maps_template = maps.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() >= 6
                && fields[1].ends_with('p')
                && fields[4]
                    .parse()
                    .is_ok_and(|ino: u64| mem_inodes.contains(&ino))
        });
        running.send(b"bye\n");
        running.close_stdin();
        let out = running.finish(MINIMAL_TIMEOUT);
        assert_status(&out, 0);
        assert_eq!(stdout_of(&out), "ready\ngot bye\n", "{}", describe(&out));
        assert!(
            maps_template,
            "the VMM does not map the template's memory\n{maps}"
        );
        if jailed {
            assert_eq!(uid, "65534\t65534\t65534\t65534", "jailed VMM {vmm}");
            assert_eq!(cap_eff, "0000000000000000", "jailed VMM {vmm}");
            assert!(!host_etc, "the jailed VMM {vmm} sees the host's /etc");
        } else {
            assert_eq!(uid, "0\t0\t0\t0", "unjailed VMM {vmm}");
            assert_ne!(cap_eff, "0000000000000000", "unjailed VMM {vmm}");
            assert!(host_etc, "the unjailed VMM {vmm} has no /etc");
        }
    }
}
