//! The virtio-fs device: its configuration space, the features it offers (what the back
//! end offers, less what hearth cannot pass on), and the hand-over of the rings to the
//! back end at activation and back at reset and pause.
//!
//! The guest's queue notifications never reach hearth: the device's queue eventfds, which
//! the device manager registers as ioeventfds, are the back end's kick fds. The back end's
//! call eventfds are read by the event loop (`event_handler.rs`) and become the
//! transport's used-ring interrupt, because virtio-mmio has one interrupt status register
//! per device that hearth must set before raising the line.
//!
//! A back end that fails or hangs up marks the device broken: the transport shows
//! DEVICE_NEEDS_RESET, the driver is told through a configuration interrupt, and the VM
//! runs on with the device unusable (activating it again fails: hearth does not connect
//! again at run time, which keeps `connect` out of the vCPU threads' seccomp filter).

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{Backend, BackendError, Vring, GUEST_FEATURES};
use super::event_handler::Watches;
use super::{FsConfig, FsError, TAG_BYTES};
use crate::devices::virtio::{ActivateError, DeviceCore, DeviceState, Interrupt, VirtioDevice};
use crate::vstate::memory::GuestMemory;

/// The configuration space: the tag, NUL-padded, and the number of request queues.
pub const CONFIG_SPACE_BYTES: usize = TAG_BYTES + 4;

/// A vhost-user-fs device.
pub struct Fs {
    pub(super) core: DeviceCore,
    config: FsConfig,
    config_space: [u8; CONFIG_SPACE_BYTES],
    /// `None` once the back end failed.
    pub(super) backend: Option<Backend>,
    /// A failed back end whose socket the event loop has yet to stop watching: it stays
    /// open until then, so its fd number cannot be reused under the watch.
    pub(super) failed_backend: Option<Backend>,
    /// The back end's used-buffer notifications, one per queue, for the device's life.
    pub(super) call_events: Vec<EventFd>,
    /// The back end failed: the driver must reset the device.
    broken: bool,
    /// The rings are the back end's: activated and not paused or stopped since.
    pub(super) rings_running: bool,
    pub(super) watches: Watches,
}

impl Fs {
    /// A device for `config`, connected to its back end and negotiated with it: a back end
    /// that is not there fails the build, not the guest's mount.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        config.validate().map_err(FsError::Config)?;
        let backend =
            Backend::connect(&config.socket, config.queue_count()).map_err(FsError::Backend)?;
        Self::with_backend(config, backend)
    }

    /// A device on a back end already connected (and negotiated).
    pub fn with_backend(config: &FsConfig, backend: Backend) -> Result<Self, FsError> {
        let queue_sizes = vec![config.queue_size; config.queue_count()];
        let core = DeviceCore::new(backend.features() & GUEST_FEATURES, &queue_sizes)
            .map_err(FsError::Queues)?;
        let call_events = queue_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            core,
            config: config.clone(),
            config_space: config_space(config),
            backend: Some(backend),
            failed_backend: None,
            call_events,
            broken: false,
            rings_running: false,
            watches: Watches::default(),
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// Whether the back end failed: the device stays unusable for this VM's life.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The back end failed: set it aside for the event loop to stop watching and close,
    /// and tell the driver.
    pub(super) fn mark_broken(&mut self, why: &dyn std::error::Error) {
        log::error!(
            "virtio-fs \"{}\": the back end failed, the device needs a reset: {}",
            self.config.tag,
            crate::error_chain(why)
        );
        if let Some(backend) = self.backend.take() {
            self.failed_backend = Some(backend);
            // Wakes the event loop to stop watching the socket (a spurious used-ring
            // interrupt at worst).
            if let Err(e) = self.call_events[0].write(1) {
                log::warn!("virtio-fs: cannot wake the event loop: {e}");
            }
        }
        self.rings_running = false;
        if !self.broken {
            self.broken = true;
            if let DeviceState::Activated(active) = self.core.state() {
                active.interrupt.signal_config_change();
            }
        }
    }

    /// The rings as the driver configured them, from where each queue is.
    fn vrings(&self) -> Vec<Vring<'_>> {
        self.core
            .queues()
            .iter()
            .zip(self.core.queue_events().iter().zip(&self.call_events))
            .enumerate()
            .map(|(index, (queue, (kick, call)))| Vring {
                index,
                size: queue.size(),
                desc_table: queue.desc_table(),
                avail_ring: queue.avail_ring(),
                used_ring: queue.used_ring(),
                base: queue.next_avail(),
                kick,
                call,
            })
            .collect()
    }

    /// Takes the rings back from the back end and records where it stopped in each queue,
    /// so a saved queue holds the position the back end reached, not the one the driver
    /// started from. A back end that cannot answer is marked broken.
    pub(super) fn stop_rings(&mut self) {
        if !self.rings_running {
            return;
        }
        self.rings_running = false;
        let Some(backend) = self.backend.as_mut() else {
            return;
        };
        match backend.stop(self.core.queues().len()) {
            Ok(bases) => {
                let mem = match self.core.state() {
                    DeviceState::Activated(active) => Some(active.mem.clone()),
                    DeviceState::Inactive => None,
                };
                for (queue, base) in self.core.queues_mut().iter_mut().zip(bases) {
                    queue.set_next_avail(base);
                    // The back end wrote the used index into the ring itself.
                    if let Some(used) = mem.as_ref().and_then(|mem| {
                        queue
                            .used_idx(mem, std::sync::atomic::Ordering::Acquire)
                            .ok()
                    }) {
                        queue.set_next_used(used.0);
                    }
                }
            }
            Err(e) => self.mark_broken(&e),
        }
    }

    /// Gives the rings back to the back end from where [`Fs::stop_rings`] left them.
    pub(super) fn restart_rings(&mut self) {
        if self.rings_running || self.broken {
            return;
        }
        let DeviceState::Activated(active) = self.core.state() else {
            return;
        };
        let mem = active.mem.clone();
        let Some(mut backend) = self.backend.take() else {
            return;
        };
        let result = backend.start_vrings(&mem, &self.vrings());
        self.backend = Some(backend);
        match result {
            Ok(()) => self.rings_running = true,
            Err(e) => self.mark_broken(&e),
        }
    }

    /// Hands the back end the driver's features, guest memory and the rings.
    fn start_backend(&mut self, mem: &GuestMemory) -> Result<(), BackendError> {
        let driver_features = self.core.acked_features();
        let mut backend = self.backend.take().ok_or(BackendError::Gone)?;
        let result = backend.start(driver_features, mem, &self.vrings());
        self.backend = Some(backend);
        result
    }
}

/// The tag NUL-padded to [`TAG_BYTES`], then the request queue count, little-endian.
pub fn config_space(config: &FsConfig) -> [u8; CONFIG_SPACE_BYTES] {
    let mut space = [0u8; CONFIG_SPACE_BYTES];
    let tag = config.tag.as_bytes();
    let len = tag.len().min(TAG_BYTES);
    space[..len].copy_from_slice(&tag[..len]);
    space[TAG_BYTES..].copy_from_slice(&u32::from(config.num_request_queues).to_le_bytes());
    space
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
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

    /// DRIVER_OK, or a restore of a running device: the back end gets the features, guest
    /// memory and the rings from where the queues are (0 for a driver that just set them
    /// up, the saved positions after a restore).
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.core.check_activation(&mem)?;
        if let Err(e) = self.start_backend(&mem) {
            // The transport reports it and sets DEVICE_NEEDS_RESET.
            self.mark_broken(&e);
            return Err(ActivateError::Backend(io::Error::other(
                crate::error_chain(&e),
            )));
        }
        self.rings_running = true;
        // Also writes each queue eventfd once, which the back end takes as a kick: it
        // looks at the rings, which is harmless and serves what the driver queued early.
        self.core.activate(mem, interrupt)
    }

    /// The driver reset the device: the back end gives the rings back (they start from 0
    /// at the next activation) and the device is inactive.
    fn reset(&mut self) {
        self.stop_rings();
        self.core.deactivate();
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }
}
