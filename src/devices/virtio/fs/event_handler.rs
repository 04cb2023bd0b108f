//! The virtio-fs device's event-loop side: the back end's call eventfds become the
//! transport's used-ring interrupt, and the back end's socket is watched for a hang-up,
//! which marks the device broken. Pausing takes the rings back from the back end (so it
//! touches no guest memory while the VM is paused or saved) and resuming gives them back.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Fs;
use crate::devices::virtio::{DeviceState, Pausable};

/// Event data of the back end's socket; the call eventfds use their queue index.
const TOKEN_SOCKET: u32 = u32::MAX;

/// What the device has in the event loop's epoll set.
#[derive(Default)]
pub(super) struct Watches {
    calls: bool,
    /// The watched socket's fd: the back end's, or the failed one's until it is dropped.
    socket: Option<i32>,
}

impl Fs {
    fn sync_watches(&mut self, ops: &mut EventOps) {
        let paused = self.core.is_paused();
        let want_calls = !paused;
        if want_calls != self.watches.calls {
            for (index, evt) in self.call_events.iter().enumerate() {
                let events = Events::with_data(evt, index as u32, EventSet::IN);
                let result = if want_calls {
                    ops.add(events)
                } else {
                    ops.remove(events)
                };
                if let Err(e) = result {
                    log::error!("virtio-fs: cannot update the watch on call eventfd {index}: {e}");
                }
            }
            self.watches.calls = want_calls;
        }
        let want_socket = match (&self.backend, paused) {
            (Some(backend), false) => Some(backend.socket().as_raw_fd()),
            _ => None,
        };
        if want_socket != self.watches.socket {
            // The failed back end's socket is still open: its fd cannot name another file.
            if let Some(fd) = self.watches.socket.take() {
                if let Err(e) =
                    ops.remove(Events::with_data_raw(fd, TOKEN_SOCKET, EventSet::empty()))
                {
                    log::debug!("virtio-fs: the back end's socket was not watched: {e}");
                }
            }
            if let Some(backend) = &self.backend {
                if want_socket.is_some() {
                    let events =
                        Events::with_data(backend.socket(), TOKEN_SOCKET, EventSet::READ_HANG_UP);
                    match ops.add(events) {
                        Ok(()) => self.watches.socket = want_socket,
                        Err(e) => log::error!("virtio-fs: cannot watch the back end's socket: {e}"),
                    }
                }
            }
        }
        // Unwatched now, so closing it cannot disturb another watch.
        self.failed_backend = None;
    }

    /// The back end used buffers of queue `index`: raise the interrupt (the back end
    /// already applied the driver's notification suppression before signalling).
    fn on_call(&mut self, index: usize) {
        let Some(evt) = self.call_events.get(index) else {
            return;
        };
        // Non-blocking: a wake-up of our own may have been consumed already.
        if evt.read().is_err() {
            return;
        }
        if let DeviceState::Activated(active) = self.core.state() {
            active.interrupt.signal_used_queue();
        }
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync_watches(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_SOCKET => {
                let hung_up = std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the back end closed its socket",
                );
                self.mark_broken(&hung_up);
            }
            index => self.on_call(index as usize),
        }
        self.sync_watches(ops);
    }
}

impl Pausable for Fs {
    fn pause(&mut self, ops: &mut EventOps) {
        self.core.set_paused(true);
        self.stop_rings();
        self.sync_watches(ops);
    }

    fn resume(&mut self, ops: &mut EventOps) {
        self.core.set_paused(false);
        self.restart_rings();
        self.sync_watches(ops);
    }

    fn is_paused(&self) -> bool {
        self.core.is_paused()
    }
}
