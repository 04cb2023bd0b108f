//! The machine's image store: root filesystems loaded over the protocol as tar streams,
//! kept unpacked at `<root>/<hex>` (the `sha256:<hex>` digest) and used as overlay lower
//! directories. A load unpacks into `<hex>.tmp` and renames, so a half-loaded image is
//! never seen as present.

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// Why an image could not be looked up or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error("invalid image digest {0:?} (expected sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error("image {0} is being loaded by another session")]
    Busy(String),
    #[error("image entry {0:?} escapes the root filesystem")]
    UnsafePath(String),
    #[error("cannot unpack image {digest}")]
    Unpack {
        digest: String,
        #[source]
        source: io::Error,
    },
}

/// The hex part of a `sha256:<64 lowercase hex>` digest.
pub fn digest_hex(digest: &str) -> Result<&str, ImageStoreError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| ImageStoreError::BadDigest(digest.to_string()))?;
    Ok(hex)
}

/// A directory of unpacked images.
pub struct ImageStore {
    root: PathBuf,
    loading: Mutex<HashSet<String>>,
}

fn is_safe(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

impl ImageStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            loading: Mutex::new(HashSet::new()),
        }
    }

    /// Where the image with this digest lives (whether or not it is present).
    pub fn path(&self, digest: &str) -> Result<PathBuf, ImageStoreError> {
        Ok(self.root.join(digest_hex(digest)?))
    }

    pub fn present(&self, digest: &str) -> Result<bool, ImageStoreError> {
        Ok(self.path(digest)?.is_dir())
    }

    /// Unpacks a tar (or gzip-compressed tar) stream as the image `digest`. Entries with
    /// absolute paths or `..` are refused; owners, modes and mtimes are kept.
    pub fn load(&self, digest: &str, reader: impl Read) -> Result<(), ImageStoreError> {
        let hex = digest_hex(digest)?.to_string();
        if !self
            .loading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hex.clone())
        {
            return Err(ImageStoreError::Busy(digest.to_string()));
        }
        let result = self.load_locked(&hex, reader);
        self.loading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hex);
        result
    }

    fn load_locked(&self, hex: &str, reader: impl Read) -> Result<(), ImageStoreError> {
        let digest = format!("sha256:{hex}");
        let unpack = |source| ImageStoreError::Unpack {
            digest: digest.clone(),
            source,
        };
        let final_dir = self.root.join(hex);
        let tmp = self.root.join(format!("{hex}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(unpack)?;
        }
        std::fs::create_dir_all(&tmp).map_err(unpack)?;
        let result = unpack_tar(reader, &tmp).map_err(|e| match e {
            UnpackError::Unsafe(p) => ImageStoreError::UnsafePath(p),
            UnpackError::Io(e) => unpack(e),
        });
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if final_dir.is_dir() {
            // Loaded meanwhile (same digest, same content).
            let _ = std::fs::remove_dir_all(&tmp);
            return Ok(());
        }
        std::fs::rename(&tmp, &final_dir).map_err(unpack)
    }
}

enum UnpackError {
    Unsafe(String),
    Io(io::Error),
}

impl From<io::Error> for UnpackError {
    fn from(e: io::Error) -> Self {
        UnpackError::Io(e)
    }
}

fn unpack_tar(reader: impl Read, dst: &Path) -> Result<(), UnpackError> {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let stream: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if !is_safe(&path) {
            return Err(UnpackError::Unsafe(path.display().to_string()));
        }
        if entry.header().entry_type().is_hard_link() {
            if let Some(link) = entry.link_name()? {
                if !is_safe(&link) {
                    return Err(UnpackError::Unsafe(link.display().to_string()));
                }
            }
        }
        if !entry.unpack_in(dst)? {
            return Err(UnpackError::Unsafe(path.display().to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::TempDir;
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    pub const DIGEST: &str =
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "etc", io::empty()).unwrap();
        let data = b"root:x:0:0::/root:/bin/sh\n";
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_mode(0o640);
        h.set_uid(7);
        h.set_gid(8);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, "etc/passwd", &data[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "bin", "/usr/bin").unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn digests_are_checked() {
        assert_eq!(digest_hex(DIGEST).unwrap().len(), 64);
        for bad in [
            "sha256:00",
            "sha512:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:../3456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "",
        ] {
            assert!(digest_hex(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loads_plain_and_gzip_tars() {
        let dir = TempDir::new("images");
        let store = ImageStore::new(dir.path());
        assert!(!store.present(DIGEST).unwrap());
        store.load(DIGEST, &sample_tar()[..]).unwrap();
        assert!(store.present(DIGEST).unwrap());
        let root = store.path(DIGEST).unwrap();
        let passwd = root.join("etc/passwd");
        let meta = std::fs::metadata(&passwd).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        if sys_is_root() {
            assert_eq!((meta.uid(), meta.gid()), (7, 8));
        }
        assert_eq!(
            std::fs::read_link(root.join("bin")).unwrap(),
            Path::new("/usr/bin")
        );
        assert!(!dir.path().join(format!("{}.tmp", &DIGEST[7..])).exists());

        let other = DIGEST.replace("0123", "4567");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &sample_tar()).unwrap();
        store.load(&other, &gz.finish().unwrap()[..]).unwrap();
        assert!(store.path(&other).unwrap().join("etc/passwd").is_file());
    }

    fn raw_entry(name: &str) -> Vec<u8> {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        h.set_size(1);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(b"x");
        out.resize(1024, 0);
        out.extend_from_slice(&[0; 1024]);
        out
    }

    #[test]
    fn escaping_paths_are_refused() {
        let dir = TempDir::new("images-bad");
        let store = ImageStore::new(dir.path());
        for name in ["../evil", "a/../../evil", "/abs"] {
            let err = store.load(DIGEST, &raw_entry(name)[..]).unwrap_err();
            assert!(
                matches!(err, ImageStoreError::UnsafePath(_)),
                "{name}: {err}"
            );
            assert!(!store.present(DIGEST).unwrap());
        }
        assert!(!dir.path().parent().unwrap().join("evil").exists());
        assert!(matches!(
            store.load("sha256:1", io::empty()),
            Err(ImageStoreError::BadDigest(_))
        ));
    }

    fn sys_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
