//! ext4 images of a directory tree, made with `mkfs.ext4 -d`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{io_err, ImageError};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
const MIB: u64 = 1 << 20;

/// Space and inodes a tree needs in ext4 (4 KiB blocks).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    blocks: u64,
    inodes: u64,
}

fn blocks(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK)
}

/// Walks `dir` without following symlinks; hard-linked files count once.
fn usage(dir: &Path) -> Result<Usage, ImageError> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path)
            .map_err(io_err(format!("cannot stat {}", path.display())))?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        let ft = meta.file_type();
        if ft.is_file() {
            // Data, plus an extent block for large or fragmented files.
            let data = blocks(meta.len());
            usage.blocks += data + data.div_ceil(1024);
        } else if ft.is_symlink() {
            // Targets of 60 bytes or more do not fit in the inode.
            if meta.len() >= 60 {
                usage.blocks += 1;
            }
        } else if ft.is_dir() {
            let mut bytes = 24; // "." and ".."
            for entry in
                fs::read_dir(&path).map_err(io_err(format!("cannot list {}", path.display())))?
            {
                let entry = entry.map_err(io_err(format!("cannot list {}", path.display())))?;
                bytes += 8 + (entry.file_name().as_bytes().len() as u64).next_multiple_of(4);
                stack.push(entry.path());
            }
            // Directory blocks are rarely full; htree index blocks on top.
            usage.blocks += blocks(bytes + bytes / 2).max(1);
        }
    }
    Ok(usage)
}

/// The image size and inode count for `usage` plus `extra_free_bytes` of free space.
fn geometry(usage: Usage, extra_free_bytes: u64) -> (u64, u64) {
    // Inodes: the tree's, headroom, and one per 16 KiB of the extra space.
    let inodes = (usage.inodes + usage.inodes / 4 + 64 + extra_free_bytes / 16384).max(128);
    let data = usage.blocks * BLOCK;
    let tables = inodes * INODE_SIZE;
    // Bitmaps, group descriptors, superblock copies: a few percent, at least 2 MiB.
    let metadata = (data + tables) / 32 + 2 * MIB;
    let size = (data + tables + metadata + extra_free_bytes).next_multiple_of(MIB);
    (size, inodes)
}

/// `mkfs.ext4`, from PATH or the sbin directories (which a non-root PATH may lack).
fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("mkfs.ext4"))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Builds an ext4 image `out` holding the tree `dir` (owners, modes, times, xattrs and
/// special files as they are), sized for its content plus `extra_free_bytes` of free
/// space (0 for a read-only image; more for a writable volume). No journal; label
/// `hearth`. The root directory gets the owner and mode of `dir` (`mkfs.ext4 -d` alone
/// would make it 0755 root:root, which a volume owned by another user must not become).
pub fn build_ext4(dir: &Path, out: &Path, extra_free_bytes: u64) -> Result<(), ImageError> {
    let mkfs = find_mkfs().ok_or(ImageError::MkfsNotFound)?;
    let top = fs::metadata(dir).map_err(io_err(format!("cannot stat {}", dir.display())))?;
    let (mut size, mut inodes) = geometry(usage(dir)?, extra_free_bytes);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let _ = fs::remove_file(out);
        let file = File::create(out).map_err(io_err(format!("cannot create {}", out.display())))?;
        file.set_len(size)
            .map_err(io_err(format!("cannot size {}", out.display())))?;
        drop(file);
        let output = Command::new(&mkfs)
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0", "-L", "hearth",
            ])
            .args(["-O", "^has_journal,^resize_inode"])
            .arg("-E")
            .arg(format!("root_owner={}:{},nodiscard", top.uid(), top.gid()))
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(dir)
            .arg(out)
            .output()
            .map_err(io_err(format!("cannot run {}", mkfs.display())))?;
        if output.status.success() {
            set_root_mode(out, top.mode() & 0o7777);
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let full = ["llocate", "space", "inode", "No free"]
            .iter()
            .any(|w| stderr.contains(w));
        if full && attempt < 3 {
            log::debug!("mkfs.ext4 ran out of room at {size} bytes, retrying larger: {stderr}");
            size = (size + size / 2).next_multiple_of(MIB);
            inodes += inodes / 2;
            continue;
        }
        let _ = fs::remove_file(out);
        return Err(ImageError::Mkfs {
            out: out.display().to_string(),
            status: output.status.to_string(),
            stderr,
        });
    }
}

/// Gives the root directory of the image `out` the permission bits `mode` (best effort,
/// with debugfs; mkfs.ext4 always makes it 0755).
fn set_root_mode(out: &Path, mode: u32) {
    if mode == 0o755 {
        return;
    }
    let request = format!("set_inode_field / mode 0{:o}", libc::S_IFDIR | mode);
    let debugfs = ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("debugfs");
    let result = Command::new(debugfs)
        .args(["-w", "-R", &request])
        .arg(out)
        .output();
    match result {
        Ok(o) if o.status.success() => {}
        Ok(o) => log::warn!(
            "cannot set the root mode of {}: {}",
            out.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => log::warn!(
            "cannot run debugfs to set the root mode of {}: {e}",
            out.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layer::tests::temp_dir;

    #[test]
    fn geometry_has_room() {
        let (size, inodes) = geometry(
            Usage {
                blocks: 256,
                inodes: 10,
            },
            0,
        );
        assert_eq!(size % MIB, 0);
        assert!(size >= 256 * BLOCK + 2 * MIB);
        assert!(inodes >= 10);
        let (bigger, more) = geometry(
            Usage {
                blocks: 256,
                inodes: 10,
            },
            100 * MIB,
        );
        assert!(bigger >= size + 100 * MIB && more > inodes);
    }

    #[test]
    fn builds_a_checkable_image() {
        if find_mkfs().is_none() {
            eprintln!("mkfs.ext4 missing: skipped");
            return;
        }
        let dir = temp_dir("ext4-src");
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/hello"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("hello", dir.join("bin/hi")).unwrap();
        for i in 0..500 {
            fs::write(dir.join(format!("f{i}")), b"x").unwrap();
        }
        std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).ok();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        let out = dir.with_extension("ext4");
        build_ext4(&dir, &out, 0).unwrap();
        let root = Command::new("debugfs")
            .args(["-R", "stat /"])
            .arg(&out)
            .output();
        if let Ok(root) = root {
            let text = String::from_utf8_lossy(&root.stdout);
            assert!(text.contains("Mode:  0750"), "{text}");
            if crate::image::layer::privileged() {
                assert!(text.contains("User:  1000   Group:  1000"), "{text}");
            }
        }
        let fsck = Command::new("e2fsck").args(["-fn"]).arg(&out).output();
        if let Ok(fsck) = fsck {
            assert!(
                fsck.status.success(),
                "{}",
                String::from_utf8_lossy(&fsck.stdout)
            );
        }
        let ls = Command::new("debugfs")
            .args(["-R", "ls -l /bin"])
            .arg(&out)
            .output();
        if let Ok(ls) = ls {
            let text = String::from_utf8_lossy(&ls.stdout);
            assert!(text.contains("hello") && text.contains("300000"), "{text}");
        }
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_file(&out).unwrap();
    }
}
