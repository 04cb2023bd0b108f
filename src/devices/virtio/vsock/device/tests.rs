//! The queue side of the device, driven directly (`process_tx`/`process_rx`) with mock
//! rings in guest memory, activation checks, EVENT_IDX, and `Vsock::new`'s checks of its
//! socket path. [`Driver`] is shared with the event-loop tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::muxer::tests::TempDir;
use super::super::packet::{
    VsockHeader, HDR_LEN, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, TYPE_STREAM,
};
use super::super::port_path;
use super::super::VSOCK_HOST_CID;
use super::*;
use crate::devices::virtio::device::test_util::configure_queue;
use crate::devices::virtio::{ActivateError, Interrupt};
use crate::uds::ListenError;
use crate::vstate::memory::GuestMemory;

pub(crate) const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub(crate) const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub(crate) const GUEST_CID: u64 = 3;
/// Entries of each mock ring. `MockSplitQueue::create` (virtio-queue 0.18) puts the used
/// ring `RING_SIZE` *bytes* after the avail ring, so avail slots from `(RING_SIZE - 4) / 2`
/// on and `used_event` overlap the used ring: rings are made large enough that tests
/// never reach that far (fewer than 120 chains and 32 used entries each).
const RING_SIZE: u16 = 256;
/// Descriptors (and buffers) each ring cycles through.
const DESC_SLOTS: u16 = 16;
/// Bytes of each RX or TX buffer; buffer `i` of a ring is at `buffers + i * BUF_SIZE`.
pub(crate) const BUF_SIZE: u64 = 0x1000;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

pub(crate) fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// A device listening in a fresh temporary directory.
pub(crate) fn new_vsock() -> (TempDir, PathBuf, Vsock) {
    let dir = TempDir::new("vsock");
    let uds = dir.path().join("v.sock");
    let vsock = Vsock::new(&VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: uds.clone(),
    })
    .unwrap();
    (dir, uds, vsock)
}

/// One ring as the driver sees it, its descriptors pointing at its own buffers (buffer
/// `i` goes with descriptor `i`).
pub(crate) struct Ring<'a> {
    pub(crate) mock: MockSplitQueue<'a, GuestMemory>,
    mem: &'a GuestMemory,
    buffers: u64,
    next_desc: u16,
    seen_used: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemory, ring: u64, buffers: u64) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(ring), RING_SIZE),
            mem,
            buffers,
            next_desc: 0,
            seen_used: 0,
        }
    }

    fn buffer(&self, desc: u16) -> u64 {
        self.buffers + u64::from(desc) * BUF_SIZE
    }

    /// Makes one chain of `(length, flags)` descriptors, each at the start of its own
    /// buffer; `fill` writes the buffers first. Returns the head's index.
    pub(crate) fn add(&mut self, descs: &[(u32, u16)], fill: impl FnOnce(&[u64])) -> u16 {
        let count = descs.len() as u16;
        if self.next_desc + count > DESC_SLOTS {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        let addrs: Vec<u64> = (first..first + count).map(|i| self.buffer(i)).collect();
        fill(&addrs);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(len, flags))| {
                let index = first + i as u16;
                let flags = if i + 1 == descs.len() {
                    flags & !NEXT
                } else {
                    flags | NEXT
                };
                RawDescriptor::from(Descriptor::new(addrs[i], len, flags, index + 1))
            })
            .collect();
        self.mock.add_desc_chains(&raw, first).unwrap();
        self.next_desc += count;
        first
    }

    /// Used entries as (head, length), all of them.
    pub(crate) fn used(&self) -> Vec<(u32, u32)> {
        let count = self.mock.used().idx().load();
        (0..count)
            .map(|i| {
                let at = usize::from(i % RING_SIZE);
                let elem = self.mock.used().ring().ref_at(at).unwrap().load();
                (elem.id(), elem.len())
            })
            .collect()
    }

    /// Used entries not returned by an earlier call.
    fn new_used(&mut self) -> Vec<(u32, u32)> {
        let used = self.used();
        let new = used[usize::from(self.seen_used)..].to_vec();
        self.seen_used = used.len() as u16;
        new
    }

    /// Sets `used_event` (after the avail ring) for VIRTIO_RING_F_EVENT_IDX.
    pub(crate) fn set_used_event(&self, value: u16) {
        let addr = self.mock.avail_addr().0 + 4 + 2 * u64::from(RING_SIZE);
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }
}

/// The guest driver: RX, TX and event rings, the interrupt, and once activated the
/// device's RX and TX queue eventfds (what KVM signals on QueueNotify).
pub(crate) struct Driver<'a> {
    mem: &'a GuestMemory,
    pub(crate) rx: Ring<'a>,
    pub(crate) tx: Ring<'a>,
    pub(crate) event: Ring<'a>,
    kicks: Option<(EventFd, EventFd)>,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) irq: EventFd,
}

impl<'a> Driver<'a> {
    /// Rings in the 64 KiB at `base`, buffers in the 192 KiB at `base + 0x1_0000`.
    pub(crate) fn new(mem: &'a GuestMemory, base: u64) -> Self {
        let buffers = base + 0x1_0000;
        let ring_bytes = u64::from(DESC_SLOTS) * BUF_SIZE;
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        Self {
            mem,
            rx: Ring::new(mem, base, buffers),
            tx: Ring::new(mem, base + 0x4000, buffers + ring_bytes),
            event: Ring::new(mem, base + 0x8000, buffers + 2 * ring_bytes),
            kicks: None,
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            irq,
        }
    }

    /// What the transport does before DRIVER_OK: points the device's queues at this
    /// driver's rings and acks `features`.
    pub(crate) fn configure(&self, vsock: &mut Vsock, features: u64) {
        let rings = [&self.rx, &self.tx, &self.event];
        for (queue, ring) in vsock.queues_mut().iter_mut().zip(rings) {
            let template: Queue = ring.mock.create_queue().unwrap();
            configure_queue(queue, &template);
        }
        vsock.set_acked_features(features);
    }

    pub(crate) fn activate(&mut self, vsock: &mut Vsock, features: u64) {
        self.configure(vsock, features);
        vsock
            .activate(self.mem.clone(), self.interrupt.clone())
            .unwrap();
        let events = vsock.queue_events();
        self.kicks = Some((
            events[RX_QUEUE].try_clone().unwrap(),
            events[TX_QUEUE].try_clone().unwrap(),
        ));
    }

    /// The driver notifies the RX queue (after an `activate`).
    pub(crate) fn kick_rx(&self) {
        self.kicks.as_ref().unwrap().0.write(1).unwrap();
    }

    /// The driver notifies the TX queue (after an `activate`).
    pub(crate) fn kick_tx(&self) {
        self.kicks.as_ref().unwrap().1.write(1).unwrap();
    }

    /// Posts `count` one-descriptor RX buffers of [`BUF_SIZE`] bytes.
    pub(crate) fn post_rx(&mut self, count: usize) {
        for _ in 0..count {
            self.rx.add(&[(BUF_SIZE as u32, WRITE)], |_| {});
        }
    }

    /// Queues a TX packet, header and payload in separate descriptors.
    pub(crate) fn send(&mut self, header: VsockHeader, payload: &[u8]) {
        let header = VsockHeader {
            len: payload.len() as u32,
            ..header
        };
        let mem = self.mem;
        let fill = |addrs: &[u64]| {
            mem.write_slice(&header.to_bytes(), GuestAddress(addrs[0]))
                .unwrap();
            if let Some(&addr) = addrs.get(1) {
                mem.write_slice(payload, GuestAddress(addr)).unwrap();
            }
        };
        if payload.is_empty() {
            self.tx.add(&[(HDR_LEN as u32, 0)], fill);
        } else {
            self.tx
                .add(&[(HDR_LEN as u32, 0), (payload.len() as u32, 0)], fill);
        }
    }

    /// The packets the device put in RX buffers since the last call.
    pub(crate) fn received(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        self.rx
            .new_used()
            .into_iter()
            .map(|(head, len)| {
                assert!(len as usize >= HDR_LEN, "RX entry of {len} bytes");
                let mut data = vec![0u8; len as usize];
                let addr = self.rx.buffer(head as u16);
                self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
                let header = VsockHeader::from_bytes(data[..HDR_LEN].try_into().unwrap());
                assert_eq!(header.len as usize, data.len() - HDR_LEN);
                (header, data.split_off(HDR_LEN))
            })
            .collect()
    }

    /// Interrupts raised since the last call.
    pub(crate) fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}

/// A guest packet header to the host.
pub(crate) fn guest_header(op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

pub(crate) fn ops(packets: &[(VsockHeader, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

fn vsock_error(guest_cid: u64, uds_path: &Path) -> VsockError {
    match Vsock::new(&VsockConfig {
        guest_cid,
        uds_path: uds_path.to_path_buf(),
    }) {
        Ok(_) => panic!("Vsock::new accepted CID {guest_cid} at {uds_path:?}"),
        Err(e) => e,
    }
}

#[test]
fn features_and_config_space() {
    let (_dir, _uds, mut vsock) = new_vsock();
    assert_eq!(vsock.device_type(), 19);
    let sizes: Vec<u16> = vsock.queues().iter().map(|q| q.max_size()).collect();
    assert_eq!(sizes, [256, 256, 256]);
    assert_eq!(vsock.queue_events().len(), 3);
    assert_eq!(vsock.avail_features(), VERSION_1 | EVENT_IDX);
    assert_eq!(vsock.guest_cid(), GUEST_CID);
    let mut cid = [0xffu8; 8];
    vsock.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut tail = [0xffu8; 4];
    vsock.read_config(6, &mut tail);
    assert_eq!(tail, [0; 4]);
    vsock.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
    // The CID is read-only.
    vsock.write_config(0, &[9; 8]);
    vsock.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
}

#[test]
fn activation_checks_the_queues() {
    let mem = memory();
    let (_dir, _uds, mut vsock) = new_vsock();
    let mut driver = Driver::new(&mem, 0);
    let interrupt = driver.interrupt.clone();
    let activate = |vsock: &mut Vsock| vsock.activate(mem.clone(), interrupt.clone());

    // The driver set nothing up.
    assert!(matches!(
        activate(&mut vsock),
        Err(ActivateError::BadQueues(_))
    ));
    for broken in 0..3 {
        driver.configure(&mut vsock, VERSION_1);
        vsock.queues_mut()[broken].set_ready(false);
        assert!(matches!(
            activate(&mut vsock),
            Err(ActivateError::BadQueues(_))
        ));
        // A descriptor table past the end of guest memory.
        driver.configure(&mut vsock, VERSION_1);
        vsock.queues_mut()[broken].set_desc_table_address(Some(0x3f_f800), Some(0));
        assert!(matches!(
            activate(&mut vsock),
            Err(ActivateError::BadQueues(_))
        ));
    }
    assert!(!vsock.is_active());
    // Nothing woke the event loop.
    assert!(vsock.queue_events().iter().all(|e| e.read().is_err()));

    driver.activate(&mut vsock, VERSION_1);
    assert!(vsock.is_active());
    assert!(vsock.queue_events().iter().all(|e| e.read().unwrap() == 1));
    assert!(matches!(
        activate(&mut vsock),
        Err(ActivateError::AlreadyActive)
    ));
    vsock.reset();
    assert!(!vsock.is_active());
    assert_eq!(vsock.queue_events()[TX_QUEUE].read().unwrap(), 1);
}

#[test]
fn nothing_is_processed_before_activation() {
    let mem = memory();
    let (_dir, _uds, mut vsock) = new_vsock();
    let mut driver = Driver::new(&mem, 0);
    driver.post_rx(1);
    driver.send(guest_header(OP_RW, 1, 2), b"x");
    vsock.process_tx();
    vsock.process_rx();
    assert!(driver.tx.used().is_empty());
    assert!(driver.rx.used().is_empty());
    // Once active, the packet (for no connection) is answered with an RST.
    driver.activate(&mut vsock, VERSION_1);
    vsock.process_tx();
    assert_eq!(driver.tx.used().len(), 1);
    assert_eq!(ops(&driver.received()), [OP_RST]);
}

/// A guest connecting to host port P reaches `<uds>_P`; data flows both ways through the
/// queues.
#[test]
fn guest_connection_through_the_queues() {
    let mem = memory();
    let (_dir, uds, mut vsock) = new_vsock();
    let listener = std::os::unix::net::UnixListener::bind(port_path(&uds, 700)).unwrap();
    let mut driver = Driver::new(&mem, 0);
    driver.activate(&mut vsock, VERSION_1);
    driver.post_rx(4);

    driver.send(guest_header(OP_REQUEST, 9000, 700), b"");
    vsock.process_tx();
    let packets = driver.received();
    assert_eq!(ops(&packets), [OP_RESPONSE]);
    let response = packets[0].0;
    assert_eq!(
        (response.src_cid, response.dst_cid),
        (VSOCK_HOST_CID, GUEST_CID)
    );
    assert_eq!((response.src_port, response.dst_port), (700, 9000));
    assert_eq!(vsock.connection_count(), 1);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // Guest to host, the payload in its own descriptor.
    driver.send(guest_header(OP_RW, 9000, 700), b"from guest");
    vsock.process_tx();
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from guest");
    // Every TX chain comes back with length 0.
    assert!(driver.tx.used().iter().all(|&(_, len)| len == 0));
    assert_eq!(driver.tx.used().len(), 2);

    // Host to guest: the event loop would report the stream readable.
    host.write_all(b"from host").unwrap();
    for (fd, set) in vsock.muxer.watches() {
        vsock.muxer.host_ready(fd, set);
    }
    vsock.process_rx();
    let packets = driver.received();
    assert_eq!(ops(&packets), [OP_RW]);
    assert_eq!(packets[0].1, b"from host");
    assert!(driver.interrupts() > 0);

    // A connection to a port nobody listens on is refused.
    driver.send(guest_header(OP_REQUEST, 9001, 701), b"");
    vsock.process_tx();
    let packets = driver.received();
    assert_eq!(ops(&packets), [OP_RST]);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (701, 9001));
}

/// Chains the parser refuses still go back to the driver, and the queue keeps working.
#[test]
fn malformed_tx_chains_are_returned() {
    let mem = memory();
    let (_dir, _uds, mut vsock) = new_vsock();
    let mut driver = Driver::new(&mem, 0);
    driver.activate(&mut vsock, VERSION_1);
    driver.post_rx(4);
    let header = guest_header(OP_RW, 1, 2);
    let write_header = |addrs: &[u64]| {
        let bytes = VsockHeader { len: 4, ..header }.to_bytes();
        mem.write_slice(&bytes, GuestAddress(addrs[0])).unwrap();
    };

    // Device-writable, as a whole or in its payload.
    driver.tx.add(&[(HDR_LEN as u32 + 4, WRITE)], write_header);
    driver
        .tx
        .add(&[(HDR_LEN as u32, 0), (4, WRITE)], write_header);
    // Shorter than a header.
    driver.tx.add(&[(HDR_LEN as u32 - 1, 0)], write_header);
    driver.tx.add(&[(0, 0)], |_| {});
    // len says 4; the chain holds 3 or 5 bytes of payload, or none.
    driver.tx.add(&[(HDR_LEN as u32, 0), (3, 0)], write_header);
    driver.tx.add(&[(HDR_LEN as u32 + 5, 0)], write_header);
    driver.tx.add(&[(HDR_LEN as u32, 0)], write_header);
    // Past the end of guest memory.
    let tail = driver.tx.add(&[(HDR_LEN as u32, 0)], |_| {});
    let outside = Descriptor::new(0x3f_fff0, HDR_LEN as u32, 0, 0);
    driver
        .tx
        .mock
        .desc_table()
        .store(tail, RawDescriptor::from(outside))
        .unwrap();
    let malformed = 8;

    vsock.process_tx();
    let used = driver.tx.used();
    assert_eq!(used.len(), malformed);
    assert!(used.iter().all(|&(_, len)| len == 0));
    // Dropped, not answered.
    assert!(driver.received().is_empty());
    assert_eq!(driver.interrupts(), 1);

    // A well-formed packet after them is served (an RST: it matches no connection).
    driver.send(header, b"data");
    vsock.process_tx();
    assert_eq!(driver.tx.used().len(), malformed + 1);
    assert_eq!(ops(&driver.received()), [OP_RST]);

    // A packet from another CID is dropped without an answer.
    driver.send(
        VsockHeader {
            src_cid: 42,
            ..header
        },
        b"",
    );
    vsock.process_tx();
    assert_eq!(driver.tx.used().len(), malformed + 2);
    assert!(driver.received().is_empty());
}

/// RX buffers the device cannot write a packet to go back empty; the packet waits for a
/// good one.
#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let mem = memory();
    let (_dir, _uds, mut vsock) = new_vsock();
    let mut driver = Driver::new(&mem, 0);
    driver.activate(&mut vsock, VERSION_1);
    driver.rx.add(&[(BUF_SIZE as u32, 0)], |_| {}); // device-readable
    driver.rx.add(&[(HDR_LEN as u32 - 1, WRITE)], |_| {}); // too small
    driver.send(guest_header(OP_RW, 1, 2), b"");
    vsock.process_tx();
    assert_eq!(
        driver.rx.used().iter().map(|u| u.1).collect::<Vec<_>>(),
        [0, 0]
    );
    assert!(vsock.muxer.has_rx(), "the RST still waits");

    // A header split over two descriptors is fine.
    driver
        .rx
        .add(&[(10, WRITE), (HDR_LEN as u32, WRITE)], |_| {});
    driver.kick_rx();
    vsock.process_rx();
    let used = driver.rx.used();
    assert_eq!(used.len(), 3);
    assert_eq!(used[2].1, HDR_LEN as u32);
    let mut bytes = [0u8; HDR_LEN];
    let head = driver.rx.buffer(used[2].0 as u16);
    mem.read_slice(&mut bytes[..10], GuestAddress(head))
        .unwrap();
    mem.read_slice(&mut bytes[10..], GuestAddress(head + BUF_SIZE))
        .unwrap();
    let rst = VsockHeader::from_bytes(&bytes);
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 2, 1));
    assert!(!vsock.muxer.has_rx());
}

/// With VIRTIO_RING_F_EVENT_IDX the device interrupts only when the driver's
/// `used_event` is crossed; without it, after every batch.
#[test]
fn event_idx_suppresses_interrupts() {
    let mem = memory();
    for (features, suppressed) in [(VERSION_1 | EVENT_IDX, true), (VERSION_1, false)] {
        let (_dir, _uds, mut vsock) = new_vsock();
        let mut driver = Driver::new(&mem, 0);
        driver.activate(&mut vsock, features);
        driver.post_rx(8);
        // Each packet matches no connection: one TX and one RX used entry.
        let mut exchange = |driver: &mut Driver| {
            driver.send(guest_header(OP_RW, 1, 2), b"");
            vsock.process_tx();
            assert_eq!(ops(&driver.received()), [OP_RST]);
            driver.interrupts()
        };

        // used_event 0: the driver wants to hear about used entry 0 of each queue.
        driver.rx.set_used_event(0);
        driver.tx.set_used_event(0);
        assert_eq!(exchange(&mut driver), 2);
        // Still 0: nothing new to signal.
        assert_eq!(exchange(&mut driver), if suppressed { 0 } else { 2 });
        // The driver caught up on RX only.
        driver.rx.set_used_event(2);
        assert_eq!(exchange(&mut driver), if suppressed { 1 } else { 2 });
        driver.rx.set_used_event(3);
        driver.tx.set_used_event(3);
        assert_eq!(exchange(&mut driver), 2);
        if suppressed {
            // The device asks to be kicked as soon as a new buffer is added: avail_event
            // (after the used ring) is where it stopped.
            let addr = driver.tx.mock.used_addr().0 + 4 + 8 * u64::from(RING_SIZE);
            let avail_event: u16 = mem.read_obj(GuestAddress(addr)).unwrap();
            assert_eq!(avail_event, 4);
        }
    }
}

#[test]
fn new_rejects_reserved_and_oversized_cids() {
    let dir = TempDir::new("vsock");
    let uds = dir.path().join("v.sock");
    for cid in [
        0,
        1,
        2,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        u64::MAX,
    ] {
        assert!(
            matches!(vsock_error(cid, &uds), VsockError::InvalidCid(c) if c == cid),
            "{cid}"
        );
        assert!(!uds.exists(), "nothing is created for a bad CID");
    }
    for cid in [3, u64::from(u32::MAX) - 1] {
        let vsock = Vsock::new(&VsockConfig {
            guest_cid: cid,
            uds_path: uds.clone(),
        })
        .unwrap();
        assert_eq!(vsock.guest_cid(), cid);
        drop(vsock);
        assert!(!uds.exists(), "the socket goes with the device");
    }
}

#[test]
fn new_refuses_what_is_not_a_socket() {
    let dir = TempDir::new("vsock");
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        vsock_error(3, &file),
        VsockError::Listen(ListenError::NotASocket { path }) if path == file
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let subdir = dir.path().join("dir");
    std::fs::create_dir(&subdir).unwrap();
    assert!(matches!(
        vsock_error(3, &subdir),
        VsockError::Listen(ListenError::NotASocket { .. })
    ));
    assert!(subdir.is_dir());

    // A symlink is not followed, even to a socket.
    let target = dir.path().join("target.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&target).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(matches!(
        vsock_error(3, &link),
        VsockError::Listen(ListenError::NotASocket { .. })
    ));

    // A path through a regular file cannot be inspected; one through a missing
    // directory cannot be bound.
    assert!(matches!(
        vsock_error(3, &file.join("v.sock")),
        VsockError::Listen(ListenError::Inspect { .. })
    ));
    assert!(matches!(
        vsock_error(3, &dir.path().join("missing/v.sock")),
        VsockError::Listen(ListenError::Bind { .. })
    ));
}

#[test]
fn new_refuses_a_socket_in_use() {
    let dir = TempDir::new("vsock");
    let uds = dir.path().join("v.sock");
    let listener = std::os::unix::net::UnixListener::bind(&uds).unwrap();
    assert!(matches!(
        vsock_error(3, &uds),
        VsockError::Listen(ListenError::InUse { path }) if path == uds
    ));
    // The other process's socket is untouched and still works.
    assert!(UnixStream::connect(&uds).is_ok());
    assert!(listener.accept().is_ok());

    // So is a live vsock device's.
    let (_dir, uds, _vsock) = new_vsock();
    assert!(matches!(
        vsock_error(4, &uds),
        VsockError::Listen(ListenError::InUse { .. })
    ));
    assert!(UnixStream::connect(&uds).is_ok());
}

#[test]
fn new_replaces_a_stale_socket() {
    let dir = TempDir::new("vsock");
    let uds = dir.path().join("v.sock");
    drop(std::os::unix::net::UnixListener::bind(&uds).unwrap());
    assert!(uds.exists());
    assert!(UnixStream::connect(&uds).is_err());
    let vsock = Vsock::new(&VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    })
    .unwrap();
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 1\n").unwrap();
    drop(vsock);
    assert!(!uds.exists());
}
