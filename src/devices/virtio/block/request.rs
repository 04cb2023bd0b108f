//! One virtio-blk request: splitting a descriptor chain into header, data and status,
//! checking everything the guest controls, and running it against a [`Backend`].
//!
//! Nothing here trusts the guest: descriptor directions and lengths, sector ranges (with
//! checked arithmetic), request sizes and guest addresses are all validated before the
//! backend is touched, and no guest input can make this code panic. [`process_chain`] is
//! the entry point for fuzzing, with a [`MemoryDisk`] backend.

use std::io;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestMemory, Permissions, VolatileSlice};

use super::{ID_BYTES, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr`: type, ioprio, sector.
pub const HEADER_SIZE: u32 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const SEGMENT_SIZE: u32 = 16;
/// Most data descriptors in one request (config `seg_max`). Linux wants at most the queue
/// size minus the header and status descriptors.
pub const SEG_MAX: u32 = 254;
/// Largest data descriptor the driver should build (config `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest read or write; anything bigger is refused, so one request cannot monopolise the
/// event loop.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Sectors one discard or write-zeroes segment may cover (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Longest chain accepted: header, `SEG_MAX` data descriptors, status.
const MAX_CHAIN_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// The disk and the negotiated features, as requests see them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskParams {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    /// The GET_ID answer, zero-padded.
    pub id: [u8; ID_BYTES],
    /// VIRTIO_BLK_F_DISCARD was negotiated.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
}

/// Where the data lives. Offsets and lengths are in bytes and have been checked against
/// the capacity; slices are guest memory that has been checked to exist.
pub trait Backend {
    /// Fills all of `dst` from `offset`.
    fn read_at<S: BitmapSlice>(&mut self, offset: u64, dst: &VolatileSlice<S>) -> io::Result<()>;
    /// Writes all of `src` at `offset`.
    fn write_at<S: BitmapSlice>(&mut self, offset: u64, src: &VolatileSlice<S>) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The guest no longer needs `[offset, offset + len)`; reads may return anything after.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// `[offset, offset + len)` reads as zeroes afterwards; `unmap` allows deallocation.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// Why a request failed; each maps to the status byte the guest gets.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("chain of more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("request has no header descriptor")]
    NoHeader,
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    #[error("header descriptor is {0} bytes, shorter than {HEADER_SIZE}")]
    HeaderTooShort(u32),
    #[error("header at {0:#x} is not in guest memory")]
    HeaderUnreadable(u64),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("request has no data descriptor")]
    NoData,
    #[error("data descriptor has the wrong direction for this request")]
    DataDirection,
    #[error("zero-length data descriptor")]
    EmptyDescriptor,
    #[error("data is {0} bytes, not a multiple of 512")]
    NotSectorMultiple(u64),
    #[error("data is {0} bytes, more than {MAX_REQUEST_BYTES}")]
    TooLarge(u64),
    #[error("{bytes} bytes at sector {sector} are outside the disk")]
    OutOfRange { sector: u64, bytes: u64 },
    #[error("data buffer {addr:#x}+{len:#x} is not in guest memory")]
    BadBuffer { addr: u64, len: u32 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("{0} bytes of segments, not a whole number from 1 to {MAX_DISCARD_SEGMENTS}")]
    SegmentCount(u64),
    #[error("segment flags {0:#x} are not supported")]
    SegmentFlags(u32),
    #[error("segment of {0} sectors is longer than {MAX_DISCARD_SECTORS}")]
    SegmentTooLong(u32),
    #[error("disk I/O failed")]
    Io(#[source] io::Error),
}

impl RequestError {
    /// The status byte for the guest.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::SegmentFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain split into its parts. The status descriptor is known to be usable.
struct ChainLayout {
    /// Header then data descriptors (everything but the status descriptor).
    descriptors: Vec<Descriptor>,
    status: Descriptor,
    too_long: bool,
}

/// Runs the request in `chain` and writes its status byte. Returns the number of bytes
/// written into the guest's buffers, for the used ring: data plus the status byte, or 0
/// when the chain has no usable status descriptor (then nothing else is done either).
pub fn process_chain<M, I, B>(chain: I, mem: &M, backend: &mut B, disk: &DiskParams) -> u32
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
    B: Backend,
{
    let Some(layout) = split_chain(chain, mem) else {
        log::debug!("virtio-blk: chain without a usable status descriptor");
        return 0;
    };
    let (status, data_len) = match execute(&layout, mem, backend, disk) {
        Ok(len) => (VIRTIO_BLK_S_OK as u8, len),
        Err(RequestError::Io(e)) => {
            log::warn!("virtio-blk: disk I/O failed: {e}");
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
        Err(e) => {
            log::debug!("virtio-blk: bad request: {e}");
            (e.status(), 0)
        }
    };
    match mem.write_obj(status, layout.status.addr()) {
        // At most MAX_REQUEST_BYTES or ID_BYTES of data, so this cannot overflow.
        Ok(()) => data_len.saturating_add(1),
        Err(e) => {
            log::debug!("virtio-blk: cannot write the status byte: {e}");
            0
        }
    }
}

/// Finds the status descriptor: the last one, device-writable, in guest memory, and not
/// the cut-off end of a chain that loops or runs on (it would still point onward).
fn split_chain<M, I>(chain: I, mem: &M) -> Option<ChainLayout>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut descriptors = Vec::new();
    let mut last = None;
    let mut too_long = false;
    for desc in chain {
        if let Some(previous) = last.replace(desc) {
            if descriptors.len() < MAX_CHAIN_DESCRIPTORS - 1 {
                descriptors.push(previous);
            } else {
                too_long = true;
            }
        }
    }
    let status = last?;
    let usable = status.is_write_only()
        && !status.has_next()
        && status.len() >= 1
        && mem.check_range(status.addr(), 1, Permissions::Write);
    usable.then_some(ChainLayout {
        descriptors,
        status,
        too_long,
    })
}

/// Runs the request; returns the data bytes written into guest memory.
fn execute<M, B>(
    layout: &ChainLayout,
    mem: &M,
    backend: &mut B,
    disk: &DiskParams,
) -> Result<u32, RequestError>
where
    M: GuestMemory + ?Sized,
    B: Backend,
{
    if layout.too_long {
        return Err(RequestError::TooManyDescriptors);
    }
    let (header, data) = layout
        .descriptors
        .split_first()
        .ok_or(RequestError::NoHeader)?;
    let (request_type, sector) = read_header(header, mem)?;
    match request_type {
        VIRTIO_BLK_T_IN => {
            let len = check_transfer(data, mem, disk, sector, true)?;
            transfer(data, mem, backend, sector, true)?;
            Ok(len)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            check_transfer(data, mem, disk, sector, false)?;
            transfer(data, mem, backend, sector, false)?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            backend.flush().map_err(RequestError::Io)?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => get_id(data, mem, disk),
        VIRTIO_BLK_T_DISCARD if disk.discard => {
            discard_or_zero(data, mem, backend, disk, false)?;
            Ok(0)
        }
        VIRTIO_BLK_T_WRITE_ZEROES if disk.write_zeroes => {
            discard_or_zero(data, mem, backend, disk, true)?;
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Reads `struct virtio_blk_outhdr`; returns the request type and sector.
fn read_header<M: GuestMemory + ?Sized>(
    header: &Descriptor,
    mem: &M,
) -> Result<(u32, u64), RequestError> {
    if header.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if header.len() < HEADER_SIZE {
        return Err(RequestError::HeaderTooShort(header.len()));
    }
    let mut raw = [0u8; HEADER_SIZE as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::HeaderUnreadable(header.addr().0))?;
    let request_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    // raw[4..8] is ioprio, which this device ignores.
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    Ok((request_type, u64::from_le_bytes(sector)))
}

/// Byte range `[sector * 512, + bytes)` if it lies within the disk.
fn disk_range(disk: &DiskParams, sector: u64, bytes: u64) -> Result<u64, RequestError> {
    let out_of_range = || RequestError::OutOfRange { sector, bytes };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    let end = offset.checked_add(bytes).ok_or_else(out_of_range)?;
    let capacity = disk
        .capacity
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(out_of_range)?;
    if end > capacity {
        return Err(out_of_range());
    }
    Ok(offset)
}

/// Validates the data descriptors of a read (`to_guest`) or write; returns the length.
fn check_transfer<M: GuestMemory + ?Sized>(
    data: &[Descriptor],
    mem: &M,
    disk: &DiskParams,
    sector: u64,
    to_guest: bool,
) -> Result<u32, RequestError> {
    if data.is_empty() {
        return Err(RequestError::NoData);
    }
    let access = if to_guest {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total: u64 = 0;
    for desc in data {
        if desc.is_write_only() != to_guest {
            return Err(RequestError::DataDirection);
        }
        if desc.len() == 0 {
            return Err(RequestError::EmptyDescriptor);
        }
        total = total.saturating_add(u64::from(desc.len()));
        if total > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(total));
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(RequestError::BadBuffer {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
    }
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::NotSectorMultiple(total));
    }
    disk_range(disk, sector, total)?;
    // total <= MAX_REQUEST_BYTES < 4 GiB.
    u32::try_from(total).map_err(|_| RequestError::TooLarge(total))
}

/// Moves the data of a checked read or write, one backend call per guest memory slice
/// (one per descriptor unless a buffer spans memory regions).
fn transfer<M, B>(
    data: &[Descriptor],
    mem: &M,
    backend: &mut B,
    sector: u64,
    to_guest: bool,
) -> Result<(), RequestError>
where
    M: GuestMemory + ?Sized,
    B: Backend,
{
    let access = if to_guest {
        Permissions::Write
    } else {
        Permissions::Read
    };
    // Checked by check_transfer: sector * 512 + total fits the disk.
    let mut offset = sector.wrapping_mul(SECTOR_SIZE);
    for desc in data {
        let bad_buffer = || RequestError::BadBuffer {
            addr: desc.addr().0,
            len: desc.len(),
        };
        let slices = mem
            .get_slices(desc.addr(), desc.len() as usize, access)
            .map_err(|_| bad_buffer())?;
        for slice in slices {
            let slice = slice.map_err(|_| bad_buffer())?;
            let result = if to_guest {
                backend.read_at(offset, &slice)
            } else {
                backend.write_at(offset, &slice)
            };
            result.map_err(RequestError::Io)?;
            offset += slice.len() as u64;
        }
    }
    Ok(())
}

/// GET_ID: the id, zero-padded, into the device-writable data buffers (at most 20 bytes).
fn get_id<M: GuestMemory + ?Sized>(
    data: &[Descriptor],
    mem: &M,
    disk: &DiskParams,
) -> Result<u32, RequestError> {
    if data.is_empty() {
        return Err(RequestError::NoData);
    }
    let mut remaining = &disk.id[..];
    let mut written = 0u32;
    for desc in data {
        if !desc.is_write_only() {
            return Err(RequestError::DataDirection);
        }
        let n = remaining.len().min(desc.len() as usize);
        mem.write_slice(&remaining[..n], desc.addr())
            .map_err(|_| RequestError::BadBuffer {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
        remaining = &remaining[n..];
        written += n as u32;
    }
    Ok(written)
}

/// One `struct virtio_blk_discard_write_zeroes`, checked against the disk.
struct Segment {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// DISCARD or WRITE_ZEROES: every segment is read and checked before any is run.
fn discard_or_zero<M, B>(
    data: &[Descriptor],
    mem: &M,
    backend: &mut B,
    disk: &DiskParams,
    zero: bool,
) -> Result<(), RequestError>
where
    M: GuestMemory + ?Sized,
    B: Backend,
{
    if disk.read_only {
        return Err(RequestError::ReadOnly);
    }
    const BUF_LEN: usize = (MAX_DISCARD_SEGMENTS * SEGMENT_SIZE) as usize;
    let mut raw = [0u8; BUF_LEN];
    let mut filled = 0usize;
    let mut total: u64 = 0;
    for desc in data {
        if desc.is_write_only() {
            return Err(RequestError::DataDirection);
        }
        total = total.saturating_add(u64::from(desc.len()));
        let len = desc.len() as usize;
        let Some(dst) = raw.get_mut(filled..filled + len) else {
            return Err(RequestError::SegmentCount(total));
        };
        mem.read_slice(dst, desc.addr())
            .map_err(|_| RequestError::BadBuffer {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
        filled += len;
    }
    if filled == 0 || !filled.is_multiple_of(SEGMENT_SIZE as usize) {
        return Err(RequestError::SegmentCount(total));
    }

    let allowed_flags = if zero {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    let mut segments = Vec::with_capacity(filled / SEGMENT_SIZE as usize);
    for chunk in raw[..filled].chunks_exact(SEGMENT_SIZE as usize) {
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&chunk[0..8]);
        let sector = u64::from_le_bytes(sector);
        let num_sectors = u32::from_le_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]);
        let flags = u32::from_le_bytes([chunk[12], chunk[13], chunk[14], chunk[15]]);
        if flags & !allowed_flags != 0 {
            return Err(RequestError::SegmentFlags(flags));
        }
        if num_sectors > MAX_DISCARD_SECTORS {
            return Err(RequestError::SegmentTooLong(num_sectors));
        }
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = disk_range(disk, sector, len)?;
        segments.push(Segment {
            offset,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    for segment in segments.iter().filter(|s| s.len > 0) {
        let result = if zero {
            backend.write_zeroes(segment.offset, segment.len, segment.unmap)
        } else {
            backend.discard(segment.offset, segment.len)
        };
        result.map_err(RequestError::Io)?;
    }
    Ok(())
}

/// A disk held in memory, for tests and fuzz targets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryDisk {
    pub data: Vec<u8>,
    pub flushes: usize,
}

impl MemoryDisk {
    pub fn new(data: Vec<u8>) -> Self {
        Self { data, flushes: 0 }
    }

    fn range(&mut self, offset: u64, len: u64) -> io::Result<&mut [u8]> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        self.data
            .get_mut(start..end)
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}

impl Backend for MemoryDisk {
    fn read_at<S: BitmapSlice>(&mut self, offset: u64, dst: &VolatileSlice<S>) -> io::Result<()> {
        let src = self.range(offset, dst.len() as u64)?;
        dst.copy_from(src);
        Ok(())
    }

    fn write_at<S: BitmapSlice>(&mut self, offset: u64, src: &VolatileSlice<S>) -> io::Result<()> {
        let dst = self.range(offset, src.len() as u64)?;
        src.copy_to(dst);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.range(offset, len)?.fill(0);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.range(offset, len)?.fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::block::test_util::{guest_memory, pattern, MEM_SIZE};

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    /// Written into buffers before a request, to see what the device wrote.
    const POISON: u8 = 0xee;
    const DISK_SECTORS: u64 = 64;

    fn disk_params() -> DiskParams {
        let mut id = [0u8; ID_BYTES];
        id[..11].copy_from_slice(b"hearth-disk");
        DiskParams {
            capacity: DISK_SECTORS,
            read_only: false,
            id,
            discard: true,
            write_zeroes: true,
        }
    }

    fn memory_disk() -> MemoryDisk {
        MemoryDisk::new(
            (0..(DISK_SECTORS * SECTOR_SIZE) as usize)
                .map(pattern)
                .collect(),
        )
    }

    fn readable(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn writable(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    fn header() -> Descriptor {
        readable(HEADER, HEADER_SIZE)
    }

    fn status() -> Descriptor {
        writable(STATUS, 1)
    }

    fn put_header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(HEADER)).unwrap();
    }

    fn fill(mem: &GuestMemoryMmap, addr: u64, len: usize, byte: u8) {
        mem.write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn read_mem(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Runs `descs` as one chain built in a mock queue; returns the used length and the
    /// status byte (POISON when the device did not write it).
    fn run<B: Backend>(
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        backend: &mut B,
        params: &DiskParams,
    ) -> (u32, u8) {
        mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
        let queue = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs.iter().copied().map(RawDescriptor::from).collect();
        let chain = queue.build_desc_chain(&raw).unwrap();
        let len = process_chain(chain, mem, backend, params);
        (len, mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn read_spans_descriptors() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        put_header(&mem, VIRTIO_BLK_T_IN, 1);
        fill(&mem, DATA, 0x1000, POISON);
        let descs = [
            header(),
            writable(DATA, 512),
            writable(DATA + 0x800, 1024),
            status(),
        ];
        assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (1537, OK));
        assert_eq!(read_mem(&mem, DATA, 512), disk.data[512..1024]);
        assert_eq!(read_mem(&mem, DATA + 512, 1), [POISON]);
        assert_eq!(read_mem(&mem, DATA + 0x800, 1024), disk.data[1024..2048]);
    }

    #[test]
    fn write_then_read_back() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        let original = disk.data.clone();
        let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
        put_header(&mem, VIRTIO_BLK_T_OUT, 3);
        let descs = [header(), readable(DATA, 1024), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (1, OK));
        assert_eq!(disk.data[3 * 512..5 * 512], payload[..]);
        assert_eq!(disk.data[..3 * 512], original[..3 * 512]);
        assert_eq!(disk.data[5 * 512..], original[5 * 512..]);

        fill(&mem, DATA + 0x10000, 1024, 0);
        put_header(&mem, VIRTIO_BLK_T_IN, 3);
        let descs = [header(), writable(DATA + 0x10000, 1024), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (1025, OK));
        assert_eq!(read_mem(&mem, DATA + 0x10000, 1024), payload);
    }

    #[test]
    fn last_sector_is_reachable() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        put_header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
        let descs = [header(), writable(DATA, 512), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (513, OK));
    }

    #[test]
    fn flush_reaches_the_backend() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        put_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let descs = [header(), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (1, OK));
        assert_eq!(disk.flushes, 1);
        // A read-only disk flushes too.
        let params = DiskParams {
            read_only: true,
            ..disk_params()
        };
        assert_eq!(run(&mem, &descs, &mut disk, &params), (1, OK));
    }

    #[test]
    fn get_id_is_zero_padded() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        put_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        fill(&mem, DATA, 32, POISON);
        let descs = [header(), writable(DATA, 32), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (21, OK));
        let mut expected = b"hearth-disk".to_vec();
        expected.resize(ID_BYTES, 0);
        expected.extend_from_slice(&[POISON; 12]);
        assert_eq!(read_mem(&mem, DATA, 32), expected);

        // A short buffer gets what fits; no id reads as all zeroes.
        let descs = [header(), writable(DATA, 4), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (5, OK));
        let params = DiskParams {
            id: [0; ID_BYTES],
            ..disk_params()
        };
        let descs = [header(), writable(DATA, 20), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &params), (21, OK));
        assert_eq!(read_mem(&mem, DATA, 20), [0; 20]);
        // The id must go into a device-writable buffer.
        let descs = [header(), readable(DATA, 20), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &params), (1, IOERR));
    }

    /// (sector, num_sectors, flags) of each discard or write-zeroes segment.
    type Segments = &'static [(u64, u32, u32)];

    fn put_segments(mem: &GuestMemoryMmap, segments: &[(u64, u32, u32)]) -> u32 {
        let mut raw = Vec::new();
        for &(sector, num_sectors, flags) in segments {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&num_sectors.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
        raw.len() as u32
    }

    #[test]
    fn discard_and_write_zeroes_clear_ranges() {
        for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let mem = guest_memory();
            let mut disk = memory_disk();
            let original = disk.data.clone();
            put_header(&mem, request_type, 0);
            let len = put_segments(&mem, &[(2, 2, 0), (10, 1, 0)]);
            let descs = [header(), readable(DATA, len), status()];
            assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (1, OK));
            assert!(disk.data[1024..2048].iter().all(|&b| b == 0));
            assert!(disk.data[5120..5632].iter().all(|&b| b == 0));
            assert_eq!(disk.data[..1024], original[..1024]);
            assert_eq!(disk.data[2048..5120], original[2048..5120]);
            assert_eq!(disk.data[5632..], original[5632..]);
        }
    }

    #[test]
    fn discard_and_write_zeroes_are_checked_first() {
        let mem = guest_memory();
        let params = disk_params();
        let cases: &[(u32, Segments, u8)] = &[
            // The unmap flag is only for write-zeroes; unknown flags for neither.
            (
                VIRTIO_BLK_T_DISCARD,
                &[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
                UNSUPP,
            ),
            (VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)], UNSUPP),
            // A valid segment is not run when a later one is out of range.
            (
                VIRTIO_BLK_T_DISCARD,
                &[(0, 1, 0), (DISK_SECTORS, 1, 0)],
                IOERR,
            ),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[(0, 1, 0), (DISK_SECTORS - 1, 2, 0)],
                IOERR,
            ),
            (VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 1, 0)], IOERR),
            (
                VIRTIO_BLK_T_DISCARD,
                &[(0, MAX_DISCARD_SECTORS + 1, 0)],
                IOERR,
            ),
        ];
        for &(request_type, segments, expected) in cases {
            let mut disk = memory_disk();
            let original = disk.data.clone();
            put_header(&mem, request_type, 0);
            let len = put_segments(&mem, segments);
            let descs = [header(), readable(DATA, len), status()];
            assert_eq!(run(&mem, &descs, &mut disk, &params), (1, expected));
            assert_eq!(disk.data, original);
        }

        let mut disk = memory_disk();
        let original = disk.data.clone();
        put_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        // Too many segments, a partial segment, none at all, a writable segment buffer.
        let many = vec![(0u64, 1u32, 0u32); MAX_DISCARD_SEGMENTS as usize + 1];
        let len = put_segments(&mem, &many);
        for descs in [
            vec![header(), readable(DATA, len), status()],
            vec![header(), readable(DATA, 15), status()],
            vec![header(), status()],
            vec![header(), writable(DATA, 16), status()],
        ] {
            assert_eq!(run(&mem, &descs, &mut disk, &params), (1, IOERR));
        }
        assert_eq!(disk.data, original);

        // Not negotiated (or read-only, where it is never offered): unsupported.
        put_segments(&mem, &[(0, 1, 0)]);
        let descs = [header(), readable(DATA, 16), status()];
        let params = DiskParams {
            discard: false,
            write_zeroes: false,
            ..disk_params()
        };
        for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            put_header(&mem, request_type, 0);
            assert_eq!(run(&mem, &descs, &mut disk, &params), (1, UNSUPP));
        }
        assert_eq!(disk.data, original);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        let original = disk.data.clone();
        let params = DiskParams {
            read_only: true,
            ..disk_params()
        };
        fill(&mem, DATA, 512, 0);
        put_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let descs = [header(), readable(DATA, 512), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &params), (1, IOERR));
        put_header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        put_segments(&mem, &[(0, 1, 0)]);
        let params = DiskParams {
            write_zeroes: true,
            ..params
        };
        let descs = [header(), readable(DATA, 16), status()];
        assert_eq!(run(&mem, &descs, &mut disk, &params), (1, IOERR));
        assert_eq!(disk.data, original);
    }

    #[test]
    fn unknown_request_type_is_unsupported() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        for request_type in [2, 3, 14, 0x8000_0000, u32::MAX] {
            put_header(&mem, request_type, 0);
            let descs = [header(), writable(DATA, 512), status()];
            assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (1, UNSUPP));
        }
    }

    /// Each malformed read and write completes with IOERR and touches neither the disk nor
    /// the guest's data buffers.
    #[test]
    fn malformed_transfers_fail_cleanly() {
        const IN: u32 = VIRTIO_BLK_T_IN;
        const OUT: u32 = VIRTIO_BLK_T_OUT;
        let mem = guest_memory();
        let top = MEM_SIZE as u64;
        let (w, r) = (writable, readable);
        #[rustfmt::skip]
        let cases: Vec<(&str, u32, u64, Vec<Descriptor>)> = vec![
            ("sector past the end", IN, DISK_SECTORS, vec![w(DATA, 512)]),
            ("range past the end", OUT, DISK_SECTORS - 1, vec![r(DATA, 1024)]),
            ("sector * 512 overflows", IN, u64::MAX / 512 + 1, vec![w(DATA, 512)]),
            ("sector * 512 + len overflows", OUT, u64::MAX / 512, vec![r(DATA, 1024)]),
            ("largest sector", IN, u64::MAX, vec![w(DATA, 512)]),
            ("length not a multiple of 512", IN, 0, vec![w(DATA, 513)]),
            ("parts not a multiple of 512", OUT, 0, vec![r(DATA, 256), r(DATA, 128)]),
            ("zero-length descriptor", IN, 0, vec![w(DATA, 512), w(DATA, 0)]),
            ("no data", IN, 0, vec![]),
            ("read into a read-only buffer", IN, 0, vec![r(DATA, 512)]),
            ("write from a writable buffer", OUT, 0, vec![w(DATA, 512)]),
            ("mixed directions", IN, 0, vec![w(DATA, 512), r(DATA, 512)]),
            ("buffer past guest memory", IN, 0, vec![w(top - 256, 512)]),
            ("buffer far outside guest memory", OUT, 0, vec![r(1 << 40, 512)]),
            ("buffer at the top of the address space", IN, 0, vec![w(u64::MAX - 511, 512)]),
            ("later buffer outside memory", IN, 0, vec![w(DATA, 512), w(1 << 40, 512)]),
            ("huge length", IN, 0, vec![w(DATA, 0xffff_fe00)]),
            ("huge total", OUT, 0, vec![r(DATA, 0x8000_0000), r(DATA, 0x7fff_fe00)]),
        ];
        for (what, request_type, sector, data) in cases {
            let mut disk = memory_disk();
            let original = disk.data.clone();
            fill(&mem, DATA, 0x2000, POISON);
            put_header(&mem, request_type, sector);
            let mut descs = vec![header()];
            descs.extend(data);
            descs.push(status());
            assert_eq!(
                run(&mem, &descs, &mut disk, &disk_params()),
                (1, IOERR),
                "{what}"
            );
            assert_eq!(disk.data, original, "{what}");
            assert_eq!(read_mem(&mem, DATA, 0x2000), [POISON; 0x2000], "{what}");
        }
    }

    #[test]
    fn bad_headers_fail_with_ioerr() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        let original = disk.data.clone();
        put_header(&mem, VIRTIO_BLK_T_OUT, 0);
        for (what, head) in [
            ("too short", readable(HEADER, 15)),
            ("device-writable", writable(HEADER, 16)),
            ("outside memory", readable(MEM_SIZE as u64 - 8, 16)),
        ] {
            let descs = [head, readable(DATA, 512), status()];
            assert_eq!(
                run(&mem, &descs, &mut disk, &disk_params()),
                (1, IOERR),
                "{what}"
            );
        }
        // Only a status descriptor: no header at all.
        assert_eq!(
            run(&mem, &[status()], &mut disk, &disk_params()),
            (1, IOERR)
        );
        assert_eq!(disk.data, original);
    }

    /// Without a usable status descriptor the chain goes back with length 0 and nothing
    /// is done.
    #[test]
    fn unusable_status_means_no_completion() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        let original = disk.data.clone();
        fill(&mem, DATA, 512, 0);
        put_header(&mem, VIRTIO_BLK_T_OUT, 0);
        for (what, last) in [
            ("read-only status", readable(STATUS, 1)),
            ("zero-length status", writable(STATUS, 0)),
            ("status outside memory", writable(MEM_SIZE as u64, 1)),
        ] {
            let descs = [header(), readable(DATA, 512), last];
            assert_eq!(
                run(&mem, &descs, &mut disk, &disk_params()),
                (0, POISON),
                "{what}"
            );
        }
        // No status descriptor: the data descriptor is last.
        let descs = [header(), readable(DATA, 512)];
        assert_eq!(run(&mem, &descs, &mut disk, &disk_params()), (0, POISON));
        assert_eq!(disk.data, original);
        // An empty chain.
        let params = disk_params();
        assert_eq!(process_chain(Vec::new(), &mem, &mut disk, &params), 0);
    }

    #[test]
    fn descriptor_loop_is_cut_off() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        let original = disk.data.clone();
        put_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let queue = MockSplitQueue::new(&mem, 16);
        let next = VRING_DESC_F_NEXT as u16;
        // header -> data -> status -> data -> status -> ... forever.
        let descs = [
            Descriptor::new(HEADER, 16, next, 1),
            Descriptor::new(DATA, 512, next, 2),
            Descriptor::new(STATUS, 1, next | VRING_DESC_F_WRITE as u16, 1),
        ];
        let raw: Vec<RawDescriptor> = descs.iter().copied().map(RawDescriptor::from).collect();
        let chain = queue.build_multiple_desc_chains(&raw).unwrap();
        mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
        assert_eq!(process_chain(chain, &mem, &mut disk, &disk_params()), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), POISON);
        assert_eq!(disk.data, original);
    }

    #[test]
    fn overlong_chain_fails_with_ioerr() {
        let mem = guest_memory();
        let mut disk = memory_disk();
        put_header(&mem, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![header()];
        descs.extend((0..MAX_CHAIN_DESCRIPTORS).map(|i| writable(DATA + 512 * i as u64, 512)));
        descs.push(status());
        mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
        assert_eq!(process_chain(descs, &mem, &mut disk, &disk_params()), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), IOERR);
    }

    /// Random chains over random memory never panic, never leave the disk's size, and
    /// always report a length the chain can hold.
    #[test]
    fn random_chains_never_panic() {
        let mem = guest_memory();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let addresses = [
            HEADER,
            DATA,
            STATUS,
            MEM_SIZE as u64 - 16,
            1 << 40,
            u64::MAX - 3,
            0,
        ];
        let lengths = [0, 1, 15, 16, 20, 512, 1024, 513, 0x1_0000, u32::MAX];
        let types = [0, 1, 4, 8, 11, 13, 7];
        let mut disk = memory_disk();
        let size = disk.data.len();
        for _ in 0..3000 {
            let count = (next() % 6) as usize;
            let descs: Vec<Descriptor> = (0..count)
                .map(|_| {
                    let addr = addresses[(next() % addresses.len() as u64) as usize];
                    let len = lengths[(next() % lengths.len() as u64) as usize];
                    Descriptor::new(
                        addr,
                        len,
                        (next() % 4) as u16 & VRING_DESC_F_WRITE as u16,
                        0,
                    )
                })
                .collect();
            let request_type = types[(next() % types.len() as u64) as usize];
            put_header(&mem, request_type, next() % (DISK_SECTORS + 2));
            put_segments(
                &mem,
                &[(next() % 70, (next() % 8) as u32, (next() % 2) as u32)],
            );
            let len = process_chain(descs, &mem, &mut disk, &disk_params());
            assert!(len <= 1 + MAX_REQUEST_BYTES as u32);
            assert_eq!(disk.data.len(), size);
        }
    }
}
