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
        self.arm_stats_timer();
        self.sync_watches(ops);
    }

    fn resume(&mut self, ops: &mut EventOps) {
        self.core.set_paused(false);
        self.sync_watches(ops);
        self.arm_stats_timer();
        self.process_all();
    }

    fn is_paused(&self) -> bool {
        self.core.is_paused()
    }
}
