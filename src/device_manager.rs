//! Places virtio-mmio devices: allocates each a register window and an IRQ from the
//! layout, registers the device's own queue eventfds with KVM as ioeventfds and its
//! interrupt as an irqfd, puts the transport on the MMIO bus and the device in the event
//! loop, and describes the devices to the guest both ways: `virtio_mmio.device=`
//! command-line entries and ACPI. It keeps every attached device, with its subscriber id
//! in the event loop, for the VMM to pause, resume and save, and puts saved devices back
//! where they were.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::AcpiMmioDevice;
use crate::arch::layout;
use crate::devices::bus::{lock, Bus, BusError};
use crate::devices::virtio::balloon::{Balloon, BalloonState};
use crate::devices::virtio::block::{Block, BlockState};
use crate::devices::virtio::fs::{Fs, FsState};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{Net, NetState};
use crate::devices::virtio::persist::{MmioTransportState, RestoreError};
use crate::devices::virtio::rng::{Rng, RngState};
use crate::devices::virtio::vsock::{Vsock, VsockState};
use crate::devices::virtio::{Interrupt, Pausable, VirtioDevice};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::{Vm, VmError};

/// The event loop's subscriber collection.
pub type EventLoop = EventManager<Box<dyn MutEventSubscriber>>;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("too many virtio devices (at most {0})")]
    TooManyDevices(u64),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register a queue notification with KVM")]
    IoEvent(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Irq(#[from] VmError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot add the device to the kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("device {name} is not in the event loop")]
    NotSubscribed {
        name: String,
        #[source]
        source: event_manager::Error,
    },
    #[error(
        "saved device {name} was at {saved_base:#x} IRQ {saved_irq}, but would now be at \
         {base:#x} IRQ {irq}"
    )]
    SlotMismatch {
        name: String,
        saved_base: u64,
        saved_irq: u32,
        base: u64,
        irq: u32,
    },
    #[error("cannot restore device {name}")]
    Restore {
        name: String,
        #[source]
        source: RestoreError,
    },
}

/// A saved virtio device, by type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    Block(BlockState),
    Net(NetState),
    Vsock(VsockState),
    Rng(RngState),
    /// These two last, so snapshots written before they existed read the same.
    Fs(FsState),
    Balloon(BalloonState),
}

/// One attached device, saved: where it was, its transport's registers, its own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedDeviceState {
    pub name: String,
    pub base: u64,
    pub irq: u32,
    pub transport: MmioTransportState,
    pub device: VirtioDeviceState,
}

/// Where one device landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub name: String,
    pub base: u64,
    pub irq: u32,
}

/// An attached virtio device, by type: what the VMM pauses, resumes and saves.
#[derive(Clone)]
pub enum VirtioHandle {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>),
    Vsock(Arc<Mutex<Vsock>>),
    Rng(Arc<Mutex<Rng>>),
    Fs(Arc<Mutex<Fs>>),
    Balloon(Arc<Mutex<Balloon>>),
}

impl VirtioHandle {
    fn save(&self) -> VirtioDeviceState {
        match self {
            Self::Block(device) => VirtioDeviceState::Block(lock(device).save()),
            Self::Net(device) => VirtioDeviceState::Net(lock(device).save()),
            Self::Vsock(device) => VirtioDeviceState::Vsock(lock(device).save()),
            Self::Rng(device) => VirtioDeviceState::Rng(lock(device).save()),
            Self::Fs(device) => VirtioDeviceState::Fs(lock(device).save()),
            Self::Balloon(device) => VirtioDeviceState::Balloon(lock(device).save()),
        }
    }

    /// A device rebuilt from `state`, inactive until its transport is restored.
    fn restore(state: &VirtioDeviceState) -> Result<Self, RestoreError> {
        Ok(match state {
            VirtioDeviceState::Block(state) => Block::restore(state)?.into(),
            VirtioDeviceState::Net(state) => Net::restore(state)?.into(),
            VirtioDeviceState::Vsock(state) => Vsock::restore(state)?.into(),
            VirtioDeviceState::Rng(state) => Rng::restore(state)?.into(),
            VirtioDeviceState::Fs(state) => Fs::restore(state)?.into(),
            VirtioDeviceState::Balloon(state) => Balloon::restore(state)?.into(),
        })
    }

    fn virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Self::Block(device) => device.clone(),
            Self::Net(device) => device.clone(),
            Self::Vsock(device) => device.clone(),
            Self::Rng(device) => device.clone(),
            Self::Fs(device) => device.clone(),
            Self::Balloon(device) => device.clone(),
        }
    }

    fn subscriber(&self) -> Box<dyn MutEventSubscriber> {
        match self {
            Self::Block(device) => Box::new(device.clone()),
            Self::Net(device) => Box::new(device.clone()),
            Self::Vsock(device) => Box::new(device.clone()),
            Self::Rng(device) => Box::new(device.clone()),
            Self::Fs(device) => Box::new(device.clone()),
            Self::Balloon(device) => Box::new(device.clone()),
        }
    }

    /// The device's event-loop side, to pause and resume.
    pub fn pausable(&self) -> &Mutex<dyn Pausable> {
        match self {
            Self::Block(device) => &**device,
            Self::Net(device) => &**device,
            Self::Vsock(device) => &**device,
            Self::Rng(device) => &**device,
            Self::Fs(device) => &**device,
            Self::Balloon(device) => &**device,
        }
    }
}

impl From<Block> for VirtioHandle {
    fn from(device: Block) -> Self {
        Self::Block(Arc::new(Mutex::new(device)))
    }
}

impl From<Net> for VirtioHandle {
    fn from(device: Net) -> Self {
        Self::Net(Arc::new(Mutex::new(device)))
    }
}

impl From<Vsock> for VirtioHandle {
    fn from(device: Vsock) -> Self {
        Self::Vsock(Arc::new(Mutex::new(device)))
    }
}

impl From<Fs> for VirtioHandle {
    fn from(device: Fs) -> Self {
        Self::Fs(Arc::new(Mutex::new(device)))
    }
}

impl From<Rng> for VirtioHandle {
    fn from(device: Rng) -> Self {
        Self::Rng(Arc::new(Mutex::new(device)))
    }
}

impl From<Balloon> for VirtioHandle {
    fn from(device: Balloon) -> Self {
        Self::Balloon(Arc::new(Mutex::new(device)))
    }
}

/// One device the manager placed.
pub struct AttachedDevice {
    pub slot: MmioSlot,
    /// Its subscriber in the event loop: `SubscriberOps::event_ops(subscriber)` gives the
    /// `EventOps` that pause and resume take.
    pub subscriber: SubscriberId,
    pub device: VirtioHandle,
    /// The register window, which holds the transport's state.
    pub transport: Arc<Mutex<MmioTransport>>,
}

#[derive(Default)]
pub struct MmioDeviceManager {
    devices: Vec<AttachedDevice>,
}

/// How many virtio devices one VM can have: a window and an IRQ each.
pub fn max_virtio_devices() -> usize {
    let max_by_irq = u64::from(layout::IRQ_MAX - layout::IRQ_VIRTIO_BASE + 1);
    layout::VIRTIO_MMIO_MAX_DEVICES.min(max_by_irq) as usize
}

impl MmioDeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every attached device, in the order it was attached.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// Pauses every device's event-loop side (see [`Pausable`]). Call it on the event-loop
    /// thread, between runs of `event_loop`, after the vCPUs are paused.
    pub fn pause_all(&self, event_loop: &mut EventLoop) -> Result<(), DeviceManagerError> {
        self.for_each_pausable(event_loop, |device, ops| device.pause(ops))
    }

    /// Resumes every device paused by [`Self::pause_all`]; they serve what arrived meanwhile.
    pub fn resume_all(&self, event_loop: &mut EventLoop) -> Result<(), DeviceManagerError> {
        self.for_each_pausable(event_loop, |device, ops| device.resume(ops))
    }

    fn for_each_pausable(
        &self,
        event_loop: &mut EventLoop,
        mut f: impl FnMut(&mut dyn Pausable, &mut EventOps),
    ) -> Result<(), DeviceManagerError> {
        for attached in &self.devices {
            let mut ops = event_loop
                .event_ops(attached.subscriber)
                .map_err(|source| DeviceManagerError::NotSubscribed {
                    name: attached.slot.name.clone(),
                    source,
                })?;
            f(&mut *lock(attached.device.pausable()), &mut ops);
        }
        Ok(())
    }

    /// The next free window and IRQ.
    fn allocate(&self) -> Result<(u64, u32), DeviceManagerError> {
        let index = self.devices.len() as u64;
        let max = max_virtio_devices() as u64;
        if index >= max {
            return Err(DeviceManagerError::TooManyDevices(max));
        }
        Ok((
            layout::VIRTIO_MMIO_START + index * layout::VIRTIO_MMIO_WINDOW_SIZE,
            layout::IRQ_VIRTIO_BASE + index as u32,
        ))
    }

    /// Attaches `device`: it serves its register window from vCPU threads and its queues
    /// from the event loop.
    pub fn attach_virtio(
        &mut self,
        name: &str,
        device: VirtioHandle,
        vm: &Vm,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        event_loop: &mut EventLoop,
    ) -> Result<MmioSlot, DeviceManagerError> {
        let (base, irq) = self.allocate()?;
        let slot = MmioSlot {
            name: name.to_string(),
            base,
            irq,
        };
        self.place(
            slot,
            device,
            vm,
            mmio_bus,
            event_loop,
            |virtio, interrupt| Ok(MmioTransport::new(virtio, mem.clone(), interrupt)),
        )
    }

    /// Every device's state, in attach order. Pause the devices first.
    pub fn save(&self) -> Vec<AttachedDeviceState> {
        self.devices
            .iter()
            .map(|attached| AttachedDeviceState {
                name: attached.slot.name.clone(),
                base: attached.slot.base,
                irq: attached.slot.irq,
                transport: lock(&attached.transport).save(),
                device: attached.device.save(),
            })
            .collect()
    }

    /// Rebuilds a saved device in the window and IRQ it had, which the guest knows it by:
    /// restore devices in the order [`Self::save`] listed them. The device is active again
    /// when the driver had it running.
    pub fn restore_virtio(
        &mut self,
        state: &AttachedDeviceState,
        vm: &Vm,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        event_loop: &mut EventLoop,
    ) -> Result<VirtioHandle, DeviceManagerError> {
        let (base, irq) = self.allocate()?;
        if (base, irq) != (state.base, state.irq) {
            return Err(DeviceManagerError::SlotMismatch {
                name: state.name.clone(),
                saved_base: state.base,
                saved_irq: state.irq,
                base,
                irq,
            });
        }
        let restore_err = |source| DeviceManagerError::Restore {
            name: state.name.clone(),
            source,
        };
        let device = VirtioHandle::restore(&state.device).map_err(restore_err)?;
        let slot = MmioSlot {
            name: state.name.clone(),
            base,
            irq,
        };
        self.place(
            slot,
            device.clone(),
            vm,
            mmio_bus,
            event_loop,
            |virtio, interrupt| {
                MmioTransport::restore(virtio, mem.clone(), interrupt, &state.transport)
                    .map_err(restore_err)
            },
        )?;
        Ok(device)
    }

    /// Wires `device` at `slot`: its interrupt, its queue notifications, the transport
    /// `transport` makes on the MMIO bus, its event-loop side.
    fn place(
        &mut self,
        slot: MmioSlot,
        device: VirtioHandle,
        vm: &Vm,
        mmio_bus: &mut Bus,
        event_loop: &mut EventLoop,
        transport: impl FnOnce(
            Arc<Mutex<dyn VirtioDevice>>,
            Arc<Interrupt>,
        ) -> Result<MmioTransport, DeviceManagerError>,
    ) -> Result<MmioSlot, DeviceManagerError> {
        let MmioSlot { base, irq, .. } = slot;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)?;
        let virtio = device.virtio();
        for (index, evt) in lock(&virtio).queue_events().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    index as u32,
                )
                .map_err(DeviceManagerError::IoEvent)?;
        }
        let transport = Arc::new(Mutex::new(transport(
            virtio,
            Arc::new(Interrupt::new(irqfd)),
        )?));
        mmio_bus.insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        let subscriber = event_loop.add_subscriber(device.subscriber());
        log::info!("{}: virtio-mmio at {base:#x}, IRQ {irq}", slot.name);
        self.devices.push(AttachedDevice {
            slot: slot.clone(),
            subscriber,
            device,
            transport,
        });
        Ok(slot)
    }

    /// `virtio_mmio.device=4K@0xADDR:IRQ` for each device, for kernels built with
    /// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
    pub fn add_to_cmdline(&self, cmdline: &mut Cmdline) -> Result<(), DeviceManagerError> {
        for AttachedDevice { slot, .. } in &self.devices {
            cmdline
                .add_virtio_mmio_device(
                    MMIO_WINDOW_SIZE,
                    vm_memory::GuestAddress(slot.base),
                    slot.irq,
                    None,
                )
                .map_err(DeviceManagerError::Cmdline)?;
        }
        Ok(())
    }

    /// The devices as the ACPI DSDT describes them (LNRO0005), for kernels without
    /// command-line devices, such as distribution kernels.
    pub fn acpi_devices(&self) -> Vec<AcpiMmioDevice> {
        self.devices
            .iter()
            .map(|AttachedDevice { slot, .. }| AcpiMmioDevice {
                base: slot.base,
                size: MMIO_WINDOW_SIZE,
                irq: slot.irq,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::test_util::{guest_memory, TempImage};
    use crate::devices::virtio::block::BlockConfig;

    fn slot(index: u64) -> MmioSlot {
        MmioSlot {
            name: format!("dev{index}"),
            base: layout::VIRTIO_MMIO_START + index * layout::VIRTIO_MMIO_WINDOW_SIZE,
            irq: layout::IRQ_VIRTIO_BASE + index as u32,
        }
    }

    /// Attaches `device` as `attach_virtio` does, minus what needs KVM.
    fn attach_without_kvm(
        manager: &mut MmioDeviceManager,
        device: VirtioHandle,
        event_loop: &mut EventLoop,
    ) {
        let index = manager.devices.len() as u64;
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(
            device.virtio(),
            guest_memory(),
            Arc::new(Interrupt::new(irqfd)),
        );
        manager.devices.push(AttachedDevice {
            slot: slot(index),
            subscriber: event_loop.add_subscriber(device.subscriber()),
            device,
            transport: Arc::new(Mutex::new(transport)),
        });
    }

    #[test]
    fn windows_and_irqs_are_distinct_and_bounded() {
        let image = TempImage::new(4096);
        let block = || {
            Block::new(&BlockConfig {
                path: image.path().to_owned(),
                read_only: true,
                id: None,
                rate_limiter: Default::default(),
            })
            .unwrap()
        };
        let mut event_loop = EventLoop::new().unwrap();
        let mut manager = MmioDeviceManager::new();
        let mut seen = Vec::new();
        loop {
            match manager.allocate() {
                Ok((base, irq)) => {
                    assert!(base >= layout::VIRTIO_MMIO_START);
                    assert!((layout::IRQ_VIRTIO_BASE..=layout::IRQ_MAX).contains(&irq));
                    assert!(!seen.contains(&(base, irq)));
                    assert_eq!(
                        slot(seen.len() as u64),
                        MmioSlot {
                            name: format!("dev{}", seen.len()),
                            base,
                            irq
                        }
                    );
                    seen.push((base, irq));
                    attach_without_kvm(&mut manager, block().into(), &mut event_loop);
                }
                Err(DeviceManagerError::TooManyDevices(max)) => {
                    assert_eq!(seen.len() as u64, max);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let mut cmdline = Cmdline::new(4096).unwrap();
        manager.devices.truncate(2);
        manager.add_to_cmdline(&mut cmdline).unwrap();
        let text = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            text,
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(manager.acpi_devices().len(), 2);
    }

    /// Paused devices watch nothing: their queue notifications wait in the eventfds.
    #[test]
    fn pause_and_resume_every_device() {
        let images = [TempImage::new(4096), TempImage::new(4096)];
        let mut event_loop = EventLoop::new().unwrap();
        let mut manager = MmioDeviceManager::new();
        for image in &images {
            let block = Block::new(&BlockConfig {
                path: image.path().to_owned(),
                read_only: false,
                id: None,
                rate_limiter: Default::default(),
            })
            .unwrap();
            attach_without_kvm(&mut manager, block.into(), &mut event_loop);
        }
        let kick = |manager: &MmioDeviceManager| {
            for attached in manager.devices() {
                let VirtioHandle::Block(block) = &attached.device else {
                    panic!("not a block device");
                };
                lock(block).queue_events()[0].write(1).unwrap();
            }
        };
        kick(&manager);
        assert_eq!(event_loop.run_with_timeout(0).unwrap(), 2);

        manager.pause_all(&mut event_loop).unwrap();
        assert!(manager
            .devices()
            .iter()
            .all(|d| lock(d.device.pausable()).is_paused()));
        kick(&manager);
        assert_eq!(event_loop.run_with_timeout(0).unwrap(), 0);
        manager.resume_all(&mut event_loop).unwrap();
        assert!(!lock(manager.devices()[1].device.pausable()).is_paused());
        assert_eq!(event_loop.run_with_timeout(0).unwrap(), 2);

        // A device the event loop does not know is an error, not a panic.
        let removed = manager.devices()[0].subscriber;
        event_loop.remove_subscriber(removed).unwrap();
        let error = manager.pause_all(&mut event_loop).unwrap_err();
        assert_eq!(error.to_string(), "device dev0 is not in the event loop");
    }

    /// A driver's bring-up of queue 0 (rings at `base`), up to DRIVER_OK.
    fn bring_up(transport: &Mutex<MmioTransport>, base: u32) {
        use crate::devices::bus::BusDevice as _;
        let mut transport = lock(transport);
        let mut write = |offset: u64, value: u32| transport.write(offset, &value.to_le_bytes());
        write(0x70, 1);
        write(0x70, 3);
        write(0x24, 1);
        write(0x20, 1); // VIRTIO_F_VERSION_1
        write(0x70, 0xb);
        write(0x30, 0);
        write(0x38, 8);
        write(0x80, base);
        write(0x90, base + 0x1000);
        write(0xa0, base + 0x2000);
        write(0x44, 1);
        write(0x70, 0xf);
    }

    /// Saved devices come back in their windows, in order, with the same state; those
    /// the driver was running are active again.
    #[test]
    fn saved_devices_come_back_in_their_slots() {
        let kvm = match crate::vstate::kvm::KvmContext::open() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("SKIPPED: no KVM ({e}); saved_devices_come_back_in_their_slots");
                return;
            }
        };
        let images = [TempImage::new(4096), TempImage::new(8192)];
        let mem = guest_memory();
        let saved = {
            let vm = Vm::new(&kvm).unwrap();
            let mut event_loop = EventLoop::new().unwrap();
            let mut bus = Bus::new();
            let mut manager = MmioDeviceManager::new();
            for (index, image) in images.iter().enumerate() {
                let block = Block::new(&BlockConfig {
                    path: image.path().to_owned(),
                    read_only: false,
                    id: None,
                    rate_limiter: Default::default(),
                })
                .unwrap();
                let name = format!("disk{index}");
                manager
                    .attach_virtio(&name, block.into(), &vm, &mem, &mut bus, &mut event_loop)
                    .unwrap();
            }
            let rng = Rng::new(&Default::default()).unwrap();
            manager
                .attach_virtio("rng0", rng.into(), &vm, &mem, &mut bus, &mut event_loop)
                .unwrap();
            bring_up(&manager.devices()[1].transport, 0x10000);
            bring_up(&manager.devices()[2].transport, 0x20000);
            manager.pause_all(&mut event_loop).unwrap();
            manager.save()
        };
        assert!(!saved[0].transport.device_active());
        assert!(saved[1].transport.device_active());
        assert_eq!(saved[1].base, slot(1).base);
        assert!(matches!(saved[2].device, VirtioDeviceState::Rng(_)));
        assert!(saved[2].transport.device_active());

        let vm = Vm::new(&kvm).unwrap();
        let mut event_loop = EventLoop::new().unwrap();
        let mut bus = Bus::new();
        let mut manager = MmioDeviceManager::new();
        let error = manager
            .restore_virtio(&saved[1], &vm, &mem, &mut bus, &mut event_loop)
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "saved device disk1 was at 0xd0001000 IRQ 6, but would now be at 0xd0000000 IRQ 5"
        );
        for state in &saved {
            manager
                .restore_virtio(state, &vm, &mem, &mut bus, &mut event_loop)
                .unwrap();
        }
        assert_eq!(manager.save(), saved);
        let VirtioHandle::Block(second) = &manager.devices()[1].device else {
            panic!("not a block device");
        };
        assert!(lock(second).is_activated());
        let VirtioHandle::Rng(rng) = &manager.devices()[2].device else {
            panic!("not an entropy device");
        };
        assert!(lock(rng).is_activated());
    }
}
