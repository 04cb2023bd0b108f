//! The nested-PVM compatibility layer (shared/HOST-KVM.md in the project's history, and the
//! README's "nested PVM" section), behind the vCPU loop's one [`CompatHook`].
//!
//! On hosts whose /dev/kvm is the `kvm_pvm` module, guest kernel code runs inside KVM's
//! instruction emulator. Some instructions it cannot emulate (KVM_EXIT_INTERNAL_ERROR), and a
//! SYSCALL from guest user mode is left half done (RIP = LSTAR but still at CPL 3, so the
//! fetch page-faults). hearth completes these in the VMM, exactly as the CPU would have:
//!
//! * `int3`, `int n`, `fwait`, `sysretq`, `verw` (`emulate.rs`): the instruction is
//!   finished by hand and the guest goes on.
//! * user-mode SYSCALL (`syscall.rs`): a hardware breakpoint on the guest's #PF entry
//!   catches the fault at LSTAR, and hearth switches to CPL 0 with `swapgs` done, as SYSCALL
//!   and the first instruction at LSTAR would have.
//! * paravirtual xstate switching (`xstate.rs`): a `noxsave` guest kernel that probes for it
//!   has hearth save and restore its tasks' AVX/AVX-512 state.
//!
//! The features the emulator cannot run are hidden through the guest command line, because
//! this host ignores most of KVM_SET_CPUID2 (see [`GUEST_CMDLINE`]); boot parameters that
//! spare any guest minutes of emulated work follow them (`speedups.rs`, [`BOOT_SPEEDUPS`]).

mod emulate;
mod operand;
mod paging;
mod speedups;
mod syscall;
pub mod xstate;

use std::path::Path;

use kvm_bindings::{kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{CompatHook, Completion};

pub use paging::{read_virt, translate};
pub use speedups::{BootSpeedup, BLACKLISTED_INITCALLS, BOOT_SPEEDUPS};

/// What a PVM guest must be told not to use, in Linux 6.1 syntax.
pub const GUEST_CMDLINE: &str = "noxsave nofsgsbase \
    clearcpuid=cx16,ssse3,erms,fsrm,serialize,rdpid,smap,popcnt,bmi1,bmi2,adx,movbe,sse4_2";

/// The module that provides /dev/kvm on a nested-PVM host.
const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// Whether /dev/kvm on this host is the nested PVM module. Looked up once per process: a
/// jailed VMM asks before it leaves /sys behind (see `jail::enter`).
pub fn host_is_pvm() -> bool {
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| Path::new(PVM_MODULE_PATH).exists())
}

#[derive(Debug, thiserror::Error)]
pub enum PvmError {
    #[error("cannot access vCPU state")]
    VcpuState(#[source] kvm_ioctls::Error),
    #[error("guest address {0:#x} is not mapped")]
    Unmapped(u64),
}

/// Counters, logged when the vCPU stops.
#[derive(Debug, Default)]
pub struct FixupStats {
    pub int3: u64,
    pub softint: u64,
    pub fwait: u64,
    pub sysret: u64,
    pub verw: u64,
    pub syscall: u64,
    pub page_faults_passed: u64,
    pub xstate_saves: u64,
    pub xstate_restores: u64,
    pub xstate_errors: u64,
    /// Failed instructions run again because the code at RIP had changed (`RetryOnce`).
    pub retries: u64,
}

/// What the layer keeps for one vCPU, saved with the vCPU's state. KVM keeps no trace of
/// the SYSCALL trap (guest debugging is not part of a vCPU's state), so a restored vCPU
/// has it put back from here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvmState {
    /// The guest's SYSCALL entry and #PF handler, once the trap was armed.
    pub syscall_trap: Option<SyscallTrapState>,
    /// The trap was given up on after something unexpected.
    pub syscall_trap_disabled: bool,
}

/// Where the SYSCALL trap is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyscallTrapState {
    pub lstar: u64,
    pub pf_entry: u64,
}

/// Per-vCPU state of the compatibility layer.
pub struct PvmCompat {
    vcpu: u8,
    syscall: syscall::SyscallCompletion,
    unknown: emulate::RetryOnce,
    stats: FixupStats,
}

impl PvmCompat {
    pub fn new(vcpu: u8) -> Self {
        Self {
            vcpu,
            syscall: syscall::SyscallCompletion::default(),
            unknown: emulate::RetryOnce::default(),
            stats: FixupStats::default(),
        }
    }

    pub fn stats(&self) -> &FixupStats {
        &self.stats
    }
}

impl CompatHook for PvmCompat {
    fn claims_port(&self, port: u16, len: usize) -> bool {
        xstate::claims(port, len)
    }

    fn port_read(&mut self, port: u16, data: &mut [u8]) {
        xstate::probe(port, data);
    }

    fn port_write(&mut self, vcpu: &VcpuFd, mem: &GuestMemory, port: u16, data: &[u8]) {
        self.on_xstate_request(vcpu, mem, port, data);
    }

    fn debug_exit(&mut self, vcpu: &VcpuFd, mem: &GuestMemory, pc: u64) -> Completion {
        self.on_debug_exit(vcpu, mem, pc)
            .unwrap_or_else(|e| Completion::NotHandled(format!("debug exit at {pc:#x}: {e}")))
    }

    fn emulation_failure(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemory,
        fetched: Option<&[u8]>,
    ) -> Completion {
        self.on_emulation_failure(vcpu, mem, fetched)
            .unwrap_or_else(|e| Completion::NotHandled(e.to_string()))
    }

    fn after_exit(&mut self, vcpu: &VcpuFd, mem: &GuestMemory) {
        self.poll_syscall_trap(vcpu, mem);
    }

    fn summary(&self) -> String {
        format!("compat fixups: {:?}", self.stats)
    }

    fn save_state(&self) -> PvmState {
        PvmState {
            syscall_trap: self.syscall.trap.map(|t| SyscallTrapState {
                lstar: t.lstar,
                pf_entry: t.pf_entry,
            }),
            syscall_trap_disabled: self.syscall.disabled,
        }
    }

    fn restore_state(&mut self, vcpu: &VcpuFd, state: &PvmState) -> Result<(), String> {
        let trap = state.syscall_trap.map(|t| syscall::SyscallTrap {
            lstar: t.lstar,
            pf_entry: t.pf_entry,
        });
        if let Some(trap) = &trap {
            syscall::arm(vcpu, trap).map_err(|e| crate::error_chain(&e))?;
        }
        self.syscall.trap = trap;
        self.syscall.disabled = state.syscall_trap_disabled;
        Ok(())
    }
}

/// A flat 4 GiB segment: 64-bit code (`code`) or data, present, granular.
fn flat_segment(selector: u16, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn read_msr(fd: &VcpuFd, index: u32) -> Result<u64, PvmError> {
    let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .expect("one MSR entry fits a FamStructWrapper");
    fd.get_msrs(&mut msrs).map_err(PvmError::VcpuState)?;
    Ok(msrs.as_slice()[0].data)
}

fn write_msr(fd: &VcpuFd, index: u32, data: u64) -> Result<(), PvmError> {
    let msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .expect("one MSR entry fits a FamStructWrapper");
    fd.set_msrs(&msrs).map_err(PvmError::VcpuState)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_hides_what_the_emulator_cannot_run() {
        for needed in ["noxsave", "cx16", "smap", "popcnt", "ssse3"] {
            assert!(GUEST_CMDLINE.contains(needed), "{needed}");
        }
        assert!(!GUEST_CMDLINE.contains("  "));
    }

    #[test]
    fn flat_segments() {
        let cs = flat_segment(0x10, 0, true);
        assert_eq!((cs.l, cs.db, cs.type_, cs.dpl), (1, 0, 0xb, 0));
        let ss = flat_segment(0x2b, 3, false);
        assert_eq!((ss.l, ss.db, ss.type_, ss.dpl), (0, 1, 0x3, 3));
    }

    /// The hook answers exactly the xstate ports' 32-bit accesses; everything else is the
    /// bus's.
    #[test]
    fn the_hook_claims_only_the_xstate_ports() {
        let hook = PvmCompat::new(0);
        use crate::arch::layout::{PV_XSTATE_RESTORE_PORT, PV_XSTATE_SAVE_PORT};
        assert!(hook.claims_port(PV_XSTATE_SAVE_PORT, 4));
        assert!(hook.claims_port(PV_XSTATE_RESTORE_PORT, 4));
        assert!(!hook.claims_port(PV_XSTATE_SAVE_PORT, 1));
        assert!(!hook.claims_port(0x3f8, 4));
    }
}
