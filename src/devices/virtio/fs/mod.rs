//! virtio-fs (device ID 26) as a vhost-user front end: the guest's FUSE requests go
//! straight from its queues to a back end process (virtiofsd) that shares guest memory,
//! so hearth only sets the device up; it never reads a request.
//!
//! - this file: [`FsConfig`], the inert configuration (`hearth run --fs`, the config
//!   file's `"fs"`), and its checks.
//! - `backend.rs`: the vhost-user protocol with the back end, through rust-vmm's `vhost`
//!   crate (handshake, memory table, rings).
//! - `device.rs`: [`Fs`], configuration space, features, activation and reset.
//! - `event_handler.rs`: the event-loop side: call eventfds to interrupts, the back end's
//!   hang-up, pausing (which takes the rings back from the back end).
//! - `persist.rs`: [`FsState`], what a snapshot keeps.
//!
//! Guest RAM must be shared memory for the back end to map it: the builder gives a VM
//! with any fs device memfd-backed RAM (`vstate::memory`).

mod backend;
mod device;
mod event_handler;
mod persist;

use std::path::PathBuf;

pub use backend::{Backend, BackendError, GUEST_FEATURES, REPLY_TIMEOUT};
pub use device::{config_space, Fs, CONFIG_SPACE_BYTES};
pub use persist::FsState;

use serde::{Deserialize, Serialize};

/// Longest tag the configuration space holds; the guest's `mount -t virtiofs TAG` names it.
pub const TAG_BYTES: usize = 36;

/// Request queues when the configuration names none.
pub const DEFAULT_REQUEST_QUEUES: u16 = 1;

/// Most request queues hearth offers: each costs an ioeventfd, a call eventfd and a back
/// end thread, and the guest driver uses one per vCPU at most.
pub const MAX_REQUEST_QUEUES: u16 = 64;

/// Queue size when the configuration names none: the largest libvhost-user (the C
/// virtiofsd's library) accepts, as Cloud Hypervisor and QEMU use.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// Largest queue size: libvhost-user's VIRTQUEUE_MAX_SIZE; the Rust virtiofsd takes more,
/// but the back end is not known when the configuration is checked.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// A virtio-fs device as configured: the guest mounts `tag`, a vhost-user back end
/// (virtiofsd) the user started listens on `socket`. Inert data, checked by
/// [`FsConfig::validate`] (through `VmConfig::validate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// 1 to [`TAG_BYTES`] bytes, unique among the VM's fs devices.
    pub tag: String,
    /// The back end's vhost-user Unix socket; hearth connects to it.
    pub socket: PathBuf,
    #[serde(default = "default_request_queues")]
    pub num_request_queues: u16,
    /// A power of two up to [`MAX_QUEUE_SIZE`], for every queue.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
}

fn default_request_queues() -> u16 {
    DEFAULT_REQUEST_QUEUES
}

fn default_queue_size() -> u16 {
    DEFAULT_QUEUE_SIZE
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Config(FsConfigError),
    #[error(transparent)]
    Backend(BackendError),
    #[error("cannot set up the virtio-fs device's queues")]
    Queues(#[source] crate::devices::virtio::QueueSetupError),
    #[error("cannot create a call eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Why an [`FsConfig`] cannot make a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsConfigError {
    #[error("virtio-fs tag is empty")]
    EmptyTag,
    #[error("virtio-fs tag \"{tag}\" is {len} bytes, longer than {TAG_BYTES}")]
    TagTooLong { tag: String, len: usize },
    #[error("virtio-fs tag \"{0}\" contains a NUL byte")]
    TagNul(String),
    #[error("virtio-fs tag \"{0}\" is given twice")]
    DuplicateTag(String),
    #[error("virtio-fs \"{0}\": the back end's socket path is empty")]
    EmptySocket(String),
    #[error("virtio-fs \"{tag}\": {count} request queues; between 1 and {MAX_REQUEST_QUEUES} are allowed")]
    RequestQueues { tag: String, count: u16 },
    #[error("virtio-fs \"{tag}\": queue size {size} is not a power of two between 2 and {MAX_QUEUE_SIZE}")]
    QueueSize { tag: String, size: u16 },
}

impl FsConfig {
    /// A device for `tag` on the back end at `socket`, with the default queues.
    pub fn new(tag: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        Self {
            tag: tag.into(),
            socket: socket.into(),
            num_request_queues: DEFAULT_REQUEST_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }

    /// Checks one device on its own; [`validate_all`] adds the checks across devices.
    pub fn validate(&self) -> Result<(), FsConfigError> {
        validate_tag(&self.tag)?;
        if self.socket.as_os_str().is_empty() {
            return Err(FsConfigError::EmptySocket(self.tag.clone()));
        }
        if !(1..=MAX_REQUEST_QUEUES).contains(&self.num_request_queues) {
            return Err(FsConfigError::RequestQueues {
                tag: self.tag.clone(),
                count: self.num_request_queues,
            });
        }
        if self.queue_size < 2
            || self.queue_size > MAX_QUEUE_SIZE
            || !self.queue_size.is_power_of_two()
        {
            return Err(FsConfigError::QueueSize {
                tag: self.tag.clone(),
                size: self.queue_size,
            });
        }
        Ok(())
    }

    /// The hiprio queue and the request queues.
    pub fn queue_count(&self) -> usize {
        1 + usize::from(self.num_request_queues)
    }
}

/// A tag the configuration space can carry and the guest can name.
pub fn validate_tag(tag: &str) -> Result<(), FsConfigError> {
    if tag.is_empty() {
        return Err(FsConfigError::EmptyTag);
    }
    if tag.len() > TAG_BYTES {
        return Err(FsConfigError::TagTooLong {
            tag: tag.to_string(),
            len: tag.len(),
        });
    }
    if tag.contains('\0') {
        return Err(FsConfigError::TagNul(tag.to_string()));
    }
    Ok(())
}

/// Checks every device of a VM: each valid, no tag twice (the guest could mount only one).
pub fn validate_all(devices: &[FsConfig]) -> Result<(), FsConfigError> {
    let mut tags = std::collections::BTreeSet::new();
    for device in devices {
        device.validate()?;
        if !tags.insert(device.tag.as_str()) {
            return Err(FsConfigError::DuplicateTag(device.tag.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn json_defaults_and_unknown_fields() {
        let config: FsConfig =
            serde_json::from_str(r#"{"tag": "share", "socket": "/run/fs.sock"}"#).unwrap();
        assert_eq!(config, FsConfig::new("share", "/run/fs.sock"));
        assert_eq!(config.queue_count(), 2);
        let config: FsConfig = serde_json::from_str(
            r#"{"tag": "s", "socket": "/x", "num_request_queues": 4, "queue_size": 256}"#,
        )
        .unwrap();
        assert_eq!((config.num_request_queues, config.queue_size), (4, 256));
        assert!(
            serde_json::from_str::<FsConfig>(r#"{"tag": "s", "socket": "/x", "y": 1}"#).is_err()
        );
        assert!(serde_json::from_str::<FsConfig>(r#"{"tag": "s"}"#).is_err());
    }

    #[test]
    fn validation() {
        let ok = FsConfig::new("a".repeat(TAG_BYTES), "/s");
        ok.validate().unwrap();
        let check = |change: fn(&mut FsConfig)| {
            let mut config = ok.clone();
            change(&mut config);
            config.validate().unwrap_err().to_string()
        };
        assert_eq!(check(|c| c.tag.clear()), "virtio-fs tag is empty");
        assert_eq!(
            check(|c| c.tag = "é".repeat(19)),
            format!(
                "virtio-fs tag \"{}\" is 38 bytes, longer than 36",
                "é".repeat(19)
            )
        );
        assert!(check(|c| c.tag = "a\0b".into()).contains("NUL"));
        assert!(check(|c| c.socket = PathBuf::new()).contains("socket path is empty"));
        assert!(check(|c| c.num_request_queues = 0).contains("0 request queues"));
        assert!(check(|c| c.num_request_queues = MAX_REQUEST_QUEUES + 1).contains("request"));
        for size in [0, 1, 3, 1000, 2048] {
            let mut config = ok.clone();
            config.queue_size = size;
            assert_eq!(
                config.validate(),
                Err(FsConfigError::QueueSize {
                    tag: config.tag.clone(),
                    size
                })
            );
        }
    }

    #[test]
    fn tags_are_unique() {
        let devices = [FsConfig::new("a", "/1"), FsConfig::new("b", "/2")];
        validate_all(&devices).unwrap();
        let devices = [FsConfig::new("a", "/1"), FsConfig::new("a", "/2")];
        assert_eq!(
            validate_all(&devices).unwrap_err().to_string(),
            "virtio-fs tag \"a\" is given twice"
        );
    }
}
