//! What a snapshot keeps of the balloon: its configuration (the target in force), the
//! driver's `actual`, the statistics buffer the device holds and the last statistics,
//! and the virtio state. Requests are served synchronously, so none is in flight in a
//! paused device.

use serde::{Deserialize, Serialize};

use super::{Balloon, BalloonConfig, BalloonStats};
use crate::devices::virtio::persist::{DeviceCoreState, RestoreError};

const DEVICE: &str = "virtio-balloon";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub config: BalloonConfig,
    pub actual_pages: u32,
    /// The head of the statistics buffer the driver posted, held until the timer fires.
    pub stats_desc: Option<u16>,
    /// The last statistics, as [`BalloonStats::tagged`] lists them.
    pub stats: Vec<(u16, u64)>,
    pub core: DeviceCoreState,
}

impl Balloon {
    pub fn save(&self) -> BalloonState {
        BalloonState {
            config: self.config(),
            actual_pages: self.actual_pages(),
            stats_desc: self.stats_desc,
            stats: self.latest_stats().tagged(),
            core: self.core.save(),
        }
    }

    /// Puts the saved state back. The device is inactive until its transport is
    /// restored, which activates it when the driver had it running.
    pub fn restore(state: &BalloonState) -> Result<Self, RestoreError> {
        let mut balloon = Balloon::new(&state.config).map_err(|e| RestoreError::Device {
            device: DEVICE,
            source: Box::new(e),
        })?;
        balloon.core.restore(&state.core)?;
        balloon.restore_fields(
            state.actual_pages,
            state.stats_desc,
            BalloonStats::from_tagged(&state.stats),
        );
        Ok(balloon)
    }
}
