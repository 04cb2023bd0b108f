use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::device::test_util::{configure_queue, observed_interrupt};
use crate::devices::virtio::{ActivateError, VIRTIO_MMIO_INT_CONFIG};

pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
pub const STATS: u64 = 1 << F_STATS_VQ;
pub const REPORTING: u64 = 1 << F_REPORTING;
/// Where request buffers go, above the rings.
const BUFFERS: u64 = 0x10_0000;
/// Where pages the tests give back live.
const PAGES: u64 = 0x40_0000;

/// 16 MiB of guest RAM at 0.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

pub fn config(stats: u16, reporting: bool) -> BalloonConfig {
    BalloonConfig {
        amount_mib: 0,
        deflate_on_oom: false,
        stats_polling_interval_s: stats,
        free_page_reporting: reporting,
    }
}

/// The driver's side: one mock queue per queue the driver sets up, rings at 64 KiB
/// steps from 0.
pub struct Driver<'a> {
    mem: &'a GuestMemory,
    queues: Vec<MockSplitQueue<'a, GuestMemory>>,
    next_desc: Vec<u16>,
    next_buffer: u64,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemory, queues: usize) -> Self {
        Self {
            mem,
            queues: (0..queues)
                .map(|i| MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x1_0000), QUEUE_SIZE))
                .collect(),
            next_desc: vec![0; queues],
            next_buffer: BUFFERS,
        }
    }

    /// Sets up the driver's queues, acks `features`, activates.
    pub fn activate(
        &self,
        balloon: &mut Balloon,
        interrupt: Arc<Interrupt>,
        features: u64,
    ) -> Result<(), ActivateError> {
        for (index, mock) in self.queues.iter().enumerate() {
            let rings: Queue = mock.create_queue().unwrap();
            configure_queue(&mut balloon.queues_mut()[index], &rings);
        }
        balloon.set_acked_features(features);
        balloon.activate(self.mem.clone(), interrupt)
    }

    /// Makes one chain of (address, length, flags) available on `queue`.
    pub fn post(&mut self, queue: usize, descs: &[(u64, u32, u16)]) {
        let first = self.next_desc[queue];
        let count = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = i as u16;
                let (flags, next) = if i + 1 < count {
                    (flags | VRING_DESC_F_NEXT as u16, first + i + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.queues[queue].add_desc_chains(&raw, first).unwrap();
        self.next_desc[queue] += count;
    }

    /// Posts `bytes` in one device-readable buffer on `queue`.
    pub fn post_bytes(&mut self, queue: usize, bytes: &[u8]) {
        let addr = self.next_buffer;
        self.next_buffer += 0x1000;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.post(queue, &[(addr, bytes.len() as u32, 0)]);
    }

    pub fn post_pfns(&mut self, queue: usize, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.post_bytes(queue, &bytes);
    }

    pub fn used(&self, queue: usize) -> Vec<(u32, u32)> {
        let used = self.queues[queue].used();
        (0..used.idx().load())
            .map(|i| {
                let elem = used.ring().ref_at(i as usize).unwrap().load();
                (elem.id(), elem.len())
            })
            .collect()
    }
}

fn fill(mem: &GuestMemory, addr: u64, len: usize) {
    mem.write_slice(&vec![0xa5; len], GuestAddress(addr))
        .unwrap();
}

fn page_is(mem: &GuestMemory, addr: u64, byte: u8) -> bool {
    let mut page = [0u8; 4096];
    mem.read_slice(&mut page, GuestAddress(addr)).unwrap();
    page.iter().all(|&b| b == byte)
}

fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(tag, value)| {
            let mut entry = tag.to_le_bytes().to_vec();
            entry.extend_from_slice(&value.to_le_bytes());
            entry
        })
        .collect()
}

#[test]
fn features_queues_and_configuration_space() {
    let mut balloon = Balloon::new(&BalloonConfig {
        amount_mib: 3,
        deflate_on_oom: true,
        ..config(5, true)
    })
    .unwrap();
    assert_eq!(balloon.device_type(), 5);
    assert_eq!(
        balloon.avail_features(),
        VERSION_1 | STATS | REPORTING | 1 << F_DEFLATE_ON_OOM
    );
    assert_eq!(balloon.queues().len(), 4);
    assert!(balloon.queues().iter().all(|q| q.max_size() == QUEUE_SIZE));
    assert_eq!(Balloon::new(&config(0, false)).unwrap().queues().len(), 2);
    assert_eq!(
        Balloon::new(&config(0, true)).unwrap().avail_features(),
        VERSION_1 | REPORTING
    );

    let mut space = [0u8; 8];
    balloon.read_config(0, &mut space);
    assert_eq!(space, [0, 3, 0, 0, 0, 0, 0, 0]);
    // The driver writes `actual`; `num_pages` is the device's.
    balloon.write_config(4, &7u32.to_le_bytes());
    balloon.write_config(0, &[9; 4]);
    balloon.write_config(6, &[1; 4]);
    balloon.write_config(u64::MAX, &[1]);
    assert_eq!((balloon.target_pages(), balloon.actual_pages()), (768, 7));
}

#[test]
fn queue_numbers_follow_the_negotiated_features() {
    use QueueRole::*;
    assert_eq!(queue_roles(VERSION_1), [Inflate, Deflate]);
    assert_eq!(
        queue_roles(VERSION_1 | REPORTING),
        [Inflate, Deflate, Reporting]
    );
    assert_eq!(queue_roles(VERSION_1 | STATS), [Inflate, Deflate, Stats]);
    assert_eq!(
        queue_roles(VERSION_1 | STATS | REPORTING),
        [Inflate, Deflate, Stats, Reporting]
    );
}

/// A driver that declines statistics sets up three queues, the reporting queue third;
/// the device activates and serves reports there.
#[test]
fn a_declined_feature_moves_the_queues_after_it() {
    let mem = memory();
    let mut balloon = Balloon::new(&config(1, true)).unwrap();
    let mut driver = Driver::new(&mem, 3);
    let (interrupt, irq) = observed_interrupt();
    driver
        .activate(&mut balloon, interrupt, VERSION_1 | REPORTING)
        .unwrap();
    assert_eq!(balloon.role_of(2), Some(QueueRole::Reporting));
    assert_eq!(balloon.role_of(3), None);
    fill(&mem, PAGES, 0x4000);
    driver.post(2, &[(PAGES, 0x4000, WRITE)]);
    balloon.process_queue(2);
    assert_eq!(driver.used(2), [(0, 0)]);
    assert!(page_is(&mem, PAGES + 0x3000, 0));
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(balloon.metrics().reported_pages.get(), 4);

    // Two queues set up where three are needed: refused.
    let mut balloon = Balloon::new(&config(1, true)).unwrap();
    let (interrupt, _irq) = observed_interrupt();
    let short = Driver::new(&mem, 2);
    assert!(matches!(
        short.activate(&mut balloon, interrupt, VERSION_1 | REPORTING),
        Err(ActivateError::BadQueues(_))
    ));
}

#[test]
fn inflated_pages_are_given_back_and_deflated_ones_counted() {
    let mem = memory();
    let mut balloon = Balloon::new(&config(0, false)).unwrap();
    let mut driver = Driver::new(&mem, 2);
    let (interrupt, irq) = observed_interrupt();
    driver.activate(&mut balloon, interrupt, VERSION_1).unwrap();
    fill(&mem, PAGES, 0x4000);
    let pfn = (PAGES >> 12) as u32;
    driver.post_pfns(0, &[pfn, pfn + 1, pfn + 3]);
    balloon.process_queue(0);
    assert_eq!(driver.used(0), [(0, 0)]);
    assert_eq!(irq.read().unwrap(), 1);
    for (page, dropped) in [(0, true), (1, true), (2, false), (3, true)] {
        assert!(page_is(
            &mem,
            PAGES + page * 0x1000,
            if dropped { 0 } else { 0xa5 }
        ));
    }
    driver.post_pfns(1, &[pfn, pfn + 1]);
    balloon.process_queue(1);
    assert_eq!(driver.used(1), [(0, 0)]);
    let metrics = balloon.metrics();
    assert_eq!(
        (metrics.inflated_pages.get(), metrics.deflated_pages.get()),
        (3, 2)
    );
}

/// A page frame outside guest RAM (past its end, or a 32-bit value pointing nowhere)
/// refuses the whole request: nothing is dropped, the VMM keeps running, and the
/// driver still gets its buffer back.
#[test]
fn a_hostile_page_frame_is_refused() {
    let mem = memory();
    let mut balloon = Balloon::new(&config(0, false)).unwrap();
    let mut driver = Driver::new(&mem, 2);
    let (interrupt, _irq) = observed_interrupt();
    driver.activate(&mut balloon, interrupt, VERSION_1).unwrap();
    fill(&mem, PAGES, 0x1000);
    let pfn = (PAGES >> 12) as u32;
    driver.post_pfns(0, &[pfn, (16 << 20) >> 12]);
    driver.post_pfns(0, &[u32::MAX, pfn]);
    balloon.process_queue(0);
    assert_eq!(driver.used(0), [(0, 0), (1, 0)]);
    assert!(page_is(&mem, PAGES, 0xa5));
    assert_eq!(balloon.metrics().invalid_requests.get(), 2);
    assert_eq!(balloon.metrics().inflated_pages.get(), 0);
}

#[test]
fn statistics_are_held_and_handed_back_on_the_timer() {
    let mem = memory();
    let mut balloon = Balloon::new(&config(1, false)).unwrap();
    assert!(matches!(balloon.statistics(), Ok(s) if s.stats == BalloonStats::default()));
    let mut driver = Driver::new(&mem, 3);
    let (interrupt, irq) = observed_interrupt();
    driver
        .activate(&mut balloon, interrupt, VERSION_1 | STATS)
        .unwrap();
    driver.post_bytes(2, &stats_bytes(&[(4, 100 << 20), (5, 500 << 20), (3, 9)]));
    balloon.process_queue(2);
    // Held: not used yet.
    assert!(driver.used(2).is_empty());
    let stats = balloon.statistics().unwrap();
    assert_eq!(stats.stats.free_memory, Some(100 << 20));
    assert_eq!(stats.stats.total_memory, Some(500 << 20));
    assert_eq!(stats.stats.minor_faults, Some(9));
    balloon.on_stats_timer();
    assert_eq!(driver.used(2), [(0, 0)]);
    assert_eq!(irq.read().unwrap(), 1);
    // Nothing held: the timer does nothing.
    balloon.on_stats_timer();
    assert_eq!(driver.used(2).len(), 1);

    // The driver's fresh buffer replaces the statistics.
    driver.post_bytes(2, &stats_bytes(&[(4, 50 << 20)]));
    balloon.process_queue(2);
    assert_eq!(
        balloon.statistics().unwrap().stats.free_memory,
        Some(50 << 20)
    );
    assert_eq!(balloon.statistics().unwrap().stats.total_memory, None);
    assert_eq!(balloon.metrics().stats_updates.get(), 2);
}

#[test]
fn a_new_target_raises_a_configuration_interrupt() {
    let mem = memory();
    let mut balloon = Balloon::new(&config(0, true)).unwrap();
    // Before the driver runs, the target is only stored.
    balloon.update_target(2);
    assert_eq!(balloon.target_pages(), 512);
    let driver = Driver::new(&mem, 3);
    let (interrupt, irq) = observed_interrupt();
    driver
        .activate(&mut balloon, interrupt.clone(), VERSION_1 | REPORTING)
        .unwrap();
    balloon.update_target(10);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(
        interrupt.status() & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    let mut num_pages = [0u8; 4];
    balloon.read_config(0, &mut num_pages);
    assert_eq!(u32::from_le_bytes(num_pages), 2560);
    assert_eq!(balloon.config().amount_mib, 10);
}

#[test]
fn statistics_cannot_be_turned_on_or_off() {
    let mut off = Balloon::new(&config(0, true)).unwrap();
    assert_eq!(
        off.statistics().unwrap_err().to_string(),
        "the balloon's statistics are off (stats_polling_interval_s is 0)"
    );
    assert!(matches!(
        off.update_stats_interval(3),
        Err(BalloonError::StatsToggle("on"))
    ));
    off.update_stats_interval(0).unwrap();
    let mut on = Balloon::new(&config(5, true)).unwrap();
    assert!(matches!(
        on.update_stats_interval(0),
        Err(BalloonError::StatsToggle("off"))
    ));
    on.update_stats_interval(2).unwrap();
    assert_eq!(on.config().stats_polling_interval_s, 2);
}

#[test]
fn save_and_restore_keep_the_target_and_the_held_buffer() {
    let mem = memory();
    let mut balloon = Balloon::new(&config(1, true)).unwrap();
    let mut driver = Driver::new(&mem, 4);
    let (interrupt, _irq) = observed_interrupt();
    driver
        .activate(
            &mut balloon,
            interrupt.clone(),
            VERSION_1 | STATS | REPORTING,
        )
        .unwrap();
    balloon.update_target(4);
    balloon.write_config(4, &100u32.to_le_bytes());
    driver.post_bytes(2, &stats_bytes(&[(6, 7)]));
    balloon.process_queue(2);
    let state = balloon.save();
    assert_eq!(state.stats_desc, Some(0));
    let bytes = postcard::to_stdvec(&state).unwrap();
    let state: super::super::BalloonState = postcard::from_bytes(&bytes).unwrap();

    let mut restored = Balloon::restore(&state).unwrap();
    assert_eq!(restored.save(), state);
    restored.activate(mem.clone(), interrupt).unwrap();
    assert_eq!(
        (restored.target_pages(), restored.actual_pages()),
        (1024, 100)
    );
    assert_eq!(
        restored.statistics().unwrap().stats.available_memory,
        Some(7)
    );
    restored.on_stats_timer();
    assert_eq!(driver.used(2), [(0, 0)]);

    let mut other = state.clone();
    other.config.free_page_reporting = false;
    assert!(Balloon::restore(&other).is_err());
}
