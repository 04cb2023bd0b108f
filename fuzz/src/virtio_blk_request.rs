//! `virtio_blk_request`: one virtio-blk request, from a guest-written descriptor table
//! through `hearth::devices::virtio::block::process_chain` into a `MemoryDisk`.
//!
//! Input format:
//!
//! ```text
//! u8      disk: bit 0 read-only, bit 1 DISCARD negotiated, bit 2 WRITE_ZEROES negotiated,
//!         bits 3..8 capacity c: c sectors (0..=30) backed by c sectors of data; c = 31
//!         claims a capacity whose byte size overflows u64, over an 8-sector disk
//! chain   see `chain.rs`
//! rest    memory image written at DATA (0x2000): request headers, data, segments
//! ```
//!
//! Checked after every request (beyond "no panic"): the used length is at most one status
//! byte plus MAX_REQUEST_BYTES; a non-zero length means a status byte (OK, IOERR or UNSUPP)
//! was written to the last descriptor, and a length above 1 that it is OK and the data fit
//! in the chain's device-writable buffers; the disk never changes size, and a read-only
//! disk never changes at all.

use hearth::devices::virtio::block::request::MAX_REQUEST_BYTES;
use hearth::devices::virtio::block::{process_chain, DiskParams, MemoryDisk, ID_BYTES};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::chain;
use crate::input::Input;

/// What one input did, for tests.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The used length `process_chain` returned.
    pub used_len: u32,
    /// The status byte, when one was written.
    pub status: Option<u8>,
    pub disk_changed: bool,
    pub flushes: usize,
}

/// Recognisable disk contents.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8 ^ 0x5a
}

pub fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let disk_byte = input.u8();
    let sectors = u64::from(disk_byte >> 3);
    let (capacity, data_sectors) = if sectors == 31 {
        (u64::MAX / 256, 8)
    } else {
        (sectors, sectors)
    };
    let mut id = [0u8; ID_BYTES];
    id[..11].copy_from_slice(b"hearth-fuzz");
    let params = DiskParams {
        capacity,
        read_only: disk_byte & 1 != 0,
        id,
        discard: disk_byte & 2 != 0,
        write_zeroes: disk_byte & 4 != 0,
    };
    let original: Vec<u8> = (0..(data_sectors * 512) as usize).map(pattern).collect();
    let mut disk = MemoryDisk::new(original.clone());

    let mem = crate::guest_memory();
    let mut queue = chain::build_queue(&mut input, &mem);
    let image = input.rest();
    let room = (crate::HOLE - crate::DATA) as usize;
    mem.write_slice(&image[..image.len().min(room)], GuestAddress(crate::DATA))
        .expect("memory image fits");

    let chain = chain::pop(&mut queue, &mem);
    let head = chain.head_index();
    // What the device will see, for the checks below (the chain iterator is bounded: at
    // most 65535 descriptors through an indirect table).
    let seen: Vec<_> = chain.clone().collect();

    let used_len = process_chain(chain, &mem, &mut disk, &params);

    assert!(
        u64::from(used_len) <= 1 + MAX_REQUEST_BYTES,
        "used length {used_len} too large"
    );
    assert_eq!(disk.data.len(), original.len(), "disk changed size");
    let disk_changed = disk.data != original;
    if params.read_only {
        assert!(!disk_changed, "read-only disk was modified");
    }
    let mut status = None;
    if used_len > 0 {
        let last = seen
            .last()
            .expect("a status was written, so there is a chain");
        let byte: u8 = mem
            .read_obj(last.addr())
            .expect("status descriptor was checked to be in memory");
        assert!(
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&u32::from(byte)),
            "status byte {byte}"
        );
        if used_len > 1 {
            assert_eq!(
                u32::from(byte),
                VIRTIO_BLK_S_OK,
                "data returned with an error"
            );
            let writable: u64 = seen[..seen.len() - 1]
                .iter()
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len()))
                .sum();
            assert!(
                u64::from(used_len - 1) <= writable,
                "used length {used_len} exceeds the {writable} writable bytes"
            );
        }
        status = Some(byte);
    }
    // The device then returns the chain (after the checks: the status byte may lie in the
    // used ring); a bad head index is the queue's problem.
    let _ = queue.add_used(&mem, head, used_len);
    Outcome {
        used_len,
        status,
        disk_changed,
        flushes: disk.flushes,
    }
}
