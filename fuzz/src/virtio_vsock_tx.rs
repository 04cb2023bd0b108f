//! `virtio_vsock_tx`: a guest driver and host processes against a live
//! `hearth::devices::virtio::vsock::Vsock`, run by a real `EventManager` as in the VMM.
//! The guest posts TX chains (well-formed packets with fuzzed fields, or raw descriptor
//! tables) and RX buffers on rings in guest memory and kicks the queues' eventfds; host
//! processes connect to the device's Unix socket (`CONNECT <port>`), write, read and hang
//! up. Every input gets a fresh temporary directory (in /dev/shm if there is one) holding the device's socket
//! `v.sock`, listeners on `v.sock_52`, `v.sock_1024` and `v.sock_1234` (guest connections
//! to host ports 52, 1024 and 1234), and decoys a guest must never reach (`v.sock_052`,
//! `v.sock_`, `v.sock52`).
//!
//! Input format:
//!
//! ```text
//! u8      bit 0: negotiate VIRTIO_RING_F_EVENT_IDX
//! ops     until the input ends (at most MAX_OPS), each starting with a byte b % 11:
//!   0     packet: u8 op, u8 ports, u8 flags, u32 buf_alloc, u8 f [u32 fwd_cnt if f odd],
//!         u8 layout, u16 n, n payload bytes. Guest CID 3 to CID 2, STREAM, guest port
//!         0x4000 + (ports & 15), host port [52, 1234, 1024, 1025][(ports >> 4) & 3];
//!         fwd_cnt (f even) is every byte the guest received on that connection
//!   1     raw packet: u8 layout, 44-byte header, u32 n (& 0x1ffff), n payload bytes
//!   2     raw chain: u8 count (% 17), u16 head, count * 16-byte descriptors (the TX
//!         table), u16 n, n bytes written at TX_DATA
//!   3     post RX buffers: u8 c, then 1 + c % 8 times u16 v: a buffer of v & 0x1fff
//!         bytes (at most RX_SLOT_SIZE - 8), in two descriptors if v & 0x8000
//!   4     host connect: u8 p: "CONNECT <0x4000 + p % 16>\n", or if p & 0x80 a raw
//!         line (u8 n, n bytes)
//!   5     host write: u8 stream, u16 n, n bytes
//!   6     host read: u8 stream (reads what is there)
//!   7     host hang-up: u8 stream, u8 how (0 shut writing, 1 shut both, else close)
//!   8     REQUEST burst: u16 n % (MAX_CONNECTIONS + 17) REQUESTs to host port 52
//!   9     device reset (the driver writes 0 to Status) and activation again
//!  10     kick both queues with nothing new
//! layout  bits 0-1: 0 one descriptor, 1 header and payload apart, 2 the header split
//!         at (layout >> 2) % 44, 3 through an indirect table; bit 6: the packet starts
//!         at 0x2fe0 (across regions 0 and 1); bit 7 (raw packet): keep the header's
//!         `len` (otherwise it is the payload's length)
//! ```
//!
//! Checked (beyond "no panic" and "the event loop goes idle"):
//! - `read_tx_packet` (called on every TX chain as the device will see it) returns exactly
//!   the chain's bytes, with a payload of `len` bytes and at most `MAX_PAYLOAD_LEN`;
//!   `parse_rx_buffer` on the same chain counts exactly its bytes;
//! - the device holds at most `MAX_CONNECTIONS` connections;
//! - a host socket is only ever connected right after a guest REQUEST to that port, and
//!   only `v.sock_<port>`: the decoys never see a connection;
//! - every RX buffer used is one the guest posted, once, with a host-to-guest header
//!   (CID 2 to CID 3, STREAM, a known op, `len` only for RW and within the buffer);
//! - an RW to the guest never exceeds the credit the guest last advertised on that
//!   connection (`buf_alloc - (sent - fwd_cnt)`, counting from the connection's start);
//! - a host stream of a guest connection reads a prefix of what the guest sent on it;
//! - TX buffers are returned with length 0.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

use event_manager::{EventManager, SubscriberOps};
use hearth::devices::virtio::vsock::packet::{
    parse_rx_buffer, read_tx_packet, VsockHeader, HDR_LEN, MAX_PACKET_LEN, MAX_PAYLOAD_LEN,
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    TYPE_STREAM,
};
use hearth::devices::virtio::vsock::{Vsock, VsockConfig, MAX_CONNECTIONS, VSOCK_HOST_CID};
use hearth::devices::virtio::{Interrupt, VirtioDevice};
use hearth::vstate::memory::GuestMemory;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Input;

pub const GUEST_CID: u64 = 3;
/// Bounds the work one input can ask for.
pub const MAX_OPS: usize = 256;
/// Entries of each ring.
pub const QUEUE_SIZE: u16 = 16;

/// (descriptor table, available ring, used ring) of RX, TX and event queues, in region 0.
pub const RX_RING: (u64, u64, u64) = (0x400, 0x1100, 0x1800);
pub const TX_RING: (u64, u64, u64) = (0x800, 0x1200, 0x1a00);
pub const EVENT_RING: (u64, u64, u64) = (0xc00, 0x1300, 0x1c00);
/// Where TX packets (and raw chains' memory images) go: region 1, 68 KiB.
pub const TX_DATA: u64 = 0x3000;
pub const TX_DATA_END: u64 = 0x1_4000;
/// A TX packet starting here crosses from region 0 into region 1 inside its header.
pub const TX_ACROSS: u64 = 0x2fe0;
/// The indirect table of indirect TX packets.
pub const INDIRECT_TABLE: u64 = 0x2e00;
/// RX buffer slot `i` uses descriptors `2i` and `2i + 1` and the memory at
/// `RX_DATA + i * RX_SLOT_SIZE`.
pub const RX_SLOTS: usize = 8;
pub const RX_DATA: u64 = 0x1_4000;
pub const RX_SLOT_SIZE: u64 = 0x1800;

/// Host ports of the compact packet op; the first three have listeners.
pub const HOST_PORTS: [u32; 4] = [52, 1234, 1024, 1025];
pub const LISTEN_PORTS: [u32; 3] = [52, 1024, 1234];
pub const GUEST_PORT_BASE: u32 = 0x4000;
pub const BURST_PORT_BASE: u32 = 0x8000;
/// What a guest advertises in the burst and in seeds: Linux's default buffer.
pub const GUEST_BUF_ALLOC: u32 = 256 << 10;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Op codes (first byte of each op, modulo `OPS`).
pub mod op {
    pub const PACKET: u8 = 0;
    pub const RAW_PACKET: u8 = 1;
    pub const RAW_CHAIN: u8 = 2;
    pub const POST_RX: u8 = 3;
    pub const HOST_CONNECT: u8 = 4;
    pub const HOST_WRITE: u8 = 5;
    pub const HOST_READ: u8 = 6;
    pub const HOST_CLOSE: u8 = 7;
    pub const BURST: u8 = 8;
    pub const RESET: u8 = 9;
    pub const KICK: u8 = 10;
    pub const OPS: u8 = 11;
}

/// (host port, guest port), as the muxer keys connections.
type Key = (u32, u32);

/// What one input did, for tests.
#[derive(Debug, Default)]
pub struct Outcome {
    /// TX chains `read_tx_packet` accepted.
    pub tx_packets: usize,
    /// Ops of the packets the guest received, in order.
    pub rx_ops: Vec<u16>,
    /// RW payload bytes the guest received.
    pub rx_data: usize,
    /// Host sockets the guest connected to.
    pub accepted: usize,
    /// Most connections the device held at once.
    pub peak_connections: usize,
    /// Bytes host streams read, all streams in order of reading.
    pub host_read: Vec<u8>,
}

struct HostStream {
    stream: UnixStream,
    /// For a guest connection: what the guest sent on it (the stream reads a prefix).
    expected: Option<Vec<u8>>,
    read: Vec<u8>,
}

/// A posted RX buffer: its descriptors.
#[derive(Clone)]
struct RxPost {
    descs: Vec<(u64, u32)>,
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // tmpfs when there is one: creating and removing sockets on a disk file system
        // costs several times the rest of an input.
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!("hearth-fuzz-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create the fuzz socket directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn listen(path: &Path) -> UnixListener {
    let listener = UnixListener::bind(path).expect("bind a fuzz listener");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    listener
}

fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sets SIGPIPE's disposition to "ignore" (as Rust's own `main` does, which
        // libFuzzer's replaces), so a write to a closed host stream fails with EPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    });
}

struct Harness {
    mem: GuestMemory,
    vsock: Arc<Mutex<Vsock>>,
    manager: EventManager<Arc<Mutex<Vsock>>>,
    features: u64,
    /// The device's RX and TX queue eventfds, what KVM signals on QueueNotify.
    rx_kick: EventFd,
    tx_kick: EventFd,
    interrupt: Arc<Interrupt>,
    uds: PathBuf,
    listeners: Vec<(u32, UnixListener)>,
    decoys: Vec<UnixListener>,

    // The guest driver's rings.
    tx_next: u16,
    tx_used_seen: u16,
    rx_next: u16,
    rx_used_seen: u16,
    rx_posted: [Option<RxPost>; RX_SLOTS],

    // Host processes.
    streams: Vec<Option<HostStream>>,
    /// Guest connections whose REQUEST could not be told apart (burst), kept open.
    unmapped: Vec<UnixStream>,
    host_connects: usize,

    // What the guest told and was told, per connection key.
    /// Valid REQUESTs of the current op, not yet matched to an accepted host socket.
    pending_requests: Vec<Key>,
    /// The credit the guest last advertised: (buf_alloc, fwd_cnt).
    credit: HashMap<Key, (u32, u32)>,
    /// RW bytes sent to the guest since the connection started.
    sent: HashMap<Key, u32>,
    /// The host stream of a guest connection.
    current_stream: HashMap<Key, usize>,

    /// Bounce buffer for `read_tx_packet` ([`MAX_PACKET_LEN`] bytes).
    check_buf: Vec<u8>,
    outcome: Outcome,
    _dir: TempDir,
}

pub fn run(data: &[u8]) -> Outcome {
    ignore_sigpipe();
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut features = 1u64 << VIRTIO_F_VERSION_1;
    if flags & 1 != 0 {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    let mut harness = Harness::new(features);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        harness.step(&mut input);
    }
    harness.finish()
}

impl Harness {
    fn new(features: u64) -> Self {
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        let vsock = Vsock::new(&VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .expect("create the vsock device");
        let listeners = LISTEN_PORTS
            .iter()
            .map(|&port| {
                let path = hearth::devices::virtio::vsock::port_path(&uds, port);
                (port, listen(&path))
            })
            .collect();
        let decoys = ["v.sock_052", "v.sock_", "v.sock52"]
            .iter()
            .map(|name| listen(&dir.0.join(name)))
            .collect();
        let kick = |index: usize| {
            vsock.queue_events()[index]
                .try_clone()
                .expect("duplicate an eventfd")
        };
        let (rx_kick, tx_kick) = (kick(0), kick(1));
        let vsock = Arc::new(Mutex::new(vsock));
        let mut manager = EventManager::new().expect("create an event manager");
        manager.add_subscriber(vsock.clone());
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut harness = Self {
            mem: crate::guest_memory(),
            vsock,
            manager,
            features,
            rx_kick,
            tx_kick,
            interrupt: Arc::new(Interrupt::new(irq)),
            uds,
            listeners,
            decoys,
            tx_next: 0,
            tx_used_seen: 0,
            rx_next: 0,
            rx_used_seen: 0,
            rx_posted: Default::default(),
            streams: Vec::new(),
            unmapped: Vec::new(),
            host_connects: 0,
            pending_requests: Vec::new(),
            credit: HashMap::new(),
            sent: HashMap::new(),
            current_stream: HashMap::new(),
            check_buf: vec![0; MAX_PACKET_LEN],
            outcome: Outcome::default(),
            _dir: dir,
        };
        harness.activate();
        harness
    }

    /// Points a device queue at `ring`, from the state a reset leaves it in, as the driver
    /// does through the transport.
    fn configure(queue: &mut Queue, (desc, avail, used): (u64, u64, u64)) {
        queue.reset();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(desc as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
    }

    /// A queue on `ring` of the harness's own, to pop chains as the device will.
    fn queue(&self, ring: (u64, u64, u64)) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).expect("valid queue size");
        Self::configure(&mut queue, ring);
        queue
    }

    /// DRIVER_OK with fresh rings, as the transport activates the device.
    fn activate(&mut self) {
        let zeroes = vec![0u8; 0x1000];
        self.mem
            .write_slice(&zeroes[..0xc00], GuestAddress(RX_RING.0))
            .expect("rings are guest memory");
        self.mem
            .write_slice(&zeroes[..0xc00], GuestAddress(RX_RING.1))
            .expect("rings are guest memory");
        self.tx_next = 0;
        self.tx_used_seen = 0;
        self.rx_next = 0;
        self.rx_used_seen = 0;
        self.rx_posted = Default::default();
        {
            let mut vsock = lock(&self.vsock);
            let rings = [RX_RING, TX_RING, EVENT_RING];
            for (queue, ring) in vsock.queues_mut().iter_mut().zip(rings) {
                Self::configure(queue, ring);
            }
            vsock.set_acked_features(self.features);
            vsock
                .activate(self.mem.clone(), self.interrupt.clone())
                .expect("the harness's queues are valid");
        }
        self.settle();
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % op::OPS {
            op::PACKET => self.compact_packet(input),
            op::RAW_PACKET => {
                let layout = input.u8();
                let raw = padded(input, HDR_LEN);
                let header = VsockHeader::from_bytes(raw.first_chunk().expect("44 bytes"));
                let len = (input.u32() & 0x1_ffff) as usize;
                let payload = padded(input, len);
                self.send_packet(header, &payload, layout, layout & 0x80 != 0);
            }
            op::RAW_CHAIN => self.raw_chain(input),
            op::POST_RX => self.post_rx(input),
            op::HOST_CONNECT => self.host_connect(input),
            op::HOST_WRITE => {
                let index = input.u8();
                let len = usize::from(input.u16());
                let bytes = padded(input, len);
                if let Some(host) = self.stream(index) {
                    let _ = host.stream.write(&bytes);
                }
                self.settle();
            }
            op::HOST_READ => {
                let index = usize::from(input.u8()) % self.streams.len().max(1);
                self.host_read(index);
                self.settle();
            }
            op::HOST_CLOSE => {
                let index = input.u8();
                let how = input.u8();
                let slot = usize::from(index) % self.streams.len().max(1);
                match (how, self.streams.get_mut(slot)) {
                    (0, Some(Some(host))) => {
                        let _ = host.stream.shutdown(std::net::Shutdown::Write);
                    }
                    (1, Some(Some(host))) => {
                        let _ = host.stream.shutdown(std::net::Shutdown::Both);
                    }
                    (_, Some(host)) => *host = None,
                    _ => {}
                }
                self.settle();
            }
            op::BURST => {
                let count = usize::from(input.u16()) % (MAX_CONNECTIONS + 17);
                self.burst(count);
            }
            op::RESET => {
                lock(&self.vsock).reset();
                self.settle();
                // The guest forgot its connections.
                self.credit.clear();
                self.sent.clear();
                self.current_stream.clear();
                self.activate();
            }
            _ => {
                let _ = self.rx_kick.write(1);
                let _ = self.tx_kick.write(1);
                self.settle();
            }
        }
        self.check_connections();
    }

    fn compact_packet(&mut self, input: &mut Input) {
        let op = u16::from(input.u8());
        let ports = input.u8();
        let flags = u32::from(input.u8());
        let buf_alloc = input.u32();
        let guest_port = GUEST_PORT_BASE + u32::from(ports & 0xf);
        let host_port = HOST_PORTS[usize::from(ports >> 4) & 3];
        let key = (host_port, guest_port);
        let fwd_cnt = if input.u8() & 1 == 0 {
            self.sent.get(&key).copied().unwrap_or(0)
        } else {
            input.u32()
        };
        let layout = input.u8();
        let len = usize::from(input.u16());
        let payload = padded(input, len);
        let header = VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        };
        self.send_packet(header, &payload, layout & 0x7f, false);
    }

    /// Lays out one packet per `layout`, makes it available and kicks the TX queue.
    fn send_packet(&mut self, mut header: VsockHeader, payload: &[u8], layout: u8, keep_len: bool) {
        if !keep_len {
            header.len = payload.len() as u32;
        }
        let mut packet = header.to_bytes().to_vec();
        packet.extend_from_slice(payload);
        let base = if layout & 0x40 != 0 {
            TX_ACROSS
        } else {
            TX_DATA
        };
        let room = (TX_DATA_END - base) as usize;
        packet.truncate(room);
        self.mem
            .write_slice(&packet, GuestAddress(base))
            .expect("TX data area is guest memory");
        let total = packet.len() as u32;
        let hdr = (HDR_LEN as u32).min(total);
        let pieces: Vec<(u64, u32)> = match layout & 3 {
            0 => vec![(base, total)],
            1 => vec![(base, hdr), (base + u64::from(hdr), total - hdr)],
            _ => {
                // split <= hdr <= total.
                let split = (u32::from(layout >> 2) % HDR_LEN as u32).min(hdr);
                vec![
                    (base, split),
                    (base + u64::from(split), hdr - split),
                    (base + u64::from(hdr), total - hdr),
                ]
            }
        };
        let table = if layout & 3 == 3 {
            // The same descriptors in an indirect table.
            let indirect = linked(&pieces, 0, 0);
            let mut raw = Vec::new();
            for d in &indirect {
                raw.extend_from_slice(&encode_desc(d));
            }
            self.mem
                .write_slice(&raw, GuestAddress(INDIRECT_TABLE))
                .expect("indirect table is guest memory");
            vec![Descriptor::new(
                INDIRECT_TABLE,
                raw.len() as u32,
                INDIRECT,
                0,
            )]
        } else {
            linked(&pieces, 0, 0)
        };
        self.write_tx_table(&table);
        self.submit_tx(&[0]);
    }

    fn raw_chain(&mut self, input: &mut Input) {
        let count = usize::from(input.u8() % (QUEUE_SIZE as u8 + 1));
        let head = input.u16();
        let table = input.bytes(count * 16);
        self.mem
            .write_slice(table, GuestAddress(TX_RING.0))
            .expect("TX table is guest memory");
        let len = usize::from(input.u16());
        let image = input.bytes(len);
        let room = (TX_DATA_END - TX_DATA) as usize;
        self.mem
            .write_slice(&image[..image.len().min(room)], GuestAddress(TX_DATA))
            .expect("TX data area is guest memory");
        self.submit_tx(&[head]);
    }

    fn write_tx_table(&self, table: &[Descriptor]) {
        let mut raw = Vec::new();
        for d in table {
            raw.extend_from_slice(&encode_desc(d));
        }
        self.mem
            .write_slice(&raw, GuestAddress(TX_RING.0))
            .expect("TX table is guest memory");
    }

    /// Makes the chains at `heads` available, checks them the way the device will read
    /// them, kicks the TX queue and lets the device run.
    fn submit_tx(&mut self, heads: &[u16]) {
        // Nothing else may be in flight: the model below is for this op's packets.
        self.settle();
        let first = self.tx_next;
        for &head in heads {
            let slot = TX_RING.1 + 4 + 2 * u64::from(self.tx_next % QUEUE_SIZE);
            self.mem
                .write_obj(head, GuestAddress(slot))
                .expect("avail ring is guest memory");
            self.tx_next = self.tx_next.wrapping_add(1);
        }
        self.mem
            .write_obj(self.tx_next, GuestAddress(TX_RING.1 + 2))
            .expect("avail ring is guest memory");

        // The chains as the device will pop them.
        let mut shadow = self.queue(TX_RING);
        shadow.set_next_avail(first);
        let mut buf = std::mem::take(&mut self.check_buf);
        for _ in heads {
            let Some(chain) = shadow.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let descs: Vec<Descriptor> = chain.collect();
            if let Some(header) = self.check_tx_chain(&descs, &mut buf) {
                self.guest_sent(&header, &buf[HDR_LEN..HDR_LEN + header.len as usize]);
            }
        }

        self.check_buf = buf;
        let _ = self.tx_kick.write(1);
        self.settle();
    }

    /// `read_tx_packet` and `parse_rx_buffer` on `descs`; the header if the packet is
    /// valid.
    fn check_tx_chain(&mut self, descs: &[Descriptor], buf: &mut [u8]) -> Option<VsockHeader> {
        let mut bytes = Vec::new();
        let mut readable = true;
        for d in descs {
            // Past the bounce buffer's size the packet is refused anyway.
            if bytes.len() + d.len() as usize > MAX_PACKET_LEN {
                readable = false;
                break;
            }
            let mut part = vec![0u8; d.len() as usize];
            if self.mem.read_slice(&mut part, d.addr()).is_err() {
                readable = false;
                break;
            }
            bytes.extend_from_slice(&part);
        }
        if let Ok(rx) = parse_rx_buffer(&self.mem, descs.iter().copied()) {
            let capacity: usize = descs.iter().map(|d| d.len() as usize).sum();
            assert_eq!(
                rx.capacity(),
                capacity,
                "RX capacity differs from the chain"
            );
            assert!(capacity >= HDR_LEN);
            assert_eq!(rx.max_payload(), (capacity - HDR_LEN).min(MAX_PAYLOAD_LEN));
        }
        let (header, len) = read_tx_packet(&self.mem, descs.iter().copied(), buf).ok()?;
        assert!(readable, "read_tx_packet accepted unreadable descriptors");
        assert!(len <= MAX_PAYLOAD_LEN, "payload of {len} bytes accepted");
        assert_eq!(header.len as usize, len, "payload length differs from len");
        assert_eq!(
            bytes.len(),
            HDR_LEN + len,
            "packet length differs from the chain"
        );
        assert!(
            buf[..HDR_LEN + len] == bytes[..],
            "packet bytes differ from the chain"
        );
        assert_eq!(header.to_bytes()[..], bytes[..HDR_LEN]);
        self.outcome.tx_packets += 1;
        Some(header)
    }

    /// The model's side of a valid TX packet.
    fn guest_sent(&mut self, header: &VsockHeader, payload: &[u8]) {
        if header.src_cid != GUEST_CID
            || header.dst_cid != VSOCK_HOST_CID
            || header.type_ != TYPE_STREAM
        {
            return;
        }
        let key = (header.dst_port, header.src_port);
        self.credit.insert(key, (header.buf_alloc, header.fwd_cnt));
        match header.op {
            OP_REQUEST => self.pending_requests.push(key),
            OP_RW => {
                if let Some(&index) = self.current_stream.get(&key) {
                    if let Some(Some(host)) = self.streams.get_mut(index) {
                        if let Some(expected) = host.expected.as_mut() {
                            expected.extend_from_slice(payload);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn post_rx(&mut self, input: &mut Input) {
        let count = 1 + input.u8() % RX_SLOTS as u8;
        let mut heads = Vec::new();
        for _ in 0..count {
            let v = input.u16();
            let Some(slot) = self.rx_posted.iter().position(Option::is_none) else {
                continue;
            };
            let base = RX_DATA + slot as u64 * RX_SLOT_SIZE;
            let capacity = u32::from(v & 0x1fff).min(RX_SLOT_SIZE as u32 - 8);
            let descs = if v & 0x8000 != 0 {
                let first = capacity / 2;
                // A gap between the two parts.
                vec![
                    (base, first),
                    (base + u64::from(first) + 8, capacity - first),
                ]
            } else {
                vec![(base, capacity)]
            };
            let with_flags: Vec<(u64, u32, u16)> =
                descs.iter().map(|&(a, l)| (a, l, WRITE)).collect();
            let first_index = 2 * slot as u16;
            let table = linked_flags(&with_flags, first_index);
            let mut raw = Vec::new();
            for d in &table {
                raw.extend_from_slice(&encode_desc(d));
            }
            self.mem
                .write_slice(&raw, GuestAddress(RX_RING.0 + 16 * u64::from(first_index)))
                .expect("RX table is guest memory");
            // A stale header would hide one the device did not write.
            self.mem
                .write_slice(&[0xa5; HDR_LEN], GuestAddress(base))
                .expect("RX slot is guest memory");
            self.rx_posted[slot] = Some(RxPost { descs });
            heads.push(first_index);
        }
        for head in heads {
            let at = RX_RING.1 + 4 + 2 * u64::from(self.rx_next % QUEUE_SIZE);
            self.mem
                .write_obj(head, GuestAddress(at))
                .expect("avail ring is guest memory");
            self.rx_next = self.rx_next.wrapping_add(1);
        }
        self.mem
            .write_obj(self.rx_next, GuestAddress(RX_RING.1 + 2))
            .expect("avail ring is guest memory");
        let _ = self.rx_kick.write(1);
        self.settle();
    }

    fn host_connect(&mut self, input: &mut Input) {
        let p = input.u8();
        let line = if p & 0x80 != 0 {
            let n = usize::from(input.u8());
            input.bytes(n).to_vec()
        } else {
            format!("CONNECT {}\n", GUEST_PORT_BASE + u32::from(p & 0xf)).into_bytes()
        };
        // The muxer takes every pending connection each time the loop runs, so the
        // listener's backlog never fills and this never blocks; still, keep it bounded.
        if self.host_connects >= 64 {
            return;
        }
        self.host_connects += 1;
        let Ok(mut stream) = UnixStream::connect(&self.uds) else {
            return;
        };
        stream.set_nonblocking(true).expect("non-blocking stream");
        let _ = stream.write(&line);
        self.streams.push(Some(HostStream {
            stream,
            expected: None,
            read: Vec::new(),
        }));
        self.settle();
    }

    fn stream(&mut self, index: u8) -> Option<&mut HostStream> {
        let count = self.streams.len();
        if count == 0 {
            return None;
        }
        self.streams[usize::from(index) % count].as_mut()
    }

    fn host_read(&mut self, slot: usize) {
        let Some(Some(host)) = self.streams.get_mut(slot) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        loop {
            match host.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        host.read.extend_from_slice(&got);
        if let Some(expected) = &host.expected {
            assert!(
                expected.starts_with(&host.read),
                "a host stream read {} bytes that the guest did not send on it",
                host.read.len()
            );
        }
        self.outcome.host_read.extend_from_slice(&got);
    }

    /// `count` REQUESTs from consecutive guest ports to host port 52, a ring's worth at
    /// a time.
    fn burst(&mut self, count: usize) {
        let mut port = BURST_PORT_BASE;
        let mut left = count;
        while left > 0 {
            let batch = left.min(usize::from(QUEUE_SIZE));
            left -= batch;
            let mut table = Vec::new();
            for i in 0..batch {
                let header = VsockHeader {
                    src_cid: GUEST_CID,
                    dst_cid: VSOCK_HOST_CID,
                    src_port: port,
                    dst_port: LISTEN_PORTS[0],
                    len: 0,
                    type_: TYPE_STREAM,
                    op: OP_REQUEST,
                    flags: 0,
                    buf_alloc: GUEST_BUF_ALLOC,
                    fwd_cnt: 0,
                };
                port += 1;
                let addr = TX_DATA + 64 * i as u64;
                self.mem
                    .write_slice(&header.to_bytes(), GuestAddress(addr))
                    .expect("TX data area is guest memory");
                table.push(Descriptor::new(addr, HDR_LEN as u32, 0, 0));
            }
            self.write_tx_table(&table);
            let heads: Vec<u16> = (0..batch as u16).collect();
            self.submit_tx(&heads);
        }
    }

    /// Runs the event loop until it has nothing to do, then checks what the device did.
    fn settle(&mut self) {
        let mut rounds = 0;
        loop {
            let dispatched = self
                .manager
                .run_with_timeout(0)
                .expect("the event loop runs");
            if dispatched == 0 {
                break;
            }
            rounds += 1;
            assert!(rounds < 10_000, "the vsock event loop never goes idle");
        }
        self.accept_host_sockets();
        self.drain_tx_used();
        self.drain_rx_used();
    }

    /// Host sockets the guest reached, each after a REQUEST to its port.
    fn accept_host_sockets(&mut self) {
        for decoy in &self.decoys {
            assert!(
                decoy.accept().is_err(),
                "a guest connection reached a socket other than <uds>_<port>"
            );
        }
        let mut accepted = Vec::new();
        for (port, listener) in &self.listeners {
            while let Ok((stream, _)) = listener.accept() {
                accepted.push((*port, stream));
            }
        }
        let batch_ok = accepted.len() == self.pending_requests.len();
        for (port, stream) in accepted {
            let at = self
                .pending_requests
                .iter()
                .position(|&(dst, _)| dst == port)
                .unwrap_or_else(|| panic!("host port {port} connected without a REQUEST"));
            let key = self.pending_requests.remove(at);
            self.outcome.accepted += 1;
            stream.set_nonblocking(true).expect("non-blocking stream");
            if !batch_ok {
                // Which REQUEST this is cannot be told for sure: keep it open, unused.
                self.unmapped.push(stream);
                continue;
            }
            self.sent.insert(key, 0);
            self.current_stream.insert(key, self.streams.len());
            self.streams.push(Some(HostStream {
                stream,
                expected: Some(Vec::new()),
                read: Vec::new(),
            }));
        }
        self.pending_requests.clear();
    }

    fn drain_tx_used(&mut self) {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(TX_RING.2 + 2))
            .expect("used ring is guest memory");
        while self.tx_used_seen != idx {
            let at = TX_RING.2 + 4 + 8 * u64::from(self.tx_used_seen % QUEUE_SIZE);
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(at + 4))
                .expect("used ring is guest memory");
            assert_eq!(len, 0, "a TX buffer came back with a length");
            self.tx_used_seen = self.tx_used_seen.wrapping_add(1);
        }
    }

    fn drain_rx_used(&mut self) {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(RX_RING.2 + 2))
            .expect("used ring is guest memory");
        while self.rx_used_seen != idx {
            let at = RX_RING.2 + 4 + 8 * u64::from(self.rx_used_seen % QUEUE_SIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(at))
                .expect("used ring is guest memory");
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(at + 4))
                .expect("used ring is guest memory");
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let slot = (id / 2) as usize;
            let post = id
                .is_multiple_of(2)
                .then(|| self.rx_posted.get_mut(slot).and_then(Option::take))
                .flatten()
                .unwrap_or_else(|| panic!("RX descriptor {id} used but not posted"));
            self.received(&post, len as usize);
        }
    }

    /// One packet the guest received in `post`, `len` bytes.
    fn received(&mut self, post: &RxPost, len: usize) {
        let mut bytes = Vec::new();
        for &(addr, size) in &post.descs {
            let mut part = vec![0u8; size as usize];
            self.mem
                .read_slice(&mut part, GuestAddress(addr))
                .expect("RX buffer is guest memory");
            bytes.extend_from_slice(&part);
        }
        if bytes.len() < HDR_LEN {
            assert_eq!(len, 0, "a too-small RX buffer came back with a length");
            return;
        }
        assert!(
            (HDR_LEN..=bytes.len()).contains(&len),
            "RX used length {len} for a {}-byte buffer",
            bytes.len()
        );
        let header = VsockHeader::from_bytes(bytes.first_chunk().expect("checked above"));
        let payload = &bytes[HDR_LEN..len];
        assert_eq!(
            header.len as usize,
            payload.len(),
            "RX len differs from used"
        );
        assert!(payload.len() <= MAX_PAYLOAD_LEN);
        assert_eq!(
            (header.src_cid, header.dst_cid, header.type_),
            (VSOCK_HOST_CID, GUEST_CID, TYPE_STREAM),
            "RX header not from the host to the guest: {header:?}"
        );
        assert!(
            [
                OP_REQUEST,
                OP_RESPONSE,
                OP_RST,
                OP_SHUTDOWN,
                OP_RW,
                OP_CREDIT_UPDATE,
                OP_CREDIT_REQUEST
            ]
            .contains(&header.op),
            "RX op {}",
            header.op
        );
        assert!(header.op == OP_RW || payload.is_empty());
        self.outcome.rx_ops.push(header.op);
        let key = (header.src_port, header.dst_port);
        match header.op {
            OP_REQUEST => {
                self.sent.insert(key, 0);
            }
            OP_RW => {
                let sent = *self
                    .sent
                    .get(&key)
                    .unwrap_or_else(|| panic!("RW on {key:?}, a connection never started"));
                let (buf_alloc, fwd_cnt) = self.credit.get(&key).copied().unwrap_or((0, 0));
                let in_flight = sent.wrapping_sub(fwd_cnt);
                assert!(
                    in_flight <= buf_alloc && payload.len() as u32 <= buf_alloc - in_flight,
                    "{} bytes sent on {key:?} with {in_flight} in flight and buf_alloc \
                     {buf_alloc} (fwd_cnt {fwd_cnt})",
                    payload.len()
                );
                self.sent
                    .insert(key, sent.wrapping_add(payload.len() as u32));
                self.outcome.rx_data += payload.len();
            }
            _ => {}
        }
    }

    fn check_connections(&mut self) {
        let count = lock(&self.vsock).connection_count();
        assert!(
            count <= MAX_CONNECTIONS,
            "{count} connections, more than {MAX_CONNECTIONS}"
        );
        self.outcome.peak_connections = self.outcome.peak_connections.max(count);
    }

    fn finish(mut self) -> Outcome {
        // Whatever the host can still read must match too.
        for slot in 0..self.streams.len() {
            self.host_read(slot);
        }
        std::mem::take(&mut self.outcome)
    }
}

fn lock(vsock: &Mutex<Vsock>) -> std::sync::MutexGuard<'_, Vsock> {
    vsock
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `len` bytes of the input, zero-padded past its end.
fn padded(input: &mut Input, len: usize) -> Vec<u8> {
    let mut bytes = input.bytes(len).to_vec();
    bytes.resize(len, 0);
    bytes
}

/// Descriptors `(addr, len)` linked from table index `first` on, device-readable.
fn linked(pieces: &[(u64, u32)], first: u16, flags: u16) -> Vec<Descriptor> {
    let with_flags: Vec<(u64, u32, u16)> = pieces.iter().map(|&(a, l)| (a, l, flags)).collect();
    linked_flags(&with_flags, first)
}

fn linked_flags(pieces: &[(u64, u32, u16)], first: u16) -> Vec<Descriptor> {
    let n = pieces.len();
    pieces
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            if i + 1 < n {
                Descriptor::new(addr, len, flags | NEXT, first + i as u16 + 1)
            } else {
                Descriptor::new(addr, len, flags, 0)
            }
        })
        .collect()
}

fn encode_desc(d: &Descriptor) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&d.addr().0.to_le_bytes());
    raw[8..12].copy_from_slice(&d.len().to_le_bytes());
    raw[12..14].copy_from_slice(&d.flags().to_le_bytes());
    raw[14..].copy_from_slice(&d.next().to_le_bytes());
    raw
}
