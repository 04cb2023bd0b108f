/*
 * Guest ABI constants shared by the test payloads (see src/arch/x86_64/layout.rs and the
 * README's guest ABI). Included by every payload source through gcc's preprocessor.
 */
#ifndef HEARTH_PAYLOAD_H
#define HEARTH_PAYLOAD_H

/*
 * COM1 16550: transmit holding / receive buffer register (the same port) and line status
 * register (bit 0: data ready, bit 5: THR empty).
 */
#define SERIAL_THR              0x3f8
#define SERIAL_RBR              0x3f8
#define SERIAL_LSR              0x3fd
#define SERIAL_LSR_DATA_READY   0x01
#define SERIAL_LSR_THR_EMPTY    0x20
/* Give up waiting for THR-empty after this many polls and write anyway. */
#define SERIAL_POLL_LIMIT       100000

/* hearth's control page: boot-complete and exit registers, and their port forms. */
#define CONTROL_BOOT_COMPLETE   0xc0000000
#define CONTROL_EXIT            0xc0000008
#define BOOT_COMPLETE_PORT      0x3f0
#define BOOT_COMPLETE_VALUE     123
#define EXIT_PORT               0xf4

/* i8042: command port and the pulse-reset-line command. */
#define I8042_COMMAND_PORT      0x64
#define I8042_CMD_RESET         0xfe

/* Local APIC (xAPIC MMIO) registers. */
#define LAPIC_BASE              0xfee00000
#define LAPIC_SVR               0xf0
#define LAPIC_ICR_LOW           0x300
#define LAPIC_ICR_HIGH          0x310
#define LAPIC_ICR_BUSY          (1 << 12)
/* ICR: destination shorthand "all excluding self", level assert, INIT / STARTUP. */
#define LAPIC_ICR_INIT_OTHERS   0x000c4500
#define LAPIC_ICR_SIPI_OTHERS   0x000c4600

/* PVH: magic at the start of hvm_start_info, and the ELF note that carries the entry. */
#define XEN_HVM_START_MAGIC     0x336ec578
#define XEN_ELFNOTE_PHYS32_ENTRY 18

/* A present, DPL 0, available 64-bit TSS. */
#define TSS_DESC_TYPE           0x89
/* 64-bit IDT gates: 16 bytes; present, DPL 0, interrupt gate, IST 0. */
#define GATE_SIZE               16
#define GATE_ATTRS              0x8e00

#ifdef __ASSEMBLER__
/* Stores the 16-byte descriptor of an available 64-bit TSS of `size` bytes at the address
 * in %rax into the GDT slot `sel` of `gdt`. Clobbers %rax, %rcx, %rdx and %rdi. */
.macro  set_tss_descriptor gdt, sel, size
        mov     %rax, %rdx
        shl     $16, %rdx
        movabs  $0xffffff0000, %rcx
        and     %rcx, %rdx                      /* base 23:0 -> bits 39:16 */
        mov     %rax, %rcx
        shr     $24, %rcx
        and     $0xff, %ecx
        shl     $56, %rcx                       /* base 31:24 -> bits 63:56 */
        or      %rcx, %rdx
        movabs  $((TSS_DESC_TYPE << 40) | (\size - 1)), %rcx
        or      %rcx, %rdx
        lea     \gdt(%rip), %rdi
        mov     %rdx, \sel(%rdi)
        shr     $32, %rax
        mov     %rax, \sel + 8(%rdi)
.endm

/* Loads the GDT whose linear address is in %rax through the 10-byte pseudo-descriptor at
 * `gdtr` (its limit already set), reloads CS with `cs` (a far return), DS, ES and SS with
 * `ds`, FS and GS with null, and TR with `tss`. Clobbers %rax and %rdi. */
.macro  load_gdt_and_tss gdtr, cs, ds, tss
        lea     \gdtr(%rip), %rdi
        mov     %rax, 2(%rdi)
        lgdt    (%rdi)
        pushq   $\cs
        lea     .Lreloaded\@(%rip), %rax
        push    %rax
        lretq
.Lreloaded\@:
        mov     $\ds, %eax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        xor     %eax, %eax
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $\tss, %eax
        ltr     %ax
.endm

/* Fills the IDT gate at %rdi with the handler at %rax in code segment `selector` (an
 * immediate or %cs). Clobbers %rax. */
.macro  fill_gate selector
        mov     %ax, (%rdi)             /* offset 15:0 */
        movw    \selector, 2(%rdi)
        movw    $GATE_ATTRS, 4(%rdi)
        shr     $16, %rax
        mov     %ax, 6(%rdi)            /* offset 31:16 */
        shr     $16, %rax
        mov     %eax, 8(%rdi)           /* offset 63:32 */
        movl    $0, 12(%rdi)
.endm

/* Points gate `vector` of the IDT at `idt` to `handler`, in the code segment the payload
 * runs in. Clobbers %rax and %rdi. */
.macro  set_interrupt_gate idt, vector, handler
        lea     \idt + \vector * GATE_SIZE(%rip), %rdi
        lea     \handler(%rip), %rax
        fill_gate %cs
.endm
#endif

#endif
