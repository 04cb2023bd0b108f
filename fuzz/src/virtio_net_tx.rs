//! `virtio_net_tx`: one TX chain through hearth's frame assembly and header checks,
//! `read_tx_frame` then `prepare_tx_frame`, the way `process_tx_queue` uses them.
//!
//! Input format:
//!
//! ```text
//! u8      negotiated features: bit 0 CSUM, bit 1 HOST_TSO4, bit 2 HOST_TSO6,
//!         bit 3 HOST_ECN, bit 7 also every other feature bit (they must not matter)
//! chain   see `chain.rs`
//! rest    memory image written at DATA (0x2000): headers and frame data
//! ```
//!
//! Checked (beyond "no panic"): a gathered frame fits the bounce buffer and is exactly the
//! bytes of the chain's descriptors in order; an accepted frame has a header the tap can
//! take: `num_buffers` 0, no flag but NEEDS_CSUM and that only with CSUM negotiated, the
//! checksum inside the frame, and GSO only as negotiated and with a segment size.

use hearth::devices::virtio::net::header::{
    bit, prepare_tx_frame, read_tx_frame, VirtioNetHdr, MAX_BUFFER_LEN, VNET_HDR_LEN,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::chain;
use crate::input::Input;

/// What one input did, for tests: `Err` names the stage that refused the frame.
pub type Outcome = Result<usize, &'static str>;

pub const TX_FEATURES: [u32; 4] = [
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
];

pub fn features_from_byte(byte: u8) -> u64 {
    let tx_mask: u64 = TX_FEATURES.iter().map(|&f| bit(f)).sum();
    let mut features = TX_FEATURES
        .iter()
        .enumerate()
        .filter(|(i, _)| byte & (1 << i) != 0)
        .map(|(_, &f)| bit(f))
        .sum::<u64>();
    if byte & 0x80 != 0 {
        features |= !tx_mask;
    }
    features
}

pub fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let features = features_from_byte(input.u8());
    let mem = crate::guest_memory();
    let mut queue = chain::build_queue(&mut input, &mem);
    let image = input.rest();
    let room = (crate::HOLE - crate::DATA) as usize;
    mem.write_slice(&image[..image.len().min(room)], GuestAddress(crate::DATA))
        .expect("memory image fits");

    let chain = chain::pop(&mut queue, &mem);
    let head = chain.head_index();
    let outcome = check(&mem, chain, features);
    // TX chains always go back with length 0, valid or not. (After the checks: the used
    // ring is guest memory a frame may include.)
    let _ = queue.add_used(&mem, head, 0);
    outcome
}

fn check(
    mem: &GuestMemoryMmap<()>,
    chain: DescriptorChain<&GuestMemoryMmap<()>>,
    features: u64,
) -> Outcome {
    let seen: Vec<_> = chain.clone().collect();
    let mut buffer = vec![0u8; MAX_BUFFER_LEN];
    let len = read_tx_frame(mem, chain, &mut buffer).map_err(|_| "read_tx_frame")?;

    assert!(len <= MAX_BUFFER_LEN);
    let mut expected = Vec::with_capacity(len);
    for d in &seen {
        let mut part = vec![0u8; d.len() as usize];
        mem.read_slice(&mut part, d.addr())
            .expect("read_tx_frame read this descriptor");
        expected.extend_from_slice(&part);
    }
    if let Some(at) = (0..len).find(|&i| buffer.get(i) != expected.get(i)) {
        panic!("gathered frame differs from the chain at byte {at} of {len}");
    }
    assert_eq!(
        expected.len(),
        len,
        "gathered length differs from the chain"
    );

    prepare_tx_frame(&mut buffer[..len], features).map_err(|_| "prepare_tx_frame")?;

    let frame = &buffer[..len];
    let header = VirtioNetHdr::from_bytes(frame[..VNET_HDR_LEN].try_into().unwrap());
    let payload_len = len - VNET_HDR_LEN;
    let needs_csum = header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0;
    assert_eq!(header.num_buffers, 0, "num_buffers not cleared");
    assert_eq!(header.flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8), 0);
    if needs_csum {
        assert_ne!(
            features & bit(VIRTIO_NET_F_CSUM),
            0,
            "checksum not negotiated"
        );
        assert!(
            usize::from(header.csum_start) + usize::from(header.csum_offset) + 2 <= payload_len,
            "checksum outside the frame"
        );
    }
    let gso = u32::from(header.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8));
    let ecn = header.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
    match gso {
        VIRTIO_NET_HDR_GSO_NONE => assert!(!ecn, "ECN without GSO"),
        VIRTIO_NET_HDR_GSO_TCPV4 => assert_ne!(features & bit(VIRTIO_NET_F_HOST_TSO4), 0),
        VIRTIO_NET_HDR_GSO_TCPV6 => assert_ne!(features & bit(VIRTIO_NET_F_HOST_TSO6), 0),
        other => panic!("GSO type {other} accepted"),
    }
    if ecn {
        assert_ne!(
            features & bit(VIRTIO_NET_F_HOST_ECN),
            0,
            "ECN not negotiated"
        );
    }
    if gso != VIRTIO_NET_HDR_GSO_NONE {
        assert!(header.gso_size != 0 && needs_csum, "GSO without its fields");
    }
    Ok(len)
}
