//! The JSON bodies of Firecracker's API (`firecracker.yaml`), as serde types. Field names,
//! optional fields and enum spellings follow the specification so that a Firecracker
//! client's requests parse and its responses come back in the shape it expects. Request
//! bodies reject unknown fields, as Firecracker's do; `null` is accepted wherever a field
//! is optional (clients serialize absent options that way).
//!
//! These types only describe what was sent. What hearth accepts of it (a CPU template,
//! huge pages ...) is decided in `controller.rs`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::devices::virtio::net::NetBackend;

/// Firecracker's `RateLimiter` and `TokenBucket` objects are hearth's inert limiter
/// configuration itself.
pub use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

/// `GET /`: who we are and in what state the microVM is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// The fault body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// `huge_pages` of the machine configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config` and the answer of `GET /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub smt: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub track_dirty_pages: bool,
    /// Firecracker's static CPU templates ("C3", "T2", ...); hearth accepts only "None".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: HugePages::None,
        }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    #[serde(default)]
    pub smt: Option<bool>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub cache_type: CacheType,
    #[serde(default, deserialize_with = "null_as_default")]
    pub io_engine: IoEngine,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// vhost-user-block backend socket (not supported by hearth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    /// The tap; empty when `backend` names another back end.
    #[serde(default)]
    pub host_dev_name: String,
    /// hearth's extension: a stream socket (`{"stream": PATH}`) or user-mode networking
    /// through passt (`{"user": {"ports": [...]}}`) instead of a tap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<NetBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{iface_id}`: new rate limiters for a running interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
    /// Deprecated by Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`, and the configuration document's `entropy` section: the virtio-rng
/// device and its rate limiter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /balloon`, `GET /balloon` and the configuration document's `balloon` section.
pub type Balloon = crate::devices::virtio::balloon::BalloonConfig;

/// `GET /balloon/statistics`.
pub type BalloonStatistics = crate::devices::virtio::balloon::BalloonStatistics;

/// `PATCH /balloon`: a new target, once the microVM runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`: a new polling interval, once the microVM runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

/// `PUT /serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucketConfig>,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`, and the `metrics` section of a configuration file: where the
/// metrics go (see `crate::metrics`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub state: VmState,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    #[serde(default, deserialize_with = "null_as_default")]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    /// The tap; empty when `backend` names another back end.
    #[serde(default)]
    pub host_dev_name: String,
    /// hearth's extension, as in [`NetworkInterface`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<NetBackend>,
}

/// The back end `host_dev_name` and `backend` name together: exactly one of them.
pub fn net_backend(
    host_dev_name: &str,
    backend: Option<&NetBackend>,
) -> Result<NetBackend, String> {
    match (host_dev_name.is_empty(), backend) {
        (false, None) => Ok(NetBackend::Tap(host_dev_name.to_string())),
        (true, Some(NetBackend::Tap(_))) => Err("name a tap with host_dev_name".into()),
        (true, Some(backend)) => Ok(backend.clone()),
        (true, None) => Err("host_dev_name is empty".into()),
        (false, Some(_)) => Err("give host_dev_name or backend, not both".into()),
    }
}

impl NetworkInterface {
    /// Where the interface's frames go.
    pub fn backend_config(&self) -> Result<NetBackend, String> {
        net_backend(&self.host_dev_name, self.backend.as_ref())
    }
}

impl NetworkOverride {
    /// Where the interface's frames go after the restore.
    pub fn backend_config(&self) -> Result<NetBackend, String> {
        net_backend(&self.host_dev_name, self.backend.as_ref())
    }

    /// The override for `iface_id` onto `backend`.
    pub fn new(iface_id: impl Into<String>, backend: NetBackend) -> Self {
        let (host_dev_name, backend) = match backend {
            NetBackend::Tap(name) => (name, None),
            other => (String::new(), Some(other)),
        };
        Self {
            iface_id: iface_id.into(),
            host_dev_name,
            backend,
        }
    }
}

/// hearth's extension of `PUT /snapshot/load`: another image for a drive, opened instead
/// of the saved one (its size may differ: the guest is told to re-read the capacity).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    pub drive_id: String,
    pub path_on_host: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`, as sent. Exactly one of `mem_backend` and the deprecated
/// `mem_file_path` must be present; [`SnapshotLoadParams::memory`] checks that.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated spelling of `track_dirty_pages`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub enable_diff_snapshots: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub track_dirty_pages: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub resume_vm: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// hearth's extension (Firecracker has no such field): new images for drives.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub drive_overrides: Vec<DriveOverride>,
    /// hearth's extension: the fresh vhost-user back end of each virtio-fs device, by tag
    /// (every fs device of the snapshot needs one).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub fs_overrides: Vec<crate::config::FsOverride>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub clock_realtime: bool,
    /// "Snapshot", "None", "Transparent" or "2M".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl SnapshotLoadParams {
    /// The guest memory's backend: `mem_backend`, or a file backend from `mem_file_path`.
    pub fn memory(&self) -> Result<MemoryBackend, &'static str> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(backend), None) => Ok(backend.clone()),
            (None, Some(path)) => Ok(MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: path.clone(),
            }),
            (Some(_), Some(_)) => Err("give either mem_backend or mem_file_path, not both"),
            (None, None) => Err("mem_backend (or the deprecated mem_file_path) is required"),
        }
    }

    /// Dirty page tracking, whichever spelling asked for it.
    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }
}

/// `GET /vm/config`, and the Firecracker configuration file given with `--config-file`
/// (the same document). Sections hearth has no device for are kept as raw JSON so that
/// `controller` can refuse them by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    #[serde(default)]
    pub balloon: Option<Balloon>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub drives: Vec<Drive>,
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
    #[serde(default)]
    pub logger: Option<Logger>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(
        rename = "network-interfaces",
        default,
        deserialize_with = "null_as_default"
    )]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub pmem: Vec<serde_json::Value>,
    #[serde(default)]
    pub vsock: Option<Vsock>,
    #[serde(default)]
    pub entropy: Option<Entropy>,
    /// Not in Firecracker's document; hearth adds its serial console here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Serial>,
}

/// `null` where a field has a default means the default (serde's `default` alone only
/// covers a missing field).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_takes_nulls_and_rejects_unknown_fields() {
        let config: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": null, "huge_pages": "None"}"#,
        )
        .unwrap();
        assert_eq!((config.vcpu_count, config.mem_size_mib), (2, 256));
        assert!(!config.smt);
        let err = serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "turbo": true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `turbo`"), "{err}");
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 2}"#).is_err());
        assert!(
            serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 300, "mem_size_mib": 1}"#)
                .is_err()
        );
    }

    #[test]
    fn instance_info_spells_states_as_firecracker() {
        let info = InstanceInfo {
            app_name: "hearth".into(),
            id: "a".into(),
            state: InstanceState::NotStarted,
            vmm_version: "0.1.0".into(),
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["state"], "Not started");
        assert_eq!(
            serde_json::to_value(InstanceState::Paused).unwrap(),
            "Paused"
        );
    }

    #[test]
    fn snapshot_load_memory_backend_is_exclusive() {
        let parse = |body: &str| serde_json::from_str::<SnapshotLoadParams>(body).unwrap();
        let both = parse(
            r#"{"snapshot_path": "s", "mem_file_path": "m",
                "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
        );
        assert!(both.memory().is_err());
        assert!(parse(r#"{"snapshot_path": "s"}"#).memory().is_err());
        let legacy = parse(r#"{"snapshot_path": "s", "mem_file_path": "m", "resume_vm": true}"#);
        assert_eq!(
            legacy.memory().unwrap(),
            MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "m".into()
            }
        );
        assert!(legacy.resume_vm);
        let full = parse(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "u"},
                "enable_diff_snapshots": true, "network_overrides": [{"iface_id": "eth0",
                "host_dev_name": "tap1"}], "vsock_override": {"uds_path": "/v"}}"#,
        );
        assert_eq!(full.memory().unwrap().backend_type, MemoryBackendType::Uffd);
        assert!(full.tracks_dirty_pages());
        assert_eq!(full.network_overrides[0].host_dev_name, "tap1");
        assert!(serde_json::from_str::<SnapshotLoadParams>(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_path": "m"}}"#
        )
        .is_err());
    }

    #[test]
    fn full_config_uses_firecracker_section_names() {
        let config: FullVmConfig = serde_json::from_str(
            r#"{"boot-source": {"kernel_image_path": "/k", "boot_args": null},
                "drives": [{"drive_id": "root", "path_on_host": "/d", "is_root_device": true,
                            "is_read_only": false, "cache_type": "Writeback"}],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                "network-interfaces": null, "balloon": null}"#,
        )
        .unwrap();
        assert_eq!(config.drives[0].cache_type, CacheType::Writeback);
        assert!(config.network_interfaces.is_empty());
        let out = serde_json::to_value(&config).unwrap();
        assert!(out.get("boot-source").is_some() && out.get("machine-config").is_some());
        assert!(serde_json::from_str::<FullVmConfig>(r#"{"boot_source": {}}"#).is_err());
    }
}
