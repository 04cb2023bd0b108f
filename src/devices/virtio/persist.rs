//! Saveable state of the virtio layer: plain serde structs for a queue, for what every
//! device holds ([`DeviceCore`]) and for the virtio-mmio transport's registers, with the
//! `save` and `restore` that turn live objects into them and back. Each device's folder
//! has a `persist.rs` that adds its own configuration around [`DeviceCoreState`].
//!
//! Saving is meant for a paused device (see `Pausable`), so queue indices do not move
//! under it. Restoring rebuilds a device from its state and new backing (a path, tap or
//! socket the caller may change in the state's configuration first): the device's queues
//! and features come back first, then the transport's registers, which activate the
//! device again when the driver had it running. Activation wakes the event-loop side,
//! which then serves whatever the driver had queued.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
use virtio_queue::{Queue, QueueT};

use super::mmio::MmioTransport;
use super::{ActivateError, DeviceCore, Interrupt, VirtioDevice};
use crate::devices::bus::lock;
use crate::vstate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot rebuild the {device} device")]
    Device {
        device: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the {device} device no longer matches its saved state: {what}")]
    Mismatch { device: &'static str, what: String },
    #[error("the device offers features {current:#x}, the saved one offered {saved:#x}")]
    Features { saved: u64, current: u64 },
    #[error("the device has {current} queues, the saved one had {saved}")]
    QueueCount { saved: usize, current: usize },
    #[error("queue {index} holds at most {current} entries, the saved one {saved}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        current: u16,
    },
    #[error("saved queue {index} is invalid")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("cannot restore into a device the driver is using")]
    Active,
    #[error("the restored device cannot be activated")]
    Activate(#[source] ActivateError),
}

/// One virtqueue: the driver's configuration and the device's position in the rings.
/// Mirrors `virtio_queue::QueueState`, which has no serde support.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<&Queue> for QueueState {
    fn from(queue: &Queue) -> Self {
        let state = queue.state();
        Self {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx: state.event_idx_enabled,
        }
    }
}

impl QueueState {
    /// The queue, refused when its size or ring addresses are impossible.
    fn to_queue(self, index: usize) -> Result<Queue, RestoreError> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|source| RestoreError::Queue { index, source })
    }
}

/// What every virtio device holds: its features and its queues. Whether it is active is
/// the transport's status ([`MmioTransportState::status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCoreState {
    pub avail_features: u64,
    pub acked_features: u64,
    pub queues: Vec<QueueState>,
}

impl DeviceCore {
    pub fn save(&self) -> DeviceCoreState {
        DeviceCoreState {
            avail_features: self.avail_features(),
            acked_features: self.acked_features(),
            queues: self.queues().iter().map(QueueState::from).collect(),
        }
    }

    /// Puts the saved features and queues into this freshly built, inactive device, which
    /// must offer the same features and queues as the saved one.
    pub fn restore(&mut self, state: &DeviceCoreState) -> Result<(), RestoreError> {
        if self.is_activated() {
            return Err(RestoreError::Active);
        }
        if state.avail_features != self.avail_features() {
            return Err(RestoreError::Features {
                saved: state.avail_features,
                current: self.avail_features(),
            });
        }
        if state.queues.len() != self.queues().len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                current: self.queues().len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(self.queues()).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(RestoreError::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    current: current.max_size(),
                });
            }
            queues.push(saved.to_queue(index)?);
        }
        for (slot, queue) in self.queues_mut().iter_mut().zip(queues) {
            *slot = queue;
        }
        self.set_acked_features(state.acked_features);
        Ok(())
    }
}

/// The virtio-mmio registers the driver set, and the interrupt status it has not yet
/// acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
}

impl MmioTransportState {
    /// The driver had the device running: DRIVER_OK, and activation did not fail.
    pub fn device_active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }
}

impl MmioTransport {
    /// Rebuilds the transport of `device`, whose own state must already be restored, and
    /// activates the device when the driver had it running.
    pub fn restore(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        state: &MmioTransportState,
    ) -> Result<Self, RestoreError> {
        interrupt.restore_status(state.interrupt_status);
        if state.device_active() {
            lock(&device)
                .activate(mem.clone(), interrupt.clone())
                .map_err(RestoreError::Activate)?;
        }
        Ok(Self::from_state(device, mem, interrupt, state))
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };

    use super::MmioTransportState;

    /// A transport whose driver negotiated `driver_features` and set DRIVER_OK.
    pub(crate) fn running(driver_features: u64) -> MmioTransportState {
        MmioTransportState {
            driver_features,
            status: VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK,
            ..MmioTransportState::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::vstate::memory::create_guest_memory;

    /// A device with two queues and nothing else.
    struct Plain(DeviceCore);

    impl VirtioDevice for Plain {
        fn device_type(&self) -> u32 {
            0x2a
        }
        fn core(&self) -> &DeviceCore {
            &self.0
        }
        fn core_mut(&mut self) -> &mut DeviceCore {
            &mut self.0
        }
        fn config_space(&self) -> &[u8] {
            &[]
        }
    }

    const FEATURES: u64 = 1 << 32 | 1 << 29;

    fn plain(sizes: &[u16]) -> Arc<Mutex<Plain>> {
        Arc::new(Mutex::new(Plain(DeviceCore::new(FEATURES, sizes).unwrap())))
    }

    fn interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()))
    }

    fn write(transport: &mut MmioTransport, offset: u64, value: u32) {
        transport.write(offset, &value.to_le_bytes());
    }

    /// A driver's bring-up of both queues, up to DRIVER_OK when `run`.
    fn bring_up(transport: &mut MmioTransport, run: bool) {
        write(transport, 0x70, 1);
        write(transport, 0x70, 3);
        write(transport, 0x24, 1);
        write(transport, 0x20, 1);
        write(transport, 0x24, 0);
        write(transport, 0x20, 1 << 29);
        write(transport, 0x70, 0xb);
        for queue in 0..2u32 {
            let base = 0x10000 * (queue + 1);
            write(transport, 0x30, queue);
            write(transport, 0x38, 8);
            write(transport, 0x80, base);
            write(transport, 0x90, base + 0x1000);
            write(transport, 0xa0, base + 0x2000);
            write(transport, 0x44, 1);
        }
        if run {
            write(transport, 0x70, 0xf);
        }
    }

    #[test]
    fn queue_state_round_trips_through_json() {
        let mut queue = Queue::new(256).unwrap();
        queue.set_size(64);
        queue.set_desc_table_address(Some(0x1000), Some(1));
        queue.set_next_avail(300);
        queue.set_next_used(299);
        queue.set_event_idx(true);
        queue.set_ready(true);
        let state = QueueState::from(&queue);
        assert_eq!(state.desc_table, 0x1_0000_1000);
        let json = serde_json::to_string(&state).unwrap();
        let back: QueueState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(QueueState::from(&back.to_queue(0).unwrap()), state);

        let odd = QueueState { size: 3, ..state };
        assert!(matches!(
            odd.to_queue(1),
            Err(RestoreError::Queue { index: 1, .. })
        ));
    }

    #[test]
    fn save_restore_save_is_the_same_state() {
        let mem = create_guest_memory(1 << 20).unwrap();
        for run in [false, true] {
            let device = plain(&[16, 16]);
            let mut transport = MmioTransport::new(device.clone(), mem.clone(), interrupt());
            bring_up(&mut transport, run);
            transport.interrupt().signal_used_queue();
            let transport_state = transport.save();
            let device_state = lock(&device).0.save();
            assert_eq!(transport_state.device_active(), run);
            assert_eq!(device_state.acked_features, FEATURES);
            assert_eq!(device_state.queues[1].avail_ring, 0x21000);

            let restored = plain(&[16, 16]);
            lock(&restored).0.restore(&device_state).unwrap();
            let transport = MmioTransport::restore(
                restored.clone(),
                mem.clone(),
                interrupt(),
                &transport_state,
            )
            .unwrap();
            assert_eq!(transport.save(), transport_state);
            assert_eq!(lock(&restored).0.save(), device_state);
            assert_eq!(lock(&restored).is_activated(), run);
            assert_eq!(transport.interrupt().status(), 1);
        }
    }

    #[test]
    fn restore_refuses_a_different_device() {
        let device_state = lock(&plain(&[16, 16])).0.save();
        let error = lock(&plain(&[16])).0.restore(&device_state).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the device has 1 queues, the saved one had 2"
        );
        let error = lock(&plain(&[16, 32]))
            .0
            .restore(&device_state)
            .unwrap_err();
        assert!(matches!(error, RestoreError::QueueMaxSize { index: 1, .. }));
        let other = Plain(DeviceCore::new(FEATURES | 1, &[16, 16]).unwrap());
        let mut other = other.0;
        assert!(matches!(
            other.restore(&device_state),
            Err(RestoreError::Features { .. })
        ));
    }

    /// A status claiming DRIVER_OK with queues that cannot run is an error, not a device
    /// that touches memory it should not.
    #[test]
    fn restore_refuses_to_activate_unusable_queues() {
        let mem = create_guest_memory(1 << 20).unwrap();
        let state = MmioTransportState {
            status: 0xf,
            ..MmioTransportState::default()
        };
        let result = MmioTransport::restore(plain(&[16]), mem, interrupt(), &state);
        assert!(matches!(result, Err(RestoreError::Activate(_))));
    }
}
