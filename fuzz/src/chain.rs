//! A descriptor chain built the way a guest builds one: a raw descriptor table written into
//! guest memory, one entry in the available ring, popped through `virtio_queue::Queue`
//! exactly as the devices do (so `next` links, loops, indirect tables and bad head indices
//! are followed or cut off by the real chain iterator).
//!
//! Input format:
//!
//! ```text
//! u8      queue size: 1 << (byte % 9), so 1..=256
//! u16     head index put in the available ring (may be >= the queue size)
//! u8      descriptor count n (at most the queue size is used)
//! n * 16  raw `struct virtq_desc` entries (addr u64, len u32, flags u16, next u16), LE,
//!         copied verbatim into the descriptor table at DESC_TABLE
//! ```

use virtio_queue::{desc::split::Descriptor, DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::{Input, Output};
use crate::{AVAIL_RING, DESC_TABLE, USED_RING};

const MAX_QUEUE_SIZE: u16 = 256;
const DESC_SIZE: usize = 16;

/// Reads the chain part of `input`, writes the descriptor table and the available ring into
/// `mem`, and returns a ready queue with one chain available.
pub fn build_queue(input: &mut Input, mem: &GuestMemoryMmap<()>) -> Queue {
    let size = 1u16 << (input.u8() % 9);
    let head = input.u16();
    let count = usize::from(input.u8()).min(usize::from(size));
    let table = input.bytes(count * DESC_SIZE);
    mem.write_slice(table, GuestAddress(DESC_TABLE))
        .expect("descriptor table is in guest memory");
    // struct virtq_avail: flags, idx = 1, ring[0] = head.
    let mut avail = [0u8; 6];
    avail[2..4].copy_from_slice(&1u16.to_le_bytes());
    avail[4..6].copy_from_slice(&head.to_le_bytes());
    mem.write_slice(&avail, GuestAddress(AVAIL_RING))
        .expect("available ring is in guest memory");

    let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("valid queue size");
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    assert!(queue.is_valid(mem), "harness queue must be valid");
    queue
}

/// The chain the guest made available.
pub fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap<()>,
) -> DescriptorChain<&'m GuestMemoryMmap<()>> {
    queue
        .iter(mem)
        .expect("harness queue is ready")
        .next()
        .expect("harness made one chain available")
}

/// A chain to encode: queue size exponent, head, and the raw table entries
/// `(addr, len, flags, next)`.
pub struct ChainSpec {
    pub size_log2: u8,
    pub head: u16,
    pub table: Vec<Descriptor>,
}

impl ChainSpec {
    /// A plain chain: entries `0..n` linked in order starting at the head 0, with NEXT set
    /// on all but the last. `descs` are `(addr, len, flags)` with flags other than NEXT.
    pub fn linked(descs: &[(u64, u32, u16)]) -> Self {
        let next_flag = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let n = descs.len();
        let table = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                if i + 1 < n {
                    Descriptor::new(addr, len, flags | next_flag, (i + 1) as u16)
                } else {
                    Descriptor::new(addr, len, flags, 0)
                }
            })
            .collect();
        Self {
            size_log2: 4,
            head: 0,
            table,
        }
    }

    pub fn encode(&self, out: &mut Output) {
        out.u8(self.size_log2)
            .u16(self.head)
            .u8(self.table.len() as u8);
        for d in &self.table {
            out.u64(d.addr().0)
                .u32(d.len())
                .u16(d.flags())
                .u16(d.next());
        }
    }
}
