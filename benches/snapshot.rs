//! Snapshot costs without KVM: writing and reading the state file for a state the size of
//! a 2-vCPU VM's, writing the memory file of a 128 MiB guest that touched 10 MiB, and
//! restoring it (the mmap alone, and the first touch of every page the guest had). Prints
//! the memory file's size on disk once.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use hearth::arch::x86_64::cpu_features::CpuFeatures;
use hearth::config::CpuProfile;
use hearth::snapshot::{write_memory_file, HostFacts, KvmFlavour, Snapshot, StateFile};
use hearth::vstate::memory::{create_guest_memory, restore_guest_memory, GuestMemory};
use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: u64 = 128 << 20;
const TOUCHED: u64 = 10 << 20;
const PAGE: u64 = 4096;

/// Shaped like one vCPU's saved state: registers, segments, a 4 KiB XSAVE area, MSRs and
/// the 1 KiB LAPIC page.
#[derive(Serialize, Deserialize)]
struct VcpuLike {
    regs: [u64; 18],
    sregs: Vec<(u64, u32, u16, [u8; 8])>,
    xsave: Vec<u32>,
    msrs: Vec<(u32, u64)>,
    lapic: Vec<u8>,
    events: [u64; 8],
}

#[derive(Serialize, Deserialize)]
struct VmLike {
    vcpus: Vec<VcpuLike>,
    irqchips: Vec<u8>,
    queues: Vec<(u16, u64, u64, u64, u16, u16)>,
    paths: Vec<String>,
}

fn vm_state(vcpus: usize) -> VmLike {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    VmLike {
        vcpus: (0..vcpus)
            .map(|_| VcpuLike {
                regs: std::array::from_fn(|_| next()),
                sregs: (0..8)
                    .map(|_| (next(), 0xffff_ffff, 0x10, [1; 8]))
                    .collect(),
                xsave: (0..1024)
                    .map(|i| if i < 700 { next() as u32 } else { 0 })
                    .collect(),
                msrs: (0..50).map(|i| (0xc000_0080 + i, next())).collect(),
                lapic: (0..1024)
                    .map(|i| if i % 16 < 4 { next() as u8 } else { 0 })
                    .collect(),
                events: [0; 8],
            })
            .collect(),
        irqchips: vec![0; 900],
        queues: (0..8)
            .map(|_| (256, next(), next(), next(), 17, 17))
            .collect(),
        paths: vec!["/var/lib/hearth/images/rootfs.ext4".into()],
    }
}

fn host() -> HostFacts {
    HostFacts {
        kvm: KvmFlavour::of_this_host(),
        cpu_profile: CpuProfile::Compat,
        cpu: CpuFeatures::from_cpuid(&CpuId::new(0).unwrap()),
    }
}

/// Every 13th page written, about 10 MiB in all: scattered, as a guest's pages are.
fn touched_guest() -> GuestMemory {
    let mem = create_guest_memory(MEM_SIZE).unwrap();
    let stride = MEM_SIZE / TOUCHED * PAGE;
    for address in (0..MEM_SIZE).step_by(stride as usize) {
        mem.write_slice(&[0x5a; PAGE as usize], GuestAddress(address))
            .unwrap();
    }
    mem
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hearth-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn snapshot(c: &mut Criterion) {
    let dir = scratch_dir();
    let mut group = c.benchmark_group("snapshot");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let state_path = dir.join("state");
    let mem = touched_guest();
    let state = Snapshot::new(
        host(),
        hearth::vstate::memory::MemoryLayout::packed(&mem),
        vm_state(2),
    );
    let state_bytes = state.write(&state_path).unwrap();
    eprintln!("state file for 2 vCPUs: {state_bytes} bytes");
    group.bench_function("state_write_2_vcpus", |b| {
        b.iter(|| state.write(&state_path).unwrap())
    });
    let current = host();
    group.bench_function("state_read_2_vcpus", |b| {
        b.iter(|| {
            StateFile::read(&state_path)
                .unwrap()
                .into_snapshot::<VmLike>(&current)
                .unwrap()
        })
    });

    let mem_path = dir.join("mem");
    let written = write_memory_file(&mem, &mem_path).unwrap();
    let meta = std::fs::metadata(&mem_path).unwrap();
    eprintln!(
        "memory file: {} MiB long, {} KiB of data, {} KiB allocated on disk",
        meta.len() >> 20,
        written.data_bytes >> 10,
        (meta.blocks() * 512) >> 10
    );
    group.bench_function("memory_write_128M_10M_touched", |b| {
        b.iter(|| write_memory_file(&mem, &mem_path).unwrap())
    });
    group.bench_function("memory_restore_mmap_128M", |b| {
        b.iter(|| restore_guest_memory(File::open(&mem_path).unwrap(), &written.layout).unwrap())
    });
    group.bench_function("memory_restore_and_read_touched_pages", |b| {
        let stride = MEM_SIZE / TOUCHED * PAGE;
        b.iter(|| {
            let restored =
                restore_guest_memory(File::open(&mem_path).unwrap(), &written.layout).unwrap();
            (0..MEM_SIZE)
                .step_by(stride as usize)
                .map(|a| restored.read_obj::<u8>(GuestAddress(a)).unwrap() as u64)
                .sum::<u64>()
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, snapshot);
criterion_main!(benches);
