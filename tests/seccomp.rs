//! Every thread of a running hearth VMM runs under a seccomp filter (`Seccomp: 2` in
//! `/proc/PID/task/*/status`), and none does with `--no-seccomp`. Which syscalls each
//! filter lets through is tested in the library (`seccomp::tests`); that the VMM lives
//! with them is what the other suites show, run with the filters on.

mod common;

use std::process::Stdio;

use common::{
    assert_exit_code, assert_stdout_contains, kvm_available, payload, payload_command, Format,
    Running, TempDir, RUN_TIMEOUT,
};

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
    common::wait_for_seccomp(vmm.pid(), mode, &["vcpu0", "vcpu1", "api"], || {
        vmm.describe_so_far()
    })
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
