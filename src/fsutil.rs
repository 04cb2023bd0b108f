//! File-system helpers shared by several front ends.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Writes `data` to `temp`, syncs it and renames it to `path`, so that a reader sees the
/// old file or the whole new one, never half of it (a crash leaves at most `temp`).
/// `temp` must be on `path`'s file system (beside it); it is removed if anything fails.
pub fn write_atomically(path: &Path, temp: &Path, data: &[u8]) -> io::Result<()> {
    let result = (|| {
        let mut file = fs::File::create(temp)?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temp() {
        let dir = TempDir::new("fsutil");
        let path = dir.path().join("state.json");
        let temp = dir.path().join(".state.json.tmp");
        write_atomically(&path, &temp, b"one").unwrap();
        write_atomically(&path, &temp, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!temp.exists());
        // A rename that cannot happen (onto a directory) leaves the old state and no temp.
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/x"), b"").unwrap();
        assert!(write_atomically(&dir.path().join("sub"), &temp, b"three").is_err());
        assert!(!temp.exists());
    }
}
