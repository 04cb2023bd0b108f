//! `hearth bench snapshot`'s results: the data model (serialized as the JSON report, with
//! every raw sample), the Markdown tables printed on stdout and the chart's rows.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use super::{CaseId, RestorePath};
use crate::bench::chart::Row;
use crate::bench::report::{format_kib, format_ms, CaseStatus, HostInfo};
use crate::bench::stats::{self, Summary};

/// Version of the JSON layout; bump on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    pub format_version: u32,
    pub hearth_version: &'static str,
    pub host: HostInfo,
    /// `firecracker --version`, when it is on PATH.
    pub firecracker_version: Option<String>,
    pub runs: usize,
    pub warmup: usize,
    /// Where the snapshot files were written, and that directory's file system type.
    pub snapshot_dir: PathBuf,
    pub snapshot_fs: Option<String>,
    /// What the guests run.
    pub tiny_guest: &'static str,
    pub linux_command: &'static str,
    /// One per VM snapshotted: case and guest RAM size.
    pub snapshots: Vec<SnapshotCase>,
    /// One per snapshot and way of restoring it.
    pub restores: Vec<RestoreCase>,
}

/// One snapshot creation on the paused VM.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CreateSample {
    /// Interleaving round (counting warm-up rounds).
    pub round: usize,
    /// `PUT /snapshot/create`, request sent to answer read.
    pub create_ms: f64,
    /// Allocated on disk (`st_blocks * 512`) and apparent size (`st_size`).
    pub mem_file_disk_bytes: u64,
    pub mem_file_bytes: u64,
    pub state_file_disk_bytes: u64,
    pub state_file_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SnapshotCase {
    pub case: CaseId,
    pub guest_mib: u64,
    pub status: CaseStatus,
    /// Why the case failed or was skipped.
    pub error: Option<String>,
    /// From spawn to the guest's output that says it runs (the VM then paused).
    pub ready_ms: Option<f64>,
    pub samples: Vec<CreateSample>,
    pub create_ms: Option<Summary>,
    pub mem_file_disk_bytes: Option<Summary>,
    pub mem_file_bytes: Option<Summary>,
    pub state_file_disk_bytes: Option<Summary>,
    pub state_file_bytes: Option<Summary>,
}

impl SnapshotCase {
    pub fn new(
        case: CaseId,
        guest_mib: u64,
        ready_ms: Option<f64>,
        samples: Vec<CreateSample>,
        status: CaseStatus,
        error: Option<String>,
    ) -> Self {
        let of = |f: fn(&CreateSample) -> f64| summary(&samples, f);
        SnapshotCase {
            case,
            guest_mib,
            status,
            error,
            ready_ms,
            create_ms: of(|s| s.create_ms),
            mem_file_disk_bytes: of(|s| s.mem_file_disk_bytes as f64),
            mem_file_bytes: of(|s| s.mem_file_bytes as f64),
            state_file_disk_bytes: of(|s| s.state_file_disk_bytes as f64),
            state_file_bytes: of(|s| s.state_file_bytes as f64),
            samples,
        }
    }
}

/// One restore into a new process.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RestoreSample {
    pub round: usize,
    /// Spawn to the restored vCPUs running: hearth's `--restore-timer` line, or the
    /// answer to `PUT /snapshot/load` with `resume_vm`.
    pub vcpus_ms: f64,
    /// Spawn to the first byte on the guest console (the VMM's stdout).
    pub output_ms: f64,
    /// The VMM's memory at its first output (`smaps_rollup`), and the resident part of
    /// the guest RAM mapped from the memory file.
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub guest_rss_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoreCase {
    pub case: CaseId,
    pub guest_mib: u64,
    pub path: RestorePath,
    pub status: CaseStatus,
    pub error: Option<String>,
    pub samples: Vec<RestoreSample>,
    pub vcpus_ms: Option<Summary>,
    pub output_ms: Option<Summary>,
    pub rss_kib: Option<Summary>,
    pub pss_kib: Option<Summary>,
    pub guest_rss_kib: Option<Summary>,
}

impl RestoreCase {
    pub fn new(
        case: CaseId,
        guest_mib: u64,
        path: RestorePath,
        samples: Vec<RestoreSample>,
        status: CaseStatus,
        error: Option<String>,
    ) -> Self {
        let of = |f: fn(&RestoreSample) -> f64| summary(&samples, f);
        RestoreCase {
            case,
            guest_mib,
            path,
            status,
            error,
            vcpus_ms: of(|s| s.vcpus_ms),
            output_ms: of(|s| s.output_ms),
            rss_kib: of(|s| s.rss_kib as f64),
            pss_kib: of(|s| s.pss_kib as f64),
            guest_rss_kib: of(|s| s.guest_rss_kib as f64),
            samples,
        }
    }

    /// Firecracker's result for the same guest and size, if this is not it.
    fn firecracker_peer<'a>(&self, all: &'a [RestoreCase]) -> Option<&'a RestoreCase> {
        let peer = self.case.firecracker_peer()?;
        all.iter()
            .find(|r| r.case == peer && r.guest_mib == self.guest_mib && r.status == CaseStatus::Ok)
    }
}

fn summary<T>(samples: &[T], f: fn(&T) -> f64) -> Option<Summary> {
    Summary::of(&samples.iter().map(f).collect::<Vec<_>>())
}

/// `128 MiB`, `1 GiB`.
pub fn format_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn format_bytes(bytes: f64) -> String {
    format_kib(bytes / 1024.0)
}

/// Markdown escapes for table cells: pipes and newlines would break the row.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn not_ok(status: CaseStatus) -> &'static str {
    match status {
        CaseStatus::Skipped => "skipped",
        _ => "FAILED",
    }
}

/// The results as Markdown: the creation table, then the restore table.
pub fn markdown(report: &SnapshotReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "hearth bench snapshot: {} runs (+{} warm-up) per case, interleaved; snapshot files \
         in {}{}; host {} ({} CPUs{}){}\n",
        report.runs,
        report.warmup,
        report.snapshot_dir.display(),
        report
            .snapshot_fs
            .as_deref()
            .map_or(String::new(), |fs| format!(" ({fs})")),
        report.host.kernel,
        report.host.cpus,
        if report.host.kvm_is_pvm {
            ", nested PVM KVM"
        } else {
            ""
        },
        report
            .firecracker_version
            .as_deref()
            .map_or(String::new(), |v| format!("; {v}")),
    );

    out.push_str(
        "Snapshot creation: `PUT /snapshot/create` (Full) on the paused VM, timed by the \
         client; file sizes on disk (allocated blocks) and apparent.\n\n",
    );
    out.push_str(
        "| case | guest RAM | n | min | median | p95 | max | memory file on disk | \
         memory file size | state file on disk | state file size |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for snap in &report.snapshots {
        let name = snap.case.name();
        let ram = format_mib(snap.guest_mib);
        match (snap.status, snap.create_ms) {
            (CaseStatus::Ok, Some(create)) => {
                let median =
                    |s: Option<Summary>| s.map_or("-".to_owned(), |s| format_bytes(s.median));
                let _ = writeln!(
                    out,
                    "| {name} | {ram} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    create.count,
                    format_ms(create.min),
                    format_ms(create.median),
                    format_ms(create.p95),
                    format_ms(create.max),
                    median(snap.mem_file_disk_bytes),
                    median(snap.mem_file_bytes),
                    median(snap.state_file_disk_bytes),
                    median(snap.state_file_bytes),
                );
            }
            (status, _) => {
                let _ = writeln!(
                    out,
                    "| {name} | {ram} | {}: {} | | | | | | | | |",
                    not_ok(status),
                    cell(snap.error.as_deref().unwrap_or("no samples")),
                );
            }
        }
    }

    out.push_str(
        "\nRestore: a new VMM process per run, stopped with SIGTERM after its first guest \
         output. `hearth restore` is timed to its `--restore-timer` line, the API loads \
         (`PUT /snapshot/load` with `resume_vm` into `hearth --api-sock` or `firecracker \
         --api-sock`) to the answer; both are sent once the VMM's vCPUs run. RSS and PSS: \
         medians at the first output.\n\n",
    );
    out.push_str(
        "| case | guest RAM | how | measures | n | min | median | p95 | max | vs Firecracker \
         | RSS | PSS |\n",
    );
    out.push_str("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for restore in &report.restores {
        let name = restore.case.name();
        let ram = format_mib(restore.guest_mib);
        let how = restore.path.label();
        match (restore.status, restore.vcpus_ms, restore.output_ms) {
            (CaseStatus::Ok, Some(vcpus), Some(output)) => {
                let peer = restore.firecracker_peer(&report.restores);
                let versus = |mine: &Summary, theirs: Option<Summary>| {
                    theirs
                        .and_then(|t| stats::ratio(mine.median, t.median))
                        .map_or(String::new(), |r| format!("{r:.2}x"))
                };
                let kib = |s: Option<Summary>| s.map_or("-".to_owned(), |s| format_kib(s.median));
                let rows = [
                    (
                        restore.path.vcpus_measure(),
                        &vcpus,
                        versus(&vcpus, peer.and_then(|p| p.vcpus_ms)),
                        kib(restore.rss_kib),
                        kib(restore.pss_kib),
                    ),
                    (
                        "spawn -> first guest output",
                        &output,
                        versus(&output, peer.and_then(|p| p.output_ms)),
                        String::new(),
                        String::new(),
                    ),
                ];
                for (measures, s, versus, rss, pss) in rows {
                    let _ = writeln!(
                        out,
                        "| {name} | {ram} | {how} | {measures} | {} | {} | {} | {} | {} | \
                         {versus} | {rss} | {pss} |",
                        s.count,
                        format_ms(s.min),
                        format_ms(s.median),
                        format_ms(s.p95),
                        format_ms(s.max),
                    );
                }
            }
            (status, _, _) => {
                let _ = writeln!(
                    out,
                    "| {name} | {ram} | {how} | {}: {} | {} | | | | | | | |",
                    not_ok(status),
                    cell(restore.error.as_deref().unwrap_or("no samples")),
                    restore.samples.len(),
                );
            }
        }
    }
    out.push_str(
        "\nvs Firecracker: median over Firecracker's median for the same guest and RAM size. \
         p95: nearest rank (the maximum below 20 samples).\n",
    );
    for snap in &report.snapshots {
        if let Some(ready) = snap.ready_ms {
            let _ = writeln!(
                out,
                "note, {} {}: the VM snapshotted ran its guest after {} (spawn to output), \
                 then was paused once and snapshotted every run",
                snap.case.name(),
                format_mib(snap.guest_mib),
                format_ms(ready)
            );
        }
    }
    out
}

/// The chart's rows: each restore case's two measures, then each creation.
pub fn chart_rows(report: &SnapshotReport) -> Vec<Row> {
    let mut rows = Vec::new();
    let short = |mib: u64| {
        if mib >= 1024 && mib.is_multiple_of(1024) {
            format!("{}G", mib / 1024)
        } else {
            format!("{mib}M")
        }
    };
    for r in report
        .restores
        .iter()
        .filter(|r| r.status == CaseStatus::Ok)
    {
        let label = format!(
            "{} {} {}",
            r.case.name(),
            short(r.guest_mib),
            r.path.short()
        );
        if let (Some(vcpus), Some(output)) = (r.vcpus_ms, r.output_ms) {
            rows.push(Row {
                label: format!("{label}: vCPUs"),
                samples: r.samples.iter().map(|s| s.vcpus_ms).collect(),
                median: vcpus.median,
            });
            rows.push(Row {
                label: format!("{label}: output"),
                samples: r.samples.iter().map(|s| s.output_ms).collect(),
                median: output.median,
            });
        }
    }
    for s in report
        .snapshots
        .iter()
        .filter(|s| s.status == CaseStatus::Ok)
    {
        if let Some(create) = s.create_ms {
            rows.push(Row {
                label: format!("{} {} create", s.case.name(), short(s.guest_mib)),
                samples: s.samples.iter().map(|c| c.create_ms).collect(),
                median: create.median,
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore_sample(round: usize, vcpus_ms: f64, output_ms: f64) -> RestoreSample {
        RestoreSample {
            round,
            vcpus_ms,
            output_ms,
            rss_kib: 3000,
            pss_kib: 2000,
            guest_rss_kib: 100,
        }
    }

    fn create_sample(round: usize, create_ms: f64) -> CreateSample {
        CreateSample {
            round,
            create_ms,
            mem_file_disk_bytes: 53248,
            mem_file_bytes: 128 << 20,
            state_file_disk_bytes: 12288,
            state_file_bytes: 11792,
        }
    }

    fn example() -> SnapshotReport {
        SnapshotReport {
            format_version: FORMAT_VERSION,
            hearth_version: "test",
            host: HostInfo {
                kernel: "6.18".into(),
                cpus: 2,
                kvm_is_pvm: true,
            },
            firecracker_version: Some("Firecracker v1.17.0-dev".into()),
            runs: 2,
            warmup: 0,
            snapshot_dir: "/tmp".into(),
            snapshot_fs: Some("ext4".into()),
            tiny_guest: "ticker",
            linux_command: "loop",
            snapshots: vec![
                SnapshotCase::new(
                    CaseId::HearthTiny,
                    128,
                    Some(3.0),
                    vec![create_sample(0, 10.0), create_sample(1, 14.0)],
                    CaseStatus::Ok,
                    None,
                ),
                SnapshotCase::new(
                    CaseId::HearthLinux,
                    1024,
                    None,
                    Vec::new(),
                    CaseStatus::Failed,
                    Some("kernel | missing".into()),
                ),
            ],
            restores: vec![
                RestoreCase::new(
                    CaseId::HearthTiny,
                    128,
                    RestorePath::HearthRestore,
                    vec![restore_sample(0, 2.0, 2.5), restore_sample(1, 4.0, 4.5)],
                    CaseStatus::Ok,
                    None,
                ),
                RestoreCase::new(
                    CaseId::FirecrackerTiny,
                    128,
                    RestorePath::ApiLoad,
                    vec![restore_sample(0, 6.0, 7.0), restore_sample(1, 6.0, 7.0)],
                    CaseStatus::Ok,
                    None,
                ),
                RestoreCase::new(
                    CaseId::FirecrackerTiny,
                    1024,
                    RestorePath::ApiLoad,
                    Vec::new(),
                    CaseStatus::Skipped,
                    Some("firecracker is not on PATH".into()),
                ),
            ],
        }
    }

    #[test]
    fn markdown_has_both_tables() {
        let text = markdown(&example());
        assert!(
            text.contains(
                "| hearth-tiny | 128 MiB | 2 | 10.0 ms | 12.0 ms | 14.0 ms | 14.0 ms | 52 KiB | \
                 128.0 MiB | 12 KiB | 12 KiB |"
            ),
            "{text}"
        );
        assert!(text.contains("| hearth-linux | 1 GiB | FAILED: kernel \\| missing |"));
        assert!(text.contains(
            "| hearth-tiny | 128 MiB | hearth restore | spawn -> vCPUs running | 2 | 2.0 ms | \
             3.0 ms | 4.0 ms | 4.0 ms | 0.50x | 2.9 MiB | 2.0 MiB |"
        ));
        assert!(text.contains(
            "| hearth-tiny | 128 MiB | hearth restore | spawn -> first guest output | 2 | 2.5 ms"
        ));
        assert!(text.contains("| firecracker-tiny | 128 MiB | API load | spawn -> load answered"));
        assert!(text.contains("| firecracker-tiny | 1 GiB | API load | skipped: firecracker"));
        assert!(text.contains("Firecracker v1.17.0-dev"));
        assert!(text.contains("note, hearth-tiny 128 MiB: the VM snapshotted ran its guest"));
        // Every row of a table has its header's column count.
        for line in text
            .lines()
            .filter(|l| l.contains("| 128 MiB | hearth restore |"))
        {
            assert_eq!(line.matches('|').count(), 13, "{line}");
        }
    }

    #[test]
    fn json_has_raw_samples() {
        let json = serde_json::to_value(example()).unwrap();
        assert_eq!(json["snapshots"][0]["case"], "hearth-tiny");
        assert_eq!(json["snapshots"][0]["samples"][1]["create_ms"], 14.0);
        assert_eq!(
            json["snapshots"][0]["mem_file_disk_bytes"]["median"],
            53248.0
        );
        assert_eq!(json["snapshots"][1]["status"], "failed");
        assert_eq!(json["restores"][0]["path"], "hearth-restore");
        assert_eq!(json["restores"][0]["vcpus_ms"]["median"], 3.0);
        assert_eq!(json["restores"][1]["path"], "api-load");
        assert_eq!(json["restores"][2]["status"], "skipped");
    }

    #[test]
    fn chart_has_a_row_per_measure() {
        let rows = chart_rows(&example());
        let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "hearth-tiny 128M restore: vCPUs",
                "hearth-tiny 128M restore: output",
                "firecracker-tiny 128M API: vCPUs",
                "firecracker-tiny 128M API: output",
                "hearth-tiny 128M create",
            ]
        );
        let svg = crate::bench::chart::rows_svg("x", "y", &rows).unwrap();
        assert!(svg.contains("hearth-tiny 128M create"));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(format_mib(128), "128 MiB");
        assert_eq!(format_mib(1024), "1 GiB");
        assert_eq!(format_mib(1536), "1536 MiB");
    }
}
