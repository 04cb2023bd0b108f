//! hearth against tiny freestanding guests (tests/payloads/): boot protocols, serial
//! output, exit paths, the boot-complete signal, the instructions the nested PVM host
//! cannot run without the VMM's help, vCPU start-up, RAM around the 32-bit MMIO hole, and
//! pausing and resuming a VM through the library. Console input is in tests/console.rs.
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
    announce_skip, assert_exit_code, assert_stdout_contains, describe, kvm_available, payload,
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
    if !Path::new("/sys/module/kvm_pvm").exists() {
        announce_skip("not a nested PVM host (no /sys/module/kvm_pvm)");
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

/// `hearth run --config FILE` boots what the flags would: hearth's JSON config file.
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
    });
    fs::write(&config, json.to_string()).expect("write config file");
    let out = run_hearth(
        ["run".as_ref(), "--config".as_ref(), config.as_os_str()],
        RUN_TIMEOUT,
    );
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, HELLO);
}

/// The numbers the `counter` payload has printed so far, in order (a line still being
/// written is left out).
fn counts(log: &Path) -> Vec<u32> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    complete
        .lines()
        .map(|line| {
            line.strip_prefix("count ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected serial line {line:?} in {text:?}"))
        })
        .collect()
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
