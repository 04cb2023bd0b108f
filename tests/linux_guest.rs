//! The Linux tier: real kernels booted to the test initramfs's /init, which runs the
//! command after ` -- ` on the kernel command line and reports its status through
//! hearth's control page. Few boots, generous timeouts, no timing assertions.
//!
//! Artifacts come from resources/ (the README's test command builds them first):
//! - `$HEARTH_GUEST_KERNEL`, default `$HEARTH_CACHE/kernel/current/vmlinux` (minimal kernel)
//! - `$HEARTH_STOCK_KERNEL`, default `$HEARTH_CACHE/stock/current/vmlinux` (Debian's)
//! - the initramfs is built here by resources/build-initramfs.sh.
//!
//! `$HEARTH_CACHE` defaults to `~/.cache/hearth`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use common::{assert_exit_code, describe, kvm_available, run_hearth, stderr_of, stdout_of};

/// Minimal kernel: ~30-50 s to init on a nested-PVM host, far less on VMX/SVM.
const MINIMAL_TIMEOUT: Duration = Duration::from_secs(600);
/// Debian's stock kernel: several minutes on a nested-PVM host.
const STOCK_TIMEOUT: Duration = Duration::from_secs(1800);

/// Boot options every test passes.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Options that spare a stock distro kernel minutes of emulated self-checks on a nested host
/// (see the README's nested-PVM notes). Harmless elsewhere.
const STOCK_SPEEDUPS: &str = "nokaslr mitigations=off init_on_alloc=0 nowatchdog \
    cryptomgr.notests lpj=4000000 tsc=reliable no_timer_check \
    initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,tracer_init_tracefs,\
kfunc_init,bpf_key_sig_kfuncs_init,bpf_rstat_kfunc_init,bpf_prog_test_run_init,\
bpf_tcp_ca_kfunc_init,cubictcp_register";

fn cache_dir() -> PathBuf {
    std::env::var_os("HEARTH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/hearth")
        })
}

/// An artifact from `$env` or the cache; a missing one fails the test with the fix.
fn artifact(env: &str, cache_relative: &str, how: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join(cache_relative));
    assert!(
        path.is_file(),
        "guest artifact {} is missing: run {how} (or set {env})",
        path.display()
    );
    path
}

fn minimal_kernel() -> PathBuf {
    artifact(
        "HEARTH_GUEST_KERNEL",
        "kernel/current/vmlinux",
        "resources/build-guest-kernel.sh",
    )
}

fn stock_kernel() -> PathBuf {
    artifact(
        "HEARTH_STOCK_KERNEL",
        "stock/current/vmlinux",
        "resources/fetch-stock-kernel.sh",
    )
}

/// The test initramfs, built once per test process.
fn initramfs() -> &'static Path {
    static INITRD: OnceLock<PathBuf> = OnceLock::new();
    INITRD.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("test-initramfs-{}.cpio", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/build-initramfs.sh");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run resources/build-initramfs.sh");
        assert!(status.success(), "building the test initramfs failed");
        out
    })
}

/// Boots `kernel` and runs `command` in the guest.
fn boot_linux(
    kernel: &Path,
    boot_args: &str,
    command: &str,
    extra: &[&str],
    timeout: Duration,
) -> Output {
    let cmdline = format!("{BASE_CMDLINE} {boot_args} -- {command}");
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initramfs().display().to_string(),
        "--cmdline".into(),
        cmdline,
        "--boot-timer".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_hearth(&args, timeout)
}

#[track_caller]
fn assert_booted(out: &Output) {
    assert!(
        stderr_of(out).contains("boot-timer:"),
        "the guest never signalled boot complete\n{}",
        describe(out)
    );
    assert!(
        stdout_of(out).contains("HEARTH-RUN"),
        "the test init never ran the command\n{}",
        describe(out)
    );
}

/// The line printed right after the marker line `marker` (the command echoes markers so
/// its output can be told apart from kernel messages).
fn line_after<'a>(stdout: &'a str, marker: &str) -> Option<&'a str> {
    let mut lines = stdout.lines().map(|l| l.trim_end_matches('\r'));
    lines.find(|l| l.trim() == marker)?;
    lines.next()
}

#[test]
fn minimal_kernel_runs_uname() {
    if !kvm_available() {
        return;
    }
    let out = boot_linux(
        &minimal_kernel(),
        "",
        "uname -a",
        &["--memory", "128M"],
        MINIMAL_TIMEOUT,
    );
    assert_exit_code(&out, 0);
    assert_booted(&out);
    assert!(
        stdout_of(&out)
            .lines()
            .any(|l| l.starts_with("Linux ") && l.contains("x86_64")),
        "no uname -a line\n{}",
        describe(&out)
    );
}

#[test]
fn minimal_kernel_sees_cpus_memory_and_returns_exit_status() {
    if !kvm_available() {
        return;
    }
    let command = r#"sh -c "echo NPROC; nproc; free -m; exit 3""#;
    let out = boot_linux(
        &minimal_kernel(),
        "",
        command,
        &["--cpus", "2", "--memory", "192M"],
        MINIMAL_TIMEOUT,
    );
    assert_exit_code(&out, 3);
    assert_booted(&out);
    let stdout = stdout_of(&out);
    assert_eq!(
        line_after(&stdout, "NPROC").map(str::trim),
        Some("2"),
        "nproc\n{}",
        describe(&out)
    );
    // `free` reports RAM minus what the kernel keeps for itself: a little under 192 MiB.
    let total: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Mem:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|total| total.parse().ok())
        .unwrap_or_else(|| panic!("no free -m total\n{}", describe(&out)));
    assert!(
        (150..=192).contains(&total),
        "free -m total {total} MiB does not reflect --memory 192M\n{}",
        describe(&out)
    );
}

#[test]
fn stock_debian_kernel_boots_to_init() {
    if !kvm_available() {
        return;
    }
    let out = boot_linux(
        &stock_kernel(),
        STOCK_SPEEDUPS,
        "uname -a",
        &["--memory", "256M"],
        STOCK_TIMEOUT,
    );
    assert_exit_code(&out, 0);
    assert_booted(&out);
    assert!(
        stdout_of(&out)
            .lines()
            .any(|l| l.starts_with("Linux ") && l.contains("cloud-amd64")),
        "no uname -a line from the Debian cloud kernel\n{}",
        describe(&out)
    );
}
