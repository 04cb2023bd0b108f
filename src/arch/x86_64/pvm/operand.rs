//! Decoding of what surrounds a 64-bit-mode opcode for the instructions the compat layer
//! completes: the legacy prefixes and REX in front of it, and the ModRM operand (with SIB
//! and displacement) after it, down to the effective address the CPU would use.

use kvm_bindings::{kvm_regs, kvm_sregs};

/// The longest instruction the CPU accepts; a longer one raises #GP.
pub(super) const MAX_INSTRUCTION_LEN: usize = 15;

const REX_B: u8 = 1;
const REX_X: u8 = 1 << 1;

/// A segment override that still means something in 64-bit mode (ES, CS, SS and DS
/// overrides are ignored there: their bases count as zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Segment {
    Fs,
    Gs,
}

/// The prefixes in front of an opcode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Prefixes {
    /// Bytes taken by the prefixes (0x66 among them), REX included.
    pub len: usize,
    /// 0x67: 32-bit addressing.
    pub address32: bool,
    pub segment: Option<Segment>,
    /// 0xf0.
    pub lock: bool,
    /// 0xf2 or 0xf3, the last one seen.
    pub repeat: Option<u8>,
    /// The REX byte right before the opcode, or 0.
    pub rex: u8,
}

/// Reads the prefixes at the start of `code`. A REX byte counts only when the opcode
/// follows it directly: one followed by a legacy prefix is ignored, as the CPU ignores it.
pub(super) fn prefixes(code: &[u8]) -> Prefixes {
    let mut p = Prefixes::default();
    for &byte in code {
        match byte {
            // The operand size does not change what the instructions completed here do.
            0x66 => {}
            0x67 => p.address32 = true,
            0x26 | 0x2e | 0x36 | 0x3e => {}
            0x64 => p.segment = Some(Segment::Fs),
            0x65 => p.segment = Some(Segment::Gs),
            0xf0 => p.lock = true,
            0xf2 | 0xf3 => p.repeat = Some(byte),
            0x40..=0x4f => {
                p.rex = byte;
                p.len += 1;
                continue;
            }
            _ => break,
        }
        p.rex = 0;
        p.len += 1;
    }
    p
}

/// Where a memory operand's address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Base {
    None,
    /// A general-purpose register, 0-15 in encoding order (RAX, RCX, RDX, RBX, RSP, ...).
    Register(u8),
    /// The address of the next instruction.
    Rip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MemoryOperand {
    pub base: Base,
    /// Index register and scale (1, 2, 4 or 8).
    pub index: Option<(u8, u8)>,
    pub displacement: i64,
    pub segment: Option<Segment>,
    pub address32: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Operand {
    /// A general-purpose register, 0-15 in encoding order.
    Register(u8),
    Memory(MemoryOperand),
}

/// A decoded ModRM byte and what follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ModRm {
    /// The reg field without REX.R: the opcode extension of group opcodes such as `0f 00`.
    pub reg: u8,
    pub operand: Operand,
    /// Bytes taken by ModRM, SIB and displacement.
    pub len: usize,
}

/// The code ended before the operand did.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Truncated;

/// Decodes the ModRM operand at the start of `code` (64-bit mode).
pub(super) fn modrm(code: &[u8], prefixes: &Prefixes) -> Result<ModRm, Truncated> {
    let byte = |i: usize| code.get(i).copied().ok_or(Truncated);
    let modrm = byte(0)?;
    let (mode, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    let rex_b = if prefixes.rex & REX_B != 0 { 8 } else { 0 };
    let rex_x = if prefixes.rex & REX_X != 0 { 8 } else { 0 };
    if mode == 3 {
        return Ok(ModRm {
            reg,
            operand: Operand::Register(rm | rex_b),
            len: 1,
        });
    }
    let mut len = 1;
    let mut index = None;
    let base = if rm == 4 {
        let sib = byte(1)?;
        len += 1;
        let (scale, sib_index, sib_base) = (sib >> 6, ((sib >> 3) & 7) | rex_x, sib & 7);
        // Index 4 without REX.X means none; r12 (with REX.X) is a real index.
        if sib_index != 4 {
            index = Some((sib_index, 1u8 << scale));
        }
        // Base 5 (RBP or R13) with mod 0 means no base and a disp32.
        if sib_base == 5 && mode == 0 {
            Base::None
        } else {
            Base::Register(sib_base | rex_b)
        }
    } else if rm == 5 && mode == 0 {
        Base::Rip
    } else {
        Base::Register(rm | rex_b)
    };
    let disp32 = mode == 2 || (mode == 0 && matches!(base, Base::Rip | Base::None));
    let displacement = if mode == 1 {
        len += 1;
        i64::from(byte(len - 1)? as i8)
    } else if disp32 {
        let bytes = code.get(len..len + 4).ok_or(Truncated)?;
        len += 4;
        i64::from(i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    } else {
        0
    };
    Ok(ModRm {
        reg,
        operand: Operand::Memory(MemoryOperand {
            base,
            index,
            displacement,
            segment: prefixes.segment,
            address32: prefixes.address32,
        }),
        len,
    })
}

/// A general-purpose register by its encoding number (0-15).
pub(super) fn gpr(regs: &kvm_regs, number: u8) -> u64 {
    match number & 15 {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

impl MemoryOperand {
    /// The linear address the CPU would access, `next_rip` being the address of the
    /// instruction that follows (what RIP-relative addressing counts from).
    pub fn linear_address(&self, regs: &kvm_regs, sregs: &kvm_sregs, next_rip: u64) -> u64 {
        let base = match self.base {
            Base::None => 0,
            Base::Register(r) => gpr(regs, r),
            Base::Rip => next_rip,
        };
        let index = self
            .index
            .map_or(0, |(r, scale)| gpr(regs, r).wrapping_mul(u64::from(scale)));
        let mut offset = base
            .wrapping_add(index)
            .wrapping_add(self.displacement as u64);
        if self.address32 {
            offset &= 0xffff_ffff;
        }
        let segment_base = match self.segment {
            None => 0,
            Some(Segment::Fs) => sregs.fs.base,
            Some(Segment::Gs) => sregs.gs.base,
        };
        segment_base.wrapping_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(code: &[u8]) -> (Prefixes, ModRm) {
        let p = prefixes(code);
        let m = modrm(&code[p.len..], &p).unwrap();
        (p, m)
    }

    fn memory(m: &ModRm) -> MemoryOperand {
        match m.operand {
            Operand::Memory(mem) => mem,
            other => panic!("not a memory operand: {other:?}"),
        }
    }

    #[test]
    fn prefixes_and_rex() {
        assert_eq!(prefixes(&[0x0f, 0x00]), Prefixes::default());
        let p = prefixes(&[0x66, 0x65, 0x67, 0x41, 0x0f]);
        assert_eq!(p.len, 4);
        assert!(p.address32);
        assert_eq!((p.segment, p.rex), (Some(Segment::Gs), 0x41));
        // A REX byte followed by a legacy prefix is ignored.
        let p = prefixes(&[0x41, 0x66, 0x0f]);
        assert_eq!((p.len, p.rex), (2, 0));
        // Only the last of several REX bytes counts.
        assert_eq!(prefixes(&[0x48, 0x41, 0x0f]).rex, 0x41);
        // ES/CS/SS/DS overrides are null prefixes in 64-bit mode.
        let p = prefixes(&[0x2e, 0x3e, 0x0f]);
        assert_eq!((p.len, p.segment), (2, None));
        let p = prefixes(&[0xf0, 0xf3, 0x0f]);
        assert!(p.lock);
        assert_eq!(p.repeat, Some(0xf3));
    }

    #[test]
    fn register_operands() {
        // mod 3, rm 0 = rax; with REX.B, rm 0 = r8.
        let (_, m) = decode(&[0xe8]);
        assert_eq!((m.reg, m.operand, m.len), (5, Operand::Register(0), 1));
        let (_, m) = decode(&[0x41, 0xef]);
        assert_eq!((m.reg, m.operand, m.len), (5, Operand::Register(15), 1));
        // REX.R does not change the opcode extension in reg.
        let (_, m) = decode(&[0x44, 0xea]);
        assert_eq!((m.reg, m.operand), (5, Operand::Register(2)));
    }

    #[test]
    fn rip_relative_and_no_base_forms() {
        // mod 0, rm 5: RIP + disp32, even with REX.B (r13 needs mod 1).
        let (_, m) = decode(&[0x41, 0x2d, 0x10, 0x00, 0x00, 0x80]);
        let mem = memory(&m);
        assert_eq!((mem.base, mem.index), (Base::Rip, None));
        assert_eq!((mem.displacement, m.len), (-0x7fff_fff0, 5));
        // SIB with base 5 and mod 0: no base, disp32; index 4 without REX.X: no index.
        let (_, m) = decode(&[0x2c, 0x25, 0x78, 0x56, 0x34, 0x12]);
        let mem = memory(&m);
        assert_eq!((mem.base, mem.index), (Base::None, None));
        assert_eq!((mem.displacement, m.len), (0x1234_5678, 6));
    }

    #[test]
    fn sib_and_displacements() {
        // [rax + rcx*4 - 8]: mod 1, rm 4, SIB scale 2 index 1 base 0, disp8.
        let (_, m) = decode(&[0x6c, 0x88, 0xf8]);
        let mem = memory(&m);
        assert_eq!(mem.base, Base::Register(0));
        assert_eq!((mem.index, mem.displacement, m.len), (Some((1, 4)), -8, 3));
        // REX.X and REX.B: [r13 + r12*8 + 0x100], mod 2 (disp32).
        let (_, m) = decode(&[0x43, 0xac, 0xe5, 0x00, 0x01, 0x00, 0x00]);
        let mem = memory(&m);
        assert_eq!(mem.base, Base::Register(13));
        assert_eq!(
            (mem.index, mem.displacement, m.len),
            (Some((12, 8)), 0x100, 6)
        );
        // [rsp]: SIB with no index; [rbp + 0] needs mod 1.
        let (_, m) = decode(&[0x2c, 0x24]);
        assert_eq!(
            (memory(&m).base, memory(&m).index, m.len),
            (Base::Register(4), None, 2)
        );
        let (_, m) = decode(&[0x6d, 0x00]);
        assert_eq!((memory(&m).base, m.len), (Base::Register(5), 2));
    }

    #[test]
    fn truncated_operands() {
        let p = Prefixes::default();
        assert_eq!(modrm(&[], &p), Err(Truncated));
        assert_eq!(modrm(&[0x2c], &p), Err(Truncated));
        assert_eq!(modrm(&[0x2d, 0x00, 0x00], &p), Err(Truncated));
        assert_eq!(modrm(&[0x6d], &p), Err(Truncated));
    }

    #[test]
    fn linear_addresses() {
        let regs = kvm_regs {
            rax: 0x1000,
            rcx: 3,
            r12: 0xffff_ffff_0000_0010,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.gs.base = 0xffff_8880_0000_0000;
        let mut mem = MemoryOperand {
            base: Base::Register(0),
            index: Some((1, 4)),
            displacement: -8,
            segment: None,
            address32: false,
        };
        assert_eq!(mem.linear_address(&regs, &sregs, 0), 0x1004);
        mem.segment = Some(Segment::Gs);
        assert_eq!(mem.linear_address(&regs, &sregs, 0), 0xffff_8880_0000_1004);
        let rip = MemoryOperand {
            base: Base::Rip,
            index: None,
            displacement: 0x10,
            segment: None,
            address32: false,
        };
        assert_eq!(
            rip.linear_address(&regs, &sregs, 0xffff_ffff_81c0_1177),
            0xffff_ffff_81c0_1187
        );
        // 0x67: the offset wraps at 4 GiB before the segment base is added.
        let narrow = MemoryOperand {
            base: Base::Register(12),
            index: None,
            displacement: -0x20,
            segment: Some(Segment::Gs),
            address32: true,
        };
        assert_eq!(
            narrow.linear_address(&regs, &sregs, 0),
            0xffff_8880_ffff_fff0
        );
    }
}
