//! Where image files come from: a directory, or a tar archive indexed by entry name; and
//! the sha256 plumbing to check what is read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::layer::path::printable_error;
use super::{io_err, ImageError};

/// Largest metadata file (index, manifest, config) read into memory.
pub(crate) const MAX_METADATA: u64 = 16 << 20;

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// sha256 of `bytes`, in hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Whether `s` is 64 lower-case hex digits.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The hex part of a `sha256:<hex>` digest; other algorithms are unsupported.
pub(crate) fn digest_hex<'a>(digest: &'a str, what: &str) -> Result<&'a str, ImageError> {
    match digest.split_once(':') {
        Some(("sha256", h)) if is_sha256_hex(h) => Ok(h),
        Some(("sha256", _)) | None => Err(ImageError::Invalid {
            what: what.to_string(),
            reason: format!("malformed digest {digest:?}"),
        }),
        Some((algorithm, _)) => Err(ImageError::Unsupported {
            what: what.to_string(),
            detail: format!("digest algorithm {algorithm} (only sha256 is supported)"),
        }),
    }
}

/// `sha256:0123456789ab…`, for messages.
pub(crate) fn short_digest(hex: &str) -> String {
    format!("sha256:{}…", &hex[..hex.len().min(12)])
}

/// A reader that hashes and counts what passes through it.
pub(crate) struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads the rest of the stream (hashing it) and returns the hex digest and length.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((hex(&self.hasher.finalize()), self.count))
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Checks a finished hash against the expected digest (and size, when known).
pub(crate) fn check_digest(
    what: &str,
    expected_hex: &str,
    expected_size: Option<u64>,
    actual: (String, u64),
) -> Result<(), ImageError> {
    let (actual_hex, actual_size) = actual;
    if actual_hex != expected_hex {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: format!("sha256:{expected_hex}"),
            actual: format!("sha256:{actual_hex}"),
        });
    }
    if let Some(expected) = expected_size {
        if expected != actual_size {
            return Err(ImageError::SizeMismatch {
                what: what.to_string(),
                expected,
                actual: actual_size,
            });
        }
    }
    Ok(())
}

/// The normal form of a file name inside a store: no leading `/` or `./`, no empty or `.`
/// components. `None` when the name has a `..` component or is empty.
pub(crate) fn normalize_name(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

/// Files of an image source, by name relative to its top.
pub(crate) trait Store {
    /// Opens a file for reading.
    fn open(&self, name: &str) -> Result<Box<dyn Read + '_>, ImageError>;
    fn exists(&self, name: &str) -> bool;

    /// The size of a file, when cheaply known (for progress bars).
    fn size(&self, name: &str) -> Option<u64>;

    /// Reads a small file whole (at most [`MAX_METADATA`] bytes).
    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let mut data = Vec::new();
        self.open(name)?
            .take(MAX_METADATA + 1)
            .read_to_end(&mut data)
            .map_err(io_err(format!("cannot read {name}")))?;
        if data.len() as u64 > MAX_METADATA {
            return Err(ImageError::Invalid {
                what: name.to_string(),
                reason: format!("larger than {MAX_METADATA} bytes"),
            });
        }
        Ok(data)
    }

    /// Reads the blob `sha256:<hex>` whole and checks its digest and size.
    fn read_blob(&self, hex: &str, size: Option<u64>, what: &str) -> Result<Vec<u8>, ImageError> {
        if size.is_some_and(|s| s > MAX_METADATA) {
            return Err(ImageError::Invalid {
                what: what.to_string(),
                reason: format!("{} bytes, more than {MAX_METADATA}", size.unwrap_or(0)),
            });
        }
        let data = self.read_small(&format!("blobs/sha256/{hex}"))?;
        check_digest(what, hex, size, (sha256_hex(&data), data.len() as u64))?;
        Ok(data)
    }
}

/// An image directory on the host.
pub(crate) struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub(crate) fn new(root: &Path) -> Self {
        DirStore {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf, ImageError> {
        normalize_name(name)
            .map(|n| self.root.join(n))
            .ok_or_else(|| ImageError::Invalid {
                what: self.root.display().to_string(),
                reason: format!("file name {name:?} leaves the image"),
            })
    }
}

impl Store for DirStore {
    fn open(&self, name: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        let path = self.path(name)?;
        let file = File::open(&path).map_err(io_err(format!("cannot open {}", path.display())))?;
        Ok(Box::new(file))
    }

    fn exists(&self, name: &str) -> bool {
        self.path(name).is_ok_and(|p| p.is_file())
    }

    fn size(&self, name: &str) -> Option<u64> {
        std::fs::metadata(self.path(name).ok()?)
            .ok()
            .map(|m| m.len())
    }
}

/// Where a file of an archive is.
#[derive(Debug, Clone)]
enum TarLoc {
    /// In the archive file at this offset.
    At { offset: u64, size: u64 },
    /// Kept in memory (the quick scan of a compressed archive).
    Mem(Vec<u8>),
    /// Too large for the quick scan; only its existence is known.
    Skipped,
    /// A symbolic or hard link to this (normalized) name.
    Link(String),
}

/// A tar archive, indexed by (normalized) entry name.
pub(crate) struct TarStore {
    path: PathBuf,
    entries: HashMap<String, TarLoc>,
}

/// Files larger than this are not kept by [`TarStore::scan_gzip`].
const QUICK_SCAN_LIMIT: u64 = 1 << 20;
/// Total memory [`TarStore::scan_gzip`] keeps.
const QUICK_SCAN_BUDGET: u64 = 64 << 20;

impl TarStore {
    /// Indexes an uncompressed tar file; reads only its headers.
    pub(crate) fn index_file(path: &Path) -> Result<Self, ImageError> {
        let shown = path.display().to_string();
        let err = |e| ImageError::Io {
            what: format!("cannot read tar archive {shown}"),
            source: printable_error(e),
        };
        let file = File::open(path).map_err(err)?;
        if file.metadata().map_err(err)?.len() < 512 {
            return Err(ImageError::Invalid {
                what: shown,
                reason: "not a directory, tar or tar.gz archive (too short)".into(),
            });
        }
        let mut archive = tar::Archive::new(file);
        let mut entries = HashMap::new();
        for entry in archive.entries_with_seek().map_err(err)? {
            let entry = entry.map_err(err)?;
            let offset = entry.raw_file_position();
            let size = entry.size();
            Self::add(&mut entries, &entry, |_| Ok(TarLoc::At { offset, size }))?;
        }
        Ok(TarStore {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// One pass over a gzip-compressed tar, keeping small files in memory.
    pub(crate) fn scan_gzip(path: &Path) -> Result<Self, ImageError> {
        let shown = path.display().to_string();
        let err = |e| ImageError::Io {
            what: format!("cannot read tar archive {shown}"),
            source: printable_error(e),
        };
        let file = File::open(path).map_err(err)?;
        let mut archive = tar::Archive::new(MultiGzDecoder::new(BufReader::new(file)));
        let mut entries = HashMap::new();
        let mut budget = QUICK_SCAN_BUDGET;
        for entry in archive.entries().map_err(err)? {
            let mut entry = entry.map_err(err)?;
            let size = entry.size();
            // Only image metadata matters: top-level files and blobs.
            let name = normalize_name(&String::from_utf8_lossy(&entry.path_bytes()));
            let metadata = name.is_some_and(|n| !n.contains('/') || n.starts_with("blobs/"));
            let keep = metadata && size <= QUICK_SCAN_LIMIT && size <= budget;
            let loc = if keep {
                let mut data = Vec::new();
                (&mut entry)
                    .take(QUICK_SCAN_LIMIT)
                    .read_to_end(&mut data)
                    .map_err(err)?;
                budget -= data.len() as u64;
                TarLoc::Mem(data)
            } else {
                TarLoc::Skipped
            };
            Self::add(&mut entries, &entry, move |_| Ok(loc))?;
        }
        Ok(TarStore {
            path: path.to_path_buf(),
            entries,
        })
    }

    fn add<R: Read>(
        entries: &mut HashMap<String, TarLoc>,
        entry: &tar::Entry<'_, R>,
        data: impl FnOnce(&tar::Entry<'_, R>) -> Result<TarLoc, ImageError>,
    ) -> Result<(), ImageError> {
        let raw = entry.path_bytes();
        let Some(name) = std::str::from_utf8(&raw).ok().and_then(normalize_name) else {
            return Ok(()); // not a name any image format uses
        };
        let kind = entry.header().entry_type();
        let loc = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => data(entry)?,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let Some(target) = entry.link_name_bytes() else {
                    return Ok(());
                };
                let Ok(target) = std::str::from_utf8(&target) else {
                    return Ok(());
                };
                let joined = if kind == tar::EntryType::Symlink && !target.starts_with('/') {
                    match name.rsplit_once('/') {
                        Some((dir, _)) => lexical_join(dir, target),
                        None => lexical_join("", target),
                    }
                } else {
                    normalize_name(target)
                };
                match joined {
                    Some(t) => TarLoc::Link(t),
                    None => return Ok(()),
                }
            }
            _ => return Ok(()),
        };
        entries.insert(name, loc);
        Ok(())
    }
}

/// `dir/target` with `.` and `..` resolved lexically; `None` if it leaves the top.
fn lexical_join(dir: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl TarStore {
    fn locate(&self, name: &str) -> Option<&TarLoc> {
        let mut name = normalize_name(name)?;
        for _ in 0..16 {
            match self.entries.get(&name)? {
                TarLoc::Link(target) => name = target.clone(),
                loc => return Some(loc),
            }
        }
        None
    }
}

impl Store for TarStore {
    fn open(&self, name: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        let missing = || ImageError::Invalid {
            what: self.path.display().to_string(),
            reason: format!("{name} is missing"),
        };
        match self.locate(name).ok_or_else(missing)? {
            TarLoc::At { offset, size } => {
                let what = || format!("cannot read {name} in {}", self.path.display());
                let mut file = File::open(&self.path).map_err(io_err(what()))?;
                file.seek(SeekFrom::Start(*offset))
                    .map_err(io_err(what()))?;
                Ok(Box::new(BufReader::new(file.take(*size))))
            }
            TarLoc::Mem(data) => Ok(Box::new(&data[..])),
            TarLoc::Skipped => Err(ImageError::Invalid {
                what: self.path.display().to_string(),
                reason: format!("{name} is too large for a quick look"),
            }),
            TarLoc::Link(_) => Err(missing()),
        }
    }

    fn exists(&self, name: &str) -> bool {
        self.locate(name).is_some()
    }

    fn size(&self, name: &str) -> Option<u64> {
        match self.locate(name)? {
            TarLoc::At { size, .. } => Some(*size),
            TarLoc::Mem(data) => Some(data.len() as u64),
            _ => None,
        }
    }
}

/// How a file is compressed, by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub(crate) fn of(magic: &[u8]) -> Self {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// The compression of the file at `path`.
pub(crate) fn sniff(path: &Path) -> Result<Compression, ImageError> {
    let what = || format!("cannot read {}", path.display());
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(io_err(what()))?;
    let mut len = 0;
    while len < magic.len() {
        match file.read(&mut magic[len..]).map_err(io_err(what()))? {
            0 => break,
            n => len += n,
        }
    }
    Ok(Compression::of(&magic[..len]))
}

/// Decompresses the gzip file `src` into `dest`.
pub(crate) fn gunzip_to(src: &Path, dest: &Path) -> Result<(), ImageError> {
    let file = File::open(src).map_err(io_err(format!("cannot read {}", src.display())))?;
    let mut out =
        File::create(dest).map_err(io_err(format!("cannot create {}", dest.display())))?;
    io::copy(&mut MultiGzDecoder::new(BufReader::new(file)), &mut out)
        .map_err(io_err(format!("cannot decompress {}", src.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_sha256() {
        assert_eq!(hex(&[0, 0x1f, 0xab]), "001fab");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn digest_parsing() {
        let h = sha256_hex(b"");
        assert_eq!(digest_hex(&format!("sha256:{h}"), "x").unwrap(), h);
        assert!(matches!(
            digest_hex("sha512:abcd", "x"),
            Err(ImageError::Unsupported { .. })
        ));
        assert!(matches!(
            digest_hex("sha256:../../etc/passwd", "x"),
            Err(ImageError::Invalid { .. })
        ));
        assert!(digest_hex(&format!("sha256:{}", h.to_uppercase()), "x").is_err());
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize_name("./a//b/").as_deref(), Some("a/b"));
        assert_eq!(normalize_name("/index.json").as_deref(), Some("index.json"));
        assert_eq!(normalize_name("a/../b"), None);
        assert_eq!(normalize_name("./"), None);
        assert_eq!(lexical_join("a/b", "../c").as_deref(), Some("a/c"));
        assert_eq!(lexical_join("a", "../../c"), None);
    }

    #[test]
    fn hash_reader_checks() {
        let data = b"hello world".to_vec();
        let mut r = HashReader::new(&data[..]);
        let mut first = [0u8; 5];
        r.read_exact(&mut first).unwrap();
        let got = r.finish().unwrap();
        assert_eq!(got, (sha256_hex(&data), 11));
        assert!(check_digest("blob", &sha256_hex(&data), Some(11), got.clone()).is_ok());
        let err = check_digest("blob", &sha256_hex(b"x"), None, got.clone()).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("blob: sha256 mismatch (expected sha256:"));
        assert!(matches!(
            check_digest("blob", &sha256_hex(&data), Some(12), got),
            Err(ImageError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn tar_store_follows_links_and_offsets() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder.append_data(&mut h, name, data).unwrap();
        };
        add("./one/layer.tar", b"first layer");
        add("index.json", b"{}");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_cksum();
        builder
            .append_link(&mut h, "two/layer.tar", "../one/layer.tar")
            .unwrap();
        let bytes = builder.into_inner().unwrap();
        let path = std::env::temp_dir().join(format!("hearth-store-{}.tar", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();

        let store = TarStore::index_file(&path).unwrap();
        let mut got = String::new();
        store
            .open("two/layer.tar")
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "first layer");
        assert_eq!(store.read_small("/index.json").unwrap(), b"{}");
        assert!(store.exists("one/layer.tar"));
        assert!(!store.exists("three"));
        assert!(store.open("../etc/passwd").is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn tar_reader_errors_stay_on_one_line() {
        // The tar reader's errors quote raw header bytes (see layer/tests.rs).
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..4].copy_from_slice(b"a\x18\nb");
        h.as_old_mut().size = [0x18; 12];
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0, 1024));
        let path =
            std::env::temp_dir().join(format!("hearth-store-bad-{}.tar", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let err = TarStore::index_file(&path).err().unwrap();
        std::fs::remove_file(&path).unwrap();
        let text = crate::error_chain(&err);
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.contains("a\\u{18}\\nb"), "{text}");
    }
}
