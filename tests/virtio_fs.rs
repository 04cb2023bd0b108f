//! virtio-fs end to end with a real back end: QEMU's virtiofsd (Debian's
//! qemu-system-common), started here as root with its namespace sandbox. A Linux guest
//! mounts a host folder with `--fs`, reads what the host wrote and writes a file the host
//! then reads (through the hearth binary, seccomp filters on). And a guest paused and
//! snapshotted before it mounted anything (as a template is) is restored against a fresh
//! virtiofsd, and mounts and uses the folder after the restore. Needs the minimal guest
//! kernel with VIRTIO_FS (see tests/common/linux.rs).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser as _;
use hearth::config::{FsOverride, RestoreConfig, SerialConfig};
use hearth::exit::ExitReason;

use common::linux::{assert_booted, assert_powered_off, boot_linux, linux_args, minimal_guest};
use common::{announce_skip, assert_exit_code, describe, kvm_available, stdout_of, Need, TempDir};

const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

/// virtiofsd serving one folder on one socket; killed when dropped.
struct Virtiofsd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Virtiofsd {
    /// Starts a back end for `source` listening at `socket`, and waits for the socket.
    fn start(source: &Path, socket: &Path) -> Self {
        let log = socket.with_extension("log");
        let child = Command::new(VIRTIOFSD)
            .arg(format!("--socket-path={}", socket.display()))
            .args(["-o", &format!("source={}", source.display())])
            .args(["-o", "cache=auto", "-o", "sandbox=namespace"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("virtiofsd's log"))
            .spawn()
            .expect("start virtiofsd");
        let mut backend = Self {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Ok(Some(status)) = backend.child.try_wait() {
                panic!("virtiofsd exited ({status}):\n{}", backend.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no virtiofsd socket:\n{}",
                backend.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
        backend
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this host can run the tests: KVM, root (virtiofsd's sandbox), virtiofsd.
fn can_run() -> bool {
    if !kvm_available() {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        announce_skip(Need::Root, "virtiofsd's namespace sandbox needs root");
        return false;
    }
    if !Path::new(VIRTIOFSD).exists() {
        announce_skip(
            Need::Tools,
            &format!("{VIRTIOFSD} not found (Debian package qemu-system-common)"),
        );
        return false;
    }
    true
}

/// A host folder with one file in it.
fn shared_folder(dir: &TempDir) -> PathBuf {
    let share = dir.join("share");
    fs::create_dir_all(&share).unwrap();
    fs::write(share.join("from-host.txt"), "hello from the host\n").unwrap();
    share
}

#[test]
fn a_linux_guest_reads_and_writes_a_host_folder() {
    if !can_run() {
        return;
    }
    // Short: virtiofsd (and the front end's plain connect) cannot take a socket path
    // longer than a socket address holds, which a deep checkout's target dir exceeds.
    let dir = TempDir::short("virtio-fs");
    let share = shared_folder(&dir);
    let backend = Virtiofsd::start(&share, &dir.join("vfs.sock"));
    // The marker is computed so the kernel's echo of its command line does not hold it.
    let command = concat!(
        r#"sh -c "mkdir -p /mnt && mount -t virtiofs hostshare /mnt && "#,
        r#"cat /mnt/from-host.txt && echo written-by-guest > /mnt/from-guest.txt && "#,
        r#"umount /mnt && echo FS-DONE-\$((40+2)); poweroff -f; exit 9""#
    );
    let spec = format!("tag=hostshare,socket={}", backend.socket.display());
    let out = boot_linux(
        &minimal_guest(),
        command,
        &["--log-level", "info", "--memory", "128M", "--fs", &spec],
    );
    assert_exit_code(&out, 0);
    assert_booted(&out);
    assert_powered_off(&out);
    let stdout = stdout_of(&out);
    assert!(
        stdout.contains("hello from the host") && stdout.contains("FS-DONE-42"),
        "the guest did not read the host's file\n{}\nvirtiofsd:\n{}",
        describe(&out),
        backend.log_text()
    );
    assert_eq!(
        fs::read_to_string(share.join("from-guest.txt"))
            .ok()
            .as_deref(),
        Some("written-by-guest\n"),
        "the guest's file is not on the host\n{}",
        describe(&out)
    );
}

/// A guest whose virtio-fs driver probed the device but mounted nothing is paused and
/// snapshotted; its back end is killed; the VM restored against a fresh virtiofsd (the
/// restore must name it) mounts the folder and uses it.
#[test]
fn a_restored_guest_mounts_through_a_fresh_back_end() {
    if !can_run() {
        return;
    }
    let dir = TempDir::short("virtio-fs-restore");
    let share = shared_folder(&dir);
    let first = Virtiofsd::start(&share, &dir.join("first.sock"));
    let log = dir.join("console.log");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let command = concat!(
        r#"sh -c "mkdir -p /mnt && ls /sys/bus/virtio/drivers/virtiofs && "#,
        r#"echo READY-\$((40+2)) && sleep 4 && mount -t virtiofs hostshare /mnt && "#,
        r#"cat /mnt/from-host.txt && echo after-restore > /mnt/restored.txt && "#,
        r#"umount /mnt && echo DONE-\$((50+5))""#
    );
    let spec = format!("tag=hostshare,socket={}", first.socket.display());
    let args = linux_args(
        &minimal_guest(),
        command,
        &[
            "--memory",
            "128M",
            "--serial",
            &format!("file={}", log.display()),
            "--fs",
            &spec,
        ],
    );
    let cli = hearth::cli::Cli::try_parse_from(std::iter::once("hearth".to_string()).chain(args))
        .expect("a valid command line");
    let Some(hearth::cli::Command::Run(run)) = cli.command else {
        panic!("not a run command");
    };
    let config = run.vm_config().expect("a valid config");

    common::snapshot::snapshot_at_marker(config, &log, "READY-42", &state, &mem);
    drop(first);
    let before = fs::read_to_string(&log).unwrap();
    assert!(!before.contains("DONE-55"), "{before}");

    // Without a back end for the device, the restore is refused in one line.
    let mut restore = RestoreConfig::new(&state, &mem);
    let err = hearth::builder::build_from_snapshot(&restore, Instant::now())
        .err()
        .expect("a restore without a back end is refused");
    let text = hearth::error_chain(&err);
    assert!(
        text.contains("--fs-override hostshare=PATH") && !text.contains('\n'),
        "{text}"
    );

    let fresh = Virtiofsd::start(&share, &dir.join("fresh.sock"));
    let restored_log = dir.join("restored.log");
    restore.serial = SerialConfig::File(restored_log.clone());
    restore.fs = vec![FsOverride {
        tag: "hostshare".into(),
        socket: fresh.socket.clone(),
    }];
    restore.resume = true;
    restore.validate().expect("a valid restore config");
    let restored = thread::spawn(move || {
        let vmm = hearth::builder::build_from_snapshot(&restore, Instant::now())
            .map_err(|e| hearth::error_chain(&e))?;
        vmm.run().map_err(|e| hearth::error_chain(&e))
    });
    let reason = restored
        .join()
        .expect("the restored VM thread")
        .expect("the restored VM ran");
    let after = fs::read_to_string(&restored_log).unwrap_or_default();
    assert!(
        after.contains("hello from the host") && after.contains("DONE-55"),
        "{after}\nvirtiofsd:\n{}",
        fresh.log_text()
    );
    assert_eq!(reason, ExitReason::GuestExit(0), "{after}");
    assert_eq!(
        fs::read_to_string(share.join("restored.txt"))
            .ok()
            .as_deref(),
        Some("after-restore\n")
    );
}
