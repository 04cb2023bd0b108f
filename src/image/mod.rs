//! Container images: turn an image into a root filesystem directory and an ext4 image of
//! it, cached by digest.
//!
//! [`prepare`] accepts, detected by content rather than by name:
//! 1. an **OCI image layout** directory (`oci-layout`, `index.json`, `blobs/sha256/...`);
//!    `DIR:REF` picks the manifest whose `org.opencontainers.image.ref.name` is `REF`
//!    (only when `DIR:REF` is not itself a path);
//! 2. an **OCI archive**: a tar or tar.gz of such a layout;
//! 3. a **`docker save` tarball** (`manifest.json`); when it also holds an OCI layout (docker
//!    25 and later), the OCI index is used;
//! 4. a **plain root filesystem directory**, copied as is;
//! 5. a **plain root filesystem tarball** (tar or tar.gz).
//!
//! Every blob is checked against its sha256 digest (and size) while it streams; layers are
//! applied in order with overlay whiteouts (`.wh.NAME`, `.wh..wh..opq`). Extraction treats
//! the image as hostile: entries with `..` are refused, symlinks are resolved inside the
//! root like a chroot would and never followed out of it, and nothing is written outside the
//! root filesystem directory.
//!
//! # Cache
//! `<cache>/<digest hex>/{rootfs/, rootfs.ext4, config.json, complete}`. An entry is built in
//! `<cache>/.tmp-<pid>-<n>` and renamed into place once complete, so a reader never sees a
//! partial entry and two processes preparing the same image at once both succeed (one
//! rename wins, the other build is discarded). For OCI and docker images a cache hit only
//! reads the index and manifest (or the docker config); plain directories and tarballs are
//! hashed every time, since only their content identifies them.
//!
//! Host tools: `mkfs.ext4` from e2fsprogs (1.43 or later, for `-d`).

mod docker;
mod ext4;
pub mod layer;
mod oci;
mod plain;
pub mod pull;
pub mod sample;
mod store;

use std::fs;
use std::io::{self, IsTerminal, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

pub use ext4::build_ext4;

use store::{sniff, Compression, Store, TarStore};

/// Default `PATH` (docker's): of images that do not set one (plain root filesystems),
/// and of a container whose environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything that can go wrong while reading an image or building its root filesystem.
///
/// As elsewhere in hearth, a variant's message does not repeat its source; show errors with
/// [`crate::error_chain`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O error, with what was being done and to which file.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// An error inside a source, a layer or a cache entry named by `context`.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<ImageError>,
    },
    #[error("{what}: sha256 mismatch (expected {expected}, got {actual})")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: size mismatch (expected {expected} bytes, got {actual})")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// A layer entry that would leave the root filesystem or is otherwise refused.
    #[error("{layer}: entry {entry:?} {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },
    /// An I/O error while applying one layer entry.
    #[error("{layer}: entry {entry:?}: {what}")]
    Entry {
        layer: String,
        entry: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: unsupported {detail}")]
    Unsupported { what: String, detail: String },
    /// Malformed or inconsistent image metadata.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{what}: invalid JSON")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("several images ({names}); choose one by appending :REF to the image path")]
    Ambiguous { names: String },
    #[error("{source_name} has no image named {reference:?} (it has {names})")]
    NoSuchReference {
        source_name: String,
        reference: String,
        names: String,
    },
    #[error(
        "{0} is not an image: only OCI layouts, OCI archives and docker save archives take :REF"
    )]
    ReferenceNotSupported(String),
    #[error("mkfs.ext4 not found (install e2fsprogs)")]
    MkfsNotFound,
    #[error("mkfs.ext4 {out} failed ({status}): {stderr}")]
    Mkfs {
        out: String,
        status: String,
        stderr: String,
    },
    #[error("no image cache directory: set HEARTH_CACHE or HOME")]
    NoCacheDir,
    #[error("sample image: {0}")]
    Sample(String),
    #[error(transparent)]
    Pull(#[from] pull::PullError),
}

impl ImageError {
    /// Wraps `self` in a context line ("OCI archive x.tar", "layer 2 (...)").
    pub(crate) fn context(self, context: impl Into<String>) -> Self {
        ImageError::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

/// `map_err` helper: an I/O error with a description of what failed.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// How a container of the image starts, from the image config (docker's `config` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// `uid[:gid]` or `name[:group]`, as in the image; `None` is root.
    pub user: Option<String>,
}

impl Default for ImageConfig {
    /// The config of a plain root filesystem: `/bin/sh` with a standard `PATH`.
    fn default() -> Self {
        ImageConfig {
            entrypoint: Vec::new(),
            cmd: vec!["/bin/sh".to_string()],
            env: vec![format!("PATH={DEFAULT_PATH}")],
            working_dir: None,
            user: None,
        }
    }
}

/// An image ready to boot: its root filesystem, unpacked and as an ext4 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    /// `sha256:<hex>`: the manifest digest of an OCI image, the image ID (config digest) of
    /// a legacy `docker save` image, or a hash of the content of a plain root filesystem
    /// (its tarball's bytes, or a walk of its directory tree), so edits change it.
    pub digest: String,
    /// The unpacked root filesystem in the cache, owners and modes preserved. Shared by
    /// every user of the image: do not modify it.
    pub rootfs: PathBuf,
    /// An ext4 image of `rootfs`, for read-only use.
    pub ext4: PathBuf,
    pub config: ImageConfig,
}

/// The image cache: a directory of prepared images keyed by digest.
#[derive(Debug, Clone)]
pub struct ImageCache {
    root: PathBuf,
}

/// Distinguishes temporary directories of one process.
static TMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl ImageCache {
    /// A cache in `root` (created when first needed).
    pub fn new(root: PathBuf) -> Self {
        ImageCache { root }
    }

    /// `$HEARTH_CACHE/images`, else `$HOME/.cache/hearth/images`.
    pub fn default_location() -> Result<Self, ImageError> {
        let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = non_empty("HEARTH_CACHE") {
            return Ok(Self::new(PathBuf::from(dir).join("images")));
        }
        match non_empty("HOME") {
            Some(home) => Ok(Self::new(PathBuf::from(home).join(".cache/hearth/images"))),
            None => Err(ImageError::NoCacheDir),
        }
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_dir(&self, hex: &str) -> PathBuf {
        self.root.join(hex)
    }

    /// The complete cache entry of `hex`, if there is one.
    fn lookup(&self, hex: &str) -> Result<Option<PreparedImage>, ImageError> {
        let dir = self.entry_dir(hex);
        if !dir.join("complete").exists() || !dir.join("rootfs.ext4").exists() {
            return Ok(None);
        }
        let config_path = dir.join("config.json");
        let bytes = fs::read(&config_path)
            .map_err(io_err(format!("cannot read {}", config_path.display())))?;
        let config = serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
            what: config_path.display().to_string(),
            source,
        })?;
        Ok(Some(PreparedImage {
            digest: format!("sha256:{hex}"),
            rootfs: dir.join("rootfs"),
            ext4: dir.join("rootfs.ext4"),
            config,
        }))
    }

    /// A fresh temporary path in the cache (`.tmp-<pid>-<n><suffix>`), not yet created.
    fn temp_path(&self, suffix: &str) -> Result<PathBuf, ImageError> {
        fs::create_dir_all(&self.root)
            .map_err(io_err(format!("cannot create {}", self.root.display())))?;
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .root
            .join(format!(".tmp-{}-{n}{suffix}", std::process::id())))
    }

    /// Removes temporary files and directories left by processes that no longer exist.
    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".tmp-")) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            log::debug!("removing stale {}", entry.path().display());
            let _ = remove_any(&entry.path());
        }
    }

    /// Builds the cache entry of `hex`: `fill` unpacks the root filesystem into the
    /// directory it is given and returns the config; then the ext4 image is made and the
    /// entry renamed into place.
    fn build(
        &self,
        hex: &str,
        fill: impl FnOnce(&Path) -> Result<ImageConfig, ImageError>,
    ) -> Result<PreparedImage, ImageError> {
        self.remove_stale_temps();
        let tmp = TempPath(self.temp_path("")?);
        let rootfs = tmp.0.join("rootfs");
        fs::create_dir_all(&rootfs)
            .and_then(|()| fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755)))
            .map_err(io_err(format!("cannot create {}", rootfs.display())))?;
        let config = fill(&rootfs)?;

        let json = serde_json::to_vec_pretty(&config).expect("ImageConfig serializes");
        let config_path = tmp.0.join("config.json");
        fs::write(&config_path, json)
            .map_err(io_err(format!("cannot write {}", config_path.display())))?;
        build_ext4(&rootfs, &tmp.0.join("rootfs.ext4"), 0)?;
        let complete = tmp.0.join("complete");
        fs::write(&complete, b"")
            .map_err(io_err(format!("cannot write {}", complete.display())))?;

        let dest = self.entry_dir(hex);
        for attempt in 0..2 {
            match fs::rename(&tmp.0, &dest) {
                Ok(()) => {
                    std::mem::forget(tmp);
                    return self.lookup(hex)?.ok_or_else(|| ImageError::Invalid {
                        what: dest.display().to_string(),
                        reason: "cache entry vanished".into(),
                    });
                }
                Err(e) if dest.exists() => {
                    // Another process finished first: use its entry.
                    if let Some(found) = self.lookup(hex)? {
                        return Ok(found);
                    }
                    // An incomplete entry (not ours to trust): move it away and retry.
                    if attempt == 0 {
                        let aside = self.temp_path("-stale")?;
                        if fs::rename(&dest, &aside).is_ok() {
                            let _ = remove_any(&aside);
                        }
                        continue;
                    }
                    return Err(ImageError::Io {
                        what: format!("cannot rename {} to {}", tmp.0.display(), dest.display()),
                        source: e,
                    });
                }
                Err(e) => {
                    return Err(ImageError::Io {
                        what: format!("cannot rename {} to {}", tmp.0.display(), dest.display()),
                        source: e,
                    })
                }
            }
        }
        unreachable!("the loop returns")
    }
}

/// A temporary file or directory, removed when dropped.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = remove_any(&self.0);
    }
}

/// Removes a file, symlink or directory tree; missing is fine. Never follows symlinks.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A byte-count progress bar on stderr when stderr is a terminal; hidden otherwise.
pub(crate) struct Progress(ProgressBar);

impl Progress {
    pub(crate) fn new(total: u64, message: String) -> Self {
        if !io::stderr().is_terminal() {
            return Progress(ProgressBar::hidden());
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message);
        Progress(bar)
    }

    pub(crate) fn set_message(&self, message: String) {
        self.0.set_message(message);
    }

    pub(crate) fn wrap<'a, R: Read + 'a>(&self, read: R) -> Box<dyn Read + 'a> {
        Box::new(self.0.wrap_read(read))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Splits `DIR:REF` when `source` does not exist but `DIR` does. `REF` may hold colons
/// itself (a full name such as `127.0.0.1:5000/x:y` in the pull cache): the longest
/// existing `DIR` wins.
fn split_reference(source: &Path) -> (PathBuf, Option<String>) {
    if source.symlink_metadata().is_err() {
        if let Some(text) = source.to_str() {
            for (at, _) in text.rmatch_indices(':') {
                let (dir, reference) = (&text[..at], &text[at + 1..]);
                if !dir.is_empty() && !reference.is_empty() && Path::new(dir).exists() {
                    return (PathBuf::from(dir), Some(reference.to_string()));
                }
            }
        }
    }
    (source.to_path_buf(), None)
}

/// Prepares `source` (see the [module documentation](self) for what it may be) in `cache`
/// and returns where its root filesystem and ext4 image are. A progress bar is drawn on
/// stderr when stderr is a terminal.
pub fn prepare(source: &Path, cache: &ImageCache) -> Result<PreparedImage, ImageError> {
    let (path, reference) = split_reference(source);
    let shown = path.display().to_string();
    let meta = fs::metadata(&path).map_err(io_err(format!("cannot open image {shown}")))?;
    if meta.is_dir() {
        if path.join("oci-layout").exists() {
            let store = store::DirStore::new(&path);
            return prepare_oci(&store, reference.as_deref(), cache)
                .map_err(|e| e.context(format!("OCI image layout {shown}")));
        }
        if docker::is_docker_save(&store::DirStore::new(&path)) {
            let store = store::DirStore::new(&path);
            return prepare_docker(&store, reference.as_deref(), &shown, cache)
                .map_err(|e| e.context(format!("docker save directory {shown}")));
        }
        if reference.is_some() {
            return Err(ImageError::ReferenceNotSupported(shown));
        }
        return plain::prepare_dir(&path, cache)
            .map_err(|e| e.context(format!("root filesystem directory {shown}")));
    }

    let compression = sniff(&path)?;
    match compression {
        Compression::None => {
            let store = TarStore::index_file(&path)?;
            prepare_archive(&store, &path, reference.as_deref(), cache)
        }
        Compression::Gzip => prepare_gzip_archive(&path, reference.as_deref(), cache),
        Compression::Zstd => Err(ImageError::Unsupported {
            what: shown,
            detail: "zstd-compressed archive (decompress it first)".into(),
        }),
    }
}

/// What an archive holds, judged by its top-level files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchiveKind {
    Oci,
    Docker,
    Plain,
}

fn archive_kind(store: &dyn Store) -> ArchiveKind {
    if store.exists("oci-layout") && store.exists("index.json") {
        ArchiveKind::Oci
    } else if docker::is_docker_save(store) {
        ArchiveKind::Docker
    } else {
        ArchiveKind::Plain
    }
}

/// An uncompressed archive, indexed.
fn prepare_archive(
    store: &TarStore,
    path: &Path,
    reference: Option<&str>,
    cache: &ImageCache,
) -> Result<PreparedImage, ImageError> {
    let shown = path.display().to_string();
    match archive_kind(store) {
        ArchiveKind::Oci => prepare_oci(store, reference, cache)
            .map_err(|e| e.context(format!("OCI archive {shown}"))),
        ArchiveKind::Docker => prepare_docker(store, reference, &shown, cache)
            .map_err(|e| e.context(format!("docker save archive {shown}"))),
        ArchiveKind::Plain if reference.is_some() => Err(ImageError::ReferenceNotSupported(shown)),
        ArchiveKind::Plain => plain::prepare_tarball(path, cache)
            .map_err(|e| e.context(format!("root filesystem tarball {shown}"))),
    }
}

/// A gzip-compressed archive: a first pass keeps its small files in memory, which is
/// enough to find the digest and answer from the cache; otherwise it is decompressed
/// into the cache and read like an uncompressed one.
fn prepare_gzip_archive(
    path: &Path,
    reference: Option<&str>,
    cache: &ImageCache,
) -> Result<PreparedImage, ImageError> {
    let shown = path.display().to_string();
    let quick = TarStore::scan_gzip(path)?;
    let kind = archive_kind(&quick);
    if kind == ArchiveKind::Plain {
        if reference.is_some() {
            return Err(ImageError::ReferenceNotSupported(shown));
        }
        return plain::prepare_tarball(path, cache)
            .map_err(|e| e.context(format!("root filesystem tarball {shown}")));
    }
    let hit = match kind {
        ArchiveKind::Oci => oci::resolve(&quick, reference).ok().map(|(hex, _)| hex),
        _ => docker::resolve(&quick, reference).ok().map(|r| r.hex),
    };
    if let Some(hex) = hit {
        if let Some(found) = cache.lookup(&hex)? {
            return Ok(found);
        }
    }
    drop(quick);
    let tar = TempPath(cache.temp_path(".tar")?);
    store::gunzip_to(path, &tar.0)?;
    let store = TarStore::index_file(&tar.0)?;
    let label = |e: ImageError| match kind {
        ArchiveKind::Oci => e.context(format!("OCI archive {shown}")),
        _ => e.context(format!("docker save archive {shown}")),
    };
    match kind {
        ArchiveKind::Oci => prepare_oci(&store, reference, cache).map_err(label),
        _ => prepare_docker(&store, reference, &shown, cache).map_err(label),
    }
}

/// Prepares `image` as `hearth container run` takes it: an existing file or directory
/// (or `DIR:REF` of an existing `DIR`) is a local image for [`prepare`]; anything else is a
/// registry reference, pulled into the pull cache as `policy` says. What is neither (a
/// missing `/path`) fails as [`prepare`] does.
pub fn prepare_image_arg(
    image: &Path,
    options: &pull::PullOptions,
    policy: pull::PullPolicy,
    cache: &ImageCache,
) -> Result<PreparedImage, ImageError> {
    let (_, local_reference) = split_reference(image);
    let text = match image.to_str() {
        Some(text)
            if image.symlink_metadata().is_err()
                && local_reference.is_none()
                && pull::is_reference(text) =>
        {
            text
        }
        _ => return prepare(image, cache),
    };
    let layout = pull::Layout::default_location()?;
    let pulled = pull::resolve(text, options, policy, &layout).map_err(|e| {
        // `missing.tar` is a valid reference too; say why a registry was asked.
        let looks_like_file = [".tar", ".tgz", ".gz", ".zst"]
            .iter()
            .any(|ext| text.ends_with(ext));
        let e = ImageError::from(e);
        if looks_like_file {
            e.context(format!("no file {text}, and as an image reference"))
        } else {
            e
        }
    })?;
    prepare_pulled(&pulled, cache)
}

/// Prepares an image of the pull cache: the same root filesystem, config and digest as
/// the image loaded from an OCI archive with the same manifest.
pub fn prepare_pulled(
    pulled: &pull::Pulled,
    cache: &ImageCache,
) -> Result<PreparedImage, ImageError> {
    let store = store::DirStore::new(&pulled.layout);
    let hex = store::digest_hex(&pulled.manifest_digest, "pulled manifest")?.to_string();
    if let Some(found) = cache.lookup(&hex)? {
        return Ok(found);
    }
    let manifest = oci::manifest_by_digest(&store, &hex)
        .map_err(|e| e.context(format!("pulled image {}", pulled.name)))?;
    cache
        .build(&hex, |rootfs| oci::unpack(&store, &manifest, rootfs))
        .map_err(|e| e.context(format!("pulled image {}", pulled.name)))
}

fn prepare_oci(
    store: &dyn Store,
    reference: Option<&str>,
    cache: &ImageCache,
) -> Result<PreparedImage, ImageError> {
    let (hex, manifest) = oci::resolve(store, reference)?;
    if let Some(found) = cache.lookup(&hex)? {
        return Ok(found);
    }
    cache.build(&hex, |rootfs| oci::unpack(store, &manifest, rootfs))
}

fn prepare_docker(
    store: &dyn Store,
    reference: Option<&str>,
    shown: &str,
    cache: &ImageCache,
) -> Result<PreparedImage, ImageError> {
    let resolved = docker::resolve(store, reference)?;
    if let Some(found) = cache.lookup(&resolved.hex)? {
        return Ok(found);
    }
    log::debug!("unpacking docker save image {shown}");
    cache.build(&resolved.hex, |rootfs| {
        docker::unpack(store, &resolved, rootfs)
    })
}

#[cfg(test)]
mod tests;
