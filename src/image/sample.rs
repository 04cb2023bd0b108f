//! A small sample image built from the host's static busybox (Debian's `busybox-static`),
//! for tests and benchmarks: as an OCI image layout, an OCI archive or a legacy
//! `docker save` tarball, optionally with extra layers (including malicious ones).
//!
//! The base layer holds `/bin/busybox` and applet symlinks in `/bin`, `/etc/passwd` (root,
//! `app` 1000 and `nobody` 65534), `/etc/group`, and the usual empty directories. The
//! config sets `PATH` and `Cmd ["sh"]`. Everything is deterministic (fixed times, no
//! randomness), so the same host busybox always gives the same digests.

use std::fs;
use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::json;

use super::store::sha256_hex;
use super::{io_err, ImageError, DEFAULT_PATH};

/// Where the busybox binary comes from.
pub const BUSYBOX: &str = "/bin/busybox";

/// Modification time of every sample entry.
const MTIME: u64 = 1_700_000_000;

/// The applets linked in `/bin`.
pub const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "echo",
    "cat",
    "ls",
    "id",
    "pwd",
    "env",
    "sleep",
    "ps",
    "true",
    "false",
    "test",
    "[",
    "mkdir",
    "rmdir",
    "rm",
    "touch",
    "uname",
    "hostname",
    "wc",
    "head",
    "tail",
    "grep",
    "mount",
    "umount",
    "cp",
    "mv",
    "ln",
    "chmod",
    "chown",
    "df",
    "du",
    "stat",
    "whoami",
    "printf",
    "seq",
    "date",
    "dd",
    "kill",
    "find",
    "sed",
    "awk",
    "tr",
    "cut",
    "sort",
    "uniq",
    "xargs",
    "readlink",
    "cmp",
    "expr",
    "basename",
    "dirname",
    "nproc",
    "free",
    "uptime",
    "which",
    "tee",
    "yes",
    "timeout",
    "mknod",
    "mkfifo",
    "sha256sum",
    "md5sum",
    "tar",
    "gzip",
    "zcat",
    "vi",
    "nc",
    "ip",
    "ifconfig",
    "ping",
    "wget",
    "dmesg",
    "sync",
    "sysctl",
    "pidof",
    "killall",
    "setsid",
    "su",
    "nsenter",
    "unshare",
    "hexdump",
    "sha1sum",
    "less",
    "more",
    "top",
    "mktemp",
    "realpath",
    "truncate",
    "fallocate",
    "ionice",
    "taskset",
];

/// The image's `/etc/passwd`.
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
app:x:1000:1000:app:/home/app:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";

/// The image's `/etc/group`.
pub const GROUP: &str = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n";

/// One entry of a [`SampleLayer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleEntry {
    File {
        path: String,
        content: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Dir {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A hard link to `target` (a name relative to the root).
    Hardlink {
        path: String,
        target: String,
    },
    /// `.wh.NAME` next to `path`: deletes `path` from lower layers.
    Whiteout(String),
    /// `DIR/.wh..wh..opq`: hides what lower layers put in `DIR`.
    Opaque(String),
    /// A regular file whose tar name is written verbatim, unchecked (`../evil`); at most
    /// 100 bytes.
    Raw {
        name: Vec<u8>,
        content: Vec<u8>,
    },
    /// A symlink whose tar name and target are written verbatim.
    RawSymlink {
        name: Vec<u8>,
        target: Vec<u8>,
    },
}

/// A layer to add on top of the sample image, built entry by entry.
///
/// ```
/// use hearth::image::sample::SampleLayer;
/// let layer = SampleLayer::new()
///     .file("etc/motd", "hello\n")
///     .whiteout("bin/ping")
///     .raw_file("../evil", "x");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleLayer {
    pub entries: Vec<SampleEntry>,
}

impl SampleLayer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A root-owned file, mode 0644.
    pub fn file(self, path: &str, content: impl AsRef<[u8]>) -> Self {
        self.file_with(path, content, 0o644, 0, 0)
    }

    pub fn file_with(
        mut self,
        path: &str,
        content: impl AsRef<[u8]>,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Self {
        self.entries.push(SampleEntry::File {
            path: path.to_string(),
            content: content.as_ref().to_vec(),
            mode,
            uid,
            gid,
        });
        self
    }

    /// A root-owned directory, mode 0755.
    pub fn dir(mut self, path: &str) -> Self {
        self.entries.push(SampleEntry::Dir {
            path: path.to_string(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        });
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push(SampleEntry::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        });
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push(SampleEntry::Hardlink {
            path: path.to_string(),
            target: target.to_string(),
        });
        self
    }

    /// Deletes `path` of lower layers.
    pub fn whiteout(mut self, path: &str) -> Self {
        self.entries.push(SampleEntry::Whiteout(path.to_string()));
        self
    }

    /// Makes `dir` opaque: only what this layer puts in it remains.
    pub fn opaque(mut self, dir: &str) -> Self {
        self.entries.push(SampleEntry::Opaque(dir.to_string()));
        self
    }

    /// A file with a raw, unchecked tar name such as `../evil`.
    pub fn raw_file(mut self, name: impl AsRef<[u8]>, content: impl AsRef<[u8]>) -> Self {
        self.entries.push(SampleEntry::Raw {
            name: name.as_ref().to_vec(),
            content: content.as_ref().to_vec(),
        });
        self
    }

    /// A symlink with a raw, unchecked tar name and target.
    pub fn raw_symlink(mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        self.entries.push(SampleEntry::RawSymlink {
            name: name.as_ref().to_vec(),
            target: target.as_ref().to_vec(),
        });
        self
    }

    /// The layer as an uncompressed tar.
    pub fn to_tar(&self) -> Result<Vec<u8>, ImageError> {
        let mut tar = TarWriter::default();
        for entry in &self.entries {
            match entry {
                SampleEntry::File {
                    path,
                    content,
                    mode,
                    uid,
                    gid,
                } => tar.add(
                    path.as_bytes(),
                    tar::EntryType::Regular,
                    content,
                    (*mode, *uid, *gid),
                    None,
                )?,
                SampleEntry::Dir {
                    path,
                    mode,
                    uid,
                    gid,
                } => tar.add(
                    path.as_bytes(),
                    tar::EntryType::Directory,
                    b"",
                    (*mode, *uid, *gid),
                    None,
                )?,
                SampleEntry::Symlink { path, target } => tar.add(
                    path.as_bytes(),
                    tar::EntryType::Symlink,
                    b"",
                    (0o777, 0, 0),
                    Some(target.as_bytes()),
                )?,
                SampleEntry::Hardlink { path, target } => tar.add(
                    path.as_bytes(),
                    tar::EntryType::Link,
                    b"",
                    (0o644, 0, 0),
                    Some(target.as_bytes()),
                )?,
                SampleEntry::Whiteout(path) => {
                    let (dir, name) = split(path);
                    tar.add(
                        format!("{dir}.wh.{name}").as_bytes(),
                        tar::EntryType::Regular,
                        b"",
                        (0o644, 0, 0),
                        None,
                    )?
                }
                SampleEntry::Opaque(dir) => {
                    let dir = dir.trim_end_matches('/');
                    let name = if dir.is_empty() {
                        ".wh..wh..opq".to_string()
                    } else {
                        format!("{dir}/.wh..wh..opq")
                    };
                    tar.add(
                        name.as_bytes(),
                        tar::EntryType::Regular,
                        b"",
                        (0o644, 0, 0),
                        None,
                    )?
                }
                SampleEntry::Raw { name, content } => {
                    tar.add(name, tar::EntryType::Regular, content, (0o644, 0, 0), None)?
                }
                SampleEntry::RawSymlink { name, target } => tar.add(
                    name,
                    tar::EntryType::Symlink,
                    b"",
                    (0o777, 0, 0),
                    Some(target),
                )?,
            }
        }
        tar.finish()
    }

    /// The base layer of the sample image: busybox, its applets, users and directories.
    pub fn busybox_base() -> Result<Self, ImageError> {
        let busybox = fs::read(BUSYBOX).map_err(|e| {
            ImageError::Sample(format!(
                "cannot read {BUSYBOX} ({e}); install busybox-static"
            ))
        })?;
        check_static(&busybox)?;
        let mut layer = SampleLayer::new();
        for (dir, mode) in [
            ("bin", 0o755),
            ("dev", 0o755),
            ("etc", 0o755),
            ("home", 0o755),
            ("proc", 0o555),
            ("root", 0o700),
            ("run", 0o755),
            ("sbin", 0o755),
            ("sys", 0o555),
            ("tmp", 0o1777),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("usr/sbin", 0o755),
            ("var", 0o755),
            ("var/tmp", 0o1777),
        ] {
            layer.entries.push(SampleEntry::Dir {
                path: dir.to_string(),
                mode,
                uid: 0,
                gid: 0,
            });
        }
        layer.entries.push(SampleEntry::Dir {
            path: "home/app".into(),
            mode: 0o755,
            uid: 1000,
            gid: 1000,
        });
        layer = layer.file_with("bin/busybox", busybox, 0o755, 0, 0);
        for applet in APPLETS {
            layer = layer.symlink(&format!("bin/{applet}"), "busybox");
        }
        Ok(layer
            .file("etc/passwd", PASSWD)
            .file("etc/group", GROUP)
            .file("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n")
            .file("etc/hostname", "hearth\n"))
    }
}

/// `("a/b/", "c")` for `a/b/c`; `("", "c")` for `c`.
fn split(path: &str) -> (String, String) {
    let path = path.trim_matches('/');
    match path.rsplit_once('/') {
        Some((dir, name)) => (format!("{dir}/"), name.to_string()),
        None => (String::new(), path.to_string()),
    }
}

/// Refuses a busybox that is not an x86-64 ELF without a program interpreter.
fn check_static(elf: &[u8]) -> Result<(), ImageError> {
    let bad = |why: &str| {
        Err(ImageError::Sample(format!(
            "{BUSYBOX} {why}; install busybox-static"
        )))
    };
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return bad("is not a 64-bit ELF executable");
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff.saturating_add(i.saturating_mul(phentsize));
        let Some(p_type) = elf.get(at..at + 4) else {
            return bad("has a truncated program header table");
        };
        if u32::from_le_bytes(p_type.try_into().expect("4 bytes")) == 3 {
            return bad("is dynamically linked (it has PT_INTERP)");
        }
    }
    Ok(())
}

/// Writes tar entries with fixed times and raw names when asked.
#[derive(Default)]
struct TarWriter {
    out: Vec<u8>,
}

impl TarWriter {
    fn add(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        data: &[u8],
        (mode, uid, gid): (u32, u32, u32),
        link: Option<&[u8]>,
    ) -> Result<(), ImageError> {
        let mut header = tar::Header::new_gnu();
        let old = header.as_old_mut();
        if name.len() > old.name.len() || link.is_some_and(|l| l.len() > old.linkname.len()) {
            return Err(ImageError::Sample(format!(
                "name {:?} or link target too long",
                String::from_utf8_lossy(name)
            )));
        }
        old.name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_uid(u64::from(uid));
        header.set_gid(u64::from(gid));
        header.set_mtime(MTIME);
        header.set_cksum();
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(data);
        self.out.resize(self.out.len().next_multiple_of(512), 0);
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u8>, ImageError> {
        self.out.resize(self.out.len() + 1024, 0);
        Ok(self.out)
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// The uncompressed layer tars and the config JSON of the sample image.
fn image(extra_layers: &[SampleLayer]) -> Result<(Vec<Vec<u8>>, Vec<u8>), ImageError> {
    let mut layers = vec![SampleLayer::busybox_base()?.to_tar()?];
    for layer in extra_layers {
        layers.push(layer.to_tar()?);
    }
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let history: Vec<_> = (0..layers.len())
        .map(|i| json!({"created": "2023-11-14T22:13:20Z", "created_by": format!("hearth sample layer {}", i + 1)}))
        .collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {
            "Env": [format!("PATH={DEFAULT_PATH}")],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    Ok((layers, serde_json::to_vec(&config).expect("JSON")))
}

/// The files of the sample OCI image layout, by name.
fn oci_files(extra_layers: &[SampleLayer]) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let (layers, config) = image(extra_layers)?;
    let mut files = vec![(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut blob = |data: Vec<u8>, media_type: &str| {
        let hex = sha256_hex(&data);
        let desc =
            json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()});
        files.push((format!("blobs/sha256/{hex}"), data));
        desc
    };
    let config_desc = blob(config, "application/vnd.oci.image.config.v1+json");
    let layer_descs: Vec<_> = layers
        .into_iter()
        .enumerate()
        .map(|(i, tar)| {
            if i == 0 {
                blob(gzip(&tar), "application/vnd.oci.image.layer.v1.tar+gzip")
            } else {
                blob(tar, "application/vnd.oci.image.layer.v1.tar")
            }
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    });
    let mut manifest_desc = blob(
        serde_json::to_vec(&manifest).expect("JSON"),
        "application/vnd.oci.image.manifest.v1+json",
    );
    manifest_desc["annotations"] = json!({
        "org.opencontainers.image.ref.name": "latest",
        "io.containerd.image.name": "hearth.local/busybox:latest",
    });
    manifest_desc["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc],
    });
    files.push((
        "index.json".into(),
        serde_json::to_vec(&index).expect("JSON"),
    ));
    Ok(files)
}

fn write_tar(out: &Path, files: &[(String, Vec<u8>)], compress: bool) -> Result<(), ImageError> {
    let mut tar = TarWriter::default();
    for (name, data) in files {
        tar.add(
            name.as_bytes(),
            tar::EntryType::Regular,
            data,
            (0o644, 0, 0),
            None,
        )?;
    }
    let bytes = tar.finish()?;
    let bytes = if compress { gzip(&bytes) } else { bytes };
    fs::write(out, bytes).map_err(io_err(format!("cannot write {}", out.display())))
}

/// Writes the sample image as an OCI image layout in `dir` (created if needed): the base
/// layer gzip-compressed, `extra_layers` as plain tars, in order. The index names it
/// `latest`.
pub fn busybox_oci_layout(dir: &Path, extra_layers: &[SampleLayer]) -> Result<(), ImageError> {
    for (name, data) in oci_files(extra_layers)? {
        let path = dir.join(&name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(io_err(format!("cannot create {}", parent.display())))?;
        }
        fs::write(&path, data).map_err(io_err(format!("cannot write {}", path.display())))?;
    }
    Ok(())
}

/// Writes the sample image as an OCI archive (a tar of the layout; gzip-compressed when
/// `compress`).
pub fn busybox_oci_archive(
    out: &Path,
    extra_layers: &[SampleLayer],
    compress: bool,
) -> Result<(), ImageError> {
    write_tar(out, &oci_files(extra_layers)?, compress)
}

/// Writes the sample image as a legacy `docker save` tarball: `manifest.json`,
/// `<config sha256>.json`, `<diff_id hex>/layer.tar` (uncompressed) and `repositories`,
/// tagged `hearth-sample/busybox:latest`.
pub fn busybox_docker_save(out: &Path, extra_layers: &[SampleLayer]) -> Result<(), ImageError> {
    let (layers, config) = image(extra_layers)?;
    let config_name = format!("{}.json", sha256_hex(&config));
    let mut files = vec![(config_name.clone(), config)];
    let mut layer_names = Vec::new();
    for tar in layers {
        let id = sha256_hex(&tar);
        files.push((format!("{id}/VERSION"), b"1.0".to_vec()));
        files.push((
            format!("{id}/json"),
            format!(r#"{{"id":"{id}"}}"#).into_bytes(),
        ));
        files.push((format!("{id}/layer.tar"), tar));
        layer_names.push(format!("{id}/layer.tar"));
    }
    let last = layer_names
        .last()
        .and_then(|n| n.split('/').next())
        .unwrap_or_default()
        .to_string();
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": ["hearth-sample/busybox:latest"],
        "Layers": layer_names,
    }]);
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).expect("JSON"),
    ));
    let repositories = json!({"hearth-sample/busybox": {"latest": last}});
    files.push((
        "repositories".into(),
        serde_json::to_vec(&repositories).expect("JSON"),
    ));
    write_tar(out, &files, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_check() {
        assert!(check_static(b"#!/bin/sh\n").is_err());
        if let Ok(elf) = fs::read("/proc/self/exe") {
            // hearth's test binaries are static too (crt-static).
            let _ = check_static(&elf);
        }
        if Path::new(BUSYBOX).exists() {
            SampleLayer::busybox_base().unwrap();
        }
    }

    #[test]
    fn layers_are_deterministic_and_raw_names_kept() {
        let layer = SampleLayer::new()
            .file("a/b", "x")
            .whiteout("a/c")
            .opaque("d")
            .raw_file("../evil", "y");
        let tar = layer.to_tar().unwrap();
        assert_eq!(tar, layer.to_tar().unwrap());
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap())
            .collect();
        assert_eq!(names, ["a/b", "a/.wh.c", "d/.wh..wh..opq", "../evil"]);
    }
}
