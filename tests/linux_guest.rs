//! The Linux tier: real kernels booted to the test initramfs's /init, which runs the
//! command after ` -- ` on the kernel command line and reports its status through
//! hearth's control page. Few boots, generous timeouts, no timing assertions.
//! Artifacts: see tests/common/linux.rs.

mod common;

use common::linux::{
    assert_booted, assert_powered_off, boot_linux, line_after, make_ext4_image, minimal_guest,
    read_from_ext4_image, stock_mds_guest, stock_user_guest, BASE_CMDLINE, STOCK_USER_BOOT_ARGS,
};
use common::{assert_exit_code, describe, kvm_available, stdout_of, TempDir};

#[test]
fn minimal_kernel_runs_uname() {
    if !kvm_available() {
        return;
    }
    let out = boot_linux(&minimal_guest(), "uname -a", &["--memory", "128M"]);
    assert_exit_code(&out, 0);
    assert_booted(&out);
    assert!(
        stdout_of(&out)
            .lines()
            .any(|l| l.starts_with("Linux ") && l.contains("x86_64")),
        "no uname -a line\n{}",
        describe(&out)
    );
}

#[test]
fn minimal_kernel_sees_cpus_memory_and_returns_exit_status() {
    if !kvm_available() {
        return;
    }
    let command = r#"sh -c "echo NPROC; nproc; free -m; exit 3""#;
    let out = boot_linux(
        &minimal_guest(),
        command,
        &["--cpus", "2", "--memory", "192M"],
    );
    assert_exit_code(&out, 3);
    assert_booted(&out);
    let stdout = stdout_of(&out);
    assert_eq!(
        line_after(&stdout, "NPROC").map(str::trim),
        Some("2"),
        "nproc\n{}",
        describe(&out)
    );
    // `free` reports RAM minus what the kernel keeps for itself: a little under 192 MiB.
    let total: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Mem:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|total| total.parse().ok())
        .unwrap_or_else(|| panic!("no free -m total\n{}", describe(&out)));
    assert!(
        (150..=192).contains(&total),
        "free -m total {total} MiB does not reflect --memory 192M\n{}",
        describe(&out)
    );
}

/// Debian's unmodified cloud kernel: virtio drivers are modules (loaded by the test
/// init) and its virtio-mmio driver only finds devices described in ACPI. It boots with its
/// mitigations on and believing its CPU has MDS, so it runs VERW on every return to user
/// space: on a nested-PVM host KVM's emulator fails each one and hearth completes it.
#[test]
fn stock_debian_kernel_boots_and_finds_a_disk_through_acpi() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("stock-disk");
    let image = make_ext4_image(dir.path(), "data", 32, &[("greeting.txt", "hello stock\n")]);
    let disk = format!("path={}", image.display());
    let command = r#"sh -c "uname -a; echo MDS; cat /sys/devices/system/cpu/vulnerabilities/mds; mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && cat /mnt/d/greeting.txt && echo from-stock > /mnt/d/new.txt && umount /mnt/d && sync; poweroff -f; exit 9""#;
    let out = boot_linux(
        &stock_mds_guest(),
        command,
        &["--log-level", "info", "--memory", "256M", "--disk", &disk],
    );
    assert_exit_code(&out, 0);
    assert_booted(&out);
    assert_powered_off(&out);
    let stdout = stdout_of(&out);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("Linux ") && l.contains("cloud-amd64")),
        "no uname -a line from the Debian cloud kernel\n{}",
        describe(&out)
    );
    assert!(
        stdout.contains("hello stock"),
        "disk not readable\n{}",
        describe(&out)
    );
    assert_eq!(
        read_from_ext4_image(&image, "/new.txt").as_deref(),
        Some("from-stock\n"),
        "the guest's file is not in the image\n{}",
        describe(&out)
    );
    if hearth::arch::pvm::host_is_pvm() {
        let mds = line_after(&stdout, "MDS").unwrap_or_default();
        assert!(
            mds.contains("Clear CPU buffers"),
            "the guest does not clear CPU buffers (MDS: {mds:?})\n{}",
            describe(&out)
        );
        assert!(
            compat_fixups(&out, "verw") > 0,
            "no VERW went through hearth's compat layer\n{}",
            describe(&out)
        );
    }
}

/// The sum over the vCPUs of one compat fixup counter from hearth's exit summary
/// (`vCPU N: compat fixups: FixupStats { ..., NAME: COUNT, ... }`, logged at info).
fn compat_fixups(out: &std::process::Output, name: &str) -> u64 {
    let key = format!(" {name}: ");
    common::stderr_of(out)
        .lines()
        .filter(|l| l.contains("compat fixups:"))
        .filter_map(|l| {
            let (_, rest) = l.split_once(&key)?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// Issue 14's case: the stock kernel with only the command line a user gives it, mitigations
/// on, 2 vCPUs, 512 MiB. On a nested-PVM host it needs hearth's own boot speed-ups and its
/// completion of what the mitigations run (VERW) to reach the end of /init.
#[test]
fn stock_debian_kernel_boots_as_a_user_boots_it() {
    if !kvm_available() {
        return;
    }
    let command = r#"sh -c "echo CMDLINE; cat /proc/cmdline; uname -a""#;
    let out = boot_linux(
        &stock_user_guest(),
        command,
        &["--cpus", "2", "--memory", "512M"],
    );
    assert_exit_code(&out, 0);
    assert_booted(&out);
    let stdout = stdout_of(&out);
    assert!(
        stdout.lines().any(|l| l.trim_end() == "HEARTH-EXIT 0"),
        "/init did not run to its end\n{}",
        describe(&out)
    );
    let cmdline = line_after(&stdout, "CMDLINE")
        .unwrap_or_else(|| panic!("no /proc/cmdline\n{}", describe(&out)));
    let user = format!("{BASE_CMDLINE} {STOCK_USER_BOOT_ARGS}");
    assert!(
        cmdline.starts_with(&format!("{user} ")) && !cmdline.contains("mitigations="),
        "the guest got more than the user's line and hearth's options: {cmdline}"
    );
    if hearth::arch::pvm::host_is_pvm() {
        for speedup in hearth::arch::pvm::BOOT_SPEEDUPS {
            assert!(
                cmdline.split(' ').any(|p| p == speedup.param),
                "{} was not appended: {cmdline}",
                speedup.param
            );
        }
    }
}
