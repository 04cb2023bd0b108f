//! Resolving a layer entry's name, and a hard link's target, inside the root filesystem
//! directory the way a chroot would, so that nothing a hostile image names can lead out.
//!
//! A name is split into components; a `..` component is refused, empty and `.` components
//! are dropped (so a leading `/` or `./` is ignored). Directories are then resolved
//! component by component under the root: symlinks are followed by hand (an absolute
//! target restarts at the root, `..` stops at the root), so the result is always a chain of
//! real directories under the root, never a path the kernel would resolve through a link.
//! The caller never follows the last component.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Symlinks followed while resolving one name, as Linux's limit.
const MAX_SYMLINKS: u32 = 40;

/// Why a name could not be resolved. The layer writer turns these into `ImageError`s
/// naming the layer and the entry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PathError {
    /// A refusal: the image is malformed or hostile.
    #[error("has too many levels of symbolic links")]
    TooManyLinks,
    /// A refusal: a component that must be a directory is something else.
    #[error("goes through {0}, which is not a directory")]
    NotADirectory(String),
    /// The filesystem failed (not the image's fault).
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// How an absolute path or a name from an image appears in a message: as it is, except
/// control characters, which are escaped so that a hostile name cannot break a message
/// (or a log line) into several lines.
pub(crate) fn printable(path: &Path) -> String {
    printable_text(&path.to_string_lossy())
}

/// An error of the tar reader, whose messages quote raw header bytes (a name, a numeric
/// field), with those made [`printable`].
pub(crate) fn printable_error(err: io::Error) -> io::Error {
    let text = err.to_string();
    if !text.chars().any(char::is_control) {
        return err;
    }
    io::Error::new(err.kind(), printable_text(&text))
}

fn printable_text(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The components of an entry name; `None` if one is `..`. Empty and `.` components are
/// dropped, so `./a//b/` and `/a/b` are both `[a, b]`.
pub(crate) fn components(raw: &[u8]) -> Option<Vec<OsString>> {
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

/// Resolves the directory `comps` inside `root` and returns it relative to `root`.
/// Missing directories are created (mode 0755) when `create`; otherwise a missing one
/// gives `None`.
pub(crate) fn resolve_dir(
    root: &Path,
    comps: &[OsString],
    create: bool,
) -> Result<Option<PathBuf>, PathError> {
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
        let path = root.join(&candidate);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(PathError::TooManyLinks);
                }
                let target = fs::read_link(&path).map_err(|source| PathError::Io {
                    what: format!("cannot read link {}", printable(&path)),
                    source,
                })?;
                let target = target.as_os_str().as_bytes();
                if target.starts_with(b"/") {
                    current = PathBuf::new();
                }
                for part in target.split(|&b| b == b'/').rev() {
                    pending.push(OsStr::from_bytes(part).to_os_string());
                }
            }
            Ok(m) if m.is_dir() => current = candidate,
            Ok(_) => return Err(PathError::NotADirectory(printable(&candidate))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                DirBuilder::new()
                    .mode(0o755)
                    .create(&path)
                    .map_err(|source| PathError::Io {
                        what: format!("cannot create {}", printable(&path)),
                        source,
                    })?;
                current = candidate;
            }
            Err(source) => {
                return Err(PathError::Io {
                    what: format!("cannot stat {}", printable(&path)),
                    source,
                })
            }
        }
    }
    Ok(Some(current))
}

/// Whether `rel` is still a real directory under `root`: it and every directory above it
/// a directory, none a symlink. Work deferred to the end of a layer (directory metadata,
/// clearing opaque directories) goes by paths recorded earlier, and a later entry may have
/// replaced one of those directories by a symlink to anywhere, which the kernel would
/// follow.
pub(crate) fn is_real_dir(root: &Path, rel: &Path) -> bool {
    let mut path = root.to_path_buf();
    for comp in rel.components() {
        path.push(comp);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Where a hard link's target is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkTarget {
    /// An existing non-directory (a symlink included, never followed), relative to the
    /// root.
    Found(PathBuf),
    /// The name has a `..` component.
    LeavesRoot,
    /// Nothing is there (or the name is empty).
    Missing,
    Directory,
}

/// Finds the target of a hard link named `raw` (relative to the root, its directories
/// resolved as for any entry, its last component not followed).
pub(crate) fn hardlink_target(root: &Path, raw: &[u8]) -> Result<LinkTarget, PathError> {
    let Some(mut comps) = components(raw) else {
        return Ok(LinkTarget::LeavesRoot);
    };
    let Some(name) = comps.pop() else {
        return Ok(LinkTarget::Missing);
    };
    let Some(parent) = resolve_dir(root, &comps, false)? else {
        return Ok(LinkTarget::Missing);
    };
    let rel = parent.join(name);
    Ok(match fs::symlink_metadata(root.join(&rel)) {
        Ok(m) if m.is_dir() => LinkTarget::Directory,
        Ok(_) => LinkTarget::Found(rel),
        Err(_) => LinkTarget::Missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layer::tests::temp_dir;
    use std::os::unix::fs::symlink;

    fn comps(names: &[&str]) -> Vec<OsString> {
        names.iter().map(OsString::from).collect()
    }

    #[test]
    fn components_drop_empty_and_dot_and_refuse_dot_dot() {
        assert_eq!(components(b"./a//b/"), Some(comps(&["a", "b"])));
        assert_eq!(components(b"/a/b"), Some(comps(&["a", "b"])));
        assert_eq!(components(b"/"), Some(vec![]));
        assert_eq!(components(b"a/../b"), None);
        assert_eq!(components(b".."), None);
        // Only `..` exactly: `...` and `..x` are ordinary names.
        assert_eq!(components(b"a/.../..x"), Some(comps(&["a", "...", "..x"])));
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let root = temp_dir("path-resolve");
        fs::create_dir_all(root.join("real/sub")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("../../../../real/sub", root.join("up")).unwrap();
        symlink("self", root.join("self")).unwrap();
        fs::write(root.join("file"), b"").unwrap();
        let resolve = |names: &[&str], create| resolve_dir(&root, &comps(names), create);
        assert_eq!(
            resolve(&["abs", "sub"], false).unwrap(),
            Some(PathBuf::from("real/sub"))
        );
        assert_eq!(
            resolve(&["up"], false).unwrap(),
            Some(PathBuf::from("real/sub"))
        );
        assert_eq!(resolve(&["abs", "new"], false).unwrap(), None);
        assert_eq!(
            resolve(&["abs", "new"], true).unwrap(),
            Some(PathBuf::from("real/new"))
        );
        assert!(root.join("real/new").is_dir());
        assert!(matches!(
            resolve(&["self", "x"], true),
            Err(PathError::TooManyLinks)
        ));
        let err = resolve(&["file", "x"], true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "goes through file, which is not a directory"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn hardlink_targets() {
        let root = temp_dir("path-hardlink");
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"").unwrap();
        symlink("/d", root.join("to-d")).unwrap();
        symlink("/etc/passwd", root.join("dangling")).unwrap();
        let target = |raw: &[u8]| hardlink_target(&root, raw).unwrap();
        assert_eq!(target(b"to-d/f"), LinkTarget::Found("d/f".into()));
        // The last component is not followed: the symlink itself is the target.
        assert_eq!(target(b"/dangling"), LinkTarget::Found("dangling".into()));
        assert_eq!(target(b"d"), LinkTarget::Directory);
        assert_eq!(target(b"to-d"), LinkTarget::Found("to-d".into()));
        assert_eq!(target(b"d/../d/f"), LinkTarget::LeavesRoot);
        assert_eq!(target(b"nope/f"), LinkTarget::Missing);
        assert_eq!(target(b"./"), LinkTarget::Missing);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn real_dirs_have_no_symlink_on_the_way() {
        let root = temp_dir("path-real");
        fs::create_dir_all(root.join("d/e")).unwrap();
        symlink("d", root.join("l")).unwrap();
        fs::write(root.join("f"), b"").unwrap();
        assert!(is_real_dir(&root, Path::new("")));
        assert!(is_real_dir(&root, Path::new("d/e")));
        assert!(!is_real_dir(&root, Path::new("l")));
        assert!(!is_real_dir(&root, Path::new("l/e")));
        assert!(!is_real_dir(&root, Path::new("f")));
        assert!(!is_real_dir(&root, Path::new("missing")));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(printable(Path::new("/a b/ü\"'")), "/a b/ü\"'");
        assert_eq!(printable(Path::new("a\nb\r\x1b")), "a\\nb\\r\\u{1b}");
        let err = printable_error(io::Error::new(io::ErrorKind::InvalidData, "size for a\x18"));
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(err.to_string(), "size for a\\u{18}");
    }
}
