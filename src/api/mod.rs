//! hearth's control plane: Firecracker's HTTP API on a Unix socket.
//!
//! One server thread owns the socket and its connections. It frames requests
//! (`http.rs`), turns each into a [`VmmAction`] (`parse.rs`), sends it to the VMM thread
//! over a channel, wakes that thread through an eventfd, waits for the answer and writes
//! the response. The VMM thread handles every action in one place (`controller.rs`):
//! a small loop before `InstanceStart`, then the VMM's own event loop. So requests are
//! handled one at a time, in order, as in Firecracker.

pub mod action;
pub mod client;
pub mod controller;
pub mod http;
pub mod models;
pub mod parse;
pub mod remote;
pub mod resources;
pub mod restore;
pub mod shape;
pub mod snapshot;

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use action::{ActionResult, ApiError, VmmAction, VmmData};

use http::{Framing, HttpRequest};

/// Connections served at once; further clients wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// Bytes read from a connection at a time.
const READ_CHUNK: usize = 4096;
/// After the last answer on a connection, what the client still sends is read and
/// dropped (up to this much) until it closes: closing a Unix socket with unread input
/// resets it, and the client would lose that answer.
const LINGER_LIMIT: usize = 1 << 20;
/// How long a stopping server may spend writing the answers it still holds.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on the API socket \"{path}\"")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API socket \"{0}\" already exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot start the API server")]
    Setup(#[source] std::io::Error),
}

/// One action on its way to the VMM thread, with where its answer goes.
pub struct ApiRequest {
    pub action: VmmAction,
    pub reply: mpsc::Sender<ActionResult>,
}

/// The VMM thread's end of the API: requests arrive on `requests`; `eventfd` becomes
/// readable when some are waiting.
pub struct ApiEndpoint {
    pub requests: mpsc::Receiver<ApiRequest>,
    pub eventfd: EventFd,
}

impl ApiEndpoint {
    /// The next waiting request, if any.
    pub fn try_next(&self) -> Option<ApiRequest> {
        self.requests.try_recv().ok()
    }

    /// An event-loop subscriber that only drains the eventfd, so that the loop wakes up
    /// and serves requests between events.
    pub fn waker(&self) -> Result<EventfdWaker, std::io::Error> {
        Ok(EventfdWaker(self.eventfd.try_clone()?))
    }
}

/// Wakes an event loop when an eventfd is written.
pub struct EventfdWaker(EventFd);

impl MutEventSubscriber for EventfdWaker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the API eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Sends actions to the VMM thread and waits for their answers: what the server thread
/// does for each HTTP request, and what `hearth restore` does without HTTP. Every sender
/// feeds the same controller, so both are answered alike, one request at a time.
#[derive(Clone)]
pub struct ActionSender {
    sender: mpsc::Sender<ApiRequest>,
    wake: Arc<EventFd>,
}

impl ActionSender {
    /// Hands `action` to the VMM thread and waits for its answer ([`ApiError::VmmGone`]
    /// once the VMM has stopped serving).
    pub fn dispatch(&self, action: VmmAction) -> ActionResult {
        let (reply, answer) = mpsc::channel();
        self.sender
            .send(ApiRequest { action, reply })
            .map_err(|_| ApiError::VmmGone)?;
        if let Err(e) = self.wake.write(1) {
            log::error!("API: cannot wake the VMM: {e}");
        }
        answer.recv().map_err(|_| ApiError::VmmGone)?
    }
}

/// A new request channel: its sending end, and the VMM thread's end.
pub fn channel() -> std::io::Result<(ActionSender, ApiEndpoint)> {
    let eventfd = EventFd::new(EFD_NONBLOCK)?;
    let wake = Arc::new(eventfd.try_clone()?);
    let (sender, requests) = mpsc::channel();
    Ok((
        ActionSender { sender, wake },
        ApiEndpoint { requests, eventfd },
    ))
}

/// The API socket: removed when dropped, so that it disappears whenever hearth stops.
/// Dropping it also stops the server thread once it has written the answers it holds
/// (bounded by [`FLUSH_TIMEOUT`]): the VMM may be about to exit right after answering,
/// as after `PUT /api/v1/vmm.shutdown` or a `SendCtrlAltDel` that ends the guest.
pub struct ApiSocket {
    path: PathBuf,
    stop: Option<EventFd>,
    stopped: Option<mpsc::Receiver<()>>,
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        // First, so that no new client connects to a VMM that is going away.
        let _ = std::fs::remove_file(&self.path);
        if let Some(stop) = &self.stop {
            let _ = stop.write(1);
        }
        if let Some(stopped) = &self.stopped {
            // The server thread drops its sender when it ends.
            let _ = stopped.recv_timeout(FLUSH_TIMEOUT * 2);
        }
    }
}

/// Binds the API socket at `path` (replacing a stale socket, never another file) and
/// starts the server thread. Requests may be sent as soon as this returns.
pub fn start_server(path: &Path, max_body: usize) -> Result<(ApiSocket, ApiEndpoint), ServerError> {
    let (sender, endpoint) = channel().map_err(ServerError::Setup)?;
    let socket = serve_http(path, max_body, sender)?;
    Ok((socket, endpoint))
}

/// Binds the API socket at `path` and starts a server thread that sends each request's
/// action through `sender`.
pub fn serve_http(
    path: &Path,
    max_body: usize,
    sender: ActionSender,
) -> Result<ApiSocket, ServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = crate::uds::bind(path).map_err(|source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let mut socket = ApiSocket {
        path: path.to_path_buf(),
        stop: None,
        stopped: None,
    };
    listener.set_nonblocking(true).map_err(ServerError::Setup)?;
    let stop = EventFd::new(EFD_NONBLOCK).map_err(ServerError::Setup)?;
    let server_stop = stop.try_clone().map_err(ServerError::Setup)?;
    let (stopped_sender, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Api);
            Server::new(listener, sender, server_stop, max_body).run();
            drop(stopped_sender);
        })
        .map_err(ServerError::Setup)?;
    socket.stop = Some(stop);
    socket.stopped = Some(stopped);
    log::info!("API server listening on {}", path.display());
    Ok(socket)
}

/// One client connection.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    /// Answers not yet written. One contiguous buffer, so that an answer leaves in one
    /// write: clients that stop reading at the first short read (firecracker-rs-sdk)
    /// would otherwise see half of it.
    output: Vec<u8>,
    /// `100 Continue` was sent for the request being received.
    continued: bool,
    /// Close once `output` is written.
    closing: bool,
    /// The last answer is written: input is dropped until the client closes.
    lingering: Option<usize>,
}

struct Server {
    listener: UnixListener,
    sender: ActionSender,
    /// Readable once the socket is dropped: write what is pending and end.
    stop: EventFd,
    max_body: usize,
    connections: Vec<Connection>,
}

/// The fds polled before the connections': `stop`, then the listener.
const FIRST_CONNECTION_FD: usize = 2;

impl Server {
    fn new(listener: UnixListener, sender: ActionSender, stop: EventFd, max_body: usize) -> Self {
        Self {
            listener,
            sender,
            stop,
            max_body,
            connections: Vec::new(),
        }
    }

    fn run(mut self) {
        loop {
            let mut fds = Vec::with_capacity(self.connections.len() + FIRST_CONNECTION_FD);
            let listening = self.connections.len() < MAX_CONNECTIONS;
            fds.push(libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: if listening { libc::POLLIN } else { 0 },
                revents: 0,
            });
            for conn in &self.connections {
                // A connection with an answer to write is not read until it is written:
                // requests are answered in order, and a client that does not read its
                // answers cannot make the server buffer without bound.
                let events = if conn.output.is_empty() || conn.lingering.is_some() {
                    libc::POLLIN
                } else {
                    libc::POLLOUT
                };
                fds.push(libc::pollfd {
                    fd: conn.stream.as_fd().as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == ErrorKind::Interrupted {
                    continue;
                }
                log::error!("API server: poll failed: {err}");
                return;
            }
            // Checked first: once the VMM is going away, no new request is taken.
            if fds[0].revents != 0 {
                self.flush();
                return;
            }
            // Serve existing connections first; `fds[i + FIRST_CONNECTION_FD]` belongs to
            // connection i.
            let mut keep = Vec::with_capacity(self.connections.len());
            let connections = std::mem::take(&mut self.connections);
            for (conn, fd) in connections.into_iter().zip(&fds[FIRST_CONNECTION_FD..]) {
                if fd.revents == 0 {
                    keep.push(conn);
                } else if let Some(conn) = self.serve(conn, fd.revents) {
                    keep.push(conn);
                }
            }
            self.connections = keep;
            if fds[1].revents != 0 {
                self.accept();
            }
        }
    }

    /// Writes the answers still held for clients, within [`FLUSH_TIMEOUT`] in all.
    fn flush(&mut self) {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        for conn in &mut self.connections {
            if conn.output.is_empty() || conn.lingering.is_some() {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("API server: answers left unwritten at shutdown");
                return;
            }
            let written = conn
                .stream
                .set_nonblocking(false)
                .and_then(|()| conn.stream.set_write_timeout(Some(left)))
                .and_then(|()| conn.stream.write_all(&conn.output));
            if let Err(e) = written {
                log::info!("API server: an answer was not delivered at shutdown: {e}");
            }
        }
    }

    fn accept(&mut self) {
        while self.connections.len() < MAX_CONNECTIONS {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("API server: cannot set up a connection: {e}");
                        continue;
                    }
                    self.connections.push(Connection {
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        continued: false,
                        closing: false,
                        lingering: None,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("API server: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads, answers and writes what a connection has ready; `None` when it is done.
    fn serve(&mut self, mut conn: Connection, revents: libc::c_short) -> Option<Connection> {
        if let Some(dropped) = conn.lingering.as_mut() {
            let mut chunk = [0u8; READ_CHUNK];
            return match conn.stream.read(&mut chunk) {
                Ok(n) if n > 0 && *dropped + n <= LINGER_LIMIT => {
                    *dropped += n;
                    Some(conn)
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    Some(conn)
                }
                _ => None,
            };
        }
        if revents & libc::POLLIN != 0 {
            let mut chunk = [0u8; READ_CHUNK];
            match conn.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => return None,
            }
        } else if revents & libc::POLLOUT == 0 {
            // POLLERR, POLLHUP or POLLNVAL alone: the peer is gone.
            return None;
        }
        loop {
            self.answer_requests(&mut conn);
            if conn.output.is_empty() {
                break;
            }
            while !conn.output.is_empty() {
                match conn.stream.write(&conn.output) {
                    Ok(0) => return None,
                    Ok(n) => {
                        conn.output.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(conn),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return None,
                }
            }
            if conn.closing {
                break;
            }
        }
        if conn.closing {
            // The client reads the end of the stream after the last answer.
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            conn.input.clear();
            conn.lingering = Some(0);
        }
        Some(conn)
    }

    /// Answers every whole request in the connection's input, in order.
    fn answer_requests(&mut self, conn: &mut Connection) {
        while !conn.closing && conn.output.is_empty() {
            match http::next_request(&conn.input, self.max_body) {
                Ok(Framing::Incomplete {
                    awaits_body_continue,
                }) => {
                    if awaits_body_continue && !conn.continued {
                        conn.continued = true;
                        conn.output.extend_from_slice(http::CONTINUE);
                    }
                    return;
                }
                Ok(Framing::Request { request, consumed }) => {
                    conn.input.drain(..consumed);
                    conn.continued = false;
                    conn.closing = request.close;
                    let response = self.answer(&request);
                    conn.output.extend(response);
                }
                Err(e) => {
                    crate::metrics::METRICS.api.requests_malformed.inc();
                    log::info!("API: refused a request: {e}");
                    conn.input.clear();
                    conn.closing = true;
                    conn.output.extend(error_response(&e, true));
                }
            }
        }
    }

    fn answer(&mut self, request: &HttpRequest) -> Vec<u8> {
        let result = parse::parse_request(&request.method, &request.path, request.body.as_deref())
            .and_then(|action| self.dispatch(action));
        let status = match &result {
            Ok(VmmData::Empty) => 204,
            Ok(_) => 200,
            Err(e) => e.status(),
        };
        crate::metrics::METRICS.api.record_status(status);
        log::info!("API: {} {} -> {status}", request.method, request.path);
        match result {
            Ok(data) => success_response(&data, request.close),
            Err(e) => {
                log::info!("API: {e}");
                error_response(&e, request.close)
            }
        }
    }

    /// Hands an action to the VMM thread and waits for its answer.
    fn dispatch(&mut self, action: VmmAction) -> ActionResult {
        self.sender.dispatch(action)
    }
}

fn success_response(data: &VmmData, close: bool) -> Vec<u8> {
    let json = match data {
        VmmData::Empty => return http::render_response(204, None, close),
        VmmData::InstanceInfo(info) => serde_json::to_string(info),
        VmmData::Version(version) => serde_json::to_string(&models::FirecrackerVersion {
            firecracker_version: version.clone(),
        }),
        VmmData::MachineConfig(config) => serde_json::to_string(config),
        VmmData::FullVmConfig(config) => serde_json::to_string(config),
        VmmData::Metrics(json) => Ok(json.clone()),
        VmmData::Balloon(balloon) => serde_json::to_string(balloon),
        VmmData::BalloonStats(stats) => serde_json::to_string(stats),
    };
    match json {
        Ok(body) => http::render_response(200, Some(&body), close),
        Err(e) => error_response(
            &ApiError::Runtime(format!("cannot encode the answer: {e}")),
            close,
        ),
    }
}

/// `{"fault_message": "..."}` with the error's status.
pub fn error_response(err: &ApiError, close: bool) -> Vec<u8> {
    let fault = models::Fault {
        fault_message: err.to_string(),
    };
    let body = serde_json::to_string(&fault)
        .unwrap_or_else(|_| "{\"fault_message\":\"error\"}".to_string());
    http::render_response(err.status(), Some(&body), close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_socket_delivers_the_answers_already_given() {
        let path = std::env::temp_dir().join(format!("hearth-api-flush-{}", std::process::id()));
        let (socket, endpoint) = start_server(&path, http::DEFAULT_MAX_BODY).unwrap();
        let mut client = crate::uds::connect(&path).unwrap();
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();

        // The VMM thread answers and goes away at once, as after a shutdown request.
        let deadline = Instant::now() + Duration::from_secs(10);
        let request = loop {
            if let Some(request) = endpoint.try_next() {
                break request;
            }
            assert!(Instant::now() < deadline, "the request never arrived");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(request.action, VmmAction::GetVersion);
        request
            .reply
            .send(Ok(VmmData::Version("9.9".into())))
            .unwrap();
        drop(endpoint);
        drop(socket);
        assert!(!path.exists(), "the socket file is removed");

        // Everything is written by the time the drop returns, and the server is gone.
        client.set_nonblocking(true).unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with(r#"{"firecracker_version":"9.9"}"#),
            "{answer}"
        );
    }
}
