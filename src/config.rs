//! Inert, validated VM configuration. Everything the user typed is parsed and checked here,
//! before /dev/kvm is opened; the builder only ever sees a `VmConfig` that passed
//! `VmConfig::from_args`.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::arch::layout;
use crate::arch::pvm;
use crate::cli::{CpuProfileChoice, RunArgs};
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::{parse_mac, NetConfig};
use crate::devices::virtio::vsock::VsockConfig;

/// Command line used when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Most vCPUs hearth configures: APIC ids must fit the xAPIC's 8 bits (0xff is broadcast)
/// and the MP table's CPU entries.
pub const MAX_VCPUS: u64 = 254;

/// Smallest guest: room for the boot structures below 1 MiB and a small kernel above it.
pub const MIN_MEMORY: u64 = 2 << 20;

/// Guest RAM is mapped in whole pages.
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --memory \"{value}\": {reason}")]
    MemorySize { value: String, reason: String },
    #[error("--memory {value} exceeds this host's memory ({host_mib} MiB)")]
    MemoryAboveHost { value: String, host_mib: u64 },
    #[error("invalid --cpus {0}: must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u64),
    #[error("invalid --serial \"{0}\": expected stdio, none, file=PATH or unix=PATH")]
    Serial(String),
    #[error("cannot read {what} \"{path}\"")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} \"{path}\" is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
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
    #[error("invalid {flag} \"{spec}\": {reason}")]
    DeviceSpec {
        flag: &'static str,
        spec: String,
        reason: String,
    },
}

/// Where the guest's serial console is connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// hearth's stdin and stdout (raw mode when stdin is a terminal).
    Stdio,
    /// Output discarded, no input.
    None,
    /// Output appended to a file, no input.
    File(PathBuf),
    /// A Unix socket hearth listens on; one client at a time gets output and sends input.
    Unix(PathBuf),
}

impl SerialConfig {
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        match spec {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match spec.split_once('=') {
                Some(("file", path)) if !path.is_empty() => Ok(Self::File(path.into())),
                Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(path.into())),
                _ => Err(ConfigError::Serial(spec.to_string())),
            },
        }
    }
}

/// The CPU model the guest gets, after `auto` has been resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuProfile {
    /// Host CPU as KVM supports it; no VMM-side fixups.
    Host,
    /// Nested-PVM compatibility: features hidden, failing instructions completed by hearth.
    Compat,
}

impl CpuProfile {
    /// Resolves the user's choice; `auto` means `compat` exactly on a nested-PVM host.
    pub fn resolve(choice: CpuProfileChoice) -> Self {
        match choice {
            CpuProfileChoice::Host => Self::Host,
            CpuProfileChoice::Compat => Self::Compat,
            CpuProfileChoice::Auto if pvm::host_is_pvm() => Self::Compat,
            CpuProfileChoice::Auto => Self::Host,
        }
    }
}

/// Everything needed to build a VM, already validated.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Boot arguments, as given by the user (the compat profile appends its own).
    pub boot_args: String,
    /// Arguments for the guest's init (after ` -- `), if any.
    pub init_args: Option<String>,
    pub vcpu_count: u8,
    pub mem_size: u64,
    pub serial: SerialConfig,
    pub disks: Vec<BlockConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub boot_timer: bool,
    pub cpu_profile: CpuProfile,
}

impl VmConfig {
    /// Parses and checks `hearth run` arguments against this host.
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let mem_size = parse_memory_size(&args.memory)?;
        let host_mem = host_memory_bytes();
        if let Some(host) = host_mem {
            if mem_size > host {
                return Err(ConfigError::MemoryAboveHost {
                    value: args.memory.clone(),
                    host_mib: host >> 20,
                });
            }
        }
        if args.cpus == 0 || args.cpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(args.cpus));
        }
        let serial = SerialConfig::parse(&args.serial)?;
        check_readable_file("kernel", &args.kernel)?;
        if let Some(initrd) = &args.initrd {
            let size = check_readable_file("initrd", initrd)?;
            // The initrd goes above the kernel, below the MMIO hole; a quick bound here, the
            // exact placement is checked when it is loaded.
            let low_ram_end = mem_size.min(layout::MMIO32_START);
            if size > low_ram_end.saturating_sub(layout::HIMEM_START) {
                return Err(ConfigError::InitrdTooLarge {
                    path: initrd.clone(),
                    size,
                    mem_mib: mem_size >> 20,
                });
            }
        }
        let disks = args
            .disks
            .iter()
            .map(|spec| parse_disk(spec))
            .collect::<Result<Vec<_>, _>>()?;
        let nets = args
            .nets
            .iter()
            .map(|spec| parse_net(spec))
            .collect::<Result<Vec<_>, _>>()?;
        let vsock = args.vsock.as_deref().map(parse_vsock).transpose()?;
        let cpu_profile = CpuProfile::resolve(args.cpu_profile);
        let (boot_args, init_args) = split_cmdline(&args.cmdline);
        let config = VmConfig {
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            boot_args,
            init_args,
            vcpu_count: args.cpus as u8,
            mem_size,
            serial,
            disks,
            nets,
            vsock,
            boot_timer: args.boot_timer,
            cpu_profile,
        };
        // Building the command line checks its length and characters.
        config.kernel_cmdline()?;
        Ok(config)
    }

    /// The full kernel command line: the user's boot arguments, what the CPU profile needs,
    /// then the init arguments.
    pub fn kernel_cmdline(&self) -> Result<linux_loader::cmdline::Cmdline, ConfigError> {
        use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
        let extra = match self.cpu_profile {
            CpuProfile::Compat => pvm::GUEST_CMDLINE,
            CpuProfile::Host => "",
        };
        let too_long = || {
            let len = self.boot_args.len()
                + self.init_args.as_ref().map_or(0, |a| a.len() + 4)
                + if extra.is_empty() { 0 } else { extra.len() + 1 };
            ConfigError::CmdlineTooLong {
                len,
                max: layout::CMDLINE_MAX_SIZE - 1,
                extra: if extra.is_empty() {
                    ""
                } else {
                    " with the compat profile's options"
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

/// Parses `key=value,key=value` device options; only `allowed` keys, each at most once.
fn parse_options(
    flag: &'static str,
    spec: &str,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, ConfigError> {
    let bad = |reason: String| ConfigError::DeviceSpec {
        flag,
        spec: spec.to_string(),
        reason,
    };
    let mut options: Vec<(String, String)> = Vec::new();
    for part in spec.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("\"{part}\" is not key=value")))?;
        if !allowed.contains(&key) {
            return Err(bad(format!(
                "unknown option \"{key}\" (expected {})",
                allowed.join(", ")
            )));
        }
        if options.iter().any(|(k, _)| k == key) {
            return Err(bad(format!("option \"{key}\" given twice")));
        }
        options.push((key.to_string(), value.to_string()));
    }
    Ok(options)
}

/// `on`/`off` (also `true`/`false`, `yes`/`no`).
fn parse_switch(
    flag: &'static str,
    spec: &str,
    key: &str,
    value: &str,
) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::DeviceSpec {
            flag,
            spec: spec.to_string(),
            reason: format!("{key} must be on or off"),
        }),
    }
}

/// `--disk path=FILE[,ro=on][,id=NAME]`; the image must be a readable file.
fn parse_disk(spec: &str) -> Result<BlockConfig, ConfigError> {
    const FLAG: &str = "--disk";
    let mut path = None;
    let mut read_only = false;
    let mut id = None;
    for (key, value) in parse_options(FLAG, spec, &["path", "ro", "id"])? {
        match key.as_str() {
            "path" => path = Some(PathBuf::from(value)),
            "ro" => read_only = parse_switch(FLAG, spec, &key, &value)?,
            _ => id = Some(value),
        }
    }
    let path =
        path.filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| ConfigError::DeviceSpec {
                flag: FLAG,
                spec: spec.to_string(),
                reason: "path=FILE is required".into(),
            })?;
    if let Some(id) = &id {
        if id.len() > crate::devices::virtio::block::ID_BYTES {
            return Err(ConfigError::DeviceSpec {
                flag: FLAG,
                spec: spec.to_string(),
                reason: format!(
                    "id is longer than {} bytes",
                    crate::devices::virtio::block::ID_BYTES
                ),
            });
        }
    }
    check_readable_file("disk image", &path)?;
    Ok(BlockConfig {
        path,
        read_only,
        id,
    })
}

/// `--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`. Whether the tap exists is checked when the
/// device opens it.
fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    const FLAG: &str = "--net";
    let bad = |reason: String| ConfigError::DeviceSpec {
        flag: FLAG,
        spec: spec.to_string(),
        reason,
    };
    let mut tap = None;
    let mut mac = None;
    for (key, value) in parse_options(FLAG, spec, &["tap", "mac"])? {
        match key.as_str() {
            "tap" => tap = Some(value),
            _ => mac = Some(parse_mac(&value).map_err(|e| bad(e.to_string()))?),
        }
    }
    let tap = tap
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("tap=NAME is required".into()))?;
    Ok(NetConfig { tap, mac })
}

/// `--vsock cid=N,socket=PATH`: guest CIDs 0-2 are reserved (hypervisor, local, host).
fn parse_vsock(spec: &str) -> Result<VsockConfig, ConfigError> {
    const FLAG: &str = "--vsock";
    let bad = |reason: String| ConfigError::DeviceSpec {
        flag: FLAG,
        spec: spec.to_string(),
        reason,
    };
    let mut cid = None;
    let mut socket = None;
    for (key, value) in parse_options(FLAG, spec, &["cid", "socket"])? {
        match key.as_str() {
            "cid" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| bad(format!("cid \"{value}\" is not a number")))?;
                if !(3..u64::from(u32::MAX)).contains(&n) {
                    return Err(bad(format!("cid {n} is reserved or too large")));
                }
                cid = Some(n);
            }
            _ => socket = Some(PathBuf::from(value)),
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or_else(|| bad("cid=N is required".into()))?,
        uds_path: socket
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| bad("socket=PATH is required".into()))?,
    })
}

/// Splits "boot args -- init args" at the first standalone `--`.
fn split_cmdline(cmdline: &str) -> (String, Option<String>) {
    let mut boot = Vec::new();
    let mut words = cmdline.split(' ');
    for word in words.by_ref() {
        if word == "--" {
            let rest: Vec<&str> = words.collect();
            let init = rest.join(" ");
            let init = (!init.trim().is_empty()).then(|| init.trim().to_string());
            return (boot.join(" ").trim().to_string(), init);
        }
        boot.push(word);
    }
    (cmdline.trim().to_string(), None)
}

/// Parses sizes like `256M`, `1G`, `65536`, `512k`.
pub fn parse_memory_size(value: &str) -> Result<u64, ConfigError> {
    let err = |reason: &str| ConfigError::MemorySize {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = value.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(err("expected a number with an optional K, M or G suffix"));
    }
    let number: u64 = digits.parse().map_err(|_| err("number too large"))?;
    let shift = match suffix {
        "" | "B" | "b" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "m" | "MiB" => 20,
        "G" | "g" | "GiB" => 30,
        "T" | "t" | "TiB" => 40,
        _ => return Err(err(&format!("unknown size suffix \"{suffix}\""))),
    };
    let bytes = number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| err("number too large"))?;
    if bytes == 0 {
        return Err(err("guest memory cannot be zero"));
    }
    if bytes < MIN_MEMORY {
        return Err(err(&format!("at least {} MiB is needed", MIN_MEMORY >> 20)));
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(err("must be a multiple of 4 KiB"));
    }
    // The MMIO hole is skipped, so the top guest-physical address grows by its size.
    if bytes > (1u64 << 46) {
        return Err(err("too large for the guest's physical address space"));
    }
    Ok(bytes)
}

/// Total RAM of this host, from /proc/meminfo.
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Opens `path` to prove it is readable and returns its size.
fn check_readable_file(what: &'static str, path: &Path) -> Result<u64, ConfigError> {
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
mod tests {
    use super::*;

    fn args(kernel: &Path) -> RunArgs {
        RunArgs {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            cpus: 1,
            memory: "128M".to_string(),
            serial: "stdio".to_string(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            boot_timer: false,
            cpu_profile: CpuProfileChoice::Host,
        }
    }

    fn temp_file(name: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let file = File::create(&path).unwrap();
        file.set_len(len).unwrap();
        path
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_memory_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory_size("4096k").unwrap(), 4 << 20);
        assert_eq!(parse_memory_size("8388608").unwrap(), 8 << 20);
        for bad in [
            "0",
            "12Q",
            "",
            "M",
            "1M",
            "99999999999999999999G",
            "4097K",
            "1024T",
        ] {
            assert!(parse_memory_size(bad).is_err(), "{bad} should be rejected");
        }
        let msg = parse_memory_size("12Q").unwrap_err().to_string();
        assert!(msg.contains("12Q") && msg.contains("\"Q\""), "{msg}");
    }

    #[test]
    fn serial_specs() {
        assert_eq!(SerialConfig::parse("stdio").unwrap(), SerialConfig::Stdio);
        assert_eq!(SerialConfig::parse("none").unwrap(), SerialConfig::None);
        assert_eq!(
            SerialConfig::parse("file=/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert_eq!(
            SerialConfig::parse("unix=/tmp/s").unwrap(),
            SerialConfig::Unix("/tmp/s".into())
        );
        for bad in ["", "file=", "tcp=1", "pty"] {
            assert!(SerialConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_specs() {
        let image = temp_file("disk.img", 1 << 20);
        let spec = format!("path={},ro=on,id=data", image.display());
        let disk = parse_disk(&spec).unwrap();
        assert_eq!(disk.path, image);
        assert!(disk.read_only);
        assert_eq!(disk.id.as_deref(), Some("data"));
        let plain = parse_disk(&format!("path={}", image.display())).unwrap();
        assert!(!plain.read_only && plain.id.is_none());

        let image = image.display();
        for bad in [
            "ro=on".to_string(),
            format!("path={image},ro=maybe"),
            format!("path={image},size=1G"),
            format!("path={image},path={image}"),
            format!("path={image},id=abcdefghijklmnopqrstuvwxyz"),
            format!("{image}"),
            "path=/nonexistent/disk.img".to_string(),
        ] {
            let err = parse_disk(&bad).unwrap_err().to_string();
            assert!(
                err.contains("--disk") || err.contains("/nonexistent"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn net_specs() {
        let net = parse_net("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(net.tap, "tap0");
        assert_eq!(net.mac, Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]));
        assert_eq!(parse_net("tap=t1").unwrap().mac, None);
        for bad in [
            "mac=52:54:00:12:34:56",
            "tap=",
            "tap=t,mac=zz",
            "tap=t,queues=2",
            "t0",
        ] {
            let err = parse_net(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid --net"), "{bad}: {err}");
        }
    }

    #[test]
    fn vsock_specs() {
        let vsock = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!(vsock.guest_cid, 3);
        assert_eq!(vsock.uds_path, PathBuf::from("/tmp/v.sock"));
        for bad in [
            "cid=2,socket=/s",
            "cid=x,socket=/s",
            "socket=/s",
            "cid=3",
            "cid=3,socket=",
        ] {
            let err = parse_vsock(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid --vsock"), "{bad}: {err}");
        }
    }

    #[test]
    fn cmdline_split() {
        assert_eq!(
            split_cmdline("console=ttyS0 -- uname -a"),
            ("console=ttyS0".to_string(), Some("uname -a".to_string()))
        );
        assert_eq!(
            split_cmdline("console=ttyS0 panic=1"),
            ("console=ttyS0 panic=1".to_string(), None)
        );
        assert_eq!(split_cmdline("a --"), ("a".to_string(), None));
        assert_eq!(
            split_cmdline("a --x -- b -- c"),
            ("a --x".to_string(), Some("b -- c".to_string()))
        );
    }

    #[test]
    fn valid_args_make_a_config() {
        let kernel = temp_file("kernel-ok", 4096);
        let config = VmConfig::from_args(&args(&kernel)).unwrap();
        assert_eq!(config.vcpu_count, 1);
        assert_eq!(config.mem_size, 128 << 20);
        assert_eq!(config.cpu_profile, CpuProfile::Host);
        let cmdline = config.kernel_cmdline().unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            DEFAULT_CMDLINE
        );
    }

    #[test]
    fn compat_profile_extends_the_cmdline_before_init_args() {
        let kernel = temp_file("kernel-compat", 4096);
        let mut a = args(&kernel);
        a.cpu_profile = CpuProfileChoice::Compat;
        a.cmdline = "console=ttyS0 -- uname -a".to_string();
        let config = VmConfig::from_args(&a).unwrap();
        let line = config.kernel_cmdline().unwrap().as_cstring().unwrap();
        let line = line.to_str().unwrap();
        assert!(line.starts_with("console=ttyS0 "), "{line}");
        assert!(line.contains(pvm::GUEST_CMDLINE), "{line}");
        assert!(line.ends_with(" -- uname -a"), "{line}");
    }

    #[test]
    fn bad_args_are_rejected() {
        let kernel = temp_file("kernel-bad", 4096);
        let mut a = args(&kernel);
        a.cpus = 0;
        assert!(matches!(
            VmConfig::from_args(&a),
            Err(ConfigError::VcpuCount(0))
        ));
        a.cpus = 255;
        assert!(matches!(
            VmConfig::from_args(&a),
            Err(ConfigError::VcpuCount(255))
        ));

        let mut a = args(&kernel);
        a.cmdline = "x".repeat(5000);
        assert!(matches!(
            VmConfig::from_args(&a),
            Err(ConfigError::CmdlineTooLong { len: 5000, .. })
        ));

        let mut a = args(Path::new("/nonexistent/vmlinux"));
        a.cpus = 1;
        let err = VmConfig::from_args(&a).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));

        let a = args(&std::env::temp_dir());
        assert!(matches!(
            VmConfig::from_args(&a),
            Err(ConfigError::NotAFile { .. })
        ));

        let mut a = args(&kernel);
        a.initrd = Some(temp_file("initrd-big", 200 << 20));
        assert!(matches!(
            VmConfig::from_args(&a),
            Err(ConfigError::InitrdTooLarge { .. })
        ));

        let mut a = args(&kernel);
        a.memory = "1024T".to_string();
        assert!(VmConfig::from_args(&a).is_err());
    }
}
