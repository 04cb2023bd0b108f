//! Writes `fuzz/fixtures/counter.state`: the state file of a real snapshot, the one the
//! `snapshot_state` seeds are made from. It boots the tiny `counter` payload (one vCPU,
//! 32 MiB, a disk and a vsock device), lets it count, pauses it, snapshots it with a
//! configuration document as the front end's, and stops it.
//!
//! Needs /dev/kvm and gcc/ld/objcopy (the payloads are built from `tests/payloads/`). Run
//! it when the state file's format or the VM's saved state changes, then rewrite the seeds:
//!
//! ```sh
//! cargo run --release --example gen_state_file && cargo run --release --example gen_seeds
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth::bench::fixtures::payloads::{self, Format};
use hearth::config::{SerialConfig, SpecError, VmConfig};
use hearth::exit::ExitReason;
use hearth::vmm::{ControlHook, RunState, Vmm};

/// Pauses the VM once it has printed `count 3`, then snapshots it and ends the run.
struct SnapshotOnce {
    log: PathBuf,
    state: PathBuf,
    mem: PathBuf,
    frontend: String,
    deadline: Instant,
    result: Option<Result<u64, String>>,
}

impl SnapshotOnce {
    fn take(&mut self, vmm: &mut Vmm) -> Result<u64, String> {
        vmm.pause().map_err(|e| hearth::error_chain(&e))?;
        let saved = vmm
            .snapshot(&self.state, &self.mem, Some(self.frontend.clone()))
            .map_err(|e| hearth::error_chain(&e))?;
        Ok(saved.state_bytes)
    }
}

impl ControlHook for SnapshotOnce {
    fn after_events(&mut self, vmm: &mut Vmm) {
        if self.result.is_some() || vmm.state() != RunState::Running {
            return;
        }
        let printed = std::fs::read_to_string(&self.log).unwrap_or_default();
        if printed.contains("count 3\n") {
            self.result = Some(self.take(vmm));
        } else if Instant::now() < self.deadline {
            return;
        } else {
            self.result = Some(Err(format!("the guest printed only {printed:?}")));
        }
        vmm.exit_signal().request(ExitReason::Signal(libc::SIGTERM));
    }
}

fn main() {
    if let Err(e) = generate() {
        eprintln!("gen_state_file: {e}");
        std::process::exit(1);
    }
}

fn generate() -> Result<(), String> {
    let work = std::env::temp_dir().join(format!("hearth-gen-state-{}", std::process::id()));
    let result = generate_in(&work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn generate_in(work: &Path) -> Result<(), String> {
    let spec = payloads::find("counter", Format::Elf64).map_err(|e| hearth::error_chain(&e))?;
    payloads::build(&[spec], work).map_err(|e| hearth::error_chain(&e))?;
    let kernel = payloads::path(work, "counter", Format::Elf64);
    let log = work.join("serial.log");
    // A disk and a vsock device, so the saved state has virtio devices (the payload does
    // not drive them: their transports are as the builder left them).
    let disk = work.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(|e| e.to_string())?;
    let mut config = VmConfig::new(kernel);
    config.mem_size = 32 << 20;
    config.serial = SerialConfig::File(log.clone());
    config.disks = vec![format!("path={},id=scratch", disk.display())
        .parse()
        .map_err(|e: SpecError| hearth::error_chain(&e))?];
    config.vsock = Some(
        format!("cid=3,socket={}", work.join("v.sock").display())
            .parse()
            .map_err(|e: SpecError| hearth::error_chain(&e))?,
    );
    config.validate().map_err(|e| hearth::error_chain(&e))?;
    // What the API would save beside the devices: its configuration document.
    let frontend = serde_json::to_string(&config).map_err(|e| e.to_string())?;
    let vmm =
        hearth::builder::build_vm(&config, Instant::now()).map_err(|e| hearth::error_chain(&e))?;

    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/counter.state");
    std::fs::create_dir_all(fixture.parent().expect("a parent")).map_err(|e| e.to_string())?;
    let mut hook = SnapshotOnce {
        log,
        state: fixture.clone(),
        mem: work.join("counter.mem"),
        frontend,
        deadline: Instant::now() + Duration::from_secs(60),
        result: None,
    };
    vmm.run_with(&mut hook)
        .map_err(|e| hearth::error_chain(&e))?;
    let bytes = hook.result.ok_or("the VM ended before the snapshot")??;
    println!("{} ({bytes} bytes)", fixture.display());
    Ok(())
}
