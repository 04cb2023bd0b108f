//! Guest RAM: anonymous mappings laid out by the architecture code, or private mappings of a
//! snapshot's memory file. A VM with a vhost-user device (virtio-fs) instead gets RAM in a
//! memfd mapped shared ([`create_shared_guest_memory`], [`restore_shared_guest_memory`]):
//! the back end process maps the same pages from the fd hearth hands it, which anonymous
//! or private memory cannot give. Anonymous memory stays the rule otherwise: it is what
//! the snapshot writer's residency scan and the copy-on-write template restore rely on.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes as _, FileOffset, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch;

pub type GuestMemory = GuestMemoryMmap<()>;

/// Guest RAM regions start, end and sit in the memory file at multiples of this.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size_mib} MiB of guest memory")]
    Map {
        size_mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("invalid memory layout: {0}")]
    Layout(String),
    #[error("cannot read the memory file's size")]
    FileSize(#[source] std::io::Error),
    #[error("the memory file holds {len} bytes, the memory layout needs {needed}")]
    FileTooShort { len: u64, needed: u64 },
    #[error("cannot map {size_mib} MiB of the memory file at offset {offset:#x}")]
    MapFile {
        size_mib: u64,
        offset: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble the guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot create a memfd of {size_mib} MiB for shared guest memory")]
    Memfd {
        size_mib: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy the memory file into shared guest memory at guest {address:#x}")]
    CopyIn {
        address: u64,
        #[source]
        source: std::io::Error,
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

/// Maps `size` bytes of guest RAM as [`create_guest_memory`] lays them out, in one memfd
/// mapped shared, regions one after another in it (as [`MemoryLayout::packed`] places
/// them): every region carries its [`FileOffset`], which is what a vhost-user back end is
/// sent to map the same pages.
pub fn create_shared_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let mut file_offset = 0;
    let regions = arch::arch_memory_regions(size)
        .into_iter()
        .map(|(address, len)| {
            let region = RegionLayout {
                guest_address: address.raw_value(),
                size: len as u64,
                file_offset,
            };
            file_offset += len as u64;
            region
        })
        .collect();
    let layout = MemoryLayout { regions };
    layout.validate()?;
    map_shared(&new_memfd(layout.ram_size())?, &layout)
}

/// A snapshot's guest RAM in a new memfd mapped shared, for a restored VM with a
/// vhost-user device: the memory file's contents are copied in at once (the back end
/// needs the pages in the memfd, and a private copy-on-write mapping of the file would
/// keep them out of it). That costs a read of the whole file and the memory of every
/// page it holds, where a private mapping costs nothing until the guest touches a page.
pub fn restore_shared_guest_memory(
    mut file: File,
    layout: &MemoryLayout,
) -> Result<GuestMemory, MemoryError> {
    layout.validate()?;
    let len = file.metadata().map_err(MemoryError::FileSize)?.len();
    let needed = layout.file_size();
    if len < needed {
        return Err(MemoryError::FileTooShort { len, needed });
    }
    let started = Instant::now();
    let packed = MemoryLayout {
        regions: (layout.regions.iter())
            .scan(0, |offset, r| {
                let place = RegionLayout {
                    file_offset: *offset,
                    ..*r
                };
                *offset += r.size;
                Some(place)
            })
            .collect(),
    };
    let mem = map_shared(&new_memfd(layout.ram_size())?, &packed)?;
    let mut copied = 0u64;
    for r in &layout.regions {
        let copy_err = |source| MemoryError::CopyIn {
            address: r.guest_address,
            source,
        };
        // The file's holes (pages the guest never wrote, or wrote zeros to) stay holes of
        // the memfd: they read as zeros without costing memory or a copy.
        let end = r.file_offset + r.size;
        let mut at = r.file_offset;
        while let Some((start, stop)) = next_data(&file, at, end).map_err(copy_err)? {
            file.seek(SeekFrom::Start(start)).map_err(copy_err)?;
            let address = GuestAddress(r.guest_address + (start - r.file_offset));
            // Within the region, whose size validate() checked fits usize.
            mem.read_exact_volatile_from(address, &mut file, (stop - start) as usize)
                .map_err(|e| copy_err(std::io::Error::other(e)))?;
            copied += stop - start;
            at = stop;
        }
    }
    log::info!(
        "restore: copied {} MiB of data ({} MiB of guest RAM) from the memory file into \
         shared guest memory in {} ms",
        copied >> 20,
        layout.ram_size() >> 20,
        started.elapsed().as_millis()
    );
    Ok(mem)
}

/// The next range of `file` between `from` and `end` that holds data (`SEEK_DATA`,
/// `SEEK_HOLE`); a file system without hole reporting answers with all of it.
fn next_data(file: &File, from: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    if from >= end {
        return Ok(None);
    }
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a descriptor `file` owns; it only moves the file position.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let err = std::io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after the offset.
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    };
    let Some(start) = seek(from, libc::SEEK_DATA)? else {
        return Ok(None);
    };
    if start >= end {
        return Ok(None);
    }
    let stop = seek(start, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
    Ok(Some((start, stop)))
}

/// An anonymous memfd of `size` bytes, closed on exec (the back end gets it over the
/// vhost-user socket, never by inheritance).
fn new_memfd(size: u64) -> Result<File, MemoryError> {
    let failed = |source| MemoryError::Memfd {
        size_mib: size >> 20,
        source,
    };
    // SAFETY: the name is a NUL-terminated string that outlives the call; the kernel
    // copies it.
    let fd = unsafe { libc::memfd_create(c"hearth-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(failed)?;
    Ok(file)
}

/// Maps each region of `layout` from `file`, shared and writable.
fn map_shared(file: &File, layout: &MemoryLayout) -> Result<GuestMemory, MemoryError> {
    let file = Arc::new(file.try_clone().map_err(|source| MemoryError::Memfd {
        size_mib: layout.ram_size() >> 20,
        source,
    })?);
    map_file(file, layout, libc::MAP_SHARED | libc::MAP_NORESERVE)
}

/// Where one guest RAM region lives in a memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_address: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// The guest RAM regions in address order and where each one is in a memory file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// `mem`'s regions stored one after another from offset 0, so the file is exactly as
    /// large as the guest's RAM and the 32-bit MMIO hole takes no room in it.
    pub fn packed(mem: &GuestMemory) -> Self {
        let mut file_offset = 0;
        let regions = mem
            .iter()
            .map(|region| {
                let layout = RegionLayout {
                    guest_address: region.start_addr().raw_value(),
                    size: region.len(),
                    file_offset,
                };
                file_offset += region.len();
                layout
            })
            .collect();
        Self { regions }
    }

    /// Bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The smallest memory file that holds every region.
    pub fn file_size(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.file_offset.saturating_add(r.size))
            .max()
            .unwrap_or(0)
    }

    /// Refuses layouts that cannot be mapped: no regions, sizes or offsets that are not
    /// whole pages, regions that overlap in the guest or in the file, or that wrap around.
    pub fn validate(&self) -> Result<(), MemoryError> {
        let bad = |what: String| Err(MemoryError::Layout(what));
        if self.regions.is_empty() {
            return bad("no memory regions".into());
        }
        for (index, r) in self.regions.iter().enumerate() {
            if r.size == 0 {
                return bad(format!("region {index} is empty"));
            }
            if (r.guest_address | r.size | r.file_offset) % PAGE_SIZE != 0 {
                return bad(format!(
                    "region {index} (guest {:#x}, {:#x} bytes, file offset {:#x}) is not \
                     page-aligned",
                    r.guest_address, r.size, r.file_offset
                ));
            }
            if r.guest_address.checked_add(r.size).is_none()
                || r.file_offset.checked_add(r.size).is_none()
                || usize::try_from(r.size).is_err()
            {
                return bad(format!("region {index} wraps around the address space"));
            }
        }
        for (index, pair) in self.regions.windows(2).enumerate() {
            if pair[1].guest_address < pair[0].guest_address + pair[0].size {
                return bad(format!(
                    "region {} at guest {:#x} overlaps or precedes region {index}",
                    index + 1,
                    pair[1].guest_address
                ));
            }
        }
        let mut by_offset: Vec<&RegionLayout> = self.regions.iter().collect();
        by_offset.sort_by_key(|r| r.file_offset);
        if by_offset
            .windows(2)
            .any(|pair| pair[1].file_offset < pair[0].file_offset + pair[0].size)
        {
            return bad("two regions share bytes of the memory file".into());
        }
        Ok(())
    }
}

/// Maps guest RAM from a snapshot's memory file as `layout` places it. The mappings are
/// private: pages load from the file on first touch (so VMs restored from one file share
/// the pages none of them changed, through the page cache) and guest writes stay in this
/// process, never reaching the file. The file may be opened read-only. It must not shrink
/// while mapped: touching a page past its end would kill hearth with SIGBUS.
pub fn restore_guest_memory(file: File, layout: &MemoryLayout) -> Result<GuestMemory, MemoryError> {
    layout.validate()?;
    let len = file.metadata().map_err(MemoryError::FileSize)?.len();
    let needed = layout.file_size();
    if len < needed {
        return Err(MemoryError::FileTooShort { len, needed });
    }
    map_file(
        Arc::new(file),
        layout,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )
}

/// Maps every region of a validated `layout` from `file` with `flags`.
fn map_file(
    file: Arc<File>,
    layout: &MemoryLayout,
    flags: libc::c_int,
) -> Result<GuestMemory, MemoryError> {
    let regions = layout
        .regions
        .iter()
        .map(|r| {
            // validate() checked that the size fits usize and the ranges do not wrap.
            let size = r.size as usize;
            let mapping = MmapRegionBuilder::new(size)
                .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .map_err(|source| MemoryError::MapFile {
                    size_mib: r.size >> 20,
                    offset: r.file_offset,
                    source,
                })?;
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_address)).ok_or_else(|| {
                MemoryError::Layout(format!(
                    "region at guest {:#x} wraps around the address space",
                    r.guest_address
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    #[test]
    fn small_guest_is_one_region() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }

    fn region(guest_address: u64, size: u64, file_offset: u64) -> RegionLayout {
        RegionLayout {
            guest_address,
            size,
            file_offset,
        }
    }

    #[test]
    fn packed_layout_skips_the_mmio_hole_in_the_file() {
        let layout = MemoryLayout {
            regions: arch::arch_memory_regions(4 << 30)
                .into_iter()
                .scan(0, |offset, (address, size)| {
                    let r = region(address.0, size as u64, *offset);
                    *offset += size as u64;
                    Some(r)
                })
                .collect(),
        };
        assert_eq!(
            layout.regions[1].guest_address,
            arch::layout::RAM_ABOVE_4G_START
        );
        assert_eq!(layout.regions[1].file_offset, arch::layout::MMIO32_START);
        assert_eq!(layout.file_size(), 4 << 30);
        assert_eq!(layout.ram_size(), 4 << 30);
        layout.validate().unwrap();

        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(
            MemoryLayout::packed(&mem).regions,
            vec![region(0, 64 << 20, 0)]
        );
    }

    #[test]
    fn impossible_layouts_are_refused() {
        let cases = [
            (vec![], "no memory regions"),
            (vec![region(0, 0, 0)], "region 0 is empty"),
            (vec![region(0, 4097, 0)], "not page-aligned"),
            (vec![region(0, 4096, 512)], "not page-aligned"),
            (vec![region(0xffff_ffff_ffff_f000, 8192, 0)], "wraps around"),
            (
                vec![region(0, 8192, 0), region(4096, 4096, 8192)],
                "region 1 at guest 0x1000 overlaps or precedes region 0",
            ),
            (
                vec![region(0, 8192, 0), region(16384, 4096, 4096)],
                "share bytes of the memory file",
            ),
        ];
        for (regions, expected) in cases {
            let err = MemoryLayout { regions }.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }

    fn memory_file(bytes: &[u8]) -> File {
        // Tests run in parallel: each file gets a name of its own.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hearth-memory-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut file = File::create(&path).unwrap();
        file.write_all(bytes).unwrap();
        drop(file);
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn restored_memory_follows_the_layout() {
        // Two pages of file: page 0 holds 'a's, page 1 holds 'b's; the layout maps page 1 at
        // guest 0 and page 0 at guest 64 KiB.
        let mut bytes = vec![b'a'; 4096];
        bytes.extend([b'b'; 4096]);
        let layout = MemoryLayout {
            regions: vec![region(0, 4096, 4096), region(0x10000, 4096, 0)],
        };
        let mem = restore_guest_memory(memory_file(&bytes), &layout).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), b'b');
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10fff)).unwrap(), b'a');
        assert!(mem.read_obj::<u8>(GuestAddress(0x1000)).is_err());
    }

    #[test]
    fn shared_memory_is_one_memfd_the_regions_carry() {
        let mem = create_shared_guest_memory(4 << 30).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let (low, high) = (
            regions[0].file_offset().unwrap(),
            regions[1].file_offset().unwrap(),
        );
        assert_eq!(low.start(), 0);
        assert_eq!(high.start(), arch::layout::MMIO32_START);
        assert_eq!(
            low.file().metadata().unwrap().len(),
            4 << 30,
            "one memfd holds all of guest RAM"
        );
        // A write through the mapping is in the memfd, where a back end would see it.
        mem.write_obj(0x5a_u8, GuestAddress(arch::layout::RAM_ABOVE_4G_START + 7))
            .unwrap();
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(
            high.file(),
            &mut byte,
            arch::layout::MMIO32_START + 7,
        )
        .unwrap();
        assert_eq!(byte, [0x5a]);
    }

    #[test]
    fn restored_shared_memory_is_a_copy_in_a_memfd() {
        let mut bytes = vec![b'a'; 4096];
        bytes.extend([b'b'; 4096]);
        let layout = MemoryLayout {
            regions: vec![region(0, 4096, 4096), region(0x10000, 4096, 0)],
        };
        let mem = restore_shared_guest_memory(memory_file(&bytes), &layout).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), b'b');
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10fff)).unwrap(), b'a');
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().unwrap().start())
            .collect();
        assert_eq!(offsets, [0, 4096], "packed in the memfd, in guest order");
        mem.write_obj(b'c', GuestAddress(0)).unwrap();
        let first = mem.iter().next().unwrap();
        let memfd = first.file_offset().unwrap().file();
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(memfd, &mut byte, 0).unwrap();
        assert_eq!(byte, [b'c']);
        let err = restore_shared_guest_memory(memory_file(&bytes[..4096]), &layout).unwrap_err();
        assert!(matches!(err, MemoryError::FileTooShort { .. }));

        // A sparse file: data, a hole, data; the hole reads as zeros.
        let path = std::env::temp_dir().join(format!("hearth-sparse-{}", std::process::id()));
        let sparse = File::create(&path).unwrap();
        sparse.set_len(3 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&sparse, &[7; 4096], 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&sparse, &[9; 4096], (2 << 20) + 4096).unwrap();
        drop(sparse);
        let layout = MemoryLayout {
            regions: vec![region(0, 3 << 20, 0)],
        };
        let mem = restore_shared_guest_memory(File::open(&path).unwrap(), &layout).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4095)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(1 << 20)).unwrap(), 0);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((2 << 20) + 4096)).unwrap(),
            9
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((2 << 20) + 8192)).unwrap(),
            0
        );
        assert!(matches!(err, MemoryError::FileTooShort { .. }));
    }

    #[test]
    fn a_short_memory_file_is_refused() {
        let layout = MemoryLayout {
            regions: vec![region(0, 8192, 0)],
        };
        let err = restore_guest_memory(memory_file(&[0; 4096]), &layout).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the memory file holds 4096 bytes, the memory layout needs 8192"
        );
    }
}
