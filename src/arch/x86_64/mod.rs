//! x86_64 guest setup: the memory map, boot protocols (Linux 64-bit and PVH), vCPU registers,
//! CPUID, and the firmware tables (MP table, ACPI) a guest kernel reads at boot.

pub mod acpi;
pub mod boot;
pub mod cpu_features;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod pvm;
pub mod regs;
pub mod tsc;

use vm_memory::GuestAddress;

use crate::vstate::vcpu::CompatHook;
use layout::{MMIO32_START, RAM_ABOVE_4G_START};

/// What a vCPU's [`CompatHook`] saves with it.
pub use pvm::PvmState as CompatState;

/// The hook vCPU `vcpu` runs with under the compat CPU profile: the nested-PVM layer.
pub fn compat_hook(vcpu: u8) -> Box<dyn CompatHook> {
    Box::new(pvm::PvmCompat::new(vcpu))
}

/// Guest RAM regions for `mem_size` bytes: `[0, min(size, MMIO32_START))` and, when larger,
/// the rest at `RAM_ABOVE_4G_START`, so the 32-bit MMIO hole never holds RAM.
/// Used to build the `GuestMemoryMmap`.
pub fn arch_memory_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    // usize is 64 bits on every host hearth builds for, so these casts never truncate.
    if mem_size <= MMIO32_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO32_START as usize),
            (
                GuestAddress(RAM_ABOVE_4G_START),
                (mem_size - MMIO32_START) as usize,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let regions = arch_memory_regions(128 << 20);
        assert_eq!(regions, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn guest_filling_low_ram_exactly_is_one_region() {
        let regions = arch_memory_regions(MMIO32_START);
        assert_eq!(regions, vec![(GuestAddress(0), MMIO32_START as usize)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let regions = arch_memory_regions(4 << 30);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), 3 << 30),
                (GuestAddress(RAM_ABOVE_4G_START), 1 << 30),
            ]
        );
        let total: usize = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }
}
