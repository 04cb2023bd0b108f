//! virtio-vsock (device ID 19) with Firecracker's host side over AF_UNIX.
//!
//! - `device.rs`: [`Vsock`], features, configuration space (the guest CID), activation and
//!   reset, and moving packets between the queues and the muxer.
//! - `event_handler.rs`: the event-loop side (activation hand-off, queue notifications,
//!   the listening socket and every host stream).
//! - `packet.rs`: what the guest controls (headers, TX chains, RX buffers), pure functions a
//!   fuzz target can drive.
//! - `muxer.rs` and `connection.rs`: host connections and their state machine.
//! - `persist.rs`: [`VsockState`], what a snapshot keeps of the device, and the transport
//!   reset event that tells a restored guest its connections are gone.
//!
//! Host processes connect to `uds_path` and write `CONNECT <port>\n` to reach guest port
//! `port`; they read `OK <hostport>\n` once the guest accepts. A guest connecting to host
//! port P reaches whatever listens on `<uds_path>_<P>`.
//!
//! Create one with [`Vsock::new`], share it as `Arc<Mutex<Vsock>>` between the transport
//! and the event manager (it is a `MutEventSubscriber`).

mod connection;
mod device;
mod event_handler;
mod muxer;
pub mod packet;
mod persist;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use device::Vsock;
pub use muxer::port_path;
/// Public for the fuzz target, which checks the device never holds more connections.
pub use muxer::MAX_CONNECTIONS;
pub use persist::VsockState;

/// The host's CID, the only destination the guest can reach.
pub const VSOCK_HOST_CID: u64 = 2;
/// The lowest CID a guest can have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

/// Whether a guest may have this CID: 0-2 are reserved and `u32::MAX` is VMADDR_CID_ANY.
pub fn valid_guest_cid(cid: u64) -> bool {
    (MIN_GUEST_CID..u64::from(u32::MAX)).contains(&cid)
}

/// A vsock device as configured: inert data, checked by `VmConfig::validate` and again
/// when the device is built. `--vsock` syntax: see `crate::config::specs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Where host processes connect; guest connections to host port P go to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is invalid: it must be between 3 and 4294967294")]
    InvalidCid(u64),
    #[error(transparent)]
    Listen(crate::uds::ListenError),
    #[error("cannot listen on \"{path}\"")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the vsock device's queues")]
    Queues(#[source] crate::devices::virtio::QueueSetupError),
}
