//! The one-line text form of device configurations, as `hearth run` takes them:
//!
//! - disk: `path=FILE[,ro=on][,id=NAME][,bw=BYTES][,iops=N][,burst=BYTES]`
//!   ([`BlockConfig`])
//! - NIC: `tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,rx_bw=BYTES][,tx_bw=BYTES][,rx_ops=N]
//!   [,tx_ops=N][,burst=BYTES]` ([`NetConfig`]); instead of `tap=NAME`, `stream=PATH` (a
//!   passt or other `-netdev stream` peer already listening there) or a leading `user`
//!   (hearth starts passt) with `ports=[IP:]HOSTPORT:GUESTPORT[/udp]` (`+` between ports)
//! - entropy device: empty or `[bw=BYTES][,ops=N][,burst=BYTES]` ([`RngConfig`])
//! - vsock: `cid=N,socket=PATH` ([`VsockConfig`])
//! - shared folder: `tag=NAME,socket=PATH[,num_queues=N][,queue_size=N]` ([`FsConfig`])
//! - balloon: empty or `[amount_mib=N][,deflate_on_oom=on][,stats_polling_interval_s=S]
//!   [,free_page_reporting=off]` ([`BalloonConfig`]; empty is `amount_mib=0`, reporting on)
//! - serial console: `stdio`, `none`, `file=PATH` or `unix=PATH` ([`SerialConfig`])
//!
//! Rates are per second: `bw` in bytes (K, M, G suffixes are powers of 1024), `iops` and
//! `ops` in operations (suffixes are powers of 1000). Each becomes a token bucket of one
//! second's worth that refills in 1000 ms; `burst` is a one-time burst in bytes added to
//! every bandwidth bucket of the spec. A limiter from JSON with another refill time is
//! written back as its per-second rate.
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
use crate::devices::virtio::balloon::BalloonConfig;
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::fs::FsConfig;
use crate::devices::virtio::net::{
    format_mac, parse_mac, NetBackend, NetConfig, NetError, UserNetConfig,
};
use crate::devices::virtio::rng::RngConfig;
use crate::devices::virtio::vsock::VsockConfig;
use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

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
    #[error("{key} \"{value}\" is not a positive whole number with an optional K, M or G suffix")]
    Amount { key: &'static str, value: String },
    #[error("{key} \"{value}\" is too large")]
    AmountTooLarge { key: &'static str, value: String },
    #[error("burst= needs a bandwidth ({0})")]
    BurstWithoutBandwidth(&'static str),
    #[error("give one of tap=NAME, stream=PATH or user")]
    NetBackend,
    #[error("ports= needs user")]
    PortsWithoutUser,
    #[error(transparent)]
    Port(#[from] crate::net::PortError),
}

/// A rate or size: a positive whole number with an optional K, M or G suffix (either
/// case), powers of `unit` (1024 for bytes, 1000 for operations).
fn parse_amount(key: &'static str, value: &str, unit: u64) -> Result<u64, SpecError> {
    let bad = || SpecError::Amount {
        key,
        value: value.to_string(),
    };
    let (digits, power) = match value.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => {
            let power = match c.to_ascii_uppercase() {
                'K' => 1,
                'M' => 2,
                'G' => 3,
                _ => return Err(bad()),
            };
            (&value[..at], power)
        }
        _ => (value, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let too_large = || SpecError::AmountTooLarge {
        key,
        value: value.to_string(),
    };
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    let amount = unit
        .checked_pow(power)
        .and_then(|scale| number.checked_mul(scale))
        .ok_or_else(too_large)?;
    if amount == 0 {
        return Err(bad());
    }
    Ok(amount)
}

/// The per-second limiter of `bytes` and `ops` (either may be absent), with `burst` on
/// its bandwidth bucket.
fn per_second(bytes: Option<u64>, ops: Option<u64>, burst: Option<u64>) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: bytes.map(|rate| TokenBucketConfig::per_second(rate, burst)),
        ops: ops.map(|rate| TokenBucketConfig::per_second(rate, None)),
    }
}

/// A bucket's rate per second, as the spec writes it (at least 1).
fn rate(bucket: &TokenBucketConfig) -> u64 {
    let per_second = u128::from(bucket.size) * 1000 / u128::from(bucket.refill_time.max(1));
    u64::try_from(per_second).unwrap_or(u64::MAX).max(1)
}

/// Writes `,KEY=RATE` for each bucket of `limiter` that limits anything.
fn write_limiter(
    f: &mut fmt::Formatter,
    limiter: &RateLimiterConfig,
    bw_key: &str,
    ops_key: &str,
) -> fmt::Result {
    let limiter = limiter.normalized();
    if let Some(bucket) = &limiter.bandwidth {
        write!(f, ",{bw_key}={}", rate(bucket))?;
    }
    if let Some(bucket) = &limiter.ops {
        write!(f, ",{ops_key}={}", rate(bucket))?;
    }
    Ok(())
}

/// The one-time burst of the first bandwidth bucket that has one.
fn write_burst<'a>(
    f: &mut fmt::Formatter,
    limiters: impl IntoIterator<Item = &'a RateLimiterConfig>,
) -> fmt::Result {
    let burst = limiters.into_iter().find_map(|l| {
        l.normalized()
            .bandwidth
            .and_then(|b| b.one_time_burst)
            .filter(|&b| b > 0)
    });
    match burst {
        Some(burst) => write!(f, ",burst={burst}"),
        None => Ok(()),
    }
}

/// Splits `key=value,...` into pairs, keeping only `allowed` keys, each at most once. A
/// doubled comma is a comma inside the value.
pub(crate) fn parse_options(
    spec: &str,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, SpecError> {
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
        let (mut bw, mut iops, mut burst) = (None, None, None);
        let keys = ["path", "ro", "id", "bw", "iops", "burst"];
        for (key, value) in parse_options(spec, &keys)? {
            match key.as_str() {
                "path" => path = Some(value),
                "ro" => read_only = parse_switch("ro", &value)?,
                "bw" => bw = Some(parse_amount("bw", &value, 1024)?),
                "iops" => iops = Some(parse_amount("iops", &value, 1000)?),
                "burst" => burst = Some(parse_amount("burst", &value, 1024)?),
                _ => id = Some(value),
            }
        }
        if burst.is_some() && bw.is_none() {
            return Err(SpecError::BurstWithoutBandwidth("bw="));
        }
        Ok(BlockConfig {
            path: non_empty(path, "path=FILE")?.into(),
            read_only,
            id,
            rate_limiter: per_second(bw, iops, burst),
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
        write_limiter(f, &self.rate_limiter, "bw", "iops")?;
        write_burst(f, [&self.rate_limiter])
    }
}

impl FromStr for NetConfig {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        // `user` is a word, not key=value: take it off the front.
        let (user, spec) = match spec.strip_prefix("user") {
            Some("") => (true, None),
            Some(rest) if rest.starts_with(',') && !rest.starts_with(",,") => {
                (true, Some(&rest[1..]))
            }
            _ => (false, Some(spec)),
        };
        let mut tap = None;
        let mut stream = None;
        let mut ports = None;
        let mut mac = None;
        let (mut rx_bw, mut tx_bw, mut rx_ops, mut tx_ops, mut burst) =
            (None, None, None, None, None);
        let keys = [
            "tap", "stream", "ports", "mac", "rx_bw", "tx_bw", "rx_ops", "tx_ops", "burst",
        ];
        let options = match spec {
            Some(spec) => parse_options(spec, &keys)?,
            None => Vec::new(),
        };
        for (key, value) in options {
            match key.as_str() {
                "tap" => tap = Some(value),
                "stream" => stream = Some(value),
                "ports" => {
                    let list = (value.split('+'))
                        .map(str::parse)
                        .collect::<Result<Vec<crate::net::PortForward>, _>>()?;
                    ports = Some(list);
                }
                "rx_bw" => rx_bw = Some(parse_amount("rx_bw", &value, 1024)?),
                "tx_bw" => tx_bw = Some(parse_amount("tx_bw", &value, 1024)?),
                "rx_ops" => rx_ops = Some(parse_amount("rx_ops", &value, 1000)?),
                "tx_ops" => tx_ops = Some(parse_amount("tx_ops", &value, 1000)?),
                "burst" => burst = Some(parse_amount("burst", &value, 1024)?),
                _ => mac = Some(parse_mac(&value).map_err(SpecError::Mac)?),
            }
        }
        if burst.is_some() && rx_bw.is_none() && tx_bw.is_none() {
            return Err(SpecError::BurstWithoutBandwidth("rx_bw= or tx_bw="));
        }
        if ports.is_some() && !user {
            return Err(SpecError::PortsWithoutUser);
        }
        let backend = match (user, tap, stream) {
            (true, None, None) => NetBackend::User(UserNetConfig {
                ports: ports.unwrap_or_default(),
            }),
            (false, tap @ Some(_), None) => NetBackend::Tap(non_empty(tap, "tap=NAME")?),
            (false, None, stream @ Some(_)) => {
                NetBackend::Stream(non_empty(stream, "stream=PATH")?.into())
            }
            (false, None, None) => return Err(SpecError::Missing("tap=NAME")),
            _ => return Err(SpecError::NetBackend),
        };
        Ok(NetConfig {
            backend,
            mac,
            rx_rate_limiter: per_second(rx_bw, rx_ops, burst),
            tx_rate_limiter: per_second(tx_bw, tx_ops, burst),
        })
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.backend {
            NetBackend::Tap(name) => write!(f, "tap={}", escape(name))?,
            NetBackend::Stream(path) => write!(f, "stream={}", escape(&path.to_string_lossy()))?,
            NetBackend::User(user) => {
                f.write_str("user")?;
                if !user.ports.is_empty() {
                    let ports: Vec<String> = user.ports.iter().map(|p| p.to_string()).collect();
                    write!(f, ",ports={}", ports.join("+"))?;
                }
            }
        }
        if let Some(mac) = &self.mac {
            write!(f, ",mac={}", format_mac(mac))?;
        }
        write_limiter(f, &self.rx_rate_limiter, "rx_bw", "rx_ops")?;
        write_limiter(f, &self.tx_rate_limiter, "tx_bw", "tx_ops")?;
        write_burst(f, [&self.rx_rate_limiter, &self.tx_rate_limiter])
    }
}

/// `--rng` takes no value (an empty spec) or a limiter.
impl FromStr for RngConfig {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        if spec.is_empty() {
            return Ok(RngConfig::default());
        }
        let (mut bw, mut ops, mut burst) = (None, None, None);
        for (key, value) in parse_options(spec, &["bw", "ops", "burst"])? {
            match key.as_str() {
                "bw" => bw = Some(parse_amount("bw", &value, 1024)?),
                "ops" => ops = Some(parse_amount("ops", &value, 1000)?),
                _ => burst = Some(parse_amount("burst", &value, 1024)?),
            }
        }
        if burst.is_some() && bw.is_none() {
            return Err(SpecError::BurstWithoutBandwidth("bw="));
        }
        Ok(RngConfig {
            rate_limiter: per_second(bw, ops, burst),
        })
    }
}

impl fmt::Display for RngConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // Written as the other specs write their options (`,key=value`), minus the comma.
        let text = LimiterText(&self.rate_limiter).to_string();
        f.write_str(text.strip_prefix(',').unwrap_or(&text))
    }
}

/// `--balloon`: every option has a default, so an empty spec is a balloon that holds
/// nothing and gives back what the guest frees.
impl FromStr for BalloonConfig {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let mut config = BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_reporting: true,
        };
        if spec.is_empty() {
            return Ok(config);
        }
        let keys = [
            "amount_mib",
            "deflate_on_oom",
            "stats_polling_interval_s",
            "free_page_reporting",
        ];
        for (key, value) in parse_options(spec, &keys)? {
            let number = |key: &'static str| SpecError::Number {
                key,
                value: value.clone(),
            };
            match key.as_str() {
                "amount_mib" => {
                    config.amount_mib = value.parse().map_err(|_| number("amount_mib"))?
                }
                "deflate_on_oom" => config.deflate_on_oom = parse_switch("deflate_on_oom", &value)?,
                "stats_polling_interval_s" => {
                    config.stats_polling_interval_s =
                        (value.parse()).map_err(|_| number("stats_polling_interval_s"))?
                }
                _ => config.free_page_reporting = parse_switch("free_page_reporting", &value)?,
            }
        }
        Ok(config)
    }
}

impl fmt::Display for BalloonConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "amount_mib={}", self.amount_mib)?;
        if self.deflate_on_oom {
            f.write_str(",deflate_on_oom=on")?;
        }
        if self.stats_polling_interval_s > 0 {
            write!(
                f,
                ",stats_polling_interval_s={}",
                self.stats_polling_interval_s
            )?;
        }
        if !self.free_page_reporting {
            f.write_str(",free_page_reporting=off")?;
        }
        Ok(())
    }
}

/// A limiter's `,bw=...,ops=...,burst=...` options.
struct LimiterText<'a>(&'a RateLimiterConfig);

impl fmt::Display for LimiterText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write_limiter(f, self.0, "bw", "ops")?;
        write_burst(f, [self.0])
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

impl FromStr for FsConfig {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let number = |key: &'static str, value: String| {
            value
                .parse::<u16>()
                .map_err(|_| SpecError::Number { key, value })
        };
        let mut tag = None;
        let mut socket = None;
        let mut config = FsConfig::new("", "");
        let keys = ["tag", "socket", "num_queues", "queue_size"];
        for (key, value) in parse_options(spec, &keys)? {
            match key.as_str() {
                "tag" => tag = Some(value),
                "socket" => socket = Some(value),
                "num_queues" => config.num_request_queues = number("num_queues", value)?,
                _ => config.queue_size = number("queue_size", value)?,
            }
        }
        config.tag = non_empty(tag, "tag=NAME")?;
        config.socket = non_empty(socket, "socket=PATH")?.into();
        Ok(config)
    }
}

impl fmt::Display for FsConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "tag={},socket={}",
            escape(&self.tag),
            escape(&self.socket.to_string_lossy())
        )?;
        let defaults = FsConfig::new("", "");
        if self.num_request_queues != defaults.num_request_queues {
            write!(f, ",num_queues={}", self.num_request_queues)?;
        }
        if self.queue_size != defaults.queue_size {
            write!(f, ",queue_size={}", self.queue_size)?;
        }
        Ok(())
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

        /// A per-second limiter as the specs write them; `burst` on its bandwidth bucket.
        fn limiter(&mut self, burst: Option<u64>) -> RateLimiterConfig {
            let bw = self.maybe(|w| 1 + w.next());
            let ops = self.maybe(|w| 1 + w.next() % 1000);
            per_second(bw, ops, burst)
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
            let burst = words.maybe(|w| 1 + w.next());
            let disk = BlockConfig {
                path: words.text().into(),
                read_only: words.next().is_multiple_of(2),
                id: words.maybe(Words::text),
                rate_limiter: words.limiter(burst),
            };
            if burst.is_some() && disk.rate_limiter.bandwidth.is_none() {
                continue;
            }
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
                rate_limiter: RateLimiterConfig::default(),
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
            let burst = words.maybe(|w| 1 + w.next());
            let text = words.text();
            let backend = match words.next() % 3 {
                0 => NetBackend::Tap(text),
                1 => NetBackend::Stream(text.into()),
                _ => NetBackend::User(UserNetConfig::default()),
            };
            let nic = NetConfig {
                backend,
                mac: words.maybe(|_| mac),
                rx_rate_limiter: words.limiter(burst),
                tx_rate_limiter: words.limiter(burst),
            };
            let bandwidths =
                [&nic.rx_rate_limiter, &nic.tx_rate_limiter].map(|l| l.bandwidth.is_some());
            // A burst is written once, for every bandwidth bucket: both or none have it.
            if burst.is_some() && bandwidths != [true, true] {
                continue;
            }
            assert_round_trip(&nic);
        }
        let nic: NetConfig = "mac=52:54:00:AB:cd:01,tap=tap0".parse().unwrap();
        assert_eq!(nic.to_string(), "tap=tap0,mac=52:54:00:ab:cd:01");
    }

    #[test]
    fn user_and_stream_nics() {
        let nic: NetConfig = "user".parse().unwrap();
        assert_eq!(nic.backend, NetBackend::User(UserNetConfig::default()));
        let nic: NetConfig = "user,mac=52:54:00:00:00:01,ports=127.0.0.1:8080:80+5353:53/udp"
            .parse()
            .unwrap();
        let NetBackend::User(user) = &nic.backend else {
            panic!("{nic:?}");
        };
        assert_eq!(user.ports.len(), 2);
        assert_eq!(
            nic.to_string(),
            "user,ports=127.0.0.1:8080:80/tcp+5353:53/udp,mac=52:54:00:00:00:01"
        );
        assert_round_trip(&nic);
        let nic: NetConfig = "stream=/run/p,,1.sock".parse().unwrap();
        assert_eq!(nic.backend, NetBackend::Stream("/run/p,1.sock".into()));
        // A tap named "user" is still a tap.
        let nic: NetConfig = "tap=user".parse().unwrap();
        assert_eq!(nic.backend, NetBackend::Tap("user".into()));
        assert_round_trip(&nic);
        for (bad, error) in [
            ("user,tap=t", "give one of tap=NAME, stream=PATH or user"),
            (
                "tap=t,stream=/s",
                "give one of tap=NAME, stream=PATH or user",
            ),
            ("tap=t,ports=80:80", "ports= needs user"),
            ("mac=52:54:00:00:00:01", "tap=NAME is required"),
            ("stream=", "stream=PATH is required"),
            ("users", "\"users\" is not key=value"),
            (
                "user,ports=80",
                "\"80\" is not [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]",
            ),
        ] {
            assert_eq!(
                bad.parse::<NetConfig>().unwrap_err().to_string(),
                error,
                "{bad}"
            );
        }
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
    fn fs_specs_round_trip() {
        let mut words = Words(26);
        for _ in 0..200 {
            let mut config = FsConfig::new(words.text(), words.text());
            if let Some(n) = words.maybe(|w| (w.next() % 64 + 1) as u16) {
                config.num_request_queues = n;
            }
            if let Some(shift) = words.maybe(|w| w.next() % 10 + 1) {
                config.queue_size = 1 << shift;
            }
            assert_round_trip(&config);
        }
        assert_eq!(
            "tag=hostshare,socket=/run/fs.sock"
                .parse::<FsConfig>()
                .unwrap(),
            FsConfig::new("hostshare", "/run/fs.sock")
        );
        let config: FsConfig = "queue_size=256,socket=/s,num_queues=2,tag=t"
            .parse()
            .unwrap();
        assert_eq!((config.num_request_queues, config.queue_size), (2, 256));
        assert_eq!(
            config.to_string(),
            "tag=t,socket=/s,num_queues=2,queue_size=256"
        );
    }

    #[test]
    fn bad_fs_specs() {
        for (spec, message) in [
            ("socket=/s", "tag=NAME is required"),
            ("tag=,socket=/s", "tag=NAME is required"),
            ("tag=t", "socket=PATH is required"),
            (
                "tag=t,socket=/s,num_queues=x",
                "num_queues \"x\" is not a number",
            ),
            (
                "tag=t,socket=/s,queue_size=70000",
                "queue_size \"70000\" is not a number",
            ),
            (
                "tag=t,socket=/s,cache=auto",
                "unknown option \"cache\" (expected tag, socket, num_queues, queue_size)",
            ),
            ("tag=t,tag=u,socket=/s", "option \"tag\" given twice"),
            ("hostshare", "\"hostshare\" is not key=value"),
        ] {
            assert_eq!(
                spec.parse::<FsConfig>().unwrap_err().to_string(),
                message,
                "{spec}"
            );
        }
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
                "unknown option \"size\" (expected path, ro, id, bw, iops, burst)",
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
                "unknown option \"queues\" (expected tap, stream, ports, mac, rx_bw, tx_bw, rx_ops, tx_ops, burst)",
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

    #[test]
    fn rates_become_per_second_buckets() {
        let disk: BlockConfig = "path=/d,bw=10M,iops=1k,burst=64K".parse().unwrap();
        assert_eq!(
            disk.rate_limiter,
            RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 10 << 20,
                    one_time_burst: Some(64 << 10),
                    refill_time: 1000
                }),
                ops: Some(TokenBucketConfig::per_second(1000, None)),
            }
        );
        assert_eq!(
            disk.to_string(),
            "path=/d,bw=10485760,iops=1000,burst=65536"
        );
        let nic: NetConfig = "tap=t,rx_bw=1g,tx_ops=5,burst=1".parse().unwrap();
        assert_eq!(
            nic.rx_rate_limiter.bandwidth,
            Some(TokenBucketConfig::per_second(1 << 30, Some(1)))
        );
        assert_eq!(nic.rx_rate_limiter.ops, None);
        assert_eq!(nic.tx_rate_limiter.bandwidth, None);
        assert_eq!(nic.tx_rate_limiter.ops.unwrap().size, 5);
        assert_eq!(nic.to_string(), "tap=t,rx_bw=1073741824,tx_ops=5,burst=1");
        let rng: RngConfig = "bw=1K,ops=2M".parse().unwrap();
        assert_eq!(rng.to_string(), "bw=1024,ops=2000000");
        assert_eq!(rng.to_string().parse::<RngConfig>().unwrap(), rng);
        assert_eq!("".parse::<RngConfig>().unwrap(), RngConfig::default());
        assert_eq!(RngConfig::default().to_string(), "");
        // Another refill time is written as its rate per second.
        let mut slow = disk.clone();
        slow.rate_limiter = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 500,
                one_time_burst: None,
                refill_time: 250,
            }),
            ops: Some(TokenBucketConfig {
                size: 0,
                one_time_burst: None,
                refill_time: 250,
            }),
        };
        assert_eq!(slow.to_string(), "path=/d,bw=2000");
    }

    #[test]
    fn bad_rates() {
        for (spec, expected) in [
            (
                "path=/d,bw=0",
                "bw \"0\" is not a positive whole number with an optional K, M or G suffix",
            ),
            (
                "path=/d,bw=10MB",
                "bw \"10MB\" is not a positive whole number with an optional K, M or G suffix",
            ),
            (
                "path=/d,iops=-1",
                "iops \"-1\" is not a positive whole number with an optional K, M or G suffix",
            ),
            (
                "path=/d,iops=1.5k",
                "iops \"1.5k\" is not a positive whole number with an optional K, M or G suffix",
            ),
            (
                "path=/d,bw=M",
                "bw \"M\" is not a positive whole number with an optional K, M or G suffix",
            ),
            (
                "path=/d,bw=",
                "bw \"\" is not a positive whole number with an optional K, M or G suffix",
            ),
            (
                "path=/d,bw=99999999999G",
                "bw \"99999999999G\" is too large",
            ),
            (
                "path=/d,bw=99999999999999999999999",
                "bw \"99999999999999999999999\" is too large",
            ),
            ("path=/d,iops=5,burst=1M", "burst= needs a bandwidth (bw=)"),
        ] {
            let err = spec.parse::<BlockConfig>().unwrap_err();
            assert_eq!(err.to_string(), expected, "{spec}");
        }
        let err = "tap=t,rx_ops=1,burst=1".parse::<NetConfig>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "burst= needs a bandwidth (rx_bw= or tx_bw=)"
        );
        let err = "bw=1,size=2".parse::<RngConfig>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown option \"size\" (expected bw, ops, burst)"
        );
        assert!("burst=5".parse::<RngConfig>().is_err());
        assert_eq!(
            parse_amount("bw", "18446744073709551615", 1024).unwrap(),
            u64::MAX
        );
        assert_eq!(
            parse_amount("bw", "16777215G", 1024).unwrap(),
            16777215 << 30
        );
    }

    #[test]
    fn balloon_specs() {
        let empty: BalloonConfig = "".parse().unwrap();
        assert_eq!(empty.amount_mib, 0);
        assert!(empty.free_page_reporting && !empty.deflate_on_oom);
        assert_eq!(empty.stats_polling_interval_s, 0);
        assert_eq!(empty.to_string(), "amount_mib=0");

        let full: BalloonConfig =
            "amount_mib=128,deflate_on_oom=on,stats_polling_interval_s=5,free_page_reporting=off"
                .parse()
                .unwrap();
        assert_eq!(
            full,
            BalloonConfig {
                amount_mib: 128,
                deflate_on_oom: true,
                stats_polling_interval_s: 5,
                free_page_reporting: false,
            }
        );
        assert_eq!(full.to_string().parse::<BalloonConfig>().unwrap(), full);
        let stats: BalloonConfig = "stats_polling_interval_s=1".parse().unwrap();
        assert_eq!(stats.to_string(), "amount_mib=0,stats_polling_interval_s=1");

        for (bad, why) in [
            ("amount_mib=-1", "amount_mib \"-1\" is not a number"),
            ("amount_mib=1G", "amount_mib \"1G\" is not a number"),
            ("amount_mib=4294967296", "is not a number"),
            ("stats_polling_interval_s=65536", "is not a number"),
            ("deflate_on_oom=maybe", "deflate_on_oom must be on or off"),
            ("size=3", "unknown option \"size\""),
            ("amount_mib=1,amount_mib=2", "given twice"),
            ("128", "is not key=value"),
        ] {
            let err = bad.parse::<BalloonConfig>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
