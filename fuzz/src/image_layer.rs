//! `image_layer`: image layers (tar streams) from a hostile registry or archive, extracted
//! one after the other into a fresh root directory by `hearth::image::layer::LayerWriter`,
//! as `hearth image` and `hearth container run` do.
//!
//! Input format:
//!
//! ```text
//! u8      flags: bit 0  plain root filesystem (`.wh.` names are files, not whiteouts)
//!                bit 1  keep the checksums as given (otherwise the harness rewrites
//!                       every header's checksum, so that fuzzed headers reach the writer)
//! then up to 4 layers, each:
//! u16     n: the layer's length (the last layer takes what is left when n is larger)
//! n       a tar stream
//! ```
//!
//! Work space (per process, reused; tmpfs, so an execution stays cheap):
//!
//! ```text
//! /dev/shm/hearth-fuzz-layer-<pid>/root/     the root the layers are extracted into
//! /dev/shm/hearth-fuzz-layer-<pid>/canary/   a sibling: reached as ../canary
//! /dev/shm/hearth-fuzz-canary/               a fixed absolute path: reached as
//!                                            /dev/shm/hearth-fuzz-canary or ../../hearth-fuzz-canary
//! ```
//!
//! Checked (beyond "no panic"):
//! - nothing outside the root is created, changed, removed or followed: both canary trees
//!   keep every name, type, mode, owner, size, content, link target, link count, mtime and
//!   ctime (a chmod, chown, hard link or write through a followed symlink changes ctime or
//!   nlink), and the work directory holds only `root` and `canary`;
//! - the root is still a directory;
//! - with whiteouts on, nothing but a directory has a `.wh.` name (whiteouts are applied,
//!   not written; a `.wh.` directory can only be the parent an entry's name asked for);
//! - a refused layer's error is one line with no control characters (names from the image
//!   are escaped, so they cannot forge log or error lines), at most 1024 + 20 bytes per
//!   input byte.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hearth::image::layer::LayerWriter;

use crate::input::Input;

/// The fixed absolute canary, shared by every fuzzing process (never written after it is
/// made).
pub const SHARED_CANARY: &str = "/dev/shm/hearth-fuzz-canary";
/// Layers per input.
pub const MAX_LAYERS: usize = 4;
/// Flag bits.
pub const PLAIN: u8 = 1;
pub const RAW_CHECKSUMS: u8 = 2;

/// What one input did, for tests: per layer, `Ok` or the one-line error.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub layers: Vec<Result<(), String>>,
    /// Every path under the root after the last layer (relative, sorted), with a type
    /// letter: `d`, `f`, `l` (and its target), `o` (other).
    pub tree: Vec<String>,
}

struct Work {
    base: PathBuf,
    root: PathBuf,
    canary: PathBuf,
    canary_state: Vec<String>,
    shared_state: Vec<String>,
}

fn work() -> &'static Work {
    static WORK: OnceLock<Work> = OnceLock::new();
    WORK.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        remove_stale(&parent);
        let base = parent.join(format!("hearth-fuzz-layer-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("root")).expect("cannot create the fuzz root");
        let canary = base.join("canary");
        make_canary(&canary).expect("cannot create the canary");
        let shared = Path::new(SHARED_CANARY);
        if !shared.exists() {
            // Made under a private name and renamed, so concurrent fuzzers never see half
            // of it.
            let fresh = parent.join(format!("hearth-fuzz-canary.{}", std::process::id()));
            let _ = fs::remove_dir_all(&fresh);
            make_canary(&fresh).expect("cannot create the shared canary");
            if fs::rename(&fresh, shared).is_err() {
                let _ = fs::remove_dir_all(&fresh);
            }
        }
        Work {
            root: base.join("root"),
            canary_state: state(&canary),
            shared_state: state(shared),
            canary,
            base,
        }
    })
}

/// Removes the work directories of fuzzing processes that are gone (libFuzzer ends a
/// process without running destructors, so each leaves its directory behind).
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("hearth-fuzz-layer-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Makes `root` a fresh empty directory, whatever a previous input left there.
fn clear(root: &Path) {
    if fs::symlink_metadata(root).is_ok() && fs::remove_dir_all(root).is_err() {
        // Without CAP_DAC_OVERRIDE a directory the layer made read-only cannot be emptied:
        // open every directory up first.
        walk(root, Path::new(""), &mut |_, path, m| {
            if m.is_dir() {
                let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
            }
        });
        fs::remove_dir_all(root).expect("cannot clear the fuzz root");
    }
    fs::create_dir(root).expect("cannot create the fuzz root");
}

fn make_canary(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir.join("dir"))?;
    fs::write(dir.join("file"), b"canary\n")?;
    fs::write(dir.join("dir/inner"), b"inner\n")?;
    std::os::unix::fs::symlink("file", dir.join("link"))?;
    std::os::unix::fs::symlink("/", dir.join("to-root"))
}

/// Everything about a tree that a write, chmod, chown, link or removal through it would
/// change. Never follows symlinks and reads only regular files.
fn state(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut |rel, path, m| {
        let what = if m.file_type().is_symlink() {
            format!("-> {:?}", fs::read_link(path).ok())
        } else if m.is_file() {
            format!("{:?}", fs::read(path).ok())
        } else {
            String::new()
        };
        out.push(format!(
            "{} {:o} {}:{} size {} nlink {} mtime {}.{} ctime {}.{} {what}",
            rel.display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.nlink(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ));
    });
    out
}

fn walk(base: &Path, rel: &Path, f: &mut dyn FnMut(&Path, &Path, &fs::Metadata)) {
    let path = base.join(rel);
    let Ok(m) = fs::symlink_metadata(&path) else {
        return;
    };
    f(rel, &path, &m);
    if !m.is_dir() {
        return;
    }
    let Ok(entries) = fs::read_dir(&path) else {
        return;
    };
    let mut names: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    for name in names {
        walk(base, &rel.join(name), f);
    }
}

/// Rewrites the checksum of every header of a tar stream (following each header's size
/// field to the next), so that fuzzed fields are not all refused as corrupt.
pub fn fix_checksums(tar: &mut [u8]) {
    let mut offset = 0usize;
    while let Some(block) = tar.get_mut(offset..offset + 512) {
        offset += 512;
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let sum: u32 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| u32::from(if (148..156).contains(&i) { b' ' } else { b }))
            .sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let size = header_size(&block[124..136]);
        let Some(next) = size
            .checked_add(511)
            .map(|s| s / 512 * 512)
            .and_then(|s| usize::try_from(s).ok())
            .and_then(|s| offset.checked_add(s))
        else {
            return;
        };
        offset = next;
    }
}

/// A header's size field: octal, or base-256 when the top bit is set (as GNU tar).
fn header_size(field: &[u8]) -> u64 {
    if field[0] & 0x80 != 0 {
        return field[1..].iter().fold(0u64, |n, &b| {
            n.saturating_mul(256).saturating_add(u64::from(b))
        });
    }
    field
        .iter()
        .skip_while(|&&b| b == b' ' || b == 0)
        .take_while(|&&b| (b'0'..=b'7').contains(&b))
        .fold(0u64, |n, &b| {
            n.saturating_mul(8).saturating_add(u64::from(b - b'0'))
        })
}

pub fn run(data: &[u8]) -> Outcome {
    let work = work();
    let mut input = Input::new(data);
    let flags = input.u8();
    let whiteouts = flags & PLAIN == 0;
    let mut layers = Vec::new();
    while !input.is_empty() && layers.len() < MAX_LAYERS {
        let len = usize::from(input.u16());
        let mut tar = input.bytes(len).to_vec();
        if flags & RAW_CHECKSUMS == 0 {
            fix_checksums(&mut tar);
        }
        layers.push(tar);
    }

    clear(&work.root);

    let mut results = Vec::new();
    for (n, tar) in layers.iter().enumerate() {
        let mut writer = LayerWriter::new(&work.root, format!("layer {}", n + 1), whiteouts);
        // As `oci.rs` applies a layer: stop at the first refused one.
        match writer
            .apply_tar(&mut &tar[..])
            .and_then(|()| writer.finish())
        {
            Ok(()) => results.push(Ok(())),
            Err(e) => {
                let message = hearth::error_chain(&e);
                assert!(
                    !message.chars().any(char::is_control),
                    "an error is not one printable line: {message:?}"
                );
                // Names are quoted at most twice, an escaped byte takes at most 10.
                assert!(
                    message.len() <= 1024 + 20 * data.len(),
                    "an error of {} bytes from {} input bytes",
                    message.len(),
                    data.len()
                );
                results.push(Err(message));
                break;
            }
        }
    }

    assert_eq!(
        state(&work.canary),
        work.canary_state,
        "the sibling canary changed"
    );
    assert_eq!(
        state(Path::new(SHARED_CANARY)),
        work.shared_state,
        "the shared canary changed"
    );
    let mut beside: Vec<_> = fs::read_dir(&work.base)
        .expect("cannot list the work directory")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    beside.sort();
    assert_eq!(
        beside,
        ["canary", "root"],
        "something appeared beside the root"
    );
    let root_meta = fs::symlink_metadata(&work.root).expect("the root is gone");
    assert!(root_meta.is_dir(), "the root is no longer a directory");

    let mut tree = Vec::new();
    walk(&work.root, Path::new(""), &mut |rel, path, m| {
        if rel.as_os_str().is_empty() {
            return;
        }
        // A directory may be named `.wh.` (made as the parent of an entry, as containerd
        // does); an entry so named is a whiteout, never written.
        if whiteouts && !m.is_dir() {
            let name = rel.file_name().unwrap_or_default().as_encoded_bytes();
            assert!(
                !name.starts_with(b".wh."),
                "a whiteout was written as a file: {rel:?}"
            );
        }
        let kind = if m.file_type().is_symlink() {
            format!("l -> {}", fs::read_link(path).unwrap_or_default().display())
        } else if m.is_dir() {
            "d".into()
        } else if m.is_file() {
            "f".into()
        } else {
            "o".into()
        };
        tree.push(format!("{} {kind}", rel.display()));
    });
    Outcome {
        layers: results,
        tree,
    }
}

/// Builds tar streams entry by entry with raw (possibly hostile) names, for seeds and
/// tests.
#[derive(Default)]
pub struct Tar(Vec<u8>);

impl Tar {
    fn header(name: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
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
        self.0
            .extend(std::iter::repeat_n(0, (512 - data.len() % 512) % 512));
    }

    /// A GNU long-name (`L`) or long-link (`K`) record for the next entry.
    fn long(&mut self, kind: tar::EntryType, value: &[u8]) {
        let mut data = value.to_vec();
        data.push(0);
        let h = Self::header(b"././@LongLink", kind, data.len() as u64, 0o644);
        self.push(h, &data);
    }

    fn named(&mut self, name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        if name.len() > 100 {
            self.long(tar::EntryType::GNULongName, name.as_bytes());
        }
        Self::header(name.as_bytes(), kind, size, mode)
    }

    pub fn file(mut self, name: &str, data: &[u8]) -> Self {
        let h = self.named(name, tar::EntryType::Regular, data.len() as u64, 0o644);
        self.push(h, data);
        self
    }

    pub fn file_mode(mut self, name: &str, data: &[u8], mode: u32) -> Self {
        let h = self.named(name, tar::EntryType::Regular, data.len() as u64, mode);
        self.push(h, data);
        self
    }

    pub fn dir(mut self, name: &str, mode: u32) -> Self {
        let h = self.named(name, tar::EntryType::Directory, 0, mode);
        self.push(h, b"");
        self
    }

    /// A symlink or hard link (`kind`) to `target`.
    pub fn link(mut self, name: &str, kind: tar::EntryType, target: &str) -> Self {
        if target.len() > 100 {
            self.long(tar::EntryType::GNULongLink, target.as_bytes());
        }
        let mut h = self.named(name, kind, 0, 0o777);
        let n = target.len().min(100);
        h.as_old_mut().linkname[..n].copy_from_slice(&target.as_bytes()[..n]);
        self.push(h, b"");
        self
    }

    pub fn node(mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut h = self.named(name, kind, 0, 0o666);
        let _ = h.set_device_major(major);
        let _ = h.set_device_minor(minor);
        self.push(h, b"");
        self
    }

    /// A PAX extended header (`key=value` records) for the next entry.
    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = key.len() + value.len() + 3; // ' ', '=', '\n'
                                                    // The length counts its own digits.
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let h = Self::header(
            b"./PaxHeaders/x",
            tar::EntryType::XHeader,
            data.len() as u64,
            0o644,
        );
        self.push(h, &data);
        self
    }

    /// The stream, with the two zero blocks that end it.
    pub fn build(mut self) -> Vec<u8> {
        self.0.extend(std::iter::repeat_n(0, 1024));
        self.0
    }
}

/// An input: flags, then each layer with its length.
pub fn input(flags: u8, layers: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![flags];
    for layer in layers {
        let len = u16::try_from(layer.len()).expect("a seed layer over 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(layer);
    }
    out
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use tar::EntryType::{Block, Char, Fifo, Link, Symlink};
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(200));
    let lower = Tar::default()
        .dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .dir("d", 0o755)
        .file("d/old", b"1")
        .file("d/sub/old", b"2")
        .build();
    vec![
        (
            "files-and-dirs",
            input(
                0,
                &[Tar::default()
                    .dir("bin", 0o755)
                    .file_mode("bin/su", b"#!/bin/sh\n", 0o4755)
                    .link("bin/sh", Symlink, "busybox")
                    .dir("tmp", 0o1777)
                    .dir("ro", 0o555)
                    .file("ro/inside", b"x")
                    .node("fifo", Fifo, 0, 0)
                    .node("dev/null", Char, 1, 3)
                    .node("dev/sda", Block, 8, 0)
                    .build()],
            ),
        ),
        (
            "whiteouts",
            input(
                0,
                &[
                    lower.clone(),
                    Tar::default()
                        .file("etc/.wh.passwd", b"")
                        .file(".wh.missing", b"")
                        .file("nowhere/.wh.x", b"")
                        .build(),
                ],
            ),
        ),
        (
            "opaque",
            input(
                0,
                &[
                    lower.clone(),
                    Tar::default()
                        .file("d/new", b"n")
                        .file("d/.wh..wh..opq", b"")
                        .file("d/sub/new", b"n")
                        .build(),
                ],
            ),
        ),
        (
            "plain-keeps-wh",
            input(
                PLAIN,
                &[Tar::default()
                    .file("a", b"")
                    .file(".wh.a", b"")
                    .file("d/.wh..wh..opq", b"")
                    .build()],
            ),
        ),
        (
            "hardlinks",
            input(
                0,
                &[Tar::default()
                    .file("a", b"data")
                    .link("b", Link, "./a")
                    .link("esc", Symlink, "/")
                    .link("c", Link, "esc/a")
                    .link("d", Link, "../canary/file")
                    .build()],
            ),
        ),
        (
            "symlinks-out",
            input(
                0,
                &[
                    Tar::default()
                        .link("abs", Symlink, SHARED_CANARY)
                        .link("rel", Symlink, "../canary")
                        .link("up", Symlink, "../../../../..")
                        .link("shared", Symlink, "../../hearth-fuzz-canary")
                        .link("file-out", Symlink, "../canary/file")
                        .build(),
                    Tar::default()
                        .file("abs/file", b"in")
                        .file("rel/file", b"in")
                        .file("up/dev/shm/x", b"in")
                        .file("shared/dir/inner", b"in")
                        .file("file-out", b"replaced, not followed")
                        .link("abs/link2", Link, "rel/file")
                        .file("rel/.wh.file", b"")
                        .file("abs/dir/.wh..wh..opq", b"")
                        .node("rel/dir/fifo", Fifo, 0, 0)
                        .build(),
                ],
            ),
        ),
        (
            // Directories recorded for the end of the layer, then replaced by symlinks
            // out: their metadata and opaque clearing must not follow.
            "late-symlink",
            input(
                0,
                &[Tar::default()
                    .dir("a/dir", 0o700)
                    .dir("o", 0o755)
                    .file("o/.wh..wh..opq", b"")
                    .dir("p/dir", 0o700)
                    .link("a", Symlink, "../canary")
                    .link("o", Symlink, SHARED_CANARY)
                    .link("p", Symlink, "/dev/shm/hearth-fuzz-canary")
                    .build()],
            ),
        ),
        (
            "dot-dot",
            input(0, &[Tar::default().file("../canary/file", b"out").build()]),
        ),
        (
            "dot-dot-whiteout",
            input(0, &[Tar::default().file("a/.wh...", b"").build()]),
        ),
        (
            "absolute",
            input(
                0,
                &[Tar::default()
                    .file("/abs", b"1")
                    .file("./rel", b"2")
                    .file("/dev/shm/hearth-fuzz-canary/file", b"in")
                    .build()],
            ),
        ),
        (
            "long-names",
            input(
                0,
                &[Tar::default()
                    .file(&long, b"long")
                    .link("longlink", Symlink, &"../".repeat(40))
                    .link("hard", Link, &long)
                    .build()],
            ),
        ),
        (
            "pax",
            input(
                0,
                &[Tar::default()
                    .pax(&[
                        ("path", "pax/renamed path ü".as_bytes()),
                        ("uid", b"1000"),
                        ("mtime", b"1234567890.5"),
                        ("SCHILY.xattr.user.test", b"value"),
                    ])
                    .file("short", b"pax")
                    .pax(&[("linkpath", b"../canary/file")])
                    .link("pax-link", Link, "x")
                    .build()],
            ),
        ),
        (
            "newline-names",
            input(
                0,
                &[Tar::default()
                    .file("a\nb", b"")
                    .file("a\nb/c\r\x1b[2J", b"")
                    .build()],
            ),
        ),
        (
            "symlink-loop",
            input(
                0,
                &[Tar::default()
                    .link("loop", Symlink, "loop")
                    .file("loop/f", b"")
                    .build()],
            ),
        ),
        (
            "replace-types",
            input(
                0,
                &[
                    Tar::default().file("x/y", b"1").file("f", b"2").build(),
                    Tar::default()
                        .file("x", b"file")
                        .dir("f", 0o700)
                        .file("f/z", b"3")
                        .dir(".", 0o700)
                        .file("x/under-file", b"")
                        .build(),
                ],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The work directory is per process: one test at a time.
    static LOCK: Mutex<()> = Mutex::new(());

    fn seed(name: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b)
            .unwrap()
    }

    fn has(outcome: &Outcome, line: &str) -> bool {
        outcome.tree.iter().any(|l| l == line)
    }

    #[test]
    fn seeds_reach_their_paths() {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let o = run(&seed("files-and-dirs"));
        assert_eq!(o.layers, [Ok(())]);
        assert!(has(&o, "bin/sh l -> busybox") && has(&o, "ro/inside f"));

        let o = run(&seed("whiteouts"));
        assert_eq!(o.layers, [Ok(()), Ok(())]);
        assert!(!has(&o, "etc/passwd f") && has(&o, "etc/hosts f"));

        let o = run(&seed("opaque"));
        assert_eq!(o.layers, [Ok(()), Ok(())]);
        assert!(has(&o, "d/new f") && has(&o, "d/sub/new f"));
        assert!(!has(&o, "d/old f") && !has(&o, "d/sub/old f"));

        let o = run(&seed("plain-keeps-wh"));
        assert_eq!(o.layers, [Ok(())]);
        assert!(has(&o, ".wh.a f") && has(&o, "d/.wh..wh..opq f"));

        // A hard link out of the root is refused, after those inside were made.
        let o = run(&seed("hardlinks"));
        assert!(o.layers[0]
            .as_ref()
            .unwrap_err()
            .contains("leaves the root"));
        assert!(has(&o, "b f") && has(&o, "c f"));

        let o = run(&seed("symlinks-out"));
        assert_eq!(o.layers, [Ok(()), Ok(())]);
        assert!(has(&o, "canary/file f") && has(&o, "dev/shm/x f"));
        assert!(has(&o, "dev/shm/hearth-fuzz-canary/file f"));
        assert!(has(&o, "file-out f"));

        let o = run(&seed("late-symlink"));
        assert_eq!(o.layers, [Ok(())]);
        assert!(has(&o, "a l -> ../canary") && has(&o, &format!("o l -> {SHARED_CANARY}")));

        for name in ["dot-dot", "dot-dot-whiteout", "symlink-loop"] {
            let o = run(&seed(name));
            assert!(o.layers[0].is_err(), "{name}: {o:?}");
        }

        let o = run(&seed("absolute"));
        assert_eq!(o.layers, [Ok(())]);
        assert!(has(&o, "dev/shm/hearth-fuzz-canary/file f"));

        let o = run(&seed("long-names"));
        assert_eq!(o.layers, [Ok(())]);
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(200));
        assert!(has(&o, &format!("{long} f")) && has(&o, "hard f"));

        // The PAX path names the file (the tar reader refuses PAX values with a newline,
        // so newline-names has those); the PAX link target is refused.
        let o = run(&seed("pax"));
        assert!(has(&o, "pax/renamed path ü f"), "{o:?}");
        assert!(o.layers[0]
            .as_ref()
            .unwrap_err()
            .contains("leaves the root"));

        // Names from the image never break an error into lines.
        let o = run(&seed("newline-names"));
        assert_eq!(
            o.layers,
            [Err(
                "layer 1: entry \"a\\nb/c\\r\\u{1b}[2J\" goes through a\\nb, \
                  which is not a directory"
                    .to_string()
            )]
        );

        let o = run(&seed("replace-types"));
        assert!(o.layers[1]
            .as_ref()
            .unwrap_err()
            .contains("not a directory"));
        assert!(has(&o, "x f") && has(&o, "f/z f"));
    }

    #[test]
    fn checksums_are_fixed_across_entries() {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut tar = Tar::default().file("a", b"abc").file("b", b"").build();
        tar[0] = b'z'; // the first name: its checksum is now wrong
        tar[512 * 2] = b'y'; // the second header (after one data block)
        fix_checksums(&mut tar);
        let o = run(&input(0, &[tar]));
        assert_eq!(o.layers, [Ok(())]);
        assert_eq!(o.tree, ["y f", "z f"]);
    }

    #[test]
    fn committed_crashes_replay() {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/image_layer");
        let read = |name: &str| fs::read(dir.join(name)).unwrap();
        // The tar reader's error quoted raw header bytes.
        let o = run(&read("crash-tar-error-with-control-characters"));
        assert!(o.layers.last().unwrap().is_err(), "{o:?}");
        // A `.wh.` directory made as an entry's parent is not a whiteout written.
        let o = run(&read("crash-wh-parent-directory"));
        assert!(
            o.tree
                .iter()
                .any(|l| l.starts_with(".wh.d") && l.ends_with(" d")),
            "{o:?}"
        );
    }

    #[test]
    fn every_byte_string_is_an_input() {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for data in [&b""[..], b"\x03", b"\x00\xff\xff", &[0u8; 600]] {
            run(data);
        }
    }
}
