//! Interface configuration with the classic ioctls (no netlink): bring an interface up,
//! give it an IPv4 address and netmask, add a default route.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::agent::protocol::NetConfig;

/// Why the network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid address {0:?} (expected A.B.C.D/PREFIX)")]
    BadAddress(String),
    #[error("invalid gateway {0:?}")]
    BadGateway(String),
    #[error("invalid MAC address {0:?}")]
    BadMac(String),
    #[error("interface name {0:?} is too long")]
    BadName(String),
    #[error("cannot {what} on {ifname}")]
    Ioctl {
        what: &'static str,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a configuration socket")]
    Socket(#[source] io::Error),
}

/// Parses `A.B.C.D/PREFIX` into the address and the netmask.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), NetError> {
    let bad = || NetError::BadAddress(text.to_string());
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u32 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ok((addr, Ipv4Addr::from(mask)))
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; every bit pattern is valid.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

struct Ctl {
    sock: OwnedFd,
}

impl Ctl {
    fn new() -> Result<Self, NetError> {
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: the descriptor was just created and is owned by nothing else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { sock })
    }

    fn ifreq(ifname: &str) -> Result<libc::ifreq, NetError> {
        if ifname.len() >= libc::IFNAMSIZ {
            return Err(NetError::BadName(ifname.to_string()));
        }
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl<T>(
        &self,
        request: libc::c_ulong,
        arg: &mut T,
        what: &'static str,
        ifname: &str,
    ) -> Result<(), NetError> {
        // SAFETY: `arg` is the structure type the request expects and lives across the call.
        let ret = unsafe { libc::ioctl(self.sock.as_raw_fd(), request, arg as *mut T) };
        if ret < 0 {
            return Err(NetError::Ioctl {
                what,
                ifname: ifname.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<(), NetError> {
        let mut req = Self::ifreq(ifname)?;
        req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        self.ioctl(libc::SIOCSIFMTU, &mut req, "set the MTU", ifname)
    }

    fn up(&self, ifname: &str) -> Result<(), NetError> {
        let mut req = Self::ifreq(ifname)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req, "read flags", ifname)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, "bring up", ifname)
    }
}

/// Gives `ifname` the hardware address `mac` (`52:54:00:12:34:56`).
pub fn set_mac(ifname: &str, mac: &str) -> Result<(), NetError> {
    let bytes = crate::devices::virtio::net::parse_mac(mac)
        .map_err(|_| NetError::BadMac(mac.to_string()))?;
    let ctl = Ctl::new()?;
    let mut req = Ctl::ifreq(ifname)?;
    // SAFETY: sockaddr is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in addr.sa_data.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = addr;
    ctl.ioctl(libc::SIOCSIFHWADDR, &mut req, "set the MAC address", ifname)
}

/// Brings an interface up (e.g. `lo`).
pub fn set_up(ifname: &str) -> Result<(), NetError> {
    Ctl::new()?.up(ifname)
}

/// Gives `ifname` the address (and MTU) of `config`, brings it up and adds the default
/// route.
pub fn configure(ifname: &str, config: &NetConfig) -> Result<(), NetError> {
    let (addr, mask) = parse_cidr(&config.address)?;
    let gateway = config
        .gateway
        .as_deref()
        .map(|g| {
            g.parse::<Ipv4Addr>()
                .map_err(|_| NetError::BadGateway(g.to_string()))
        })
        .transpose()?;
    let ctl = Ctl::new()?;
    let mut req = Ctl::ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ctl.ioctl(libc::SIOCSIFADDR, &mut req, "set the address", ifname)?;
    let mut req = Ctl::ifreq(ifname)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ctl.ioctl(libc::SIOCSIFNETMASK, &mut req, "set the netmask", ifname)?;
    if let Some(mtu) = config.mtu {
        ctl.set_mtu(ifname, mtu)?;
    }
    ctl.up(ifname)?;
    if let Some(gw) = gateway {
        // SAFETY: rtentry is plain data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        match ctl.ioctl(libc::SIOCADDRT, &mut rt, "add the default route", ifname) {
            // A second Run in the same VM finds the route already there.
            Err(NetError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {}
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_to_address_and_mask() {
        assert_eq!(
            parse_cidr("10.0.0.2/24").unwrap(),
            (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(255, 255, 255, 0))
        );
        assert_eq!(
            parse_cidr("172.16.5.9/12").unwrap().1,
            Ipv4Addr::new(255, 240, 0, 0)
        );
        assert_eq!(parse_cidr("1.2.3.4/32").unwrap().1, Ipv4Addr::BROADCAST);
        assert_eq!(parse_cidr("1.2.3.4/0").unwrap().1, Ipv4Addr::UNSPECIFIED);
        for bad in ["1.2.3.4", "1.2.3.4/33", "1.2.3/8", "x/8", "1.2.3.4/"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr_in(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // Port (2 bytes) then the address bytes in order.
        let bytes: Vec<u8> = sa.sa_data[2..6].iter().map(|&b| b as u8).collect();
        assert_eq!(bytes, [10, 0, 0, 1]);
    }

    #[test]
    fn long_names_are_refused() {
        assert!(matches!(
            set_up("a-very-long-interface-name"),
            Err(NetError::BadName(_))
        ));
    }
}
