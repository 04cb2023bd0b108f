//! `hearth bench snapshot`: how long a snapshot takes to create, how large it is on disk,
//! and how fast a new process restores it, for hearth and (when it is on PATH)
//! Firecracker, with the same guests at each RAM size.
//!
//! 1. Every VM to be snapshotted (a case at a RAM size) is started through the API in
//!    Firecracker's shape (`hearth --api-sock`, `firecracker --api-sock`), runs its guest
//!    until the guest prints, and is paused. A Linux guest boots only once per size.
//! 2. Creation rounds: in each, every paused VM writes a full snapshot (`PUT
//!    /snapshot/create`) to new files, timed by the client; the files' sizes are read and
//!    the previous round's files deleted. The last round's snapshot is the one restored.
//! 3. The source VMs are stopped.
//! 4. Restore rounds, interleaved as in `bench startup` (A B C A B C ...): each restore
//!    case starts a new process on its snapshot, times it to the vCPUs running and to the
//!    first guest output, reads its memory and stops it with SIGTERM. hearth's snapshots
//!    are restored both with `hearth restore` (the one-shot command) and with `PUT
//!    /snapshot/load` into `hearth --api-sock` (Firecracker's procedure, step for step).
//!
//! `vm.rs` drives the processes; `report.rs` holds the results and their Markdown.

mod report;
mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use self::report::{CreateSample, RestoreCase, RestoreSample, SnapshotCase, SnapshotReport};
use self::vm::{restore_once, Env, Restorer, SnapshotFiles, SourceVm};
use super::cases::find_on_path;
use super::fixtures::{linux, payloads, FixtureError, Format};
use super::report::{format_ms, CaseStatus, HostInfo};
use super::{chart, hearth_exe, write_output, BenchError, Progress, SnapshotArgs, WorkDir};
use crate::config::parse_memory_size;

/// What the Linux guest runs: a shell loop printing without pause (`echo` is a builtin:
/// no process is created), so that a restored guest's next output follows its restore.
pub(crate) const LINUX_COMMAND: &str = "while :; do echo tick; done";
/// The loop's line: the guest is up once one comes.
pub(crate) const LINUX_READY_LINE: &str = "tick";
const TINY_GUEST: &str = "bench_ticker (tests/payloads/counter.S): prints `count N` on the \
                          serial port every 100,000 TSC cycles, without end";

/// A case of `--include`: a VMM with a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaseId {
    HearthTiny,
    HearthLinux,
    FirecrackerTiny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vmm {
    Hearth,
    Firecracker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Guest {
    Tiny,
    Linux,
}

impl CaseId {
    /// Every case, in report order.
    pub const ALL: [CaseId; 3] = [
        CaseId::HearthTiny,
        CaseId::HearthLinux,
        CaseId::FirecrackerTiny,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CaseId::HearthTiny => "hearth-tiny",
            CaseId::HearthLinux => "hearth-linux",
            CaseId::FirecrackerTiny => "firecracker-tiny",
        }
    }

    fn vmm(self) -> Vmm {
        match self {
            CaseId::HearthTiny | CaseId::HearthLinux => Vmm::Hearth,
            CaseId::FirecrackerTiny => Vmm::Firecracker,
        }
    }

    fn guest(self) -> Guest {
        match self {
            CaseId::HearthTiny | CaseId::FirecrackerTiny => Guest::Tiny,
            CaseId::HearthLinux => Guest::Linux,
        }
    }

    /// The ways this case's snapshots are restored, each a restore case of its own.
    fn restore_paths(self) -> &'static [RestorePath] {
        match self.vmm() {
            Vmm::Hearth => &[RestorePath::HearthRestore, RestorePath::ApiLoad],
            Vmm::Firecracker => &[RestorePath::ApiLoad],
        }
    }

    /// Firecracker's case with the same guest (none for Firecracker's own, and none for
    /// Linux: Firecracker cannot boot it on nested-PVM hosts, so there is no such case).
    fn firecracker_peer(self) -> Option<CaseId> {
        match self {
            CaseId::HearthTiny => Some(CaseId::FirecrackerTiny),
            CaseId::HearthLinux | CaseId::FirecrackerTiny => None,
        }
    }
}

/// How a snapshot is restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestorePath {
    /// `hearth restore --state S --mem M --restore-timer`.
    HearthRestore,
    /// `PUT /snapshot/load` with `resume_vm` into a VMM started with `--api-sock`.
    ApiLoad,
}

impl RestorePath {
    fn label(self) -> &'static str {
        match self {
            RestorePath::HearthRestore => "hearth restore",
            RestorePath::ApiLoad => "API load",
        }
    }

    fn short(self) -> &'static str {
        match self {
            RestorePath::HearthRestore => "restore",
            RestorePath::ApiLoad => "API",
        }
    }

    fn vcpus_measure(self) -> &'static str {
        match self {
            RestorePath::HearthRestore => "spawn -> vCPUs running",
            RestorePath::ApiLoad => "spawn -> load answered",
        }
    }
}

/// Parses `--include`: comma-separated case names, or `all`; in report order.
fn parse_include(list: &str) -> Result<Vec<CaseId>, String> {
    super::cases::select_cases(list, &CaseId::ALL, CaseId::name)
}

/// Parses `--memory`: comma-separated sizes in whole MiB (Firecracker's unit), smallest
/// first.
fn parse_sizes(list: &str) -> Result<Vec<u64>, String> {
    let mut sizes = Vec::new();
    for text in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let bytes = parse_memory_size(text)
            .map_err(|e| format!("invalid --memory {text:?}: {}", crate::error_chain(&e)))?;
        if bytes == 0 || !bytes.is_multiple_of(1 << 20) {
            return Err(format!(
                "invalid --memory {text:?}: use a positive whole number of MiB"
            ));
        }
        sizes.push(bytes >> 20);
    }
    if sizes.is_empty() {
        return Err("--memory names no size".to_owned());
    }
    sizes.sort_unstable();
    sizes.dedup();
    Ok(sizes)
}

/// A case at one RAM size: its VM to snapshot, then its snapshot.
struct Source {
    case: CaseId,
    mib: u64,
    dir: PathBuf,
    vm: Option<SourceVm>,
    ready_ms: Option<f64>,
    samples: Vec<CreateSample>,
    /// The latest snapshot written.
    snapshot: Option<SnapshotFiles>,
    status: CaseStatus,
    error: Option<String>,
}

impl Source {
    fn name(&self) -> String {
        format!("{} {}", self.case.name(), report::format_mib(self.mib))
    }

    fn give_up(&mut self, status: CaseStatus, error: String, progress: &Progress) {
        let what = if status == CaseStatus::Skipped {
            "skipped"
        } else {
            "failed"
        };
        progress.line(&format!(
            "hearth bench snapshot: {} {what}: {error}",
            self.name()
        ));
        self.status = status;
        self.error = Some(error);
        if let Some(vm) = self.vm.take() {
            let _ = vm.stop();
        }
    }
}

/// A snapshot and a way of restoring it.
struct RestoreRun {
    case: CaseId,
    mib: u64,
    path: RestorePath,
    snapshot: SnapshotFiles,
    dir: PathBuf,
    samples: Vec<RestoreSample>,
    error: Option<String>,
}

pub(super) fn run(args: &SnapshotArgs) -> Result<u8, BenchError> {
    let cases = parse_include(&args.include).map_err(BenchError::Usage)?;
    let sizes = parse_sizes(&args.memory).map_err(BenchError::Usage)?;
    if args.runs == 0 {
        return Err(BenchError::Usage("--runs must be at least 1".to_owned()));
    }
    let progress = Progress::new();
    let hearth = hearth_exe()?;
    let parent = match &args.snapshot_dir {
        Some(dir) => std::path::absolute(dir).map_err(|source| BenchError::Output {
            path: dir.clone(),
            source,
        })?,
        None => std::env::temp_dir(),
    };
    let work = WorkDir::under(&parent, "snapshot");
    let mkdir = |dir: &Path| {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Output {
            path: dir.to_owned(),
            source,
        })
    };
    mkdir(work.path())?;

    progress.status("hearth bench snapshot: preparing the guests");
    let ticker =
        payloads::find(payloads::BENCH_TICKER, Format::Elf64).map_err(FixtureError::from)?;
    payloads::build(&[ticker], work.path()).map_err(FixtureError::from)?;
    let ticker = payloads::path(work.path(), payloads::BENCH_TICKER, Format::Elf64);
    let linux_guest = if cases.contains(&CaseId::HearthLinux) {
        linux_guest(work.path())
    } else {
        Err("not prepared".to_owned())
    };
    let firecracker = find_on_path("firecracker");
    let env = Env {
        hearth: &hearth,
        firecracker: firecracker.as_deref(),
        ticker: &ticker,
        linux: linux_guest,
        linux_ready_timeout: Duration::from_secs(args.timeout),
    };

    let mut sources = Vec::new();
    for &case in &cases {
        for &mib in &sizes {
            let dir = work.path().join(format!("{}-{mib}M", case.name()));
            mkdir(&dir)?;
            sources.push(Source {
                case,
                mib,
                dir,
                vm: None,
                ready_ms: None,
                samples: Vec::new(),
                snapshot: None,
                status: CaseStatus::Ok,
                error: None,
            });
        }
    }
    boot_sources(&mut sources, &env, &progress);
    create_snapshots(&mut sources, args, &progress);
    for source in &mut sources {
        if let Some(vm) = source.vm.take() {
            if let Err(e) = vm.stop() {
                progress.line(&format!(
                    "hearth bench snapshot: stopping {}: {e}",
                    source.name()
                ));
            }
        }
    }

    let mut runs = Vec::new();
    let mut not_run = Vec::new();
    for source in &sources {
        for &path in source.case.restore_paths() {
            match &source.snapshot {
                Some(snapshot) if source.status == CaseStatus::Ok => runs.push(RestoreRun {
                    case: source.case,
                    mib: source.mib,
                    path,
                    snapshot: snapshot.clone(),
                    dir: source.dir.clone(),
                    samples: Vec::new(),
                    error: None,
                }),
                _ => {
                    let status = match source.status {
                        CaseStatus::Skipped => CaseStatus::Skipped,
                        _ => CaseStatus::Failed,
                    };
                    let why = format!(
                        "no snapshot: {}",
                        source.error.as_deref().unwrap_or("none was written")
                    );
                    let why = if status == CaseStatus::Skipped {
                        source.error.clone().unwrap_or(why)
                    } else {
                        why
                    };
                    not_run.push(RestoreCase::new(
                        source.case,
                        source.mib,
                        path,
                        Vec::new(),
                        status,
                        Some(why),
                    ));
                }
            }
        }
    }
    restore_rounds(&mut runs, &env, args, &progress);
    progress.clear();

    let mut restores: Vec<RestoreCase> = runs
        .into_iter()
        .map(|r| {
            let status = if r.error.is_some() {
                CaseStatus::Failed
            } else {
                CaseStatus::Ok
            };
            RestoreCase::new(r.case, r.mib, r.path, r.samples, status, r.error)
        })
        .chain(not_run)
        .collect();
    let order = |case: CaseId| CaseId::ALL.iter().position(|&c| c == case);
    restores.sort_by_key(|r| (order(r.case), r.guest_mib, r.path));

    let report = SnapshotReport {
        format_version: report::FORMAT_VERSION,
        hearth_version: env!("CARGO_PKG_VERSION"),
        host: HostInfo::current(),
        firecracker_version: firecracker.as_deref().and_then(version_of),
        runs: args.runs,
        warmup: args.warmup,
        snapshot_fs: filesystem_type(&parent),
        snapshot_dir: parent,
        tiny_guest: TINY_GUEST,
        linux_command: LINUX_COMMAND,
        snapshots: sources
            .into_iter()
            .map(|s| SnapshotCase::new(s.case, s.mib, s.ready_ms, s.samples, s.status, s.error))
            .collect(),
        restores,
    };
    let markdown = report::markdown(&report);
    write_output(
        &args.output,
        "snapshot.json",
        &serde_json::to_string_pretty(&report)?,
    )?;
    let svg = chart::rows_svg(
        "hearth bench snapshot",
        "time (log scale): restores from spawn, creations per request",
        &report::chart_rows(&report),
    )?;
    write_output(&args.output, "snapshot.svg", &svg)?;
    let md = write_output(&args.output, "snapshot.md", &markdown)?;
    print!("{markdown}");
    progress.line(&format!(
        "hearth bench snapshot: wrote snapshot.json, snapshot.svg and snapshot.md to {}",
        md.parent().unwrap_or(Path::new(".")).display()
    ));
    Ok(0)
}

/// The minimal kernel and a test initramfs built in `dir`.
fn linux_guest(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let kernel = linux::minimal_kernel().map_err(|e| crate::error_chain(&e))?;
    let initrd = linux::build_initramfs(&dir.join("initramfs.cpio"), None)
        .map_err(|e| crate::error_chain(&e))?;
    Ok((kernel, initrd))
}

/// Boots every source's VM, one after the other (a Linux boot is long and takes a core).
fn boot_sources(sources: &mut [Source], env: &Env, progress: &Progress) {
    for source in sources {
        let vmm = source.case.vmm();
        if vmm == Vmm::Firecracker && env.firecracker.is_none() {
            let note = "firecracker is not on PATH; Firecracker is not packaged in Debian; put \
                        its release binary on PATH to compare";
            source.give_up(CaseStatus::Skipped, note.to_owned(), progress);
            continue;
        }
        progress.status(&format!(
            "hearth bench snapshot: starting {} and waiting for its guest",
            source.name()
        ));
        match SourceVm::boot(env, vmm, source.case.guest(), source.mib, &source.dir) {
            Ok(vm) => {
                source.ready_ms = Some(ms(vm.ready));
                if !progress_is_tty() {
                    progress.line(&format!(
                        "hearth bench snapshot: {} ran its guest after {}; paused",
                        source.name(),
                        format_ms(ms(vm.ready))
                    ));
                }
                source.vm = Some(vm);
            }
            Err(e) => source.give_up(CaseStatus::Failed, format!("boot: {e}"), progress),
        }
    }
}

/// The creation rounds (module documentation, step 2).
fn create_snapshots(sources: &mut [Source], args: &SnapshotArgs, progress: &Progress) {
    let rounds = args.warmup + args.runs;
    for round in 0..rounds {
        let phase = phase(round, args);
        for source in sources.iter_mut() {
            let Some(vm) = &source.vm else { continue };
            progress.status(&format!(
                "hearth bench snapshot: creation {phase}: {}",
                source.name()
            ));
            let files = SnapshotFiles {
                state: source.dir.join(format!("create-{round}.state")),
                mem: source.dir.join(format!("create-{round}.mem")),
            };
            let measured = vm
                .create(&files)
                .and_then(|took| Ok((took, files.sizes()?)));
            match measured {
                Ok((took, sizes)) => {
                    if round >= args.warmup {
                        source.samples.push(CreateSample {
                            round,
                            create_ms: ms(took),
                            mem_file_disk_bytes: sizes.mem_disk,
                            mem_file_bytes: sizes.mem,
                            state_file_disk_bytes: sizes.state_disk,
                            state_file_bytes: sizes.state,
                        });
                    }
                    if let Some(previous) = source.snapshot.replace(files) {
                        previous.remove();
                    }
                }
                Err(e) => {
                    files.remove();
                    source.give_up(CaseStatus::Failed, format!("snapshot: {e}"), progress);
                }
            }
        }
        if !progress_is_tty() {
            progress.line(&format!("hearth bench snapshot: creation {phase} done"));
        }
    }
}

/// The restore rounds (module documentation, step 4). A case that fails is not run again.
fn restore_rounds(runs: &mut [RestoreRun], env: &Env, args: &SnapshotArgs, progress: &Progress) {
    let rounds = args.warmup + args.runs;
    let mut number = 0;
    for round in 0..rounds {
        let phase = phase(round, args);
        for run in runs.iter_mut().filter(|r| r.error.is_none()) {
            number += 1;
            let name = format!(
                "{} {} {}",
                run.case.name(),
                report::format_mib(run.mib),
                run.path.label()
            );
            progress.status(&format!("hearth bench snapshot: restore {phase}: {name}"));
            let restorer = match run.path {
                RestorePath::HearthRestore => Restorer::HearthRestore,
                RestorePath::ApiLoad => Restorer::ApiLoad(run.case.vmm()),
            };
            let guest = run.case.guest();
            let restored = restore_once(
                env,
                restorer,
                guest,
                run.mib,
                &run.snapshot,
                &run.dir,
                number,
            );
            match restored {
                Ok(restored) if round >= args.warmup => run.samples.push(RestoreSample {
                    round,
                    vcpus_ms: ms(restored.vcpus),
                    output_ms: ms(restored.output),
                    rss_kib: restored.memory.rss_kib,
                    pss_kib: restored.memory.pss_kib,
                    guest_rss_kib: restored.memory.guest_rss_kib,
                }),
                Ok(_) => {}
                Err(e) => {
                    progress.line(&format!("hearth bench snapshot: {name} failed: {e}"));
                    run.error = Some(e);
                }
            }
        }
        if !progress_is_tty() {
            progress.line(&format!("hearth bench snapshot: restore {phase} done"));
        }
    }
}

fn phase(round: usize, args: &SnapshotArgs) -> String {
    if round < args.warmup {
        format!("warm-up {}/{}", round + 1, args.warmup)
    } else {
        format!("run {}/{}", round - args.warmup + 1, args.runs)
    }
}

fn progress_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The first line of `program --version`.
fn version_of(program: &Path) -> Option<String> {
    let out = std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// The type of the file system `path` is on, from the longest mount point above it in
/// `/proc/self/mounts`.
fn filesystem_type(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mount_type(&mounts, &path)
}

fn mount_type(mounts: &str, path: &Path) -> Option<String> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, fs) = (fields.next()?, fields.next()?, fields.next()?);
            // /proc escapes spaces in mount points as \040.
            let point = PathBuf::from(point.replace("\\040", " "));
            path.starts_with(&point)
                .then(|| (point.as_os_str().len(), fs.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_list() {
        assert_eq!(
            parse_include("firecracker-tiny, hearth-tiny,firecracker-tiny").unwrap(),
            [CaseId::HearthTiny, CaseId::FirecrackerTiny]
        );
        assert_eq!(parse_include("all").unwrap(), CaseId::ALL);
        assert!(parse_include("qemu-tiny")
            .unwrap_err()
            .contains("qemu-tiny"));
        assert!(parse_include(" , ").is_err());
    }

    #[test]
    fn sizes_are_whole_mib_smallest_first() {
        assert_eq!(parse_sizes("1G,128M,1024M").unwrap(), [128, 1024]);
        assert!(parse_sizes("130000K")
            .unwrap_err()
            .contains("whole number of MiB"));
        assert!(parse_sizes("lots").unwrap_err().contains("lots"));
        assert!(parse_sizes("").is_err());
    }

    #[test]
    fn cases_are_named_and_paired() {
        for case in CaseId::ALL {
            let json = serde_json::to_string(&case).unwrap();
            assert_eq!(json, format!("\"{}\"", case.name()));
            assert!(!case.restore_paths().is_empty());
        }
        assert_eq!(
            CaseId::HearthTiny.firecracker_peer(),
            Some(CaseId::FirecrackerTiny)
        );
        assert_eq!(
            CaseId::FirecrackerTiny.restore_paths(),
            [RestorePath::ApiLoad]
        );
        assert_eq!(CaseId::HearthLinux.guest(), Guest::Linux);
    }

    #[test]
    fn mount_points_pick_the_longest() {
        let mounts = "/dev/vda / ext4 rw 0 0\n\
                      tmpfs /tmp tmpfs rw 0 0\n\
                      /dev/vdb /tmp/my\\040disk xfs rw 0 0\n";
        assert_eq!(
            mount_type(mounts, Path::new("/var/x")).as_deref(),
            Some("ext4")
        );
        assert_eq!(
            mount_type(mounts, Path::new("/tmp/a")).as_deref(),
            Some("tmpfs")
        );
        assert_eq!(
            mount_type(mounts, Path::new("/tmp/my disk/s")).as_deref(),
            Some("xfs")
        );
        // A prefix that is not a whole component does not count.
        assert_eq!(
            mount_type(mounts, Path::new("/tmpx")).as_deref(),
            Some("ext4")
        );
    }
}
