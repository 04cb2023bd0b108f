//! Just enough of the i8042 keyboard controller for a guest to reboot: the "pulse reset
//! line" command (0xFE on the command port) ends the VM. There is no keyboard behind it.

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Offset of the command/status port from the data port (0x64 - 0x60).
const COMMAND_OFFSET: u64 = 4;
/// Command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
/// Command: read the controller configuration byte.
const CMD_READ_CONFIG: u8 = 0x20;
/// Status: a byte waits in the output buffer.
const STATUS_OUTPUT_FULL: u8 = 0x01;
/// Status: the last write was a command (the "system flag" is also set after POST).
const STATUS_SYSTEM_FLAG: u8 = 0x04;

pub struct I8042 {
    exit: Arc<ExitSignal>,
    output: Option<u8>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit, output: None }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.output.take().unwrap_or(0),
            COMMAND_OFFSET => {
                STATUS_SYSTEM_FLAG
                    | if self.output.is_some() {
                        STATUS_OUTPUT_FULL
                    } else {
                        0
                    }
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != COMMAND_OFFSET || data.len() != 1 {
            return;
        }
        match data[0] {
            CMD_RESET_CPU => self.exit.request(ExitReason::Reset),
            // Configuration: translation and system flag set, no interrupts, no ports.
            CMD_READ_CONFIG => self.output = Some(0x44),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        let mut status = [0u8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & STATUS_OUTPUT_FULL, 0);
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(
            !exit.is_requested(),
            "0xFE on the data port is not a command"
        );
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn config_byte_is_readable() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
        let mut byte = [0u8];
        dev.read(COMMAND_OFFSET, &mut byte);
        assert_ne!(byte[0] & STATUS_OUTPUT_FULL, 0);
        dev.read(0, &mut byte);
        assert_eq!(byte[0], 0x44);
        dev.read(COMMAND_OFFSET, &mut byte);
        assert_eq!(byte[0] & STATUS_OUTPUT_FULL, 0);
    }
}
