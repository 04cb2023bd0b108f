//! The client against tiny servers on a Unix socket: each accepts connections on its own
//! thread, reads one request from each and writes a canned answer, in pieces if asked.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use super::*;
use crate::api::models::InstanceState;

/// A socket path no other test uses.
fn socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("hearth-client-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Reads one request (head and `Content-Length` body) from `stream`.
fn read_request(stream: &mut UnixStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if bytes.len() >= end + 4 + length {
                return bytes;
            }
        }
        let n = stream.read(&mut chunk).unwrap();
        if n == 0 {
            return bytes;
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// A server that answers one connection per entry of `answers`, each answer written in
/// the given pieces (a short pause between them), then closes that connection. The
/// thread returns the requests it read.
fn serve(answers: Vec<Vec<&'static [u8]>>) -> (PathBuf, JoinHandle<Vec<Vec<u8>>>) {
    let path = socket_path();
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for pieces in answers {
            let (mut stream, _) = listener.accept().unwrap();
            requests.push(read_request(&mut stream));
            for piece in pieces {
                // The client may have given up already (timeouts, truncated answers).
                let _ = stream.write_all(piece);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        requests
    });
    (path, server)
}

fn client(path: &Path) -> ApiClient {
    ApiClient::new(path, Duration::from_secs(10))
}

/// The transport error inside a [`ClientError::Request`].
fn transport(err: ClientError) -> ClientError {
    match err {
        ClientError::Request { source, .. } => *source,
        other => panic!("not a transport error: {other:?}"),
    }
}

const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n";

#[test]
fn renders_requests_with_json_bodies() {
    assert_eq!(
        render_request("PATCH", "/vm", Some(br#"{"state":"Paused"}"#)),
        b"PATCH /vm HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
          Content-Type: application/json\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}"
    );
    assert_eq!(
        render_request("GET", "/", None),
        b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
    );
    let put = String::from_utf8(render_request("PUT", "/api/v1/vmm.shutdown", None)).unwrap();
    assert!(put.ends_with("Content-Length: 0\r\n\r\n"), "{put}");
}

#[test]
fn typed_requests_reach_the_server_as_firecracker_expects() {
    let (path, server) = serve(vec![vec![NO_CONTENT]; 5]);
    let client = client(&path);
    client.set_vm_state(VmState::Paused).unwrap();
    client
        .create_snapshot(&SnapshotCreateParams {
            snapshot_type: Default::default(),
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
        })
        .unwrap();
    client
        .patch_drive(&PartialDrive {
            drive_id: "rootfs".into(),
            path_on_host: Some("/new.img".into()),
            rate_limiter: None,
        })
        .unwrap();
    client.action(ActionType::SendCtrlAltDel).unwrap();
    client.shutdown().unwrap();

    let requests: Vec<String> = server
        .join()
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r).unwrap())
        .collect();
    let expected = [
        ("PATCH /vm HTTP/1.1\r\n", r#"{"state":"Paused"}"#),
        (
            "PUT /snapshot/create HTTP/1.1\r\n",
            r#"{"snapshot_type":"Full","snapshot_path":"/s","mem_file_path":"/m"}"#,
        ),
        (
            "PATCH /drives/rootfs HTTP/1.1\r\n",
            r#"{"drive_id":"rootfs","path_on_host":"/new.img","rate_limiter":null}"#,
        ),
        (
            "PUT /actions HTTP/1.1\r\n",
            r#"{"action_type":"SendCtrlAltDel"}"#,
        ),
        ("PUT /api/v1/vmm.shutdown HTTP/1.1\r\n", ""),
    ];
    for (request, (line, body)) in requests.iter().zip(expected) {
        assert!(request.starts_with(line), "{request}");
        assert!(request.ends_with(&format!("\r\n\r\n{body}")), "{request}");
    }
    assert_eq!(requests.len(), 5);
}

#[test]
fn json_answers_are_decoded_however_they_arrive() {
    let (path, server) = serve(vec![vec![
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Len",
        b"gth: 77\r\n\r\n{\"app_name\": \"hearth\", \"id\": \"vm\", ",
        b"\"state\": \"Paused\", \"vmm_version\": \"0.1.0\"}",
    ]]);
    let info = client(&path).instance_info().unwrap();
    assert_eq!(
        (info.id.as_str(), info.state),
        ("vm", InstanceState::Paused)
    );
    server.join().unwrap();

    // An answer that is not what the request returns is an error naming the request.
    let (path, server) = serve(vec![vec![
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n\"nope\"",
    ]]);
    let err = client(&path).vm_config().unwrap_err();
    assert!(
        matches!(&err, ClientError::Decode { request, .. } if request == "GET /vm/config"),
        "{err:?}"
    );
    server.join().unwrap();
}

#[test]
fn refusals_carry_the_fault_message() {
    let (path, server) = serve(vec![
        vec![b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
               Content-Length: 57\r\n\r\n{\"fault_message\": \"pause is not supported by this build\"}"],
        vec![b"HTTP/1.1 400 Bad Request\r\nContent-Length: 22\r\n\r\n{\"error\": \"too large\"}"],
        vec![b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 11\r\n\r\nVMM\n  gone\n"],
        vec![b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"],
    ]);
    let client = client(&path);
    let err = client.set_vm_state(VmState::Paused).unwrap_err();
    assert_eq!(
        err.fault_message(),
        Some("pause is not supported by this build")
    );
    assert_eq!(
        err.to_string(),
        "PATCH /vm was refused (400): pause is not supported by this build"
    );
    let err = client.action(ActionType::InstanceStart).unwrap_err();
    assert_eq!(err.fault_message(), Some("too large"));
    let err = client.shutdown().unwrap_err();
    assert!(
        matches!(&err, ClientError::Fault { status: 503, message, .. } if message == "VMM gone"),
        "{err:?}"
    );
    let err = client.instance_info().unwrap_err();
    assert_eq!(err.fault_message(), Some("Internal Server Error"));
    server.join().unwrap();
}

#[test]
fn bodies_are_framed_by_length_or_by_close() {
    // No Content-Length: the body runs to the end of the connection.
    let (path, server) = serve(vec![vec![
        b"HTTP/1.1 200 OK\r\n\r\n{\"firecracker_version\":",
        b" \"1.0\"}",
    ]]);
    let answer = client(&path).request("GET", "/version", None).unwrap();
    assert_eq!(answer.body, br#"{"firecracker_version": "1.0"}"#);
    assert_eq!(answer.header("CONTENT-LENGTH"), None);
    server.join().unwrap();

    // Two pipelined answers in one write, and an interim 100 first, are read one by one.
    let (path, server) = serve(vec![vec![
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}\
          HTTP/1.0 204 No Content\r\n\r\n",
    ]]);
    let mut conn = Connection::open(&path, Duration::from_secs(10)).unwrap();
    conn.send(&render_request("GET", "/", None)).unwrap();
    assert_eq!(conn.read_response().unwrap().status, 100);
    let second = conn.read_response().unwrap();
    assert_eq!((second.status, second.body.as_slice()), (200, &b"{}"[..]));
    let third = conn.read_response().unwrap();
    assert_eq!((third.version, third.status, third.body.len()), (0, 204, 0));
    assert!(conn.is_closed().unwrap());
    server.join().unwrap();

    // `request` skips the interim answer.
    let (path, server) = serve(vec![vec![b"HTTP/1.1 100 Continue\r\n\r\n", NO_CONTENT]]);
    client(&path).set_vm_state(VmState::Resumed).unwrap();
    server.join().unwrap();
}

#[test]
fn broken_answers_and_silence_are_errors() {
    let (path, server) = serve(vec![
        vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"a\""],
        vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"],
        vec![b"\x16\x03\x01 not http\r\n\r\n"],
        vec![b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n"],
        vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"],
        vec![b"HTTP/1.1 200 OK\r\nContent-"],
    ]);
    let client = client(&path);
    let mut errors = Vec::new();
    for _ in 0..6 {
        errors.push(transport(client.instance_info().unwrap_err()));
    }
    assert!(matches!(errors[0], ClientError::Closed), "{:?}", errors[0]);
    for (err, words) in errors[1..5].iter().zip([
        "Transfer-Encoding \"chunked\"",
        "malformed answer",
        "larger than",
        "conflicting Content-Length",
    ]) {
        assert!(
            matches!(err, ClientError::Malformed(_)) && err.to_string().contains(words),
            "{err:?} lacks {words}"
        );
    }
    assert!(matches!(errors[5], ClientError::Closed), "{:?}", errors[5]);
    server.join().unwrap();

    // A server that accepts and never answers: the client gives up after its timeout.
    let path = socket_path();
    let listener = UnixListener::bind(&path).unwrap();
    let started = Instant::now();
    let err = ApiClient::new(&path, Duration::from_millis(200))
        .instance_info()
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(transport(err), ClientError::Timeout(_)),
        "no timeout"
    );
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(5));
    drop(listener);
}

#[test]
fn errors_read_as_one_line_naming_what_failed() {
    let missing = socket_path();
    let err = client(&missing).instance_info().unwrap_err();
    let text = crate::error_chain(&err);
    assert!(
        text.starts_with(&format!(
            "cannot connect to the API socket \"{}\"",
            missing.display()
        )) && text.contains("No such file"),
        "{text}"
    );

    let (path, server) = serve(vec![vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{"]]);
    let err = client(&path).vm_config().unwrap_err();
    assert_eq!(
        crate::error_chain(&err),
        "GET /vm/config: the connection closed before a whole answer arrived"
    );
    assert!(!crate::error_chain(&err).contains('\n'));
    server.join().unwrap();
}
