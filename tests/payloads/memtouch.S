/*
 * memtouch: check that guest RAM is where hearth's layout says it is when the guest has
 * more than 3 GiB: RAM runs up to the 32-bit MMIO hole at 3 GiB and continues at 4 GiB.
 * Run with --memory MEMORY_MIB M (4608 MiB by default: 3 GiB below the hole, 1.5 GiB above).
 *
 * The boot identity map covers only the low 4 GiB, so the payload first maps 4-6 GiB with
 * two page directories of 2 MiB pages of its own, hung off the boot PDPT (found through
 * CR3, not hard-coded), and reloads CR3. It then writes a distinct value to each probe
 * address (just below the hole, 64 MiB above 4 GiB, the last MiB of RAM), reads them all
 * back, prints "memtouch ok" and exits 0, or names the first bad probe and exits 1.
 * Writes to guest-physical addresses without RAM are lost and reads return something
 * else, so a probe outside RAM, or two probes aliasing the same RAM, fail the check.
 */
#include "payload.h"

#ifndef MEMORY_MIB
#define MEMORY_MIB              4608
#endif

#define MIB                     0x100000
#define GIB                     0x40000000
#define LOW_RAM_END             (3 * GIB)       /* the 32-bit MMIO hole starts here */
#define HIGH_RAM_BASE           (4 * GIB)
#define HIGH_RAM_END            (HIGH_RAM_BASE + MEMORY_MIB * MIB - LOW_RAM_END)

/* The payload's own mapping: HIGH_MAP_GIBS GiB from HIGH_RAM_BASE, in 2 MiB pages. */
#define HIGH_MAP_GIBS           2
#define PDPT_INDEX_HIGH         (HIGH_RAM_BASE / GIB)
#define PD_ENTRIES              512
#define PAGE_2M                 0x200000
#define PAGE_SIZE_4K            4096

#if MEMORY_MIB * MIB < LOW_RAM_END + 65 * MIB
#error "memtouch needs more than 3 GiB + 65 MiB of guest RAM"
#endif
#if HIGH_RAM_END > HIGH_RAM_BASE + HIGH_MAP_GIBS * GIB
#error "memtouch maps only HIGH_MAP_GIBS GiB above 4 GiB"
#endif

/* Page-table entry bits and the physical-address field of an entry. */
#define PTE_PRESENT             0x1
#define PTE_WRITABLE            0x2
#define PTE_PAGE_SIZE           0x80
#define PTE_ADDR_MASK           0x000ffffffffff000

#define PATTERN                 0x5a5ac3c30f0f9669

        .text
        .code64
        .globl payload_main
payload_main:
        /* Page directories for HIGH_RAM_BASE onwards: 2 MiB pages, present and writable. */
        lea     high_pds(%rip), %rdi
        movabs  $(HIGH_RAM_BASE | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE), %rax
        mov     $(HIGH_MAP_GIBS * PD_ENTRIES), %ecx
1:      mov     %rax, (%rdi)
        add     $PAGE_2M, %rax
        add     $8, %rdi
        dec     %ecx
        jnz     1b

        /* The boot PDPT, through CR3 and PML4[0] (both identity-mapped in low RAM). */
        movabs  $PTE_ADDR_MASK, %rdx
        mov     %cr3, %rax
        and     %rdx, %rax
        mov     (%rax), %rax
        test    $PTE_PRESENT, %al
        jz      no_pdpt
        and     %rdx, %rax

        lea     high_pds(%rip), %rsi
        or      $(PTE_PRESENT | PTE_WRITABLE), %rsi
        mov     $HIGH_MAP_GIBS, %ecx
        lea     (PDPT_INDEX_HIGH * 8)(%rax), %rdi
2:      mov     %rsi, (%rdi)
        add     $PAGE_SIZE_4K, %rsi
        add     $8, %rdi
        dec     %ecx
        jnz     2b
        mov     %cr3, %rax
        mov     %rax, %cr3

        /* Write every probe, then check every probe, so aliasing probes are caught too. */
        movabs  $PATTERN, %rdx
        lea     probes(%rip), %rsi
3:      mov     (%rsi), %rdi
        mov     %rdi, %rax
        xor     %rdx, %rax
        mov     %rax, (%rdi)
        add     $16, %rsi
        lea     probes_end(%rip), %rax
        cmp     %rax, %rsi
        jb      3b

        lea     probes(%rip), %rsi
4:      mov     (%rsi), %rdi
        mov     %rdi, %rax
        xor     %rdx, %rax
        cmp     %rax, (%rdi)
        jne     bad_probe
        add     $16, %rsi
        lea     probes_end(%rip), %rax
        cmp     %rax, %rsi
        jb      4b

        lea     ok_msg(%rip), %rdi
        call    serial_puts
        xor     %eax, %eax
        ret

/* %rsi: the probe whose value did not come back. */
bad_probe:
        push    %rsi
        lea     bad_msg(%rip), %rdi
        call    serial_puts
        pop     %rsi
        mov     8(%rsi), %rdi
        call    serial_puts
        mov     $1, %eax
        ret

no_pdpt:
        lea     no_pdpt_msg(%rip), %rdi
        call    serial_puts
        mov     $1, %eax
        ret

        .section .rodata
        .balign 8
/* Probes: guest-physical address (identity-mapped), description. */
probes:
        .quad   LOW_RAM_END - MIB, below_hole_name
        .quad   HIGH_RAM_BASE + 64 * MIB, above_4g_name
        .quad   HIGH_RAM_END - MIB, last_mib_name
probes_end:

ok_msg:
        .asciz  "memtouch ok\n"
bad_msg:
        .asciz  "memtouch bad: "
below_hole_name:
        .asciz  "the last MiB below the 3 GiB MMIO hole does not hold its value\n"
above_4g_name:
        .asciz  "RAM 64 MiB above 4 GiB does not hold its value\n"
last_mib_name:
        .asciz  "the last MiB of RAM above 4 GiB does not hold its value\n"
no_pdpt_msg:
        .asciz  "memtouch bad: PML4[0] of the boot page tables is not present\n"

        .bss
        .balign PAGE_SIZE_4K
high_pds:
        .skip   HIGH_MAP_GIBS * PAGE_SIZE_4K
