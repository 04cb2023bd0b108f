//! What a snapshot keeps of a virtio-rng device: its configuration (the rate limiter
//! included) and the virtio state.
//! Requests are filled synchronously, so none is in flight in a paused device: the queue
//! indices say everything.

use serde::{Deserialize, Serialize};

use super::{Rng, RngConfig};
use crate::devices::virtio::persist::{DeviceCoreState, RestoreError};

const DEVICE: &str = "virtio-rng";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub config: RngConfig,
    pub core: DeviceCoreState,
}

impl Rng {
    pub fn save(&self) -> RngState {
        RngState {
            config: self.config(),
            core: self.core.save(),
        }
    }

    /// Puts the saved queue and features back. The device is inactive until its
    /// transport is restored.
    pub fn restore(state: &RngState) -> Result<Self, RestoreError> {
        let mut rng = Rng::new(&state.config).map_err(|e| RestoreError::Device {
            device: DEVICE,
            source: Box::new(e),
        })?;
        rng.core.restore(&state.core)?;
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_queue::QueueT;

    use super::super::device::tests::{memory, new_rng, random, Driver, DATA, VERSION_1, WRITE};
    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::device::test_util::observed_interrupt;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::persist::test_util::running;
    use crate::devices::virtio::VirtioDevice;

    #[test]
    fn save_restore_save_is_the_same_state() {
        let state = new_rng().save();
        assert_eq!(state.core.queues.len(), 1);
        let json = serde_json::to_string(&state).unwrap();
        let restored = Rng::restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(restored.device_type(), 4);
        assert_eq!(restored.save(), state);
        let bytes = postcard::to_stdvec(&state).unwrap();
        assert_eq!(postcard::from_bytes::<RngState>(&bytes).unwrap(), state);

        let mut other = state.clone();
        other.core.avail_features |= 1;
        assert!(matches!(
            Rng::restore(&other),
            Err(RestoreError::Features { .. })
        ));
    }

    /// A device saved while the driver used it comes back active and serves the queue
    /// from where the saved one stopped.
    #[test]
    fn a_restored_active_device_goes_on() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        let (interrupt, _irq) = observed_interrupt();
        let state = {
            let mut rng = new_rng();
            driver
                .activate(&mut rng, interrupt.clone(), VERSION_1)
                .unwrap();
            driver.post(&[(DATA, 32, WRITE)]);
            rng.process_queue();
            rng.save()
        };
        assert_eq!(state.core.queues[0].next_avail, 1);
        assert_eq!(state.core.acked_features, VERSION_1);

        let rng = Arc::new(Mutex::new(Rng::restore(&state).unwrap()));
        assert!(!lock(&rng).is_active());
        // The transport's restore activates the device, as the driver had it.
        MmioTransport::restore(rng.clone(), mem.clone(), interrupt, &running(VERSION_1)).unwrap();
        assert!(lock(&rng).is_active());
        assert_eq!(lock(&rng).queues()[0].next_used(), 1);
        driver.post(&[(DATA + 0x1000, 32, WRITE)]);
        lock(&rng).process_queue();
        assert_eq!(driver.used(), [(0, 32), (1, 32)]);
        assert!(random(&driver.read(DATA + 0x1000, 32)));
        assert_eq!(lock(&rng).save().core, {
            let mut moved = state.core.clone();
            moved.queues[0].next_avail = 2;
            moved.queues[0].next_used = 2;
            moved
        });
    }
}
