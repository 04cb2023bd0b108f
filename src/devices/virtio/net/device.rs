//! The virtio-net device: features, configuration space, activation and reset, and the
//! RX/TX queue processing the event loop drives.
//!
//! TX: every chain the driver posts is copied into a bounce buffer, checked, written to the
//! back end (tap or stream) and returned (length 0), valid or not. A stream that took
//! part of a frame only holds the ring until it took the rest. RX: one frame at a time is
//! read from the back end (called the tap below; a stream behaves the same)
//! into a bounce buffer and copied into the driver's buffers (several with
//! VIRTIO_NET_F_MRG_RXBUF). When the driver has not posted room for it, the frame stays
//! pending, the tap is no longer read and the device waits for the driver's next RX
//! notification: frames are never dropped because the guest is slow.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use super::backend::Backend;
use super::header::{
    bit, finish_rx_header, parse_rx_buffer, prepare_tx_frame, read_tx_frame, FrameError, RxBuffer,
    MAX_BUFFER_LEN, VNET_HDR_LEN,
};
use super::{format_mac, random_mac, NetBackend, NetConfig, NetError};
use crate::devices::virtio::{
    drain_queue, ActivateError, DeviceCore, Drained, Interrupt, VirtioDevice,
};
use crate::metrics::NetMetrics;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::vstate::memory::GuestMemory;

/// Maximum size of the RX and TX queues.
pub const QUEUE_MAX_SIZE: u16 = 256;
pub(super) const QUEUE_MAX_SIZES: [u16; 2] = [QUEUE_MAX_SIZE, QUEUE_MAX_SIZE];
/// The queues, by index.
pub(super) const RX_QUEUE: usize = 0;
pub(super) const TX_QUEUE: usize = 1;

/// Frames (or chains) handled per event before yielding to the rest of the event loop.
const BUDGET: usize = 256;

/// What every back end offers.
const BASE_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF);

/// A tap passes checksum and segmentation offloads both ways (the vnet header).
const AVAIL_FEATURES: u64 = BASE_FEATURES
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN);

/// `struct virtio_net_config` up to `max_virtqueue_pairs`: mac, status, one queue pair.
const CONFIG_LEN: usize = 10;

/// The configuration space for `mac`, link up.
fn config_space(mac: [u8; 6]) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[..6].copy_from_slice(&mac);
    config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    config[8..10].copy_from_slice(&1u16.to_le_bytes());
    config
}

/// The tap offloads (`TUN_F_*`) matching what the driver accepts on receive. The kernel
/// and the virtio spec both tie TSO to checksum offload, and ECN to TSO.
pub(super) fn tap_offloads(features: u64) -> libc::c_uint {
    let mut flags = 0;
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= libc::TUN_F_CSUM;
        if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0
            && features & bit(VIRTIO_NET_F_GUEST_ECN) != 0
        {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

fn return_chain(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        log::warn!("virtio-net: cannot return a descriptor chain: {e}");
    }
}

/// Hands every chain on the TX queue to `handle` and returns it, at most [`BUDGET`] of
/// them: the frame ready for the tap, or why it is malformed (it is dropped). `handle`
/// returns false to hold a frame back (a rate limit): it stays first on the ring and
/// draining stops.
pub(super) fn process_tx_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    features: u64,
    buffer: &mut [u8],
    mut handle: impl FnMut(Result<&[u8], FrameError>) -> bool,
) -> Drained {
    drain_queue(queue, mem, interrupt, BUDGET, |chain| {
        let frame = read_tx_frame(mem, chain, buffer)
            .and_then(|len| prepare_tx_frame(&mut buffer[..len], features).map(|()| len));
        handle(frame.map(|len| &buffer[..len])).then_some(0)
    })
}

enum Delivery {
    Delivered,
    Dropped,
    NoRoom,
}

/// Receive side: the RX buffers taken from the ring but not used yet, and the frame read
/// from the tap but not delivered yet.
pub(super) struct RxState {
    /// With the position in the available ring each was taken from.
    buffers: VecDeque<(u16, RxBuffer)>,
    frame: Vec<u8>,
    pending: Option<usize>,
    metrics: Arc<NetMetrics>,
    /// The pending frame went past the rate limiter already.
    admitted: bool,
}

impl RxState {
    #[cfg(test)]
    pub(super) fn new() -> Self {
        Self::counted_in(Arc::default())
    }

    pub(super) fn counted_in(metrics: Arc<NetMetrics>) -> Self {
        Self {
            buffers: VecDeque::new(),
            frame: vec![0; MAX_BUFFER_LEN],
            pending: None,
            metrics,
            admitted: false,
        }
    }

    /// A frame is waiting for RX buffers (so the tap should not be read).
    pub(super) fn has_pending_frame(&self) -> bool {
        self.pending.is_some()
    }

    /// Where in the available ring the buffers held start, if any is held.
    pub(super) fn first_held(&self) -> Option<u16> {
        self.buffers.front().map(|&(position, _)| position)
    }

    /// Device reset: buffers belong to the old queue, and the frame goes with them.
    pub(super) fn reset(&mut self) {
        self.buffers.clear();
        self.pending = None;
        self.admitted = false;
    }

    /// How many of the buffers held, from the front, the pending frame of `len` needs.
    fn buffers_needed(&self, len: usize, mergeable: bool) -> Option<usize> {
        if !mergeable {
            return self
                .buffers
                .front()
                .filter(|(_, b)| b.capacity() >= len)
                .map(|_| 1);
        }
        let mut total = 0usize;
        for (index, (_, buffer)) in self.buffers.iter().enumerate() {
            total = total.saturating_add(buffer.capacity());
            if total >= len {
                return Some(index + 1);
            }
        }
        None
    }

    /// Copies the pending frame into the driver's buffers, taking more from the ring as
    /// needed. Unusable chains are returned empty on the way.
    fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        features: u64,
        used: &mut bool,
    ) -> Delivery {
        let Some(len) = self.pending else {
            return Delivery::Delivered;
        };
        let mergeable = features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let count = loop {
            if let Some(count) = self.buffers_needed(len, mergeable) {
                break count;
            }
            let too_big = if mergeable {
                // The ring is full of buffers and they still do not hold the frame.
                self.buffers.len() >= usize::from(queue.size())
            } else {
                !self.buffers.is_empty()
            };
            if too_big {
                log::debug!("virtio-net: dropped a {len}-byte RX frame larger than the buffers");
                self.metrics.rx_dropped.inc();
                self.pending = None;
                self.admitted = false;
                return Delivery::Dropped;
            }
            let position = queue.next_avail();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Delivery::NoRoom;
            };
            let head = chain.head_index();
            match parse_rx_buffer(mem, head, chain) {
                Ok(buffer) => self.buffers.push_back((position, buffer)),
                Err(e) => {
                    log::debug!("virtio-net: unusable RX buffer: {e}");
                    return_chain(queue, mem, head, 0);
                    *used = true;
                }
            }
        };

        if let Some(header) = self.frame.first_chunk_mut::<VNET_HDR_LEN>() {
            // `count` is at most the queue size, a u16.
            finish_rx_header(header, count as u16, features);
        }
        let mut offset = 0;
        for (_, buffer) in self.buffers.drain(..count) {
            let written = buffer.write(mem, &self.frame[offset..len]);
            offset += written;
            return_chain(queue, mem, buffer.head(), written as u32);
        }
        *used = true;
        self.pending = None;
        self.metrics.rx_packets.inc();
        self.metrics
            .rx_bytes
            .add(len.saturating_sub(VNET_HDR_LEN) as u64);
        self.admitted = false;
        Delivery::Delivered
    }

    /// [`Self::process_limited`] with nothing limited.
    #[cfg(test)]
    pub(super) fn process(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        features: u64,
        receive: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> (bool, Option<io::Error>) {
        self.process_limited(queue, mem, features, receive, |_| true)
    }

    /// Moves frames from `receive` (the tap) into the guest until there is none left, no
    /// room for the next, `admit` (asked once per frame, with its length) refuses one, or
    /// the budget is spent. A refused frame stays pending, so the tap is not read until
    /// it went. Returns whether any chain was used, and the error that stopped `receive`
    /// other than `WouldBlock`.
    pub(super) fn process_limited(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        features: u64,
        mut receive: impl FnMut(&mut [u8]) -> io::Result<usize>,
        mut admit: impl FnMut(usize) -> bool,
    ) -> (bool, Option<io::Error>) {
        let mut used = false;
        // RX notifications are only wanted while a frame waits for room.
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("virtio-net: cannot disable RX notifications: {e}");
        }
        let mut frames = 0;
        let mut last_no_room = None;
        while frames < BUDGET {
            if self.pending.is_none() {
                match receive(&mut self.frame) {
                    Ok(n) if (VNET_HDR_LEN..=self.frame.len()).contains(&n) => {
                        self.pending = Some(n)
                    }
                    Ok(n) => {
                        // Shorter than a header, or longer than the buffer (truncated).
                        log::debug!("virtio-net: ignored a {n}-byte read from the tap");
                        self.metrics.rx_dropped.inc();
                        frames += 1;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return (used, Some(e)),
                }
            }
            if !self.admitted {
                // The header is the device's, not traffic: only the frame counts.
                let len = self.pending.unwrap_or(0).saturating_sub(VNET_HDR_LEN);
                if !admit(len) {
                    break;
                }
                self.admitted = true;
            }
            match self.deliver(queue, mem, features, &mut used) {
                Delivery::Delivered | Delivery::Dropped => frames += 1,
                Delivery::NoRoom => {
                    // No chain taken since the last try: the ring claims chains it cannot
                    // give (a bad available index). Wait for the next notification.
                    let position = queue.next_avail();
                    if last_no_room == Some(position) {
                        break;
                    }
                    last_no_room = Some(position);
                    match queue.enable_notification(mem) {
                        // Buffers came in while notifications were off: use them.
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            log::warn!("virtio-net: cannot enable RX notifications: {e}");
                            break;
                        }
                    }
                }
            }
        }
        (used, None)
    }
}

/// A virtio-net device on a tap interface or a stream socket.
pub struct Net {
    pub(super) core: DeviceCore,
    pub(super) backend: Backend,
    /// What the back end was opened from, for saving.
    backend_config: NetBackend,
    mac: [u8; 6],
    config: [u8; CONFIG_LEN],
    pub(super) rx: RxState,
    tx_buffer: Vec<u8>,
    /// Event-loop bookkeeping: what the back end is watched for in epoll (empty: not in
    /// it), and whether it broke.
    pub(super) backend_watched: event_manager::EventSet,
    pub(super) backend_failed: bool,
    tx_failures: u64,
    metrics: Arc<NetMetrics>,
    /// Frames to the guest, and frames from it, wait here when they exceed the rate.
    pub(super) rx_limiter: RateLimiter,
    pub(super) tx_limiter: RateLimiter,
}

impl Net {
    /// Opens the back end named in `config` and picks the MAC address.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let backend = Backend::open(&config.backend)?;
        let mac = match config.mac {
            Some(mac) => mac,
            None => random_mac()?,
        };
        // passt takes and gives whole frames: no offloads to offer the guest.
        let features = if backend.offloads() {
            AVAIL_FEATURES
        } else {
            BASE_FEATURES
        };
        let core = DeviceCore::new(features, &QUEUE_MAX_SIZES).map_err(NetError::Queues)?;
        let metrics = Arc::<NetMetrics>::default();
        let rx_limiter =
            RateLimiter::new(&config.rx_rate_limiter).map_err(NetError::RateLimiter)?;
        let tx_limiter =
            RateLimiter::new(&config.tx_rate_limiter).map_err(NetError::RateLimiter)?;
        log::info!(
            "virtio-net: {}, guest MAC {}",
            backend.describe(),
            format_mac(&mac)
        );
        Ok(Self {
            core,
            backend,
            backend_config: config.backend.clone(),
            mac,
            config: config_space(mac),
            rx: RxState::counted_in(metrics.clone()),
            tx_buffer: vec![0; MAX_BUFFER_LEN],
            backend_watched: event_manager::EventSet::empty(),
            backend_failed: false,
            tx_failures: 0,
            metrics,
            rx_limiter,
            tx_limiter,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The configuration in force (the limiters as changed since), for saving.
    pub fn config(&self) -> NetConfig {
        NetConfig {
            backend: self.backend_config.clone(),
            mac: Some(self.mac),
            rx_rate_limiter: self.rx_limiter.config(),
            tx_rate_limiter: self.tx_limiter.config(),
        }
    }

    /// Changes the rate limiters on a running device (`PATCH /network-interfaces`): in
    /// each limiter given, a bucket given replaces the one in force and an omitted one
    /// stays. What a throttle held back is served again, under the new limits.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) {
        for (update, limiter, queue) in [
            (rx, &mut self.rx_limiter, RX_QUEUE),
            (tx, &mut self.tx_limiter, TX_QUEUE),
        ] {
            if let Some(update) = update {
                limiter.update(update);
                if let Err(e) = self.core.queue_events()[queue].write(1) {
                    log::warn!(
                        "virtio-net: cannot wake the event loop after a limiter change: {e}"
                    );
                }
            }
        }
    }

    /// The receive and transmit rate limiters, for their configuration and throttle counts.
    pub fn rate_limiters(&self) -> (&RateLimiter, &RateLimiter) {
        (&self.rx_limiter, &self.tx_limiter)
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What the NIC is on the host (as configured).
    pub fn backend_config(&self) -> &NetBackend {
        &self.backend_config
    }

    /// The back end, for messages.
    pub fn describe_backend(&self) -> String {
        self.backend.describe()
    }

    /// Should the event loop watch the back end for frames?
    pub(super) fn wants_rx(&self) -> bool {
        self.core.is_activated()
            && !self.core.is_paused()
            && !self.rx.has_pending_frame()
            && !self.backend_failed
    }

    /// Should the event loop watch the back end for room to finish a frame?
    pub(super) fn wants_tx_room(&self) -> bool {
        !self.core.is_paused() && !self.backend_failed && self.backend.tx_blocked()
    }

    /// The back end has room again: finish the half-sent frame, then send what the
    /// guest queued meanwhile.
    pub(super) fn process_tx_room(&mut self) {
        match self.backend.flush() {
            Ok(true) => self.process_tx(),
            Ok(false) => {}
            Err(e) => {
                self.metrics.tx_errors.inc();
                log::error!(
                    "virtio-net: cannot send to {}, the guest sends no more: {e}",
                    self.backend.describe()
                );
                self.backend_failed = true;
                // Frames held for it go (dropped) now.
                self.process_tx();
            }
        }
    }

    /// Moves frames from the tap to the guest.
    pub(super) fn process_rx(&mut self) {
        let features = self.core.acked_features();
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let queue = &mut queues[RX_QUEUE];
        let (backend, limiter, metrics) = (&mut self.backend, &mut self.rx_limiter, &self.metrics);
        let (used, error) = self.rx.process_limited(
            queue,
            &active.mem,
            features,
            |buf| backend.read(buf),
            |len| {
                let admitted = limiter.consume_request(len as u64);
                if !admitted {
                    metrics.rx_throttled.inc();
                }
                admitted
            },
        );
        if used {
            active.interrupt.notify_used(queue, &active.mem);
        }
        if let Some(e) = error {
            self.metrics.rx_errors.inc();
            log::error!(
                "virtio-net: cannot read from {}, the guest receives no more: {e}",
                self.backend.describe()
            );
            self.backend_failed = true;
        } else if !self.rx.has_pending_frame() && self.backend.has_buffered_frame() {
            // The budget ran out with frames in our own buffer, which epoll does not see:
            // come back after the rest of the event loop had its turn.
            if let Err(e) = self.core.queue_events()[RX_QUEUE].write(1) {
                log::warn!("virtio-net: cannot requeue RX work: {e}");
            }
        }
    }

    /// Sends the guest's frames to the tap.
    pub(super) fn process_tx(&mut self) {
        let features = self.core.acked_features();
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let (backend, limiter) = (&mut self.backend, &mut self.tx_limiter);
        let failed = self.backend_failed;
        let failures = &mut self.tx_failures;
        let metrics = &self.metrics;
        let drained = process_tx_queue(
            &mut queues[TX_QUEUE],
            &active.mem,
            &active.interrupt,
            features,
            &mut self.tx_buffer,
            |frame| {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        metrics.tx_dropped.inc();
                        log::debug!("virtio-net: dropped a TX frame: {e}");
                        return true;
                    }
                };
                if !failed && backend.tx_blocked() {
                    // Left on the ring until the stream took the half-sent frame.
                    return false;
                }
                let bytes = frame.len().saturating_sub(VNET_HDR_LEN) as u64;
                if !limiter.consume_request(bytes) {
                    metrics.tx_throttled.inc();
                    return false;
                }
                match backend.write(frame) {
                    Ok(_) => {
                        metrics.tx_packets.inc();
                        metrics.tx_bytes.add(bytes);
                    }
                    Err(e) => {
                        metrics.tx_errors.inc();
                        // Once loudly; a tap that is down or a peer that is gone fails
                        // every frame.
                        if *failures == 0 {
                            log::warn!("virtio-net: cannot send to {}: {e}", backend.describe());
                        } else {
                            log::debug!("virtio-net: cannot send to {}: {e}", backend.describe());
                        }
                        *failures += 1;
                    }
                }
                true
            },
        );
        if drained.more {
            // Come back after the rest of the event loop had its turn.
            if let Err(e) = self.core.queue_events()[TX_QUEUE].write(1) {
                log::warn!("virtio-net: cannot requeue TX work: {e}");
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    /// The MAC is only writable in legacy virtio; nothing else is writable at all.
    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.core.check_activation(&mem)?;
        self.backend
            .set_offload(tap_offloads(self.core.acked_features()))
            .map_err(|e| ActivateError::Backend(io::Error::other(e)))?;
        self.rx.reset();
        self.core.activate(mem, interrupt)
    }

    fn reset(&mut self) {
        self.core.deactivate();
        // The held buffers belong to the old rings, and the frame goes with them.
        self.rx.reset();
        if let Err(e) = self.backend.set_offload(0) {
            log::warn!("virtio-net: {e}");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::devices::virtio::net::header::{VirtioNetHdr, ETH_HLEN};
    use crate::devices::virtio::read_config_space;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    pub(crate) const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    pub(crate) const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    pub(crate) fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// Adds one chain of `(address, length, flags)` descriptors at table index `first`.
    pub(crate) fn add_chain(
        mock: &MockSplitQueue<GuestMemory>,
        first: u16,
        descs: &[(u64, u32, u16)],
    ) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let index = first + i as u16;
                let last = i + 1 == descs.len();
                let flags = if last { flags & !NEXT } else { flags | NEXT };
                RawDescriptor::from(Descriptor::new(addr, len, flags, index + 1))
            })
            .collect();
        mock.add_desc_chains(&raw, first).unwrap();
    }

    /// The used ring's entries as (head, length).
    pub(crate) fn used_entries(mock: &MockSplitQueue<GuestMemory>) -> Vec<(u32, u32)> {
        let count = mock.used().idx().load();
        (0..count)
            .map(|i| {
                let elem = mock.used().ring().ref_at(i as usize).unwrap().load();
                (elem.id(), elem.len())
            })
            .collect()
    }

    fn tx_frame(payload_len: usize) -> Vec<u8> {
        let mut frame = VirtioNetHdr::default().to_bytes().to_vec();
        frame.extend((0..payload_len).map(|i| (i % 251) as u8));
        frame
    }

    const ALL: u64 = AVAIL_FEATURES;

    fn interrupt() -> (Interrupt, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (Interrupt::new(irq.try_clone().unwrap()), irq)
    }

    #[test]
    fn config_space_reads() {
        let config = config_space([2, 1, 2, 3, 4, 5]);
        let mut data = [0xaa; 4];
        read_config_space(&config, 0, &mut data);
        assert_eq!(data, [2, 1, 2, 3]);
        read_config_space(&config, 6, &mut data);
        assert_eq!(data, [1, 0, 1, 0]); // link up, one queue pair
        let mut data = [0xaa; 4];
        read_config_space(&config, 8, &mut data);
        assert_eq!(data, [1, 0, 0, 0]);
        let mut data = [0xaa; 4];
        read_config_space(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_space(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn offloads_follow_receive_features() {
        assert_eq!(tap_offloads(0), 0);
        // TSO without checksum offload is meaningless to the tap.
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tap_offloads(ALL),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
    }

    #[test]
    fn tx_sends_valid_frames_and_returns_every_chain() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let good = tx_frame(60);
        mem.write_slice(&good[..5], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&good[5..], GuestAddress(0x11_0000))
            .unwrap();
        // 0: header split across two descriptors, payload in the second.
        add_chain(&mock, 0, &[(0x10_0000, 5, 0), (0x11_0000, 67, 0)]);
        // 2: shorter than a header.
        add_chain(&mock, 2, &[(0x10_0000, 8, 0)]);
        // 3: a device-writable descriptor.
        add_chain(&mock, 3, &[(0x10_0000, 5, 0), (0x11_0000, 67, WRITE)]);
        // 5: longer than any frame.
        add_chain(&mock, 5, &[(0x10_0000, 0x2_0000, 0)]);
        // 6: outside guest memory.
        add_chain(&mock, 6, &[(0x1_0000_0000, 100, 0)]);
        // 7: the good frame again, in one descriptor.
        mem.write_slice(&good, GuestAddress(0x12_0000)).unwrap();
        add_chain(&mock, 7, &[(0x12_0000, good.len() as u32, 0)]);

        let mut queue: Queue = mock.create_queue().unwrap();
        let mut buffer = vec![0; MAX_BUFFER_LEN];
        let mut sent = Vec::new();
        let (interrupt, irq) = interrupt();
        let mut dropped = 0;
        let drained = process_tx_queue(&mut queue, &mem, &interrupt, ALL, &mut buffer, |frame| {
            match frame {
                Ok(frame) => sent.push(frame.to_vec()),
                Err(_) => dropped += 1,
            }
            true
        });
        assert_eq!(
            drained,
            Drained {
                used: true,
                more: false
            }
        );
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(sent, [good.clone(), good]);
        assert_eq!(
            used_entries(&mock),
            [(0, 0), (2, 0), (3, 0), (5, 0), (6, 0), (7, 0)]
        );
        assert_eq!(dropped, 4);
    }

    fn rx_frame(state: &mut RxState, payload_len: usize, tag: u8) -> Vec<u8> {
        let mut frame = VirtioNetHdr {
            num_buffers: 0xeeee,
            ..VirtioNetHdr::default()
        }
        .to_bytes()
        .to_vec();
        frame.extend((0..payload_len).map(|i| tag.wrapping_add(i as u8)));
        state.frame[..frame.len()].copy_from_slice(&frame);
        state.pending = Some(frame.len());
        frame
    }

    fn read_back(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }

    fn no_more_frames(_: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    #[test]
    fn rx_frame_in_one_buffer() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        add_chain(&mock, 0, &[(0x10_0000, 2048, WRITE)]);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut state = RxState::new();
        let frame = rx_frame(&mut state, 100, 7);

        let (used, error) = state.process(&mut queue, &mem, ALL, no_more_frames);
        assert!(used && error.is_none());
        assert!(!state.has_pending_frame());
        assert_eq!(used_entries(&mock), [(0, frame.len() as u32)]);
        let delivered = read_back(&mem, 0x10_0000, frame.len());
        assert_eq!(
            VirtioNetHdr::from_bytes(delivered.first_chunk().unwrap()).num_buffers,
            1
        );
        assert_eq!(delivered[VNET_HDR_LEN..], frame[VNET_HDR_LEN..]);
        let metrics = &state.metrics;
        assert_eq!((metrics.rx_packets.get(), metrics.rx_bytes.get()), (1, 100));
    }

    /// A frame the RX limiter refuses stays pending (the tap is not read meanwhile) and is
    /// asked about once more when it goes, with its length without the header; a frame
    /// with no room yet is not charged twice.
    #[test]
    fn rx_frames_wait_for_the_limiter() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut state = RxState::new();
        let mut reads = 0;
        let mut one_frame = |buf: &mut [u8]| {
            reads += 1;
            if reads > 1 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let frame = tx_frame(100);
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        };
        let mut asked = Vec::new();
        let (used, error) = state.process_limited(&mut queue, &mem, ALL, &mut one_frame, |len| {
            asked.push(len);
            false
        });
        assert!(!used && error.is_none());
        assert!(state.has_pending_frame());
        assert_eq!(asked, [100]);
        // Admitted now, but no buffer yet: pending, and charged once only.
        let (used, _) = state.process_limited(&mut queue, &mem, ALL, &mut one_frame, |len| {
            asked.push(len);
            true
        });
        assert!(!used && state.has_pending_frame());
        add_chain(&mock, 0, &[(0x10_0000, 2048, WRITE)]);
        let (used, _) = state.process_limited(&mut queue, &mem, ALL, &mut one_frame, |len| {
            asked.push(len);
            true
        });
        assert!(used && !state.has_pending_frame());
        assert_eq!(asked, [100, 100]);
        assert_eq!(reads, 2);
        assert_eq!(used_entries(&mock), [(0, (VNET_HDR_LEN + 100) as u32)]);
    }

    /// A frame the TX limiter refuses stays first on the ring, sent after.
    #[test]
    fn tx_frames_wait_for_the_limiter() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let good = tx_frame(60);
        mem.write_slice(&good, GuestAddress(0x12_0000)).unwrap();
        add_chain(&mock, 0, &[(0x12_0000, good.len() as u32, 0)]);
        add_chain(&mock, 1, &[(0x12_0000, good.len() as u32, 0)]);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut buffer = vec![0; MAX_BUFFER_LEN];
        let (interrupt, _irq) = interrupt();
        let mut sent = 0;
        let mut allowance = 1;
        let mut admit = |frame: Result<&[u8], FrameError>| {
            assert_eq!(frame.map(<[u8]>::len).ok(), Some(good.len()));
            allowance > 0 && {
                allowance -= 1;
                sent += 1;
                true
            }
        };
        process_tx_queue(&mut queue, &mem, &interrupt, ALL, &mut buffer, &mut admit);
        assert_eq!((sent, used_entries(&mock).len()), (1, 1));
        assert_eq!(queue.next_avail(), 1);
        process_tx_queue(&mut queue, &mem, &interrupt, ALL, &mut buffer, |_| {
            sent += 1;
            true
        });
        assert_eq!((sent, used_entries(&mock)), (2, vec![(0, 0), (1, 0)]));
    }

    #[test]
    fn rx_frame_across_mergeable_buffers() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        // Three buffers of 64 bytes (the second split in two descriptors), then one more.
        add_chain(&mock, 0, &[(0x10_0000, 64, WRITE)]);
        add_chain(&mock, 1, &[(0x11_0000, 30, WRITE), (0x11_1000, 34, WRITE)]);
        add_chain(&mock, 3, &[(0x12_0000, 64, WRITE)]);
        add_chain(&mock, 4, &[(0x13_0000, 64, WRITE)]);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut state = RxState::new();
        let frame = rx_frame(&mut state, 150, 1); // 162 bytes: 64 + 64 + 34

        let (used, _) = state.process(&mut queue, &mem, ALL, no_more_frames);
        assert!(used);
        assert_eq!(used_entries(&mock), [(0, 64), (1, 64), (3, 34)]);
        let mut delivered = read_back(&mem, 0x10_0000, 64);
        delivered.extend(read_back(&mem, 0x11_0000, 30));
        delivered.extend(read_back(&mem, 0x11_1000, 34));
        delivered.extend(read_back(&mem, 0x12_0000, 34));
        let header = VirtioNetHdr::from_bytes(delivered.first_chunk().unwrap());
        assert_eq!(header.num_buffers, 3);
        assert_eq!(delivered[VNET_HDR_LEN..], frame[VNET_HDR_LEN..]);

        // The fourth buffer stays with the device for the next frame.
        let frame = rx_frame(&mut state, 20, 9);
        state.process(&mut queue, &mem, ALL, no_more_frames);
        assert_eq!(used_entries(&mock)[3], (4, frame.len() as u32));
    }

    #[test]
    fn rx_keeps_the_frame_until_buffers_arrive() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut state = RxState::new();
        let frame = rx_frame(&mut state, 1000, 3);
        let mut reads = 0;
        let mut count_reads = |_: &mut [u8]| -> io::Result<usize> {
            reads += 1;
            Err(io::ErrorKind::WouldBlock.into())
        };

        // No buffers: the frame waits and the tap is not read.
        let (used, _) = state.process(&mut queue, &mem, ALL, &mut count_reads);
        assert!(!used && state.has_pending_frame());
        // Too little room in a first buffer: still waiting, nothing returned yet.
        add_chain(&mock, 0, &[(0x10_0000, 512, WRITE)]);
        let (used, _) = state.process(&mut queue, &mem, ALL, &mut count_reads);
        assert!(!used && state.has_pending_frame());
        assert!(used_entries(&mock).is_empty());
        // Enough room: delivered in two buffers, then the tap is read again.
        add_chain(&mock, 1, &[(0x11_0000, 1024, WRITE)]);
        let (used, _) = state.process(&mut queue, &mem, ALL, &mut count_reads);
        assert!(used && !state.has_pending_frame());
        assert_eq!(reads, 1);
        assert_eq!(
            used_entries(&mock),
            [(0, 512), (1, frame.len() as u32 - 512)]
        );
    }

    /// The held buffers' place in the ring, which a snapshot gives back to the driver.
    #[test]
    fn rx_knows_where_the_held_buffers_start() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        add_chain(&mock, 0, &[(0x10_0000, 2048, WRITE)]);
        add_chain(&mock, 1, &[(0x11_0000, 64, WRITE)]);
        add_chain(&mock, 2, &[(0x12_0000, 64, WRITE)]);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut state = RxState::new();
        assert_eq!(state.first_held(), None);
        rx_frame(&mut state, 100, 0);
        state.process(&mut queue, &mem, ALL, no_more_frames);
        assert_eq!(state.first_held(), None);
        // 1000 bytes: both small buffers are taken and held, waiting for more.
        rx_frame(&mut state, 1000, 0);
        state.process(&mut queue, &mem, ALL, no_more_frames);
        assert!(state.has_pending_frame());
        assert_eq!(state.first_held(), Some(1));
        assert_eq!(queue.next_avail(), 3);
        state.reset();
        assert_eq!(state.first_held(), None);
    }

    #[test]
    fn rx_returns_unusable_buffers_empty() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        add_chain(&mock, 0, &[(0x10_0000, 64, 0)]); // device-readable
        add_chain(&mock, 1, &[(0x10_0000, 4, WRITE)]); // smaller than a header
        add_chain(&mock, 2, &[(0x10_0000, 2048, WRITE)]);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut state = RxState::new();
        let frame = rx_frame(&mut state, 60, 0);
        state.process(&mut queue, &mem, ALL, no_more_frames);
        assert_eq!(
            used_entries(&mock),
            [(0, 0), (1, 0), (2, frame.len() as u32)]
        );
    }

    #[test]
    fn rx_without_mergeable_buffers_uses_one_buffer() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        add_chain(&mock, 0, &[(0x10_0000, 64, WRITE)]);
        add_chain(&mock, 1, &[(0x11_0000, 2048, WRITE)]);
        let mut queue: Queue = mock.create_queue().unwrap();
        let features = ALL & !bit(VIRTIO_NET_F_MRG_RXBUF);
        let mut state = RxState::new();

        // Too big for the buffer at the head of the ring: dropped, the buffer kept.
        rx_frame(&mut state, 100, 0);
        let (used, _) = state.process(&mut queue, &mem, features, no_more_frames);
        assert!(!used && !state.has_pending_frame());
        let frame = rx_frame(&mut state, 40, 0);
        state.process(&mut queue, &mem, features, no_more_frames);
        assert_eq!(used_entries(&mock), [(0, frame.len() as u32)]);
        let delivered = read_back(&mem, 0x10_0000, VNET_HDR_LEN);
        assert_eq!(
            VirtioNetHdr::from_bytes(delivered.first_chunk().unwrap()).num_buffers,
            1
        );
    }

    #[test]
    fn rx_reads_frames_from_the_tap_until_it_is_empty() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        for i in 0..4 {
            add_chain(
                &mock,
                i,
                &[(0x10_0000 + u64::from(i) * 0x1_0000, 2048, WRITE)],
            );
        }
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut state = RxState::new();
        let mut queued: VecDeque<Vec<u8>> = (0..3u8)
            .map(|tag| {
                let mut frame = vec![0; VNET_HDR_LEN];
                frame.extend(std::iter::repeat_n(tag, ETH_HLEN + tag as usize));
                frame
            })
            .collect();
        let (used, error) = state.process(&mut queue, &mem, ALL, |buf| match queued.pop_front() {
            Some(frame) => {
                buf[..frame.len()].copy_from_slice(&frame);
                Ok(frame.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        });
        assert!(used && error.is_none());
        assert_eq!(used_entries(&mock), [(0, 26), (1, 27), (2, 28)]);
        assert_eq!(
            read_back(&mem, 0x12_0000 + VNET_HDR_LEN as u64, 16),
            [2; 16]
        );
    }

    #[test]
    fn rx_ignores_impossible_reads() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        add_chain(&mock, 0, &[(0x10_0000, 2048, WRITE)]);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut state = RxState::new();
        let mut reads = [4, MAX_BUFFER_LEN + 1].into_iter();
        let (used, error) = state.process(&mut queue, &mem, ALL, |_| {
            reads.next().ok_or_else(|| io::ErrorKind::WouldBlock.into())
        });
        assert!(!used && error.is_none() && !state.has_pending_frame());
        assert_eq!(state.metrics.rx_dropped.get(), 2);
        assert_eq!(state.metrics.rx_packets.get(), 0);
        let (_, error) = state.process(&mut queue, &mem, ALL, |_| {
            Err(io::Error::from_raw_os_error(libc::EBADFD))
        });
        assert_eq!(error.unwrap().raw_os_error(), Some(libc::EBADFD));
    }

    #[test]
    fn a_bad_available_index_does_not_hang() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        // More chains claimed than the ring holds: virtio-queue refuses to iterate.
        mock.avail().idx().store(100);
        let mut buffer = vec![0; MAX_BUFFER_LEN];
        let (interrupt, _irq) = interrupt();
        let drained = process_tx_queue(&mut queue, &mem, &interrupt, ALL, &mut buffer, |_| true);
        assert!(!drained.used);

        let mut state = RxState::new();
        rx_frame(&mut state, 60, 0);
        let (used, _) = state.process(&mut queue, &mem, ALL, no_more_frames);
        assert!(!used && state.has_pending_frame());
    }
}
