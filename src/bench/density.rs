//! `hearth bench density`: starts N microVMs at once, waits until every one has signalled
//! boot, measures their memory, stops them all with SIGTERM and checks that nothing is
//! left running. Containers (`--guest container`) are in `density_container.rs`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cases::BOOT_MARKER;
use super::fixtures::{linux, Fixtures};
use super::memory::{vmm_memory, VmmMemory};
use super::process::{Invocation, Spawned};
use super::report::{format_kib, format_ms};
use super::{hearth_exe, write_output, BenchError, DensityArgs, DensityGuest, Progress, WorkDir};
use crate::config::parse_memory_size;

/// Guest RAM of the tiny and Linux VMs unless `--memory` says otherwise.
const DEFAULT_MEMORY: &str = "64M";
/// How long each VM gets to end after SIGTERM.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// hearth's exit status after SIGTERM: 128 + 15.
pub(super) const SIGTERM_STATUS: i32 = 128 + libc::SIGTERM;
/// Settling time after the last boot signal before memory is read (Linux: /init starts
/// the idle command after signalling).
const SETTLE_TINY: Duration = Duration::from_millis(300);
const SETTLE_LINUX: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize)]
struct DensityReport {
    vms: usize,
    guest: &'static str,
    guest_memory: String,
    /// From the first spawn to the last VM's boot signal.
    all_booted_ms: Option<f64>,
    /// Time to spawn all N processes.
    spawn_ms: f64,
    /// VMs per second: N over `all_booted_ms`.
    creation_rate_per_s: Option<f64>,
    boot_ms: Vec<Option<f64>>,
    memory: Vec<VmmMemory>,
    total_pss_kib: u64,
    total_rss_kib: u64,
    total_guest_touched_kib: u64,
    total_overhead_kib: u64,
    /// Drop of the host's MemAvailable between before spawning and with all VMs up.
    host_mem_available_drop_kib: Option<i64>,
    stopped_cleanly: usize,
    errors: Vec<String>,
    /// Processes still running afterwards that use this run's guest image.
    leftover_pids: Vec<u32>,
}

/// How a process started by [`start_all`] shows it is ready, and how to speak of it.
pub(super) struct Readiness {
    /// When it became ready, if it has.
    pub at: fn(&Spawned) -> Option<Instant>,
    /// "VM", "container".
    pub what: &'static str,
    /// The progress line's word for the ready ones.
    pub progress: &'static str,
    /// The end of the error line of one that never became ready.
    pub missing: String,
}

/// What [`start_all`] gives back.
pub(super) struct StartedAll {
    pub vms: Vec<Spawned>,
    /// From the first spawn to the last.
    pub spawn_ms: f64,
    /// Each one's time from the first spawn until it was ready.
    pub ready_ms: Vec<Option<f64>>,
    /// When every one was ready (the last of `ready_ms`), if every one was.
    pub all_ready_ms: Option<f64>,
}

/// Starts `count` copies of `invocation` at once and waits until each is ready, has
/// ended, or `timeout` has passed; what went wrong goes to `errors`.
pub(super) fn start_all(
    invocation: &Invocation,
    count: usize,
    timeout: Duration,
    progress: &Progress,
    readiness: &Readiness,
    errors: &mut Vec<String>,
) -> StartedAll {
    let what = readiness.what;
    let start = Instant::now();
    let mut vms = Vec::with_capacity(count);
    for i in 0..count {
        match Spawned::start(invocation) {
            Ok(vm) => vms.push(vm),
            Err(e) => errors.push(format!("{what} {i}: {}", crate::error_chain(&e))),
        }
    }
    let spawn_ms = ms(start.elapsed());

    let deadline = start + timeout;
    let ready = |vm: &Spawned| (readiness.at)(vm).is_some();
    let mut ended = vec![false; vms.len()];
    loop {
        let mut waiting = 0;
        for (vm, ended) in vms.iter_mut().zip(&mut ended) {
            if *ended || ready(vm) {
                continue;
            }
            if let Ok(Some(_)) = vm.poll(Duration::ZERO) {
                *ended = true;
            } else {
                waiting += 1;
            }
        }
        let done = vms.iter().filter(|v| ready(v)).count();
        progress.status(&format!(
            "hearth bench density: {done}/{count} {} after {}",
            readiness.progress,
            format_ms(ms(start.elapsed()))
        ));
        if waiting == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready_ms: Vec<Option<f64>> = vms
        .iter()
        .map(|v| (readiness.at)(v).map(|t| ms(t - start)))
        .collect();
    let all_ready = ready_ms.len() == count && ready_ms.iter().all(Option::is_some);
    let all_ready_ms = all_ready.then(|| ready_ms.iter().flatten().copied().fold(0.0, f64::max));
    for (i, (vm, ended)) in vms.iter().zip(&ended).enumerate() {
        if !ready(vm) {
            let why = if *ended { "ended" } else { "timed out" };
            errors.push(format!(
                "{what} {i} {why} {}: {}",
                readiness.missing,
                vm.output_tail(3)
            ));
        }
    }
    StartedAll {
        vms,
        spawn_ms,
        ready_ms,
        all_ready_ms,
    }
}

pub(super) fn run(args: &DensityArgs) -> Result<u8, BenchError> {
    if args.vms == 0 {
        return Err(BenchError::Usage("--vms must be at least 1".to_owned()));
    }
    if args.guest == DensityGuest::Container {
        return super::density_container::run(args);
    }
    let guest_memory = args.memory.as_deref().unwrap_or(DEFAULT_MEMORY);
    let guest_bytes =
        parse_memory_size(guest_memory).map_err(|e| BenchError::Usage(crate::error_chain(&e)))?;
    let progress = Progress::new();
    let hearth = hearth_exe()?;
    let work = WorkDir::new("density");
    progress.status("hearth bench density: preparing the guest");
    let linux_guest = args.guest == DensityGuest::Linux;
    let command = vec!["/bin/true".to_owned()];
    let fixtures = Fixtures::prepare(work.path(), &command, linux_guest)?;
    let mut invocation = Invocation::new(&hearth)
        .args([
            "run",
            "--memory",
            guest_memory,
            "--boot-timer",
            "--serial",
            "none",
        ])
        .boot_marker(BOOT_MARKER);
    // The image path is private to this run, which identifies leftover processes.
    let marker_path;
    if linux_guest {
        let kernel = fixtures.kernel.clone().map_err(BenchError::Usage)?;
        let initrd = fixtures.initramfs.clone().map_err(BenchError::Usage)?;
        invocation = invocation
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--cmdline")
            .arg(linux::cmdline("", "sleep 100000"));
        marker_path = initrd;
    } else {
        invocation = invocation.arg("--kernel").arg(&fixtures.idle);
        marker_path = fixtures.idle.clone();
    }

    let available_before = mem_available_kib();
    let mut errors = Vec::new();
    let readiness = Readiness {
        at: Spawned::boot_at,
        what: "VM",
        progress: "booted",
        missing: "before signalling boot".to_owned(),
    };
    let StartedAll {
        mut vms,
        spawn_ms,
        ready_ms: boot_ms,
        all_ready_ms: all_booted_ms,
    } = start_all(
        &invocation,
        args.vms,
        Duration::from_secs(args.timeout),
        &progress,
        &readiness,
        &mut errors,
    );
    let all_booted = all_booted_ms.is_some();

    std::thread::sleep(if linux_guest {
        SETTLE_LINUX
    } else {
        SETTLE_TINY
    });
    let available_up = mem_available_kib();
    let mut memory = Vec::new();
    for vm in vms.iter().filter(|v| v.boot_time().is_some()) {
        match vmm_memory(vm.pid(), guest_bytes) {
            Ok(m) => memory.push(m),
            Err(e) => errors.push(format!("pid {}: {}", vm.pid(), crate::error_chain(&e))),
        }
    }

    progress.status("hearth bench density: stopping");
    for vm in &vms {
        vm.signal_group(libc::SIGTERM);
    }
    let mut stopped_cleanly = 0;
    for (i, vm) in vms.iter_mut().enumerate() {
        match vm.wait(STOP_TIMEOUT) {
            Ok(exit) if exit.timed_out => errors.push(format!(
                "VM {i} ignored SIGTERM for {STOP_TIMEOUT:?}; killed"
            )),
            Ok(exit) if exit.status.code() == Some(SIGTERM_STATUS) => stopped_cleanly += 1,
            Ok(exit) => errors.push(format!("VM {i} stopped with {}", exit.status)),
            Err(e) => errors.push(format!("VM {i}: {}", crate::error_chain(&e))),
        }
    }
    let leftover_pids = processes_using(&marker_path.to_string_lossy());
    progress.clear();

    let sum = |f: fn(&VmmMemory) -> u64| memory.iter().map(f).sum::<u64>();
    let report = DensityReport {
        vms: args.vms,
        guest: if linux_guest { "linux" } else { "tiny" },
        guest_memory: guest_memory.to_owned(),
        all_booted_ms,
        spawn_ms,
        creation_rate_per_s: all_booted_ms.map(|t| args.vms as f64 / (t / 1000.0)),
        boot_ms,
        total_pss_kib: sum(|m| m.pss_kib),
        total_rss_kib: sum(|m| m.rss_kib),
        total_guest_touched_kib: sum(|m| m.guest_rss_kib),
        total_overhead_kib: sum(|m| m.overhead_kib),
        memory,
        host_mem_available_drop_kib: available_before
            .zip(available_up)
            .map(|(before, up)| before as i64 - up as i64),
        stopped_cleanly,
        errors,
        leftover_pids,
    };
    let ok = report.errors.is_empty() && report.leftover_pids.is_empty() && all_booted;
    publish(args, &progress, &markdown(&report), &report, ok)
}

/// Prints the report's Markdown, writes it and the JSON to `density.md` and
/// `density.json` in the output directory; exit status 0 when `ok`.
pub(super) fn publish<R: Serialize>(
    args: &DensityArgs,
    progress: &Progress,
    text: &str,
    report: &R,
    ok: bool,
) -> Result<u8, BenchError> {
    let json = write_output(
        &args.output,
        "density.json",
        &serde_json::to_string_pretty(report)?,
    )?;
    let md = write_output(&args.output, "density.md", text)?;
    print!("{text}");
    progress.line(&format!(
        "hearth bench density: wrote {} and {}",
        json.display(),
        md.display()
    ));
    Ok(if ok { 0 } else { 1 })
}

/// "min / median / max" of the known times, if there are any.
pub(super) fn min_median_max(times_ms: &[Option<f64>]) -> Option<String> {
    let known: Vec<f64> = times_ms.iter().flatten().copied().collect();
    let s = super::stats::Summary::of(&known)?;
    Some(format!(
        "{} / {} / {}",
        format_ms(s.min),
        format_ms(s.median),
        format_ms(s.max)
    ))
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn markdown(r: &DensityReport) -> String {
    let mut out = String::new();
    let n = r.vms as f64;
    let per_vm = |kib: u64| format_kib(kib as f64 / n.max(1.0));
    let _ = writeln!(
        out,
        "hearth bench density: {} VMs, {} guest, {} each\n",
        r.vms, r.guest, r.guest_memory
    );
    out.push_str("| measure | value |\n|---|---:|\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "| {k} | {v} |");
    };
    row("spawn all processes", format_ms(r.spawn_ms));
    row(
        "first spawn -> last boot signal",
        r.all_booted_ms
            .map_or("not all booted".to_owned(), format_ms),
    );
    row(
        "creation rate",
        r.creation_rate_per_s.map_or("-".to_owned(), format_rate),
    );
    if let Some(spread) = min_median_max(&r.boot_ms) {
        row("boot signal per VM (min / median / max)", spread);
    }
    row(
        "total PSS (per VM)",
        format!(
            "{} ({})",
            format_kib(r.total_pss_kib as f64),
            per_vm(r.total_pss_kib)
        ),
    );
    row(
        "total RSS (per VM)",
        format!(
            "{} ({})",
            format_kib(r.total_rss_kib as f64),
            per_vm(r.total_rss_kib)
        ),
    );
    row(
        "guest RAM touched (per VM)",
        format!(
            "{} ({})",
            format_kib(r.total_guest_touched_kib as f64),
            per_vm(r.total_guest_touched_kib)
        ),
    );
    row(
        "VMM overhead, PSS - touched (per VM)",
        format!(
            "{} ({})",
            format_kib(r.total_overhead_kib as f64),
            per_vm(r.total_overhead_kib)
        ),
    );
    if let Some(drop) = r.host_mem_available_drop_kib {
        row("host MemAvailable drop", format_kib(drop as f64));
    }
    row(
        "stopped cleanly by SIGTERM",
        format!("{}/{}", r.stopped_cleanly, r.vms),
    );
    row(
        "left running afterwards",
        if r.leftover_pids.is_empty() {
            "none".to_owned()
        } else {
            format!("{:?}", r.leftover_pids)
        },
    );
    for e in &r.errors {
        let _ = writeln!(out, "\nerror: {e}");
    }
    out
}

/// VMs per second, with three decimals below one.
pub(super) fn format_rate(per_s: f64) -> String {
    if per_s < 1.0 {
        format!("{per_s:.3} VMs/s")
    } else {
        format!("{per_s:.1} VMs/s")
    }
}

/// `MemAvailable` from /proc/meminfo, KiB.
pub(super) fn mem_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// Pids of processes whose command line mentions `needle`.
pub(super) fn processes_using(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_processes_by_command_line() {
        let mut child = std::process::Command::new("sleep")
            .arg("30.123456")
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line is still ours.
        let mut found = Vec::new();
        for _ in 0..200 {
            found = processes_using("30.123456");
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, vec![child.id()]);
        assert!(processes_using("30.123456").is_empty());
    }

    #[test]
    fn host_memory_is_readable() {
        assert!(mem_available_kib().unwrap() > 0);
    }
}
