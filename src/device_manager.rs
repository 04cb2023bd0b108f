//! Places virtio-mmio devices: allocates each a register window and an IRQ from the
//! layout, wires its queue notifications (ioeventfd) and interrupt (irqfd) through KVM,
//! puts the transport on the MMIO bus and the device in the event loop, and describes the
//! devices to the guest both ways: `virtio_mmio.device=` command-line entries and ACPI.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::AcpiMmioDevice;
use crate::arch::layout;
use crate::devices::bus::{Bus, BusError};
use crate::devices::virtio::mmio::{MmioError, MmioTransport, MMIO_WINDOW_SIZE, REG_QUEUE_NOTIFY};
use crate::devices::virtio::{Interrupt, VirtioDevice};
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
    Transport(#[from] MmioError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot add the device to the kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
}

/// Where one device landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub name: String,
    pub base: u64,
    pub irq: u32,
}

#[derive(Default)]
pub struct MmioDeviceManager {
    slots: Vec<MmioSlot>,
}

impl MmioDeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next free window and IRQ.
    fn allocate(&self) -> Result<(u64, u32), DeviceManagerError> {
        let index = self.slots.len() as u64;
        let max_by_irq = u64::from(layout::IRQ_MAX - layout::IRQ_VIRTIO_BASE + 1);
        let max = layout::VIRTIO_MMIO_MAX_DEVICES.min(max_by_irq);
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
    #[allow(clippy::too_many_arguments)]
    pub fn attach_virtio<D>(
        &mut self,
        name: &str,
        device: Arc<Mutex<D>>,
        vm: &Vm,
        mem: &GuestMemory,
        mmio_bus: &mut Bus,
        event_loop: &mut EventLoop,
    ) -> Result<MmioSlot, DeviceManagerError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let (base, irq) = self.allocate()?;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)?;
        let queue_count = crate::devices::bus::lock(&device).queue_max_sizes().len();
        let mut queue_evts = Vec::with_capacity(queue_count);
        for index in 0..queue_count {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
            vm.fd()
                .register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    index as u32,
                )
                .map_err(DeviceManagerError::IoEvent)?;
            queue_evts.push(evt);
        }
        let transport = MmioTransport::new(
            device.clone(),
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
            queue_evts,
        )?;
        mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
        event_loop.add_subscriber(Box::new(device));
        let slot = MmioSlot {
            name: name.to_string(),
            base,
            irq,
        };
        log::info!("{name}: virtio-mmio at {base:#x}, IRQ {irq}");
        self.slots.push(slot.clone());
        Ok(slot)
    }

    /// `virtio_mmio.device=4K@0xADDR:IRQ` for each device, for kernels built with
    /// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
    pub fn add_to_cmdline(&self, cmdline: &mut Cmdline) -> Result<(), DeviceManagerError> {
        for slot in &self.slots {
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
        self.slots
            .iter()
            .map(|slot| AcpiMmioDevice {
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

    #[test]
    fn windows_and_irqs_are_distinct_and_bounded() {
        let mut manager = MmioDeviceManager::new();
        let mut seen = Vec::new();
        loop {
            match manager.allocate() {
                Ok((base, irq)) => {
                    assert!(base >= layout::VIRTIO_MMIO_START);
                    assert!((layout::IRQ_VIRTIO_BASE..=layout::IRQ_MAX).contains(&irq));
                    assert!(!seen.contains(&(base, irq)));
                    seen.push((base, irq));
                    manager.slots.push(MmioSlot {
                        name: "x".into(),
                        base,
                        irq,
                    });
                }
                Err(DeviceManagerError::TooManyDevices(max)) => {
                    assert_eq!(seen.len() as u64, max);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let mut cmdline = Cmdline::new(4096).unwrap();
        manager.slots.truncate(2);
        manager.add_to_cmdline(&mut cmdline).unwrap();
        let text = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            text,
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(manager.acpi_devices().len(), 2);
    }
}
