//! Unit tests for request parsing and execution.

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

#[test]
fn transfer_len_counts_the_data_of_reads_and_writes_only() {
    let mem = guest_memory();
    let chain = [
        header(),
        writable(DATA, 4096),
        writable(DATA + 4096, 512),
        status(),
    ];
    put_header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(transfer_len(chain, &mem), 4608);
    put_header(&mem, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(transfer_len(chain, &mem), 4608);
    put_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(transfer_len(chain, &mem), 0);
    put_header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(transfer_len([header(), status()], &mem), 0);
    assert_eq!(transfer_len([header()], &mem), 0);
    assert_eq!(transfer_len(Vec::new(), &mem), 0);
    // A header outside guest memory costs nothing; the request fails later anyway.
    assert_eq!(
        transfer_len([readable(MEM_SIZE as u64, HEADER_SIZE), status()], &mem),
        0
    );
}
