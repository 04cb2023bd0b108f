//! Clients for hearth's API socket in the tests: curl, hearth's own client
//! (`hearth::api::client`), and raw requests on its connections for what clients hide
//! (keep-alive, pipelining, HTTP/1.0, malformed requests, exact headers).

use std::path::Path;
use std::process::Command;

pub use hearth::api::client::Response;
use hearth::api::client::{ApiClient, Connection};
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
        super::announce_skip(super::Need::Tools, "curl is not installed");
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

/// A raw HTTP/1.x connection, for what clients hide: hearth's own client connection
/// (`hearth::api::client::Connection`) that fails the test on any error.
pub struct Conn(Connection);

/// The JSON body of an answer.
pub trait JsonBody {
    fn json(&self) -> Value;
}

impl JsonBody for Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not a JSON body ({e}): {self:?}"))
    }
}

impl Conn {
    pub fn open(sock: &Path) -> Conn {
        Conn(Connection::open(sock, RUN_TIMEOUT).expect("connect to the API socket"))
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.0.send(bytes).expect("write a request");
    }

    /// The next response: its head, and as many body bytes as its Content-Length says.
    pub fn response(&mut self) -> Response {
        self.0
            .read_response()
            .unwrap_or_else(|e| panic!("no response: {}", hearth::error_chain(&e)))
    }

    /// Whether the server closed the connection (after everything was read).
    pub fn is_closed(&mut self) -> bool {
        self.0.is_closed().expect("read the end of the connection")
    }
}

/// One request with hearth's client (a fresh connection); the status and the JSON
/// answer (`null` for none). An empty `body` sends none.
pub fn call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let body = (!body.is_empty()).then_some(body.as_bytes());
    let response = ApiClient::new(sock, RUN_TIMEOUT)
        .request(method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {}", hearth::error_chain(&e)));
    let json = if response.body.is_empty() {
        Value::Null
    } else {
        response.json()
    };
    (response.status, json)
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
