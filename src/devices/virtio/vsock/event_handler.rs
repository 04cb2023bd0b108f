//! The event-loop side of virtio-vsock. The vCPU side (activate, reset) only swaps the
//! device state and writes the activation eventfd; here the watch list follows the device
//! and the muxer: the RX and TX queue eventfds while active, the listening socket, and each
//! host stream for reading (when the guest can take data), writing (when bytes wait), or
//! nothing but hang-up (while a host-initiated connection waits for the guest's RESPONSE).
//! Host streams and queue eventfds are closed only after they are unwatched.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX: u32 = 1;
const TOKEN_TX: u32 = 2;
const TOKEN_HOST: u32 = 3;

impl Vsock {
    /// Brings the epoll watch list in line with the device and the muxer.
    pub(super) fn sync_watches(&mut self, ops: &mut EventOps) {
        let current = self
            .active
            .as_ref()
            .map(|active| (active.rx.notify.as_raw_fd(), active.tx.notify.as_raw_fd()));
        if let Some((rx, tx)) = self.watched_queues {
            if Some((rx, tx)) != current {
                for (fd, token) in [(rx, TOKEN_RX), (tx, TOKEN_TX)] {
                    if let Err(e) = ops.remove(Events::with_data_raw(fd, token, EventSet::IN)) {
                        log::warn!("virtio-vsock: cannot stop watching a queue: {e}");
                    }
                }
                self.watched_queues = None;
            }
        }
        // Out of epoll now (or never in it): the old duplicates may close.
        self.retired_notify.clear();
        if let (None, Some((rx, tx))) = (self.watched_queues, current) {
            for (fd, token) in [(rx, TOKEN_RX), (tx, TOKEN_TX)] {
                if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                    log::error!("virtio-vsock: cannot watch a queue, vsock stalls: {e}");
                }
            }
            self.watched_queues = current;
        }

        let wanted = self.muxer.watches();
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

    fn queue_notified(&mut self, token: u32) {
        let Some(active) = &self.active else {
            return;
        };
        // Only read when epoll reported it readable, so this never blocks.
        if token == TOKEN_RX {
            let _ = active.rx.notify.read();
            self.process_rx();
        } else {
            let _ = active.tx.notify.read();
            self.process_tx();
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("virtio-vsock: cannot watch the device's activation: {e}");
        }
        self.sync_watches(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_watches(ops);
                // The driver may have queued packets before the queues were watched.
                self.process_tx();
            }
            TOKEN_RX | TOKEN_TX => self.queue_notified(events.data()),
            TOKEN_HOST => {
                self.muxer.host_ready(events.fd(), events.event_set());
                self.process_rx();
            }
            other => log::debug!("virtio-vsock: unexpected event token {other}"),
        }
        self.sync_watches(ops);
    }
}

#[cfg(test)]
mod tests;
