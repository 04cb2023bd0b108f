//! The pull cache: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`)
//! that [`crate::image::prepare`] reads like any other, so a pulled image unpacks exactly
//! as the same image loaded from an archive.
//!
//! `index.json` doubles as the refs index: one entry per (reference, platform), the image
//! manifest's descriptor annotated with the full reference. Blobs are content-addressed
//! and written once: downloaded into a temporary file beside their final name, verified,
//! synced and renamed, so a reader never sees a partial or unverified blob. `index.json`
//! is rewritten the same way under an exclusive lock on `.lock`, so concurrent pulls of
//! different images keep each other's entries.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use oci_spec::image::{Descriptor, ImageIndex};
use sha2::{Digest as _, Sha256};

use super::platform::Platform;
use super::PullError;
use crate::image::oci::REF_NAME;
use crate::image::store::hex;
use crate::image::ImageCache;

/// The `oci-layout` file of every layout.
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

static TEMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A pull cache directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> PullError {
    move |source| PullError::Io { what, source }
}

/// The hex part of a `sha256:` digest; other algorithms are refused.
pub fn sha256_hex(digest: &str) -> Result<&str, PullError> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(PullError::BadDigest(digest.to_string())),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PullError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = temp_name(dir, "file");
    crate::fsutil::write_atomically(path, &temp, bytes)
        .map_err(io(format!("cannot write {}", path.display())))
}

/// `.tmp-<pid>-<n>-<label>` in `dir`: [`ImageCache`]'s naming, so its sweep of files left
/// by dead processes applies.
fn temp_name(dir: &Path, label: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp-{}-{n}-{label}", std::process::id()))
}

impl Layout {
    /// The layout in `root` (created by [`Layout::open`]).
    pub fn at(root: PathBuf) -> Self {
        Layout { root }
    }

    /// `<hearth cache>/registry`, next to the prepared images.
    pub fn default_location() -> Result<Self, PullError> {
        let images = ImageCache::default_location().map_err(|_| PullError::NoCacheDir)?;
        let parent = images.root().parent().unwrap_or(Path::new("/"));
        Ok(Self::at(parent.join("registry")))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    /// Creates the layout's skeleton and sweeps temporary files of dead processes.
    pub fn open(&self) -> Result<(), PullError> {
        let blobs = self.blob_dir();
        fs::create_dir_all(&blobs).map_err(io(format!("cannot create {}", blobs.display())))?;
        let marker = self.root.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, OCI_LAYOUT)?;
        }
        ImageCache::new(blobs).remove_stale_temps();
        ImageCache::new(self.root.clone()).remove_stale_temps();
        Ok(())
    }

    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.blob_dir().join(hex)
    }

    /// Whether the blob is cached (with the expected size, when one is given). Blobs are
    /// verified before they get their name, so presence is enough.
    pub fn has_blob(&self, hex: &str, size: Option<u64>) -> bool {
        fs::metadata(self.blob_path(hex))
            .is_ok_and(|m| m.is_file() && size.is_none_or(|s| s == m.len()))
    }

    /// A writer for the blob `digest` from `source` (a registry, for messages).
    pub fn new_blob(
        &self,
        digest: &str,
        size: Option<u64>,
        source: &str,
    ) -> Result<BlobWriter, PullError> {
        let hex = sha256_hex(digest)?.to_string();
        let temp = temp_name(&self.blob_dir(), &hex[..12]);
        let file = File::create(&temp).map_err(io(format!("cannot create {}", temp.display())))?;
        Ok(BlobWriter {
            file,
            temp: Some(temp),
            dest: self.blob_path(&hex),
            hasher: Sha256::new(),
            count: 0,
            hex,
            size,
            source: source.to_string(),
        })
    }

    /// Stores a small blob held in memory (a manifest or an index).
    pub fn put_blob(&self, digest: &str, bytes: &[u8], source: &str) -> Result<(), PullError> {
        let hex = sha256_hex(digest)?;
        if self.has_blob(hex, Some(bytes.len() as u64)) {
            return Ok(());
        }
        let mut writer = self.new_blob(digest, Some(bytes.len() as u64), source)?;
        writer.write(bytes)?;
        writer.commit()
    }

    fn read_index(&self) -> Result<ImageIndex, PullError> {
        let path = self.root.join("index.json");
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(serde_json::from_value(serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [],
                }))
                .expect("an empty index parses"))
            }
            Err(e) => return Err(io(format!("cannot read {}", path.display()))(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| PullError::Corrupt {
            what: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// The manifest recorded for `name` (a full reference) and `platform`.
    pub fn find(&self, name: &str, platform: &Platform) -> Result<Option<Descriptor>, PullError> {
        Ok(self
            .read_index()?
            .manifests()
            .iter()
            .find(|d| is_entry(d, name, platform))
            .cloned())
    }

    /// Records that `name` for `platform` is the manifest `digest` (`size` bytes of
    /// `media_type`), replacing what it was.
    pub fn record(
        &self,
        name: &str,
        platform: &Platform,
        digest: &str,
        size: u64,
        media_type: &str,
    ) -> Result<(), PullError> {
        let lock_path = self.root.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(format!("cannot open {}", lock_path.display())))?;
        lock.lock()
            .map_err(io(format!("cannot lock {}", lock_path.display())))?;

        let mut index = self.read_index()?;
        let mut platform_json = serde_json::json!({
            "os": platform.os,
            "architecture": platform.architecture,
        });
        if let Some(variant) = &platform.variant {
            platform_json["variant"] = serde_json::json!(variant);
        }
        let entry: Descriptor = serde_json::from_value(serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "platform": platform_json,
            "annotations": HashMap::from([(REF_NAME, name)]),
        }))
        .map_err(|e| PullError::Corrupt {
            what: format!("manifest descriptor {digest}"),
            reason: e.to_string(),
        })?;
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| !is_entry(d, name, platform))
            .cloned()
            .collect();
        manifests.push(entry);
        index.set_manifests(manifests);
        let json = serde_json::to_vec_pretty(&index).expect("an index serializes");
        write_atomic(&self.root.join("index.json"), &json)
        // The lock goes with `lock`.
    }
}

fn is_entry(desc: &Descriptor, name: &str, platform: &Platform) -> bool {
    let named = desc
        .annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .is_some_and(|n| n == name);
    named && Platform::of(desc).as_ref() == Some(platform)
}

/// A blob being downloaded: hashed and counted as it is written; it gets its name only
/// once [`BlobWriter::commit`] has verified it. Dropped uncommitted, the temporary file
/// goes away.
pub struct BlobWriter {
    file: File,
    temp: Option<PathBuf>,
    dest: PathBuf,
    hasher: Sha256,
    count: u64,
    hex: String,
    size: Option<u64>,
    source: String,
}

impl BlobWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), PullError> {
        self.count += bytes.len() as u64;
        if let Some(size) = self.size.filter(|&s| self.count > s) {
            // Stop a registry that sends more than the manifest promised.
            return Err(PullError::BlobSize {
                digest: format!("sha256:{}", self.hex),
                source_name: self.source.clone(),
                expected: size,
                actual: self.count,
            });
        }
        self.hasher.update(bytes);
        let temp = self.temp.as_deref().unwrap_or(&self.dest);
        self.file
            .write_all(bytes)
            .map_err(io(format!("cannot write {}", temp.display())))
    }

    /// `sha256:<hex>` of what was written so far.
    pub fn digest_so_far(&self) -> String {
        format!("sha256:{}", hex(&self.hasher.clone().finalize()))
    }

    /// Verifies digest and size, syncs and renames the blob into place.
    pub fn commit(mut self) -> Result<(), PullError> {
        let actual = self.digest_so_far();
        if actual != format!("sha256:{}", self.hex) {
            return Err(PullError::DigestMismatch {
                digest: format!("sha256:{}", self.hex),
                source_name: self.source.clone(),
                actual,
            });
        }
        if let Some(size) = self.size.filter(|&s| s != self.count) {
            return Err(PullError::BlobSize {
                digest: format!("sha256:{}", self.hex),
                source_name: self.source.clone(),
                expected: size,
                actual: self.count,
            });
        }
        let temp = self.temp.take().expect("a writer commits once");
        let result = self
            .file
            .sync_all()
            .and_then(|()| fs::rename(&temp, &self.dest));
        if let Err(e) = result {
            let _ = fs::remove_file(&temp);
            return Err(io(format!("cannot store {}", self.dest.display()))(e));
        }
        // The rename is durable once the directory is; losing it only costs a re-download.
        if let Some(dir) = self.dest.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> Layout {
        let dir = std::env::temp_dir().join(format!("hearth-layout-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let layout = Layout::at(dir);
        layout.open().unwrap();
        layout
    }

    fn entries(layout: &Layout) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(layout.blob_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", crate::image::store::sha256_hex(bytes))
    }

    #[test]
    fn verified_blob_is_renamed_into_place() {
        let layout = scratch("ok");
        let digest = sha(b"hello world");
        let mut w = layout.new_blob(&digest, Some(11), "reg").unwrap();
        w.write(b"hello ").unwrap();
        // Not visible under its name before it is verified.
        assert!(!layout.has_blob(sha256_hex(&digest).unwrap(), None));
        w.write(b"world").unwrap();
        w.commit().unwrap();
        let hex = sha256_hex(&digest).unwrap();
        assert_eq!(fs::read(layout.blob_path(hex)).unwrap(), b"hello world");
        assert!(layout.has_blob(hex, Some(11)));
        assert!(!layout.has_blob(hex, Some(12)));
        assert_eq!(entries(&layout), vec![hex.to_string()]);
        fs::remove_dir_all(layout.root()).unwrap();
    }

    #[test]
    fn digest_mismatch_leaves_nothing() {
        let layout = scratch("bad");
        let digest = sha(b"expected");
        let mut w = layout.new_blob(&digest, Some(8), "127.0.0.1:5000").unwrap();
        w.write(b"tampered").unwrap();
        let err = w.commit().unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "blob {digest} from 127.0.0.1:5000: digest mismatch (got {})",
                sha(b"tampered")
            )
        );
        assert!(entries(&layout).is_empty(), "{:?}", entries(&layout));

        // Too many bytes stop the download at once; a dropped writer cleans up too.
        let mut w = layout.new_blob(&digest, Some(4), "reg").unwrap();
        let err = w.write(b"expected").unwrap_err().to_string();
        assert!(
            err.contains("size mismatch (expected 4 bytes, got 8)"),
            "{err}"
        );
        drop(w);
        assert!(entries(&layout).is_empty());

        // Too few bytes with the right digest prefix cannot pass either.
        let mut w = layout.new_blob(&digest, Some(8), "reg").unwrap();
        w.write(b"exp").unwrap();
        assert!(w.commit().is_err());
        assert!(entries(&layout).is_empty());

        assert!(layout.new_blob("md5:00", None, "reg").is_err());
        fs::remove_dir_all(layout.root()).unwrap();
    }

    #[test]
    fn refs_index() {
        let layout = scratch("refs");
        let amd64 = Platform::default();
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let (d1, d2, d3) = (sha(b"1"), sha(b"2"), sha(b"3"));
        let mt = "application/vnd.oci.image.manifest.v1+json";
        assert!(layout.find("r/x:y", &amd64).unwrap().is_none());
        layout.record("r/x:y", &amd64, &d1, 10, mt).unwrap();
        layout.record("r/x:y", &arm64, &d2, 20, mt).unwrap();
        layout.record("r/x:y", &amd64, &d3, 30, mt).unwrap();
        let found = layout.find("r/x:y", &amd64).unwrap().unwrap();
        assert_eq!(found.digest().to_string(), d3);
        assert_eq!(found.size(), 30);
        let found = layout.find("r/x:y", &arm64).unwrap().unwrap();
        assert_eq!(found.digest().to_string(), d2);
        assert!(layout.find("r/x:z", &amd64).unwrap().is_none());
        // A plain OCI layout: two entries, each named.
        let index: ImageIndex =
            serde_json::from_slice(&fs::read(layout.root().join("index.json")).unwrap()).unwrap();
        assert_eq!(index.manifests().len(), 2);
        assert_eq!(
            fs::read(layout.root().join("oci-layout")).unwrap(),
            OCI_LAYOUT
        );
        fs::remove_dir_all(layout.root()).unwrap();
    }
}
