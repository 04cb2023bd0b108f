//! virtio-blk request processing: batches of requests made available in virtio-queue's
//! mock split queue, popped, parsed and executed by hearth's `process_chain` against an
//! in-memory disk, and returned on the used ring. Reports requests per second for 4 KiB
//! reads, 4 KiB writes and flushes. No KVM needed.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hearth::devices::virtio::block::{process_chain, DiskParams, MemoryDisk, ID_BYTES};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Requests per batch: of up to three descriptors each, so the 256-entry descriptor table
/// holds a whole batch.
const BATCH: u16 = 64;
const QUEUE_SIZE: u16 = 256;
const DATA_LEN: u32 = 4096;
const DISK_BYTES: usize = 16 << 20;

const HEADERS: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUSES: u64 = 0x80_0000;

type Memory = GuestMemoryMmap<()>;

fn params() -> DiskParams {
    DiskParams {
        capacity: (DISK_BYTES / 512) as u64,
        read_only: false,
        id: [0; ID_BYTES],
        discard: false,
        write_zeroes: false,
    }
}

/// A queue holding `BATCH` available requests of `request_type`, each on its own 4 KiB
/// of disk and guest memory (no data buffer for flushes).
fn queue_with_requests(mem: &Memory, request_type: u32) -> Queue {
    let mock = MockSplitQueue::new(mem, QUEUE_SIZE);
    let mut raw = Vec::new();
    for i in 0..u64::from(BATCH) {
        let header = HEADERS + i * 16;
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..].copy_from_slice(&(i * u64::from(DATA_LEN) / 512).to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(header)).unwrap();
        let mut chain = vec![Descriptor::new(header, 16, 0, 0)];
        match request_type {
            VIRTIO_BLK_T_IN => chain.push(Descriptor::new(
                DATA + i * u64::from(DATA_LEN),
                DATA_LEN,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
            VIRTIO_BLK_T_OUT => chain.push(Descriptor::new(
                DATA + i * u64::from(DATA_LEN),
                DATA_LEN,
                0,
                0,
            )),
            _ => {}
        }
        chain.push(Descriptor::new(
            STATUSES + i,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        ));
        let first = raw.len() as u16;
        let count = chain.len() as u16;
        raw.extend(chain.iter().enumerate().map(|(j, d)| {
            let j = j as u16;
            let (flags, next) = if j + 1 < count {
                (d.flags() | VRING_DESC_F_NEXT as u16, first + j + 1)
            } else {
                (d.flags(), 0)
            };
            RawDescriptor::from(Descriptor::new(d.addr().raw_value(), d.len(), flags, next))
        }));
    }
    // One call, so the avail ring lists every chain head in order.
    mock.add_desc_chains(&raw, 0).unwrap();
    mock.create_queue().unwrap()
}

/// Pops, runs and completes every available request; returns how many.
fn process_all(queue: &mut Queue, mem: &Memory, disk: &mut MemoryDisk, params: &DiskParams) -> u32 {
    let mut done = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = process_chain(chain, mem, disk, params);
        queue.add_used(mem, head, len).unwrap();
        done += 1;
    }
    done
}

fn requests(c: &mut Criterion) {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let params = params();
    let mut disk = MemoryDisk::new(vec![0x5a; DISK_BYTES]);

    let mut group = c.benchmark_group("virtio_blk");
    group
        .throughput(Throughput::Elements(u64::from(BATCH)))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, request_type) in [
        ("read_4k", VIRTIO_BLK_T_IN),
        ("write_4k", VIRTIO_BLK_T_OUT),
        ("flush", VIRTIO_BLK_T_FLUSH),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || queue_with_requests(&mem, request_type),
                |mut queue| {
                    let done = process_all(&mut queue, &mem, &mut disk, &params);
                    assert_eq!(done, u32::from(BATCH));
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, requests);
criterion_main!(benches);
