//! The API's snapshot requests. `PUT /snapshot/create` writes a snapshot of the paused
//! microVM, with the API's configuration document (so drive and interface ids survive).
//! `PUT /snapshot/load`, in an empty VMM, builds the microVM from a snapshot
//! (`builder::load_snapshot`, then `build_from_loaded`) with Firecracker's overrides: a
//! tap per interface id, the vsock socket. A load that fails builds nothing.

use std::path::PathBuf;

use super::action::{ActionResult, ApiError, VmmData};
use super::controller::RunningVm;
use super::models::{
    FullVmConfig, MemoryBackendType, Serial, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
};
use super::resources::VmResources;
use crate::builder::{self, BuildError, LoadedSnapshot};
use crate::config::{
    CpuProfileChoice, DiskOverride, NetOverride, RestoreConfig, SerialConfig, VmConfig,
};
use crate::device_manager::VirtioDeviceState;
use crate::vmm::Vmm;

/// `PUT /snapshot/create` on a paused microVM described by `resources`.
pub fn create(
    vm: &mut dyn RunningVm,
    params: &SnapshotCreateParams,
    resources: &VmResources,
) -> ActionResult {
    if params.snapshot_type == SnapshotType::Diff {
        return Err(ApiError::Unsupported(
            "hearth takes full snapshots only (snapshot_type Diff)".into(),
        ));
    }
    let document = serde_json::to_string(&resources.to_full_config())
        .map_err(|e| ApiError::Runtime(format!("cannot save the configuration: {e}")))?;
    vm.snapshot(&params.snapshot_path, &params.mem_file_path, Some(document))
        .map_err(|e| ApiError::Runtime(crate::error_chain(&e)))?;
    Ok(VmmData::Empty)
}

/// A microVM built from a snapshot, and the API's view of it.
pub struct Loaded {
    pub vmm: Vmm,
    pub resources: VmResources,
    /// Runs at once (`resume_vm`); otherwise it waits, paused, for `PATCH /vm`.
    pub resumed: bool,
}

/// `PUT /snapshot/load`. The console is `console` (a `PUT /serial` before the load) or
/// else the snapshot's.
pub fn load(params: &SnapshotLoadParams, console: Option<&Serial>) -> Result<Loaded, ApiError> {
    let memory = params.memory().map_err(ApiError::invalid)?;
    let unsupported = |what: &str| Err(ApiError::Unsupported(what.to_string()));
    if memory.backend_type == MemoryBackendType::Uffd {
        return unsupported(
            "hearth loads guest memory from a file (mem_backend Uffd is not supported)",
        );
    }
    if params.tracks_dirty_pages() {
        return unsupported(
            "hearth takes full snapshots only (dirty page tracking is not supported)",
        );
    }
    if params.clock_realtime {
        return unsupported(
            "hearth resumes the guest clock where it was saved (clock_realtime is not supported)",
        );
    }
    if params.huge_pages.as_deref().is_some_and(|h| h != "None") {
        return unsupported(
            "hearth maps snapshot memory with normal pages (huge_pages is not supported)",
        );
    }
    let loaded = builder::load_snapshot(&params.snapshot_path, &memory.backend_path)
        .map_err(snapshot_error)?;
    let mut resources = saved_resources(&loaded)?;
    let mut restore = RestoreConfig::new(&params.snapshot_path, &memory.backend_path);
    for over in &params.network_overrides {
        let index = resources
            .nets
            .iter()
            .position(|n| n.iface_id == over.iface_id)
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "the snapshot has no network interface \"{}\"",
                    over.iface_id
                ))
            })?;
        let backend = over.backend_config().map_err(ApiError::invalid)?;
        resources.nets[index].host_dev_name = over.host_dev_name.clone();
        resources.nets[index].backend = over.backend.clone();
        restore.nets.push(NetOverride { index, backend });
    }
    for over in &params.drive_overrides {
        let index = resources.drive_index(&over.drive_id).ok_or_else(|| {
            ApiError::invalid(format!("the snapshot has no drive \"{}\"", over.drive_id))
        })?;
        resources.set_drive_path(&over.drive_id, over.path_on_host.clone());
        restore.disks.push(DiskOverride {
            index,
            path: over.path_on_host.clone(),
        });
    }
    if let Some(over) = &params.vsock_override {
        let vsock = resources
            .vsock
            .as_mut()
            .ok_or_else(|| ApiError::invalid("the snapshot has no vsock device"))?;
        vsock.uds_path = over.uds_path.clone();
        restore.vsock_uds_path = Some(over.uds_path.clone());
    }
    restore.fs = params.fs_overrides.clone();
    if let Some(console) = console {
        resources.serial = Some(console.clone());
    }
    restore.serial = match resources
        .serial
        .as_ref()
        .and_then(|s| s.serial_out_path.clone())
    {
        Some(path) => SerialConfig::File(path),
        None => SerialConfig::Stdio,
    };
    restore.resume = params.resume_vm;
    restore.validate().map_err(ApiError::invalid)?;
    let vmm = builder::build_from_loaded(loaded, &restore, crate::process_start())
        .map_err(snapshot_error)?;
    Ok(Loaded {
        vmm,
        resources,
        resumed: params.resume_vm,
    })
}

/// Why a load failed, without the builder's "cannot restore the snapshot" (the caller
/// says that).
fn snapshot_error(err: BuildError) -> ApiError {
    ApiError::Snapshot(match &err {
        BuildError::Snapshot(inner) => crate::error_chain(inner),
        other => crate::error_chain(other),
    })
}

/// The API's view of the snapshot's microVM: the configuration document the API saved
/// with it, taken as it was (its files were checked when the VM was configured; a
/// restore may move them); for a snapshot taken without the API, one made from the
/// devices, with ids `disk0`, `net0`, ... as `hearth run --api-sock` gives.
fn saved_resources(loaded: &LoadedSnapshot) -> Result<VmResources, ApiError> {
    saved_resources_of(&loaded.snapshot)
}

/// [`saved_resources`] of a snapshot read but not loaded (a jailed restore lists the
/// files it will need from it).
pub(crate) fn saved_resources_of(
    snapshot: &crate::snapshot::Snapshot<crate::vmm::persist::VmmState>,
) -> Result<VmResources, ApiError> {
    let state = &snapshot.payload;
    if let Some(document) = &state.frontend {
        let doc: FullVmConfig = serde_json::from_str(document).map_err(|e| {
            ApiError::Snapshot(format!("the snapshot's configuration is unreadable: {e}"))
        })?;
        return Ok(VmResources::from_saved(doc));
    }
    let mut config = VmConfig::new(PathBuf::new());
    config.vcpu_count = state.vcpus.len() as u8;
    config.mem_size = snapshot.layout.ram_size();
    config.cpu_profile = CpuProfileChoice::Auto;
    for attached in &state.devices.virtio {
        match &attached.device {
            VirtioDeviceState::Block(block) => config.disks.push(block.config.clone()),
            VirtioDeviceState::Net(net) => config.nets.push(net.config.clone()),
            VirtioDeviceState::Vsock(vsock) => config.vsock = Some(vsock.config.clone()),
            VirtioDeviceState::Rng(rng) => config.rng = Some(rng.config.clone()),
            VirtioDeviceState::Fs(fs) => config.fs.push(fs.config.clone()),
            VirtioDeviceState::Balloon(balloon) => config.balloon = Some(balloon.config.clone()),
        }
    }
    let mut resources = VmResources::from_vm_config(&config);
    // The kernel is in guest memory; no file stands for it.
    resources.boot_source = None;
    Ok(resources)
}
