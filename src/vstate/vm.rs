//! The KVM VM: in-kernel interrupt controllers and PIT, guest memory slots, the
//! interrupt and notification plumbing (irqfd, ioeventfd) devices use, and the guest's
//! clock across a pause.

use kvm_bindings::{
    kvm_clock_data, kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
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
    #[error("cannot read the guest clock (KVM_GET_CLOCK)")]
    GetClock(#[source] kvm_ioctls::Error),
    #[error("cannot set the guest clock (KVM_SET_CLOCK)")]
    SetClock(#[source] kvm_ioctls::Error),
}

/// A VM with its irqchip, PIT and memory in place.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM and the x86 platform parts KVM emulates in the kernel.
    pub fn new(kvm: &KvmContext) -> Result<Self, VmError> {
        let fd = kvm.kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(VmError::TssAddress)?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::IdentityMap)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            // No speaker port emulation: port 0x61 reads as a dummy.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(Self { fd })
    }

    /// Registers every guest memory region as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
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
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    /// Makes a write to `evt` raise `irq` (a GSI of the in-kernel IOAPIC).
    pub fn register_irqfd(&self, evt: &EventFd, irq: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, irq)
            .map_err(|source| VmError::Irqfd { irq, source })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

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
