//! Address-range buses. The vCPU loop hands every port I/O and MMIO exit to one of these;
//! devices claim ranges, so no address is hard-coded in the exit path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `offset` is relative to the start of the range the
/// device was inserted at.
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes what the guest writes at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

impl Range {
    fn end(&self) -> u64 {
        self.base + self.len
    }
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, (Range, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let range = Range { base, len };
        // The only candidates for overlap are the neighbours on either side.
        let before = self.devices.range(..=base).next_back();
        let after = self.devices.range(base..).next();
        for (_, (other, _)) in before.into_iter().chain(after) {
            if other.base < range.end() && range.base < other.end() {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other: other.base,
                });
            }
        }
        self.devices.insert(base, (range, device));
        Ok(())
    }

    /// The device covering the whole access `[addr, addr + size)`, with the offset into it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let (_, (range, device)) = self.devices.range(..=addr).next_back()?;
        let end = addr.checked_add(size as u64)?;
        (end <= range.end()).then(|| (device, addr - range.base))
    }

    /// Dispatches a read; returns false when no device claims the address (the caller
    /// decides what unclaimed reads return).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: device state stays usable and a
/// panicking device thread has already been reported.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 0x10).unwrap();

        assert!(bus.write(0x3fa, &[7]));
        assert!(bus.write(0x40f, &[9]));
        assert!(!bus.write(0x3f7, &[1]));
        assert!(!bus.write(0x410, &[1]));
        // An access running past the end of a range is not the device's.
        assert!(!bus.write(0x3ff, &[1, 2]));
        assert_eq!(a.lock().unwrap().writes, vec![(2, vec![7])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0xf, vec![9])]);

        let mut data = [0u8; 2];
        assert!(bus.read(0x404, &mut data));
        assert_eq!(data, [4, 4]);
        assert!(!bus.read(0x500, &mut data));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x80, 0x100),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(dev(), 0x110, 1).is_ok());
        assert!(bus.insert(dev(), 0xf0, 0x10).is_ok());
        assert!(matches!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
