//! What a snapshot keeps of a virtio-vsock device: the guest CID and the socket path (the
//! caller may choose another path before restoring), and the virtio state.
//!
//! Connections live in host sockets and cannot be saved: a restored device starts with
//! none, and when it is activated it puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event
//! queue, so the guest drops its side of them and reads its CID again (virtio 1.2,
//! 5.10.6.6, what a device does after migration).

use serde::{Deserialize, Serialize};

use super::device::EVENT_QUEUE;
use super::{Vsock, VsockConfig};
use crate::devices::virtio::buffer::parse_writable_chain;
use crate::devices::virtio::drain_queue;
use crate::devices::virtio::persist::{DeviceCoreState, RestoreError};

const DEVICE: &str = "virtio-vsock";
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, in `struct virtio_vsock_event { le32 id; }`.
const EVENT_TRANSPORT_RESET: u32 = 0;
const EVENT_LEN: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub config: VsockConfig,
    pub core: DeviceCoreState,
}

impl Vsock {
    pub fn save(&self) -> VsockState {
        VsockState {
            config: VsockConfig {
                guest_cid: self.guest_cid(),
                uds_path: self.uds_path.clone(),
            },
            core: self.core.save(),
        }
    }

    /// Listens on `state.config`'s socket path and puts the saved queues and features
    /// back. The device is inactive until its transport is restored; its activation
    /// tells the guest that its connections are gone.
    pub fn restore(state: &VsockState) -> Result<Self, RestoreError> {
        let mut vsock = Vsock::new(&state.config).map_err(|e| RestoreError::Device {
            device: DEVICE,
            source: Box::new(e),
        })?;
        vsock.core.restore(&state.core)?;
        vsock.announce_reset = true;
        Ok(vsock)
    }

    /// Raises the interrupt of the TRANSPORT_RESET posted at the activation again. A
    /// restore activates the device before it restores the interrupt controllers, and KVM
    /// delivers an irqfd's edge to an IOAPIC pin from a worker thread, so that first edge
    /// may reach the IOAPIC before its saved state replaces it, and be lost: the guest
    /// would never learn that its connections are gone. Call once the interrupt
    /// controllers are restored; a second edge is at worst a spurious interrupt. Raises it
    /// once: later calls do nothing.
    pub fn repeat_reset_interrupt(&mut self) {
        if !std::mem::take(&mut self.reset_posted) {
            return;
        }
        if let Some((_, active)) = self.core.active() {
            active.interrupt.signal_used_queue();
        }
    }

    /// Puts a TRANSPORT_RESET event in the first usable event buffer. Buffers too small
    /// for an event go back empty.
    pub(super) fn send_transport_reset(&mut self) {
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let mem = &active.mem;
        let mut sent = false;
        drain_queue(
            &mut queues[EVENT_QUEUE],
            mem,
            &active.interrupt,
            usize::MAX,
            |chain| {
                if sent {
                    return None;
                }
                let written = match parse_writable_chain(mem, chain, EVENT_LEN) {
                    Ok(buffer) => buffer
                        .write(mem, &[&EVENT_TRANSPORT_RESET.to_le_bytes()])
                        .unwrap_or_else(|written| written),
                    Err(e) => {
                        log::debug!("virtio-vsock: unusable event buffer: {e}");
                        0
                    }
                };
                sent = written == EVENT_LEN;
                Some(written as u32)
            },
        );
        self.reset_posted = sent;
        if !sent {
            log::warn!("virtio-vsock: no event buffer to tell the guest its connections are gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};

    use super::super::device::tests::{
        guest_header, memory, new_vsock, ops, Driver, BUF_SIZE, WRITE,
    };
    use super::super::device::VIRTIO_ID_VSOCK;
    use super::super::packet::{OP_RST, OP_RW};
    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::persist::test_util::running;
    use crate::devices::virtio::VirtioDevice;

    const VERSION_1: u64 = 1 << 32;

    #[test]
    fn save_restore_save_is_the_same_state() {
        let (_dir, uds, vsock) = new_vsock();
        let state = vsock.save();
        assert_eq!(state.config.uds_path, uds);
        assert_eq!(state.core.queues.len(), 3);
        drop(vsock);
        let json = serde_json::to_string(&state).unwrap();
        let restored = Vsock::restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(restored.device_type(), VIRTIO_ID_VSOCK);
        assert_eq!(restored.save(), state);
        assert!(uds.exists());

        // The socket is still in use by the restored device.
        assert!(matches!(
            Vsock::restore(&state),
            Err(RestoreError::Device { .. })
        ));
    }

    /// The restored, active device tells the guest its connections are gone, then serves
    /// the TX queue from where the saved device stopped.
    #[test]
    fn restored_active_device_resets_the_transport_and_goes_on() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 0);
        let mut event_buffer = 0;
        driver
            .event
            .add(&[(8, WRITE)], |addrs| event_buffer = addrs[0]);
        mem.write_obj(0xffff_ffffu32, GuestAddress(event_buffer))
            .unwrap();
        driver.post_rx(4);
        let (_dir, _uds, state) = {
            let (dir, uds, mut vsock) = new_vsock();
            driver.activate(&mut vsock, VERSION_1);
            driver.send(guest_header(OP_RW, 1, 2), b"before");
            vsock.process_tx();
            assert_eq!(ops(&driver.received()), [OP_RST]);
            (dir, uds, vsock.save())
        };
        assert_eq!(state.core.queues[1].next_avail, 1);
        let _ = driver.interrupts();

        let vsock = Arc::new(Mutex::new(Vsock::restore(&state).unwrap()));
        // Nothing is said before the driver has the device running again.
        assert!(driver.event.used().is_empty());
        MmioTransport::restore(
            vsock.clone(),
            mem.clone(),
            driver.interrupt.clone(),
            &running(VERSION_1),
        )
        .unwrap();
        assert_eq!(driver.event.used(), [(0, EVENT_LEN as u32)]);
        let event: u32 = mem.read_obj(GuestAddress(event_buffer)).unwrap();
        assert_eq!(event, EVENT_TRANSPORT_RESET);
        assert!(driver.interrupts() > 0);
        // Raised again once the interrupt controllers are restored, without a second event.
        lock(&vsock).repeat_reset_interrupt();
        assert!(driver.interrupts() > 0);
        assert_eq!(driver.event.used().len(), 1);

        driver.send(guest_header(OP_RW, 1, 2), b"after");
        lock(&vsock).process_tx();
        assert_eq!(driver.tx.used().len(), 2);
        assert_eq!(ops(&driver.received()), [OP_RST]);
        // Raised again once only.
        let _ = driver.interrupts();
        lock(&vsock).repeat_reset_interrupt();
        assert_eq!(driver.interrupts(), 0);
        // Activated again after a driver reset: nothing more to announce.
        let mut device = lock(&vsock);
        device.reset();
        driver.activate(&mut device, VERSION_1);
        assert_eq!(driver.event.used().len(), 1);
    }

    /// No usable event buffer: the guest cannot be told, and nothing breaks.
    #[test]
    fn transport_reset_without_event_buffers() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 0);
        // Device-readable and too small: both unusable, both returned empty.
        driver.event.add(&[(BUF_SIZE as u32, 0)], |_| {});
        driver.event.add(&[(2, WRITE)], |_| {});
        let (_dir, _uds, state) = {
            let (dir, uds, vsock) = new_vsock();
            (dir, uds, vsock.save())
        };
        let mut vsock = Vsock::restore(&state).unwrap();
        driver.activate(&mut vsock, VERSION_1);
        assert_eq!(driver.event.used(), [(0, 0), (1, 0)]);
        assert!(vsock.is_active());
    }
}
