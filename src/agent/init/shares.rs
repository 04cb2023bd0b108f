//! Host folders shared over virtio-fs: the agent mounts each device by its tag.
//!
//! * A container VM's volume ([`VolumeSource::Virtiofs`]) is mounted at
//!   [`virtiofs_mount_point`] in the VM, and the sandbox binds that directory into the
//!   container ([`VolumeSource::Path`]), read-only for a `:ro` volume.
//! * A machine's shared folder ([`MountSpec`]) is mounted where the host asks, once,
//!   and containers of the machine bind places under it.
//!
//! A read-only share is also read-only on the host side (virtiofsd serves a read-only
//! mount); the guest's read-only mount only gives the container `EROFS` early.

use std::io;
use std::path::{Component, Path};

use super::sys;
use crate::agent::protocol::{
    valid_fs_tag, virtiofs_mount_point, MountSpec, RunSpec, Volume, VolumeSource,
};

/// Why a shared folder could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("virtio-fs tag {0:?} is not a plain name")]
    BadTag(String),
    #[error("mount point {0:?} must be an absolute path other than / without ..")]
    BadTarget(String),
    #[error("virtio-fs volumes of a machine come from its shared folders")]
    NotInMachine,
    #[error("cannot create {path}")]
    Mkdir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount the shared folder {tag} on {path}")]
    Mount {
        tag: String,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// An absolute path other than `/`, without `..`.
fn check_target(target: &str) -> Result<&Path, ShareError> {
    let path = Path::new(target);
    if !path.is_absolute()
        || path.components().any(|c| c == Component::ParentDir)
        || path.components().count() < 2
    {
        return Err(ShareError::BadTarget(target.to_string()));
    }
    Ok(path)
}

/// Mounts the virtio-fs device `tag` on `target` (made if missing).
pub fn mount(tag: &str, target: &str, readonly: bool) -> Result<(), ShareError> {
    if !valid_fs_tag(tag) {
        return Err(ShareError::BadTag(tag.to_string()));
    }
    let path = check_target(target)?;
    sys::mkdir_all(path).map_err(|source| ShareError::Mkdir {
        path: target.to_string(),
        source,
    })?;
    let flags = if readonly { libc::MS_RDONLY } else { 0 };
    sys::mount(Some(tag), path, Some("virtiofs"), flags, None).map_err(|source| ShareError::Mount {
        tag: tag.to_string(),
        path: target.to_string(),
        source,
    })
}

/// A machine's shared folder.
pub fn mount_share(spec: &MountSpec) -> Result<(), ShareError> {
    mount(&spec.tag, &spec.target, spec.readonly)
}

/// A container VM: mounts the spec's virtio-fs volumes in the VM and makes them plain
/// directories of the VM for the sandbox to bind. In a machine there are none (its
/// containers' volumes are places under its shared folders).
pub fn mount_volumes(spec: &mut RunSpec, machine: bool) -> Result<(), ShareError> {
    for volume in &mut spec.volumes {
        let Some(VolumeSource::Virtiofs { tag }) = &volume.source else {
            continue;
        };
        if machine {
            return Err(ShareError::NotInMachine);
        }
        let dir = virtiofs_mount_point(tag);
        mount(tag, &dir, volume.readonly)?;
        volume.source = Some(VolumeSource::Path { path: dir });
    }
    Ok(())
}

/// Where the files of [`RunSpec::files`] are written in the VM.
const FILES_DIR: &str = "/run/hearth/files";

/// Writes the spec's files in the VM and turns each into a volume the sandbox binds
/// over its target (read-only if asked).
pub fn write_files(spec: &mut RunSpec) -> Result<(), ShareError> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if spec.files.is_empty() {
        return Ok(());
    }
    sys::mkdir_all(Path::new(FILES_DIR)).map_err(|source| ShareError::Mkdir {
        path: FILES_DIR.to_string(),
        source,
    })?;
    for file in std::mem::take(&mut spec.files) {
        check_target(&file.target)?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = format!("{FILES_DIR}/{n}");
        std::fs::write(&path, file.content.as_bytes()).map_err(|source| ShareError::Write {
            path: path.clone(),
            source,
        })?;
        spec.volumes.push(Volume {
            device: String::new(),
            target: file.target,
            readonly: file.readonly,
            source: Some(VolumeSource::Path { path }),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tags_and_targets_are_refused_before_any_mount() {
        assert!(matches!(
            mount("../x", "/mnt", false),
            Err(ShareError::BadTag(_))
        ));
        for target in ["", "relative", "/", "/a/../b"] {
            assert!(
                matches!(mount("t", target, false), Err(ShareError::BadTarget(_))),
                "{target}"
            );
        }
    }

    #[test]
    fn a_machine_takes_no_virtiofs_volume_and_other_volumes_pass() {
        let volume = |source| Volume {
            device: String::new(),
            target: "/data".into(),
            readonly: false,
            source,
        };
        let mut spec: RunSpec = serde_json::from_str(
            r#"{"argv":["true"],"env":[],"cwd":"/","user":null,"hostname":null,"tty":false,
            "stdin":false,"rootfs":{"kind":"host"},"volumes":[],"memory_limit":null,
            "cpus":null,"network":"vm","net":null,"name":null,"term_size":null}"#,
        )
        .unwrap();
        let path = Some(VolumeSource::Path {
            path: "/home/u".into(),
        });
        spec.volumes = vec![volume(path.clone())];
        mount_volumes(&mut spec, false).unwrap();
        mount_volumes(&mut spec, true).unwrap();
        assert_eq!(spec.volumes[0].source, path);
        spec.volumes.push(volume(Some(VolumeSource::Virtiofs {
            tag: "hearthfs0".into(),
        })));
        assert!(matches!(
            mount_volumes(&mut spec, true),
            Err(ShareError::NotInMachine)
        ));
    }
}
