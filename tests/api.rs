//! Firecracker's API end to end: the real hearth binary, a tiny guest, and real clients
//! over the Unix socket: curl, the `firecracker-rs-sdk` crate (a Firecracker launcher
//! and client none of us wrote), and a raw HTTP/1.x client for what those hide
//! (keep-alive, pipelining, HTTP/1.0, exact headers).
//!
//! The guest is the `keyboard` payload: it prints "keyboard ready" and ends the VM with
//! status 42 once it reads Ctrl+Alt+Del from the i8042, so `SendCtrlAltDel` is what
//! stops every VM here.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::api_client::{call, curl, curl_available, request, Conn, JsonBody};
use common::{hearth, kvm_available, payload, Format, Running, TempDir, RUN_TIMEOUT};
use serde_json::{json, Value};

/// The keyboard payload's status after Ctrl+Alt+Del.
const CTRL_ALT_DEL_STATUS: i32 = 42;

/// A hearth process serving the API.
struct Vmm {
    running: Running,
    sock: PathBuf,
    dir: TempDir,
}

impl Vmm {
    /// `hearth --api-sock DIR/api.sock --id test-vm EXTRA...`, once its socket answers.
    fn start(extra: &[&str]) -> Vmm {
        let dir = TempDir::short("api");
        let sock = dir.join("api.sock");
        let mut cmd = hearth();
        cmd.arg("--api-sock").arg(&sock).args(["--id", "test-vm"]);
        cmd.args(extra);
        Self::wait_for(Running::start(cmd, Stdio::null()), sock, dir)
    }

    fn wait_for(running: Running, sock: PathBuf, dir: TempDir) -> Vmm {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "the API socket never answered\n{}",
                running.describe_so_far()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Vmm { running, sock, dir }
    }

    fn curl(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        curl(&self.sock, method, path, body)
    }

    /// Boots the keyboard payload through the API, its console in DIR/console.log.
    fn boot_keyboard_guest(&self) {
        let kernel = payload("keyboard", Format::Elf64);
        let console = self.dir.join("console.log");
        for (method, path, body) in [
            ("PUT", "/boot-source", json!({"kernel_image_path": kernel})),
            (
                "PUT",
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 32}),
            ),
            ("PUT", "/serial", json!({"serial_out_path": console})),
            ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
        ] {
            let (status, answer) = self.curl(method, path, Some(body));
            assert_eq!(status, 204, "{method} {path}: {answer}");
        }
        self.wait_for_console(&console);
    }

    fn wait_for_console(&self, console: &Path) {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while !std::fs::read_to_string(console).is_ok_and(|c| c.contains("keyboard ready")) {
            assert!(
                Instant::now() < deadline,
                "the guest never said it was ready\n{}",
                self.running.describe_so_far()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends Ctrl+Alt+Del and checks that the VM ends with the payload's status and that
    /// the socket is gone.
    fn stop_with_ctrl_alt_del(self) {
        let (status, answer) = self.curl(
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
        );
        assert_eq!(status, 204, "{answer}");
        let out = self.running.finish(RUN_TIMEOUT);
        assert_eq!(
            out.status.code(),
            Some(CTRL_ALT_DEL_STATUS),
            "{}",
            common::describe(&out)
        );
        assert!(!self.sock.exists(), "the API socket was left behind");
    }
}

#[test]
fn curl_configures_starts_and_stops_a_guest() {
    if !kvm_available() || !curl_available() {
        return;
    }
    let vmm = Vmm::start(&["--level", "Info"]);
    let (status, info) = vmm.curl("GET", "/", None);
    assert_eq!(status, 200);
    assert_eq!(info["state"], "Not started");
    assert_eq!(
        (info["id"].as_str(), info["app_name"].as_str()),
        (Some("test-vm"), Some("hearth"))
    );
    let (status, version) = vmm.curl("GET", "/version", None);
    assert_eq!(
        (status, version["firecracker_version"].as_str()),
        (200, Some(env!("CARGO_PKG_VERSION")))
    );

    let root = vmm.dir.join("root.img");
    let data = vmm.dir.join("data.img");
    let data2 = vmm.dir.join("data2.img");
    for (image, size) in [(&root, 1 << 20), (&data, 64 << 10), (&data2, 128 << 10)] {
        std::fs::File::create(image).unwrap().set_len(size).unwrap();
    }
    let log = vmm.dir.join("hearth.log");
    for (method, path, body) in [
        ("PUT", "/logger", json!({"level": "Info", "log_path": log})),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 32}),
        ),
        ("PATCH", "/machine-config", json!({"vcpu_count": 1})),
        (
            "PUT",
            "/drives/data",
            json!({"drive_id": "data", "path_on_host": data, "is_root_device": false,
                   "is_read_only": true}),
        ),
        (
            "PUT",
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": root, "is_root_device": true,
                   "is_read_only": false, "cache_type": "Writeback", "io_engine": "Sync"}),
        ),
        (
            "PUT",
            "/vsock",
            json!({"guest_cid": 3, "uds_path": vmm.dir.join("v.sock")}),
        ),
        ("PUT", "/entropy", json!({})),
    ] {
        let (status, answer) = vmm.curl(method, path, Some(body));
        assert_eq!(status, 204, "{method} {path}: {answer}");
        assert_eq!(answer, Value::Null, "204 has no body");
    }
    let (_, machine) = vmm.curl("GET", "/machine-config", None);
    assert_eq!(
        (
            machine["vcpu_count"].as_u64(),
            machine["mem_size_mib"].as_u64()
        ),
        (Some(1), Some(32))
    );

    vmm.boot_keyboard_guest();
    let (status, info) = vmm.curl("GET", "/", None);
    assert_eq!((status, info["state"].as_str()), (200, Some("Running")));
    let (status, config) = vmm.curl("GET", "/vm/config", None);
    assert_eq!(status, 200);
    assert_eq!(
        config["drives"][0]["drive_id"], "rootfs",
        "the root device is first"
    );
    assert_eq!(
        config["boot-source"]["kernel_image_path"],
        json!(payload("keyboard", Format::Elf64))
    );
    assert_eq!(config["vsock"]["guest_cid"], 3);
    assert_eq!(config["entropy"], json!({}));

    // A running disk gets a new image; the VM's configuration follows.
    let (status, answer) = vmm.curl(
        "PATCH",
        "/drives/data",
        Some(json!({"drive_id": "data", "path_on_host": data2})),
    );
    assert_eq!(status, 204, "{answer}");
    let (_, config) = vmm.curl("GET", "/vm/config", None);
    assert_eq!(config["drives"][1]["path_on_host"], json!(data2));
    // And a rate limiter, with Firecracker's update rule: the ops bucket given is added,
    // the bandwidth bucket omitted stays absent.
    let ops = json!({"size": 1000, "refill_time": 1000});
    let (status, answer) = vmm.curl(
        "PATCH",
        "/drives/data",
        Some(json!({"drive_id": "data", "rate_limiter": {"ops": ops}})),
    );
    assert_eq!(status, 204, "{answer}");
    let (_, config) = vmm.curl("GET", "/vm/config", None);
    assert_eq!(config["drives"][1]["rate_limiter"], json!({"ops": ops}));
    let (status, _) = vmm.curl(
        "PATCH",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth0"})),
    );
    assert_eq!(status, 400, "no such interface");

    // Pause and resume, each twice: as with Firecracker, asking for the state the VM is
    // already in succeeds and changes nothing.
    for _ in 0..2 {
        let (status, answer) = vmm.curl("PATCH", "/vm", Some(json!({"state": "Paused"})));
        assert_eq!(status, 204, "{answer}");
        let (_, info) = vmm.curl("GET", "/", None);
        assert_eq!(info["state"], "Paused");
    }
    for _ in 0..2 {
        let (status, answer) = vmm.curl("PATCH", "/vm", Some(json!({"state": "Resumed"})));
        assert_eq!(status, 204, "{answer}");
        let (_, info) = vmm.curl("GET", "/", None);
        assert_eq!(info["state"], "Running");
    }

    let logged = std::fs::read_to_string(&log).expect("hearth logs to --log-path");
    assert!(
        logged.contains("API: PATCH /machine-config -> 204"),
        "{logged}"
    );
    vmm.stop_with_ctrl_alt_del();
}

/// One bad request: what to send (a raw request), the status, and words of the fault.
struct Bad {
    name: &'static str,
    raw: Vec<u8>,
    status: u16,
    fault: &'static str,
    /// The server closes the connection after answering (it cannot find the next request).
    closes: bool,
}

fn bad(
    name: &'static str,
    method: &str,
    path: &str,
    body: Option<&str>,
    fault: &'static str,
) -> Bad {
    Bad {
        name,
        raw: request(method, path, "1.1", body),
        status: 400,
        fault,
        closes: false,
    }
}

fn bad_raw(name: &'static str, raw: Vec<u8>, fault: &'static str) -> Bad {
    Bad {
        name,
        raw,
        status: 400,
        fault,
        closes: true,
    }
}

/// Sends each bad request on a fresh connection, checks its answer, and checks that the
/// VMM still answers `GET /` afterwards.
fn check_bad_requests(vmm: &Vmm, cases: &[Bad], expected_state: &str) {
    for case in cases {
        let mut conn = Conn::open(&vmm.sock);
        conn.send(&case.raw);
        let response = conn.response();
        assert_eq!(response.status, case.status, "{}: {response:?}", case.name);
        let fault = response.json();
        let message = fault["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no fault_message in {fault}", case.name));
        assert!(
            message.contains(case.fault),
            "{}: \"{message}\" lacks \"{}\"",
            case.name,
            case.fault
        );
        if case.closes {
            assert!(
                conn.is_closed(),
                "{}: the connection stayed open",
                case.name
            );
        }
        let mut check = Conn::open(&vmm.sock);
        check.send(&request("GET", "/", "1.1", None));
        let info = check.response();
        assert_eq!(info.status, 200, "after {}", case.name);
        assert_eq!(info.json()["state"], expected_state, "after {}", case.name);
    }
}

#[test]
fn bad_requests_get_a_fault_and_the_vmm_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let vmm = Vmm::start(&[]);
    let kernel = payload("keyboard", Format::Elf64);
    let image = vmm.dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let k = kernel.display();
    let img = image.display();
    let big = format!("{{\"kernel_image_path\": \"{}\"}}", "x".repeat(60 << 10));
    let boot_missing_initrd =
        format!(r#"{{"kernel_image_path": "{k}", "initrd_path": "/nonexistent/initrd"}}"#);
    let drive_async = format!(
        r#"{{"drive_id": "d", "path_on_host": "{img}", "is_root_device": false, "io_engine": "Async"}}"#
    );
    let drive_limited = format!(
        r#"{{"drive_id": "d", "path_on_host": "{img}", "is_root_device": false,
             "rate_limiter": {{"bandwidth": {{"size": 1}}}}}}"#
    );
    let leaked = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let preboot = [
        bad(
            "malformed JSON",
            "PUT",
            "/boot-source",
            Some("{\"kernel_image_path\": "),
            "invalid JSON body",
        ),
        bad(
            "not an object",
            "PUT",
            "/machine-config",
            Some("\"two vCPUs\""),
            "invalid JSON body",
        ),
        bad(
            "unknown field",
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 32, "gpu": 1}"#),
            "unknown field `gpu`",
        ),
        bad(
            "wrong type",
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": "one", "mem_size_mib": 32}"#),
            "invalid type",
        ),
        bad(
            "missing field",
            "PUT",
            "/boot-source",
            Some(r#"{"boot_args": "quiet"}"#),
            "missing field `kernel_image_path`",
        ),
        bad(
            "too many vCPUs",
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 255, "mem_size_mib": 32}"#),
            "out of range",
        ),
        bad(
            "too little memory",
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 1}"#),
            "mem_size_mib 1",
        ),
        bad(
            "smt",
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 32, "smt": true}"#),
            "smt",
        ),
        bad(
            "empty PATCH",
            "PATCH",
            "/machine-config",
            Some("{}"),
            "at least one field",
        ),
        bad(
            "missing kernel",
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
            "/nonexistent/vmlinux",
        ),
        bad(
            "missing initrd",
            "PUT",
            "/boot-source",
            Some(leaked(boot_missing_initrd)),
            "/nonexistent/initrd",
        ),
        bad(
            "missing disk image",
            "PUT",
            "/drives/d",
            Some(
                r#"{"drive_id": "d", "path_on_host": "/nonexistent/d.img", "is_root_device": false}"#,
            ),
            "/nonexistent/d.img",
        ),
        bad(
            "async io",
            "PUT",
            "/drives/d",
            Some(leaked(drive_async)),
            "Async",
        ),
        bad(
            "drive rate limiter without a refill time",
            "PUT",
            "/drives/d",
            Some(leaked(drive_limited)),
            "refill_time",
        ),
        bad(
            "id mismatch",
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id": "b", "is_root_device": false}"#),
            "differs from the one in the body",
        ),
        bad(
            "invalid id",
            "PUT",
            "/drives/a.b",
            Some(r#"{"drive_id": "a.b", "is_root_device": false}"#),
            "invalid drive_id",
        ),
        bad(
            "mtu",
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 1400}"#),
            "mtu",
        ),
        bad(
            "bad MAC",
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "nope"}"#),
            "nope",
        ),
        bad(
            "reserved CID",
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#),
            "guest_cid 2",
        ),
        bad(
            "unknown action",
            "PUT",
            "/actions",
            Some(r#"{"action_type": "Reboot"}"#),
            "unknown variant `Reboot`",
        ),
        bad(
            "metrics without a path",
            "PUT",
            "/metrics",
            Some(r#"{"path": "/tmp/m"}"#),
            "unknown field `path`",
        ),
        bad(
            "metrics to a missing directory",
            "PUT",
            "/metrics",
            Some(r#"{"metrics_path": "/nonexistent/dir/m"}"#),
            "cannot open the metrics file \"/nonexistent/dir/m\"",
        ),
        bad(
            "start without kernel",
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            "no boot source",
        ),
        bad(
            "pause before start",
            "PATCH",
            "/vm",
            Some(r#"{"state": "Paused"}"#),
            "send InstanceStart first",
        ),
        bad(
            "Ctrl+Alt+Del before start",
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
            "send InstanceStart first",
        ),
        bad(
            "PATCH drive before start",
            "PATCH",
            "/drives/d",
            Some(r#"{"drive_id": "d"}"#),
            "send InstanceStart first",
        ),
        bad(
            "snapshot before start",
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#),
            "send InstanceStart first",
        ),
        bad(
            "snapshot load",
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#),
            "cannot read the snapshot state file \"/s\"",
        ),
        bad(
            "unknown path",
            "GET",
            "/nothing",
            None,
            "invalid request method and/or path: GET /nothing",
        ),
        bad(
            "unknown method",
            "DELETE",
            "/drives/d",
            None,
            "invalid request method and/or path: DELETE",
        ),
        bad(
            "POST",
            "POST",
            "/actions",
            Some("{}"),
            "invalid request method and/or path",
        ),
        bad(
            "GET with a body",
            "GET",
            "/",
            Some("{}"),
            "cannot have a body",
        ),
        bad(
            "PUT without a body",
            "PUT",
            "/boot-source",
            None,
            "needs a JSON body",
        ),
        bad(
            "balloon larger than the guest",
            "PUT",
            "/balloon",
            Some(r#"{"amount_mib": 100000}"#),
            "larger than the guest's memory",
        ),
        bad(
            "balloon statistics before start",
            "GET",
            "/balloon/statistics",
            None,
            "send InstanceStart first",
        ),
        bad(
            "entropy rate limiter with an unknown bucket",
            "PUT",
            "/entropy",
            Some(r#"{"rate_limiter": {"bytes": {"size": 1024, "refill_time": 100}}}"#),
            "bytes",
        ),
        bad_raw(
            "oversized body",
            request("PUT", "/boot-source", "1.1", Some(&big)),
            "more than the 51200",
        ),
        bad_raw(
            "garbage",
            b"\x16\x03\x01 hello\r\n\r\n".to_vec(),
            "malformed HTTP request",
        ),
        bad_raw(
            "chunked body",
            b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            "send a Content-Length",
        ),
    ];
    assert!(preboot.len() >= 25);
    check_bad_requests(&vmm, &preboot, "Not started");

    // A failed start leaves the VMM configurable: a tap that does not exist.
    let (status, _) = curl_or_raw(
        &vmm,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "hearthnotap0"}"#,
    );
    assert_eq!(status, 204);
    let (status, fault) = curl_or_raw(
        &vmm,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{k}"}}"#),
    );
    assert_eq!(status, 204, "{fault}");
    let (status, fault) = curl_or_raw(
        &vmm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(status, 400);
    assert!(
        fault["fault_message"]
            .as_str()
            .unwrap()
            .contains("cannot start the microVM"),
        "{fault}"
    );
    drop(vmm);

    // Requests that do not fit a running VM.
    let vmm = Vmm::start(&[]);
    vmm.boot_keyboard_guest_raw();
    let running = [
        bad(
            "configure after start",
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
            "only possible before InstanceStart",
        ),
        bad(
            "boot source after start",
            "PUT",
            "/boot-source",
            Some(&format!(r#"{{"kernel_image_path": "{k}"}}"#)),
            "only possible before InstanceStart",
        ),
        bad(
            "second start",
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            "only possible before InstanceStart",
        ),
        bad(
            "snapshot load into a running VM",
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#),
            "only possible before InstanceStart",
        ),
        bad(
            "snapshot create",
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#),
            "the microVM must be paused for a snapshot",
        ),
        bad(
            "unknown VM state",
            "PATCH",
            "/vm",
            Some(r#"{"state": "Frozen"}"#),
            "Frozen",
        ),
        bad(
            "PATCH unknown drive",
            "PATCH",
            "/drives/nope",
            Some(r#"{"drive_id": "nope", "path_on_host": "/x"}"#),
            "no drive \"nope\"",
        ),
    ];
    check_bad_requests(&vmm, &running, "Running");
    vmm.stop_with_ctrl_alt_del();
}

/// One request with hearth's own client: status and JSON answer (`null` for none).
fn curl_or_raw(vmm: &Vmm, method: &str, path: &str, body: &str) -> (u16, Value) {
    call(&vmm.sock, method, path, body)
}

impl Vmm {
    /// [`Vmm::boot_keyboard_guest`] without curl.
    fn boot_keyboard_guest_raw(&self) {
        let kernel = payload("keyboard", Format::Elf64);
        let console = self.dir.join("console.log");
        for (path, body) in [
            ("/boot-source", json!({"kernel_image_path": kernel})),
            (
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 32}),
            ),
            ("/serial", json!({"serial_out_path": console})),
            ("/actions", json!({"action_type": "InstanceStart"})),
        ] {
            let (status, answer) = curl_or_raw(self, "PUT", path, &body.to_string());
            assert_eq!(status, 204, "PUT {path}: {answer}");
        }
        self.wait_for_console(&console);
    }
}

#[test]
fn http_behaves_like_firecrackers_server() {
    if !kvm_available() {
        return;
    }
    let vmm = Vmm::start(&[]);
    // HTTP/1.0 without keep-alive: Firecracker keeps the connection open, and clients
    // (firecracker-rs-sdk) send their next request on it.
    let mut conn = Conn::open(&vmm.sock);
    conn.send(&request("GET", "/", "1.0", None));
    let first = conn.response();
    assert_eq!(first.status, 200);
    assert_eq!((first.version, first.status), (1, 200), "{first:?}");
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("connection"), Some("keep-alive"));
    assert_eq!(
        first.header("content-length"),
        Some(first.body.len().to_string().as_str())
    );
    conn.send(&request(
        "PUT",
        "/machine-config",
        "1.0",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
    ));
    let empty = conn.response();
    assert_eq!(empty.status, 204);
    assert_eq!(
        empty.header("content-length"),
        None,
        "204 carries no length"
    );
    assert!(empty.body.is_empty());

    // Two pipelined requests in one write get two answers, in order.
    let mut both = request("GET", "/machine-config", "1.1", None);
    both.extend(request("GET", "/version", "1.1", None));
    conn.send(&both);
    assert_eq!(conn.response().json()["mem_size_mib"], 32);
    assert!(conn.response().json()["firecracker_version"].is_string());

    // A body sent in pieces, after an interim 100 Continue.
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 48}"#;
    conn.send(
        format!(
            "PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(conn.response().status, 100);
    conn.send(&body.as_bytes()[..10]);
    std::thread::sleep(Duration::from_millis(50));
    conn.send(&body.as_bytes()[10..]);
    assert_eq!(conn.response().status, 204);

    // Connection: close is honoured.
    conn.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    let last = conn.response();
    assert_eq!(last.header("connection"), Some("close"));
    assert!(conn.is_closed());

    // Many connections at once, each served.
    let mut conns: Vec<Conn> = (0..8).map(|_| Conn::open(&vmm.sock)).collect();
    for conn in &mut conns {
        conn.send(&request("GET", "/", "1.1", None));
    }
    for conn in &mut conns {
        assert_eq!(conn.response().status, 200);
    }
}

#[test]
fn firecracker_rs_sdk_launches_and_drives_hearth() {
    use firecracker_rs_sdk::firecracker::FirecrackerOption;
    use firecracker_rs_sdk::models::{
        ActionType, BootSource, Drive, EntropyDevice, InstanceState, MachineConfiguration, Metrics,
        PartialDrive, RateLimiter, TokenBucket,
    };

    if !kvm_available() {
        return;
    }
    let dir = TempDir::short("api-sdk");
    let sock = dir.join("fc.sock");
    let console = dir.join("console.log");
    let mut instance = FirecrackerOption::new(common::HEARTH)
        .api_sock(&sock)
        .id("sdk-vm")
        .level("Info")
        .stdout(&console)
        .stderr(dir.join("stderr.log"))
        .build()
        .expect("build the launcher");
    instance
        .start_vmm()
        .expect("the SDK starts hearth and connects");
    let pid = instance.firecracker_pid().expect("a pid") as libc::pid_t;

    let info = instance.describe_instance().expect("GET /");
    assert_eq!(
        (info.id.as_str(), info.state),
        ("sdk-vm", InstanceState::NotStarted)
    );
    instance
        .put_guest_boot_source(&BootSource {
            kernel_image_path: payload("keyboard", Format::Elf64),
            boot_args: None,
            initrd_path: None,
        })
        .expect("PUT /boot-source");
    instance
        .put_machine_configuration(&MachineConfiguration {
            cpu_template: None,
            smt: None,
            mem_size_mib: 32,
            track_dirty_pages: None,
            vcpu_count: 1,
            huge_pages: None,
        })
        .expect("PUT /machine-config");
    let metrics_path = dir.join("metrics.json");
    instance
        .put_metrics(&Metrics {
            metrics_path: metrics_path.clone(),
        })
        .expect("PUT /metrics");
    let machine = instance
        .get_machine_configuration()
        .expect("GET /machine-config");
    assert_eq!((machine.vcpu_count, machine.mem_size_mib), (1, 32));
    // Rate limiters, as the SDK sends them (it spells bandwidth "banwidth").
    let bucket = |size| TokenBucket {
        one_time_burst: None,
        refill_time: 1000,
        size,
    };
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    instance
        .put_guest_drive_by_id(&Drive {
            drive_id: "data".into(),
            partuuid: None,
            is_root_device: false,
            cache_type: None,
            is_read_only: false,
            path_on_host: image,
            rate_limiter: Some(RateLimiter::new(bucket(10 << 20), bucket(100))),
            io_engine: None,
            socket: None,
        })
        .expect("PUT /drives with a rate limiter");
    instance
        .put_entropy_device(&EntropyDevice {
            rate_limiter: Some(RateLimiter {
                bandwidth: Some(bucket(4096)),
                ops: None,
            }),
        })
        .expect("PUT /entropy with a rate limiter");
    let version = instance.get_firecracker_version().expect("GET /version");
    assert_eq!(version.firecracker_version, env!("CARGO_PKG_VERSION"));
    instance.start().expect("InstanceStart");

    let deadline = Instant::now() + RUN_TIMEOUT;
    while !std::fs::read_to_string(&console).is_ok_and(|c| c.contains("keyboard ready")) {
        assert!(
            Instant::now() < deadline,
            "the guest never ran (console on stdout)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let info = instance.describe_instance().expect("GET / while running");
    assert_eq!(info.state, InstanceState::Running);
    instance
        .create_sync_action(ActionType::FlushMetrics)
        .expect("FlushMetrics");
    let flushed = std::fs::read_to_string(&metrics_path).expect("FlushMetrics wrote the file");
    let line: Value = serde_json::from_str(flushed.lines().last().expect("a line"))
        .expect("the metrics are JSON");
    // The guest printed on the serial port, and the SDK's requests so far succeeded.
    assert!(line["vcpu"]["exits_io_out"].as_u64() > Some(0), "{line}");
    assert!(line["api"]["requests_ok"].as_u64() >= Some(5), "{line}");
    assert_eq!(line["api"]["requests_failed"], 0, "{line}");
    assert_eq!(line["metrics"]["flushes"], 1, "{line}");
    // GET /metrics (hearth's extension) answers the same document, counted on.
    let (status, now) = call(&sock, "GET", "/metrics", "");
    assert_eq!(status, 200, "{now}");
    assert!(now["vcpu"]["exits_io_out"].as_u64() >= line["vcpu"]["exits_io_out"].as_u64());
    assert!(now["api"]["requests_ok"].as_u64() > line["api"]["requests_ok"].as_u64());
    // The path is set before start, once.
    instance
        .put_metrics(&Metrics {
            metrics_path: dir.join("other.json"),
        })
        .expect_err("PUT /metrics after start");
    let body = json!({"metrics_path": dir.join("other.json")}).to_string();
    let (status, fault) = call(&sock, "PUT", "/metrics", &body);
    assert_eq!(status, 400);
    let fault = fault["fault_message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        fault.contains("only possible before InstanceStart"),
        "{fault}"
    );
    let config = instance.get_export_vm_config().expect("GET /vm/config");
    assert_eq!(
        config.machine_config.as_ref().map(|m| m.mem_size_mib),
        Some(32)
    );
    // The SDK reads the drives under "drive" (Firecracker says "drives"): look with
    // hearth's own client.
    let drive_limiter = || {
        let (status, config) = common::api_client::call(&sock, "GET", "/vm/config", "");
        assert_eq!(status, 200);
        config["drives"][0]["rate_limiter"].clone()
    };
    assert_eq!(
        drive_limiter(),
        json!({"bandwidth": {"size": 10 << 20, "refill_time": 1000},
               "ops": {"size": 100, "refill_time": 1000}})
    );
    instance
        .patch_guest_drive_by_id(&PartialDrive {
            drive_id: "data".into(),
            path_on_host: None,
            rate_limiter: Some(RateLimiter {
                bandwidth: None,
                ops: Some(bucket(200)),
            }),
        })
        .expect("PATCH /drives with a rate limiter");
    // The bandwidth bucket, omitted, stays.
    assert_eq!(
        drive_limiter(),
        json!({"bandwidth": {"size": 10 << 20, "refill_time": 1000},
               "ops": {"size": 200, "refill_time": 1000}})
    );
    instance.pause().expect("PATCH /vm Paused");
    assert_eq!(
        instance
            .describe_instance()
            .expect("GET / while paused")
            .state,
        InstanceState::Paused
    );
    instance.resume().expect("PATCH /vm Resumed");
    instance.stop().expect("SendCtrlAltDel");

    // The SDK never waits for its child: reap it here for the exit status.
    let mut status = 0;
    // SAFETY: waitpid on this process's own child, with a valid status pointer.
    let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(reaped, pid);
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), CTRL_ALT_DEL_STATUS);
    assert!(!sock.exists(), "the API socket was left behind");
}

fn write_config(dir: &TempDir, name: &str, kernel: &Path, extra: Value) -> PathBuf {
    let mut config = json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32, "smt": false},
        "drives": [],
        "network-interfaces": [],
        "balloon": null,
    });
    if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
        config.extend(extra);
    }
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

#[test]
fn firecracker_config_file_boots_a_guest_without_api() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::short("api-config");
    let config = write_config(&dir, "vm.json", &payload("hello", Format::Elf64), json!({}));
    let mut cmd = hearth();
    cmd.args(["--no-api", "--config-file"]).arg(&config);
    let out = Running::start(cmd, Stdio::null()).finish(RUN_TIMEOUT);
    common::assert_exit_code(&out, 0);
    common::assert_stdout_contains(&out, common::HELLO);

    // The metrics section works: the VMM's last flush, at exit, has the guest's exits.
    let metrics = dir.join("metrics.json");
    let exit7 = write_config(
        &dir,
        "exit7.json",
        &payload("exit_7", Format::Elf64),
        json!({"metrics": {"metrics_path": metrics}}),
    );
    let out = Running::start(
        {
            let mut cmd = hearth();
            cmd.args(["--no-api", "--config-file"]).arg(&exit7);
            cmd
        },
        Stdio::null(),
    )
    .finish(RUN_TIMEOUT);
    common::assert_exit_code(&out, 7);
    let text = std::fs::read_to_string(&metrics).expect("the metrics file");
    let last: Value = serde_json::from_str(text.lines().last().expect("a flush")).unwrap();
    // exit_7 ends through the control device's MMIO page.
    assert!(
        last["vcpu"]["exits_mmio_write"].as_u64() > Some(0),
        "{last}"
    );
    assert_eq!(last["block"], json!({}), "{last}");

    // Sections hearth has no device for are refused by name, before anything starts.
    let mmds = write_config(
        &dir,
        "mmds.json",
        &payload("hello", Format::Elf64),
        json!({"mmds-config": {"network_interfaces": ["eth0"]}}),
    );
    let mut cmd = hearth();
    cmd.args(["--no-api", "--config-file"]).arg(&mmds);
    let out = Running::start(cmd, Stdio::null()).finish(RUN_TIMEOUT);
    common::assert_exit_code(&out, 1);
    assert!(
        common::stderr_of(&out).contains("\"mmds-config\" section"),
        "{}",
        common::describe(&out)
    );
}

#[test]
fn config_file_with_api_and_hearth_run_with_api_sock() {
    if !kvm_available() {
        return;
    }
    // firecracker shape: the file boots the guest, the API serves it while it runs.
    let dir = TempDir::short("api-config-sock");
    let kernel = payload("keyboard", Format::Elf64);
    let console = dir.join("console.log");
    let config = write_config(
        &dir,
        "vm.json",
        &kernel,
        json!({"serial": {"serial_out_path": console}}),
    );
    let sock = dir.join("api.sock");
    let mut cmd = hearth();
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config);
    let vmm = Vmm::wait_for(Running::start(cmd, Stdio::null()), sock, dir);
    vmm.wait_for_console(&console);
    let (status, info) = curl_or_raw(&vmm, "GET", "/", "");
    assert_eq!(
        (status, info["state"].as_str()),
        (200, Some("Running")),
        "{info}"
    );
    assert_eq!(info["id"], "anonymous-instance");
    vmm.stop_with_ctrl_alt_del_raw();

    // `hearth run ... --api-sock`: a VM from the command line, served by the API.
    let dir = TempDir::short("api-run");
    let sock = dir.join("api.sock");
    let console = dir.join("console.log");
    let mut cmd = hearth();
    cmd.args(["run", "--memory", "32M", "--kernel"])
        .arg(&kernel)
        .arg("--serial")
        .arg(format!("file={}", console.display()))
        .arg("--api-sock")
        .arg(&sock);
    let vmm = Vmm::wait_for(Running::start(cmd, Stdio::null()), sock, dir);
    vmm.wait_for_console(&console);
    let (_, config) = curl_or_raw(&vmm, "GET", "/vm/config", "");
    assert_eq!(config["machine-config"]["mem_size_mib"], 32);
    assert_eq!(config["serial"]["serial_out_path"], json!(console));
    let (status, fault) = curl_or_raw(
        &vmm,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    assert_eq!(status, 400, "{fault}");
    vmm.stop_with_ctrl_alt_del_raw();
}

impl Vmm {
    fn stop_with_ctrl_alt_del_raw(self) {
        let (status, answer) = curl_or_raw(
            &self,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        );
        assert_eq!(status, 204, "{answer}");
        let out = self.running.finish(RUN_TIMEOUT);
        common::assert_exit_code(&out, CTRL_ALT_DEL_STATUS);
        assert!(!self.sock.exists(), "the API socket was left behind");
    }
}

#[test]
fn signals_before_start_remove_the_socket_and_refused_flags_fail() {
    if !kvm_available() {
        return;
    }
    let vmm = Vmm::start(&[]);
    vmm.running.signal(libc::SIGTERM);
    let out = vmm.running.finish(RUN_TIMEOUT);
    common::assert_exit_code(&out, 128 + libc::SIGTERM);
    assert!(!vmm.sock.exists(), "the API socket was left behind");

    let dir = TempDir::short("api-flags");
    for (flags, expected) in [
        (
            vec!["--metrics-path", "/nonexistent/dir/m"],
            "--metrics-path: cannot open the metrics file \"/nonexistent/dir/m\"",
        ),
        (
            vec!["--seccomp-filter", "f"],
            "--seccomp-filter is not supported",
        ),
        (vec!["--id", "bad id"], "invalid --id"),
        (vec!["--level", "loud"], "invalid log level"),
    ] {
        let mut cmd = hearth();
        cmd.arg("--api-sock").arg(dir.join("s.sock")).args(&flags);
        let out = Running::start(cmd, Stdio::null()).finish(RUN_TIMEOUT);
        common::assert_exit_code(&out, 1);
        assert!(
            common::stderr_of(&out).contains(expected),
            "{flags:?}: {}",
            common::describe(&out)
        );
    }
    let out = Running::start(hearth(), Stdio::null()).finish(RUN_TIMEOUT);
    common::assert_exit_code(&out, 2);
    assert!(
        common::stderr_of(&out).contains("--api-sock"),
        "{}",
        common::describe(&out)
    );
}
