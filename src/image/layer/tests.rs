//! Tests of layer extraction: whiteouts, opaque directories, escapes, links, metadata.

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

    pub(crate) fn node(mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
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

#[test]
fn hostile_names_stay_on_one_line() {
    // Regression (found writing the `image_layer` fuzz target's one-line check): paths in
    // messages were shown raw, so a name with a newline split the error in two.
    let root = temp_dir("newline");
    let layer = RawTar::default()
        .file("a\nb", b"")
        .file("a\nb/c\u{1b}[2J", b"")
        .build();
    let err = apply(&root, 1, layer).unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer 1: entry \"a\\nb/c\\u{1b}[2J\" goes through a\\nb, which is not a directory"
    );
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn later_symlinks_do_not_redirect_deferred_work() {
    // Regression (found writing the `image_layer` fuzz target's canary checks): directory
    // metadata and opaque-directory clearing happen when the layer ends, by the paths
    // recorded earlier. An entry replacing one of those directories (or a directory
    // above it) by a symlink sent them out of the root: a chmod/chown/utime of, and a
    // removal inside, whatever the symlink named on the host.
    let root = temp_dir("late-link");
    let outside = temp_dir("late-link-outside");
    fs::create_dir(outside.join("sub")).unwrap();
    fs::write(outside.join("keep"), b"k").unwrap();
    let abs = outside.to_str().unwrap().to_string();
    let sub_before = fs::metadata(outside.join("sub")).unwrap();
    let layer = RawTar::default()
        .dir("a/sub")
        .dir("o")
        .file("o/.wh..wh..opq", b"")
        .link("a", tar::EntryType::Symlink, &abs)
        .link("o", tar::EntryType::Symlink, &abs);
    apply(&root, 1, layer.build()).unwrap();
    assert_eq!(fs::read(outside.join("keep")).unwrap(), b"k");
    let sub_after = fs::metadata(outside.join("sub")).unwrap();
    assert_eq!(sub_after.mtime(), sub_before.mtime());
    assert_eq!(sub_after.ctime(), sub_before.ctime());
    assert_eq!(fs::read_link(root.join("a")).unwrap(), outside);
    fs::remove_dir_all(&root).unwrap();
    fs::remove_dir_all(&outside).unwrap();
}

#[test]
fn tar_reader_errors_stay_on_one_line() {
    // Regression (found by the `image_layer` fuzz target, seed
    // crash-tar-error-with-control-characters): the tar reader's errors quote the raw
    // header name, so a name with control characters broke the message.
    let root = temp_dir("tar-error");
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..4].copy_from_slice(b"a\x18\nb");
    h.as_old_mut().size = [0x18; 12];
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend(std::iter::repeat_n(0, 1024));
    let err = apply(&root, 1, tar).unwrap_err();
    let text = crate::error_chain(&err);
    assert!(!text.chars().any(char::is_control), "{text:?}");
    assert!(text.contains("a\\u{18}\\nb"), "{text}");
    fs::remove_dir_all(&root).unwrap();
}
