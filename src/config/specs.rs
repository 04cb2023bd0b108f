//! The one-line text form of device configurations, as `hearth run` takes them:
//!
//! - disk: `path=FILE[,ro=on][,id=NAME]` ([`BlockConfig`])
//! - NIC: `tap=NAME[,mac=XX:XX:XX:XX:XX:XX]` ([`NetConfig`])
//! - vsock: `cid=N,socket=PATH` ([`VsockConfig`])
//! - serial console: `stdio`, `none`, `file=PATH` or `unix=PATH` ([`SerialConfig`])
//!
//! Options are `key=value` separated by commas; a comma inside a value is written twice
//! (`path=a,,b.img` is the file `a,b.img`), as QEMU does. `Display` writes that escape, so
//! `spec.parse::<T>()` of `config.to_string()` gives `config` back for every configuration
//! that passes validation and whose paths are UTF-8 (a non-UTF-8 path is shown lossily).
//!
//! Parsing checks syntax only; values are checked against the host (files readable, CID
//! and id ranges) by `VmConfig::validate`, which every producer runs.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::SerialConfig;
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::{format_mac, parse_mac, NetConfig, NetError};
use crate::devices::virtio::vsock::VsockConfig;

/// Why a spec does not parse. The caller names the spec and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("\"{0}\" is not key=value")]
    NotKeyValue(String),
    #[error("unknown option \"{key}\" (expected {expected})")]
    UnknownOption { key: String, expected: String },
    #[error("option \"{0}\" given twice")]
    Repeated(String),
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{0} must be on or off")]
    Switch(&'static str),
    #[error("{key} \"{value}\" is not a number")]
    Number { key: &'static str, value: String },
    #[error(transparent)]
    Mac(NetError),
    #[error("expected stdio, none, file=PATH or unix=PATH")]
    Serial,
}

/// Splits `key=value,...` into pairs, keeping only `allowed` keys, each at most once. A
/// doubled comma is a comma inside the value.
fn parse_options(spec: &str, allowed: &[&str]) -> Result<Vec<(String, String)>, SpecError> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                current.push(',');
            }
            ',' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    let mut options: Vec<(String, String)> = Vec::new();
    for part in parts {
        let Some((key, value)) = part.split_once('=') else {
            return Err(SpecError::NotKeyValue(part));
        };
        if !allowed.contains(&key) {
            return Err(SpecError::UnknownOption {
                key: key.to_string(),
                expected: allowed.join(", "),
            });
        }
        if options.iter().any(|(k, _)| k == key) {
            return Err(SpecError::Repeated(key.to_string()));
        }
        options.push((key.to_string(), value.to_string()));
    }
    Ok(options)
}

/// A value as [`parse_options`] reads it back.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// `on`/`off` (also `true`/`false`, `yes`/`no`).
fn parse_switch(key: &'static str, value: &str) -> Result<bool, SpecError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(SpecError::Switch(key)),
    }
}

fn non_empty(value: Option<String>, missing: &'static str) -> Result<String, SpecError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or(SpecError::Missing(missing))
}

impl FromStr for BlockConfig {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let mut path = None;
        let mut read_only = false;
        let mut id = None;
        for (key, value) in parse_options(spec, &["path", "ro", "id"])? {
            match key.as_str() {
                "path" => path = Some(value),
                "ro" => read_only = parse_switch("ro", &value)?,
                _ => id = Some(value),
            }
        }
        Ok(BlockConfig {
            path: non_empty(path, "path=FILE")?.into(),
            read_only,
            id,
        })
    }
}

impl fmt::Display for BlockConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "path={}", escape(&self.path.to_string_lossy()))?;
        if self.read_only {
            f.write_str(",ro=on")?;
        }
        if let Some(id) = &self.id {
            write!(f, ",id={}", escape(id))?;
        }
        Ok(())
    }
}

impl FromStr for NetConfig {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let mut tap = None;
        let mut mac = None;
        for (key, value) in parse_options(spec, &["tap", "mac"])? {
            match key.as_str() {
                "tap" => tap = Some(value),
                _ => mac = Some(parse_mac(&value).map_err(SpecError::Mac)?),
            }
        }
        Ok(NetConfig {
            tap: non_empty(tap, "tap=NAME")?,
            mac,
        })
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "tap={}", escape(&self.tap))?;
        if let Some(mac) = &self.mac {
            write!(f, ",mac={}", format_mac(mac))?;
        }
        Ok(())
    }
}

impl FromStr for VsockConfig {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let mut cid = None;
        let mut socket = None;
        for (key, value) in parse_options(spec, &["cid", "socket"])? {
            match key.as_str() {
                "cid" => {
                    cid = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| SpecError::Number { key: "cid", value })?,
                    )
                }
                _ => socket = Some(value),
            }
        }
        Ok(VsockConfig {
            guest_cid: cid.ok_or(SpecError::Missing("cid=N"))?,
            uds_path: non_empty(socket, "socket=PATH")?.into(),
        })
    }
}

impl fmt::Display for VsockConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "cid={},socket={}",
            self.guest_cid,
            escape(&self.uds_path.to_string_lossy())
        )
    }
}

/// The path is everything after `file=` or `unix=`, commas included: there are no other
/// options to separate.
impl FromStr for SerialConfig {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        match spec {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match spec.split_once('=') {
                Some(("file", path)) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
                _ => Err(SpecError::Serial),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Stdio => f.write_str("stdio"),
            Self::None => f.write_str("none"),
            Self::File(path) => write!(f, "file={}", path.to_string_lossy()),
            Self::Unix(path) => write!(f, "unix={}", path.to_string_lossy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random text over an alphabet that includes the separators.
    struct Words(u64);

    impl Words {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        /// 1 to 12 characters; commas and equals signs are common.
        fn text(&mut self) -> String {
            const ALPHABET: [char; 12] =
                [',', '=', '/', 'a', 'Z', '0', '.', ' ', 'é', '-', ':', '_'];
            let len = 1 + self.next() % 12;
            (0..len)
                .map(|_| ALPHABET[(self.next() % ALPHABET.len() as u64) as usize])
                .collect()
        }

        fn maybe<T>(&mut self, make: impl FnOnce(&mut Self) -> T) -> Option<T> {
            self.next().is_multiple_of(2).then(|| make(self))
        }
    }

    /// `config` → text → config gives `config` back, and the text is canonical.
    #[track_caller]
    fn assert_round_trip<T>(config: &T)
    where
        T: FromStr<Err = SpecError> + fmt::Display + PartialEq + fmt::Debug,
    {
        let text = config.to_string();
        let back: T = text
            .parse()
            .unwrap_or_else(|e| panic!("{config:?} as {text:?} does not parse: {e}"));
        assert_eq!(&back, config, "via {text:?}");
        assert_eq!(back.to_string(), text);
    }

    #[test]
    fn disks_round_trip() {
        let mut words = Words(1);
        for _ in 0..500 {
            let disk = BlockConfig {
                path: words.text().into(),
                read_only: words.next().is_multiple_of(2),
                id: words.maybe(Words::text),
            };
            assert_round_trip(&disk);
        }
        for fixed in [
            "path=a,,b.img",
            "path=,,,ro=on",
            "path=x,,,,y,id=,,",
            "path=/a=b,id=",
        ] {
            let disk: BlockConfig = fixed.parse().unwrap();
            assert_eq!(disk.to_string(), fixed);
        }
        let disk: BlockConfig = "path=a,,b.img,ro=on,id=x,,y".parse().unwrap();
        assert_eq!(disk.path, PathBuf::from("a,b.img"));
        assert_eq!(disk.id.as_deref(), Some("x,y"));
    }

    #[test]
    fn disk_specs_in_any_order_become_canonical() {
        let disk: BlockConfig = "id=data,ro=yes,path=/d.img".parse().unwrap();
        assert_eq!(
            disk,
            BlockConfig {
                path: "/d.img".into(),
                read_only: true,
                id: Some("data".into()),
            }
        );
        assert_eq!(disk.to_string(), "path=/d.img,ro=on,id=data");
        let plain: BlockConfig = "path=/d.img,ro=off".parse().unwrap();
        assert_eq!(plain.to_string(), "path=/d.img");
    }

    #[test]
    fn nics_round_trip() {
        let mut words = Words(2);
        for _ in 0..500 {
            let mut mac = [0u8; 6];
            for byte in &mut mac {
                *byte = words.next() as u8;
            }
            mac[0] &= !0x01;
            let nic = NetConfig {
                tap: words.text(),
                mac: words.maybe(|_| mac),
            };
            assert_round_trip(&nic);
        }
        let nic: NetConfig = "mac=52:54:00:AB:cd:01,tap=tap0".parse().unwrap();
        assert_eq!(nic.to_string(), "tap=tap0,mac=52:54:00:ab:cd:01");
    }

    #[test]
    fn vsocks_round_trip() {
        let mut words = Words(3);
        for _ in 0..500 {
            let vsock = VsockConfig {
                guest_cid: words.next(),
                uds_path: words.text().into(),
            };
            assert_round_trip(&vsock);
        }
        let vsock: VsockConfig = "socket=/run/v,,1.sock,cid=007".parse().unwrap();
        assert_eq!(vsock.guest_cid, 7);
        assert_eq!(vsock.uds_path, PathBuf::from("/run/v,1.sock"));
        assert_eq!(vsock.to_string(), "cid=7,socket=/run/v,,1.sock");
    }

    #[test]
    fn serial_consoles_round_trip() {
        let mut words = Words(4);
        let mut configs = vec![SerialConfig::Stdio, SerialConfig::None];
        for _ in 0..200 {
            configs.push(SerialConfig::File(words.text().into()));
            configs.push(SerialConfig::Unix(words.text().into()));
        }
        for config in &configs {
            assert_round_trip(config);
        }
        assert_eq!(
            "file=/tmp/a,b=c".parse::<SerialConfig>().unwrap(),
            SerialConfig::File("/tmp/a,b=c".into())
        );
    }

    #[test]
    fn bad_disk_specs() {
        for (spec, expected) in [
            ("ro=on", "path=FILE is required"),
            ("path=", "path=FILE is required"),
            ("/d.img", "\"/d.img\" is not key=value"),
            ("path=/d,ro=maybe", "ro must be on or off"),
            (
                "path=/d,size=1G",
                "unknown option \"size\" (expected path, ro, id)",
            ),
            ("path=/d,path=/e", "option \"path\" given twice"),
            ("path=/d,", "\"\" is not key=value"),
            ("", "\"\" is not key=value"),
        ] {
            let err = spec.parse::<BlockConfig>().unwrap_err();
            assert_eq!(err.to_string(), expected, "{spec}");
        }
    }

    #[test]
    fn bad_nic_specs() {
        for (spec, expected) in [
            ("mac=52:54:00:12:34:56", "tap=NAME is required"),
            ("tap=", "tap=NAME is required"),
            (
                "tap=t,queues=2",
                "unknown option \"queues\" (expected tap, mac)",
            ),
            ("t0", "\"t0\" is not key=value"),
        ] {
            let err = spec.parse::<NetConfig>().unwrap_err();
            assert_eq!(err.to_string(), expected, "{spec}");
        }
        assert!(matches!(
            "tap=t,mac=zz".parse::<NetConfig>(),
            Err(SpecError::Mac(NetError::InvalidMac(_)))
        ));
        assert!(matches!(
            "tap=t,mac=01:00:5e:00:00:01".parse::<NetConfig>(),
            Err(SpecError::Mac(NetError::MulticastMac(_)))
        ));
    }

    #[test]
    fn bad_vsock_specs() {
        for (spec, expected) in [
            ("cid=x,socket=/s", "cid \"x\" is not a number"),
            ("cid=-3,socket=/s", "cid \"-3\" is not a number"),
            ("socket=/s", "cid=N is required"),
            ("cid=3", "socket=PATH is required"),
            ("cid=3,socket=", "socket=PATH is required"),
            ("cid=3,socket=/s,cid=4", "option \"cid\" given twice"),
        ] {
            let err = spec.parse::<VsockConfig>().unwrap_err();
            assert_eq!(err.to_string(), expected, "{spec}");
        }
    }

    #[test]
    fn bad_serial_specs() {
        for bad in ["", "file=", "unix=", "tcp=1", "pty", "Stdio"] {
            assert!(
                matches!(bad.parse::<SerialConfig>(), Err(SpecError::Serial)),
                "{bad}"
            );
        }
    }
}
