//! Every thread of a running hearth VMM runs under a seccomp filter (`Seccomp: 2` in
//! `/proc/PID/task/*/status`), and none does with `--no-seccomp`. Which syscalls each
//! filter lets through is tested in the library (`seccomp::tests`); that the VMM lives
//! with them is what the other suites show, run with the filters on.

mod common;

use std::fs;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    assert_exit_code, assert_stdout_contains, kvm_available, payload, payload_command, Format,
    Running, TempDir, RUN_TIMEOUT,
};

/// The `Seccomp:` mode of every thread of `pid`, by thread name.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
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

/// Starts the echo payload on 2 vCPUs with an API socket (threads: main `hearth`,
/// vcpu0, vcpu1, api) and waits until it has printed its greeting.
fn start_vmm(dir: &TempDir, extra: &[&str]) -> Running {
    let kernel = payload("echo", Format::Elf64);
    let api = dir.join("api.sock");
    let api = api.to_str().expect("a UTF-8 temp path");
    let mut args = vec!["--cpus", "2", "--api-sock", api];
    args.extend_from_slice(extra);
    let vmm = Running::start(payload_command(&kernel, &args), Stdio::piped());
    vmm.expect_stdout(b"echo ready");
    vmm
}

/// Waits until every thread of `vmm` reports `mode` and the vCPU and API threads are
/// there; panics with what it last saw otherwise.
fn wait_for_modes(vmm: &Running, mode: &str) -> Vec<(String, String)> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let modes = thread_modes(vmm.pid());
        let names: Vec<&str> = modes.iter().map(|(name, _)| name.as_str()).collect();
        let complete = ["vcpu0", "vcpu1", "api"]
            .iter()
            .all(|thread| names.contains(thread));
        if complete && modes.iter().all(|(_, seen)| seen == mode) {
            return modes;
        }
        assert!(
            Instant::now() < deadline,
            "threads of the VMM never all showed Seccomp: {mode}: {modes:?}\n{}",
            vmm.describe_so_far()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn finish(mut vmm: Running) {
    vmm.send(b"q");
    let out = vmm.finish(RUN_TIMEOUT);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, "bye");
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::short("hearth-seccomp");
    let vmm = start_vmm(&dir, &[]);
    let modes = wait_for_modes(&vmm, "2");
    // KVM's own workers (`kvm-nx-lpage-recovery`) are tasks of the process too and are
    // counted with the rest: they are forked from a filtered thread.
    assert!(modes.iter().any(|(name, _)| name == "hearth"), "{modes:?}");
    finish(vmm);
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered_and_warns() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::short("hearth-seccomp");
    let vmm = start_vmm(&dir, &["--no-seccomp"]);
    wait_for_modes(&vmm, "0");
    assert!(
        vmm.describe_so_far().contains("warning: --no-seccomp"),
        "{}",
        vmm.describe_so_far()
    );
    finish(vmm);
}
