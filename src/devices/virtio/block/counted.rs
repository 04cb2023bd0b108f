//! The disk as the request code sees it, counted: a [`Backend`] that passes every call on
//! to the image and adds what was moved, and how each request ended, to the device's
//! [`BlockMetrics`].

use std::io;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::request::{Backend, RequestError};
use crate::metrics::BlockMetrics;

pub(super) struct Counted<'a, B> {
    pub disk: &'a mut B,
    pub metrics: &'a BlockMetrics,
}

impl<B: Backend> Backend for Counted<'_, B> {
    fn read_at<S: BitmapSlice>(&mut self, offset: u64, dst: &VolatileSlice<S>) -> io::Result<()> {
        self.disk.read_at(offset, dst)?;
        self.metrics.read_bytes.add(dst.len() as u64);
        Ok(())
    }

    fn write_at<S: BitmapSlice>(&mut self, offset: u64, src: &VolatileSlice<S>) -> io::Result<()> {
        self.disk.write_at(offset, src)?;
        self.metrics.write_bytes.add(src.len() as u64);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.disk.write_zeroes(offset, len, unmap)
    }

    fn request_done(&mut self, request_type: Option<u32>, outcome: Result<(), &RequestError>) {
        let metrics = self.metrics;
        let counter = match (request_type, outcome) {
            (_, Err(RequestError::Io(_))) => &metrics.io_errors,
            (_, Err(_)) => &metrics.invalid_requests,
            (Some(VIRTIO_BLK_T_IN), Ok(())) => &metrics.read_requests,
            (Some(VIRTIO_BLK_T_OUT), Ok(())) => &metrics.write_requests,
            (Some(VIRTIO_BLK_T_FLUSH), Ok(())) => &metrics.flush_requests,
            (_, Ok(())) => &metrics.other_requests,
        };
        counter.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::MemoryDisk;

    /// A disk whose every call fails.
    struct Broken;

    impl Backend for Broken {
        fn read_at<S: BitmapSlice>(&mut self, _: u64, _: &VolatileSlice<S>) -> io::Result<()> {
            Err(io::Error::other("broken"))
        }
        fn write_at<S: BitmapSlice>(&mut self, _: u64, _: &VolatileSlice<S>) -> io::Result<()> {
            Err(io::Error::other("broken"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("broken"))
        }
        fn discard(&mut self, _: u64, _: u64) -> io::Result<()> {
            Err(io::Error::other("broken"))
        }
        fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Err(io::Error::other("broken"))
        }
    }

    #[test]
    fn failed_transfers_move_no_bytes_and_outcomes_are_sorted() {
        let metrics = BlockMetrics::default();
        let mut buf = [0u8; 512];
        let slice = VolatileSlice::from(&mut buf[..]);

        let mut broken = Broken;
        let mut counted = Counted {
            disk: &mut broken,
            metrics: &metrics,
        };
        assert!(counted.read_at(0, &slice).is_err());
        assert!(counted.write_at(0, &slice).is_err());
        counted.request_done(
            Some(VIRTIO_BLK_T_IN),
            Err(&RequestError::Io(io::Error::other("broken"))),
        );
        counted.request_done(None, Err(&RequestError::NoHeader));
        assert_eq!(
            (metrics.read_bytes.get(), metrics.write_bytes.get()),
            (0, 0)
        );

        let mut disk = MemoryDisk::new(vec![0; 4096]);
        let mut counted = Counted {
            disk: &mut disk,
            metrics: &metrics,
        };
        counted.read_at(0, &slice).unwrap();
        counted.write_at(512, &slice).unwrap();
        counted.write_at(1024, &slice).unwrap();
        counted.request_done(Some(VIRTIO_BLK_T_IN), Ok(()));
        counted.request_done(Some(VIRTIO_BLK_T_OUT), Ok(()));
        counted.request_done(Some(VIRTIO_BLK_T_FLUSH), Ok(()));
        counted.request_done(Some(8), Ok(()));
        let counts = [
            metrics.read_bytes.get(),
            metrics.write_bytes.get(),
            metrics.read_requests.get(),
            metrics.write_requests.get(),
            metrics.flush_requests.get(),
            metrics.other_requests.get(),
            metrics.io_errors.get(),
            metrics.invalid_requests.get(),
        ];
        assert_eq!(counts, [512, 1024, 1, 1, 1, 1, 1, 1]);
    }
}
