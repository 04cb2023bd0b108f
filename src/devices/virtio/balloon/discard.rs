//! Giving guest RAM back to the host.
//!
//! How depends on the mapping behind the region:
//! - **private** (anonymous memory, or a snapshot's memory file mapped copy-on-write):
//!   `MADV_DONTNEED` drops the process's pages. The next guest read finds zeroes, or, on a
//!   mapping restored from a template's memory file, the template's page again. Either is
//!   fine: the guest only gives back pages it freed or ballooned, and it assumes nothing
//!   about what such a page holds when it takes it back.
//! - **shared** (a memfd shared with a vhost-user back end): `MADV_DONTNEED` would only
//!   unmap the page, which stays in the memfd and keeps costing the host; `MADV_REMOVE`
//!   punches the hole in the memfd itself, for every process that maps it.

use std::io;

use vm_memory::{Address, GuestMemoryBackend as _, GuestMemoryRegion, MemoryRegionAddress};

use super::request::GuestRange;
use crate::vstate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("{len:#x} bytes at guest {addr:#x} are not guest RAM")]
    Outside { addr: u64, len: u64 },
    #[error("madvise({advice}) failed on {len:#x} bytes at guest {addr:#x}")]
    Madvise {
        advice: &'static str,
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// Drops `range` of guest RAM from the host's memory. The range is checked again here
/// (whatever the caller did): all of it must lie in one region, so the VMM never advises
/// memory that is not the guest's.
pub fn discard_range(mem: &GuestMemory, range: GuestRange) -> Result<(), DiscardError> {
    let (addr, len) = (range.addr.raw_value(), range.len);
    let outside = || DiscardError::Outside { addr, len };
    let region = mem.find_region(range.addr).ok_or_else(outside)?;
    let offset = range
        .addr
        .checked_offset_from(region.start_addr())
        .ok_or_else(outside)?;
    if len == 0 || offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(outside());
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| outside())?;
    let (advice, name) = if region.flags() & libc::MAP_SHARED != 0 {
        (libc::MADV_REMOVE, "MADV_REMOVE")
    } else {
        (libc::MADV_DONTNEED, "MADV_DONTNEED")
    };
    // SAFETY: [host, host + len) lies inside the region's mapping (checked above), which
    // this process owns for the guest and which stays mapped while `mem` is alive. The
    // advice only replaces the pages' contents (zero, the file's page, or a hole), which
    // guest memory accessors tolerate: they never hold references into guest memory
    // across this call.
    let result = unsafe { libc::madvise(host.cast(), len as usize, advice) };
    if result != 0 {
        return Err(DiscardError::Madvise {
            advice: name,
            addr,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd};

    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

    use super::*;

    fn range(addr: u64, len: u64) -> GuestRange {
        GuestRange {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn private_pages_read_back_as_zero() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0xaa; 0x3000], GuestAddress(0x1000))
            .unwrap();
        discard_range(&mem, range(0x2000, 0x1000)).unwrap();
        let mut page = [0u8; 0x1000];
        for (addr, want) in [(0x1000, 0xaa), (0x2000, 0), (0x3000, 0xaa)] {
            mem.read_slice(&mut page, GuestAddress(addr)).unwrap();
            assert!(page.iter().all(|&b| b == want), "{addr:#x}");
        }
    }

    #[test]
    fn ranges_outside_guest_ram_are_refused() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(2 << 20), 1 << 20),
        ])
        .unwrap();
        for (addr, len) in [
            (0xf_f000, 0x2000),
            (1 << 20, 0x1000),
            (3 << 20, 0x1000),
            (0x1000, 0),
            (u64::MAX - 0xfff, 0x1000),
            (0x2f_f000, u64::MAX),
        ] {
            assert!(
                matches!(
                    discard_range(&mem, range(addr, len)),
                    Err(DiscardError::Outside { .. })
                ),
                "{addr:#x}+{len:#x}"
            );
        }
    }

    /// On a shared memfd mapping the hole goes through to the file: the host gets the
    /// memory back even though another process could map it.
    #[test]
    fn shared_pages_are_punched_out_of_the_file() {
        // SAFETY: memfd_create takes a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a new descriptor nobody else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(1 << 20).unwrap();
        let blocks = |file: &std::fs::File| {
            // SAFETY: fstat writes into the zeroed struct it is given.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above; the fd is open.
            assert_eq!(unsafe { libc::fstat(file.as_raw_fd(), &mut st) }, 0);
            st.st_blocks
        };
        let mapping = MmapRegionBuilder::new(1 << 20)
            .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .unwrap();
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        mem.write_slice(&[0x55; 0x10_0000], GuestAddress(0))
            .unwrap();
        let full = blocks(&file);
        discard_range(&mem, range(0x8_0000, 0x8_0000)).unwrap();
        assert!(blocks(&file) <= full / 2 + 8, "{} of {full}", blocks(&file));
        let mut page = [1u8; 0x1000];
        mem.read_slice(&mut page, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(page, [0; 0x1000]);
        mem.read_slice(&mut page, GuestAddress(0)).unwrap();
        assert_eq!(page, [0x55; 0x1000]);
    }
}
