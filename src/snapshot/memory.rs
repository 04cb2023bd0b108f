//! The memory file of a snapshot: guest RAM as plain bytes, regions one after another (see
//! `MemoryLayout::packed`), written sparse. Pages that hold only zeros are left as holes, so
//! a large guest that touched little of its RAM costs little disk; reading the file back
//! gives zeros there, which is what the guest had.
//!
//! Anonymous guest RAM is only scanned where the kernel has a page for it
//! (/proc/self/pagemap: present or swapped): a page the guest never touched has none and
//! is zero. RAM mapped from an earlier snapshot has file pages behind its holes, so it is
//! scanned whole.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

use crate::vstate::memory::{GuestMemory, MemoryLayout, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
/// Data runs are gathered up to this size before one write.
const WRITE_CHUNK: usize = 1 << 20;
/// Pagemap entries read at once (each describes one page): 32 MiB of guest RAM.
const PAGEMAP_BATCH: usize = 8192;
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot create the memory file \"{path}\"")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the memory file \"{path}\"")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read guest memory at {address:#x}")]
    Read {
        address: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What writing a memory file produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenMemory {
    /// Where each guest region is in the file; goes into the state file.
    pub layout: MemoryLayout,
    /// Bytes of non-zero pages written; the rest of the file is holes.
    pub data_bytes: u64,
}

/// Writes guest RAM to `path` (replaced if it exists) as a sparse file. The file is written
/// under a temporary name and moved into place, so VMs restored from an earlier file at
/// `path` keep their mappings of it, and nobody sees a half-written file. The guest must be
/// paused (vCPUs and devices): memory that changes while it is copied is saved torn.
pub fn write_memory_file(mem: &GuestMemory, path: &Path) -> Result<WrittenMemory, MemoryFileError> {
    let temp = super::temp_path(path);
    let result = write_to(mem, &temp).and_then(|written| {
        super::move_into_place(&temp, path).map_err(|source| MemoryFileError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(written)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn write_to(mem: &GuestMemory, path: &Path) -> Result<WrittenMemory, MemoryFileError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| MemoryFileError::Create {
            path: path.to_path_buf(),
            source,
        })?;
    let write_err = |source| MemoryFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let layout = MemoryLayout::packed(mem);
    let mut residency = Residency::open();
    let mut writer = RunWriter::new(&file);
    for (region, place) in mem.iter().zip(&layout.regions) {
        let pages = (region.len() / PAGE_SIZE) as usize;
        // Private file mappings (a restored VM) have data behind pages never touched here.
        let anonymous = region.file_offset().is_none();
        for first in (0..pages).step_by(PAGEMAP_BATCH) {
            let count = PAGEMAP_BATCH.min(pages - first);
            let resident = if anonymous {
                residency.of(region, first, count)
            } else {
                None
            };
            for page in first..first + count {
                if resident.as_ref().is_some_and(|r| !r[page - first]) {
                    writer.end_run().map_err(write_err)?;
                    continue;
                }
                let offset = (page * PAGE) as u64;
                let buf = writer.page_buffer(place.file_offset + offset);
                region
                    .get_slice(MemoryRegionAddress(offset), PAGE)
                    .map(|slice| slice.copy_to(buf))
                    .map_err(|source| MemoryFileError::Read {
                        address: place.guest_address + offset,
                        source,
                    })?;
                if is_zero(buf) {
                    writer.drop_page();
                    writer.end_run().map_err(write_err)?;
                } else {
                    writer.keep_page().map_err(write_err)?;
                }
            }
        }
    }
    writer.end_run().map_err(write_err)?;
    file.set_len(layout.file_size()).map_err(write_err)?;
    Ok(WrittenMemory {
        layout,
        data_bytes: writer.data_bytes,
    })
}

/// Which pages of anonymous memory the kernel holds (in RAM or swap), from
/// /proc/self/pagemap. Without it (no /proc, or an unreadable one) every page is scanned.
struct Residency {
    pagemap: Option<File>,
}

impl Residency {
    fn open() -> Self {
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| log::debug!("no pagemap, scanning all guest memory: {e}"))
            .ok();
        Self { pagemap }
    }

    /// For `count` pages of `region` from page `first`, whether each is held; `None` when
    /// unknown (then all must be read).
    fn of(&mut self, region: &GuestRegionMmap, first: usize, count: usize) -> Option<Vec<bool>> {
        let pagemap = self.pagemap.as_ref()?;
        let host = region
            .get_host_address(MemoryRegionAddress((first * PAGE) as u64))
            .ok()? as usize;
        let mut entries = vec![0u8; count * 8];
        if let Err(e) = pagemap.read_exact_at(&mut entries, (host / PAGE * 8) as u64) {
            log::debug!("pagemap unreadable, scanning all guest memory: {e}");
            self.pagemap = None;
            return None;
        }
        Some(
            entries
                .chunks_exact(8)
                .map(|e| {
                    let entry = u64::from_ne_bytes(e.try_into().expect("chunks of 8"));
                    entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0
                })
                .collect(),
        )
    }
}

/// Whether a page holds only zeros. Folding blocks (rather than stopping at the first
/// non-zero byte) lets the compiler vectorise the common all-zero case.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(128)
        .all(|block| block.iter().fold(0, |acc, byte| acc | byte) == 0)
}

/// Gathers consecutive non-zero pages and writes each run with one positional write.
struct RunWriter<'a> {
    file: &'a File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    run_start: u64,
    data_bytes: u64,
}

impl<'a> RunWriter<'a> {
    fn new(file: &'a File) -> Self {
        Self {
            file,
            buf: Vec::with_capacity(WRITE_CHUNK),
            run_start: 0,
            data_bytes: 0,
        }
    }

    /// Room for one page at file offset `at`, which extends the current run when it
    /// follows it (the caller ends runs at every gap).
    fn page_buffer(&mut self, at: u64) -> &mut [u8] {
        if self.buf.is_empty() {
            self.run_start = at;
        }
        let len = self.buf.len();
        self.buf.resize(len + PAGE, 0);
        &mut self.buf[len..]
    }

    fn drop_page(&mut self) {
        self.buf.truncate(self.buf.len() - PAGE);
    }

    fn keep_page(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= WRITE_CHUNK {
            self.end_run()?;
        }
        Ok(())
    }

    fn end_run(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.run_start)?;
            self.data_bytes += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::snapshot::testutil::TempDir;
    use crate::vstate::memory::{create_guest_memory, restore_guest_memory};

    const MIB: u64 = 1 << 20;

    /// 64 MiB of guest RAM with a few touched pages: two non-zero runs, and one page the
    /// guest wrote zeros to.
    fn touched_memory() -> GuestMemory {
        let mem = create_guest_memory(64 * MIB).unwrap();
        mem.write_slice(&[0xab; 3 * PAGE], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(0x1234_5678_u32, GuestAddress(0x200_0ffc))
            .unwrap();
        mem.write_slice(&[0; PAGE], GuestAddress(0x300_0000))
            .unwrap();
        mem.write_obj(0x77_u8, GuestAddress(64 * MIB - 1)).unwrap();
        mem
    }

    fn same_contents(a: &GuestMemory, b: &GuestMemory) -> bool {
        a.iter().zip(b.iter()).all(|(ra, rb)| {
            let len = ra.len() as usize;
            let mut va = vec![0; len];
            let mut vb = vec![0; len];
            ra.get_slice(MemoryRegionAddress(0), len)
                .unwrap()
                .copy_to(&mut va[..]);
            rb.get_slice(MemoryRegionAddress(0), len)
                .unwrap()
                .copy_to(&mut vb[..]);
            ra.start_addr() == rb.start_addr() && va == vb
        })
    }

    #[test]
    fn touched_pages_are_all_the_file_holds() {
        let dir = TempDir::new("memory-sparse");
        let path = dir.path().join("mem");
        let mem = touched_memory();
        let written = write_memory_file(&mem, &path).unwrap();
        // Pages 0x100-0x102, 0x2000 and the last one hold data.
        assert_eq!(written.data_bytes, 5 * PAGE_SIZE);
        assert_eq!(written.layout, MemoryLayout::packed(&mem));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        // File systems may allocate a little around the data; far less than the RAM.
        assert!(
            meta.blocks() * 512 <= 64 * PAGE_SIZE,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        assert!(!super::super::temp_path(&path).exists());

        let restored = restore_guest_memory(File::open(&path).unwrap(), &written.layout).unwrap();
        assert!(same_contents(&mem, &restored));
    }

    #[test]
    fn the_whole_scan_finds_the_same_pages() {
        // Without pagemap (no /proc, or memory mapped from a file) every page is read.
        let dir = TempDir::new("memory-restored");
        let first = dir.path().join("first");
        let second = dir.path().join("second");
        let mem = touched_memory();
        let written = write_memory_file(&mem, &first).unwrap();
        let restored = restore_guest_memory(File::open(&first).unwrap(), &written.layout).unwrap();
        restored
            .write_obj(0x5a_u8, GuestAddress(0x40_0000))
            .unwrap();
        let again = write_memory_file(&restored, &second).unwrap();
        assert_eq!(again.data_bytes, written.data_bytes + PAGE_SIZE);
        let reread = restore_guest_memory(File::open(&second).unwrap(), &again.layout).unwrap();
        assert!(same_contents(&restored, &reread));
        assert!(!same_contents(&mem, &reread));
    }

    #[test]
    fn guest_writes_stay_out_of_the_file() {
        let dir = TempDir::new("memory-private");
        let path = dir.path().join("mem");
        let mem = touched_memory();
        let written = write_memory_file(&mem, &path).unwrap();
        let before = std::fs::read(&path).unwrap();

        let restored = restore_guest_memory(File::open(&path).unwrap(), &written.layout).unwrap();
        restored
            .write_slice(&[0xcd; PAGE], GuestAddress(0x10_0000))
            .unwrap();
        restored.write_obj(1_u64, GuestAddress(0x80_0000)).unwrap();
        // A second VM restored from the same file still sees the saved contents.
        let other = restore_guest_memory(File::open(&path).unwrap(), &written.layout).unwrap();
        assert_eq!(other.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xab);
        assert_eq!(other.read_obj::<u64>(GuestAddress(0x80_0000)).unwrap(), 0);
        drop(restored);
        assert!(std::fs::read(&path).unwrap() == before);
    }

    #[test]
    fn replacing_a_file_leaves_its_mappings_intact() {
        let dir = TempDir::new("memory-replace");
        let path = dir.path().join("mem");
        let mem = touched_memory();
        let written = write_memory_file(&mem, &path).unwrap();
        let restored = restore_guest_memory(File::open(&path).unwrap(), &written.layout).unwrap();
        // A fresh, empty guest written over the same path: the mapping keeps the old inode.
        write_memory_file(&create_guest_memory(64 * MIB).unwrap(), &path).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x200_0ffc)).unwrap(),
            0x1234_5678
        );
    }

    #[test]
    fn an_unwritable_path_is_reported() {
        let mem = create_guest_memory(MIB).unwrap();
        let err = write_memory_file(&mem, Path::new("/nonexistent-dir/mem")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot create the memory file \"/nonexistent-dir/mem.tmp-"));
    }

    #[test]
    fn pagemap_shows_only_touched_memory() {
        let mem = create_guest_memory(64 * MIB).unwrap();
        mem.write_obj(1_u8, GuestAddress(0x10_0000)).unwrap();
        let region = mem.iter().next().unwrap();
        let Some(resident) = Residency::open().of(region, 0, PAGEMAP_BATCH) else {
            eprintln!("SKIPPED: /proc/self/pagemap unreadable; pagemap test did not run");
            return;
        };
        assert!(resident[0x100]);
        // A transparent huge page may bring in the 2 MiB around it, nothing more.
        let held = resident.iter().filter(|&&r| r).count();
        assert!(held <= 512, "{held} pages held");
    }

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        page[PAGE - 1] = 1;
        assert!(!is_zero(&page));
        page[PAGE - 1] = 0;
        page[0] = 0x80;
        assert!(!is_zero(&page));
    }
}
