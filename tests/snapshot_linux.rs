//! Snapshots of a Linux guest, in process: a guest that has mounted a virtio-blk disk is
//! paused and snapshotted in the middle of a command, and a VM restored from the snapshot
//! finishes the command through the restored devices (reading and writing the disk), with
//! its vsock device moved to a new socket. Needs the minimal guest kernel (see
//! tests/common/linux.rs) and e2fsprogs.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser as _;
use hearth::config::{RestoreConfig, SerialConfig};
use hearth::exit::ExitReason;
use hearth::vmm::{ControlChannel, ControlHook, RunState, Vmm};

use common::linux::{linux_args, make_ext4_image, minimal_guest, read_from_ext4_image};
use common::{kvm_available, TempDir};

/// Takes one snapshot once the VM is paused.
struct SnapshotWhenPaused {
    channel: ControlChannel,
    files: (PathBuf, PathBuf),
    saved: Sender<Result<hearth::snapshot::Saved, String>>,
    done: bool,
}

impl ControlHook for SnapshotWhenPaused {
    fn start(&mut self, vmm: &mut Vmm) {
        self.channel.start(vmm);
    }

    fn after_events(&mut self, vmm: &mut Vmm) {
        self.channel.after_events(vmm);
        if !self.done && vmm.state() == RunState::Paused {
            self.done = true;
            let saved = vmm
                .snapshot(&self.files.0, &self.files.1, None)
                .map_err(|e| hearth::error_chain(&e));
            let _ = self.saved.send(saved);
        }
    }
}

/// Waits until `log` holds `marker`, or the VM thread ended, or the time is up.
fn wait_for_marker(log: &Path, marker: &str, running: &thread::JoinHandle<impl Send>) {
    let deadline = Instant::now() + minimal_guest().timeout;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            return;
        }
        assert!(
            !running.is_finished(),
            "the VM ended before {marker}:\n{text}"
        );
        assert!(Instant::now() < deadline, "no {marker} in time:\n{text}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_restored_linux_guest_finishes_its_disk_io() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot-linux");
    let disk = make_ext4_image(dir.path(), "data", 32, &[("greeting.txt", "hello disk\n")]);
    let log = dir.join("console.log");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    // The guest is paused during the sleep; only the restored VM reads the file (so the
    // read goes through the restored virtio-blk device, not the page cache) and writes.
    // The markers are computed so the kernel's echo of its command line does not hold them.
    let command = concat!(
        r#"sh -c "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && echo READY-\$((40+2)) && "#,
        r#"sleep 4 && cat /mnt/d/greeting.txt && echo restored > /mnt/d/after.txt && "#,
        r#"umount /mnt/d && echo DONE-\$((50+5))""#
    );
    let args = linux_args(
        &minimal_guest(),
        command,
        &[
            "--memory",
            "128M",
            "--serial",
            &format!("file={}", log.display()),
            "--disk",
            &format!("path={}", disk.display()),
            "--vsock",
            &format!("cid=3,socket={}", dir.join("v.sock").display()),
        ],
    );
    let cli = hearth::cli::Cli::try_parse_from(std::iter::once("hearth".to_string()).chain(args))
        .expect("a valid command line");
    let Some(hearth::cli::Command::Run(run)) = cli.command else {
        panic!("not a run command");
    };
    let config = run.vm_config().expect("a valid config");

    let (controller, channel) = hearth::vmm::control_channel().expect("control channel");
    let (saved_tx, saved_rx) = mpsc::channel();
    let mut hook = SnapshotWhenPaused {
        channel,
        files: (state.clone(), mem.clone()),
        saved: saved_tx,
        done: false,
    };
    let (exit_tx, exit_rx) = mpsc::channel();
    let original = thread::spawn(move || {
        let vmm = hearth::builder::build_vm(&config, Instant::now()).expect("build the VM");
        exit_tx.send(vmm.exit_signal().clone()).unwrap();
        vmm.run_with(&mut hook)
    });
    let exit = exit_rx.recv().expect("the VM was built");
    wait_for_marker(&log, "READY-42", &original);
    controller.pause().expect("pause");
    let saved = saved_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the hook took the snapshot")
        .expect("the snapshot");
    exit.request(ExitReason::Signal(libc::SIGTERM));
    original.join().unwrap().expect("the original VM ran");
    let before = fs::read_to_string(&log).unwrap();
    assert!(!before.contains("DONE-55"), "{before}");
    assert!(saved.memory_data_bytes < 128 << 20);

    let restored_log = dir.join("restored.log");
    let mut restore = RestoreConfig::new(&state, &mem);
    restore.serial = SerialConfig::File(restored_log.clone());
    restore.vsock_uds_path = Some(dir.join("moved.sock"));
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
    assert!(after.contains("hello disk"), "{after}");
    assert!(after.contains("DONE-55"), "{after}");
    assert_eq!(reason, ExitReason::GuestExit(0), "{after}");
    assert_eq!(
        read_from_ext4_image(&disk, "/after.txt").as_deref(),
        Some("restored\n")
    );
}
