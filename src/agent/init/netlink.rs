//! Netlink from the static agent, with hand-built messages over `libc` sockets (no
//! crate: the rtnetlink crates pull in an async runtime, and nothing may link a C
//! library): rtnetlink for links, addresses and routes, nfnetlink batches for nf_tables
//! (see [`super::nft`]).
//!
//! A message is built with [`NlMsg`] (header, family header, attributes, nests), sent
//! with [`Netlink::transact`], which waits for the kernel's acknowledgement of every
//! message it asked one for. Constants carry the names and values of the kernel's uapi
//! headers (`linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_link.h`,
//! `linux/if_addr.h`, `linux/veth.h`); all integers are in the host's byte order.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// linux/netlink.h
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;

// linux/rtnetlink.h
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_NEWROUTE: u16 = 24;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

// linux/if_link.h, linux/veth.h
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;

// linux/if_addr.h
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

/// `IFF_UP` of linux/if.h.
const IFF_UP: u32 = 1;
/// The loopback device's index in every network namespace (`LOOPBACK_IFINDEX`).
pub const LOOPBACK_INDEX: u32 = 1;

/// Why a netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    #[error("netlink send")]
    Send(#[source] io::Error),
    #[error("netlink receive")]
    Receive(#[source] io::Error),
    #[error("the kernel refused to {what}")]
    Refused {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("malformed netlink reply")]
    Malformed,
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("no interface named {0:?}")]
    NoSuchLink(String),
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// One netlink message under construction: `nlmsghdr`, a family header, attributes.
#[derive(Debug, Clone)]
pub struct NlMsg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl NlMsg {
    /// A message of `kind` with `flags`, sequence number `seq` and port id 0 (the kernel).
    pub fn new(kind: u16, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        Self {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends a fixed family header (e.g. `ifinfomsg`), padded to 4 bytes.
    pub fn header(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Appends an attribute.
    pub fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = (NLA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn attr_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A big-endian u32 (nf_tables' numbers are in network order).
    pub fn attr_be32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_be_bytes())
    }

    /// A NUL-terminated string.
    pub fn attr_str(&mut self, kind: u16, text: &str) -> &mut Self {
        let mut data = text.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    /// Opens a nested attribute; attributes up to the matching [`NlMsg::end`] go inside.
    pub fn begin(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.attr(kind, &[])
    }

    /// Closes the innermost nested attribute.
    pub fn end(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The finished message, its length filled in (open nests are closed).
    pub fn finish(mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end();
        }
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `struct ifinfomsg`: family, type, index, flags, change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = libc::AF_UNSPEC as u8;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

fn check_name(name: &str) -> Result<(), NetlinkError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0', ' ']) {
        return Err(NetlinkError::BadName(name.to_string()));
    }
    Ok(())
}

const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;

/// `ip link add NAME up type bridge`.
pub fn new_bridge(seq: u32, name: &str) -> Result<Vec<u8>, NetlinkError> {
    check_name(name)?;
    let mut m = NlMsg::new(RTM_NEWLINK, CREATE, seq);
    m.header(&ifinfomsg(0, IFF_UP, IFF_UP))
        .attr_str(IFLA_IFNAME, name)
        .begin(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, "bridge")
        .end();
    Ok(m.finish())
}

/// `ip link add NAME up master MASTER type veth peer name PEER netns NETNS`: one end
/// on the bridge, the other created inside the namespace `netns` (an open
/// `/proc/.../ns/net`), where its name cannot clash with the VM's own. The peer stays
/// down: the kernel configures it before the pair is joined, and a veth without its
/// peer refuses to come up (ENOTCONN); bring it up from inside with [`set_up`].
pub fn new_veth(
    seq: u32,
    name: &str,
    master: u32,
    peer: &str,
    netns: RawFd,
) -> Result<Vec<u8>, NetlinkError> {
    check_name(name)?;
    check_name(peer)?;
    let mut m = NlMsg::new(RTM_NEWLINK, CREATE, seq);
    m.header(&ifinfomsg(0, IFF_UP, IFF_UP))
        .attr_str(IFLA_IFNAME, name)
        .attr_u32(IFLA_MASTER, master)
        .begin(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, "veth")
        .begin(IFLA_INFO_DATA)
        .begin(VETH_INFO_PEER)
        .header(&ifinfomsg(0, 0, 0))
        .attr_str(IFLA_IFNAME, peer)
        .attr_u32(IFLA_NET_NS_FD, netns as u32)
        .end()
        .end()
        .end();
    Ok(m.finish())
}

/// `ip link set dev #INDEX up`.
pub fn set_up(seq: u32, index: u32) -> Vec<u8> {
    let mut m = NlMsg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    m.header(&ifinfomsg(index, IFF_UP, IFF_UP));
    m.finish()
}

/// `ip link del NAME`.
pub fn del_link(seq: u32, name: &str) -> Result<Vec<u8>, NetlinkError> {
    check_name(name)?;
    let mut m = NlMsg::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    m.header(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
    Ok(m.finish())
}

/// `ip link show NAME` (the reply's `ifinfomsg` carries the index).
pub fn get_link(seq: u32, name: &str) -> Result<Vec<u8>, NetlinkError> {
    check_name(name)?;
    let mut m = NlMsg::new(RTM_GETLINK, NLM_F_REQUEST, seq);
    m.header(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
    Ok(m.finish())
}

/// `ip addr add ADDR/PREFIX dev #INDEX`.
pub fn new_addr(seq: u32, index: u32, addr: Ipv4Addr, prefix: u8) -> Vec<u8> {
    let mut m = NlMsg::new(RTM_NEWADDR, CREATE, seq);
    let mut ifa = [0u8; 8];
    ifa[0] = libc::AF_INET as u8;
    ifa[1] = prefix;
    ifa[3] = RT_SCOPE_UNIVERSE;
    ifa[4..8].copy_from_slice(&index.to_ne_bytes());
    m.header(&ifa)
        .attr(IFA_LOCAL, &addr.octets())
        .attr(IFA_ADDRESS, &addr.octets());
    m.finish()
}

/// `ip route add default via GATEWAY dev #INDEX`.
pub fn new_default_route(seq: u32, index: u32, gateway: Ipv4Addr) -> Vec<u8> {
    let mut m = NlMsg::new(RTM_NEWROUTE, CREATE, seq);
    let mut rtm = [0u8; 12];
    rtm[0] = libc::AF_INET as u8;
    rtm[4] = RT_TABLE_MAIN;
    rtm[5] = RTPROT_BOOT;
    rtm[6] = RT_SCOPE_UNIVERSE;
    rtm[7] = RTN_UNICAST;
    m.header(&rtm)
        .attr(RTA_GATEWAY, &gateway.octets())
        .attr_u32(RTA_OIF, index);
    m.finish()
}

/// One message of a reply: its type, sequence number and payload.
struct Reply<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a received datagram into its messages.
fn replies(mut data: &[u8]) -> Result<Vec<Reply<'_>>, NetlinkError> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().map_err(|_| NetlinkError::Malformed)?)
            as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(NetlinkError::Malformed);
        }
        out.push(Reply {
            kind: u16::from_ne_bytes([data[4], data[5]]),
            seq: u32::from_ne_bytes(
                data[8..12]
                    .try_into()
                    .map_err(|_| NetlinkError::Malformed)?,
            ),
            payload: &data[NLMSG_HDRLEN..len],
        });
        data = &data[align4(len).min(data.len())..];
    }
    Ok(out)
}

/// The errno of an `NLMSG_ERROR` payload (0 is an acknowledgement).
fn error_code(payload: &[u8]) -> Result<i32, NetlinkError> {
    let code = payload.get(..4).ok_or(NetlinkError::Malformed)?;
    Ok(-i32::from_ne_bytes(
        code.try_into().map_err(|_| NetlinkError::Malformed)?,
    ))
}

/// A netlink socket of one protocol, bound to the network namespace of the thread that
/// opened it (it stays there whatever that thread does next).
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// `protocol`: `NETLINK_ROUTE` or `NETLINK_NETFILTER`.
    pub fn open(protocol: libc::c_int) -> Result<Self, NetlinkError> {
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: the descriptor was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 1 })
    }

    /// A fresh sequence number for the next message.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, data: &[u8]) -> Result<(), NetlinkError> {
        // SAFETY: a zeroed sockaddr_nl with the family set addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and the address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                data.as_ptr() as *const libc::c_void,
                data.len(),
                0,
                &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(NetlinkError::Send(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn receive(&self, buf: &mut [u8]) -> Result<usize, NetlinkError> {
        loop {
            // SAFETY: the buffer is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(NetlinkError::Receive(e));
            }
        }
    }

    /// Sends `data` (one message or a batch) and waits until the kernel has answered
    /// each of `acks` (sequence numbers of messages sent with `NLM_F_ACK`); the first
    /// refusal is the error, `what` names the request.
    pub fn transact(&mut self, data: &[u8], acks: &[u32], what: &str) -> Result<(), NetlinkError> {
        self.send(data)?;
        let mut pending: Vec<u32> = acks.to_vec();
        let mut buf = vec![0u8; 16 * 1024];
        let mut failure = None;
        while !pending.is_empty() {
            let n = self.receive(&mut buf)?;
            for reply in replies(&buf[..n])? {
                if reply.kind != NLMSG_ERROR {
                    continue;
                }
                pending.retain(|&s| s != reply.seq);
                let code = error_code(reply.payload)?;
                if code != 0 && failure.is_none() {
                    failure = Some(code);
                }
            }
        }
        match failure {
            None => Ok(()),
            Some(code) => Err(NetlinkError::Refused {
                what: what.to_string(),
                source: io::Error::from_raw_os_error(code),
            }),
        }
    }

    /// The index of the interface `name` in this socket's namespace.
    pub fn link_index(&mut self, name: &str) -> Result<u32, NetlinkError> {
        let seq = self.next_seq();
        self.send(&get_link(seq, name)?)?;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = self.receive(&mut buf)?;
            for reply in replies(&buf[..n])? {
                if reply.seq != seq {
                    continue;
                }
                match reply.kind {
                    RTM_NEWLINK => {
                        let index = reply.payload.get(4..8).ok_or(NetlinkError::Malformed)?;
                        return Ok(u32::from_ne_bytes(
                            index.try_into().map_err(|_| NetlinkError::Malformed)?,
                        ));
                    }
                    NLMSG_ERROR => {
                        let code = error_code(reply.payload)?;
                        if code == libc::ENODEV {
                            return Err(NetlinkError::NoSuchLink(name.to_string()));
                        }
                        return Err(NetlinkError::Refused {
                            what: format!("look up interface {name}"),
                            source: io::Error::from_raw_os_error(code),
                        });
                    }
                    NLMSG_DONE => return Err(NetlinkError::NoSuchLink(name.to_string())),
                    _ => {}
                }
            }
        }
    }

    /// Sends one request built for sequence number `seq` and waits for its ack.
    pub fn request(&mut self, seq: u32, data: &[u8], what: &str) -> Result<(), NetlinkError> {
        self.transact(data, &[seq], what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16s(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    fn u32s(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    /// Concatenates byte slices.
    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn nlhdr(len: u32, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        cat(&[&u32s(len), &u16s(kind), &u16s(flags), &u32s(seq), &u32s(0)])
    }

    /// The encoding `ip link add br0 up type bridge` sends, laid out from the uapi
    /// structures: nlmsghdr (16), ifinfomsg (16), IFLA_IFNAME "br0\0" (8),
    /// IFLA_LINKINFO { IFLA_INFO_KIND "bridge\0" (4+7, padded to 12) } (16).
    #[test]
    fn bridge_request_bytes() {
        let got = new_bridge(7, "br0").unwrap();
        let want = cat(&[
            &nlhdr(56, 16, 0x1 | 0x4 | 0x400 | 0x200, 7),
            &[0, 0],
            &u16s(0),
            &u32s(0),
            &u32s(1),
            &u32s(1),
            &u16s(8),
            &u16s(3),
            b"br0\0",
            &u16s(16),
            &u16s(18),
            &u16s(11),
            &u16s(1),
            b"bridge\0\0",
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn veth_request_nests_the_peer() {
        let got = new_veth(3, "hv2", 5, "eth0", 9).unwrap();
        let peer = cat(&[
            &[0, 0],
            &u16s(0),
            &u32s(0),
            &u32s(0),
            &u32s(0),
            &u16s(9),
            &u16s(3),
            b"eth0\0\0\0\0",
            &u16s(8),
            &u16s(28),
            &u32s(9),
        ]);
        let peer_attr = cat(&[&u16s(4 + peer.len() as u16), &u16s(1), &peer]);
        let data_attr = cat(&[&u16s(4 + peer_attr.len() as u16), &u16s(2), &peer_attr]);
        let kind_attr = cat(&[&u16s(9), &u16s(1), b"veth\0\0\0\0"]);
        let linkinfo = cat(&[
            &u16s((4 + kind_attr.len() + data_attr.len()) as u16),
            &u16s(18),
            &kind_attr,
            &data_attr,
        ]);
        let body = cat(&[
            &[0, 0],
            &u16s(0),
            &u32s(0),
            &u32s(1),
            &u32s(1),
            &u16s(8),
            &u16s(3),
            b"hv2\0",
            &u16s(8),
            &u16s(10),
            &u32s(5),
            &linkinfo,
        ]);
        let want = cat(&[&nlhdr(16 + body.len() as u32, 16, 0x605, 3), &body]);
        assert_eq!(got, want);
        // The peer's ifinfomsg is 16 bytes, the nest lengths add up.
        assert_eq!(peer.len(), 16 + 12 + 8);
        assert_eq!(got.len(), 16 + 16 + 8 + 8 + linkinfo.len());
    }

    #[test]
    fn address_and_route_request_bytes() {
        let got = new_addr(4, 2, Ipv4Addr::new(172, 30, 0, 2), 16);
        let want = cat(&[
            &nlhdr(40, 20, 0x605, 4),
            &[2, 16, 0, 0],
            &u32s(2),
            &u16s(8),
            &u16s(2),
            &[172, 30, 0, 2],
            &u16s(8),
            &u16s(1),
            &[172, 30, 0, 2],
        ]);
        assert_eq!(got, want);

        let got = new_default_route(5, 2, Ipv4Addr::new(172, 30, 0, 1));
        let want = cat(&[
            &nlhdr(44, 24, 0x605, 5),
            &[2, 0, 0, 0, 254, 3, 0, 1],
            &u32s(0),
            &u16s(8),
            &u16s(5),
            &[172, 30, 0, 1],
            &u16s(8),
            &u16s(4),
            &u32s(2),
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn link_up_and_delete_bytes() {
        let want = cat(&[
            &nlhdr(32, 16, 0x5, 9),
            &[0, 0],
            &u16s(0),
            &u32s(1),
            &u32s(1),
            &u32s(1),
        ]);
        assert_eq!(set_up(9, LOOPBACK_INDEX), want);
        let want = cat(&[
            &nlhdr(40, 17, 0x5, 2),
            &[0; 16],
            &u16s(8),
            &u16s(3),
            b"hv2\0",
        ]);
        assert_eq!(del_link(2, "hv2").unwrap(), want);
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "sixteen-chars-xx", "a/b", "a b"] {
            assert!(new_bridge(1, bad).is_err(), "{bad:?}");
        }
        assert!(new_veth(1, "ok", 1, "", 3).is_err());
    }

    #[test]
    fn replies_are_split_and_errors_read() {
        let mut data = nlhdr(36, NLMSG_ERROR, 0, 4);
        data.extend_from_slice(&(-libc::EEXIST).to_ne_bytes());
        data.extend_from_slice(&nlhdr(16, 0, 0, 4));
        data.extend_from_slice(&nlhdr(20, NLMSG_ERROR, 0, 5));
        data.extend_from_slice(&0i32.to_ne_bytes());
        let got = replies(&data).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].kind, got[0].seq), (NLMSG_ERROR, 4));
        assert_eq!(error_code(got[0].payload).unwrap(), libc::EEXIST);
        assert_eq!(error_code(got[1].payload).unwrap(), 0);
        // A length past the datagram's end is malformed, not a panic.
        let mut bad = nlhdr(64, NLMSG_ERROR, 0, 1);
        bad.extend_from_slice(&[0; 4]);
        assert!(replies(&bad).is_err());
        assert!(error_code(&[1, 2]).is_err());
    }

    /// Real requests, where the tests may change the host: a bridge is made, looked up
    /// and removed again, in a namespace of the test's own so the host is untouched.
    #[test]
    fn bridge_round_trip_in_a_private_namespace() {
        if !crate::agent::init::testutil::is_root() {
            return;
        }
        let done = std::thread::spawn(|| {
            // SAFETY: unshare of the network namespace affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return;
            }
            let mut nl = Netlink::open(libc::NETLINK_ROUTE).unwrap();
            let seq = nl.next_seq();
            nl.request(seq, &new_bridge(seq, "hbtest0").unwrap(), "add")
                .unwrap();
            let index = nl.link_index("hbtest0").unwrap();
            assert!(index > LOOPBACK_INDEX);
            let seq = nl.next_seq();
            let again = nl.request(seq, &new_bridge(seq, "hbtest0").unwrap(), "add");
            assert!(
                matches!(again, Err(NetlinkError::Refused { ref source, .. }) if source.raw_os_error() == Some(libc::EEXIST))
            );
            let seq = nl.next_seq();
            nl.request(
                seq,
                &new_addr(seq, index, Ipv4Addr::new(10, 123, 0, 1), 24),
                "addr",
            )
            .unwrap();
            let seq = nl.next_seq();
            nl.request(seq, &del_link(seq, "hbtest0").unwrap(), "del")
                .unwrap();
            assert!(matches!(
                nl.link_index("hbtest0"),
                Err(NetlinkError::NoSuchLink(_))
            ));
        });
        done.join().unwrap();
    }
}
