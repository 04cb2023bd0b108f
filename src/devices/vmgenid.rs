//! The VM generation ID: 16 random bytes in guest memory that change whenever the VM goes
//! on from a snapshot, so a guest can tell that it may be one of many clones and reseed its
//! random number generator (Linux's vmgenid driver does, since 5.18).
//!
//! The guest finds the ID through ACPI (the DSDT's `VGEN` device names its address) and
//! hears of a change through a Generic Event Device interrupt, whose `_EVT` method
//! notifies `VGEN`; the DSDT is written by `arch::acpi`. This module owns the ID: a fresh
//! one at boot, another on every restore, written before any vCPU runs, and the interrupt
//! that announces it.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::{Vm, VmError};

/// Size of the generation ID in bytes.
pub const VMGENID_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot get random bytes from the host (getrandom)")]
    Random(#[source] std::io::Error),
    #[error("cannot write the VM generation ID to guest memory at {address:#x}")]
    Write {
        address: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("cannot raise the VM generation ID's interrupt")]
    Notify(#[source] VmError),
}

/// Where the guest knows the device by: saved in snapshots, since the guest's DSDT (in
/// guest memory) keeps naming these after a restore, whatever a later hearth would choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    /// Guest-physical address of the 16-byte ID.
    pub address: u64,
    /// GSI of the Generic Event Device that announces a new ID.
    pub irq: u32,
}

/// The VM generation ID of a running VM.
#[derive(Clone, Debug)]
pub struct VmGenId {
    state: VmGenIdState,
    id: [u8; VMGENID_SIZE],
}

impl VmGenId {
    /// A fresh ID written at `state.address`, for a VM that boots: the guest reads it when
    /// its driver binds, so no interrupt is needed.
    pub fn new(mem: &GuestMemory, state: VmGenIdState) -> Result<Self, VmGenIdError> {
        let device = Self {
            state,
            id: random_id()?,
        };
        device.write(mem)?;
        Ok(device)
    }

    /// A VM that goes on from a snapshot: a fresh ID over the saved one, at the saved
    /// address. Call [`VmGenId::notify`] once the VM's interrupt controllers are restored
    /// and before any vCPU runs.
    pub fn restore(mem: &GuestMemory, state: &VmGenIdState) -> Result<Self, VmGenIdError> {
        Self::new(mem, *state)
    }

    /// Tells the guest the ID changed: one edge on the GED interrupt. The in-kernel IOAPIC
    /// latches it, so a vCPU that has not run yet takes it when it first does.
    pub fn notify(&self, vm: &Vm) -> Result<(), VmGenIdError> {
        vm.pulse_irq(self.state.irq).map_err(VmGenIdError::Notify)
    }

    pub fn save(&self) -> VmGenIdState {
        self.state
    }

    pub fn id(&self) -> [u8; VMGENID_SIZE] {
        self.id
    }

    fn write(&self, mem: &GuestMemory) -> Result<(), VmGenIdError> {
        mem.write_slice(&self.id, GuestAddress(self.state.address))
            .map_err(|source| VmGenIdError::Write {
                address: self.state.address,
                source,
            })
    }
}

/// 16 bytes from the host's random number generator. An ID that every clone could share
/// (zero, or a predictable one) would defeat the point, so failure is an error, never a
/// fallback.
fn random_id() -> Result<[u8; VMGENID_SIZE], VmGenIdError> {
    let mut id = [0u8; VMGENID_SIZE];
    crate::random::fill(&mut id).map_err(VmGenIdError::Random)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    const STATE: VmGenIdState = VmGenIdState {
        address: 0xdf000,
        irq: 23,
    };

    fn read_id(mem: &GuestMemory, address: u64) -> [u8; VMGENID_SIZE] {
        let mut id = [0u8; VMGENID_SIZE];
        mem.read_slice(&mut id, GuestAddress(address)).unwrap();
        id
    }

    #[test]
    fn ids_are_random() {
        let ids: Vec<_> = (0..8).map(|_| random_id().unwrap()).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_ne!(*id, [0u8; VMGENID_SIZE]);
            assert!(!ids[i + 1..].contains(id), "{id:x?} came twice");
        }
    }

    #[test]
    fn a_boot_writes_its_id_where_the_state_says() {
        let mem = create_guest_memory(2 << 20).unwrap();
        let device = VmGenId::new(&mem, STATE).unwrap();
        assert_eq!(read_id(&mem, STATE.address), device.id());
        assert_eq!(device.save(), STATE);
        // Nothing beyond the 16 bytes is touched.
        let mut after = [0xffu8; 16];
        mem.read_slice(&mut after, GuestAddress(STATE.address + 16))
            .unwrap();
        assert_eq!(after, [0u8; 16]);
    }

    #[test]
    fn a_restore_replaces_the_saved_id() {
        let mem = create_guest_memory(2 << 20).unwrap();
        let booted = VmGenId::new(&mem, STATE).unwrap();
        let restored = VmGenId::restore(&mem, &booted.save()).unwrap();
        assert_ne!(restored.id(), booted.id());
        assert_eq!(read_id(&mem, STATE.address), restored.id());
        assert_eq!(restored.save(), STATE);
    }

    #[test]
    fn an_address_outside_guest_memory_is_an_error() {
        let mem = create_guest_memory(2 << 20).unwrap();
        let state = VmGenIdState {
            address: 4 << 20,
            irq: 23,
        };
        let err = VmGenId::restore(&mem, &state).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot write the VM generation ID to guest memory at 0x400000"
        );
        // The last bytes of memory cannot hold the ID either.
        let state = VmGenIdState {
            address: (2 << 20) - 8,
            irq: 23,
        };
        assert!(VmGenId::restore(&mem, &state).is_err());
    }
}
