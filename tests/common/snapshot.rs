//! Snapshots of a Linux guest taken in process: the VM runs on a thread of the test, with
//! a control hook that writes one snapshot once the test has paused it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::thread;
use std::time::{Duration, Instant};

use hearth::config::VmConfig;
use hearth::exit::ExitReason;
use hearth::snapshot::Saved;
use hearth::vmm::{ControlChannel, ControlHook, RunState, Vmm};

use super::linux::minimal_guest;

/// Takes one snapshot once the VM is paused.
struct SnapshotWhenPaused {
    channel: ControlChannel,
    files: (PathBuf, PathBuf),
    saved: Sender<Result<Saved, String>>,
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

/// Builds and runs `config` in process until its console `log` holds `marker`, then
/// pauses it, writes a snapshot to `state` and `mem`, and stops the VM.
pub fn snapshot_at_marker(
    config: VmConfig,
    log: &Path,
    marker: &str,
    state: &Path,
    mem: &Path,
) -> Saved {
    let (controller, channel) = hearth::vmm::control_channel().expect("control channel");
    let (saved_tx, saved_rx) = mpsc::channel();
    let mut hook = SnapshotWhenPaused {
        channel,
        files: (state.to_path_buf(), mem.to_path_buf()),
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
    wait_for_marker(log, marker, &original);
    controller.pause().expect("pause");
    let saved = saved_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the hook took the snapshot")
        .expect("the snapshot");
    exit.request(ExitReason::Signal(libc::SIGTERM));
    original.join().unwrap().expect("the original VM ran");
    saved
}
