//! The event-loop side of virtio-net. The vCPU side (activate, reset) only swaps the
//! device state and writes the wake eventfd; here the watch list follows it: the two queue
//! eventfds while the device is active, and the tap while a frame can be taken from it
//! (not while one waits for RX buffers, so a slow guest costs no busy loop and no frames).

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;

const TOKEN_WAKE: u32 = 0;
const TOKEN_TAP: u32 = 1;
const TOKEN_RX: u32 = 2;
const TOKEN_TX: u32 = 3;

impl Net {
    /// Brings the epoll watch list in line with the device state.
    fn sync_watches(&mut self, ops: &mut EventOps) {
        let current = self
            .active
            .as_ref()
            .map(|active| (active.rx.notify.as_raw_fd(), active.tx.notify.as_raw_fd()));
        if let Some((rx, tx)) = self.registered_queues {
            if Some((rx, tx)) != current {
                for (fd, token) in [(rx, TOKEN_RX), (tx, TOKEN_TX)] {
                    if let Err(e) = ops.remove(Events::with_data_raw(fd, token, EventSet::IN)) {
                        log::warn!("virtio-net: cannot stop watching a queue: {e}");
                    }
                }
                self.registered_queues = None;
            }
        }
        // Out of epoll now (or never in it): the old duplicates may close.
        self.retired.clear();

        if let (None, Some((rx, tx))) = (self.registered_queues, current) {
            for (fd, token) in [(rx, TOKEN_RX), (tx, TOKEN_TX)] {
                if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                    log::error!(
                        "virtio-net: cannot watch a queue, the guest's network stalls: {e}"
                    );
                }
            }
            self.registered_queues = current;
        }

        let want_tap = self.wants_tap();
        if want_tap != self.tap_watched {
            let events = Events::with_data(&self.tap, TOKEN_TAP, EventSet::IN);
            let result = if want_tap {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            match result {
                Ok(()) => self.tap_watched = want_tap,
                Err(e) => {
                    log::error!(
                        "virtio-net: cannot watch tap device \"{}\": {e}",
                        self.tap_name()
                    );
                    self.tap_failed = true;
                }
            }
        }
    }

    /// A queue notification: which queue, unless it comes from a previous activation.
    fn queue_notified(&mut self, fd: i32) -> Option<u32> {
        let active = self.active.as_ref()?;
        let token = if fd == active.rx.notify.as_raw_fd() {
            let _ = active.rx.notify.read();
            TOKEN_RX
        } else if fd == active.tx.notify.as_raw_fd() {
            let _ = active.tx.notify.read();
            TOKEN_TX
        } else {
            return None;
        };
        Some(token)
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.wake, TOKEN_WAKE, EventSet::IN)) {
            log::error!("virtio-net: cannot watch the device's activation: {e}");
        }
        self.sync_watches(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_WAKE => {
                let _ = self.wake.read();
                self.sync_watches(ops);
                // The driver may have queued work before the queues were watched.
                self.process_tx();
                self.process_rx();
            }
            TOKEN_TAP => {
                let set = events.event_set();
                if set.contains(EventSet::IN) {
                    self.process_rx();
                } else if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    log::error!(
                        "virtio-net: tap device \"{}\" failed, the guest receives no more",
                        self.tap_name()
                    );
                    self.tap_failed = true;
                }
            }
            TOKEN_RX | TOKEN_TX => match self.queue_notified(events.fd()) {
                Some(TOKEN_RX) => self.process_rx(),
                Some(_) => self.process_tx(),
                // A stale registration; the sync below removes it.
                None => {}
            },
            other => log::debug!("virtio-net: unexpected event token {other}"),
        }
        self.sync_watches(ops);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::super::device::tests::{add_chain, memory, used_entries, WRITE};
    use super::super::header::VNET_HDR_LEN;
    use super::super::tap::test_netns::*;
    use super::super::NetConfig;
    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::{ActiveQueue, Interrupt, VirtioDevice};
    use crate::vstate::memory::GuestMemory;

    type Loop = EventManager<Arc<Mutex<Net>>>;

    /// Runs the event loop until `done` holds, for at most about two seconds.
    fn run_until(manager: &mut Loop, mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..100 {
            if done() {
                return true;
            }
            manager.run_with_timeout(20).unwrap();
        }
        done()
    }

    /// The test frames (header included) in the used RX buffers (buffer `i` is at
    /// `base + i * 0x1000`), in the order the device returned them.
    fn received_test_frames(
        mem: &GuestMemory,
        rx: &MockSplitQueue<GuestMemory>,
        base: u64,
    ) -> Vec<Vec<u8>> {
        used_entries(rx)
            .into_iter()
            .filter_map(|(head, len)| {
                let mut data = vec![0; len as usize];
                let addr = GuestAddress(base + u64::from(head) * 0x1000);
                mem.read_slice(&mut data, addr).unwrap();
                let ethertype = data.get(VNET_HDR_LEN + 12..VNET_HDR_LEN + 14)?;
                (ethertype == TEST_ETHERTYPE.to_be_bytes()).then_some(data)
            })
            .collect()
    }

    #[test]
    fn frames_cross_between_guest_and_tap() {
        let Some(netns) = TestNetns::create() else {
            return;
        };
        assert!(netns.ip(&["tuntap", "add", "dev", "tapE", "mode", "tap"]));
        assert!(netns.ip(&["link", "set", "tapE", "up"]));
        let netns = &netns;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    netns.enter();
                    let config = NetConfig {
                        tap: "tapE".into(),
                        mac: Some([2, 0, 0, 0, 0, 1]),
                    };
                    let net = Arc::new(Mutex::new(Net::new(&config).unwrap()));
                    let mut manager = Loop::new().unwrap();
                    manager.add_subscriber(net.clone());
                    let socket = packet_socket(ifindex("tapE"));
                    let mem = memory();
                    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
                    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));

                    // Twice: a reset must leave the device ready for a new activation.
                    for round in 0..2u64 {
                        let base = round * 0x8000;
                        let rx = MockSplitQueue::create(&mem, GuestAddress(base), 16);
                        let tx = MockSplitQueue::create(&mem, GuestAddress(base + 0x4000), 16);
                        let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
                        let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
                        let queues = vec![
                            ActiveQueue {
                                queue: rx.create_queue().unwrap(),
                                notify: rx_kick.try_clone().unwrap(),
                            },
                            ActiveQueue {
                                queue: tx.create_queue().unwrap(),
                                notify: tx_kick.try_clone().unwrap(),
                            },
                        ];
                        let features = lock(&net).avail_features();
                        lock(&net)
                            .activate(mem.clone(), interrupt.clone(), queues, features)
                            .unwrap();

                        // Guest to host.
                        let frame = test_frame(round as u8);
                        let mut with_header = vec![0u8; VNET_HDR_LEN];
                        with_header.extend_from_slice(&frame);
                        let tx_buffer = 0x20_0000 + round * 0x1_0000;
                        mem.write_slice(&with_header, GuestAddress(tx_buffer))
                            .unwrap();
                        add_chain(&tx, 0, &[(tx_buffer, with_header.len() as u32, 0)]);
                        tx_kick.write(1).unwrap();
                        assert!(run_until(&mut manager, || used_entries(&tx).len() == 1));
                        assert_eq!(
                            receive_test_frame(|buf| packet_receive(&socket, buf)),
                            frame
                        );

                        // Host to guest, before the guest posted RX buffers: a frame waits
                        // in the device, which stops reading the tap (still readable) and
                        // stays idle.
                        let frames = [test_frame(0x10 + round as u8), test_frame(0x20)];
                        for frame in &frames {
                            packet_send(&socket, frame);
                        }
                        for _ in 0..3 {
                            manager.run_with_timeout(50).unwrap();
                        }
                        assert!(used_entries(&rx).is_empty());
                        assert_eq!(manager.run_with_timeout(100).unwrap(), 0);

                        let rx_base = 0x30_0000 + round * 0x8_0000;
                        for i in 0..8u16 {
                            let addr = rx_base + u64::from(i) * 0x1000;
                            add_chain(&rx, i, &[(addr, 2048, WRITE)]);
                        }
                        rx_kick.write(1).unwrap();
                        let mut delivered = Vec::new();
                        assert!(run_until(&mut manager, || {
                            delivered = received_test_frames(&mem, &rx, rx_base);
                            delivered.len() == frames.len()
                        }));
                        for (delivered, frame) in delivered.iter().zip(&frames) {
                            assert_eq!(delivered[VNET_HDR_LEN..], frame[..]);
                            assert_eq!(delivered[10..12], [1, 0]); // num_buffers
                        }
                        assert!(irq.read().unwrap() > 0);

                        // After a reset the old queue eventfds are out of the event loop.
                        lock(&net).reset();
                        manager.run_with_timeout(0).unwrap();
                        tx_kick.write(1).unwrap();
                        rx_kick.write(1).unwrap();
                        assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
                    }
                })
                .join()
                .unwrap();
        });
    }
}
