//! Guest RAM: anonymous mappings laid out by the architecture code.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch;

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size_mib} MiB of guest memory")]
    Map {
        size_mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `size` bytes of guest RAM, split around the 32-bit MMIO hole.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let regions: Vec<(GuestAddress, usize)> = arch::arch_memory_regions(size);
    GuestMemoryMmap::from_ranges(&regions).map_err(|source| MemoryError::Map {
        size_mib: size >> 20,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend as _;

    #[test]
    fn small_guest_is_one_region() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
