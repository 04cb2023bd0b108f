//! The event-loop side of virtio-net. The two queue eventfds and the two rate limiters'
//! timers are watched from `init` for the device's whole life (except while paused); the
//! back end (tap or stream) for input while a frame can be taken from it: the device is
//! active and no frame waits for RX buffers or for the RX limiter, so a slow guest costs
//! no busy loop and no frames; and for output while a stream holds a half-sent frame. A
//! limiter's timer serves again the direction it held back. A back end that failed (a
//! closed peer) is watched no more.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Net, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::Pausable;

const TOKEN_RX: u32 = 0;
const TOKEN_TX: u32 = 1;
const TOKEN_BACKEND: u32 = 2;
const TOKEN_RX_LIMITER: u32 = 3;
const TOKEN_TX_LIMITER: u32 = 4;

impl Net {
    /// Brings the epoll watch list in line with the device state.
    fn sync_watches(&mut self, ops: &mut EventOps) {
        self.core
            .sync_queue_watches(ops, &[TOKEN_RX, TOKEN_TX], "virtio-net");
        let running = !self.core.is_paused();
        self.rx_limiter
            .sync_watch(ops, TOKEN_RX_LIMITER, running, "virtio-net");
        self.tx_limiter
            .sync_watch(ops, TOKEN_TX_LIMITER, running, "virtio-net");
        let mut wanted = EventSet::empty();
        if self.wants_rx() {
            wanted |= EventSet::IN;
        }
        if self.wants_tx_room() {
            wanted |= EventSet::OUT;
        }
        if wanted != self.backend_watched {
            let watched = self.backend_watched;
            let result = if watched.is_empty() {
                ops.add(Events::with_data(&self.backend, TOKEN_BACKEND, wanted))
            } else if wanted.is_empty() {
                ops.remove(Events::with_data(&self.backend, TOKEN_BACKEND, watched))
            } else {
                ops.modify(Events::with_data(&self.backend, TOKEN_BACKEND, wanted))
            };
            match result {
                Ok(()) => self.backend_watched = wanted,
                Err(e) => {
                    log::error!("virtio-net: cannot watch {}: {e}", self.describe_backend());
                    self.backend_failed = true;
                }
            }
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync_watches(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.core.is_paused() {
            // Left in the counters and the tap for `resume`.
            return;
        }
        match events.data() {
            TOKEN_BACKEND => {
                let set = events.event_set();
                if set.contains(EventSet::OUT) {
                    self.process_tx_room();
                }
                if set.contains(EventSet::IN) {
                    // A closed stream reads as the end (reported there).
                    self.process_rx();
                } else if set.intersects(EventSet::ERROR | EventSet::HANG_UP)
                    && !set.contains(EventSet::OUT)
                {
                    log::error!(
                        "virtio-net: {} failed, the guest receives no more",
                        self.describe_backend()
                    );
                    self.backend_failed = true;
                }
            }
            TOKEN_RX => {
                self.core.read_queue_event(RX_QUEUE);
                self.process_rx();
            }
            TOKEN_TX => {
                self.core.read_queue_event(TX_QUEUE);
                self.process_tx();
            }
            TOKEN_RX_LIMITER => {
                if self.rx_limiter.on_timer() {
                    self.process_rx();
                }
            }
            TOKEN_TX_LIMITER => {
                if self.tx_limiter.on_timer() {
                    self.process_tx();
                }
            }
            other => log::debug!("virtio-net: unexpected event token {other}"),
        }
        self.sync_watches(ops);
    }
}

impl Pausable for Net {
    fn pause(&mut self, ops: &mut EventOps) {
        self.core.set_paused(true);
        self.sync_watches(ops);
    }

    fn resume(&mut self, ops: &mut EventOps) {
        self.core.set_paused(false);
        self.process_tx();
        self.process_rx();
        self.sync_watches(ops);
    }

    fn is_paused(&self) -> bool {
        self.core.is_paused()
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
    use crate::devices::virtio::device::test_util::configure_queue;
    use crate::devices::virtio::{Interrupt, VirtioDevice};
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
                        mac: Some([2, 0, 0, 0, 0, 1]),
                        ..NetConfig::new(super::super::NetBackend::Tap("tapE".into()))
                    };
                    let net = Arc::new(Mutex::new(Net::new(&config).unwrap()));
                    let mut manager = Loop::new().unwrap();
                    let id = manager.add_subscriber(net.clone());
                    // What KVM signals on QueueNotify: the device's own eventfds.
                    let rx_kick = lock(&net).queue_events()[RX_QUEUE].try_clone().unwrap();
                    let tx_kick = lock(&net).queue_events()[TX_QUEUE].try_clone().unwrap();
                    let socket = packet_socket(ifindex("tapE"));
                    let mem = memory();
                    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
                    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));

                    // Twice: a reset must leave the device ready for a new activation.
                    for round in 0..2u64 {
                        let base = round * 0x8000;
                        let rx = MockSplitQueue::create(&mem, GuestAddress(base), 16);
                        let tx = MockSplitQueue::create(&mem, GuestAddress(base + 0x4000), 16);
                        {
                            let mut device = lock(&net);
                            let queues = device.queues_mut();
                            configure_queue(&mut queues[RX_QUEUE], &rx.create_queue().unwrap());
                            configure_queue(&mut queues[TX_QUEUE], &tx.create_queue().unwrap());
                            let features = device.avail_features();
                            device.set_acked_features(features);
                            device.activate(mem.clone(), interrupt.clone()).unwrap();
                        }

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

                        // Paused, the device neither sends the guest's frames nor gives it
                        // the tap's; resumed, it does both.
                        lock(&net).pause(&mut manager.event_ops(id).unwrap());
                        let frame = test_frame(0x30 + round as u8);
                        let mut with_header = vec![0u8; VNET_HDR_LEN];
                        with_header.extend_from_slice(&frame);
                        mem.write_slice(&with_header, GuestAddress(tx_buffer))
                            .unwrap();
                        add_chain(&tx, 1, &[(tx_buffer, with_header.len() as u32, 0)]);
                        tx_kick.write(1).unwrap();
                        let host_frame = test_frame(0x40 + round as u8);
                        packet_send(&socket, &host_frame);
                        assert_eq!(manager.run_with_timeout(100).unwrap(), 0);
                        assert_eq!(used_entries(&tx).len(), 1);
                        assert_eq!(received_test_frames(&mem, &rx, rx_base).len(), 2);
                        lock(&net).resume(&mut manager.event_ops(id).unwrap());
                        assert_eq!(used_entries(&tx).len(), 2);
                        assert_eq!(
                            receive_test_frame(|buf| packet_receive(&socket, buf)),
                            frame
                        );
                        assert!(run_until(&mut manager, || {
                            received_test_frames(&mem, &rx, rx_base).len() == 3
                        }));
                        let delivered = received_test_frames(&mem, &rx, rx_base);
                        assert_eq!(delivered[2][VNET_HDR_LEN..], host_frame[..]);

                        // After a reset, notifications are consumed and serve nothing.
                        lock(&net).reset();
                        manager.run_with_timeout(0).unwrap();
                        add_chain(&tx, 2, &[(tx_buffer, with_header.len() as u32, 0)]);
                        tx_kick.write(1).unwrap();
                        rx_kick.write(1).unwrap();
                        manager.run_with_timeout(50).unwrap();
                        assert_eq!(used_entries(&tx).len(), 2);
                        assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
                    }
                })
                .join()
                .unwrap();
        });
    }

    /// Over a stream: frames go out with their length in front and no virtio-net header,
    /// come in split or whole, a full socket holds the TX ring (nothing dropped, order
    /// kept) until it drains, and a peer that closes ends the stream without a busy loop.
    #[test]
    fn frames_cross_a_stream_and_a_full_socket_holds_the_ring() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixListener;
        use virtio_bindings::virtio_net::VIRTIO_NET_F_CSUM;

        let dir = std::env::temp_dir().join(format!("hearth-net-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peer.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let config = NetConfig {
            mac: Some([2, 0, 0, 0, 0, 2]),
            ..NetConfig::new(super::super::NetBackend::Stream(path.clone()))
        };
        let net = Arc::new(Mutex::new(Net::new(&config).unwrap()));
        let (mut peer, _) = listener.accept().unwrap();
        assert_eq!(lock(&net).avail_features() & (1 << VIRTIO_NET_F_CSUM), 0);
        assert_eq!(lock(&net).config(), config);

        let mut manager = Loop::new().unwrap();
        manager.add_subscriber(net.clone());
        let rx_kick = lock(&net).queue_events()[RX_QUEUE].try_clone().unwrap();
        let tx_kick = lock(&net).queue_events()[TX_QUEUE].try_clone().unwrap();
        let mem = memory();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 64);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 64);
        {
            let mut device = lock(&net);
            let queues = device.queues_mut();
            configure_queue(&mut queues[RX_QUEUE], &rx.create_queue().unwrap());
            configure_queue(&mut queues[TX_QUEUE], &tx.create_queue().unwrap());
            let features = device.avail_features();
            device.set_acked_features(features);
            device.activate(mem.clone(), interrupt).unwrap();
        }

        // Host to guest, the frame split in three writes.
        let frame = test_frame(1);
        let mut framed = (frame.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&frame);
        add_chain(&rx, 0, &[(0x30_0000, 2048, WRITE)]);
        rx_kick.write(1).unwrap();
        for piece in [&framed[..3], &framed[3..20], &framed[20..]] {
            peer.write_all(piece).unwrap();
            manager.run_with_timeout(20).unwrap();
        }
        assert!(run_until(&mut manager, || used_entries(&rx).len() == 1));
        let delivered = received_test_frames(&mem, &rx, 0x30_0000);
        assert_eq!(
            delivered[0][..VNET_HDR_LEN],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
        );
        assert_eq!(delivered[0][VNET_HDR_LEN..], frame[..]);

        // Guest to host: 16 frames of 60000 bytes, more than the socket holds.
        const FRAMES: u16 = 16;
        const LEN: usize = 60_000;
        for i in 0..FRAMES {
            let mut data = vec![0u8; VNET_HDR_LEN];
            data.extend((0..LEN).map(|b| (b as u8).wrapping_add(i as u8)));
            let addr = 0x10_0000 + u64::from(i) * 0x1_0000;
            mem.write_slice(&data, GuestAddress(addr)).unwrap();
            add_chain(&tx, i, &[(addr, data.len() as u32, 0)]);
        }
        tx_kick.write(1).unwrap();
        for _ in 0..5 {
            manager.run_with_timeout(20).unwrap();
        }
        let sent_before_draining = used_entries(&tx).len();
        assert!(
            sent_before_draining < usize::from(FRAMES),
            "the socket took every frame: the test did not fill it"
        );
        // Reading makes room; the device finishes the half-sent frame, then the rest.
        peer.set_nonblocking(true).unwrap();
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let expected_bytes = usize::from(FRAMES) * (4 + LEN);
        for _ in 0..500 {
            match peer.read(&mut chunk) {
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    manager.run_with_timeout(10).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
            if received.len() >= expected_bytes {
                break;
            }
        }
        assert_eq!(received.len(), expected_bytes);
        assert_eq!(used_entries(&tx).len(), usize::from(FRAMES));
        for (i, framed) in received.chunks(4 + LEN).enumerate() {
            assert_eq!(framed[..4], (LEN as u32).to_be_bytes());
            assert!(framed[4..]
                .iter()
                .enumerate()
                .all(|(b, &v)| v == (b as u8).wrapping_add(i as u8)));
        }

        // The peer goes: reported once, and the loop goes quiet (no spinning on EOF).
        drop(peer);
        for _ in 0..3 {
            manager.run_with_timeout(20).unwrap();
        }
        assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
        assert_eq!(lock(&net).metrics().rx_errors.get(), 1);
        // Frames the guest still sends are returned and dropped.
        add_chain(&tx, FRAMES, &[(0x10_0000, (VNET_HDR_LEN + 60) as u32, 0)]);
        tx_kick.write(1).unwrap();
        assert!(run_until(&mut manager, || used_entries(&tx).len()
            == usize::from(FRAMES) + 1));
        assert!(lock(&net).metrics().tx_errors.get() >= 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
