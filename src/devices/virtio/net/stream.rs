//! The host side of virtio-net over a Unix stream socket (passt's, or QEMU's `-netdev
//! stream` peer): every Ethernet frame goes with its length in front, a 32-bit big-endian
//! number, and nothing else (no virtio-net header: the device strips and adds it, and
//! offers the guest no offloads on this back end).
//!
//! The socket is non-blocking. Reads gather bytes until a whole frame is there (a frame
//! may arrive in pieces, several frames in one read). A write the socket does not take
//! whole keeps its rest here ([`StreamBackend::tx_blocked`]); the device then takes no
//! more TX descriptors and watches for EPOLLOUT, and [`StreamBackend::flush`] sends the
//! rest first. A closed peer or a length no frame can have ends the stream: it is
//! reported once, and the device drops frames from then on.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::header::MAX_FRAME_LEN;

/// Bytes of the length in front of each frame.
const LENGTH_LEN: usize = 4;
/// The receive buffer: room for two of the largest frames, so that one read can bring
/// in the end of one frame and much of the next.
const RX_BUFFER_LEN: usize = 2 * (LENGTH_LEN + MAX_FRAME_LEN);

/// Where the socket came from, for messages and for saving the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamOrigin {
    /// Connected to this path.
    Path(PathBuf),
    /// A passt started for this NIC.
    User,
}

/// Sockets made ready before the jail or seccomp, each taken by the first device that
/// asks for its origin.
static PREPARED: Mutex<VecDeque<(StreamOrigin, OwnedFd)>> = Mutex::new(VecDeque::new());

fn prepared() -> std::sync::MutexGuard<'static, VecDeque<(StreamOrigin, OwnedFd)>> {
    PREPARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Connects to `path` now, for a later [`StreamBackend::open`] of the same path.
pub fn preconnect(path: &Path) -> io::Result<()> {
    let socket = UnixStream::connect(path)?;
    prepared().push_back((StreamOrigin::Path(path.to_path_buf()), socket.into()));
    Ok(())
}

/// Leaves the VMM's end of a passt socket for the next user-mode NIC.
pub fn prepare_user(socket: OwnedFd) {
    prepared().push_back((StreamOrigin::User, socket));
}

/// The descriptors of the prepared sockets (a jail must keep them open).
pub fn prepared_fds() -> Vec<RawFd> {
    prepared().iter().map(|(_, fd)| fd.as_raw_fd()).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot connect to the network socket \"{path}\"")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no passt was started for this user-mode NIC (hearth starts passt for `hearth run --net user` and for `hearth restore --net-override IFACE=user`)")]
    NoPasst,
    #[error("cannot make the network socket non-blocking")]
    NonBlocking(#[source] io::Error),
}

/// A frame-oriented view of a stream socket.
#[derive(Debug)]
pub struct StreamBackend {
    socket: UnixStream,
    origin: StreamOrigin,
    rx: Vec<u8>,
    /// The unread bytes of `rx` are `rx[rx_start..rx_end]`.
    rx_start: usize,
    rx_end: usize,
    /// What a short write left: the rest of one length-prefixed frame.
    tx_pending: Vec<u8>,
    tx_sent: usize,
    /// The stream ended (peer closed, or it sent what cannot be a frame).
    ended: bool,
}

impl StreamBackend {
    /// Takes the socket prepared for `origin`, or (for a path) connects now.
    pub fn open(origin: &StreamOrigin) -> Result<Self, StreamError> {
        let taken = {
            let mut prepared = prepared();
            prepared
                .iter()
                .position(|(o, _)| o == origin)
                .and_then(|index| prepared.remove(index))
        };
        let socket = match (taken, origin) {
            (Some((_, fd)), _) => UnixStream::from(fd),
            (None, StreamOrigin::Path(path)) => {
                UnixStream::connect(path).map_err(|source| StreamError::Connect {
                    path: path.clone(),
                    source,
                })?
            }
            (None, StreamOrigin::User) => return Err(StreamError::NoPasst),
        };
        Self::new(socket, origin.clone())
    }

    /// Wraps a connected socket.
    pub fn new(socket: UnixStream, origin: StreamOrigin) -> Result<Self, StreamError> {
        socket
            .set_nonblocking(true)
            .map_err(StreamError::NonBlocking)?;
        Ok(Self {
            socket,
            origin,
            rx: vec![0; RX_BUFFER_LEN],
            rx_start: 0,
            rx_end: 0,
            tx_pending: Vec::new(),
            tx_sent: 0,
            ended: false,
        })
    }

    pub fn origin(&self) -> &StreamOrigin {
        &self.origin
    }

    /// A name for messages.
    pub fn describe(&self) -> String {
        match &self.origin {
            StreamOrigin::Path(path) => format!("network socket \"{}\"", path.display()),
            StreamOrigin::User => "passt".to_string(),
        }
    }

    /// A whole frame is waiting in the buffer (the socket need not be readable).
    pub fn has_buffered_frame(&self) -> bool {
        self.buffered_frame_len().is_some_and(|len| {
            len <= MAX_FRAME_LEN && self.rx_end - self.rx_start >= LENGTH_LEN + len
        })
    }

    fn buffered_frame_len(&self) -> Option<usize> {
        let bytes = self.rx.get(self.rx_start..self.rx_start + LENGTH_LEN)?;
        if self.rx_end - self.rx_start < LENGTH_LEN {
            return None;
        }
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize)
    }

    fn end(&mut self, error: io::Error) -> io::Error {
        self.ended = true;
        error
    }

    /// Reads the next frame into `buf`; `WouldBlock` while none is whole yet. The error
    /// of a closed peer is `UnexpectedEof`, of an impossible length `InvalidData`; both
    /// end the stream.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the stream has ended",
            ));
        }
        loop {
            if let Some(len) = self.buffered_frame_len() {
                if len > MAX_FRAME_LEN {
                    return Err(self.end(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the peer sent a {len}-byte frame (at most {MAX_FRAME_LEN})"),
                    )));
                }
                let start = self.rx_start + LENGTH_LEN;
                if self.rx_end >= start + len {
                    let copied = len.min(buf.len());
                    buf[..copied].copy_from_slice(&self.rx[start..start + copied]);
                    self.rx_start = start + len;
                    if self.rx_start == self.rx_end {
                        (self.rx_start, self.rx_end) = (0, 0);
                    }
                    return Ok(copied);
                }
            }
            // Not a whole frame yet: make room at the end and read more.
            if self.rx_end == self.rx.len() {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            match (&self.socket).read(&mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    return Err(self.end(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection",
                    )))
                }
                Ok(n) => self.rx_end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) => return Err(self.end(e)),
            }
        }
    }

    /// A frame is half sent: no other may be written until [`Self::flush`] finished it.
    pub fn tx_blocked(&self) -> bool {
        !self.ended && self.tx_sent < self.tx_pending.len()
    }

    /// Sends `frame` with its length in front. Whatever the socket does not take now is
    /// kept for [`Self::flush`]; the frame counts as sent. Fails (frame dropped) when the
    /// stream has ended or a frame is still half sent.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        if self.ended {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream has ended",
            ));
        }
        if self.tx_blocked() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let length = (frame.len() as u32).to_be_bytes();
        let total = LENGTH_LEN + frame.len();
        let sent = match send_vectored(&self.socket, &[&length, frame]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                if e.kind() == io::ErrorKind::BrokenPipe
                    || e.kind() == io::ErrorKind::ConnectionReset
                {
                    self.ended = true;
                }
                return Err(e);
            }
        };
        if sent < total {
            self.tx_pending.clear();
            self.tx_pending.extend_from_slice(&length);
            self.tx_pending.extend_from_slice(frame);
            self.tx_sent = sent;
        }
        Ok(frame.len())
    }

    /// Sends what a short write left. `Ok(true)` when nothing is left.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.tx_blocked() {
            match send_vectored(&self.socket, &[&self.tx_pending[self.tx_sent..]]) {
                Ok(n) => self.tx_sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    self.ended = true;
                    return Err(e);
                }
            }
        }
        self.tx_pending.clear();
        self.tx_sent = 0;
        Ok(true)
    }

    /// The stream ended: nothing more will come or go.
    pub fn has_ended(&self) -> bool {
        self.ended
    }
}

/// One `sendmsg` of `parts` without SIGPIPE and without blocking.
fn send_vectored(socket: &UnixStream, parts: &[&[u8]]) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .map(|part| libc::iovec {
            iov_base: part.as_ptr() as *mut libc::c_void,
            iov_len: part.len(),
        })
        .collect();
    // SAFETY: msghdr is plain data; all-zero (no address, no control data) is valid.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = iov.as_mut_ptr();
    message.msg_iovlen = iov.len();
    loop {
        // SAFETY: the iovecs point into `parts`, which outlive the call; the kernel only
        // reads through them.
        let sent = unsafe {
            libc::sendmsg(
                socket.as_raw_fd(),
                &message,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

impl AsRawFd for StreamBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsFd for StreamBackend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (StreamBackend, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        (StreamBackend::new(ours, StreamOrigin::User).unwrap(), peer)
    }

    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut bytes = (frame.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(frame);
        bytes
    }

    fn would_block<T: std::fmt::Debug>(result: io::Result<T>) -> bool {
        matches!(result, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn frames_split_across_reads_and_several_in_one() {
        let (mut stream, mut peer) = pair();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert!(would_block(stream.read_frame(&mut buf)));
        let first = framed(&[1u8; 60]);
        // The length itself split, then the frame in two pieces.
        peer.write_all(&first[..2]).unwrap();
        assert!(would_block(stream.read_frame(&mut buf)));
        peer.write_all(&first[2..30]).unwrap();
        assert!(would_block(stream.read_frame(&mut buf)));
        assert!(!stream.has_buffered_frame());
        let mut rest = first[30..].to_vec();
        rest.extend(framed(&[2u8; 100]));
        rest.extend(framed(&[3u8; 14]));
        peer.write_all(&rest).unwrap();
        assert_eq!(stream.read_frame(&mut buf).unwrap(), 60);
        assert_eq!(buf[..60], [1u8; 60]);
        assert!(stream.has_buffered_frame());
        assert_eq!(stream.read_frame(&mut buf).unwrap(), 100);
        assert_eq!(buf[..100], [2u8; 100]);
        assert_eq!(stream.read_frame(&mut buf).unwrap(), 14);
        assert!(!stream.has_buffered_frame());
        assert!(would_block(stream.read_frame(&mut buf)));
    }

    #[test]
    fn the_largest_frames_pass_back_to_back() {
        let (mut stream, peer) = pair();
        let writer = std::thread::spawn(move || {
            let mut peer = peer;
            for tag in 0..5u8 {
                peer.write_all(&framed(&vec![tag; MAX_FRAME_LEN])).unwrap();
            }
        });
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let mut tag = 0u8;
        while tag < 5 {
            match stream.read_frame(&mut buf) {
                Ok(n) => {
                    assert_eq!(n, MAX_FRAME_LEN);
                    assert!(buf.iter().all(|&b| b == tag));
                    tag += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        writer.join().unwrap();
    }

    #[test]
    fn an_oversized_length_ends_the_stream() {
        let (mut stream, mut peer) = pair();
        peer.write_all(&((MAX_FRAME_LEN as u32 + 1).to_be_bytes()))
            .unwrap();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let err = stream.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(stream.has_ended());
        // Ended for good: no more reads of the socket, writes refused.
        peer.write_all(&framed(&[0; 20])).unwrap();
        assert_eq!(
            stream.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        assert!(stream.write_frame(&[0; 20]).is_err());
    }

    #[test]
    fn a_closed_peer_ends_the_stream_without_a_signal() {
        let (mut stream, mut peer) = pair();
        peer.write_all(&framed(&[7; 30])).unwrap();
        drop(peer);
        let mut buf = vec![0u8; 100];
        // The frame sent before the close is still delivered.
        assert_eq!(stream.read_frame(&mut buf).unwrap(), 30);
        assert_eq!(
            stream.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(stream.has_ended());

        // Writing to a closed peer is an error (EPIPE without SIGPIPE), never a crash.
        let (mut stream, peer) = pair();
        drop(peer);
        assert!(stream.write_frame(&[1; 60]).is_err());
        assert!(stream.has_ended() && !stream.tx_blocked());
    }

    #[test]
    fn short_writes_are_finished_before_the_next_frame() {
        let (mut stream, mut peer) = pair();
        peer.set_nonblocking(true).unwrap();
        // Fill the socket until a frame does not go whole.
        let frame: Vec<u8> = (0..MAX_FRAME_LEN).map(|i| (i % 251) as u8).collect();
        let mut written = 0;
        while !stream.tx_blocked() {
            assert_eq!(stream.write_frame(&frame).unwrap(), frame.len());
            written += 1;
            assert!(written < 10_000, "the socket never filled");
        }
        assert!(would_block(stream.write_frame(&frame)));
        assert!(!stream.flush().unwrap());
        // The peer reads everything; the stream must hold `written` whole frames.
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let mut frames = 0;
        while frames < written {
            match peer.read(&mut chunk) {
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stream.flush().unwrap();
                }
                Err(e) => panic!("{e}"),
            }
            while received.len() >= LENGTH_LEN {
                let len = u32::from_be_bytes(received[..4].try_into().unwrap()) as usize;
                if received.len() < LENGTH_LEN + len {
                    break;
                }
                assert_eq!(received[LENGTH_LEN..LENGTH_LEN + len], frame[..]);
                received.drain(..LENGTH_LEN + len);
                frames += 1;
            }
        }
        assert!(stream.flush().unwrap());
        assert!(!stream.tx_blocked());
        assert!(received.is_empty());
        stream.write_frame(&[9; 20]).unwrap();
        let mut small = [0u8; 24];
        peer.set_nonblocking(false).unwrap();
        peer.read_exact(&mut small).unwrap();
        assert_eq!(small, framed(&[9; 20])[..]);
    }

    #[test]
    fn prepared_sockets_are_taken_by_origin() {
        let (a, _peer) = UnixStream::pair().unwrap();
        let path = PathBuf::from("/nonexistent/hearth-test.sock");
        prepared().push_back((StreamOrigin::Path(path.clone()), a.into()));
        let stream = StreamBackend::open(&StreamOrigin::Path(path.clone())).unwrap();
        assert_eq!(stream.origin(), &StreamOrigin::Path(path.clone()));
        // Taken: the next open connects, and there is nothing at that path.
        assert!(matches!(
            StreamBackend::open(&StreamOrigin::Path(path)),
            Err(StreamError::Connect { .. })
        ));
    }
}
