//! The virtio-vsock device: feature bits, configuration space, activation and reset, and
//! moving packets between the queues and the [`Muxer`].
//!
//! Activation and reset happen on vCPU threads; they only swap state and wake the event
//! loop through `activate_evt`. The event loop (`event_handler.rs`) then watches or
//! unwatches the queue eventfds and runs [`Vsock::process_tx`] and [`Vsock::process_rx`].

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use event_manager::EventSet;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::{self, MAX_PACKET_LEN, MAX_PAYLOAD_LEN};
use super::{valid_guest_cid, VsockConfig, VsockError};
use crate::devices::virtio::{
    read_config_space, ActivateError, ActiveQueue, Interrupt, VirtioDevice,
};
use crate::uds::connect_nonblocking;
use crate::vstate::memory::GuestMemory;

/// `VIRTIO_ID_VSOCK`.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// RX, TX and event queues.
pub const QUEUE_SIZES: [u16; 3] = [256; 3];
const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;

/// What the device holds while the driver has it running.
pub(super) struct ActiveState {
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) rx: ActiveQueue,
    pub(super) tx: ActiveQueue,
    /// Only for VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, which only snapshot restore needs.
    pub(super) event: ActiveQueue,
}

pub struct Vsock {
    guest_cid: u64,
    config_space: [u8; 8],
    pub(super) muxer: Muxer,
    /// Written on activate and reset to wake the event loop.
    pub(super) activate_evt: EventFd,
    pub(super) active: Option<ActiveState>,
    /// Queue eventfds of a previous activation, closed once the event loop unwatched them.
    pub(super) retired_notify: Vec<EventFd>,
    /// The RX and TX notify eventfds the event loop watches.
    pub(super) watched_queues: Option<(RawFd, RawFd)>,
    /// The host fds the event loop watches, and for what.
    pub(super) watched_host: HashMap<RawFd, EventSet>,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    uds_path: std::path::PathBuf,
}

impl Vsock {
    /// Validates the CID and listens on `uds_path` (replacing a stale socket, refusing
    /// anything else that is there).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if !valid_guest_cid(config.guest_cid) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        let path = &config.uds_path;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(VsockError::NotASocket { path: path.clone() })
            }
            Ok(_) => match connect_nonblocking(path) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                        path: path.clone(),
                        source,
                    })?;
                }
                _ => return Err(VsockError::InUse { path: path.clone() }),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VsockError::Inspect {
                    path: path.clone(),
                    source,
                })
            }
        }
        let bind_error = |source| VsockError::Bind {
            path: path.clone(),
            source,
        };
        let listener = crate::uds::bind(path).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        Ok(Self {
            guest_cid: config.guest_cid,
            config_space: config.guest_cid.to_le_bytes(),
            muxer: Muxer::new(config.guest_cid, path.clone(), listener),
            activate_evt,
            active: None,
            retired_notify: Vec::new(),
            watched_queues: None,
            watched_host: HashMap::new(),
            tx_buf: vec![0; MAX_PACKET_LEN],
            rx_buf: vec![0; MAX_PAYLOAD_LEN],
            uds_path: path.clone(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Live connections (host- or guest-initiated).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// True between activate and reset.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Hands every TX packet to the muxer, then delivers what it has for the guest.
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let muxer = &mut self.muxer;
        let tx_buf = &mut self.tx_buf;
        let used = drain_queue(&mut active.tx.queue, &active.mem, |queue, mem| {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return false;
            };
            let head = chain.head_index();
            match packet::read_tx_packet(mem, chain, tx_buf) {
                Ok((header, len)) => {
                    muxer.handle_tx(&header, &tx_buf[packet::HDR_LEN..packet::HDR_LEN + len])
                }
                Err(e) => log::debug!("virtio-vsock: dropping a TX packet: {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::warn!("virtio-vsock: cannot return TX descriptor {head}: {e}");
            }
            true
        });
        if used {
            active
                .interrupt
                .notify_used(&mut active.tx.queue, &active.mem);
        }
        self.process_rx();
    }

    /// Fills RX buffers with what the muxer has for the guest.
    pub fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let muxer = &mut self.muxer;
        let rx_buf = &mut self.rx_buf;
        let used = drain_queue(&mut active.rx.queue, &active.mem, |queue, mem| {
            if !muxer.has_rx() {
                return false;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return false;
            };
            let head = chain.head_index();
            let len = match packet::parse_rx_buffer(mem, chain) {
                Ok(buffer) => match muxer.next_rx(&mut rx_buf[..buffer.max_payload()]) {
                    Some((header, len)) => buffer.write_packet(mem, &header, &rx_buf[..len]),
                    None => {
                        // Nothing after all (a host stream had no data): keep the buffer.
                        queue.go_to_previous_position();
                        return false;
                    }
                },
                Err(e) => {
                    log::debug!("virtio-vsock: dropping an RX buffer: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len as u32) {
                log::warn!("virtio-vsock: cannot return RX descriptor {head}: {e}");
            }
            true
        });
        if used {
            active
                .interrupt
                .notify_used(&mut active.rx.queue, &active.mem);
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Runs `step` until it returns false with notifications disabled, then re-enables them
/// and goes on if the driver added buffers meanwhile. Returns whether `step` ever ran to
/// completion (a used buffer was added).
fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut step: impl FnMut(&mut Queue, &GuestMemory) -> bool,
) -> bool {
    let mut used = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("virtio-vsock: cannot disable queue notifications: {e}");
            break;
        }
        let mut progressed = false;
        while step(queue, mem) {
            progressed = true;
            used = true;
        }
        match queue.enable_notification(mem) {
            // More buffers arrived; serve them only if the last round made progress, so a
            // broken ring or an empty muxer cannot spin.
            Ok(true) if progressed => {}
            Ok(_) => break,
            Err(e) => {
                log::warn!("virtio-vsock: cannot enable queue notifications: {e}");
                break;
            }
        }
    }
    used
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-vsock: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        let count = queues.len();
        let Ok([mut rx, mut tx, mut event]) = <[ActiveQueue; 3]>::try_from(queues) else {
            return Err(ActivateError::BadQueues(format!(
                "virtio-vsock has 3 queues, got {count}"
            )));
        };
        let event_idx = features & AVAIL_FEATURES & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for queue in [&mut rx, &mut tx, &mut event] {
            queue.queue.set_event_idx(event_idx);
            if !queue.queue.is_valid(&mem) {
                return Err(ActivateError::BadQueues(
                    "a virtio-vsock queue is not in guest memory".into(),
                ));
            }
        }
        self.activate_evt.write(1).map_err(ActivateError::Backend)?;
        if let Some(old) = self.active.take() {
            self.retire(old);
        }
        self.active = Some(ActiveState {
            mem,
            interrupt,
            rx,
            tx,
            event,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(old) = self.active.take() {
            self.retire(old);
        }
        // The guest forgot its connections; the host streams close.
        self.muxer.reset();
        if let Err(e) = self.activate_evt.write(1) {
            log::warn!("virtio-vsock: cannot wake the event loop for reset: {e}");
        }
    }
}

impl Vsock {
    fn retire(&mut self, old: ActiveState) {
        self.retired_notify
            .extend([old.rx.notify, old.tx.notify, old.event.notify]);
    }
}

#[cfg(test)]
pub(super) mod tests;
