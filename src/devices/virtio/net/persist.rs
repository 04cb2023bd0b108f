//! What a snapshot keeps of a virtio-net device: its back end (tap name, socket path or
//! user-mode networking) and the guest's MAC (the caller may name another back end before
//! restoring), and the virtio state, negotiated features included. A snapshot of a tap
//! NIC whose guest took offloads cannot go onto a stream (passt wants whole frames): the
//! restore says so.
//!
//! A paused device may hold RX buffers it took from the ring for a frame that did not fit
//! yet. The frame came from the old tap and is dropped (a network may lose a frame), but
//! the buffers must not be lost: the saved RX queue starts again at the first of them, so
//! the restored device takes them anew. (A chain the device returned as unusable between
//! two held buffers would be taken again too; only a driver that posts unusable RX
//! buffers can cause that, and it is only its own network that suffers.)

use serde::{Deserialize, Serialize};

use super::device::{QUEUE_MAX_SIZES, RX_QUEUE};
use super::{Net, NetConfig, NetError};
use crate::devices::virtio::persist::{DeviceCoreState, RestoreError};
use crate::devices::virtio::DeviceCore;

const DEVICE: &str = "virtio-net";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The tap, the guest's MAC address (always set) and the rate limiters.
    pub config: NetConfig,
    pub core: DeviceCoreState,
}

impl Net {
    pub fn save(&self) -> NetState {
        let mut core = self.core.save();
        if let (Some(first), Some(rx)) = (self.rx.first_held(), core.queues.get_mut(RX_QUEUE)) {
            rx.next_avail = first;
        }
        NetState {
            config: self.config(),
            core,
        }
    }

    /// Opens `state.config`'s tap and puts the saved queues and features back. The device
    /// is inactive until its transport is restored.
    pub fn restore(state: &NetState) -> Result<Self, RestoreError> {
        if state.config.mac.is_none() {
            // A fresh random address would change the guest's NIC under it.
            return Err(RestoreError::Mismatch {
                device: DEVICE,
                what: "the saved state has no MAC address".into(),
            });
        }
        let mut net = Net::new(&state.config).map_err(|e| RestoreError::Device {
            device: DEVICE,
            source: Box::new(e),
        })?;
        // Another kind of back end (a tap NIC restored onto passt or back) offers other
        // features; what counts is that it can carry what the guest took.
        let supported = net.core.avail_features();
        if state.core.acked_features & !supported != 0 {
            return Err(RestoreError::Mismatch {
                device: DEVICE,
                what: format!(
                    "the guest uses offloads ({:#x}) that {} cannot carry",
                    state.core.acked_features & !supported,
                    net.describe_backend()
                ),
            });
        }
        net.core = DeviceCore::new(state.core.avail_features, &QUEUE_MAX_SIZES).map_err(|e| {
            RestoreError::Device {
                device: DEVICE,
                source: Box::new(NetError::Queues(e)),
            }
        })?;
        net.core.restore(&state.core)?;
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::super::device::tests::{add_chain, memory, used_entries, WRITE};
    use super::super::device::TX_QUEUE;
    use super::super::tap::test_netns::*;
    use super::*;
    use crate::devices::virtio::device::test_util::configure_queue;
    use crate::devices::virtio::{Interrupt, VirtioDevice};

    #[test]
    fn save_restore_save_gives_held_rx_buffers_back() {
        let Some(netns) = TestNetns::create() else {
            return;
        };
        assert!(netns.ip(&["tuntap", "add", "dev", "tapS", "mode", "tap"]));
        assert!(netns.ip(&["link", "set", "tapS", "up"]));
        let netns = &netns;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    netns.enter();
                    let config = NetConfig {
                        mac: Some([2, 0, 0, 0, 0, 7]),
                        ..NetConfig::new(super::super::NetBackend::Tap("tapS".into()))
                    };
                    let mem = memory();
                    let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
                    let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
                    // Two tiny buffers: any frame (ours, or something the kernel sends
                    // on a new link) takes both and waits for more.
                    add_chain(&rx, 0, &[(0x10_0000, 16, WRITE)]);
                    add_chain(&rx, 1, &[(0x11_0000, 16, WRITE)]);
                    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
                    let interrupt = Arc::new(Interrupt::new(irq));

                    let mut net = Net::new(&config).unwrap();
                    for (queue, mock) in net.queues_mut().iter_mut().zip([&rx, &tx]) {
                        let template: Queue = mock.create_queue().unwrap();
                        configure_queue(queue, &template);
                    }
                    let features = net.avail_features();
                    net.set_acked_features(features);
                    net.activate(mem.clone(), interrupt).unwrap();
                    let socket = packet_socket(ifindex("tapS"));
                    packet_send(&socket, &test_frame(1));
                    assert!(wait_readable(std::os::fd::AsRawFd::as_raw_fd(&net.backend)));
                    net.process_rx();
                    assert!(net.rx.has_pending_frame());
                    assert!(used_entries(&rx).is_empty());
                    assert_eq!(net.queues()[RX_QUEUE].next_avail(), 2);

                    let state = net.save();
                    assert_eq!(state.config, config);
                    assert_eq!(state.core.acked_features, features);
                    assert_eq!(state.core.queues[RX_QUEUE].next_avail, 0);
                    assert_eq!(state.core.queues[TX_QUEUE].avail_ring, 0x4000 + 16 * 16);
                    drop(net);

                    let json = serde_json::to_string(&state).unwrap();
                    let restored = Arc::new(Mutex::new(
                        Net::restore(&serde_json::from_str(&json).unwrap()).unwrap(),
                    ));
                    assert_eq!(restored.lock().unwrap().save(), state);

                    let mut no_mac = state.clone();
                    no_mac.config.mac = None;
                    assert!(matches!(
                        Net::restore(&no_mac),
                        Err(RestoreError::Mismatch { .. })
                    ));
                })
                .join()
                .unwrap();
        });
    }
}
