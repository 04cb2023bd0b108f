//! The host side of virtio-net: an existing tap interface, opened through /dev/net/tun with
//! a 12-byte virtio-net header in front of every frame and a non-blocking fd.
//!
//! hearth never creates interfaces. TUNSETIFF on a missing name would create a tap (we run
//! with CAP_NET_ADMIN), so [`Tap::open`] first asks the kernel, in the calling thread's
//! network namespace, whether the name is a tap (ethtool reports driver "tun", bus "tap").

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;

use super::header::VNET_HDR_LEN;

const TUN_DEVICE: &str = "/dev/net/tun";
const ETHTOOL_GDRVINFO: u32 = 0x3;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open tap device \"{name}\"")]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the offloads of tap device \"{name}\"")]
    Offload {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// `struct ethtool_drvinfo` from <linux/ethtool.h>.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn interface_request(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (a name and a union of integers, addresses and a
    // pointer); all zeroes is a valid value of every field.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name was checked to be shorter than IFNAMSIZ, so the copy stays NUL-terminated.
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request
}

fn c_string(bytes: &[u8]) -> &str {
    CStr::from_bytes_until_nul(bytes)
        .ok()
        .and_then(|s| s.to_str().ok())
        .unwrap_or("")
}

/// Whether the kernel would accept `name` as an interface name: 1-15 printable bytes, no
/// `/`, `:` or blanks, not `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn check_name(name: &str) -> io::Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a valid interface name",
        ))
    }
}

/// Fails unless `name` is an existing tap in the calling thread's network namespace.
fn check_is_tap(name: &str) -> io::Result<()> {
    // Any socket reaches the device ioctls; an unbound Unix one needs no address family
    // support and lives in the calling thread's network namespace.
    let socket = UnixDatagram::unbound()?;
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    let mut request = interface_request(name);
    request.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name from `request` and writes at most a
    // `struct ethtool_drvinfo` to `info`, which `ifru_data` points to and outlives the call.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
    if ret < 0 {
        let error = io::Error::last_os_error();
        return Err(match error.raw_os_error() {
            Some(libc::ENODEV) => {
                io::Error::new(io::ErrorKind::NotFound, "no such network interface")
            }
            Some(libc::EOPNOTSUPP) => io::Error::other("not a tap interface"),
            _ => error,
        });
    }
    match (c_string(&info.driver), c_string(&info.bus_info)) {
        ("tun", "tap") => Ok(()),
        ("tun", "tun") => Err(io::Error::other("a tun interface, not a tap")),
        (driver, _) => Err(io::Error::other(format!(
            "not a tap interface (driver {driver:?})"
        ))),
    }
}

/// Taps opened ahead by [`preopen`], each taken by the first [`Tap::open`] of its name.
static PREOPENED: std::sync::Mutex<Vec<Tap>> = std::sync::Mutex::new(Vec::new());

/// Opens the tap `name` now for a later [`Tap::open`] of the same name: a jailed VMM
/// opens its taps while it still has the privileges (and the /dev/net/tun) to.
pub fn preopen(name: &str) -> Result<(), TapError> {
    let tap = Tap::open_now(name)?;
    PREOPENED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(tap);
    Ok(())
}

impl Tap {
    /// Opens the existing tap `name` (in the calling thread's network namespace) for frames
    /// with a `virtio_net_hdr_v1` in front, non-blocking, with every offload off; or
    /// hands over the one [`preopen`] opened.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut preopened = PREOPENED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(index) = preopened.iter().position(|tap| tap.name == name) {
            return Ok(preopened.swap_remove(index));
        }
        drop(preopened);
        Self::open_now(name)
    }

    fn open_now(name: &str) -> Result<Self, TapError> {
        let open_error = |source| TapError::Open {
            name: name.to_string(),
            source,
        };
        check_name(name).map_err(open_error)?;
        check_is_tap(name).map_err(open_error)?;

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(open_error)?;
        let mut request = interface_request(name);
        request.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and may update the name in) the `ifreq`, which lives on
        // our stack for the duration of the call; `file` is an open /dev/net/tun.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if ret < 0 {
            return Err(open_error(io::Error::last_os_error()));
        }
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which is valid for
        // the duration of the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) };
        if ret < 0 {
            return Err(open_error(io::Error::last_os_error()));
        }

        let tap = Self {
            file,
            name: name.to_string(),
        };
        // A persistent tap keeps the offloads of its previous user.
        tap.set_offload(0)?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets which offloads (`TUN_F_*`) frames read from the tap may use: what the guest
    /// accepted on its receive side.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Network namespaces with tap interfaces for tests, created with `ip` and deleted on drop.
/// Tests enter one on a thread of their own (setns), never touching the host's interfaces.
#[cfg(test)]
pub(crate) mod test_netns {
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    pub const TEST_ETHERTYPE: u16 = 0x88b5; // IEEE local experimental

    pub fn test_frame(tag: u8) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, tag]);
        frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
        frame.extend_from_slice(b"hearth virtio-net tap test");
        frame
    }

    pub fn wait_readable(fd: RawFd) -> bool {
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one pollfd that lives on our stack.
        unsafe { libc::poll(&mut poll, 1, 2000) == 1 }
    }

    /// A packet socket on `ifindex` in the calling thread's namespace.
    pub fn packet_socket(ifindex: u32) -> OwnedFd {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = ifindex as i32;
        // SAFETY: binds to an address that lives on our stack, with its exact size.
        let ret = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        socket
    }

    pub fn ifindex(name: &str) -> u32 {
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: reads a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "if_nametoindex: {}", io::Error::last_os_error());
        index
    }

    /// Receives frames of TEST_ETHERTYPE (skipping other traffic) for up to a few seconds.
    pub fn receive_test_frame(mut receive: impl FnMut(&mut [u8]) -> io::Result<usize>) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        for _ in 0..50 {
            match receive(&mut buf) {
                Ok(n) if n >= 14 && buf[12..14] == TEST_ETHERTYPE.to_be_bytes() => {
                    return buf[..n].to_vec()
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
        panic!("no test frame arrived");
    }

    /// Receives one frame from a packet socket.
    pub fn packet_receive(socket: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receives into `buf`, at most its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Sends `frame` out of the interface a packet socket is bound to.
    pub fn packet_send(socket: &OwnedFd, frame: &[u8]) {
        // SAFETY: sends `frame`, which outlives the call; the socket is bound.
        let sent = unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            sent,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    pub struct TestNetns {
        name: String,
    }

    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    impl TestNetns {
        /// A fresh namespace, or `None` (after saying why) when the test cannot run here.
        pub fn create() -> Option<Self> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("skipped: tap tests need root");
                return None;
            }
            let name = format!(
                "hearth-net-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            if !ip(&["netns", "add", &name]) {
                eprintln!("skipped: `ip netns add` failed (no iproute2 or no permission)");
                return None;
            }
            Some(Self { name })
        }

        /// Runs `ip -n NAMESPACE args...`.
        pub fn ip(&self, args: &[&str]) -> bool {
            let mut all = vec!["-n", &self.name];
            all.extend_from_slice(args);
            ip(&all)
        }

        /// Moves the calling thread (only) into the namespace.
        pub fn enter(&self) {
            let file = File::open(format!("/run/netns/{}", self.name)).expect("netns file");
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            if !ip(&["netns", "del", &self.name]) {
                eprintln!("could not delete network namespace {}", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_netns::*;
    use super::*;

    #[test]
    fn invalid_names() {
        for name in ["", "a/b", "..", "x".repeat(16).as_str(), "a b"] {
            let error = Tap::open(name).unwrap_err().to_string();
            assert_eq!(error, format!("cannot open tap device \"{name}\""));
        }
    }

    #[test]
    fn opens_only_existing_taps() {
        let Some(netns) = TestNetns::create() else {
            return;
        };
        assert!(netns.ip(&["tuntap", "add", "dev", "tunT", "mode", "tun"]));
        let netns = &netns;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    netns.enter();
                    let source = |name: &str| {
                        let error = Tap::open(name).unwrap_err();
                        assert!(error.to_string().contains(name));
                        std::error::Error::source(&error).unwrap().to_string()
                    };
                    assert_eq!(source("missing0"), "no such network interface");
                    assert!(source("lo").starts_with("not a tap interface"));
                    assert_eq!(source("tunT"), "a tun interface, not a tap");
                })
                .join()
                .unwrap();
        });
        // The failed open must not have created the interface.
        assert!(!netns.ip(&["link", "show", "missing0"]));
    }

    #[test]
    fn frames_cross_the_tap() {
        let Some(netns) = TestNetns::create() else {
            return;
        };
        assert!(netns.ip(&["tuntap", "add", "dev", "tapT", "mode", "tap"]));
        assert!(netns.ip(&["link", "set", "tapT", "up"]));
        let netns = &netns;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    netns.enter();
                    let tap = Tap::open("tapT").unwrap();
                    assert_eq!(tap.name(), "tapT");
                    tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
                        .unwrap();
                    tap.set_offload(0).unwrap();
                    let socket = packet_socket(ifindex("tapT"));

                    // Guest to host: a frame written to the tap arrives on the interface.
                    let frame = test_frame(1);
                    let mut with_header = vec![0u8; VNET_HDR_LEN];
                    with_header.extend_from_slice(&frame);
                    assert_eq!(tap.write(&with_header).unwrap(), with_header.len());
                    assert!(wait_readable(socket.as_raw_fd()));
                    let received = receive_test_frame(|buf| packet_receive(&socket, buf));
                    assert_eq!(received, frame);

                    // Host to guest: a frame sent out of the interface is read from the tap,
                    // behind a virtio-net header.
                    let frame = test_frame(2);
                    packet_send(&socket, &frame);
                    assert!(wait_readable(tap.as_raw_fd()));
                    let received = receive_test_frame(|buf| {
                        let mut with_header = [0u8; 2048 + VNET_HDR_LEN];
                        let n = tap.read(&mut with_header)?;
                        let n = n.saturating_sub(VNET_HDR_LEN);
                        buf[..n].copy_from_slice(&with_header[VNET_HDR_LEN..VNET_HDR_LEN + n]);
                        Ok(n)
                    });
                    assert_eq!(received, frame);
                })
                .join()
                .unwrap();
        });
    }
}
