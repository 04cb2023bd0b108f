//! The balloon with a real Linux guest (512 MiB, the minimal kernel, which has
//! VIRTIO_BALLOON and PAGE_REPORTING): the guest writes 200 MiB into a tmpfs file and
//! removes it; with free page reporting the hearth process's resident memory falls back
//! by most of it, unasked. Then the API inflates the balloon by 128 MiB, and the guest's
//! MemTotal shrinks by exactly that (the driver takes ballooned pages off totalram unless
//! DEFLATE_ON_OOM was negotiated); `GET /balloon/statistics` carries the guest's numbers.
//! Artifacts: see tests/common/linux.rs.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::api_client::call;
use common::linux::{linux_args, minimal_guest, MINIMAL_TIMEOUT};
use common::{assert_exit_code, hearth, kvm_available, Running, TempDir, RUN_TIMEOUT};
use serde_json::Value;

/// What the guest fills and frees.
const FILL_MIB: u64 = 200;
/// "Most of it": the part of the fill the host must get back.
const GIVEN_BACK_MIB: u64 = FILL_MIB * 3 / 4;
/// What the API inflates the balloon to.
const INFLATE_MIB: u64 = 128;
/// The guest's kernel code is emulated on a nested-PVM host: writing 200 MiB takes it
/// minutes, and reporting them back as long again. Generous bounds; the test asserts the
/// drop, not its speed.
const FILL_TIMEOUT: Duration = Duration::from_secs(1200);
const GIVE_BACK_TIMEOUT: Duration = Duration::from_secs(900);

/// The guest: fill a tmpfs file, wait (the host reads its resident memory meanwhile),
/// remove it, then print MemTotal every few seconds. `\$` reaches the inner shell as `$`;
/// the loop reads /proc/meminfo with the shell's `read` to spare forks, which cost the
/// emulated guest kernel most of a second each.
const GUEST: &str = r#"sh -c "mount -t tmpfs -o size=300m t /mnt; echo FILL-START; dd if=/dev/zero of=/mnt/f bs=1M count=200; echo FILLED; sleep 15; rm /mnt/f; echo FREED; while true; do while read -r k v u; do case \$k in MemTotal:) echo MEMTOTAL \$v;; esac; done < /proc/meminfo; sleep 2; done""#;

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

struct Guest {
    running: Running,
    sock: PathBuf,
    console: PathBuf,
    _dir: TempDir,
}

impl Guest {
    fn boot() -> Self {
        let dir = TempDir::new("balloon");
        let sock = dir.join("api.sock");
        let console = dir.join("console.log");
        let serial = format!("file={}", console.display());
        let sock_arg = sock.display().to_string();
        let args = linux_args(
            &minimal_guest(),
            GUEST,
            &[
                "--memory",
                "512M",
                "--balloon",
                "stats_polling_interval_s=1",
                "--serial",
                &serial,
                "--api-sock",
                &sock_arg,
            ],
        );
        let mut cmd = hearth();
        cmd.args(&args);
        Guest {
            running: Running::start(cmd, Stdio::null()),
            sock,
            console,
            _dir: dir,
        }
    }

    fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// The console's complete lines (the guest may be halfway through one).
    fn complete_lines(&self) -> Vec<String> {
        let text = self.console_text();
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        complete.lines().map(|l| l.trim_end().to_string()).collect()
    }

    fn describe(&self) -> String {
        let console = self.console_text();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        format!(
            "{}\n--- console (last lines) ---\n{}",
            self.running.describe_so_far(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.running.pid())
    }

    /// Polls `check` every 200 ms until it gives a value; fails after `timeout`, or when
    /// the VMM stops.
    #[track_caller]
    fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            assert!(
                self.running.is_running() && Instant::now() < deadline,
                "{what}: not within {timeout:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn has_line(&self, line: &str) -> bool {
        self.complete_lines().iter().any(|l| l == line)
    }

    /// The last MemTotal the guest printed, in KiB.
    fn mem_total_kib(&self) -> Option<u64> {
        self.complete_lines()
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("MEMTOTAL ")?.parse().ok())
    }

    fn api(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        call(&self.sock, method, path, body)
    }
}

fn field(stats: &Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

#[test]
fn freed_memory_goes_back_to_the_host_and_inflating_shrinks_the_guest() {
    if !kvm_available() {
        return;
    }
    let mut guest = Guest::boot();
    guest.wait_for("the guest starts filling", MINIMAL_TIMEOUT, |g| {
        g.has_line("FILL-START").then_some(())
    });
    let before = guest.rss_kib();
    guest.wait_for("the guest fills 200 MiB", FILL_TIMEOUT, |g| {
        g.has_line("FILLED").then_some(())
    });
    let filled = guest.rss_kib();
    eprintln!(
        "RSS before the fill {} MiB, after {} MiB",
        before >> 10,
        filled >> 10
    );
    assert!(
        filled >= before + (GIVEN_BACK_MIB << 10),
        "the fill did not show in the VMM's RSS ({before} -> {filled} KiB)\n{}",
        guest.describe()
    );

    let started = Instant::now();
    let back = guest.wait_for(
        "free page reporting gives the freed memory back",
        GIVE_BACK_TIMEOUT,
        |g| {
            let now = g.rss_kib();
            (g.has_line("FREED") && now + (GIVEN_BACK_MIB << 10) <= filled).then_some(now)
        },
    );
    eprintln!(
        "RSS fell back to {} MiB ({} MiB given back) {:.0?} after the guest removed the file",
        back >> 10,
        (filled - back) >> 10,
        started.elapsed()
    );

    let (status, stats) = guest.api("GET", "/balloon/statistics", "");
    assert_eq!(status, 200, "{stats}");
    let total = field(&stats, "total_memory");
    assert!(
        total > 400 << 20 && total <= 512 << 20,
        "total_memory {total}"
    );
    let free = field(&stats, "free_memory");
    let available = field(&stats, "available_memory");
    assert!(free <= total && available <= total, "{stats}");
    // The 200 MiB are free again in the guest.
    assert!(free >= FILL_MIB << 20, "{stats}");
    assert_eq!(
        (field(&stats, "target_mib"), field(&stats, "actual_mib")),
        (0, 0)
    );

    let mem_total = guest.wait_for("the guest prints MemTotal", Duration::from_secs(120), |g| {
        g.mem_total_kib()
    });
    let body = format!(r#"{{"amount_mib": {INFLATE_MIB}}}"#);
    let (status, answer) = guest.api("PATCH", "/balloon", &body);
    assert_eq!(status, 204, "{answer}");
    let shrunk = guest.wait_for(
        "the guest's MemTotal shrinks by the balloon",
        Duration::from_secs(600),
        |g| {
            g.mem_total_kib()
                .filter(|&now| now + (INFLATE_MIB << 10) <= mem_total + 1024)
        },
    );
    // Exactly the balloon's pages leave totalram (without DEFLATE_ON_OOM).
    let drop = mem_total - shrunk;
    assert!(
        drop.abs_diff(INFLATE_MIB << 10) <= 1024,
        "MemTotal {mem_total} -> {shrunk} KiB"
    );
    let (_, stats) = guest.api("GET", "/balloon/statistics", "");
    assert_eq!(field(&stats, "target_mib"), INFLATE_MIB, "{stats}");
    let actual = guest.wait_for(
        "the driver reports the balloon's size",
        Duration::from_secs(60),
        |g| {
            let (_, stats) = g.api("GET", "/balloon/statistics", "");
            stats["actual_mib"]
                .as_u64()
                .filter(|&mib| mib == INFLATE_MIB)
        },
    );
    assert_eq!(actual, INFLATE_MIB);
    let (_, config) = guest.api("GET", "/balloon", "");
    assert_eq!(config["amount_mib"], INFLATE_MIB, "{config}");
    // The counters saw it all.
    let (_, metrics) = guest.api("GET", "/metrics", "");
    let balloon = &metrics["balloon"];
    assert_eq!(
        field(balloon, "inflated_pages"),
        INFLATE_MIB * 256,
        "{balloon}"
    );
    assert!(
        field(balloon, "reported_pages") >= GIVEN_BACK_MIB * 256,
        "{balloon}"
    );
    assert_eq!(field(balloon, "invalid_requests"), 0, "{balloon}");

    let (status, _) = guest.api("PUT", "/api/v1/vmm.shutdown", "");
    assert_eq!(status, 204);
    let out = guest.running.finish(RUN_TIMEOUT);
    assert_exit_code(&out, 0);
}
