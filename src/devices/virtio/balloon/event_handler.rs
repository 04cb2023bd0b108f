//! The balloon's event-loop side: every queue's eventfd (queue `i` has event data `i`)
//! and the statistics timer, watched from `init` for the device's whole life except while
//! paused. A notification while the device is inactive is consumed and serves nothing.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Balloon;
use crate::devices::virtio::Pausable;

const NAME: &str = "virtio-balloon";
/// Past any queue index.
const TOKEN_TIMER: u32 = 100;

impl Balloon {
    fn sync_watches(&mut self, ops: &mut EventOps) {
        let tokens: Vec<u32> = (0..self.core.queue_events().len() as u32).collect();
        self.core.sync_queue_watches(ops, &tokens, NAME);
        let want = !self.core.is_paused();
        if want != self.timer_watched {
            let events = Events::with_data(&self.stats_timer, TOKEN_TIMER, EventSet::IN);
            let result = if want {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            match result {
                Ok(()) => self.timer_watched = want,
                Err(e) => log::error!("{NAME}: cannot update the watch on its timer: {e}"),
            }
        }
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync_watches(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.core.is_paused() {
            // Left in the counters (and the timer) for `resume`.
            return;
        }
        // Activation and reset (on vCPU threads) wake the loop through the queues.
        self.sync_stats_timer();
        match events.data() {
            TOKEN_TIMER => self.on_stats_timer(),
            index if (index as usize) < self.core.queue_events().len() => {
                self.core.read_queue_event(index as usize);
                self.process_queue(index as usize);
            }
            other => log::debug!("{NAME}: unexpected event token {other}"),
        }
    }
}

impl Pausable for Balloon {
    fn pause(&mut self, ops: &mut EventOps) {
        self.core.set_paused(true);
        self.sync_stats_timer();
        self.sync_watches(ops);
    }

    fn resume(&mut self, ops: &mut EventOps) {
        self.core.set_paused(false);
        self.sync_watches(ops);
        self.sync_stats_timer();
        self.process_all();
    }

    fn is_paused(&self) -> bool {
        self.core.is_paused()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use event_manager::{EventManager, SubscriberOps};

    use super::super::device::tests::{config, memory, Driver, STATS, VERSION_1};
    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::device::test_util::observed_interrupt;
    use crate::devices::virtio::VirtioDevice;

    /// The statistics timer starts once the event loop hears of the activation (not on
    /// the vCPU thread that activated), hands the held buffer back when it fires, stops
    /// while paused and goes on after a resume.
    #[test]
    fn the_statistics_timer_runs_from_the_event_loop() {
        let mem = memory();
        let balloon = Arc::new(Mutex::new(Balloon::new(&config(1, false)).unwrap()));
        let mut manager = EventManager::<Arc<Mutex<Balloon>>>::new().unwrap();
        let id = manager.add_subscriber(balloon.clone());
        let mut driver = Driver::new(&mem, 3);
        let (interrupt, _irq) = observed_interrupt();
        driver.post_bytes(2, &[4, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        driver
            .activate(&mut lock(&balloon), interrupt, VERSION_1 | STATS)
            .unwrap();
        assert!(!lock(&balloon).stats_timer.is_armed().unwrap());
        manager.run_with_timeout(0).unwrap();
        assert!(lock(&balloon).stats_timer.is_armed().unwrap());
        assert_eq!(lock(&balloon).stats_desc, Some(0));
        assert!(driver.used(2).is_empty());

        let deadline = Instant::now() + Duration::from_secs(10);
        while driver.used(2).is_empty() && Instant::now() < deadline {
            manager.run_with_timeout(200).unwrap();
        }
        assert_eq!(driver.used(2), [(0, 0)]);

        lock(&balloon).pause(&mut manager.event_ops(id).unwrap());
        assert!(!lock(&balloon).stats_timer.is_armed().unwrap());
        lock(&balloon).resume(&mut manager.event_ops(id).unwrap());
        assert!(lock(&balloon).stats_timer.is_armed().unwrap());
        lock(&balloon).reset();
        manager.run_with_timeout(0).unwrap();
        assert!(!lock(&balloon).stats_timer.is_armed().unwrap());
        assert!(!lock(&balloon).is_activated());
    }
}
