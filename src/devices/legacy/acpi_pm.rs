//! The hardware-reduced ACPI sleep registers named in the FADT (SLEEP_CONTROL_REG and
//! SLEEP_STATUS_REG). Writing SLP_EN with sleep type 5 (the DSDT's `_S5_`) powers the VM
//! off, which is what a guest's `poweroff` does.

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// SLP_EN: bit 5 of the sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;
/// SLP_TYP: bits 2-4.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
/// The S5 (soft-off) sleep type the DSDT's `_S5_` package announces.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Offsets from the control register: control at 0, status at 1.
const CONTROL_OFFSET: u64 = 0;

pub struct AcpiSleep {
    exit: Arc<ExitSignal>,
}

impl AcpiSleep {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Never asleep, no wake status.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (CONTROL_OFFSET, [value]) = (offset, data) else {
            return;
        };
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if value & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE {
            self.exit.request(ExitReason::PowerOff);
        } else if value & SLEEP_ENABLE != 0 {
            log::warn!("guest asked for ACPI sleep type {sleep_type}, which hearth does not offer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = AcpiSleep::new(exit.clone());
        dev.write(0, &[S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT]);
        assert!(!exit.is_requested(), "SLP_EN is required");
        dev.write(0, &[SLEEP_ENABLE | (3 << SLEEP_TYPE_SHIFT)]);
        assert!(!exit.is_requested(), "only S5 ends the VM");
        dev.write(1, &[SLEEP_ENABLE | (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT)]);
        assert!(!exit.is_requested(), "the status register does not sleep");
        dev.write(0, &[SLEEP_ENABLE | (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT)]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }
}
