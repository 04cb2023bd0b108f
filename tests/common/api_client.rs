//! Clients for hearth's API socket in the tests: curl, and a raw HTTP/1.x connection for
//! what clients hide (keep-alive, pipelining, HTTP/1.0, exact headers).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::RUN_TIMEOUT;

/// Whether curl is there; a missing curl fails in CI (which installs it) and skips
/// elsewhere.
pub fn curl_available() -> bool {
    let found = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "curl is missing; .ci/run installs it"
        );
        super::announce_skip("curl is not installed");
    }
    found
}

/// One request with curl; the status and the JSON answer (`null` for none).
pub fn curl(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.arg("--unix-socket")
        .arg(sock)
        .args(["-sS", "-X", method, "-w", "\n%{http_code}"])
        .args(["-H", "Accept: application/json"]);
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d"])
            .arg(body.to_string());
    }
    cmd.arg(format!("http://localhost{path}"));
    let out = cmd.output().expect("run curl");
    assert!(out.status.success(), "curl failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("curl prints text");
    let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    };
    (code.parse().expect("a status code"), json)
}

/// A raw HTTP/1.x connection, for what clients hide.
pub struct Conn {
    stream: UnixStream,
    buffer: Vec<u8>,
}

pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

impl Conn {
    pub fn open(sock: &Path) -> Conn {
        let stream = UnixStream::connect(sock).expect("connect to the API socket");
        stream
            .set_read_timeout(Some(RUN_TIMEOUT))
            .expect("set a read timeout");
        Conn {
            stream,
            buffer: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write a request");
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).expect("read a response");
        self.buffer.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next response: its head, and as many body bytes as its Content-Length says.
    pub fn response(&mut self) -> Response {
        let head_end = loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert_ne!(self.fill(), 0, "the connection closed before a response");
        };
        let head = String::from_utf8(self.buffer[..head_end].to_vec()).expect("text head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let mut response = Response {
            status,
            head,
            body: Vec::new(),
        };
        let length: usize = response
            .header("content-length")
            .map_or(0, |l| l.parse().expect("a numeric Content-Length"));
        while self.buffer.len() < head_end + length {
            assert_ne!(self.fill(), 0, "the connection closed inside a body");
        }
        response.body = self.buffer[head_end..head_end + length].to_vec();
        self.buffer.drain(..head_end + length);
        response
    }

    /// Whether the server closed the connection (after everything was read).
    pub fn is_closed(&mut self) -> bool {
        self.buffer.is_empty() && self.fill() == 0
    }
}

/// A raw request with an optional JSON body.
pub fn request(method: &str, path: &str, version: &str, body: Option<&str>) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/{version}\r\n");
    if let Some(body) = body {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        text.push_str("\r\n");
    }
    text.into_bytes()
}
