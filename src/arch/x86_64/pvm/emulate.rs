//! Instructions KVM's emulator stops at on the nested PVM host (KVM_EXIT_INTERNAL_ERROR),
//! finished by hand exactly as the CPU would have:
//!
//! * `int3`: RIP past the instruction, #BP injected; the guest's handler runs.
//! * `int n`: RIP past the instruction, software interrupt `n` injected.
//! * `fwait`: RIP past it (no x87 exception is ever pending in kernel code).
//! * `sysretq`: return to user mode with the selectors from MSR_STAR.
//! * `verw`: ZF from the selector's descriptor, as VERW defines it (Linux's MDS mitigation
//!   runs it on every return to user space and before idling). Clearing the CPU buffers,
//!   its side effect, is the host's business.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::operand::{self, Operand, MAX_INSTRUCTION_LEN};
use super::{flat_segment, hex, read_msr, read_virt, PvmCompat, PvmError};
use crate::arch::x86_64::msr;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::Completion;

const VECTOR_BP: u8 = 3;

const RFLAGS_RESERVED_ONE: u64 = 1 << 1;
/// RFLAGS bits SYSRET restores from R11 (everything but RF, VM and reserved bits).
const SYSRET_RFLAGS_MASK: u64 = 0x3c_7fd7;

const RFLAGS_ZF: u64 = 1 << 6;

/// The instructions completed here.
#[derive(Debug, PartialEq, Eq)]
enum Known {
    Int3,
    IntN(u8),
    Fwait,
    Sysretq,
    Verw(Operand),
}

/// Decodes the instruction at the start of `code` (64-bit mode): what it is and its length.
/// `code` may end early, at the end of the mapped code; an instruction cut short by that
/// is not known.
fn decode(code: &[u8]) -> Option<(Known, usize)> {
    match code {
        [0xcc, ..] => Some((Known::Int3, 1)),
        [0xcd, vector, ..] => Some((Known::IntN(*vector), 2)),
        [0x9b, ..] => Some((Known::Fwait, 1)),
        [0x48, 0x0f, 0x07, ..] => Some((Known::Sysretq, 3)),
        _ => decode_verw(code),
    }
}

/// `0f 00 /5` with any prefixes that leave it valid: 0x66 (the operand is 16 bits
/// whatever the operand size), segment overrides, 0x67, REX. LOCK makes it #UD and a
/// repeat prefix is undefined there: those are left to fail loudly.
fn decode_verw(code: &[u8]) -> Option<(Known, usize)> {
    let prefixes = operand::prefixes(code);
    if prefixes.lock || prefixes.repeat.is_some() {
        return None;
    }
    let rest = code.get(prefixes.len..)?;
    if rest.get(..2)? != [0x0f, 0x00] {
        return None;
    }
    let modrm = operand::modrm(&rest[2..], &prefixes).ok()?;
    if modrm.reg != 5 {
        return None;
    }
    let len = prefixes.len + 2 + modrm.len;
    (len <= MAX_INSTRUCTION_LEN).then_some((Known::Verw(modrm.operand), len))
}

/// Where a selector's descriptor is, or None when the selector is null or beyond its
/// table's limit (VERW then clears ZF). `ldt` is LDTR's base and limit, None when LDTR is
/// null.
fn descriptor_address(selector: u16, gdt: (u64, u32), ldt: Option<(u64, u32)>) -> Option<u64> {
    const TABLE_INDICATOR: u16 = 1 << 2;
    let (base, limit) = if selector & TABLE_INDICATOR != 0 {
        ldt?
    } else if selector & !3 == 0 {
        return None;
    } else {
        gdt
    };
    let offset = u64::from(selector & !7);
    (offset + 7 <= u64::from(limit)).then(|| base.wrapping_add(offset))
}

/// Whether VERW sets ZF for `selector` (RPL in its low bits), whose descriptor is
/// `descriptor`, at privilege level `cpl` (Intel SDM, VERR/VERW): a code or data segment
/// (S = 1), writable data (code is never writable), and DPL >= CPL and DPL >= RPL.
/// The present bit is not among the checks: the SDM's operation does not test it.
fn verw_writable(descriptor: u64, selector: u16, cpl: u8) -> bool {
    let access = (descriptor >> 40) as u8;
    let (type_, code_or_data, dpl) = (access & 0xf, access & 0x10 != 0, (access >> 5) & 3);
    let (executable, writable) = (type_ & 0x8 != 0, type_ & 0x2 != 0);
    let rpl = (selector & 3) as u8;
    code_or_data && !executable && writable && dpl >= cpl && dpl >= rpl
}

/// LDTR as a descriptor table, or None when it holds the null selector.
fn ldt_table(ldt: &kvm_segment) -> Option<(u64, u32)> {
    (ldt.unusable == 0 && ldt.selector & !3 != 0).then_some((ldt.base, ldt.limit))
}

/// Reads the instruction bytes at `rip`: up to the longest instruction, or to the end of
/// the mapped code when the next page is not mapped.
fn read_code(mem: &GuestMemory, sregs: &kvm_sregs, rip: u64) -> Result<Vec<u8>, PvmError> {
    let address = sregs.cs.base.wrapping_add(rip);
    let mut code = vec![0u8; MAX_INSTRUCTION_LEN];
    if read_virt(mem, sregs, address, &mut code).is_ok() {
        return Ok(code);
    }
    let to_page_end = (0x1000 - (address & 0xfff)) as usize;
    code.truncate(to_page_end.min(MAX_INSTRUCTION_LEN));
    read_virt(mem, sregs, address, &mut code)?;
    Ok(code)
}

impl PvmCompat {
    /// KVM_EXIT_INTERNAL_ERROR: complete the instruction at RIP if it is one KVM's emulator
    /// is known to miss here. `fetched` is what the emulator read at RIP, when KVM says.
    ///
    /// The instruction the vCPU ran is the one KVM fetched: memory may hold another by now,
    /// written by another vCPU (Linux's int3-based text poking restores the first byte
    /// without waiting). Going by memory then finds, say, the nop back where an int3
    /// failed, and running it again does not help on the nested PVM host: its emulator was
    /// measured to go on fetching the int3 for tens of milliseconds, long after memory
    /// changed (tests/payloads/textpoke.S). Memory is read only when KVM gave no bytes or
    /// none this layer completes.
    pub(super) fn on_emulation_failure(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemory,
        fetched: Option<&[u8]>,
    ) -> Result<Completion, PvmError> {
        let mut regs = fd.get_regs().map_err(PvmError::VcpuState)?;
        let sregs = fd.get_sregs().map_err(PvmError::VcpuState)?;
        let (known, len) = match fetched.and_then(decode) {
            Some(decoded) => decoded,
            None => {
                let Ok(code) = read_code(mem, &sregs, regs.rip) else {
                    return Ok(Completion::NotHandled(format!(
                        "rip {:#x} is not readable guest memory",
                        regs.rip
                    )));
                };
                let Some(decoded) = decode(&code) else {
                    if self.unknown.retry(regs.rip) {
                        log::debug!(
                            "vCPU {}: emulation failed at {:#x}, now bytes {}: running it again",
                            self.vcpu,
                            regs.rip,
                            hex(&code)
                        );
                        self.stats.retries += 1;
                        return Ok(Completion::Completed);
                    }
                    let fetched = fetched
                        .map(|bytes| format!(" (KVM fetched {})", hex(bytes)))
                        .unwrap_or_default();
                    return Ok(Completion::NotHandled(format!(
                        "rip {:#x}, bytes {}{fetched}",
                        regs.rip,
                        hex(&code)
                    )));
                };
                decoded
            }
        };
        self.unknown.reset();
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
            Known::Verw(operand) => {
                if let Err(why) = emulate_verw(mem, &mut regs, &sregs, operand, len) {
                    return Ok(Completion::NotHandled(format!(
                        "verw at rip {:#x}: {why}",
                        regs.rip
                    )));
                }
                fd.set_regs(&regs).map_err(PvmError::VcpuState)?;
                self.note("verw", regs.rip.wrapping_sub(len as u64));
                self.stats.verw += 1;
            }
        }
        Ok(Completion::Completed)
    }

    fn note(&self, what: &str, rip: u64) {
        log::trace!("vCPU {}: completed {what} at {rip:#x}", self.vcpu);
    }
}

/// The fallback when KVM gives no instruction bytes (or none this layer completes) and
/// memory at RIP holds none either: the guest runs the instruction once more before hearth
/// gives up, since another vCPU may have rewritten the code since KVM failed it (Linux
/// patches live code through an `int3` on its first byte). A second failure at the same RIP
/// with no instruction completed in between is a real one.
#[derive(Debug, Default)]
pub(super) struct RetryOnce {
    at: Option<u64>,
}

impl RetryOnce {
    /// Whether the failure at `rip` gets its one retry.
    fn retry(&mut self, rip: u64) -> bool {
        if self.at == Some(rip) {
            self.at = None;
            return false;
        }
        self.at = Some(rip);
        true
    }

    /// An instruction was completed: the next unknown failure starts afresh.
    fn reset(&mut self) {
        self.at = None;
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

/// VERW's effect on the registers: ZF, and RIP past the instruction (`len` bytes). The
/// error says why it cannot be completed here.
fn emulate_verw(
    mem: &GuestMemory,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
    operand: Operand,
    len: usize,
) -> Result<(), String> {
    if sregs.cs.l == 0 {
        return Err("not in 64-bit mode".into());
    }
    let next_rip = regs.rip.wrapping_add(len as u64);
    let selector = match operand {
        Operand::Register(r) => operand::gpr(regs, r) as u16,
        Operand::Memory(m) => {
            let address = m.linear_address(regs, sregs, next_rip);
            // An unmapped operand would be a #PF on the CPU. No kernel points VERW at
            // memory it has not mapped, so this stops the VM rather than emulating the
            // fault.
            let mut word = [0u8; 2];
            read_virt(mem, sregs, address, &mut word)
                .map_err(|_| format!("its operand at {address:#x} is not mapped"))?;
            u16::from_le_bytes(word)
        }
    };
    let cpl = (sregs.cs.selector & 3) as u8;
    let gdt = (sregs.gdt.base, u32::from(sregs.gdt.limit));
    let writable = match descriptor_address(selector, gdt, ldt_table(&sregs.ldt)) {
        None => false,
        Some(address) => {
            let mut bytes = [0u8; 8];
            read_virt(mem, sregs, address, &mut bytes).map_err(|_| {
                format!("the descriptor of selector {selector:#x} at {address:#x} is not mapped")
            })?;
            verw_writable(u64::from_le_bytes(bytes), selector, cpl)
        }
    };
    if writable {
        regs.rflags |= RFLAGS_ZF;
    } else {
        regs.rflags &= !RFLAGS_ZF;
    }
    regs.rip = next_rip;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Code patched by another vCPU between KVM's failure and hearth's look gets one more
    /// run; the same failure twice in a row is reported.
    #[test]
    fn an_unknown_failure_is_retried_once_per_rip() {
        let mut unknown = RetryOnce::default();
        assert!(unknown.retry(0x1000));
        assert!(!unknown.retry(0x1000), "the same failure twice is real");
        assert!(unknown.retry(0x1000), "and a later one is new again");
        assert!(unknown.retry(0x2000), "another rip is another failure");
        assert!(!unknown.retry(0x2000));
        assert!(unknown.retry(0x3000));
        unknown.reset();
        assert!(
            unknown.retry(0x3000),
            "a completed instruction in between resets it"
        );
    }

    #[test]
    fn decodes_the_instructions_it_completes() {
        assert_eq!(decode(&[0xcc, 0x90, 0x90]), Some((Known::Int3, 1)));
        assert_eq!(decode(&[0xcc]), Some((Known::Int3, 1)));
        assert_eq!(decode(&[0xcd, 0x80, 0x90]), Some((Known::IntN(0x80), 2)));
        assert_eq!(decode(&[0x9b, 0xdb, 0xe3]), Some((Known::Fwait, 1)));
        assert_eq!(decode(&[0x48, 0x0f, 0x07]), Some((Known::Sysretq, 3)));
        // sysretl (no REX.W) and anything else are left to fail loudly.
        assert_eq!(decode(&[0x0f, 0x07, 0x90]), None);
        assert_eq!(decode(&[0x0f, 0x01, 0xca]), None);
        // Cut short by the end of the mapped code.
        assert_eq!(decode(&[0xcd]), None);
    }

    fn verw_operand(code: &[u8]) -> Option<(Operand, usize)> {
        match decode(code)? {
            (Known::Verw(operand), len) => Some((operand, len)),
            other => panic!("not verw: {other:?}"),
        }
    }

    #[test]
    fn decodes_verw() {
        // Linux's mds_clear_cpu_buffers: verw of a RIP-relative word.
        let (op, len) = verw_operand(&[0x0f, 0x00, 0x2d, 0x89, 0xe8, 0x1f, 0x00, 0x90]).unwrap();
        assert_eq!(len, 7);
        let Operand::Memory(mem) = op else {
            panic!("{op:?}")
        };
        assert_eq!(
            (mem.base, mem.displacement),
            (operand::Base::Rip, 0x1f_e889)
        );
        // verw %ax, and verw %r9w with REX.B and an operand-size prefix.
        assert_eq!(
            verw_operand(&[0x0f, 0x00, 0xe8]),
            Some((Operand::Register(0), 3))
        );
        assert_eq!(
            verw_operand(&[0x66, 0x41, 0x0f, 0x00, 0xe9, 0xcc]),
            Some((Operand::Register(9), 5))
        );
        // verw %gs:0x10(%rax,%rcx,8) with 0x67.
        let (op, len) = verw_operand(&[0x65, 0x67, 0x0f, 0x00, 0x6c, 0xc8, 0x10]).unwrap();
        assert_eq!(len, 7);
        let Operand::Memory(mem) = op else {
            panic!("{op:?}")
        };
        assert_eq!(mem.segment, Some(operand::Segment::Gs));
        assert!(mem.address32);
        // verr (/4), lock, a repeat prefix, a cut-short operand and more than 15 bytes:
        // not completed here.
        assert_eq!(decode(&[0x0f, 0x00, 0xe0]), None);
        assert_eq!(decode(&[0xf0, 0x0f, 0x00, 0xe8]), None);
        assert_eq!(decode(&[0xf3, 0x0f, 0x00, 0xe8]), None);
        assert_eq!(decode(&[0x0f, 0x00, 0x2d, 0x00, 0x00]), None);
        let mut long = vec![0x66; 11];
        long.extend([0x0f, 0x00, 0x6d, 0x00]);
        assert_eq!(verw_operand(&long).map(|(_, len)| len), Some(15));
        long.insert(0, 0x66);
        assert_eq!(decode(&long), None);
    }

    /// Code at the end of the last mapped page is read as far as it goes.
    #[test]
    fn reads_code_up_to_the_end_of_the_mapping() {
        use crate::vstate::memory::create_guest_memory;
        use vm_memory::{Bytes, GuestAddress};

        let mem = create_guest_memory(1 << 20).unwrap();
        // One 4 KiB page at virtual 0x40_0000 -> physical 0x8000.
        let sregs = super::super::paging::map_page(&mem, 0x40_0000, 0x8000);
        mem.write_slice(&[0x0f, 0x00, 0xe8], GuestAddress(0x8ffd))
            .unwrap();
        let code = read_code(&mem, &sregs, 0x40_0ffd).unwrap();
        assert_eq!(code, [0x0f, 0x00, 0xe8]);
        assert_eq!(decode(&code), Some((Known::Verw(Operand::Register(0)), 3)));
        assert_eq!(read_code(&mem, &sregs, 0x40_0000).unwrap().len(), 15);
        assert!(read_code(&mem, &sregs, 0x40_1000).is_err());
    }

    const NULL: u64 = 0;
    const KERNEL_CS: u64 = 0x00af_9b00_0000_ffff;
    const KERNEL_DS: u64 = 0x00cf_9300_0000_ffff;
    const KERNEL_RO: u64 = 0x00cf_9100_0000_ffff;
    const USER_DS: u64 = 0x00cf_f300_0000_ffff;
    const USER_CS: u64 = 0x00af_fb00_0000_ffff;
    const NOT_PRESENT_DS: u64 = 0x00cf_1300_0000_ffff;
    const TSS: u64 = 0x0000_8900_0000_0067;

    #[test]
    fn verw_checks_type_and_privilege() {
        // Writable data: DPL 0 at CPL 0, DPL 3 at CPL 0 and 3.
        assert!(verw_writable(KERNEL_DS, 0x18, 0));
        assert!(verw_writable(USER_DS, 0x2b, 3));
        assert!(verw_writable(USER_DS, 0x28, 0));
        // DPL 0 from CPL 3, or with RPL 3 at CPL 0.
        assert!(!verw_writable(KERNEL_DS, 0x18, 3));
        assert!(!verw_writable(KERNEL_DS, 0x1b, 0));
        // Code is never writable; read-only data is not; system segments never pass.
        assert!(!verw_writable(KERNEL_CS, 0x10, 0));
        assert!(!verw_writable(USER_CS, 0x33, 3));
        assert!(!verw_writable(KERNEL_RO, 0x38, 0));
        assert!(!verw_writable(TSS, 0x40, 0));
        assert!(!verw_writable(NULL, 0x08, 0));
        // The SDM's VERW does not look at the present bit.
        assert!(verw_writable(NOT_PRESENT_DS, 0x18, 0));
    }

    #[test]
    fn descriptor_lookup_honours_null_limits_and_the_ldt() {
        let gdt = (0xffff_fe00_0000_1000, 0x7f);
        assert_eq!(descriptor_address(0, gdt, None), None);
        assert_eq!(descriptor_address(3, gdt, None), None);
        assert_eq!(
            descriptor_address(0x18, gdt, None),
            Some(0xffff_fe00_0000_1018)
        );
        assert_eq!(
            descriptor_address(0x7b, gdt, None),
            Some(0xffff_fe00_0000_1078)
        );
        assert_eq!(descriptor_address(0x80, gdt, None), None);
        // TI = 1: the LDT, if LDTR holds one; its entry 0 is usable.
        assert_eq!(descriptor_address(0x4, gdt, None), None);
        let ldt = Some((0x5000, 0xf));
        assert_eq!(descriptor_address(0x4, gdt, ldt), Some(0x5000));
        assert_eq!(descriptor_address(0xf, gdt, ldt), Some(0x5008));
        assert_eq!(descriptor_address(0x17, gdt, ldt), None);
        let null_ldtr = kvm_segment {
            unusable: 1,
            ..Default::default()
        };
        assert_eq!(ldt_table(&null_ldtr), None);
    }

    /// The whole instruction against a GDT in guest memory (paging off, 64-bit CS).
    #[test]
    fn verw_sets_zf_and_advances_rip() {
        use crate::vstate::memory::create_guest_memory;
        use vm_memory::{Bytes, GuestAddress};

        let mem = create_guest_memory(1 << 20).unwrap();
        let gdt_base = 0x1000u64;
        let gdt = [
            NULL, 0, KERNEL_CS, KERNEL_DS, 0, USER_DS, USER_CS, KERNEL_RO,
        ];
        for (i, d) in gdt.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(gdt_base + 8 * i as u64))
                .unwrap();
        }
        let mut sregs = kvm_sregs::default();
        sregs.cs.l = 1;
        sregs.cs.selector = 0x10;
        sregs.gdt.base = gdt_base;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.ldt.unusable = 1;
        // The selector word, RIP-relative from the instruction at 0x2000 (7 bytes).
        mem.write_obj(0x18u16, GuestAddress(0x2017)).unwrap();
        let code = [0x0f, 0x00, 0x2d, 0x10, 0x00, 0x00, 0x00];
        let (operand, len) = verw_operand(&code).unwrap();

        let mut regs = kvm_regs {
            rip: 0x2000,
            rflags: 0x2,
            ..Default::default()
        };
        emulate_verw(&mem, &mut regs, &sregs, operand, len).unwrap();
        assert_eq!((regs.rip, regs.rflags), (0x2007, 0x2 | RFLAGS_ZF));

        // Register operands; the other flags are left alone.
        let run = |selector: u16, cpl: u16, rflags: u64| {
            let mut sregs = sregs;
            sregs.cs.selector = 0x10 | cpl;
            let mut regs = kvm_regs {
                rip: 0x3000,
                rdx: 0xdead_0000 | u64::from(selector),
                rflags,
                ..Default::default()
            };
            emulate_verw(&mem, &mut regs, &sregs, Operand::Register(2), 3).unwrap();
            assert_eq!(regs.rip, 0x3003);
            regs.rflags
        };
        assert_eq!(run(0x18, 0, 0x2 | RFLAGS_ZF | 1), 0x2 | RFLAGS_ZF | 1);
        assert_eq!(run(0x18, 3, 0x2 | RFLAGS_ZF | 1), 0x2 | 1);
        assert_eq!(run(0x2b, 3, 0x2), 0x2 | RFLAGS_ZF);
        assert_eq!(run(0x1b, 0, 0x2 | RFLAGS_ZF), 0x2);
        assert_eq!(run(0x10, 0, 0x2 | RFLAGS_ZF), 0x2);
        assert_eq!(run(0x38, 0, 0x2 | RFLAGS_ZF), 0x2);
        assert_eq!(run(0, 0, 0x2 | RFLAGS_ZF), 0x2);
        assert_eq!(run(0x40, 0, 0x2 | RFLAGS_ZF), 0x2);

        // An operand nobody mapped, and a CPU outside 64-bit mode: not completed.
        let far = Operand::Register(0);
        let mut regs = kvm_regs {
            rip: 0x2000,
            rbx: 0xffff_ffff_0000_0000,
            ..Default::default()
        };
        let unmapped = operand::MemoryOperand {
            base: operand::Base::Register(3),
            index: None,
            displacement: 0,
            segment: None,
            address32: false,
        };
        assert!(emulate_verw(&mem, &mut regs, &sregs, Operand::Memory(unmapped), 3).is_err());
        assert_eq!(regs.rip, 0x2000);
        let mut compat = sregs;
        compat.cs.l = 0;
        assert!(emulate_verw(&mem, &mut regs, &compat, far, 3).is_err());
    }
}
