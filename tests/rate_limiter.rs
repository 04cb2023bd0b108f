//! Rate limiters end to end (issue 11): a Linux guest reads a disk limited with
//! `--disk ...,bw=` and takes at least the time the limit implies; then the limit is
//! lowered through the API (`PATCH /drives/{id}`) on the running VM and a second read takes
//! at least the time the new limit implies, longer than the first limit would allow.
//! Only lower bounds are asserted: a loaded host makes a guest slower, never faster.

mod common;

use std::process::Stdio;

use common::api_client::call;
use common::linux::{linux_args, minimal_guest, MINIMAL_TIMEOUT};
use common::{assert_exit_code, describe, hearth, kvm_available, Running, TempDir};

const MIB: u64 = 1 << 20;
/// The first read, at `FIRST_RATE`: 16 s at least, about 5 s without a limit here.
const FIRST_READ: u64 = 16 * MIB;
const FIRST_RATE: u64 = MIB;
/// The second read, after the PATCH: 15 s at least at `SECOND_RATE`, which the first
/// limit would have let go in 7.
const SECOND_READ: u64 = 8 * MIB;
const SECOND_RATE: u64 = MIB / 2;

/// What one read request of the guest's `dd` asks for: less than any bucket here, so no
/// request goes through on credit (one larger than a bucket would, and a read could then
/// end up to one request early).
const BLOCK: u64 = 256 << 10;
const _: () = assert!(BLOCK < SECOND_RATE && SECOND_RATE < FIRST_RATE);

/// The guest's script: `T n` prints `Tn <uptime>`, `R skip count` reads `count` blocks
/// from block `skip` with O_DIRECT (the guest's page cache never answers). Between the
/// reads the guest waits for a line on its console, sent once the PATCH is done. `\$`
/// reaches the inner shell as `$`.
fn guest_script() -> String {
    let (first, second) = (FIRST_READ / BLOCK, SECOND_READ / BLOCK);
    format!(
        concat!(
            r#"sh -c "T(){{ read u i </proc/uptime; echo T\$1 \$u; }}; "#,
            r#"R(){{ dd if=/dev/vda of=/dev/null bs=256k skip=\$1 count=\$2 iflag=direct; }}; "#,
            r#"T 0; R 0 {first} || echo READ-FAILED; T 1; read g; "#,
            r#"T 2; R {first} {second} || echo READ-FAILED; T 3""#
        ),
        first = first,
        second = second
    )
}

/// The guest's uptime at mark `Tn`.
fn mark(stdout: &str, n: u32) -> Option<f64> {
    let prefix = format!("T{n} ");
    stdout.lines().find_map(|line| {
        line.trim_end_matches('\r')
            .strip_prefix(&prefix)?
            .parse()
            .ok()
    })
}

/// The least time reading `bytes` takes through a full bucket of one second's worth of
/// `rate` bytes: it starts full, so that much goes at once. (Less 20 ms, the precision
/// of the guest's /proc/uptime at both ends.)
fn least_seconds(bytes: u64, rate: u64) -> f64 {
    bytes.saturating_sub(rate) as f64 / rate as f64 - 0.02
}

#[test]
fn a_limited_disk_reads_no_faster_than_its_limit_and_patch_changes_it() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("rate-limiter");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(FIRST_READ + SECOND_READ))
        .expect("create the disk image");
    let sock = dir.join("api.sock");
    let disk = format!("path={},id=data,bw={FIRST_RATE}", image.display());
    let sock_arg = sock.display().to_string();
    let args = linux_args(
        &minimal_guest(),
        &guest_script(),
        &["--memory", "128M", "--disk", &disk, "--api-sock", &sock_arg],
    );
    let mut cmd = hearth();
    cmd.args(&args);
    let mut vm = Running::start(cmd, Stdio::piped());

    vm.expect_stdout_within(b"T1 ", MINIMAL_TIMEOUT);
    let patch = format!(
        r#"{{"drive_id": "data", "rate_limiter":
             {{"bandwidth": {{"size": {SECOND_RATE}, "refill_time": 1000}}}}}}"#
    );
    let (status, answer) = call(&sock, "PATCH", "/drives/data", &patch);
    assert_eq!(status, 204, "PATCH /drives/data: {answer}");
    let (status, config) = call(&sock, "GET", "/vm/config", "");
    assert_eq!(status, 200);
    assert_eq!(
        config["drives"][0]["rate_limiter"]["bandwidth"]["size"], SECOND_RATE,
        "GET /vm/config does not show the new limit: {config}"
    );
    vm.send(b"go\n");
    vm.expect_stdout_within(b"T3 ", MINIMAL_TIMEOUT);
    let out = vm.finish(MINIMAL_TIMEOUT);
    assert_exit_code(&out, 0);

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.lines().any(|line| line.trim_end() == "READ-FAILED"),
        "the guest could not read its disk\n{}",
        describe(&out)
    );
    let at = |n| mark(&stdout, n).unwrap_or_else(|| panic!("no T{n}\n{}", describe(&out)));
    let first = at(1) - at(0);
    let second = at(3) - at(2);
    eprintln!(
        "first read: {} MiB in {first:.2} s at a {} KiB/s limit ({:.2} MiB/s); \
         second read: {} MiB in {second:.2} s at {} KiB/s ({:.2} MiB/s)",
        FIRST_READ / MIB,
        FIRST_RATE >> 10,
        FIRST_READ as f64 / MIB as f64 / first,
        SECOND_READ / MIB,
        SECOND_RATE >> 10,
        SECOND_READ as f64 / MIB as f64 / second,
    );
    let first_bound = least_seconds(FIRST_READ, FIRST_RATE);
    assert!(
        first >= first_bound,
        "{} MiB at {} KiB/s took {first:.2} s, less than {first_bound:.2} s\n{}",
        FIRST_READ / MIB,
        FIRST_RATE >> 10,
        describe(&out)
    );
    // The old limit would have let the second read go in 7 s.
    let second_bound = least_seconds(SECOND_READ, SECOND_RATE);
    assert!(second_bound > least_seconds(SECOND_READ, FIRST_RATE) + 5.0);
    assert!(
        second >= second_bound,
        "after the PATCH, {} MiB at {} KiB/s took {second:.2} s, less than {second_bound:.2} s\n{}",
        SECOND_READ / MIB,
        SECOND_RATE >> 10,
        describe(&out)
    );
}
