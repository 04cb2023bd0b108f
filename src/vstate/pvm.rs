//! The nested-PVM compatibility layer (shared/HOST-KVM.md in the project's history, and the
//! README's "nested PVM" section).
//!
//! On hosts whose /dev/kvm is the `kvm_pvm` module, guest kernel code runs inside KVM's
//! instruction emulator. Some instructions it cannot emulate (KVM_EXIT_INTERNAL_ERROR), and a
//! SYSCALL from guest user mode is left half done (RIP = LSTAR but still at CPL 3, so the
//! fetch page-faults). hearth completes these in the VMM, exactly as the CPU would have:
//!
//! * `int3`: RIP past the instruction, #BP injected; the guest's handler runs.
//! * `int n`: RIP past the instruction, software interrupt `n` injected.
//! * `fwait`: RIP past it (no x87 exception is ever pending in kernel code).
//! * `sysretq`: return to user mode with the selectors from MSR_STAR.
//! * user-mode SYSCALL: a hardware breakpoint on the guest's #PF entry catches the fault at
//!   LSTAR, and hearth switches to CPL 0 with `swapgs` done, as SYSCALL and the first
//!   instruction at LSTAR would have.
//! * paravirtual xstate switching (`vstate::pv_xstate`): a `noxsave` guest kernel that
//!   probes for it has hearth save and restore its tasks' AVX/AVX-512 state.
//!
//! The features the emulator cannot run are hidden through the guest command line, because
//! this host ignores most of KVM_SET_CPUID2 (see `GUEST_CMDLINE`).

use std::path::Path;

use kvm_bindings::{
    kvm_guest_debug, kvm_regs, kvm_segment, kvm_sregs, Msrs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemory;
use crate::vstate::pv_xstate;

/// What a PVM guest must be told not to use, in Linux 6.1 syntax.
pub const GUEST_CMDLINE: &str = "noxsave nofsgsbase \
    clearcpuid=cx16,ssse3,erms,fsrm,serialize,rdpid,smap,popcnt,bmi1,bmi2,adx,movbe,sse4_2";

/// The module that provides /dev/kvm on a nested-PVM host.
const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const VECTOR_BP: u8 = 3;
const VECTOR_PF: u64 = 14;

const RFLAGS_RESERVED_ONE: u64 = 1 << 1;
const RFLAGS_RF: u64 = 1 << 16;
/// RFLAGS bits SYSRET restores from R11 (everything but RF, VM and reserved bits).
const SYSRET_RFLAGS_MASK: u64 = 0x3c_7fd7;

const CR0_PG: u64 = 1 << 31;
const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 1 << 7;
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// `swapgs`, the first instruction at entry_SYSCALL_64.
const SWAPGS: [u8; 3] = [0x0f, 0x01, 0xf8];
/// Instructions that may open the guest's #PF handler and that the VMM steps over after
/// the breakpoint there: `nopl (%rax)` (CLAC patched out) and `endbr64`.
const PF_ENTRY_PROLOGUES: &[&[u8]] = &[&[0x0f, 0x1f, 0x00], &[0xf3, 0x0f, 0x1e, 0xfa]];

/// Whether /dev/kvm on this host is the nested PVM module.
pub fn host_is_pvm() -> bool {
    Path::new(PVM_MODULE_PATH).exists()
}

#[derive(Debug, thiserror::Error)]
pub enum PvmError {
    #[error("cannot access vCPU state")]
    VcpuState(#[source] kvm_ioctls::Error),
    #[error("guest address {0:#x} is not mapped")]
    Unmapped(u64),
}

/// What the layer did with an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Fixup {
    /// The instruction was completed; run the vCPU again.
    Completed,
    /// Not something this layer handles; the caller reports the exit.
    NotHandled(String),
}

/// Counters, logged when the vCPU stops.
#[derive(Debug, Default)]
pub struct FixupStats {
    pub int3: u64,
    pub softint: u64,
    pub fwait: u64,
    pub sysret: u64,
    pub syscall: u64,
    pub page_faults_passed: u64,
    pub xstate_saves: u64,
    pub xstate_restores: u64,
    pub xstate_errors: u64,
}

/// Where the guest's SYSCALL entry and #PF handler are, once it has set them up.
#[derive(Clone, Copy, Debug)]
struct SyscallTrap {
    lstar: u64,
    pf_entry: u64,
}

/// Per-vCPU state of the compatibility layer.
pub struct PvmFixups {
    vcpu: u8,
    trap: Option<SyscallTrap>,
    trap_disabled: bool,
    pub stats: FixupStats,
}

impl PvmFixups {
    pub fn new(vcpu: u8) -> Self {
        Self {
            vcpu,
            trap: None,
            trap_disabled: false,
            stats: FixupStats::default(),
        }
    }

    /// Whether the SYSCALL trap is in place (or given up on).
    pub fn trap_settled(&self) -> bool {
        self.trap.is_some() || self.trap_disabled
    }

    /// Called after every exit and kick until the SYSCALL trap is armed: arms it as soon as
    /// the guest kernel has installed its IDT and LSTAR. Checking on every exit (one
    /// KVM_GET_MSRS while LSTAR is still zero) keeps the window between the guest setting
    /// LSTAR and its first user-mode SYSCALL as small as the guest's exits allow; the
    /// event loop's periodic kicks cover guests that make no exits at all.
    pub fn poll(&mut self, fd: &VcpuFd, mem: &GuestMemory) {
        if self.trap_settled() {
            return;
        }
        if let Err(e) = self.try_arm(fd, mem) {
            log::debug!("vCPU {}: SYSCALL trap not armed yet: {e}", self.vcpu);
        }
    }

    fn try_arm(&mut self, fd: &VcpuFd, mem: &GuestMemory) -> Result<bool, PvmError> {
        let lstar = read_msr(fd, MSR_LSTAR)?;
        if lstar == 0 {
            return Ok(false);
        }
        let sregs = fd.get_sregs().map_err(PvmError::VcpuState)?;
        if u64::from(sregs.idt.limit) < VECTOR_PF * 16 + 15 {
            return Ok(false);
        }
        let mut gate = [0u8; 16];
        read_virt(mem, &sregs, sregs.idt.base + VECTOR_PF * 16, &mut gate)?;
        let pf_entry = u64::from(u16::from_le_bytes([gate[0], gate[1]]))
            | (u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16)
            | (u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32);
        // Only a 64-bit kernel's own handler (upper half) is worth trapping.
        if pf_entry < 0xffff_8000_0000_0000 {
            return Ok(false);
        }
        let mut debug = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        debug.arch.debugreg[0] = pf_entry;
        // DR7: L0 enabled, execute breakpoint, bit 10 reads as one.
        debug.arch.debugreg[7] = 0x401;
        fd.set_guest_debug(&debug).map_err(PvmError::VcpuState)?;
        self.trap = Some(SyscallTrap { lstar, pf_entry });
        log::info!(
            "vCPU {}: SYSCALL completion armed (LSTAR {lstar:#x}, #PF entry {pf_entry:#x})",
            self.vcpu
        );
        Ok(true)
    }

    /// A port read the layer answers itself: the paravirtual xstate probe.
    pub fn on_io_in(&mut self, port: u16, data: &mut [u8]) -> bool {
        if port != pv_xstate::PV_XSTATE_SAVE_PORT || data.len() != 4 {
            return false;
        }
        data.copy_from_slice(&pv_xstate::MAGIC.to_le_bytes());
        true
    }

    /// A paravirtual xstate save or restore (`value` written to its port).
    pub fn on_xstate_request(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemory,
        request: pv_xstate::Request,
        value: u32,
    ) {
        match pv_xstate::handle(fd, mem, request, value) {
            Ok(()) if request == pv_xstate::Request::Save => self.stats.xstate_saves += 1,
            Ok(()) => self.stats.xstate_restores += 1,
            Err(e) => {
                // The guest hurts only itself; say so a few times, not on every switch.
                self.stats.xstate_errors += 1;
                if self.stats.xstate_errors <= 3 {
                    log::warn!(
                        "vCPU {}: guest xstate {request:?}: {}",
                        self.vcpu,
                        crate::error_chain(&e)
                    );
                }
            }
        }
    }

    /// KVM_EXIT_INTERNAL_ERROR: complete the instruction at RIP if it is one KVM's emulator
    /// is known to miss here.
    pub fn on_emulation_failure(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemory,
    ) -> Result<Fixup, PvmError> {
        let mut regs = fd.get_regs().map_err(PvmError::VcpuState)?;
        let sregs = fd.get_sregs().map_err(PvmError::VcpuState)?;
        let mut code = [0u8; 3];
        if read_virt(mem, &sregs, sregs.cs.base.wrapping_add(regs.rip), &mut code).is_err() {
            return Ok(Fixup::NotHandled(format!(
                "rip {:#x} is not readable guest memory",
                regs.rip
            )));
        }
        match code {
            [0xcc, ..] => {
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
            [0xcd, vector, _] => {
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
            [0x9b, ..] => {
                regs.rip += 1;
                fd.set_regs(&regs).map_err(PvmError::VcpuState)?;
                self.note("fwait", regs.rip - 1);
                self.stats.fwait += 1;
            }
            [0x48, 0x0f, 0x07] => {
                self.emulate_sysretq(fd, regs, sregs)?;
                self.stats.sysret += 1;
            }
            _ => {
                return Ok(Fixup::NotHandled(format!(
                    "rip {:#x}, bytes {}",
                    regs.rip,
                    hex(&code)
                )))
            }
        }
        Ok(Fixup::Completed)
    }

    fn note(&self, what: &str, rip: u64) {
        log::trace!("vCPU {}: completed {what} at {rip:#x}", self.vcpu);
    }

    fn emulate_sysretq(
        &mut self,
        fd: &VcpuFd,
        mut regs: kvm_regs,
        mut sregs: kvm_sregs,
    ) -> Result<(), PvmError> {
        let star = read_msr(fd, MSR_STAR)?;
        let base = ((star >> 48) & 0xffff) as u16;
        sregs.cs = flat_segment(base.wrapping_add(16) | 3, 3, true);
        sregs.ss = flat_segment(base.wrapping_add(8) | 3, 3, false);
        regs.rip = regs.rcx;
        regs.rflags = (regs.r11 & SYSRET_RFLAGS_MASK) | RFLAGS_RESERVED_ONE;
        fd.set_sregs(&sregs).map_err(PvmError::VcpuState)?;
        fd.set_regs(&regs).map_err(PvmError::VcpuState)
    }

    /// KVM_EXIT_DEBUG at `pc`: the SYSCALL trap, or an exit this layer did not cause.
    pub fn on_debug_exit(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemory,
        pc: u64,
    ) -> Result<Fixup, PvmError> {
        let Some(trap) = self.trap.filter(|t| t.pf_entry == pc) else {
            return Ok(Fixup::NotHandled(format!("debug exit at {pc:#x}")));
        };
        let mut regs = fd.get_regs().map_err(PvmError::VcpuState)?;
        let mut sregs = fd.get_sregs().map_err(PvmError::VcpuState)?;
        // The hardware frame of the #PF: error code, RIP, CS, RFLAGS, RSP, SS.
        let mut frame = [0u8; 48];
        read_virt(mem, &sregs, regs.rsp, &mut frame)?;
        let word = |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().unwrap());
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
            let star = read_msr(fd, MSR_STAR)?;
            let sfmask = read_msr(fd, MSR_SYSCALL_MASK)?;
            let kernel_cs = ((star >> 32) & 0xfffc) as u16;
            sregs.cs = flat_segment(kernel_cs, 0, true);
            sregs.ss = flat_segment(kernel_cs + 8, 0, false);
            // The swapgs at LSTAR, done here.
            let kernel_gs = read_msr(fd, MSR_KERNEL_GS_BASE)?;
            write_msr(fd, MSR_KERNEL_GS_BASE, sregs.gs.base)?;
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
            return Ok(Fixup::Completed);
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
                Ok(Fixup::Completed)
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
    fn disable_trap(&mut self, fd: &VcpuFd, why: String) -> Fixup {
        log::warn!("vCPU {}: SYSCALL completion disabled: {why}", self.vcpu);
        let _ = fd.set_guest_debug(&kvm_guest_debug::default());
        self.trap = None;
        self.trap_disabled = true;
        Fixup::NotHandled(why)
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

/// Translates a guest virtual address with the guest's own page tables (4-level paging,
/// or none when paging is off).
pub fn translate(mem: &GuestMemory, sregs: &kvm_sregs, vaddr: u64) -> Result<u64, PvmError> {
    if sregs.cr0 & CR0_PG == 0 {
        return Ok(vaddr);
    }
    let mut table = sregs.cr3 & PTE_ADDR_MASK;
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let index = (vaddr >> shift) & 0x1ff;
        let entry: u64 = mem
            .read_obj(GuestAddress(table + index * 8))
            .map_err(|_| PvmError::Unmapped(vaddr))?;
        if entry & PTE_PRESENT == 0 {
            return Err(PvmError::Unmapped(vaddr));
        }
        let page_mask = (1u64 << shift) - 1;
        if level == 1 || (level <= 3 && entry & PTE_LARGE != 0) {
            return Ok((entry & PTE_ADDR_MASK & !page_mask) | (vaddr & page_mask));
        }
        table = entry & PTE_ADDR_MASK;
    }
    unreachable!("the walk returns at level 1")
}

/// Reads guest virtual memory, page by page.
pub fn read_virt(
    mem: &GuestMemory,
    sregs: &kvm_sregs,
    vaddr: u64,
    buf: &mut [u8],
) -> Result<(), PvmError> {
    let mut done = 0;
    while done < buf.len() {
        let va = vaddr.wrapping_add(done as u64);
        let in_page = (0x1000 - (va & 0xfff)) as usize;
        let len = in_page.min(buf.len() - done);
        let pa = translate(mem, sregs, va)?;
        mem.read_slice(&mut buf[done..done + len], GuestAddress(pa))
            .map_err(|_| PvmError::Unmapped(va))?;
        done += len;
    }
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
    use crate::vstate::memory::create_guest_memory;

    /// Builds a 4-level mapping of `vaddr` to `paddr` (4 KiB page) with tables at 0x1000..
    fn map_page(mem: &GuestMemory, vaddr: u64, paddr: u64) -> kvm_sregs {
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        let idx = |shift: u32| (vaddr >> shift) & 0x1ff;
        mem.write_obj(pdpt | 3, GuestAddress(pml4 + idx(39) * 8))
            .unwrap();
        mem.write_obj(pd | 3, GuestAddress(pdpt + idx(30) * 8))
            .unwrap();
        mem.write_obj(pt | 3, GuestAddress(pd + idx(21) * 8))
            .unwrap();
        mem.write_obj(paddr | 3, GuestAddress(pt + idx(12) * 8))
            .unwrap();
        kvm_sregs {
            cr0: CR0_PG | 1,
            cr3: pml4,
            ..Default::default()
        }
    }

    #[test]
    fn page_walk_and_virtual_reads() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let va = 0xffff_ffff_8100_0ffe;
        let sregs = map_page(&mem, va & !0xfff, 0x20_0000);
        assert_eq!(translate(&mem, &sregs, va).unwrap(), 0x20_0ffe);
        // The next page is not mapped: a read across the boundary fails cleanly.
        let mut buf = [0u8; 4];
        assert!(matches!(
            read_virt(&mem, &sregs, va, &mut buf),
            Err(PvmError::Unmapped(_))
        ));
        mem.write_slice(&[1, 2], GuestAddress(0x20_0ffe)).unwrap();
        let mut two = [0u8; 2];
        read_virt(&mem, &sregs, va, &mut two).unwrap();
        assert_eq!(two, [1, 2]);
        // Paging off: identity.
        let flat = kvm_sregs::default();
        assert_eq!(translate(&mem, &flat, 0x1234).unwrap(), 0x1234);
    }

    #[test]
    fn large_pages_translate() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (pml4, pdpt, pd) = (0x1000u64, 0x2000u64, 0x3000u64);
        mem.write_obj(pdpt | 3, GuestAddress(pml4)).unwrap();
        mem.write_obj(pd | 3, GuestAddress(pdpt)).unwrap();
        mem.write_obj(0x20_0000 | 0x83, GuestAddress(pd + 8))
            .unwrap();
        let sregs = kvm_sregs {
            cr0: CR0_PG,
            cr3: pml4,
            ..Default::default()
        };
        assert_eq!(translate(&mem, &sregs, 0x20_1234).unwrap(), 0x20_1234);
        assert!(translate(&mem, &sregs, 0x40_0000).is_err());
    }

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
}
