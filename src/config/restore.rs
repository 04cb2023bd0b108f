//! What restoring a snapshot takes: its two files, the new process's console, new backing
//! for the devices whose host side may have moved (an image path, a NIC's back end, a
//! vsock socket, a virtio-fs back end), and whether the guest runs at once. Inert data,
//! checked by [`RestoreConfig::validate`] before anything is opened; the rest of the VM
//! comes from the snapshot.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_readable_file, ConfigError, SerialConfig};
use crate::devices::virtio::fs::FsConfigError;
use crate::devices::virtio::net;

/// A new image file for the disk at `index` (0 is the first disk, the guest's vda).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskOverride {
    pub index: usize,
    pub path: PathBuf,
}

/// Another back end for the NIC at `index` (0 is the first NIC): a tap, a stream
/// socket, or a passt of its own. JSON: `{"index": 0, "tap": "tap1"}` (or `"stream":
/// PATH`, `"user": {...}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NetOverrideRepr", into = "NetOverrideRepr")]
pub struct NetOverride {
    pub index: usize,
    pub backend: net::NetBackend,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetOverrideRepr {
    index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<net::UserNetConfig>,
}

impl TryFrom<NetOverrideRepr> for NetOverride {
    type Error = String;

    fn try_from(repr: NetOverrideRepr) -> Result<Self, String> {
        let backend = match (repr.tap, repr.stream, repr.user) {
            (Some(tap), None, None) => net::NetBackend::Tap(tap),
            (None, Some(path), None) => net::NetBackend::Stream(path),
            (None, None, Some(user)) => net::NetBackend::User(user),
            _ => {
                return Err(
                    "a NIC override needs exactly one of \"tap\", \"stream\" or \"user\"".into(),
                )
            }
        };
        Ok(Self {
            index: repr.index,
            backend,
        })
    }
}

impl From<NetOverride> for NetOverrideRepr {
    fn from(over: NetOverride) -> Self {
        let mut repr = NetOverrideRepr {
            index: over.index,
            tap: None,
            stream: None,
            user: None,
        };
        match over.backend {
            net::NetBackend::Tap(name) => repr.tap = Some(name),
            net::NetBackend::Stream(path) => repr.stream = Some(path),
            net::NetBackend::User(user) => repr.user = Some(user),
        }
        repr
    }
}

/// The vhost-user back end for the virtio-fs device with `tag`. A back end does not
/// outlive its front end's connection, so every fs device of a snapshot needs one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsOverride {
    pub tag: String,
    pub socket: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    pub state_path: PathBuf,
    pub mem_path: PathBuf,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default)]
    pub disks: Vec<DiskOverride>,
    #[serde(default)]
    pub nets: Vec<NetOverride>,
    /// Where the vsock device listens instead of its saved socket path.
    #[serde(default)]
    pub vsock_uds_path: Option<PathBuf>,
    /// A fresh back end for each virtio-fs device, by tag.
    #[serde(default)]
    pub fs: Vec<FsOverride>,
    /// Run the guest at once; otherwise it stays paused until resumed.
    #[serde(default)]
    pub resume: bool,
}

impl RestoreConfig {
    /// Restores the snapshot in `state_path` and `mem_path` as saved, console on stdio,
    /// paused.
    pub fn new(state_path: impl Into<PathBuf>, mem_path: impl Into<PathBuf>) -> Self {
        Self {
            state_path: state_path.into(),
            mem_path: mem_path.into(),
            serial: SerialConfig::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock_uds_path: None,
            fs: Vec::new(),
            resume: false,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_readable_file("snapshot state file", &self.state_path)?;
        check_readable_file("snapshot memory file", &self.mem_path)?;
        match &self.serial {
            SerialConfig::File(path) | SerialConfig::Unix(path) if path.as_os_str().is_empty() => {
                return Err(ConfigError::EmptyPath("serial console"));
            }
            _ => {}
        }
        let mut seen = BTreeSet::new();
        for disk in &self.disks {
            if !seen.insert(disk.index) {
                return Err(ConfigError::DuplicateOverride {
                    kind: "disk",
                    index: disk.index,
                });
            }
            check_readable_file("disk image", &disk.path)?;
        }
        seen.clear();
        for nic in &self.nets {
            if !seen.insert(nic.index) {
                return Err(ConfigError::DuplicateOverride {
                    kind: "NIC",
                    index: nic.index,
                });
            }
            super::validate_net_backend(&nic.backend)?;
        }
        if self
            .vsock_uds_path
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(ConfigError::EmptyPath("vsock socket"));
        }
        let mut tags = BTreeSet::new();
        for over in &self.fs {
            crate::devices::virtio::fs::validate_tag(&over.tag)?;
            if !tags.insert(over.tag.as_str()) {
                return Err(FsConfigError::DuplicateTag(over.tag.clone()).into());
            }
            if over.socket.as_os_str().is_empty() {
                return Err(FsConfigError::EmptySocket(over.tag.clone()).into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("hearth-restore-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (state, mem) = (dir.join("state"), dir.join("mem"));
        std::fs::write(&state, b"x").unwrap();
        std::fs::write(&mem, b"x").unwrap();
        (state, mem)
    }

    #[test]
    fn json_form_and_defaults() {
        let config: RestoreConfig = serde_json::from_str(
            r#"{"state_path": "/s", "mem_path": "/m", "nets": [{"index": 1, "tap": "tap7"}],
                "fs": [{"tag": "share", "socket": "/run/fs.sock"}], "resume": true}"#,
        )
        .unwrap();
        assert_eq!(config.serial, SerialConfig::Stdio);
        assert_eq!(config.nets[0].backend, net::NetBackend::Tap("tap7".into()));
        let user: NetOverride = serde_json::from_str(r#"{"index": 0, "user": {}}"#).unwrap();
        assert_eq!(
            user.backend,
            net::NetBackend::User(net::UserNetConfig::default())
        );
        assert_eq!(
            serde_json::to_string(&user).unwrap(),
            r#"{"index":0,"user":{"ports":[]}}"#
        );
        assert!(serde_json::from_str::<NetOverride>(r#"{"index": 0}"#).is_err());
        assert_eq!(config.fs[0].socket, PathBuf::from("/run/fs.sock"));
        assert!(config.resume && config.disks.is_empty());
        assert!(serde_json::from_str::<RestoreConfig>(
            r#"{"state_path": "/s", "mem_path": "/m", "x": 1}"#
        )
        .is_err());
    }

    #[test]
    fn overrides_are_checked() {
        let (state, mem) = files();
        let mut config = RestoreConfig::new(&state, &mem);
        config.validate().unwrap();

        config.nets = vec![
            NetOverride {
                index: 0,
                backend: net::NetBackend::Tap("tap0".into()),
            },
            NetOverride {
                index: 0,
                backend: net::NetBackend::Tap("tap1".into()),
            },
        ];
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "two overrides for NIC 0"
        );
        config.nets = vec![NetOverride {
            index: 0,
            backend: net::NetBackend::Tap("a/b".into()),
        }];
        assert!(matches!(config.validate(), Err(ConfigError::TapName(_))));
        config.nets.clear();

        config.disks = vec![DiskOverride {
            index: 0,
            path: state.with_file_name("missing"),
        }];
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("cannot read disk image"));
        config.disks.clear();

        config.vsock_uds_path = Some(PathBuf::new());
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "the vsock socket path is empty"
        );
        config.vsock_uds_path = None;

        let over = |tag: &str, socket: &str| FsOverride {
            tag: tag.into(),
            socket: socket.into(),
        };
        config.fs = vec![over("a", "/a.sock"), over("b", "/b.sock")];
        config.validate().unwrap();
        config.fs = vec![over("a", "/a.sock"), over("a", "/b.sock")];
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "virtio-fs tag \"a\" is given twice"
        );
        config.fs = vec![over("a", "")];
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "virtio-fs \"a\": the back end's socket path is empty"
        );
        config.fs = vec![over("", "/s")];
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "virtio-fs tag is empty"
        );
        config.fs.clear();

        let missing = RestoreConfig::new(state.with_file_name("nothing"), &mem);
        assert!(missing
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("cannot read snapshot state file"));
    }
}
