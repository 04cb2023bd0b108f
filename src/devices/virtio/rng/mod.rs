//! virtio-rng (device ID 4), the entropy device: the guest's hwrng, filled from the host's
//! getrandom, so a guest never waits for its own entropy pool at boot.
//!
//! - `device.rs`: the [`Rng`] device: features, activation, the request queue loop, and
//!   [`fill_chain`], the one function that handles what the guest controls (a chain of
//!   buffers to fill), a pure function of guest memory and an entropy source.
//! - `event_handler.rs`: the event-manager subscriber that watches the queue's eventfd,
//!   and pauses and resumes.
//! - `persist.rs`: [`RngState`], what a snapshot keeps of the device.
//!
//! The device has no configuration space and offers no device-specific feature. It is
//! shared as `Arc<Mutex<Rng>>` between the transport and the event manager.

mod device;
mod event_handler;
mod persist;

use serde::{Deserialize, Serialize};

pub use device::{fill_chain, host_entropy, Rng, MAX_REQUEST_BYTES, QUEUE_SIZES};
pub use persist::RngState;

/// The entropy device as configured. It has no options yet: the struct keeps the config
/// file's `"rng": {}` and the API's `PUT /entropy` body open to some (Firecracker's takes
/// a rate limiter there), and refuses fields it does not know.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {}

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot set up the entropy device's request queue")]
    Queues(#[source] crate::devices::virtio::QueueSetupError),
}
