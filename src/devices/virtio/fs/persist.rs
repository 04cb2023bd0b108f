//! What a snapshot keeps of a virtio-fs device: its configuration and the virtio state.
//! Pausing took the rings back from the back end first (`event_handler.rs`), so the
//! queues hold where the back end stopped. A restore connects to the back end the restore
//! names (a fresh one: a back end does not outlive its front end's connection), and the
//! transport's restore activates the device, which hands the back end guest memory and
//! the rings from the saved positions without the guest doing anything.

use serde::{Deserialize, Serialize};

use super::{Fs, FsConfig};
use crate::devices::virtio::persist::{DeviceCoreState, RestoreError};

const DEVICE: &str = "virtio-fs";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    pub config: FsConfig,
    pub core: DeviceCoreState,
}

impl Fs {
    pub fn save(&self) -> FsState {
        FsState {
            config: self.config().clone(),
            core: self.core.save(),
        }
    }

    /// Connects to the back end at `state.config.socket` and puts the saved queues and
    /// features back; the back end must offer the features the saved device offered.
    /// The device is inactive until its transport is restored.
    pub fn restore(state: &FsState) -> Result<Self, RestoreError> {
        let mut fs = Fs::new(&state.config).map_err(|e| RestoreError::Device {
            device: DEVICE,
            source: Box::new(e),
        })?;
        fs.core.restore(&state.core)?;
        Ok(fs)
    }
}
