//! The virtio-rng device: feature bits, activation, and the request queue loop.
//!
//! Every chain the driver makes available is a request for as many random bytes as its
//! device-writable buffers hold (virtio 1.2, 5.4). The device fills it from the host's
//! getrandom, at most [`MAX_REQUEST_BYTES`] of it, and returns it used with the length
//! written. Activation and reset happen on vCPU threads through the shared
//! [`DeviceCore`]; the event loop (`event_handler.rs`) runs [`Rng::process_queue`] when
//! the queue's eventfd fires.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemory as GuestMemoryTrait;

use super::{RngConfig, RngError};
use crate::devices::virtio::buffer::parse_writable_chain;
use crate::devices::virtio::{drain_queue, DeviceCore, VirtioDevice};
use crate::metrics::RngMetrics;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};

/// One request queue.
pub const QUEUE_SIZES: [u16; 1] = [256];
/// The most one request is given, however large its buffers: what the device allocates
/// for the guest, once. Linux asks for at most a few cache lines at a time.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;

/// A virtio-rng device backed by the host's getrandom.
pub struct Rng {
    pub(super) core: DeviceCore,
    /// Where the host's bytes wait on their way to the guest, reused for every request.
    buffer: Vec<u8>,
    metrics: Arc<RngMetrics>,
    /// Requests wait here when their bytes or their count exceed the configured rate.
    pub(super) limiter: RateLimiter,
}

impl Rng {
    pub fn new(config: &RngConfig) -> Result<Self, RngError> {
        let core = DeviceCore::new(AVAIL_FEATURES, &QUEUE_SIZES).map_err(RngError::Queues)?;
        let limiter = RateLimiter::new(&config.rate_limiter).map_err(RngError::RateLimiter)?;
        Ok(Self {
            core,
            buffer: vec![0; MAX_REQUEST_BYTES],
            metrics: Arc::default(),
            limiter,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// The configuration in force, for saving.
    pub fn config(&self) -> RngConfig {
        RngConfig {
            rate_limiter: self.limiter.config(),
        }
    }

    /// Changes the rate limiter on a running device: a bucket given replaces the one in
    /// force, an omitted one stays; what a throttle held back is served again.
    pub fn update_rate_limiter(&mut self, update: &RateLimiterConfig) {
        self.limiter.update(update);
        if let Err(e) = self.core.queue_events()[0].write(1) {
            log::warn!("virtio-rng: cannot wake the event loop after a limiter change: {e}");
        }
    }

    /// The rate limiter, for its configuration and throttle count.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The limiter's timer fired: serve what it held back.
    pub(super) fn on_rate_limiter_timer(&mut self) {
        if self.limiter.on_timer() {
            self.process_queue();
        }
    }

    /// True between activate and reset.
    pub fn is_active(&self) -> bool {
        self.core.is_activated()
    }

    /// Fills every available request the rate limiter lets through; signals the guest
    /// when the queue says it wants to hear about the used buffers. A request the limiter
    /// holds back stays first on the ring until its timer fires. Does nothing while the
    /// device is inactive or paused.
    pub fn process_queue(&mut self) {
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let (mem, buffer, metrics) = (&active.mem, &mut self.buffer, &self.metrics);
        let limiter = &mut self.limiter;
        drain_queue(
            &mut queues[0],
            mem,
            &active.interrupt,
            usize::MAX,
            |chain| {
                let wanted = requested_len(mem, chain.clone(), buffer.len());
                if !limiter.consume_request(wanted) {
                    metrics.throttled.inc();
                    return None;
                }
                let entropy =
                    |buf: &mut [u8]| host_entropy(buf).inspect_err(|_| metrics.errors.inc());
                let len = fill_chain(mem, chain, buffer, entropy);
                metrics.requests.inc();
                metrics.bytes.add(u64::from(len));
                Some(len)
            },
        );
    }
}

/// Fills one request, the chain `descriptors`, with bytes from `entropy`: as many as the
/// chain holds, at most `buffer.len()`. Returns the length to put in the used ring. A
/// chain the device cannot write (a device-readable descriptor, a buffer outside guest
/// memory, a broken chain) and a failing source get nothing: the chain goes back with
/// length 0, and the driver asks again.
pub fn fill_chain<M, I>(
    mem: &M,
    descriptors: I,
    buffer: &mut [u8],
    entropy: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> u32
where
    M: GuestMemoryTrait + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let chain = match parse_writable_chain(mem, descriptors, 0) {
        Ok(chain) => chain,
        Err(e) => {
            log::debug!("virtio-rng: returning an unusable request empty: {e}");
            return 0;
        }
    };
    let wanted = chain.capacity().min(buffer.len());
    let filled = match entropy(&mut buffer[..wanted]) {
        Ok(filled) => filled.min(wanted),
        Err(e) => {
            log::warn!("virtio-rng: the host gave no random bytes: {e}");
            return 0;
        }
    };
    let written = chain
        .write(mem, &[&buffer[..filled]])
        .unwrap_or_else(|written| written);
    // At most `buffer.len()`, which the device keeps far below 4 GiB.
    u32::try_from(written).unwrap_or(0)
}

/// How many bytes [`fill_chain`] would give the request `descriptors` (at most `max`),
/// for rate limiting; 0 for a chain it would return empty.
pub fn requested_len<M, I>(mem: &M, descriptors: I, max: usize) -> u64
where
    M: GuestMemoryTrait + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    parse_writable_chain(mem, descriptors, 0).map_or(0, |chain| chain.capacity().min(max) as u64)
}

/// Fills `buf` from the host's random pool (the same one /dev/urandom reads) without ever
/// blocking the event loop: GRND_NONBLOCK only fails before the host's pool is
/// initialised. Returns how much was filled, which is all of `buf` unless getrandom
/// stopped early.
pub fn host_entropy(buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, memory this
        // function borrows mutably for the call.
        let n =
            unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), libc::GRND_NONBLOCK) };
        match n {
            n if n > 0 => filled += n as usize,
            0 => break,
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if filled > 0 {
                    break;
                }
                return Err(error);
            }
        }
    }
    Ok(filled)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    /// virtio-rng has no configuration space.
    fn config_space(&self) -> &[u8] {
        &[]
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::device::test_util::configure_queue;
    use crate::devices::virtio::device::test_util::observed_interrupt;
    use crate::devices::virtio::{ActivateError, Interrupt};
    use crate::vstate::memory::GuestMemory;

    pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    /// Where test buffers go: above the rings, which sit at 0.
    pub const DATA: u64 = 0x10_0000;
    /// What test buffers hold before the device writes them.
    pub const UNTOUCHED: u8 = 0xa5;
    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    /// Guest RAM for tests: 16 MiB at 0.
    pub fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    pub fn new_rng() -> Rng {
        Rng::new(&RngConfig::default()).unwrap()
    }

    /// The driver's view of the request queue, at guest address 0.
    pub struct Driver<'a> {
        pub queue: MockSplitQueue<'a, GuestMemory>,
        mem: &'a GuestMemory,
        next_desc: u16,
    }

    impl<'a> Driver<'a> {
        pub fn new(mem: &'a GuestMemory) -> Self {
            Self {
                queue: MockSplitQueue::new(mem, QUEUE_SIZES[0]),
                mem,
                next_desc: 0,
            }
        }

        /// The transport's part: points the device's queue at this driver's rings, acks
        /// `features` and activates.
        pub fn activate(
            &self,
            rng: &mut Rng,
            interrupt: Arc<Interrupt>,
            features: u64,
        ) -> Result<(), ActivateError> {
            let rings: Queue = self.queue.create_queue().unwrap();
            configure_queue(&mut rng.queues_mut()[0], &rings);
            rng.set_acked_features(features);
            rng.activate(self.mem.clone(), interrupt)
        }

        /// Makes one chain of `(address, length, flags)` descriptors available, its
        /// buffers filled with [`UNTOUCHED`] where they lie in guest memory (the first
        /// MiB of each: the tests' real buffers are smaller).
        pub fn post(&mut self, descs: &[(u64, u32, u16)]) {
            let first = self.next_desc;
            let count = descs.len() as u16;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let fill = vec![UNTOUCHED; (len as usize).min(1 << 20)];
                    let _ = self.mem.write_slice(&fill, GuestAddress(addr));
                    let i = i as u16;
                    let (flags, next) = if i + 1 < count {
                        (flags | VRING_DESC_F_NEXT as u16, first + i + 1)
                    } else {
                        (flags, 0)
                    };
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
                })
                .collect();
            self.queue.add_desc_chains(&raw, first).unwrap();
            self.next_desc += count;
        }

        /// (descriptor head, length) of every used entry so far.
        pub fn used(&self) -> Vec<(u32, u32)> {
            let count = self.queue.used().idx().load();
            (0..count)
                .map(|i| {
                    let elem = self.queue.used().ring().ref_at(i as usize).unwrap().load();
                    (elem.id(), elem.len())
                })
                .collect()
        }

        pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0u8; len];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            bytes
        }
    }

    /// Bytes that came from a random source, not from the test: 32 or more of them all
    /// [`UNTOUCHED`] would happen once in 2^256 runs.
    pub fn random(bytes: &[u8]) -> bool {
        bytes.len() < 32 || bytes.iter().any(|&b| b != UNTOUCHED)
    }

    #[test]
    fn an_entropy_device_with_one_queue_and_no_config_space() {
        let mut rng = new_rng();
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queues().len(), 1);
        assert_eq!(rng.queues()[0].max_size(), 256);
        assert_eq!(rng.queue_events().len(), 1);
        assert_eq!(rng.avail_features(), AVAIL_FEATURES);
        rng.write_config(0, &[1; 4]);
        let mut data = [0xffu8; 8];
        rng.read_config(0, &mut data);
        assert_eq!(data, [0; 8]);
    }

    #[test]
    fn requests_are_filled_and_used_with_their_length() {
        let mem = memory();
        let mut rng = new_rng();
        let mut driver = Driver::new(&mem);
        let (interrupt, irq) = observed_interrupt();
        driver.activate(&mut rng, interrupt, VERSION_1).unwrap();

        // Two segments (one empty) make one 64-byte request; then a 40-byte one.
        driver.post(&[
            (DATA, 16, WRITE),
            (DATA + 0x100, 0, WRITE),
            (DATA + 0x1000, 48, WRITE),
        ]);
        driver.post(&[(DATA + 0x2000, 40, WRITE)]);
        rng.process_queue();

        assert_eq!(driver.used(), [(0, 64), (3, 40)]);
        let first = [driver.read(DATA, 16), driver.read(DATA + 0x1000, 48)].concat();
        assert!(random(&first), "{first:?}");
        assert!(random(&driver.read(DATA + 0x2000, 40)));
        // Nothing beyond the buffers.
        assert_eq!(driver.read(DATA + 16, 16), [0; 16]);
        assert_eq!(driver.read(DATA + 0x2000 + 40, 8), [0; 8]);
        // One interrupt for the batch.
        assert_eq!(irq.read().unwrap(), 1);
        let metrics = rng.metrics();
        let counts = [
            metrics.requests.get(),
            metrics.bytes.get(),
            metrics.errors.get(),
        ];
        assert_eq!(counts, [2, 104, 0]);
    }

    #[test]
    fn two_requests_get_different_bytes() {
        let mem = memory();
        let mut rng = new_rng();
        let mut driver = Driver::new(&mem);
        let (interrupt, _irq) = observed_interrupt();
        driver.activate(&mut rng, interrupt, VERSION_1).unwrap();
        driver.post(&[(DATA, 64, WRITE)]);
        rng.process_queue();
        driver.post(&[(DATA + 0x1000, 64, WRITE)]);
        rng.process_queue();
        assert_eq!(driver.used(), [(0, 64), (1, 64)]);
        let (first, second) = (driver.read(DATA, 64), driver.read(DATA + 0x1000, 64));
        assert!(random(&first) && random(&second));
        assert_ne!(first, second);
    }

    /// Chains the device cannot write go back empty, untouched, and the requests after
    /// them are still served.
    #[test]
    fn unusable_chains_are_returned_empty() {
        let mem = memory();
        let mut rng = new_rng();
        let mut driver = Driver::new(&mem);
        let (interrupt, _irq) = observed_interrupt();
        driver.activate(&mut rng, interrupt, VERSION_1).unwrap();

        // Device-readable: what the guest gave the device to read.
        driver.post(&[(DATA, 64, 0)]);
        // Writable, then readable.
        driver.post(&[(DATA + 0x1000, 64, WRITE), (DATA + 0x2000, 64, 0)]);
        // Outside guest memory, and across its end.
        driver.post(&[(1 << 40, 64, WRITE)]);
        driver.post(&[((16 << 20) - 8, 64, WRITE)]);
        // Nothing to fill.
        driver.post(&[(DATA + 0x3000, 0, WRITE)]);
        driver.post(&[(DATA + 0x4000, 32, WRITE)]);
        rng.process_queue();

        assert_eq!(
            driver.used(),
            [(0, 0), (1, 0), (3, 0), (4, 0), (5, 0), (6, 32)]
        );
        for addr in [DATA, DATA + 0x1000, DATA + 0x2000] {
            assert_eq!(driver.read(addr, 64), [UNTOUCHED; 64]);
        }
        assert!(random(&driver.read(DATA + 0x4000, 32)));
    }

    /// A descriptor whose `next` points past the table ends the chain early: the
    /// chain is broken, not a smaller request.
    #[test]
    fn a_broken_chain_is_returned_empty() {
        let mem = memory();
        let descs = [Descriptor::new(
            DATA,
            64,
            WRITE | VRING_DESC_F_NEXT as u16,
            999,
        )];
        let mut buffer = [0u8; 128];
        assert_eq!(fill_chain(&mem, descs, &mut buffer, host_entropy), 0);
    }

    #[test]
    fn a_request_gets_at_most_the_bound() {
        let mem = memory();
        let mut rng = new_rng();
        let mut driver = Driver::new(&mem);
        let (interrupt, _irq) = observed_interrupt();
        driver.activate(&mut rng, interrupt, VERSION_1).unwrap();
        let segment = MAX_REQUEST_BYTES as u32;
        driver.post(&[
            (DATA, segment, WRITE),
            (DATA + 0x10_0000, segment, WRITE),
            (DATA + 0x20_0000, u32::MAX, WRITE),
        ]);
        driver.post(&[(DATA + 0x40_0000, 16, WRITE)]);
        rng.process_queue();
        // The huge descriptor does not fit in guest memory: the chain is refused whole.
        assert_eq!(driver.used(), [(0, 0), (3, 16)]);

        driver.post(&[(DATA, segment, WRITE), (DATA + 0x10_0000, segment, WRITE)]);
        rng.process_queue();
        assert_eq!(driver.used()[2], (4, segment));
        assert!(random(&driver.read(DATA, MAX_REQUEST_BYTES)));
        assert_eq!(driver.read(DATA + 0x10_0000, 64), [UNTOUCHED; 64]);
    }

    #[test]
    fn what_the_source_gives_is_what_the_guest_gets() {
        let mem = memory();
        let descs = || [Descriptor::new(DATA, 64, WRITE, 0)];
        let mut buffer = [0u8; 128];
        let short = |buf: &mut [u8]| {
            buf[..10].fill(7);
            Ok(10)
        };
        assert_eq!(fill_chain(&mem, descs(), &mut buffer, short), 10);
        let mut bytes = [0u8; 11];
        mem.read_slice(&mut bytes, GuestAddress(DATA)).unwrap();
        assert_eq!(bytes[..10], [7; 10]);
        assert_eq!(bytes[10], 0);

        let failing = |_: &mut [u8]| Err(io::Error::from(io::ErrorKind::WouldBlock));
        assert_eq!(fill_chain(&mem, descs(), &mut buffer, failing), 0);
        // A source claiming more than it was asked for is held to the request.
        let boastful = |buf: &mut [u8]| Ok(buf.len() + 100);
        assert_eq!(fill_chain(&mem, descs(), &mut buffer, boastful), 64);
    }

    #[test]
    fn the_host_fills_what_it_is_asked_to() {
        let mut buf = vec![UNTOUCHED; MAX_REQUEST_BYTES];
        assert_eq!(host_entropy(&mut buf).unwrap(), MAX_REQUEST_BYTES);
        assert!(random(&buf));
        assert_eq!(host_entropy(&mut []).unwrap(), 0);
    }

    #[test]
    fn an_inactive_or_reset_device_serves_nothing() {
        let mem = memory();
        let mut rng = new_rng();
        let mut driver = Driver::new(&mem);
        let (interrupt, irq) = observed_interrupt();
        driver.post(&[(DATA, 16, WRITE)]);
        rng.process_queue();
        assert!(driver.used().is_empty());

        driver.activate(&mut rng, interrupt, VERSION_1).unwrap();
        rng.reset();
        assert!(!rng.is_active());
        rng.process_queue();
        assert!(driver.used().is_empty());
        assert!(irq.read().is_err());
        assert_eq!(driver.read(DATA, 16), [UNTOUCHED; 16]);
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let mem = memory();
        let mut rng = new_rng();
        let mut driver = Driver::new(&mem);
        let (interrupt, irq) = observed_interrupt();
        driver
            .activate(&mut rng, interrupt, AVAIL_FEATURES)
            .unwrap();
        assert!(rng.queues()[0].event_idx_enabled());
        // used_event (the avail ring's trailing field) 0: an interrupt for entry 0 only.
        let used_event = driver.queue.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZES[0]);
        mem.write_obj(0u16, GuestAddress(used_event)).unwrap();
        driver.post(&[(DATA, 16, WRITE)]);
        rng.process_queue();
        assert_eq!(irq.read().unwrap(), 1);
        driver.post(&[(DATA, 16, WRITE)]);
        rng.process_queue();
        assert!(irq.read().is_err());
        assert_eq!(driver.used().len(), 2);
    }
}
