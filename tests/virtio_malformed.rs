//! Malformed virtio descriptor chains from a hostile tiny guest: the `virtio_evil` payload
//! drives hearth's virtio-blk and virtio-net devices through the virtio-mmio registers and
//! posts chains with out-of-range and MMIO addresses, zero and huge lengths, loops, bad
//! head and available indices, a device-writable header, unusable status descriptors and
//! indirect tables that were never negotiated. hearth must return every chain it can (with
//! VIRTIO_BLK_S_IOERR / UNSUPP where the chain has a status byte), keep serving valid
//! requests, survive a device reset, and exit cleanly; the disk image may change only
//! where the one valid write went. The payload checks the guest side and prints each case.
//!
//! The NIC's tap lives in a network namespace this test creates and always removes; its
//! host side (link-local 169.254.77.1) answers the guest's ARP request, which proves the
//! valid TX frame left and RX still works after the malformed RX buffers.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::netns::{net_tests_possible, NetNs};
use common::{
    assert_exit_code, assert_stdout_contains, describe, payload, run_with_timeout, stderr_of,
    Format, TempDir, HEARTH, RUN_TIMEOUT, VIRTIO_EVIL_MEMORY,
};

const TAP: &str = "tap0";
/// Must match `host_ip` in tests/payloads/virtio_evil.c.
const HOST_ADDR: &str = "169.254.77.1/24";
const SECTOR: usize = 512;
const IMAGE_SIZE: usize = 1 << 20;

/// The image before the run: sector 0 all 'A' (the payload reads it back), every other
/// byte position-dependent, so that a stray write anywhere shows.
fn original_image() -> Vec<u8> {
    let mut image: Vec<u8> = (0..IMAGE_SIZE).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    image[..SECTOR].fill(b'A');
    image
}

/// The first sector whose contents differ, for failure messages.
fn first_changed_sector(before: &[u8], after: &[u8]) -> Option<usize> {
    before
        .chunks(SECTOR)
        .zip(after.chunks(SECTOR))
        .position(|(b, a)| b != a)
}

fn check_image(path: &Path, original: &[u8], out: &Output) {
    let after = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        after.len(),
        original.len(),
        "the image changed size\n{}",
        describe(out)
    );
    // The only valid write: 'X' over sector 1. The malformed write of 'Z' to sector 2
    // (read-only status descriptor) must not have happened.
    let mut expected = original.to_vec();
    expected[SECTOR..2 * SECTOR].fill(b'X');
    assert!(
        after == expected,
        "the image differs from the expected one, first in sector {:?} (sector 1 should be \
         'X', everything else unchanged)\n{}",
        first_changed_sector(&expected, &after),
        describe(out)
    );
}

#[test]
fn malformed_descriptor_chains_are_returned_and_hearth_survives() {
    if !net_tests_possible() {
        return;
    }
    let dir = TempDir::new("virtio-evil");
    let image = dir.join("evil.img");
    let original = original_image();
    fs::write(&image, &original).expect("write the disk image");

    // `hearth-evil-<pid>`, deleted with its tap when the test ends, also on panic.
    let ns = NetNs::new("hearth-evil-");
    ns.add_tap(TAP, HOST_ADDR);

    let disk = format!("path={}", image.display());
    let net = format!("tap={TAP}");
    let kernel = payload("virtio_evil", Format::Elf64);
    let mut hearth = Command::new(HEARTH);
    hearth
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--memory", VIRTIO_EVIL_MEMORY])
        .args(["--disk", &disk, "--net", &net]);
    let out = run_with_timeout(ns.exec(&hearth), RUN_TIMEOUT);

    assert_stdout_contains(&out, "blk ok\n");
    assert_stdout_contains(&out, "net ok\n");
    assert_stdout_contains(&out, "virtio_evil done\n");
    assert_exit_code(&out, 0);
    assert!(
        !stderr_of(&out).contains("panicked"),
        "hearth panicked\n{}",
        describe(&out)
    );
    check_image(&image, &original, &out);
}
