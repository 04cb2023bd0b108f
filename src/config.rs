//! Inert VM configuration: the types every producer (the `hearth run` flags, hearth's JSON
//! config file, the API) fills in, and the checks they all share. The builder only ever
//! sees a `VmConfig` that passed [`VmConfig::validate`], and nothing here opens /dev/kvm.
//!
//! - this file: [`VmConfig`], its defaults, validation against this host, and hearth's
//!   JSON config file format (serde).
//! - `specs.rs`: the `key=value,...` text syntax of disks, NICs, vsock and the serial
//!   console (`FromStr` and `Display` that round-trip).
//! - `cmdline.rs`: the kernel command line read as Linux reads it (parameter names, quotes,
//!   the `--` before init's arguments).

pub mod cmdline;
mod restore;
pub mod specs;

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::layout;
use crate::arch::pvm;
use crate::devices::virtio::balloon::{BalloonConfig, BalloonError};
use crate::devices::virtio::block::{self, BlockConfig};
use crate::devices::virtio::fs::{self as virtio_fs, FsConfig, FsConfigError};
use crate::devices::virtio::net::{self, NetConfig};
use crate::devices::virtio::rng::RngConfig;
use crate::devices::virtio::vsock::{self, VsockConfig};

pub use restore::{DiskOverride, FsOverride, NetOverride, RestoreConfig};
pub use specs::SpecError;

/// Command line used when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Guest RAM when the user gives no size.
pub const DEFAULT_MEM_SIZE: u64 = 256 << 20;

/// Most vCPUs hearth configures: APIC ids must fit the xAPIC's 8 bits (0xff is broadcast)
/// and the MP table's CPU entries.
pub const MAX_VCPUS: u64 = 254;

/// Smallest guest: room for the boot structures below 1 MiB and a small kernel above it.
pub const MIN_MEMORY: u64 = 2 << 20;

/// Guest RAM is mapped in whole pages.
const PAGE_SIZE: u64 = 4096;

/// The MMIO hole is skipped, so the top guest-physical address grows by its size; this
/// keeps it inside the guest's physical address space.
const MAX_MEMORY: u64 = 1 << 46;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid memory size \"{value}\": {reason}")]
    MemorySize { value: String, reason: String },
    #[error("guest memory {size} exceeds this host's memory ({host_mib} MiB)")]
    MemoryAboveHost { size: String, host_mib: u64 },
    #[error("invalid number of vCPUs {0}: must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u64),
    #[error("cannot read {what} \"{path}\"")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} \"{path}\" is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("the {0} path is empty")]
    EmptyPath(&'static str),
    #[error("initrd \"{path}\" ({size} bytes) does not fit in {mem_mib} MiB of guest memory")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        mem_mib: u64,
    },
    #[error(
        "kernel command line is {len} bytes{extra}, longer than the {max} bytes the kernel accepts"
    )]
    CmdlineTooLong {
        len: usize,
        max: usize,
        extra: &'static str,
    },
    #[error("kernel command line is invalid: {0}")]
    CmdlineInvalid(String),
    #[error(
        "clearcpuid={0} (yours merged with the compat profile's) is longer than the {max} \
         bytes Linux reads",
        max = CLEARCPUID_MAX - 1
    )]
    ClearCpuidTooLong(String),
    #[error("boot arguments \"{0}\" contain \" -- \": init arguments go in init_args")]
    InitArgsInBootArgs(String),
    #[error("disk \"{path}\": id \"{id}\" is {len} bytes, longer than {max}", max = block::ID_BYTES)]
    DiskIdTooLong {
        path: PathBuf,
        id: String,
        len: usize,
    },
    #[error("invalid tap name \"{0}\": expected 1 to 15 printable characters without '/' or ':'")]
    TapName(String),
    #[error("{nic}: MAC address {mac} is multicast; a NIC needs a unicast address")]
    MulticastMac { nic: String, mac: String },
    #[error("the network socket path is empty")]
    EmptyStreamPath,
    #[error(transparent)]
    Port(#[from] crate::net::PortError),
    #[error(transparent)]
    Fs(#[from] FsConfigError),
    #[error("invalid vsock guest CID {0}: must be between 3 and 4294967294")]
    VsockCid(u64),
    #[error("two overrides for {kind} {index}")]
    DuplicateOverride { kind: &'static str, index: usize },
    #[error("cannot read config file \"{path}\"")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file \"{path}\"")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    #[error(
        "invalid RIP sampling interval {0} ms: must be between 1 and {MAX_SAMPLE_INTERVAL_MS}"
    )]
    SampleInterval(u32),
    #[error("cannot write the configuration as JSON")]
    Serialize(#[source] serde_json::Error),
}

/// Where the guest's serial console is connected. In JSON: `"stdio"`, `"none"`,
/// `{"file": PATH}` or `{"unix": PATH}`; as text (`--serial`): see `specs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    /// hearth's stdin and stdout (raw mode when stdin is a terminal).
    #[default]
    Stdio,
    /// Output discarded, no input.
    None,
    /// Output appended to a file, no input.
    File(PathBuf),
    /// A Unix socket hearth listens on; one client at a time gets output and sends input.
    Unix(PathBuf),
}

/// The CPU model the user asks for; `auto` is resolved on the host that runs the VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CpuProfileChoice {
    /// `compat` exactly when the host KVM is nested PVM.
    #[default]
    Auto,
    Host,
    Compat,
}

impl CpuProfileChoice {
    /// The profile this choice means on this host.
    pub fn resolve(self) -> CpuProfile {
        match self {
            Self::Host => CpuProfile::Host,
            Self::Compat => CpuProfile::Compat,
            Self::Auto if pvm::host_is_pvm() => CpuProfile::Compat,
            Self::Auto => CpuProfile::Host,
        }
    }
}

/// Whether the compat profile appends its boot speed-ups (`arch::pvm::BOOT_SPEEDUPS`) to the
/// guest command line. In JSON and on the command line: `"on"` or `"off"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BootSpeedups {
    #[default]
    On,
    Off,
}

/// The CPU model the guest gets, after `auto` has been resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuProfile {
    /// Host CPU as KVM supports it; no VMM-side fixups.
    Host,
    /// Nested-PVM compatibility: features hidden, failing instructions completed by hearth.
    Compat,
}

/// Longest RIP sampling interval: a minute between samples tells nothing in a report.
pub const MAX_SAMPLE_INTERVAL_MS: u32 = 60_000;

/// Sample each vCPU's RIP and log where the guest spends its time (`--sample-rip`; see
/// `diag::sampler`). A diagnostic: off unless asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RipSamplingConfig {
    /// Milliseconds between samples of each vCPU.
    pub interval_ms: u32,
    /// A System.map or an ELF with a symbol table; without one, the kernel's own symbols
    /// or a System.map beside it, else raw addresses.
    #[serde(default)]
    pub kernel_symbols: Option<PathBuf>,
}

/// Everything needed to build a VM. Producers fill it in (start from [`VmConfig::new`]),
/// then call [`VmConfig::validate`]; hearth's JSON config file is this struct serialised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel boot arguments (the compat profile appends its own); no ` -- ` in here.
    #[serde(default = "default_boot_args")]
    pub boot_args: String,
    /// Arguments for the guest's init, passed after ` -- `.
    #[serde(default)]
    pub init_args: Option<String>,
    #[serde(default = "default_vcpu_count")]
    pub vcpu_count: u8,
    /// Guest RAM in bytes. JSON also takes a size string such as `"256M"`.
    #[serde(
        default = "default_mem_size",
        deserialize_with = "deserialize_mem_size"
    )]
    pub mem_size: u64,
    #[serde(default)]
    pub serial: SerialConfig,
    /// Attached in order: the guest sees vda, vdb, ...
    #[serde(default)]
    pub disks: Vec<BlockConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shared folders, each served by a vhost-user back end (virtiofsd). With
    /// any, guest RAM is a shareable memfd (see `vstate::memory`).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// A virtio-rng entropy device (JSON `"rng": {}`), served from the host's getrandom.
    #[serde(default)]
    pub rng: Option<RngConfig>,
    /// A virtio-balloon (JSON `"balloon": {"amount_mib": 0}`): memory the guest gives
    /// back, on request and (free page reporting) unasked.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// Print the time to the guest's boot-complete signal on stderr.
    #[serde(default)]
    pub boot_timer: bool,
    /// Absent from the JSON when off, so configs written before it read back the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rip: Option<RipSamplingConfig>,
    #[serde(default)]
    pub cpu_profile: CpuProfileChoice,
    /// With the compat profile, append the boot speed-ups the user did not decide on.
    #[serde(default)]
    pub boot_speedups: BootSpeedups,
}

fn default_boot_args() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn default_vcpu_count() -> u8 {
    1
}

fn default_mem_size() -> u64 {
    DEFAULT_MEM_SIZE
}

/// A number of bytes, or a string [`parse_memory_size`] reads.
fn deserialize_mem_size<'de, D: serde::Deserializer<'de>>(input: D) -> Result<u64, D::Error> {
    struct Size;
    impl serde::de::Visitor<'_> for Size {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size in bytes or a string such as \"256M\"")
        }

        fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<u64, E> {
            Ok(bytes)
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<u64, E> {
            parse_memory_size(text).map_err(E::custom)
        }
    }
    input.deserialize_any(Size)
}

impl VmConfig {
    /// The defaults of `hearth run` for this kernel: 1 vCPU, 256 MiB, [`DEFAULT_CMDLINE`],
    /// serial on stdio, no devices, CPU profile `auto`.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            boot_args: default_boot_args(),
            init_args: None,
            vcpu_count: default_vcpu_count(),
            mem_size: DEFAULT_MEM_SIZE,
            serial: SerialConfig::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            fs: Vec::new(),
            rng: None,
            balloon: None,
            boot_timer: false,
            sample_rip: None,
            cpu_profile: CpuProfileChoice::default(),
            boot_speedups: BootSpeedups::default(),
        }
    }

    /// Reads hearth's JSON config file (see README, "File formats"); not yet validated.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The JSON config file [`VmConfig::from_file`] reads back. Fails only for paths that
    /// are not UTF-8.
    pub fn to_json(&self) -> Result<String, ConfigError> {
        serde_json::to_string_pretty(self).map_err(ConfigError::Serialize)
    }

    /// Checks the configuration against this host: sizes and counts in range, kernel,
    /// initrd and disk images readable, the initrd fits, the command line is acceptable.
    /// Every producer calls this, so the flags, the config file and the API give the same
    /// answer to the same mistake.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || u64::from(self.vcpu_count) > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpu_count.into()));
        }
        check_memory_size(self.mem_size).map_err(|reason| ConfigError::MemorySize {
            value: self.mem_size.to_string(),
            reason,
        })?;
        if let Some(host) = host_memory_bytes() {
            if self.mem_size > host {
                return Err(ConfigError::MemoryAboveHost {
                    size: format_memory_size(self.mem_size),
                    host_mib: host >> 20,
                });
            }
        }
        check_readable_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            let size = check_readable_file("initrd", initrd)?;
            // The initrd goes above the kernel, below the MMIO hole; a quick bound here, the
            // exact placement is checked when it is loaded.
            let low_ram_end = self.mem_size.min(layout::MMIO32_START);
            if size > low_ram_end.saturating_sub(layout::HIMEM_START) {
                return Err(ConfigError::InitrdTooLarge {
                    path: initrd.clone(),
                    size,
                    mem_mib: self.mem_size >> 20,
                });
            }
        }
        match &self.serial {
            SerialConfig::File(path) | SerialConfig::Unix(path) if path.as_os_str().is_empty() => {
                return Err(ConfigError::EmptyPath("serial console"));
            }
            _ => {}
        }
        for disk in &self.disks {
            validate_disk(disk)?;
        }
        for nic in &self.nets {
            validate_net(nic)?;
        }
        if let Some(vsock) = &self.vsock {
            if !vsock::valid_guest_cid(vsock.guest_cid) {
                return Err(ConfigError::VsockCid(vsock.guest_cid));
            }
            if vsock.uds_path.as_os_str().is_empty() {
                return Err(ConfigError::EmptyPath("vsock socket"));
            }
        }
        virtio_fs::validate_all(&self.fs)?;
        if let Some(balloon) = &self.balloon {
            BalloonConfig::check_amount(balloon.amount_mib, self.mem_size >> 20)?;
        }
        if let Some(sampling) = &self.sample_rip {
            if !(1..=MAX_SAMPLE_INTERVAL_MS).contains(&sampling.interval_ms) {
                return Err(ConfigError::SampleInterval(sampling.interval_ms));
            }
            if let Some(symbols) = &sampling.kernel_symbols {
                check_readable_file("kernel symbols", symbols)?;
            }
        }
        // Otherwise the compat profile's options would land among the init arguments.
        if cmdline::params(&self.boot_args)
            .iter()
            .any(cmdline::Param::is_separator)
        {
            return Err(ConfigError::InitArgsInBootArgs(self.boot_args.clone()));
        }
        if self.resolved_cpu_profile() == CpuProfile::Compat {
            if let Some(value) = clearcpuid_too_long(&self.boot_args) {
                return Err(ConfigError::ClearCpuidTooLong(value));
            }
        }
        // Building the command line checks its length and characters.
        self.kernel_cmdline()?;
        Ok(())
    }

    /// The CPU profile this VM gets on this host.
    pub fn resolved_cpu_profile(&self) -> CpuProfile {
        self.cpu_profile.resolve()
    }

    /// The full kernel command line: the user's boot arguments, what the CPU profile needs,
    /// then the init arguments.
    pub fn kernel_cmdline(&self) -> Result<linux_loader::cmdline::Cmdline, ConfigError> {
        use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
        let extra = match self.resolved_cpu_profile() {
            CpuProfile::Compat => compat_boot_args(&self.boot_args, self.boot_speedups),
            CpuProfile::Host => String::new(),
        };
        let extra = extra.as_str();
        let too_long = || {
            let len = self.boot_args.len()
                + self.init_args.as_ref().map_or(0, |a| a.len() + 4)
                + if extra.is_empty() { 0 } else { extra.len() + 1 };
            ConfigError::CmdlineTooLong {
                len,
                max: layout::CMDLINE_MAX_SIZE - 1,
                extra: match (extra.is_empty(), self.boot_speedups) {
                    (true, _) => "",
                    (false, BootSpeedups::On) => {
                        " with the compat profile's options (--boot-speedups off leaves some out)"
                    }
                    (false, BootSpeedups::Off) => " with the compat profile's options",
                },
            }
        };
        let map = |e: CmdlineError| match e {
            CmdlineError::TooLarge => too_long(),
            other => ConfigError::CmdlineInvalid(other.to_string()),
        };
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(map)?;
        if !self.boot_args.trim().is_empty() {
            cmdline.insert_str(&self.boot_args).map_err(map)?;
        }
        if !extra.is_empty() {
            cmdline.insert_str(extra).map_err(map)?;
        }
        if let Some(init) = &self.init_args {
            cmdline.insert_init_args(init).map_err(map)?;
        }
        Ok(cmdline)
    }
}

fn validate_disk(disk: &BlockConfig) -> Result<(), ConfigError> {
    if let Some(id) = &disk.id {
        if id.len() > block::ID_BYTES {
            return Err(ConfigError::DiskIdTooLong {
                path: disk.path.clone(),
                id: id.clone(),
                len: id.len(),
            });
        }
    }
    check_readable_file("disk image", &disk.path)?;
    Ok(())
}

/// Whether the tap or socket exists is checked when the device opens it.
pub(crate) fn validate_net_backend(backend: &net::NetBackend) -> Result<(), ConfigError> {
    match backend {
        net::NetBackend::Tap(name) if !net::tap::valid_name(name) => {
            Err(ConfigError::TapName(name.clone()))
        }
        net::NetBackend::Stream(path) if path.as_os_str().is_empty() => {
            Err(ConfigError::EmptyStreamPath)
        }
        net::NetBackend::User(user) => Ok(crate::net::check_distinct(&user.ports)?),
        _ => Ok(()),
    }
}

fn validate_net(nic: &NetConfig) -> Result<(), ConfigError> {
    validate_net_backend(&nic.backend)?;
    match nic.mac {
        Some(mac) if mac[0] & 0x01 != 0 => Err(ConfigError::MulticastMac {
            nic: match &nic.backend {
                net::NetBackend::Tap(name) => format!("tap \"{name}\""),
                net::NetBackend::Stream(path) => format!("network socket \"{}\"", path.display()),
                net::NetBackend::User(_) => "user-mode NIC".to_string(),
            },
            mac: net::format_mac(&mac),
        }),
        _ => Ok(()),
    }
}

/// Splits a command line "boot args -- init args" at the first `--` the kernel would stop
/// at (not one inside quotes), into [`VmConfig::boot_args`] and [`VmConfig::init_args`].
pub fn split_cmdline(line: &str) -> (String, Option<String>) {
    let (boot, init) = cmdline::split_at_separator(line);
    (boot.to_string(), init.map(str::to_string))
}

/// What the compat profile appends after `boot_args` (the user's, without init's): what
/// the guest must not use ([`pvm::GUEST_CMDLINE`]), then, with `speedups` on, each of
/// [`pvm::BOOT_SPEEDUPS`] the user has not decided on. A speed-up is left out when the user
/// set a parameter of the same name (whatever its value) or one of its `decided_by`, except
/// the ones the kernel accumulates (`initcall_blacklist`), which add to the user's.
pub fn compat_boot_args(boot_args: &str, speedups: BootSpeedups) -> String {
    let mut args = guest_restrictions(boot_args);
    if speedups == BootSpeedups::Off {
        return args;
    }
    let user = cmdline::kernel_param_names(boot_args);
    let set_by_user = |name: &str| user.contains(&cmdline::normalized_name(name));
    for speedup in pvm::BOOT_SPEEDUPS {
        let decided = !speedup.accumulates && set_by_user(speedup.name())
            || speedup.decided_by.iter().any(|name| set_by_user(name));
        if !decided {
            args.push(' ');
            args.push_str(speedup.param);
        }
    }
    args
}

/// [`pvm::GUEST_CMDLINE`] with the user's own `clearcpuid=` kept: x86 reads that option's
/// last occurrence only (`cmdline_find_option`), so hearth's would replace the user's.
fn guest_restrictions(boot_args: &str) -> String {
    let Some(merged) = merged_clearcpuid(boot_args) else {
        return pvm::GUEST_CMDLINE.to_string();
    };
    pvm::GUEST_CMDLINE
        .split(' ')
        .map(|word| match word.strip_prefix(CLEARCPUID) {
            Some(_) => format!("{CLEARCPUID}{merged}"),
            None => word.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

const CLEARCPUID: &str = "clearcpuid=";
/// The buffer x86 reads `clearcpuid=`'s value into (`cpu_parse_early_param`), NUL included;
/// a longer value is cut short there.
const CLEARCPUID_MAX: usize = 128;

/// The features of the user's last `clearcpuid=` (the one the kernel would read) followed
/// by those of [`pvm::GUEST_CMDLINE`]'s the user did not list; None without one of the
/// user's.
fn merged_clearcpuid(boot_args: &str) -> Option<String> {
    let user = cmdline::kernel_params(boot_args)
        .filter(|p| cmdline::normalized_name(p.name) == "clearcpuid")
        .filter_map(|p| p.value)
        .last()?;
    let ours = pvm::GUEST_CMDLINE
        .split(' ')
        .find_map(|word| word.strip_prefix(CLEARCPUID))
        .unwrap_or_default();
    let mut features: Vec<&str> = user.split(',').filter(|f| !f.is_empty()).collect();
    for feature in ours.split(',') {
        if !features.contains(&feature) {
            features.push(feature);
        }
    }
    Some(features.join(","))
}

/// The merged `clearcpuid=` value for `boot_args`, when it is too long for the kernel to
/// read whole (hearth's own list alone is short enough).
fn clearcpuid_too_long(boot_args: &str) -> Option<String> {
    merged_clearcpuid(boot_args).filter(|value| value.len() >= CLEARCPUID_MAX)
}

/// Parses sizes like `256M`, `1G`, `65536`, `512k`, and checks them as guest RAM.
pub fn parse_memory_size(value: &str) -> Result<u64, ConfigError> {
    let err = |reason: String| ConfigError::MemorySize {
        value: value.to_string(),
        reason,
    };
    let bytes = parse_byte_size(value).map_err(err)?;
    check_memory_size(bytes).map_err(err)?;
    Ok(bytes)
}

/// Parses sizes like `256M`, `1G`, `65536`, `512k` (binary suffixes) into bytes.
pub fn parse_byte_size(value: &str) -> Result<u64, String> {
    let trimmed = value.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err("expected a number with an optional K, M or G suffix".into());
    }
    let number: u64 = digits.parse().map_err(|_| "number too large".to_string())?;
    let shift = match suffix {
        "" | "B" | "b" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "m" | "MiB" => 20,
        "G" | "g" | "GiB" => 30,
        "T" | "t" | "TiB" => 40,
        _ => return Err(format!("unknown size suffix \"{suffix}\"")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "number too large".into())
}

/// `bytes` the way [`parse_memory_size`] reads it, with the largest exact suffix (`1T`,
/// `256M`, `4100K`).
pub fn format_memory_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        let unit = 1u64 << shift;
        if bytes != 0 && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Why `bytes` cannot be guest RAM, if it cannot.
fn check_memory_size(bytes: u64) -> Result<(), String> {
    if bytes == 0 {
        return Err("guest memory cannot be zero".into());
    }
    if bytes < MIN_MEMORY {
        return Err(format!("at least {} MiB is needed", MIN_MEMORY >> 20));
    }
    if !bytes.is_multiple_of(PAGE_SIZE) {
        return Err("must be a multiple of 4 KiB".into());
    }
    if bytes > MAX_MEMORY {
        return Err("too large for the guest's physical address space".into());
    }
    Ok(())
}

/// Total RAM of this host, from /proc/meminfo.
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Opens `path` to prove it is readable and returns its size.
pub(crate) fn check_readable_file(what: &'static str, path: &Path) -> Result<u64, ConfigError> {
    let unreadable = |source| ConfigError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(meta.len())
}

#[cfg(test)]
mod tests;
