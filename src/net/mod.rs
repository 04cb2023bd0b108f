//! User-mode networking on the host side: published ports (`-p`, docker's syntax) and
//! the passt processes that give a VM TCP/UDP networking without root, tap or bridge.
//!
//! - [`PortForward`]: one published port, parsed from `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]`.
//! - [`passt`]: finding, starting and stopping passt, one process per user-mode NIC.
//! - [`prepare`]: what a VMM process does before its jail and seccomp for the NICs of
//!   its configuration: start passt for `user` NICs, connect `stream=PATH` ones.
//!
//! The guest's addressing is fixed (QEMU's user-mode network, which guests and users
//! know): the guest is [`GUEST_ADDRESS`]/24, the gateway [`GATEWAY`] is the host's
//! loopback (passt maps it), and DNS queries to [`DNS`] go to the host's resolver.

pub mod passt;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::devices::virtio::net::{NetBackend, NetConfig};

/// The guest's address on a user-mode network.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Its prefix length.
pub const GUEST_PREFIX: u8 = 24;
/// The gateway; connections to it reach the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS server the guest is given; passt forwards its queries to the host's resolver.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The MTU passt works with (its default: the largest 802.3 frame, rounded down).
pub const MTU: u32 = 65520;

/// The transport of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One published port: connections (datagrams) to `host_ip:host_port` on the host go to
/// `guest_port` in the guest. `host_ip` `None` means every address (docker's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortForward {
    pub protocol: Protocol,
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    #[error("\"{0}\" is not [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]")]
    Syntax(String),
    #[error("\"{spec}\": {what} \"{value}\" is not a port number (1-65535)")]
    Port {
        spec: String,
        what: &'static str,
        value: String,
    },
    #[error("\"{spec}\": \"{value}\" is not an IP address")]
    Address { spec: String, value: String },
    #[error("\"{spec}\": unknown protocol \"{value}\" (tcp or udp)")]
    Protocol { spec: String, value: String },
    #[error("host port {0} is published twice")]
    Duplicate(String),
}

impl FromStr for PortForward {
    type Err = PortError;

    /// Docker's `-p` syntax without ranges: `8080:80`, `127.0.0.1:8080:80/udp`,
    /// `[::1]:8080:80`.
    fn from_str(spec: &str) -> Result<Self, PortError> {
        let syntax = || PortError::Syntax(spec.to_string());
        let (ports, protocol) = match spec.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some((_, other)) => {
                return Err(PortError::Protocol {
                    spec: spec.to_string(),
                    value: other.to_string(),
                })
            }
            None => (spec, Protocol::Tcp),
        };
        let (rest, guest) = ports.rsplit_once(':').ok_or_else(syntax)?;
        let (host_ip, host) = match rest.rsplit_once(':') {
            Some((ip, host)) => (Some(ip), host),
            None => (None, rest),
        };
        let port = |what, value: &str| {
            value
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0 && value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| PortError::Port {
                    spec: spec.to_string(),
                    what,
                    value: value.to_string(),
                })
        };
        let host_ip = match host_ip {
            None | Some("") => None,
            Some(ip) => {
                let bare = ip
                    .strip_prefix('[')
                    .and_then(|ip| ip.strip_suffix(']'))
                    .unwrap_or(ip);
                Some(bare.parse::<IpAddr>().map_err(|_| PortError::Address {
                    spec: spec.to_string(),
                    value: ip.to_string(),
                })?)
            }
        };
        Ok(Self {
            protocol,
            host_ip,
            host_port: port("host port", host)?,
            guest_port: port("container port", guest)?,
        })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            None => {}
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.guest_port,
            self.protocol.name()
        )
    }
}

impl Serialize for PortForward {
    fn serialize<S: serde::Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        self.to_string().serialize(out)
    }
}

impl<'de> Deserialize<'de> for PortForward {
    fn deserialize<D: serde::Deserializer<'de>>(input: D) -> Result<Self, D::Error> {
        String::deserialize(input)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl PortForward {
    /// The host address it binds: `host_ip`, or every IPv4 address.
    pub fn host_socket_address(&self) -> SocketAddr {
        SocketAddr::new(
            self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            self.host_port,
        )
    }

    /// passt's `-t`/`-u` value: `[ADDR/]HOSTPORT:GUESTPORT`.
    pub fn passt_spec(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{ip}/{}:{}", self.host_port, self.guest_port),
            None => format!("{}:{}", self.host_port, self.guest_port),
        }
    }

    /// Fails with a one-line reason when the host port cannot be bound now (another
    /// process has it). The port is released again before this returns.
    pub fn check_free(&self) -> Result<(), std::io::Error> {
        let address = self.host_socket_address();
        match self.protocol {
            Protocol::Tcp => TcpListener::bind(address).map(drop),
            Protocol::Udp => UdpSocket::bind(address).map(drop),
        }
    }
}

/// Refuses two forwards of the same host port and protocol (on any address: docker
/// refuses them as well, and passt would fail to bind the second).
pub fn check_distinct(ports: &[PortForward]) -> Result<(), PortError> {
    for (i, port) in ports.iter().enumerate() {
        if ports[..i]
            .iter()
            .any(|p| p.protocol == port.protocol && p.host_port == port.host_port)
        {
            return Err(PortError::Duplicate(format!(
                "{}/{}",
                port.host_port,
                port.protocol.name()
            )));
        }
    }
    Ok(())
}

/// What a VMM process started or connected for its NICs before the jail; dropping it
/// stops the passt processes.
#[derive(Debug, Default)]
pub struct HostNetworks {
    passts: Vec<passt::Passt>,
}

impl HostNetworks {
    /// In a forked child (the jailed VMM), the passt processes are its parent's to stop:
    /// forget them here without touching them.
    pub fn forget(mut self) {
        for passt in self.passts.drain(..) {
            passt.forget();
        }
    }
}

/// Before the jail and seccomp: starts passt for each `user` NIC of `nets` (with
/// `passt_binary`, or passt from PATH) and connects each `stream=PATH` NIC, leaving the
/// connected sockets for the devices (`Net::new` takes them in order).
pub fn prepare(
    nets: &[NetConfig],
    passt_binary: Option<&Path>,
) -> Result<HostNetworks, passt::PasstError> {
    let mut host = HostNetworks::default();
    for nic in nets {
        match &nic.backend {
            NetBackend::Tap(_) => {}
            NetBackend::Stream(path) => {
                crate::devices::virtio::net::stream::preconnect(path)
                    .map_err(passt::PasstError::Connect)?;
            }
            NetBackend::User(user) => {
                let options = passt::PasstOptions {
                    binary: passt_binary.map(Path::to_path_buf),
                    ports: user.ports.clone(),
                };
                let (process, socket) = passt::Passt::start(&options)?;
                crate::devices::virtio::net::stream::prepare_user(socket);
                host.passts.push(process);
            }
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(spec: &str) -> PortForward {
        spec.parse().unwrap()
    }

    #[test]
    fn docker_port_syntax() {
        assert_eq!(
            port("8080:80"),
            PortForward {
                protocol: Protocol::Tcp,
                host_ip: None,
                host_port: 8080,
                guest_port: 80
            }
        );
        let udp = port("127.0.0.1:5353:53/udp");
        assert_eq!(udp.protocol, Protocol::Udp);
        assert_eq!(udp.host_ip, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!((udp.host_port, udp.guest_port), (5353, 53));
        assert_eq!(udp.passt_spec(), "127.0.0.1/5353:53");
        assert_eq!(port("8080:80/tcp").passt_spec(), "8080:80");
        let v6 = port("[::1]:8080:80");
        assert_eq!(v6.host_ip, Some("::1".parse().unwrap()));
        assert_eq!(port(":8080:80").host_ip, None);
        for spec in ["8080:80", "127.0.0.1:1:65535/udp", "[::1]:8080:80/tcp"] {
            let parsed = port(spec);
            assert_eq!(port(&parsed.to_string()), parsed);
        }
        assert_eq!(port("8080:80").to_string(), "8080:80/tcp");
    }

    #[test]
    fn bad_ports_are_named() {
        let err = |spec: &str| spec.parse::<PortForward>().unwrap_err().to_string();
        assert_eq!(
            err("80"),
            "\"80\" is not [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]"
        );
        assert_eq!(
            err("0:80"),
            "\"0:80\": host port \"0\" is not a port number (1-65535)"
        );
        assert_eq!(
            err("8080:70000"),
            "\"8080:70000\": container port \"70000\" is not a port number (1-65535)"
        );
        assert_eq!(
            err("8080:80/sctp"),
            "\"8080:80/sctp\": unknown protocol \"sctp\" (tcp or udp)"
        );
        assert_eq!(
            err("localhost:8080:80"),
            "\"localhost:8080:80\": \"localhost\" is not an IP address"
        );
        for bad in [
            "+80:80",
            "8000-8010:80",
            "a:b",
            "8080:",
            ":80",
            "1.2.3.4:5:6:7",
        ] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicates_and_busy_ports_are_refused() {
        let ports = [port("8080:80"), port("8080:81/udp")];
        check_distinct(&ports).unwrap();
        let ports = [port("8080:80"), port("127.0.0.1:8080:81")];
        assert_eq!(
            check_distinct(&ports).unwrap_err().to_string(),
            "host port 8080/tcp is published twice"
        );
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = busy.local_addr().unwrap().port();
        let forward = port(&format!("127.0.0.1:{taken}:80"));
        assert_eq!(
            forward.check_free().unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        drop(busy);
        forward.check_free().unwrap();
    }

    #[test]
    fn json_form_is_the_text_form() {
        let forward = port("127.0.0.1:8080:80/udp");
        let json = serde_json::to_string(&forward).unwrap();
        assert_eq!(json, r#""127.0.0.1:8080:80/udp""#);
        assert_eq!(serde_json::from_str::<PortForward>(&json).unwrap(), forward);
        assert!(serde_json::from_str::<PortForward>(r#""x""#).is_err());
    }
}
