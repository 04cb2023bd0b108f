//! User-mode networking end to end: a container VM on passt (the default network) reaches
//! a server on the host's loopback through the gateway address, gets passt's DNS
//! forwarder in /etc/resolv.conf, and publishes a busybox httpd (TCP) and a UDP echo
//! server with `-p`; a second container asking for the same host port is refused before
//! it starts; no passt is left once the VM has ended. All traffic stays on loopback.
//!
//! One container VM (restored from a template made on first use) does all of it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::linux::MINIMAL_TIMEOUT;
use common::{announce_skip, describe, kvm_available, stderr_of, Need, Running};
use hearth::image::sample::{self, SampleLayer};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("user-net-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn hearth(scratch: &Path) -> Command {
    common::container::hearth_in(
        &scratch.join("cache"),
        &scratch.join("templates"),
        &scratch.join("state"),
    )
}

fn passt_installed() -> bool {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("passt").is_file()))
        .unwrap_or(false);
    if !found {
        announce_skip(Need::Passt, "passt is not installed");
    }
    found
}

/// A port nobody uses on 127.0.0.1 right now, for TCP and for UDP.
fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The pids of the passt processes whose command line holds `needle`.
fn passts_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let words: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        let is_passt = words
            .first()
            .is_some_and(|w| w.rsplit('/').next().unwrap_or("").starts_with("passt"));
        if is_passt && words.iter().any(|w| w == needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The busybox image with /udp_echo (tests/programs/udp_echo.c, static) and a page for
/// httpd.
fn image(dir: &Path) -> PathBuf {
    let binary = dir.join("udp_echo");
    common::build_static_program("udp_echo", &binary);
    let layer = SampleLayer::new()
        .file_with("udp_echo", std::fs::read(&binary).unwrap(), 0o755, 0, 0)
        .dir("www")
        .file("www/index.html", "hearth-httpd-ok\n");
    let image = dir.join("image");
    sample::busybox_oci_layout(&image, &[layer]).expect("build the busybox OCI layout");
    image
}

/// One HTTP/1.0 GET of `/` on 127.0.0.1:`port`, retried while the guest's server is not
/// up yet; the whole answer.
fn http_get(port: u16, deadline: Instant) -> String {
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        })();
        match attempt {
            Ok(answer) if answer.contains("200") => return answer,
            other if Instant::now() >= deadline => panic!("no HTTP answer: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Sends a datagram to 127.0.0.1:`port` until it comes back.
fn udp_echo(port: u16, deadline: Instant) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 64];
    loop {
        socket.send_to(b"hearth-udp", ("127.0.0.1", port)).unwrap();
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            return buf[..n].to_vec();
        }
        assert!(Instant::now() < deadline, "no UDP echo from the container");
    }
}

#[test]
fn a_container_on_passt_reaches_the_host_and_publishes_tcp_and_udp() {
    if !kvm_available() || !passt_installed() {
        return;
    }
    let dir = scratch("ports");
    let image = image(&dir);

    // The host's server, on loopback only: the guest reaches it as 10.0.2.2.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = server.local_addr().unwrap().port();
    let serve = std::thread::spawn(move || {
        let (mut stream, _) = server.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        stream
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 16\r\n\r\nhello-from-host\n")
            .unwrap();
    });

    let (http_port, udp_port) = (free_port(), free_port());
    let publish_http = format!("127.0.0.1:{http_port}:80");
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "-i", "-p", &publish_http])
        .args(["-p", &format!("127.0.0.1:{udp_port}:5353/udp")])
        .arg(&image)
        .args([
            "sh",
            "-c",
            &format!(
                "cat /etc/resolv.conf; cat /sys/class/net/eth0/mtu; \
                 wget -q -O - http://10.0.2.2:{server_port}/; \
                 httpd -p 80 -h /www && (/udp_echo 5353 &) && echo ready; \
                 read line; echo bye"
            ),
        ]);
    let mut container = Running::start(cmd, Stdio::piped());
    container.expect_stdout_within(b"ready\n", MINIMAL_TIMEOUT);
    serve.join().unwrap();
    let stdout = String::from_utf8_lossy(&container.stdout_so_far()).into_owned();
    assert!(
        stdout.starts_with("nameserver 10.0.2.3\n65520\nhello-from-host\n"),
        "{}",
        container.describe_so_far()
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let answer = http_get(http_port, deadline);
    assert!(answer.ends_with("hearth-httpd-ok\n"), "{answer}");
    assert_eq!(udp_echo(udp_port, deadline), b"hearth-udp");

    // One passt serves this VM; a second container cannot take its host port.
    let passt_arg = format!("127.0.0.1/{http_port}:80");
    assert_eq!(passts_with(&passt_arg).len(), 1, "{passt_arg}");
    let mut second = hearth(&dir);
    second
        .args(["container", "run", "-p", &publish_http])
        .arg(&image)
        .arg("true");
    let out = common::run_with_timeout(second, MINIMAL_TIMEOUT);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert_eq!(
        stderr_of(&out).trim(),
        format!(
            "hearth: -p {publish_http}/tcp: host port {http_port}/tcp is not available \
             (Address already in use (os error 98))"
        )
    );

    container.send(b"go\n");
    let out = container.finish(MINIMAL_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(common::stdout_of(&out).ends_with("bye\n"));
    // passt goes with the VM.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !passts_with(&passt_arg).is_empty() {
        assert!(Instant::now() < deadline, "passt outlived its VM");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
