//! Memory of a running VMM process, from `/proc/PID/smaps_rollup` and `/proc/PID/smaps`.
//!
//! **VMM overhead** = the process's PSS minus the resident part of its guest RAM mapping.
//! Guest RAM is found as the anonymous mapping(s) exactly as large as the guest's memory
//! (hearth maps each RAM region in one `mmap`; a guest of up to 3 GiB has one region).
//! What remains is hearth's own code, heap, stacks and device state, plus its share of
//! shared libraries (none: hearth is static). A VM restored from a snapshot has its guest
//! RAM mapped from the snapshot's memory file instead (`restored_vmm_memory`): there the
//! guest RAM is the mappings of that file, its resident pages read from the file or
//! written by the guest since.
//!
//! VMs restored from one template map the same memory file copy-on-write, so pages none
//! of them has written are one page-cache page mapped by all ([`file_mapping_sharing`]
//! tells how much of a process's mapping is shared that way and how much is its own).

use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot read \"{path}\"")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no Pss line in \"{0}\"")]
    NoPss(PathBuf),
}

/// Totals of one process, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// A process's memory split into guest RAM and the rest, in KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VmmMemory {
    pub pid: u32,
    pub guest_mib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Resident pages of the guest RAM mapping(s): guest memory the guest has touched.
    pub guest_rss_kib: u64,
    /// `pss_kib - guest_rss_kib`.
    pub overhead_kib: u64,
    /// Whether a mapping of the guest's size was found (else the overhead is the PSS).
    pub guest_mapping_found: bool,
}

fn read(pid: u32, file: &str) -> Result<(String, PathBuf), MemoryError> {
    let path = PathBuf::from(format!("/proc/{pid}/{file}"));
    std::fs::read_to_string(&path)
        .map(|text| (text, path.clone()))
        .map_err(|source| MemoryError::Read { path, source })
}

/// `Rss` and `Pss` of `pid` from `smaps_rollup`.
pub fn process_memory(pid: u32) -> Result<ProcessMemory, MemoryError> {
    let (text, path) = read(pid, "smaps_rollup")?;
    parse_rollup(&text).ok_or(MemoryError::NoPss(path))
}

/// [`process_memory`] and the guest RAM of a VM with `guest_bytes` of memory.
pub fn vmm_memory(pid: u32, guest_bytes: u64) -> Result<VmmMemory, MemoryError> {
    let totals = process_memory(pid)?;
    let (smaps, _) = read(pid, "smaps")?;
    let guest = guest_ram_rss_kib(&smaps, guest_bytes);
    let guest_rss_kib = guest.unwrap_or(0);
    Ok(VmmMemory {
        pid,
        guest_mib: guest_bytes >> 20,
        rss_kib: totals.rss_kib,
        pss_kib: totals.pss_kib,
        guest_rss_kib,
        overhead_kib: totals.pss_kib.saturating_sub(guest_rss_kib),
        guest_mapping_found: guest.is_some(),
    })
}

/// [`process_memory`] and the guest RAM of a VM whose RAM is mapped from `mem_file`.
pub fn restored_vmm_memory(
    pid: u32,
    guest_bytes: u64,
    mem_file: &Path,
) -> Result<VmmMemory, MemoryError> {
    let totals = process_memory(pid)?;
    let (smaps, _) = read(pid, "smaps")?;
    // /proc shows the path the file was opened by, resolved.
    let mem_file = std::fs::canonicalize(mem_file).unwrap_or_else(|_| mem_file.to_owned());
    let wanted = mem_file.to_string_lossy();
    let mappings: Vec<Mapping> = parse_smaps(&smaps)
        .into_iter()
        .filter(|m| m.path.as_deref() == Some(wanted.as_ref()))
        .collect();
    let guest_rss_kib = mappings.iter().map(|m| m.rss_kib).sum();
    Ok(VmmMemory {
        pid,
        guest_mib: guest_bytes >> 20,
        rss_kib: totals.rss_kib,
        pss_kib: totals.pss_kib,
        guest_rss_kib,
        overhead_kib: totals.pss_kib.saturating_sub(guest_rss_kib),
        guest_mapping_found: !mappings.is_empty(),
    })
}

/// How the resident pages of a process's mappings of one file are shared, summed over
/// those mappings, in KiB (from `/proc/PID/smaps`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FileMappingSharing {
    pub size_kib: u64,
    pub rss_kib: u64,
    /// This process's proportional share: shared pages count 1/N for N mappers.
    pub pss_kib: u64,
    /// `Shared_Clean + Shared_Dirty`: resident pages other processes map too (for a
    /// template's memory file, the pages the clones have read and none has written).
    pub shared_kib: u64,
    /// `Private_Clean + Private_Dirty`: pages only this process maps (its copies of the
    /// pages it wrote, and file pages no other process has mapped).
    pub private_kib: u64,
}

/// The sharing of `pid`'s mappings of `file`; `None` when it maps no such file.
pub fn file_mapping_sharing(
    pid: u32,
    file: &Path,
) -> Result<Option<FileMappingSharing>, MemoryError> {
    let (smaps, _) = read(pid, "smaps")?;
    // /proc shows the path the file was opened by, resolved.
    let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_owned());
    Ok(sharing_of(&smaps, &file.to_string_lossy()))
}

fn sharing_of(smaps: &str, path: &str) -> Option<FileMappingSharing> {
    let mappings: Vec<Mapping> = parse_smaps(smaps)
        .into_iter()
        .filter(|m| m.path.as_deref() == Some(path))
        .collect();
    (!mappings.is_empty()).then(|| {
        let sum = |f: fn(&Mapping) -> u64| mappings.iter().map(f).sum::<u64>();
        FileMappingSharing {
            size_kib: sum(|m| m.size_kib),
            rss_kib: sum(|m| m.rss_kib),
            pss_kib: sum(|m| m.pss_kib),
            shared_kib: sum(|m| m.shared_kib),
            private_kib: sum(|m| m.private_kib),
        }
    })
}

/// The value of a `Name:   123 kB` line.
fn field_kib(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    rest.trim().strip_suffix("kB")?.trim().parse().ok()
}

fn parse_rollup(text: &str) -> Option<ProcessMemory> {
    let mut memory = ProcessMemory::default();
    let mut pss = None;
    for line in text.lines() {
        if let Some(v) = field_kib(line, "Rss") {
            memory.rss_kib = v;
        } else if let Some(v) = field_kib(line, "Pss") {
            pss = Some(v);
        }
    }
    memory.pss_kib = pss?;
    Some(memory)
}

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Mapping {
    anonymous: bool,
    /// The mapped file, or a name such as `[stack]`.
    path: Option<String>,
    size_kib: u64,
    rss_kib: u64,
    pss_kib: u64,
    /// `Shared_Clean + Shared_Dirty`.
    shared_kib: u64,
    /// `Private_Clean + Private_Dirty`.
    private_kib: u64,
}

/// Mapping headers look like `7f..-7f.. rw-p 00000000 00:00 0    [path]`.
fn is_header(line: &str) -> bool {
    line.split_whitespace().next().is_some_and(|range| {
        range.contains('-') && range.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
    })
}

fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if is_header(line) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Anonymous: no path, inode 0.
            let anonymous = fields.len() == 5 && fields[4] == "0";
            mappings.push(Mapping {
                anonymous,
                path: header_path(line).map(str::to_owned),
                ..Mapping::default()
            });
        } else if let Some(last) = mappings.last_mut() {
            if let Some(v) = field_kib(line, "Size") {
                last.size_kib = v;
            } else if let Some(v) = field_kib(line, "Rss") {
                last.rss_kib = v;
            } else if let Some(v) = field_kib(line, "Pss") {
                last.pss_kib = v;
            } else if let Some(v) =
                field_kib(line, "Shared_Clean").or_else(|| field_kib(line, "Shared_Dirty"))
            {
                last.shared_kib += v;
            } else if let Some(v) =
                field_kib(line, "Private_Clean").or_else(|| field_kib(line, "Private_Dirty"))
            {
                last.private_kib += v;
            }
        }
    }
    mappings
}

/// What follows the five fixed fields of a mapping header (address range, permissions,
/// offset, device, inode): the path, which may hold spaces.
fn header_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace)?..];
    }
    Some(rest.trim()).filter(|path| !path.is_empty())
}

/// Resident KiB of the anonymous mappings exactly `guest_bytes` large, if any.
fn guest_ram_rss_kib(smaps: &str, guest_bytes: u64) -> Option<u64> {
    let size_kib = guest_bytes >> 10;
    let guest: Vec<Mapping> = parse_smaps(smaps)
        .into_iter()
        .filter(|m| m.anonymous && m.size_kib == size_kib)
        .collect();
    (!guest.is_empty()).then(|| guest.iter().map(|m| m.rss_kib).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
00400000-00600000 r-xp 00000000 08:01 1234   /usr/bin/hearth
Size:               2048 kB
Rss:                1500 kB
Pss:                1500 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
KernelPageSize:        4 kB
Rss:                 120 kB
Pss:                 120 kB
7f0010000000-7f0010021000 rw-p 00000000 00:00 0 
Size:                132 kB
Rss:                  40 kB
Pss:                  40 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:              65536 kB
Rss:                  12 kB
7f0020000000-7f0028000000 rw-p 00000000 08:01 4321                       /tmp/snap dir/vm.mem
Size:             131072 kB
Rss:                 300 kB
";

    #[test]
    fn finds_the_guest_mapping_by_size() {
        assert_eq!(guest_ram_rss_kib(SMAPS, 64 << 20), Some(120));
        assert_eq!(guest_ram_rss_kib(SMAPS, 128 << 20), None);
    }

    #[test]
    fn parses_mappings() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 5);
        assert!(!maps[0].anonymous && maps[1].anonymous && !maps[3].anonymous);
        assert_eq!(maps[2].size_kib, 132);
        assert_eq!(maps[0].path.as_deref(), Some("/usr/bin/hearth"));
        assert_eq!(maps[1].path, None);
        assert_eq!(maps[3].path.as_deref(), Some("[stack]"));
        assert_eq!(maps[4].path.as_deref(), Some("/tmp/snap dir/vm.mem"));
        assert_eq!(maps[4].rss_kib, 300);
    }

    /// Two mappings of one template memory file (a clone maps it in pieces when its RAM
    /// has a hole), and another file.
    const CLONE_SMAPS: &str = "\
7f0020000000-7f0024000000 rw-p 00000000 08:01 4321                       /cache/templates/ab12/mem
Size:              65536 kB
Rss:                 900 kB
Pss:                 500 kB
Pss_Dirty:           100 kB
Shared_Clean:        780 kB
Shared_Dirty:         20 kB
Private_Clean:        30 kB
Private_Dirty:        70 kB
7f0024000000-7f0028000000 rw-p 04000000 08:01 4321                       /cache/templates/ab12/mem
Size:              65536 kB
Rss:                 100 kB
Pss:                  60 kB
Shared_Clean:         80 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:        20 kB
7f0030000000-7f0030001000 r--p 00000000 08:01 99                         /cache/templates/ab12/mem.old
Size:                  4 kB
Rss:                   4 kB
Pss:                   4 kB
Shared_Clean:          0 kB
Private_Clean:         4 kB
";

    #[test]
    fn splits_a_file_mapping_into_shared_and_private() {
        assert_eq!(
            sharing_of(CLONE_SMAPS, "/cache/templates/ab12/mem"),
            Some(FileMappingSharing {
                size_kib: 131072,
                rss_kib: 1000,
                pss_kib: 560,
                shared_kib: 880,
                private_kib: 120,
            })
        );
        assert_eq!(
            sharing_of(CLONE_SMAPS, "/cache/templates/ab12/mem.old").map(|s| s.private_kib),
            Some(4)
        );
        assert_eq!(sharing_of(CLONE_SMAPS, "/cache/templates/ab12"), None);
        // Pss_Dirty is not Pss.
        assert_eq!(parse_smaps(CLONE_SMAPS)[0].pss_kib, 500);
    }

    /// A 64 KiB file in a directory of its own, mapped private, read-only and populated
    /// into this process; unmapped and removed on drop.
    struct MappedFile {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
        addr: *mut libc::c_void,
    }

    impl MappedFile {
        const LEN: usize = 64 << 10;

        fn new(tag: &str, name: &str) -> Self {
            use std::os::fd::AsRawFd;
            let dir = std::env::temp_dir().join(format!("hearth-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, vec![1u8; Self::LEN]).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: a new private read-only mapping of a file we opened; unmapped on drop.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    Self::LEN,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_POPULATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            Self { dir, path, addr }
        }
    }

    impl Drop for MappedFile {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, of that length, no longer used.
            unsafe { libc::munmap(self.addr, Self::LEN) };
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_private_file_mapping_of_our_own_is_private() {
        let mapped = MappedFile::new("sharing", "template.mem");
        let sharing = file_mapping_sharing(std::process::id(), &mapped.path);
        let gone = mapped.dir.join("gone");
        drop(mapped);
        let sharing = sharing.unwrap().expect("the mapping is found");
        assert_eq!((sharing.size_kib, sharing.rss_kib), (64, 64));
        // Nobody else maps the file: every resident page is ours alone.
        assert_eq!((sharing.shared_kib, sharing.private_kib), (0, 64));
        assert_eq!(
            file_mapping_sharing(std::process::id(), &gone).unwrap(),
            None
        );
    }

    #[test]
    fn parses_rollup() {
        let text = "00400000-7ffd0000 ---p 00000000 00:00 0  [rollup]\n\
                    Rss:                2000 kB\nPss:                1900 kB\nPss_Anon: 10 kB\n";
        assert_eq!(
            parse_rollup(text),
            Some(ProcessMemory {
                rss_kib: 2000,
                pss_kib: 1900
            })
        );
        assert_eq!(parse_rollup("Rss: 1 kB\n"), None);
    }

    #[test]
    fn finds_a_file_mapping_of_our_own() {
        let mapped = MappedFile::new("memory", "guest.mem");
        let memory = restored_vmm_memory(std::process::id(), 64 << 10, &mapped.path).unwrap();
        drop(mapped);
        assert!(memory.guest_mapping_found);
        assert_eq!(memory.guest_rss_kib, 64);
        assert_eq!(memory.overhead_kib, memory.pss_kib - 64);
    }

    #[test]
    fn own_process_has_memory() {
        let me = process_memory(std::process::id()).unwrap();
        assert!(me.pss_kib > 0 && me.rss_kib > 0);
    }
}
