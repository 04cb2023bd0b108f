//! hearth against tiny freestanding guests (tests/payloads/): boot protocols, serial
//! output, exit paths, the boot-complete signal, the instructions the nested PVM host
//! cannot run without the VMM's help, vCPU start-up, RAM around the 32-bit MMIO hole,
//! pausing and resuming a VM through the library, and snapshots and restores. Console
//! input is in tests/console.rs.
//! Each test skips when /dev/kvm is unavailable.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser as _;
use hearth::exit::ExitReason;

use common::{
    assert_exit_code, assert_stdout_contains, describe, kvm_available, payload, pvm_host,
    run_hearth, run_payload, stderr_of, stdout_of, Format, TempDir, HELLO, MEMTOUCH_MEMORY,
    RUN_TIMEOUT,
};

/// Boots payload `name` in `format` with the default serial (stdio) plus `extra` flags.
fn boot(name: &str, format: Format, extra: &[&str]) -> Output {
    run_payload(&payload(name, format), extra)
}

#[track_caller]
fn assert_hello(format: Format) {
    let out = boot("hello", format, &[]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, HELLO);
}

#[test]
fn hello_elf64_prints_on_serial() {
    if !kvm_available() {
        return;
    }
    assert_hello(Format::Elf64);
}

#[test]
fn hello_pvh_prints_on_serial() {
    if !kvm_available() {
        return;
    }
    assert_hello(Format::Pvh);
}

#[test]
fn hello_bzimage_prints_on_serial() {
    if !kvm_available() {
        return;
    }
    assert_hello(Format::BzImage);
}

#[track_caller]
fn assert_payload_exits_with(name: &str, code: i32) {
    let out = boot(name, Format::Elf64, &[]);
    assert_exit_code(&out, code);
    assert!(
        !stdout_of(&out).contains("exit request ignored"),
        "{}",
        describe(&out)
    );
}

#[test]
fn exit_status_0_via_mmio() {
    if !kvm_available() {
        return;
    }
    assert_payload_exits_with("exit_0", 0);
}

#[test]
fn exit_status_7_via_mmio() {
    if !kvm_available() {
        return;
    }
    assert_payload_exits_with("exit_7", 7);
}

#[test]
fn exit_status_255_via_mmio() {
    if !kvm_available() {
        return;
    }
    assert_payload_exits_with("exit_255", 255);
}

#[test]
fn exit_status_42_via_port() {
    if !kvm_available() {
        return;
    }
    assert_payload_exits_with("exit_port_42", 42);
}

#[track_caller]
fn assert_boot_timer(name: &str) {
    let out = boot(name, Format::Elf64, &["--boot-timer"]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, "booted\n");
    assert!(
        stderr_of(&out).contains("boot-timer:"),
        "expected a boot-timer: line on stderr\n{}",
        describe(&out)
    );
}

#[test]
fn boot_timer_reports_mmio_boot_signal() {
    if !kvm_available() {
        return;
    }
    assert_boot_timer("boot_signal_mmio");
}

#[test]
fn boot_timer_reports_port_boot_signal() {
    if !kvm_available() {
        return;
    }
    assert_boot_timer("boot_signal_port");
}

#[test]
fn boot_signal_is_silent_without_boot_timer() {
    if !kvm_available() {
        return;
    }
    let out = boot("boot_signal_mmio", Format::Elf64, &[]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, "booted\n");
    assert!(
        !stderr_of(&out).contains("boot-timer:"),
        "boot-timer line without --boot-timer\n{}",
        describe(&out)
    );
}

#[test]
fn i8042_reset_exits_0() {
    if !kvm_available() {
        return;
    }
    let out = boot("reset", Format::Elf64, &[]);
    assert_exit_code(&out, 0);
    assert!(
        !stdout_of(&out).contains("reset ignored"),
        "{}",
        describe(&out)
    );
}

#[test]
fn triple_fault_exits_100() {
    if !kvm_available() {
        return;
    }
    let out = boot("triple_fault", Format::Elf64, &[]);
    assert_exit_code(&out, 100);
    let stderr = stderr_of(&out).to_lowercase();
    assert!(
        stderr.contains("triple fault") || stderr.contains("shutdown"),
        "expected stderr to mention the triple fault / shutdown\n{}",
        describe(&out)
    );
}

/// On the nested PVM host the emulator cannot run int3: hearth must step over it and
/// inject #BP so the guest's own handler runs.
#[test]
fn int3_reaches_guest_handler() {
    if !kvm_available() {
        return;
    }
    let out = boot("int3", Format::Elf64, &[]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, "int3 handled\nafter int3\n");
}

/// On the nested PVM host the emulator cannot run fwait: hearth must complete it.
#[test]
fn fwait_completes() {
    if !kvm_available() {
        return;
    }
    let out = boot("fwait", Format::Elf64, &[]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, "fwait ok\n");
}

/// VERW at CPL 0 (completed by hearth on the nested PVM host, whose emulator fails it) and
/// at CPL 3 (native everywhere): ZF is the architecture's answer for each selector.
#[test]
fn verw_sets_zf_as_the_architecture_does() {
    if !kvm_available() {
        return;
    }
    let out = boot("verw", Format::Elf64, &[]);
    assert_exit_code(&out, 0);
    assert_eq!(
        stdout_of(&out),
        "verw cpl0 memory kernel data: zf 1\n\
         verw cpl0 register null: zf 0\n\
         verw cpl0 register kernel code: zf 0\n\
         verw cpl0 register kernel data rpl 3: zf 0\n\
         verw cpl0 register user data: zf 1\n\
         verw cpl0 gs sib read-only data: zf 0\n\
         verw cpl0 register beyond gdt limit: zf 0\n\
         verw cpl3 memory user data: zf 1\n\
         verw cpl3 register kernel data: zf 0\n\
         verw done\n",
        "{}",
        describe(&out)
    );
}

/// Without the compat layer (`--cpu-profile host`) the nested PVM host stops at the first
/// VERW at CPL 0, so it is hearth that makes `verw_sets_zf_as_the_architecture_does`
/// pass there. Elsewhere the CPU runs VERW, so the test only runs on a PVM host.
#[test]
fn verw_needs_compat_on_pvm() {
    if !kvm_available() {
        return;
    }
    if !pvm_host() {
        return;
    }
    let out = boot("verw", Format::Elf64, &["--cpu-profile", "host"]);
    assert!(
        out.status.code().is_some_and(|c| c != 0)
            && stderr_of(&out).contains("could not emulate")
            && !stdout_of(&out).contains("verw cpl0"),
        "expected KVM to fail the first VERW without the compat layer\n{}",
        describe(&out)
    );
}

/// The BSP starts the second vCPU with INIT-SIPI-SIPI; the AP runs a real-mode trampoline
/// that bumps a counter (tests/payloads/smp.S). hearth must create the AP in the
/// wait-for-SIPI state and keep running it (KVM_RUN on an AP may return EAGAIN once).
#[test]
fn smp_second_cpu_starts() {
    if !kvm_available() {
        return;
    }
    let out = boot("smp", Format::Elf64, &["--cpus", "2"]);
    assert!(
        out.status.code() == Some(0) && stdout_of(&out).contains("smp: 2 cpus up\n"),
        "the AP did not come up. Exit 1 with \"smp: timeout\" means the AP never incremented \
         the counter (INIT/SIPI not delivered, AP vCPU not run, or its real-mode trampoline \
         not executed); exit 101 means the AP's code hit a KVM emulation error (real mode on \
         a PVM host)\n{}",
        describe(&out)
    );
}

/// Linux patches live code on SMP by writing int3 on an instruction's first byte and,
/// later, a byte of the new instruction, with no wait for the CPUs running it
/// (text_poke_bp). Here the AP flips a nop to int3 and back while the BSP calls it
/// (tests/payloads/textpoke.S). On the nested PVM host the int3 fails in KVM's emulator and
/// hearth completes it, although the AP has often put the nop back by then: hearth must
/// complete the int3 KVM fetched (the emulator keeps fetching it for a while, so running
/// the code again fails again) instead of stopping the VM. Elsewhere the CPU runs the int3
/// itself and the output is the same.
#[test]
fn code_another_vcpu_is_patching_keeps_running() {
    if !kvm_available() {
        return;
    }
    let out = boot("textpoke", Format::Elf64, &["--cpus", "2"]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(
        &out,
        "textpoke: 200000 calls through a site being patched\n",
    );
}

/// Many vCPUs are created and run; the APs wait for a SIPI that never comes while the BSP
/// prints and exits.
#[test]
fn many_vcpus_are_created() {
    if !kvm_available() {
        return;
    }
    let out = boot("hello", Format::Elf64, &["--cpus", "64"]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, HELLO);
}

/// With more than 3 GiB, RAM stops at the 32-bit MMIO hole and continues at 4 GiB: the
/// payload writes and reads back just below the hole and above 4 GiB, up to the last MiB.
#[test]
fn memory_above_the_mmio_hole_is_usable() {
    if !kvm_available() {
        return;
    }
    let out = boot("memtouch", Format::Elf64, &["--memory", MEMTOUCH_MEMORY]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, "memtouch ok\n");
}

#[test]
fn serial_file_receives_guest_output() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serial-file");
    let log = dir.join("serial.log");
    let serial = format!("file={}", log.display());
    let out = boot("hello", Format::Elf64, &["--serial", &serial]);
    assert_exit_code(&out, 0);
    let written = fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("read {}: {e}\n{}", log.display(), describe(&out)));
    assert!(
        written.contains(HELLO),
        "serial file holds {written:?}\n{}",
        describe(&out)
    );
    assert!(
        !stdout_of(&out).contains("Hello"),
        "guest output leaked to stdout\n{}",
        describe(&out)
    );
}

#[test]
fn serial_none_discards_guest_output() {
    if !kvm_available() {
        return;
    }
    let out = boot("hello", Format::Elf64, &["--serial", "none"]);
    assert_exit_code(&out, 0);
    assert!(
        out.stdout.is_empty(),
        "expected no stdout\n{}",
        describe(&out)
    );
}

/// User-mode SYSCALL/SYSRETQ end to end (tests/payloads/syscall.S): a kernel-like payload
/// with an upper-half #PF handler and SYSCALL entry drops to CPL 3, where SYSCALL (once,
/// then 100 times in a loop) must reach the entry at CPL 0 with GS swapped, and SYSRETQ
/// must return with RFLAGS and RSP intact. On the nested PVM host the CPU leaves a user
/// SYSCALL at CPL 3 and the fetch at LSTAR page-faults: hearth's compat layer completes it.
#[test]
fn syscall_from_user_mode_completes() {
    if !kvm_available() {
        return;
    }
    assert_syscall_payload_passes("syscall");
}

/// The same with a #PF handler that opens with `endbr64` (a kernel built with IBT), the
/// other prologue hearth steps over for an ordinary page fault (the payload's user-mode
/// read of a supervisor page).
#[test]
fn syscall_from_user_mode_completes_with_endbr64_pf_entry() {
    if !kvm_available() {
        return;
    }
    assert_syscall_payload_passes("syscall_endbr64");
}

#[track_caller]
fn assert_syscall_payload_passes(name: &str) {
    let out = boot(name, Format::Elf64, &[]);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, "syscall 1 from rip 0x");
    assert_stdout_contains(&out, ": user mode\n");
    assert_stdout_contains(&out, ": syscall ok\n");
}

/// Without the compat layer (`--cpu-profile host`) the nested PVM host does not complete
/// a user-mode SYSCALL: the payload's #PF handler sees the fault at LSTAR and exits 1. This
/// shows it is hearth that makes `syscall_from_user_mode_completes` pass there. Elsewhere
/// (VMX/SVM) SYSCALL works natively, so the test only runs on a PVM host.
#[test]
fn syscall_from_user_mode_needs_compat_on_pvm() {
    if !kvm_available() {
        return;
    }
    if !pvm_host() {
        return;
    }
    let out = boot("syscall", Format::Elf64, &["--cpu-profile", "host"]);
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "expected a non-zero exit status without the compat layer\n{}",
        describe(&out)
    );
    assert!(
        !stdout_of(&out).contains("syscall ok"),
        "user-mode SYSCALL completed without the compat layer\n{}",
        describe(&out)
    );
}

/// `hearth run --config FILE` boots what the flags would: hearth's JSON config file (with
/// an entropy device, which the payload leaves alone).
#[test]
fn config_file_boots_like_the_flags() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("config-file");
    let config = dir.join("vm.json");
    let kernel = payload("hello", Format::Elf64);
    let json = serde_json::json!({
        "kernel": kernel,
        "mem_size": "32M",
        "serial": "stdio",
        "cpu_profile": "auto",
        "rng": {},
    });
    fs::write(&config, json.to_string()).expect("write config file");
    let out = run_hearth(
        ["run".as_ref(), "--config".as_ref(), config.as_os_str()],
        RUN_TIMEOUT,
    );
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, HELLO);
}

/// `--sample-rip` samples the vCPU's RIP after the VMM's kicks and names the payload's
/// functions from its own symbol table: the counter spends nearly all its time spinning in
/// its `delay` loop, so each sample is logged at debug and `delay` leads the report at exit.
#[test]
fn rip_samples_name_the_payload_functions() {
    if !kvm_available() {
        return;
    }
    let out = boot(
        "counter_short",
        Format::Elf64,
        &[
            "--sample-rip",
            "5",
            "--log-level",
            "debug",
            "--serial",
            "none",
        ],
    );
    assert_exit_code(&out, 0);
    let stderr = stderr_of(&out);
    let samples: Vec<&str> = (stderr.lines())
        .filter(|line| line.contains("hearth::diag::sampler] vCPU 0 rip "))
        .collect();
    assert!(
        samples.len() >= 10,
        "expected a sample every 5 ms of a run of ~0.5 s:\n{stderr}"
    );
    assert!(
        samples.iter().any(|line| line.contains(" rip delay+0x")),
        "no sample names the payload's delay loop:\n{stderr}"
    );
    let leader = (stderr.lines())
        .skip_while(|line| !line.contains("vCPU 0: ") || !line.contains(" RIP samples in "))
        .nth(1)
        .unwrap_or_default();
    assert!(
        leader.ends_with(" delay"),
        "delay does not lead the report:\n{stderr}"
    );
}

/// The numbers the `counter` payload has printed so far, in order (a line still being
/// written is left out).
fn counts(log: &Path) -> Vec<u32> {
    common::counter_counts(&fs::read_to_string(log).unwrap_or_default())
}

/// Waits up to [`common::RUN_TIMEOUT`] until the payload has counted past `past`.
#[track_caller]
fn wait_for_count_past(log: &Path, past: u32) -> u32 {
    let deadline = Instant::now() + common::RUN_TIMEOUT;
    loop {
        if let Some(&last) = counts(log).last().filter(|&&n| n > past) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not count past {past}: {:?}",
            counts(log)
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Builds and runs the `counter` payload with `extra` options on a thread of its own
/// (the Vmm and its event loop stay on the thread that builds it), printing to `log`,
/// driven by `control`. Returns the VM's stop channel and its thread.
fn start_counter<C>(
    log: &Path,
    extra: &[&str],
    mut control: C,
) -> (
    std::sync::Arc<hearth::exit::ExitSignal>,
    thread::JoinHandle<Result<ExitReason, hearth::vmm::VmmError>>,
)
where
    C: hearth::vmm::ControlHook + Send + 'static,
{
    let kernel = payload("counter", Format::Elf64);
    let serial = format!("file={}", log.display());
    let mut argv: Vec<std::ffi::OsString> = ["hearth", "run", "--kernel"]
        .iter()
        .map(Into::into)
        .collect();
    argv.push(kernel.into_os_string());
    argv.extend(
        ["--memory", common::PAYLOAD_MEMORY, "--serial", &serial]
            .iter()
            .chain(extra)
            .map(Into::into),
    );
    let cli = hearth::cli::Cli::try_parse_from(argv).expect("a valid command line");
    let Some(hearth::cli::Command::Run(args)) = cli.command else {
        panic!("not a run command");
    };
    let config = args.vm_config().expect("a valid config");
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let running = thread::spawn(move || {
        let vmm = hearth::builder::build_vm(&config, Instant::now()).expect("build the VM");
        exit_tx
            .send(vmm.exit_signal().clone())
            .expect("the test thread waits");
        vmm.run_with(&mut control)
    });
    let exit = exit_rx.recv().expect("the VM was built");
    (exit, running)
}

/// Pause and resume through the library (`build_vm` and `Vmm::run_with` on one thread, a
/// `VmmController` on another), twice: a paused VM prints nothing for longer than
/// the compat layer's 250 ms kick interval, and a resumed one counts on from where it
/// stopped.
#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pause");
    let log = dir.join("serial.log");
    let (controller, channel) = hearth::vmm::control_channel().expect("control channel");
    let (exit, running) = start_counter(&log, &[], channel);

    let mut last = wait_for_count_past(&log, 2);
    for round in 1..=2 {
        controller.pause().expect("pause");
        let at_pause = fs::read(&log).expect("serial log");
        let paused_at = *counts(&log).last().expect("counted before the pause");
        assert!(paused_at >= last);
        thread::sleep(Duration::from_millis(600));
        assert_eq!(
            fs::read(&log).expect("serial log").len(),
            at_pause.len(),
            "round {round}: the guest printed while paused: {:?}",
            counts(&log)
        );
        controller.resume().expect("resume");
        last = wait_for_count_past(&log, paused_at + 2);
    }

    exit.request(ExitReason::Signal(libc::SIGTERM));
    let reason = running.join().expect("the VMM thread").expect("the VM ran");
    assert_eq!(reason, ExitReason::Signal(libc::SIGTERM));
    assert!(
        matches!(controller.pause(), Err(hearth::vmm::ControlError::Stopped)),
        "a stopped VM still answered"
    );
    let all = counts(&log);
    let expected: Vec<u32> = (1..=all.len() as u32).collect();
    assert_eq!(all, expected, "the count restarted or skipped");
    assert!(*all.last().unwrap() >= last);
}

/// A control hook of its own, as the API layer would write one: a `ControlChannel` for
/// pause and resume, plus, on the event-loop thread, the saving of a paused VM's vCPU and
/// device state.
struct SaveWhenPaused {
    channel: hearth::vmm::ControlChannel,
    saved: std::sync::mpsc::Sender<Result<SavedVm, String>>,
    done: bool,
}

struct SavedVm {
    vcpus: Vec<hearth::vstate::vcpu::VcpuState>,
    json_bytes: usize,
}

impl hearth::vmm::ControlHook for SaveWhenPaused {
    fn start(&mut self, vmm: &mut hearth::vmm::Vmm) {
        self.channel.start(vmm);
    }

    fn after_events(&mut self, vmm: &mut hearth::vmm::Vmm) {
        self.channel.after_events(vmm);
        if self.done || vmm.state() != hearth::vmm::RunState::Paused {
            return;
        }
        self.done = true;
        let saved = vmm
            .save_vcpu_states()
            .and_then(|vcpus| Ok((vcpus, vmm.save_vm_state()?)))
            .map(|(vcpus, vm)| SavedVm {
                json_bytes: serde_json::to_vec(&vcpus).unwrap().len()
                    + serde_json::to_vec(&vm).unwrap().len(),
                vcpus,
            })
            .map_err(|e| hearth::error_chain(&e));
        let _ = self.saved.send(saved);
    }
}

/// A paused two-vCPU VM hands out the state of both vCPUs (the AP still waiting for INIT,
/// parked out of KVM_RUN all the same) and of its devices, from a control
/// hook on the event-loop thread, and then runs on.
#[test]
fn a_paused_vm_saves_its_vcpus_and_devices() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("save");
    let log = dir.join("serial.log");
    let (controller, channel) = hearth::vmm::control_channel().expect("control channel");
    let (saved_tx, saved_rx) = std::sync::mpsc::channel();
    let hook = SaveWhenPaused {
        channel,
        saved: saved_tx,
        done: false,
    };
    let (exit, running) = start_counter(&log, &["--cpus", "2"], hook);

    let before = wait_for_count_past(&log, 2);
    controller.pause().expect("pause");
    let saved = saved_rx
        .recv_timeout(common::RUN_TIMEOUT)
        .expect("the hook saved the VM")
        .expect("the VM's state");
    controller.resume().expect("resume");
    wait_for_count_past(&log, before + 2);
    exit.request(ExitReason::Signal(libc::SIGTERM));
    running.join().expect("the VMM thread").expect("the VM ran");

    assert_eq!(saved.vcpus.len(), 2);
    let (bsp, ap) = (&saved.vcpus[0], &saved.vcpus[1]);
    // The BSP runs the payload (linked at 1 MiB); the AP was never sent INIT.
    assert!(
        (0x10_0000..0x20_0000).contains(&bsp.regs.rip),
        "BSP rip {:#x}",
        bsp.regs.rip
    );
    assert_eq!(bsp.mp_state.mp_state, kvm_bindings::KVM_MP_STATE_RUNNABLE);
    assert_eq!(
        ap.mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED
    );
    assert!(!bsp.msrs.is_empty());
    assert!(saved.json_bytes > 4096, "{} bytes", saved.json_bytes);
}

/// A control hook that takes one snapshot of the VM once it is paused.
struct SnapshotWhenPaused {
    channel: hearth::vmm::ControlChannel,
    state: std::path::PathBuf,
    mem: std::path::PathBuf,
    saved: std::sync::mpsc::Sender<Result<hearth::snapshot::Saved, String>>,
    done: bool,
}

impl hearth::vmm::ControlHook for SnapshotWhenPaused {
    fn start(&mut self, vmm: &mut hearth::vmm::Vmm) {
        self.channel.start(vmm);
    }

    fn after_events(&mut self, vmm: &mut hearth::vmm::Vmm) {
        self.channel.after_events(vmm);
        if self.done || vmm.state() != hearth::vmm::RunState::Paused {
            return;
        }
        self.done = true;
        let saved = vmm
            .snapshot(&self.state, &self.mem, None)
            .map_err(|e| hearth::error_chain(&e));
        let _ = self.saved.send(saved);
    }
}

/// A snapshot of the `counter` payload with `extra` options, taken once it has counted a
/// little: its state and memory files in `dir`, and what it had printed (the VM is
/// stopped after the snapshot, still paused).
struct CounterSnapshot {
    state: std::path::PathBuf,
    mem: std::path::PathBuf,
    printed: String,
    saved: hearth::snapshot::Saved,
}

fn snapshot_counter(dir: &Path, extra: &[&str]) -> CounterSnapshot {
    let log = dir.join("original.log");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let (controller, channel) = hearth::vmm::control_channel().expect("control channel");
    let (saved_tx, saved_rx) = std::sync::mpsc::channel();
    let hook = SnapshotWhenPaused {
        channel,
        state: state.clone(),
        mem: mem.clone(),
        saved: saved_tx,
        done: false,
    };
    let (exit, running) = start_counter(&log, extra, hook);
    wait_for_count_past(&log, 2);
    // A running VM is refused: only the hook, after the pause, takes the snapshot.
    controller.pause().expect("pause");
    let saved = saved_rx
        .recv_timeout(RUN_TIMEOUT)
        .expect("the hook took the snapshot")
        .expect("the snapshot");
    exit.request(ExitReason::Signal(libc::SIGTERM));
    running.join().expect("the VMM thread").expect("the VM ran");
    CounterSnapshot {
        state,
        mem,
        printed: fs::read_to_string(&log).expect("serial log"),
        saved,
    }
}

/// Builds a VM from a snapshot on a thread of its own and runs it with `control`.
fn restore_counter<C>(
    restore: hearth::config::RestoreConfig,
    mut control: C,
) -> (
    std::sync::Arc<hearth::exit::ExitSignal>,
    thread::JoinHandle<Result<ExitReason, hearth::vmm::VmmError>>,
)
where
    C: hearth::vmm::ControlHook + Send + 'static,
{
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let running = thread::spawn(move || {
        let vmm =
            hearth::builder::build_from_snapshot(&restore, Instant::now()).expect("restore the VM");
        exit_tx
            .send(vmm.exit_signal().clone())
            .expect("the test thread waits");
        vmm.run_with(&mut control)
    });
    let exit = exit_rx.recv().expect("the VM was restored");
    (exit, running)
}

/// What the original VM printed followed by what a restored one printed to `log`: one
/// count, as if the guest had never stopped (a line cut by the snapshot is finished in
/// `log`).
fn counts_after(printed: &str, log: &Path) -> Vec<u32> {
    common::counter_counts(&format!(
        "{printed}{}",
        fs::read_to_string(log).unwrap_or_default()
    ))
}

#[track_caller]
fn wait_for_counts_after(printed: &str, log: &Path, past: u32) -> Vec<u32> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let counts = counts_after(printed, log);
        if counts.last().is_some_and(|&n| n > past) {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "the restored guest did not count past {past}: {counts:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A two-vCPU VM with an entropy device, snapshotted while paused, writes a sparse memory
/// file and a small state file that holds the device; two VMs restored from the one
/// snapshot (one running at once, one paused until
/// its controller resumes it) both count on from where the original stopped.
#[test]
fn a_snapshot_restores_into_vms_that_count_on() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot");
    let snapshot = snapshot_counter(dir.path(), &["--cpus", "2", "--rng"]);
    {
        use hearth::device_manager::VirtioDeviceState;
        let kvm = hearth::vstate::kvm::KvmContext::open().unwrap();
        let (saved, _) = hearth::snapshot::load::<hearth::vmm::persist::VmmState>(
            &kvm,
            &snapshot.state,
            &snapshot.mem,
        )
        .expect("the snapshot loads");
        let devices = &saved.payload.devices.virtio;
        assert_eq!(devices.len(), 1, "one virtio device");
        assert_eq!(devices[0].name, "rng0");
        assert!(matches!(devices[0].device, VirtioDeviceState::Rng(_)));
    }
    let last = *common::counter_counts(&snapshot.printed)
        .last()
        .expect("counted");
    let mem_meta = fs::metadata(&snapshot.mem).expect("memory file");
    assert_eq!(mem_meta.len(), 32 << 20);
    {
        use std::os::unix::fs::MetadataExt;
        assert!(
            mem_meta.blocks() * 512 < 4 << 20,
            "{} bytes allocated for a guest that touched little",
            mem_meta.blocks() * 512
        );
    }
    assert_eq!(
        snapshot.saved.state_bytes,
        fs::metadata(&snapshot.state).unwrap().len()
    );

    let restore = |log: &Path, resume: bool| {
        let mut config = hearth::config::RestoreConfig::new(&snapshot.state, &snapshot.mem);
        config.serial = hearth::config::SerialConfig::File(log.to_path_buf());
        config.resume = resume;
        config.validate().expect("a valid restore config");
        config
    };
    let (running_log, paused_log) = (dir.join("running.log"), dir.join("paused.log"));
    let (_, unused) = hearth::vmm::control_channel().expect("control channel");
    let (exit_a, running_a) = restore_counter(restore(&running_log, true), unused);
    let (controller_b, channel_b) = hearth::vmm::control_channel().expect("control channel");
    let (exit_b, running_b) = restore_counter(restore(&paused_log, false), channel_b);

    wait_for_counts_after(&snapshot.printed, &running_log, last + 2);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        fs::read(&paused_log).map(|b| b.len()).unwrap_or(0),
        0,
        "the VM restored paused ran"
    );
    controller_b.resume().expect("resume the paused VM");
    wait_for_counts_after(&snapshot.printed, &paused_log, last + 2);

    for exit in [&exit_a, &exit_b] {
        exit.request(ExitReason::Signal(libc::SIGTERM));
    }
    for running in [running_a, running_b] {
        running.join().expect("the VMM thread").expect("the VM ran");
    }
    for log in [&running_log, &paused_log] {
        let all = counts_after(&snapshot.printed, log);
        let expected: Vec<u32> = (1..=all.len() as u32).collect();
        assert_eq!(
            all,
            expected,
            "{}: the count restarted or skipped",
            log.display()
        );
    }
}

/// A snapshot that is damaged, of another format version, or from another kind of host
/// is refused with a one-line reason before any VM is built.
#[test]
fn a_damaged_or_foreign_snapshot_is_refused() {
    if !kvm_available() {
        return;
    }
    use hearth::snapshot::{KvmFlavour, StateFile};
    use hearth::vmm::persist::VmmState;

    let dir = TempDir::new("snapshot-refused");
    let snapshot = snapshot_counter(dir.path(), &[]);
    let bytes = fs::read(&snapshot.state).unwrap();
    let refusal = |state: &[u8], mem: Option<u64>| {
        let (state_path, mem_path) = (dir.join("bad.state"), dir.join("bad.mem"));
        fs::write(&state_path, state).unwrap();
        fs::copy(&snapshot.mem, &mem_path).unwrap();
        if let Some(len) = mem {
            fs::File::options()
                .write(true)
                .open(&mem_path)
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        let config = hearth::config::RestoreConfig::new(&state_path, &mem_path);
        let err = hearth::builder::build_from_snapshot(&config, Instant::now())
            .err()
            .expect("the restore was refused");
        let text = hearth::error_chain(&err);
        assert!(!text.contains('\n'), "{text}");
        text
    };

    let mut corrupt = bytes.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 1;
    assert!(refusal(&corrupt, None).ends_with("checksum mismatch: the file is corrupt"));

    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    assert!(refusal(&newer, None).contains("format version 99 (written by hearth"));

    let text = refusal(&bytes, Some(1 << 20));
    assert!(
        text.ends_with(&format!(
            "the memory file holds 1048576 bytes, the memory layout needs {}",
            32 << 20
        )),
        "{text}"
    );

    let kvm = hearth::vstate::kvm::KvmContext::open().unwrap();
    let file = StateFile::read(&snapshot.state).unwrap();
    let here = hearth::snapshot::HostFacts::probe(&kvm, file.header().host.cpu_profile).unwrap();
    let mut foreign = file.into_snapshot::<VmmState>(&here).unwrap();
    foreign.header.host.kvm = match here.kvm {
        KvmFlavour::Pvm => KvmFlavour::Hardware,
        KvmFlavour::Hardware => KvmFlavour::Pvm,
    };
    let foreign_path = dir.join("foreign.state");
    foreign.write(&foreign_path).unwrap();
    let text = refusal(&fs::read(&foreign_path).unwrap(), None);
    assert!(
        text.ends_with(&format!(
            "taken on an incompatible host: the snapshot was taken under {}, this host has {}",
            foreign.header.host.kvm, here.kvm
        )),
        "{text}"
    );
}
