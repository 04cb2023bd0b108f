//! The host side a virtio-net device moves frames to and from: a tap, whose frames carry
//! a virtio-net header (so offloads pass through), or a stream socket to passt, whose
//! frames are plain (the header is made here on receive and dropped on transmit).
//! The device logic sees one interface: frames with the header in front.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use super::header::VNET_HDR_LEN;
use super::stream::{StreamBackend, StreamOrigin};
use super::tap::{Tap, TapError};
use super::NetBackend;

#[derive(Debug)]
pub enum Backend {
    Tap(Tap),
    Stream(StreamBackend),
}

impl Backend {
    /// Opens the back end `config` names (a tap, a socket made ready earlier or
    /// connected now).
    pub fn open(config: &NetBackend) -> Result<Self, super::NetError> {
        Ok(match config {
            NetBackend::Tap(name) => Backend::Tap(Tap::open(name)?),
            NetBackend::Stream(path) => {
                Backend::Stream(StreamBackend::open(&StreamOrigin::Path(path.clone()))?)
            }
            NetBackend::User(_) => Backend::Stream(StreamBackend::open(&StreamOrigin::User)?),
        })
    }

    /// Whether frames may carry offloads (a tap: yes; passt wants whole frames).
    pub fn offloads(&self) -> bool {
        matches!(self, Backend::Tap(_))
    }

    /// A name for messages: `tap device "tap0"`, `passt`, ...
    pub fn describe(&self) -> String {
        match self {
            Backend::Tap(tap) => format!("tap device \"{}\"", tap.name()),
            Backend::Stream(stream) => stream.describe(),
        }
    }

    /// Sets the receive offloads (taps only; a stream has none).
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        match self {
            Backend::Tap(tap) => tap.set_offload(flags),
            Backend::Stream(_) => Ok(()),
        }
    }

    /// Reads one frame with a virtio-net header in front into `buf`; `WouldBlock` when
    /// none is ready. A stream's frame gets an empty header (no offload, no checksum
    /// flags); the device fills in `num_buffers`.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Backend::Tap(tap) => tap.read(buf),
            Backend::Stream(stream) => {
                let Some((header, frame)) = buf.split_first_chunk_mut::<VNET_HDR_LEN>() else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "buffer too small",
                    ));
                };
                let len = stream.read_frame(frame)?;
                *header = [0; VNET_HDR_LEN];
                Ok(VNET_HDR_LEN + len)
            }
        }
    }

    /// Writes one frame given with its virtio-net header in front (a stream gets the
    /// frame only: without offloads negotiated the header says nothing).
    pub fn write(&mut self, frame: &[u8]) -> io::Result<usize> {
        match self {
            Backend::Tap(tap) => tap.write(frame),
            Backend::Stream(stream) => stream.write_frame(frame.get(VNET_HDR_LEN..).unwrap_or(&[])),
        }
    }

    /// A frame is half written: take no more until [`Self::flush`] finished it.
    pub fn tx_blocked(&self) -> bool {
        match self {
            Backend::Tap(_) => false,
            Backend::Stream(stream) => stream.tx_blocked(),
        }
    }

    /// Sends what a short write left; `Ok(true)` when nothing is left.
    pub fn flush(&mut self) -> io::Result<bool> {
        match self {
            Backend::Tap(_) => Ok(true),
            Backend::Stream(stream) => stream.flush(),
        }
    }

    /// Frames are waiting in our own buffer, whether or not the descriptor is readable.
    pub fn has_buffered_frame(&self) -> bool {
        match self {
            Backend::Tap(_) => false,
            Backend::Stream(stream) => stream.has_buffered_frame(),
        }
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Backend::Tap(tap) => tap.as_raw_fd(),
            Backend::Stream(stream) => stream.as_raw_fd(),
        }
    }
}

impl AsFd for Backend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Backend::Tap(tap) => tap.as_fd(),
            Backend::Stream(stream) => stream.as_fd(),
        }
    }
}
