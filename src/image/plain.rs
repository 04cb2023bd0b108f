//! Plain root filesystems: a directory or a tarball that is not an image. Their digest is
//! a sha256 over their content (the tarball's bytes; a walk of the directory tree), so
//! editing one gives a new cache entry.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::layer::{Kind, LayerWriter, Meta};
use super::store::{hex, Compression, HashReader};
use super::{io_err, ImageCache, ImageConfig, ImageError, PreparedImage, Progress};

/// Prepares a plain root filesystem tarball (tar or tar.gz).
pub(crate) fn prepare_tarball(
    path: &Path,
    cache: &ImageCache,
) -> Result<PreparedImage, ImageError> {
    let what = || format!("cannot read {}", path.display());
    let file = File::open(path).map_err(io_err(what()))?;
    let (hex, size) = HashReader::new(BufReader::new(file))
        .finish()
        .map_err(io_err(what()))?;
    if let Some(found) = cache.lookup(&hex)? {
        return Ok(found);
    }
    cache.build(&hex, |rootfs| {
        let progress = Progress::new(size, "unpacking".into());
        let file = File::open(path).map_err(io_err(what()))?;
        let mut buffered = BufReader::with_capacity(256 << 10, progress.wrap(file));
        let magic = buffered.fill_buf().map_err(io_err(what()))?;
        let mut reader: Box<dyn Read> = match Compression::of(magic) {
            Compression::Gzip => Box::new(MultiGzDecoder::new(buffered)),
            _ => Box::new(buffered),
        };
        let mut writer = LayerWriter::new(rootfs, "tarball".into(), false);
        writer.apply_tar(&mut reader)?;
        writer.finish()?;
        Ok(ImageConfig::default())
    })
}

/// Prepares a plain root filesystem directory: copies it into the cache.
pub(crate) fn prepare_dir(dir: &Path, cache: &ImageCache) -> Result<PreparedImage, ImageError> {
    let hex = hash_dir(dir)?;
    if let Some(found) = cache.lookup(&hex)? {
        return Ok(found);
    }
    cache.build(&hex, |rootfs| {
        copy_dir(dir, rootfs)?;
        Ok(ImageConfig::default())
    })
}

/// Calls `visit` for `dir` (as the empty relative path) and everything under it, parents
/// before children, names in byte order. Never follows symlinks.
fn walk(
    dir: &Path,
    visit: &mut dyn FnMut(&Path, &Path, &Metadata) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    fn inner(
        path: &Path,
        rel: &Path,
        visit: &mut dyn FnMut(&Path, &Path, &Metadata) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let meta = fs::symlink_metadata(path)
            .map_err(io_err(format!("cannot stat {}", path.display())))?;
        visit(path, rel, &meta)?;
        if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(path)
                .map_err(io_err(format!("cannot list {}", path.display())))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io_err(format!("cannot list {}", path.display())))?;
            names.sort();
            for name in names {
                inner(&path.join(&name), &rel.join(&name), visit)?;
            }
        }
        Ok(())
    }
    inner(dir, Path::new(""), visit)
}

fn open_nofollow(path: &Path) -> Result<File, ImageError> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(format!("cannot read {}", path.display())))
}

/// sha256 (hex) over the tree: names, types, modes, owners, link targets, device numbers
/// and file contents (not times).
pub(crate) fn hash_dir(dir: &Path) -> Result<String, ImageError> {
    let mut hasher = Sha256::new();
    hasher.update(b"hearth-rootfs-dir-v1\0");
    walk(dir, &mut |path, rel, meta| {
        hasher.update(rel.as_os_str().as_bytes());
        let ft = meta.file_type();
        let (kind, extra) = if ft.is_file() {
            ('f', meta.len().to_string())
        } else if ft.is_dir() {
            ('d', String::new())
        } else if ft.is_symlink() {
            let target = fs::read_link(path)
                .map_err(io_err(format!("cannot read link {}", path.display())))?;
            hasher.update([0]);
            hasher.update(target.as_os_str().as_bytes());
            ('l', String::new())
        } else if ft.is_char_device() || ft.is_block_device() {
            (
                'c',
                format!("{}:{}", u8::from(ft.is_block_device()), meta.rdev()),
            )
        } else {
            ('p', String::new())
        };
        let line = format!(
            "\0{kind} {:o} {} {} {extra}\0",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        );
        hasher.update(line.as_bytes());
        if kind == 'f' {
            let mut file = open_nofollow(path)?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => hasher.update(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(format!("cannot read {}", path.display()))(e)),
                }
            }
        }
        Ok(())
    })?;
    Ok(hex(&hasher.finalize()))
}

/// Copies the tree `src` into the (existing, empty) directory `dest`, keeping owners,
/// modes, times, symlinks, hard links and device nodes. Sockets are skipped.
pub(crate) fn copy_dir(src: &Path, dest: &Path) -> Result<(), ImageError> {
    let mut writer = LayerWriter::new(dest, "directory".into(), false);
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    walk(src, &mut |path, rel, meta| {
        let ft = meta.file_type();
        let name = rel.as_os_str().as_bytes();
        let entry_meta = Meta {
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: meta.mtime(),
            xattrs: Vec::new(),
        };
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            let target = fs::read_link(path)
                .map_err(io_err(format!("cannot read link {}", path.display())))?;
            Kind::Symlink(target.as_os_str().as_bytes().to_vec())
        } else if ft.is_socket() {
            return Ok(());
        } else if meta.nlink() > 1 && inodes.contains_key(&(meta.dev(), meta.ino())) {
            let first = &inodes[&(meta.dev(), meta.ino())];
            Kind::Hardlink(first.as_os_str().as_bytes().to_vec())
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_char_device() {
            Kind::Char(major, minor)
        } else if ft.is_block_device() {
            Kind::Block(major, minor)
        } else {
            Kind::Fifo
        };
        if meta.nlink() > 1 && !ft.is_dir() {
            inodes
                .entry((meta.dev(), meta.ino()))
                .or_insert_with(|| rel.to_path_buf());
        }
        if kind == Kind::File {
            let mut file = open_nofollow(path)?;
            writer.add(name, kind, &entry_meta, &mut file)
        } else {
            writer.add(name, kind, &entry_meta, &mut io::empty())
        }
    })?;
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layer::tests::temp_dir;

    #[test]
    fn dir_hash_tracks_content_and_copy_is_faithful() {
        let src = temp_dir("plain-src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("tool", src.join("bin/alias")).unwrap();
        fs::hard_link(src.join("bin/tool"), src.join("bin/same")).unwrap();
        fs::set_permissions(
            src.join("bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )
        .unwrap();
        let h1 = hash_dir(&src).unwrap();
        assert_eq!(h1, hash_dir(&src).unwrap());

        let dest = temp_dir("plain-dest");
        copy_dir(&src, &dest).unwrap();
        assert_eq!(hash_dir(&dest).unwrap(), h1);
        let (a, b) = (
            fs::metadata(dest.join("bin/tool")).unwrap(),
            fs::metadata(dest.join("bin/same")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.mode() & 0o7777, 0o4755);
        assert_eq!(
            fs::read_link(dest.join("bin/alias")).unwrap(),
            Path::new("tool")
        );

        fs::write(src.join("bin/tool"), b"#!/bin/bash\n").unwrap();
        assert_ne!(hash_dir(&src).unwrap(), h1);
        fs::remove_dir_all(&src).unwrap();
        fs::remove_dir_all(&dest).unwrap();
    }
}
