//! The host <-> guest-agent protocol, version 1.
//!
//! `hearth-init` (the guest agent, PID 1 of container VMs) and the host side of
//! `hearth container run` / `hearth machine` talk over one vsock stream per session.
//!
//! # Transport
//! * **Container VM** (one container per microVM): the host listens on the Unix socket
//!   `<vsock socket>_1024` before the VM starts; the agent, once ready, connects to host
//!   CID 2, port [`AGENT_PORT`] (which the vsock device forwards to that socket).
//! * **Machine** (long-lived VM): the agent listens on guest port [`AGENT_PORT`]; every
//!   host client connects to the machine's vsock socket, writes `CONNECT 1024\n`, reads
//!   `OK <port>\n`, and then speaks this protocol. Sessions run concurrently.
//!
//! # Framing
//! Every message is one frame: an 8-byte header — payload length (u32, little endian),
//! message kind (u8), three zero bytes — followed by the payload. A payload is at most
//! [`MAX_PAYLOAD`] bytes; a longer length, a non-zero reserved byte or an unknown kind is a
//! protocol error and ends the session. Structured payloads are JSON; stream data is raw.
//!
//! # A session
//! 1. Both sides send [`Message::Hello`] first and check the peer's version is
//!    [`VERSION`] (the agent answers a mismatch with [`Message::Error`] and hangs up).
//! 2. Machine only, optional: [`Message::ImageQuery`] → [`Message::ImageStatus`]; if the
//!    image is absent the host sends [`Message::ImageLoad`], the root filesystem as a tar
//!    stream in [`Message::ImageData`] frames and [`Message::ImageEnd`]; the agent answers
//!    [`Message::ImageStatus`] (present) or [`Message::Error`].
//! 3. Optional, first after `Hello`: [`Message::Refresh`] (fresh entropy and the host's
//!    wall-clock time, for a VM restored from a template that shares both with every
//!    other clone), answered by [`Message::Refreshed`] once the guest RNG is reseeded
//!    and its clock set. Then, machine only and optional: [`Message::Network`] (eth0's
//!    MAC, address, route and MTU, and the VM's resolvers), answered by
//!    [`Message::NetworkReady`]. Machine only, optional: [`Message::Mount`] (a shared folder), answered by
//!    [`Message::Mounted`] or [`Message::Error`].
//! 4. The host sends one request: [`Message::Run`] or [`Message::Shutdown`].
//! 5. For `Run`: the agent answers [`Message::Started`] (or `Error`), then streams
//!    [`Message::Stdout`] / [`Message::Stderr`] while the host streams [`Message::Stdin`],
//!    [`Message::StdinEof`], [`Message::Signal`] and [`Message::Resize`]; the session ends
//!    with [`Message::Exit`] after the process has exited and its output was sent.
//! 6. For `Shutdown` (machine): the agent stops every container, answers `Exit { status: 0 }`,
//!    syncs and powers the VM off.
//! 7. Machine only, instead of `Run`: [`Message::Forward`] (a published port: one session
//!    per TCP connection or per UDP peer) → [`Message::Forwarding`] (or `Error`), and
//!    from then on the stream is the connection itself: raw bytes both ways for TCP, a
//!    half-close passed on as one; for UDP each datagram is a 2-byte big-endian length
//!    and its bytes ([`write_datagram`], [`read_datagram`]).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol version; both sides must agree exactly.
pub const VERSION: u32 = 1;

/// The vsock port of the agent: guest-listening in a machine, host-listening for a
/// container VM.
pub const AGENT_PORT: u32 = 1024;

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Size of the frame header.
pub const HEADER_LEN: usize = 8;

/// The signals a host front end forwards to the container's process (as `Signal`, or
/// `Resize` for SIGWINCH), and that the agent's sandbox passes on to it.
pub const FORWARDED_SIGNALS: [i32; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// What the agent runs as, given on the kernel command line as `hearth.mode=`.
/// The most entropy one [`Message::Refresh`] carries.
pub const MAX_REFRESH_ENTROPY: usize = 256;

pub const MODE_CONTAINER: &str = "container";
/// See [`MODE_CONTAINER`].
pub const MODE_MACHINE: &str = "machine";

/// Where a process's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Rootfs {
    /// No sandbox: run in the VM's own root, namespaces and cgroup (`hearth machine run`).
    Host,
    /// A read-only block device holding the image (`/dev/vda`), under a tmpfs overlay.
    Device { path: String, fstype: String },
    /// An image previously loaded into the machine with `ImageLoad`, under a tmpfs overlay.
    Image { digest: String },
    /// Join the namespaces and cgroup of the running container with this name.
    Container { name: String },
}

/// What the container does with the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// Share the VM's network namespace (lo, and eth0 when the VM has a NIC).
    Vm,
    /// A network namespace of its own with only lo.
    None,
    /// A network namespace of its own with lo and eth0 on the machine's bridge
    /// (containers in a machine; see `agent::init::bridge`).
    Bridge,
}

/// The transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Tcp,
    Udp,
}

/// The machine VM's own network (eth0 on user-mode networking), sent once at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSetup {
    /// eth0's MAC address (a clone of a template would keep the template's).
    pub mac: Option<String>,
    pub net: NetConfig,
}

/// A request to reach a port of a machine's container (see [`Message::Forward`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSpec {
    /// The container's name in the machine.
    pub container: String,
    pub port: u16,
    pub transport: Transport,
}

/// A host directory or image shared into the container: a virtio-blk disk (`device`),
/// or, when `source` is set, files that are not on a disk of their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Guest block device, e.g. `/dev/vdb`; empty when `source` is set.
    #[serde(default)]
    pub device: String,
    /// Absolute path inside the container.
    pub target: String,
    pub readonly: bool,
    /// Where the files are when they are not on `device` (absent from the JSON of a
    /// disk volume, so older peers read it as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
}

/// A volume that is not a disk of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VolumeSource {
    /// A host folder shared over virtio-fs: the agent mounts the device with this tag
    /// (`mount -t virtiofs TAG`) and binds it into the container.
    Virtiofs { tag: String },
    /// A directory of the VM, bound into the container: in a machine, a place under
    /// one of its shared folders (see [`Message::Mount`]).
    Path { path: String },
}

/// The directory of a container VM where the agent mounts the virtio-fs device `tag`
/// before binding it into the container.
pub fn virtiofs_mount_point(tag: &str) -> String {
    format!("/run/hearth/fs/{tag}")
}

/// A virtio-fs tag the agent accepts: what hearth gives its devices (`hearthfs0`, ...),
/// safe as a path component.
pub fn valid_fs_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 36
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A machine's shared folder: mount the virtio-fs device `tag` at `target` in the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub tag: String,
    /// Absolute path in the machine; made if missing.
    pub target: String,
    pub readonly: bool,
}

/// Static IPv4 configuration of the VM's eth0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// `A.B.C.D/PREFIX`.
    pub address: String,
    pub gateway: Option<String>,
    /// Name servers for the container's /etc/resolv.conf (none: the file is left alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// eth0's MTU (none: the driver's default, 1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// Everything the agent needs to start a process. Built by the host from the image
/// config and the command line (docker's precedence); the agent only applies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Program and arguments (entrypoint + cmd already merged). Never empty.
    pub argv: Vec<String>,
    /// `KEY=VALUE` environment, final.
    pub env: Vec<String>,
    /// Working directory inside the container (created if missing, as docker does).
    pub cwd: String,
    /// `uid[:gid]` or `name[:group]`, resolved in the container's /etc/passwd and
    /// /etc/group; `None` is root.
    pub user: Option<String>,
    pub hostname: Option<String>,
    /// Give the process a pseudo-terminal (stdout and stderr merge, as with `docker -t`).
    pub tty: bool,
    /// Forward the host's stdin; without it the process reads /dev/null.
    pub stdin: bool,
    pub rootfs: Rootfs,
    pub volumes: Vec<Volume>,
    /// cgroup memory.max, bytes.
    pub memory_limit: Option<u64>,
    /// cgroup cpu.max as a number of CPUs (1.5 = 150000/100000).
    pub cpus: Option<f64>,
    pub network: Network,
    /// Configure eth0 of the VM before starting (container VMs with a NIC).
    pub net: Option<NetConfig>,
    /// Container name, unique within a machine (for `Rootfs::Container`).
    pub name: Option<String>,
    /// Initial terminal size (rows, cols) when `tty`.
    pub term_size: Option<(u16, u16)>,
    /// eth0's MAC address (`52:54:00:12:34:56`), set before eth0 is configured: a VM
    /// restored from a template would otherwise have the template's.
    #[serde(default)]
    pub mac: Option<String>,
    /// Small files bound over paths of the container (an OCI runtime's bind mounts of
    /// host files such as /etc/hosts): written in the VM, then bound like a volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileCopy>,
}

/// A file the agent writes in the VM and binds over `target` in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCopy {
    pub target: String,
    pub content: String,
    pub readonly: bool,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello {
        version: u32,
    },
    Run(Box<RunSpec>),
    Shutdown,
    /// Machine only: mount a shared folder, answered by [`Message::Mounted`] or
    /// [`Message::Error`]; the session goes on.
    Mount(MountSpec),
    Mounted,
    Stdin(Vec<u8>),
    StdinEof,
    Signal(i32),
    Resize {
        rows: u16,
        cols: u16,
    },
    ImageQuery {
        digest: String,
    },
    ImageLoad {
        digest: String,
    },
    ImageData(Vec<u8>),
    ImageEnd,
    ImageStatus {
        digest: String,
        present: bool,
    },
    /// Reseed the guest's RNG with `entropy` (1 to [`MAX_REFRESH_ENTROPY`] bytes from the
    /// host's RNG) and set its wall clock to `realtime_ns` (since the Unix epoch).
    Refresh {
        entropy: Vec<u8>,
        realtime_ns: u64,
    },
    Refreshed,
    /// Connect this session to a port of a running container of the machine; after the
    /// agent's [`Message::Forwarding`] the stream carries no more frames but the
    /// connection's bytes (TCP) or datagrams (UDP; see [`write_datagram`]).
    Forward(ForwardSpec),
    Forwarding,
    /// Configure the machine's eth0 and resolvers.
    Network(Box<NetSetup>),
    NetworkReady,
    Started {
        pid: i32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Exit status as a shell reports it: the code, or 128 + signal number.
    Exit {
        status: i32,
    },
    Error(String),
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const RUN: u8 = 2;
    pub const SHUTDOWN: u8 = 3;
    pub const STDIN: u8 = 4;
    pub const STDIN_EOF: u8 = 5;
    pub const SIGNAL: u8 = 6;
    pub const RESIZE: u8 = 7;
    pub const IMAGE_QUERY: u8 = 8;
    pub const IMAGE_LOAD: u8 = 9;
    pub const IMAGE_DATA: u8 = 10;
    pub const IMAGE_END: u8 = 11;
    pub const IMAGE_STATUS: u8 = 12;
    pub const REFRESH: u8 = 13;
    pub const FORWARD: u8 = 14;
    pub const NETWORK: u8 = 15;
    pub const MOUNT: u8 = 16;
    pub const STARTED: u8 = 32;
    pub const STDOUT: u8 = 33;
    pub const STDERR: u8 = 34;
    pub const EXIT: u8 = 35;
    pub const ERROR: u8 = 36;
    pub const REFRESHED: u8 = 37;
    pub const FORWARDING: u8 = 38;
    pub const NETWORK_READY: u8 = 39;
    pub const MOUNTED: u8 = 40;
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    #[error("agent connection closed in the middle of a frame")]
    Truncated,
    #[error("frame of {0} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("frame header has non-zero reserved bytes")]
    Reserved,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: &'static str, reason: String },
}

#[derive(Serialize, Deserialize)]
struct HelloBody {
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct DigestBody {
    digest: String,
}

#[derive(Serialize, Deserialize)]
struct StatusBody {
    digest: String,
    present: bool,
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs to a Vec cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(
    kind: &'static str,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed {
        kind,
        reason: e.to_string(),
    })
}

/// [`from_json`] for messages that must also fit one frame when written again: a payload
/// can grow when re-encoded (omitted `Option` fields become `null`, `1` becomes `1.0`),
/// and a message that cannot be written back is refused like a malformed one.
fn from_json_bounded<T: Serialize + for<'de> Deserialize<'de>>(
    kind: &'static str,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    let value: T = from_json(kind, payload)?;
    let len = json(&value).len();
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Malformed {
            kind,
            reason: format!("re-encodes to {len} bytes, over the {MAX_PAYLOAD}-byte limit"),
        });
    }
    Ok(value)
}

/// An error text: invalid UTF-8 is replaced (each bad byte by 3 bytes of U+FFFD), then cut
/// at a character boundary so the message still fits one frame.
fn error_text(payload: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(payload).into_owned();
    if text.len() > MAX_PAYLOAD {
        let mut end = MAX_PAYLOAD;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn fixed<const N: usize>(kind: &'static str, payload: &[u8]) -> Result<[u8; N], ProtocolError> {
    payload.try_into().map_err(|_| ProtocolError::Malformed {
        kind,
        reason: format!("{} bytes, expected {N}", payload.len()),
    })
}

impl Message {
    /// The frame kind and payload of this message.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        match self {
            Message::Hello { version } => (kind::HELLO, json(&HelloBody { version: *version })),
            Message::Run(spec) => (kind::RUN, json(spec)),
            Message::Shutdown => (kind::SHUTDOWN, Vec::new()),
            Message::Mount(spec) => (kind::MOUNT, json(spec)),
            Message::Mounted => (kind::MOUNTED, Vec::new()),
            Message::Stdin(data) => (kind::STDIN, data.clone()),
            Message::StdinEof => (kind::STDIN_EOF, Vec::new()),
            Message::Signal(sig) => (kind::SIGNAL, sig.to_le_bytes().to_vec()),
            Message::Resize { rows, cols } => {
                let mut body = rows.to_le_bytes().to_vec();
                body.extend_from_slice(&cols.to_le_bytes());
                (kind::RESIZE, body)
            }
            Message::ImageQuery { digest } => (
                kind::IMAGE_QUERY,
                json(&DigestBody {
                    digest: digest.clone(),
                }),
            ),
            Message::ImageLoad { digest } => (
                kind::IMAGE_LOAD,
                json(&DigestBody {
                    digest: digest.clone(),
                }),
            ),
            Message::ImageData(data) => (kind::IMAGE_DATA, data.clone()),
            Message::ImageEnd => (kind::IMAGE_END, Vec::new()),
            Message::ImageStatus { digest, present } => (
                kind::IMAGE_STATUS,
                json(&StatusBody {
                    digest: digest.clone(),
                    present: *present,
                }),
            ),
            Message::Refresh {
                entropy,
                realtime_ns,
            } => {
                let mut body = realtime_ns.to_le_bytes().to_vec();
                body.extend_from_slice(entropy);
                (kind::REFRESH, body)
            }
            Message::Refreshed => (kind::REFRESHED, Vec::new()),
            Message::Forward(spec) => (kind::FORWARD, json(spec)),
            Message::Forwarding => (kind::FORWARDING, Vec::new()),
            Message::Network(setup) => (kind::NETWORK, json(setup)),
            Message::NetworkReady => (kind::NETWORK_READY, Vec::new()),
            Message::Started { pid } => (kind::STARTED, pid.to_le_bytes().to_vec()),
            Message::Stdout(data) => (kind::STDOUT, data.clone()),
            Message::Stderr(data) => (kind::STDERR, data.clone()),
            Message::Exit { status } => (kind::EXIT, status.to_le_bytes().to_vec()),
            Message::Error(text) => (kind::ERROR, text.as_bytes().to_vec()),
        }
    }

    /// Parses one frame's kind and payload.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Message, ProtocolError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge(payload.len()));
        }
        Ok(match kind {
            kind::HELLO => Message::Hello {
                version: from_json_bounded::<HelloBody>("hello", payload)?.version,
            },
            kind::RUN => {
                let spec: RunSpec = from_json_bounded("run", payload)?;
                if spec.argv.is_empty() && !matches!(spec.rootfs, Rootfs::Container { .. }) {
                    return Err(ProtocolError::Malformed {
                        kind: "run",
                        reason: "empty argv".into(),
                    });
                }
                Message::Run(Box::new(spec))
            }
            kind::SHUTDOWN => Message::Shutdown,
            kind::MOUNT => Message::Mount(from_json_bounded("mount", payload)?),
            kind::MOUNTED => Message::Mounted,
            kind::STDIN => Message::Stdin(payload.to_vec()),
            kind::STDIN_EOF => Message::StdinEof,
            kind::SIGNAL => Message::Signal(i32::from_le_bytes(fixed("signal", payload)?)),
            kind::RESIZE => {
                let b: [u8; 4] = fixed("resize", payload)?;
                Message::Resize {
                    rows: u16::from_le_bytes([b[0], b[1]]),
                    cols: u16::from_le_bytes([b[2], b[3]]),
                }
            }
            kind::IMAGE_QUERY => Message::ImageQuery {
                digest: from_json_bounded::<DigestBody>("image query", payload)?.digest,
            },
            kind::IMAGE_LOAD => Message::ImageLoad {
                digest: from_json_bounded::<DigestBody>("image load", payload)?.digest,
            },
            kind::IMAGE_DATA => Message::ImageData(payload.to_vec()),
            kind::IMAGE_END => Message::ImageEnd,
            kind::IMAGE_STATUS => {
                let body: StatusBody = from_json_bounded("image status", payload)?;
                Message::ImageStatus {
                    digest: body.digest,
                    present: body.present,
                }
            }
            kind::REFRESH => {
                let entropy = payload.get(8..).unwrap_or_default();
                if entropy.is_empty() || entropy.len() > MAX_REFRESH_ENTROPY {
                    return Err(ProtocolError::Malformed {
                        kind: "refresh",
                        reason: format!(
                            "{} bytes, expected 8 of time and 1 to {MAX_REFRESH_ENTROPY} of entropy",
                            payload.len()
                        ),
                    });
                }
                Message::Refresh {
                    entropy: entropy.to_vec(),
                    realtime_ns: u64::from_le_bytes(fixed("refresh", &payload[..8])?),
                }
            }
            kind::REFRESHED => Message::Refreshed,
            kind::FORWARD => Message::Forward(from_json_bounded("forward", payload)?),
            kind::FORWARDING => Message::Forwarding,
            kind::NETWORK => Message::Network(Box::new(from_json_bounded("network", payload)?)),
            kind::NETWORK_READY => Message::NetworkReady,
            kind::STARTED => Message::Started {
                pid: i32::from_le_bytes(fixed("started", payload)?),
            },
            kind::STDOUT => Message::Stdout(payload.to_vec()),
            kind::STDERR => Message::Stderr(payload.to_vec()),
            kind::EXIT => Message::Exit {
                status: i32::from_le_bytes(fixed("exit", payload)?),
            },
            kind::ERROR => Message::Error(error_text(payload)),
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// Writes one message as a single frame. Stream data longer than [`MAX_PAYLOAD`] must be
/// split by the caller (see [`write_data`]).
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> Result<(), ProtocolError> {
    let (kind, payload) = msg.encode();
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(payload.len()));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&[kind, 0, 0, 0]);
    frame.extend_from_slice(&payload);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Writes stream data as as many frames as needed, built by `wrap` (e.g. `Message::Stdout`).
pub fn write_data<W: Write>(
    w: &mut W,
    data: &[u8],
    wrap: fn(Vec<u8>) -> Message,
) -> Result<(), ProtocolError> {
    for chunk in data.chunks(MAX_PAYLOAD) {
        write_message(w, &wrap(chunk.to_vec()))?;
    }
    Ok(())
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub fn read_message<R: Read>(r: &mut R) -> Result<Option<Message>, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    if header[5..] != [0, 0, 0] {
        return Err(ProtocolError::Reserved);
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated
        } else {
            ProtocolError::Io(e)
        }
    })?;
    Message::decode(header[4], &payload).map(Some)
}

/// Writes one datagram of a UDP forward: its length (u16, big endian), then its bytes.
pub fn write_datagram<W: Write>(w: &mut W, data: &[u8]) -> io::Result<()> {
    let len = u16::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "datagram over 65535 bytes"))?;
    let mut frame = Vec::with_capacity(2 + data.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(data);
    w.write_all(&frame)
}

/// Reads one datagram of a UDP forward into `buf` (at least 65535 bytes); `Ok(None)` is
/// a clean end of stream between datagrams.
pub fn read_datagram<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let mut len = [0u8; 2];
    loop {
        match r.read(&mut len[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    r.read_exact(&mut len[1..])?;
    let len = usize::from(u16::from_be_bytes(len));
    let dst = buf
        .get_mut(..len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "datagram buffer too small"))?;
    r.read_exact(dst)?;
    Ok(Some(len))
}

/// Incremental frame parser for non-blocking readers: feed bytes, take whole messages.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the peer.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge(len));
        }
        if self.buf[5..HEADER_LEN] != [0, 0, 0] {
            return Err(ProtocolError::Reserved);
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = Message::decode(self.buf[4], &self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        msg.map(Some)
    }

    /// Bytes of an incomplete frame still buffered.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            argv: vec!["sh".into(), "-c".into(), "exit 7".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: Some("1000:1000".into()),
            hostname: Some("box".into()),
            tty: false,
            stdin: true,
            rootfs: Rootfs::Device {
                path: "/dev/vda".into(),
                fstype: "ext4".into(),
            },
            volumes: vec![
                Volume {
                    device: "/dev/vdb".into(),
                    target: "/data".into(),
                    readonly: true,
                    source: None,
                },
                Volume {
                    device: String::new(),
                    target: "/src".into(),
                    readonly: false,
                    source: Some(VolumeSource::Virtiofs {
                        tag: "hearthfs0".into(),
                    }),
                },
                Volume {
                    device: String::new(),
                    target: "/p".into(),
                    readonly: true,
                    source: Some(VolumeSource::Path {
                        path: "/home/u/proj".into(),
                    }),
                },
            ],
            memory_limit: Some(64 << 20),
            cpus: Some(0.5),
            network: Network::None,
            net: None,
            name: Some("c1".into()),
            term_size: None,
            mac: None,
            files: Vec::new(),
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello { version: VERSION },
            Message::Run(Box::new(spec())),
            Message::Shutdown,
            Message::Mount(MountSpec {
                tag: "hearthfs1".into(),
                target: "/home/u".into(),
                readonly: false,
            }),
            Message::Mounted,
            Message::Stdin(b"abc".to_vec()),
            Message::StdinEof,
            Message::Signal(15),
            Message::Resize { rows: 24, cols: 80 },
            Message::ImageQuery {
                digest: "sha256:00".into(),
            },
            Message::ImageLoad {
                digest: "sha256:00".into(),
            },
            Message::ImageData(vec![0; 10]),
            Message::ImageEnd,
            Message::ImageStatus {
                digest: "sha256:00".into(),
                present: true,
            },
            Message::Refresh {
                entropy: vec![7; 32],
                realtime_ns: 1_796_000_000_000_000_000,
            },
            Message::Refreshed,
            Message::Forward(ForwardSpec {
                container: "web".into(),
                port: 80,
                transport: Transport::Udp,
            }),
            Message::Forwarding,
            Message::Network(Box::new(NetSetup {
                mac: Some("52:54:00:12:34:56".into()),
                net: NetConfig {
                    address: "10.0.2.15/24".into(),
                    gateway: Some("10.0.2.2".into()),
                    dns: vec!["10.0.2.3".into()],
                    mtu: Some(65520),
                },
            })),
            Message::NetworkReady,
            Message::Started { pid: 42 },
            Message::Stdout(b"out".to_vec()),
            Message::Stderr(Vec::new()),
            Message::Exit { status: 137 },
            Message::Error("no such file".into()),
        ]
    }

    #[test]
    fn disk_volumes_keep_their_old_json() {
        // What a host of before virtio-fs sends, and what one now sends for a disk.
        let old = r#"{"device":"/dev/vdb","target":"/data","readonly":true}"#;
        let volume: Volume = serde_json::from_str(old).unwrap();
        assert_eq!(volume.source, None);
        assert_eq!(serde_json::to_string(&volume).unwrap(), old);
    }

    #[test]
    fn fs_tags_are_plain_names() {
        assert!(valid_fs_tag("hearthfs0"));
        assert!(valid_fs_tag("a-b_c"));
        for bad in ["", "a/b", "..", "a b", &"x".repeat(37)] {
            assert!(!valid_fs_tag(bad), "{bad}");
        }
        assert_eq!(
            virtiofs_mount_point("hearthfs2"),
            "/run/hearth/fs/hearthfs2"
        );
    }

    #[test]
    fn every_message_round_trips() {
        let mut wire = Vec::new();
        for msg in all_messages() {
            write_message(&mut wire, &msg).unwrap();
        }
        let mut reader = &wire[..];
        for msg in all_messages() {
            assert_eq!(read_message(&mut reader).unwrap(), Some(msg));
        }
        assert_eq!(read_message(&mut reader).unwrap(), None);
    }

    #[test]
    fn frame_buffer_reassembles_byte_by_byte() {
        let mut wire = Vec::new();
        for msg in all_messages() {
            write_message(&mut wire, &msg).unwrap();
        }
        let mut fb = FrameBuffer::new();
        let mut got = Vec::new();
        for byte in wire {
            fb.extend(&[byte]);
            while let Some(msg) = fb.next_message().unwrap() {
                got.push(msg);
            }
        }
        assert_eq!(got, all_messages());
        assert_eq!(fb.pending(), 0);
    }

    #[test]
    fn oversized_length_is_refused_before_reading_payload() {
        let mut wire = ((MAX_PAYLOAD + 1) as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&[kind::STDOUT, 0, 0, 0]);
        assert!(matches!(
            read_message(&mut &wire[..]),
            Err(ProtocolError::TooLarge(_))
        ));
        let mut fb = FrameBuffer::new();
        fb.extend(&wire);
        assert!(matches!(fb.next_message(), Err(ProtocolError::TooLarge(_))));
    }

    #[test]
    fn bad_frames_are_errors() {
        // Unknown kind.
        let wire = [0, 0, 0, 0, 200, 0, 0, 0];
        assert!(matches!(
            read_message(&mut &wire[..]),
            Err(ProtocolError::UnknownKind(200))
        ));
        // Reserved bytes set.
        let wire = [0, 0, 0, 0, kind::SHUTDOWN, 1, 0, 0];
        assert!(matches!(
            read_message(&mut &wire[..]),
            Err(ProtocolError::Reserved)
        ));
        // Truncated header and payload.
        assert!(matches!(
            read_message(&mut &[1u8, 0][..]),
            Err(ProtocolError::Truncated)
        ));
        let wire = [4, 0, 0, 0, kind::EXIT, 0, 0, 0, 1];
        assert!(matches!(
            read_message(&mut &wire[..]),
            Err(ProtocolError::Truncated)
        ));
        // Wrong fixed size, bad JSON, empty argv.
        assert!(Message::decode(kind::EXIT, &[1, 2]).is_err());
        assert!(Message::decode(kind::RUN, b"{").is_err());
        let mut s = spec();
        s.argv.clear();
        assert!(Message::decode(kind::RUN, &json(&s)).is_err());
    }

    /// Regression (found with the `agent_protocol` fuzz target's round-trip check): a
    /// decoded message must fit one frame when written again.
    #[test]
    fn decoded_messages_can_be_written_again() {
        // Invalid UTF-8 triples in size when replaced.
        let msg = Message::decode(kind::ERROR, &vec![0xff; 30_000]).unwrap();
        let Message::Error(text) = &msg else {
            panic!("{msg:?}")
        };
        assert!(text.len() <= MAX_PAYLOAD && text.starts_with('\u{fffd}'));
        write_message(&mut Vec::new(), &msg).unwrap();

        // A run spec omitting its optional fields re-encodes with `null`s: refused when
        // that no longer fits.
        let head = br#"{"argv":["a"],"env":[""#;
        let tail = br#""],"cwd":"/","tty":false,"stdin":false,"rootfs":{"kind":"host"},"volumes":[],"network":"vm"}"#;
        let mut payload = head.to_vec();
        payload.resize(MAX_PAYLOAD - tail.len(), b'x');
        payload.extend_from_slice(tail);
        assert!(matches!(
            Message::decode(kind::RUN, &payload),
            Err(ProtocolError::Malformed { kind: "run", .. })
        ));
        // The same spec with room to spare decodes and writes.
        let mut payload = head.to_vec();
        payload.resize(1000, b'x');
        payload.extend_from_slice(tail);
        let msg = Message::decode(kind::RUN, &payload).unwrap();
        write_message(&mut Vec::new(), &msg).unwrap();
    }

    #[test]
    fn refreshes_need_time_and_bounded_entropy() {
        for len in [0, 7, 8, 8 + MAX_REFRESH_ENTROPY + 1] {
            assert!(
                matches!(
                    Message::decode(kind::REFRESH, &vec![1; len]),
                    Err(ProtocolError::Malformed {
                        kind: "refresh",
                        ..
                    })
                ),
                "{len} bytes"
            );
        }
        let max = Message::decode(kind::REFRESH, &vec![1; 8 + MAX_REFRESH_ENTROPY]).unwrap();
        assert!(
            matches!(max, Message::Refresh { entropy, .. } if entropy.len() == MAX_REFRESH_ENTROPY)
        );
    }

    #[test]
    fn datagrams_round_trip_with_their_boundaries() {
        let mut wire = Vec::new();
        write_datagram(&mut wire, b"ping").unwrap();
        write_datagram(&mut wire, b"").unwrap();
        write_datagram(&mut wire, &[9; 1000]).unwrap();
        assert_eq!(&wire[..6], &[0, 4, b'p', b'i', b'n', b'g']);
        assert!(write_datagram(&mut Vec::new(), &vec![0; 70_000]).is_err());
        let mut reader = &wire[..];
        let mut buf = vec![0u8; 65535];
        assert_eq!(read_datagram(&mut reader, &mut buf).unwrap(), Some(4));
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(read_datagram(&mut reader, &mut buf).unwrap(), Some(0));
        assert_eq!(read_datagram(&mut reader, &mut buf).unwrap(), Some(1000));
        assert_eq!(read_datagram(&mut reader, &mut buf).unwrap(), None);
        // Cut in the middle of a datagram: an error, not a short datagram.
        assert!(read_datagram(&mut &wire[..3], &mut buf).is_err());
    }

    #[test]
    fn long_data_is_split_into_bounded_frames() {
        let data = vec![7u8; MAX_PAYLOAD * 2 + 5];
        let mut wire = Vec::new();
        write_data(&mut wire, &data, Message::Stdout).unwrap();
        let mut reader = &wire[..];
        let mut total = 0;
        while let Some(Message::Stdout(chunk)) = read_message(&mut reader).unwrap() {
            assert!(chunk.len() <= MAX_PAYLOAD);
            total += chunk.len();
        }
        assert_eq!(total, data.len());
    }
}
