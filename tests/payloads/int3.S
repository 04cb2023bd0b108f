/*
 * int3: install a 64-bit IDT whose #BP (vector 3) gate points at a handler that prints a
 * line, counts, and returns with iretq; execute int3; then print again and exit 0.
 * Exit 2 when execution went on past int3 without the handler having run (a VMM that just
 * skipped the instruction).
 */
#include "payload.h"

#define BP_VECTOR       3
#define IDT_ENTRIES     256

        .text
        .code64
        .globl payload_main
payload_main:
        set_interrupt_gate idt, BP_VECTOR, bp_handler
        lidt    idtr(%rip)

        int3

        lea     after_msg(%rip), %rdi
        call    serial_puts
        cmpl    $1, bp_count(%rip)
        jne     1f
        xor     %eax, %eax
        ret
1:      lea     not_run_msg(%rip), %rdi
        call    serial_puts
        mov     $2, %eax
        ret

bp_handler:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rdi
        lea     handled_msg(%rip), %rdi
        call    serial_puts
        incl    bp_count(%rip)
        pop     %rdi
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq

        .section .rodata
handled_msg:
        .asciz  "int3 handled\n"
after_msg:
        .asciz  "after int3\n"
not_run_msg:
        .asciz  "int3: the #BP handler did not run\n"

        .data
        .balign 16
idtr:
        .word   IDT_ENTRIES * GATE_SIZE - 1
        .quad   idt
bp_count:
        .long   0

        .bss
        .balign 16
idt:
        .skip   IDT_ENTRIES * GATE_SIZE
