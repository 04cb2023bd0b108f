//! A guest kernel's code symbols, read from a `System.map` (`nm -n` output) or from the
//! `.symtab` of an ELF image, and the lookup of an address in them.
//!
//! The ELF reader is a small one of our own: hearth has no ELF crate (linux-loader parses
//! only the program headers it loads), and only the section headers, one symbol table and
//! its string table are needed. It reads just those parts, so a debug vmlinux of hundreds
//! of megabytes costs a few megabytes of reads.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How far past the last symbol an address still counts as inside it when its size is
/// unknown (System.map gives none): beyond, it is more likely a module or a stray pointer.
const TAIL_WITHOUT_SIZE: u64 = 64 << 10;

/// Neither a symbol table nor a string table of a kernel comes near this; a header that
/// claims more is damaged.
const MAX_TABLE_BYTES: u64 = 1 << 30;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELF_HEADER_BYTES: usize = 64;
const SECTION_HEADER_BYTES: usize = 64;
const SYMBOL_BYTES: usize = 24;
const SHT_SYMTAB: u32 = 2;
const SHF_EXECINSTR: u64 = 0x4;
const STT_NOTYPE: u8 = 0;
const STT_FUNC: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    #[error("cannot read kernel symbols \"{path}\"")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel symbols \"{path}\", line {line}: expected \"ADDRESS TYPE NAME\"")]
    MapLine { path: PathBuf, line: usize },
    #[error("kernel symbols \"{path}\": {reason}")]
    Elf { path: PathBuf, reason: &'static str },
    #[error("\"{path}\" is an ELF image without a symbol table")]
    NoSymtab { path: PathBuf },
    #[error(
        "kernel symbols \"{path}\" name no code (a distribution's stub System.map? the real \
         one comes with the kernel's debug package)"
    )]
    NoCode { path: PathBuf },
}

/// Code symbols sorted by address.
#[derive(Debug, Default)]
pub struct Symbols {
    /// (start, size or 0 when unknown, name), sorted by start.
    entries: Vec<(u64, u64, String)>,
    source: PathBuf,
}

/// Where an address falls among the symbols.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub index: usize,
    pub name: &'a str,
    pub offset: u64,
}

impl Symbols {
    /// Reads `path`: an ELF image with a `.symtab`, or a System.map.
    pub fn load(path: &Path) -> Result<Self, SymbolsError> {
        let read_err = |source| SymbolsError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let mut magic = [0u8; 4];
        let is_elf = match file.read_exact(&mut magic) {
            Ok(()) => &magic == ELF_MAGIC,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(e) => return Err(read_err(e)),
        };
        file.rewind().map_err(read_err)?;
        let entries = if is_elf {
            read_elf(&mut file, path)?
        } else {
            read_map(BufReader::new(file), path)?
        };
        Self::from_entries(entries, path)
    }

    /// The symbols for `kernel` when none were named: the kernel's own symbol table, else
    /// a `System.map` beside it. `None` (with the reason logged) leaves addresses raw.
    pub fn for_kernel(kernel: &Path) -> Option<Self> {
        match Self::load(kernel) {
            Ok(symbols) => return Some(symbols),
            Err(e) => log::debug!("{}", crate::error_chain(&e)),
        }
        let map = kernel.parent().unwrap_or(Path::new(".")).join("System.map");
        if !map.exists() {
            log::info!(
                "RIP samples stay raw addresses: no symbols in \"{}\" and no \"{}\" \
                 (see --kernel-symbols)",
                kernel.display(),
                map.display()
            );
            return None;
        }
        match Self::load(&map) {
            Ok(symbols) => Some(symbols),
            Err(e) => {
                log::warn!("RIP samples stay raw addresses: {}", crate::error_chain(&e));
                None
            }
        }
    }

    fn from_entries(
        mut entries: Vec<(u64, u64, String)>,
        path: &Path,
    ) -> Result<Self, SymbolsError> {
        if entries.is_empty() {
            return Err(SymbolsError::NoCode {
                path: path.to_path_buf(),
            });
        }
        // Aliases share an address; keep the first name and the largest size.
        entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        entries.dedup_by(|later, kept| later.0 == kept.0);
        Ok(Self {
            entries,
            source: path.to_path_buf(),
        })
    }

    /// The file they came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of symbol `index` (from [`Resolved::index`]).
    pub fn name(&self, index: usize) -> &str {
        &self.entries[index].2
    }

    /// The symbol `addr` is in: the last one starting at or below it. Below the first
    /// symbol, or past the end of the last (its size, or [`TAIL_WITHOUT_SIZE`]), nothing.
    pub fn resolve(&self, addr: u64) -> Option<Resolved<'_>> {
        let index = self
            .entries
            .partition_point(|(start, _, _)| *start <= addr)
            .checked_sub(1)?;
        let (start, size, name) = &self.entries[index];
        let offset = addr - start;
        if index + 1 == self.entries.len() {
            let extent = if *size > 0 { *size } else { TAIL_WITHOUT_SIZE };
            if offset >= extent {
                return None;
            }
        }
        Some(Resolved {
            index,
            name,
            offset,
        })
    }
}

/// Code symbols of a System.map: `ffffffff81000000 T _text` per line (anything after the
/// name, such as kallsyms' `[module]`, is ignored). Only text symbols (t, T, w, W) count.
fn read_map(reader: impl BufRead, path: &Path) -> Result<Vec<(u64, u64, String)>, SymbolsError> {
    let mut entries = Vec::new();
    for (number, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| SymbolsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad_line = || SymbolsError::MapLine {
            path: path.to_path_buf(),
            line: number + 1,
        };
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad_line());
        };
        let addr = u64::from_str_radix(addr, 16).map_err(|_| bad_line())?;
        if kind.len() != 1 {
            return Err(bad_line());
        }
        if matches!(kind, "t" | "T" | "w" | "W") {
            entries.push((addr, 0, name.to_string()));
        }
    }
    Ok(entries)
}

fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// One section header's fields that matter here.
struct Section {
    kind: u32,
    flags: u64,
    offset: u64,
    size: u64,
    link: u32,
}

/// Function (and untyped, as assembly labels are) symbols of an ELF64 little-endian
/// image's `.symtab` that lie in executable sections, with their sizes.
fn read_elf(file: &mut File, path: &Path) -> Result<Vec<(u64, u64, String)>, SymbolsError> {
    let damaged = |reason| SymbolsError::Elf {
        path: path.to_path_buf(),
        reason,
    };
    let read_err = |source| SymbolsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file_len = file.metadata().map_err(read_err)?.len();
    let mut read_at = |offset: u64, len: u64| -> Result<Vec<u8>, SymbolsError> {
        let end = offset
            .checked_add(len)
            .ok_or(damaged("a table lies past the end of the file"))?;
        if end > file_len || len > MAX_TABLE_BYTES {
            return Err(damaged("a table lies past the end of the file"));
        }
        let mut bytes = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(offset)).map_err(read_err)?;
        file.read_exact(&mut bytes).map_err(read_err)?;
        Ok(bytes)
    };

    let header = read_at(0, ELF_HEADER_BYTES as u64)?;
    if header[4] != 2 || header[5] != 1 {
        return Err(damaged("not a 64-bit little-endian ELF image"));
    }
    let section_offset = le_u64(&header, 0x28);
    let entry_size = usize::from(le_u16(&header, 0x3a));
    let count = u64::from(le_u16(&header, 0x3c));
    if count == 0 {
        return Err(SymbolsError::NoSymtab {
            path: path.to_path_buf(),
        });
    }
    if entry_size != SECTION_HEADER_BYTES {
        return Err(damaged("unexpected section header size"));
    }
    let table = read_at(section_offset, count * SECTION_HEADER_BYTES as u64)?;
    let sections: Vec<Section> = table
        .chunks_exact(SECTION_HEADER_BYTES)
        .map(|h| Section {
            kind: le_u32(h, 4),
            flags: le_u64(h, 8),
            offset: le_u64(h, 24),
            size: le_u64(h, 32),
            link: le_u32(h, 40),
        })
        .collect();
    let Some(symtab) = sections.iter().find(|s| s.kind == SHT_SYMTAB) else {
        return Err(SymbolsError::NoSymtab {
            path: path.to_path_buf(),
        });
    };
    let strtab = sections
        .get(symtab.link as usize)
        .ok_or(damaged("the symbol table's string table is missing"))?;
    let symbols = read_at(symtab.offset, symtab.size)?;
    let strings = read_at(strtab.offset, strtab.size)?;

    let mut entries = Vec::new();
    for symbol in symbols.chunks_exact(SYMBOL_BYTES) {
        let name_at = le_u32(symbol, 0) as usize;
        let kind = symbol[4] & 0xf;
        let section = usize::from(le_u16(symbol, 6));
        let value = le_u64(symbol, 8);
        let size = le_u64(symbol, 16);
        let in_code = sections
            .get(section)
            .is_some_and(|s| s.flags & SHF_EXECINSTR != 0);
        if !(kind == STT_FUNC || kind == STT_NOTYPE) || !in_code || name_at == 0 {
            continue;
        }
        let name = strings
            .get(name_at..)
            .and_then(|rest| rest.split(|b| *b == 0).next())
            .ok_or(damaged("a symbol name lies outside the string table"))?;
        if name.is_empty() {
            continue;
        }
        entries.push((value, size, String::from_utf8_lossy(name).into_owned()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> Result<Symbols, SymbolsError> {
        let path = Path::new("System.map");
        Symbols::from_entries(read_map(text.as_bytes(), path)?, path)
    }

    #[test]
    fn system_map_keeps_code_symbols_in_order() {
        let symbols = map("ffffffff81000000 T _text\n\
             ffffffff81000010 t secondary\n\
             ffffffff82000000 D some_data\n\
             ffffffff81000020 W weak_one\n\
             \n\
             ffffffffc0000000 t mod_fn\t[mod]\n")
        .unwrap();
        let names: Vec<&str> = (0..symbols.len()).map(|i| symbols.name(i)).collect();
        assert_eq!(names, ["_text", "secondary", "weak_one", "mod_fn"]);
    }

    #[test]
    fn system_map_rejects_a_bad_line_with_its_number() {
        let err = map("ffffffff81000000 T _text\nnot a hex T name\n").unwrap_err();
        assert!(
            matches!(err, SymbolsError::MapLine { line: 2, .. }),
            "{err:?}"
        );
        let err = map("ffffffff81000000 T\n").unwrap_err();
        assert!(
            matches!(err, SymbolsError::MapLine { line: 1, .. }),
            "{err:?}"
        );
        let err = map("ffffffff81000000 TT name\n").unwrap_err();
        assert!(
            matches!(err, SymbolsError::MapLine { line: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_stub_system_map_names_no_code() {
        let stub =
            "ffffffffffffffff B The real System.map is in the linux-image-6.1.0-dbg package\n";
        assert!(matches!(
            map(stub).unwrap_err(),
            SymbolsError::NoCode { .. }
        ));
        assert!(matches!(map("").unwrap_err(), SymbolsError::NoCode { .. }));
    }

    #[test]
    fn resolution_exact_inside_before_and_after() {
        let symbols = map("1000 T first\n1100 T second\n1100 T alias\n1200 T last\n").unwrap();
        let at = |addr| {
            symbols
                .resolve(addr)
                .map(|r| (r.name.to_string(), r.offset))
        };
        assert_eq!(at(0x1000), Some(("first".into(), 0)));
        assert_eq!(at(0x10ff), Some(("first".into(), 0xff)));
        // Aliases collapse to the first name at that address.
        assert_eq!(at(0x1100), Some(("second".into(), 0)));
        assert_eq!(at(0x1234), Some(("last".into(), 0x34)));
        assert_eq!(at(0xfff), None);
        assert_eq!(at(0), None);
        // Past the last symbol by more than a plausible function: unresolved.
        assert_eq!(
            at(0x1200 + TAIL_WITHOUT_SIZE - 1),
            Some(("last".into(), TAIL_WITHOUT_SIZE - 1))
        );
        assert_eq!(at(0x1200 + TAIL_WITHOUT_SIZE), None);
        assert_eq!(at(u64::MAX), None);
    }

    #[test]
    fn a_sized_last_symbol_ends_at_its_size() {
        let path = Path::new("x");
        let symbols =
            Symbols::from_entries(vec![(0x10, 4, "b".into()), (0, 0, "a".into())], path).unwrap();
        assert_eq!(symbols.resolve(0x13).unwrap().name, "b");
        assert_eq!(symbols.resolve(0x14), None);
        assert_eq!(symbols.resolve(0x0f).unwrap().name, "a");
    }

    /// A minimal ELF64 with sections: null, .text (exec), .data, .symtab, .strtab.
    fn tiny_elf() -> Vec<u8> {
        let strtab = b"\0code_fn\0label\0data_obj\0".to_vec();
        let sym = |name: u32, info: u8, shndx: u16, value: u64, size: u64| {
            let mut s = Vec::new();
            s.extend_from_slice(&name.to_le_bytes());
            s.push(info);
            s.push(0);
            s.extend_from_slice(&shndx.to_le_bytes());
            s.extend_from_slice(&value.to_le_bytes());
            s.extend_from_slice(&size.to_le_bytes());
            s
        };
        let mut symtab = vec![0u8; SYMBOL_BYTES];
        symtab.extend(sym(1, 0x12, 1, 0x40_1000, 0x20)); // global FUNC in .text
        symtab.extend(sym(9, 0x00, 1, 0x40_1020, 0)); // local NOTYPE label in .text
        symtab.extend(sym(15, 0x11, 2, 0x40_2000, 8)); // OBJECT in .data: skipped
        symtab.extend(sym(0, 0x03, 1, 0x40_1000, 0)); // SECTION symbol: skipped
        let symtab_at = ELF_HEADER_BYTES as u64;
        let strtab_at = symtab_at + symtab.len() as u64;
        let sections_at = strtab_at + strtab.len() as u64;
        let section = |kind: u32, flags: u64, offset: u64, size: u64, link: u32| {
            let mut h = vec![0u8; SECTION_HEADER_BYTES];
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&offset.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[40..44].copy_from_slice(&link.to_le_bytes());
            h
        };
        let mut header = vec![0u8; ELF_HEADER_BYTES];
        header[..4].copy_from_slice(ELF_MAGIC);
        header[4] = 2;
        header[5] = 1;
        header[0x28..0x30].copy_from_slice(&sections_at.to_le_bytes());
        header[0x3a..0x3c].copy_from_slice(&(SECTION_HEADER_BYTES as u16).to_le_bytes());
        header[0x3c..0x3e].copy_from_slice(&5u16.to_le_bytes());
        let mut elf = header;
        elf.extend(&symtab);
        elf.extend(&strtab);
        elf.extend(section(0, 0, 0, 0, 0));
        elf.extend(section(1, 0x6, 0, 0, 0));
        elf.extend(section(1, 0x3, 0, 0, 0));
        elf.extend(section(SHT_SYMTAB, 0, symtab_at, symtab.len() as u64, 4));
        elf.extend(section(3, 0, strtab_at, strtab.len() as u64, 0));
        elf
    }

    fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn elf_symbols_are_code_functions_and_labels() {
        let dir = crate::testutil::TempDir::new("symbols-elf");
        let symbols = Symbols::load(&write_temp(dir.path(), "k", &tiny_elf())).unwrap();
        assert_eq!(symbols.len(), 2);
        assert_eq!(symbols.resolve(0x40_101f).unwrap().name, "code_fn");
        let label = symbols.resolve(0x40_1024).unwrap();
        assert_eq!((label.name, label.offset), ("label", 4));
        assert_eq!(symbols.resolve(0x40_0fff), None);
    }

    #[test]
    fn damaged_or_symbol_less_elf_is_one_clear_error() {
        let dir = crate::testutil::TempDir::new("symbols-bad");
        let elf = tiny_elf();
        let truncated = write_temp(dir.path(), "short", &elf[..elf.len() - 10]);
        let err = Symbols::load(&truncated).unwrap_err();
        assert!(matches!(err, SymbolsError::Elf { .. }), "{err:?}");
        let mut no_symtab = elf.clone();
        // Turn the SYMTAB section into PROGBITS.
        let symtab_header = no_symtab.len() - 2 * SECTION_HEADER_BYTES;
        no_symtab[symtab_header + 4] = 1;
        let err = Symbols::load(&write_temp(dir.path(), "nosym", &no_symtab)).unwrap_err();
        assert!(matches!(err, SymbolsError::NoSymtab { .. }), "{err:?}");
        let err = Symbols::load(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, SymbolsError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"));
    }

    #[test]
    fn the_test_binary_itself_has_symbols() {
        let exe = std::env::current_exe().unwrap();
        let symbols = Symbols::load(&exe).unwrap();
        assert!(symbols.len() > 100, "{} symbols", symbols.len());
    }

    #[test]
    fn a_kernel_without_symbols_falls_back_to_the_system_map_beside_it() {
        let dir = crate::testutil::TempDir::new("symbols-auto");
        let kernel = write_temp(dir.path(), "bzImage", b"MZ not an ELF");
        assert!(Symbols::for_kernel(&kernel).is_none());
        write_temp(dir.path(), "System.map", b"ffffffff81000000 T _text\n");
        let symbols = Symbols::for_kernel(&kernel).unwrap();
        assert_eq!(symbols.source(), dir.path().join("System.map"));
        assert_eq!(
            symbols.resolve(0xffff_ffff_8100_0004).unwrap().name,
            "_text"
        );
    }
}
