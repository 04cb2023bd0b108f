//! The entropy device's event-loop side (see [`single_queue_event_handler`]).
//!
//! [`single_queue_event_handler`]: crate::single_queue_event_handler

use super::device::Rng;

crate::single_queue_event_handler!(Rng, "virtio-rng");

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};

    use super::super::device::tests::{memory, new_rng, random, Driver, DATA, VERSION_1, WRITE};
    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::device::test_util::observed_interrupt;
    use crate::devices::virtio::Pausable;
    use crate::devices::virtio::VirtioDevice;

    /// Served from the event loop once active; while paused a notification is not
    /// served, not even by a direct call, and resuming serves it.
    #[test]
    fn serves_from_the_event_loop_and_pauses() {
        let mem = memory();
        let rng = Arc::new(Mutex::new(new_rng()));
        let mut manager = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        let id = manager.add_subscriber(rng.clone());
        // What KVM signals when the driver writes QueueNotify: the device's own eventfd.
        let kvm_evt = lock(&rng).queue_events()[0].try_clone().unwrap();
        let (interrupt, irq) = observed_interrupt();

        // Before activation a notification is consumed and nothing is served.
        let mut driver = Driver::new(&mem);
        driver.post(&[(DATA, 32, WRITE)]);
        kvm_evt.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(0).unwrap(), 1);
        assert!(driver.used().is_empty());

        // What was queued before DRIVER_OK is served once the event loop takes over.
        driver
            .activate(&mut lock(&rng), interrupt, VERSION_1)
            .unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used(), [(0, 32)]);
        assert_eq!(irq.read().unwrap(), 1);

        lock(&rng).pause(&mut manager.event_ops(id).unwrap());
        lock(&rng).pause(&mut manager.event_ops(id).unwrap());
        assert!(lock(&rng).is_paused());
        driver.post(&[(DATA + 0x1000, 32, WRITE)]);
        kvm_evt.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
        lock(&rng).process_queue();
        assert_eq!(driver.used().len(), 1);
        assert!(irq.read().is_err());

        lock(&rng).resume(&mut manager.event_ops(id).unwrap());
        assert!(!lock(&rng).is_paused());
        assert_eq!(driver.used(), [(0, 32), (1, 32)]);
        assert!(random(&driver.read(DATA + 0x1000, 32)));
        assert_eq!(irq.read().unwrap(), 1);
        // The counter left from the pause is consumed without serving anything twice.
        assert_eq!(manager.run_with_timeout(0).unwrap(), 1);
        assert_eq!(driver.used().len(), 2);

        driver.post(&[(DATA + 0x2000, 32, WRITE)]);
        kvm_evt.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 3);
    }

    /// Bytes beyond the limit wait on the ring; a new limit serves them, and a snapshot
    /// keeps the limit in force.
    #[test]
    fn requests_beyond_the_limit_wait() {
        use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

        let mem = memory();
        let hourly_64_bytes = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 64,
                one_time_burst: None,
                refill_time: 3_600_000,
            }),
            ops: None,
        };
        let rng = Rng::new(&super::super::RngConfig {
            rate_limiter: hourly_64_bytes,
        })
        .unwrap();
        assert_eq!(rng.save().config.rate_limiter, hourly_64_bytes);
        let rng = Arc::new(Mutex::new(rng));
        let mut manager = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        manager.add_subscriber(rng.clone());
        let (interrupt, _irq) = observed_interrupt();
        let mut driver = Driver::new(&mem);
        for i in 0..3 {
            driver.post(&[(DATA + i * 0x1000, 32, WRITE)]);
        }
        driver
            .activate(&mut lock(&rng), interrupt, VERSION_1)
            .unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used(), [(0, 32), (1, 32)]);
        assert_eq!(lock(&rng).rate_limiter().throttled_events(), 1);
        assert_eq!(lock(&rng).metrics().throttled.get(), 1);

        let faster = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::per_second(1 << 20, None)),
            ops: None,
        };
        lock(&rng).update_rate_limiter(&faster);
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(driver.used().len(), 3);
        assert_eq!(lock(&rng).save().config.rate_limiter, faster);
    }
}
