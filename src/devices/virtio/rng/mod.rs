//! virtio-rng (device ID 4), the entropy device: the guest's hwrng, filled from the host's
//! getrandom, so a guest never waits for its own entropy pool at boot.
//!
//! - `device.rs`: the [`Rng`] device: features, activation, the request queue loop, and
//!   [`fill_chain`], the one function that handles what the guest controls (a chain of
//!   buffers to fill), a pure function of guest memory and an entropy source.
//! - `event_handler.rs`: the event-manager subscriber that watches the queue's eventfd
//!   and the rate limiter's timer, and pauses and resumes.
//! - `persist.rs`: [`RngState`], what a snapshot keeps of the device.
//!
//! The device has no configuration space and offers no device-specific feature. It is
//! shared as `Arc<Mutex<Rng>>` between the transport and the event manager.

mod device;
mod event_handler;
mod persist;

use serde::{Deserialize, Serialize};

use crate::rate_limiter::RateLimiterConfig;

pub use device::{fill_chain, host_entropy, Rng, MAX_REQUEST_BYTES, QUEUE_SIZES};
pub use persist::RngState;

/// The entropy device as configured (the config file's `"rng": {}`, the API's
/// `PUT /entropy`); fields it does not know are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Random bytes handed out (`bandwidth`) and requests (`ops`); the default limits
    /// nothing.
    #[serde(default)]
    pub rate_limiter: RateLimiterConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot set up the entropy device's request queue")]
    Queues(#[source] crate::devices::virtio::QueueSetupError),
    #[error("cannot create the entropy device's rate limiter")]
    RateLimiter(#[source] std::io::Error),
}
