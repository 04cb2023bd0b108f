//! `hearth bench startup` end to end with the fast cases: the tiny-payload VM and the
//! namespace-only floor. Checks the reports exist and parse; never asserts on timing.

mod common;

use common::{describe, kvm_available, run_hearth, TempDir};
use std::time::Duration;

const BENCH_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn startup_writes_json_svg_and_markdown() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("bench");
    let output = dir.join("out");
    let out = run_hearth(
        [
            "bench",
            "startup",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--include",
            "hearth-tiny,unshare",
            "--output",
            output.to_str().expect("UTF-8 temp path"),
        ],
        BENCH_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    let json = std::fs::read_to_string(output.join("startup.json")).expect("startup.json");
    let report: serde_json::Value = serde_json::from_str(&json).expect("startup.json parses");
    let cases = report["cases"].as_array().expect("cases array");
    let ids: Vec<&str> = cases.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, ["hearth-tiny", "unshare"], "{json}");
    for case in cases {
        assert_eq!(case["status"], "ok", "{json}");
        let samples = case["samples"].as_array().expect("samples array");
        assert_eq!(samples.len(), 2, "{json}");
        for sample in samples {
            assert!(
                sample["wall_ms"].as_f64().is_some_and(|ms| ms > 0.0),
                "{json}"
            );
        }
        assert!(case["wall_ms"]["median"].is_number(), "{json}");
    }
    // The tiny payload signals boot; unshare has no such thing.
    assert!(cases[0]["samples"][0]["boot_ms"].is_number(), "{json}");
    assert!(cases[1]["samples"][0]["boot_ms"].is_null(), "{json}");
    assert_eq!(cases[1]["ratio_to"], "hearth-tiny", "{json}");
    let memory = &report["memory"][0]["memory"];
    assert!(memory["pss_kib"].as_u64().is_some_and(|k| k > 0), "{json}");

    let svg = std::fs::read_to_string(output.join("startup.svg")).expect("startup.svg");
    assert!(svg.trim_start().starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    assert!(svg.contains("hearth-tiny (exit)") && svg.contains("unshare (exit)"));

    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("| hearth-tiny | spawn -> exit | 2 |"),
        "{table}"
    );
    assert!(table.contains("| unshare | spawn -> exit | 2 |"), "{table}");
    assert!(output.join("startup.md").is_file());
}

#[test]
fn unknown_case_is_a_usage_error() {
    let out = run_hearth(
        ["bench", "startup", "--include", "hearth-tiny,docker"],
        BENCH_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown case \"docker\""),
        "{}",
        describe(&out)
    );
    // The message lists every case, the template ones among them.
    for known in [
        "hearth-container,",
        "hearth-container-template",
        "hearth-machine-start,",
        "hearth-machine-start-template",
    ] {
        assert!(stderr.contains(known), "{known}: {}", describe(&out));
    }
}

/// Container density checks its options before it starts anything.
#[test]
fn container_density_refuses_bad_options() {
    for (args, expected) in [
        (["--vms", "0"], "--vms must be at least 1"),
        (["--memory", "lots"], "lots"),
    ] {
        let out = run_hearth(
            ["bench", "density", "--guest", "container"]
                .into_iter()
                .chain(args),
            BENCH_TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expected),
            "{expected}: {}",
            describe(&out)
        );
    }
}

/// `hearth bench snapshot` with the tiny guest at two sizes: snapshots are created and
/// restored both ways, and the reports parse. Never asserts on timing.
#[test]
fn snapshot_writes_json_svg_and_markdown() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("bench-snapshot");
    let output = dir.join("out");
    let out = run_hearth(
        [
            "bench",
            "snapshot",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--include",
            "hearth-tiny",
            "--memory",
            "128M,1G",
            "--snapshot-dir",
            dir.path().to_str().expect("UTF-8 temp path"),
            "--output",
            output.to_str().expect("UTF-8 temp path"),
        ],
        BENCH_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    let json = std::fs::read_to_string(output.join("snapshot.json")).expect("snapshot.json");
    let report: serde_json::Value = serde_json::from_str(&json).expect("snapshot.json parses");
    let snapshots = report["snapshots"].as_array().expect("snapshots array");
    assert_eq!(snapshots.len(), 2, "{json}");
    for (snapshot, mib) in snapshots.iter().zip([128u64, 1024]) {
        assert_eq!(snapshot["case"], "hearth-tiny", "{json}");
        assert_eq!(snapshot["status"], "ok", "{json}");
        assert_eq!(snapshot["guest_mib"], mib, "{json}");
        let samples = snapshot["samples"].as_array().expect("samples array");
        assert_eq!(samples.len(), 2, "{json}");
        for sample in samples {
            assert!(sample["create_ms"].as_f64().is_some_and(|ms| ms > 0.0));
            // The memory file is as long as the guest's RAM, and sparse: the tiny guest
            // touched a few pages of it.
            assert_eq!(sample["mem_file_bytes"], mib << 20, "{json}");
            let on_disk = sample["mem_file_disk_bytes"].as_u64().expect("disk bytes");
            assert!(on_disk > 0 && on_disk < 16 << 20, "{json}");
            assert!(sample["state_file_bytes"].as_u64().is_some_and(|b| b > 0));
        }
    }
    let restores = report["restores"].as_array().expect("restores array");
    let ways: Vec<(u64, &str)> = restores
        .iter()
        .map(|r| {
            (
                r["guest_mib"].as_u64().unwrap(),
                r["path"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ways,
        [
            (128, "hearth-restore"),
            (128, "api-load"),
            (1024, "hearth-restore"),
            (1024, "api-load")
        ],
        "{json}"
    );
    for restore in restores {
        assert_eq!(restore["status"], "ok", "{json}");
        let samples = restore["samples"].as_array().expect("samples array");
        assert_eq!(samples.len(), 2, "{json}");
        for sample in samples {
            assert!(sample["vcpus_ms"].as_f64().is_some_and(|ms| ms > 0.0));
            assert!(sample["output_ms"].as_f64().is_some_and(|ms| ms > 0.0));
            assert!(sample["rss_kib"].as_u64().is_some_and(|k| k > 0));
            // The guest runs from the memory file's mapping.
            assert!(sample["guest_rss_kib"].as_u64().is_some_and(|k| k > 0));
        }
    }

    let svg = std::fs::read_to_string(output.join("snapshot.svg")).expect("snapshot.svg");
    assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    assert!(svg.contains("hearth-tiny 1G restore: vCPUs"), "{svg}");
    let table = String::from_utf8_lossy(&out.stdout);
    for row in [
        "| hearth-tiny | 128 MiB | 2 |",
        "| hearth-tiny | 1 GiB | hearth restore | spawn -> vCPUs running | 2 |",
        "| hearth-tiny | 1 GiB | API load | spawn -> first guest output | 2 |",
    ] {
        assert!(table.contains(row), "{row}\n{table}");
    }
    assert!(output.join("snapshot.md").is_file());
    // The snapshot files went where they were told, and are gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["out"], "{left:?}");
}

#[test]
fn snapshot_refuses_unknown_cases_and_sizes() {
    for (args, expected) in [
        (["--include", "qemu-tiny"], "unknown case \"qemu-tiny\""),
        (["--memory", "lots"], "invalid --memory \"lots\""),
    ] {
        let out = run_hearth(["bench", "snapshot"].into_iter().chain(args), BENCH_TIMEOUT);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expected),
            "{}",
            describe(&out)
        );
    }
}
