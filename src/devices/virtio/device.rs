//! The lifecycle every virtio device shares.
//!
//! ```text
//!            new()                      activate()                 reset()
//!   (queues and queue eventfds) ──> Inactive ──────────> Activated ────────> Inactive ...
//! ```
//!
//! A device is built with its queues and one eventfd per queue, and keeps both for its
//! whole life: the device manager registers exactly those eventfds with KVM as ioeventfds
//! on QueueNotify, the transport's QueueNotify fallback writes to them, and the device's
//! event-loop side watches them from `init` on. The transport configures the queues
//! through [`VirtioDevice::queues_mut`] while the driver sets them up (vCPU threads), then
//! activates the device at DRIVER_OK; the driver's reset deactivates it. Both
//! transitions happen under the device's mutex, so the event loop, which takes the same
//! mutex, sees either state whole.
//!
//! Activating and deactivating write every queue eventfd once: the event-loop side then
//! serves what the driver queued before DRIVER_OK, and brings what it watches in line
//! with the new state, with no wake-up eventfd of its own. While the device is inactive,
//! a queue notification is consumed and serves nothing.
//!
//! Pausing (for the VMM's pause and snapshot) is a state of the event-loop side only:
//! [`Pausable`]. A paused device watches no fd and touches neither guest memory nor its
//! queues; eventfd counters keep the notifications that arrive meanwhile.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{read_config_space, Interrupt};
use crate::vstate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device is already active")]
    AlreadyActive,
    #[error("the driver accepted no usable queue configuration: {0}")]
    BadQueues(String),
    #[error("cannot start the device's backend")]
    Backend(#[source] std::io::Error),
}

/// Why a device's queues could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QueueSetupError {
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
    #[error("queue {index} cannot hold {size} entries")]
    Size {
        index: usize,
        size: u16,
        #[source]
        source: virtio_queue::Error,
    },
}

/// What an activated device works with.
pub struct ActiveResources {
    pub mem: GuestMemory,
    pub interrupt: Arc<Interrupt>,
}

/// Where a device is in its life.
pub enum DeviceState {
    Inactive,
    Activated(ActiveResources),
}

/// The state every virtio device holds, whatever its type: feature bits, queues and their
/// eventfds, the lifecycle state, and the event loop's view of the queue eventfds.
pub struct DeviceCore {
    avail_features: u64,
    acked_features: u64,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    state: DeviceState,
    paused: bool,
    /// Whether the queue eventfds are in the event loop's epoll set.
    queues_watched: bool,
}

impl DeviceCore {
    /// A device offering `avail_features`, with one queue of each maximum size.
    pub fn new(avail_features: u64, queue_max_sizes: &[u16]) -> Result<Self, QueueSetupError> {
        let queues = queue_max_sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|source| QueueSetupError::Size {
                    index,
                    size,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Non-blocking: a stale readiness report can never stall the event loop on a read.
        let queue_events = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(QueueSetupError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            avail_features,
            acked_features: 0,
            queues,
            queue_events,
            state: DeviceState::Inactive,
            paused: false,
            queues_watched: false,
        })
    }

    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The features the driver accepted; bits the device never offered are dropped.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Whether feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1 << bit) != 0
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    pub fn is_activated(&self) -> bool {
        matches!(self.state, DeviceState::Activated(_))
    }

    /// What activation requires of the driver's setup: every queue ready, of a valid size,
    /// its rings inside guest memory.
    pub fn check_activation(&self, mem: &GuestMemory) -> Result<(), ActivateError> {
        self.check_queues(mem, self.queues.len())
    }

    /// [`Self::check_activation`] for a device whose driver sets up only its first
    /// `in_use` queues, the others belonging to features it declined (virtio-balloon).
    fn check_queues(&self, mem: &GuestMemory, in_use: usize) -> Result<(), ActivateError> {
        if self.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        for (index, queue) in self.queues.iter().take(in_use).enumerate() {
            if !queue.ready() {
                return Err(ActivateError::BadQueues(format!(
                    "queue {index} is not ready"
                )));
            }
            if !queue.is_valid(mem) {
                return Err(ActivateError::BadQueues(format!(
                    "queue {index} has rings outside guest memory"
                )));
            }
        }
        Ok(())
    }

    /// Starts serving the queues with the acked features, then wakes the event-loop side.
    pub fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let all = self.queues.len();
        self.activate_first(mem, interrupt, all)
    }

    /// [`Self::activate`] when the driver uses only the first `in_use` queues: the rest
    /// are neither checked nor served.
    pub fn activate_first(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        in_use: usize,
    ) -> Result<(), ActivateError> {
        self.check_queues(&mem, in_use)?;
        let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        self.state = DeviceState::Activated(ActiveResources { mem, interrupt });
        self.wake_event_loop();
        Ok(())
    }

    /// Stops using the queues and guest memory, then wakes the event-loop side. The queue
    /// configuration is the transport's to reset.
    pub fn deactivate(&mut self) {
        self.state = DeviceState::Inactive;
        self.wake_event_loop();
    }

    /// The queues and what serving them needs: `None` while inactive or paused, so queue
    /// processing that goes through here can never touch a queue or guest memory then.
    pub fn active(&mut self) -> Option<(&mut [Queue], &ActiveResources)> {
        match &self.state {
            DeviceState::Activated(resources) if !self.paused => {
                Some((&mut self.queues, resources))
            }
            _ => None,
        }
    }

    fn wake_event_loop(&self) {
        for evt in &self.queue_events {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio: cannot wake the device's event loop: {e}");
            }
        }
    }

    /// Consumes the notifications counted on queue `index`'s eventfd.
    pub fn read_queue_event(&self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            // Non-blocking: an empty counter is not an error worth reporting.
            let _ = evt.read();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Puts the queue eventfds in the event loop's epoll set, or takes them out while
    /// paused. `tokens[i]` is queue `i`'s event data; queues past `tokens` (a queue the
    /// device never needs to hear about) are not watched.
    pub fn sync_queue_watches(&mut self, ops: &mut EventOps, tokens: &[u32], device: &str) {
        let want = !self.paused;
        if want == self.queues_watched {
            return;
        }
        for (evt, &token) in self.queue_events.iter().zip(tokens) {
            let events = Events::with_data(evt, token, EventSet::IN);
            let result = if want {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            if let Err(e) = result {
                log::error!("{device}: cannot update the watch on queue eventfd {token}: {e}");
            }
        }
        self.queues_watched = want;
    }
}

/// The event-loop side of pausing a device, for the VMM's pause and snapshot. Both run on
/// the event-loop thread, between `EventManager::run_with_timeout` calls, with the
/// `EventOps` of the device's subscriber (`SubscriberOps::event_ops`). vCPUs should be
/// paused first: a driver's reset or DRIVER_OK reaches the device regardless.
pub trait Pausable {
    /// Takes every fd the device watches out of the event loop; from now on the device
    /// touches neither guest memory nor its queues. Pausing twice is harmless.
    fn pause(&mut self, ops: &mut EventOps);
    /// Watches again what the state calls for and serves whatever became pending
    /// meanwhile. Resuming a running device is harmless.
    fn resume(&mut self, ops: &mut EventOps);
    fn is_paused(&self) -> bool;
}

/// A virtio device behind a transport. The transport reaches it on vCPU threads; its
/// queues are processed on the event-loop thread.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block, 1 = net, ...).
    fn device_type(&self) -> u32;
    fn core(&self) -> &DeviceCore;
    fn core_mut(&mut self) -> &mut DeviceCore;
    /// The device-specific configuration space, as the driver reads it.
    fn config_space(&self) -> &[u8];

    /// Reads the configuration space; what lies outside it reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(self.config_space(), offset, data);
    }

    /// Writes the configuration space. No device here has a writable field, so the
    /// default ignores the write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio device {}: ignored a {}-byte configuration write at {offset:#x}",
            self.device_type(),
            data.len()
        );
    }

    /// DRIVER_OK: start serving the queues with the acked features. Called on a vCPU
    /// thread; the event-loop side takes over from the wake-up.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.core_mut().activate(mem, interrupt)
    }

    /// The driver reset the device: stop using the queues and guest memory. A later
    /// `activate` must work again.
    fn reset(&mut self) {
        self.core_mut().deactivate();
    }

    fn avail_features(&self) -> u64 {
        self.core().avail_features()
    }

    fn acked_features(&self) -> u64 {
        self.core().acked_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.core_mut().set_acked_features(features);
    }

    fn queues(&self) -> &[Queue] {
        self.core().queues()
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        self.core_mut().queues_mut()
    }

    /// One eventfd per queue, for the device's whole life.
    fn queue_events(&self) -> &[EventFd] {
        self.core().queue_events()
    }

    fn is_activated(&self) -> bool {
        self.core().is_activated()
    }

    /// The device failed on its own (a vhost-user back end went away): the transport
    /// shows DEVICE_NEEDS_RESET until the driver resets it.
    fn needs_reset(&self) -> bool {
        false
    }
}

/// What [`drain_queue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// At least one chain went to the used ring.
    pub used: bool,
    /// The budget ran out with chains left: notifications stay disabled, and the caller
    /// must come back (the event loop has other work first).
    pub more: bool,
}

/// Serves the chains the driver made available on `queue`, at most `budget` of them.
/// `serve` gets each chain and returns the length to put in the used ring, or `None` when
/// the device has nothing to go with it: the chain goes back to the ring and draining
/// stops. Notifications stay disabled while chains are popped and are re-enabled after;
/// chains that arrived meanwhile are served too. The driver is interrupted once at the
/// end if it wants to hear about the used chains.
pub fn drain_queue<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    interrupt: &Interrupt,
    budget: usize,
    mut serve: impl FnMut(DescriptorChain<&'m GuestMemory>) -> Option<u32>,
) -> Drained {
    let mut drained = Drained::default();
    let mut served = 0usize;
    // A round that popped nothing although the ring said chains were waiting.
    let mut empty_round = false;
    'rounds: loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("virtio: cannot disable queue notifications: {e}");
        }
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let Some(len) = serve(chain) else {
                queue.go_to_previous_position();
                if let Err(e) = queue.enable_notification(mem) {
                    log::warn!("virtio: cannot enable queue notifications: {e}");
                }
                break 'rounds;
            };
            popped = true;
            match queue.add_used(mem, head, len) {
                Ok(()) => drained.used = true,
                Err(e) => log::warn!("virtio: cannot return descriptor {head}: {e}"),
            }
            served += 1;
            if served >= budget {
                drained.more = true;
                break 'rounds;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) if popped || !empty_round => empty_round = !popped,
            // The available index keeps claiming chains that cannot be popped: a broken
            // ring. Wait for the next notification rather than spin.
            Ok(true) => {
                log::debug!("virtio: the available ring is inconsistent");
                break;
            }
            Ok(false) => break,
            Err(e) => {
                log::warn!("virtio: cannot enable queue notifications: {e}");
                break;
            }
        }
    }
    if drained.used {
        interrupt.notify_used(queue, mem);
    }
    drained
}

/// The event-loop side of a device with one queue that is served synchronously, behind a
/// rate limiter (virtio-blk, virtio-rng): the queue's eventfd and the limiter's timer are
/// watched from `init` for the device's whole life (except while paused); a notification
/// is served when the device is active and only consumed otherwise, and the timer serves
/// what the limiter held back. `$device` needs a `core: DeviceCore` field, a `limiter:
/// RateLimiter` field, and `process_queue(&mut self)` and `on_rate_limiter_timer(&mut
/// self)` methods.
#[macro_export]
macro_rules! single_queue_event_handler {
    ($device:ty, $name:literal) => {
        impl $device {
            /// The queue's event data; the limiter's timer has the next.
            const TOKEN_QUEUE: u32 = 0;
            const TOKEN_LIMITER: u32 = 1;

            fn sync_watches(&mut self, ops: &mut event_manager::EventOps) {
                self.core
                    .sync_queue_watches(ops, &[Self::TOKEN_QUEUE], $name);
                let want = !self.core.is_paused();
                self.limiter
                    .sync_watch(ops, Self::TOKEN_LIMITER, want, $name);
            }
        }

        impl event_manager::MutEventSubscriber for $device {
            fn init(&mut self, ops: &mut event_manager::EventOps) {
                self.sync_watches(ops);
            }

            fn process(
                &mut self,
                events: event_manager::Events,
                _ops: &mut event_manager::EventOps,
            ) {
                if self.core.is_paused() {
                    // Left in the counter (and the timer) for `resume`.
                    return;
                }
                match events.data() {
                    Self::TOKEN_QUEUE => {
                        self.core.read_queue_event(0);
                        self.process_queue();
                    }
                    Self::TOKEN_LIMITER => self.on_rate_limiter_timer(),
                    other => log::debug!(concat!($name, ": unexpected event token {}"), other),
                }
            }
        }

        impl $crate::devices::virtio::Pausable for $device {
            fn pause(&mut self, ops: &mut event_manager::EventOps) {
                self.core.set_paused(true);
                self.sync_watches(ops);
            }

            fn resume(&mut self, ops: &mut event_manager::EventOps) {
                self.core.set_paused(false);
                self.sync_watches(ops);
                self.process_queue();
            }

            fn is_paused(&self) -> bool {
                self.core.is_paused()
            }
        }
    };
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Arc;

    use virtio_queue::{Queue, QueueT};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::devices::virtio::Interrupt;

    /// A device interrupt, and a second handle on its irqfd for the test to read.
    pub(crate) fn observed_interrupt() -> (Arc<Interrupt>, EventFd) {
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let observer = irqfd.try_clone().unwrap();
        (Arc::new(Interrupt::new(irqfd)), observer)
    }

    /// Gives a device's `queue` the configuration of `template` (a queue made by
    /// virtio-queue's mock), as a driver would through the transport, from the state the
    /// transport leaves a queue in after a reset.
    pub(crate) fn configure_queue(queue: &mut Queue, template: &Queue) {
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        queue.reset();
        queue.set_size(template.size());
        let (low, high) = split(template.desc_table());
        queue.set_desc_table_address(low, high);
        let (low, high) = split(template.avail_ring());
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(template.used_ring());
        queue.set_used_ring_address(low, high);
        queue.set_ready(true);
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::test_util::{configure_queue, observed_interrupt as interrupt};
    use super::*;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// `count` one-descriptor chains, descriptor i at 0x8_0000 + i * 0x100.
    fn add_chains(mock: &MockSplitQueue<GuestMemory>, count: u16) {
        let descs: Vec<RawDescriptor> = (0..count)
            .map(|i| {
                RawDescriptor::from(Descriptor::new(0x8_0000 + u64::from(i) * 0x100, 16, 0, 0))
            })
            .collect();
        for (i, desc) in descs.iter().enumerate() {
            mock.add_desc_chains(std::slice::from_ref(desc), i as u16)
                .unwrap();
        }
    }

    fn used_idx(mock: &MockSplitQueue<GuestMemory>) -> u16 {
        mock.used().idx().load()
    }

    #[test]
    fn activation_checks_every_queue() {
        let mem = memory();
        let (interrupt, _irq) = interrupt();
        let mut core = DeviceCore::new(1 << VIRTIO_RING_F_EVENT_IDX, &[16, 16]).unwrap();
        assert_eq!(core.queue_events().len(), 2);
        let first = MockSplitQueue::<GuestMemory>::create(&mem, GuestAddress(0), 16);
        let second = MockSplitQueue::<GuestMemory>::create(&mem, GuestAddress(0x1_0000), 16);
        configure_queue(&mut core.queues_mut()[0], &first.create_queue().unwrap());

        let error = core.activate(mem.clone(), interrupt.clone()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the driver accepted no usable queue configuration: queue 1 is not ready"
        );
        configure_queue(&mut core.queues_mut()[1], &second.create_queue().unwrap());
        core.queues_mut()[1].set_desc_table_address(Some(0xff_f000), Some(0));
        assert!(matches!(
            core.activate(mem.clone(), interrupt.clone()),
            Err(ActivateError::BadQueues(_))
        ));
        // Nothing woke the event loop.
        assert!(core.queue_events()[0].read().is_err());

        configure_queue(&mut core.queues_mut()[1], &second.create_queue().unwrap());
        core.set_acked_features(u64::MAX);
        assert_eq!(core.acked_features(), 1 << VIRTIO_RING_F_EVENT_IDX);
        core.activate(mem.clone(), interrupt.clone()).unwrap();
        assert!(core.is_activated());
        assert!(core.queues().iter().all(|q| q.event_idx_enabled()));
        for evt in core.queue_events() {
            assert_eq!(evt.read().unwrap(), 1);
        }
        assert!(matches!(
            core.activate(mem, interrupt),
            Err(ActivateError::AlreadyActive)
        ));

        core.set_paused(true);
        assert!(core.active().is_none());
        core.set_paused(false);
        assert!(core.active().is_some());
        core.deactivate();
        assert!(core.active().is_none());
        assert_eq!(core.queue_events()[1].read().unwrap(), 1);
    }

    #[test]
    fn drain_serves_everything_and_interrupts_once() {
        let mem = memory();
        let (interrupt, irq) = interrupt();
        let mock = MockSplitQueue::<GuestMemory>::create(&mem, GuestAddress(0), 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        add_chains(&mock, 5);
        let mut heads = Vec::new();
        let drained = drain_queue(&mut queue, &mem, &interrupt, usize::MAX, |chain| {
            heads.push(chain.head_index());
            Some(7)
        });
        assert_eq!(
            drained,
            Drained {
                used: true,
                more: false
            }
        );
        assert_eq!(heads, [0, 1, 2, 3, 4]);
        assert_eq!(used_idx(&mock), 5);
        assert_eq!(irq.read().unwrap(), 1);
        // Nothing left: nothing used, no interrupt.
        let drained = drain_queue(&mut queue, &mem, &interrupt, usize::MAX, |_| Some(0));
        assert_eq!(drained, Drained::default());
        assert!(irq.read().is_err());
    }

    #[test]
    fn drain_stops_at_the_budget_and_when_the_device_has_nothing() {
        let mem = memory();
        let (interrupt, _irq) = interrupt();
        let mock = MockSplitQueue::<GuestMemory>::create(&mem, GuestAddress(0), 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        add_chains(&mock, 5);
        let drained = drain_queue(&mut queue, &mem, &interrupt, 2, |_| Some(0));
        assert_eq!(
            drained,
            Drained {
                used: true,
                more: true
            }
        );
        assert_eq!(used_idx(&mock), 2);

        // The device takes one more, then has nothing for the next: it stays available.
        let mut offered = 0;
        let drained = drain_queue(&mut queue, &mem, &interrupt, usize::MAX, |_| {
            offered += 1;
            (offered == 1).then_some(0)
        });
        assert_eq!(
            drained,
            Drained {
                used: true,
                more: false
            }
        );
        assert_eq!(used_idx(&mock), 3);
        assert_eq!(queue.next_avail(), 3);
        let drained = drain_queue(&mut queue, &mem, &interrupt, usize::MAX, |_| Some(0));
        assert!(drained.used);
        assert_eq!(used_idx(&mock), 5);
    }

    /// An available index far ahead of the ring: virtio-queue pops nothing, and draining
    /// ends instead of spinning.
    #[test]
    fn drain_ends_on_a_broken_ring() {
        let mem = memory();
        let (interrupt, _irq) = interrupt();
        let mock = MockSplitQueue::<GuestMemory>::create(&mem, GuestAddress(0), 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        mock.avail().idx().store(1000);
        let drained = drain_queue(&mut queue, &mem, &interrupt, usize::MAX, |_| Some(0));
        assert_eq!(drained, Drained::default());
    }
}
