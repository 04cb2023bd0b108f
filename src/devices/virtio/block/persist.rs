//! What a snapshot keeps of a virtio-blk device: its configuration (the caller may point
//! `config.path` at another image before restoring, even one of another size: the
//! device manager then tells the guest to re-read the capacity), the capacity the guest
//! was told, and the virtio state. Requests are served synchronously, so none is in
//! flight in a paused device: the queue indices say everything.

use serde::{Deserialize, Serialize};

use super::{Block, BlockConfig};
use crate::devices::virtio::persist::{DeviceCoreState, RestoreError};

const DEVICE: &str = "virtio-blk";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub config: BlockConfig,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub core: DeviceCoreState,
}

impl Block {
    pub fn save(&self) -> BlockState {
        BlockState {
            config: self.config.clone(),
            capacity: self.capacity(),
            core: self.core.save(),
        }
    }

    /// Opens `state.config`'s image and puts the saved queues and features back. The
    /// device is inactive until its transport is restored.
    pub fn restore(state: &BlockState) -> Result<Self, RestoreError> {
        let mut block = Block::new(&state.config).map_err(|e| RestoreError::Device {
            device: DEVICE,
            source: Box::new(e),
        })?;
        block.core.restore(&state.core)?;
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::device::tests::{new_block, Driver, IMAGE_SIZE};
    use super::super::test_util::{guest_memory, TempImage};
    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::device::test_util::observed_interrupt;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::persist::test_util::running;
    use crate::devices::virtio::persist::MmioTransportState;
    use crate::devices::virtio::{VirtioDevice, VIRTIO_MMIO_INT_VRING};

    const FEATURES: u64 = 1 << 32;

    #[test]
    fn save_restore_save_is_the_same_state() {
        let image = TempImage::new(IMAGE_SIZE);
        let block = new_block(&image, true);
        let state = block.save();
        assert_eq!(state.capacity, 128);
        assert_eq!(state.config.id.as_deref(), Some("disk0"));
        assert_eq!(state.core.queues.len(), 1);
        let json = serde_json::to_string(&state).unwrap();
        let restored = Block::restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(restored.save(), state);
    }

    #[test]
    fn the_rate_limiter_survives_a_snapshot() {
        use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

        let image = TempImage::new(IMAGE_SIZE);
        let mut block = new_block(&image, true);
        let limit = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::per_second(10 << 20, Some(1 << 20))),
            ops: Some(TokenBucketConfig::per_second(100, None)),
        };
        block.update_rate_limiter(&limit);
        let state = block.save();
        assert_eq!(state.config.rate_limiter, limit);
        drop(block);
        let bytes = postcard::to_stdvec(&state).unwrap();
        let restored = Block::restore(&postcard::from_bytes(&bytes).unwrap()).unwrap();
        assert_eq!(restored.rate_limiter().config(), limit);
    }

    /// The restored device goes on where the saved one stopped: it serves the next
    /// request the driver makes available, and only that one.
    #[test]
    fn restored_active_device_serves_from_the_saved_indices() {
        let mem = guest_memory();
        let image = TempImage::new(IMAGE_SIZE);
        let mut driver = Driver::new(&mem);
        let (interrupt, irq) = observed_interrupt();
        let state = {
            let mut block = new_block(&image, false);
            driver
                .activate(&mut block, interrupt.clone(), FEATURES)
                .unwrap();
            driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
            driver.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
            block.process_queue();
            assert_eq!(driver.used().len(), 2);
            block.save()
        };
        assert_eq!(state.core.queues[0].next_avail, 2);
        assert_eq!(state.core.acked_features, FEATURES);
        let _ = irq.read();

        // The writable image was locked by the saved device, released with it.
        let block = Arc::new(Mutex::new(Block::restore(&state).unwrap()));
        let transport =
            MmioTransport::restore(block.clone(), mem.clone(), interrupt, &running(FEATURES))
                .unwrap();
        assert!(lock(&block).is_active());
        // Activation woke the event loop.
        assert_eq!(lock(&block).queue_events()[0].read().unwrap(), 1);

        let id = 0x20_0000;
        let status = driver.submit(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[Descriptor::new(
                id,
                20,
                virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
                0,
            )],
        );
        lock(&block).process_queue();
        let used = driver.used();
        assert_eq!(used.len(), 3);
        assert_eq!(used[2], (4, 21));
        assert_eq!(driver.status(status), VIRTIO_BLK_S_OK as u8);
        let mut serial = [0u8; 5];
        mem.read_slice(&mut serial, GuestAddress(id)).unwrap();
        assert_eq!(&serial, b"disk0");
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(lock(&block).queues()[0].next_used(), 3);
        let saved_again = MmioTransportState {
            interrupt_status: VIRTIO_MMIO_INT_VRING,
            ..running(FEATURES)
        };
        assert_eq!(transport.save(), saved_again);
    }

    #[test]
    fn restore_takes_another_size_but_not_other_features() {
        let image = TempImage::new(IMAGE_SIZE);
        let state = new_block(&image, false).save();

        // Another size is the device manager's to announce; the device takes the new one.
        let smaller = TempImage::new(IMAGE_SIZE / 2);
        let mut moved = state.clone();
        moved.config.path = smaller.path().to_owned();
        assert_eq!(Block::restore(&moved).unwrap().capacity(), 64);

        // Read-only offers other features than the saved writable disk.
        let mut read_only = state.clone();
        read_only.config.read_only = true;
        assert!(matches!(
            Block::restore(&read_only),
            Err(RestoreError::Features { .. })
        ));

        let mut missing = state;
        missing.config.path = image.path().with_extension("missing");
        let error = Block::restore(&missing).err().unwrap();
        assert_eq!(error.to_string(), "cannot rebuild the virtio-blk device");
    }
}
