//! Applying a layer (a tar stream) to a root filesystem directory, safely.
//!
//! The image is hostile. Every entry name is split into components; a `..` component is
//! refused, a leading `/` or `./` ignored. The parent directories of an entry are resolved
//! component by component inside the root the way a chroot would: symlinks are followed by
//! hand (an absolute target restarts at the root, `..` stops at the root), so the result is
//! always a chain of real directories under the root. The last component is never
//! followed: whatever is there (a symlink included) is replaced. Hardlink targets are
//! resolved the same way and must exist inside the root.
//!
//! Whiteouts: `.wh.NAME` removes `NAME` as lower layers left it; `.wh..wh..opq` in a
//! directory removes everything lower layers put in it. Entries of one tar come in any
//! order, so the layer remembers what it wrote (and every ancestor of it) and the opaque
//! directories are cleared when the layer ends, keeping exactly what this layer wrote.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;

use super::{remove_any, ImageError};

/// Symlinks followed while resolving one name, as Linux's limit.
const MAX_SYMLINKS: u32 = 40;

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

/// The components of an entry name; `None` if one is `..`. Empty and `.` components are
/// dropped, so `./a//b/` and `/a/b` are both `[a, b]`.
fn components(raw: &[u8]) -> Option<Vec<OsString>> {
    let mut out = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return None,
            p => out.push(OsStr::from_bytes(p).to_os_string()),
        }
    }
    Some(out)
}

/// Writes the entries of one layer into a root filesystem directory.
pub(crate) struct LayerWriter<'a> {
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
    pub(crate) fn new(root: &'a Path, label: String, whiteouts: bool) -> Self {
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

    /// Resolves the directory `comps` inside the root (see the module documentation).
    /// Missing directories are created when `create`; otherwise a missing one gives `None`.
    fn resolve_dir(
        &self,
        comps: &[OsString],
        create: bool,
        entry: &str,
    ) -> Result<Option<PathBuf>, ImageError> {
        let mut pending: Vec<OsString> = comps.iter().rev().cloned().collect();
        let mut current = PathBuf::new();
        let mut links = 0;
        while let Some(comp) = pending.pop() {
            match comp.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    current.pop(); // stops at the root
                    continue;
                }
                _ => {}
            }
            let candidate = current.join(&comp);
            let path = self.root.join(&candidate);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(self.refuse(entry, "has too many levels of symbolic links"));
                    }
                    let target = fs::read_link(&path).map_err(
                        self.fail(entry, format!("cannot read link {}", path.display())),
                    )?;
                    let target = target.as_os_str().as_bytes();
                    if target.starts_with(b"/") {
                        current = PathBuf::new();
                    }
                    for part in target.split(|&b| b == b'/').rev() {
                        pending.push(OsStr::from_bytes(part).to_os_string());
                    }
                }
                Ok(m) if m.is_dir() => current = candidate,
                Ok(_) => {
                    return Err(self.refuse(
                        entry,
                        format!(
                            "goes through {}, which is not a directory",
                            candidate.display()
                        ),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .map_err(self.fail(entry, format!("cannot create {}", path.display())))?;
                    current = candidate;
                }
                Err(e) => {
                    return Err(self.fail(entry, format!("cannot stat {}", path.display()))(
                        e,
                    ))
                }
            }
        }
        Ok(Some(current))
    }

    /// Applies every entry of a tar stream.
    pub(crate) fn apply_tar(&mut self, reader: &mut dyn Read) -> Result<(), ImageError> {
        let read_err = |label: &str| {
            let what = format!("{label}: cannot read the tar stream");
            move |source| ImageError::Io { what, source }
        };
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(read_err(&self.label))?;
        for entry in entries {
            let mut entry = entry.map_err(read_err(&self.label))?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let bad_header = |e| self.fail(&shown, "malformed tar header")(e);
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
        let fail = |what: &str| self.fail(&shown, format!("cannot {what} {}", path.display()));

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
                let Some(mut tcomps) = components(&target) else {
                    return Err(self.refuse(
                        &shown,
                        format!("links to {target_shown:?}, which leaves the root"),
                    ));
                };
                let missing = || {
                    self.refuse(
                        &shown,
                        format!("links to {target_shown:?}, which does not exist"),
                    )
                };
                let tname = tcomps.pop().ok_or_else(missing)?;
                let tparent = self
                    .resolve_dir(&tcomps, false, &shown)?
                    .ok_or_else(missing)?;
                let tpath = self.root.join(tparent.join(tname));
                match fs::symlink_metadata(&tpath) {
                    Ok(m) if m.is_dir() => {
                        return Err(self.refuse(
                            &shown,
                            format!("links to {target_shown:?}, which is a directory"),
                        ))
                    }
                    Ok(_) => {}
                    Err(_) => return Err(missing()),
                }
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
                    .map_err(self.fail(shown, format!("cannot remove {}", path.display())))?;
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
                    String::from_utf8_lossy(name),
                    path.display(),
                    io::Error::last_os_error()
                );
            }
        }
    }

    /// Ends the layer: clears opaque directories and applies directory metadata.
    pub(crate) fn finish(mut self) -> Result<(), ImageError> {
        for dir in std::mem::take(&mut self.opaque) {
            self.clear_lower(&dir)?;
        }
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirs).into_iter().collect();
        // Deepest first: setting a child's times does not touch its parent's.
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, meta) in dirs {
            let path = self.root.join(&rel);
            let shown = rel.display().to_string();
            let fail = |what: &str| self.fail(&shown, format!("cannot {what} {}", path.display()));
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => continue, // replaced or removed later in the layer
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
        let dir = self.root.join(rel);
        let shown = rel.display().to_string();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(self.fail(&shown, format!("cannot list {}", dir.display()))(
                    e,
                ))
            }
        };
        for entry in entries {
            let entry =
                entry.map_err(self.fail(&shown, format!("cannot list {}", dir.display())))?;
            let child = rel.join(entry.file_name());
            if !self.touched.contains(&child) {
                let path = self.root.join(&child);
                remove_any(&path)
                    .map_err(self.fail(&shown, format!("cannot remove {}", path.display())))?;
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.clear_lower(&child)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty directory under the system temp dir.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hearth-image-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = remove_any(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tar built entry by entry with raw (possibly malicious) names.
    #[derive(Default)]
    pub(crate) struct RawTar(Vec<u8>);

    impl RawTar {
        fn header(name: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            h
        }

        fn push(&mut self, mut h: tar::Header, data: &[u8]) {
            h.set_cksum();
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.0.extend(std::iter::repeat_n(0, pad));
        }

        pub(crate) fn file(mut self, name: &str, data: &[u8]) -> Self {
            let h = Self::header(
                name.as_bytes(),
                tar::EntryType::Regular,
                data.len() as u64,
                0o644,
            );
            self.push(h, data);
            self
        }

        pub(crate) fn file_owned(mut self, name: &str, data: &[u8], mode: u32, uid: u64) -> Self {
            let mut h = Self::header(
                name.as_bytes(),
                tar::EntryType::Regular,
                data.len() as u64,
                mode,
            );
            h.set_uid(uid);
            h.set_gid(uid);
            self.push(h, data);
            self
        }

        pub(crate) fn dir(mut self, name: &str) -> Self {
            let h = Self::header(name.as_bytes(), tar::EntryType::Directory, 0, 0o755);
            self.push(h, b"");
            self
        }

        pub(crate) fn link(mut self, name: &str, kind: tar::EntryType, target: &str) -> Self {
            let mut h = Self::header(name.as_bytes(), kind, 0, 0o777);
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            self.push(h, b"");
            self
        }

        pub(crate) fn node(
            mut self,
            name: &str,
            kind: tar::EntryType,
            major: u32,
            minor: u32,
        ) -> Self {
            let mut h = Self::header(name.as_bytes(), kind, 0, 0o666);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            self.push(h, b"");
            self
        }

        pub(crate) fn build(mut self) -> Vec<u8> {
            self.0.extend(std::iter::repeat_n(0, 1024));
            self.0
        }
    }

    fn apply(root: &Path, n: usize, tar: Vec<u8>) -> Result<(), ImageError> {
        let mut writer = LayerWriter::new(root, format!("layer {n}"), true);
        writer.apply_tar(&mut &tar[..])?;
        writer.finish()
    }

    #[test]
    fn whiteout_deletes_lower_file() {
        let root = temp_dir("wh");
        apply(
            &root,
            1,
            RawTar::default()
                .file("etc/a", b"a")
                .file("etc/b", b"b")
                .build(),
        )
        .unwrap();
        apply(&root, 2, RawTar::default().file("etc/.wh.a", b"").build()).unwrap();
        assert!(!root.join("etc/a").exists());
        assert!(!root.join("etc/.wh.a").exists());
        assert_eq!(fs::read(root.join("etc/b")).unwrap(), b"b");
        // A whiteout of a directory removes the tree; of a missing name does nothing.
        apply(
            &root,
            3,
            RawTar::default()
                .file(".wh.etc", b"")
                .file("x/.wh.y", b"")
                .build(),
        )
        .unwrap();
        assert!(!root.join("etc").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn opaque_directory_keeps_only_this_layer() {
        let root = temp_dir("opq");
        let lower = RawTar::default()
            .file("d/old", b"1")
            .file("d/sub/old", b"2")
            .file("d/keep-name", b"lower")
            .file("other", b"3");
        apply(&root, 1, lower.build()).unwrap();
        // Marker in the middle of the layer's entries: order must not matter.
        let upper = RawTar::default()
            .file("d/new1", b"n1")
            .file("d/.wh..wh..opq", b"")
            .file("d/sub/new2", b"n2")
            .file("d/keep-name", b"upper");
        apply(&root, 2, upper.build()).unwrap();
        let mut names: Vec<_> = fs::read_dir(root.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["keep-name", "new1", "sub"]);
        assert_eq!(fs::read(root.join("d/keep-name")).unwrap(), b"upper");
        assert!(!root.join("d/sub/old").exists());
        assert!(root.join("d/sub/new2").exists());
        assert!(root.join("other").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn dot_dot_entries_are_refused() {
        let root = temp_dir("dotdot");
        let err = apply(
            &root,
            2,
            RawTar::default().file("../etc/passwd", b"x").build(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer 2: entry \"../etc/passwd\" leaves the root"
        );
        let err = apply(&root, 1, RawTar::default().file("a/../../b", b"x").build()).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        let err = apply(&root, 1, RawTar::default().file("a/.wh...", b"").build()).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn leading_slash_and_dot_are_stripped() {
        let root = temp_dir("strip");
        apply(
            &root,
            1,
            RawTar::default()
                .file("/abs", b"1")
                .file("./rel", b"2")
                .build(),
        )
        .unwrap();
        assert!(root.join("abs").is_file() && root.join("rel").is_file());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn symlinks_never_lead_outside() {
        let root = temp_dir("escape-root");
        let outside = temp_dir("escape-outside");
        let abs = outside.to_str().unwrap().to_string();
        let layer1 = RawTar::default()
            .link("link", tar::EntryType::Symlink, &abs)
            .link("up", tar::EntryType::Symlink, "../../../../..")
            .dir("d")
            .link("d/loop", tar::EntryType::Symlink, "loop");
        apply(&root, 1, layer1.build()).unwrap();
        let layer2 = RawTar::default()
            .file("link/x", b"in")
            .file("up/y", b"in")
            .file("up/tmp/z", b"in");
        apply(&root, 2, layer2.build()).unwrap();
        // Nothing outside; the writes landed under the root.
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert_eq!(
            fs::read(root.join(abs.trim_start_matches('/')).join("x")).unwrap(),
            b"in"
        );
        assert_eq!(fs::read(root.join("y")).unwrap(), b"in");
        assert_eq!(fs::read(root.join("tmp/z")).unwrap(), b"in");
        // The symlinks themselves are untouched, targets verbatim.
        assert_eq!(fs::read_link(root.join("link")).unwrap(), outside);
        assert_eq!(
            fs::read_link(root.join("up")).unwrap(),
            Path::new("../../../../..")
        );
        // A final component that is a symlink is replaced, not followed.
        apply(
            &root,
            3,
            RawTar::default().file("link", b"file now").build(),
        )
        .unwrap();
        assert!(fs::symlink_metadata(root.join("link")).unwrap().is_file());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // A symlink loop is refused.
        let err = apply(&root, 4, RawTar::default().file("d/loop/f", b"").build()).unwrap_err();
        assert!(err.to_string().contains("too many levels"), "{err}");
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn hardlinks_stay_inside() {
        let root = temp_dir("hardlink");
        let layer = RawTar::default()
            .file("a", b"data")
            .link("b", tar::EntryType::Link, "./a")
            .link("esc", tar::EntryType::Symlink, "/");
        apply(&root, 1, layer.build()).unwrap();
        let (a, b) = (root.join("a"), root.join("b"));
        assert_eq!(
            fs::metadata(&a).unwrap().ino(),
            fs::metadata(&b).unwrap().ino()
        );
        let err = apply(
            &root,
            2,
            RawTar::default()
                .link("c", tar::EntryType::Link, "../etc/passwd")
                .build(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("leaves the root"), "{err}");
        let err = apply(
            &root,
            2,
            RawTar::default()
                .link("c", tar::EntryType::Link, "nope")
                .build(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        // Through a symlinked directory: resolved inside the root (esc -> / is the root).
        apply(
            &root,
            3,
            RawTar::default()
                .link("d", tar::EntryType::Link, "esc/a")
                .build(),
        )
        .unwrap();
        assert_eq!(
            fs::metadata(root.join("d")).unwrap().ino(),
            fs::metadata(&a).unwrap().ino()
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn metadata_is_preserved() {
        let root = temp_dir("meta");
        let layer = RawTar::default()
            .dir("bin")
            .file_owned("bin/su", b"#!", 0o4755, 1000)
            .link("bin/sh", tar::EntryType::Symlink, "busybox")
            .file_owned("tmp-file", b"", 0o1777, 0)
            .node("fifo", tar::EntryType::Fifo, 0, 0);
        apply(&root, 1, layer.build()).unwrap();
        let su = fs::metadata(root.join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755);
        assert_eq!(su.mtime(), 1_600_000_000);
        if privileged() {
            assert_eq!((su.uid(), su.gid()), (1000, 1000));
        }
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(
            fs::metadata(root.join("bin")).unwrap().mtime(),
            1_600_000_000
        );
        assert_eq!(
            fs::metadata(root.join("tmp-file")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert!(fs::symlink_metadata(root.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo_like());
        fs::remove_dir_all(&root).unwrap();
    }

    trait FifoLike {
        fn is_fifo_like(&self) -> bool;
    }
    impl FifoLike for fs::FileType {
        fn is_fifo_like(&self) -> bool {
            std::os::unix::fs::FileTypeExt::is_fifo(self)
        }
    }

    #[test]
    fn device_nodes_as_root() {
        if !privileged() {
            return;
        }
        let root = temp_dir("dev");
        apply(
            &root,
            1,
            RawTar::default()
                .node("dev/null", tar::EntryType::Char, 1, 3)
                .build(),
        )
        .unwrap();
        let m = fs::symlink_metadata(root.join("dev/null")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &m.file_type()
        ));
        assert_eq!(m.rdev(), libc::makedev(1, 3));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn types_replace_each_other() {
        let root = temp_dir("replace");
        apply(
            &root,
            1,
            RawTar::default().file("x/y", b"1").file("f", b"2").build(),
        )
        .unwrap();
        apply(
            &root,
            2,
            RawTar::default()
                .file("x", b"file")
                .dir("f")
                .file("f/z", b"3")
                .build(),
        )
        .unwrap();
        assert!(root.join("x").is_file());
        assert!(root.join("f/z").is_file());
        let err = apply(
            &root,
            3,
            RawTar::default().file("x/under-file", b"").build(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn plain_mode_keeps_wh_files() {
        let root = temp_dir("plain");
        let tar = RawTar::default().file("a", b"").file(".wh.a", b"").build();
        let mut writer = LayerWriter::new(&root, "rootfs".into(), false);
        writer.apply_tar(&mut &tar[..]).unwrap();
        writer.finish().unwrap();
        assert!(root.join("a").exists() && root.join(".wh.a").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
