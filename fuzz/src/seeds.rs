//! The seed inputs committed under `fuzz/seeds/<target>/`: small, meaningful requests in
//! each target's input format. `cargo run --example gen_seeds` rewrites the files; the
//! tests below check that each seed reaches the path it was written for.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;

use crate::chain::ChainSpec;
use crate::input::Output;
use crate::{AVAIL_RING, DATA, DESC_TABLE, USED_RING};

const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const STATUS: u64 = DATA + 0x100;

/// Every seed: (target, file name, bytes).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (name, bytes) in blk() {
        seeds.push(("virtio_blk_request", name, bytes));
    }
    for (name, bytes) in net_tx() {
        seeds.push(("virtio_net_tx", name, bytes));
    }
    for (name, bytes) in mmio() {
        seeds.push(("virtio_mmio_registers", name, bytes));
    }
    for (name, bytes) in vsock() {
        seeds.push(("virtio_vsock_tx", name, bytes));
    }
    for (name, bytes) in agent() {
        seeds.push(("agent_protocol", name, bytes));
    }
    for (name, bytes) in crate::api_request::seeds() {
        seeds.push(("api_request", name, bytes));
    }
    for (name, bytes) in crate::snapshot_state::seeds() {
        seeds.push(("snapshot_state", name, bytes));
    }
    for (name, bytes) in crate::image_layer::seeds() {
        seeds.push(("image_layer", name, bytes));
    }
    seeds
}

// ---- virtio_blk_request -------------------------------------------------------------

/// 16-sector disk with DISCARD and WRITE_ZEROES negotiated.
const DISK: u8 = (16 << 3) | 0b110;
const DISK_RO: u8 = (16 << 3) | 0b001;

fn blk_header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut raw = vec![0u8; 16];
    raw[..4].copy_from_slice(&request_type.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    raw
}

fn blk_input(disk: u8, chain: ChainSpec, image: &[u8]) -> Vec<u8> {
    let mut out = Output::default();
    out.u8(disk);
    chain.encode(&mut out);
    out.bytes(image);
    out.data
}

fn segments(list: &[(u64, u32, u32)]) -> Vec<u8> {
    let mut raw = Vec::new();
    for &(sector, count, flags) in list {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&count.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    raw
}

pub fn blk() -> Vec<(&'static str, Vec<u8>)> {
    let header = |len| (DATA, len, 0);
    let status = (STATUS, 1, W);
    let mut seeds = vec![
        (
            // Two sectors from sector 1 into one buffer in region 1.
            "read",
            blk_input(
                DISK,
                ChainSpec::linked(&[header(16), (0x4000, 1024, W), status]),
                &blk_header(VIRTIO_BLK_T_IN, 1),
            ),
        ),
        (
            // One sector from two buffers, the second spanning regions 0 and 1.
            "write_across_regions",
            blk_input(
                DISK,
                ChainSpec::linked(&[header(16), (0x2c00, 256, 0), (0x2f80, 256, 0), status]),
                &blk_header(VIRTIO_BLK_T_OUT, 3),
            ),
        ),
        (
            "flush",
            blk_input(
                DISK,
                ChainSpec::linked(&[header(16), status]),
                &blk_header(VIRTIO_BLK_T_FLUSH, 0),
            ),
        ),
        (
            "get_id",
            blk_input(
                DISK,
                ChainSpec::linked(&[header(16), (0x4000, 20, W), status]),
                &blk_header(VIRTIO_BLK_T_GET_ID, 0),
            ),
        ),
        (
            // A write on a read-only disk: refused with IOERR.
            "write_read_only",
            blk_input(
                DISK_RO,
                ChainSpec::linked(&[header(16), (0x4000, 512, 0), status]),
                &blk_header(VIRTIO_BLK_T_OUT, 0),
            ),
        ),
    ];
    for (name, request_type, list) in [
        (
            "discard",
            VIRTIO_BLK_T_DISCARD,
            vec![(0u64, 2u32, 0u32), (8, 4, 0)],
        ),
        (
            "write_zeroes_unmap",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(4, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        ),
    ] {
        let segs = segments(&list);
        let mut image = blk_header(request_type, 0);
        image.extend_from_slice(&segs);
        seeds.push((
            name,
            blk_input(
                DISK,
                ChainSpec::linked(&[header(16), (DATA + 16, segs.len() as u32, 0), status]),
                &image,
            ),
        ));
    }
    // A read through an indirect table at DATA + 0x40 (in the memory image).
    let indirect = [
        Descriptor::new(DATA, 16, NEXT, 1),
        Descriptor::new(0x4000, 512, W | NEXT, 2),
        Descriptor::new(STATUS, 1, W, 0),
    ];
    let mut image = blk_header(VIRTIO_BLK_T_IN, 15);
    image.resize(0x40, 0);
    for d in indirect {
        image.extend_from_slice(&d.addr().0.to_le_bytes());
        image.extend_from_slice(&d.len().to_le_bytes());
        image.extend_from_slice(&d.flags().to_le_bytes());
        image.extend_from_slice(&d.next().to_le_bytes());
    }
    let chain = ChainSpec {
        size_log2: 4,
        head: 0,
        table: vec![Descriptor::new(
            DATA + 0x40,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )],
    };
    seeds.push(("read_indirect", blk_input(DISK, chain, &image)));
    seeds
}

// ---- virtio_net_tx ------------------------------------------------------------------

/// CSUM, HOST_TSO4, HOST_TSO6, HOST_ECN.
const ALL_TX: u8 = 0x0f;

fn net_header(flags: u8, gso_type: u8, gso_size: u16, csum: (u16, u16)) -> Vec<u8> {
    let mut h = vec![flags, gso_type];
    h.extend_from_slice(&54u16.to_le_bytes()); // hdr_len: Ethernet + IPv4/6 + TCP
    h.extend_from_slice(&gso_size.to_le_bytes());
    h.extend_from_slice(&csum.0.to_le_bytes());
    h.extend_from_slice(&csum.1.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h
}

/// An Ethernet + IPv4 + TCP frame of `len` bytes (headers only meaningful, rest zero).
fn tcp4_frame(len: usize) -> Vec<u8> {
    let mut f = vec![
        0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00,
    ];
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
    f.extend_from_slice(&[
        0x30, 0x39, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
    ]);
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.resize(len.max(f.len()), 0);
    f
}

fn net_input(features: u8, chain: ChainSpec, image: &[u8]) -> Vec<u8> {
    let mut out = Output::default();
    out.u8(features);
    chain.encode(&mut out);
    out.bytes(image);
    out.data
}

pub fn net_tx() -> Vec<(&'static str, Vec<u8>)> {
    let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let mut seeds = Vec::new();

    let mut image = net_header(0, 0, 0, (0, 0));
    image.extend(tcp4_frame(60));
    seeds.push((
        "plain_one_descriptor",
        net_input(0, ChainSpec::linked(&[(DATA, 72, 0)]), &image),
    ));
    seeds.push((
        "plain_header_apart",
        net_input(
            0,
            ChainSpec::linked(&[(DATA, 12, 0), (DATA + 12, 60, 0)]),
            &image,
        ),
    ));

    let mut image = net_header(csum, 0, 0, (34, 16));
    image.extend(tcp4_frame(100));
    seeds.push((
        "checksum_offload",
        net_input(ALL_TX, ChainSpec::linked(&[(DATA, 112, 0)]), &image),
    ));

    // TSO: headers in the image, the payload from zeroed memory in region 1.
    for (name, gso_type) in [
        ("tso4", VIRTIO_NET_HDR_GSO_TCPV4 as u8),
        (
            "tso6_ecn",
            (VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN) as u8,
        ),
    ] {
        let mut image = net_header(csum, gso_type, 1448, (34, 16));
        image.extend(tcp4_frame(54));
        seeds.push((
            name,
            net_input(
                ALL_TX,
                ChainSpec::linked(&[(DATA, 66, 0), (0x4000, 2896, 0), (0x8000, 1448, 0)]),
                &image,
            ),
        ));
    }
    seeds
}

// ---- virtio_mmio_registers ----------------------------------------------------------

pub mod reg {
    pub const MAGIC: u8 = 0;
    pub const DEVICE_ID: u8 = 0x08 / 4;
    pub const DEVICE_FEATURES: u8 = 0x10 / 4;
    pub const DEVICE_FEATURES_SEL: u8 = 0x14 / 4;
    pub const DRIVER_FEATURES: u8 = 0x20 / 4;
    pub const DRIVER_FEATURES_SEL: u8 = 0x24 / 4;
    pub const QUEUE_SEL: u8 = 0x30 / 4;
    pub const QUEUE_NUM_MAX: u8 = 0x34 / 4;
    pub const QUEUE_NUM: u8 = 0x38 / 4;
    pub const QUEUE_READY: u8 = 0x44 / 4;
    pub const QUEUE_NOTIFY: u8 = 0x50 / 4;
    pub const INTERRUPT_STATUS: u8 = 0x60 / 4;
    pub const INTERRUPT_ACK: u8 = 0x64 / 4;
    pub const STATUS: u8 = 0x70 / 4;
    pub const QUEUE_DESC_LOW: u8 = 0x80 / 4;
    pub const QUEUE_DESC_HIGH: u8 = 0x84 / 4;
    pub const QUEUE_DRIVER_LOW: u8 = 0x90 / 4;
    pub const QUEUE_DEVICE_LOW: u8 = 0xa0 / 4;
    pub const CONFIG_GENERATION: u8 = 0xfc / 4;
}

/// Builds an op sequence for `virtio_mmio_registers`.
pub struct Ops {
    out: Output,
}

impl Ops {
    pub fn new(selector: u8) -> Self {
        let mut out = Output::default();
        out.u8(selector);
        Self { out }
    }
    pub fn byte(mut self, b: u8) -> Self {
        self.out.u8(b);
        self
    }
    pub fn write(mut self, reg: u8, value: u32) -> Self {
        self.out.u8(0).u8(reg).u32(value);
        self
    }
    pub fn read(mut self, reg: u8) -> Self {
        self.out.u8(1).u8(reg);
        self
    }
    pub fn raw_read(mut self, offset: u16, width: u8) -> Self {
        self.out.u8(2 | ((width - 1) << 3)).u16(offset);
        self
    }
    pub fn raw_write(mut self, offset: u16, bytes: &[u8]) -> Self {
        self.out
            .u8(3 | ((bytes.len() as u8 - 1) << 3))
            .u16(offset)
            .bytes(bytes);
        self
    }
    pub fn mem(mut self, addr: u16, bytes: &[u8]) -> Self {
        for (i, chunk) in bytes.chunks(255).enumerate() {
            self.out
                .u8(4)
                .u16(addr + (i * 255) as u16)
                .u8(chunk.len() as u8)
                .bytes(chunk);
        }
        self
    }
    pub fn event_loop(mut self) -> Self {
        self.out.u8(5);
        self
    }
    pub fn config_read(mut self, offset: u8, width: u8) -> Self {
        self.out.u8(6 | ((width - 1) << 3)).u8(offset);
        self
    }
    pub fn config_write(mut self, offset: u8, bytes: &[u8]) -> Self {
        self.out
            .u8(7 | ((bytes.len() as u8 - 1) << 3))
            .u8(offset)
            .bytes(bytes);
        self
    }

    /// Identification, ACKNOWLEDGE and DRIVER, feature negotiation, FEATURES_OK.
    pub fn negotiate(self, features: u64) -> Self {
        let s1 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        let s2 = s1 | VIRTIO_CONFIG_S_DRIVER;
        self.read(reg::MAGIC)
            .read(reg::DEVICE_ID)
            .write(reg::STATUS, 0)
            .write(reg::STATUS, s1)
            .write(reg::STATUS, s2)
            .write(reg::DEVICE_FEATURES_SEL, 0)
            .read(reg::DEVICE_FEATURES)
            .write(reg::DEVICE_FEATURES_SEL, 1)
            .read(reg::DEVICE_FEATURES)
            .write(reg::DRIVER_FEATURES_SEL, 0)
            .write(reg::DRIVER_FEATURES, features as u32)
            .write(reg::DRIVER_FEATURES_SEL, 1)
            .write(reg::DRIVER_FEATURES, (features >> 32) as u32)
            .write(reg::STATUS, s2 | VIRTIO_CONFIG_S_FEATURES_OK)
            .read(reg::STATUS)
    }

    /// Sets up queue `index` with `size` entries at the given ring addresses.
    pub fn queue(self, index: u32, size: u32, desc: u64, avail: u64, used: u64) -> Self {
        self.write(reg::QUEUE_SEL, index)
            .read(reg::QUEUE_NUM_MAX)
            .write(reg::QUEUE_NUM, size)
            .write(reg::QUEUE_DESC_LOW, desc as u32)
            .write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32)
            .write(reg::QUEUE_DRIVER_LOW, avail as u32)
            .write(reg::QUEUE_DEVICE_LOW, used as u32)
            .write(reg::QUEUE_READY, 1)
            .read(reg::QUEUE_READY)
    }

    pub fn driver_ok(self) -> Self {
        self.write(
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK,
        )
    }

    /// Puts the chain `descs` (linked from entry `first`) in the table at DESC_TABLE and
    /// makes it available as ring entry `slot` (avail idx = slot + 1).
    pub fn submit(self, first: u16, slot: u16, descs: &[(u64, u32, u16)]) -> Self {
        let mut table = Vec::new();
        let n = descs.len() as u16;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let (flags, next) = if i + 1 < n {
                (flags | NEXT, first + i + 1)
            } else {
                (flags, 0)
            };
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&next.to_le_bytes());
        }
        let ring_entry = AVAIL_RING + 4 + 2 * u64::from(slot);
        self.mem((DESC_TABLE + 16 * u64::from(first)) as u16, &table)
            .mem(ring_entry as u16, &first.to_le_bytes())
            .mem(AVAIL_RING as u16 + 2, &(slot + 1).to_le_bytes())
            .write(reg::QUEUE_NOTIFY, 0)
            .event_loop()
            .read(reg::INTERRUPT_STATUS)
            .write(reg::INTERRUPT_ACK, 1)
    }

    pub fn finish(self) -> Vec<u8> {
        self.out.data
    }
}

pub const BLOCK: u8 = 0;
pub const BLOCK_RO: u8 = 2;

/// Block bring-up with `features`, then a read of two sectors and a flush.
pub fn block_session(features: u64) -> Ops {
    Ops::new(BLOCK)
        .negotiate(features)
        .queue(0, 16, DESC_TABLE, AVAIL_RING, USED_RING)
        .driver_ok()
        .read(reg::STATUS)
        .read(reg::CONFIG_GENERATION)
        .config_read(0, 8)
        .config_read(0x14, 4)
        .mem(DATA as u16, &blk_header(VIRTIO_BLK_T_IN, 2))
        .submit(0, 0, &[(DATA, 16, 0), (0x4000, 1024, W), (STATUS, 1, W)])
        .mem(DATA as u16 + 0x10, &blk_header(VIRTIO_BLK_T_FLUSH, 0))
        .submit(3, 1, &[(DATA + 0x10, 16, 0), (STATUS + 1, 1, W)])
}

pub fn mmio() -> Vec<(&'static str, Vec<u8>)> {
    let version_1 = 1u64 << VIRTIO_F_VERSION_1;
    let blk_features = version_1
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_DISCARD
        | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        | 1 << VIRTIO_RING_F_EVENT_IDX;
    let mut seeds = Vec::new();

    // The Linux driver's bring-up, the capacity read, a read request and a flush served
    // by the device, a reset and a second bring-up.
    let ops = block_session(blk_features)
        .write(reg::STATUS, 0)
        .negotiate(version_1)
        .queue(0, 8, DESC_TABLE, AVAIL_RING, USED_RING)
        .driver_ok()
        .finish();
    seeds.push(("block_bring_up_read_flush_reset", ops));

    // A write to a read-only image (IOERR), discard not offered.
    let ops = Ops::new(BLOCK_RO)
        .negotiate(version_1 | 1 << VIRTIO_BLK_F_FLUSH)
        .queue(0, 4, DESC_TABLE, AVAIL_RING, USED_RING)
        .driver_ok()
        .mem(DATA as u16, &blk_header(VIRTIO_BLK_T_OUT, 0))
        .submit(0, 0, &[(DATA, 16, 0), (0x4000, 512, 0), (STATUS, 1, W)])
        .finish();
    seeds.push(("block_read_only_write", ops));

    // Narrow, wide and misaligned accesses, config space writes and reads.
    let ops = Ops::new(BLOCK)
        .raw_read(0x000, 1)
        .raw_read(0x002, 2)
        .raw_read(0x070, 8)
        .raw_write(0x071, &[1])
        .raw_write(0x070, &[1, 0])
        .raw_read(0xffc, 4)
        .raw_write(0xff8, &[1, 2, 3, 4, 5, 6, 7, 8])
        .config_write(0x20, &[1])
        .config_read(0x22, 3)
        .read(reg::CONFIG_GENERATION)
        .finish();
    seeds.push(("block_odd_accesses", ops));

    // DRIVER_OK without FEATURES_OK: NEEDS_RESET, then a reset.
    let ops = Ops::new(BLOCK)
        .write(reg::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE)
        .write(
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        )
        .write(
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
        )
        .read(reg::STATUS)
        .read(reg::INTERRUPT_STATUS)
        .finish();
    seeds.push(("block_driver_ok_too_early", ops));

    // A fake device with two queues (sizes 16 and 256): both set up, activated, config
    // written and read back, reset.
    let ops = Ops::new(1 | (2 << 2))
        .byte(4)
        .byte(8)
        .negotiate(version_1 | 0b101)
        .queue(0, 16, DESC_TABLE, AVAIL_RING, USED_RING)
        .queue(1, 256, 0x4000, 0x6000, 0x7000)
        .driver_ok()
        .config_write(0, &[1, 2, 3, 4, 5, 6, 7, 8])
        .config_read(4, 8)
        .write(reg::QUEUE_NOTIFY, 1)
        .write(reg::STATUS, 0)
        .finish();
    seeds.push(("fake_two_queues", ops));
    seeds
}

// ---- virtio_vsock_tx ----------------------------------------------------------------

pub mod vsock_seed {
    //! Builds op sequences for `virtio_vsock_tx`.
    use hearth::devices::virtio::vsock::packet::VsockHeader;
    use virtio_queue::desc::split::Descriptor;

    use crate::input::Output;
    use crate::virtio_vsock_tx::op;

    /// Host port selectors of the compact packet op.
    pub const TO_52: u8 = 0;
    pub const TO_1234: u8 = 1;
    pub const TO_1024: u8 = 2;
    pub const TO_1025: u8 = 3;

    pub struct VsockOps {
        out: Output,
    }

    impl VsockOps {
        pub fn new(event_idx: bool) -> Self {
            let mut out = Output::default();
            out.u8(u8::from(event_idx));
            Self { out }
        }

        /// A well-formed packet from guest port `0x4000 + guest` to host port selector
        /// `host`; `fwd_cnt` `None` is everything the guest received.
        #[allow(clippy::too_many_arguments)]
        pub fn packet(
            mut self,
            op_code: u16,
            guest: u8,
            host: u8,
            flags: u8,
            buf_alloc: u32,
            fwd_cnt: Option<u32>,
            layout: u8,
            payload: &[u8],
        ) -> Self {
            self.out
                .u8(op::PACKET)
                .u8(op_code as u8)
                .u8((guest & 0xf) | (host << 4))
                .u8(flags)
                .u32(buf_alloc);
            match fwd_cnt {
                None => self.out.u8(0),
                Some(v) => self.out.u8(1).u32(v),
            };
            self.out.u8(layout).u16(payload.len() as u16).bytes(payload);
            self
        }

        /// A packet with the default credit (256 KiB, honest fwd_cnt), one descriptor.
        pub fn simple(self, op_code: u16, guest: u8, host: u8, payload: &[u8]) -> Self {
            self.packet(op_code, guest, host, 0, 256 << 10, None, 0, payload)
        }

        /// `payload_len` may differ from `payload.len()` (the rest is zeroes).
        pub fn raw_packet(
            mut self,
            layout: u8,
            header: &VsockHeader,
            payload_len: u32,
            payload: &[u8],
        ) -> Self {
            self.out
                .u8(op::RAW_PACKET)
                .u8(layout)
                .bytes(&header.to_bytes())
                .u32(payload_len)
                .bytes(payload);
            self
        }

        pub fn raw_chain(mut self, head: u16, table: &[Descriptor], image: &[u8]) -> Self {
            self.out.u8(op::RAW_CHAIN).u8(table.len() as u8).u16(head);
            for d in table {
                self.out
                    .u64(d.addr().0)
                    .u32(d.len())
                    .u16(d.flags())
                    .u16(d.next());
            }
            self.out.u16(image.len() as u16).bytes(image);
            self
        }

        /// Buffers of the given `u16` encodings (size, 0x8000: two descriptors).
        pub fn post_rx(mut self, buffers: &[u16]) -> Self {
            self.out.u8(op::POST_RX).u8(buffers.len() as u8 - 1);
            for &b in buffers {
                self.out.u16(b);
            }
            self
        }

        pub fn host_connect(mut self, guest: u8) -> Self {
            self.out.u8(op::HOST_CONNECT).u8(guest & 0xf);
            self
        }

        pub fn host_connect_raw(mut self, line: &[u8]) -> Self {
            self.out
                .u8(op::HOST_CONNECT)
                .u8(0x80)
                .u8(line.len() as u8)
                .bytes(line);
            self
        }

        pub fn host_write(mut self, stream: u8, bytes: &[u8]) -> Self {
            self.out
                .u8(op::HOST_WRITE)
                .u8(stream)
                .u16(bytes.len() as u16)
                .bytes(bytes);
            self
        }

        pub fn host_read(mut self, stream: u8) -> Self {
            self.out.u8(op::HOST_READ).u8(stream);
            self
        }

        pub fn host_close(mut self, stream: u8, how: u8) -> Self {
            self.out.u8(op::HOST_CLOSE).u8(stream).u8(how);
            self
        }

        pub fn burst(mut self, count: u16) -> Self {
            self.out.u8(op::BURST).u16(count);
            self
        }

        pub fn reset(mut self) -> Self {
            self.out.u8(op::RESET);
            self
        }

        pub fn kick(mut self) -> Self {
            self.out.u8(op::KICK);
            self
        }

        pub fn finish(self) -> Vec<u8> {
            self.out.data
        }
    }
}

pub fn vsock() -> Vec<(&'static str, Vec<u8>)> {
    use hearth::devices::virtio::vsock::packet::{
        VsockHeader, MAX_PAYLOAD_LEN, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
        OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
    };
    use hearth::devices::virtio::vsock::MAX_CONNECTIONS;
    use vsock_seed::*;

    use crate::virtio_vsock_tx::{GUEST_CID, TX_DATA};

    let both = (SHUTDOWN_RCV | SHUTDOWN_SEND) as u8;
    let rx4 = [0x1000u16; 4];
    let mut seeds = Vec::new();

    // The guest connects to host port 52; data both ways; the guest shuts down.
    let ops = VsockOps::new(false)
        .post_rx(&rx4)
        .simple(OP_REQUEST, 0, TO_52, b"")
        .host_write(0, b"hello guest")
        .simple(OP_RW, 0, TO_52, b"hello host")
        .host_read(0)
        .packet(OP_SHUTDOWN, 0, TO_52, both, 256 << 10, None, 0, b"")
        .post_rx(&rx4)
        .host_read(0)
        .finish();
    seeds.push(("guest_connect_rw_shutdown", ops));

    // A host process connects to guest port 0x4001; the guest accepts; data both ways;
    // the guest resets the connection.
    let ops = VsockOps::new(true)
        .post_rx(&rx4)
        .host_connect(1)
        .simple(OP_RESPONSE, 1, TO_1024, b"")
        .host_read(0)
        .host_write(0, b"ping")
        .packet(OP_RW, 1, TO_1024, 0, 256 << 10, None, 1, b"pong")
        .host_read(0)
        .simple(OP_RST, 1, TO_1024, b"")
        .finish();
    seeds.push(("host_connect_accept_rst", ops));

    // A guest with 100 bytes of buffer: the host's 300 bytes arrive 100 at a time, after
    // each credit update; then a credit request.
    let ops = VsockOps::new(false)
        .packet(OP_REQUEST, 2, TO_1234, 0, 100, Some(0), 0, b"")
        .post_rx(&[0x1000, 0x1000, 0x8000 | 0x400, 0x800])
        .host_write(0, &[0x5a; 300])
        .post_rx(&rx4)
        .packet(OP_CREDIT_UPDATE, 2, TO_1234, 0, 100, None, 0, b"")
        .post_rx(&rx4)
        .packet(OP_CREDIT_UPDATE, 2, TO_1234, 0, 100, None, 0, b"")
        .post_rx(&rx4)
        .packet(OP_CREDIT_REQUEST, 2, TO_1234, 0, 100, None, 0, b"")
        .post_rx(&rx4)
        .finish();
    seeds.push(("credit_limited", ops));

    // The same packet in every layout: header and payload apart, the header split,
    // indirect, across regions; then small RX buffers (one too small for a header).
    let mut ops = VsockOps::new(false)
        .post_rx(&[0x1000, 0x8000 | 0x100, 43, 44, 45])
        .packet(OP_REQUEST, 3, TO_52, 0, 256 << 10, None, 0x43, b"");
    for layout in [0u8, 1, 2 | (10 << 2), 3, 0x40 | 2 | (40 << 2), 0x41] {
        ops = ops.packet(OP_RW, 3, TO_52, 0, 256 << 10, None, layout, b"layout test");
    }
    let ops = ops
        .host_write(0, &[7; 100])
        .host_read(0)
        .post_rx(&[0x1000; 4])
        .finish();
    seeds.push(("layouts", ops));

    // What the device refuses or answers with RST: another CID, a datagram, data for no
    // connection, a host port nothing listens on, a payload over the limit, a length
    // that does not match, a REQUEST on a live connection.
    let guest = |op, dst_port, len| VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port: 0x4005,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 << 10,
        fwd_cnt: 0,
    };
    let ops = VsockOps::new(false)
        .post_rx(&[0x1000; 8])
        .raw_packet(
            0,
            &VsockHeader {
                src_cid: 7,
                ..guest(OP_REQUEST, 52, 0)
            },
            0,
            b"",
        )
        .raw_packet(
            0,
            &VsockHeader {
                dst_cid: 9,
                ..guest(OP_REQUEST, 52, 0)
            },
            0,
            b"",
        )
        .raw_packet(
            0,
            &VsockHeader {
                type_: 2,
                ..guest(OP_REQUEST, 52, 0)
            },
            0,
            b"",
        )
        .raw_packet(0, &guest(OP_RW, 52, 0), 4, b"data")
        .raw_packet(0, &guest(OP_REQUEST, 1025, 0), 0, b"")
        .raw_packet(0, &guest(OP_REQUEST, 52, 0), 0, b"")
        .raw_packet(0x80, &guest(OP_RW, 52, 3), 5, b"12345")
        .raw_packet(0, &guest(OP_REQUEST, 52, 0), 0, b"")
        .raw_packet(0, &guest(99, 52, 0), 0, b"")
        .post_rx(&[0x1000; 8])
        .finish();
    seeds.push(("rejections", ops));

    // Payloads at and over MAX_PAYLOAD_LEN, from zeroed guest memory.
    let max = MAX_PAYLOAD_LEN as u32;
    let chain = |len: u32| {
        (
            [
                Descriptor::new(TX_DATA, 44, NEXT, 1),
                Descriptor::new(TX_DATA + 0x40, len, 0, 0),
            ],
            VsockHeader {
                src_port: 0x4006,
                ..guest(OP_RW, 52, len)
            }
            .to_bytes(),
        )
    };
    let (at_limit, at_limit_header) = chain(max);
    let (over, over_header) = chain(max + 1);
    let (huge, _) = chain(u32::MAX);
    let ops = VsockOps::new(false)
        .post_rx(&[0x1000; 2])
        .packet(OP_REQUEST, 6, TO_52, 0, 256 << 10, None, 0, b"")
        .raw_chain(0, &at_limit, &at_limit_header)
        .raw_chain(0, &over, &over_header)
        .raw_chain(0, &huge, &over_header)
        .host_read(0)
        .finish();
    seeds.push(("payload_limit", ops));

    // Raw descriptor tables: a writable descriptor, an indirect table, a head past the
    // table, a loop, a descriptor outside guest memory.
    let mut packet = guest(OP_REQUEST, 52, 0).to_bytes().to_vec();
    packet.resize(0x40, 0);
    for d in [
        Descriptor::new(TX_DATA, 20, NEXT, 1),
        Descriptor::new(TX_DATA + 20, 24, 0, 0),
    ] {
        packet.extend_from_slice(&d.addr().0.to_le_bytes());
        packet.extend_from_slice(&d.len().to_le_bytes());
        packet.extend_from_slice(&d.flags().to_le_bytes());
        packet.extend_from_slice(&d.next().to_le_bytes());
    }
    let ops = VsockOps::new(false)
        .post_rx(&[0x1000; 2])
        .raw_chain(0, &[Descriptor::new(TX_DATA, 44, W, 0)], &packet)
        .raw_chain(
            0,
            &[Descriptor::new(
                TX_DATA + 0x40,
                32,
                VRING_DESC_F_INDIRECT as u16,
                0,
            )],
            &packet,
        )
        .raw_chain(40, &[Descriptor::new(TX_DATA, 44, 0, 0)], &packet)
        .raw_chain(
            0,
            &[
                Descriptor::new(TX_DATA, 20, NEXT, 1),
                Descriptor::new(TX_DATA + 20, 24, NEXT, 0),
            ],
            &packet,
        )
        .raw_chain(0, &[Descriptor::new(0x2_0000, 44, 0, 0)], &packet)
        .raw_chain(
            0,
            &[
                Descriptor::new(TX_DATA, 20, NEXT, 1),
                Descriptor::new(TX_DATA + 20, 24, 0, 0),
            ],
            &packet,
        )
        .finish();
    seeds.push(("raw_chains", ops));

    // More REQUESTs than the device takes connections.
    let ops = VsockOps::new(false)
        .burst(MAX_CONNECTIONS as u16 + 8)
        .post_rx(&[0x1000; 8])
        .finish();
    seeds.push(("connection_limit", ops));

    // A host process gives up before the guest answers; a bad handshake; a reset with a
    // live connection, and a new connection after it.
    let ops = VsockOps::new(true)
        .post_rx(&rx4)
        .host_connect(4)
        .host_close(0, 2)
        .host_connect_raw(b"CONNECT x\n")
        .simple(OP_REQUEST, 5, TO_1024, b"")
        .host_write(2, b"before reset")
        .reset()
        .post_rx(&rx4)
        .simple(OP_REQUEST, 5, TO_1024, b"")
        .host_write(3, b"after reset")
        .host_close(3, 0)
        .kick()
        .post_rx(&rx4)
        .finish();
    seeds.push(("hang_up_and_reset", ops));
    seeds
}

// ---- agent_protocol -----------------------------------------------------------------

pub fn agent_messages() -> Vec<hearth::agent::protocol::Message> {
    use hearth::agent::protocol::{Message, NetConfig, Network, Rootfs, RunSpec, Volume};
    let spec = RunSpec {
        argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        user: Some("1000:1000".into()),
        hostname: Some("box".into()),
        tty: true,
        stdin: true,
        rootfs: Rootfs::Device {
            path: "/dev/vda".into(),
            fstype: "ext4".into(),
        },
        volumes: vec![Volume {
            device: "/dev/vdb".into(),
            target: "/data".into(),
            readonly: true,
        }],
        memory_limit: Some(64 << 20),
        cpus: Some(1.5),
        network: Network::Vm,
        net: Some(NetConfig {
            address: "10.0.0.2/24".into(),
            gateway: Some("10.0.0.1".into()),
        }),
        name: Some("c1".into()),
        term_size: Some((24, 80)),
        mac: Some("52:54:00:12:34:56".into()),
    };
    let join = RunSpec {
        argv: Vec::new(),
        rootfs: Rootfs::Container { name: "c1".into() },
        net: None,
        cpus: None,
        ..spec.clone()
    };
    vec![
        Message::Hello { version: 1 },
        Message::Run(Box::new(spec)),
        Message::Run(Box::new(join)),
        Message::Shutdown,
        Message::Stdin(b"input".to_vec()),
        Message::StdinEof,
        Message::Signal(15),
        Message::Resize {
            rows: 50,
            cols: 132,
        },
        Message::ImageQuery {
            digest: "sha256:ab".into(),
        },
        Message::ImageLoad {
            digest: "sha256:ab".into(),
        },
        Message::ImageData(vec![1; 300]),
        Message::ImageEnd,
        Message::ImageStatus {
            digest: "sha256:ab".into(),
            present: false,
        },
        Message::Started { pid: 42 },
        Message::Stdout(b"out".to_vec()),
        Message::Stderr(Vec::new()),
        Message::Exit { status: 130 },
        Message::Error("no such image".into()),
    ]
}

fn agent_input(sizes: &[u8], stream: &[u8]) -> Vec<u8> {
    let mut out = Output::default();
    out.u8(sizes.len() as u8).bytes(sizes).bytes(stream);
    out.data
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&[kind, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

pub fn agent() -> Vec<(&'static str, Vec<u8>)> {
    use hearth::agent::protocol::{write_message, MAX_PAYLOAD};
    let mut all = Vec::new();
    for msg in agent_messages() {
        write_message(&mut all, &msg).expect("seed messages encode");
    }
    let mut seeds = vec![
        ("every_message_at_once", agent_input(&[], &all)),
        ("every_message_byte_by_byte", agent_input(&[1], &all)),
        (
            "every_message_in_odd_pieces",
            agent_input(&[3, 0, 7, 200, 64], &all),
        ),
    ];
    // A session's first frames, then one over the size limit.
    let mut stream = Vec::new();
    for msg in &agent_messages()[..3] {
        write_message(&mut stream, msg).expect("seed messages encode");
    }
    stream.extend_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
    stream.extend_from_slice(&[33, 0, 0, 0]);
    seeds.push(("too_large", agent_input(&[5], &stream)));
    let mut stream = frame(3, b"");
    stream.extend_from_slice(&[0, 0, 0, 0, 3, 0, 1, 0]);
    seeds.push(("reserved_bytes", agent_input(&[], &stream)));
    let mut stream = frame(35, &[0, 0, 0, 0]);
    stream.extend_from_slice(&frame(33, b"partial")[..10]);
    seeds.push(("truncated", agent_input(&[4], &stream)));
    // Malformed payloads: bad JSON, a short fixed-size body, an unknown kind.
    let mut stream = frame(1, br#"{"version":"one"}"#);
    stream.extend_from_slice(&frame(2, br#"{"argv":[]"#));
    stream.extend_from_slice(&frame(35, &[1, 2]));
    stream.extend_from_slice(&frame(200, b""));
    seeds.push(("malformed", agent_input(&[], &stream)));
    // Unusual but valid: JSON with spaces, escapes and unknown fields, a float in
    // exponent form, invalid UTF-8 in an error.
    let run = br#"{ "argv": ["a\u0062c"], "env": [], "cwd": "/", "user": null, "hostname": null,
        "tty": false, "stdin": false, "rootfs": {"kind": "host"}, "volumes": [],
        "memory_limit": 18446744073709551615, "cpus": 2.5e-1, "network": "none",
        "net": null, "name": null, "term_size": [1, 2], "extra": true }"#;
    let mut stream = frame(2, run);
    stream.extend_from_slice(&frame(36, b"bad \xff\xfe utf-8"));
    stream.extend_from_slice(&frame(12, br#"{"present":true,"digest":"d"}"#));
    seeds.push(("unusual_but_valid", agent_input(&[9, 1], &stream)));
    seeds
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

    use super::*;
    use crate::{
        agent_protocol, virtio_blk_request, virtio_mmio_registers, virtio_net_tx, virtio_vsock_tx,
    };

    fn seed(list: &[(&'static str, Vec<u8>)], name: &str) -> Vec<u8> {
        list.iter().find(|(n, _)| *n == name).unwrap().1.clone()
    }

    #[test]
    fn blk_seeds_reach_their_paths() {
        use virtio_blk_request::{run, Outcome};
        let seeds = blk();
        let ok = |used_len, disk_changed, flushes| Outcome {
            used_len,
            status: Some(0),
            disk_changed,
            flushes,
        };
        assert_eq!(run(&seed(&seeds, "read")), ok(1025, false, 0));
        assert_eq!(run(&seed(&seeds, "read_indirect")), ok(513, false, 0));
        assert_eq!(run(&seed(&seeds, "write_across_regions")), ok(1, true, 0));
        assert_eq!(run(&seed(&seeds, "flush")), ok(1, false, 1));
        assert_eq!(run(&seed(&seeds, "get_id")), ok(21, false, 0));
        assert_eq!(run(&seed(&seeds, "discard")), ok(1, true, 0));
        assert_eq!(run(&seed(&seeds, "write_zeroes_unmap")), ok(1, true, 0));
        let refused = run(&seed(&seeds, "write_read_only"));
        assert_eq!((refused.status, refused.disk_changed), (Some(1), false));
    }

    #[test]
    fn net_seeds_are_accepted() {
        let seeds = net_tx();
        assert_eq!(
            virtio_net_tx::run(&seed(&seeds, "plain_one_descriptor")),
            Ok(72)
        );
        assert_eq!(
            virtio_net_tx::run(&seed(&seeds, "plain_header_apart")),
            Ok(72)
        );
        assert_eq!(
            virtio_net_tx::run(&seed(&seeds, "checksum_offload")),
            Ok(112)
        );
        assert_eq!(
            virtio_net_tx::run(&seed(&seeds, "tso4")),
            Ok(66 + 2896 + 1448)
        );
        assert_eq!(
            virtio_net_tx::run(&seed(&seeds, "tso6_ecn")),
            Ok(66 + 2896 + 1448)
        );
        // Without the offloads negotiated the same frames are refused.
        let mut no_offloads = seed(&seeds, "tso4");
        no_offloads[0] = 0;
        assert_eq!(virtio_net_tx::run(&no_offloads), Err("prepare_tx_frame"));
    }

    #[test]
    fn mmio_seeds_reach_their_paths() {
        use virtio_mmio_registers::run;
        let seeds = mmio();
        let all = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        let up = run(&seed(&seeds, "block_bring_up_read_flush_reset"));
        assert!(up.activated);
        assert_eq!(up.final_status, all);
        let ro = run(&seed(&seeds, "block_read_only_write"));
        assert!(ro.activated);
        assert_eq!(ro.used_idx, 1);
        let early = run(&seed(&seeds, "block_driver_ok_too_early"));
        assert!(!early.activated);
        assert_ne!(early.final_status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        let fake = run(&seed(&seeds, "fake_two_queues"));
        assert!(fake.activated);
        run(&seed(&seeds, "block_odd_accesses"));
    }

    /// Both requests of the bring-up session complete with status OK.
    #[test]
    fn mmio_block_requests_complete() {
        let features = 1u64 << VIRTIO_F_VERSION_1;
        let outcome = virtio_mmio_registers::run(&block_session(features).finish());
        assert!(outcome.activated);
        assert_eq!(outcome.used_idx, 2);
        assert_eq!(outcome.status_bytes, [0, 0]);
        let ro = virtio_mmio_registers::run(&seed(&mmio(), "block_read_only_write"));
        assert_eq!(ro.status_bytes[0], 1);
    }

    #[test]
    fn vsock_seeds_reach_their_paths() {
        use hearth::devices::virtio::vsock::packet::{
            OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
        };
        use hearth::devices::virtio::vsock::MAX_CONNECTIONS;
        use virtio_vsock_tx::run;
        let seeds = vsock();

        let o = run(&seed(&seeds, "guest_connect_rw_shutdown"));
        assert_eq!(o.accepted, 1);
        assert_eq!(o.rx_ops, [OP_RESPONSE, OP_RW, OP_RST]);
        assert_eq!(o.rx_data, b"hello guest".len());
        assert_eq!(o.host_read, b"hello host");

        let o = run(&seed(&seeds, "host_connect_accept_rst"));
        assert_eq!(o.rx_ops, [OP_REQUEST, OP_RW]);
        assert_eq!(o.host_read, b"OK 1024\npong");

        // 300 bytes through a 100-byte window, and the CREDIT_REQUEST answered.
        let o = run(&seed(&seeds, "credit_limited"));
        assert_eq!(
            o.rx_ops,
            [OP_RESPONSE, OP_RW, OP_RW, OP_RW, OP_CREDIT_UPDATE]
        );
        assert_eq!(o.rx_data, 300);

        let o = run(&seed(&seeds, "layouts"));
        assert_eq!(o.tx_packets, 7);
        assert_eq!(o.host_read, b"layout test".repeat(6));

        let o = run(&seed(&seeds, "rejections"));
        assert_eq!(o.tx_packets, 8);
        assert_eq!(
            o.rx_ops,
            [OP_RST, OP_RST, OP_RST, OP_RST, OP_RESPONSE, OP_RST, OP_RST]
        );

        // The 64 KiB payload goes through, the longer ones do not.
        let o = run(&seed(&seeds, "payload_limit"));
        assert_eq!(o.tx_packets, 2);
        assert!(!o.host_read.is_empty());

        let o = run(&seed(&seeds, "raw_chains"));
        assert_eq!((o.tx_packets, o.accepted), (2, 1));

        let o = run(&seed(&seeds, "connection_limit"));
        assert_eq!(o.peak_connections, MAX_CONNECTIONS);
        assert_eq!(o.accepted, MAX_CONNECTIONS);
        assert_eq!(o.rx_ops, [OP_RST; 8]);

        let o = run(&seed(&seeds, "hang_up_and_reset"));
        assert_eq!(
            o.rx_ops,
            [
                OP_REQUEST,
                OP_RST,
                OP_RESPONSE,
                OP_RW,
                OP_RESPONSE,
                OP_RW,
                OP_SHUTDOWN
            ]
        );
        assert_eq!(o.accepted, 2);
    }

    #[test]
    fn agent_seeds_decode() {
        use agent_protocol::{run, End};
        use hearth::agent::protocol::MAX_PAYLOAD;
        let seeds = agent();
        for name in [
            "every_message_at_once",
            "every_message_byte_by_byte",
            "every_message_in_odd_pieces",
        ] {
            let o = run(&seed(&seeds, name));
            let expected = agent_messages();
            assert_eq!(o.messages(), expected.iter().collect::<Vec<_>>(), "{name}");
            assert_eq!(o.end, End::Clean);
        }
        let o = run(&seed(&seeds, "too_large"));
        assert_eq!((o.messages().len(), o.end), (3, End::Error("too large")));
        let o = run(&seed(&seeds, "reserved_bytes"));
        assert_eq!((o.messages().len(), o.end), (1, End::Error("reserved")));
        let o = run(&seed(&seeds, "truncated"));
        assert_eq!((o.messages().len(), o.end), (1, End::Truncated));
        let o = run(&seed(&seeds, "malformed"));
        assert_eq!(
            o.decoded
                .iter()
                .map(|r| r.as_ref().err())
                .collect::<Vec<_>>(),
            [
                Some(&"malformed"),
                Some(&"malformed"),
                Some(&"malformed"),
                Some(&"unknown kind")
            ]
        );
        let o = run(&seed(&seeds, "unusual_but_valid"));
        assert_eq!((o.messages().len(), o.end), (3, End::Clean));

        // Longer than the fuzzer's inputs: an error text that grows when made valid UTF-8
        // still re-encodes within the frame limit.
        let mut stream = frame(36, &vec![0xff; 30_000]);
        stream.extend_from_slice(&frame(36, &[b'e'; 70_000][..MAX_PAYLOAD]));
        let o = run(&agent_input(&[], &stream));
        assert_eq!((o.messages().len(), o.end), (2, End::Clean));
    }

    #[test]
    fn committed_seeds_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        for (target, name, bytes) in all() {
            let path = dir.join(target).join(name);
            let committed = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run the gen_seeds example)", path.display()));
            assert_eq!(
                committed,
                bytes,
                "{} is stale: run the gen_seeds example",
                path.display()
            );
        }
    }
}
