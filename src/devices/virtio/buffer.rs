//! Receive-side buffers the driver posts, shared by the devices that fill them (net RX,
//! vsock RX): a chain of device-writable descriptors, checked to lie inside guest memory,
//! and the scatter of bytes across its segments.
//!
//! A plain function of guest memory and descriptors (no queue), so fuzz targets and unit
//! tests can call it directly. Nothing here panics on guest input.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Why a chain of device-writable descriptors from the guest is unusable. Devices map it
/// into their own error type.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("a descriptor is device-readable")]
    ReadableDescriptor,
    #[error("the descriptor chain is broken")]
    BrokenChain,
    #[error("a descriptor points outside guest memory")]
    BadAddress,
    #[error("the chain holds fewer bytes than required")]
    TooSmall,
    #[error("a descriptor is device-writable")]
    WritableDescriptor,
    #[error("the chain is longer than the buffer")]
    TooLong,
}

/// Copies a chain of device-readable descriptors into `buf`, in order; returns the bytes
/// copied. Every descriptor must be device-readable and inside guest memory and the chain
/// must fit in `buf`. The data is copied out before anyone looks at it, so the guest
/// cannot change it after the checks.
pub fn gather_readable_chain<M, I>(
    mem: &M,
    descriptors: I,
    buf: &mut [u8],
) -> Result<usize, ChainError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut len = 0usize;
    let mut last_has_next = false;
    for desc in descriptors {
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            return Err(ChainError::WritableDescriptor);
        }
        let end = len
            .checked_add(desc.len() as usize)
            .filter(|&end| end <= buf.len())
            .ok_or(ChainError::TooLong)?;
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|_| ChainError::BadAddress)?;
        len = end;
    }
    // virtio-queue ends a chain silently when a `next` index, the descriptor table or the
    // chain length is invalid; the last descriptor then still claims a successor.
    if last_has_next {
        return Err(ChainError::BrokenChain);
    }
    Ok(len)
}

/// A chain of device-writable descriptors, all inside guest memory, zero-length ones left
/// out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WritableChain {
    segments: Vec<(GuestAddress, u32)>,
    capacity: usize,
}

impl WritableChain {
    /// Total bytes the chain holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The non-empty segments, (guest address, length), in chain order.
    pub fn segments(&self) -> &[(GuestAddress, u32)] {
        &self.segments
    }

    /// Writes the concatenation of `sources` to the start of the chain, as far as it
    /// fits. Returns the bytes written, as `Err` if a segment is no longer in guest memory
    /// (the write stops there).
    pub fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        sources: &[&[u8]],
    ) -> Result<usize, usize> {
        let mut rest = sources.iter().copied();
        let mut source: &[u8] = &[];
        let mut written = 0;
        for &(addr, len) in &self.segments {
            let mut offset = 0usize;
            while offset < len as usize {
                while source.is_empty() {
                    match rest.next() {
                        Some(next) => source = next,
                        None => return Ok(written),
                    }
                }
                let chunk = (len as usize - offset).min(source.len());
                let target = addr.unchecked_add(offset as u64);
                if mem.write_slice(&source[..chunk], target).is_err() {
                    return Err(written);
                }
                source = &source[chunk..];
                offset += chunk;
                written += chunk;
            }
        }
        Ok(written)
    }
}

/// Parses a chain the device writes to: device-writable descriptors only, all inside
/// guest memory, the last one not claiming a successor, together holding at least
/// `min_len` bytes.
pub fn parse_writable_chain<M, I>(
    mem: &M,
    descriptors: I,
    min_len: usize,
) -> Result<WritableChain, ChainError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut segments = Vec::new();
    let mut capacity = 0usize;
    let mut last_has_next = false;
    for desc in descriptors {
        last_has_next = desc.has_next();
        if !desc.is_write_only() {
            return Err(ChainError::ReadableDescriptor);
        }
        if desc.len() == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write) {
            return Err(ChainError::BadAddress);
        }
        segments.push((desc.addr(), desc.len()));
        capacity = capacity.saturating_add(desc.len() as usize);
    }
    // virtio-queue ends a chain silently when a `next` index, the descriptor table or the
    // chain length is invalid; the last descriptor then still claims a successor.
    if last_has_next {
        return Err(ChainError::BrokenChain);
    }
    if capacity < min_len {
        return Err(ChainError::TooSmall);
    }
    Ok(WritableChain { segments, capacity })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn parses_and_scatters_across_segments() {
        let mem = memory();
        let descs = [
            Descriptor::new(0x1000, 30, WRITE | NEXT, 1),
            Descriptor::new(0x8000, 0, WRITE | NEXT, 2),
            Descriptor::new(0x2000, 20, WRITE, 0),
        ];
        let chain = parse_writable_chain(&mem, descs, 50).unwrap();
        assert_eq!(chain.capacity(), 50);

        // Two sources, the first ending inside the first segment; the whole chain filled.
        let head: Vec<u8> = (0..12).collect();
        let body: Vec<u8> = (100..200).collect();
        assert_eq!(chain.write(&mem, &[&head, &body]), Ok(50));
        let mut out = [0u8; 50];
        mem.read_slice(&mut out[..30], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut out[30..], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(out[..12], head[..]);
        assert_eq!(out[12..], body[..38]);

        // Less than the chain holds: only that much goes in; empty sources are skipped.
        assert_eq!(chain.write(&mem, &[&[], &[7; 40], &[]]), Ok(40));
        assert_eq!(chain.write(&mem, &[]), Ok(0));
        mem.read_slice(&mut out[30..], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(out[30..40], [7; 10]);
        assert_eq!(out[40..], body[28..38]);
    }

    #[test]
    fn rejections() {
        let mem = memory();
        let readable = [
            Descriptor::new(0x1000, 8, WRITE | NEXT, 1),
            Descriptor::new(0x2000, 100, 0, 0),
        ];
        assert_eq!(
            parse_writable_chain(&mem, readable, 0),
            Err(ChainError::ReadableDescriptor)
        );
        let small = [Descriptor::new(0x1000, 11, WRITE, 0)];
        assert_eq!(
            parse_writable_chain(&mem, small, 12),
            Err(ChainError::TooSmall)
        );
        assert!(parse_writable_chain(&mem, small, 11).is_ok());
        // Zero-length descriptors hold nothing, wherever they point.
        let empty = [Descriptor::new(u64::MAX, 0, WRITE, 0)];
        assert_eq!(
            parse_writable_chain(&mem, empty, 1),
            Err(ChainError::TooSmall)
        );
        let outside = [Descriptor::new(0xfff00, 0x200, WRITE, 0)];
        assert_eq!(
            parse_writable_chain(&mem, outside, 0),
            Err(ChainError::BadAddress)
        );
        let wrapping = [Descriptor::new(u64::MAX - 4, 64, WRITE, 0)];
        assert_eq!(
            parse_writable_chain(&mem, wrapping, 0),
            Err(ChainError::BadAddress)
        );
        let broken = [Descriptor::new(0x1000, 100, WRITE | NEXT, 3)];
        assert_eq!(
            parse_writable_chain(&mem, broken, 0),
            Err(ChainError::BrokenChain)
        );
    }
}
