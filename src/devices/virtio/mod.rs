//! virtio devices over the virtio-mmio transport (virtio 1.x, split virtqueues through the
//! `virtio-queue` crate).
//!
//! The pieces:
//! - [`VirtioDevice`]: what a device (block, net, ...) implements. Its configuration space
//!   and feature bits are reached from vCPU threads through the transport; its queues are
//!   processed on the event-loop thread once the driver has set DRIVER_OK.
//! - `mmio::MmioTransport`: the register window on the MMIO bus.
//! - [`Interrupt`]: the device's interrupt status register and its irqfd.
//!
//! Each device lives in its own folder: device state and queue processing, its event-loop
//! subscriber, and the parsing of what the guest controls (kept small and fuzzable).

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

pub mod block;
pub mod buffer;
pub mod mmio;
pub mod net;
pub mod vsock;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// The device side of virtio-mmio's interrupt: the status the guest reads (and acks) at
/// InterruptStatus/InterruptACK, and the irqfd that raises the device's IOAPIC pin.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver that queues have new used buffers.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver that `queue` has new used buffers, unless the driver suppressed
    /// the interrupt (VIRTIO_F_EVENT_IDX). If the driver's index cannot be read, a
    /// spurious interrupt is better than a driver waiting forever.
    pub fn notify_used(&self, queue: &mut Queue, mem: &GuestMemory) {
        match queue.needs_notification(mem) {
            Ok(false) => {}
            Ok(true) => self.signal_used_queue(),
            Err(e) => {
                log::warn!("virtio: cannot read the driver's used event index: {e}");
                self.signal_used_queue();
            }
        }
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio interrupt not delivered: {e}");
        }
    }

    /// InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Reads `data.len()` bytes at `offset` of a device's configuration space `space`; what
/// lies outside it reads as zero. The guest chooses offset and length.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = space.get(start..) {
        let len = available.len().min(data.len());
        data[..len].copy_from_slice(&available[..len]);
    }
}

/// A queue handed to a device at activation, with the eventfd KVM signals when the
/// driver notifies that queue (an ioeventfd on QueueNotify). The eventfd is a duplicate of
/// the transport's, which stays registered with KVM across resets.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver accepted no usable queue configuration: {0}")]
    BadQueues(String),
    #[error("cannot start the device's backend")]
    Backend(#[source] std::io::Error),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block, 1 = net, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space. Out-of-range parts read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space. Read-only parts ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start serving `queues` with the negotiated `features` (the device turns
    /// on VIRTIO_RING_F_EVENT_IDX in its queues when negotiated). Called on a vCPU thread;
    /// the device hands the work to the event loop.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device (wrote 0 to Status): stop using the queues and the
    /// guest memory. Called on a vCPU thread; the device's event-loop side must unregister
    /// the queue eventfds before it closes them. A later `activate` must work again.
    fn reset(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reads_are_bounded() {
        let space = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 3];
        read_config_space(&space, 2, &mut data);
        assert_eq!(data, [3, 4, 0]);
        read_config_space(&space, 4, &mut data);
        assert_eq!(data, [0, 0, 0]);
        read_config_space(&space, u64::MAX, &mut data);
        assert_eq!(data, [0, 0, 0]);
    }
}
