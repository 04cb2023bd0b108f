//! Helpers for tests that boot real Linux guests: where the kernels and the test
//! initramfs come from, the command line they get, and checks on what /init printed.
//!
//! Artifacts come from resources/ (the README's test command builds them first):
//! - `$HEARTH_GUEST_KERNEL`, default `$HEARTH_CACHE/kernel/current/vmlinux` (minimal kernel)
//! - `$HEARTH_STOCK_KERNEL`, default `$HEARTH_CACHE/stock/current/vmlinux` (Debian's)
//! - the initramfs is built here by resources/build-initramfs.sh (with the stock kernel's
//!   virtio modules for the stock variant).
//!
//! `$HEARTH_CACHE` defaults to `~/.cache/hearth`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use hearth::bench::fixtures::linux;

use super::{describe, run_hearth, stderr_of, stdout_of};

/// Minimal kernel: ~30-50 s to init on a nested-PVM host, far less on VMX/SVM.
pub const MINIMAL_TIMEOUT: Duration = Duration::from_secs(600);
/// Debian's stock kernel: several minutes on a nested-PVM host.
pub const STOCK_TIMEOUT: Duration = Duration::from_secs(1800);

/// Boot options every test passes.
pub const BASE_CMDLINE: &str = linux::BASE_CMDLINE;
/// Speed-ups for a stock distro kernel on a nested host that hearth leaves to the user because
/// they trade away security (see the README's "Nested PVM hosts"); the tests take that trade
/// for CI time. hearth's compat profile appends the safe ones itself.
pub const STOCK_SPEEDUPS: &str = "nokaslr mitigations=off init_on_alloc=0";
/// What the user typed besides the test init's command: nothing hearth's tests add.
pub const STOCK_USER_BOOT_ARGS: &str = "rdinit=/init";
/// The stock kernel with its mitigations on and told that its CPU may have MDS (no
/// ARCH_CAPABILITIES, so no MDS_NO): it then clears CPU buffers with VERW on every return to
/// user space, whatever the host's CPU reports. (`clearcpuid=` is merged with the compat
/// profile's own list.)
pub const STOCK_MDS_BOOT_ARGS: &str = "nokaslr init_on_alloc=0 clearcpuid=arch_capabilities";

/// A kernel found by the library's discovery (the one `hearth bench` uses); a missing
/// one fails the test with the command that builds it.
fn found(kernel: Result<PathBuf, linux::LinuxError>) -> PathBuf {
    kernel.unwrap_or_else(|e| panic!("{}", hearth::error_chain(&e)))
}

pub fn minimal_kernel() -> PathBuf {
    found(linux::minimal_kernel())
}

pub fn stock_kernel() -> PathBuf {
    found(linux::stock_kernel())
}

/// The stock kernel's modules the tests need (their dependencies come along).
pub const STOCK_TEST_MODULES: &str = "virtio_mmio virtio_blk";

/// Which test initramfs: plain, or with the stock kernel's virtio modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initramfs {
    Plain,
    StockModules,
}

/// The test initramfs, built once per test process.
pub fn initramfs(kind: Initramfs) -> &'static Path {
    static PLAIN: OnceLock<PathBuf> = OnceLock::new();
    static STOCK: OnceLock<PathBuf> = OnceLock::new();
    let cell = match kind {
        Initramfs::Plain => &PLAIN,
        Initramfs::StockModules => &STOCK,
    };
    cell.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "test-initramfs-{kind:?}-{}.cpio",
            std::process::id()
        ));
        let modules =
            (kind == Initramfs::StockModules).then(|| stock_kernel().with_file_name("modules"));
        // Only what the stock-kernel tests use: each module costs the emulated guest
        // kernel seconds to load on a nested-PVM host.
        let modules = modules.as_deref().map(|dir| (dir, STOCK_TEST_MODULES));
        if let Err(e) = linux::build_initramfs(&out, modules) {
            panic!(
                "building the test initramfs failed: {}",
                hearth::error_chain(&e)
            );
        }
        out
    })
}

/// A kernel and the initramfs that goes with it.
pub struct Guest {
    pub kernel: PathBuf,
    pub initramfs: Initramfs,
    /// Boot options on top of `BASE_CMDLINE`.
    pub boot_args: &'static str,
    pub timeout: Duration,
}

/// The minimal kernel from resources/.
pub fn minimal_guest() -> Guest {
    Guest {
        kernel: minimal_kernel(),
        initramfs: Initramfs::Plain,
        boot_args: "",
        timeout: MINIMAL_TIMEOUT,
    }
}

/// Debian's stock cloud kernel, which needs its virtio modules from the initramfs and
/// finds virtio-mmio devices only through ACPI.
pub fn stock_guest() -> Guest {
    Guest {
        kernel: stock_kernel(),
        initramfs: Initramfs::StockModules,
        boot_args: STOCK_SPEEDUPS,
        timeout: STOCK_TIMEOUT,
    }
}

/// Debian's stock cloud kernel on its VERW path ([`STOCK_MDS_BOOT_ARGS`]).
pub fn stock_mds_guest() -> Guest {
    Guest {
        boot_args: STOCK_MDS_BOOT_ARGS,
        ..stock_guest()
    }
}

/// Debian's stock kernel booted the way a user would: [`BASE_CMDLINE`] and `rdinit=/init`
/// only (the command still goes to the test init after ` -- `), so the guest gets no more
/// than what hearth appends itself, mitigations on.
pub fn stock_user_guest() -> Guest {
    Guest {
        boot_args: STOCK_USER_BOOT_ARGS,
        ..stock_guest()
    }
}

/// Boots `guest` and runs `command` in it (`extra` are more hearth flags).
pub fn boot_linux(guest: &Guest, command: &str, extra: &[&str]) -> Output {
    boot_kernel(
        &guest.kernel,
        initramfs(guest.initramfs),
        guest.boot_args,
        command,
        extra,
        guest.timeout,
    )
}

/// The hearth arguments ([`boot_linux`]'s) that boot `guest` and run `command` in it, for
/// tests that start hearth themselves (e.g. with [`super::Running`] and piped stdin).
pub fn linux_args(guest: &Guest, command: &str, extra: &[&str]) -> Vec<String> {
    hearth_args(
        &guest.kernel,
        initramfs(guest.initramfs),
        guest.boot_args,
        command,
        extra,
    )
}

/// Boots `kernel` with `initrd` and runs `command` in the guest.
fn boot_kernel(
    kernel: &Path,
    initrd: &Path,
    boot_args: &str,
    command: &str,
    extra: &[&str],
    timeout: Duration,
) -> Output {
    let args = hearth_args(kernel, initrd, boot_args, command, extra);
    run_hearth(&args, timeout)
}

fn hearth_args(
    kernel: &Path,
    initrd: &Path,
    boot_args: &str,
    command: &str,
    extra: &[&str],
) -> Vec<String> {
    let cmdline = format!("{BASE_CMDLINE} {boot_args} -- {command}");
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--cmdline".into(),
        cmdline,
        "--boot-timer".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[track_caller]
pub fn assert_booted(out: &Output) {
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

/// The guest ended the VM through ACPI S5 (`poweroff`); needs `--log-level info`, at which
/// hearth logs why the VM stopped.
#[track_caller]
pub fn assert_powered_off(out: &Output) {
    assert!(
        stderr_of(out).contains("guest powered off"),
        "the guest did not power off through ACPI\n{}",
        describe(out)
    );
}

/// The line printed right after the marker line `marker` (the command echoes markers so
/// its output can be told apart from kernel messages).
pub fn line_after<'a>(stdout: &'a str, marker: &str) -> Option<&'a str> {
    let mut lines = stdout.lines().map(|l| l.trim_end_matches('\r'));
    lines.find(|l| l.trim() == marker)?;
    lines.next()
}

/// An ext4 image of `size_mib` MiB holding `files` (name, contents), made with
/// `mkfs.ext4 -d` (e2fsprogs) in `dir`.
pub fn make_ext4_image<C: AsRef<[u8]>>(
    dir: &Path,
    name: &str,
    size_mib: u64,
    files: &[(&str, C)],
) -> PathBuf {
    let root = dir.join(format!("{name}.root"));
    std::fs::create_dir_all(&root).expect("create image root");
    for (file, contents) in files {
        std::fs::write(root.join(file), contents).expect("write image file");
        // Executables on the image (test programs) keep working: everything is 0755.
        std::fs::set_permissions(
            root.join(file),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("make image file executable");
    }
    let image = dir.join(format!("{name}.img"));
    let file = std::fs::File::create(&image).expect("create image");
    file.set_len(size_mib << 20).expect("size image");
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(status.success(), "mkfs.ext4 failed");
    image
}

/// A file's contents inside an ext4 image, read on the host with debugfs; None if absent.
pub fn read_from_ext4_image(image: &Path, path: &str) -> Option<String> {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let missing = String::from_utf8_lossy(&out.stderr).contains("File not found");
    (out.status.success() && !missing).then_some(text)
}

/// A cheap content fingerprint of a whole file (FNV-1a), to show it did not change.
pub fn fingerprint(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read file to fingerprint");
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
