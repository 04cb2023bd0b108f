//! The microVM's configuration as the API builds it up: Firecracker's documents
//! (boot source, machine configuration, drives, network interfaces, vsock, entropy,
//! balloon, serial),
//! checked as each arrives, and turned into hearth's [`VmConfig`] at `InstanceStart` by
//! [`VmResources::to_vm_config`], the one place where the two shapes meet (with
//! [`VmResources::from_vm_config`] for the other direction, for `hearth run --api-sock`).

use std::path::{Path, PathBuf};

use super::action::ApiError;
use super::models::{
    Balloon, BootSource, Drive, Entropy, FullVmConfig, HugePages, IoEngine, MachineConfig,
    MachineConfigUpdate, NetworkInterface, RateLimiterConfig, Serial, Vsock,
};
use crate::config::{
    check_readable_file, parse_memory_size, split_cmdline, BootSpeedups, CpuProfileChoice,
    SerialConfig, VmConfig, DEFAULT_CMDLINE, MAX_VCPUS,
};
use crate::devices::virtio::block::{BlockConfig, ID_BYTES};
use crate::devices::virtio::net::{parse_mac, NetConfig};
use crate::devices::virtio::rng::RngConfig;
use crate::devices::virtio::vsock::VsockConfig;

/// Everything configured so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmResources {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfig,
    /// In the order given; the root device goes first when the VM is built.
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub entropy: Option<Entropy>,
    /// Once the microVM runs, the target and polling interval in force.
    pub balloon: Option<Balloon>,
    pub serial: Option<Serial>,
    /// `--boot-timer`.
    pub boot_timer: bool,
}

impl VmResources {
    pub fn set_boot_source(&mut self, boot: BootSource) -> Result<(), ApiError> {
        readable("kernel", &boot.kernel_image_path)?;
        if let Some(initrd) = &boot.initrd_path {
            readable("initrd", initrd)?;
        }
        self.boot_source = Some(boot);
        Ok(())
    }

    pub fn set_machine_config(&mut self, config: MachineConfig) -> Result<(), ApiError> {
        if config.vcpu_count == 0 || u64::from(config.vcpu_count) > MAX_VCPUS {
            return Err(ApiError::invalid(format!(
                "vcpu_count {} is out of range: hearth runs 1 to {MAX_VCPUS} vCPUs",
                config.vcpu_count
            )));
        }
        parse_memory_size(&format!("{}M", config.mem_size_mib))
            .map_err(|e| ApiError::invalid(format!("mem_size_mib {}: {e}", config.mem_size_mib)))?;
        if config.smt {
            return Err(unsupported("smt: hearth's vCPUs are not SMT siblings"));
        }
        if config.track_dirty_pages {
            return Err(unsupported(
                "track_dirty_pages: this build has no dirty page tracking (diff snapshots)",
            ));
        }
        if let Some(template) = config.cpu_template.as_deref().filter(|t| *t != "None") {
            return Err(unsupported(&format!(
                "cpu_template \"{template}\": hearth has no static CPU templates"
            )));
        }
        if config.huge_pages != HugePages::None {
            return Err(unsupported("huge_pages: guest memory uses 4 KiB pages"));
        }
        self.machine = config;
        Ok(())
    }

    pub fn update_machine_config(&mut self, update: MachineConfigUpdate) -> Result<(), ApiError> {
        let mut config = self.machine.clone();
        config.vcpu_count = update.vcpu_count.unwrap_or(config.vcpu_count);
        config.mem_size_mib = update.mem_size_mib.unwrap_or(config.mem_size_mib);
        config.smt = update.smt.unwrap_or(config.smt);
        config.track_dirty_pages = update.track_dirty_pages.unwrap_or(config.track_dirty_pages);
        config.cpu_template = update.cpu_template.or(config.cpu_template);
        config.huge_pages = update.huge_pages.unwrap_or(config.huge_pages);
        self.set_machine_config(config)
    }

    /// Adds a drive, or replaces the one with the same id.
    pub fn put_drive(&mut self, drive: Drive) -> Result<(), ApiError> {
        if drive.socket.is_some() {
            return Err(unsupported("vhost-user block devices (socket)"));
        }
        if drive.io_engine == IoEngine::Async {
            return Err(unsupported(
                "io_engine \"Async\": hearth's disks use synchronous I/O (\"Sync\")",
            ));
        }
        let path = drive.path_on_host.as_deref().ok_or_else(|| {
            ApiError::invalid(format!("drive \"{}\" needs path_on_host", drive.drive_id))
        })?;
        readable("disk image", path)?;
        if drive.is_root_device {
            if let Some(other) = self
                .drives
                .iter()
                .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
            {
                return Err(ApiError::invalid(format!(
                    "drive \"{}\" is already the root device",
                    other.drive_id
                )));
            }
        }
        replace_or_push(&mut self.drives, drive, |d| &d.drive_id);
        Ok(())
    }

    /// Adds a network interface, or replaces the one with the same id.
    pub fn put_net(&mut self, iface: NetworkInterface) -> Result<(), ApiError> {
        if iface.mtu.is_some() {
            return Err(unsupported("mtu: hearth's virtio-net does not offer one"));
        }
        let backend = iface.backend_config().map_err(ApiError::invalid)?;
        crate::config::validate_net_backend(&backend)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        if let Some(mac) = &iface.guest_mac {
            parse_mac(mac).map_err(ApiError::invalid)?;
        }
        let others = || self.nets.iter().filter(|n| n.iface_id != iface.iface_id);
        if let Some(other) =
            others().find(|n| !n.host_dev_name.is_empty() && n.host_dev_name == iface.host_dev_name)
        {
            return Err(ApiError::invalid(format!(
                "tap \"{}\" is already used by interface \"{}\"",
                iface.host_dev_name, other.iface_id
            )));
        }
        if let Some(other) =
            others().find(|n| n.guest_mac.is_some() && n.guest_mac == iface.guest_mac)
        {
            return Err(ApiError::invalid(format!(
                "guest_mac {} is already used by interface \"{}\"",
                iface.guest_mac.as_deref().unwrap_or_default(),
                other.iface_id
            )));
        }
        replace_or_push(&mut self.nets, iface, |n| &n.iface_id);
        Ok(())
    }

    pub fn set_vsock(&mut self, vsock: Vsock) -> Result<(), ApiError> {
        if vsock.guest_cid < 3 {
            return Err(ApiError::invalid(format!(
                "guest_cid {} is reserved: use 3 or more",
                vsock.guest_cid
            )));
        }
        if vsock.uds_path.as_os_str().is_empty() {
            return Err(ApiError::invalid("uds_path is empty"));
        }
        self.vsock = Some(vsock);
        Ok(())
    }

    pub fn set_entropy(&mut self, entropy: Entropy) -> Result<(), ApiError> {
        self.entropy = Some(entropy);
        Ok(())
    }

    /// `PUT /balloon`: the target must fit in the guest's memory as configured now (and
    /// again at `InstanceStart`, in case the memory shrinks meanwhile).
    pub fn set_balloon(&mut self, balloon: Balloon) -> Result<(), ApiError> {
        Balloon::check_amount(balloon.amount_mib, self.machine.mem_size_mib)
            .map_err(ApiError::invalid)?;
        self.balloon = Some(balloon);
        Ok(())
    }

    pub fn set_serial(&mut self, serial: Serial) -> Result<(), ApiError> {
        if serial.rate_limiter.is_some() {
            return Err(unsupported("a rate limiter on the serial console"));
        }
        self.serial = Some(serial);
        Ok(())
    }

    /// The drives in the order the guest sees them: the root device first (vda).
    fn ordered_drives(&self) -> impl Iterator<Item = &Drive> {
        let root = self.drives.iter().filter(|d| d.is_root_device);
        root.chain(self.drives.iter().filter(|d| !d.is_root_device))
    }

    /// hearth's configuration for this microVM: what `InstanceStart` builds.
    pub fn to_vm_config(&self) -> Result<VmConfig, ApiError> {
        let boot = self.boot_source.as_ref().ok_or_else(|| {
            ApiError::invalid("no boot source: PUT /boot-source before InstanceStart")
        })?;
        let (mut boot_args, init_args) =
            split_cmdline(boot.boot_args.as_deref().unwrap_or(DEFAULT_CMDLINE));
        let mut disks = Vec::with_capacity(self.drives.len());
        for drive in self.ordered_drives() {
            let read_only = drive.is_read_only.unwrap_or(false);
            if drive.is_root_device {
                // As Firecracker does: the root device is vda, or the partition named.
                let root = match &drive.partuuid {
                    Some(uuid) => format!("root=PARTUUID={uuid}"),
                    None => "root=/dev/vda".to_string(),
                };
                let mode = if read_only { "ro" } else { "rw" };
                boot_args = format!("{boot_args} {root} {mode}").trim().to_string();
            }
            disks.push(BlockConfig {
                path: drive.path_on_host.clone().unwrap_or_default(),
                read_only,
                // The guest reads the drive's id as the disk serial, cut to what fits.
                id: Some(truncate(&drive.drive_id, ID_BYTES)),
                rate_limiter: limiter(&drive.rate_limiter),
            });
        }
        let nets = self
            .nets
            .iter()
            .map(|n| {
                Ok(NetConfig {
                    backend: n.backend_config().map_err(ApiError::invalid)?,
                    mac: n
                        .guest_mac
                        .as_deref()
                        .map(parse_mac)
                        .transpose()
                        .map_err(ApiError::invalid)?,
                    rx_rate_limiter: limiter(&n.rx_rate_limiter),
                    tx_rate_limiter: limiter(&n.tx_rate_limiter),
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let config = VmConfig {
            kernel: boot.kernel_image_path.clone(),
            initrd: boot.initrd_path.clone(),
            boot_args,
            init_args,
            vcpu_count: self.machine.vcpu_count,
            mem_size: self.machine.mem_size_mib << 20,
            serial: match self.serial.as_ref().and_then(|s| s.serial_out_path.clone()) {
                Some(path) => SerialConfig::File(path),
                None => SerialConfig::Stdio,
            },
            disks,
            nets,
            vsock: self.vsock.as_ref().map(|v| VsockConfig {
                guest_cid: u64::from(v.guest_cid),
                uds_path: v.uds_path.clone(),
            }),
            fs: Vec::new(),
            rng: self.entropy.as_ref().map(|e| RngConfig {
                rate_limiter: limiter(&e.rate_limiter),
            }),
            balloon: self.balloon.clone(),
            boot_timer: self.boot_timer,
            // The Firecracker API has no such setting; `hearth run --sample-rip` has.
            sample_rip: None,
            cpu_profile: CpuProfileChoice::Auto,
            boot_speedups: BootSpeedups::On,
        };
        config.validate().map_err(ApiError::invalid)?;
        Ok(config)
    }

    /// The API's view of a VM started from hearth's command line.
    pub fn from_vm_config(config: &VmConfig) -> Self {
        let boot_args = match &config.init_args {
            Some(init) => format!("{} -- {init}", config.boot_args),
            None => config.boot_args.clone(),
        };
        let drives = config
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| Drive {
                drive_id: disk
                    .id
                    .clone()
                    .filter(|id| {
                        !id.is_empty() && id.chars().all(|c| c == '_' || c.is_alphanumeric())
                    })
                    .unwrap_or_else(|| format!("disk{index}")),
                is_root_device: false,
                path_on_host: Some(disk.path.clone()),
                is_read_only: Some(disk.read_only),
                partuuid: None,
                cache_type: Default::default(),
                io_engine: IoEngine::Sync,
                rate_limiter: document(&disk.rate_limiter),
                socket: None,
            })
            .collect();
        let nets = config
            .nets
            .iter()
            .enumerate()
            .map(|(index, net)| NetworkInterface {
                iface_id: format!("net{index}"),
                host_dev_name: net.tap().unwrap_or_default().to_string(),
                backend: net.tap().is_none().then(|| net.backend.clone()),
                guest_mac: net.mac.map(|m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }),
                mtu: None,
                rx_rate_limiter: document(&net.rx_rate_limiter),
                tx_rate_limiter: document(&net.tx_rate_limiter),
            })
            .collect();
        Self {
            boot_source: Some(BootSource {
                kernel_image_path: config.kernel.clone(),
                boot_args: Some(boot_args),
                initrd_path: config.initrd.clone(),
            }),
            machine: MachineConfig {
                vcpu_count: config.vcpu_count,
                mem_size_mib: config.mem_size >> 20,
                ..MachineConfig::default()
            },
            drives,
            nets,
            vsock: config.vsock.as_ref().map(|v| Vsock {
                guest_cid: v.guest_cid as u32,
                uds_path: v.uds_path.clone(),
                vsock_id: None,
            }),
            entropy: config.rng.as_ref().map(|rng| Entropy {
                rate_limiter: document(&rng.rate_limiter),
            }),
            balloon: config.balloon.clone(),
            serial: match &config.serial {
                SerialConfig::File(path) => Some(Serial {
                    serial_out_path: Some(path.clone()),
                    rate_limiter: None,
                }),
                _ => None,
            },
            boot_timer: config.boot_timer,
        }
    }

    /// The resources of a microVM restored from a snapshot: the document
    /// [`Self::to_full_config`] saved, as it was (nothing is checked again: the VM was
    /// validated when it was configured, and its devices come from the snapshot).
    pub fn from_saved(doc: FullVmConfig) -> Self {
        Self {
            boot_source: doc.boot_source,
            machine: doc.machine_config.unwrap_or_default(),
            drives: doc.drives,
            nets: doc.network_interfaces,
            vsock: doc.vsock,
            entropy: doc.entropy,
            balloon: doc.balloon,
            serial: doc.serial,
            boot_timer: false,
        }
    }

    /// `GET /vm/config`.
    pub fn to_full_config(&self) -> FullVmConfig {
        FullVmConfig {
            drives: self.ordered_drives().cloned().collect(),
            boot_source: self.boot_source.clone(),
            machine_config: Some(self.machine.clone()),
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
            balloon: self.balloon.clone(),
            serial: self.serial.clone(),
            metrics: crate::metrics::destination()
                .map(|metrics_path| super::models::Metrics { metrics_path }),
            ..FullVmConfig::default()
        }
    }

    /// The index hearth's device list has for drive `id` (root device first).
    pub fn drive_index(&self, id: &str) -> Option<usize> {
        self.ordered_drives().position(|d| d.drive_id == id)
    }

    /// The index hearth's NIC list has for interface `id`.
    pub fn net_index(&self, id: &str) -> Option<usize> {
        self.nets.iter().position(|n| n.iface_id == id)
    }

    /// Records a drive's rate limiter after a successful `PATCH /drives`.
    pub fn set_drive_rate_limiter(&mut self, id: &str, limiter: RateLimiterConfig) {
        if let Some(drive) = self.drives.iter_mut().find(|d| d.drive_id == id) {
            drive.rate_limiter = document(&limiter);
        }
    }

    /// Records an interface's rate limiters after a successful
    /// `PATCH /network-interfaces`.
    pub fn set_net_rate_limiters(
        &mut self,
        id: &str,
        rx: RateLimiterConfig,
        tx: RateLimiterConfig,
    ) {
        if let Some(net) = self.nets.iter_mut().find(|n| n.iface_id == id) {
            net.rx_rate_limiter = document(&rx);
            net.tx_rate_limiter = document(&tx);
        }
    }

    /// Records a drive's new image after a successful `PATCH /drives`.
    pub fn set_drive_path(&mut self, id: &str, path: PathBuf) {
        if let Some(drive) = self.drives.iter_mut().find(|d| d.drive_id == id) {
            drive.path_on_host = Some(path);
        }
    }
}

/// A limiter as a document gives it (absent: no limit), as hearth's config holds it.
fn limiter(document: &Option<RateLimiterConfig>) -> RateLimiterConfig {
    document.unwrap_or_default().normalized()
}

/// A limiter as a document shows it: absent when it limits nothing.
fn document(limiter: &RateLimiterConfig) -> Option<RateLimiterConfig> {
    limiter.limits_anything().then(|| limiter.normalized())
}

fn unsupported(what: &str) -> ApiError {
    ApiError::Unsupported(format!("hearth does not support {what}"))
}

fn readable(what: &'static str, path: &Path) -> Result<(), ApiError> {
    check_readable_file(what, path)
        .map(|_| ())
        .map_err(|e| ApiError::invalid(crate::error_chain(&e)))
}

fn replace_or_push<T>(items: &mut Vec<T>, item: T, id: impl Fn(&T) -> &String) {
    match items.iter().position(|existing| id(existing) == id(&item)) {
        Some(index) => items[index] = item,
        None => items.push(item),
    }
}

/// The longest prefix of `text` of at most `max` bytes, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, size: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("hearth-api-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    fn drive(id: &str, path: &Path, root: bool) -> Drive {
        serde_json::from_value(serde_json::json!({
            "drive_id": id, "path_on_host": path, "is_root_device": root, "is_read_only": !root
        }))
        .unwrap()
    }

    #[test]
    fn builds_a_vm_config_with_the_root_device_first() {
        let kernel = temp_file("kernel", 4096);
        let image = temp_file("disk", 1 << 20);
        let mut res = VmResources::default();
        assert!(res
            .to_vm_config()
            .unwrap_err()
            .to_string()
            .contains("no boot source"));
        res.set_boot_source(BootSource {
            kernel_image_path: kernel.clone(),
            boot_args: Some("console=ttyS0 -- /init arg".into()),
            initrd_path: None,
        })
        .unwrap();
        res.put_drive(drive("data", &image, false)).unwrap();
        res.put_drive(drive("rootfs", &image, true)).unwrap();
        res.put_net(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            backend: None,
            guest_mac: Some("06:00:ac:10:00:02".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: Some(RateLimiterConfig::default()),
        })
        .unwrap();
        res.set_vsock(Vsock {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
            vsock_id: None,
        })
        .unwrap();
        // Clients send an empty rate limiter: it limits nothing.
        res.set_entropy(Entropy {
            rate_limiter: Some(RateLimiterConfig::default()),
        })
        .unwrap();
        let config = res.to_vm_config().unwrap();
        assert_eq!(config.boot_args, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(config.init_args.as_deref(), Some("/init arg"));
        assert_eq!(config.disks[0].id.as_deref(), Some("rootfs"));
        assert!(!config.disks[0].read_only && config.disks[1].read_only);
        assert_eq!(config.nets[0].mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(config.vsock.as_ref().unwrap().guest_cid, 3);
        assert_eq!(config.rng, Some(RngConfig::default()));
        assert_eq!((config.vcpu_count, config.mem_size), (1, 128 << 20));
        assert_eq!(config.serial, SerialConfig::Stdio);
        assert_eq!(res.drive_index("rootfs"), Some(0));

        // And back: what GET /vm/config shows for a VM from the command line.
        let back = VmResources::from_vm_config(&config);
        assert_eq!(back.drives[0].drive_id, "rootfs");
        assert_eq!(back.nets[0].guest_mac.as_deref(), Some("06:00:ac:10:00:02"));
        assert_eq!(back.entropy, Some(Entropy::default()));
        assert_eq!(back.to_full_config().entropy, Some(Entropy::default()));
        let without = VmResources::from_vm_config(&VmConfig::new("/k"));
        assert_eq!(without.to_full_config().entropy, None);
        assert_eq!(
            back.boot_source.unwrap().boot_args.as_deref(),
            Some("console=ttyS0 root=/dev/vda rw -- /init arg")
        );
    }

    #[test]
    fn refuses_what_hearth_cannot_do() {
        let image = temp_file("disk2", 4096);
        let mut res = VmResources::default();
        let machine =
            |json: serde_json::Value| -> MachineConfig { serde_json::from_value(json).unwrap() };
        for (config, expected) in [
            (
                serde_json::json!({"vcpu_count": 0, "mem_size_mib": 64}),
                "out of range",
            ),
            (
                serde_json::json!({"vcpu_count": 255, "mem_size_mib": 64}),
                "out of range",
            ),
            (
                serde_json::json!({"vcpu_count": 1, "mem_size_mib": 1}),
                "at least 2 MiB",
            ),
            (
                serde_json::json!({"vcpu_count": 2, "mem_size_mib": 64, "smt": true}),
                "smt",
            ),
            (
                serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}),
                "T2",
            ),
            (
                serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"}),
                "huge_pages",
            ),
            (
                serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}),
                "track_dirty_pages",
            ),
        ] {
            let err = res
                .set_machine_config(machine(config))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err}");
        }
        assert_eq!(
            res.machine,
            MachineConfig::default(),
            "a refused config changes nothing"
        );
        res.update_machine_config(MachineConfigUpdate {
            mem_size_mib: Some(64),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((res.machine.vcpu_count, res.machine.mem_size_mib), (1, 64));

        let err = res
            .set_boot_source(BootSource {
                kernel_image_path: "/nonexistent/vmlinux".into(),
                boot_args: None,
                initrd_path: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");

        let mut async_drive = drive("d", &image, false);
        async_drive.io_engine = IoEngine::Async;
        assert!(res
            .put_drive(async_drive)
            .unwrap_err()
            .to_string()
            .contains("Async"));
        res.put_drive(drive("root1", &image, true)).unwrap();
        let err = res.put_drive(drive("root2", &image, true)).unwrap_err();
        assert!(err.to_string().contains("already the root device"), "{err}");
        res.put_drive(drive("root1", &image, true)).unwrap();
        assert_eq!(res.drives.len(), 1, "same id replaces");
        let missing = drive("gone", Path::new("/nonexistent/disk.img"), false);
        assert!(res.put_drive(missing).is_err());

        let net = |id: &str, tap: &str| NetworkInterface {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            backend: None,
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        res.put_net(net("a", "tap0")).unwrap();
        assert!(res
            .put_net(net("b", "tap0"))
            .unwrap_err()
            .to_string()
            .contains("tap0"));
        let mut with_mtu = net("c", "tap1");
        with_mtu.mtu = Some(1400);
        assert!(res.put_net(with_mtu).is_err());
        let mut bad_mac = net("d", "tap2");
        bad_mac.guest_mac = Some("zz".into());
        assert!(res.put_net(bad_mac).is_err());
        assert!(res
            .set_vsock(Vsock {
                guest_cid: 2,
                uds_path: "/v".into(),
                vsock_id: None
            })
            .is_err());
        assert_eq!(truncate("ééé", 5), "éé");
    }

    #[test]
    fn rate_limiters_reach_the_vm_config_and_come_back() {
        let kernel = temp_file("kernel-rl", 4096);
        let image = temp_file("disk-rl", 1 << 20);
        let mut res = VmResources::default();
        res.set_boot_source(BootSource {
            kernel_image_path: kernel,
            boot_args: None,
            initrd_path: None,
        })
        .unwrap();
        let limited: RateLimiterConfig = serde_json::from_value(serde_json::json!({
            "bandwidth": {"size": 1048576, "one_time_burst": 4096, "refill_time": 1000},
            "ops": {"size": 0, "refill_time": 1000}
        }))
        .unwrap();
        let mut data = drive("data", &image, false);
        data.rate_limiter = Some(limited);
        res.put_drive(data).unwrap();
        res.put_net(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            backend: None,
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: Some(limited),
        })
        .unwrap();
        res.set_entropy(Entropy {
            rate_limiter: Some(limited),
        })
        .unwrap();
        let config = res.to_vm_config().unwrap();
        // The ops bucket of size 0 limits nothing and is left out.
        let expected = limited.normalized();
        assert_eq!(expected.ops, None);
        assert_eq!(config.disks[0].rate_limiter, expected);
        assert_eq!(config.nets[0].rx_rate_limiter, RateLimiterConfig::default());
        assert_eq!(config.nets[0].tx_rate_limiter, expected);
        assert_eq!(config.rng.as_ref().unwrap().rate_limiter, expected);

        let back = VmResources::from_vm_config(&config);
        assert_eq!(back.drives[0].rate_limiter, Some(expected));
        assert_eq!(back.nets[0].rx_rate_limiter, None);
        assert_eq!(back.nets[0].tx_rate_limiter, Some(expected));
        assert_eq!(back.entropy.unwrap().rate_limiter, Some(expected));

        res.set_drive_rate_limiter("data", RateLimiterConfig::default());
        assert_eq!(res.drives[0].rate_limiter, None);
        res.set_net_rate_limiters("eth0", expected, RateLimiterConfig::default());
        assert_eq!(res.net_index("eth0"), Some(0));
        assert_eq!(
            (res.nets[0].rx_rate_limiter, res.nets[0].tx_rate_limiter),
            (Some(expected), None)
        );
    }
}
