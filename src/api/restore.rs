//! `hearth restore --state S --mem M [...]`: a microVM restored from a snapshot in one
//! command. The command line becomes a [`RestorePlan`], the requests a Firecracker
//! client would send: `PUT /serial` for a new console file and `PUT /snapshot/load`
//! with the network and vsock overrides and, hearth's extension, `drive_overrides`
//! (each `--disk-override` opens another image in the drive's place at the load, so a
//! snapshot whose image has moved, or a template whose drive is a placeholder, restores
//! without ever opening the saved path; the guest is told to re-read the capacity). An
//! empty VMM in the firecracker shape serves these requests in-process, through the same
//! controllers as the API (`shape::run_driven`), so a restore behaves exactly as the
//! same requests on a socket; with `--api-sock` the API serves the VM as well.

use std::collections::HashSet;
use std::path::PathBuf;

use super::action::{ApiError, VmmAction};
use super::models::{
    DriveOverride, MemoryBackend, MemoryBackendType, NetworkOverride, Serial, SnapshotLoadParams,
    VsockOverride,
};
use super::shape::{run_driven, ShapeError};
use super::ActionSender;
use crate::config::FsOverride;
use crate::devices::virtio::net::{tap, NetBackend, NetConfig};

/// `hearth restore` options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot's VM state file (`hearth remote snapshot --state`).
    #[arg(long, value_name = "PATH")]
    pub state: PathBuf,

    /// The snapshot's guest memory file (`hearth remote snapshot --mem`).
    #[arg(long, value_name = "PATH")]
    pub mem: PathBuf,

    /// Also serve the API on this socket while the restored VM runs.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// Attach network interface IFACE to the tap TAP instead of the snapshot's.
    /// Repeatable.
    #[arg(long = "net-override", value_name = "IFACE=TAP")]
    pub net_overrides: Vec<String>,

    /// The vsock device's host socket, instead of the snapshot's.
    #[arg(long, value_name = "PATH")]
    pub vsock_override: Option<PathBuf>,

    /// Back drive ID with the image PATH instead of the snapshot's. Repeatable.
    #[arg(long = "disk-override", value_name = "ID=PATH")]
    pub disk_overrides: Vec<String>,

    /// Connect the virtio-fs device TAG to the vhost-user back end (virtiofsd) listening
    /// on PATH. Every fs device of the snapshot needs one. Repeatable.
    #[arg(long = "fs-override", value_name = "TAG=PATH")]
    pub fs_overrides: Vec<String>,

    /// Append the guest's console to this file instead of where the snapshot's went
    /// (a clone's console is its own).
    #[arg(long, value_name = "PATH")]
    pub serial_out: Option<PathBuf>,

    /// Leave the restored VM paused, for a client of --api-sock to resume.
    #[arg(long, requires = "api_sock")]
    pub paused: bool,

    /// Print the time from process start until the restored vCPUs run, on stderr.
    #[arg(long, conflicts_with = "paused")]
    pub restore_timer: bool,

    #[command(flatten)]
    pub process: crate::cli::VmmProcessArgs,
}

/// What the `--restore-timer` line starts with, after `hearth: ` (`hearth bench snapshot`
/// watches stderr for it).
pub const RESTORE_TIMER_MARKER: &str = "restore-timer:";

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid {flag} \"{value}\": {reason}")]
    Override {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("{flag} names \"{id}\" twice")]
    Duplicate { flag: &'static str, id: String },
    #[error(transparent)]
    Passt(#[from] crate::net::passt::PasstError),
    #[error("cannot load the snapshot")]
    Load(#[source] ApiError),
    #[error("the restore stopped unexpectedly")]
    DriverPanicked,
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("cannot read the snapshot for the jail")]
    JailSnapshot(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl RestoreError {
    /// The VMM stopped (a signal) before the restore finished: not the restore's fault.
    fn vmm_gone(&self) -> bool {
        matches!(self, Self::Load(ApiError::VmmGone))
    }
}

/// The requests of a restore, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct RestorePlan {
    /// The console, set before the load.
    pub serial: Option<Serial>,
    pub load: SnapshotLoadParams,
}

impl RestorePlan {
    /// The requests, as the API would receive them.
    pub fn actions(&self) -> Vec<VmmAction> {
        let mut actions: Vec<VmmAction> = self
            .serial
            .iter()
            .cloned()
            .map(VmmAction::PutSerial)
            .collect();
        actions.push(VmmAction::LoadSnapshot(self.load.clone()));
        actions
    }
}

impl RestoreArgs {
    /// The requests these arguments stand for; malformed overrides are refused here,
    /// before anything starts.
    pub fn plan(&self) -> Result<RestorePlan, RestoreError> {
        let mut ifaces = HashSet::new();
        let mut network_overrides = Vec::with_capacity(self.net_overrides.len());
        for value in &self.net_overrides {
            let (iface_id, target) = split_override("--net-override", value, "IFACE=TAP")?;
            check_id("--net-override", value, "interface id", iface_id)?;
            let backend =
                override_backend(target).map_err(|reason| bad("--net-override", value, reason))?;
            if !ifaces.insert(iface_id) {
                return Err(RestoreError::Duplicate {
                    flag: "--net-override",
                    id: iface_id.to_string(),
                });
            }
            network_overrides.push(NetworkOverride::new(iface_id, backend));
        }

        let mut drive_ids = HashSet::new();
        let mut drive_overrides = Vec::with_capacity(self.disk_overrides.len());
        for value in &self.disk_overrides {
            let (drive_id, path) = split_override("--disk-override", value, "ID=PATH")?;
            check_id("--disk-override", value, "drive id", drive_id)?;
            if path.is_empty() {
                return Err(bad("--disk-override", value, "the image path is empty"));
            }
            if !drive_ids.insert(drive_id) {
                return Err(RestoreError::Duplicate {
                    flag: "--disk-override",
                    id: drive_id.to_string(),
                });
            }
            drive_overrides.push(DriveOverride {
                drive_id: drive_id.to_string(),
                path_on_host: absolute(path),
            });
        }

        let mut fs_overrides: Vec<FsOverride> = Vec::with_capacity(self.fs_overrides.len());
        for value in &self.fs_overrides {
            let (tag, path) = split_override("--fs-override", value, "TAG=PATH")?;
            crate::devices::virtio::fs::validate_tag(tag)
                .map_err(|e| bad("--fs-override", value, e.to_string()))?;
            if path.is_empty() {
                return Err(bad("--fs-override", value, "the socket path is empty"));
            }
            if fs_overrides.iter().any(|over| over.tag == tag) {
                return Err(RestoreError::Duplicate {
                    flag: "--fs-override",
                    id: tag.to_string(),
                });
            }
            fs_overrides.push(FsOverride {
                tag: tag.to_string(),
                socket: absolute(path),
            });
        }

        let vsock_override = self.vsock_override.as_ref().map(|path| VsockOverride {
            uds_path: absolute(path),
        });
        Ok(RestorePlan {
            serial: self.serial_out.as_ref().map(|path| Serial {
                serial_out_path: Some(absolute(path)),
                rate_limiter: None,
            }),
            load: SnapshotLoadParams {
                snapshot_path: absolute(&self.state),
                mem_file_path: None,
                mem_backend: Some(MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: absolute(&self.mem),
                }),
                enable_diff_snapshots: false,
                track_dirty_pages: false,
                resume_vm: !self.paused,
                network_overrides,
                vsock_override,
                drive_overrides,
                fs_overrides,
                clock_realtime: false,
                huge_pages: None,
            },
        })
    }
}

/// What `--net-override IFACE=...` puts the NIC on: a tap name as always, or the back
/// end part of a `--net` spec (`tap=NAME`, `stream=PATH`, `user[,ports=...]`).
fn override_backend(target: &str) -> Result<NetBackend, String> {
    let spec_form = target == "user"
        || ["user,", "tap=", "stream="]
            .iter()
            .any(|prefix| target.starts_with(prefix));
    if !spec_form {
        if !tap::valid_name(target) {
            return Err(format!(
                "\"{target}\" is not a tap name (1 to 15 printable characters without '/' or ':')"
            ));
        }
        return Ok(NetBackend::Tap(target.to_string()));
    }
    let nic: crate::devices::virtio::net::NetConfig = target
        .parse()
        .map_err(|e: crate::config::SpecError| e.to_string())?;
    if nic != crate::devices::virtio::net::NetConfig::new(nic.backend.clone()) {
        return Err("only the back end (tap=, stream= or user) can be changed".into());
    }
    crate::config::validate_net_backend(&nic.backend).map_err(|e| e.to_string())?;
    Ok(nic.backend)
}

/// `ID=VALUE`, split at the first '='.
fn split_override<'a>(
    flag: &'static str,
    value: &'a str,
    form: &str,
) -> Result<(&'a str, &'a str), RestoreError> {
    value
        .split_once('=')
        .ok_or_else(|| bad(flag, value, format!("expected {form}")))
}

/// Firecracker's rule for resource ids: letters, digits and '_'.
fn check_id(flag: &'static str, value: &str, what: &str, id: &str) -> Result<(), RestoreError> {
    if id.is_empty() {
        return Err(bad(flag, value, format!("the {what} is empty")));
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(bad(
            flag,
            value,
            format!("{what} \"{id}\" may hold only letters, digits and '_'"),
        ));
    }
    Ok(())
}

fn bad(flag: &'static str, value: &str, reason: impl Into<String>) -> RestoreError {
    RestoreError::Override {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Paths as the user meant them; one that cannot be resolved is left for the VMM to
/// refuse by name.
fn absolute(path: impl AsRef<std::path::Path>) -> PathBuf {
    let path = path.as_ref();
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Restores and runs the microVM until it stops; its exit status, as `hearth run`'s.
pub fn run(args: &RestoreArgs) -> Result<u8, RestoreError> {
    let mut plan = args.plan()?;
    let mut api_sock = args.api_sock.clone();
    // passt for the NICs moved onto user-mode networking, stopped when this returns
    // (outside the jail, like `hearth run`). A saved user-mode NIC without an override
    // gets none: the device says so.
    let overridden: Vec<NetConfig> = (plan.load.network_overrides.iter())
        .filter_map(|over| over.backend_config().ok())
        .map(NetConfig::new)
        .collect();
    let host_networks = crate::net::prepare(&overridden, args.process.passt.as_deref())?;
    if let Some(jail) = args.process.jail.config()? {
        crate::jail::check_root()?;
        let (files, sockets, backends, taps) = jail_needs(&mut plan, &mut api_sock)?;
        let jail_plan = crate::jail::JailPlan::from_parts(&jail.dir, files, sockets)?
            .with_backend_sockets(backends)?
            .with_vm_dirs(&jail)?;
        match crate::jail::enter_plan(&jail, &jail_plan, &taps)? {
            crate::jail::Side::Parent(status) => return Ok(status),
            crate::jail::Side::Jailed => host_networks.forget(),
        }
    }
    let timer = args.restore_timer;
    let (status, driven) = run_driven(api_sock.as_deref(), move |sender| {
        let driven = drive(&plan, &sender);
        // The last request (the load with resume_vm, or the resume after the drive
        // updates) is answered once every vCPU thread has been started or resumed.
        if timer && driven.is_ok() {
            let ms = crate::process_start().elapsed().as_secs_f64() * 1e3;
            eprintln!("hearth: {RESTORE_TIMER_MARKER} vCPUs running after {ms:.3} ms");
        }
        driven
    })?;
    match driven {
        Some(Ok(())) => Ok(status),
        Some(Err(e)) if e.vmm_gone() => Ok(status),
        Some(Err(e)) => Err(e),
        None => Err(RestoreError::DriverPanicked),
    }
}

/// The host files (with the access each needs), sockets the VMM makes, back-end sockets
/// it connects to (virtio-fs) and taps a restore of `plan` uses, read from the snapshot's state file as the load will read it, with the paths in
/// `plan` and `api_sock` made canonical (the jail mirrors each at its own path).
type JailNeeds = (
    Vec<(PathBuf, crate::jail::Access)>,
    Vec<PathBuf>,
    Vec<PathBuf>,
    Vec<String>,
);

fn jail_needs(
    plan: &mut RestorePlan,
    api_sock: &mut Option<PathBuf>,
) -> Result<JailNeeds, RestoreError> {
    use crate::jail::{absolute_socket_path, canonical_file, Access};
    use crate::snapshot::{HostFacts, StateFile};
    let load = &mut plan.load;
    load.snapshot_path = canonical_file(&load.snapshot_path, "snapshot state")?;
    let mem = load
        .mem_backend
        .as_mut()
        .expect("the plan names a memory file");
    mem.backend_path = canonical_file(&mem.backend_path, "snapshot memory")?;
    let boxed =
        |e: &dyn std::error::Error| RestoreError::JailSnapshot(crate::error_chain(e).into());
    let file = StateFile::read(&load.snapshot_path).map_err(|e| boxed(&e))?;
    let kvm = crate::vstate::kvm::KvmContext::open().map_err(|e| boxed(&e))?;
    let host = HostFacts::probe(&kvm, file.header().host.cpu_profile).map_err(|e| boxed(&e))?;
    drop(kvm);
    let snapshot = file
        .into_snapshot::<crate::vmm::persist::VmmState>(&host)
        .map_err(|e| boxed(&e))?;
    let mut resources = super::snapshot::saved_resources_of(&snapshot).map_err(|e| boxed(&e))?;

    let mut files = vec![
        (load.snapshot_path.clone(), Access::Read),
        (mem.backend_path.clone(), Access::Read),
    ];
    for over in &mut load.drive_overrides {
        over.path_on_host = canonical_file(&over.path_on_host, "disk")?;
        resources.set_drive_path(&over.drive_id, over.path_on_host.clone());
    }
    for drive in &resources.drives {
        if let Some(path) = &drive.path_on_host {
            let access = if drive.is_read_only.unwrap_or(false) {
                Access::Read
            } else {
                Access::ReadWrite
            };
            files.push((path.clone(), access));
        }
    }
    // The taps a jailed restore opens before it drops its privileges (the streams are
    // made ready before the jail, from the overrides).
    let taps = (resources.nets.iter())
        .map(|net| {
            (load.network_overrides.iter())
                .find(|over| over.iface_id == net.iface_id)
                .map_or_else(|| net.host_dev_name.clone(), |o| o.host_dev_name.clone())
        })
        .filter(|name| !name.is_empty())
        .collect();
    let mut sockets = Vec::new();
    match (&mut load.vsock_override, &resources.vsock) {
        (Some(over), _) => {
            over.uds_path = absolute_socket_path(&over.uds_path)?;
            sockets.push(over.uds_path.clone());
        }
        (None, Some(saved)) => sockets.push(saved.uds_path.clone()),
        (None, None) => {}
    }
    let mut backends = Vec::new();
    for over in &mut load.fs_overrides {
        over.socket = canonical_file(&over.socket, "virtio-fs back end socket")?;
        backends.push(over.socket.clone());
    }
    if let Some(path) = plan
        .serial
        .as_mut()
        .and_then(|s| s.serial_out_path.as_mut())
    {
        *path = absolute_socket_path(path)?;
        files.push((path.clone(), Access::Append));
    } else if let Some(path) = resources
        .serial
        .as_ref()
        .and_then(|s| s.serial_out_path.clone())
    {
        files.push((path, Access::Append));
    }
    if let Some(path) = api_sock {
        *path = absolute_socket_path(path)?;
        sockets.push(path.clone());
    }
    Ok((files, sockets, backends, taps))
}

/// Sends the plan's requests in order. When one is refused, the VMM is shut down (the
/// restore has failed, and a half-restored VM must not linger) and the refusal returned.
fn drive(plan: &RestorePlan, vmm: &ActionSender) -> Result<(), RestoreError> {
    let result = plan
        .actions()
        .into_iter()
        .try_for_each(|action| vmm.dispatch(action).map(drop).map_err(RestoreError::Load));
    if result.is_err() {
        let _ = vmm.dispatch(VmmAction::Shutdown);
    }
    result
}

#[cfg(test)]
mod tests;
