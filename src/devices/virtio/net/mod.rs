//! virtio-net backed by an existing host tap interface or by a stream socket to passt
//! (user-mode networking).
//!
//! - `device.rs`: [`Net`], the device state, features, configuration space and the RX/TX
//!   queue processing.
//! - `event_handler.rs`: the event-loop side (tap readiness, queue notifications, pause
//!   and resume).
//! - `header.rs`: what the guest controls (virtio-net headers, TX frames, RX buffers),
//!   small pure functions a fuzz target can drive.
//! - `backend.rs`: the host side the device talks to, a tap or a stream.
//! - `tap.rs`: opening the tap and moving frames through it.
//! - `stream.rs`: length-prefixed frames over a Unix stream socket (passt's).
//! - `persist.rs`: [`NetState`], what a snapshot keeps of the device.
//!
//! Create one with [`Net::new`], share it as `Arc<Mutex<Net>>` between the transport and
//! the event manager (it is a `MutEventSubscriber`).

mod backend;
mod device;
mod event_handler;
pub mod header;
mod persist;
pub mod stream;
pub mod tap;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::net::PortForward;
use crate::rate_limiter::RateLimiterConfig;

pub use device::Net;
pub use persist::NetState;
pub use stream::StreamError;
pub use tap::{Tap, TapError};

/// Where a NIC's frames go on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetBackend {
    /// An existing tap interface, by name (`tap=NAME`).
    Tap(String),
    /// A Unix stream socket speaking length-prefixed frames (QEMU's `-netdev stream`,
    /// passt's default mode) that someone else started (`stream=PATH`).
    Stream(PathBuf),
    /// A passt that hearth starts for this NIC, with these published ports (`user`).
    User(UserNetConfig),
}

/// A NIC on user-mode networking: passt, started by hearth.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserNetConfig {
    /// Host ports forwarded to the guest (JSON: `"127.0.0.1:8080:80/tcp"`).
    #[serde(default)]
    pub ports: Vec<PortForward>,
}

/// What a network device is built from (inert; checked by `VmConfig::validate` and when
/// the back end is opened). `--net` syntax: see `crate::config::specs`. In JSON the back
/// end is one of `"tap": NAME`, `"stream": PATH` or `"user": {"ports": [...]}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
    /// The guest's MAC address; a random locally administered one when `None`. Serialised
    /// as `"52:54:00:12:34:56"`.
    pub mac: Option<[u8; 6]>,
    /// Frames to the guest: bytes (`bandwidth`) and frames (`ops`). The default limits
    /// nothing.
    pub rx_rate_limiter: RateLimiterConfig,
    /// Frames from the guest, likewise.
    pub tx_rate_limiter: RateLimiterConfig,
}

impl NetConfig {
    /// A NIC on `backend` with a random MAC and no limits.
    pub fn new(backend: NetBackend) -> Self {
        Self {
            backend,
            mac: None,
            rx_rate_limiter: RateLimiterConfig::default(),
            tx_rate_limiter: RateLimiterConfig::default(),
        }
    }

    /// The tap's name, for a tap NIC.
    pub fn tap(&self) -> Option<&str> {
        match &self.backend {
            NetBackend::Tap(name) => Some(name),
            _ => None,
        }
    }
}

/// Snapshots (postcard: no field names, every field in order) keep the plain form;
/// configuration files and the API the JSON form below.
impl Serialize for NetConfig {
    fn serialize<S: serde::Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        if out.is_human_readable() {
            NetConfigRepr::from(self.clone()).serialize(out)
        } else {
            NetConfigBinary {
                backend: self.backend.clone(),
                mac: self.mac,
                rx_rate_limiter: self.rx_rate_limiter,
                tx_rate_limiter: self.tx_rate_limiter,
            }
            .serialize(out)
        }
    }
}

impl<'de> Deserialize<'de> for NetConfig {
    fn deserialize<D: serde::Deserializer<'de>>(input: D) -> Result<Self, D::Error> {
        if input.is_human_readable() {
            NetConfigRepr::deserialize(input)?
                .try_into()
                .map_err(serde::de::Error::custom)
        } else {
            let binary = NetConfigBinary::deserialize(input)?;
            Ok(NetConfig {
                backend: binary.backend,
                mac: binary.mac,
                rx_rate_limiter: binary.rx_rate_limiter,
                tx_rate_limiter: binary.tx_rate_limiter,
            })
        }
    }
}

#[derive(Serialize, Deserialize)]
struct NetConfigBinary {
    backend: NetBackend,
    mac: Option<[u8; 6]>,
    rx_rate_limiter: RateLimiterConfig,
    tx_rate_limiter: RateLimiterConfig,
}

/// The JSON form: the back end as one of three optional keys, so that the tap form
/// stays what it always was (`{"tap": "tap0", ...}`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetConfigRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<UserNetConfig>,
    #[serde(default, with = "mac_serde")]
    mac: Option<[u8; 6]>,
    #[serde(default)]
    rx_rate_limiter: RateLimiterConfig,
    #[serde(default)]
    tx_rate_limiter: RateLimiterConfig,
}

impl TryFrom<NetConfigRepr> for NetConfig {
    type Error = String;

    fn try_from(repr: NetConfigRepr) -> Result<Self, String> {
        let backend = match (repr.tap, repr.stream, repr.user) {
            (Some(tap), None, None) => NetBackend::Tap(tap),
            (None, Some(path), None) => NetBackend::Stream(path),
            (None, None, Some(user)) => NetBackend::User(user),
            _ => return Err("a NIC needs exactly one of \"tap\", \"stream\" or \"user\"".into()),
        };
        Ok(NetConfig {
            backend,
            mac: repr.mac,
            rx_rate_limiter: repr.rx_rate_limiter,
            tx_rate_limiter: repr.tx_rate_limiter,
        })
    }
}

impl From<NetConfig> for NetConfigRepr {
    fn from(config: NetConfig) -> Self {
        let (mut tap, mut stream, mut user) = (None, None, None);
        match config.backend {
            NetBackend::Tap(name) => tap = Some(name),
            NetBackend::Stream(path) => stream = Some(path),
            NetBackend::User(config) => user = Some(config),
        }
        NetConfigRepr {
            tap,
            stream,
            user,
            mac: config.mac,
            rx_rate_limiter: config.rx_rate_limiter,
            tx_rate_limiter: config.tx_rate_limiter,
        }
    }
}

/// MAC addresses in configuration files are written the way `--net mac=` takes them.
mod mac_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(mac: &Option<[u8; 6]>, out: S) -> Result<S::Ok, S::Error> {
        mac.as_ref().map(super::format_mac).serialize(out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Option<[u8; 6]>, D::Error> {
        Option::<String>::deserialize(input)?
            .map(|text| super::parse_mac(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid MAC address \"{0}\": expected six hex bytes like 52:54:00:12:34:56")]
    InvalidMac(String),
    #[error("invalid MAC address \"{0}\": a multicast address cannot name an interface")]
    MulticastMac(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("cannot generate a random MAC address")]
    RandomMac(#[source] std::io::Error),
    #[error("cannot set up the network device's queues")]
    Queues(#[source] crate::devices::virtio::QueueSetupError),
    #[error("cannot create the network device's rate limiter")]
    RateLimiter(#[source] std::io::Error),
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, either case). Multicast addresses are refused: a NIC
/// address must be unicast.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let invalid = || NetError::InvalidMac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(invalid)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    if mac[0] & 0x01 != 0 {
        return Err(NetError::MulticastMac(text.to_string()));
    }
    Ok(mac)
}

/// Formats a MAC address the way [`parse_mac`] reads it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random unicast, locally administered MAC address.
pub fn random_mac() -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    crate::random::fill(&mut mac).map_err(NetError::RandomMac)?;
    Ok(locally_administered(mac))
}

/// Sets the locally administered bit and clears the multicast bit.
fn locally_administered(mut mac: [u8; 6]) -> [u8; 6] {
    mac[0] = (mac[0] | 0x02) & !0x01;
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:aB:Cd").unwrap(),
            [0x52, 0x54, 0x00, 0x12, 0xab, 0xcd]
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5g",
            "+5:54:00:12:34:56",
            "52:54:00:12:34:56:",
        ] {
            let error = parse_mac(bad).unwrap_err();
            assert!(
                matches!(error, NetError::InvalidMac(ref text) if text == bad),
                "{bad}: {error}"
            );
        }
        assert!(matches!(
            parse_mac("01:00:5e:00:00:01"),
            Err(NetError::MulticastMac(_))
        ));
        assert_eq!(
            parse_mac("zz").unwrap_err().to_string(),
            "invalid MAC address \"zz\": expected six hex bytes like 52:54:00:12:34:56"
        );
    }

    #[test]
    fn mac_formatting_round_trips() {
        let mac = [0x02, 0x00, 0xab, 0x10, 0xff, 0x01];
        assert_eq!(format_mac(&mac), "02:00:ab:10:ff:01");
        assert_eq!(parse_mac(&format_mac(&mac)).unwrap(), mac);
    }

    #[test]
    fn config_serialises_the_mac_as_text() {
        let config = NetConfig {
            mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            ..NetConfig::new(NetBackend::Tap("tap0".into()))
        };
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            json,
            r#"{"tap":"tap0","mac":"52:54:00:12:34:56","rx_rate_limiter":{},"tx_rate_limiter":{}}"#
        );
        assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), config);
        let plain: NetConfig = serde_json::from_str(r#"{"tap":"t"}"#).unwrap();
        assert_eq!(plain.mac, None);
        for bad in [
            r#"{"tap":"t","mac":"01:00:5e:00:00:01"}"#,
            r#"{"tap":"t","mac":[82,84,0,18,52,86]}"#,
            r#"{"tap":"t","queues":2}"#,
            r#"{"mac":"52:54:00:12:34:56"}"#,
            r#"{"tap":"t","stream":"/s"}"#,
            r#"{"user":{"ports":["8080"]}}"#,
            r#"{"user":{"forward":[]}}"#,
        ] {
            assert!(serde_json::from_str::<NetConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_and_user_backends_in_json() {
        let stream: NetConfig = serde_json::from_str(r#"{"stream":"/run/passt.sock"}"#).unwrap();
        assert_eq!(stream.backend, NetBackend::Stream("/run/passt.sock".into()));
        assert_eq!(stream.tap(), None);
        let user: NetConfig =
            serde_json::from_str(r#"{"user":{"ports":["127.0.0.1:8080:80/tcp","53:53/udp"]}}"#)
                .unwrap();
        let NetBackend::User(ref config) = user.backend else {
            panic!("not user: {user:?}");
        };
        assert_eq!(config.ports.len(), 2);
        let json = serde_json::to_string(&user).unwrap();
        assert_eq!(
            json,
            r#"{"user":{"ports":["127.0.0.1:8080:80/tcp","53:53/udp"]},"mac":null,"rx_rate_limiter":{},"tx_rate_limiter":{}}"#
        );
        assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), user);
        let plain: NetConfig = serde_json::from_str(r#"{"user":{}}"#).unwrap();
        assert_eq!(plain.backend, NetBackend::User(UserNetConfig::default()));
        // Snapshots encode without field names: every back end goes through postcard.
        for config in [user, stream, plain] {
            let bytes = postcard::to_allocvec(&config).unwrap();
            assert_eq!(postcard::from_bytes::<NetConfig>(&bytes).unwrap(), config);
        }
    }

    #[test]
    fn random_macs_are_local_unicast() {
        assert_eq!(locally_administered([0xff; 6])[0], 0xfe);
        assert_eq!(locally_administered([0x00; 6])[0], 0x02);
        let first = random_mac().unwrap();
        assert_eq!(first[0] & 0x03, 0x02);
        // 46 random bits: two draws colliding means the randomness is broken.
        assert_ne!(first, random_mac().unwrap());
    }
}
