/*
 * verw: VERW at CPL 0 and at CPL 3, printing ZF after each one; the expected lines are the
 * architecture's (Intel SDM, VERR/VERW), so the output is the same whether the CPU runs
 * VERW (VMX/SVM) or hearth's compat layer completes it (nested PVM, where KVM's emulator
 * fails it at CPL 0).
 *
 * The GDT has Linux's x86-64 layout (kernel CS 0x10, DS 0x18, user DS 0x2b, CS 0x33, TSS
 * 0x40). On a nested-PVM host guest user mode runs natively, so a VERW at CPL 3 may be
 * checked against the host kernel's GDT rather than ours; with the same layout the answer
 * is the same either way.
 *
 * Before each VERW, ZF is set to the opposite of the architecture's answer, so that an
 * instruction merely skipped cannot print the right line.
 *
 * CPL 0: a RIP-relative word holding the kernel data selector, register operands (null,
 * kernel code, with a 0x66 prefix and REX.B), RPL 3 on the DPL-0 data segment, a DPL-3
 * data segment, a read-only data segment through a GS override and a SIB with disp8, and
 * a selector beyond the GDT's limit. Then iretq to CPL 3 (first 2 MiB made user
 * accessible, SMEP/SMAP off), which runs VERW on the user data selector (memory) and the
 * kernel data selector (register), keeps ZF in %r12b and %r13b and executes ud2; the #UD
 * handler, back at CPL 0, prints them and exits 0. Any other exception prints and exits 1.
 */
#include "payload.h"

#define KERNEL32_CS             0x08
#define KERNEL_CS               0x10
#define KERNEL_DS               0x18
#define USER32_CS               (0x20 | 3)
#define USER_DS                 (0x28 | 3)
#define USER_CS                 (0x30 | 3)
#define KERNEL_RO               0x38    /* read-only data, DPL 0 */
#define TSS_SEL                 0x40
#define BEYOND_GDT              0x50

#define PTE_USER                0x4
#define PTE_PAGE_SIZE           0x80
#define PTE_ADDR_MASK           0x000ffffffffff000
#define CR4_SMEP                (1 << 20)
#define CR4_SMAP                (1 << 21)
#define MSR_GS_BASE             0xc0000101

#define RFLAGS_FIXED            0x2
#define IDT_ENTRIES             32
#define VEC_UD                  6
#define VEC_GP                  13
#define VEC_PF                  14

#define TSS_SIZE                104
#define TSS_RSP0                4
#define TSS_IOMAP_BASE          102

/* Make ZF the opposite of \expected (0 or 1); clobbers %r10. */
.macro  zf_not expected
.if \expected
        mov     $1, %r10d
        test    %r10d, %r10d
.else
        xor     %r10d, %r10d
.endif
.endm

/* Right after a VERW: print \msg and ZF as 0 or 1. Clobbers %rax, %rbx, %rcx, %rdx,
 * %rsi, %rdi. */
.macro  report msg
        setz    %bl
        lea     \msg(%rip), %rdi
        call    serial_puts
        movzbl  %bl, %edi
        call    put_zf
.endm

        .text
        .code64
        .globl payload_main
payload_main:
        mov     %cr4, %rax
        and     $~(CR4_SMEP | CR4_SMAP), %rax
        mov     %rax, %cr4

        /* User access to the first 2 MiB: U/S in PML4[0], PDPT[0] and PD[0] of the boot map. */
        movabs  $PTE_ADDR_MASK, %r8
        mov     %cr3, %r9
        and     %r8, %r9
        orq     $PTE_USER, (%r9)
        mov     (%r9), %rax
        and     %r8, %rax
        orq     $PTE_USER, (%rax)
        mov     (%rax), %rax
        and     %r8, %rax
        testb   $PTE_PAGE_SIZE, (%rax)
        jz      no_large_page
        orq     $PTE_USER, (%rax)
        mov     %cr3, %rax
        mov     %rax, %cr3

        /* TSS (RSP0: the stack the #UD from user mode lands on) and its descriptor. */
        lea     tss(%rip), %rdi
        lea     kernel_stack_top(%rip), %rax
        mov     %rax, TSS_RSP0(%rdi)
        movw    $TSS_SIZE, TSS_IOMAP_BASE(%rdi)
        mov     %rdi, %rax
        set_tss_descriptor gdt, TSS_SEL, TSS_SIZE

        lea     gdt(%rip), %rax
        load_gdt_and_tss gdtr, KERNEL_CS, KERNEL_DS, TSS_SEL

        xor     %ebx, %ebx
2:      mov     %ebx, %edi
        lea     exc_other(%rip), %rsi
        call    set_gate
        inc     %ebx
        cmp     $IDT_ENTRIES, %ebx
        jb      2b
        mov     $VEC_UD, %edi
        lea     exc_ud(%rip), %rsi
        call    set_gate
        mov     $VEC_GP, %edi
        lea     exc_gp(%rip), %rsi
        call    set_gate
        mov     $VEC_PF, %edi
        lea     exc_pf(%rip), %rsi
        call    set_gate
        lea     idtr(%rip), %rdi
        lea     idt(%rip), %rax
        mov     %rax, 2(%rdi)
        lidt    (%rdi)

        /* ------------------------------------------------------------- CPL 0 checks */
        zf_not  1
        verw    kernel_ds_word(%rip)
        report  cpl0_memory_msg

        zf_not  0
        xor     %eax, %eax
        verw    %ax
        report  cpl0_null_msg

        zf_not  0
        mov     $KERNEL_CS, %r9d
        .byte   0x66, 0x41, 0x0f, 0x00, 0xe9    /* data16 verw %r9w */
        report  cpl0_code_msg

        zf_not  0
        mov     $(KERNEL_DS | 3), %edx
        verw    %dx
        report  cpl0_rpl3_msg

        zf_not  1
        mov     $USER_DS, %esi
        verw    %si
        report  cpl0_user_data_msg

        /* GS base = selectors; %gs:4(%rax,%rcx,2) with %rax = 0, %rcx = 1 is selectors[3]. */
        mov     $MSR_GS_BASE, %ecx
        lea     selectors(%rip), %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr
        xor     %eax, %eax
        mov     $1, %ecx
        zf_not  0
        verw    %gs:4(%rax, %rcx, 2)
        report  cpl0_read_only_msg

        zf_not  0
        mov     $BEYOND_GDT, %edi
        verw    %di
        report  cpl0_beyond_msg

        /* ------------------------------------------------------------- to CPL 3 */
        pushq   $USER_DS
        lea     user_stack_top(%rip), %rax
        push    %rax
        pushq   $RFLAGS_FIXED
        pushq   $USER_CS
        lea     user_main(%rip), %rax
        push    %rax
        iretq

no_large_page:
        lea     no_large_page_msg(%rip), %rdi
        call    serial_puts
        mov     $1, %eax
        ret

user_main:
        zf_not  1
        verw    user_ds_word(%rip)
        setz    %r12b
        zf_not  0
        mov     $KERNEL_DS, %eax
        verw    %ax
        setz    %r13b
user_ud2:
        ud2

/* #UD: from user_ud2 at CPL 3, print the user-mode results and exit 0. */
exc_ud:
        testb   $3, 8(%rsp)                     /* CS */
        jz      1f
        lea     user_ud2(%rip), %rax
        cmp     %rax, (%rsp)                    /* RIP */
        jne     1f
        mov     %cs, %eax
        test    $3, %eax
        jnz     1f
        lea     cpl3_user_data_msg(%rip), %rdi
        call    serial_puts
        movzbl  %r12b, %edi
        call    put_zf
        lea     cpl3_kernel_data_msg(%rip), %rdi
        call    serial_puts
        movzbl  %r13b, %edi
        call    put_zf
        lea     done_msg(%rip), %rdi
        call    serial_puts
        xor     %edi, %edi
        jmp     exit_port
1:      lea     ud_msg(%rip), %rdi
        mov     (%rsp), %rbx
        jmp     fail

exc_gp:
        lea     gp_msg(%rip), %rdi
        mov     8(%rsp), %rbx                   /* past the error code */
        jmp     fail
exc_pf:
        lea     pf_msg(%rip), %rdi
        mov     8(%rsp), %rbx
        jmp     fail
exc_other:
        lea     exception_msg(%rip), %rdi
        xor     %ebx, %ebx
/* Print the message at %rdi and the RIP in %rbx, exit 1. */
fail:
        call    serial_puts
        lea     at_msg(%rip), %rdi
        call    serial_puts
        mov     %rbx, %rdi
        call    puthex
        lea     newline(%rip), %rdi
        call    serial_puts
        mov     $1, %edi
        jmp     exit_port

/* put_zf: write "zf " and %edi (0 or 1), then a newline. */
put_zf:
        push    %rdi
        lea     zf_msg(%rip), %rdi
        call    serial_puts
        pop     %rdi
        call    serial_putdec
        lea     newline(%rip), %rdi
        jmp     serial_puts

/* set_gate: IDT gate %edi -> handler at %rsi (kernel CS, GATE_ATTRS). Clobbers %rax, %rdi. */
set_gate:
        shl     $4, %edi
        lea     idt(%rip), %rax
        add     %rax, %rdi
        mov     %rsi, %rax
        fill_gate $KERNEL_CS
        ret

/* puthex: write %rdi as 0x and 16 hex digits. Clobbers %rax, %rcx, %rdx, %rdi, %rsi. */
puthex:
        push    %rbx
        mov     %rdi, %rbx
        mov     $'0', %al
        call    serial_putc
        mov     $'x', %al
        call    serial_putc
        mov     $16, %esi
1:      rol     $4, %rbx
        mov     %ebx, %eax
        and     $0xf, %eax
        cmp     $10, %al
        jb      2f
        add     $('a' - '0' - 10), %al
2:      add     $'0', %al
        call    serial_putc
        dec     %esi
        jnz     1b
        pop     %rbx
        ret

        .section .rodata
kernel_ds_word:
        .word   KERNEL_DS
user_ds_word:
        .word   USER_DS
selectors:
        .word   0, 0, 0, KERNEL_RO
cpl0_memory_msg:
        .asciz  "verw cpl0 memory kernel data: "
cpl0_null_msg:
        .asciz  "verw cpl0 register null: "
cpl0_code_msg:
        .asciz  "verw cpl0 register kernel code: "
cpl0_rpl3_msg:
        .asciz  "verw cpl0 register kernel data rpl 3: "
cpl0_user_data_msg:
        .asciz  "verw cpl0 register user data: "
cpl0_read_only_msg:
        .asciz  "verw cpl0 gs sib read-only data: "
cpl0_beyond_msg:
        .asciz  "verw cpl0 register beyond gdt limit: "
cpl3_user_data_msg:
        .asciz  "verw cpl3 memory user data: "
cpl3_kernel_data_msg:
        .asciz  "verw cpl3 register kernel data: "
done_msg:
        .asciz  "verw done\n"
zf_msg:
        .asciz  "zf "
newline:
        .asciz  "\n"
no_large_page_msg:
        .asciz  "verw: the boot map of 0-2 MiB is not a 2 MiB page\n"
ud_msg:
        .asciz  "verw: unexpected #UD"
gp_msg:
        .asciz  "verw: unexpected #GP"
pf_msg:
        .asciz  "verw: unexpected #PF"
exception_msg:
        .asciz  "verw: unexpected exception"
at_msg:
        .asciz  " at rip "

        .data
        .balign 16
gdt:
        .quad   0
        .quad   0x00cf9b000000ffff              /* 0x08 kernel code, 32-bit */
        .quad   0x00af9b000000ffff              /* 0x10 kernel code, 64-bit */
        .quad   0x00cf93000000ffff              /* 0x18 kernel data */
        .quad   0x00cffb000000ffff              /* 0x20 user code, 32-bit */
        .quad   0x00cff3000000ffff              /* 0x28 user data */
        .quad   0x00affb000000ffff              /* 0x30 user code, 64-bit */
        .quad   0x00cf91000000ffff              /* 0x38 kernel data, read-only */
        .quad   0, 0                            /* 0x40 TSS, filled in */
gdt_end:
        .balign 8
        .skip   6                               /* so that the base is 8-byte aligned */
gdtr:
        .word   gdt_end - gdt - 1
        .quad   0
        .balign 8
        .skip   6
idtr:
        .word   IDT_ENTRIES * GATE_SIZE - 1
        .quad   0
        .balign 16
tss:
        .skip   TSS_SIZE

        .bss
        .balign 16
idt:
        .skip   IDT_ENTRIES * GATE_SIZE
        .balign 16
kernel_stack:
        .skip   8192
kernel_stack_top:
user_stack:
        .skip   8192
user_stack_top:
