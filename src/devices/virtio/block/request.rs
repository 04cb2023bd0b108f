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
    /// A request was carried out or refused (its status byte is written next): its type,
    /// when the header could be read, and how it ended. For counting.
    fn request_done(&mut self, request_type: Option<u32>, outcome: Result<(), &RequestError>) {
        let _ = (request_type, outcome);
    }
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
    let header = parse_header(&layout, mem);
    let request_type = header.as_ref().ok().map(|&(request_type, _)| request_type);
    let result = header.and_then(|(request_type, sector)| {
        execute(&layout, request_type, sector, mem, backend, disk)
    });
    backend.request_done(request_type, result.as_ref().map(drop));
    let (status, data_len) = match result {
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

/// The data bytes a read or write in `chain` moves (the sum of its data descriptors'
/// lengths), for rate limiting; 0 for any other request and for a chain whose header
/// cannot be read. It is what the guest asked for, checked later by [`process_chain`].
pub fn transfer_len<M, I>(chain: I, mem: &M) -> u64
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut descriptors = chain.into_iter().take(MAX_CHAIN_DESCRIPTORS);
    let Some(Ok((request_type, _))) = descriptors.next().map(|h| read_header(&h, mem)) else {
        return 0;
    };
    if request_type != VIRTIO_BLK_T_IN && request_type != VIRTIO_BLK_T_OUT {
        return 0;
    }
    // Everything between the header and the status descriptor, the last one.
    let mut total = 0u64;
    let mut previous = None;
    for desc in descriptors {
        if let Some(len) = previous.replace(u64::from(desc.len())) {
            total += len;
        }
    }
    total
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

/// The request's type and sector; refuses a chain that is too long or has no header.
fn parse_header<M: GuestMemory + ?Sized>(
    layout: &ChainLayout,
    mem: &M,
) -> Result<(u32, u64), RequestError> {
    if layout.too_long {
        return Err(RequestError::TooManyDescriptors);
    }
    let header = layout.descriptors.first().ok_or(RequestError::NoHeader)?;
    read_header(header, mem)
}

/// Runs the request whose header [`parse_header`] read; returns the data bytes written
/// into guest memory.
fn execute<M, B>(
    layout: &ChainLayout,
    request_type: u32,
    sector: u64,
    mem: &M,
    backend: &mut B,
    disk: &DiskParams,
) -> Result<u32, RequestError>
where
    M: GuestMemory + ?Sized,
    B: Backend,
{
    let data = layout.descriptors.get(1..).unwrap_or_default();
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
mod tests;
