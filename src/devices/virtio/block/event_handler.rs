//! The block device's event-loop side (see [`single_queue_event_handler`]).
//!
//! [`single_queue_event_handler`]: crate::single_queue_event_handler

use super::device::Block;

crate::single_queue_event_handler!(Block, "virtio-blk");

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::block::device::tests::{new_block, Driver, IMAGE_SIZE};
    use crate::devices::virtio::block::test_util::{guest_memory, TempImage};
    use crate::devices::virtio::device::test_util::observed_interrupt;
    use crate::devices::virtio::Pausable;
    use crate::devices::virtio::VirtioDevice;

    const FEATURES: u64 = 1 << 32;

    /// What KVM signals when the driver writes QueueNotify: the device's own eventfd.
    fn kvm_eventfd(block: &Mutex<Block>) -> EventFd {
        lock(block).queue_events()[0].try_clone().unwrap()
    }

    #[test]
    fn activate_serve_reset_and_activate_again() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let block = Arc::new(Mutex::new(new_block(&image, false)));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(block.clone());
        let kvm_evt = kvm_eventfd(&block);
        let (interrupt, irq) = observed_interrupt();

        // Notifications before activation are consumed and nothing is touched.
        kvm_evt.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(0).unwrap(), 1);
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);

        // A request queued before DRIVER_OK is served once the event loop takes over.
        let mut driver = Driver::new(&mem);
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        driver
            .activate(&mut lock(&block), interrupt.clone(), FEATURES)
            .unwrap();
        assert!(driver.used().is_empty());
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 1);
        assert_eq!(irq.read().unwrap(), 1);

        // A notification is served from the event loop.
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 2);

        // Reset: notifications are consumed and go nowhere.
        lock(&block).reset();
        manager.run_with_timeout(1000).unwrap();
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(0).unwrap(), 1);
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
        assert_eq!(driver.used().len(), 2);

        // The driver binds again with fresh rings, behind the same eventfd.
        let mut driver = Driver::new(&mem);
        driver
            .activate(&mut lock(&block), interrupt, FEATURES)
            .unwrap();
        manager.run_with_timeout(1000).unwrap();
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 1);
    }

    /// Reset and activate again before the event loop runs: the new rings are served.
    #[test]
    fn quick_rebind() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let block = Arc::new(Mutex::new(new_block(&image, false)));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(block.clone());
        let kvm_evt = kvm_eventfd(&block);
        let (interrupt, _irq) = observed_interrupt();

        let driver = Driver::new(&mem);
        driver
            .activate(&mut lock(&block), interrupt.clone(), FEATURES)
            .unwrap();
        manager.run_with_timeout(1000).unwrap();

        let mut driver = Driver::new(&mem);
        {
            let mut device = lock(&block);
            device.reset();
            driver.activate(&mut device, interrupt, FEATURES).unwrap();
        }
        manager.run_with_timeout(1000).unwrap();
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 1);
    }

    /// A notification while paused is not served; resuming serves it.
    #[test]
    fn pause_and_resume() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let block = Arc::new(Mutex::new(new_block(&image, false)));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        let id = manager.add_subscriber(block.clone());
        let kvm_evt = kvm_eventfd(&block);
        let (interrupt, irq) = observed_interrupt();
        let mut driver = Driver::new(&mem);
        driver
            .activate(&mut lock(&block), interrupt, FEATURES)
            .unwrap();
        manager.run_with_timeout(1000).unwrap();

        lock(&block).pause(&mut manager.event_ops(id).unwrap());
        // Twice is harmless.
        lock(&block).pause(&mut manager.event_ops(id).unwrap());
        assert!(lock(&block).is_paused());
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
        // Even a direct call touches nothing.
        lock(&block).process_queue();
        assert!(driver.used().is_empty());
        assert!(irq.read().is_err());

        lock(&block).resume(&mut manager.event_ops(id).unwrap());
        assert!(!lock(&block).is_paused());
        assert_eq!(driver.used().len(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        // The counter that arrived while paused is consumed without serving anything twice.
        assert_eq!(manager.run_with_timeout(0).unwrap(), 1);
        assert_eq!(driver.used().len(), 1);
        lock(&block).resume(&mut manager.event_ops(id).unwrap());
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_evt.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 2);
    }

    /// Requests beyond the limit wait on the ring, not lost, and the limiter's timer,
    /// watched by the event loop, serves them later; pausing takes the timer out of the
    /// loop; changing the limit serves what waits at once.
    #[test]
    fn throttled_requests_wait_for_the_timer_and_a_new_limit() {
        use std::time::{Duration, Instant};

        use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let one_per_100ms = TokenBucketConfig {
            size: 1,
            one_time_burst: None,
            refill_time: 100,
        };
        let block = Block::new(&crate::devices::virtio::block::BlockConfig {
            path: image.path().to_owned(),
            read_only: false,
            id: None,
            rate_limiter: RateLimiterConfig {
                bandwidth: None,
                ops: Some(one_per_100ms),
            },
        })
        .unwrap();
        let block = Arc::new(Mutex::new(block));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        let id = manager.add_subscriber(block.clone());
        let (interrupt, _irq) = observed_interrupt();
        let mut driver = Driver::new(&mem);
        for _ in 0..3 {
            driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        }
        let start = Instant::now();
        driver
            .activate(&mut lock(&block), interrupt, FEATURES)
            .unwrap();
        manager.run_with_timeout(1000).unwrap();
        // One went; the others wait, and nothing is ready until the timer fires.
        assert_eq!(driver.used().len(), 1);
        assert!(lock(&block).rate_limiter().is_blocked());
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
        while driver.used().len() < 3 && start.elapsed() < Duration::from_secs(5) {
            manager.run_with_timeout(1000).unwrap();
        }
        assert_eq!(driver.used().len(), 3);
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert_eq!(lock(&block).rate_limiter().throttled_events(), 2);
        assert_eq!(lock(&block).metrics().throttled.get(), 2);

        // Paused, the timer is not watched; resuming serves what became due.
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        kvm_eventfd(&block).write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert!(lock(&block).rate_limiter().is_blocked());
        lock(&block).pause(&mut manager.event_ops(id).unwrap());
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
        let served = driver.used().len();
        lock(&block).resume(&mut manager.event_ops(id).unwrap());
        manager.run_with_timeout(1000).unwrap();
        assert!(driver.used().len() > served);
        while driver.used().len() < 5 && start.elapsed() < Duration::from_secs(5) {
            manager.run_with_timeout(1000).unwrap();
        }
        assert_eq!(driver.used().len(), 5);

        // A new limit: the omitted bandwidth bucket stays absent, the ops bucket goes.
        for _ in 0..4 {
            driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        }
        kvm_eventfd(&block).write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert!(driver.used().len() < 9);
        lock(&block).update_rate_limiter(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::default()),
        });
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 9);
        assert_eq!(
            lock(&block).save().config.rate_limiter,
            RateLimiterConfig::default()
        );
    }
}
