//! Instructions KVM's emulator stops at on the nested PVM host (KVM_EXIT_INTERNAL_ERROR),
//! finished by hand exactly as the CPU would have:
//!
//! * `int3`: RIP past the instruction, #BP injected; the guest's handler runs.
//! * `int n`: RIP past the instruction, software interrupt `n` injected.
//! * `fwait`: RIP past it (no x87 exception is ever pending in kernel code).
//! * `sysretq`: return to user mode with the selectors from MSR_STAR.

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::{flat_segment, hex, read_msr, read_virt, PvmCompat, PvmError};
use crate::arch::x86_64::msr;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::Completion;

const VECTOR_BP: u8 = 3;

const RFLAGS_RESERVED_ONE: u64 = 1 << 1;
/// RFLAGS bits SYSRET restores from R11 (everything but RF, VM and reserved bits).
const SYSRET_RFLAGS_MASK: u64 = 0x3c_7fd7;

/// The instructions completed here, by their first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Known {
    Int3,
    IntN(u8),
    Fwait,
    Sysretq,
}

fn decode(code: [u8; 3]) -> Option<Known> {
    match code {
        [0xcc, ..] => Some(Known::Int3),
        [0xcd, vector, _] => Some(Known::IntN(vector)),
        [0x9b, ..] => Some(Known::Fwait),
        [0x48, 0x0f, 0x07] => Some(Known::Sysretq),
        _ => None,
    }
}

impl PvmCompat {
    /// KVM_EXIT_INTERNAL_ERROR: complete the instruction at RIP if it is one KVM's emulator
    /// is known to miss here.
    pub(super) fn on_emulation_failure(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemory,
    ) -> Result<Completion, PvmError> {
        let mut regs = fd.get_regs().map_err(PvmError::VcpuState)?;
        let sregs = fd.get_sregs().map_err(PvmError::VcpuState)?;
        let mut code = [0u8; 3];
        if read_virt(mem, &sregs, sregs.cs.base.wrapping_add(regs.rip), &mut code).is_err() {
            return Ok(Completion::NotHandled(format!(
                "rip {:#x} is not readable guest memory",
                regs.rip
            )));
        }
        let Some(known) = decode(code) else {
            return Ok(Completion::NotHandled(format!(
                "rip {:#x}, bytes {}",
                regs.rip,
                hex(&code)
            )));
        };
        match known {
            Known::Int3 => {
                regs.rip += 1;
                fd.set_regs(&regs).map_err(PvmError::VcpuState)?;
                let mut events = fd.get_vcpu_events().map_err(PvmError::VcpuState)?;
                events.exception.injected = 1;
                events.exception.nr = VECTOR_BP;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                fd.set_vcpu_events(&events).map_err(PvmError::VcpuState)?;
                self.note("int3", regs.rip - 1);
                self.stats.int3 += 1;
            }
            Known::IntN(vector) => {
                regs.rip += 2;
                fd.set_regs(&regs).map_err(PvmError::VcpuState)?;
                let mut events = fd.get_vcpu_events().map_err(PvmError::VcpuState)?;
                events.interrupt.injected = 1;
                events.interrupt.nr = vector;
                events.interrupt.soft = 1;
                fd.set_vcpu_events(&events).map_err(PvmError::VcpuState)?;
                self.note("int n", regs.rip - 2);
                self.stats.softint += 1;
            }
            Known::Fwait => {
                regs.rip += 1;
                fd.set_regs(&regs).map_err(PvmError::VcpuState)?;
                self.note("fwait", regs.rip - 1);
                self.stats.fwait += 1;
            }
            Known::Sysretq => {
                emulate_sysretq(fd, regs, sregs)?;
                self.stats.sysret += 1;
            }
        }
        Ok(Completion::Completed)
    }

    fn note(&self, what: &str, rip: u64) {
        log::trace!("vCPU {}: completed {what} at {rip:#x}", self.vcpu);
    }
}

fn emulate_sysretq(fd: &VcpuFd, mut regs: kvm_regs, mut sregs: kvm_sregs) -> Result<(), PvmError> {
    let star = read_msr(fd, msr::STAR)?;
    let base = ((star >> 48) & 0xffff) as u16;
    sregs.cs = flat_segment(base.wrapping_add(16) | 3, 3, true);
    sregs.ss = flat_segment(base.wrapping_add(8) | 3, 3, false);
    regs.rip = regs.rcx;
    regs.rflags = (regs.r11 & SYSRET_RFLAGS_MASK) | RFLAGS_RESERVED_ONE;
    fd.set_sregs(&sregs).map_err(PvmError::VcpuState)?;
    fd.set_regs(&regs).map_err(PvmError::VcpuState)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_instructions_it_completes() {
        assert_eq!(decode([0xcc, 0x90, 0x90]), Some(Known::Int3));
        assert_eq!(decode([0xcd, 0x80, 0x90]), Some(Known::IntN(0x80)));
        assert_eq!(decode([0x9b, 0xdb, 0xe3]), Some(Known::Fwait));
        assert_eq!(decode([0x48, 0x0f, 0x07]), Some(Known::Sysretq));
        // sysretl (no REX.W) and anything else are left to fail loudly.
        assert_eq!(decode([0x0f, 0x07, 0x90]), None);
        assert_eq!(decode([0x0f, 0x01, 0xca]), None);
    }
}
