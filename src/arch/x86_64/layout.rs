//! Every guest-physical address, I/O port and IRQ number hearth uses on x86_64.
//!
//! Nothing else in the crate may hard-code a guest address: devices, the boot code and the
//! table writers take their places from here, so the whole guest memory map can be read in
//! one file.
//!
//! ```text
//! 0x0000_0000 ┬ real-mode IVT/BDA (RAM)
//! 0x0000_0500 │ boot GDT, IDT
//! 0x0000_6000 │ PVH hvm_start_info, module list
//! 0x0000_7000 │ Linux zero page (boot_params) / PVH memory map
//! 0x0000_8ff0 │ boot stack (grows down)
//! 0x0000_9000 │ boot page tables (PML4, PDPT, 4 × PD: identity map of the low 4 GiB)
//! 0x0002_0000 │ kernel command line
//! 0x0009_fc00 ┼ EBDA: MP table                              (reserved)
//! 0x000d_f000 │ VM generation ID page                      (reserved)
//! 0x000e_0000 │ ACPI RSDP and tables                       (reserved)
//! 0x0010_0000 ┼ high memory: kernel, initrd at the top of low RAM
//! 0xc000_0000 ┼ 32-bit MMIO hole: control page, virtio-mmio windows, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above the hole when the guest has more than 3 GiB
//! ```

/// Start of the legacy real-mode area that Linux reserves itself.
pub const REAL_MODE_START: u64 = 0x0;

/// The boot GDT (null, code64, data, TSS) written for the BSP.
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT: empty; the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;

/// PVH: `hvm_start_info`, then the module list (initrd) right after it.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH: one `hvm_modlist_entry` for the initrd.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH: the `hvm_memmap_table_entry` array (shares the page with the zero page, which a PVH
/// boot does not use).
pub const PVH_MEMMAP_START: u64 = 0x7000;

/// Linux boot protocol: the zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer of the BSP (also RBP).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity-mapping page tables for 64-bit entry: PML4, one PDPT, four page directories of
/// 2 MiB pages covering the low 4 GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Number of page directories after `PDE_START` (each maps 1 GiB).
pub const PDE_COUNT: u64 = 4;

/// Kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line hearth passes, including the NUL. Linux 6.1 on x86 copies at most
/// COMMAND_LINE_SIZE = 2048 bytes; a bzImage may announce a different limit in its header.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area; RAM below it is usable, from it up to 1 MiB is not.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and table live at the start of the EBDA, where Linux scans.
pub const MPTABLE_START: u64 = EBDA_START;
/// End (exclusive) of the space the MP table may fill: it must not run into the VM
/// generation ID page.
pub const MPTABLE_END: u64 = VMGENID_START;

/// The VM generation ID (16 bytes, the DSDT's `VGEN.ADDR` points here) at the start of a
/// page of its own in the reserved firmware area, so the guest never uses it as RAM and
/// Linux maps it without taking it from the allocator.
pub const VMGENID_START: u64 = 0xdf000;
/// The page reserved for it.
pub const VMGENID_PAGE_SIZE: u64 = 0x1000;
const _: () =
    assert!(VMGENID_START >= EBDA_START && VMGENID_START + VMGENID_PAGE_SIZE <= RSDP_START);

/// ACPI RSDP, inside the BIOS read-only area that Linux scans (0xE0000-0xFFFFF).
pub const RSDP_START: u64 = 0xe0000;
/// ACPI tables follow the RSDP.
pub const ACPI_TABLES_START: u64 = 0xe0100;
/// End of the ACPI area.
pub const ACPI_TABLES_END: u64 = 0x10_0000;

/// First byte of "high" memory, where kernels and initrds are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; guest RAM beyond this continues at 4 GiB.
pub const MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO32_SIZE: u64 = 0x4000_0000;
/// Where RAM continues above the hole.
pub const RAM_ABOVE_4G_START: u64 = 0x1_0000_0000;

/// hearth's control page (boot-complete and exit registers; guest ABI, see README).
/// Firecracker's boot-timer device lives at the same address.
pub const CONTROL_PAGE_START: u64 = MMIO32_START;
/// Size of the control page.
pub const CONTROL_PAGE_SIZE: u64 = 0x1000;

/// virtio-mmio windows, one 4 KiB page each, allocated upwards from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Maximum number of virtio-mmio windows.
pub const VIRTIO_MMIO_MAX_DEVICES: u64 = 16;

/// IOAPIC registers (KVM in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;

/// KVM_SET_TSS_ADDR: three pages KVM needs for real-mode emulation on Intel, below 4 GiB and
/// outside RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM_SET_IDENTITY_MAP_ADDR: one page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Number of IOAPIC pins (GSIs 0-23).
pub const IOAPIC_NUM_PINS: u32 = 24;
/// The i8042 keyboard's legacy IRQ.
pub const I8042_KEYBOARD_IRQ: u32 = 1;
/// COM1's legacy IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// First GSI handed to virtio-mmio devices.
pub const IRQ_VIRTIO_BASE: u32 = 5;
/// The ACPI Generic Event Device's interrupt, which tells the guest that the VM
/// generation ID changed: the last IOAPIC pin, out of the virtio devices' way.
pub const GED_IRQ: u32 = IOAPIC_NUM_PINS - 1;
/// Last GSI usable by virtio devices.
pub const IRQ_MAX: u32 = GED_IRQ - 1;

/// COM1 16550 UART: base port and width.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_SIZE: u64 = 0x8;
/// i8042 keyboard controller: data port (0x60) and status/command port (0x64).
pub const I8042_DATA_PORT: u64 = 0x60;
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// CMOS/RTC index and data ports.
pub const CMOS_PORT_BASE: u64 = 0x70;
pub const CMOS_PORT_SIZE: u64 = 0x2;
/// Port I/O form of the control page's boot-complete register (Firecracker's original
/// boot-timer port).
pub const BOOT_COMPLETE_PORT: u64 = 0x3f0;
/// Port I/O form of the control page's exit register (QEMU's isa-debug-exit port).
pub const EXIT_PORT: u64 = 0xf4;
/// Paravirtual extended-state switching for `noxsave` guests on nested PVM hosts (see
/// `arch::x86_64::pvm::xstate`): reading the save port returns a magic value; a 32-bit
/// write of a buffer's guest-physical address >> 6 saves the vCPU's register state there,
/// or (restore port) loads it from there.
pub const PV_XSTATE_SAVE_PORT: u16 = 0x5f0;
pub const PV_XSTATE_RESTORE_PORT: u16 = 0x5f4;

/// ACPI hardware-reduced sleep registers, one byte each (FADT SLEEP_CONTROL_REG and
/// SLEEP_STATUS_REG). A guest `poweroff` writes SLP_TYP=5 << 2 | SLP_EN (0x34) to the control
/// port; the status port reads WAK_STS.
pub const ACPI_SLEEP_CONTROL_PORT: u64 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u64 = 0x601;

/// Highest guest-physical address the initrd may end at for the Linux boot protocol when
/// the kernel does not say otherwise (`initrd_addr_max` default).
pub const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;
