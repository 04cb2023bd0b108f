//! `virtio_mmio_registers`: a guest driver's register accesses against
//! `hearth::devices::virtio::mmio::MmioTransport` (through `BusDevice::read`/`write`, as the
//! vCPU exit path calls it), in front of either a real virtio-blk `Block` on an in-memory
//! image (a memfd) or a small fake device with a fuzzer-chosen queue layout. The guest may
//! also write guest memory (to lay out rings and requests) and let the "event loop" run the
//! block device's queue, so a whole init sequence, requests and resets can be replayed.
//!
//! Input format:
//!
//! ```text
//! u8      device: bit 0 clear = virtio-blk (bit 1: read-only image),
//!         bit 0 set = fake device with (byte >> 2) & 3 queues, each followed by a
//!         u8 giving its maximum size 1 << (byte % 16)
//! ops     until the input ends (at most MAX_OPS), each starting with a byte b:
//!         kind = b & 7, width w = ((b >> 3) & 7) + 1
//!   0     register write: u8 r, u32 value   -> 4-byte write at (r % 64) * 4
//!   1     register read:  u8 r              -> 4-byte read at (r % 64) * 4
//!   2     raw read:  u16 offset             -> w-byte read at offset % 4096
//!   3     raw write: u16 offset, w bytes    -> w-byte write at offset % 4096
//!   4     guest memory write: u16 address, u8 n, n bytes
//!   5     event loop: the block device serves its queue; interrupts are drained
//!   6     config read:  u8 o                -> w-byte read at 0x100 + o
//!   7     config write: u8 o, w bytes       -> w-byte write at 0x100 + o
//! ```
//!
//! Accesses never cross the end of the 4 KiB window (the MMIO bus guarantees that), and are
//! 1 to 8 bytes wide like KVM's MMIO exits. Checked (beyond "no panic"): the identification
//! registers never change, an active device always has DRIVER_OK in the status, and a
//! final reset (Status = 0) always leaves status, interrupt status and device inactive.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use hearth::devices::bus::BusDevice;
use hearth::devices::virtio::block::{Block, BlockConfig};
use hearth::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use hearth::devices::virtio::{DeviceCore, Interrupt, VirtioDevice};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Input;

/// Register offsets the checks use (virtio 1.x, 4.2.2).
pub const REG_MAGIC_VALUE: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_STATUS: u64 = 0x070;
pub const CONFIG_SPACE_START: u64 = 0x100;

/// Bounds the work one input can ask for.
pub const MAX_OPS: usize = 4096;

/// Image size for the block device: 128 sectors.
pub const IMAGE_SIZE: u64 = 64 << 10;

/// A device with a fuzzer-chosen queue layout and a small writable configuration space.
struct FakeDevice {
    core: DeviceCore,
    config: [u8; 24],
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        0x2a
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
        for (i, &byte) in data.iter().enumerate() {
            let slot = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get_mut(o));
            if let Some(slot) = slot {
                *slot = byte;
            }
        }
    }
}

enum Device {
    Block(Arc<Mutex<Block>>, #[allow(dead_code)] File),
    Fake(Arc<Mutex<FakeDevice>>),
}

impl Device {
    fn is_active(&self) -> bool {
        match self {
            Device::Block(block, _) => block.lock().unwrap().is_active(),
            Device::Fake(fake) => fake.lock().unwrap().is_activated(),
        }
    }
}

/// A raw image in a memfd, reached through /proc/self/fd so `Block::new` opens (and
/// locks) it by path like a real image: no temporary files to clean up.
fn memfd_image() -> (File, String) {
    // SAFETY: a NUL-terminated name and valid flags; the fd is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"hearth-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(IMAGE_SIZE).expect("size the memfd image");
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    (file, path)
}

/// What one input did, for tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The device was active at some point.
    pub activated: bool,
    /// Status before the final reset.
    pub final_status: u32,
    /// The block device's used ring index (chains completed) before the final reset.
    pub used_idx: u16,
    /// The two bytes where the seeds put request status bytes (DATA + 0x100).
    pub status_bytes: [u8; 2],
}

fn read(transport: &mut MmioTransport, offset: u64, width: usize) -> u64 {
    let mut data = [0u8; 8];
    transport.read(offset, &mut data[..width]);
    u64::from_le_bytes(data)
}

fn write(transport: &mut MmioTransport, offset: u64, bytes: &[u8]) {
    transport.write(offset, bytes);
}

pub fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let selector = input.u8();
    let device = if selector & 1 == 0 {
        let (file, path) = memfd_image();
        let block = Block::new(&BlockConfig {
            path: path.into(),
            read_only: selector & 2 != 0,
            id: Some("fuzz".into()),
            rate_limiter: Default::default(),
        })
        .expect("open the memfd image");
        Device::Block(Arc::new(Mutex::new(block)), file)
    } else {
        let count = usize::from((selector >> 2) & 3);
        let queue_sizes: Vec<u16> = (0..count).map(|_| 1u16 << (input.u8() % 16)).collect();
        let features = (1 << VIRTIO_F_VERSION_1) | 0xf;
        Device::Fake(Arc::new(Mutex::new(FakeDevice {
            core: DeviceCore::new(features, &queue_sizes).expect("powers of two up to 32768"),
            config: [0; 24],
        })))
    };
    let dyn_device: Arc<Mutex<dyn VirtioDevice>> = match &device {
        Device::Block(block, _) => block.clone(),
        Device::Fake(fake) => fake.clone(),
    };

    let mem = crate::guest_memory();
    let irqfd = EventFd::new(EFD_NONBLOCK).expect("irqfd");
    let irq_observer = irqfd.try_clone().expect("irqfd clone");
    let interrupt = Arc::new(Interrupt::new(irqfd));
    let mut transport = MmioTransport::new(dyn_device, mem.clone(), interrupt);

    let mut outcome = Outcome::default();
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = input.u8();
        let width = usize::from((op >> 3) & 7) + 1;
        // Keep [offset, offset + width) inside the window, as the bus does.
        let clamp = |offset: u64| offset.min(MMIO_WINDOW_SIZE - width as u64);
        match op & 7 {
            0 => {
                let offset = u64::from(input.u8() % 64) * 4;
                let value = input.u32();
                write(&mut transport, offset, &value.to_le_bytes());
            }
            1 => {
                let offset = u64::from(input.u8() % 64) * 4;
                read(&mut transport, offset, 4);
            }
            2 => {
                let offset = clamp(u64::from(input.u16()) % MMIO_WINDOW_SIZE);
                read(&mut transport, offset, width);
            }
            3 => {
                let offset = clamp(u64::from(input.u16()) % MMIO_WINDOW_SIZE);
                let bytes = input.bytes(width);
                write(&mut transport, offset, bytes);
            }
            4 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                let _ = mem.write_slice(bytes, GuestAddress(addr));
            }
            5 => {
                if let Device::Block(block, _) = &device {
                    block.lock().unwrap().process_queue();
                }
                let _ = irq_observer.read();
            }
            6 => {
                let offset = clamp(CONFIG_SPACE_START + u64::from(input.u8()));
                read(&mut transport, offset, width);
            }
            _ => {
                let offset = clamp(CONFIG_SPACE_START + u64::from(input.u8()));
                let bytes = input.bytes(width);
                write(&mut transport, offset, bytes);
            }
        }

        assert_eq!(read(&mut transport, REG_MAGIC_VALUE, 4), 0x7472_6976);
        assert_eq!(read(&mut transport, REG_VERSION, 4), 2);
        assert_eq!(read(&mut transport, REG_VENDOR_ID, 4), 0x4854_5248);
        if device.is_active() {
            outcome.activated = true;
            let status = read(&mut transport, REG_STATUS, 4) as u32;
            assert_ne!(
                status & VIRTIO_CONFIG_S_DRIVER_OK,
                0,
                "device active without DRIVER_OK (status {status:#x})"
            );
        }
    }

    outcome.final_status = read(&mut transport, REG_STATUS, 4) as u32;
    if let Device::Block(..) = device {
        // Where the seeds put the used ring (tests look at it; the fuzzer may put it
        // anywhere).
        outcome.used_idx = mem
            .read_obj(GuestAddress(crate::USED_RING + 2))
            .unwrap_or_default();
        outcome.status_bytes = mem
            .read_obj(GuestAddress(crate::DATA + 0x100))
            .unwrap_or_default();
    }
    write(&mut transport, REG_STATUS, &0u32.to_le_bytes());
    assert_eq!(
        read(&mut transport, REG_STATUS, 4),
        0,
        "reset left a status"
    );
    assert_eq!(read(&mut transport, REG_INTERRUPT_STATUS, 4), 0);
    assert!(!device.is_active(), "reset left the device active");
    outcome
}
