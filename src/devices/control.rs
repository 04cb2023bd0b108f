//! hearth's control device, a small fixed guest ABI (documented in the README):
//!
//! | where                         | access            | meaning                         |
//! |-------------------------------|-------------------|---------------------------------|
//! | MMIO `CONTROL_PAGE_START + 0` | 1-byte write 123  | boot complete (boot timer)      |
//! | MMIO `CONTROL_PAGE_START + 8` | 1-byte write N    | end the VM, hearth exits N      |
//! | port `BOOT_COMPLETE_PORT`     | 1-byte out 123    | boot complete                   |
//! | port `EXIT_PORT`              | 1-byte out N      | end the VM, hearth exits N      |
//!
//! The boot value and the MMIO address match Firecracker's boot timer, so guest images made
//! for it work unchanged. Reads return zero.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::devices::bus::{lock, BusDevice};
use crate::exit::{ExitReason, ExitSignal};

/// Value that marks boot complete.
pub const BOOT_COMPLETE_MAGIC: u8 = 123;
/// Offset of the boot-complete register in the control page.
pub const BOOT_COMPLETE_OFFSET: u64 = 0;
/// Offset of the exit register in the control page.
pub const EXIT_OFFSET: u64 = 8;

/// What a snapshot keeps of the control device: whether the guest signalled boot complete
/// (a restored guest that did is not timed again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    pub boot_completed: bool,
}

/// What the control registers act on, shared by the MMIO page and the two ports.
pub struct Control {
    exit: Arc<ExitSignal>,
    start: Instant,
    print_boot_time: bool,
    boot_completed: Mutex<Option<Instant>>,
}

impl Control {
    pub fn new(exit: Arc<ExitSignal>, start: Instant, print_boot_time: bool) -> Self {
        Self {
            exit,
            start,
            print_boot_time,
            boot_completed: Mutex::new(None),
        }
    }

    /// A control device that carries on from `state`; a boot completed before the
    /// snapshot counts as completed at `start`.
    pub fn restore(
        exit: Arc<ExitSignal>,
        start: Instant,
        print_boot_time: bool,
        state: &ControlState,
    ) -> Self {
        let control = Self::new(exit, start, print_boot_time);
        if state.boot_completed {
            *lock(&control.boot_completed) = Some(start);
        }
        control
    }

    pub fn save(&self) -> ControlState {
        ControlState {
            boot_completed: lock(&self.boot_completed).is_some(),
        }
    }

    fn boot_complete(&self, value: u8) {
        if value != BOOT_COMPLETE_MAGIC {
            return;
        }
        let mut done = lock(&self.boot_completed);
        if done.is_some() {
            return;
        }
        let now = Instant::now();
        *done = Some(now);
        let ms = now.duration_since(self.start).as_secs_f64() * 1e3;
        log::info!("guest signalled boot complete after {ms:.3} ms");
        if self.print_boot_time {
            eprintln!("hearth: boot-timer: guest boot complete after {ms:.3} ms");
        }
    }

    fn exit(&self, status: u8) {
        self.exit.request(ExitReason::GuestExit(status));
    }

    /// Time from process start to the boot-complete signal, if it came.
    pub fn boot_time(&self) -> Option<std::time::Duration> {
        lock(&self.boot_completed).map(|t| t.duration_since(self.start))
    }
}

/// The control page on the MMIO bus.
pub struct ControlPage(pub Arc<Control>);

impl BusDevice for ControlPage {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            BOOT_COMPLETE_OFFSET => self.0.boot_complete(*value),
            EXIT_OFFSET => self.0.exit(*value),
            _ => {}
        }
    }
}

/// The boot-complete port.
pub struct BootCompletePort(pub Arc<Control>);

impl BusDevice for BootCompletePort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let [value] = data {
            self.0.boot_complete(*value);
        }
    }
}

/// The exit port.
pub struct ExitPort(pub Arc<Control>);

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let [value] = data {
            self.0.exit(*value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> (Arc<ExitSignal>, Arc<Control>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let control = Arc::new(Control::new(exit.clone(), Instant::now(), false));
        (exit, control)
    }

    #[test]
    fn page_registers() {
        let (exit, control) = control();
        let mut page = ControlPage(control.clone());
        page.write(BOOT_COMPLETE_OFFSET, &[1]);
        assert!(control.boot_time().is_none(), "only the magic value counts");
        page.write(BOOT_COMPLETE_OFFSET, &[BOOT_COMPLETE_MAGIC, 0]);
        assert!(control.boot_time().is_none(), "only 1-byte writes count");
        page.write(BOOT_COMPLETE_OFFSET, &[BOOT_COMPLETE_MAGIC]);
        assert!(control.boot_time().is_some());
        page.write(4, &[9]);
        assert!(!exit.is_requested());
        page.write(EXIT_OFFSET, &[7]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestExit(7)));
    }

    #[test]
    fn ports() {
        let (exit, control) = control();
        BootCompletePort(control.clone()).write(0, &[BOOT_COMPLETE_MAGIC]);
        assert!(control.boot_time().is_some());
        ExitPort(control).write(0, &[255]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestExit(255)));
    }

    #[test]
    fn a_completed_boot_stays_completed_after_a_restore() {
        let (exit, control) = control();
        assert!(!control.save().boot_completed);
        BootCompletePort(control.clone()).write(0, &[BOOT_COMPLETE_MAGIC]);
        let state = control.save();
        assert!(state.boot_completed);
        let start = Instant::now();
        let restored = Arc::new(Control::restore(exit, start, true, &state));
        assert_eq!(restored.boot_time(), Some(std::time::Duration::ZERO));
        // A second signal is not timed (or printed) again.
        BootCompletePort(restored.clone()).write(0, &[BOOT_COMPLETE_MAGIC]);
        assert_eq!(restored.boot_time(), Some(std::time::Duration::ZERO));
    }
}
