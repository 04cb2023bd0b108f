//! virtio-net end to end, on a tap inside a network namespace this test creates (and
//! always removes): a Linux guest configures eth0 with the MAC given by `--net`, pings the
//! host, is pinged by the host, and streams 16 MiB over TCP to a listener on the host
//! side, which checks every byte; and a missing tap is a one-line setup error.
//!
//! Network rules: all traffic stays inside `hearth-nettest-*` namespaces, on link-local
//! 169.254.77.0/24 addresses; no interface of the caller's namespace is touched.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{Shutdown, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::linux::{linux_args, minimal_guest};
use common::netns::{net_tests_possible, run_ok, NetNs};
use common::{
    assert_exit_code, contains, describe, payload, run_with_timeout, stderr_of, stdout_of, Format,
    Running, TempDir, HEARTH, PAYLOAD_MEMORY,
};

const TAP: &str = "tap0";
const HOST_IP: &str = "169.254.77.1";
const GUEST_IP: &str = "169.254.77.2";
const GUEST_MAC: &str = "52:54:00:12:34:56";
const PORT: u16 = 5001;
/// The stream repeats the first `CHUNK_LEN` bytes of `yes hearth-net`.
const STREAM_LINE: &[u8] = b"hearth-net\n";
const CHUNK_LEN: usize = 64 << 10;
/// The guest's file `/tmp/p`: `FILE_LEN / CHUNK_LEN` copies of the chunk.
const FILE_LEN: usize = 1 << 20;
/// The stream: `/tmp/p` sent `STREAM_LEN / FILE_LEN` times.
const STREAM_LEN: usize = 16 << 20;
/// Debian's busybox-static, which resources/build-initramfs.sh needs anyway.
const BUSYBOX: &str = "/bin/busybox";

/// Boot to the guest's READY line: boot (~30-65 s), ARP and a few pings, then making the
/// 1 MiB file (~4 s) and hashing the 16 MiB stream through a pipe (~25 s) in an emulated
/// guest kernel.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// From "go" to the end of the transfer (~20 s on a nested-PVM host; the old 1 KiB-write
/// `nc` stream took ~7 minutes there).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(1800);
/// From the end of the transfer to hearth's exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest's script: one double-quoted word for the kernel, under its limit of 32
/// words after `--`. The outer `sh -c` of /init expands `$` inside the double quotes, so
/// there is none. Markers are printed at the start of a line, which tells them apart from
/// the `HEARTH-RUN <command>` echo of this text.
///
/// Speed on a nested-PVM host, where the guest kernel is emulated (~20 ms per frame it
/// sends, ~1.3 s per MiB it writes to a file or pipes):
/// - the data goes out by `sendfile` (`nc -e cat FILE...`: busybox's `cat` sends a file to
///   a socket with sendfile) straight from the page cache of one 1 MiB file, so the guest
///   neither writes the 16 MiB anywhere nor copies it through `nc`, which sends 1 KiB per
///   write and so one ~1 KiB segment per frame;
/// - `tcp_min_tso_segs=44` lets the guest build ~64 KiB TSO frames (hearth offers
///   HOST_TSO4 and CSUM) from the start; TCP otherwise sizes them by its pacing rate,
///   which at this speed means 2 segments per frame, 8 times the frames;
/// - the 1 MiB file is 64 KiB of `yes` copied onto itself by one `dd`, and the guest
///   hashes the stream (`cat` of the same 16 files into `sha256sum`) before READY.
fn guest_command() -> String {
    let files = vec!["p"; STREAM_LEN / FILE_LEN].join(" ");
    format!(
        concat!(
            r#"sh -c "ip link set lo up; "#,
            r#"ip link set eth0 up && ip addr add {guest}/24 dev eth0 || exit 10; "#,
            r#"xargs echo GUEST-MAC < /sys/class/net/eth0/address; "#,
            r#"ping -c 3 -W 60 {host} && echo PING-HOST-OK || exit 11; "#,
            r#"echo 44 > /proc/sys/net/ipv4/tcp_min_tso_segs; "#,
            r#"cd /tmp && yes hearth-net | head -c {chunk} > p && "#,
            r#"dd if=p of=p bs={chunk} seek=1 count={more} conv=notrunc || exit 12; "#,
            r#"cat {files} | sha256sum; "#,
            r#"echo READY; read line; echo GOT-GO; "#,
            r#"nc {host} {port} -e cat {files} || exit 13; "#,
            r#"echo SENT""#
        ),
        guest = GUEST_IP,
        host = HOST_IP,
        port = PORT,
        chunk = CHUNK_LEN,
        more = FILE_LEN / CHUNK_LEN - 1,
        files = files,
    )
}

/// What the host-side listener received on one connection.
struct Received {
    bytes: Vec<u8>,
    /// When the guest's connection was accepted.
    accepted: Instant,
    /// From the first byte to end-of-file.
    elapsed: Duration,
}

/// A TCP listener on `HOST_IP:PORT` inside `ns`, on its own thread (which enters the
/// namespace), bound before this returns. It accepts one connection and reads it to
/// end-of-file, then closes it; it gives up when `abandon` is set or after
/// [`TRANSFER_TIMEOUT`].
fn start_listener(
    ns: &NetNs,
    abandon: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<Received, String>> {
    let (bound_tx, bound_rx) = mpsc::channel();
    let ns_name = ns.name().to_string();
    let handle = ns.spawn_inside(move || {
        let listener = TcpListener::bind((HOST_IP, PORT))
            .map_err(|e| format!("bind {HOST_IP}:{PORT} in {ns_name}: {e}"));
        let listener = match listener {
            Ok(l) => {
                let _ = bound_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = bound_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        receive_one(&listener, &abandon)
    });
    match bound_rx.recv() {
        Ok(Ok(())) => handle,
        Ok(Err(e)) => panic!("listener: {e}"),
        // The thread ended without binding: setns failed (its error) or it panicked.
        Err(_) => match handle.join() {
            Ok(Err(e)) => panic!("listener: {e}"),
            _ => panic!("the listener thread died before binding"),
        },
    }
}

fn receive_one(listener: &TcpListener, abandon: &AtomicBool) -> Result<Received, String> {
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    let give_up = |what: &str| -> Result<(), String> {
        if abandon.load(Ordering::Relaxed) {
            Err(format!("abandoned while {what}"))
        } else if Instant::now() >= deadline {
            Err(format!("timed out after {TRANSFER_TIMEOUT:?} while {what}"))
        } else {
            Ok(())
        }
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener nonblocking: {e}"))?;
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                give_up("waiting for the guest to connect")?;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    let accepted = Instant::now();
    eprintln!("listener: connection from {peer}");
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(1))))
        .map_err(|e| format!("stream setup: {e}"))?;
    let mut bytes = Vec::with_capacity(STREAM_LEN);
    let mut chunk = vec![0u8; 256 << 10];
    let mut first_byte = None;
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(Instant::now);
                bytes.extend_from_slice(&chunk[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                give_up(&format!("receiving (got {} bytes so far)", bytes.len()))?;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read after {} bytes: {e}", bytes.len())),
        }
    }
    let elapsed = first_byte.map_or(Duration::ZERO, |t| t.elapsed());
    // The guest's `cat` closed its side after the last byte; close ours.
    let _ = stream.shutdown(Shutdown::Both);
    Ok(Received {
        bytes,
        accepted,
        elapsed,
    })
}

/// What the guest sends: the first [`CHUNK_LEN`] bytes of `yes hearth-net`, repeated to
/// `len` bytes.
fn expected_stream(len: usize) -> Vec<u8> {
    let chunk: Vec<u8> = STREAM_LINE
        .iter()
        .copied()
        .cycle()
        .take(CHUNK_LEN)
        .collect();
    chunk.iter().copied().cycle().take(len).collect()
}

/// The guest's `sha256sum` line: 64 hex digits and "  -".
fn guest_sha256(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        let (hash, rest) = l.trim_end_matches('\r').split_once("  ")?;
        (rest == "-" && hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hash.to_string())
    })
}

/// sha256 of `bytes`, computed by coreutils' `sha256sum` on a temporary file.
fn host_sha256(bytes: &[u8]) -> String {
    let dir = TempDir::new("net-sha");
    let file = dir.join("received");
    std::fs::write(&file, bytes).expect("write received data");
    let out = run_ok(Command::new("sha256sum").arg(&file));
    stdout_of(&out)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// The tap's frame counters inside `ns`, for information: `(frames, bytes)` the guest sent
/// (the tap's RX) and received (its TX).
fn tap_counters(ns: &NetNs) -> Option<((u64, u64), (u64, u64))> {
    let mut cat = Command::new("cat");
    for counter in ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"] {
        cat.arg(format!("/sys/class/net/{TAP}/statistics/{counter}"));
    }
    // `ip netns exec` mounts a /sys of the namespace.
    let out = ns.exec(&cat).output().ok()?;
    let values: Vec<u64> = stdout_of(&out)
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    match values[..] {
        [rx_packets, rx_bytes, tx_packets, tx_bytes] => {
            Some(((rx_packets, rx_bytes), (tx_packets, tx_bytes)))
        }
        _ => None,
    }
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

/// One Linux boot: MAC, guest -> host ping, host -> guest ping, a 16 MiB TCP stream from
/// the guest checked byte for byte, and the guest's exit status.
#[test]
fn minimal_kernel_pings_and_streams_over_a_tap() {
    if !net_tests_possible() {
        return;
    }
    let ns = NetNs::new("hearth-nettest-");
    ns.add_tap(TAP, &format!("{HOST_IP}/24"));

    let net = format!("tap={TAP},mac={GUEST_MAC}");
    let dir = TempDir::new("net-metrics");
    let metrics = dir.path().join("metrics.json");
    let args = linux_args(
        &minimal_guest(),
        &guest_command(),
        &[
            "--memory",
            "256M",
            "--net",
            &net,
            "--metrics-path",
            metrics.to_str().unwrap(),
        ],
    );
    let mut hearth = Command::new(HEARTH);
    hearth.args(&args);
    let started = Instant::now();
    let mut vm = Running::start(ns.exec(&hearth), Stdio::piped());

    vm.expect_stdout_within(b"\nREADY", READY_TIMEOUT);
    eprintln!("guest ready after {:?}", started.elapsed());
    let stdout = String::from_utf8_lossy(&vm.stdout_so_far()).into_owned();
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_end() == format!("GUEST-MAC {GUEST_MAC}")),
        "eth0 does not have the MAC given with --net ({GUEST_MAC})\n{}",
        vm.describe_so_far()
    );
    assert!(
        stdout.contains("\nPING-HOST-OK"),
        "guest -> host ping failed\n{}",
        vm.describe_so_far()
    );
    for line in stdout
        .lines()
        .filter(|l| l.contains("bytes from") || l.contains("round-trip") || l.contains("packets"))
    {
        eprintln!("guest ping: {}", line.trim_end());
    }

    // The host pings the guest while it waits for "go". Busybox's ping: busybox-static is
    // already needed for the test initramfs, and iputils' ping may not be installed.
    let mut ping = Command::new(BUSYBOX);
    ping.args(["ping", "-c", "3", "-W", "10", GUEST_IP]);
    let ping = ns.exec(&ping).output().expect("run ping in the namespace");
    for line in stdout_of(&ping).lines() {
        eprintln!("host ping: {line}");
    }
    assert!(
        ping.status.success(),
        "host -> guest ping failed\n{}\n--- VM ---\n{}",
        describe(&ping),
        vm.describe_so_far()
    );

    let abandon = Arc::new(AtomicBool::new(false));
    let listener = start_listener(&ns, Arc::clone(&abandon));
    vm.send(b"go\n");
    let go_sent = Instant::now();
    // Wait for the transfer; if the guest finishes without connecting (nc failed) or
    // hearth ends, stop the listener after a grace period instead of waiting for its
    // timeout.
    let mut guest_done = None;
    while !listener.is_finished() {
        if contains(&vm.stdout_so_far(), b"HEARTH-EXIT") || !vm.is_running() {
            let since = *guest_done.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(30) {
                abandon.store(true, Ordering::Relaxed);
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let received = listener.join().expect("listener thread panicked");
    let received =
        received.unwrap_or_else(|e| panic!("host listener failed: {e}\n{}", vm.describe_so_far()));
    eprintln!(
        "transfer: {} bytes in {:.1} s (first byte to EOF) = {:.3} MB/s; the guest connected \
         {:.1} s after \"go\", finished {:.1} s after",
        received.bytes.len(),
        received.elapsed.as_secs_f64(),
        mb_per_s(received.bytes.len(), received.elapsed),
        received.accepted.duration_since(go_sent).as_secs_f64(),
        go_sent.elapsed().as_secs_f64()
    );
    if let Some(((sent, sent_bytes), (got, got_bytes))) = tap_counters(&ns) {
        eprintln!(
            "tap: guest sent {sent} frames ({sent_bytes} bytes, {} per frame), \
             received {got} frames ({got_bytes} bytes)",
            sent_bytes / sent.max(1)
        );
    }

    let out = vm.finish(EXIT_TIMEOUT);
    assert_exit_code(&out, 0);
    let stdout = stdout_of(&out);
    assert!(
        stdout.contains("\nSENT"),
        "the guest's nc/cat did not finish\n{}",
        describe(&out)
    );

    assert_eq!(
        received.bytes.len(),
        STREAM_LEN,
        "the host received {} bytes, the guest sent {STREAM_LEN}\n{}",
        received.bytes.len(),
        describe(&out)
    );
    let expected = expected_stream(STREAM_LEN);
    if let Some(at) = received
        .bytes
        .iter()
        .zip(&expected)
        .position(|(a, b)| a != b)
    {
        panic!(
            "received data differs from what the guest sent at byte {at}: {:?}",
            String::from_utf8_lossy(&received.bytes[at..(at + 64).min(STREAM_LEN)])
        );
    }
    let guest_sum = guest_sha256(&stdout)
        .unwrap_or_else(|| panic!("no sha256sum line from the guest\n{}", describe(&out)));
    assert_eq!(
        host_sha256(&received.bytes),
        guest_sum,
        "sha256 of the received stream differs from the guest's\n{}",
        describe(&out)
    );
    eprintln!(
        "whole run {:.1} s; guest sha256 {guest_sum}",
        started.elapsed().as_secs_f64()
    );

    // The metrics written at exit count the stream and the pings on the interface.
    let text = std::fs::read_to_string(&metrics).expect("the metrics file");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a flush")).expect("JSON");
    let nic = &last["net"]["net0"];
    let count = |name: &str| {
        nic[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name}: {last}"))
    };
    assert!(count("tx_bytes") >= STREAM_LEN as u64, "{last}");
    assert!(
        count("tx_packets") > 0 && count("rx_packets") >= 3,
        "{last}"
    );
    assert_eq!((count("tx_errors"), count("rx_errors")), (0, 0), "{last}");
    eprintln!("metrics at exit: {nic}");
}

/// A tap that does not exist is a setup error (exit 1, one stderr line naming it), and
/// hearth does not create it; neither is a non-tap interface accepted.
#[test]
fn missing_or_non_tap_interface_is_refused() {
    if !net_tests_possible() {
        return;
    }
    let ns = NetNs::new("hearth-nettest-neg-");
    let kernel = payload("hello", Format::Elf64);
    for (tap, name_in_error) in [("does-not-exist", "does-not-exist"), ("lo", "\"lo\"")] {
        let mut hearth = Command::new(HEARTH);
        hearth.arg("run").arg("--kernel").arg(&kernel).args([
            "--memory",
            PAYLOAD_MEMORY,
            "--net",
            &format!("tap={tap}"),
        ]);
        let out = run_with_timeout(ns.exec(&hearth), common::RUN_TIMEOUT);
        assert_exit_code(&out, 1);
        let err = stderr_of(&out);
        assert!(
            err.contains(name_in_error) && err.lines().count() == 1,
            "expected one stderr line naming {tap:?}\n{}",
            describe(&out)
        );
        assert!(
            !stdout_of(&out).contains("Hello"),
            "the guest ran despite the bad --net\n{}",
            describe(&out)
        );
    }
    let links = ns.ip(&["-o", "link", "show"]);
    assert!(
        !stdout_of(&links).contains("does-not-exist"),
        "hearth created the missing tap\n{}",
        stdout_of(&links)
    );
}
