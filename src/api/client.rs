//! A client of hearth's API (or any Firecracker-style API) on a Unix socket: HTTP/1.1
//! requests with JSON bodies, answers framed by `Content-Length` (their heads parsed by
//! `httparse`), each awaited for at most a timeout. [`Connection`] is the HTTP layer,
//! which tests also drive by hand; [`ApiClient`] sends one typed request per connection
//! and turns an answer outside 2xx into [`ClientError::Fault`] with Firecracker's
//! `fault_message`. `hearth remote` is built on it.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::models::{
    ActionType, FullVmConfig, InstanceActionInfo, InstanceInfo, PartialDrive, SnapshotCreateParams,
    SnapshotLoadParams, Vm, VmState,
};
use super::parse::SHUTDOWN_PATH;

/// How long `hearth remote` waits for an answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer head accepted (the server's own limit for requests).
const MAX_HEAD: usize = 16 << 10;
/// Most headers an answer may carry.
const MAX_HEADERS: usize = 32;
/// Largest answer body accepted: far more than any answer of the API (`GET /vm/config`
/// is a few KiB), small enough that a confused server cannot exhaust memory.
const MAX_BODY: usize = 8 << 20;
/// Longest fault message taken from a body that is not Firecracker's JSON.
const MAX_PLAIN_FAULT: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket \"{path}\"")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send the request")]
    Send(#[source] std::io::Error),
    #[error("cannot read the answer")]
    Receive(#[source] std::io::Error),
    #[error("no answer within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("the connection closed before a whole answer arrived")]
    Closed,
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// A transport failure, with the request it happened to.
    #[error("{request}")]
    Request {
        request: String,
        #[source]
        source: Box<ClientError>,
    },
    /// The server answered outside 2xx.
    #[error("{request} was refused ({status}): {message}")]
    Fault {
        request: String,
        status: u16,
        message: String,
    },
    #[error("cannot encode the body of {request}")]
    Encode {
        request: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected answer to {request}: {reason}")]
    Decode { request: String, reason: String },
}

impl ClientError {
    /// Firecracker's `fault_message`, when the server refused the request.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            Self::Fault { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// One answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The minor HTTP version of the status line (`1` for HTTP/1.1).
    pub version: u8,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Why the server refused: Firecracker's `fault_message` (or the `error` key its
    /// server uses for some framing errors), else the body as text, else the reason
    /// phrase. One line.
    pub fn fault_message(&self) -> String {
        if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(&self.body) {
            for key in ["fault_message", "error"] {
                if let Some(serde_json::Value::String(message)) = fields.get(key) {
                    return one_line(message);
                }
            }
        }
        let text = String::from_utf8_lossy(&self.body);
        let text = one_line(text.trim());
        if !text.is_empty() {
            return text.chars().take(MAX_PLAIN_FAULT).collect();
        }
        if self.reason.is_empty() {
            format!("HTTP status {}", self.status)
        } else {
            self.reason.clone()
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A request as sent: `Host`, `Accept`, and for a body `Content-Type: application/json`.
/// A PUT, PATCH or POST without a body says `Content-Length: 0`.
pub fn render_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    match body {
        Some(body) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )),
        None if matches!(method, "PUT" | "PATCH" | "POST") => {
            head.push_str("Content-Length: 0\r\n")
        }
        None => {}
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

/// One HTTP/1.x connection to a Unix socket. Bytes received after an answer are kept for
/// the next one, so pipelined answers can be read one by one.
pub struct Connection {
    stream: UnixStream,
    buffer: Vec<u8>,
    timeout: Duration,
}

impl Connection {
    /// Connects to the socket at `path` (of any length, see `crate::uds`). Each answer
    /// and each send may take up to `timeout`.
    pub fn open(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = crate::uds::connect(path).map_err(connect_error)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(connect_error)?;
        Ok(Self {
            stream,
            buffer: Vec::new(),
            timeout,
        })
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout(self.timeout),
            _ => ClientError::Send(e),
        })
    }

    /// Sends one request and returns its final answer (interim 1xx answers skipped).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        self.send(&render_request(method, path, body))?;
        loop {
            let response = self.read_response()?;
            if !(100..200).contains(&response.status) {
                return Ok(response);
            }
        }
    }

    /// The next answer on the connection, interim ones (`100 Continue`) included. Its
    /// body is `Content-Length` bytes; none for 1xx, 204 and 304; without a length, what
    /// comes until the server closes the connection.
    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let (head_len, mut response, length) = loop {
            if let Some(head) = parse_head(&self.buffer)? {
                break head;
            }
            if self.fill(deadline)? == 0 {
                return Err(ClientError::Closed);
            }
        };
        let end = match length {
            BodyLength::Exactly(length) => {
                while self.buffer.len() < head_len + length {
                    if self.fill(deadline)? == 0 {
                        return Err(ClientError::Closed);
                    }
                }
                head_len + length
            }
            BodyLength::UntilClose => {
                while self.fill(deadline)? > 0 {
                    if self.buffer.len() - head_len > MAX_BODY {
                        return Err(too_large());
                    }
                }
                self.buffer.len()
            }
        };
        response.body = self.buffer[head_len..end].to_vec();
        self.buffer.drain(..end);
        Ok(response)
    }

    /// Whether the server has closed the connection, with nothing left unread. Waits
    /// for up to the timeout if the server sends nothing and keeps it open.
    pub fn is_closed(&mut self) -> Result<bool, ClientError> {
        if !self.buffer.is_empty() {
            return Ok(false);
        }
        let deadline = Instant::now() + self.timeout;
        Ok(self.fill(deadline)? == 0)
    }

    /// Reads what arrives before `deadline` into the buffer; 0 at the end of the stream.
    fn fill(&mut self, deadline: Instant) -> Result<usize, ClientError> {
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(self.timeout));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(ClientError::Receive)?;
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buffer.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout(self.timeout))
                }
                Err(e) => return Err(ClientError::Receive(e)),
            }
        }
    }
}

enum BodyLength {
    Exactly(usize),
    UntilClose,
}

fn too_large() -> ClientError {
    ClientError::Malformed(format!("the body is larger than {MAX_BODY} bytes"))
}

/// The answer head at the start of `buf`, once it is complete: its length, the answer
/// without its body, and how the body is delimited.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Response, BodyLength)>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) => {
            return Err(ClientError::Malformed(format!(
                "the head is longer than {MAX_HEAD} bytes"
            )))
        }
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = parsed.code.unwrap_or_default();
    let mut response = Response {
        version: parsed.version.unwrap_or_default(),
        status,
        reason: parsed.reason.unwrap_or_default().to_string(),
        headers: Vec::with_capacity(parsed.headers.len()),
        body: Vec::new(),
    };
    let mut content_length = None;
    for header in parsed.headers.iter() {
        let value = String::from_utf8_lossy(header.value).trim().to_string();
        if header.name.eq_ignore_ascii_case("content-length") {
            let length: usize = value.parse().map_err(|_| {
                ClientError::Malformed(format!("invalid Content-Length \"{value}\""))
            })?;
            if content_length.is_some_and(|l| l != length) {
                return Err(ClientError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            content_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(ClientError::Malformed(format!(
                "Transfer-Encoding \"{value}\" is not supported"
            )));
        }
        response.headers.push((header.name.to_string(), value));
    }
    let length = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyLength::Exactly(0)
    } else {
        match content_length {
            Some(length) if length > MAX_BODY => return Err(too_large()),
            Some(length) => BodyLength::Exactly(length),
            None => BodyLength::UntilClose,
        }
    };
    Ok(Some((head_len, response, length)))
}

/// Typed requests to one VMM's API socket, each on a fresh connection.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request and its final answer, whatever its status.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let mut conn = Connection::open(&self.socket, self.timeout)?;
        conn.request(method, path, body)
            .map_err(|source| ClientError::Request {
                request: format!("{method} {path}"),
                source: Box::new(source),
            })
    }

    /// One request with an optional JSON body; the body of a 2xx answer, or the fault.
    pub fn call<B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<Vec<u8>, ClientError> {
        let request = || format!("{method} {path}");
        let body =
            body.map(serde_json::to_vec)
                .transpose()
                .map_err(|source| ClientError::Encode {
                    request: request(),
                    source,
                })?;
        let response = self.request(method, path, body.as_deref())?;
        if !response.is_success() {
            return Err(ClientError::Fault {
                request: request(),
                status: response.status,
                message: response.fault_message(),
            });
        }
        Ok(response.body)
    }

    /// `GET path`, its JSON answer decoded.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.call::<()>("GET", path, None)?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            request: format!("GET {path}"),
            reason: e.to_string(),
        })
    }

    pub fn put<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        self.call("PUT", path, Some(body)).map(drop)
    }

    pub fn patch<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        self.call("PATCH", path, Some(body)).map(drop)
    }

    /// `GET /`.
    pub fn instance_info(&self) -> Result<InstanceInfo, ClientError> {
        self.get("/")
    }

    /// `GET /vm/config`.
    pub fn vm_config(&self) -> Result<FullVmConfig, ClientError> {
        self.get("/vm/config")
    }

    /// `PATCH /vm`: pause or resume the microVM.
    pub fn set_vm_state(&self, state: VmState) -> Result<(), ClientError> {
        self.patch("/vm", &Vm { state })
    }

    /// `PUT /snapshot/create`.
    pub fn create_snapshot(&self, params: &SnapshotCreateParams) -> Result<(), ClientError> {
        self.put("/snapshot/create", params)
    }

    /// `PUT /snapshot/load`.
    pub fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), ClientError> {
        self.put("/snapshot/load", params)
    }

    /// `PATCH /drives/{drive_id}`.
    pub fn patch_drive(&self, drive: &PartialDrive) -> Result<(), ClientError> {
        self.patch(&format!("/drives/{}", drive.drive_id), drive)
    }

    /// `PUT /actions` with `action_type`.
    pub fn action(&self, action_type: ActionType) -> Result<(), ClientError> {
        self.put("/actions", &InstanceActionInfo { action_type })
    }

    /// `PUT /api/v1/vmm.shutdown`, hearth's extension: the VMM ends once it has answered.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.call::<()>("PUT", SHUTDOWN_PATH, None).map(drop)
    }
}

#[cfg(test)]
mod tests;
