//! Applying a layer (a tar stream) to a root filesystem directory, safely: tar entries,
//! whiteouts, links, modes, owners and device nodes. Where an entry lands is decided by
//! [`path`], which keeps every name and hard link target inside the root; this module never
//! follows the last component of a name (whatever is there, a symlink included, is
//! replaced), and never opens or changes anything by a path the kernel would resolve
//! through a symlink.
//!
//! Whiteouts: `.wh.NAME` removes `NAME` as lower layers left it; `.wh..wh..opq` in a
//! directory removes everything lower layers put in it. Entries of one tar come in any
//! order, so the layer remembers what it wrote (and every ancestor of it) and the opaque
//! directories are cleared when the layer ends, keeping exactly what this layer wrote.
//!
//! Public (not only to the crate) for the `image_layer` fuzz target.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;

use super::{remove_any, ImageError};
use path::{components, printable, printable_error, LinkTarget, PathError};

pub(crate) mod path;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    /// Target, verbatim.
    Symlink(Vec<u8>),
    /// Target: a name relative to the root.
    Hardlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// Ownership, permissions and times of an entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes (name, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Whether this process may chown and mknod (effective uid 0).
pub(crate) fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Writes the entries of one layer into a root filesystem directory.
pub struct LayerWriter<'a> {
    root: &'a Path,
    /// "layer 2 (sha256:…)", for messages.
    label: String,
    /// Interpret `.wh.` names (image layers) or keep them as files (plain root filesystems).
    whiteouts: bool,
    privileged: bool,
    /// Everything this layer wrote, and every ancestor of it (relative to the root).
    touched: HashSet<PathBuf>,
    /// Directories with an opaque marker.
    opaque: Vec<PathBuf>,
    /// Directory metadata, applied when the layer ends (a read-only directory must stay
    /// writable while its entries arrive; entries change its mtime).
    dirs: HashMap<PathBuf, Meta>,
}

impl<'a> LayerWriter<'a> {
    /// A writer for one layer into `root`; `label` ("layer 2 (sha256:…)") starts its
    /// messages; `whiteouts` interprets `.wh.` names (image layers) or keeps them as files
    /// (plain root filesystems).
    pub fn new(root: &'a Path, label: String, whiteouts: bool) -> Self {
        LayerWriter {
            root,
            label,
            whiteouts,
            privileged: privileged(),
            touched: HashSet::new(),
            opaque: Vec::new(),
            dirs: HashMap::new(),
        }
    }

    fn refuse(&self, entry: &str, reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.label.clone(),
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    fn fail(&self, entry: &str, what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
        let (layer, entry, what) = (self.label.clone(), entry.to_string(), what.into());
        move |source| ImageError::Entry {
            layer,
            entry,
            what,
            source,
        }
    }

    fn touch(&mut self, rel: &Path) {
        for ancestor in rel.ancestors() {
            if !self.touched.insert(ancestor.to_path_buf()) {
                break; // its ancestors are in already
            }
        }
    }

    /// Resolves the directory `comps` inside the root (see [`path::resolve_dir`]).
    fn resolve_dir(
        &self,
        comps: &[OsString],
        create: bool,
        entry: &str,
    ) -> Result<Option<PathBuf>, ImageError> {
        path::resolve_dir(self.root, comps, create).map_err(|e| self.path_error(entry, e))
    }

    fn path_error(&self, entry: &str, err: PathError) -> ImageError {
        match err {
            PathError::Io { what, source } => self.fail(entry, what)(source),
            refusal => self.refuse(entry, refusal.to_string()),
        }
    }

    /// Applies every entry of a tar stream.
    pub fn apply_tar(&mut self, reader: &mut dyn Read) -> Result<(), ImageError> {
        let read_err = |label: &str| {
            let what = format!("{label}: cannot read the tar stream");
            move |source| ImageError::Io {
                what,
                source: printable_error(source),
            }
        };
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(read_err(&self.label))?;
        for entry in entries {
            let mut entry = entry.map_err(read_err(&self.label))?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let bad_header = |e| self.fail(&shown, "malformed tar header")(printable_error(e));
            let header = entry.header();
            let link = || {
                entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default()
            };
            let device = || -> io::Result<(u32, u32)> {
                Ok((
                    header.device_major()?.unwrap_or(0),
                    header.device_minor()?.unwrap_or(0),
                ))
            };
            let kind = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink(link()),
                tar::EntryType::Link => Kind::Hardlink(link()),
                tar::EntryType::Char => {
                    let (major, minor) = device().map_err(bad_header)?;
                    Kind::Char(major, minor)
                }
                tar::EntryType::Block => {
                    let (major, minor) = device().map_err(bad_header)?;
                    Kind::Block(major, minor)
                }
                tar::EntryType::Fifo => Kind::Fifo,
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
                other => {
                    log::warn!("{}: skipping {shown:?} of tar type {other:?}", self.label);
                    continue;
                }
            };
            let mut meta = Meta {
                mode: header.mode().map_err(bad_header)? & 0o7777,
                uid: u32::try_from(header.uid().map_err(bad_header)?).unwrap_or(u32::MAX),
                gid: u32::try_from(header.gid().map_err(bad_header)?).unwrap_or(u32::MAX),
                mtime: i64::try_from(header.mtime().map_err(bad_header)?).unwrap_or(0),
                xattrs: Vec::new(),
            };
            if let Some(extensions) = entry.pax_extensions().map_err(bad_header)? {
                for ext in extensions {
                    let ext = ext.map_err(bad_header)?;
                    let (Ok(key), value) = (ext.key(), ext.value_bytes()) else {
                        continue;
                    };
                    let number = || {
                        let text = std::str::from_utf8(value).ok()?;
                        text.split('.').next()?.parse::<i64>().ok()
                    };
                    match key {
                        "uid" => meta.uid = number().map_or(meta.uid, |n| n as u32),
                        "gid" => meta.gid = number().map_or(meta.gid, |n| n as u32),
                        "mtime" => meta.mtime = number().unwrap_or(meta.mtime),
                        _ => {
                            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                                meta.xattrs.push((name.as_bytes().to_vec(), value.to_vec()));
                            }
                        }
                    }
                }
            }
            self.add(&raw, kind, &meta, &mut entry)?;
        }
        Ok(())
    }

    /// Applies one entry named `raw` (relative to the root); `data` is a file's content.
    pub(crate) fn add(
        &mut self,
        raw: &[u8],
        kind: Kind,
        meta: &Meta,
        data: &mut dyn Read,
    ) -> Result<(), ImageError> {
        let shown = String::from_utf8_lossy(raw).into_owned();
        let Some(mut comps) = components(raw) else {
            return Err(self.refuse(&shown, "leaves the root"));
        };
        let Some(name) = comps.pop() else {
            // The root directory itself.
            if kind == Kind::Dir {
                self.dirs.insert(PathBuf::new(), meta.clone());
                return Ok(());
            }
            return Err(self.refuse(&shown, "would replace the root directory"));
        };

        if self.whiteouts && name.as_bytes().starts_with(b".wh.") {
            return self.whiteout(&comps, &name.as_bytes()[4..], &shown);
        }

        let parent = self
            .resolve_dir(&comps, true, &shown)?
            .expect("resolve_dir creates what is missing");
        let rel = parent.join(&name);
        self.touch(&rel);
        let path = self.root.join(&rel);
        let fail = |what: &str| self.fail(&shown, format!("cannot {what} {}", printable(&path)));

        match kind {
            Kind::Dir => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        fs::remove_file(&path).map_err(fail("replace"))?;
                        DirBuilder::new()
                            .mode(0o755)
                            .create(&path)
                            .map_err(fail("create"))?;
                    }
                    Err(_) => {
                        DirBuilder::new()
                            .mode(0o755)
                            .create(&path)
                            .map_err(fail("create"))?;
                    }
                }
                self.set_xattrs(&path, meta);
                self.dirs.insert(rel, meta.clone());
                return Ok(());
            }
            Kind::File => {
                remove_any(&path).map_err(fail("replace"))?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(fail("create"))?;
                io::copy(data, &mut file).map_err(fail("write"))?;
                if self.privileged {
                    std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))
                        .map_err(fail("chown"))?;
                }
                // After chown, which clears setuid and setgid.
                file.set_permissions(fs::Permissions::from_mode(meta.mode))
                    .map_err(fail("chmod"))?;
                self.set_xattrs(&path, meta);
                let time = FileTime::from_unix_time(meta.mtime, 0);
                filetime::set_file_handle_times(&file, Some(time), Some(time))
                    .map_err(fail("set times of"))?;
                return Ok(());
            }
            Kind::Symlink(ref target) => {
                remove_any(&path).map_err(fail("replace"))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                    .map_err(fail("create symlink"))?;
            }
            Kind::Hardlink(target) => {
                let target_shown = String::from_utf8_lossy(&target).into_owned();
                let refuse = |why: &str| {
                    self.refuse(&shown, format!("links to {target_shown:?}, which {why}"))
                };
                let tpath = match path::hardlink_target(self.root, &target)
                    .map_err(|e| self.path_error(&shown, e))?
                {
                    LinkTarget::Found(rel) => self.root.join(rel),
                    LinkTarget::LeavesRoot => return Err(refuse("leaves the root")),
                    LinkTarget::Missing => return Err(refuse("does not exist")),
                    LinkTarget::Directory => return Err(refuse("is a directory")),
                };
                if tpath != path {
                    remove_any(&path).map_err(fail("replace"))?;
                    // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
                    fs::hard_link(&tpath, &path).map_err(fail("create hard link"))?;
                }
                return Ok(());
            }
            Kind::Char(..) | Kind::Block(..) | Kind::Fifo => {
                let (kind_bits, dev) = match kind {
                    Kind::Char(major, minor) => (libc::S_IFCHR, libc::makedev(major, minor)),
                    Kind::Block(major, minor) => (libc::S_IFBLK, libc::makedev(major, minor)),
                    _ => (libc::S_IFIFO, 0),
                };
                if kind_bits != libc::S_IFIFO && !self.privileged {
                    log::warn!(
                        "{}: skipping device node {shown:?} (needs root)",
                        self.label
                    );
                    return Ok(());
                }
                remove_any(&path).map_err(fail("replace"))?;
                let cpath = CString::new(path.as_os_str().as_bytes())
                    .map_err(|_| self.refuse(&shown, "has a NUL byte"))?;
                // SAFETY: cpath is a valid NUL-terminated string that outlives the call.
                let rc = unsafe { libc::mknod(cpath.as_ptr(), kind_bits | 0o600, dev) };
                if rc != 0 {
                    return Err(fail("create node")(io::Error::last_os_error()));
                }
                if self.privileged {
                    std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                        .map_err(fail("chown"))?;
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode))
                    .map_err(fail("chmod"))?;
            }
        }
        // Symlinks and nodes: owner (symlinks), xattrs and times without following.
        if self.privileged && matches!(kind, Kind::Symlink(_)) {
            std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                .map_err(fail("chown"))?;
        }
        self.set_xattrs(&path, meta);
        let time = FileTime::from_unix_time(meta.mtime, 0);
        filetime::set_symlink_file_times(&path, time, time).map_err(fail("set times of"))?;
        Ok(())
    }

    /// `.wh.NAME` (`name` is `NAME`) or an opaque marker in the directory `comps`.
    fn whiteout(&mut self, comps: &[OsString], name: &[u8], shown: &str) -> Result<(), ImageError> {
        if name == b".." {
            return Err(self.refuse(shown, "whites out a parent directory"));
        }
        let Some(parent) = self.resolve_dir(comps, false, shown)? else {
            return Ok(()); // nothing below to hide
        };
        self.touch(&parent);
        if name == b".wh..opq" {
            self.opaque.push(parent);
        } else if name.starts_with(b".wh.") || name.is_empty() || name == b"." {
            // AUFS bookkeeping (.wh..wh.plnk, ...) or meaningless: ignore.
        } else {
            let rel = parent.join(OsStr::from_bytes(name));
            if !self.touched.contains(&rel) {
                let path = self.root.join(&rel);
                remove_any(&path)
                    .map_err(self.fail(shown, format!("cannot remove {}", printable(&path))))?;
            }
        }
        Ok(())
    }

    fn set_xattrs(&self, path: &Path, meta: &Meta) {
        if meta.xattrs.is_empty() {
            return;
        }
        let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
            return;
        };
        for (name, value) in &meta.xattrs {
            let Ok(cname) = CString::new(name.clone()) else {
                continue;
            };
            // SAFETY: both strings are NUL-terminated and live across the call; value
            // points to value.len() readable bytes.
            let rc = unsafe {
                libc::lsetxattr(
                    cpath.as_ptr(),
                    cname.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if rc != 0 {
                log::warn!(
                    "{}: cannot set xattr {} on {}: {}",
                    self.label,
                    printable(Path::new(OsStr::from_bytes(name))),
                    printable(path),
                    io::Error::last_os_error()
                );
            }
        }
    }

    /// Ends the layer: clears opaque directories and applies directory metadata.
    pub fn finish(mut self) -> Result<(), ImageError> {
        for dir in std::mem::take(&mut self.opaque) {
            self.clear_lower(&dir)?;
        }
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirs).into_iter().collect();
        // Deepest first: setting a child's times does not touch its parent's.
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, meta) in dirs {
            let path = self.root.join(&rel);
            let shown = printable(&rel);
            let fail =
                |what: &str| self.fail(&shown, format!("cannot {what} {}", printable(&path)));
            if !path::is_real_dir(self.root, &rel) {
                continue; // replaced or removed later in the layer
            }
            if self.privileged {
                std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                    .map_err(fail("chown"))?;
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode))
                .map_err(fail("chmod"))?;
            let time = FileTime::from_unix_time(meta.mtime, 0);
            filetime::set_symlink_file_times(&path, time, time).map_err(fail("set times of"))?;
        }
        Ok(())
    }

    /// Removes what lower layers left in the opaque directory `rel`.
    fn clear_lower(&self, rel: &Path) -> Result<(), ImageError> {
        if !path::is_real_dir(self.root, rel) {
            return Ok(()); // replaced later in the layer: what is there now is this layer's
        }
        let dir = self.root.join(rel);
        let shown = printable(rel);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(self
                    .fail(&shown, format!("cannot list {}", printable(&dir)))(
                    e
                ))
            }
        };
        for entry in entries {
            let entry =
                entry.map_err(self.fail(&shown, format!("cannot list {}", printable(&dir))))?;
            let child = rel.join(entry.file_name());
            if !self.touched.contains(&child) {
                let path = self.root.join(&child);
                remove_any(&path)
                    .map_err(self.fail(&shown, format!("cannot remove {}", printable(&path))))?;
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.clear_lower(&child)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
