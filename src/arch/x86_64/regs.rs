//! Initial vCPU state for the boot protocols: FPU, boot MSRs, general-purpose and special
//! registers (with the boot GDT, IDT and identity page tables they point at), and the local
//! APIC's LINT pins.
//!
//! The values put the BSP exactly where each protocol says the kernel entry point expects
//! it: long mode with paging for the Linux 64-bit protocol, flat 32-bit protected mode with
//! paging off for PVH.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::boot::BootProtocol;
use super::gdt::{gdt_entry, kvm_segment_from_gdt};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_COUNT, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use super::msr;

/// Errors from setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot set the FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("cannot build the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("cannot set the boot MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM rejected MSR {name} ({index:#x})")]
    MsrRejected { name: &'static str, index: u32 },
    #[error("cannot set the general-purpose registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("cannot read the special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("cannot set the special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("cannot write the boot GDT")]
    WriteGdt(#[source] GuestMemoryError),
    #[error("cannot write the boot IDT")]
    WriteIdt(#[source] GuestMemoryError),
    #[error("cannot write the boot page tables")]
    WritePageTables(#[source] GuestMemoryError),
    #[error("cannot read the local APIC state")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("cannot set the local APIC state")]
    SetLapic(#[source] kvm_ioctls::Error),
}

// Control register and EFER bits.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_AM: u64 = 1 << 18;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// CR0 for 64-bit entry: 0x8005_0033, the value Linux itself runs with (and that booted on
/// the project's PVM host). CD/NW from the reset value are dropped so caching is on.
const CR0_LONG_MODE: u64 =
    X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_AM | X86_CR0_PG;
/// CR0 for PVH entry: protected mode, paging off, as the PVH spec requires.
const CR0_PVH: u64 = X86_CR0_PE | X86_CR0_ET;

/// Bit 1 of RFLAGS is reserved and must be set; IF and everything else start clear.
const RFLAGS_RESERVED: u64 = 0x2;

// Page table entry bits for the boot identity map.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
const ENTRIES_PER_TABLE: u64 = 512;
const TABLE_SIZE: u64 = 0x1000;
const HUGE_PAGE_SHIFT: u64 = 21;

/// Boot GDT slots. The code segment is 64-bit for Linux64 and 32-bit for PVH; both use the
/// same selectors (code 0x08, data 0x10, TSS 0x18).
const GDT_CODE: u8 = 1;
const GDT_DATA: u8 = 2;
const GDT_TSS: u8 = 3;
const GDT_ENTRIES: usize = 4;

// The GDT must end before the IDT starts.
const _: () = assert!(BOOT_GDT_START + (GDT_ENTRIES as u64) * 8 <= BOOT_IDT_START);
// The page directories must not run into anything that follows them.
const _: () = assert!(PML4_START + TABLE_SIZE <= PDPTE_START);
const _: () = assert!(PDPTE_START + TABLE_SIZE <= PDE_START);
const _: () = assert!(PDE_COUNT <= ENTRIES_PER_TABLE);

fn boot_gdt(protocol: BootProtocol) -> [u64; GDT_ENTRIES] {
    match protocol {
        BootProtocol::Linux64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL 0, exec/read, L, 4 KiB units
            gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write, 32-bit, 4 KiB units
            gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
        ],
        BootProtocol::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xfffff), // code: 32-bit exec/read, flat 4 GiB
            gdt_entry(0xc093, 0, 0xfffff), // data: 32-bit read/write, flat 4 GiB
            gdt_entry(0x008b, 0, 0x67),    // TSS: busy 32-bit TSS, byte limit 0x67
        ],
    }
}

/// MSRs set on every vCPU before it first runs, with the values the kernel expects to find
/// after a firmware boot (most are zero: the kernel programs its own syscall entry).
const BOOT_MSRS: [(u32, &str, u64); 11] = [
    (msr::IA32_SYSENTER_CS, "IA32_SYSENTER_CS", 0),
    (msr::IA32_SYSENTER_ESP, "IA32_SYSENTER_ESP", 0),
    (msr::IA32_SYSENTER_EIP, "IA32_SYSENTER_EIP", 0),
    (msr::STAR, "STAR", 0),
    (msr::CSTAR, "CSTAR", 0),
    (msr::KERNEL_GS_BASE, "KERNEL_GS_BASE", 0),
    (msr::SYSCALL_MASK, "SYSCALL_MASK", 0),
    (msr::LSTAR, "LSTAR", 0),
    (msr::IA32_TSC, "IA32_TSC", 0),
    // Fast-string operations enabled, as firmware leaves them.
    (msr::IA32_MISC_ENABLE, "IA32_MISC_ENABLE", 1),
    // MTRRs enabled (bit 11) with write-back (6) as the default memory type: without it
    // the kernel would treat all RAM as uncached.
    (msr::MTRR_DEF_TYPE, "MTRRdefType", (1 << 11) | 6),
];

/// Sets the x87 control word and MXCSR to their power-on defaults (all exceptions masked).
/// Current KVMs already reset a new vCPU this way; setting them keeps the entry state from
/// depending on the host kernel, as the boot protocols assume a firmware-initialized FPU.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Sets the boot MSRs. KVM stops at the first MSR it refuses and returns how many it set,
/// so a short count names the culprit.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, _, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(RegsError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(RegsError::SetMsrs)?;
    if let Some(&(index, name, _)) = BOOT_MSRS.get(set) {
        return Err(RegsError::MsrRejected { name, index });
    }
    Ok(())
}

fn boot_regs(entry: GuestAddress, protocol: BootProtocol) -> kvm_regs {
    match protocol {
        BootProtocol::Linux64 => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootProtocol::Pvh => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Sets the general-purpose registers for the kernel entry point `entry`: for Linux64 the
/// stack and RSI = zero page; for PVH EBX = `hvm_start_info`.
pub fn setup_regs(
    vcpu: &VcpuFd,
    entry: GuestAddress,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry, protocol))
        .map_err(RegsError::SetRegs)
}

/// Writes the boot GDT and an empty IDT, and points `sregs` at them with every segment
/// register loaded from the GDT.
fn write_descriptor_tables(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(protocol);
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(RegsError::WriteGdt)?;
    // An empty IDT: any exception before the kernel loads its own IDT is a triple fault,
    // which surfaces as KVM_EXIT_SHUTDOWN instead of running garbage.
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::WriteIdt)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (bytes.len() - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = kvm_segment_from_gdt(gdt[usize::from(GDT_CODE)], GDT_CODE);
    let data = kvm_segment_from_gdt(gdt[usize::from(GDT_DATA)], GDT_DATA);
    let tss = kvm_segment_from_gdt(gdt[usize::from(GDT_TSS)], GDT_TSS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Identity-maps the low 4 GiB with 2 MiB pages: one PML4 entry, `PDE_COUNT` PDPT entries
/// and `PDE_COUNT` page directories. The kernel replaces these early; they only have to
/// cover the kernel image, the zero page, the command line and the initrd.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let flags = PTE_PRESENT | PTE_WRITABLE;
    mem.write_obj(PDPTE_START | flags, GuestAddress(PML4_START))
        .map_err(RegsError::WritePageTables)?;

    let pdpt: Vec<u8> = (0..PDE_COUNT)
        .flat_map(|i| ((PDE_START + i * TABLE_SIZE) | flags).to_le_bytes())
        .collect();
    mem.write_slice(&pdpt, GuestAddress(PDPTE_START))
        .map_err(RegsError::WritePageTables)?;

    let directories: Vec<u8> = (0..PDE_COUNT * ENTRIES_PER_TABLE)
        .flat_map(|page| ((page << HUGE_PAGE_SHIFT) | flags | PTE_HUGE).to_le_bytes())
        .collect();
    mem.write_slice(&directories, GuestAddress(PDE_START))
        .map_err(RegsError::WritePageTables)
}

/// Fills `sregs` (and the guest tables it points at) for `protocol`.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    write_descriptor_tables(mem, sregs, protocol)?;
    match protocol {
        BootProtocol::Linux64 => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = CR0_LONG_MODE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PVH;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Sets the special registers for `protocol`, writing the boot GDT at `BOOT_GDT_START`, an
/// empty IDT at `BOOT_IDT_START` and, for Linux64, the identity page tables.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    // Start from KVM's values so the fields we do not own (APIC base, interrupt bitmap, LDT)
    // keep their reset state.
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    boot_sregs(mem, &mut sregs, protocol)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

// Local APIC register offsets and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (dst, src) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *dst = *src as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as std::os::raw::c_char;
    }
}

fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !APIC_DELIVERY_MODE_MASK) | (mode << 8)
}

/// Wires the local APIC's LINT0 to ExtINT and LINT1 to NMI, as firmware does on a PC: the
/// kernel's virtual-wire and NMI watchdog setup assume it. Needs the in-kernel irqchip.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::{Kvm, VmFd};

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// A VM with one vCPU, or `None` (after saying why) where there is no usable /dev/kvm.
    fn kvm_vcpu(irqchip: bool) -> Option<(Kvm, VmFd, VcpuFd)> {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("skipping: cannot open /dev/kvm: {e}");
                return None;
            }
        };
        let vm = kvm.create_vm().expect("create VM");
        if irqchip {
            vm.create_irq_chip().expect("create irqchip");
        }
        let vcpu = vm.create_vcpu(0).expect("create vCPU");
        Some((kvm, vm, vcpu))
    }

    #[test]
    fn long_mode_sregs_without_kvm() {
        let mem = guest_memory();
        let mut sregs = kvm_sregs::default();
        boot_sregs(&mem, &mut sregs, BootProtocol::Linux64).unwrap();
        assert_eq!(sregs.cr0, 0x8005_0033);
        assert_eq!(sregs.cr4, 0x20);
        assert_eq!(sregs.efer, 0x500);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db), (0x08, 1, 0));
        assert_eq!((sregs.ss.selector, sregs.ds.selector), (0x10, 0x10));
        assert_eq!((sregs.tr.selector, sregs.tr.type_), (0x18, 0xb));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (BOOT_IDT_START, 7));

        let gdt: [u64; 4] = mem.read_obj(GuestAddress(BOOT_GDT_START)).unwrap();
        assert_eq!(gdt, boot_gdt(BootProtocol::Linux64));
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn identity_map_covers_4_gib() {
        let mem = guest_memory();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 0x3);
        for i in 0..PDE_COUNT {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + i * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + i * 0x1000) | 0x3);
        }
        let first: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, 0x83);
        let second: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(second, 0x20_0083);
        let last_addr = PDE_START + PDE_COUNT * 0x1000 - 8;
        let last: u64 = mem.read_obj(GuestAddress(last_addr)).unwrap();
        assert_eq!(last, 0xffe0_0083);
    }

    #[test]
    fn pvh_sregs_without_kvm() {
        let mem = guest_memory();
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        boot_sregs(&mem, &mut sregs, BootProtocol::Pvh).unwrap();
        assert_eq!(sregs.cr0, 0x11);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        let cs = sregs.cs;
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 0x08));
        assert_eq!((cs.type_, cs.db, cs.l, cs.s, cs.present), (0xb, 1, 0, 1, 1));
        for seg in [sregs.ds, sregs.es, sregs.ss] {
            assert_eq!(
                (seg.base, seg.limit, seg.type_, seg.db),
                (0, 0xffff_ffff, 3, 1)
            );
        }
        let tr = sregs.tr;
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s, tr.present),
            (0, 0x67, 0xb, 0, 1)
        );
    }

    #[test]
    fn entry_registers() {
        let regs = boot_regs(GuestAddress(0x100_0000), BootProtocol::Linux64);
        assert_eq!((regs.rip, regs.rflags), (0x100_0000, 2));
        assert_eq!(
            (regs.rsp, regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rsi, ZERO_PAGE_START);

        let regs = boot_regs(GuestAddress(0x100_0200), BootProtocol::Pvh);
        assert_eq!(
            (regs.rip, regs.rflags, regs.rbx),
            (0x100_0200, 2, PVH_INFO_START)
        );
        assert_eq!(regs.rsi, 0);
    }

    #[test]
    fn lvt_delivery_mode_keeps_other_bits() {
        // Reset LVT value: masked (bit 16), mode fixed.
        assert_eq!(with_delivery_mode(0x1_0000, APIC_MODE_EXTINT), 0x1_0700);
        assert_eq!(with_delivery_mode(0x1_0700, APIC_MODE_NMI), 0x1_0400);
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT1, 0xdead_beef);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0xdead_beef);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0);
    }

    #[test]
    fn kvm_long_mode_sregs() {
        let Some((_kvm, _vm, vcpu)) = kvm_vcpu(false) else {
            return;
        };
        let mem = guest_memory();
        setup_sregs(&mem, &vcpu, BootProtocol::Linux64).unwrap();
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0, 0x8005_0033);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x08, 1));
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.idt.base, BOOT_IDT_START);
    }

    #[test]
    fn kvm_pvh_sregs() {
        let Some((_kvm, _vm, vcpu)) = kvm_vcpu(false) else {
            return;
        };
        let mem = guest_memory();
        setup_sregs(&mem, &vcpu, BootProtocol::Pvh).unwrap();
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(sregs.efer & EFER_LMA, 0);
        assert_eq!((sregs.cs.selector, sregs.cs.db, sregs.cs.l), (0x08, 1, 0));
        assert_eq!(sregs.tr.type_, 0xb);
    }

    #[test]
    fn kvm_regs_fpu_and_msrs() {
        let Some((_kvm, _vm, vcpu)) = kvm_vcpu(false) else {
            return;
        };
        setup_regs(&vcpu, GuestAddress(0x100_0000), BootProtocol::Linux64).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0000, ZERO_PAGE_START, 2)
        );

        setup_fpu(&vcpu).unwrap();
        assert_eq!(vcpu.get_fpu().unwrap().fcw, 0x37f);
        // KVM_GET_FPU does not report MXCSR on every kernel (it reads 0 on the project's
        // host); the XSAVE legacy area holds the real value at byte 24.
        assert_eq!(vcpu.get_xsave().unwrap().region[6], 0x1f80);

        setup_msrs(&vcpu).unwrap();
        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: msr::IA32_MISC_ENABLE,
                ..Default::default()
            },
            kvm_msr_entry {
                index: msr::MTRR_DEF_TYPE,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 2);
        let values: Vec<u64> = msrs.as_slice().iter().map(|m| m.data).collect();
        assert_eq!(values[0] & 1, 1);
        assert_eq!(values[1], 0x806);
    }

    #[test]
    fn kvm_lint_pins() {
        let Some((_kvm, _vm, vcpu)) = kvm_vcpu(true) else {
            return;
        };
        setup_lint(&vcpu).unwrap();
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!((lapic_reg(&lapic, APIC_LVT0) >> 8) & 0x7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&lapic, APIC_LVT1) >> 8) & 0x7, APIC_MODE_NMI);
    }
}
