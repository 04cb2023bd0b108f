//! The start-up benchmark's results: the data model (serialized as the JSON report, with
//! every raw sample) and the Markdown table printed on stdout.

use std::fmt::Write as _;

use serde::Serialize;

use super::cases::CaseId;
use super::memory::VmmMemory;
use super::stats::{self, Summary};

/// Version of the JSON layout; bump on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize)]
pub struct StartupReport {
    pub format_version: u32,
    pub hearth_version: &'static str,
    pub host: HostInfo,
    pub runs: usize,
    pub warmup: usize,
    pub command: Vec<String>,
    pub cases: Vec<CaseReport>,
    pub memory: Vec<MemoryReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostInfo {
    pub kernel: String,
    pub cpus: usize,
    pub kvm_is_pvm: bool,
}

impl HostInfo {
    pub fn current() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        HostInfo {
            kernel,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kvm_is_pvm: crate::arch::pvm::host_is_pvm(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseStatus {
    Ok,
    Failed,
    Skipped,
}

/// One measured sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Interleaving round (counting warm-up rounds).
    pub round: usize,
    /// Spawn to exit.
    pub wall_ms: f64,
    /// Spawn to the boot-complete signal, for cases that report one.
    pub boot_ms: Option<f64>,
    /// Spawn to the exit of the sample's first command, for cases that run a second one
    /// after it (`hearth machine start` returning: the machine accepts work).
    pub ready_ms: Option<f64>,
    /// Peak RSS of the process tree (see `process`), KiB.
    pub max_rss_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseReport {
    pub id: CaseId,
    pub description: &'static str,
    pub status: CaseStatus,
    /// Why the case failed or was skipped.
    pub error: Option<String>,
    /// How the case was adapted to this host.
    pub note: Option<String>,
    pub samples: Vec<Sample>,
    pub wall_ms: Option<Summary>,
    pub boot_ms: Option<Summary>,
    pub ready_ms: Option<Summary>,
    pub max_rss_kib: Option<Summary>,
    /// The case the ratio is against (its own baseline, or `hearth-tiny` as a fallback).
    pub ratio_to: Option<CaseId>,
    /// Median wall time over the `ratio_to` case's median wall time.
    pub ratio: Option<f64>,
}

impl CaseReport {
    /// A case with its samples; status `Failed` when `error` is set even if some samples
    /// were taken before it failed.
    pub fn new(id: CaseId, samples: Vec<Sample>, error: Option<String>) -> Self {
        let walls: Vec<f64> = samples.iter().map(|s| s.wall_ms).collect();
        let boots: Vec<f64> = samples.iter().filter_map(|s| s.boot_ms).collect();
        let readies: Vec<f64> = samples.iter().filter_map(|s| s.ready_ms).collect();
        let rss: Vec<f64> = samples.iter().map(|s| s.max_rss_kib as f64).collect();
        CaseReport {
            id,
            description: id.description(),
            status: if error.is_some() {
                CaseStatus::Failed
            } else {
                CaseStatus::Ok
            },
            error,
            note: None,
            wall_ms: Summary::of(&walls),
            boot_ms: Summary::of(&boots),
            ready_ms: Summary::of(&readies),
            max_rss_kib: Summary::of(&rss),
            samples,
            ratio_to: None,
            ratio: None,
        }
    }

    pub fn skipped(id: CaseId, note: String) -> Self {
        CaseReport {
            status: CaseStatus::Skipped,
            ..Self::new(id, Vec::new(), Some(note))
        }
    }
}

/// Fills in each case's ratio: against its baseline when that has a median, else against
/// `hearth-tiny`, else none.
pub fn compute_ratios(cases: &mut [CaseReport]) {
    let median_of = |cases: &[CaseReport], id: CaseId| {
        cases
            .iter()
            .find(|c| c.id == id && c.status == CaseStatus::Ok)
            .and_then(|c| c.wall_ms)
            .map(|s| s.median)
    };
    for i in 0..cases.len() {
        let Some(own) = cases[i].wall_ms.map(|s| s.median) else {
            continue;
        };
        let candidates = [cases[i].id.baseline(), CaseId::HearthTiny];
        let found = candidates
            .into_iter()
            .find_map(|id| median_of(cases, id).map(|m| (id, m)));
        if let Some((id, base)) = found {
            cases[i].ratio_to = Some(id);
            cases[i].ratio = stats::ratio(own, base);
        }
    }
}

/// VMM memory of a running hearth VM.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    /// What was running, e.g. `hearth-tiny (idle payload)`.
    pub vm: String,
    pub memory: Option<VmmMemory>,
    pub error: Option<String>,
}

/// A duration in milliseconds, readably.
pub fn format_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// KiB as MiB with one decimal, or as KiB below 1 MiB.
pub fn format_kib(kib: f64) -> String {
    if kib < 1024.0 {
        format!("{kib:.0} KiB")
    } else {
        format!("{:.1} MiB", kib / 1024.0)
    }
}

/// Markdown escapes for table cells: pipes and newlines would break the row.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The results as Markdown: one row per case and metric, then the memory table.
pub fn markdown(report: &StartupReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "hearth bench startup: {} runs (+{} warm-up) per case, interleaved; command `{}`; \
         host {} ({} CPUs{})\n",
        report.runs,
        report.warmup,
        report.command.join(" "),
        report.host.kernel,
        report.host.cpus,
        if report.host.kvm_is_pvm {
            ", nested PVM KVM"
        } else {
            ""
        }
    );
    out.push_str("| case | measures | n | min | median | p95 | max | ratio | peak RSS |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for case in &report.cases {
        let name = case.id.name();
        match (case.status, case.wall_ms) {
            (CaseStatus::Ok, Some(wall)) => {
                let ratio = match (case.ratio, case.ratio_to) {
                    (Some(r), Some(to)) if to == case.id => format!("{}x", ratio_text(r)),
                    (Some(r), Some(to)) => format!("{}x {}", ratio_text(r), to.name()),
                    _ => "-".to_owned(),
                };
                let rss = case
                    .max_rss_kib
                    .map_or("-".to_owned(), |s| format_kib(s.median));
                if let Some(boot) = case.boot_ms {
                    push_row(&mut out, name, "spawn -> boot signal", &boot, "", "");
                }
                if let Some(ready) = case.ready_ms {
                    push_row(
                        &mut out,
                        name,
                        "spawn -> ready (start returned)",
                        &ready,
                        "",
                        "",
                    );
                }
                let whole = if case.ready_ms.is_some() {
                    "spawn -> exit (start + stop)"
                } else {
                    "spawn -> exit"
                };
                push_row(&mut out, name, whole, &wall, &ratio, &rss);
            }
            (status, _) => {
                let what = match status {
                    CaseStatus::Skipped => "skipped",
                    _ => "FAILED",
                };
                let error = case.error.as_deref().unwrap_or("no samples");
                let _ = writeln!(
                    out,
                    "| {name} | {what}: {} | {} | | | | | | |",
                    cell(error),
                    case.samples.len()
                );
            }
        }
    }
    out.push_str(
        "\nratio: median spawn -> exit over the named hearth case's median (no name: the \
         case is its own baseline). peak RSS: median of the largest resident set in each run's \
         process tree (wait4 maxrss).\n",
    );
    for case in report.cases.iter().filter(|c| c.note.is_some()) {
        let _ = writeln!(
            out,
            "note, {}: {}",
            case.id.name(),
            case.note.as_deref().unwrap_or_default()
        );
    }
    if !report.memory.is_empty() {
        out.push_str(
            "\n| running VM | guest RAM | hearth RSS | hearth PSS | guest RAM touched | \
             VMM overhead (PSS - touched) |\n|---|---:|---:|---:|---:|---:|\n",
        );
        for entry in &report.memory {
            match (&entry.memory, &entry.error) {
                (Some(m), _) => {
                    let _ = writeln!(
                        out,
                        "| {} | {} MiB | {} | {} | {}{} | {} |",
                        entry.vm,
                        m.guest_mib,
                        format_kib(m.rss_kib as f64),
                        format_kib(m.pss_kib as f64),
                        format_kib(m.guest_rss_kib as f64),
                        if m.guest_mapping_found {
                            ""
                        } else {
                            " (mapping not found)"
                        },
                        format_kib(m.overhead_kib as f64),
                    );
                }
                (None, error) => {
                    let _ = writeln!(
                        out,
                        "| {} | FAILED: {} | | | | |",
                        entry.vm,
                        cell(error.as_deref().unwrap_or("unknown error"))
                    );
                }
            }
        }
    }
    out
}

fn push_row(out: &mut String, name: &str, what: &str, s: &Summary, ratio: &str, rss: &str) {
    let _ = writeln!(
        out,
        "| {name} | {what} | {} | {} | {} | {} | {} | {ratio} | {rss} |",
        s.count,
        format_ms(s.min),
        format_ms(s.median),
        format_ms(s.p95),
        format_ms(s.max),
    );
}

/// A ratio with two decimals, or two significant digits when it is smaller than 0.01
/// (crun next to a booting VM is ~0.0006x, not "0.00x").
fn ratio_text(r: f64) -> String {
    if r >= 0.01 || r <= 0.0 {
        format!("{r:.2}")
    } else {
        let digits = (-r.log10().floor()) as usize + 1;
        format!("{r:.digits$}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn sample(round: usize, wall_ms: f64, boot_ms: Option<f64>) -> Sample {
        Sample {
            round,
            wall_ms,
            boot_ms,
            ready_ms: None,
            max_rss_kib: 2048,
        }
    }

    fn start_stop(round: usize, ready_ms: f64, wall_ms: f64) -> Sample {
        Sample {
            ready_ms: Some(ready_ms),
            ..sample(round, wall_ms, None)
        }
    }

    pub(crate) fn example_report() -> StartupReport {
        let mut cases = vec![
            CaseReport::new(
                CaseId::HearthTiny,
                vec![sample(0, 20.0, Some(15.0)), sample(1, 30.0, Some(16.0))],
                None,
            ),
            CaseReport::new(
                CaseId::Unshare,
                vec![sample(0, 2.0, None), sample(1, 4.0, None)],
                None,
            ),
            CaseReport::new(CaseId::Crun, Vec::new(), Some("crun | exploded".into())),
            CaseReport::skipped(CaseId::FirecrackerTiny, "not on PATH".into()),
        ];
        compute_ratios(&mut cases);
        StartupReport {
            format_version: FORMAT_VERSION,
            hearth_version: "test",
            host: HostInfo {
                kernel: "6.1".into(),
                cpus: 2,
                kvm_is_pvm: true,
            },
            runs: 2,
            warmup: 0,
            command: vec!["/bin/true".into()],
            cases,
            memory: vec![
                MemoryReport {
                    vm: "hearth-tiny (idle payload)".into(),
                    memory: Some(VmmMemory {
                        pid: 1,
                        guest_mib: 64,
                        rss_kib: 4096,
                        pss_kib: 4000,
                        guest_rss_kib: 1000,
                        overhead_kib: 3000,
                        guest_mapping_found: true,
                    }),
                    error: None,
                },
                MemoryReport {
                    vm: "hearth-linux".into(),
                    memory: None,
                    error: Some("kernel missing".into()),
                },
            ],
        }
    }

    #[test]
    fn ratio_falls_back_to_hearth_tiny() {
        let report = example_report();
        let unshare = &report.cases[1];
        // hearth-container is not in the report: hearth-tiny is the fallback.
        assert_eq!(unshare.ratio_to, Some(CaseId::HearthTiny));
        assert_eq!(unshare.ratio, Some(3.0 / 25.0));
        assert_eq!(report.cases[0].ratio, Some(1.0));
        assert_eq!(report.cases[2].ratio, None);
    }

    #[test]
    fn template_cases_ratio_against_their_twins() {
        let mut cases = vec![
            CaseReport::new(
                CaseId::HearthContainer,
                vec![sample(0, 40_000.0, None)],
                None,
            ),
            CaseReport::new(
                CaseId::HearthContainerTemplate,
                vec![sample(0, 800.0, None)],
                None,
            ),
            CaseReport::new(
                CaseId::HearthMachineStart,
                vec![start_stop(0, 30_000.0, 31_000.0)],
                None,
            ),
            CaseReport::new(
                CaseId::HearthMachineStartTemplate,
                vec![start_stop(0, 300.0, 620.0)],
                None,
            ),
            CaseReport::new(CaseId::Crun, vec![sample(0, 40.0, None)], None),
        ];
        compute_ratios(&mut cases);
        let ratio = |i: usize| (cases[i].ratio_to.map(CaseId::name), cases[i].ratio);
        assert_eq!(ratio(1), (Some("hearth-container"), Some(0.02)));
        assert_eq!(ratio(2), (Some("hearth-machine-start"), Some(1.0)));
        assert_eq!(ratio(3), (Some("hearth-machine-start"), Some(0.02)));
        assert_eq!(ratio(4), (Some("hearth-container"), Some(0.001)));
        assert_eq!(cases[3].ready_ms.unwrap().median, 300.0);
        assert_eq!(cases[1].ready_ms, None);

        let mut report = example_report();
        report.cases = cases;
        let text = markdown(&report);
        assert!(
            text.contains(
                "| hearth-machine-start-template | spawn -> ready (start returned) | 1 | 300 ms |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| hearth-machine-start-template | spawn -> exit (start + stop) | 1 |"),
            "{text}"
        );
        assert!(text.contains("0.02x hearth-machine-start |"), "{text}");
        assert!(text.contains("0.02x hearth-container |"), "{text}");
        for line in text
            .lines()
            .filter(|l| l.starts_with("| hearth-machine-start"))
        {
            assert_eq!(line.matches('|').count(), 10, "{line}");
        }
    }

    #[test]
    fn markdown_has_every_case() {
        let text = markdown(&example_report());
        assert!(text.contains("| hearth-tiny | spawn -> exit | 2 | 20.0 ms | 25.0 ms | 30.0 ms"));
        assert!(text.contains("| hearth-tiny | spawn -> boot signal | 2 | 15.0 ms"));
        assert!(text.contains("| unshare | spawn -> exit | 2 |"));
        assert!(text.contains("0.12x hearth-tiny"));
        assert_eq!(ratio_text(0.000585), "0.00059");
        assert_eq!(ratio_text(0.0123), "0.01");
        assert_eq!(ratio_text(1.0), "1.00");
        assert!(text.contains("| crun | FAILED: crun \\| exploded |"));
        assert!(text.contains("| firecracker-tiny | skipped: not on PATH |"));
        assert!(text.contains("| hearth-tiny (idle payload) | 64 MiB | 4.0 MiB"));
        assert!(text.contains("| hearth-linux | FAILED: kernel missing |"));
        // Every table row has the header's column count.
        for line in text.lines().filter(|l| l.starts_with("| hearth-tiny |")) {
            assert_eq!(line.matches('|').count(), 10, "{line}");
        }
    }

    #[test]
    fn json_has_raw_samples_and_statuses() {
        let json = serde_json::to_value(example_report()).unwrap();
        let cases = json["cases"].as_array().unwrap();
        assert_eq!(cases[0]["id"], "hearth-tiny");
        assert_eq!(cases[0]["samples"].as_array().unwrap().len(), 2);
        assert_eq!(cases[0]["samples"][1]["wall_ms"], 30.0);
        assert_eq!(cases[0]["wall_ms"]["median"], 25.0);
        assert_eq!(cases[2]["status"], "failed");
        assert_eq!(cases[3]["status"], "skipped");
        assert_eq!(json["memory"][0]["memory"]["overhead_kib"], 3000);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(format_ms(1.234), "1.2 ms");
        assert_eq!(format_ms(123.4), "123 ms");
        assert_eq!(format_ms(1234.0), "1.23 s");
        assert_eq!(format_ms(41_234.0), "41.2 s");
    }
}
