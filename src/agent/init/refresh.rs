//! What a VM restored from a template must redo before it serves a container: every clone
//! of a template wakes with the same RNG state and the wall clock of the moment the
//! template was saved, and with disks whose size it learns only when the kernel handles
//! the configuration-change interrupt the VMM sent at the restore.
//!
//! The VM generation ID device makes the kernel reseed on its own as well, but its
//! notification is asynchronous; [`reseed`] is the agent's synchronous guarantee that no
//! container process reads randomness another clone also read.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::sys;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// How long a restored disk may take to show its real size.
const DISK_PATIENCE: Duration = Duration::from_secs(20);

/// Mixes `entropy` into the kernel's input pool, credited (it comes from the host's
/// RNG), and makes the kernel reseed its CRNG from the pool at once, so that the next
/// read of `/dev/urandom` or `getrandom` differs from every other clone's.
pub fn reseed(entropy: &[u8]) -> io::Result<()> {
    let random = OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // The kernel reads `buf` as u32 words; pad to a whole word.
    info.resize(info.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a complete rand_pool_info whose buf_size bytes follow the header,
    // and it outlives the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the wall clock (`CLOCK_REALTIME`) to `ns` since the Unix epoch.
pub fn set_clock(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The sysfs size file of a block device node such as `/dev/vda`.
fn size_file(device: &Path) -> Option<PathBuf> {
    let name = device.strip_prefix("/dev").ok()?;
    let name = name
        .to_str()
        .filter(|n| !n.is_empty() && !n.contains('/'))?;
    Some(Path::new("/sys/class/block").join(name).join("size"))
}

/// Read-ahead of the container's disks, KiB. Every request costs the guest kernel an
/// interrupt and its completion, which are slow when its code is emulated; programs are
/// paged in from a cold cache, so fewer, larger reads start them sooner.
const DISK_READ_AHEAD_KIB: u32 = 4096;

/// Sets the read-ahead of the block device `device` (best effort: a device without the
/// sysfs file is left as it is).
pub fn tune_disk(device: &str) {
    let Some(size) = size_file(Path::new(device)) else {
        return;
    };
    let file = size.with_file_name("queue").join("read_ahead_kb");
    if let Err(e) = sys::write_text(&file, &DISK_READ_AHEAD_KIB.to_string()) {
        log::debug!("cannot set {}: {e}", file.display());
    }
}

/// Waits until the block device `device` has a non-zero size. A template's disks are
/// empty placeholders: the restore gives each its real image and the guest learns the
/// size from the configuration-change interrupt, handled by a kernel worker some time
/// after the vCPUs run. Devices that are not disks of this VM are not waited for.
pub fn wait_for_disk(device: &str) -> io::Result<()> {
    let Some(file) = size_file(Path::new(device)) else {
        return Ok(());
    };
    let deadline = Instant::now() + DISK_PATIENCE;
    let mut pause = Duration::from_millis(1);
    loop {
        match sys::read_text(&file) {
            Ok(text) if text.trim() != "0" => return Ok(()),
            Ok(_) if Instant::now() < deadline => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{device} still has no size after {DISK_PATIENCE:?}"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_files_of_device_nodes() {
        assert_eq!(
            size_file(Path::new("/dev/vda")),
            Some(PathBuf::from("/sys/class/block/vda/size"))
        );
        for other in ["/dev", "/dev/", "/tmp/vda", "/dev/mapper/x", "vda"] {
            assert_eq!(size_file(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn devices_that_are_not_disks_are_not_waited_for() {
        wait_for_disk("/dev/hearth-no-such-disk").unwrap();
        wait_for_disk("/not/a/device").unwrap();
    }
}
