//! Published ports of a container in a machine: hearth's own forwarder over vsock.
//!
//! The front end (`hearth container run --machine M -p ...`, alive as long as the
//! container) listens on each host port. Every TCP connection it accepts becomes one
//! agent session over the machine's vsock socket (`CONNECT 1024`, `Hello`, then
//! `Forward { container, port, tcp }`); once the agent answers `Forwarding`, having
//! connected to the container's bridge address, the session is the connection: bytes
//! are spliced both ways, half-closes passed on. UDP: one such session per host-side
//! peer, carrying length-prefixed datagrams, ended after [`UDP_IDLE`] without traffic.
//!
//! Why not passt: passt forwards host ports to the machine's VM, and this Debian's passt
//! cannot add forwards to a running instance; and the machine's network is not the
//! container's (each container has its own namespace behind the VM's NAT).

use std::collections::hash_map::{Entry, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::session::{self, SessionError};
use super::ContainerError;
use crate::agent::protocol::{
    read_datagram, read_message, write_datagram, write_message, ForwardSpec, Message, Transport,
};
use crate::agent::relay;
use crate::net::{PortForward, Protocol};

/// How long a UDP peer's flow lives without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long reaching the machine's agent may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the UDP loop looks for idle flows.
const UDP_SWEEP: Duration = Duration::from_millis(500);

/// A host socket bound for one published port.
pub enum HostSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// Binds the host side of `port` (before the container starts: a port in use is a
/// one-line error, the same as for a fresh microVM's).
pub fn bind(port: &PortForward) -> Result<HostSocket, ContainerError> {
    let address = port.host_socket_address();
    let bound = match port.protocol {
        Protocol::Tcp => TcpListener::bind(address).map(HostSocket::Tcp),
        Protocol::Udp => UdpSocket::bind(address).map(HostSocket::Udp),
    };
    bound.map_err(|e| {
        ContainerError::Usage(format!(
            "-p {port}: host port {}/{} is not available ({e})",
            port.host_port,
            port.protocol.name()
        ))
    })
}

/// Why a forward could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("cannot start a UDP flow")]
    Flow(#[source] std::io::Error),
}

/// Where forwarded connections go: a container of a running machine.
#[derive(Debug, Clone)]
pub struct Destination {
    /// The machine's vsock socket.
    pub socket: PathBuf,
    /// The container's name in the machine.
    pub container: String,
}

impl Destination {
    /// A session to the agent, switched to relaying `port` of the container.
    fn open(&self, port: u16, transport: Transport) -> Result<UnixStream, SessionError> {
        let mut stream = session::connect_agent(&self.socket, AGENT_TIMEOUT)?;
        let spec = ForwardSpec {
            container: self.container.clone(),
            port,
            transport,
        };
        write_message(&mut stream, &Message::Forward(spec))?;
        match read_message(&mut stream)? {
            Some(Message::Forwarding) => Ok(stream),
            Some(Message::Error(text)) => Err(SessionError::Agent(text)),
            Some(_) => Err(SessionError::Unexpected("reply to forward")),
            None => Err(SessionError::Closed),
        }
    }
}

/// Serves every bound host socket on threads of its own, for the rest of the process.
pub fn start(
    bound: Vec<(PortForward, HostSocket)>,
    destination: &Destination,
) -> std::io::Result<()> {
    for (mapping, socket) in bound {
        let destination = destination.clone();
        let name = format!("publish-{}", mapping.host_port);
        let thread = std::thread::Builder::new().name(name);
        match socket {
            HostSocket::Tcp(listener) => {
                thread.spawn(move || serve_tcp(listener, mapping, destination))?;
            }
            HostSocket::Udp(socket) => {
                thread.spawn(move || serve_udp(socket, mapping, destination, UDP_IDLE))?;
            }
        }
    }
    Ok(())
}

fn serve_tcp(listener: TcpListener, mapping: PortForward, destination: Destination) {
    for conn in listener.incoming() {
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait for connections to end.
                log::warn!("-p {mapping}: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let destination = destination.clone();
        let spawned = std::thread::Builder::new()
            .name("publish-conn".into())
            .spawn(move || forward_tcp(client, mapping, &destination));
        if let Err(e) = spawned {
            log::warn!("-p {mapping}: cannot start a connection thread: {e}");
        }
    }
}

/// One TCP connection: refused (closed at once) when the container cannot be reached,
/// as docker's proxy does.
fn forward_tcp(client: TcpStream, mapping: PortForward, destination: &Destination) {
    match destination.open(mapping.guest_port, Transport::Tcp) {
        Ok(stream) => {
            let _ = client.set_nodelay(true);
            relay::splice::<TcpStream, UnixStream>(&client, &stream);
        }
        Err(e) => log::info!("-p {mapping}: {}", crate::error_chain(&e)),
    }
}

/// A UDP peer's session with the agent; dropping it ends the session.
struct Flow {
    stream: UnixStream,
    /// Milliseconds since the loop's start at the last datagram either way.
    last: Arc<AtomicU64>,
    /// The agent ended the session.
    ended: Arc<AtomicBool>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn millis_since(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

fn open_flow(
    socket: &Arc<UdpSocket>,
    peer: SocketAddr,
    mapping: PortForward,
    destination: &Destination,
    start: Instant,
) -> Result<Flow, PublishError> {
    let stream = destination.open(mapping.guest_port, Transport::Udp)?;
    let mut reader = stream.try_clone().map_err(PublishError::Flow)?;
    let last = Arc::new(AtomicU64::new(millis_since(start)));
    let ended = Arc::new(AtomicBool::new(false));
    let (socket, last_seen, done) = (socket.clone(), last.clone(), ended.clone());
    std::thread::Builder::new()
        .name("publish-udp".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65535];
            while let Ok(Some(n)) = read_datagram(&mut reader, &mut buf) {
                last_seen.store(millis_since(start), Ordering::Relaxed);
                let _ = socket.send_to(&buf[..n], peer);
            }
            done.store(true, Ordering::Relaxed);
        })
        .map_err(PublishError::Flow)?;
    Ok(Flow {
        stream,
        last,
        ended,
    })
}

fn serve_udp(socket: UdpSocket, mapping: PortForward, destination: Destination, idle: Duration) {
    if let Err(e) = socket.set_read_timeout(Some(UDP_SWEEP)) {
        log::warn!("-p {mapping}: {e}");
        return;
    }
    let socket = Arc::new(socket);
    let start = Instant::now();
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; 65535];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let flow = match flows.entry(peer) {
                    Entry::Occupied(entry) => entry.into_mut(),
                    Entry::Vacant(entry) => {
                        match open_flow(&socket, peer, mapping, &destination, start) {
                            Ok(flow) => entry.insert(flow),
                            Err(e) => {
                                log::info!("-p {mapping}: {}", crate::error_chain(&e));
                                continue;
                            }
                        }
                    }
                };
                flow.last.store(millis_since(start), Ordering::Relaxed);
                if write_datagram(&mut &flow.stream, &buf[..n]).is_err() {
                    flows.remove(&peer);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                log::debug!("-p {mapping}: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let now = millis_since(start);
        let idle_ms = idle.as_millis() as u64;
        flows.retain(|_, f| {
            !f.ended.load(Ordering::Relaxed)
                && now.saturating_sub(f.last.load(Ordering::Relaxed)) < idle_ms
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{Transport, VERSION};

    fn parse_publish(spec: &str) -> Result<PortForward, crate::net::PortError> {
        spec.parse()
    }
    use crate::testutil::TempDir;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::Ipv4Addr;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::AtomicUsize;

    /// A stand-in for a machine's vsock socket and agent: answers `CONNECT`, `Hello` and
    /// `Forward` as the agent does, relaying to loopback ports of this host (the
    /// container is "web"; any other name is refused). Counts sessions.
    fn fake_machine(dir: &TempDir) -> (PathBuf, Arc<AtomicUsize>) {
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let sessions = Arc::new(AtomicUsize::new(0));
        let count = sessions.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut line = String::new();
                    BufReader::with_capacity(1, &conn)
                        .read_line(&mut line)
                        .unwrap();
                    assert_eq!(line, "CONNECT 1024\n");
                    conn.write_all(b"OK 1\n").unwrap();
                    write_message(&mut conn, &Message::Hello { version: VERSION }).unwrap();
                    read_message(&mut conn).unwrap();
                    let Some(Message::Forward(spec)) = read_message(&mut conn).unwrap() else {
                        return;
                    };
                    if spec.container != "web" {
                        let text = format!("no running container named {:?}", spec.container);
                        write_message(&mut conn, &Message::Error(text)).unwrap();
                        return;
                    }
                    let target = (Ipv4Addr::LOCALHOST, spec.port);
                    match spec.transport {
                        Transport::Tcp => {
                            let Ok(tcp) = TcpStream::connect(target) else {
                                let _ = write_message(&mut conn, &Message::Error("refused".into()));
                                return;
                            };
                            write_message(&mut conn, &Message::Forwarding).unwrap();
                            relay::splice::<UnixStream, TcpStream>(&conn, &tcp);
                        }
                        Transport::Udp => {
                            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
                            udp.connect(target).unwrap();
                            write_message(&mut conn, &Message::Forwarding).unwrap();
                            relay::udp_over_stream(&conn, &udp).unwrap();
                        }
                    }
                });
            }
        });
        (path, sessions)
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn tcp_connections_reach_the_container_and_half_close() {
        let dir = TempDir::new("publish-tcp");
        let (socket, sessions) = fake_machine(&dir);
        // The "container's" server: reads the request to EOF, then answers.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let container_port = server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in server.incoming() {
                let mut conn = conn.unwrap();
                let mut request = Vec::new();
                conn.read_to_end(&mut request).unwrap();
                conn.write_all(b"got: ").unwrap();
                conn.write_all(&request).unwrap();
            }
        });
        let host_port = free_port();
        let mapping = parse_publish(&format!("127.0.0.1:{host_port}:{container_port}")).unwrap();
        let bound = vec![(mapping, bind(&mapping).unwrap())];
        let destination = Destination {
            socket,
            container: "web".into(),
        };
        start(bound, &destination).unwrap();
        for round in 0..2 {
            let mut client = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
            client
                .write_all(format!("hello {round}").as_bytes())
                .unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).unwrap();
            assert_eq!(answer, format!("got: hello {round}"));
        }
        assert_eq!(sessions.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn an_unreachable_container_closes_the_connection() {
        let dir = TempDir::new("publish-refused");
        let (socket, _) = fake_machine(&dir);
        let host_port = free_port();
        let mapping = parse_publish(&format!("127.0.0.1:{host_port}:80")).unwrap();
        let destination = Destination {
            socket,
            container: "gone".into(),
        };
        start(vec![(mapping, bind(&mapping).unwrap())], &destination).unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        let mut rest = Vec::new();
        // Closed at once: EOF or a reset, never data.
        let _ = client.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }

    #[test]
    fn udp_peers_get_flows_that_expire_when_idle() {
        let dir = TempDir::new("publish-udp");
        let (socket, sessions) = fake_machine(&dir);
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let container_port = echo.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                let (n, peer) = echo.recv_from(&mut buf).unwrap();
                let mut reply = b"echo ".to_vec();
                reply.extend_from_slice(&buf[..n]);
                echo.send_to(&reply, peer).unwrap();
            }
        });
        let free = UdpSocket::bind("127.0.0.1:0").unwrap();
        let host_port = free.local_addr().unwrap().port();
        drop(free);
        let mapping =
            parse_publish(&format!("127.0.0.1:{host_port}:{container_port}/udp")).unwrap();
        let HostSocket::Udp(host) = bind(&mapping).unwrap() else {
            panic!("udp mapping bound as tcp")
        };
        let destination = Destination {
            socket,
            container: "web".into(),
        };
        let idle = Duration::from_millis(300);
        std::thread::spawn(move || serve_udp(host, mapping, destination, idle));

        let ask = |client: &UdpSocket, text: &str| {
            client
                .send_to(text.as_bytes(), ("127.0.0.1", host_port))
                .unwrap();
            let mut buf = [0u8; 2048];
            let n = client.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        for c in [&a, &b] {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        assert_eq!(ask(&a, "one"), "echo one");
        assert_eq!(ask(&a, "two"), "echo two");
        assert_eq!(ask(&b, "three"), "echo three");
        // One flow per peer.
        assert_eq!(sessions.load(Ordering::SeqCst), 2);
        // Idle past the limit: the next datagram opens a new flow.
        std::thread::sleep(idle + UDP_SWEEP * 2);
        assert_eq!(ask(&a, "four"), "echo four");
        assert_eq!(sessions.load(Ordering::SeqCst), 3);
    }
}
