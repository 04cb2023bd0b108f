//! What the guest controls in virtio-net: the `virtio_net_hdr_v1` in front of every frame,
//! TX frames gathered from a descriptor chain, and the RX buffers the driver posts.
//!
//! Everything here is a plain function of guest memory and descriptors (no queue, no tap),
//! so a fuzz target can call [`read_tx_frame`], [`prepare_tx_frame`], [`parse_rx_buffer`]
//! and [`finish_rx_header`] directly. Nothing here panics on guest input.

use std::mem::size_of;

use virtio_bindings::virtio_net::{
    virtio_net_hdr_v1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemory;

use crate::devices::virtio::buffer::{
    gather_readable_chain, parse_writable_chain, ChainError, WritableChain,
};

/// Size of `virtio_net_hdr_v1` (with `num_buffers`): the header of every frame once
/// VIRTIO_F_VERSION_1 is negotiated, and the vnet header size the tap is set to.
pub const VNET_HDR_LEN: usize = 12;
const _: () = assert!(VNET_HDR_LEN == size_of::<virtio_net_hdr_v1>());

/// Ethernet header length; a frame must at least carry one.
pub const ETH_HLEN: usize = 14;

/// Longest frame after the header: a 64 KiB GSO packet plus Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65550;

/// Longest header + frame either direction carries (what the bounce buffers hold).
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// The feature-word bit of a `VIRTIO_*_F_*` feature number.
pub const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// `virtio_net_hdr_v1`, decoded (little-endian on the wire, VIRTIO_F_VERSION_1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    pub fn from_bytes(bytes: &[u8; VNET_HDR_LEN]) -> Self {
        let le16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Self {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(10),
        }
    }

    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut bytes = [0u8; VNET_HDR_LEN];
        bytes[0] = self.flags;
        bytes[1] = self.gso_type;
        bytes[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        bytes[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        bytes[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        bytes
    }
}

/// Why a TX frame or an RX buffer from the guest is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a TX descriptor is device-writable")]
    WritableDescriptor,
    #[error("an RX descriptor is device-readable")]
    ReadableDescriptor,
    #[error("the descriptor chain is broken")]
    BrokenChain,
    #[error("the frame is longer than {MAX_BUFFER_LEN} bytes")]
    TooLong,
    #[error("the frame is shorter than a virtio-net header and an Ethernet header")]
    TooShort,
    #[error("the RX buffer is smaller than a virtio-net header")]
    BufferTooSmall,
    #[error("a descriptor points outside guest memory")]
    BadAddress,
    #[error("header flags {0:#x} are not allowed")]
    Flags(u8),
    #[error("GSO type {0:#x} was not negotiated")]
    GsoType(u8),
    #[error("the checksum offsets lie outside the frame")]
    ChecksumRange,
    #[error("a GSO frame needs a segment size and a checksum request")]
    GsoFields,
}

/// Gathers a TX frame (header + data) from `descriptors` into `buf`; returns its length.
///
/// Every descriptor must be device-readable and inside guest memory, and the whole frame
/// must fit in `buf` (callers pass a [`MAX_BUFFER_LEN`] buffer). The frame is copied out of
/// guest memory before anything looks at it, so the guest cannot change it after checks.
pub fn read_tx_frame<M, I>(mem: &M, descriptors: I, buf: &mut [u8]) -> Result<usize, FrameError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let len = gather_readable_chain(mem, descriptors, buf)?;
    Ok(len)
}

/// Checks a gathered TX frame's header against the negotiated `features` and rewrites it
/// into what the tap expects (`num_buffers` and DATA_VALID cleared).
pub fn prepare_tx_frame(frame: &mut [u8], features: u64) -> Result<(), FrameError> {
    if frame.len() < VNET_HDR_LEN + ETH_HLEN {
        return Err(FrameError::TooShort);
    }
    let mut header_bytes = [0u8; VNET_HDR_LEN];
    header_bytes.copy_from_slice(&frame[..VNET_HDR_LEN]);
    let mut header = VirtioNetHdr::from_bytes(&header_bytes);
    let payload_len = frame.len() - VNET_HDR_LEN;

    // DATA_VALID means nothing on TX; drivers should not set it, but it is harmless.
    header.flags &= !(VIRTIO_NET_HDR_F_DATA_VALID as u8);
    let needs_csum = header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0;
    if header.flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8) != 0
        || (needs_csum && features & bit(VIRTIO_NET_F_CSUM) == 0)
    {
        return Err(FrameError::Flags(header.flags));
    }
    if needs_csum {
        let csum_end = usize::from(header.csum_start) + usize::from(header.csum_offset) + 2;
        if csum_end > payload_len {
            return Err(FrameError::ChecksumRange);
        }
    }

    let ecn = header.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
    let negotiated = match u32::from(header.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => features & bit(VIRTIO_NET_F_HOST_TSO4) != 0,
        VIRTIO_NET_HDR_GSO_TCPV6 => features & bit(VIRTIO_NET_F_HOST_TSO6) != 0,
        _ => false,
    };
    if !negotiated || (ecn && features & bit(VIRTIO_NET_F_HOST_ECN) == 0) {
        return Err(FrameError::GsoType(header.gso_type));
    }
    if u32::from(header.gso_type) != VIRTIO_NET_HDR_GSO_NONE
        && (header.gso_size == 0 || !needs_csum)
    {
        return Err(FrameError::GsoFields);
    }

    header.num_buffers = 0;
    frame[..VNET_HDR_LEN].copy_from_slice(&header.to_bytes());
    Ok(())
}

/// One receive buffer the driver posted: a chain of device-writable descriptors, checked
/// to lie inside guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    head: u16,
    chain: WritableChain,
}

impl RxBuffer {
    /// The chain's head index, for the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Total bytes the buffer holds.
    pub fn capacity(&self) -> usize {
        self.chain.capacity()
    }

    /// Copies the start of `data` into the buffer; returns how many bytes went in.
    pub fn write<M: GuestMemory + ?Sized>(&self, mem: &M, data: &[u8]) -> usize {
        self.chain.write(mem, &[data]).unwrap_or_else(|written| {
            // Checked when parsed; guest memory does not shrink while a device runs.
            log::warn!("virtio-net: RX buffer no longer in guest memory");
            written
        })
    }
}

impl From<ChainError> for FrameError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::ReadableDescriptor => FrameError::ReadableDescriptor,
            ChainError::BrokenChain => FrameError::BrokenChain,
            ChainError::BadAddress => FrameError::BadAddress,
            ChainError::TooSmall => FrameError::BufferTooSmall,
            ChainError::WritableDescriptor => FrameError::WritableDescriptor,
            ChainError::TooLong => FrameError::TooLong,
        }
    }
}

/// Parses an RX chain: device-writable descriptors only, all inside guest memory, holding
/// at least a virtio-net header (virtio 1.x 5.1.6.3.1 requires that of every buffer).
pub fn parse_rx_buffer<M, I>(mem: &M, head: u16, descriptors: I) -> Result<RxBuffer, FrameError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let chain = parse_writable_chain(mem, descriptors, VNET_HDR_LEN)?;
    Ok(RxBuffer { head, chain })
}

/// Completes the header the tap put in front of an RX frame: `num_buffers` (the number of
/// RX buffers the frame spans; 1 without VIRTIO_NET_F_MRG_RXBUF), and no checksum flags
/// unless the driver negotiated VIRTIO_NET_F_GUEST_CSUM (virtio 1.x 5.1.6.4.1).
pub fn finish_rx_header(header: &mut [u8; VNET_HDR_LEN], num_buffers: u16, features: u64) {
    let mut decoded = VirtioNetHdr::from_bytes(header);
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        decoded.flags = 0;
    }
    decoded.num_buffers = num_buffers;
    *header = decoded.to_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::Bytes;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn all_tx_offloads() -> u64 {
        bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
    }

    fn frame_with(header: VirtioNetHdr, payload_len: usize) -> Vec<u8> {
        let mut frame = header.to_bytes().to_vec();
        frame.extend((0..payload_len).map(|i| i as u8));
        frame
    }

    #[test]
    fn header_round_trip() {
        let header = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x1234,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let bytes = header.to_bytes();
        assert_eq!(bytes[2..4], [0x34, 0x12]);
        assert_eq!(VirtioNetHdr::from_bytes(&bytes), header);
    }

    #[test]
    fn tx_gathers_across_descriptors() {
        let mem = memory();
        mem.write_slice(&[1; 12], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2; 20], GuestAddress(0x2000)).unwrap();
        let descs = [
            Descriptor::new(0x1000, 12, NEXT, 1),
            Descriptor::new(0x2000, 20, 0, 0),
        ];
        let mut buf = vec![0; MAX_BUFFER_LEN];
        assert_eq!(read_tx_frame(&mem, descs, &mut buf), Ok(32));
        assert_eq!(buf[..12], [1; 12]);
        assert_eq!(buf[12..32], [2; 20]);
    }

    #[test]
    fn tx_rejects_bad_chains() {
        let mem = memory();
        let mut buf = vec![0; MAX_BUFFER_LEN];
        let writable = [
            Descriptor::new(0x1000, 12, NEXT, 1),
            Descriptor::new(0x2000, 20, WRITE, 0),
        ];
        assert_eq!(
            read_tx_frame(&mem, writable, &mut buf),
            Err(FrameError::WritableDescriptor)
        );
        let huge = [Descriptor::new(0x1000, u32::MAX, 0, 0)];
        assert_eq!(
            read_tx_frame(&mem, huge, &mut buf),
            Err(FrameError::TooLong)
        );
        let just_over = [
            Descriptor::new(0x1000, MAX_BUFFER_LEN as u32, NEXT, 1),
            Descriptor::new(0x1000, 1, 0, 0),
        ];
        assert_eq!(
            read_tx_frame(&mem, just_over, &mut buf),
            Err(FrameError::TooLong)
        );
        let outside = [Descriptor::new(0xff000, 0x2000, 0, 0)];
        assert_eq!(
            read_tx_frame(&mem, outside, &mut buf),
            Err(FrameError::BadAddress)
        );
        let wrapping = [Descriptor::new(u64::MAX - 4, 64, 0, 0)];
        assert_eq!(
            read_tx_frame(&mem, wrapping, &mut buf),
            Err(FrameError::BadAddress)
        );
        let broken = [Descriptor::new(0x1000, 12, NEXT, 7)];
        assert_eq!(
            read_tx_frame(&mem, broken, &mut buf),
            Err(FrameError::BrokenChain)
        );
    }

    #[test]
    fn tx_header_checks() {
        let plain = VirtioNetHdr::default();
        assert_eq!(
            prepare_tx_frame(&mut frame_with(plain, ETH_HLEN - 1), 0),
            Err(FrameError::TooShort)
        );
        assert_eq!(prepare_tx_frame(&mut frame_with(plain, 60), 0), Ok(()));

        let csum = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            csum_start: 34,
            csum_offset: 6,
            ..plain
        };
        // Checksum offload only when negotiated, and only inside the frame.
        assert_eq!(
            prepare_tx_frame(&mut frame_with(csum, 60), 0),
            Err(FrameError::Flags(1))
        );
        assert_eq!(
            prepare_tx_frame(&mut frame_with(csum, 60), all_tx_offloads()),
            Ok(())
        );
        assert_eq!(
            prepare_tx_frame(&mut frame_with(csum, 41), all_tx_offloads()),
            Err(FrameError::ChecksumRange)
        );
        let unknown_flag = VirtioNetHdr {
            flags: 0x80,
            ..plain
        };
        assert_eq!(
            prepare_tx_frame(&mut frame_with(unknown_flag, 60), all_tx_offloads()),
            Err(FrameError::Flags(0x80))
        );

        let tso4 = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            gso_size: 1448,
            ..csum
        };
        assert_eq!(
            prepare_tx_frame(&mut frame_with(tso4, 3000), bit(VIRTIO_NET_F_CSUM)),
            Err(FrameError::GsoType(1))
        );
        assert_eq!(
            prepare_tx_frame(&mut frame_with(tso4, 3000), all_tx_offloads()),
            Ok(())
        );
        let tso4_ecn = VirtioNetHdr {
            gso_type: (VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN) as u8,
            ..tso4
        };
        assert_eq!(
            prepare_tx_frame(
                &mut frame_with(tso4_ecn, 3000),
                bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)
            ),
            Err(FrameError::GsoType(0x81))
        );
        let udp = VirtioNetHdr {
            gso_type: 3,
            ..tso4
        };
        assert_eq!(
            prepare_tx_frame(&mut frame_with(udp, 3000), all_tx_offloads()),
            Err(FrameError::GsoType(3))
        );
        let no_segment_size = VirtioNetHdr {
            gso_size: 0,
            ..tso4
        };
        assert_eq!(
            prepare_tx_frame(&mut frame_with(no_segment_size, 3000), all_tx_offloads()),
            Err(FrameError::GsoFields)
        );
    }

    #[test]
    fn tx_header_is_cleaned() {
        let header = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID as u8,
            num_buffers: 9,
            ..VirtioNetHdr::default()
        };
        let mut frame = frame_with(header, 60);
        prepare_tx_frame(&mut frame, 0).unwrap();
        assert_eq!(frame[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
    }

    #[test]
    fn rx_buffer_parsing() {
        let mem = memory();
        let good = [
            Descriptor::new(0x1000, 8, WRITE | NEXT, 1),
            Descriptor::new(0x2000, 100, WRITE, 0),
        ];
        let buffer = parse_rx_buffer(&mem, 5, good).unwrap();
        assert_eq!((buffer.head(), buffer.capacity()), (5, 108));

        let data: Vec<u8> = (0..50).collect();
        assert_eq!(buffer.write(&mem, &data), 50);
        let mut back = [0u8; 50];
        mem.read_slice(&mut back[..8], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut back[8..], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(back[..], data[..]);

        let readable = [Descriptor::new(0x1000, 100, 0, 0)];
        assert_eq!(
            parse_rx_buffer(&mem, 0, readable),
            Err(FrameError::ReadableDescriptor)
        );
        let small = [Descriptor::new(0x1000, 11, WRITE, 0)];
        assert_eq!(
            parse_rx_buffer(&mem, 0, small),
            Err(FrameError::BufferTooSmall)
        );
        let outside = [Descriptor::new(0xfff00, 0x200, WRITE, 0)];
        assert_eq!(
            parse_rx_buffer(&mem, 0, outside),
            Err(FrameError::BadAddress)
        );
        let broken = [Descriptor::new(0x1000, 100, WRITE | NEXT, 3)];
        assert_eq!(
            parse_rx_buffer(&mem, 0, broken),
            Err(FrameError::BrokenChain)
        );
    }

    #[test]
    fn rx_header_completion() {
        let from_tap = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID as u8,
            num_buffers: 0xffff,
            ..VirtioNetHdr::default()
        };
        let mut bytes = from_tap.to_bytes();
        finish_rx_header(&mut bytes, 3, 0);
        assert_eq!(
            VirtioNetHdr::from_bytes(&bytes),
            VirtioNetHdr {
                num_buffers: 3,
                ..VirtioNetHdr::default()
            }
        );
        let mut bytes = from_tap.to_bytes();
        finish_rx_header(&mut bytes, 1, bit(VIRTIO_NET_F_GUEST_CSUM));
        assert_eq!(bytes[0], VIRTIO_NET_HDR_F_DATA_VALID as u8);
        assert_eq!(bytes[10..12], [1, 0]);
    }
}
