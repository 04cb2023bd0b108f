/*
 * triple_fault: load an empty IDT and execute ud2. #UD cannot be delivered, nor can the
 * #GP/#DF that follow: the CPU shuts down (KVM_EXIT_SHUTDOWN) and hearth exits 100.
 */
#include "payload.h"

        .text
        .code64
        .globl payload_main
payload_main:
        lidt    empty_idtr(%rip)
        ud2
        lea     survived_msg(%rip), %rdi
        call    serial_puts
        mov     $1, %eax
        ret

        .section .rodata
        .balign 16
empty_idtr:
        .word   0                       /* limit */
        .quad   0                       /* base */
survived_msg:
        .asciz  "triple_fault: ud2 did not fault\n"
