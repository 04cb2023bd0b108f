//! Memory of a running VMM process, from `/proc/PID/smaps_rollup` and `/proc/PID/smaps`.
//!
//! **VMM overhead** = the process's PSS minus the resident part of its guest RAM mapping.
//! Guest RAM is found as the anonymous mapping(s) exactly as large as the guest's memory
//! (hearth maps each RAM region in one `mmap`; a guest of up to 3 GiB has one region).
//! What remains is hearth's own code, heap, stacks and device state, plus its share of
//! shared libraries (none: hearth is static).

use std::path::PathBuf;

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
    size_kib: u64,
    rss_kib: u64,
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
                ..Mapping::default()
            });
        } else if let Some(last) = mappings.last_mut() {
            if let Some(v) = field_kib(line, "Size") {
                last.size_kib = v;
            } else if let Some(v) = field_kib(line, "Rss") {
                last.rss_kib = v;
            }
        }
    }
    mappings
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
";

    #[test]
    fn finds_the_guest_mapping_by_size() {
        assert_eq!(guest_ram_rss_kib(SMAPS, 64 << 20), Some(120));
        assert_eq!(guest_ram_rss_kib(SMAPS, 128 << 20), None);
    }

    #[test]
    fn parses_mappings() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 4);
        assert!(!maps[0].anonymous && maps[1].anonymous && !maps[3].anonymous);
        assert_eq!(maps[2].size_kib, 132);
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
    fn own_process_has_memory() {
        let me = process_memory(std::process::id()).unwrap();
        assert!(me.pss_kib > 0 && me.rss_kib > 0);
    }
}
