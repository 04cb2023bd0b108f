//! The virtio-blk device: feature bits, configuration space, activation, and the request
//! queue loop.
//!
//! Activation and reset happen on vCPU threads through the shared [`DeviceCore`]; the
//! event loop (`event_handler.rs`) runs [`Block::process_queue`] when the queue's eventfd
//! fires.

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::counted::Counted;
use super::disk::DiskFile;
use super::request::{
    self, DiskParams, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SEG_MAX, SIZE_MAX,
};
use super::{BlockConfig, BlockError, ID_BYTES, SECTOR_SIZE};
use crate::devices::virtio::{
    drain_queue, ActivateError, DeviceCore, DeviceState, Interrupt, VirtioDevice,
};
use crate::metrics::BlockMetrics;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::vstate::memory::GuestMemory;

/// One request queue.
pub const QUEUE_SIZES: [u16; 1] = [256];
/// Discard granularity the guest is told about, in sectors (4 KiB, a filesystem block).
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// A virtio-blk device backed by a raw image.
pub struct Block {
    pub(super) core: DeviceCore,
    /// As built, for saving.
    pub(super) config: BlockConfig,
    pub(super) disk: DiskFile,
    config_space: Vec<u8>,
    /// What requests may do; the negotiated parts are set at activation.
    params: DiskParams,
    metrics: Arc<BlockMetrics>,
    /// Requests wait here when their bytes or their count exceed the configured rate.
    pub(super) limiter: RateLimiter,
}

impl Block {
    /// Opens and locks the image; validates the id.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let mut id = [0u8; ID_BYTES];
        if let Some(text) = &config.id {
            let bytes = text.as_bytes();
            if bytes.len() > ID_BYTES {
                return Err(BlockError::IdTooLong {
                    id: text.clone(),
                    len: bytes.len(),
                });
            }
            id[..bytes.len()].copy_from_slice(bytes);
        }
        let disk = DiskFile::open(&config.path, config.read_only)?;
        let read_only = disk.read_only();
        let core =
            DeviceCore::new(features(read_only), &QUEUE_SIZES).map_err(BlockError::Queues)?;
        let limiter = RateLimiter::new(&config.rate_limiter).map_err(BlockError::RateLimiter)?;
        Ok(Self {
            core,
            config: config.clone(),
            config_space: config_space(disk.capacity(), read_only),
            params: DiskParams {
                capacity: disk.capacity(),
                read_only,
                id,
                discard: false,
                write_zeroes: false,
            },
            disk,
            metrics: Arc::default(),
            limiter,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// Swaps the backing image for the one at `path`, opened the same way (read-only or
    /// not); the same file again picks up a new size. The guest is told the capacity may
    /// have changed (a configuration-change interrupt) and sees the new image from its
    /// next request on.
    pub fn replace_image(&mut self, path: &Path) -> Result<(), BlockError> {
        if self.disk.is_file(path) {
            self.disk.refresh_size(path)?;
        } else {
            self.disk = DiskFile::open(path, self.disk.read_only())?;
        }
        let capacity = self.disk.capacity();
        self.config.path = path.to_path_buf();
        self.config_space = config_space(capacity, self.disk.read_only());
        self.params.capacity = capacity;
        self.announce_config_change();
        Ok(())
    }

    /// Tells an activated driver to re-read the configuration space (the capacity). Also
    /// while paused: the interrupt is pending in KVM until the guest runs again.
    pub fn announce_config_change(&self) {
        if let DeviceState::Activated(active) = self.core.state() {
            active.interrupt.signal_config_change();
        }
    }

    /// True between activate and reset.
    pub fn is_active(&self) -> bool {
        self.core.is_activated()
    }

    /// Serves every available request the rate limiter lets through; signals the guest
    /// when the queue says it wants to hear about the used buffers. A request the limiter
    /// holds back stays first on the ring, and the limiter's timer brings the event loop
    /// back for it. Does nothing while the device is inactive or paused.
    pub fn process_queue(&mut self) {
        let Some((queues, active)) = self.core.active() else {
            return;
        };
        let (params, limiter) = (&self.params, &mut self.limiter);
        let disk = &mut Counted {
            disk: &mut self.disk,
            metrics: &self.metrics,
        };
        let mem = &active.mem;
        drain_queue(
            &mut queues[0],
            mem,
            &active.interrupt,
            usize::MAX,
            |chain| {
                let bytes = request::transfer_len(chain.clone(), mem);
                if !limiter.consume_request(bytes) {
                    disk.metrics.throttled.inc();
                    return None;
                }
                Some(request::process_chain(chain, mem, disk, params))
            },
        );
    }

    /// The limiter's timer fired: serve what it held back.
    pub(super) fn on_rate_limiter_timer(&mut self) {
        if self.limiter.on_timer() {
            self.process_queue();
        }
    }

    /// Changes the rate limiter on a running device (`PATCH /drives`): a bucket given
    /// replaces the one in force, an omitted one stays. The event loop then serves what a
    /// throttle held back, under the new limits.
    pub fn update_rate_limiter(&mut self, update: &RateLimiterConfig) {
        self.limiter.update(update);
        self.config.rate_limiter = self.limiter.config();
        if let Err(e) = self.core.queue_events()[0].write(1) {
            log::warn!("virtio-blk: cannot wake the event loop after a limiter change: {e}");
        }
    }

    /// The rate limiter, for its configuration and throttle count.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }
}

/// The feature bits offered.
fn features(read_only: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1 << bit);
    if read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    bits
}

/// `struct virtio_blk_config`, little-endian. Fields of features not offered stay zero.
fn config_space(capacity: u64, read_only: bool) -> Vec<u8> {
    fn put(space: &mut [u8], offset: usize, bytes: &[u8]) {
        space[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    let mut space = vec![0u8; size_of::<virtio_blk_config>()];
    put(
        &mut space,
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        &mut space,
        offset_of!(virtio_blk_config, size_max),
        &SIZE_MAX.to_le_bytes(),
    );
    put(
        &mut space,
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    let blk_size = SECTOR_SIZE as u32;
    put(
        &mut space,
        offset_of!(virtio_blk_config, blk_size),
        &blk_size.to_le_bytes(),
    );
    if !read_only {
        let sectors = MAX_DISCARD_SECTORS.to_le_bytes();
        let segments = MAX_DISCARD_SEGMENTS.to_le_bytes();
        put(
            &mut space,
            offset_of!(virtio_blk_config, max_discard_sectors),
            &sectors,
        );
        put(
            &mut space,
            offset_of!(virtio_blk_config, max_discard_seg),
            &segments,
        );
        put(
            &mut space,
            offset_of!(virtio_blk_config, discard_sector_alignment),
            &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
        );
        put(
            &mut space,
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            &sectors,
        );
        put(
            &mut space,
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            &segments,
        );
        put(
            &mut space,
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            &[1],
        );
    }
    space
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    /// Nothing is writable: `writeback` needs VIRTIO_BLK_F_CONFIG_WCE, not offered.
    fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let writable = !self.params.read_only;
        self.params.discard = writable && self.core.has_feature(VIRTIO_BLK_F_DISCARD);
        self.params.write_zeroes = writable && self.core.has_feature(VIRTIO_BLK_F_WRITE_ZEROES);
        self.core.activate(mem, interrupt)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::block::test_util::{guest_memory, pattern, TempImage};
    use crate::devices::virtio::device::test_util::configure_queue;
    use crate::devices::virtio::device::test_util::observed_interrupt;
    use crate::devices::virtio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

    pub const IMAGE_SIZE: usize = 64 << 10;
    const HEADERS: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUSES: u64 = 0x30_0000;

    pub fn new_block(image: &TempImage, read_only: bool) -> Block {
        Block::new(&BlockConfig {
            path: image.path().to_owned(),
            read_only,
            id: Some("disk0".into()),
            rate_limiter: Default::default(),
        })
        .unwrap()
    }

    /// The driver's view of one queue, at guest address 0.
    pub struct Driver<'a> {
        pub queue: MockSplitQueue<'a, GuestMemory>,
        mem: &'a GuestMemory,
        next_desc: u16,
        requests: u64,
    }

    impl<'a> Driver<'a> {
        pub fn new(mem: &'a GuestMemory) -> Self {
            Self {
                queue: MockSplitQueue::new(mem, QUEUE_SIZES[0]),
                mem,
                next_desc: 0,
                requests: 0,
            }
        }

        /// The transport's part: points the device's queue at this driver's rings, acks
        /// `features` and activates.
        pub fn activate(
            &self,
            block: &mut Block,
            interrupt: Arc<Interrupt>,
            features: u64,
        ) -> Result<(), ActivateError> {
            let rings: Queue = self.queue.create_queue().unwrap();
            configure_queue(&mut block.queues_mut()[0], &rings);
            block.set_acked_features(features);
            block.activate(self.mem.clone(), interrupt)
        }

        /// Makes a request available: header, `data` descriptors, status. Returns the
        /// address of its status byte.
        pub fn submit(&mut self, request_type: u32, sector: u64, data: &[Descriptor]) -> u64 {
            let header_addr = HEADERS + self.requests * 16;
            let status_addr = STATUSES + self.requests;
            self.requests += 1;
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&request_type.to_le_bytes());
            raw[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem
                .write_slice(&raw, GuestAddress(header_addr))
                .unwrap();
            self.mem
                .write_obj(0xeeu8, GuestAddress(status_addr))
                .unwrap();
            let mut descs = vec![Descriptor::new(header_addr, 16, 0, 0)];
            descs.extend_from_slice(data);
            descs.push(Descriptor::new(
                status_addr,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            ));
            let first = self.next_desc;
            let count = descs.len() as u16;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let i = i as u16;
                    let (flags, next) = if i + 1 < count {
                        (d.flags() | VRING_DESC_F_NEXT as u16, first + i + 1)
                    } else {
                        (d.flags(), 0)
                    };
                    RawDescriptor::from(Descriptor::new(d.addr().raw_value(), d.len(), flags, next))
                })
                .collect();
            self.queue.add_desc_chains(&raw, first).unwrap();
            self.next_desc += count;
            status_addr
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

        pub fn status(&self, addr: u64) -> u8 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        /// Sets `used_event` (the avail ring's trailing field) for VIRTIO_RING_F_EVENT_IDX.
        fn set_used_event(&self, value: u16) {
            let addr = self.queue.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZES[0]);
            self.mem.write_obj(value, GuestAddress(addr)).unwrap();
        }
    }

    fn writable(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    fn readable(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn config(block: &Block, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xffu8; len];
        block.read_config(offset, &mut data);
        data
    }

    #[test]
    fn features_follow_read_only() {
        let image = TempImage::new(IMAGE_SIZE);
        let bit = |b: u32| 1u64 << b;
        let common = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE);
        let block = new_block(&image, false);
        assert_eq!(block.device_type(), 2);
        assert_eq!(block.queues().len(), 1);
        assert_eq!(block.queues()[0].max_size(), 256);
        assert_eq!(block.queue_events().len(), 1);
        assert_eq!(
            block.avail_features(),
            common | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        );
        drop(block);
        let block = new_block(&image, true);
        assert_eq!(block.avail_features(), common | bit(VIRTIO_BLK_F_RO));
    }

    #[test]
    fn config_space_reads_are_bounded() {
        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, false);
        let le32 = |v: u32| v.to_le_bytes().to_vec();
        assert_eq!(config(&block, 0, 8), 128u64.to_le_bytes());
        assert_eq!(config(&block, 8, 4), le32(SIZE_MAX));
        assert_eq!(config(&block, 12, 4), le32(254));
        assert_eq!(config(&block, 20, 4), le32(512));
        assert_eq!(config(&block, 36, 4), le32(MAX_DISCARD_SECTORS));
        assert_eq!(config(&block, 40, 4), le32(MAX_DISCARD_SEGMENTS));
        assert_eq!(config(&block, 44, 4), le32(DISCARD_SECTOR_ALIGNMENT));
        assert_eq!(config(&block, 48, 4), le32(MAX_DISCARD_SECTORS));
        assert_eq!(config(&block, 52, 4), le32(MAX_DISCARD_SEGMENTS));
        assert_eq!(config(&block, 56, 1), [1]);
        // Odd offsets and sizes see the same little-endian bytes.
        assert_eq!(config(&block, 1, 3), [0, 0, 0]);
        assert_eq!(config(&block, 0, 1), [128]);
        assert_eq!(config(&block, 21, 2), [2, 0]);
        // Past the end: zeroes, whatever the offset.
        let len = size_of::<virtio_blk_config>() as u64;
        assert_eq!(config(&block, len - 2, 4), [0, 0, 0, 0]);
        assert_eq!(config(&block, len, 8), [0; 8]);
        assert_eq!(config(&block, u64::MAX, 8), [0; 8]);
        assert_eq!(config(&block, 1 << 40, 0), Vec::<u8>::new());
        // Writes change nothing.
        block.write_config(0, &[9; 8]);
        assert_eq!(config(&block, 0, 8), 128u64.to_le_bytes());
        drop(block);

        let block = new_block(&image, true);
        assert_eq!(config(&block, 0, 8), 128u64.to_le_bytes());
        assert_eq!(config(&block, 36, 24), [0; 24]);
    }

    #[test]
    fn id_is_at_most_20_bytes() {
        let image = TempImage::new(IMAGE_SIZE);
        let config = |id: &str| BlockConfig {
            path: image.path().to_owned(),
            read_only: true,
            id: Some(id.into()),
            rate_limiter: Default::default(),
        };
        let err = Block::new(&config("abcdefghijklmnopqrstu")).err().unwrap();
        assert_eq!(
            err.to_string(),
            "disk id \"abcdefghijklmnopqrstu\" is 21 bytes, longer than 20"
        );
        Block::new(&config("abcdefghijklmnopqrst")).unwrap();
    }

    #[test]
    fn requests_through_the_queue() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, false);
        let mut driver = Driver::new(&mem);
        let (interrupt, irq) = observed_interrupt();
        let features = block.avail_features();
        driver
            .activate(&mut block, interrupt.clone(), features)
            .unwrap();

        let payload: Vec<u8> = (0..1024u32).map(|i| (i * 13) as u8).collect();
        mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
        let write = driver.submit(VIRTIO_BLK_T_OUT, 4, &[readable(DATA, 1024)]);
        let read = driver.submit(VIRTIO_BLK_T_IN, 4, &[writable(DATA + 0x1000, 1024)]);
        let flush = driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        let get_id = driver.submit(VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA + 0x2000, 20)]);
        block.process_queue();

        assert_eq!(driver.used(), [(0, 1), (3, 1025), (6, 1), (8, 21)]);
        for status in [write, read, flush, get_id] {
            assert_eq!(driver.status(status), VIRTIO_BLK_S_OK as u8);
        }
        let contents = image.contents();
        assert_eq!(contents[2048..3072], payload[..]);
        assert_eq!(
            contents[..2048],
            (0..2048).map(pattern).collect::<Vec<_>>()[..]
        );
        let mut read_back = vec![0u8; 1024];
        mem.read_slice(&mut read_back, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(read_back, payload);
        let mut id = [0xffu8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA + 0x2000))
            .unwrap();
        assert_eq!(&id[..5], b"disk0");
        assert_eq!(id[5..], [0; 15]);
        let metrics = block.metrics();
        let counts = [
            metrics.write_requests.get(),
            metrics.write_bytes.get(),
            metrics.read_requests.get(),
            metrics.read_bytes.get(),
            metrics.flush_requests.get(),
            metrics.other_requests.get(),
            metrics.invalid_requests.get(),
        ];
        assert_eq!(counts, [1, 1024, 1, 1024, 1, 1, 0]);

        // One interrupt for the whole batch.
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn replacing_the_image_changes_capacity_and_tells_the_driver() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, false);
        let mut driver = Driver::new(&mem);
        let (interrupt, irq) = observed_interrupt();
        let features = block.avail_features();
        driver
            .activate(&mut block, interrupt.clone(), features)
            .unwrap();
        let capacity = |block: &Block| {
            let mut bytes = [0u8; 8];
            block.read_config(0, &mut bytes);
            u64::from_le_bytes(bytes)
        };
        assert_eq!(capacity(&block), (IMAGE_SIZE / 512) as u64);

        let bigger = TempImage::new(2 * IMAGE_SIZE);
        block.replace_image(bigger.path()).unwrap();
        assert_eq!(capacity(&block), (2 * IMAGE_SIZE / 512) as u64);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        // Reads now come from the new image, past the old one's end.
        let read = driver.submit(VIRTIO_BLK_T_IN, 200, &[writable(DATA, 512)]);
        block.process_queue();
        assert_eq!(driver.status(read), VIRTIO_BLK_S_OK as u8);

        // The same file again: its new size is read, although it is locked by us.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(bigger.path())
            .unwrap();
        file.set_len(3 * IMAGE_SIZE as u64).unwrap();
        block.replace_image(bigger.path()).unwrap();
        assert_eq!(capacity(&block), (3 * IMAGE_SIZE / 512) as u64);
        // A missing image leaves the device as it was.
        assert!(block
            .replace_image(Path::new("/nonexistent/disk.img"))
            .is_err());
        assert_eq!(capacity(&block), (3 * IMAGE_SIZE / 512) as u64);
    }

    #[test]
    fn read_only_disk_through_the_queue() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, true);
        let mut driver = Driver::new(&mem);
        let (interrupt, _irq) = observed_interrupt();
        driver.activate(&mut block, interrupt, u64::MAX).unwrap();
        mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        let write = driver.submit(VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 512)]);
        let read = driver.submit(VIRTIO_BLK_T_IN, 0, &[writable(DATA, 512)]);
        block.process_queue();
        assert_eq!(driver.used(), [(0, 1), (3, 513)]);
        assert_eq!(driver.status(write), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(driver.status(read), VIRTIO_BLK_S_OK as u8);
        assert_eq!(
            image.contents(),
            (0..IMAGE_SIZE).map(pattern).collect::<Vec<_>>()
        );
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, false);
        let mut driver = Driver::new(&mem);
        let (interrupt, irq) = observed_interrupt();
        let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
        driver.activate(&mut block, interrupt, features).unwrap();

        // used_event 0: the driver wants to hear when entry 0 is used.
        driver.set_used_event(0);
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        block.process_queue();
        assert_eq!(irq.read().unwrap(), 1);
        // Still 0: the second completion needs no interrupt.
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        block.process_queue();
        assert!(irq.read().is_err());
        // The driver caught up and asks again.
        driver.set_used_event(2);
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        block.process_queue();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(driver.used().len(), 3);
    }

    #[test]
    fn activation_checks_the_queue_and_sets_the_negotiated_parameters() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, false);
        let driver = Driver::new(&mem);
        let (interrupt, _irq) = observed_interrupt();

        // The driver never set the queue up.
        let unset = block.activate(mem.clone(), interrupt.clone());
        assert!(matches!(unset, Err(ActivateError::BadQueues(_))));
        driver.activate(&mut block, interrupt.clone(), 0).unwrap();
        block.reset();
        block.queues_mut()[0].set_ready(false);
        let not_ready = block.activate(mem.clone(), interrupt.clone());
        assert!(matches!(not_ready, Err(ActivateError::BadQueues(_))));
        assert!(!block.is_active());

        let discard = 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        driver.activate(&mut block, interrupt, discard).unwrap();
        assert!(block.is_active());
        assert!(block.params.discard && block.params.write_zeroes);
        assert!(!block.queues()[0].event_idx_enabled());
    }

    /// A guest that scribbles on its available ring gets no service, but the loop ends.
    #[test]
    fn broken_available_ring_does_not_spin() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, false);
        let mut driver = Driver::new(&mem);
        let (interrupt, _irq) = observed_interrupt();
        driver.activate(&mut block, interrupt, 0).unwrap();

        // A head index past the queue: an empty chain, returned to nobody.
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        driver.queue.avail().ring().ref_at(0).unwrap().store(300);
        block.process_queue();
        assert!(driver.used().is_empty());

        // An available index more than a queue's worth ahead.
        driver.queue.avail().idx().store(1000);
        block.process_queue();
        assert!(driver.used().is_empty());
    }

    #[test]
    fn reset_device_leaves_the_queue_alone() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, false);
        let mut driver = Driver::new(&mem);
        let (interrupt, irq) = observed_interrupt();
        driver.activate(&mut block, interrupt, 0).unwrap();
        block.reset();
        assert!(!block.is_active());
        driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
        block.process_queue();
        assert!(driver.used().is_empty());
        assert!(irq.read().is_err());
    }
}
