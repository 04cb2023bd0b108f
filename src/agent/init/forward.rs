//! The machine's end of a published port (`Message::Forward`): connect to the
//! container's address on the bridge, acknowledge, then relay the host's stream to that
//! connection (TCP) or socket (UDP) until either side ends.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Duration;

use super::session::SessionError;
use crate::agent::protocol::{write_message, ForwardSpec, Message, Transport};
use crate::agent::relay;

/// How long a connection to the container may take (a listener that is not there
/// refuses at once; this bounds a container that drops SYNs).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one forward over `stream` to the container at `address` (or its lookup error).
pub(super) fn serve<S>(
    stream: &S,
    write: &Mutex<()>,
    address: Result<Ipv4Addr, String>,
    spec: &ForwardSpec,
) -> Result<(), SessionError>
where
    S: AsRawFd + Sync,
    for<'a> &'a S: Read + Write,
{
    let send = |msg: &Message| {
        let _guard = write.lock().unwrap_or_else(|p| p.into_inner());
        write_message(&mut &*stream, msg)
    };
    let address = match address {
        Ok(a) => a,
        Err(text) => {
            send(&Message::Error(text))?;
            return Ok(());
        }
    };
    let target = SocketAddr::from((address, spec.port));
    match spec.transport {
        Transport::Tcp => {
            let conn = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                Ok(c) => c,
                Err(e) => {
                    send(&Message::Error(format!(
                        "cannot connect to {target} in container {:?}: {e}",
                        spec.container
                    )))?;
                    return Ok(());
                }
            };
            let _ = conn.set_nodelay(true);
            send(&Message::Forwarding)?;
            relay::splice::<S, TcpStream>(stream, &conn);
        }
        Transport::Udp => {
            let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .and_then(|s| s.connect(target).map(|()| s))
            {
                Ok(s) => s,
                Err(e) => {
                    send(&Message::Error(format!(
                        "cannot open a UDP socket to {target}: {e}"
                    )))?;
                    return Ok(());
                }
            };
            send(&Message::Forwarding)?;
            if let Err(e) = relay::udp_over_stream(stream, &socket) {
                log::info!("udp forward to {target}: {e}");
            }
        }
    }
    Ok(())
}
