//! `hearth bench density --guest container`: N container VMs started at once, all
//! restored from one template, each running `sleep` under a shell that first prints
//! `ready` on its stdout. Reports the time until every container runs, the creation rate, each VMM's
//! memory and how much of its guest RAM (the template's memory file, mapped
//! copy-on-write) it shares with the others, then stops them all with SIGTERM to their
//! front ends and checks that nothing is left.
//!
//! Each `hearth container run` front end starts its VMM, `hearth restore --mem
//! <template>/mem ...`, as a child in its own process group; the VMM is found among the
//! front end's children, and the template's memory file from its command line.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::density::{
    format_rate, mem_available_kib, min_median_max, ms, processes_using, publish, start_all,
    Readiness, StartedAll, SIGTERM_STATUS, STOP_TIMEOUT,
};
use super::fixtures::Fixtures;
use super::memory::{file_mapping_sharing, process_memory, FileMappingSharing, ProcessMemory};
use super::process::{measure, Invocation, Spawned};
use super::report::{format_kib, format_ms};
use super::{hearth_exe, BenchError, DensityArgs, Progress, WorkDir};
use crate::config::parse_memory_size;

/// What each container prints once it runs, then what it runs. The shell stays, with a
/// trap: as the container's first process it would otherwise ignore the SIGTERM its
/// front end forwards (as a bare `sleep` does), and the containers could not be stopped
/// the way a user stops them.
const READY_LINE: &str = "ready";
const IDLE_SCRIPT: &str = "trap 'exit 143' TERM; echo ready; sleep 3600 & wait";
/// Settling time after the last container is ready before memory is read.
const SETTLE: Duration = Duration::from_millis(500);
/// How long a VMM may outlive its front end (it dies with it, by its parent-death
/// signal, or has powered off before the front end exits).
const VMM_GONE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
struct ContainerDensityReport {
    vms: usize,
    /// `--memory`: the containers' memory limit, if one was given.
    memory_limit: Option<String>,
    /// Guest RAM of each VM: the template's memory file's length.
    vm_memory_mib: Option<u64>,
    /// The template's memory file the VMs map.
    template_mem: Option<PathBuf>,
    /// The unmeasured first container, which makes the template when it is missing.
    template_run_ms: f64,
    /// Time to spawn all N front ends.
    spawn_ms: f64,
    /// From the first spawn to the last container's `ready` line.
    all_ready_ms: Option<f64>,
    /// Containers per second: N over `all_ready_ms`.
    creation_rate_per_s: Option<f64>,
    ready_ms: Vec<Option<f64>>,
    memory: Vec<ContainerVmMemory>,
    total_vmm_pss_kib: u64,
    total_vmm_rss_kib: u64,
    total_guest_pss_kib: u64,
    total_guest_shared_kib: u64,
    total_guest_private_kib: u64,
    total_front_end_pss_kib: u64,
    /// Drop of the host's MemAvailable between before spawning and with all VMs up.
    host_mem_available_drop_kib: Option<i64>,
    stopped_cleanly: usize,
    errors: Vec<String>,
    /// Front ends or VMMs of this run still running afterwards.
    leftover_pids: Vec<u32>,
}

/// One container VM's processes and memory.
#[derive(Debug, Serialize)]
struct ContainerVmMemory {
    front_end_pid: u32,
    vmm_pid: u32,
    front_end: ProcessMemory,
    vmm: ProcessMemory,
    /// The VMM's mapping(s) of the template's memory file: its guest RAM.
    guest: FileMappingSharing,
}

pub(super) fn run(args: &DensityArgs) -> Result<u8, BenchError> {
    if args.vms == 0 {
        return Err(BenchError::Usage("--vms must be at least 1".to_owned()));
    }
    if let Some(limit) = &args.memory {
        parse_memory_size(limit).map_err(|e| BenchError::Usage(crate::error_chain(&e)))?;
    }
    let progress = Progress::new();
    let hearth = hearth_exe()?;
    let work = WorkDir::new("density-container");
    progress.status("hearth bench density: preparing the rootfs");
    let fixtures = Fixtures::prepare(work.path(), &["/bin/true".to_owned()], false)?;
    let mut container = Invocation::new(&hearth).args(["container", "run"]);
    if let Some(limit) = &args.memory {
        container = container.args(["--memory", limit]);
    }
    // The rootfs path is private to this run, which identifies leftover front ends.
    let container = container.arg(&fixtures.rootfs);

    progress.line(
        "hearth bench density: one unmeasured container first, to make the template if it \
         is missing (a guest boot, tens of seconds)",
    );
    let template_started = Instant::now();
    measure(
        &container.clone().arg("/bin/true"),
        0,
        Duration::from_secs(args.timeout),
    )
    .map_err(|e| BenchError::Step(format!("the unmeasured first container failed: {e}")))?;
    let template_run_ms = ms(template_started.elapsed());
    let idle = container
        .args(["sh", "-c", IDLE_SCRIPT])
        .output_line(READY_LINE);

    let available_before = mem_available_kib();
    let mut errors = Vec::new();
    let readiness = Readiness {
        at: Spawned::output_line_at,
        what: "container",
        progress: "containers running",
        missing: format!("before it printed {READY_LINE:?}"),
    };
    let StartedAll {
        mut vms,
        spawn_ms,
        ready_ms,
        all_ready_ms,
    } = start_all(
        &idle,
        args.vms,
        Duration::from_secs(args.timeout),
        &progress,
        &readiness,
        &mut errors,
    );
    let all_ready = all_ready_ms.is_some();

    std::thread::sleep(SETTLE);
    let available_up = mem_available_kib();
    let mut memory = Vec::new();
    let mut vmm_pids = Vec::new();
    let mut template_mem = None;
    for (i, vm) in vms.iter().enumerate() {
        if vm.output_line_at().is_none() {
            continue;
        }
        match container_memory(vm.pid()) {
            Ok((m, mem_file)) => {
                vmm_pids.push(m.vmm_pid);
                template_mem.get_or_insert(mem_file);
                memory.push(m);
            }
            Err(e) => errors.push(format!("container {i} (pid {}): {e}", vm.pid())),
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
                "container {i} ignored SIGTERM for {STOP_TIMEOUT:?}; killed"
            )),
            Ok(exit) if exit.status.code() == Some(SIGTERM_STATUS) => stopped_cleanly += 1,
            Ok(exit) => errors.push(format!(
                "container {i} stopped with {}: {}",
                exit.status,
                vm.output_tail(3)
            )),
            Err(e) => errors.push(format!("container {i}: {}", crate::error_chain(&e))),
        }
    }
    let mut leftover_pids = vmms_still_running(&vmm_pids);
    leftover_pids.extend(processes_using(&fixtures.rootfs.to_string_lossy()));
    progress.clear();

    let sum = |f: fn(&ContainerVmMemory) -> u64| memory.iter().map(f).sum::<u64>();
    let report = ContainerDensityReport {
        vms: args.vms,
        memory_limit: args.memory.clone(),
        vm_memory_mib: template_mem
            .as_deref()
            .and_then(|mem| std::fs::metadata(mem).ok())
            .map(|meta| meta.len() >> 20),
        template_mem,
        template_run_ms,
        spawn_ms,
        all_ready_ms,
        creation_rate_per_s: all_ready_ms.map(|t| args.vms as f64 / (t / 1000.0)),
        ready_ms,
        total_vmm_pss_kib: sum(|m| m.vmm.pss_kib),
        total_vmm_rss_kib: sum(|m| m.vmm.rss_kib),
        total_guest_pss_kib: sum(|m| m.guest.pss_kib),
        total_guest_shared_kib: sum(|m| m.guest.shared_kib),
        total_guest_private_kib: sum(|m| m.guest.private_kib),
        total_front_end_pss_kib: sum(|m| m.front_end.pss_kib),
        memory,
        host_mem_available_drop_kib: available_before
            .zip(available_up)
            .map(|(before, up)| before as i64 - up as i64),
        stopped_cleanly,
        errors,
        leftover_pids,
    };
    let ok = report.errors.is_empty() && report.leftover_pids.is_empty() && all_ready;
    publish(args, &progress, &markdown(&report), &report, ok)
}

/// The memory of the container whose front end is `front_end`, and the template memory
/// file its VMM maps.
fn container_memory(front_end: u32) -> Result<(ContainerVmMemory, PathBuf), String> {
    let (vmm_pid, mem_file) = restore_child(front_end)
        .ok_or_else(|| "no `hearth restore` child (was the VM restored?)".to_owned())?;
    let read = |pid| process_memory(pid).map_err(|e| crate::error_chain(&e));
    let guest = file_mapping_sharing(vmm_pid, &mem_file)
        .map_err(|e| crate::error_chain(&e))?
        .ok_or_else(|| format!("VMM {vmm_pid} does not map {}", mem_file.display()))?;
    Ok((
        ContainerVmMemory {
            front_end_pid: front_end,
            vmm_pid,
            front_end: read(front_end)?,
            vmm: read(vmm_pid)?,
            guest,
        },
        mem_file,
    ))
}

/// The child of `parent` that runs `hearth restore`, and its `--mem` file.
fn restore_child(parent: u32) -> Option<(u32, PathBuf)> {
    children_of(parent).into_iter().find_map(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        restore_mem_file(&cmdline).map(|mem| (pid, mem))
    })
}

/// Pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_pid(&stat))
                == Some(parent)
        })
        .collect()
}

/// The parent pid in a `/proc/PID/stat` line: `pid (comm) state ppid ...`, where `comm`
/// may hold spaces and parentheses (so the fields start after the last `)`).
fn parent_pid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The `--mem` file of a `hearth restore ...` command line (NUL-separated, as in
/// `/proc/PID/cmdline`); `None` for any other command.
fn restore_mem_file(cmdline: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if args.get(1) != Some(&b"restore".as_slice()) {
        return None;
    }
    let at = args.iter().position(|&a| a == b"--mem")?;
    let mem = args.get(at + 1).filter(|m| !m.is_empty())?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(mem)))
}

/// Those of `pids` still running a `hearth restore`, after giving them
/// [`VMM_GONE_TIMEOUT`] to go.
fn vmms_still_running(pids: &[u32]) -> Vec<u32> {
    let running = || -> Vec<u32> {
        pids.iter()
            .copied()
            .filter(|pid| {
                // A zombie's command line is empty.
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| restore_mem_file(&c).is_some())
            })
            .collect()
    };
    let deadline = Instant::now() + VMM_GONE_TIMEOUT;
    loop {
        let left = running();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn markdown(r: &ContainerDensityReport) -> String {
    let mut out = String::new();
    let measured = r.memory.len().max(1) as f64;
    let total_and_per_vm = |kib: u64| {
        format!(
            "{} ({})",
            format_kib(kib as f64),
            format_kib(kib as f64 / measured)
        )
    };
    let _ = writeln!(
        out,
        "hearth bench density: {} container VMs restored from one template{}{}, each running \
         `sh -c \"{IDLE_SCRIPT}\"`\n",
        r.vms,
        r.vm_memory_mib
            .map_or(String::new(), |mib| format!(", {mib} MiB guest RAM each")),
        r.memory_limit
            .as_deref()
            .map_or(String::new(), |limit| format!(" (--memory {limit})")),
    );
    out.push_str("| measure | value |\n|---|---:|\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "| {k} | {v} |");
    };
    row(
        "unmeasured first container (makes the template if missing)",
        format_ms(r.template_run_ms),
    );
    row("spawn all front ends", format_ms(r.spawn_ms));
    row(
        "first spawn -> last container ready",
        r.all_ready_ms.map_or("not all ready".to_owned(), format_ms),
    );
    row(
        "creation rate",
        r.creation_rate_per_s.map_or("-".to_owned(), format_rate),
    );
    if let Some(spread) = min_median_max(&r.ready_ms) {
        row("ready per container (min / median / max)", spread);
    }
    row(
        "VMM PSS, total (per VM)",
        total_and_per_vm(r.total_vmm_pss_kib),
    );
    row(
        "VMM RSS, total (per VM)",
        total_and_per_vm(r.total_vmm_rss_kib),
    );
    row(
        "guest RAM shared with other VMs, total (per VM)",
        total_and_per_vm(r.total_guest_shared_kib),
    );
    row(
        "guest RAM private to the VM, total (per VM)",
        total_and_per_vm(r.total_guest_private_kib),
    );
    row(
        "guest RAM PSS, total (per VM)",
        total_and_per_vm(r.total_guest_pss_kib),
    );
    row(
        "VMM overhead, PSS - guest RAM PSS (per VM)",
        total_and_per_vm(r.total_vmm_pss_kib.saturating_sub(r.total_guest_pss_kib)),
    );
    row(
        "front end PSS, total (per container)",
        total_and_per_vm(r.total_front_end_pss_kib),
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
    if !r.memory.is_empty() {
        out.push_str(
            "\n| VMM pid | RSS | PSS | guest RAM resident | shared | private | guest RAM PSS |\n\
             |---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for m in &r.memory {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                m.vmm_pid,
                format_kib(m.vmm.rss_kib as f64),
                format_kib(m.vmm.pss_kib as f64),
                format_kib(m.guest.rss_kib as f64),
                format_kib(m.guest.shared_kib as f64),
                format_kib(m.guest.private_kib as f64),
                format_kib(m.guest.pss_kib as f64),
            );
        }
        out.push_str(
            "\nguest RAM: the VMM's copy-on-write mapping of the template's memory file. \
             shared: resident pages other processes map too (read by several clones, \
             written by none); private: pages only this VM maps (its own writes, or pages \
             only it has read).\n",
        );
    }
    if let Some(mem) = &r.template_mem {
        let _ = writeln!(out, "\ntemplate memory file: {}", mem.display());
    }
    for e in &r.errors {
        let _ = writeln!(out, "\nerror: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_skips_odd_command_names() {
        assert_eq!(parent_pid("42 (sh) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_pid("42 (a) b (c)) R 1234 1 1"), Some(1234));
        assert_eq!(parent_pid("42 (truncated"), None);
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() } as u32;
        assert_eq!(parent_pid(&me), Some(parent));
    }

    #[test]
    fn finds_the_memory_file_of_a_restore() {
        let restore = b"/usr/bin/hearth\0restore\0--state\0/c/t/ab/state\0--mem\0/c/t/ab/mem\0\
                        --api-sock\0/run/x/api.sock\0";
        assert_eq!(
            restore_mem_file(restore),
            Some(PathBuf::from("/c/t/ab/mem"))
        );
        let run = b"/usr/bin/hearth\0run\0--mem\0/x\0";
        assert_eq!(restore_mem_file(run), None);
        assert_eq!(restore_mem_file(b"/usr/bin/hearth\0restore\0--mem\0"), None);
        assert_eq!(restore_mem_file(b""), None);
    }

    #[test]
    fn finds_our_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let children = children_of(std::process::id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(children.contains(&child.id()), "{children:?}");
        // A sleep is not a VMM.
        assert_eq!(vmms_still_running(&[child.id()]), Vec::<u32>::new());
    }

    #[test]
    fn markdown_reports_sharing_per_vm() {
        let vm = |pid: u32, shared: u64, private: u64| ContainerVmMemory {
            front_end_pid: pid - 1,
            vmm_pid: pid,
            front_end: ProcessMemory {
                rss_kib: 3000,
                pss_kib: 2048,
            },
            vmm: ProcessMemory {
                rss_kib: 40 << 10,
                pss_kib: 20 << 10,
            },
            guest: FileMappingSharing {
                size_kib: 256 << 10,
                rss_kib: shared + private,
                pss_kib: shared / 2 + private,
                shared_kib: shared,
                private_kib: private,
            },
        };
        let report = ContainerDensityReport {
            vms: 2,
            memory_limit: None,
            vm_memory_mib: Some(256),
            template_mem: Some(PathBuf::from("/c/templates/ab/mem")),
            template_run_ms: 21_000.0,
            spawn_ms: 3.0,
            all_ready_ms: Some(800.0),
            creation_rate_per_s: Some(2.5),
            ready_ms: vec![Some(700.0), Some(800.0)],
            memory: vec![vm(11, 30 << 10, 2 << 10), vm(21, 30 << 10, 4 << 10)],
            total_vmm_pss_kib: 40 << 10,
            total_vmm_rss_kib: 80 << 10,
            total_guest_pss_kib: 36 << 10,
            total_guest_shared_kib: 60 << 10,
            total_guest_private_kib: 6 << 10,
            total_front_end_pss_kib: 4096,
            host_mem_available_drop_kib: Some(50 << 10),
            stopped_cleanly: 2,
            errors: vec!["container 1: oops".into()],
            leftover_pids: Vec::new(),
        };
        let text = markdown(&report);
        for expected in [
            "2 container VMs restored from one template, 256 MiB guest RAM each",
            "| first spawn -> last container ready | 800 ms |",
            "| creation rate | 2.5 VMs/s |",
            "| guest RAM shared with other VMs, total (per VM) | 60.0 MiB (30.0 MiB) |",
            "| guest RAM private to the VM, total (per VM) | 6.0 MiB (3.0 MiB) |",
            "| VMM overhead, PSS - guest RAM PSS (per VM) | 4.0 MiB (2.0 MiB) |",
            "| front end PSS, total (per container) | 4.0 MiB (2.0 MiB) |",
            "| 21 | 40.0 MiB | 20.0 MiB | 34.0 MiB | 30.0 MiB | 4.0 MiB | 19.0 MiB |",
            "| left running afterwards | none |",
            "error: container 1: oops",
        ] {
            assert!(text.contains(expected), "{expected}\n{text}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["memory"][1]["guest"]["private_kib"], 4 << 10);
        assert_eq!(json["memory"][0]["vmm_pid"], 11);
    }
}
