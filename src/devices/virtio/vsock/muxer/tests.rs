//! The connection state machine, driven without queues: guest packets go in through
//! `handle_tx`, packets for the guest come out of `next_rx`, host sockets are real.

use std::io::Write;
use std::time::Duration;

use super::*;

const GUEST_CID: u64 = 3;

pub(crate) use crate::testutil::TempDir;

struct Harness {
    _dir: TempDir,
    uds: PathBuf,
    muxer: Muxer,
}

impl Harness {
    fn new() -> Self {
        let dir = TempDir::new("vsock");
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        listener.set_nonblocking(true).unwrap();
        let muxer = Muxer::new(GUEST_CID, uds.clone(), listener);
        Self {
            _dir: dir,
            uds,
            muxer,
        }
    }

    /// Level-triggered epoll, simulated: every watched fd is reported ready for what it
    /// is watched for.
    fn poll(&mut self) {
        for (fd, set) in self.muxer.watches() {
            self.muxer.host_ready(fd, set);
        }
    }

    /// Real readiness from poll(2), which like epoll always reports hang-up and error,
    /// even on an fd watched for nothing.
    fn poll_os(&mut self) {
        let watches: Vec<(RawFd, EventSet)> = self.muxer.watches().into_iter().collect();
        let mut fds: Vec<libc::pollfd> = watches
            .iter()
            .map(|&(fd, set)| {
                let mut events = 0;
                if set.contains(EventSet::IN) {
                    events |= libc::POLLIN;
                }
                if set.contains(EventSet::OUT) {
                    events |= libc::POLLOUT;
                }
                libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                }
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        assert!(ready >= 0, "{}", std::io::Error::last_os_error());
        for pollfd in fds {
            let mut set = EventSet::empty();
            for (bit, event) in [
                (libc::POLLIN, EventSet::IN),
                (libc::POLLOUT, EventSet::OUT),
                (libc::POLLHUP, EventSet::HANG_UP),
                (libc::POLLERR, EventSet::ERROR),
            ] {
                if pollfd.revents & bit != 0 {
                    set |= event;
                }
            }
            if !set.is_empty() {
                self.muxer.host_ready(pollfd.fd, set);
            }
        }
    }

    /// Everything the muxer has for the guest, with RX buffers of `max` payload bytes.
    fn drain(&mut self, max: usize) -> Vec<(VsockHeader, Vec<u8>)> {
        let mut buf = vec![0u8; max];
        let mut out = Vec::new();
        while let Some((header, len)) = self.muxer.next_rx(&mut buf) {
            out.push((header, buf[..len].to_vec()));
        }
        out
    }

    fn guest(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) {
        self.guest_with(guest_header(op, src_port, dst_port, payload.len()), payload);
    }

    fn guest_with(&mut self, header: VsockHeader, payload: &[u8]) {
        self.muxer.handle_tx(&header, payload);
    }

    /// A host process connecting to guest port `port`; returns its stream and the host
    /// port the guest sees.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(host, "CONNECT {port}").unwrap();
        self.poll();
        self.poll();
        let packets = self.drain(4096);
        assert_eq!(packets.len(), 1, "{packets:?}");
        let request = packets[0].0;
        assert_eq!(request.op, OP_REQUEST);
        assert_eq!(
            (request.src_cid, request.dst_cid, request.dst_port),
            (VSOCK_HOST_CID, GUEST_CID, port)
        );
        assert_eq!(request.type_, TYPE_STREAM);
        assert_eq!(request.buf_alloc, CONN_BUF_SIZE);
        (host, request.src_port)
    }

    /// Host connection accepted by the guest, which has `buf_alloc` bytes of buffer.
    fn established(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let (mut host, local) = self.host_connect(port);
        let mut response = guest_header(OP_RESPONSE, port, local, 0);
        response.buf_alloc = buf_alloc;
        self.guest_with(response, b"");
        assert_eq!(
            read_exact(&mut host, local.to_string().len() + 4),
            format!("OK {local}\n").into_bytes()
        );
        (host, local)
    }
}

fn guest_header(op: u16, src_port: u32, dst_port: u32, len: usize) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: len as u32,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

fn read_exact(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).unwrap();
    buf
}

fn assert_closed(stream: &mut UnixStream) {
    let mut buf = [0u8; 16];
    // Closing with unread input resets instead of ending the stream.
    match stream.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
    }
}

fn ops(packets: &[(VsockHeader, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn port_paths_cannot_escape() {
    let uds = Path::new("/run/vm/v.sock");
    assert_eq!(port_path(uds, 52), Path::new("/run/vm/v.sock_52"));
    assert_eq!(
        port_path(uds, u32::MAX),
        Path::new("/run/vm/v.sock_4294967295")
    );
    assert_eq!(port_path(uds, 0), Path::new("/run/vm/v.sock_0"));
}

#[test]
fn connect_line_parsing() {
    assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
    for bad in [
        &b"CONNECT 4294967296\n"[..],
        b"CONNECT \n",
        b"CONNECT -1\n",
        b"CONNECT +1\n",
        b"CONNECT 52",
        b"connect 52\n",
        b"CONNECT 5 2\n",
    ] {
        assert_eq!(parse_connect(bad), None, "{bad:?}");
    }
}

#[test]
fn host_connection_end_to_end() {
    let mut h = Harness::new();
    let (mut host, local) = h.host_connect(52);
    assert_eq!(local, 1024);
    // Nothing reaches the host before the guest answers.
    assert!(h.drain(4096).is_empty());

    h.guest(OP_RESPONSE, 52, local, b"");
    assert_eq!(read_exact(&mut host, 8), b"OK 1024\n");

    // Host to guest.
    host.write_all(b"ping").unwrap();
    h.poll();
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_RW]);
    assert_eq!(packets[0].1, b"ping");
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (1024, 52));
    assert_eq!(packets[0].0.len, 0, "len is filled in when written");

    // Guest to host, counted in fwd_cnt (the OK line is not).
    h.guest(OP_RW, 52, local, b"pong");
    assert_eq!(read_exact(&mut host, 4), b"pong");
    h.guest(OP_CREDIT_REQUEST, 52, local, b"");
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_CREDIT_UPDATE]);
    assert_eq!(packets[0].0.fwd_cnt, 4);
    assert_eq!(packets[0].0.buf_alloc, CONN_BUF_SIZE);

    // A second host connection gets the next port.
    let (_other, second) = h.host_connect(52);
    assert_eq!(second, 1025);

    // The guest closes: RST back, host stream closed.
    let mut shutdown = guest_header(OP_SHUTDOWN, 52, local, 0);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.guest_with(shutdown, b"");
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_RST]);
    drop(h.muxer.take_retired());
    assert_closed(&mut host);
    assert_eq!(h.muxer.connection_count(), 1);
}

#[test]
fn guest_refusal_and_rst_close_the_host_stream() {
    let mut h = Harness::new();
    let (mut refused, local) = h.host_connect(7);
    h.guest(OP_RST, 7, local, b"");
    assert!(h.drain(4096).is_empty(), "no reply to an RST");
    drop(h.muxer.take_retired());
    assert_closed(&mut refused);

    let (mut host, local) = h.established(8, 1 << 16);
    h.guest(OP_RST, 8, local, b"");
    drop(h.muxer.take_retired());
    assert_closed(&mut host);
    assert_eq!(h.muxer.connection_count(), 0);
    // Anything more on that connection is answered with RST.
    h.guest(OP_RW, 8, local, b"late");
    assert_eq!(ops(&h.drain(4096)), [OP_RST]);
}

#[test]
fn credit_limits_what_goes_to_the_guest() {
    let mut h = Harness::new();
    let (mut host, local) = h.established(9, 100);
    host.write_all(&[5u8; 300]).unwrap();
    let mut received = 0usize;
    for _ in 0..5 {
        h.poll();
        for (header, payload) in h.drain(30) {
            assert_eq!(header.op, OP_RW);
            assert!(payload.len() <= 30);
            received += payload.len();
        }
    }
    assert_eq!(received, 100, "never more than buf_alloc in flight");

    // The guest consumed 60: 60 more may come.
    let mut update = guest_header(OP_CREDIT_UPDATE, 9, local, 0);
    update.buf_alloc = 100;
    update.fwd_cnt = 60;
    h.guest_with(update, b"");
    for _ in 0..5 {
        h.poll();
        received += h.drain(4096).iter().map(|(_, p)| p.len()).sum::<usize>();
    }
    assert_eq!(received, 160);
    // Everything consumed, a bigger buffer: the rest arrives.
    update.buf_alloc = 1000;
    update.fwd_cnt = 160;
    h.guest_with(update, b"");
    for _ in 0..5 {
        h.poll();
        received += h.drain(4096).iter().map(|(_, p)| p.len()).sum::<usize>();
    }
    assert_eq!(received, 300);
}

#[test]
fn host_eof_and_half_close() {
    let mut h = Harness::new();
    let (mut host, local) = h.established(10, 1 << 16);
    host.write_all(b"last words").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    h.poll();
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_RW, OP_SHUTDOWN]);
    assert_eq!(packets[1].0.flags, SHUTDOWN_SEND);
    // The host can still read.
    h.guest(OP_RW, 10, local, b"reply");
    assert_eq!(read_exact(&mut host, 5), b"reply");
    // Guest SHUTDOWN_SEND half-closes the host stream.
    let mut shutdown = guest_header(OP_SHUTDOWN, 10, local, 0);
    shutdown.flags = SHUTDOWN_SEND;
    h.guest_with(shutdown, b"");
    assert_closed(&mut host);
    h.guest(OP_RW, 10, local, b"after shutdown");
    assert_eq!(ops(&h.drain(4096)), [OP_RST]);
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut h = Harness::new();
    let service = UnixListener::bind(port_path(&h.uds, 1234)).unwrap();
    h.guest(OP_REQUEST, 5000, 1234, b"");
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_RESPONSE]);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (1234, 5000));
    let (mut peer, _) = service.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    h.guest(OP_RW, 5000, 1234, b"hello host");
    assert_eq!(read_exact(&mut peer, 10), b"hello host");
    peer.write_all(b"hello guest").unwrap();
    h.poll();
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_RW]);
    assert_eq!(packets[0].1, b"hello guest");

    // A second REQUEST on the live connection resets it.
    h.guest(OP_REQUEST, 5000, 1234, b"");
    assert_eq!(ops(&h.drain(4096)), [OP_RST]);
    drop(h.muxer.take_retired());
    assert_closed(&mut peer);

    // Nobody listens on port 1235 (nor on the largest port).
    h.guest(OP_REQUEST, 5001, 1235, b"");
    h.guest(OP_REQUEST, 5002, u32::MAX, b"");
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_RST, OP_RST]);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (1235, 5001));
    assert_eq!(packets[0].0.dst_cid, GUEST_CID);

    let m = h.muxer.metrics();
    let counts = [
        m.conns_added.get(),
        m.conns_removed.get(),
        m.conns_refused.get(),
        m.tx_bytes.get(),
        m.rx_bytes.get(),
    ];
    assert_eq!(counts, [1, 1, 2, 10, 11]);
}

#[test]
fn bad_addresses_types_and_ops() {
    let mut h = Harness::new();
    let _service = UnixListener::bind(port_path(&h.uds, 80)).unwrap();
    // Not from the guest's CID: dropped silently.
    let mut spoofed = guest_header(OP_REQUEST, 1, 80, 0);
    spoofed.src_cid = 7;
    h.guest_with(spoofed, b"");
    assert!(h.drain(4096).is_empty());
    // Not to the host: RST.
    let mut elsewhere = guest_header(OP_REQUEST, 1, 80, 0);
    elsewhere.dst_cid = 4;
    h.guest_with(elsewhere, b"");
    // Not a stream: RST.
    let mut dgram = guest_header(OP_REQUEST, 1, 80, 0);
    dgram.type_ = 2;
    h.guest_with(dgram, b"");
    assert_eq!(ops(&h.drain(4096)), [OP_RST, OP_RST]);
    assert_eq!(h.muxer.connection_count(), 0);

    // An unknown op on a live connection resets it.
    h.guest(OP_REQUEST, 1, 80, b"");
    assert_eq!(ops(&h.drain(4096)), [OP_RESPONSE]);
    h.guest(99, 1, 80, b"");
    assert_eq!(ops(&h.drain(4096)), [OP_RST]);
    assert_eq!(h.muxer.connection_count(), 0);
    // RSTs to nothing are not answered; other strays are.
    h.guest(OP_RST, 1, 80, b"");
    h.guest(OP_CREDIT_REQUEST, 1, 80, b"");
    assert_eq!(ops(&h.drain(4096)), [OP_RST]);
}

#[test]
fn bad_handshakes_are_closed() {
    let mut h = Harness::new();
    let mut garbage = UnixStream::connect(&h.uds).unwrap();
    garbage.write_all(b"HELLO\n").unwrap();
    let mut long = UnixStream::connect(&h.uds).unwrap();
    long.write_all(&[b'7'; 64]).unwrap();
    let mut early_eof = UnixStream::connect(&h.uds).unwrap();
    early_eof.write_all(b"CONNECT 5").unwrap();
    early_eof.shutdown(std::net::Shutdown::Write).unwrap();
    h.poll();
    h.poll();
    drop(h.muxer.take_retired());
    for stream in [&mut garbage, &mut long, &mut early_eof] {
        assert_closed(stream);
    }
    assert!(h.drain(4096).is_empty());
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn connection_count_is_bounded() {
    let mut h = Harness::new();
    let _service = UnixListener::bind(port_path(&h.uds, 80)).unwrap();
    for port in 0..MAX_CONNECTIONS as u32 {
        h.muxer
            .handle_tx(&guest_header(OP_REQUEST, port, 80, 0), b"");
        // The service never accepts; keep its backlog from filling by draining RX only.
        let _ = h.drain(64);
        if h.muxer.connection_count() as u32 != port + 1 {
            // The listener's backlog is full: refusals are fine, not more connections.
            break;
        }
    }
    let before = h.muxer.connection_count();
    assert!(before <= MAX_CONNECTIONS);
    h.guest(OP_REQUEST, 99_999, 80, b"");
    assert_eq!(ops(&h.drain(64)), [OP_RST]);
    assert_eq!(h.muxer.connection_count(), before);
}

#[test]
fn guest_reset_drops_every_connection() {
    let mut h = Harness::new();
    let (mut first, _) = h.established(1, 1 << 16);
    let (mut second, _) = h.established(2, 1 << 16);
    h.muxer.reset();
    drop(h.muxer.take_retired());
    assert_closed(&mut first);
    assert_closed(&mut second);
    assert!(!h.muxer.has_rx());
}

#[test]
fn host_giving_up_before_the_guest_answers_resets_the_guest() {
    let mut h = Harness::new();
    let (host, local) = h.host_connect(52);
    // Watched for hang-up only while the guest has not answered.
    let watched: Vec<EventSet> = h
        .muxer
        .watches()
        .into_iter()
        .filter(|&(fd, _)| fd != h.muxer.listener.as_raw_fd())
        .map(|(_, set)| set)
        .collect();
    assert_eq!(watched, [EventSet::empty()]);
    h.poll_os();
    assert!(h.drain(4096).is_empty(), "nothing happened yet");
    assert_eq!(h.muxer.connection_count(), 1);

    drop(host);
    h.poll_os();
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_RST]);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (local, 52));
    assert_eq!(packets[0].0.dst_cid, GUEST_CID);
    assert_eq!(h.muxer.connection_count(), 0);
    assert_eq!(h.muxer.watches().len(), 1, "only the listener is left");
    assert_eq!(h.muxer.take_retired().len(), 1);
    // The guest's late answer is refused.
    h.guest(OP_RESPONSE, 52, local, b"");
    assert_eq!(ops(&h.drain(4096)), [OP_RST]);
}

#[test]
fn host_half_close_before_the_guest_answers_is_not_giving_up() {
    let mut h = Harness::new();
    let (mut host, local) = h.host_connect(53);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    h.poll_os();
    assert!(h.drain(4096).is_empty());
    assert_eq!(h.muxer.connection_count(), 1);
    h.guest(OP_RESPONSE, 53, local, b"");
    assert_eq!(read_exact(&mut host, 8), b"OK 1024\n");
    h.poll_os();
    assert_eq!(ops(&h.drain(4096)), [OP_SHUTDOWN]);
    h.guest(OP_RW, 53, local, b"still heard");
    assert_eq!(read_exact(&mut host, 11), b"still heard");
}

#[test]
fn host_data_sent_with_the_connect_line_waits_for_the_response() {
    let mut h = Harness::new();
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 54\nearly bytes").unwrap();
    h.poll_os();
    h.poll_os();
    let packets = h.drain(4096);
    assert_eq!(ops(&packets), [OP_REQUEST]);
    let local = packets[0].0.src_port;
    host.write_all(b", and more").unwrap();
    for _ in 0..3 {
        h.poll_os();
        h.poll();
    }
    assert!(h.drain(4096).is_empty(), "no data before the RESPONSE");

    h.guest(OP_RESPONSE, 54, local, b"");
    assert_eq!(read_exact(&mut host, 8), b"OK 1024\n");
    let mut received = Vec::new();
    for _ in 0..3 {
        h.poll_os();
        for (header, payload) in h.drain(4) {
            assert_eq!(header.op, OP_RW);
            assert_eq!((header.src_port, header.dst_port), (local, 54));
            received.extend(payload);
        }
    }
    assert_eq!(received, b"early bytes, and more");
}
