//! The event-loop side of virtio-vsock. The RX and TX queue eventfds are watched from
//! `init` for the device's whole life (except while paused); the watch list of host
//! sockets follows the muxer: the listening socket, and each host stream for reading (when
//! the guest can take data), writing (when bytes wait), or nothing but hang-up (while a
//! host-initiated connection waits for the guest's RESPONSE). Host streams are closed only
//! after they are unwatched. Paused, nothing is watched.

use std::collections::HashMap;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Vsock, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::Pausable;

const TOKEN_RX: u32 = 0;
const TOKEN_TX: u32 = 1;
const TOKEN_HOST: u32 = 2;

impl Vsock {
    /// Brings the epoll watch list in line with the device and the muxer.
    pub(super) fn sync_watches(&mut self, ops: &mut EventOps) {
        self.core
            .sync_queue_watches(ops, &[TOKEN_RX, TOKEN_TX], "virtio-vsock");
        let wanted = if self.core.is_paused() {
            HashMap::new()
        } else {
            self.muxer.watches()
        };
        let stale: Vec<_> = self
            .watched_host
            .keys()
            .filter(|fd| !wanted.contains_key(fd))
            .copied()
            .collect();
        for fd in stale {
            let set = self.watched_host.remove(&fd).unwrap_or(EventSet::IN);
            if let Err(e) = ops.remove(Events::with_data_raw(fd, TOKEN_HOST, set)) {
                log::warn!("virtio-vsock: cannot stop watching a host socket: {e}");
            }
        }
        // Closed only now that epoll no longer holds them.
        drop(self.muxer.take_retired());
        for (fd, set) in wanted {
            let events = Events::with_data_raw(fd, TOKEN_HOST, set);
            let result = match self.watched_host.get(&fd) {
                Some(&old) if old == set => continue,
                Some(_) => ops.modify(events),
                None => ops.add(events),
            };
            match result {
                Ok(()) => {
                    self.watched_host.insert(fd, set);
                }
                Err(e) => log::warn!("virtio-vsock: cannot watch a host socket: {e}"),
            }
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync_watches(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.core.is_paused() {
            // Left in the counters and the sockets for `resume`.
            return;
        }
        match events.data() {
            TOKEN_RX => {
                self.core.read_queue_event(RX_QUEUE);
                self.process_rx();
            }
            TOKEN_TX => {
                self.core.read_queue_event(TX_QUEUE);
                self.process_tx();
            }
            TOKEN_HOST => {
                self.muxer.host_ready(events.fd(), events.event_set());
                self.process_rx();
            }
            other => log::debug!("virtio-vsock: unexpected event token {other}"),
        }
        self.sync_watches(ops);
    }
}

impl Pausable for Vsock {
    fn pause(&mut self, ops: &mut EventOps) {
        self.core.set_paused(true);
        self.sync_watches(ops);
    }

    fn resume(&mut self, ops: &mut EventOps) {
        self.core.set_paused(false);
        self.process_tx();
        self.sync_watches(ops);
    }

    fn is_paused(&self) -> bool {
        self.core.is_paused()
    }
}

#[cfg(test)]
mod tests;
