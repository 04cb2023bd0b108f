//! The i8042 keyboard controller with a PS/2 keyboard behind it, as much as a guest's
//! i8042 and atkbd drivers use: the controller commands (configuration byte, self tests,
//! port enable/disable, output port), keyboard commands answered with ACKs (identify,
//! reset, LEDs, scancode set, scanning on/off), and keystrokes. The API's
//! `SendCtrlAltDel` types Ctrl+Alt+Del here: press and release scancodes, translated to
//! set 1 when the configuration byte asks for translation (as Linux leaves it), and
//! IRQ 1 for each byte while the keyboard interrupt is enabled.
//!
//! "Pulse reset line" (0xFE on the command port) and a write of the output port with the
//! reset bit clear end the VM, so `reboot=k` works. There is no auxiliary (mouse) port:
//! its commands get no answer, which a guest reads as "no mouse".

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Offset of the command/status port from the data port (0x64 - 0x60).
const COMMAND_OFFSET: u64 = 4;

// Controller commands (written to 0x64).
const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KEYBOARD_TEST: u8 = 0xab;
const CMD_DISABLE_KEYBOARD: u8 = 0xad;
const CMD_ENABLE_KEYBOARD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KEYBOARD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;

// Status register bits (read from 0x64).
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_KEYBOARD_UNLOCKED: u8 = 0x10;

// Configuration byte bits.
const CONFIG_KEYBOARD_INTERRUPT: u8 = 0x01;
const CONFIG_SYSTEM_FLAG: u8 = 0x04;
const CONFIG_AUX_DISABLED: u8 = 0x20;
const CONFIG_KEYBOARD_DISABLED: u8 = 0x10;
const CONFIG_TRANSLATE: u8 = 0x40;
/// After POST: system flag, translation, no interrupts (the guest enables them).
const INITIAL_CONFIG: u8 = CONFIG_SYSTEM_FLAG | CONFIG_TRANSLATE;

/// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;
const INITIAL_OUTPUT_PORT: u8 = 0x03;

// Keyboard commands (written to 0x60) and answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// What an MF2 keyboard answers to "identify", after the ACK.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Bytes the keyboard holds for the guest (a real one buffers 16 keys or so); more
/// keystrokes than this are refused rather than queued without bound.
const KEYBOARD_BUFFER: usize = 32;

/// Ctrl, Alt and Delete pressed, then released in reverse order, in scancode set 2.
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // make: Ctrl, Alt, Delete (extended)
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // break: Delete, Alt, Ctrl
];
/// The same keys in set 1, as the controller translates them.
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("the guest's keyboard buffer is full (the guest is not reading its keyboard)")]
    BufferFull,
    #[error("the guest has disabled its keyboard")]
    KeyboardDisabled,
    #[error("the saved i8042 state is invalid: {0}")]
    BadState(String),
}

/// A controller command waiting for its data byte on port 0x60.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingWrite {
    Config,
    OutputPort,
    KeyboardBuffer,
    /// Data for the absent auxiliary port: dropped.
    Aux,
}

/// What a snapshot keeps of the controller and its keyboard: registers, the command in
/// progress and the bytes the guest has not read yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub config: u8,
    pub output_port: u8,
    pub last_was_command: bool,
    pub pending: Option<PendingWrite>,
    pub controller_out: Vec<u8>,
    pub keyboard_out: Vec<u8>,
    pub keyboard_command: Option<u8>,
    pub scanning: bool,
    pub scancode_set: u8,
}

pub struct I8042 {
    exit: Arc<ExitSignal>,
    /// IRQ 1 (an irqfd); `None` in tests that only poll.
    irq: Option<EventFd>,
    config: u8,
    output_port: u8,
    last_was_command: bool,
    pending: Option<PendingWrite>,
    /// Answers of the controller itself; read before keyboard bytes.
    controller_out: VecDeque<u8>,
    /// Bytes from the keyboard: answers to its commands and scancodes.
    keyboard_out: VecDeque<u8>,
    /// A keyboard command waiting for its parameter byte.
    keyboard_command: Option<u8>,
    scanning: bool,
    scancode_set: u8,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>, irq: Option<EventFd>) -> Self {
        Self {
            exit,
            irq,
            config: INITIAL_CONFIG,
            output_port: INITIAL_OUTPUT_PORT,
            last_was_command: false,
            pending: None,
            controller_out: VecDeque::new(),
            keyboard_out: VecDeque::new(),
            keyboard_command: None,
            scanning: true,
            scancode_set: 2,
        }
    }

    pub fn save(&self) -> I8042State {
        I8042State {
            config: self.config,
            output_port: self.output_port,
            last_was_command: self.last_was_command,
            pending: self.pending,
            controller_out: self.controller_out.iter().copied().collect(),
            keyboard_out: self.keyboard_out.iter().copied().collect(),
            keyboard_command: self.keyboard_command,
            scanning: self.scanning,
            scancode_set: self.scancode_set,
        }
    }

    /// The saved controller. Bytes waiting for the guest were already signalled (the
    /// interrupt controllers' saved state holds that), so none is signalled again.
    pub fn restore(
        exit: Arc<ExitSignal>,
        irq: Option<EventFd>,
        state: &I8042State,
    ) -> Result<Self, I8042Error> {
        if state.keyboard_out.len() > KEYBOARD_BUFFER {
            return Err(I8042Error::BadState(format!(
                "{} keyboard bytes buffered, at most {KEYBOARD_BUFFER} fit",
                state.keyboard_out.len()
            )));
        }
        if !(1..=3).contains(&state.scancode_set) {
            return Err(I8042Error::BadState(format!(
                "scancode set {}",
                state.scancode_set
            )));
        }
        Ok(Self {
            exit,
            irq,
            config: state.config,
            output_port: state.output_port,
            last_was_command: state.last_was_command,
            pending: state.pending,
            controller_out: state.controller_out.iter().copied().collect(),
            keyboard_out: state.keyboard_out.iter().copied().collect(),
            keyboard_command: state.keyboard_command,
            scanning: state.scanning,
            scancode_set: state.scancode_set,
        })
    }

    /// Types Ctrl+Alt+Del: press and release, in the scancodes the guest expects.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if !self.scanning {
            return Err(I8042Error::KeyboardDisabled);
        }
        let bytes: &[u8] = if self.config & CONFIG_TRANSLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if self.keyboard_out.len() + bytes.len() > KEYBOARD_BUFFER {
            return Err(I8042Error::BufferFull);
        }
        self.keyboard_send(bytes);
        Ok(())
    }

    /// Queues bytes from the keyboard and interrupts the guest if it wants to hear.
    fn keyboard_send(&mut self, bytes: &[u8]) {
        let was_empty = self.keyboard_out.is_empty();
        let room = KEYBOARD_BUFFER.saturating_sub(self.keyboard_out.len());
        self.keyboard_out.extend(bytes.iter().take(room));
        if was_empty {
            self.interrupt();
        }
    }

    fn interrupt(&self) {
        if self.config & CONFIG_KEYBOARD_INTERRUPT == 0 || self.keyboard_out.is_empty() {
            return;
        }
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.write(1) {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.controller_out.pop_front() {
            return byte;
        }
        match self.keyboard_out.pop_front() {
            Some(byte) => {
                // The next byte moves into the output buffer and interrupts again.
                self.interrupt();
                byte
            }
            None => 0,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_KEYBOARD_UNLOCKED;
        if !self.controller_out.is_empty() || !self.keyboard_out.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.config & CONFIG_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        self.pending = None;
        let reply = |dev: &mut Self, byte: u8| dev.controller_out.push_back(byte);
        match command {
            CMD_READ_CONFIG => reply(self, self.config),
            CMD_WRITE_CONFIG => self.pending = Some(PendingWrite::Config),
            CMD_DISABLE_AUX => self.config |= CONFIG_AUX_DISABLED,
            CMD_ENABLE_AUX => self.config &= !CONFIG_AUX_DISABLED,
            CMD_SELF_TEST => reply(self, SELF_TEST_PASSED),
            CMD_KEYBOARD_TEST => reply(self, INTERFACE_TEST_PASSED),
            CMD_DISABLE_KEYBOARD => self.config |= CONFIG_KEYBOARD_DISABLED,
            CMD_ENABLE_KEYBOARD => self.config &= !CONFIG_KEYBOARD_DISABLED,
            CMD_READ_OUTPUT_PORT => reply(self, self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.pending = Some(PendingWrite::OutputPort),
            CMD_WRITE_KEYBOARD_BUFFER => self.pending = Some(PendingWrite::KeyboardBuffer),
            CMD_WRITE_AUX_BUFFER | CMD_WRITE_AUX => self.pending = Some(PendingWrite::Aux),
            CMD_RESET_CPU => self.exit.request(ExitReason::Reset),
            other => log::debug!("i8042: ignored controller command {other:#04x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.last_was_command = false;
        match self.pending.take() {
            Some(PendingWrite::Config) => {
                self.config = byte;
                self.interrupt();
            }
            Some(PendingWrite::OutputPort) => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_RESET_LINE == 0 {
                    self.exit.request(ExitReason::Reset);
                }
            }
            Some(PendingWrite::KeyboardBuffer) => self.keyboard_send(&[byte]),
            Some(PendingWrite::Aux) => {}
            None => self.keyboard_command(byte),
        }
    }

    /// A byte for the keyboard itself.
    fn keyboard_command(&mut self, byte: u8) {
        if let Some(command) = self.keyboard_command.take() {
            // The parameter of LEDs, typematic rate or scancode set.
            if command == KBD_SCANCODE_SET {
                match byte {
                    0 => return self.keyboard_send(&[KBD_ACK, self.scancode_set]),
                    1..=3 => self.scancode_set = byte,
                    _ => {}
                }
            }
            return self.keyboard_send(&[KBD_ACK]);
        }
        match byte {
            KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCANCODE_SET => {
                self.keyboard_command = Some(byte);
                self.keyboard_send(&[KBD_ACK]);
            }
            KBD_ECHO => self.keyboard_send(&[KBD_ECHO]),
            KBD_IDENTIFY => self.keyboard_send(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_ENABLE => {
                self.scanning = true;
                self.keyboard_send(&[KBD_ACK]);
            }
            KBD_DISABLE | KBD_DEFAULTS => {
                self.keyboard_out.clear();
                self.scanning = byte == KBD_DEFAULTS;
                self.scancode_set = 2;
                self.keyboard_send(&[KBD_ACK]);
            }
            KBD_RESET => {
                self.keyboard_out.clear();
                self.scanning = true;
                self.scancode_set = 2;
                self.keyboard_send(&[KBD_ACK, KBD_SELF_TEST_PASSED]);
            }
            // Other commands (scan set 3 key types, resend) only need acknowledging.
            _ => self.keyboard_send(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else {
            return;
        };
        match offset {
            0 => self.write_data(*byte),
            COMMAND_OFFSET => self.command(*byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    fn device() -> (I8042, Arc<ExitSignal>, EventFd) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::new(exit.clone(), Some(irq.try_clone().unwrap()));
        (dev, exit, irq)
    }

    fn inb(dev: &mut I8042, offset: u64) -> u8 {
        let mut byte = [0u8];
        dev.read(offset, &mut byte);
        byte[0]
    }

    fn outb(dev: &mut I8042, offset: u64, value: u8) {
        dev.write(offset, &[value]);
    }

    /// Everything the guest can read now, polling like a driver.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut bytes = Vec::new();
        while inb(dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0 {
            bytes.push(inb(dev, 0));
        }
        bytes
    }

    fn interrupts(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
    }

    #[test]
    fn reset_command_and_output_port_end_the_vm() {
        let (mut dev, exit, _) = device();
        assert_eq!(inb(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        outb(&mut dev, 0, CMD_RESET_CPU);
        assert!(
            !exit.is_requested(),
            "0xFE on the data port is a keyboard byte"
        );
        outb(&mut dev, COMMAND_OFFSET, CMD_RESET_CPU);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));

        let (mut dev, exit, _) = device();
        outb(&mut dev, COMMAND_OFFSET, CMD_READ_OUTPUT_PORT);
        assert_eq!(drain(&mut dev), [INITIAL_OUTPUT_PORT]);
        outb(&mut dev, COMMAND_OFFSET, CMD_WRITE_OUTPUT_PORT);
        outb(&mut dev, 0, INITIAL_OUTPUT_PORT & !OUTPUT_PORT_RESET_LINE);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn linux_probe_sequence() {
        // What Linux's i8042 driver does at probe: flush, self test, read and write the
        // configuration byte, test the keyboard port, enable it with its interrupt.
        let (mut dev, exit, irq) = device();
        assert!(drain(&mut dev).is_empty());
        outb(&mut dev, COMMAND_OFFSET, CMD_SELF_TEST);
        assert_ne!(inb(&mut dev, COMMAND_OFFSET) & STATUS_LAST_WAS_COMMAND, 0);
        assert_eq!(drain(&mut dev), [SELF_TEST_PASSED]);
        outb(&mut dev, COMMAND_OFFSET, CMD_READ_CONFIG);
        assert_eq!(drain(&mut dev), [INITIAL_CONFIG]);
        outb(&mut dev, COMMAND_OFFSET, CMD_KEYBOARD_TEST);
        assert_eq!(drain(&mut dev), [INTERFACE_TEST_PASSED]);
        outb(&mut dev, COMMAND_OFFSET, CMD_DISABLE_AUX);
        outb(&mut dev, COMMAND_OFFSET, CMD_WRITE_CONFIG);
        outb(&mut dev, 0, INITIAL_CONFIG | CONFIG_KEYBOARD_INTERRUPT);
        outb(&mut dev, COMMAND_OFFSET, CMD_READ_CONFIG);
        assert_eq!(
            drain(&mut dev),
            [INITIAL_CONFIG | CONFIG_KEYBOARD_INTERRUPT]
        );
        assert_eq!(interrupts(&irq), 0, "controller answers do not interrupt");
        // The aux port is absent: its data goes nowhere.
        outb(&mut dev, COMMAND_OFFSET, CMD_WRITE_AUX);
        outb(&mut dev, 0, KBD_RESET);
        assert!(drain(&mut dev).is_empty());
        assert!(!exit.is_requested());
    }

    #[test]
    fn atkbd_commands_are_acknowledged_with_interrupts() {
        let (mut dev, _, irq) = device();
        outb(&mut dev, COMMAND_OFFSET, CMD_WRITE_CONFIG);
        outb(&mut dev, 0, INITIAL_CONFIG | CONFIG_KEYBOARD_INTERRUPT);
        outb(&mut dev, 0, KBD_IDENTIFY);
        assert_eq!(interrupts(&irq), 1);
        assert_eq!(inb(&mut dev, 0), KBD_ACK);
        assert_eq!(interrupts(&irq), 1, "each byte interrupts when it moves in");
        assert_eq!(drain(&mut dev), KBD_ID);
        outb(&mut dev, 0, KBD_SCANCODE_SET);
        outb(&mut dev, 0, 0);
        assert_eq!(drain(&mut dev), [KBD_ACK, KBD_ACK, 2]);
        outb(&mut dev, 0, KBD_SET_LEDS);
        outb(&mut dev, 0, 0x07);
        outb(&mut dev, 0, KBD_ECHO);
        assert_eq!(drain(&mut dev), [KBD_ACK, KBD_ACK, KBD_ECHO]);
        outb(&mut dev, 0, KBD_RESET);
        assert_eq!(drain(&mut dev), [KBD_ACK, KBD_SELF_TEST_PASSED]);
        outb(&mut dev, COMMAND_OFFSET, CMD_WRITE_KEYBOARD_BUFFER);
        outb(&mut dev, 0, 0x1c);
        assert_eq!(drain(&mut dev), [0x1c]);
    }

    #[test]
    fn ctrl_alt_del_follows_translation() {
        let (mut dev, _, irq) = device();
        // Polling guest, translation on (the power-on configuration): set 1, no IRQ.
        dev.send_ctrl_alt_del().unwrap();
        assert_eq!(interrupts(&irq), 0);
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET1);

        // A guest that turned translation off and the interrupt on gets set 2 and IRQ 1.
        outb(&mut dev, COMMAND_OFFSET, CMD_WRITE_CONFIG);
        outb(&mut dev, 0, CONFIG_SYSTEM_FLAG | CONFIG_KEYBOARD_INTERRUPT);
        dev.send_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        let mut irqs = 0;
        loop {
            irqs += interrupts(&irq);
            if inb(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL == 0 {
                break;
            }
            got.push(inb(&mut dev, 0));
        }
        assert_eq!(got, CTRL_ALT_DEL_SET2);
        assert_eq!(
            irqs,
            CTRL_ALT_DEL_SET2.len() as u64,
            "one interrupt per byte"
        );
    }

    #[test]
    fn keystrokes_are_bounded_and_need_scanning() {
        let (mut dev, _, _) = device();
        for _ in 0..KEYBOARD_BUFFER / CTRL_ALT_DEL_SET1.len() {
            dev.send_ctrl_alt_del().unwrap();
        }
        assert!(matches!(
            dev.send_ctrl_alt_del(),
            Err(I8042Error::BufferFull)
        ));
        assert_eq!(drain(&mut dev).len(), KEYBOARD_BUFFER);
        outb(&mut dev, 0, KBD_DISABLE);
        assert_eq!(drain(&mut dev), [KBD_ACK]);
        assert!(matches!(
            dev.send_ctrl_alt_del(),
            Err(I8042Error::KeyboardDisabled)
        ));
        outb(&mut dev, 0, KBD_ENABLE);
        assert_eq!(drain(&mut dev), [KBD_ACK]);
        dev.send_ctrl_alt_del().unwrap();
    }

    #[test]
    fn controller_answers_come_before_keyboard_bytes() {
        let (mut dev, _, _) = device();
        dev.send_ctrl_alt_del().unwrap();
        outb(&mut dev, COMMAND_OFFSET, CMD_READ_CONFIG);
        assert_eq!(inb(&mut dev, 0), INITIAL_CONFIG);
        assert_eq!(inb(&mut dev, 0), CTRL_ALT_DEL_SET1[0]);
        // Multi-byte and odd offsets do nothing.
        dev.write(0, &[1, 2]);
        let mut byte = [0u8];
        dev.read(1, &mut byte);
        assert_eq!(byte[0], 0xff);
    }

    #[test]
    fn a_restored_controller_goes_on_where_it_was() {
        let (mut dev, _, irq) = device();
        // Scancode set 1 chosen, a config write waiting for its byte, unread keystrokes.
        outb(&mut dev, 0, KBD_SCANCODE_SET);
        outb(&mut dev, 0, 1);
        assert_eq!(drain(&mut dev), [KBD_ACK, KBD_ACK]);
        dev.send_ctrl_alt_del().unwrap();
        outb(&mut dev, COMMAND_OFFSET, CMD_WRITE_CONFIG);
        let state = dev.save();
        let _ = interrupts(&irq);

        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut restored = I8042::restore(exit, Some(irq.try_clone().unwrap()), &state).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(interrupts(&irq), 0, "nothing is signalled twice");
        outb(&mut restored, 0, INITIAL_CONFIG | CONFIG_KEYBOARD_INTERRUPT);
        assert_eq!(
            interrupts(&irq),
            1,
            "the pending config write took the byte"
        );
        assert_eq!(drain(&mut restored), CTRL_ALT_DEL_SET1);
        outb(&mut restored, 0, KBD_SCANCODE_SET);
        outb(&mut restored, 0, 0);
        assert_eq!(drain(&mut restored), [KBD_ACK, KBD_ACK, 1]);

        let exit = Arc::new(ExitSignal::new().unwrap());
        let bad = I8042State {
            scancode_set: 9,
            ..state
        };
        assert_eq!(
            I8042::restore(exit, None, &bad).err().unwrap().to_string(),
            "the saved i8042 state is invalid: scancode set 9"
        );
    }
}
