//! hearth's side of the vhost-user protocol with one back end (virtiofsd), through rust-vmm's
//! `vhost` crate: the handshake when the device is built ([`Backend::connect`]), handing
//! over guest memory and the rings at activation ([`Backend::start`]), and taking the
//! rings back ([`Backend::stop`]) for a reset, a pause or a snapshot.
//!
//! Every call blocks on the socket, so the socket has a timeout: a back end that stops
//! answering fails the call after [`REPLY_TIMEOUT`] instead of hanging the vCPU or the
//! event loop that made it.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

/// Longest hearth waits for one reply of the back end.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The virtio features hearth passes from the back end to the driver; anything else the
/// back end offers (notifications, DAX windows, ...) needs front-end support hearth does
/// not have.
pub const GUEST_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX;

/// The protocol features hearth uses when the back end has them: several request queues,
/// and an acknowledgement of every request (so a request the back end refuses is an
/// error here, not a silent misconfiguration).
const PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to the vhost-user back end at \"{path}\"")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the back end's {step} failed")]
    Protocol {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the back end lacks {0}")]
    Missing(&'static str),
    #[error("the back end serves {available} queues, the device has {wanted}")]
    Queues { available: u64, wanted: usize },
    #[error("queue {index}'s {ring} at guest {address:#x} is outside guest memory")]
    Ring {
        index: usize,
        ring: &'static str,
        address: u64,
    },
    #[error("the back end is gone (it failed earlier)")]
    Gone,
    #[error("guest memory is not shareable (no memfd behind it)")]
    Memory(#[source] vhost::Error),
}

/// What one ring needs for the back end to take it over: where the driver put it, where
/// the device is in it, and the eventfds of both directions.
pub struct Vring<'a> {
    pub index: usize,
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next available entry the back end is to serve.
    pub base: u16,
    /// The guest's notifications (the queue's ioeventfd).
    pub kick: &'a EventFd,
    /// The back end's used-buffer notifications.
    pub call: &'a EventFd,
}

/// A connected, negotiated vhost-user back end.
pub struct Backend {
    frontend: Frontend,
    /// The same socket, for the event loop to notice the back end hanging up.
    socket: UnixStream,
    /// The virtio features the back end offered.
    features: u64,
}

fn protocol(step: &'static str) -> impl FnOnce(vhost::Error) -> BackendError {
    move |source| BackendError::Protocol { step, source }
}

impl Backend {
    /// Connects to the back end listening at `path` and negotiates with it for a device of
    /// `queues` queues.
    pub fn connect(path: &Path, queues: usize) -> Result<Self, BackendError> {
        let stream = UnixStream::connect(path).map_err(|source| BackendError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::handshake(stream, queues).map_err(|e| match e {
            BackendError::Connect { source, .. } => BackendError::Connect {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// The handshake on a connected socket: SET_OWNER, the virtio features (the back end
    /// must have VHOST_USER_F_PROTOCOL_FEATURES, as virtiofsd does, for the queues to be
    /// enabled one by one), the protocol features, and the number of queues.
    pub fn handshake(stream: UnixStream, queues: usize) -> Result<Self, BackendError> {
        let connect_err = |source| BackendError::Connect {
            path: Default::default(),
            source,
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(connect_err)?;
        let socket = stream.try_clone().map_err(connect_err)?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        frontend.set_owner().map_err(protocol("SET_OWNER"))?;
        let features = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(BackendError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(BackendError::Missing("VIRTIO_F_VERSION_1"));
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
        let acked = offered & PROTOCOL_FEATURES;
        frontend
            .set_protocol_features(acked)
            .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let available = frontend
                .get_queue_num()
                .map_err(protocol("GET_QUEUE_NUM"))?;
            if available < queues as u64 {
                return Err(BackendError::Queues {
                    available,
                    wanted: queues,
                });
            }
        } else if queues > 2 {
            // Without MQ a back end serves the hiprio queue and one request queue.
            return Err(BackendError::Missing(
                "VHOST_USER_PROTOCOL_F_MQ (more than one request queue)",
            ));
        }
        Ok(Self {
            frontend,
            socket,
            features,
        })
    }

    /// The virtio features the back end offered.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The socket, to watch for the back end hanging up.
    pub fn socket(&self) -> &UnixStream {
        &self.socket
    }

    /// Hands the back end the driver's features, guest memory and `vrings`, and starts
    /// them. `mem` must be shared memory (see `vstate::memory`).
    pub fn start(
        &mut self,
        driver_features: u64,
        mem: &GuestMemory,
        vrings: &[Vring],
    ) -> Result<(), BackendError> {
        self.frontend
            .set_features(driver_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(protocol("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(BackendError::Memory)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(protocol("SET_MEM_TABLE"))?;
        self.start_vrings(mem, vrings)
    }

    /// Starts `vrings` again on a back end that already has the features and memory
    /// (after [`Backend::stop`]).
    pub fn start_vrings(
        &mut self,
        mem: &GuestMemory,
        vrings: &[Vring],
    ) -> Result<(), BackendError> {
        for vring in vrings {
            let host = |ring: &'static str, address: u64| {
                mem.get_host_address(GuestAddress(address))
                    .map(|ptr| ptr as u64)
                    .map_err(|_| BackendError::Ring {
                        index: vring.index,
                        ring,
                        address,
                    })
            };
            let config = VringConfigData {
                queue_max_size: vring.size,
                queue_size: vring.size,
                flags: 0,
                desc_table_addr: host("descriptor table", vring.desc_table)?,
                used_ring_addr: host("used ring", vring.used_ring)?,
                avail_ring_addr: host("available ring", vring.avail_ring)?,
                log_addr: None,
            };
            let index = vring.index;
            self.frontend
                .set_vring_num(index, vring.size)
                .map_err(protocol("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(protocol("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, vring.base)
                .map_err(protocol("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, vring.call)
                .map_err(protocol("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, vring.kick)
                .map_err(protocol("SET_VRING_KICK"))?;
            self.frontend
                .set_vring_enable(index, true)
                .map_err(protocol("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops the first `count` rings and returns, for each, the next available entry the
    /// back end would have served: once this returns, the back end touches none of them.
    pub fn stop(&mut self, count: usize) -> Result<Vec<u16>, BackendError> {
        (0..count)
            .map(|index| {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(protocol("SET_VRING_ENABLE"))?;
                let base = self
                    .frontend
                    .get_vring_base(index)
                    .map_err(protocol("GET_VRING_BASE"))?;
                // The ring index is 16 bits; the message carries it in 32.
                Ok(base as u16)
            })
            .collect()
    }
}
