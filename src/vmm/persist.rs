//! Snapshots of a paused VM: what a snapshot's state file holds beside guest memory
//! ([`VmmState`]), and [`Vmm::snapshot`], which writes both files. Restoring is
//! `builder::build_from_snapshot`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{RunState, Vmm, VmmError};
use crate::config::{RestoreConfig, MAX_VCPUS};
use crate::device_manager::{AttachedDeviceState, VirtioDeviceState};
use crate::devices::bus::lock;
use crate::devices::control::ControlState;
use crate::devices::legacy::cmos::CmosState;
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::SerialState;
use crate::devices::vmgenid::VmGenIdState;
use crate::snapshot::format::bounded_vec;
use crate::snapshot::{self, HostFacts, Saved, SnapshotError};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    #[error("the snapshot has {count} {kind}(s); there is no {kind} {index} to give new backing")]
    NoSuchDevice {
        kind: &'static str,
        index: usize,
        count: usize,
    },
    #[error("the snapshot has no vsock device for the new socket path")]
    NoVsock,
    #[error("the snapshot has no virtio-fs device with tag \"{0}\"")]
    NoFsDevice(String),
    #[error(
        "virtio-fs \"{0}\" needs a fresh back end: give its socket (hearth restore \
         --fs-override {0}=PATH)"
    )]
    NoFsBackend(String),
}

/// Everything of a paused VM but its memory: the payload of a snapshot's state file. The
/// memory layout and the host facts (CPU profile included) are in the file's container.
#[derive(Serialize, Deserialize)]
pub struct VmmState {
    /// In index order; each with the compat layer's own state when it ran with it. At most
    /// `MAX_VCPUS` are read back (see [`bounded_vec`]).
    #[serde(deserialize_with = "bounded_vec::<_, _, { MAX_VCPUS as usize }>")]
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DevicesState,
    /// What the VM's front end knows of it beyond the devices, for a restore to give back
    /// (the API saves its configuration document, JSON, with the drive and interface ids
    /// its clients use); `None` when nothing was given.
    pub frontend: Option<String>,
}

/// Every device's state.
#[derive(Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    pub cmos: CmosState,
    pub control: ControlState,
    /// In the order they were attached, which is the order to restore them in.
    pub virtio: Vec<AttachedDeviceState>,
    /// A restore writes a new ID there and raises the interrupt.
    pub vmgenid: VmGenIdState,
}

impl DevicesState {
    /// Whether the saved VM had a vhost-user device, whose back end maps guest RAM: then
    /// it is restored into shareable memory.
    pub fn needs_shared_memory(&self) -> bool {
        (self.virtio.iter()).any(|attached| matches!(attached.device, VirtioDeviceState::Fs(_)))
    }

    /// Points the saved devices at the new backing `restore` names: image paths, taps,
    /// the vsock socket. Disks and NICs are counted among their kind, in attach order.
    pub fn apply_overrides(&mut self, restore: &RestoreConfig) -> Result<(), OverrideError> {
        let mut disks = Vec::new();
        let mut nets = Vec::new();
        let mut vsock = None;
        let mut fs = Vec::new();
        for attached in &mut self.virtio {
            match &mut attached.device {
                VirtioDeviceState::Block(block) => disks.push(&mut block.config.path),
                VirtioDeviceState::Net(net) => nets.push(&mut net.config.backend),
                VirtioDeviceState::Vsock(state) => vsock = Some(&mut state.config.uds_path),
                VirtioDeviceState::Fs(state) => fs.push(&mut state.config),
                // Nothing on the host to point elsewhere.
                VirtioDeviceState::Rng(_) | VirtioDeviceState::Balloon(_) => {}
            }
        }
        let missing = |kind, index, count| OverrideError::NoSuchDevice { kind, index, count };
        for disk in &restore.disks {
            let count = disks.len();
            **disks
                .get_mut(disk.index)
                .ok_or_else(|| missing("disk", disk.index, count))? = disk.path.clone();
        }
        for nic in &restore.nets {
            let count = nets.len();
            **nets
                .get_mut(nic.index)
                .ok_or_else(|| missing("NIC", nic.index, count))? = nic.backend.clone();
        }
        if let Some(path) = &restore.vsock_uds_path {
            *vsock.ok_or(OverrideError::NoVsock)? = path.clone();
        }
        if let Some(over) = (restore.fs.iter()).find(|o| !fs.iter().any(|c| c.tag == o.tag)) {
            return Err(OverrideError::NoFsDevice(over.tag.clone()));
        }
        // The saved back end went away with the saved VM's connection.
        for config in fs {
            let over = (restore.fs.iter())
                .find(|o| o.tag == config.tag)
                .ok_or_else(|| OverrideError::NoFsBackend(config.tag.clone()))?;
            config.socket = over.socket.clone();
        }
        Ok(())
    }
}

impl Vmm {
    /// Writes a snapshot of the paused VM: guest memory to `mem_path`, everything else (and
    /// `frontend`, see [`VmmState::frontend`]) to `state_path`, each replaced if it exists.
    /// Like Firecracker, a running VM is refused: pause it first; it stays paused after.
    pub fn snapshot(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
        frontend: Option<String>,
    ) -> Result<Saved, VmmError> {
        self.expect_state(RunState::Paused)?;
        let mut state = self.save_state()?;
        state.frontend = frontend;
        let first = state.vcpus.first().ok_or_else(|| {
            VmmError::Snapshot(SnapshotError::Inconsistent("the VM has no vCPU".into()))
        })?;
        let host = HostFacts::for_guest(&first.cpuid, self.profile);
        let saved = snapshot::save(&self.mem, host, &state, state_path, mem_path)
            .map_err(VmmError::Snapshot)?;
        log::info!(
            "snapshot: {} bytes of state, {} MiB of memory data",
            saved.state_bytes,
            saved.memory_data_bytes >> 20
        );
        Ok(saved)
    }

    /// The state of the paused VM, memory aside.
    pub fn save_state(&mut self) -> Result<VmmState, VmmError> {
        self.expect_state(RunState::Paused)?;
        Ok(VmmState {
            vcpus: self.save_vcpu_states()?,
            vm: self.save_vm_state()?,
            devices: DevicesState {
                serial: lock(&self.console.serial).save(),
                i8042: lock(&self.devices.i8042).save(),
                cmos: lock(&self.devices.cmos).save(),
                control: self.control.save(),
                virtio: self.mmio_devices.save(),
                vmgenid: self.devices.vmgenid.save(),
            },
            frontend: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::config::{DiskOverride, NetOverride};
    use crate::devices::legacy::cmos::Cmos;
    use crate::devices::legacy::i8042::I8042;
    use crate::devices::legacy::serial::{InputSpace, SerialDevice};
    use crate::devices::virtio::block::{BlockConfig, BlockState};
    use crate::devices::virtio::net::{NetConfig, NetState};
    use crate::devices::virtio::persist::{DeviceCoreState, MmioTransportState};
    use crate::devices::virtio::rng::{RngConfig, RngState};
    use crate::devices::virtio::vsock::{VsockConfig, VsockState};
    use crate::exit::ExitSignal;

    fn attached(index: u64, device: VirtioDeviceState) -> AttachedDeviceState {
        AttachedDeviceState {
            name: format!("dev{index}"),
            base: 0xd000_0000 + index * 0x1000,
            irq: 5 + index as u32,
            transport: MmioTransportState::default(),
            device,
        }
    }

    fn block(path: &str) -> VirtioDeviceState {
        VirtioDeviceState::Block(BlockState {
            config: BlockConfig {
                path: path.into(),
                read_only: false,
                id: None,
                rate_limiter: Default::default(),
            },
            capacity: 8,
            core: DeviceCoreState::default(),
        })
    }

    fn net(tap: &str) -> VirtioDeviceState {
        VirtioDeviceState::Net(NetState {
            config: NetConfig {
                mac: Some([0x52, 0x54, 0, 0, 0, 1]),
                ..NetConfig::new(crate::devices::virtio::net::NetBackend::Tap(tap.into()))
            },
            core: DeviceCoreState::default(),
        })
    }

    /// Two disks around a NIC, then a second NIC and an entropy device (and a vsock
    /// device when `vsock`).
    fn devices(vsock: bool) -> DevicesState {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let serial = SerialDevice::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Arc::new(InputSpace::new().unwrap()),
            Box::new(std::io::sink()),
        );
        let mut virtio = vec![
            attached(0, block("/a.img")),
            attached(1, net("tap0")),
            attached(2, block("/b.img")),
            attached(3, net("tap1")),
            attached(
                4,
                VirtioDeviceState::Rng(RngState {
                    config: RngConfig::default(),
                    core: DeviceCoreState::default(),
                }),
            ),
        ];
        if vsock {
            virtio.push(attached(
                5,
                VirtioDeviceState::Vsock(VsockState {
                    config: VsockConfig {
                        guest_cid: 3,
                        uds_path: "/run/v.sock".into(),
                    },
                    core: DeviceCoreState::default(),
                }),
            ));
        }
        DevicesState {
            serial: serial.save(),
            i8042: I8042::new(exit, None).save(),
            cmos: Cmos::new().save(),
            control: ControlState {
                boot_completed: true,
            },
            virtio,
            vmgenid: VmGenIdState {
                address: 0xdf000,
                irq: 23,
            },
        }
    }

    fn backing(state: &DevicesState) -> Vec<String> {
        state
            .virtio
            .iter()
            .map(|d| match &d.device {
                VirtioDeviceState::Block(b) => b.config.path.display().to_string(),
                VirtioDeviceState::Net(n) => n.config.tap().unwrap_or_default().to_string(),
                VirtioDeviceState::Vsock(v) => v.config.uds_path.display().to_string(),
                VirtioDeviceState::Rng(_) => "rng".to_string(),
                VirtioDeviceState::Fs(f) => {
                    format!("{}:{}", f.config.tag, f.config.socket.display())
                }
                VirtioDeviceState::Balloon(_) => "balloon".to_string(),
            })
            .collect()
    }

    #[test]
    fn overrides_count_devices_within_their_kind() {
        let mut restore = RestoreConfig::new("/s", "/m");
        restore.disks = vec![DiskOverride {
            index: 1,
            path: PathBuf::from("/copy-of-b.img"),
        }];
        restore.nets = vec![NetOverride {
            index: 0,
            backend: crate::devices::virtio::net::NetBackend::Tap("tap9".into()),
        }];
        restore.vsock_uds_path = Some("/run/w.sock".into());
        let mut state = devices(true);
        state.apply_overrides(&restore).unwrap();
        assert_eq!(
            backing(&state),
            [
                "/a.img",
                "tap9",
                "/copy-of-b.img",
                "tap1",
                "rng",
                "/run/w.sock"
            ]
        );
    }

    #[test]
    fn overrides_for_missing_devices_are_refused() {
        let mut restore = RestoreConfig::new("/s", "/m");
        restore.nets = vec![NetOverride {
            index: 2,
            backend: crate::devices::virtio::net::NetBackend::Tap("tap9".into()),
        }];
        let mut state = devices(false);
        assert_eq!(
            state.apply_overrides(&restore).unwrap_err().to_string(),
            "the snapshot has 2 NIC(s); there is no NIC 2 to give new backing"
        );
        let mut restore = RestoreConfig::new("/s", "/m");
        restore.vsock_uds_path = Some("/run/w.sock".into());
        assert!(matches!(
            state.apply_overrides(&restore),
            Err(OverrideError::NoVsock)
        ));
        assert_eq!(backing(&state), ["/a.img", "tap0", "/b.img", "tap1", "rng"]);
    }

    #[test]
    fn every_fs_device_needs_a_fresh_back_end() {
        use crate::config::FsOverride;
        use crate::devices::virtio::fs::{FsConfig, FsState};
        let mut state = devices(false);
        for (slot, tag) in [(5, "a"), (6, "b")] {
            state.virtio.push(attached(
                slot,
                VirtioDeviceState::Fs(FsState {
                    config: FsConfig::new(tag, format!("/old/{tag}.sock")),
                    core: DeviceCoreState::default(),
                }),
            ));
        }
        let over = |tag: &str| FsOverride {
            tag: tag.into(),
            socket: format!("/new/{tag}.sock").into(),
        };
        let mut restore = RestoreConfig::new("/s", "/m");
        restore.fs = vec![over("b")];
        assert_eq!(
            state.apply_overrides(&restore).unwrap_err().to_string(),
            "virtio-fs \"a\" needs a fresh back end: give its socket (hearth restore \
             --fs-override a=PATH)"
        );
        restore.fs = vec![over("b"), over("a"), over("c")];
        assert_eq!(
            state.apply_overrides(&restore).unwrap_err().to_string(),
            "the snapshot has no virtio-fs device with tag \"c\""
        );
        restore.fs.pop();
        state.apply_overrides(&restore).unwrap();
        assert_eq!(backing(&state)[5..], ["a:/new/a.sock", "b:/new/b.sock"]);
    }

    /// The encoding of a `VmmState` whose vCPU list announces `count` and holds `vcpus`
    /// (encoded), with the test devices.
    fn encoded_state(count: u64, vcpus: &[u8]) -> Vec<u8> {
        let mut bytes = postcard::to_stdvec(&count).unwrap();
        bytes.extend_from_slice(vcpus);
        // The VM's five register blocks, each zero-length (read back as zeroes).
        bytes.extend_from_slice(&[0; 5]);
        bytes.extend(postcard::to_stdvec(&devices(false)).unwrap());
        bytes.push(0); // no front-end document
        bytes
    }

    /// A vCPU state whose CPUID list announces `announced` entries and holds `present`,
    /// everything zero or empty: its 12 fields are one byte each, a CPUID entry too.
    fn empty_vcpu(announced: u64, present: usize) -> Vec<u8> {
        let mut bytes = postcard::to_stdvec(&announced).unwrap();
        bytes.resize(bytes.len() + present, 0);
        bytes.extend_from_slice(&[0; 11]);
        bytes
    }

    #[test]
    fn a_hostile_state_cannot_make_a_restore_allocate_for_it() {
        let decode = |bytes: &[u8]| postcard::from_bytes::<VmmState>(bytes);
        let vcpus = |count: usize| empty_vcpu(0, 0).repeat(count);
        let max = MAX_VCPUS as usize;
        let state = decode(&encoded_state(max as u64, &vcpus(max))).unwrap();
        assert_eq!(state.vcpus.len(), max);
        assert!(state
            .vcpus
            .iter()
            .all(|v| v.msrs.is_empty() && v.regs.rip == 0));
        assert_eq!(state.devices.virtio, devices(false).virtio);
        // 12 bytes of file are 6 KiB of vCPU state: 100,000 of them would be 600 MiB.
        for count in [max + 1, 100_000] {
            assert!(decode(&encoded_state(count as u64, &vcpus(count))).is_err());
        }
        assert!(decode(&encoded_state(1 << 60, &vcpus(1))).is_err());
        // A CPUID entry is 40 bytes from 1: as many as KVM takes, no more.
        let state = decode(&encoded_state(1, &empty_vcpu(256, 256))).unwrap();
        assert_eq!(state.vcpus[0].cpuid.len(), 256);
        assert!(decode(&encoded_state(1, &empty_vcpu(257, 257))).is_err());
        assert!(decode(&encoded_state(1, &empty_vcpu(1 << 40, 300))).is_err());
    }

    /// The payload goes through the state file's encoding (postcard) intact.
    #[test]
    fn devices_state_survives_the_encoding() {
        let state = devices(true);
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: DevicesState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(backing(&back), backing(&state));
        assert_eq!(back.virtio, state.virtio);
        assert_eq!(back.serial, state.serial);
        assert_eq!(back.i8042, state.i8042);
        assert_eq!(back.cmos, state.cmos);
        assert_eq!(back.control, state.control);
    }
}
