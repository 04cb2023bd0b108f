//! The KVM VM: in-kernel interrupt controllers and PIT, guest memory slots, the
//! interrupt and notification plumbing (irqfd, ioeventfd) devices use, the guest's
//! clock across a pause, and closing the VM without waiting for KVM to destroy it.

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout;
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot set the KVM TSS address")]
    TssAddress(#[source] kvm_ioctls::Error),
    #[error("cannot set the KVM identity map address")]
    IdentityMap(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel interrupt controller")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("cannot register guest memory slot {slot} with KVM")]
    MemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot route IRQ {irq} to an eventfd")]
    Irqfd {
        irq: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot raise IRQ {irq} (KVM_IRQ_LINE)")]
    IrqLine {
        irq: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the guest clock (KVM_GET_CLOCK)")]
    GetClock(#[source] kvm_ioctls::Error),
    #[error("cannot set the guest clock (KVM_SET_CLOCK)")]
    SetClock(#[source] kvm_ioctls::Error),
    #[error("cannot {0} the in-kernel interrupt controllers and PIT")]
    Devices(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot start the thread that sets up the PIT and guest memory")]
    SetupThread(#[source] std::io::Error),
    #[error("the thread that sets up the PIT and guest memory panicked")]
    SetupPanicked,
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// The VM's own state beside its vCPUs' and memory: KVM's in-kernel PIC pair, IOAPIC and
/// PIT, and the guest clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A VM with its irqchip; the PIT and guest memory come with [`Vm::set_up_platform`].
pub struct Vm {
    /// Shared only with a [`PlatformSetup`] thread while it runs; taken only by `drop`.
    fd: ManuallyDrop<Arc<VmFd>>,
    /// An io_uring holding `fd` as a registered file, made with the VM so that the
    /// running VMM's seccomp filter need not allow io_uring (see `Drop`).
    ring: Option<OwnedFd>,
}

/// The PIT and the guest memory slots being set up on a thread of their own (see
/// [`Vm::set_up_platform`]); [`PlatformSetup::wait`] before any vCPU runs.
#[must_use = "wait for the setup before the vCPUs run"]
pub struct PlatformSetup(JoinHandle<Result<(), VmError>>);

impl PlatformSetup {
    /// Waits until the PIT and every memory slot are in place.
    pub fn wait(self) -> Result<(), VmError> {
        self.0.join().map_err(|_| VmError::SetupPanicked)?
    }
}

impl Vm {
    /// Creates the VM and its in-kernel interrupt controllers.
    pub fn new(kvm: &KvmContext) -> Result<Self, VmError> {
        let fd = kvm.kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(VmError::TssAddress)?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::IdentityMap)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let ring = ring_holding(fd.as_raw_fd());
        Ok(Self {
            fd: ManuallyDrop::new(Arc::new(fd)),
            ring,
        })
    }

    /// Creates the in-kernel PIT and registers every region of `mem` as a memory slot, on
    /// a thread of its own: KVM waits for timer ticks in these calls (a new memory slot
    /// cost 4-12 ms on nested-PVM hosts, the PIT up to 2 ms, more than the rest of a
    /// tiny VM's set-up together), and little else in building the VM needs them, so the
    /// builder goes on meanwhile (a restore waits before it sets the vCPUs' MSRs, some of
    /// which point into guest memory). The caller keeps `mem` mapped for the VM's whole
    /// life.
    pub fn set_up_platform(&self, mem: &GuestMemory) -> Result<PlatformSetup, VmError> {
        let fd = Arc::clone(&self.fd);
        let mem = mem.clone();
        std::thread::Builder::new()
            .name("vm-setup".into())
            .spawn(move || {
                crate::seccomp::install(crate::seccomp::ThreadKind::VmSetup)?;
                create_pit(&fd)?;
                register_memory(&fd, &mem)
            })
            .map(PlatformSetup)
            .map_err(VmError::SetupThread)
    }

    /// Makes a write to `evt` raise `irq` (a GSI of the in-kernel IOAPIC).
    pub fn register_irqfd(&self, evt: &EventFd, irq: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, irq)
            .map_err(|source| VmError::Irqfd { irq, source })
    }

    /// One edge on `irq` (a GSI of the in-kernel IOAPIC): for a device that interrupts too
    /// seldom to keep an irqfd.
    pub fn pulse_irq(&self, irq: u32) -> Result<(), VmError> {
        for level in [true, false] {
            self.fd
                .set_irq_line(irq, level)
                .map_err(|source| VmError::IrqLine { irq, source })?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

fn create_pit(fd: &VmFd) -> Result<(), VmError> {
    let pit = kvm_pit_config {
        // No speaker port emulation: port 0x61 reads as a dummy.
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(VmError::Pit)
}

/// Registers every guest memory region as a KVM memory slot.
fn register_memory(fd: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let region_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region stays mapped for the VM's whole life: `GuestMemory` is owned
        // by the Vmm, which outlives every vCPU, and regions are never removed.
        unsafe { fd.set_user_memory_region(region_desc) }
            .map_err(|source| VmError::MemorySlot { slot, source })?;
    }
    Ok(())
}

impl Vm {
    /// The guest's kvmclock now (KVM_GET_CLOCK), to be put back by [`Vm::restore_clock`].
    pub fn save_clock(&self) -> Result<kvm_clock_data, VmError> {
        self.fd.get_clock().map_err(VmError::GetClock)
    }

    /// Sets the guest's kvmclock to `clock` (KVM_SET_CLOCK), so the guest does not see the
    /// time that passed since it was saved. The flags are dropped: with KVM_CLOCK_REALTIME
    /// KVM would add the wall-clock time elapsed since, which is the jump to avoid.
    pub fn restore_clock(&self, clock: &kvm_clock_data) -> Result<(), VmError> {
        let clock = kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(VmError::SetClock)
    }
}

impl Vm {
    /// The VM's state, with `clock` as the guest's clock (the one saved when the VM was
    /// paused: the clock has run on since).
    pub fn save_state(&self, clock: kvm_clock_data) -> Result<VmState, VmError> {
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(|e| VmError::Devices("read", e))
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self
                .fd
                .get_pit2()
                .map_err(|e| VmError::Devices("read", e))?,
            clock,
        })
    }

    /// Loads `state` into this VM (made by [`Vm::new`], no vCPU run yet).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let set = |e| VmError::Devices("set", e);
        self.fd.set_pit2(&state.pit).map_err(set)?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(set)?;
        }
        self.restore_clock(&state.clock)
    }
}

/// The VM's last reference goes to a kernel worker, so closing it costs this thread
/// (and the process's exit) next to nothing.
///
/// Destroying a KVM VM is slow on the project's hosts: tearing down the in-kernel PIT
/// waits for two back-to-back SRCU grace periods (`kvm_free_pit` unregistering its ack
/// and mask notifiers), 13-20 ms, more than a tiny guest's whole boot. Exiting without
/// closing the VM does not help, as the process's exit closes it the same way. An
/// io_uring's teardown, though, runs in a kernel worker, and so does the release of the
/// files registered with it: the VM fd is registered with a ring when the VM is made,
/// closed here (not the last reference then), and the ring closed after it. Where
/// io_uring is not available (disabled, or refused by a seccomp filter) the VM is closed
/// the slow way. The ring is made early so that the running VMM's seccomp filter allows
/// neither io_uring_setup nor io_uring_enter: nothing is ever submitted to it.
impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: `fd` is taken once, here, and `self` is not used after. (A setup thread
        // abandoned by a failed build may hold the last reference; it then closes the VM.)
        let fd = unsafe { ManuallyDrop::take(&mut self.fd) };
        drop(fd);
        drop(self.ring.take());
    }
}

/// `IORING_REGISTER_FILES`, from linux/io_uring.h.
const IORING_REGISTER_FILES: libc::c_uint = 2;
/// `struct io_uring_params` is 120 bytes of integers that io_uring_setup reads (all zero:
/// no flags) and fills in.
type IoUringParams = [u64; 15];

/// A new io_uring holding `fd` as a registered file, or `None` (logged) where io_uring
/// cannot be used.
fn ring_holding(fd: RawFd) -> Option<OwnedFd> {
    let mut params: IoUringParams = [0; 15];
    // SAFETY: io_uring_setup reads and writes one struct io_uring_params, which `params`
    // is in size and alignment; one entry is the smallest ring.
    let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if ring < 0 {
        log::debug!(
            "closing the VM in this thread: io_uring_setup: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: io_uring_setup returned a new descriptor that nothing else owns.
    let ring = unsafe { OwnedFd::from_raw_fd(ring as RawFd) };
    let files = [fd];
    // SAFETY: IORING_REGISTER_FILES reads `nr_args` (1) descriptors from the array.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            IORING_REGISTER_FILES,
            files.as_ptr(),
            1u32,
        )
    };
    if ret < 0 {
        log::debug!(
            "closing the VM in this thread: io_uring_register: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(ring)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The guest clock runs while the VM exists; put back, it resumes from the saved value
    /// instead of jumping by the time in between.
    #[test]
    fn a_restored_clock_does_not_count_the_time_in_between() {
        let kvm = match KvmContext::open() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("skipping: {}", crate::error_chain(&e));
                return;
            }
        };
        let vm = Vm::new(&kvm).expect("create the VM");
        let saved = vm.save_clock().expect("KVM_GET_CLOCK");
        std::thread::sleep(Duration::from_millis(200));
        let later = vm.save_clock().expect("KVM_GET_CLOCK");
        let ms = |ns: u64| ns / 1_000_000;
        assert!(
            ms(later.clock - saved.clock) >= 200,
            "{saved:?} -> {later:?}"
        );
        vm.restore_clock(&saved).expect("KVM_SET_CLOCK");
        let restored = vm.save_clock().expect("KVM_GET_CLOCK");
        assert!(
            restored.clock >= saved.clock && ms(restored.clock - saved.clock) < 100,
            "{saved:?} -> {restored:?}"
        );
    }

    /// A registered file outlives its own descriptor in the ring: the property the VM's
    /// cheap close relies on (checked on a pipe, whose other end sees no hang-up while
    /// the ring holds the write end).
    #[test]
    fn a_ring_keeps_a_registered_file_open() {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills the two-element array on success.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let Some(ring) = ring_holding(write.as_raw_fd()) else {
            eprintln!("skipped: io_uring is not available here");
            return;
        };
        drop(write);
        let hung_up = |fd: &OwnedFd| {
            let mut poll = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no wait.
            unsafe { libc::poll(&mut poll, 1, 0) };
            poll.revents & libc::POLLHUP != 0
        };
        assert!(!hung_up(&read), "the ring did not keep the write end open");
        drop(ring);
        // The ring's teardown runs in a kernel worker: give it a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !hung_up(&read) {
            assert!(
                std::time::Instant::now() < deadline,
                "the ring never let go"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
