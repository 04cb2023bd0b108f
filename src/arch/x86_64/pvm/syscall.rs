//! User-mode SYSCALL completion. PVM loads RIP = LSTAR, RCX and R11 but stays at CPL 3, so
//! the fetch at the kernel's entry page-faults. Once the guest has set LSTAR and its IDT,
//! a guest-debug hardware breakpoint on its #PF handler catches that fault, and hearth
//! finishes the SYSCALL: kernel selectors from MSR_STAR, RFLAGS masked by SFMASK, the
//! `swapgs` at LSTAR done, RIP past it. Any other page fault is passed on by stepping over
//! the handler's first instruction, so the breakpoint does not fire again.

use kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP};
use kvm_ioctls::VcpuFd;

use super::{flat_segment, hex, read_msr, read_virt, write_msr, PvmCompat, PvmError};
use crate::arch::x86_64::msr;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::Completion;

const VECTOR_PF: u64 = 14;

const RFLAGS_RESERVED_ONE: u64 = 1 << 1;
const RFLAGS_RF: u64 = 1 << 16;

/// `swapgs`, the first instruction at entry_SYSCALL_64.
const SWAPGS: [u8; 3] = [0x0f, 0x01, 0xf8];
/// Instructions that may open the guest's #PF handler and that the VMM steps over after
/// the breakpoint there: `nopl (%rax)` (CLAC patched out) and `endbr64`.
const PF_ENTRY_PROLOGUES: &[&[u8]] = &[&[0x0f, 0x1f, 0x00], &[0xf3, 0x0f, 0x1e, 0xfa]];

/// DR7 for the trap: L0 enabled, execute breakpoint, bit 10 reads as one.
const DR7_L0_EXECUTE: u64 = 0x401;

/// Where the guest's SYSCALL entry and #PF handler are, once it has set them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SyscallTrap {
    pub lstar: u64,
    pub pf_entry: u64,
}

/// The trap's state on one vCPU.
#[derive(Debug, Default)]
pub(super) struct SyscallCompletion {
    pub trap: Option<SyscallTrap>,
    /// Given up after something unexpected; never armed again.
    pub disabled: bool,
}

impl SyscallCompletion {
    /// Whether the SYSCALL trap is in place (or given up on).
    fn settled(&self) -> bool {
        self.trap.is_some() || self.disabled
    }
}

/// The #PF handler's address in a 64-bit IDT gate.
fn gate_offset(gate: &[u8; 16]) -> u64 {
    u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | (u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16)
        | (u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32)
}

impl PvmCompat {
    /// Called after every exit and kick until the SYSCALL trap is armed: arms it as soon as
    /// the guest kernel has installed its IDT and LSTAR. Checking on every exit (one
    /// KVM_GET_MSRS while LSTAR is still zero) keeps the window between the guest setting
    /// LSTAR and its first user-mode SYSCALL as small as the guest's exits allow; the
    /// event loop's periodic kicks cover guests that make no exits at all.
    pub(super) fn poll_syscall_trap(&mut self, fd: &VcpuFd, mem: &GuestMemory) {
        if self.syscall.settled() {
            return;
        }
        if let Err(e) = self.try_arm(fd, mem) {
            log::debug!("vCPU {}: SYSCALL trap not armed yet: {e}", self.vcpu);
        }
    }

    fn try_arm(&mut self, fd: &VcpuFd, mem: &GuestMemory) -> Result<bool, PvmError> {
        let lstar = read_msr(fd, msr::LSTAR)?;
        if lstar == 0 {
            return Ok(false);
        }
        let sregs = fd.get_sregs().map_err(PvmError::VcpuState)?;
        if u64::from(sregs.idt.limit) < VECTOR_PF * 16 + 15 {
            return Ok(false);
        }
        let mut gate = [0u8; 16];
        read_virt(mem, &sregs, sregs.idt.base + VECTOR_PF * 16, &mut gate)?;
        let pf_entry = gate_offset(&gate);
        // Only a 64-bit kernel's own handler (upper half) is worth trapping.
        if pf_entry < 0xffff_8000_0000_0000 {
            return Ok(false);
        }
        let trap = SyscallTrap { lstar, pf_entry };
        arm(fd, &trap)?;
        self.syscall.trap = Some(trap);
        log::info!(
            "vCPU {}: SYSCALL completion armed (LSTAR {lstar:#x}, #PF entry {pf_entry:#x})",
            self.vcpu
        );
        Ok(true)
    }

    /// KVM_EXIT_DEBUG at `pc`: the SYSCALL trap, or an exit this layer did not cause.
    pub(super) fn on_debug_exit(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemory,
        pc: u64,
    ) -> Result<Completion, PvmError> {
        let Some(trap) = self.syscall.trap.filter(|t| t.pf_entry == pc) else {
            return Ok(Completion::NotHandled(format!("debug exit at {pc:#x}")));
        };
        let mut regs = fd.get_regs().map_err(PvmError::VcpuState)?;
        let mut sregs = fd.get_sregs().map_err(PvmError::VcpuState)?;
        // The hardware frame of the #PF: error code, RIP, CS, RFLAGS, RSP, SS.
        let mut frame = [0u8; 48];
        read_virt(mem, &sregs, regs.rsp, &mut frame)?;
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&frame[i * 8..i * 8 + 8]);
            u64::from_le_bytes(bytes)
        };
        let (fault_rip, fault_cs, fault_rflags, fault_rsp) = (word(1), word(2), word(3), word(4));

        if fault_cs & 3 == 3 && fault_rip == trap.lstar {
            let mut entry = [0u8; 3];
            read_virt(mem, &sregs, trap.lstar, &mut entry)?;
            if entry != SWAPGS {
                return Ok(self.disable_trap(
                    fd,
                    format!("SYSCALL entry starts with {}, not swapgs", hex(&entry)),
                ));
            }
            let star = read_msr(fd, msr::STAR)?;
            let sfmask = read_msr(fd, msr::SYSCALL_MASK)?;
            let kernel_cs = ((star >> 32) & 0xfffc) as u16;
            sregs.cs = flat_segment(kernel_cs, 0, true);
            sregs.ss = flat_segment(kernel_cs + 8, 0, false);
            // The swapgs at LSTAR, done here.
            let kernel_gs = read_msr(fd, msr::KERNEL_GS_BASE)?;
            write_msr(fd, msr::KERNEL_GS_BASE, sregs.gs.base)?;
            sregs.gs.base = kernel_gs;
            regs.rsp = fault_rsp;
            regs.rip = trap.lstar + SWAPGS.len() as u64;
            regs.rflags = (fault_rflags & !sfmask & !RFLAGS_RF) | RFLAGS_RESERVED_ONE;
            fd.set_sregs(&sregs).map_err(PvmError::VcpuState)?;
            fd.set_regs(&regs).map_err(PvmError::VcpuState)?;
            self.stats.syscall += 1;
            if self.stats.syscall == 1 {
                log::info!("vCPU {}: first user-mode SYSCALL completed", self.vcpu);
            }
            return Ok(Completion::Completed);
        }

        // An ordinary page fault: let the handler run, stepping over its first instruction
        // so the breakpoint does not fire again.
        let mut prologue = [0u8; 4];
        read_virt(mem, &sregs, pc, &mut prologue)?;
        match PF_ENTRY_PROLOGUES.iter().find(|p| prologue.starts_with(p)) {
            Some(p) => {
                regs.rip = pc + p.len() as u64;
                fd.set_regs(&regs).map_err(PvmError::VcpuState)?;
                self.stats.page_faults_passed += 1;
                Ok(Completion::Completed)
            }
            None => Ok(self.disable_trap(
                fd,
                format!(
                    "#PF handler starts with {}, cannot step over it",
                    hex(&prologue)
                ),
            )),
        }
    }

    /// Removes the breakpoint after something unexpected; the exit is then reported.
    fn disable_trap(&mut self, fd: &VcpuFd, why: String) -> Completion {
        log::warn!("vCPU {}: SYSCALL completion disabled: {why}", self.vcpu);
        let _ = fd.set_guest_debug(&kvm_guest_debug::default());
        self.syscall.trap = None;
        self.syscall.disabled = true;
        Completion::NotHandled(why)
    }
}

/// Puts the hardware breakpoint on the guest's #PF entry.
pub(super) fn arm(fd: &VcpuFd, trap: &SyscallTrap) -> Result<(), PvmError> {
    let mut debug = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    debug.arch.debugreg[0] = trap.pf_entry;
    debug.arch.debugreg[7] = DR7_L0_EXECUTE;
    fd.set_guest_debug(&debug).map_err(PvmError::VcpuState)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_gate_offsets() {
        // An interrupt gate for 0xffffffff81a00b30 (selector 0x10, type 0x8e).
        let gate = [
            0x30, 0x0b, 0x10, 0x00, 0x00, 0x8e, 0xa0, 0x81, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ];
        assert_eq!(gate_offset(&gate), 0xffff_ffff_81a0_0b30);
    }

    #[test]
    fn settled_once_armed_or_given_up() {
        let mut state = SyscallCompletion::default();
        assert!(!state.settled());
        state.trap = Some(SyscallTrap {
            lstar: 1,
            pf_entry: 2,
        });
        assert!(state.settled());
        let given_up = SyscallCompletion {
            trap: None,
            disabled: true,
        };
        assert!(given_up.settled());
    }
}
