//! The virtio-vsock device: feature bits, configuration space, reset, and moving packets
//! between the queues and the [`Muxer`].
//!
//! Activation and reset happen on vCPU threads through the shared [`DeviceCore`], which
//! wakes the event loop (`event_handler.rs`); it runs [`Vsock::process_tx`] and
//! [`Vsock::process_rx`] and keeps the host sockets' watches in line with the muxer.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;

use event_manager::EventSet;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::muxer::Muxer;
use super::packet::{self, MAX_PACKET_LEN, MAX_PAYLOAD_LEN};
use super::{valid_guest_cid, VsockConfig, VsockError};
use crate::devices::virtio::{drain_queue, ActivateError, DeviceCore, Interrupt, VirtioDevice};
use crate::vstate::memory::GuestMemory;

/// `VIRTIO_ID_VSOCK`.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// RX, TX and event queues.
pub const QUEUE_SIZES: [u16; 3] = [256; 3];
pub(super) const RX_QUEUE: usize = 0;
pub(super) const TX_QUEUE: usize = 1;
/// Only for VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, which only snapshot restore needs; its
/// eventfd is never watched.
pub(super) const EVENT_QUEUE: usize = 2;
const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;

pub struct Vsock {
    pub(super) core: DeviceCore,
    guest_cid: u64,
    config_space: [u8; 8],
    pub(super) muxer: Muxer,
    /// The host fds the event loop watches, and for what.
    pub(super) watched_host: HashMap<RawFd, EventSet>,
    /// Restored from a snapshot: the guest's connections are gone, which it learns at
    /// activation.
    pub(super) announce_reset: bool,
    /// A TRANSPORT_RESET was posted at this activation (see
    /// [`Vsock::repeat_reset_interrupt`]).
    pub(super) reset_posted: bool,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    pub(super) uds_path: std::path::PathBuf,
}

impl Vsock {
    /// Validates the CID and listens on `uds_path` (replacing a stale socket, refusing
    /// anything else that is there).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if !valid_guest_cid(config.guest_cid) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        let path = &config.uds_path;
        let listener = crate::uds::listen_fresh(path).map_err(VsockError::Listen)?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Bind {
                path: path.clone(),
                source,
            })?;
        let core = DeviceCore::new(AVAIL_FEATURES, &QUEUE_SIZES).map_err(VsockError::Queues)?;
        Ok(Self {
            core,
            guest_cid: config.guest_cid,
            config_space: config.guest_cid.to_le_bytes(),
            muxer: Muxer::new(config.guest_cid, path.clone(), listener),
            watched_host: HashMap::new(),
            announce_reset: false,
            reset_posted: false,
            tx_buf: vec![0; MAX_PACKET_LEN],
            rx_buf: vec![0; MAX_PAYLOAD_LEN],
            uds_path: path.clone(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<crate::metrics::VsockMetrics> {
        self.muxer.metrics()
    }

    /// Live connections (host- or guest-initiated).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// True between activate and reset.
    pub fn is_active(&self) -> bool {
        self.core.is_activated()
    }

    /// Hands every TX packet to the muxer, then delivers what it has for the guest.
    pub fn process_tx(&mut self) {
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let (muxer, tx_buf) = (&mut self.muxer, &mut self.tx_buf);
        let mem = &active.mem;
        drain_queue(
            &mut queues[TX_QUEUE],
            mem,
            &active.interrupt,
            usize::MAX,
            |chain| {
                match packet::read_tx_packet(mem, chain, tx_buf) {
                    Ok((header, len)) => {
                        muxer.handle_tx(&header, &tx_buf[packet::HDR_LEN..packet::HDR_LEN + len])
                    }
                    Err(e) => log::debug!("virtio-vsock: dropping a TX packet: {e}"),
                }
                Some(0)
            },
        );
        self.process_rx();
    }

    /// Fills RX buffers with what the muxer has for the guest.
    pub fn process_rx(&mut self) {
        if !self.muxer.has_rx() {
            return;
        }
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let (muxer, rx_buf) = (&mut self.muxer, &mut self.rx_buf);
        let mem = &active.mem;
        drain_queue(
            &mut queues[RX_QUEUE],
            mem,
            &active.interrupt,
            usize::MAX,
            |chain| {
                if !muxer.has_rx() {
                    return None;
                }
                let len = match packet::parse_rx_buffer(mem, chain) {
                    Ok(buffer) => {
                        // None: nothing after all (a host stream had no data); the
                        // buffer stays with the driver.
                        let (header, len) = muxer.next_rx(&mut rx_buf[..buffer.max_payload()])?;
                        buffer.write_packet(mem, &header, &rx_buf[..len])
                    }
                    Err(e) => {
                        log::debug!("virtio-vsock: dropping an RX buffer: {e}");
                        0
                    }
                };
                Some(len as u32)
            },
        );
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    /// The guest CID, read-only.
    fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.core.activate(mem, interrupt)?;
        if std::mem::take(&mut self.announce_reset) {
            self.send_transport_reset();
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.core.deactivate();
        // The guest forgot its connections; the host streams close.
        self.muxer.reset();
    }
}

#[cfg(test)]
pub(super) mod tests;
