//! virtio-blk over a raw disk image: one request queue served on the event-loop thread.
//!
//! - `device.rs`: the [`Block`] device: features, configuration space, activation, and
//!   the queue loop.
//! - `request.rs`: parsing and executing one request from a descriptor chain, the code that
//!   handles what the guest controls; pure functions over guest memory and a [`Backend`], so
//!   a fuzz target can drive [`process_chain`] with a [`MemoryDisk`].
//! - `disk.rs`: the host side, a locked raw image file read and written with
//!   pread/pwrite straight into guest memory.
//! - `event_handler.rs`: the event-manager subscriber that watches the queue's eventfd
//!   and the rate limiter's timer, and pauses and resumes.
//! - `persist.rs`: [`BlockState`], what a snapshot keeps of the device.
//!
//! The device is shared as `Arc<Mutex<Block>>`: the transport reaches it through
//! `VirtioDevice` on vCPU threads, and the same `Arc` is added to the event manager, which
//! implements `MutEventSubscriber` for `Arc<Mutex<T>>`.

mod counted;
mod device;
mod disk;
mod event_handler;
mod persist;
pub mod request;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::rate_limiter::RateLimiterConfig;

pub use device::Block;
pub use disk::DiskFile;
pub use persist::BlockState;
pub use request::{process_chain, transfer_len, Backend, DiskParams, MemoryDisk};

/// Bytes in a sector, the unit of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Longest disk ID the guest can read (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// A disk as configured: inert data, checked by `VmConfig::validate` and again when the
/// device is built. `--disk` syntax: see `crate::config::specs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// The raw image file (or block device).
    pub path: PathBuf,
    /// Opened read-only, shared-locked, and offered to the guest with VIRTIO_BLK_F_RO.
    #[serde(default)]
    pub read_only: bool,
    /// What the guest reads with VIRTIO_BLK_T_GET_ID (its serial), at most [`ID_BYTES`].
    #[serde(default)]
    pub id: Option<String>,
    /// Bytes read or written (`bandwidth`) and requests (`ops`); the default limits
    /// nothing.
    #[serde(default)]
    pub rate_limiter: RateLimiterConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image \"{path}\"")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the size of disk image \"{path}\"")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image \"{path}\" is {size} bytes, not a multiple of 512")]
    NotSectorMultiple { path: PathBuf, size: u64 },
    #[error("disk image \"{path}\" is in use by another process")]
    InUse { path: PathBuf },
    #[error("cannot lock disk image \"{path}\"")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk id \"{id}\" is {len} bytes, longer than {ID_BYTES}")]
    IdTooLong { id: String, len: usize },
    #[error("cannot set up the disk's request queue")]
    Queues(#[source] crate::devices::virtio::QueueSetupError),
    #[error("cannot create the disk's rate limiter")]
    RateLimiter(#[source] std::io::Error),
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Temporary images and guest memory shared by the tests of this folder.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Guest RAM for tests: 16 MiB at 0. Queues sit at 0, data buffers at 1 MiB and up.
    pub const MEM_SIZE: usize = 16 << 20;

    pub fn guest_memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A file in the temporary directory, removed when dropped.
    pub struct TempImage {
        path: PathBuf,
    }

    impl TempImage {
        /// An image of `size` bytes where byte `i` is `pattern(i)`.
        pub fn new(size: usize) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "hearth-blk-{}-{}.img",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let data: Vec<u8> = (0..size).map(pattern).collect();
            std::fs::write(&path, data).unwrap();
            Self { path }
        }

        pub fn path(&self) -> &Path {
            &self.path
        }

        pub fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Recognisable, position-dependent, never all zero over a sector.
    pub fn pattern(i: usize) -> u8 {
        (i % 251) as u8 ^ 0x5a
    }
}
