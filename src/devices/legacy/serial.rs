//! COM1: vm-superio's 16550 UART on the port I/O bus, its interrupt delivered through an
//! irqfd, its output going to one of the console sinks below.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::BusDevice;

/// Raises the UART's interrupt by writing to the eventfd KVM routes to its GSI.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the console input pump that the guest drained the receive FIFO, so input that did
/// not fit can be sent now.
pub struct InputSpace {
    evt: EventFd,
}

impl InputSpace {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.evt.write(1);
    }
}

type Uart = Serial<EventFdTrigger, Arc<InputSpace>, Box<dyn Write + Send>>;

/// What a snapshot keeps of the UART: its registers and the input the guest has not read
/// (vm-superio's `SerialState`, which has no serde support).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot restore the UART: {0}")]
    Restore(String),
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Uart,
}

impl SerialDevice {
    pub fn new(
        interrupt: EventFd,
        input_space: Arc<InputSpace>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            uart: Serial::with_events(EventFdTrigger::new(interrupt), input_space, out),
        }
    }

    /// A UART in `state`, interrupting through `interrupt`. vm-superio raises again an
    /// interrupt its identification register says is pending.
    pub fn restore(
        state: &SerialState,
        interrupt: EventFd,
        input_space: Arc<InputSpace>,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialError> {
        let uart = UartState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&uart, EventFdTrigger::new(interrupt), input_space, out)
            .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(Self { uart })
    }

    pub fn save(&self) -> SerialState {
        let uart = self.uart.state();
        SerialState {
            baud_divisor_low: uart.baud_divisor_low,
            baud_divisor_high: uart.baud_divisor_high,
            interrupt_enable: uart.interrupt_enable,
            interrupt_identification: uart.interrupt_identification,
            line_control: uart.line_control,
            line_status: uart.line_status,
            modem_control: uart.modem_control,
            modem_status: uart.modem_status,
            scratch: uart.scratch,
            in_buffer: uart.in_buffer,
        }
    }

    /// Queues guest input; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read as all ones.
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(offset)) => data[0] = self.uart.read(offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(offset)) = (data.len(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(offset, data[0]) {
                log::debug!("serial write failed: {e:?}");
            }
        }
    }
}

/// Guest output written straight to hearth's stdout, unbuffered so prompts show at once.
pub struct StdoutSink;

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        let n = out.write(buf)?;
        out.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Guest output sent to whichever client is connected to the serial Unix socket; dropped
/// while none is.
#[derive(Clone, Default)]
pub struct SocketSink {
    client: Arc<Mutex<Option<UnixStream>>>,
}

impl SocketSink {
    /// Replaces the connected client.
    pub fn attach(&self, stream: Option<UnixStream>) {
        *crate::devices::bus::lock(&self.client) = stream;
    }
}

impl Write for SocketSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut client = crate::devices::bus::lock(&self.client);
        if let Some(stream) = client.as_mut() {
            // A client that has gone or stalls is dropped rather than stalling the vCPU.
            if stream.write_all(buf).is_err() {
                *client = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared in-memory sink to look at what the guest printed.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_and_receive() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let space = Arc::new(InputSpace::new().unwrap());
        let out = Captured::default();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            space.clone(),
            Box::new(out.clone()),
        );

        // Enable the "received data" interrupt, then send input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"hi"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert_eq!(byte[0], b'h');
        dev.read(0, &mut byte);
        assert_eq!(byte[0], b'i');
        // Draining the FIFO tells the input pump there is room again.
        assert_eq!(space.eventfd().read().unwrap(), 1);

        for b in b"ok\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"ok\n");

        // Wide accesses are not UART registers.
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn full_fifo_takes_what_fits() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let space = Arc::new(InputSpace::new().unwrap());
        let mut dev = SerialDevice::new(irq, space, Box::new(io::sink()));
        let big = vec![b'x'; 1000];
        let first = dev.enqueue_input(&big);
        assert!(first > 0 && first < big.len());
        assert_eq!(dev.enqueue_input(&big), 0);
    }

    #[test]
    fn a_restored_uart_keeps_registers_and_unread_input() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let space = Arc::new(InputSpace::new().unwrap());
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            space.clone(),
            Box::new(io::sink()),
        );
        dev.write(7, &[0x42]); // scratch
        dev.write(1, &[0x01]); // receive interrupt on
        assert_eq!(dev.enqueue_input(b"xyz"), 3);
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        let state = dev.save();
        assert_eq!(state.in_buffer, b"yz");
        let _ = irq.read();

        let out = Captured::default();
        let mut restored = SerialDevice::restore(
            &state,
            irq.try_clone().unwrap(),
            space,
            Box::new(out.clone()),
        )
        .unwrap();
        assert_eq!(restored.save(), state);
        restored.read(7, &mut byte);
        assert_eq!(byte[0], 0x42);
        restored.read(0, &mut byte);
        assert_eq!(byte[0], b'y');
        restored.write(0, b"!");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");

        let overfull = SerialState {
            in_buffer: vec![0; 1000],
            ..state
        };
        let space = Arc::new(InputSpace::new().unwrap());
        assert!(SerialDevice::restore(&overfull, irq, space, Box::new(io::sink())).is_err());
    }
}
