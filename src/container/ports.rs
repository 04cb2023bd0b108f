//! `-p` / `--publish`: docker's syntax for a host port that reaches a container's (or a
//! machine's) port, and binding the host side before anything starts so that a port in
//! use is refused with one clear line.
//!
//! `[HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]`; HOSTIP is an IPv4 address or an IPv6
//! one in brackets (`[::1]:8080:80`), all interfaces (`0.0.0.0`) by default, as docker
//! does. Port ranges and docker's random host port (`-p 80`) are not supported.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};

use super::ContainerError;
pub use crate::agent::protocol::Transport;

/// One `-p` mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_port: u16,
    pub transport: Transport,
}

impl PortMapping {
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_addr(),
            self.container_port,
            self.transport
        )
    }
}

fn port(text: &str, what: &str, spec: &str) -> Result<u16, ContainerError> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ if text.contains('-') => Err(usage(spec, "port ranges are not supported")),
        _ => Err(usage(
            spec,
            &format!("{what} {text:?} is not a port (1-65535)"),
        )),
    }
}

fn usage(spec: &str, why: &str) -> ContainerError {
    ContainerError::Usage(format!(
        "-p {spec}: {why} (expected [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp])"
    ))
}

/// Parses one `-p` value.
pub fn parse_publish(spec: &str) -> Result<PortMapping, ContainerError> {
    let (ports, transport) = match spec.rsplit_once('/') {
        Some((p, "tcp")) => (p, Transport::Tcp),
        Some((p, "udp")) => (p, Transport::Udp),
        Some((_, other)) => {
            return Err(usage(
                spec,
                &format!("unknown protocol {other:?} (tcp or udp)"),
            ))
        }
        None => (spec, Transport::Tcp),
    };
    // An IPv6 host address is bracketed; anything else splits at its colons.
    let (host_ip, rest) = if let Some(after) = ports.strip_prefix('[') {
        let (ip, rest) = after
            .split_once("]:")
            .ok_or_else(|| usage(spec, "unclosed [ in the host address"))?;
        let ip = ip
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| usage(spec, &format!("{ip:?} is not an IPv6 address")))?;
        (Some(IpAddr::V6(ip)), rest)
    } else {
        match ports.matches(':').count() {
            2 => {
                let (ip, rest) = ports.split_once(':').unwrap_or_default();
                let ip = ip
                    .parse::<Ipv4Addr>()
                    .map_err(|_| usage(spec, &format!("{ip:?} is not an IPv4 address")))?;
                (Some(IpAddr::V4(ip)), rest)
            }
            1 => (None, ports),
            0 => {
                return Err(usage(
                    spec,
                    "a host port is required (random host ports are not supported)",
                ))
            }
            _ => return Err(usage(spec, "too many ':'")),
        }
    };
    let (host, container) = rest
        .split_once(':')
        .ok_or_else(|| usage(spec, "expected HOSTPORT:CONTAINERPORT"))?;
    if host.is_empty() {
        return Err(usage(
            spec,
            "a host port is required (random host ports are not supported)",
        ));
    }
    Ok(PortMapping {
        host_ip: host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        host_port: port(host, "host port", spec)?,
        container_port: port(container, "container port", spec)?,
        transport,
    })
}

/// Parses every `-p` value; the same host address, port and protocol twice is refused.
pub fn parse_all(specs: &[String]) -> Result<Vec<PortMapping>, ContainerError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for spec in specs {
        let mapping = parse_publish(spec)?;
        if !seen.insert((mapping.host_addr(), mapping.transport)) {
            return Err(ContainerError::Usage(format!(
                "-p {spec}: host port {}/{} is published twice",
                mapping.host_addr(),
                mapping.transport
            )));
        }
        out.push(mapping);
    }
    Ok(out)
}

/// A host socket bound for one mapping.
pub enum HostSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// Binds the host side of `mapping`; a port in use is a one-line error.
pub fn bind(mapping: &PortMapping) -> Result<HostSocket, ContainerError> {
    let addr = mapping.host_addr();
    let bound = match mapping.transport {
        Transport::Tcp => TcpListener::bind(addr).map(HostSocket::Tcp),
        Transport::Udp => UdpSocket::bind(addr).map(HostSocket::Udp),
    };
    bound.map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::AddrInUse {
            "is already in use".to_string()
        } else {
            format!("cannot be bound: {e}")
        };
        ContainerError::Usage(format!(
            "-p {mapping}: host port {addr}/{} {why}",
            mapping.transport
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(ip: &str, host: u16, container: u16, transport: Transport) -> PortMapping {
        PortMapping {
            host_ip: ip.parse().unwrap(),
            host_port: host,
            container_port: container,
            transport,
        }
    }

    #[test]
    fn docker_forms_parse() {
        use Transport::*;
        assert_eq!(
            parse_publish("8080:80").unwrap(),
            m("0.0.0.0", 8080, 80, Tcp)
        );
        assert_eq!(
            parse_publish("127.0.0.1:8080:80/tcp").unwrap(),
            m("127.0.0.1", 8080, 80, Tcp)
        );
        assert_eq!(
            parse_publish("5353:53/udp").unwrap(),
            m("0.0.0.0", 5353, 53, Udp)
        );
        assert_eq!(
            parse_publish("[::1]:8443:443").unwrap(),
            m("::1", 8443, 443, Tcp)
        );
        assert_eq!(
            parse_publish("127.0.0.1:8080:80/udp").unwrap().to_string(),
            "127.0.0.1:8080:80/udp"
        );
    }

    #[test]
    fn bad_forms_are_one_line_errors() {
        for bad in [
            "80",
            ":80",
            "8080:",
            "0:80",
            "8080:65536",
            "8080-8081:80-81",
            "8080:80/sctp",
            "localhost:8080:80",
            "1.2.3.4:5:6:7",
            "[::1:8080:80",
            "[nope]:1:2",
            "",
        ] {
            let err = parse_publish(bad).expect_err(bad).to_string();
            assert!(err.starts_with(&format!("-p {bad}: ")), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        assert!(parse_publish("8080-8081:80")
            .unwrap_err()
            .to_string()
            .contains("ranges"));
    }

    #[test]
    fn duplicates_are_refused_but_tcp_and_udp_may_share_a_port() {
        let ok = parse_all(&["8080:80".into(), "8080:80/udp".into()]).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(parse_all(&["8080:80".into(), "0.0.0.0:8080:81".into()]).is_err());
    }

    #[test]
    fn a_port_in_use_is_refused() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mapping = parse_publish(&format!("127.0.0.1:{port}:80")).unwrap();
        let err = bind(&mapping).err().unwrap().to_string();
        assert!(err.contains("is already in use"), "{err}");
        drop(taken);
        assert!(matches!(bind(&mapping), Ok(HostSocket::Tcp(_))));
        let free = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        let udp = parse_publish(&format!("127.0.0.1:{port}:53/udp")).unwrap();
        assert!(bind(&udp).is_err());
        drop(free);
        assert!(matches!(bind(&udp), Ok(HostSocket::Udp(_))));
    }
}
