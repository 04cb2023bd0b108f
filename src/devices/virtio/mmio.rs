//! The virtio-mmio transport, version 2 (virtio 1.x): one 4 KiB register window per device
//! on the MMIO bus. Everything here runs on vCPU threads; the guest controls every value
//! written, so each register access is bounded and checked.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};

use crate::devices::bus::{lock, BusDevice};
use crate::devices::virtio::persist::MmioTransportState;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::vstate::memory::GuestMemory;

/// "virt", little-endian.
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version 2: the virtio 1.x register layout.
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver ("HRTH").
const VENDOR_ID: u32 = 0x4854_5248;

const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify: KVM normally completes these writes through an ioeventfd.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Device-specific configuration space starts here.
const CONFIG_SPACE_START: u64 = 0x100;
/// Size of the register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// A virtio device behind its register window. The transport holds the register state;
/// the device holds its queues (configured from here) and the negotiated features.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// What the driver wrote, checked and handed to the device at FEATURES_OK.
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        Self {
            device,
            mem,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// The registers and the interrupt status, for a snapshot.
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
        }
    }

    /// The transport with the saved registers; `MmioTransport::restore` (persist.rs) is
    /// the whole restore.
    pub(super) fn from_state(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        state: &MmioTransportState,
    ) -> Self {
        Self {
            device,
            mem,
            interrupt,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            status: state.status,
            config_generation: state.config_generation,
        }
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Reads the selected queue's `field`; 0 when no queue is selected.
    fn selected_queue(&self, field: impl FnOnce(&Queue) -> u32) -> u32 {
        lock(&self.device)
            .queues()
            .get(self.queue_sel as usize)
            .map_or(0, field)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_config_allowed() {
            log::debug!("virtio-mmio: queue register written outside FEATURES_OK");
            return;
        }
        if let Some(queue) = lock(&self.device)
            .queues_mut()
            .get_mut(self.queue_sel as usize)
        {
            f(queue);
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue(|q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue(|q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS if lock(&self.device).needs_reset() => {
                self.status | VIRTIO_CONFIG_S_NEEDS_RESET
            }
            REG_STATUS => self.status,
            // No shared memory regions: length -1 means "none".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                // Features are fixed once FEATURES_OK was accepted.
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => self.update_queue(|q| q.set_size(value as u16)),
            REG_QUEUE_READY => self.update_queue(|q| q.set_ready(value == 1)),
            REG_QUEUE_DESC_LOW => {
                self.update_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.update_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_DRIVER_LOW => {
                self.update_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.update_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => {
                self.update_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.update_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            REG_QUEUE_NOTIFY => {
                // Only reached when the ioeventfd did not catch the write.
                if let Some(evt) = lock(&self.device).queue_events().get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => log::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    /// The device status state machine (virtio 1.x, 3.1.1).
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added, never cleared, except by a reset.
        if value & self.status != self.status {
            log::debug!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {value:#x})",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leave FEATURES_OK unset: the driver reads it back and gives up. A DRIVER_OK
            // in the same write cannot stand without it.
            self.status = value & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
            return;
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            lock(&self.device).set_acked_features(self.driver_features);
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !lock(&self.device).is_activated() {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).avail_features();
        let required = 1u64 << VIRTIO_F_VERSION_1;
        self.driver_features & !offered == 0 && self.driver_features & required != 0
    }

    fn activate(&mut self) {
        let wanted = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if self.status & wanted != wanted {
            self.fail("DRIVER_OK without the preceding status bits".into());
            return;
        }
        let result = lock(&self.device).activate(self.mem.clone(), self.interrupt.clone());
        if let Err(e) = result {
            self.fail(crate::error_chain(&e));
        }
    }

    /// Tells the driver the device cannot go on until it is reset.
    fn fail(&mut self, why: String) {
        log::warn!("virtio-mmio: device activation failed: {why}");
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        {
            let mut device = lock(&self.device);
            if device.is_activated() {
                device.reset();
            }
            device.set_acked_features(0);
            for queue in device.queues_mut() {
                queue.reset();
            }
        }
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_START {
            data.fill(0);
            lock(&self.device).read_config(offset - CONFIG_SPACE_START, data);
            return;
        }
        // Registers are 32 bits wide and naturally aligned; anything else reads as zero.
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_START {
            lock(&self.device).write_config(offset - CONFIG_SPACE_START, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, DeviceCore};
    use crate::vstate::memory::create_guest_memory;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct FakeDevice {
        core: DeviceCore,
        config: [u8; 8],
        activations: u32,
        resets: u32,
    }

    impl FakeDevice {
        fn new() -> Self {
            Self {
                core: DeviceCore::new((1 << VIRTIO_F_VERSION_1) | 0b101, &[16, 16]).unwrap(),
                config: [0; 8],
                activations: 0,
                resets: 0,
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn core(&self) -> &DeviceCore {
            &self.core
        }
        fn core_mut(&mut self) -> &mut DeviceCore {
            &mut self.core
        }
        fn config_space(&self) -> &[u8] {
            &self.config
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = self
                .config
                .get_mut(offset as usize..offset as usize + data.len())
            {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            mem: GuestMemory,
            interrupt: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            self.core.activate(mem, interrupt)?;
            self.activations += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.core.deactivate();
            self.resets += 1;
        }
    }

    struct Harness {
        transport: MmioTransport,
        device: Arc<Mutex<FakeDevice>>,
        irq: EventFd,
    }

    fn harness() -> Harness {
        let device = Arc::new(Mutex::new(FakeDevice::new()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let mem = create_guest_memory(4 << 20).unwrap();
        let transport = MmioTransport::new(device.clone(), mem, interrupt);
        Harness {
            transport,
            device,
            irq,
        }
    }

    impl Harness {
        fn read(&mut self, offset: u64) -> u32 {
            let mut data = [0u8; 4];
            self.transport.read(offset, &mut data);
            u32::from_le_bytes(data)
        }
        fn write(&mut self, offset: u64, value: u32) {
            self.transport.write(offset, &value.to_le_bytes());
        }
        /// Negotiates features and sets up both queues in valid guest memory.
        fn bring_up(&mut self, features_high: u32) {
            self.write(REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.write(
                REG_STATUS,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            );
            self.write(REG_DRIVER_FEATURES_SEL, 1);
            self.write(REG_DRIVER_FEATURES, features_high);
            self.write(REG_DRIVER_FEATURES_SEL, 0);
            self.write(REG_DRIVER_FEATURES, 0b1);
            let s =
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            self.write(REG_STATUS, s);
            for q in 0..2u32 {
                let base = 0x10000 * (q + 1);
                self.write(REG_QUEUE_SEL, q);
                self.write(REG_QUEUE_NUM, 16);
                self.write(REG_QUEUE_DESC_LOW, base);
                self.write(REG_QUEUE_DRIVER_LOW, base + 0x1000);
                self.write(REG_QUEUE_DEVICE_LOW, base + 0x2000);
                self.write(REG_QUEUE_READY, 1);
            }
        }
        fn driver_ok(&mut self) {
            let s = self.read(REG_STATUS);
            self.write(REG_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        }
    }

    #[test]
    fn identification_registers() {
        let mut h = harness();
        assert_eq!(h.read(REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(h.read(REG_VERSION), 2);
        assert_eq!(h.read(REG_DEVICE_ID), 2);
        h.write(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(h.read(REG_DEVICE_FEATURES), 1 << (VIRTIO_F_VERSION_1 - 32));
        h.write(REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(h.read(REG_DEVICE_FEATURES), 0b101);
        h.write(REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(h.read(REG_DEVICE_FEATURES), 0);
        h.write(REG_QUEUE_SEL, 1);
        assert_eq!(h.read(REG_QUEUE_NUM_MAX), 16);
        h.write(REG_QUEUE_SEL, 2);
        assert_eq!(h.read(REG_QUEUE_NUM_MAX), 0);
        assert_eq!(h.read(REG_SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn activation_and_reset() {
        let mut h = harness();
        h.bring_up(1 << (VIRTIO_F_VERSION_1 - 32));
        assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        h.driver_ok();
        {
            let dev = h.device.lock().unwrap();
            assert_eq!(dev.activations, 1);
            assert!(dev.is_activated());
            assert_eq!(dev.acked_features(), (1 << VIRTIO_F_VERSION_1) | 1);
            // The device serves the queues the driver configured.
            assert_eq!(dev.queues()[1].desc_table(), 0x20000);
            assert_eq!(dev.queues()[1].used_ring(), 0x22000);
        }
        // DRIVER_OK again does not re-activate.
        h.driver_ok();
        assert_eq!(h.device.lock().unwrap().activations, 1);
        h.write(REG_STATUS, 0);
        assert_eq!(h.read(REG_STATUS), 0);
        {
            let dev = h.device.lock().unwrap();
            assert_eq!(dev.resets, 1);
            assert!(!dev.is_activated());
            assert_eq!(dev.acked_features(), 0);
            assert!(dev
                .queues()
                .iter()
                .all(|q| !q.ready() && q.desc_table() == 0));
        }
        // The device comes up again after a reset.
        h.bring_up(1 << (VIRTIO_F_VERSION_1 - 32));
        h.driver_ok();
        assert_eq!(h.device.lock().unwrap().activations, 2);
    }

    #[test]
    fn features_without_version_1_or_unoffered_are_refused() {
        let mut h = harness();
        h.bring_up(0);
        assert_eq!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let mut h = harness();
        h.bring_up((1 << (VIRTIO_F_VERSION_1 - 32)) | 0x8000);
        assert_eq!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        h.driver_ok();
        assert_eq!(h.device.lock().unwrap().activations, 0);
    }

    #[test]
    fn refused_features_with_driver_ok_in_one_write_do_not_stick() {
        let mut h = harness();
        let all = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        // No VERSION_1 negotiated.
        h.write(REG_STATUS, all);
        assert_eq!(
            h.read(REG_STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
        );
        assert_eq!(h.device.lock().unwrap().activations, 0);
    }

    #[test]
    fn invalid_queue_is_not_activated() {
        let mut h = harness();
        h.bring_up(1 << (VIRTIO_F_VERSION_1 - 32));
        // Put queue 0's rings outside guest memory.
        h.write(REG_QUEUE_SEL, 0);
        h.write(REG_QUEUE_DESC_HIGH, 0x10);
        h.driver_ok();
        assert_eq!(h.device.lock().unwrap().activations, 0);
        assert_ne!(h.read(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(h.irq.read().unwrap(), 1);
    }

    #[test]
    fn queue_registers_ignored_outside_setup() {
        let mut h = harness();
        h.write(REG_QUEUE_SEL, 0);
        h.write(REG_QUEUE_READY, 1);
        assert_eq!(h.read(REG_QUEUE_READY), 0);
        // Out-of-range queue selection is harmless.
        h.bring_up(1 << (VIRTIO_F_VERSION_1 - 32));
        h.write(REG_QUEUE_SEL, 99);
        h.write(REG_QUEUE_READY, 1);
        h.write(REG_QUEUE_NOTIFY, 99);
        assert_eq!(h.read(REG_QUEUE_READY), 0);
    }

    /// A QueueNotify write KVM did not catch reaches the device's own queue eventfd.
    #[test]
    fn queue_notify_fallback_writes_the_device_eventfd() {
        let mut h = harness();
        h.write(REG_QUEUE_NOTIFY, 1);
        let device = h.device.lock().unwrap();
        assert!(device.queue_events()[0].read().is_err());
        assert_eq!(device.queue_events()[1].read().unwrap(), 1);
    }

    #[test]
    fn interrupt_ack_and_config_space() {
        let mut h = harness();
        h.transport.interrupt.signal_used_queue();
        assert_eq!(h.read(REG_INTERRUPT_STATUS), 1);
        h.write(REG_INTERRUPT_ACK, 1);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), 0);

        h.transport.write(CONFIG_SPACE_START + 2, &[0xab, 0xcd]);
        let mut data = [0u8; 4];
        h.transport.read(CONFIG_SPACE_START, &mut data);
        assert_eq!(data, [0, 0, 0xab, 0xcd]);
        // Past the end of the device's config: zeros, no panic.
        let mut far = [0xffu8; 8];
        h.transport.read(MMIO_WINDOW_SIZE - 4, &mut far[..4]);
        assert_eq!(far[..4], [0; 4]);
        h.transport.write(CONFIG_SPACE_START + 7, &[1, 2, 3]);
        assert_eq!(h.read(REG_CONFIG_GENERATION), 2);
        // Misaligned or narrow register accesses are ignored.
        let mut narrow = [0xffu8; 2];
        h.transport.read(REG_MAGIC_VALUE, &mut narrow);
        assert_eq!(narrow, [0, 0]);
        h.transport.write(REG_STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(h.read(REG_STATUS), 0);
    }
}
