//! A machine's network end to end, in one machine: the machine has user-mode networking
//! (passt) with a port of its own published at start, its containers on the machine's
//! bridge reach each other by address and the host's loopback through the NAT, get the
//! machine's resolver, `--network none` leaves only loopback, `-p` publishes a
//! container's TCP and UDP ports on the host's loopback through hearth's vsock
//! forwarder, a host port in use is refused before the container starts, a container's
//! veth is gone once it ends, and no passt outlives the machine. Test traffic goes only
//! to loopback.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::container::{assert_status, run};
use common::{describe, stderr_of, stdout_of, Running};
use hearth::image::sample::{self, SampleLayer};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("machine-net-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn state_dir(scratch: &Path) -> PathBuf {
    scratch.join("state")
}

fn hearth(scratch: &Path) -> Command {
    common::container::hearth_in(
        &scratch.join("cache"),
        &scratch.join("templates"),
        &state_dir(scratch),
    )
}

/// Kills the machine's VMM if the test fails before stopping it, showing its console.
struct MachineGuard {
    dir: PathBuf,
}

impl Drop for MachineGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- machine console (last 60 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let pid = std::fs::read_to_string(self.dir.join("machine.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["pid"].as_i64());
        if let Some(pid) = pid {
            // SAFETY: kill(2) on the pid hearth recorded for this test's own machine.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// busybox plus `/bin/udp_echo` (tests/programs/udp_echo.c, built static here).
fn image(scratch: &Path) -> PathBuf {
    let binary = scratch.join("udp_echo");
    common::build_static_program("udp_echo", &binary);
    let layer =
        SampleLayer::new().file_with("bin/udp_echo", std::fs::read(&binary).unwrap(), 0o755, 0, 0);
    let image = scratch.join("busybox-oci");
    sample::busybox_oci_layout(&image, &[layer]).expect("build the busybox OCI layout");
    image
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The passt processes (`passt` or `passt.avx2`, which it execs) among the descendants of `pid` (a jailed VMM forks; passt is
/// the child of whichever process started it).
fn passt_descendants(pid: i32) -> Vec<i32> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // "pid (comm) state ppid ..."
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid: Option<i32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        procs.push((child, ppid.unwrap_or(0), head.contains("(passt")));
    }
    let mut family = vec![pid];
    let mut grew = true;
    while grew {
        grew = false;
        for (child, ppid, _) in &procs {
            if family.contains(ppid) && !family.contains(child) {
                family.push(*child);
                grew = true;
            }
        }
    }
    (procs.iter())
        .filter(|(child, _, passt)| *passt && family.contains(child))
        .map(|(child, _, _)| *child)
        .collect()
}

/// A one-shot HTTP server on the host's loopback; returns its port.
fn host_http_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let _ = conn.write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}").as_bytes());
        }
    });
    port
}

/// GET / from the host's loopback port, retried while the server is not up yet.
fn http_get(port: u16, deadline: Instant) -> String {
    loop {
        let answer = TcpStream::connect(("127.0.0.1", port)).and_then(|mut conn| {
            conn.set_read_timeout(Some(Duration::from_secs(30)))?;
            conn.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut answer = String::new();
            conn.read_to_string(&mut answer)?;
            Ok(answer)
        });
        match answer {
            Ok(text) if !text.is_empty() => return text,
            _ if Instant::now() > deadline => panic!("no HTTP answer on port {port}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// A datagram to the host's loopback port and its echo, retried while nobody answers.
fn udp_echo(port: u16, text: &str, deadline: Instant) -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 2048];
    loop {
        socket
            .send_to(text.as_bytes(), ("127.0.0.1", port))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(_) if Instant::now() > deadline => panic!("no UDP echo on port {port}"),
            Err(_) => {}
        }
    }
}

#[test]
fn a_machines_containers_have_their_own_network_and_published_ports() {
    let dir = scratch("bridge");
    let image = image(&dir);
    let name = format!("n{}", std::process::id());
    let guard = MachineGuard {
        dir: state_dir(&dir).join("machines").join(&name),
    };
    let machine_port = free_port();
    let mut start = hearth(&dir);
    start
        .args(["machine", "start", &name, "--memory", "384M", "-p"])
        .arg(format!("127.0.0.1:{machine_port}:8081"));
    let out = run(start);
    assert_status(&out, 0);
    let info = std::fs::read_to_string(guard.dir.join("machine.json")).unwrap();
    let vmm: serde_json::Value = serde_json::from_str(&info).unwrap();
    let vmm = vmm["pid"].as_i64().unwrap() as i32;
    let passts = passt_descendants(vmm);
    assert_eq!(
        passts.len(),
        1,
        "the machine's VMM has no passt: {passts:?}"
    );

    // A port of the machine itself, published at start through passt.
    let mut cmd = hearth(&dir);
    cmd.args([
        "machine",
        "run",
        &name,
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo hello-from-the-machine > /tmp/www/index.html && \
         httpd -p 8081 -h /tmp/www",
    ]);
    let out = run(cmd);
    assert_status(&out, 0);
    let answer = http_get(machine_port, Instant::now() + Duration::from_secs(120));
    assert!(answer.contains("hello-from-the-machine"), "{answer}");

    // The server: an HTTP server and a UDP echo published on the host's loopback, and a
    // one-shot nc listener for its sibling.
    let (http_port, udp_port) = (free_port(), free_port());
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "--machine", &name, "--name", "srv"])
        .arg("-p")
        .arg(format!("127.0.0.1:{http_port}:80"))
        .arg("-p")
        .arg(format!("127.0.0.1:{udp_port}:7/udp"))
        .arg(&image)
        .args([
            "sh",
            "-c",
            "trap 'exit 0' TERM; mkdir -p /www; echo hello-from-httpd > /www/index.html; \
             httpd -f -p 80 -h /www & udp_echo 7 & \
             echo links: $(ls /sys/class/net); ip -4 -o addr show eth0; cat /etc/resolv.conf; \
             echo ready; \
             nc -l -p 9000; echo nc-done; sleep 600 & wait",
        ]);
    let srv = Running::start(cmd, Stdio::null());
    srv.expect_stdout_within(b"ready\n", Duration::from_secs(180));
    let early = String::from_utf8_lossy(&srv.stdout_so_far()).into_owned();
    assert!(early.contains("links: eth0 lo\n"), "{early}");
    let address = early
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split_once('/'))
        .map(|(a, _)| a.to_string())
        .unwrap_or_else(|| panic!("no address in {early:?}"));
    assert!(address.starts_with("172.30."), "{address}");
    assert!(early.contains("nameserver 10.0.2.3\n"), "{early}");

    // A sibling reaches it by address over the bridge (nc and HTTP), and a server on the
    // host's loopback through the machine's NAT and passt (whose gateway is the host).
    let host_port = host_http_server("hello-from-the-host\n");
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "--machine", &name])
        .arg(&image)
        .args([
            "sh",
            "-c",
            &format!(
                "echo hello-over-bridge | nc {address} 9000; wget -qO- http://{address}/; \
                 wget -qO- http://10.0.2.2:{host_port}/; ip -4 -o addr show eth0"
            ),
        ]);
    let out = run(cmd);
    assert_status(&out, 0);
    assert!(
        stdout_of(&out).contains("hello-from-httpd\nhello-from-the-host\n"),
        "{}",
        describe(&out)
    );
    assert!(
        !stdout_of(&out).contains(&format!("inet {address}/")),
        "two containers share an address\n{}",
        describe(&out)
    );
    srv.expect_stdout_within(b"hello-over-bridge\nnc-done\n", Duration::from_secs(60));

    // The host reaches its published ports on loopback.
    let deadline = Instant::now() + Duration::from_secs(120);
    let answer = http_get(http_port, deadline);
    assert!(answer.contains("hello-from-httpd"), "{answer}");
    assert_eq!(
        udp_echo(udp_port, "ping over udp", deadline),
        "ping over udp"
    );

    // A second container asking for the same host port is refused before it starts.
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "--machine", &name])
        .arg("-p")
        .arg(format!("127.0.0.1:{http_port}:80"))
        .arg(&image)
        .args(["echo", "must-not-run"]);
    let out = run(cmd);
    assert_status(&out, 125);
    assert!(
        stderr_of(&out).contains("is not available (Address already in use")
            && stderr_of(&out).lines().count() == 1,
        "{}",
        describe(&out)
    );
    assert!(!stdout_of(&out).contains("must-not-run"));

    // --network none: loopback only.
    let mut cmd = hearth(&dir);
    cmd.args(["container", "run", "--machine", &name, "--network", "none"])
        .arg(&image)
        .args(["ls", "/sys/class/net"]);
    let out = run(cmd);
    assert_status(&out, 0);
    assert_eq!(stdout_of(&out), "lo\n", "{}", describe(&out));

    // The server's end: its veth leaves the machine, and the host port is free again.
    srv.signal(libc::SIGTERM);
    let srv = srv.finish(Duration::from_secs(60));
    assert_status(&srv, 0);
    let mut cmd = hearth(&dir);
    cmd.args(["machine", "run", &name, "--", "ls", "/sys/class/net"]);
    let out = run(cmd);
    assert_status(&out, 0);
    let links = stdout_of(&out);
    assert!(links.contains("hearth0"), "{}", describe(&out));
    assert!(
        !links.contains("hv"),
        "a veth outlived its container\n{links}"
    );
    assert!(TcpListener::bind(("127.0.0.1", http_port)).is_ok());

    let mut cmd = hearth(&dir);
    cmd.args(["machine", "stop", &name]);
    let out = run(cmd);
    assert_status(&out, 0);
    std::mem::forget(guard);
    // passt ends with the machine's VMM.
    let deadline = Instant::now() + Duration::from_secs(30);
    let alive = |pid: &i32| Path::new(&format!("/proc/{pid}")).exists();
    while passts.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !passts.iter().any(alive),
        "passt outlived the machine: {passts:?}"
    );
}
