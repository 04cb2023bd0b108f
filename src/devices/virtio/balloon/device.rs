//! The balloon device: features, configuration space, and its queues.
//!
//! Queues are numbered as Linux's virtio-mmio driver finds them: inflate 0, deflate 1,
//! then one queue per negotiated feature that has one, in the order stats, free page
//! hinting (never offered here), reporting, with no gap for a feature left out. So the
//! reporting queue is 2 without statistics and 3 with them. The device makes a queue for
//! every feature it offers; which role each has is settled at activation from what the
//! driver accepted, and only the queues in use must be set up.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::QueueT;
use vmm_sys_util::timerfd::TimerFd;

use super::discard::discard_range;
use super::request::{pfn_ranges, read_pfns, read_stats, reported_ranges, BalloonStats};
use super::{BalloonConfig, BalloonError, PAGES_PER_MIB};
use crate::devices::virtio::{drain_queue, ActivateError, DeviceCore, Interrupt, VirtioDevice};
use crate::metrics::BalloonMetrics;
use crate::vstate::memory::GuestMemory;

/// Every queue's size. Linux needs at least 32 entries on the reporting queue
/// (PAGE_REPORTING_CAPACITY) or it gives up on reporting.
pub const QUEUE_SIZE: u16 = 256;

pub(super) const F_STATS_VQ: u32 = 1;
pub(super) const F_DEFLATE_ON_OOM: u32 = 2;
pub(super) const F_REPORTING: u32 = 5;

/// `num_pages` (the target, written by the device) and `actual` (written by the driver),
/// little-endian u32s. The rest of struct virtio_balloon_config belongs to features this
/// device does not offer.
const CONFIG_LEN: usize = 8;
const ACTUAL_OFFSET: usize = 4;

/// What a queue carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum QueueRole {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The queues the driver uses with `features` negotiated, by index.
pub(super) fn queue_roles(features: u64) -> Vec<QueueRole> {
    let has = |bit: u32| features & (1 << bit) != 0;
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if has(F_STATS_VQ) {
        roles.push(QueueRole::Stats);
    }
    if has(F_REPORTING) {
        roles.push(QueueRole::Reporting);
    }
    roles
}

fn offered_features(config: &BalloonConfig) -> u64 {
    let mut features = 1u64 << VIRTIO_F_VERSION_1;
    if config.stats_polling_interval_s > 0 {
        features |= 1 << F_STATS_VQ;
    }
    if config.deflate_on_oom {
        features |= 1 << F_DEFLATE_ON_OOM;
    }
    if config.free_page_reporting {
        features |= 1 << F_REPORTING;
    }
    features
}

/// `GET /balloon/statistics`, Firecracker's fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatistics {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(flatten)]
    pub stats: BalloonStats,
}

/// A virtio-balloon. Shared as `Arc<Mutex<Balloon>>` between the transport (vCPU
/// threads: configuration space, activation, reset), the event loop (queues, the
/// statistics timer) and the API (new target, statistics).
pub struct Balloon {
    pub(super) core: DeviceCore,
    config: BalloonConfig,
    config_space: [u8; CONFIG_LEN],
    /// What each queue carries, settled at activation.
    roles: Vec<QueueRole>,
    /// Fires every `stats_polling_interval_s` while the driver uses the stats queue.
    pub(super) stats_timer: TimerFd,
    pub(super) timer_watched: bool,
    /// The period the timer runs with (`None`: stopped). Only the event-loop thread
    /// changes the timer: activation and reset run on vCPU threads, whose seccomp filter
    /// has no timerfd_settime, and the wake-up they send brings the timer in line.
    timer_period: Option<u16>,
    /// The statistics buffer the driver posted, held until the device wants fresh ones.
    pub(super) stats_desc: Option<u16>,
    stats: BalloonStats,
    metrics: Arc<BalloonMetrics>,
}

impl Balloon {
    pub fn new(config: &BalloonConfig) -> Result<Self, BalloonError> {
        let features = offered_features(config);
        let queues = vec![QUEUE_SIZE; queue_roles(features).len()];
        let core = DeviceCore::new(features, &queues).map_err(BalloonError::Queues)?;
        let stats_timer = TimerFd::new().map_err(|e| BalloonError::Timer(e.into()))?;
        // Non-blocking: a stale readiness report must never stall the event loop.
        // SAFETY: F_GETFL and F_SETFL only change the flags of a descriptor this device owns.
        let result = unsafe {
            let fd = stats_timer.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if result < 0 {
            return Err(BalloonError::Timer(std::io::Error::last_os_error()));
        }
        let mut balloon = Self {
            core,
            config: config.clone(),
            config_space: [0; CONFIG_LEN],
            roles: Vec::new(),
            stats_timer,
            timer_watched: false,
            timer_period: None,
            stats_desc: None,
            stats: BalloonStats::default(),
            metrics: Arc::default(),
        };
        balloon.set_num_pages(config.target_pages());
        Ok(balloon)
    }

    pub fn metrics(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    /// The configuration in force: the latest target and polling interval.
    pub fn config(&self) -> BalloonConfig {
        self.config.clone()
    }

    fn set_num_pages(&mut self, pages: u32) {
        self.config_space[..ACTUAL_OFFSET].copy_from_slice(&pages.to_le_bytes());
    }

    fn field(&self, offset: usize) -> u32 {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&self.config_space[offset..offset + 4]);
        u32::from_le_bytes(bytes)
    }

    /// The pages the driver says the balloon holds.
    pub fn actual_pages(&self) -> u32 {
        self.field(ACTUAL_OFFSET)
    }

    pub fn target_pages(&self) -> u32 {
        self.field(0)
    }

    /// A new target (`PATCH /balloon`): the driver hears of it by a configuration
    /// interrupt, or reads it when it starts.
    pub fn update_target(&mut self, amount_mib: u32) {
        self.config.amount_mib = amount_mib;
        self.set_num_pages(self.config.target_pages());
        if let Some((_, active)) = self.core.active() {
            active.interrupt.signal_config_change();
        }
    }

    /// A new statistics interval (`PATCH /balloon/statistics`). Statistics cannot be
    /// turned on or off: that is a feature the driver negotiated at boot.
    pub fn update_stats_interval(&mut self, seconds: u16) -> Result<(), BalloonError> {
        match (self.config.stats_polling_interval_s, seconds) {
            (0, 1..) => return Err(BalloonError::StatsToggle("on")),
            (1.., 0) => return Err(BalloonError::StatsToggle("off")),
            _ => {}
        }
        self.config.stats_polling_interval_s = seconds;
        self.sync_stats_timer();
        Ok(())
    }

    /// What `GET /balloon/statistics` answers.
    pub fn statistics(&self) -> Result<BalloonStatistics, BalloonError> {
        if self.config.stats_polling_interval_s == 0 {
            return Err(BalloonError::StatsOff);
        }
        let (target_pages, actual_pages) = (self.target_pages(), self.actual_pages());
        Ok(BalloonStatistics {
            target_pages,
            actual_pages,
            target_mib: target_pages / PAGES_PER_MIB,
            actual_mib: actual_pages / PAGES_PER_MIB,
            stats: self.stats.clone(),
        })
    }

    pub(super) fn role_of(&self, index: usize) -> Option<QueueRole> {
        self.roles.get(index).copied()
    }

    fn uses_stats(&self) -> bool {
        self.roles.contains(&QueueRole::Stats)
    }

    /// Runs the statistics timer while the driver uses the stats queue and the device
    /// is not paused; stops it otherwise. On the event-loop thread only.
    pub(super) fn sync_stats_timer(&mut self) {
        let interval = self.config.stats_polling_interval_s;
        let wanted = (self.core.is_activated()
            && !self.core.is_paused()
            && self.uses_stats()
            && interval > 0)
            .then_some(interval);
        if wanted == self.timer_period {
            return;
        }
        let result = match wanted {
            Some(interval) => {
                let period = Duration::from_secs(u64::from(interval));
                self.stats_timer.reset(period, Some(period))
            }
            None => self.stats_timer.clear(),
        };
        match result {
            Ok(()) => self.timer_period = wanted,
            Err(e) => log::error!("virtio-balloon: cannot set the statistics timer: {e}"),
        }
    }

    /// The statistics timer fired: hand the held buffer back, so the driver refills it.
    pub(super) fn on_stats_timer(&mut self) {
        // Non-blocking: an empty count is not an error worth reporting.
        let _ = self.stats_timer.wait();
        let Some(index) = self.roles.iter().position(|r| *r == QueueRole::Stats) else {
            return;
        };
        let Some(head) = self.stats_desc else {
            return;
        };
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let queue = &mut queues[index];
        match queue.add_used(&active.mem, head, 0) {
            Ok(()) => {
                self.stats_desc = None;
                active.interrupt.notify_used(queue, &active.mem);
            }
            Err(e) => log::warn!("virtio-balloon: cannot return the statistics buffer: {e}"),
        }
    }

    /// Serves queue `index` by its role. Does nothing while inactive or paused.
    pub fn process_queue(&mut self, index: usize) {
        match self.role_of(index) {
            Some(QueueRole::Inflate) => self.process_pages(index, true),
            Some(QueueRole::Deflate) => self.process_pages(index, false),
            Some(QueueRole::Reporting) => self.process_reports(index),
            Some(QueueRole::Stats) => self.process_stats(index),
            None => {}
        }
    }

    /// Every queue, for a resume.
    pub(super) fn process_all(&mut self) {
        for index in 0..self.roles.len() {
            self.process_queue(index);
        }
    }

    /// Inflate: the pages leave the guest and the host drops them. Deflate: the guest
    /// takes them back, which needs nothing of the host. Every request is returned used,
    /// refused or not: the driver waits for it.
    fn process_pages(&mut self, index: usize, inflate: bool) {
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let (mem, metrics) = (&active.mem, &self.metrics);
        drain_queue(
            &mut queues[index],
            mem,
            &active.interrupt,
            usize::MAX,
            |chain| {
                let ranges = match read_pfns(mem, chain).and_then(|pfns| pfn_ranges(mem, &pfns)) {
                    Ok(ranges) => ranges,
                    Err(e) => {
                        log::warn!("virtio-balloon: refused a malformed request: {e}");
                        metrics.invalid_requests.inc();
                        return Some(0);
                    }
                };
                let pages = ranges.iter().map(|r| r.pages()).sum();
                if inflate {
                    discard(mem, &ranges, metrics);
                    metrics.inflated_pages.add(pages);
                } else {
                    metrics.deflated_pages.add(pages);
                }
                Some(0)
            },
        );
    }

    fn process_reports(&mut self, index: usize) {
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let (mem, metrics) = (&active.mem, &self.metrics);
        drain_queue(
            &mut queues[index],
            mem,
            &active.interrupt,
            usize::MAX,
            |chain| {
                match reported_ranges(mem, chain) {
                    Ok(ranges) => {
                        discard(mem, &ranges, metrics);
                        metrics.reports.inc();
                        metrics
                            .reported_pages
                            .add(ranges.iter().map(|r| r.pages()).sum());
                    }
                    Err(e) => {
                        log::warn!("virtio-balloon: refused a malformed free page report: {e}");
                        metrics.invalid_requests.inc();
                    }
                }
                Some(0)
            },
        );
    }

    /// Keeps the statistics buffer the driver posted (returned when the timer fires) and
    /// what it says. A second buffer while one is held means the driver gave up the
    /// first: that one goes back.
    fn process_stats(&mut self, index: usize) {
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let queue = &mut queues[index];
        let mem = &active.mem;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match read_stats(mem, chain) {
                Ok(stats) => {
                    self.stats = stats;
                    self.metrics.stats_updates.inc();
                }
                // Held all the same: returning it now would have the driver send it
                // again at once.
                Err(e) => {
                    log::warn!("virtio-balloon: unreadable statistics: {e}");
                    self.metrics.invalid_requests.inc();
                }
            }
            if let Some(old) = self.stats_desc.replace(head) {
                if let Err(e) = queue.add_used(mem, old, 0) {
                    log::warn!("virtio-balloon: cannot return a statistics buffer: {e}");
                }
                active.interrupt.notify_used(queue, mem);
            }
        }
    }

    /// Puts the saved statistics buffer and device fields back (persist.rs).
    pub(super) fn restore_fields(
        &mut self,
        actual: u32,
        stats_desc: Option<u16>,
        stats: BalloonStats,
    ) {
        self.config_space[ACTUAL_OFFSET..].copy_from_slice(&actual.to_le_bytes());
        self.stats_desc = stats_desc;
        self.stats = stats;
    }

    pub(super) fn latest_stats(&self) -> &BalloonStats {
        &self.stats
    }
}

fn discard(mem: &GuestMemory, ranges: &[super::request::GuestRange], metrics: &BalloonMetrics) {
    for &range in ranges {
        if let Err(e) = discard_range(mem, range) {
            log::warn!("virtio-balloon: {}", crate::error_chain(&e));
            metrics.discard_failures.inc();
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    /// Only `actual` is the driver's to write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = ACTUAL_OFFSET as u64;
        match offset.checked_add(data.len() as u64) {
            Some(end) if offset >= start && end <= CONFIG_LEN as u64 => {
                let offset = offset as usize;
                self.config_space[offset..offset + data.len()].copy_from_slice(data);
            }
            _ => log::debug!(
                "virtio-balloon: ignored a {}-byte configuration write at {offset:#x}",
                data.len()
            ),
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let roles = queue_roles(self.core.acked_features());
        self.core.activate_first(mem, interrupt, roles.len())?;
        self.roles = roles;
        Ok(())
    }

    fn reset(&mut self) {
        self.core.deactivate();
        self.roles.clear();
        self.stats_desc = None;
    }
}

/// The device's tests, and the driver stand-in the folder's other tests use.
#[cfg(test)]
pub(super) mod tests;
