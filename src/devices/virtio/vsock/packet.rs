//! What the guest controls in virtio-vsock: the 44-byte `virtio_vsock_hdr` in front of
//! every packet, TX packets gathered from a descriptor chain, and the RX buffers the
//! driver posts.
//!
//! Everything here is a plain function of guest memory and descriptors (no queue, no
//! socket), so a fuzz target can call [`read_tx_packet`], [`parse_rx_buffer`] and
//! [`RxBuffer::write_packet`] directly. Nothing here panics on guest input.

use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemory;

use crate::devices::virtio::buffer::{
    gather_readable_chain, parse_writable_chain, ChainError, WritableChain,
};

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Longest payload of one packet either way (Linux sends at most 64 KiB per packet).
pub const MAX_PAYLOAD_LEN: usize = 64 << 10;
/// Longest header + payload a TX chain may carry (what the TX bounce buffer holds).
pub const MAX_PACKET_LEN: usize = HDR_LEN + MAX_PAYLOAD_LEN;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, decoded (little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    pub fn from_bytes(bytes: &[u8; HDR_LEN]) -> Self {
        let le16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let le32 = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let le64 = |at: usize| u64::from(le32(at)) | u64::from(le32(at + 4)) << 32;
        Self {
            src_cid: le64(0),
            dst_cid: le64(8),
            src_port: le32(16),
            dst_port: le32(20),
            len: le32(24),
            type_: le16(28),
            op: le16(30),
            flags: le32(32),
            buf_alloc: le32(36),
            fwd_cnt: le32(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut bytes = [0u8; HDR_LEN];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.type_.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }
}

/// Why a TX packet or an RX buffer from the guest is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("a TX descriptor is device-writable")]
    WritableDescriptor,
    #[error("an RX descriptor is device-readable")]
    ReadableDescriptor,
    #[error("the descriptor chain is broken")]
    BrokenChain,
    #[error("the packet is shorter than a vsock header")]
    ShortHeader,
    #[error("the chain is longer than {MAX_PACKET_LEN} bytes")]
    TooLong,
    #[error("the header claims {claimed} payload bytes, the chain holds {actual}")]
    LenMismatch { claimed: u32, actual: usize },
    #[error("the RX buffer is smaller than a vsock header")]
    BufferTooSmall,
    #[error("a descriptor points outside guest memory")]
    BadAddress,
}

/// Gathers a TX packet from `descriptors` into `buf` (callers pass a [`MAX_PACKET_LEN`]
/// buffer); returns the header and the payload length, the payload being
/// `buf[HDR_LEN..HDR_LEN + len]`.
///
/// Every descriptor must be device-readable and inside guest memory, the chain must fit
/// in `buf`, and the header's `len` must equal the bytes that follow the header. The packet
/// is copied out of guest memory before it is looked at, so the guest cannot change it
/// after the checks.
pub fn read_tx_packet<M, I>(
    mem: &M,
    descriptors: I,
    buf: &mut [u8],
) -> Result<(VsockHeader, usize), PacketError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let len = gather_readable_chain(mem, descriptors, buf)?;
    let Some(header_bytes) = buf.get(..len).and_then(|b| b.first_chunk::<HDR_LEN>()) else {
        return Err(PacketError::ShortHeader);
    };
    let header = VsockHeader::from_bytes(header_bytes);
    let actual = len - HDR_LEN;
    if header.len as usize != actual || actual > MAX_PAYLOAD_LEN {
        return Err(PacketError::LenMismatch {
            claimed: header.len,
            actual,
        });
    }
    Ok((header, actual))
}

/// One receive buffer the driver posted: device-writable descriptors inside guest memory,
/// together holding at least a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    chain: WritableChain,
}

impl RxBuffer {
    /// Total bytes the buffer holds.
    pub fn capacity(&self) -> usize {
        self.chain.capacity()
    }

    /// The longest payload that fits after the header.
    pub fn max_payload(&self) -> usize {
        (self.capacity() - HDR_LEN).min(MAX_PAYLOAD_LEN)
    }

    /// Writes `header` (with `len` set to the payload's length) and `payload`; returns the
    /// bytes written, for the used ring. `payload` must fit in [`Self::max_payload`].
    pub fn write_packet<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        header: &VsockHeader,
        payload: &[u8],
    ) -> usize {
        debug_assert!(payload.len() <= self.max_payload());
        let header = VsockHeader {
            len: payload.len() as u32,
            ..*header
        };
        let header_bytes = header.to_bytes();
        self.chain
            .write(mem, &[&header_bytes, payload])
            .unwrap_or_else(|written| {
                // Checked when parsed; guest memory does not shrink while a device runs.
                log::warn!("virtio-vsock: RX buffer no longer in guest memory");
                written
            })
    }
}

impl From<ChainError> for PacketError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::ReadableDescriptor => PacketError::ReadableDescriptor,
            ChainError::BrokenChain => PacketError::BrokenChain,
            ChainError::BadAddress => PacketError::BadAddress,
            ChainError::TooSmall => PacketError::BufferTooSmall,
            ChainError::WritableDescriptor => PacketError::WritableDescriptor,
            ChainError::TooLong => PacketError::TooLong,
        }
    }
}

/// Parses an RX chain: device-writable descriptors only, all inside guest memory, holding
/// at least a header.
pub fn parse_rx_buffer<M, I>(mem: &M, descriptors: I) -> Result<RxBuffer, PacketError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let chain = parse_writable_chain(mem, descriptors, HDR_LEN)?;
    Ok(RxBuffer { chain })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::Bytes;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn sample() -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 77,
        }
    }

    /// Puts one chain of `(address, length, flags)` at table index 0 of a mock queue and
    /// pops it back, as the device would see it.
    fn with_chain<R>(
        mem: &GuestMemoryMmap<()>,
        descs: &[(u64, u32, u16)],
        f: impl FnOnce(Vec<Descriptor>) -> R,
    ) -> R {
        let mock = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last { flags & !NEXT } else { flags | NEXT };
                RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(mem).unwrap();
        f(chain.collect())
    }

    fn tx(
        mem: &GuestMemoryMmap<()>,
        descs: &[(u64, u32, u16)],
    ) -> Result<(VsockHeader, Vec<u8>), PacketError> {
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        with_chain(mem, descs, |chain| read_tx_packet(mem, chain, &mut buf))
            .map(|(header, len)| (header, buf[HDR_LEN..HDR_LEN + len].to_vec()))
    }

    #[test]
    fn header_round_trip() {
        let header = VsockHeader {
            src_cid: 0x0102_0304_0506_0708,
            ..sample()
        };
        let bytes = header.to_bytes();
        assert_eq!(bytes[0..8], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(bytes[16..20], [0x78, 0x56, 0x34, 0x12]);
        assert_eq!(bytes[28..32], [1, 0, 5, 0]);
        assert_eq!(VsockHeader::from_bytes(&bytes), header);
    }

    #[test]
    fn tx_header_and_payload_in_separate_descriptors() {
        let mem = memory();
        mem.write_slice(&sample().to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(0x20_0000)).unwrap();
        let (header, payload) =
            tx(&mem, &[(0x10_0000, HDR_LEN as u32, 0), (0x20_0000, 5, 0)]).unwrap();
        assert_eq!(header, sample());
        assert_eq!(payload, b"hello");

        // The same packet in one descriptor, and a header split across two.
        let mut packet = sample().to_bytes().to_vec();
        packet.extend_from_slice(b"hello");
        mem.write_slice(&packet, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(
            tx(&mem, &[(0x30_0000, packet.len() as u32, 0)]).unwrap(),
            (sample(), b"hello".to_vec())
        );
        assert_eq!(
            tx(
                &mem,
                &[(0x30_0000, 10, 0), (0x30_000a, packet.len() as u32 - 10, 0)]
            )
            .unwrap(),
            (sample(), b"hello".to_vec())
        );
    }

    #[test]
    fn tx_rejections() {
        let mem = memory();
        let header = VsockHeader { len: 0, ..sample() };
        mem.write_slice(&header.to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(
            tx(&mem, &[(0x10_0000, HDR_LEN as u32, 0)]).unwrap().0,
            header
        );
        // Short header.
        assert_eq!(
            tx(&mem, &[(0x10_0000, HDR_LEN as u32 - 1, 0)]),
            Err(PacketError::ShortHeader)
        );
        assert_eq!(
            tx(&mem, &[(0x10_0000, 0, 0)]),
            Err(PacketError::ShortHeader)
        );
        // A device-writable descriptor.
        assert_eq!(
            tx(&mem, &[(0x10_0000, HDR_LEN as u32, WRITE)]),
            Err(PacketError::WritableDescriptor)
        );
        assert_eq!(
            tx(
                &mem,
                &[(0x10_0000, HDR_LEN as u32, 0), (0x20_0000, 4, WRITE)]
            ),
            Err(PacketError::WritableDescriptor)
        );
        // len says 0, the chain carries 4 more bytes; and len says 5, the chain has none.
        assert_eq!(
            tx(&mem, &[(0x10_0000, HDR_LEN as u32, 0), (0x20_0000, 4, 0)]),
            Err(PacketError::LenMismatch {
                claimed: 0,
                actual: 4
            })
        );
        mem.write_slice(&sample().to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(
            tx(&mem, &[(0x10_0000, HDR_LEN as u32, 0)]),
            Err(PacketError::LenMismatch {
                claimed: 5,
                actual: 0
            })
        );
        // A huge len with a chain that matches it up to the limit: too long.
        let huge = VsockHeader {
            len: u32::MAX,
            ..sample()
        };
        mem.write_slice(&huge.to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        // (virtio-queue itself ends a chain whose length overflows: a broken chain.)
        assert!(tx(
            &mem,
            &[(0x10_0000, HDR_LEN as u32, 0), (0x20_0000, u32::MAX, 0)]
        )
        .is_err());
        assert_eq!(
            tx(
                &mem,
                &[
                    (0x10_0000, HDR_LEN as u32, 0),
                    (0x20_0000, MAX_PAYLOAD_LEN as u32 + 1, 0)
                ]
            ),
            Err(PacketError::TooLong)
        );
        // Outside guest memory.
        assert_eq!(
            tx(&mem, &[(0x1_0000_0000, HDR_LEN as u32, 0)]),
            Err(PacketError::BadAddress)
        );
        assert_eq!(
            tx(&mem, &[(0x40_0000 - 8, HDR_LEN as u32, 0)]),
            Err(PacketError::BadAddress)
        );
    }

    #[test]
    fn tx_payload_at_the_limit() {
        let mem = memory();
        let header = VsockHeader {
            len: MAX_PAYLOAD_LEN as u32,
            ..sample()
        };
        mem.write_slice(&header.to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        let (parsed, payload) = tx(
            &mem,
            &[
                (0x10_0000, HDR_LEN as u32, 0),
                (0x20_0000, MAX_PAYLOAD_LEN as u32, 0),
            ],
        )
        .unwrap();
        assert_eq!(parsed, header);
        assert_eq!(payload.len(), MAX_PAYLOAD_LEN);
    }

    #[test]
    fn broken_chain_is_rejected() {
        let mem = memory();
        // A descriptor claiming a successor beyond the table: the chain ends early.
        let descs = [Descriptor::new(0x10_0000, HDR_LEN as u32, NEXT, 200)];
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        assert_eq!(
            read_tx_packet(&mem, descs, &mut buf),
            Err(PacketError::BrokenChain)
        );
        let descs = [Descriptor::new(
            0x10_0000,
            HDR_LEN as u32,
            NEXT | WRITE,
            200,
        )];
        assert_eq!(parse_rx_buffer(&mem, descs), Err(PacketError::BrokenChain));
    }

    #[test]
    fn rx_buffer_scatters_header_and_payload() {
        let mem = memory();
        let buffer = with_chain(
            &mem,
            &[
                (0x10_0000, 30, WRITE),
                (0x11_0000, 0, WRITE),
                (0x12_0000, 20, WRITE),
            ],
            |chain| parse_rx_buffer(&mem, chain),
        )
        .unwrap();
        assert_eq!(buffer.capacity(), 50);
        assert_eq!(buffer.max_payload(), 6);
        let header = VsockHeader {
            len: 999,
            ..sample()
        };
        assert_eq!(buffer.write_packet(&mem, &header, b"abcdef"), 50);
        let mut out = [0u8; 50];
        mem.read_slice(&mut out[..30], GuestAddress(0x10_0000))
            .unwrap();
        mem.read_slice(&mut out[30..], GuestAddress(0x12_0000))
            .unwrap();
        let written = VsockHeader::from_bytes(out.first_chunk().unwrap());
        assert_eq!(written, VsockHeader { len: 6, ..sample() });
        assert_eq!(&out[HDR_LEN..], b"abcdef");
        // A short payload leaves the rest alone.
        assert_eq!(buffer.write_packet(&mem, &header, b""), HDR_LEN);
    }

    #[test]
    fn rx_rejections() {
        let mem = memory();
        let parse = |descs: &[(u64, u32, u16)]| {
            with_chain(&mem, descs, |chain| parse_rx_buffer(&mem, chain))
        };
        assert_eq!(
            parse(&[(0x10_0000, 64, 0)]),
            Err(PacketError::ReadableDescriptor)
        );
        assert_eq!(
            parse(&[(0x10_0000, HDR_LEN as u32 - 1, WRITE)]),
            Err(PacketError::BufferTooSmall)
        );
        assert_eq!(
            parse(&[(0x1_0000_0000, 64, WRITE)]),
            Err(PacketError::BadAddress)
        );
        assert_eq!(
            parse(&[(0x40_0000 - 8, 64, WRITE)]),
            Err(PacketError::BadAddress)
        );
        let big = parse(&[(0x10_0000, 0x20_0000, WRITE)]).unwrap();
        assert_eq!(big.max_payload(), MAX_PAYLOAD_LEN);
    }
}
