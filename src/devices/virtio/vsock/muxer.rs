//! The host side of virtio-vsock, Firecracker's scheme over AF_UNIX: the listening socket
//! at `uds_path`, the `CONNECT <port>\n` handshake of host-initiated connections, the
//! `<uds_path>_<port>` sockets guest-initiated connections reach, and the map of live
//! connections keyed by (host port, guest port).
//!
//! The muxer knows nothing of queues: the device hands it each TX packet
//! ([`Muxer::handle_tx`]) and asks it for RX packets while it has RX buffers
//! ([`Muxer::next_rx`]). What the guest controls is bounded: at most [`MAX_CONNECTIONS`]
//! connections, at most one pending packet of each kind per connection, a bounded queue of
//! RSTs for packets that match no connection.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::EventSet;

use super::connection::{Connection, State, CONN_BUF_SIZE};
use super::packet::*;
use super::VSOCK_HOST_CID;
use crate::metrics::VsockMetrics;
use crate::uds::connect_nonblocking;

/// Most connections a guest can hold open.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections still sending their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Longest `CONNECT <port>\n` line.
const MAX_HANDSHAKE_LEN: usize = 32;
/// Most RSTs waiting for RX buffers; more are dropped (the guest times out instead).
const MAX_PENDING_RST: usize = 256;
/// Connections accepted per wake-up, so a flood of host connections cannot starve the
/// guest's queues.
const MAX_ACCEPTS_PER_EVENT: usize = 16;
/// The first host port of host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1024;

/// (host port, guest port).
pub type ConnKey = (u32, u32);

/// `<uds_path>_<port>`: the only path a guest-initiated connection to `port` may reach.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Parses `CONNECT <port>\n` (decimal port).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"CONNECT ")?.strip_suffix(b"\n")?;
    let text = std::str::from_utf8(rest).ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// Host streams that have not sent their whole `CONNECT` line yet.
    handshakes: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    connections: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Connections with something for the guest, in turn.
    rx_queue: VecDeque<ConnKey>,
    /// RSTs for packets that match no connection.
    rst_queue: VecDeque<VsockHeader>,
    next_local_port: u32,
    /// Closed host streams, kept open until the event loop has unwatched them.
    retired: Vec<UnixStream>,
    metrics: Arc<VsockMetrics>,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            handshakes: HashMap::new(),
            connections: HashMap::new(),
            by_fd: HashMap::new(),
            rx_queue: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            retired: Vec::new(),
            metrics: Arc::default(),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// The device was reset: every connection is gone on the guest's side.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.connections.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rx_queue.clear();
        self.rst_queue.clear();
    }

    /// The fds the event loop should watch and for what.
    pub fn watches(&self) -> HashMap<RawFd, EventSet> {
        let mut watches = HashMap::with_capacity(1 + self.handshakes.len() + self.by_fd.len());
        watches.insert(self.listener.as_raw_fd(), EventSet::IN);
        for fd in self.handshakes.keys() {
            watches.insert(*fd, EventSet::IN);
        }
        for (fd, key) in &self.by_fd {
            let conn = &self.connections[key];
            let mut set = EventSet::empty();
            if conn.wants_read() {
                set |= EventSet::IN;
            }
            if conn.wants_write() {
                set |= EventSet::OUT;
            }
            if !set.is_empty() || conn.wants_hang_up() {
                // An empty set still reports EPOLLHUP and EPOLLERR: a host waiting for
                // the guest's RESPONSE is watched for giving up, never for its data.
                watches.insert(*fd, set);
            }
        }
        watches
    }

    /// Closed host streams the event loop may now close, once it no longer watches them.
    pub fn take_retired(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.retired)
    }

    /// Something waits for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_queue.is_empty()
    }

    /// A host fd became ready.
    pub fn host_ready(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept();
        } else if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            let conn = self
                .connections
                .get_mut(&key)
                .expect("by_fd follows connections");
            if events.intersects(EventSet::OUT) {
                conn.flush();
            }
            if conn.state == State::LocalInit {
                // Watched for hang-up only: the host gave up before the guest answered.
                // Its stream is not read (bytes after the CONNECT line wait for the
                // RESPONSE); the RST tears down the guest's side and frees the slot.
                if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    conn.reset();
                }
            } else if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                conn.data_ready = true;
            }
            self.schedule(key);
        }
    }

    fn accept(&mut self) {
        for _ in 0..MAX_ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES
                        || self.connections.len() >= MAX_CONNECTIONS
                    {
                        log::warn!("virtio-vsock: too many connections, refusing one");
                        self.metrics.conns_refused.inc();
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("virtio-vsock: cannot make a host stream non-blocking: {e}");
                        continue;
                    }
                    self.handshakes
                        .insert(stream.as_raw_fd(), (stream, Vec::new()));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("virtio-vsock: cannot accept a host connection: {e}");
                    break;
                }
            }
        }
    }

    /// Reads the `CONNECT` line one byte at a time, so nothing after it is consumed.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some((stream, line)) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8];
        let port = loop {
            match stream.read(&mut byte) {
                Ok(1) => {
                    line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break parse_connect(line);
                    }
                    if line.len() >= MAX_HANDSHAKE_LEN {
                        break None;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // End of file or an error before a whole line.
                _ => break None,
            }
        };
        let (stream, line) = self.handshakes.remove(&fd).expect("looked up above");
        let Some(peer_port) = port else {
            log::debug!(
                "virtio-vsock: bad handshake from the host: {:?}",
                String::from_utf8_lossy(&line)
            );
            self.metrics.conns_refused.inc();
            self.retired.push(stream);
            return;
        };
        if self.connections.len() >= MAX_CONNECTIONS {
            self.metrics.conns_refused.inc();
            self.retired.push(stream);
            return;
        }
        self.metrics.conns_added.inc();
        let local_port = self.allocate_local_port(peer_port);
        let key = (local_port, peer_port);
        self.by_fd.insert(fd, key);
        self.connections.insert(key, Connection::local_init(stream));
        self.schedule(key);
    }

    /// A host port not yet used with `peer_port`, counting up from 1024.
    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        // At most MAX_CONNECTIONS ports are taken, so this ends within that many steps.
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.connections.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.get_mut(&key) {
            if !conn.queued && conn.has_outgoing() {
                conn.queued = true;
                self.rx_queue.push_back(key);
            }
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.remove(&key) {
            self.metrics.conns_removed.inc();
            self.by_fd.remove(&conn.stream.as_raw_fd());
            self.retired.push(conn.stream);
        }
    }

    /// A header from the host to the guest on connection `key`.
    fn header(&self, key: ConnKey, op: u16, flags: u32, fwd_cnt: u32) -> VsockHeader {
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt,
        }
    }

    /// Replies RST to a guest packet that matches no connection (never to an RST).
    fn reject(&mut self, packet: &VsockHeader) {
        if packet.op == OP_RST {
            return;
        }
        if self.rst_queue.len() >= MAX_PENDING_RST {
            log::debug!("virtio-vsock: RST queue full, dropping one");
            return;
        }
        let mut rst = self.header((packet.dst_port, packet.src_port), OP_RST, 0, 0);
        rst.buf_alloc = 0;
        self.rst_queue.push_back(rst);
    }

    /// The next packet for the guest, its payload in `buf` (whose length is the most the
    /// RX buffer takes). `None` when nothing is left.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(VsockHeader, usize)> {
        if let Some(rst) = self.rst_queue.pop_front() {
            return Some((rst, 0));
        }
        while let Some(key) = self.rx_queue.pop_front() {
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let Some(out) = conn.next_outgoing(buf) else {
                continue;
            };
            let fwd_cnt = conn.fwd_cnt();
            self.metrics.rx_bytes.add(out.len as u64);
            let header = self.header(key, out.op, out.flags, fwd_cnt);
            if out.op == OP_RST {
                self.remove(key);
            } else {
                self.schedule(key);
            }
            return Some((header, out.len));
        }
        None
    }

    /// A packet from the guest (already checked to be well formed by `packet.rs`).
    pub fn handle_tx(&mut self, header: &VsockHeader, payload: &[u8]) {
        if header.src_cid != self.guest_cid {
            log::debug!(
                "virtio-vsock: dropping a packet from CID {}",
                header.src_cid
            );
            return;
        }
        if header.dst_cid != VSOCK_HOST_CID || header.type_ != TYPE_STREAM {
            self.reject(header);
            return;
        }
        let key = (header.dst_port, header.src_port);
        if !self.connections.contains_key(&key) {
            if header.op == OP_REQUEST {
                self.guest_connect(header);
            } else {
                self.reject(header);
            }
            return;
        }
        let conn = self.connections.get_mut(&key).expect("checked above");
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        match (header.op, conn.state) {
            (OP_RST, _) => {
                self.remove(key);
                return;
            }
            (OP_RESPONSE, State::LocalInit) => conn.established(key.0),
            (OP_RW, State::Established) => {
                self.metrics.tx_bytes.add(payload.len() as u64);
                conn.guest_data(payload)
            }
            (OP_SHUTDOWN, State::Established) => conn.guest_shutdown(header.flags),
            (OP_CREDIT_REQUEST, State::Established) => conn.request_credit_update(),
            // The header's credit fields were all it carried.
            (OP_CREDIT_UPDATE, State::Established) => {}
            // A REQUEST on a live connection, a RESPONSE out of turn, data before the
            // RESPONSE, an unknown op: the connection is broken.
            _ => conn.reset(),
        }
        self.schedule(key);
    }

    /// A guest REQUEST to host port P: connect to `<uds_path>_<P>` or refuse.
    fn guest_connect(&mut self, header: &VsockHeader) {
        if self.connections.len() >= MAX_CONNECTIONS {
            log::debug!("virtio-vsock: connection limit reached");
            self.metrics.conns_refused.inc();
            self.reject(header);
            return;
        }
        let path = port_path(&self.uds_path, header.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                self.metrics.conns_added.inc();
                let key = (header.dst_port, header.src_port);
                self.by_fd.insert(stream.as_raw_fd(), key);
                self.connections.insert(
                    key,
                    Connection::peer_init(stream, header.buf_alloc, header.fwd_cnt),
                );
                self.schedule(key);
            }
            Err(e) => {
                log::debug!(
                    "virtio-vsock: guest connection to \"{}\" refused: {e}",
                    path.display()
                );
                self.metrics.conns_refused.inc();
                self.reject(header);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
