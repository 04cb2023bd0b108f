//! The initramfs hearth assembles for container VMs and machines: `/init` is the static
//! `hearth-init` agent, optionally with Debian's static busybox (machines, so that
//! `hearth machine run NAME -- uname -s` finds a `uname`) and kernel modules.
//!
//! Format: cpio "newc" (the kernel's initramfs format), gzip-compressed when asked.
//! Output is reproducible: fixed mtimes, owner 0:0, entries in a fixed order. Built
//! archives are cached under `$HEARTH_CACHE/initramfs/<hash>.cpio[.gz]`, keyed by a hash
//! of every input's content, so a second container start does not rebuild it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why an initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write initramfs {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is not a static executable; {hint}")]
    NotStatic { path: PathBuf, hint: &'static str },
    #[error("cpio entry name {0:?} is invalid")]
    BadName(String),
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes a cpio "newc" archive entry by entry.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), InitramfsError> {
        if name.is_empty() || name.starts_with('/') || name.split('/').any(|c| c == "..") {
            return Err(InitramfsError::BadName(name.to_string()));
        }
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed for reproducibility
            data.len(),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.ino += 1;
        let mut buf = header.into_bytes();
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        pad4(&mut buf);
        buf.extend_from_slice(data);
        pad4(&mut buf);
        self.write(&buf)
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), InitramfsError> {
        self.out
            .write_all(buf)
            .map_err(|source| InitramfsError::Write {
                path: PathBuf::from("<stream>"),
                source,
            })?;
        self.written += buf.len() as u64;
        Ok(())
    }

    pub fn dir(&mut self, name: &str) -> Result<(), InitramfsError> {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), InitramfsError> {
        self.entry(name, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), InitramfsError> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitramfsError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer (padded to 512 bytes like GNU cpio) and returns the writer.
    pub fn finish(mut self) -> Result<W, InitramfsError> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        let pad = (512 - (self.written % 512) as usize) % 512;
        self.write(&vec![0; pad])?;
        Ok(self.out)
    }
}

fn pad4(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// What goes into an agent initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// The static `hearth-init` binary, packed as /init.
    pub agent: PathBuf,
    /// A static busybox, packed as /bin/busybox (machines).
    pub busybox: Option<PathBuf>,
    /// Kernel modules (`.ko`, uncompressed) in load order, packed under /lib/modules with
    /// their names listed in /lib/modules/order.
    pub modules: Vec<PathBuf>,
    pub gzip: bool,
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// True when `data` is an ELF executable without a PT_INTERP program header (it needs
/// no dynamic loader).
pub fn is_static_elf(data: &[u8]) -> bool {
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let phoff = u64_at(0x20);
    let phentsize = u16_at(0x36);
    let phnum = u16_at(0x38);
    if phentsize < 4 {
        return false;
    }
    for i in 0..phnum {
        let Some(off) = phoff.checked_add(i * phentsize) else {
            return false;
        };
        if off + 4 > data.len() {
            return false;
        }
        let p_type = u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]);
        if p_type == 3 {
            return false; // PT_INTERP
        }
    }
    true
}

/// The agent's bytes without symbols and debug info (a debug build is ~50 MB, stripped
/// ~4 MB: every byte costs boot time, since the guest kernel unpacks the archive), using
/// binutils' `strip` when it is there, else as they are.
fn stripped(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let tmp = std::env::temp_dir().join(format!(
        "hearth-init-stripped-{}-{}",
        std::process::id(),
        super::random_id()
    ));
    let ok = std::process::Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&tmp)
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let data = if ok { fs::read(&tmp).ok() } else { None };
    let _ = fs::remove_file(&tmp);
    match data {
        Some(data) => Ok(data),
        None => {
            log::warn!(
                "cannot strip {} (install binutils); packing it as is",
                path.display()
            );
            read(path)
        }
    }
}

/// Builds the archive in memory.
pub fn build(spec: &InitramfsSpec) -> Result<Vec<u8>, InitramfsError> {
    let agent = read(&spec.agent)?;
    if !is_static_elf(&agent) {
        return Err(InitramfsError::NotStatic {
            path: spec.agent.clone(),
            hint: "build hearth with this repository's .cargo/config.toml (crt-static)",
        });
    }
    let agent = stripped(&spec.agent)?;
    let mut cpio = CpioWriter::new(Vec::with_capacity(agent.len() + (1 << 20)));
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "bin",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    cpio.file("init", 0o755, &agent)?;
    if let Some(busybox) = &spec.busybox {
        let data = read(busybox)?;
        if !is_static_elf(&data) {
            return Err(InitramfsError::NotStatic {
                path: busybox.clone(),
                hint: "install Debian's busybox-static",
            });
        }
        cpio.file("bin/busybox", 0o755, &data)?;
        cpio.symlink("bin/sh", "busybox")?;
    }
    let mut order = String::new();
    for module in &spec.modules {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| InitramfsError::BadName(module.display().to_string()))?;
        cpio.file(&format!("lib/modules/{name}"), 0o644, &read(module)?)?;
        order.push_str(name);
        order.push('\n');
    }
    if !order.is_empty() {
        cpio.file("lib/modules/order", 0o644, order.as_bytes())?;
    }
    let raw = cpio.finish()?;
    if !spec.gzip {
        return Ok(raw);
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw)
        .and_then(|_| gz.finish())
        .map_err(|source| InitramfsError::Write {
            path: PathBuf::from("<gzip>"),
            source,
        })
}

/// Returns a cached archive for `spec` under `cache_dir`, building it when missing.
pub fn cached(spec: &InitramfsSpec, cache_dir: &Path) -> Result<PathBuf, InitramfsError> {
    let mut hasher = Sha256::new();
    hasher.update(b"hearth-initramfs-v1\0");
    for path in std::iter::once(&spec.agent)
        .chain(spec.busybox.iter())
        .chain(spec.modules.iter())
    {
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update(read(path)?);
    }
    hasher.update([spec.gzip as u8]);
    let hash: String = hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let ext = if spec.gzip { "cpio.gz" } else { "cpio" };
    let out = cache_dir.join(format!("{hash}.{ext}"));
    if out.is_file() {
        return Ok(out);
    }
    let werr = |source| InitramfsError::Write {
        path: out.clone(),
        source,
    };
    fs::create_dir_all(cache_dir).map_err(werr)?;
    let tmp = cache_dir.join(format!(".{hash}.{}.tmp", std::process::id()));
    fs::write(&tmp, build(spec)?).map_err(werr)?;
    fs::rename(&tmp, &out).map_err(werr)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdev, data)
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Minimal newc reader for the tests.
    fn parse(mut a: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        let total = a.len();
        loop {
            assert_eq!(&a[..6], b"070701");
            let mode = hex(&a[14..22]);
            let size = hex(&a[54..62]) as usize;
            let rdev = (hex(&a[78..86]), hex(&a[86..94]));
            let namesize = hex(&a[94..102]) as usize;
            let name = String::from_utf8(a[110..110 + namesize - 1].to_vec()).unwrap();
            let mut off = 110 + namesize;
            off = off.div_ceil(4) * 4;
            let data = a[off..off + size].to_vec();
            off = (off + size).div_ceil(4) * 4;
            a = &a[off..];
            if name == "TRAILER!!!" {
                assert_eq!(total % 512, 0);
                assert!(a.iter().all(|&b| b == 0));
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn newc_entries_round_trip() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin").unwrap();
        w.file("init", 0o755, b"hello").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let entries = parse(&w.finish().unwrap());
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].0, "bin");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(
            entries[1],
            ("init".into(), S_IFREG | 0o755, (0, 0), b"hello".to_vec())
        );
        assert_eq!(entries[2].3, b"busybox");
        assert_eq!(entries[3].2, (5, 1));
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("/init", 0o755, b"").is_err());
        assert!(w.file("a/../b", 0o755, b"").is_err());
        assert!(w.file("", 0o755, b"").is_err());
    }

    #[test]
    fn static_elf_detection() {
        // A dynamically linked host tool has PT_INTERP.
        let ls = fs::read("/bin/ls").unwrap();
        assert!(!is_static_elf(&ls));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(&[0x7f, b'E', b'L', b'F']));
        // This test binary is built static (crt-static) by the repository's cargo config.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(is_static_elf(&me));
    }

    #[test]
    fn agent_must_be_static() {
        let spec = InitramfsSpec {
            agent: "/bin/ls".into(),
            busybox: None,
            modules: vec![],
            gzip: false,
        };
        let err = build(&spec).unwrap_err().to_string();
        assert!(err.contains("not a static executable"), "{err}");
    }

    #[test]
    fn archive_is_reproducible_and_cached() {
        let me = std::env::current_exe().unwrap();
        let spec = InitramfsSpec {
            agent: me,
            busybox: None,
            modules: vec![],
            gzip: true,
        };
        let dir = std::env::temp_dir().join(format!("hearth-initramfs-{}", std::process::id()));
        let a = cached(&spec, &dir).unwrap();
        let b = cached(&spec, &dir).unwrap();
        assert_eq!(a, b);
        let mut raw = Vec::new();
        io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&fs::read(&a).unwrap()[..]),
            &mut raw,
        )
        .unwrap();
        assert_eq!(
            raw,
            build(&InitramfsSpec {
                gzip: false,
                ..spec
            })
            .unwrap()
        );
        let names: Vec<_> = parse(&raw).into_iter().map(|e| e.0).collect();
        assert!(names.contains(&"init".to_string()));
        assert!(!names.contains(&"lib/modules/order".to_string()));
        fs::remove_dir_all(dir).unwrap();
    }
}
