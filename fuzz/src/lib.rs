//! Fuzz harnesses for hearth's code that parses what it cannot trust: what a guest writes,
//! what clients send, and the snapshot files a restore is handed.
//!
//! Each `fuzz_targets/<name>.rs` is a one-line libFuzzer entry point that calls `run` in
//! the module of the same name here, so the harnesses can also be unit-tested (the seeds
//! in `seeds/` are checked to reach the paths they were written for) and replayed without
//! libFuzzer. `seeds.rs` builds the seed inputs; `cargo run --example gen_seeds` writes them.
//!
//! Every input is valid: readers return zeroes once the input runs out, so the fuzzer never
//! wastes executions on inputs the harness refuses.

pub mod agent_protocol;
pub mod alloc_meter;
pub mod api_request;
pub mod chain;
pub mod image_layer;
pub mod input;
pub mod seeds;
pub mod snapshot_state;
pub mod virtio_blk_request;
pub mod virtio_mmio_registers;
pub mod virtio_net_tx;
pub mod virtio_vsock_tx;

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest memory shared by all targets (small, so a fresh one per input is cheap):
///
/// ```text
/// 0x0_0000 .. 0x0_3000  region 0   queue (desc table 0x0, avail 0x1000, used 0x1400),
///                                  data area from 0x2000
/// 0x0_3000 .. 0x2_0000  region 1   adjacent to region 0: buffers may span both
/// 0x2_0000 .. 0x2_1000  hole       not guest memory
/// 0x2_1000 .. 0x2_2000  region 2
/// ```
pub const REGIONS: [(u64, usize); 3] = [(0, 0x3000), (0x3000, 0x1_d000), (0x2_1000, 0x1000)];
/// First byte of the hole between region 1 and region 2.
pub const HOLE: u64 = 0x2_0000;
/// One past the last byte of guest memory.
pub const MEM_END: u64 = 0x2_2000;

/// Where chain-building targets put their queue, and where the input's memory image goes.
pub const DESC_TABLE: u64 = 0x0;
pub const AVAIL_RING: u64 = 0x1000;
pub const USED_RING: u64 = 0x1400;
pub const DATA: u64 = 0x2000;

/// A fresh guest memory (anonymous mappings, zero-filled).
pub fn guest_memory() -> GuestMemoryMmap<()> {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("cannot map fuzz guest memory")
}
