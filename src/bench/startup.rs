//! `hearth bench startup`: every selected case, once per round, round after round
//! (A B C A B C ...), so that drift on the machine (other jobs, thermal, page cache) hits
//! all cases alike. A case that fails stops being run and is reported with its error and
//! the samples it had. Afterwards the VMM memory overhead of running hearth VMs is
//! measured, and the report is written.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::cases::{self, CaseEnv, CaseId, NotRun, Runner, BOOT_MARKER};
use super::fixtures::Fixtures;
use super::memory::vmm_memory;
use super::process::{measure, Invocation, Spawned};
use super::report::{self, CaseReport, HostInfo, MemoryReport, Sample, StartupReport};
use super::{chart, hearth_exe, write_output, BenchError, Progress, StartupArgs, WorkDir};
use crate::config::parse_memory_size;

/// Timeout of a setup or teardown step (`hearth machine start/stop`).
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long an idle VM for the memory measurement may take to signal boot.
const MEMORY_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Settling time after the boot signal before memory is read.
const MEMORY_SETTLE: Duration = Duration::from_millis(500);
/// Settling time for a Linux guest: /init runs the idle command after signalling boot.
const MEMORY_SETTLE_LINUX: Duration = Duration::from_secs(3);

/// A case during the session.
struct CaseRun {
    id: CaseId,
    runner: Option<Runner>,
    samples: Vec<Sample>,
    error: Option<String>,
    note: Option<String>,
}

pub(super) fn run(args: &StartupArgs) -> Result<u8, BenchError> {
    let selected = cases::parse_include(&args.include).map_err(BenchError::Usage)?;
    if args.runs == 0 {
        return Err(BenchError::Usage("--runs must be at least 1".to_owned()));
    }
    let command: Vec<String> = args.command.split_whitespace().map(str::to_owned).collect();
    if command.is_empty() {
        return Err(BenchError::Usage("--command is empty".to_owned()));
    }
    let progress = Progress::new();
    let hearth = hearth_exe()?;
    let work = WorkDir::new("startup");
    progress.status("hearth bench: preparing payloads, rootfs and initramfs");
    let linux = selected.iter().any(|c| c.needs_linux());
    let fixtures = Fixtures::prepare(work.path(), &command, linux)?;
    let env = CaseEnv {
        hearth: &hearth,
        fixtures: &fixtures,
        command: &command,
        hearth_flags: &args.hearth_flags,
    };

    let mut reports = Vec::new();
    let mut active = Vec::new();
    for &id in &selected {
        match cases::runner(id, &env) {
            Ok(runner) => active.push(CaseRun {
                id,
                note: runner.note.clone(),
                runner: Some(runner),
                samples: Vec::new(),
                error: None,
            }),
            Err(NotRun::Skipped(note)) => {
                progress.line(&format!("hearth bench: {} skipped: {note}", id.name()));
                reports.push(CaseReport::skipped(id, note));
            }
            Err(NotRun::Failed(error)) => {
                progress.line(&format!("hearth bench: {} failed: {error}", id.name()));
                reports.push(CaseReport::new(id, Vec::new(), Some(error)));
            }
        }
    }

    for case in &mut active {
        let setup = case.runner.as_ref().and_then(|r| r.setup.clone());
        if let Some(setup) = setup {
            progress.status(&format!(
                "hearth bench: {} setup: {}",
                case.id.name(),
                setup.display()
            ));
            if let Err(e) = measure(&setup, 0, SETUP_TIMEOUT) {
                fail(case, format!("setup `{}`: {e}", setup.display()), &progress);
            }
        }
    }

    // A template made inside a measured sample would turn one restore into a boot; made
    // here, every sample (warm-up or not) restores.
    for case in &mut active {
        let Some(runner) = case.runner.clone().filter(|r| r.makes_template) else {
            continue;
        };
        progress.line(&format!(
            "hearth bench: {}: one unmeasured run first, to make its template if it is missing \
             (a guest boot, tens of seconds)",
            case.id.name()
        ));
        let started = Instant::now();
        match run_sample(&runner, 0) {
            Ok(_) => progress.line(&format!(
                "hearth bench: {}: template ready ({} for the unmeasured run)",
                case.id.name(),
                report::format_ms(ms(started.elapsed()))
            )),
            Err(e) => fail(case, format!("making the template: {e}"), &progress),
        }
    }

    let rounds = args.warmup + args.runs;
    let mut sample_number = 0;
    for round in 0..rounds {
        let phase = if round < args.warmup {
            format!("warm-up {}/{}", round + 1, args.warmup)
        } else {
            format!("run {}/{}", round - args.warmup + 1, args.runs)
        };
        for case in &mut active {
            let Some(runner) = &case.runner else { continue };
            sample_number += 1;
            progress.status(&format!("hearth bench: {phase}: {}", case.id.name()));
            let started = Instant::now();
            match run_sample(runner, sample_number) {
                Ok(sample) if round >= args.warmup => case.samples.push(Sample { round, ..sample }),
                Ok(_) => {}
                Err(e) => fail(case, e, &progress),
            }
            progress.status(&format!(
                "hearth bench: {phase}: {} took {}",
                case.id.name(),
                report::format_ms(ms(started.elapsed()))
            ));
        }
        if !progress_is_tty() {
            progress.line(&format!("hearth bench: {phase} done"));
        }
    }

    for case in &mut active {
        let teardown = case.runner.as_ref().and_then(|r| r.teardown.clone());
        if let Some(teardown) = teardown {
            progress.status(&format!("hearth bench: {} teardown", case.id.name()));
            if let Err(e) = measure(&teardown, 0, SETUP_TIMEOUT) {
                progress.line(&format!(
                    "hearth bench: {} teardown `{}` failed: {e}",
                    case.id.name(),
                    teardown.display()
                ));
            }
        }
    }
    for case in active {
        let mut report = CaseReport::new(case.id, case.samples, case.error);
        report.note = case.note;
        reports.push(report);
    }
    reports.sort_by_key(|r| CaseId::ALL.iter().position(|&c| c == r.id));
    report::compute_ratios(&mut reports);

    let memory = measure_memory(&selected, &reports, &env, &progress);
    progress.clear();

    let report = StartupReport {
        format_version: report::FORMAT_VERSION,
        hearth_version: env!("CARGO_PKG_VERSION"),
        host: HostInfo::current(),
        runs: args.runs,
        warmup: args.warmup,
        command,
        cases: reports,
        memory,
    };
    let markdown = report::markdown(&report);
    write_output(
        &args.output,
        "startup.json",
        &serde_json::to_string_pretty(&report)?,
    )?;
    write_output(&args.output, "startup.svg", &chart::svg(&report)?)?;
    let md = write_output(&args.output, "startup.md", &markdown)?;
    print!("{markdown}");
    progress.line(&format!(
        "hearth bench: wrote startup.json, startup.svg and startup.md to {}",
        md.parent().unwrap_or(Path::new(".")).display()
    ));
    Ok(0)
}

/// One sample of `runner` (its `round` left 0): its invocation, and then its follow-up
/// command if it has one, which must succeed too.
fn run_sample(runner: &Runner, sample_number: usize) -> Result<Sample, String> {
    let invocation = runner.invocation_for(sample_number);
    let first = measure(&invocation, runner.expected_status, runner.timeout)?;
    let mut sample = Sample {
        round: 0,
        wall_ms: ms(first.wall),
        boot_ms: first.boot.map(ms),
        ready_ms: None,
        max_rss_kib: first.max_rss_kib,
    };
    if let Some(then) = &runner.then {
        let second = measure(then, 0, runner.timeout).map_err(|e| {
            format!(
                "after `{}`: `{}`: {e}",
                invocation.display(),
                then.display()
            )
        })?;
        // The two children's own times, without the bench's moment between them.
        sample.ready_ms = Some(sample.wall_ms);
        sample.wall_ms += ms(second.wall);
        sample.max_rss_kib = sample.max_rss_kib.max(second.max_rss_kib);
    }
    Ok(sample)
}

fn progress_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn fail(case: &mut CaseRun, error: String, progress: &Progress) {
    progress.line(&format!("hearth bench: {} failed: {error}", case.id.name()));
    case.error = Some(error);
    case.runner = None;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// VMM memory of a running hearth VM: the idle tiny payload when `hearth-tiny` is
/// selected, and the minimal kernel idling in `sleep` when `hearth-linux` is and worked.
fn measure_memory(
    selected: &[CaseId],
    reports: &[CaseReport],
    env: &CaseEnv,
    progress: &Progress,
) -> Vec<MemoryReport> {
    let ok = |id: CaseId| {
        reports
            .iter()
            .any(|r| r.id == id && r.status == report::CaseStatus::Ok)
    };
    let mut out = Vec::new();
    if selected.contains(&CaseId::HearthTiny) {
        progress.status("hearth bench: memory of an idle tiny-payload VM");
        let inv = Invocation::new(env.hearth)
            .arg("run")
            .arg("--kernel")
            .arg(&env.fixtures.idle)
            .args(["--memory", cases::TINY_MEMORY, "--boot-timer"])
            .boot_marker(BOOT_MARKER);
        out.push(memory_of(
            "hearth-tiny (idle payload)",
            &inv,
            cases::TINY_MEMORY,
            MEMORY_SETTLE,
        ));
    }
    if selected.contains(&CaseId::HearthLinux) && ok(CaseId::HearthLinux) {
        progress.status("hearth bench: memory of an idle minimal-kernel VM");
        if let (Ok(kernel), Ok(initrd)) = (&env.fixtures.kernel, &env.fixtures.initramfs) {
            let inv = Invocation::new(env.hearth)
                .arg("run")
                .arg("--kernel")
                .arg(kernel)
                .arg("--initrd")
                .arg(initrd)
                .arg("--cmdline")
                .arg(super::fixtures::linux::cmdline("", "sleep 3600"))
                .args(["--memory", cases::LINUX_MEMORY, "--boot-timer"])
                .boot_marker(BOOT_MARKER);
            out.push(memory_of(
                "hearth-linux (minimal kernel, idle in sleep)",
                &inv,
                cases::LINUX_MEMORY,
                MEMORY_SETTLE_LINUX,
            ));
        }
    }
    out
}

/// Starts `inv`, waits for its boot signal and `settle`, reads its memory, stops it.
fn memory_of(vm: &str, inv: &Invocation, guest_memory: &str, settle: Duration) -> MemoryReport {
    let result = (|| {
        let guest_bytes = parse_memory_size(guest_memory).map_err(|e| crate::error_chain(&e))?;
        let mut child = Spawned::start(inv).map_err(|e| crate::error_chain(&e))?;
        let deadline = Instant::now() + MEMORY_BOOT_TIMEOUT;
        while child.boot_time().is_none() && Instant::now() < deadline {
            if let Some(exit) = child
                .poll(Duration::from_millis(10))
                .map_err(|e| crate::error_chain(&e))?
            {
                return Err(format!(
                    "ended before it signalled boot ({}): {}",
                    exit.status,
                    child.output_tail(3)
                ));
            }
        }
        if child.boot_time().is_none() {
            return Err("never signalled boot complete".to_owned());
        }
        thread::sleep(settle);
        let memory = vmm_memory(child.pid(), guest_bytes).map_err(|e| crate::error_chain(&e));
        child.signal_group(libc::SIGTERM);
        let _ = child.wait(Duration::from_secs(10));
        memory
    })();
    match result {
        Ok(memory) => MemoryReport {
            vm: vm.to_owned(),
            memory: Some(memory),
            error: None,
        },
        Err(error) => MemoryReport {
            vm: vm.to_owned(),
            memory: None,
            error: Some(error),
        },
    }
}
