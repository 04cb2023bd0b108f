//! podman, docker and containerd running containers in hearth microVMs through
//! `hearth oci` (issue 13): each engine calls hearth exactly as it calls runc. Every
//! engine runs on its own temporary directories (tests/common/engines.rs), all offline,
//! on the busybox-static sample image.
//!
//! Each container is a VM restored from a template; the first one of a run makes the
//! template (a boot, a minute or two on a nested-PVM host). The tests run one at a time
//! and share the template directory.

mod common;

use std::process::{Command, Stdio};

use common::engines::{
    self, shell_words, succeed, Containerd, Dockerd, Engine, Podman, ENGINE_TIMEOUT, IMAGE,
};
use common::{describe, stdout_of, Running};

/// `podman run --rm --network none --pull never IMAGE ARGS...` (no network namespace
/// plumbing: the VM has no NIC; and never a registry).
fn podman_run<'a>(extra: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--rm", "--network", "none", "--pull", "never"];
    args.extend_from_slice(extra);
    args.push(IMAGE);
    args.extend_from_slice(command);
    args
}

#[test]
fn podman_runs_a_command_with_its_options_stdin_and_exit_status() {
    if !engines::can_run(Engine::Podman) {
        return;
    }
    let _turn = engines::one_at_a_time();
    let podman = Podman::new();

    let out = podman.output(podman_run(&[], &["echo", "hello"]));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout_of(&out), "hello\n", "{}", describe(&out));

    let mut cmd = podman.command();
    cmd.args(podman_run(
        &["-i", "-e", "GREETING=hi", "-w", "/tmp", "-u", "1000:1000"],
        &[
            "sh",
            "-c",
            "echo \"$GREETING $(pwd) $(id -u):$(id -g)\"; cat; echo to-stderr >&2; exit 7",
        ],
    ));
    let mut running = Running::start(cmd, Stdio::piped());
    running.send(b"piped through stdin\n");
    running.close_stdin();
    let out = running.finish(ENGINE_TIMEOUT);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert_eq!(
        stdout_of(&out),
        "hi /tmp 1000:1000\npiped through stdin\n",
        "{}",
        describe(&out)
    );
    assert!(
        common::stderr_of(&out).contains("to-stderr"),
        "{}",
        describe(&out)
    );
}

#[test]
fn podman_runs_a_container_on_a_terminal() {
    if !engines::can_run(Engine::Podman) {
        return;
    }
    let _turn = engines::one_at_a_time();
    let podman = Podman::new();
    // podman -t needs a terminal of its own: util-linux `script` gives it one.
    let podman_cmd = podman.command();
    let mut words = vec![podman_cmd.get_program().to_owned()];
    words.extend(podman_cmd.get_args().map(ToOwned::to_owned));
    words.extend(
        podman_run(
            &["-t"],
            &[
                "sh",
                "-c",
                "test -t 0 && test -t 1 && echo on-a-terminal; exit 4",
            ],
        )
        .into_iter()
        .map(Into::into),
    );
    let mut script = Command::new("script");
    script
        .args(["--quiet", "--return", "--command"])
        .arg(shell_words(&words))
        .arg("/dev/null");
    for (name, value) in podman_cmd.get_envs() {
        if let Some(value) = value {
            script.env(name, value);
        }
    }
    let out = common::run_with_timeout(script, ENGINE_TIMEOUT);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert!(
        stdout_of(&out).contains("on-a-terminal\r\n"),
        "{}",
        describe(&out)
    );
}

#[test]
fn podman_runs_a_detached_container_execs_into_it_and_stops_it() {
    if !engines::can_run(Engine::Podman) {
        return;
    }
    let _turn = engines::one_at_a_time();
    let podman = Podman::new();
    let mut run = podman.command();
    run.args([
        "run",
        "--detach",
        "--network",
        "none",
        "--pull",
        "never",
        IMAGE,
    ])
    .args([
        "sh",
        "-c",
        "trap 'echo got-term; exit 3' TERM; echo main > /tmp/written-by-main; \
         while :; do sleep 1; done",
    ]);
    let id = succeed(run, ENGINE_TIMEOUT).trim().to_owned();

    let mut ps = podman.command();
    ps.args(["ps", "--no-trunc", "--format", "{{.ID}} {{.Status}}"]);
    let listed = succeed(ps, ENGINE_TIMEOUT);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("Up")),
        "podman ps does not show {id} running:\n{listed}"
    );

    // The exec runs in the same container: it sees the main process's file. The main
    // process may not have written it yet when the first exec runs.
    let mut last = String::new();
    let saw_it = (0..30).any(|attempt| {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        let out = podman.output(["exec", &id, "cat", "/tmp/written-by-main"]);
        last = describe(&out);
        out.status.success() && stdout_of(&out) == "main\n"
    });
    assert!(saw_it, "exec never saw the main process's file: {last}");

    let mut exec = podman.command();
    exec.args(["exec", "-i", &id, "sh", "-c", "cat; exit 5"]);
    let mut running = Running::start(exec, Stdio::piped());
    running.send(b"into exec\n");
    running.close_stdin();
    let out = running.finish(ENGINE_TIMEOUT);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert_eq!(stdout_of(&out), "into exec\n", "{}", describe(&out));

    // SIGTERM reaches the shell's trap: status 3 (a SIGKILL after the timeout gives 137).
    let mut stop = podman.command();
    stop.args(["stop", "--time", "60", &id]);
    succeed(stop, ENGINE_TIMEOUT);
    let mut inspect = podman.command();
    inspect.args(["inspect", "--format", "{{.State.ExitCode}}", &id]);
    assert_eq!(succeed(inspect, ENGINE_TIMEOUT).trim(), "3");
    let mut logs = podman.command();
    logs.args(["logs", &id]);
    assert_eq!(succeed(logs, ENGINE_TIMEOUT), "got-term\n");

    let mut rm = podman.command();
    rm.args(["rm", &id]);
    succeed(rm, ENGINE_TIMEOUT);
    let mut ps = podman.command();
    ps.args(["ps", "--all", "--quiet", "--no-trunc"]);
    let left = succeed(ps, ENGINE_TIMEOUT);
    assert!(!left.contains(&id), "{id} still listed after rm:\n{left}");
}

#[test]
fn docker_runs_a_container_with_hearth_as_a_registered_runtime() {
    if !engines::can_run(Engine::Docker) {
        return;
    }
    let _turn = engines::one_at_a_time();
    let dockerd = Dockerd::start();
    let out = dockerd.output([
        "run",
        "--runtime",
        "hearth",
        "--rm",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "echo hello; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert_eq!(stdout_of(&out), "hello\n", "{}", describe(&out));
}

#[test]
fn containerd_runs_a_container_with_hearth_as_the_runc_binary() {
    if !engines::can_run(Engine::Containerd) {
        return;
    }
    let _turn = engines::one_at_a_time();
    let containerd = Containerd::start();
    let out = containerd.run("hearth-ctr-1", ["sh", "-c", "echo hello; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert_eq!(stdout_of(&out), "hello\n", "{}", describe(&out));
}
