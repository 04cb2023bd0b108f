//! The network of a machine's containers, the way docker's default bridge does it: a
//! bridge [`BRIDGE`] with the address [`GATEWAY`]/[`PREFIX`] in the VM, IPv4 forwarding,
//! and masquerading of the bridge's subnet out of any other interface (the VM's eth0,
//! user-mode networking through passt). Each container gets a network namespace of its
//! own with `lo`, and `eth0` — one end of a veth pair whose other end (`hv<N>`) is on the
//! bridge — holding an address of the subnet and a default route through the bridge.
//!
//! The agent makes the namespace itself before the sandbox starts (on a short-lived
//! thread: `unshare(CLONE_NEWNET)` changes only the calling thread) so the container's
//! process finds its network ready when it execs; the sandbox enters it by path
//! (`/proc/<agent>/fd/<N>`, the namespace kept open by the agent while the container
//! runs). Ending the container deletes the veth pair and frees the address.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::netlink::{self, Netlink, NetlinkError, LOOPBACK_INDEX};
use super::nft;

/// The bridge the containers' veth ends join.
pub const BRIDGE: &str = "hearth0";
/// The bridge's address: the containers' gateway. docker's default (172.17/16) is often
/// in use on the host, whose subnet passt gives the VM; this one rarely is.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
pub const PREFIX: u8 = 16;
/// The container's side of its veth pair.
pub const CONTAINER_IFNAME: &str = "eth0";

/// Why the container network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot enable IPv4 forwarding")]
    Forwarding(#[source] io::Error),
    #[error("cannot create a network namespace")]
    Namespace(#[source] io::Error),
    #[error("no free address left on {BRIDGE}")]
    Exhausted,
}

/// How a sandbox joins the namespace the agent prepared (part of its plan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerNet {
    /// A path that opens the namespace (`/proc/<agent pid>/fd/<N>`).
    pub netns: PathBuf,
    /// The container's `/etc/resolv.conf`, when the VM knows a usable resolver.
    pub resolv_conf: Option<String>,
    /// The container's address, for its `/etc/hosts`.
    pub address: Ipv4Addr,
}

/// Host numbers in use on the subnet (the bridge's own is never handed out).
type Leases = Arc<Mutex<BTreeSet<u32>>>;

/// The bridge of a machine, set up once at boot.
pub struct Bridge {
    index: u32,
    leases: Leases,
}

fn subnet_base() -> u32 {
    u32::from(GATEWAY) & (u32::MAX << (32 - u32::from(PREFIX)))
}

/// The lowest free host number of the subnet, from 2 (1 is the gateway) to the last
/// before the broadcast address.
fn lease(in_use: &mut BTreeSet<u32>) -> Option<u32> {
    let last = (1u32 << (32 - u32::from(PREFIX))) - 2;
    let gateway = u32::from(GATEWAY) - subnet_base();
    let free = (1..=last).find(|n| *n != gateway && !in_use.contains(n))?;
    in_use.insert(free);
    Some(free)
}

/// A container's `/etc/resolv.conf` from the VM's: the same resolvers, but not those on
/// the VM's loopback, which the container's namespace cannot reach (as docker filters
/// the host's). `None` when no nameserver is left.
pub fn container_resolv_conf(vm: &str) -> Option<String> {
    let mut out = String::new();
    let mut servers = 0;
    for line in vm.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            let Some(addr) = words
                .next()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
            else {
                continue;
            };
            if addr.is_loopback() {
                continue;
            }
            servers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    (servers > 0).then_some(out)
}

impl Bridge {
    /// Creates the bridge, gives it the gateway address, enables forwarding and installs
    /// the masquerade rule.
    pub fn setup() -> Result<Bridge, BridgeError> {
        let mut nl = Netlink::open(libc::NETLINK_ROUTE)?;
        let seq = nl.next_seq();
        nl.request(
            seq,
            &netlink::new_bridge(seq, BRIDGE)?,
            &format!("create bridge {BRIDGE}"),
        )?;
        let index = nl.link_index(BRIDGE)?;
        let seq = nl.next_seq();
        nl.request(
            seq,
            &netlink::new_addr(seq, index, GATEWAY, PREFIX),
            &format!("give {BRIDGE} the address {GATEWAY}/{PREFIX}"),
        )?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(BridgeError::Forwarding)?;
        let mut nf = Netlink::open(libc::NETLINK_NETFILTER)?;
        let seq = nf.next_seq();
        let (batch, acks) =
            nft::masquerade_batch(seq, Ipv4Addr::from(subnet_base()), PREFIX, BRIDGE);
        for _ in 0..4 {
            nf.next_seq();
        }
        nf.transact(
            &batch,
            &acks,
            "add the masquerade rule for the containers' subnet",
        )?;
        Ok(Bridge {
            index,
            leases: Arc::new(Mutex::new(BTreeSet::new())),
        })
    }

    /// A fresh network namespace on the bridge for one container.
    pub fn attach(&self) -> Result<Attachment, BridgeError> {
        let host = lease(&mut self.leases.lock().unwrap_or_else(|p| p.into_inner()))
            .ok_or(BridgeError::Exhausted)?;
        // From here on, dropping the attachment releases what was made.
        let mut attachment = Attachment {
            address: Ipv4Addr::from(subnet_base() + host),
            netns: None,
            veth: format!("hv{host}"),
            host,
            leases: self.leases.clone(),
            veth_made: false,
        };
        let (netns, mut inside) = new_namespace()?;
        let mut nl = Netlink::open(libc::NETLINK_ROUTE)?;
        let seq = nl.next_seq();
        let veth = netlink::new_veth(
            seq,
            &attachment.veth,
            self.index,
            CONTAINER_IFNAME,
            netns.as_raw_fd(),
        )?;
        nl.request(seq, &veth, &format!("create veth {}", attachment.veth))?;
        attachment.veth_made = true;
        attachment.netns = Some(netns);

        let seq = inside.next_seq();
        inside.request(
            seq,
            &netlink::set_up(seq, LOOPBACK_INDEX),
            "bring lo up in the container",
        )?;
        let index = inside.link_index(CONTAINER_IFNAME)?;
        let seq = inside.next_seq();
        inside.request(
            seq,
            &netlink::set_up(seq, index),
            &format!("bring {CONTAINER_IFNAME} up in the container"),
        )?;
        let seq = inside.next_seq();
        inside.request(
            seq,
            &netlink::new_addr(seq, index, attachment.address, PREFIX),
            &format!("give the container the address {}", attachment.address),
        )?;
        let seq = inside.next_seq();
        inside.request(
            seq,
            &netlink::new_default_route(seq, index, GATEWAY),
            "add the container's default route",
        )?;
        Ok(attachment)
    }
}

/// A new network namespace (kept open) and a route socket inside it.
fn new_namespace() -> Result<(File, Netlink), BridgeError> {
    let made = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare has no memory-safety preconditions; a new network
            // namespace changes only this short-lived thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
                return Err(BridgeError::Namespace(io::Error::last_os_error()));
            }
            let ns = File::open("/proc/thread-self/ns/net").map_err(BridgeError::Namespace)?;
            let sock = Netlink::open(libc::NETLINK_ROUTE)?;
            Ok((ns, sock))
        })
        .join()
    });
    made.unwrap_or_else(|_| {
        Err(BridgeError::Namespace(io::Error::other(
            "the namespace thread panicked",
        )))
    })
}

/// One container's place on the bridge; dropping it removes the veth pair and frees the
/// address (the namespace goes with its last process).
pub struct Attachment {
    pub address: Ipv4Addr,
    netns: Option<File>,
    veth: String,
    host: u32,
    leases: Leases,
    veth_made: bool,
}

impl Attachment {
    /// What the sandbox needs to enter the namespace.
    pub fn plan(&self, resolv_conf: Option<String>) -> Option<ContainerNet> {
        let fd = self.netns.as_ref()?.as_raw_fd();
        Some(ContainerNet {
            netns: PathBuf::from(format!("/proc/{}/fd/{fd}", std::process::id())),
            resolv_conf,
            address: self.address,
        })
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self.veth_made {
            let removed = Netlink::open(libc::NETLINK_ROUTE).and_then(|mut nl| {
                let seq = nl.next_seq();
                nl.request(
                    seq,
                    &netlink::del_link(seq, &self.veth)?,
                    &format!("delete veth {}", self.veth),
                )
            });
            match removed {
                // Gone with the namespace already (its other end was in it).
                Err(NetlinkError::Refused { source, .. })
                    if source.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => log::warn!("{}", crate::error_chain(&e)),
                Ok(()) => {}
            }
        }
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_skip_the_gateway_and_reuse_freed_numbers() {
        let mut in_use = BTreeSet::new();
        assert_eq!(lease(&mut in_use), Some(2));
        assert_eq!(lease(&mut in_use), Some(3));
        in_use.remove(&2);
        assert_eq!(lease(&mut in_use), Some(2));
        assert_eq!(lease(&mut in_use), Some(4));
        let mut full: BTreeSet<u32> = (2..=65534).collect();
        assert_eq!(lease(&mut full), None);
        assert_eq!(
            Ipv4Addr::from(subnet_base() + 2),
            Ipv4Addr::new(172, 30, 0, 2)
        );
    }

    #[test]
    fn resolv_conf_drops_loopback_resolvers() {
        let vm = "# from passt\nsearch example.com\nnameserver 127.0.0.53\nnameserver 10.0.2.3\nnameserver ::1\n";
        assert_eq!(
            container_resolv_conf(vm).unwrap(),
            "# from passt\nsearch example.com\nnameserver 10.0.2.3\n"
        );
        assert_eq!(container_resolv_conf("nameserver 127.0.0.1\n"), None);
        assert_eq!(container_resolv_conf(""), None);
        assert_eq!(container_resolv_conf("nameserver bogus\n"), None);
    }

    /// The whole attachment in a namespace of the test's own (root only): a bridge, two
    /// containers with their addresses, and everything gone after the drops.
    #[test]
    fn attach_and_detach_in_a_private_namespace() {
        if !crate::agent::init::testutil::is_root() {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare of the network namespace affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return;
            }
            // Forwarding and NAT are the VM's business; the bridge part is checked here.
            let mut nl = Netlink::open(libc::NETLINK_ROUTE).unwrap();
            let seq = nl.next_seq();
            nl.request(seq, &netlink::new_bridge(seq, BRIDGE).unwrap(), "bridge")
                .unwrap();
            let index = nl.link_index(BRIDGE).unwrap();
            let bridge = Bridge {
                index,
                leases: Arc::new(Mutex::new(BTreeSet::new())),
            };
            let a = bridge.attach().unwrap();
            let b = bridge.attach().unwrap();
            assert_eq!(a.address, Ipv4Addr::new(172, 30, 0, 2));
            assert_eq!(b.address, Ipv4Addr::new(172, 30, 0, 3));
            assert!(nl.link_index("hv2").is_ok());
            let plan = a.plan(None).unwrap();
            assert!(File::open(&plan.netns).is_ok());
            drop(a);
            assert!(matches!(
                nl.link_index("hv2"),
                Err(NetlinkError::NoSuchLink(_))
            ));
            assert_eq!(
                bridge.attach().unwrap().address,
                Ipv4Addr::new(172, 30, 0, 2)
            );
            drop(b);
        })
        .join()
        .unwrap();
    }
}
