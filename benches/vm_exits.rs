//! VM exit round trips: a tiny guest makes `EXIT_LOOP_COUNT` port writes (PIO) or MMIO
//! writes that hearth's buses dispatch to a device that ignores them, then exits. Each
//! iteration is a whole in-process VM lifecycle, so `lifecycle` (a guest that exits at
//! once) is measured too: (pio - lifecycle) / EXIT_LOOP_COUNT is one exit's round trip.
//! Throughput is reported in exits per second of the whole run.
//!
//! Needs /dev/kvm and gcc/ld (the payloads are built with the library's fixtures); without
//! KVM the benchmarks are skipped with a message.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hearth::bench::fixtures::payloads::{self, Format, EXITS_MMIO, EXITS_PIO, EXIT_LOOP_COUNT};
use hearth::cli::{Cli, Command};
use hearth::config::VmConfig;

const OUT_DIR: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/bench-payloads");

fn payload(name: &str) -> PathBuf {
    let spec = payloads::find(name, Format::Elf64).expect("known payload");
    let out = Path::new(OUT_DIR);
    payloads::build(&[spec], out).unwrap_or_else(|e| panic!("{}", hearth::error_chain(&e)));
    payloads::path(out, name, Format::Elf64)
}

fn config(kernel: &Path) -> VmConfig {
    let cli = Cli::try_parse_from([
        "hearth",
        "run",
        "--kernel",
        kernel.to_str().expect("UTF-8 path"),
        "--memory",
        "32M",
        "--serial",
        "none",
    ])
    .expect("valid arguments");
    let Some(Command::Run(args)) = cli.command else {
        unreachable!("parsed a run command")
    };
    VmConfig::from_args(&args).expect("valid configuration")
}

/// Builds and runs one VM to its end; panics unless the guest exits with 0.
fn run_vm(config: &VmConfig) {
    let vmm = hearth::builder::build_vm(config, Instant::now()).expect("build the VM");
    let reason = vmm.run().expect("run the VM");
    assert_eq!(reason.status(), 0, "{reason}");
}

fn exits(c: &mut Criterion) {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("vm_exits: /dev/kvm not available; skipped");
        return;
    }
    let lifecycle = config(&payload("exit_0"));
    let pio = config(&payload(EXITS_PIO));
    let mmio = config(&payload(EXITS_MMIO));

    let mut group = c.benchmark_group("vm_exits");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    group.bench_function("lifecycle", |b| b.iter(|| run_vm(&lifecycle)));
    group.throughput(Throughput::Elements(EXIT_LOOP_COUNT));
    group.bench_function("pio", |b| b.iter(|| run_vm(&pio)));
    group.bench_function("mmio", |b| b.iter(|| run_vm(&mmio)));
    group.finish();
}

criterion_group!(benches, exits);
criterion_main!(benches);
