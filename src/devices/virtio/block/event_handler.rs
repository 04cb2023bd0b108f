//! The block device's event-loop side: watches the activation eventfd from the start, and
//! the request queue's notify eventfd while the device is active.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::Block;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_QUEUE: u32 = 1;

fn queue_events(notify: &EventFd) -> Events {
    Events::with_data(notify, TOKEN_QUEUE, EventSet::IN)
}

impl Block {
    /// Brings the watched eventfds in line with the latest activate or reset.
    fn sync_watch(&mut self, ops: &mut EventOps) {
        let stale = self.active.is_none() || self.pending_notify.is_some();
        if stale {
            if let Some(old) = self.watched_notify.take() {
                if let Err(e) = ops.remove(queue_events(&old)) {
                    log::warn!("virtio-blk: cannot unwatch the old queue eventfd: {e}");
                }
                // Closed only now that epoll no longer holds it.
                drop(old);
            }
        }
        if self.active.is_none() {
            return;
        }
        if let Some(notify) = self.pending_notify.take() {
            match ops.add(queue_events(&notify)) {
                Ok(()) => self.watched_notify = Some(notify),
                Err(e) => log::error!("virtio-blk: cannot watch the queue eventfd: {e}"),
            }
            // Requests the driver queued before the eventfd was watched.
            self.process_queue();
        }
    }

    fn queue_notified(&mut self) {
        if let Some(notify) = &self.watched_notify {
            // Only read when epoll reported it readable, so this never blocks.
            let _ = notify.read();
        }
        self.process_queue();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: cannot watch the activation eventfd: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_watch(ops);
            }
            TOKEN_QUEUE => self.queue_notified(),
            other => log::debug!("virtio-blk: unexpected event token {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::block::device::tests::{new_block, Driver, IMAGE_SIZE};
    use crate::devices::virtio::block::test_util::{guest_memory, TempImage};
    use crate::devices::virtio::VirtioDevice;

    const FEATURES: u64 = 1 << 32;

    fn watched_fd(block: &Mutex<Block>) -> Option<i32> {
        lock(block).watched_notify.as_ref().map(|e| e.as_raw_fd())
    }

    #[test]
    fn activate_serve_reset_and_activate_again() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let block = Arc::new(Mutex::new(new_block(&image, false)));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(block.clone());
        // The transport's eventfd, which KVM signals; the device gets duplicates.
        let kvm_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (interrupt, irq) = Driver::interrupt();

        // A request queued before DRIVER_OK is served once the event loop takes over.
        let mut driver = Driver::new(&mem);
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        let notify = kvm_evt.try_clone().unwrap();
        let notify_fd = notify.as_raw_fd();
        lock(&block)
            .activate(
                mem.clone(),
                interrupt.clone(),
                driver.active_queue(notify),
                FEATURES,
            )
            .unwrap();
        assert!(driver.used().is_empty());
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(watched_fd(&block), Some(notify_fd));
        assert_eq!(driver.used().len(), 1);
        assert_eq!(irq.read().unwrap(), 1);

        // A notification is served from the event loop.
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 2);

        // Reset: the queue eventfd is unwatched, and notifications go nowhere.
        lock(&block).reset();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(watched_fd(&block), None);
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
        assert_eq!(driver.used().len(), 2);

        // The driver binds again with fresh rings.
        let mut driver = Driver::new(&mem);
        let notify = kvm_evt.try_clone().unwrap();
        let notify_fd = notify.as_raw_fd();
        lock(&block)
            .activate(
                mem.clone(),
                interrupt,
                driver.active_queue(notify),
                FEATURES,
            )
            .unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(watched_fd(&block), Some(notify_fd));
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 1);
    }

    /// Reset and activate again before the event loop runs: the stale eventfd is
    /// unwatched and the new one watched in one go.
    #[test]
    fn quick_rebind() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let block = Arc::new(Mutex::new(new_block(&image, false)));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(block.clone());
        let kvm_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (interrupt, _irq) = Driver::interrupt();

        let driver = Driver::new(&mem);
        let first = kvm_evt.try_clone().unwrap();
        let first_fd = first.as_raw_fd();
        lock(&block)
            .activate(
                mem.clone(),
                interrupt.clone(),
                driver.active_queue(first),
                FEATURES,
            )
            .unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(watched_fd(&block), Some(first_fd));

        let mut driver = Driver::new(&mem);
        let second = kvm_evt.try_clone().unwrap();
        let second_fd = second.as_raw_fd();
        {
            let mut device = lock(&block);
            device.reset();
            device
                .activate(
                    mem.clone(),
                    interrupt,
                    driver.active_queue(second),
                    FEATURES,
                )
                .unwrap();
        }
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(watched_fd(&block), Some(second_fd));
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 1);
    }
}
