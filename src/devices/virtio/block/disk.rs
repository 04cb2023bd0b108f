//! The host side of a disk: a raw image file (or block device), locked against concurrent
//! use, read and written with pread/pwrite straight into and out of guest memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::request::Backend;
use super::{BlockError, SECTOR_SIZE};

/// Largest buffer of zeroes written when fallocate cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

/// An open, locked raw disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    size: u64,
    read_only: bool,
}

impl DiskFile {
    /// Opens `path` read-write (read-only if `read_only`) and takes an open-file-description
    /// lock on it: exclusive for read-write, shared for read-only, so two VMs never write
    /// one image and nobody writes an image a VM reads.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        // Seeking works for block devices too, whose metadata length is 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorMultiple {
                path: path.to_owned(),
                size,
            });
        }
        lock(&file, read_only, path)?;
        Ok(Self {
            file,
            size,
            read_only,
        })
    }

    /// Whether `path` names this open image (same device and inode).
    pub fn is_file(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
            _ => false,
        }
    }

    /// Reads the size again, after the image was grown or shrunk in place.
    pub fn refresh_size(&mut self, path: &Path) -> Result<(), BlockError> {
        let size = (&self.file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorMultiple {
                path: path.to_owned(),
                size,
            });
        }
        self.size = size;
        Ok(())
    }

    /// Size in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let offset = to_off_t(offset)?;
        let len = to_off_t(len)?;
        loop {
            // SAFETY: fallocate on a file descriptor this object owns; no memory is passed.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Writes zeroes with pwrite, for files whose filesystem cannot zero a range.
    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// The fallocate mode is not available for this file.
fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn to_off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// Takes an OFD lock on the whole file. OFD locks belong to the open file description, so
/// they also conflict within one process and go away when the file is closed.
fn lock(file: &File, read_only: bool, path: &Path) -> Result<(), BlockError> {
    let lock_type = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    // SAFETY: flock is plain data; all-zero is a valid value (l_pid must be 0 for OFD locks).
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = lock_type as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    request.l_start = 0;
    // Length 0: to the end of the file, however it grows.
    request.l_len = 0;
    // SAFETY: F_OFD_SETLK reads the flock struct, which lives across the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(BlockError::InUse {
            path: path.to_owned(),
        }),
        // Some filesystems (9p, some FUSE) have no locks: use the image unprotected.
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
            log::warn!(
                "disk image \"{}\" cannot be locked ({source}); it is not protected against concurrent use",
                path.display()
            );
            Ok(())
        }
        _ => Err(BlockError::Lock {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Backend for DiskFile {
    fn read_at<S: BitmapSlice>(&mut self, offset: u64, dst: &VolatileSlice<S>) -> io::Result<()> {
        let mut done = 0usize;
        while done < dst.len() {
            let part = dst
                .subslice(done, dst.len() - done)
                .map_err(|_| io::ErrorKind::InvalidInput)?;
            let position = to_off_t(offset + done as u64)?;
            let guard = part.ptr_guard_mut();
            // SAFETY: the VolatileSlice guarantees `part.len()` bytes of mapped guest memory
            // at the guard's pointer, kept mapped while the guard lives; the kernel writes at
            // most that many bytes there. Guest memory may change concurrently, which is
            // fine for raw bytes.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().cast(),
                    part.len(),
                    position,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                part.bitmap().mark_dirty(0, part.len());
                return Err(err);
            }
            if n == 0 {
                // The file shrank under the VM.
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            part.bitmap().mark_dirty(0, n as usize);
            done += n as usize;
        }
        Ok(())
    }

    fn write_at<S: BitmapSlice>(&mut self, offset: u64, src: &VolatileSlice<S>) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let mut done = 0usize;
        while done < src.len() {
            let part = src
                .subslice(done, src.len() - done)
                .map_err(|_| io::ErrorKind::InvalidInput)?;
            let position = to_off_t(offset + done as u64)?;
            let guard = part.ptr_guard();
            // SAFETY: the VolatileSlice guarantees `part.len()` readable bytes of mapped
            // guest memory at the guard's pointer while the guard lives; the kernel only
            // reads them.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().cast(),
                    part.len(),
                    position,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n as usize;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            // Discard is a hint: without hole punching the data simply stays.
            Err(e) if unsupported(&e) => {
                log::debug!("disk discard not supported here: {e}");
                Ok(())
            }
            other => other,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // Without `unmap` the range stays allocated, so later writes cannot hit ENOSPC.
        let modes: &[i32] = if unmap { &[punch, zero] } else { &[zero] };
        for &mode in modes {
            match self.fallocate(mode, offset, len) {
                Err(e) if unsupported(&e) => continue,
                other => return other,
            }
        }
        self.write_zero_buffers(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::test_util::{pattern, TempImage};

    fn open_error(path: &Path, read_only: bool) -> String {
        crate::error_chain(&DiskFile::open(path, read_only).unwrap_err())
    }

    #[test]
    fn size_must_be_whole_sectors() {
        let image = TempImage::new(1000);
        assert_eq!(
            open_error(image.path(), false),
            format!(
                "disk image \"{}\" is 1000 bytes, not a multiple of 512",
                image.path().display()
            )
        );
        let image = TempImage::new(0);
        assert_eq!(DiskFile::open(image.path(), true).unwrap().capacity(), 0);
        let image = TempImage::new(4096);
        let disk = DiskFile::open(image.path(), false).unwrap();
        assert_eq!((disk.size(), disk.capacity()), (4096, 8));
    }

    #[test]
    fn missing_image_names_the_path() {
        let message = open_error(Path::new("/nonexistent/disk.img"), true);
        assert!(
            message.starts_with("cannot open disk image \"/nonexistent/disk.img\": "),
            "{message}"
        );
    }

    #[test]
    fn locks_keep_writers_exclusive() {
        let image = TempImage::new(4096);
        let in_use = format!(
            "disk image \"{}\" is in use by another process",
            image.path().display()
        );
        let writer = DiskFile::open(image.path(), false).unwrap();
        assert_eq!(open_error(image.path(), false), in_use);
        assert_eq!(open_error(image.path(), true), in_use);
        drop(writer);

        let reader = DiskFile::open(image.path(), true).unwrap();
        let second_reader = DiskFile::open(image.path(), true).unwrap();
        assert_eq!(open_error(image.path(), false), in_use);
        drop((reader, second_reader));
        // Closing releases the lock.
        DiskFile::open(image.path(), false).unwrap();
    }

    #[test]
    fn read_write_and_zeroing() {
        let image = TempImage::new(64 << 10);
        let mut disk = DiskFile::open(image.path(), false).unwrap();

        let mut buf = vec![0u8; 1024];
        disk.read_at(512, &VolatileSlice::from(&mut buf[..]))
            .unwrap();
        assert_eq!(buf, (512..1536).map(pattern).collect::<Vec<_>>());

        let mut payload: Vec<u8> = (0..2048u32).map(|i| (i * 3) as u8).collect();
        disk.write_at(4096, &VolatileSlice::from(&mut payload[..]))
            .unwrap();
        disk.flush().unwrap();
        assert_eq!(image.contents()[4096..6144], payload[..]);

        // Reading past the end is an error, not a short read.
        let mut tail = vec![0u8; 1024];
        let err = disk
            .read_at((64 << 10) - 512, &VolatileSlice::from(&mut tail[..]))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        disk.discard(8192, 8192).unwrap();
        disk.write_zeroes(20480, 4096, false).unwrap();
        disk.write_zeroes(32768, 1024, true).unwrap();
        let contents = image.contents();
        assert_eq!(contents.len(), 64 << 10);
        for (start, len) in [(8192, 8192), (20480, 4096), (32768, 1024)] {
            assert!(contents[start..start + len].iter().all(|&b| b == 0));
            assert_eq!(contents[start - 1], pattern(start - 1));
            assert_eq!(contents[start + len], pattern(start + len));
        }
        disk.write_zero_buffers(40960, 1536).unwrap();
        assert!(image.contents()[40960..42496].iter().all(|&b| b == 0));
    }

    #[test]
    fn read_only_file_is_never_written() {
        let image = TempImage::new(4096);
        let mut disk = DiskFile::open(image.path(), true).unwrap();
        let mut buf = vec![0u8; 512];
        assert!(disk
            .write_at(0, &VolatileSlice::from(&mut buf[..]))
            .is_err());
        assert!(disk.discard(0, 512).is_err());
        assert!(disk.write_zeroes(0, 512, true).is_err());
        assert_eq!(image.contents(), (0..4096).map(pattern).collect::<Vec<_>>());
    }
}
