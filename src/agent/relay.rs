//! Moving a published port's traffic over a stream, shared by the host's forwarder
//! (`container::publish`) and the machine's agent (`agent::init::forward`): TCP
//! connections spliced both ways with half-closes passed on, UDP datagrams carried as
//! length-prefixed records ([`crate::agent::protocol::write_datagram`]).

use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::agent::protocol::{read_datagram, write_datagram};

/// Buffer of one direction of a splice.
const SPLICE_BUF: usize = 64 * 1024;
/// How often a UDP socket's reader looks whether its stream has ended.
const UDP_POLL: Duration = Duration::from_millis(500);

fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown on a descriptor the caller keeps open; a failure changes nothing.
    unsafe { libc::shutdown(fd, how) };
}

/// Copies `src` to `dst` until `src` ends, then half-closes `dst` (the peer reads EOF
/// but may still send). A failure on either side ends both connections outright.
fn pump<A, B>(src: &A, dst: &B) -> u64
where
    A: AsRawFd,
    B: AsRawFd,
    for<'x> &'x A: Read,
    for<'x> &'x B: Write,
{
    let mut buf = vec![0u8; SPLICE_BUF];
    let mut total = 0u64;
    loop {
        let n = match (&mut &*src).read(&mut buf) {
            Ok(0) => {
                shutdown(dst.as_raw_fd(), libc::SHUT_WR);
                return total;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if (&mut &*dst).write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
    }
    shutdown(src.as_raw_fd(), libc::SHUT_RDWR);
    shutdown(dst.as_raw_fd(), libc::SHUT_RDWR);
    total
}

/// Splices two connected streams until both directions have ended; returns the bytes
/// moved from `a` to `b` and from `b` to `a`.
pub fn splice<A, B>(a: &A, b: &B) -> (u64, u64)
where
    A: AsRawFd + Sync,
    B: AsRawFd + Sync,
    for<'x> &'x A: Read + Write,
    for<'x> &'x B: Read + Write,
{
    std::thread::scope(|s| {
        let back = s.spawn(|| pump(b, a));
        let forth = pump(a, b);
        (forth, back.join().unwrap_or(0))
    })
}

/// Relays datagrams between `stream` (length-prefixed records) and the connected
/// `socket` until the stream ends or fails.
pub fn udp_over_stream<S>(stream: &S, socket: &UdpSocket) -> io::Result<()>
where
    S: AsRawFd + Sync,
    for<'x> &'x S: Read + Write,
{
    socket.set_read_timeout(Some(UDP_POLL))?;
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0u8; 65535];
            while !done.load(Ordering::SeqCst) {
                // Errors are timeouts, or ICMP errors of an earlier send (ECONNREFUSED):
                // UDP has no connection to lose.
                if let Ok(n) = socket.recv(&mut buf) {
                    if write_datagram(&mut &*stream, &buf[..n]).is_err() {
                        done.store(true, Ordering::SeqCst);
                        shutdown(stream.as_raw_fd(), libc::SHUT_RDWR);
                    }
                }
            }
        });
        let mut buf = vec![0u8; 65535];
        while let Ok(Some(n)) = read_datagram(&mut &*stream, &mut buf) {
            // A datagram the socket cannot take is dropped, as a network would.
            let _ = socket.send(&buf[..n]);
        }
        done.store(true, Ordering::SeqCst);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    /// A Unix socket pair stands for the vsock stream, a loopback TCP pair for the
    /// container's connection: data goes both ways, and each side's half-close reaches
    /// the other while it can still answer.
    #[test]
    fn splice_passes_data_and_half_closes() {
        let (vsock_far, vsock_near) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let relay = std::thread::spawn(move || splice(&vsock_near, &client));

        // Host side sends a request and half-closes; the server reads it to EOF.
        (&vsock_far).write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        vsock_far.shutdown(Shutdown::Write).unwrap();
        let mut request = Vec::new();
        (&server).read_to_end(&mut request).unwrap();
        assert_eq!(request, b"GET / HTTP/1.0\r\n\r\n");
        // The server still answers after the client's half-close, then closes.
        let big = vec![7u8; 300_000];
        (&server).write_all(&big).unwrap();
        drop(server);
        let mut answer = Vec::new();
        (&vsock_far).read_to_end(&mut answer).unwrap();
        assert_eq!(answer, big);
        assert_eq!(relay.join().unwrap(), (18, 300_000));
    }

    #[test]
    fn the_relay_ends_once_both_sides_have_closed() {
        let (far, near) = UnixStream::pair().unwrap();
        let (other_far, other_near) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || splice(&near, &other_near));
        // One side goes away: the other reads EOF, and its own close ends the relay.
        drop(far);
        let mut rest = Vec::new();
        (&other_far).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(other_far);
        relay.join().unwrap();
    }

    #[test]
    fn udp_datagrams_keep_their_boundaries() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(echo.local_addr().unwrap()).unwrap();
        let (far, near) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || udp_over_stream(&near, &socket));
        let echoer = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            for _ in 0..2 {
                let (n, peer) = echo.recv_from(&mut buf).unwrap();
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                echo.send_to(&reply, peer).unwrap();
            }
        });
        let mut buf = vec![0u8; 65535];
        for msg in [&b"one"[..], &b"second datagram"[..]] {
            write_datagram(&mut &far, msg).unwrap();
            let n = read_datagram(&mut &far, &mut buf).unwrap().unwrap();
            assert_eq!(&buf[..n], [&b"echo:"[..], msg].concat());
        }
        echoer.join().unwrap();
        drop(far);
        relay.join().unwrap().unwrap();
    }
}
