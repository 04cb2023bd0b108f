//! virtio-blk end to end: a Linux guest mounts, reads and writes ext4 images given with
//! `--disk`, sees their ids, cannot write a read-only disk, and the disks' metrics count
//! what it did; and a writable image cannot be used by two hearth processes at once.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::linux::{
    assert_booted, assert_powered_off, boot_linux, fingerprint, make_ext4_image, minimal_guest,
    read_from_ext4_image,
};
use common::{
    assert_exit_code, describe, kvm_available, payload, payload_command, stderr_of, stdout_of,
    Format, Running, TempDir,
};

/// One boot covers a writable disk, a read-only disk, both ids, a device reset, and the
/// metrics written at exit (`--metrics-path`).
#[test]
fn minimal_kernel_reads_writes_and_respects_read_only_disks() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-linux");
    let data = make_ext4_image(dir.path(), "data", 32, &[("greeting.txt", "hello disk\n")]);
    let frozen = make_ext4_image(dir.path(), "frozen", 16, &[("keep.txt", "keep me\n")]);
    let frozen_before = fingerprint(&frozen);

    let command = concat!(
        r#"sh -c "mkdir -p /mnt/d /mnt/f; "#,
        r#"mount -t ext4 /dev/vda /mnt/d && cat /mnt/d/greeting.txt && "#,
        r#"echo written-by-guest > /mnt/d/new.txt && umount /mnt/d; "#,
        // Driver unbind/bind resets the device (status 0) and sets it up again.
        r#"D=\$(basename \$(readlink /sys/block/vda/device)); "#,
        r#"echo \$D > /sys/bus/virtio/drivers/virtio_blk/unbind; "#,
        r#"echo \$D > /sys/bus/virtio/drivers/virtio_blk/bind; echo REBOUND; "#,
        r#"mount -t ext4 /dev/vda /mnt/d && cat /mnt/d/new.txt && umount /mnt/d; "#,
        r#"echo SERIALS; cat /sys/block/vda/serial; echo; cat /sys/block/vdb/serial; echo; "#,
        r#"if dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null; "#,
        r#"then echo RO-WRITE-SUCCEEDED; else echo RO-WRITE-REFUSED; fi; "#,
        // ACPI power-off ends the VM with status 0; 9 would mean it did not work.
        r#"mount -t ext4 -o ro /dev/vdb /mnt/f && cat /mnt/f/keep.txt; sync; poweroff -f; exit 9""#
    );
    let data_spec = format!("path={},id=data-disk", data.display());
    let frozen_spec = format!("path={},ro=on,id=frozen-disk", frozen.display());
    let metrics = dir.path().join("metrics.json");
    let out = boot_linux(
        &minimal_guest(),
        command,
        &[
            "--log-level",
            "info",
            "--memory",
            "128M",
            "--disk",
            &data_spec,
            "--disk",
            &frozen_spec,
            "--metrics-path",
            metrics.to_str().unwrap(),
        ],
    );
    assert_exit_code(&out, 0);
    assert_booted(&out);
    assert_powered_off(&out);
    let stdout = stdout_of(&out);
    assert!(
        stdout.contains("hello disk"),
        "vda not readable\n{}",
        describe(&out)
    );
    assert!(
        stdout.contains("keep me"),
        "vdb not readable\n{}",
        describe(&out)
    );
    assert!(
        stdout.contains("data-disk") && stdout.contains("frozen-disk"),
        "disk ids not visible in /sys/block/*/serial\n{}",
        describe(&out)
    );
    assert!(
        stdout.contains("RO-WRITE-REFUSED"),
        "the guest could write the read-only disk\n{}",
        describe(&out)
    );
    assert_eq!(
        read_from_ext4_image(&data, "/new.txt").as_deref(),
        Some("written-by-guest\n"),
        "the guest's write is not in the image\n{}",
        describe(&out)
    );
    assert_eq!(
        fingerprint(&frozen),
        frozen_before,
        "the read-only image changed"
    );

    // The last line is the flush at exit; each disk is reported under its id.
    let text = std::fs::read_to_string(&metrics).expect("the metrics file");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a flush")).expect("JSON");
    let count = |path: &[&str]| {
        let value = path.iter().fold(&last, |v, key| &v[*key]);
        value
            .as_u64()
            .unwrap_or_else(|| panic!("no {path:?} in {last}"))
    };
    assert!(count(&["block", "data-disk", "read_bytes"]) > 0, "{last}");
    assert!(
        count(&["block", "data-disk", "read_requests"]) > 0,
        "{last}"
    );
    assert!(count(&["block", "data-disk", "write_bytes"]) > 0, "{last}");
    assert!(count(&["block", "frozen-disk", "read_bytes"]) > 0, "{last}");
    assert_eq!(count(&["block", "frozen-disk", "write_bytes"]), 0, "{last}");
    assert_eq!(count(&["block", "data-disk", "io_errors"]), 0, "{last}");
    // Every queue notification is an MMIO write; the console is port I/O.
    assert!(count(&["vcpu", "exits_mmio_write"]) > 0, "{last}");
    assert!(count(&["vcpu", "exits_io_out"]) > 0, "{last}");
}

/// The image lock: a second VM on a writable image is refused while the first runs.
#[test]
fn second_hearth_on_a_writable_image_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-lock");
    let image = dir.join("shared.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("create image");
    let disk = format!("path={}", image.display());

    // The echo payload waits for console input, so the first VM holds the image.
    let mut first = Running::start(
        payload_command(&payload("echo", Format::Elf64), &["--disk", &disk]),
        Stdio::piped(),
    );
    first.expect_stdout(b"echo ready");

    let second = common::run_payload(&payload("hello", Format::Elf64), &["--disk", &disk]);
    assert_exit_code(&second, 1);
    let err = stderr_of(&second);
    assert!(
        err.contains("in use") && err.contains("shared.img") && err.lines().count() == 1,
        "expected a one-line 'in use' error\n{}",
        describe(&second)
    );

    // A read-only user is refused too while a writer holds it.
    let ro = common::run_payload(
        &payload("hello", Format::Elf64),
        &["--disk", &format!("{disk},ro=on")],
    );
    assert_exit_code(&ro, 1);

    first.send(b"q");
    let first = first.finish(Duration::from_secs(60));
    assert_exit_code(&first, 0);

    // Once the first VM is gone, the image is free again.
    let after = common::run_payload(&payload("hello", Format::Elf64), &["--disk", &disk]);
    assert_exit_code(&after, 0);
}
