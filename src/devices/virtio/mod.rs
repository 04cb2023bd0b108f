//! virtio devices over the virtio-mmio transport (virtio 1.x, split virtqueues through the
//! `virtio-queue` crate).
//!
//! The pieces:
//! - [`VirtioDevice`] and [`DeviceCore`] (`device.rs`): what a device (block, net, ...)
//!   implements and the lifecycle they all share: queues and queue eventfds owned for
//!   life, `Inactive | Activated`, the activation checks, draining a queue, pausing the
//!   event-loop side. Configuration space and feature bits are reached from vCPU threads
//!   through the transport; queues are processed on the event-loop thread once the
//!   driver has set DRIVER_OK.
//! - `mmio::MmioTransport`: the register window on the MMIO bus.
//! - [`Interrupt`]: the device's interrupt status register and its irqfd.
//! - `persist`: the serde states of queues, devices and the transport, for snapshots.
//!
//! Each device lives in its own folder: device state and queue processing, its event-loop
//! subscriber, and the parsing of what the guest controls (kept small and fuzzable).

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

pub mod balloon;
pub mod block;
pub mod buffer;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
pub mod vsock;

pub use device::{
    drain_queue, ActivateError, ActiveResources, DeviceCore, DeviceState, Drained, Pausable,
    QueueSetupError, VirtioDevice,
};

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

    /// Sets the status from a snapshot; the interrupt it stands for was raised before.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
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
