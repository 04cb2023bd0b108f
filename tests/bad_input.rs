//! hearth's answer to bad input: exit status 1 and exactly one `hearth: ...` line on stderr
//! that names the offending flag, path or value (exit 2 for clap usage errors), and never a
//! panic.
//!
//! Cases that hearth may only detect once it has opened /dev/kvm skip without KVM: on such
//! a machine hearth may fairly report the missing /dev/kvm first.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    announce_skip, describe, hearth, kvm_available, payload, run_hearth, run_payload,
    run_with_timeout, stderr_of, Format, Need, TempDir, PAYLOAD_MEMORY, RUN_TIMEOUT,
};

/// Asserts hearth's own error report: exit 1, stderr exactly one non-empty line starting
/// with `hearth: ` and mentioning at least one of `needles` (case-insensitive), no panic.
#[track_caller]
fn assert_input_error(out: &Output, needles: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit status 1\n{}",
        describe(out)
    );
    let stderr = stderr_of(out);
    let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "expected exactly one line on stderr\n{}",
        describe(out)
    );
    assert!(
        line.starts_with("hearth: "),
        "expected the line to start with \"hearth: \"\n{}",
        describe(out)
    );
    assert_mentions(out, needles);
}

/// Asserts the input was rejected either by hearth itself (as [`assert_input_error`]) or by
/// clap's argument parsing (exit 2, multi-line output allowed), naming one of `needles`.
#[track_caller]
fn assert_rejected(out: &Output, needles: &[&str]) {
    if out.status.code() == Some(2) {
        assert_mentions(out, needles);
    } else {
        assert_input_error(out, needles);
    }
}

#[track_caller]
fn assert_mentions(out: &Output, needles: &[&str]) {
    let stderr = stderr_of(out);
    assert!(
        !stderr.contains("panicked"),
        "hearth panicked\n{}",
        describe(out)
    );
    let lower = stderr.to_lowercase();
    assert!(
        needles.iter().any(|n| lower.contains(&n.to_lowercase())),
        "expected stderr to mention one of {needles:?}\n{}",
        describe(out)
    );
}

fn hello_elf() -> PathBuf {
    payload("hello", Format::Elf64)
}

/// `path` as a string, for flags and for looking for it in error messages.
fn text(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

#[test]
fn missing_kernel_file() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("missing-kernel");
    let kernel = dir.join("no-such-vmlinux");
    let out = run_payload(&kernel, &[]);
    assert_input_error(&out, &[text(&kernel)]);
}

#[test]
fn kernel_is_a_directory() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("kernel-dir");
    let out = run_payload(dir.path(), &[]);
    assert_input_error(&out, &[text(dir.path())]);
}

#[test]
fn kernel_neither_elf_nor_bzimage() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("random-kernel");
    let kernel = dir.join("random.bin");
    // Deterministic noise (an LCG); byte 0 is not 0x7f and 0x202 is not "HdrS".
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect();
    noise[0] = 0;
    fs::write(&kernel, &noise).expect("write random kernel");
    let out = run_payload(&kernel, &[]);
    assert_input_error(&out, &[text(&kernel)]);
}

#[test]
fn truncated_elf() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("truncated-elf");
    let kernel = dir.join("truncated.elf");
    let elf = fs::read(hello_elf()).expect("read hello ELF");
    fs::write(&kernel, &elf[..100]).expect("write truncated ELF");
    let out = run_payload(&kernel, &[]);
    assert_input_error(&out, &[text(&kernel)]);
}

/// linux-loader does not check e_machine: hearth must.
#[test]
fn elf_for_another_machine() {
    if !kvm_available() {
        return;
    }
    const E_MACHINE: usize = 18;
    const EM_AARCH64: u16 = 0xb7;
    let dir = TempDir::new("aarch64-elf");
    let kernel = dir.join("aarch64.elf");
    let mut elf = fs::read(hello_elf()).expect("read hello ELF");
    elf[E_MACHINE..E_MACHINE + 2].copy_from_slice(&EM_AARCH64.to_le_bytes());
    fs::write(&kernel, &elf).expect("write patched ELF");
    let out = run_payload(&kernel, &[]);
    assert_input_error(&out, &[text(&kernel)]);
}

/// `--kernel-symbols` that is not a System.map (a text file), a stub System.map naming no
/// code, or no file at all, and a zero interval: one line naming the problem, before the
/// guest runs.
#[test]
fn kernel_symbols_unusable() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("bad-symbols");
    let prose = dir.join("notes.txt");
    fs::write(&prose, "not a symbol map\n").expect("write notes");
    let stub = dir.join("System.map");
    fs::write(
        &stub,
        "ffffffffffffffff B The real System.map is in the linux-image-6.1.0-57-cloud-amd64-dbg package\n",
    )
    .expect("write stub");
    let missing = dir.join("no-such-System.map");
    for symbols in [&prose, &stub, &missing] {
        let out = run_payload(
            &hello_elf(),
            &["--sample-rip", "5", "--kernel-symbols", text(symbols)],
        );
        assert_input_error(&out, &[text(symbols)]);
    }
    let out = run_payload(&hello_elf(), &["--sample-rip", "0"]);
    assert_input_error(&out, &["sampling interval"]);
}

#[test]
fn missing_initrd() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("missing-initrd");
    let initrd = dir.join("no-such-initrd.img");
    let out = run_payload(&hello_elf(), &["--initrd", text(&initrd)]);
    assert_input_error(&out, &[text(&initrd)]);
}

#[test]
fn initrd_larger_than_memory() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("big-initrd");
    let initrd = dir.join("big-initrd.img");
    // Sparse: 40 MiB long, no blocks written.
    File::create(&initrd)
        .and_then(|f| f.set_len(40 << 20))
        .expect("create sparse initrd");
    let out = run_payload(
        &hello_elf(),
        &["--memory", "32M", "--initrd", text(&initrd)],
    );
    assert_input_error(&out, &[text(&initrd), "initrd"]);
}

/// Runs hello with `--memory VALUE`.
fn run_with_memory(value: &str) -> Output {
    run_payload(&hello_elf(), &["--memory", value])
}

#[test]
fn zero_memory() {
    if !kvm_available() {
        return;
    }
    assert_rejected(&run_with_memory("0"), &["memory"]);
}

#[test]
fn memory_beyond_host_ram() {
    if !kvm_available() {
        return;
    }
    assert_input_error(&run_with_memory("1T"), &["memory", "1T"]);
}

#[test]
fn memory_with_unknown_suffix() {
    if !kvm_available() {
        return;
    }
    assert_rejected(&run_with_memory("12Q"), &["12Q"]);
}

#[test]
fn zero_cpus() {
    if !kvm_available() {
        return;
    }
    assert_rejected(&run_payload(&hello_elf(), &["--cpus", "0"]), &["cpus"]);
}

#[test]
fn cpus_above_kvm_maximum() {
    if !kvm_available() {
        return;
    }
    let out = run_payload(&hello_elf(), &["--cpus", "100000"]);
    assert_rejected(&out, &["100000", "cpus"]);
}

#[test]
fn cmdline_too_long() {
    if !kvm_available() {
        return;
    }
    let cmdline = "x".repeat(5000);
    let out = run_payload(&hello_elf(), &["--cmdline", &cmdline]);
    assert_input_error(&out, &["cmdline", "command line"]);
}

/// Runs hello with `HEARTH_KVM_DEVICE=device`.
fn run_with_kvm_device(device: &str) -> Output {
    let mut cmd = hearth();
    cmd.env("HEARTH_KVM_DEVICE", device)
        .arg("run")
        .arg("--kernel")
        .arg(hello_elf())
        .args(["--memory", PAYLOAD_MEMORY]);
    run_with_timeout(cmd, RUN_TIMEOUT)
}

#[test]
fn kvm_device_missing() {
    let out = run_with_kvm_device("/nonexistent/kvm");
    assert_input_error(&out, &["/nonexistent/kvm"]);
}

#[test]
fn kvm_device_is_not_kvm() {
    let out = run_with_kvm_device("/dev/null");
    assert_input_error(&out, &["/dev/null"]);
    assert_mentions(&out, &["kvm"]);
}

/// A user who may not open /dev/kvm (mode 0600, owned by root) gets EACCES. Runs hearth as
/// `nobody` through util-linux `setpriv`, from copies of the binary and the kernel that
/// `nobody` can reach.
#[test]
fn kvm_device_permission_denied() {
    const KVM: &str = "/dev/kvm";
    const NOBODY: &str = "65534";
    // /proc/self belongs to the process's effective user.
    let euid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    let kvm_mode = fs::metadata(KVM).map(|m| m.mode());
    let has_setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let skip = match kvm_mode {
        _ if euid != 0 => Some((Need::Root, "not running as root".to_owned())),
        Err(e) => Some((Need::Kvm, format!("{KVM}: {e}"))),
        Ok(mode) if mode & 0o006 != 0 => {
            Some((Need::Kvm, format!("{KVM} is accessible to others")))
        }
        Ok(_) if !has_setpriv => Some((Need::Tools, "setpriv (util-linux) not found".to_owned())),
        Ok(_) => None,
    };
    if let Some((need, reason)) = skip {
        announce_skip(need, &reason);
        return;
    }

    let dir = TempDir::new_in(&std::env::temp_dir(), "hearth-nobody");
    let binary = dir.join("hearth");
    let kernel = dir.join("hello.elf");
    fs::copy(env!("CARGO_BIN_EXE_hearth"), &binary).expect("copy hearth");
    fs::copy(hello_elf(), &kernel).expect("copy kernel");
    for (path, mode) in [
        (dir.path(), 0o755),
        (binary.as_path(), 0o755),
        (&kernel, 0o644),
    ] {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
    ])
    .arg(&binary)
    .arg("run")
    .arg("--kernel")
    .arg(&kernel)
    .args(["--memory", PAYLOAD_MEMORY])
    .env_remove("HEARTH_KVM_DEVICE");
    let out = run_with_timeout(cmd, RUN_TIMEOUT);
    assert_input_error(&out, &[KVM]);
    assert_mentions(&out, &["permission denied"]);
}

#[test]
fn missing_kernel_flag_is_usage_error() {
    let out = run_hearth(["run"], RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert_mentions(&out, &["--kernel"]);
}

#[test]
fn unknown_flag_is_usage_error() {
    let out = run_hearth(
        ["run", "--kernel", "/nonexistent", "--no-such-flag"],
        RUN_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert_mentions(&out, &["--no-such-flag"]);
}

#[test]
fn disk_image_size_not_a_multiple_of_512() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("odd-disk");
    let image = dir.join("odd.img");
    fs::write(&image, vec![0u8; 1000]).expect("write odd-sized image");
    let out = run_payload(&hello_elf(), &["--disk", &format!("path={}", text(&image))]);
    assert_input_error(&out, &[text(&image)]);
}

#[test]
fn missing_disk_image() {
    let dir = TempDir::new("missing-disk");
    let image = dir.join("no-such-disk.img");
    let out = run_payload(&hello_elf(), &["--disk", &format!("path={}", text(&image))]);
    assert_input_error(&out, &[text(&image)]);
}

#[test]
fn malformed_device_specs() {
    for (flag, spec) in [
        ("--disk", "ro=on"),
        ("--disk", "path=/dev/null,color=blue"),
        ("--net", "mac=52:54:00:12:34:56"),
        ("--net", "tap=tap0,mac=not-a-mac"),
    ] {
        let out = run_payload(&hello_elf(), &[flag, spec]);
        assert_input_error(&out, &[flag]);
    }
}

/// Writes `json` to a config file in `dir` and runs `hearth run --config` on it.
fn run_config_file(dir: &TempDir, json: &serde_json::Value) -> (PathBuf, Output) {
    let config = dir.join("vm.json");
    fs::write(&config, json.to_string()).expect("write config file");
    let out = run_hearth(["run", "--config", text(&config)], RUN_TIMEOUT);
    (config, out)
}

#[test]
fn config_file_with_an_unknown_field() {
    let dir = TempDir::new("config-unknown");
    let json = serde_json::json!({ "kernel": hello_elf(), "memory": "32M" });
    let (config, out) = run_config_file(&dir, &json);
    assert_input_error(&out, &[text(&config)]);
    assert_mentions(&out, &["unknown field `memory`"]);
}

/// A config file gets the checks the flags get, with the same words.
#[test]
fn config_file_is_validated_like_the_flags() {
    let dir = TempDir::new("config-validated");
    let kernel = dir.join("no-such-vmlinux");
    let (_, out) = run_config_file(&dir, &serde_json::json!({ "kernel": kernel }));
    assert_input_error(&out, &[text(&kernel)]);
    let from_flags = run_payload(&kernel, &[]);
    assert_eq!(stderr_of(&out), stderr_of(&from_flags));

    let json = serde_json::json!({ "kernel": hello_elf(), "vcpu_count": 0 });
    let (_, out) = run_config_file(&dir, &json);
    assert_input_error(&out, &["cpus"]);
}

#[test]
fn config_file_excludes_vm_flags() {
    let out = run_hearth(
        ["run", "--config", "/nonexistent/vm.json", "--cpus", "2"],
        RUN_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert_mentions(&out, &["--config"]);
}
