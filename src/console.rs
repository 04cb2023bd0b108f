//! The serial console's input side, driven by the event loop: bytes from stdin or from the
//! client of the serial Unix socket go into the UART's receive FIFO. When the FIFO is full,
//! hearth stops reading its source until the guest drains it, so no input is lost and the
//! loop never spins. On an interactive terminal, Ctrl-A x quits (as in QEMU) and Ctrl-A
//! Ctrl-A sends a literal Ctrl-A.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::devices::bus::lock;
use crate::devices::legacy::serial::{InputSpace, SerialDevice, SocketSink};
use crate::exit::{ExitReason, ExitSignal};

const CTRL_A: u8 = 0x01;
const READ_CHUNK: usize = 64;

const TOKEN_SOURCE: u32 = 1;
const TOKEN_SPACE: u32 = 2;
const TOKEN_LISTENER: u32 = 3;

/// Where console input comes from.
pub enum InputSource {
    /// hearth's stdin; `interactive` enables the Ctrl-A escape.
    Stdin { interactive: bool },
    /// A listening Unix socket; one client at a time.
    Socket {
        listener: UnixListener,
        client: Option<UnixStream>,
        sink: SocketSink,
    },
}

/// Recognises Ctrl-A x in a byte stream.
#[derive(Default)]
struct Escape {
    after_ctrl_a: bool,
}

impl Escape {
    /// Appends the bytes meant for the guest to `out`; true when the quit sequence came.
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &byte in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match byte {
                    b'x' | b'X' => return true,
                    CTRL_A => out.push(CTRL_A),
                    other => out.extend_from_slice(&[CTRL_A, other]),
                }
            } else if byte == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(byte);
            }
        }
        false
    }
}

pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    space: Arc<InputSpace>,
    source: InputSource,
    exit: Arc<ExitSignal>,
    escape: Option<Escape>,
    pending: Vec<u8>,
    source_watched: bool,
}

impl ConsoleInput {
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        space: Arc<InputSpace>,
        source: InputSource,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let escape =
            matches!(source, InputSource::Stdin { interactive: true }).then(Escape::default);
        Self {
            serial,
            space,
            source,
            exit,
            escape,
            pending: Vec::new(),
            source_watched: false,
        }
    }

    fn source_fd(&self) -> Option<i32> {
        match &self.source {
            InputSource::Stdin { .. } => Some(libc::STDIN_FILENO),
            InputSource::Socket { client, .. } => client.as_ref().map(|c| c.as_raw_fd()),
        }
    }

    fn watch_source(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.source_fd() {
            match ops.add(Events::with_data_raw(fd, TOKEN_SOURCE, EventSet::IN)) {
                Ok(()) => self.source_watched = true,
                // Regular files and /dev/null cannot be polled: no interactive input then.
                Err(e) => log::debug!("console input not watched: {e}"),
            }
        }
    }

    fn unwatch_source(&mut self, ops: &mut EventOps) {
        if let (true, Some(fd)) = (self.source_watched, self.source_fd()) {
            let _ = ops.remove(Events::with_data_raw(fd, TOKEN_SOURCE, EventSet::IN));
        }
        self.source_watched = false;
    }

    /// Moves pending input into the FIFO; pauses the source while some is left.
    fn flush(&mut self, ops: &mut EventOps) {
        let taken = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..taken);
        if self.pending.is_empty() {
            if !self.source_watched {
                self.watch_source(ops);
            }
        } else if self.source_watched {
            self.unwatch_source(ops);
        }
    }

    fn read_source(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; READ_CHUNK];
        let result = match &mut self.source {
            InputSource::Stdin { .. } => {
                // Unbuffered on purpose: bytes left in a userspace buffer would never wake
                // epoll again.
                // SAFETY: reads at most `buf.len()` bytes into the local buffer.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
            InputSource::Socket { client, .. } => match client.as_mut() {
                Some(stream) => stream.read(&mut buf),
                None => Ok(0),
            },
        };
        match result {
            Ok(0) => self.source_closed(ops),
            Ok(n) => {
                let quit = match self.escape.as_mut() {
                    Some(escape) => escape.filter(&buf[..n], &mut self.pending),
                    None => {
                        self.pending.extend_from_slice(&buf[..n]);
                        false
                    }
                };
                if quit {
                    self.exit.request(ExitReason::ConsoleQuit);
                    return;
                }
                self.flush(ops);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("console input failed: {e}");
                self.source_closed(ops);
            }
        }
    }

    /// End of input: the guest keeps running without a console input. A socket console
    /// takes its next client.
    fn source_closed(&mut self, ops: &mut EventOps) {
        self.unwatch_source(ops);
        if let InputSource::Socket { client, sink, .. } = &mut self.source {
            sink.attach(None);
            if client.take().is_some() {
                self.watch_listener(ops, true);
            }
        }
    }

    /// Whether connections to the serial socket are accepted: only while it has no
    /// client. Later ones wait in the listen backlog (as with QEMU's socket consoles), so
    /// a connection never takes the console from the client that has it.
    fn watch_listener(&self, ops: &mut EventOps, on: bool) {
        let InputSource::Socket { listener, .. } = &self.source else {
            return;
        };
        let events = Events::with_data(listener, TOKEN_LISTENER, EventSet::IN);
        let result = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        if let Err(e) = result {
            log::warn!("serial socket watch: {e}");
        }
    }

    fn accept_client(&mut self, ops: &mut EventOps) {
        let InputSource::Socket { listener, .. } = &self.source else {
            return;
        };
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("serial socket accept failed: {e}");
                return;
            }
        };
        self.watch_listener(ops, false);
        self.unwatch_source(ops);
        let output = stream.try_clone().ok();
        if let InputSource::Socket { client, sink, .. } = &mut self.source {
            sink.attach(output);
            *client = Some(stream);
        }
        self.pending.clear();
        self.watch_source(ops);
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            self.space.eventfd(),
            TOKEN_SPACE,
            EventSet::IN,
        )) {
            log::warn!("console flow control unavailable: {e}");
        }
        self.watch_listener(ops, true);
        self.watch_source(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_SOURCE => {
                if events.event_set().contains(EventSet::IN) {
                    self.read_source(ops);
                } else {
                    self.source_closed(ops);
                }
            }
            TOKEN_SPACE => {
                let _ = self.space.eventfd().read();
                if !self.pending.is_empty() {
                    self.flush(ops);
                }
            }
            TOKEN_LISTENER => self.accept_client(ops),
            other => log::debug!("console: unexpected event token {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut escape = Escape::default();
        let mut out = Vec::new();
        assert!(!escape.filter(b"ab", &mut out));
        assert!(!escape.filter(&[CTRL_A, CTRL_A, CTRL_A, b'c'], &mut out));
        assert_eq!(out, [b'a', b'b', CTRL_A, CTRL_A, b'c']);
        // The sequence may be split across reads.
        assert!(!escape.filter(&[CTRL_A], &mut out));
        assert!(escape.filter(b"x", &mut out));
    }
}
