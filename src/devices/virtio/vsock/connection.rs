//! One vsock stream between a guest port and a host Unix stream: its state, the credit
//! flow control of virtio 1.2 5.10.6.3 both ways, and the non-blocking host I/O.
//!
//! A connection never blocks: bytes the host cannot take yet wait in `to_host` (at most
//! the [`CONN_BUF_SIZE`] we advertise, which the guest must respect), and bytes are read
//! from the host only when the guest has credit for them and an RX buffer to take them.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::{OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN};
use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer we advertise to the guest (`buf_alloc`) for each connection.
pub const CONN_BUF_SIZE: u32 = 256 << 10;
/// Bytes forwarded to the host since the guest last heard our `fwd_cnt` that trigger an
/// unsolicited CREDIT_UPDATE. Any value up to `CONN_BUF_SIZE` avoids a stall: a guest out
/// of credit has `CONN_BUF_SIZE` bytes in flight, all of which get forwarded.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or about to be), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

/// What a connection wants to tell the guest next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub op: u16,
    pub flags: u32,
    /// Payload bytes put at the start of the caller's buffer (OP_RW only).
    pub len: usize,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// Bytes for the host stream; the first `uncounted` are ours ("OK <port>\n"), not the
    /// guest's, so they do not count towards `fwd_cnt`.
    to_host: VecDeque<u8>,
    uncounted: usize,
    /// Guest bytes written to the host stream (advertised in every header).
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest saw last.
    last_fwd_cnt_sent: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The host stream reached end-of-file.
    host_eof: bool,
    host_write_shut: bool,
    /// The host stream is (or may be) readable and we have not read it yet.
    pub data_ready: bool,
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    send_shutdown: u32,
    send_rst: bool,
    /// In the muxer's RX queue.
    pub queued: bool,
}

impl Connection {
    /// A host-initiated connection: the REQUEST to the guest is pending.
    pub fn local_init(stream: UnixStream) -> Self {
        let mut conn = Self::new(stream, State::LocalInit);
        conn.send_request = true;
        conn
    }

    /// A guest-initiated connection the host accepted: the RESPONSE is pending.
    pub fn peer_init(stream: UnixStream, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        let mut conn = Self::new(stream, State::Established);
        conn.send_response = true;
        conn.peer_buf_alloc = peer_buf_alloc;
        conn.peer_fwd_cnt = peer_fwd_cnt;
        conn
    }

    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            to_host: VecDeque::new(),
            uncounted: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            peer_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
            data_ready: false,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_shutdown: 0,
            send_rst: false,
            queued: false,
        }
    }

    /// Our `fwd_cnt`, for the header of a packet to the guest.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }

    /// How many more bytes the guest can take: its `buf_alloc` minus what is in flight.
    /// A guest reporting more forwarded than sent gets nothing.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Something for the guest is waiting.
    pub fn has_outgoing(&self) -> bool {
        self.send_rst
            || self.send_request
            || self.send_response
            || self.send_credit_update
            || self.send_shutdown != 0
            || (self.data_ready && self.can_send_data())
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// The epoll interest the host stream needs: readable when data could go to the guest
    /// and it is not already known to be readable; writable while bytes wait for the host.
    pub fn wants_read(&self) -> bool {
        !self.send_rst && !self.data_ready && self.can_send_data()
    }

    pub fn wants_write(&self) -> bool {
        !self.send_rst && !self.to_host.is_empty()
    }

    /// Waiting for the guest's RESPONSE: the host stream is watched, with no interest,
    /// for the hang-up and error epoll always reports, so a host that gives up frees the
    /// connection. Not EPOLLRDHUP: a host that only shuts down its writing side may still
    /// read the `OK` line and the guest's data.
    pub fn wants_hang_up(&self) -> bool {
        !self.send_rst && self.state == State::LocalInit
    }

    /// True once the connection is to be reset; it goes away after the RST is sent.
    #[cfg(test)]
    pub fn is_resetting(&self) -> bool {
        self.send_rst
    }

    pub fn reset(&mut self) {
        self.send_rst = true;
    }

    pub fn request_credit_update(&mut self) {
        self.send_credit_update = true;
    }

    /// The guest's RESPONSE to our REQUEST: tell the host which port it got.
    pub fn established(&mut self, local_port: u32) {
        self.state = State::Established;
        let line = format!("OK {local_port}\n");
        self.uncounted += line.len();
        self.to_host.extend(line.as_bytes());
        self.flush();
    }

    /// OP_RW from the guest: queue `payload` for the host and write what it takes. A guest
    /// that overruns the credit we gave it, or sends after its SHUTDOWN_SEND, is reset.
    pub fn guest_data(&mut self, payload: &[u8]) {
        let buffered = self.to_host.len() - self.uncounted;
        if self.state != State::Established
            || self.peer_shutdown & SHUTDOWN_SEND != 0
            || buffered + payload.len() > CONN_BUF_SIZE as usize
        {
            log::debug!("virtio-vsock: guest data outside its credit or state, resetting");
            self.send_rst = true;
            return;
        }
        self.to_host.extend(payload);
        self.flush();
    }

    /// OP_SHUTDOWN from the guest.
    pub fn guest_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.after_flush();
    }

    /// Writes what the host stream takes of `to_host`.
    pub fn flush(&mut self) {
        while !self.to_host.is_empty() && !self.send_rst {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.send_rst = true;
                }
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ours = n.min(self.uncounted);
                    self.uncounted -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("virtio-vsock: host stream write failed: {e}");
                    self.send_rst = true;
                }
            }
        }
        self.after_flush();
    }

    fn after_flush(&mut self) {
        if self.send_rst || !self.to_host.is_empty() {
            return;
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // The guest closed and everything it sent is delivered: the RST completes the
            // close on its side (virtio 1.2 5.10.6.5).
            self.send_rst = true;
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
    }

    /// The next packet for the guest, highest priority first; data is read from the host
    /// stream into `buf` (at most its length and the guest's credit). `None` when there is
    /// nothing to send after all (the host stream had no data).
    pub fn next_outgoing(&mut self, buf: &mut [u8]) -> Option<Outgoing> {
        let control = |op, flags| Some(Outgoing { op, flags, len: 0 });
        let mut packet = if self.send_rst {
            control(OP_RST, 0)
        } else if std::mem::take(&mut self.send_request) {
            control(OP_REQUEST, 0)
        } else if std::mem::take(&mut self.send_response) {
            control(OP_RESPONSE, 0)
        } else if self.data_ready && self.can_send_data() {
            self.read_host(buf)
        } else {
            None
        };
        if packet.is_none() {
            // Also when the host stream had no data after all: `data_ready` outlives the
            // data it announced, and the connection is not queued again, so a pending
            // control packet (the answer to a CREDIT_REQUEST) must go now.
            packet = if self.send_shutdown != 0 {
                control(OP_SHUTDOWN, std::mem::take(&mut self.send_shutdown))
            } else if std::mem::take(&mut self.send_credit_update) {
                control(OP_CREDIT_UPDATE, 0)
            } else {
                self.data_ready = false;
                None
            };
        }
        if packet.is_some() {
            // Every header carries fwd_cnt, so any packet is a credit update.
            self.send_credit_update = false;
            self.last_fwd_cnt_sent = self.fwd_cnt;
        }
        packet
    }

    fn read_host(&mut self, buf: &mut [u8]) -> Option<Outgoing> {
        let max = buf.len().min(self.peer_credit() as usize);
        loop {
            match self.stream.read(&mut buf[..max]) {
                Ok(0) => {
                    self.data_ready = false;
                    self.host_eof = true;
                    // The host will send no more; it may still read (a half-close).
                    return Some(Outgoing {
                        op: OP_SHUTDOWN,
                        flags: SHUTDOWN_SEND,
                        len: 0,
                    });
                }
                Ok(n) => {
                    self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                    return Some(Outgoing {
                        op: OP_RW,
                        flags: 0,
                        len: n,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.data_ready = false;
                    return None;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("virtio-vsock: host stream read failed: {e}");
                    self.send_rst = true;
                    return Some(Outgoing {
                        op: OP_RST,
                        flags: 0,
                        len: 0,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_never_goes_negative() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn = Connection::peer_init(a, 100, 0);
        assert_eq!(conn.peer_credit(), 100);
        conn.tx_cnt = 60;
        assert_eq!(conn.peer_credit(), 40);
        conn.update_peer_credit(100, 50);
        assert_eq!(conn.peer_credit(), 90);
        // A guest that claims to have forwarded more than it got.
        conn.update_peer_credit(100, 70);
        assert_eq!(conn.peer_credit(), 0);
        // Counters wrap.
        conn.tx_cnt = 5;
        conn.update_peer_credit(100, u32::MAX - 4);
        assert_eq!(conn.peer_credit(), 90);
    }

    /// Regression (found by the `virtio_vsock_tx` fuzz target): the host stream was
    /// readable once and all its data already went to the guest, so `data_ready` is still
    /// set; the guest's CREDIT_REQUEST must still be answered, not dropped when the read
    /// finds nothing.
    #[test]
    fn credit_update_goes_when_the_host_has_no_data_after_all() {
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut conn = Connection::peer_init(a, 100, 0);
        let mut buf = [0u8; 64];
        let op = |out: Option<Outgoing>| out.map(|o| o.op);
        assert_eq!(op(conn.next_outgoing(&mut buf)), Some(OP_RESPONSE));
        conn.data_ready = true;
        conn.request_credit_update();
        assert!(conn.has_outgoing());
        assert_eq!(op(conn.next_outgoing(&mut buf)), Some(OP_CREDIT_UPDATE));
        assert!(!conn.data_ready);
        assert_eq!(conn.next_outgoing(&mut buf), None);
    }

    #[test]
    fn guest_overrunning_our_buffer_is_reset() {
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut conn = Connection::peer_init(a, 100, 0);
        // The host never reads: the socket buffer fills, then our buffer.
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 0usize;
        while !conn.is_resetting() {
            conn.guest_data(&chunk);
            sent += chunk.len();
            assert!(sent < 64 << 20, "never reset");
        }
        assert!(conn.to_host.len() <= CONN_BUF_SIZE as usize);
    }
}
