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
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown case \"docker\""),
        "{}",
        describe(&out)
    );
}
