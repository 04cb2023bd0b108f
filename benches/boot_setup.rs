//! Guest setup before the first vCPU instruction, without KVM: Linux boot_params with the
//! e820 map, the identity page tables and boot GDT, the MP table and the ACPI tables,
//! written into fresh guest memory, as `builder::build_vm` does for every VM.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use hearth::arch::x86_64::boot::{configure_linux_boot, BootProtocol};
use hearth::arch::x86_64::layout::CMDLINE_START;
use hearth::arch::x86_64::{acpi, arch_memory_regions, mptable, regs};
use kvm_bindings::kvm_sregs;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 256 << 20;

fn boot_setup(c: &mut Criterion) {
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&arch_memory_regions(MEM_SIZE)).unwrap();
    let mut group = c.benchmark_group("boot_setup");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("boot_params", |b| {
        b.iter(|| {
            configure_linux_boot(&mem, GuestAddress(CMDLINE_START), 64, None, None, None).unwrap()
        })
    });
    group.bench_function("page_tables_and_gdt", |b| {
        b.iter(|| {
            let mut sregs = kvm_sregs::default();
            regs::boot_sregs(&mem, &mut sregs, BootProtocol::Linux64).unwrap();
            sregs
        })
    });
    group.bench_function("mptable_and_acpi", |b| {
        b.iter(|| {
            mptable::setup_mptable(&mem, 2).unwrap();
            acpi::create_acpi_tables(&mem, 2, &[]).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, boot_setup);
criterion_main!(benches);
