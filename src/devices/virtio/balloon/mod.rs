//! virtio-balloon (device ID 5): memory the guest gives back to the host.
//!
//! Two ways back:
//! - **Inflating** (Firecracker's `amount_mib`): the host sets a target in the
//!   configuration space and raises a configuration interrupt; the guest's driver takes
//!   that many pages out of use and sends their page frame numbers on the inflate queue;
//!   the device drops them from the host's memory. Deflating hands them back to the guest
//!   (the host has nothing to do: a page faults back in when the guest touches it).
//! - **Free page reporting** (VIRTIO_BALLOON_F_REPORTING): the guest, unasked, reports
//!   ranges of memory it freed (2 MiB blocks in Linux) on the reporting queue, and the
//!   device drops them. This is what makes an idle VM shrink after a burst.
//!
//! The stats queue (VIRTIO_BALLOON_F_STATS_VQ) carries the guest's memory statistics:
//! the driver posts one buffer, the device keeps it and hands it back every
//! `stats_polling_interval_s`, and the driver answers with a fresh one.
//!
//! - `device.rs`: [`Balloon`], features, the configuration space, the queues.
//! - `request.rs`: what the guest controls (page frame numbers, reported ranges, the
//!   statistics buffer), pure functions checked against guest memory.
//! - `discard.rs`: giving a guest range back to the host (madvise).
//! - `event_handler.rs`: the event-loop side (queue eventfds and the statistics timer).
//! - `persist.rs`: [`BalloonState`], what a snapshot keeps.

mod device;
mod discard;
mod event_handler;
mod persist;
pub mod request;

use serde::{Deserialize, Serialize};

pub use device::{Balloon, BalloonStatistics, QUEUE_SIZE};
pub use discard::discard_range;
pub use persist::BalloonState;
pub use request::BalloonStats;

/// The balloon as configured (`--balloon`, the config file's `"balloon"`, the API's
/// `PUT /balloon`); Firecracker's fields plus `free_page_reporting`, which is on unless
/// turned off: giving freed memory back is why one has a balloon here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The target: how much of the guest's memory the balloon should hold.
    pub amount_mib: u32,
    /// The guest may take pages back from the balloon when it runs out of memory (and
    /// then keeps counting them in its MemTotal).
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// How often the guest's statistics are refreshed; 0 turns the statistics off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// The guest reports the memory it frees and the host drops it.
    #[serde(default = "default_true")]
    pub free_page_reporting: bool,
}

fn default_true() -> bool {
    true
}

/// A MiB in 4 KiB balloon pages.
pub const PAGES_PER_MIB: u32 = 256;

impl BalloonConfig {
    /// `amount_mib` in balloon pages (4 KiB, whatever the guest's page size).
    pub fn target_pages(&self) -> u32 {
        self.amount_mib.saturating_mul(PAGES_PER_MIB)
    }

    /// Refuses a target larger than the guest's memory.
    pub fn check_amount(amount_mib: u32, mem_size_mib: u64) -> Result<(), BalloonError> {
        if u64::from(amount_mib) > mem_size_mib {
            return Err(BalloonError::TooLarge {
                amount_mib,
                mem_size_mib,
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("cannot set up the balloon's queues")]
    Queues(#[source] crate::devices::virtio::QueueSetupError),
    #[error("cannot create the balloon's statistics timer")]
    Timer(#[source] std::io::Error),
    #[error("the balloon's amount_mib ({amount_mib}) is larger than the guest's memory ({mem_size_mib} MiB)")]
    TooLarge { amount_mib: u32, mem_size_mib: u64 },
    #[error(
        "statistics cannot be turned {0} once the microVM runs (the guest's driver set up \
         its queues at boot)"
    )]
    StatsToggle(&'static str),
    #[error("the balloon's statistics are off (stats_polling_interval_s is 0)")]
    StatsOff,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_firecracker_fields_and_reporting_on_by_default() {
        let config: BalloonConfig = serde_json::from_str(r#"{"amount_mib": 64}"#).unwrap();
        assert_eq!(
            config,
            BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: false,
                stats_polling_interval_s: 0,
                free_page_reporting: true,
            }
        );
        assert_eq!(config.target_pages(), 64 * 256);
        let full: BalloonConfig = serde_json::from_str(
            r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 5,
                "free_page_reporting": false}"#,
        )
        .unwrap();
        assert!(full.deflate_on_oom && !full.free_page_reporting);
        assert_eq!(full.stats_polling_interval_s, 5);
        assert!(serde_json::from_str::<BalloonConfig>(r#"{"amount_mib": 1, "x": 1}"#).is_err());
        assert!(serde_json::from_str::<BalloonConfig>(r#"{"deflate_on_oom": true}"#).is_err());
        assert!(serde_json::from_str::<BalloonConfig>(r#"{"amount_mib": -1}"#).is_err());
    }

    #[test]
    fn the_target_fits_in_the_guest() {
        assert!(BalloonConfig::check_amount(512, 512).is_ok());
        let err = BalloonConfig::check_amount(513, 512).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the balloon's amount_mib (513) is larger than the guest's memory (512 MiB)"
        );
        assert_eq!(
            BalloonConfig {
                amount_mib: u32::MAX,
                deflate_on_oom: false,
                stats_polling_interval_s: 0,
                free_page_reporting: true
            }
            .target_pages(),
            u32::MAX
        );
    }
}
