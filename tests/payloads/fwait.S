/* fwait: initialise the x87 FPU, wait on it, and report; exit 0. */
#include "payload.h"

        .text
        .code64
        .globl payload_main
payload_main:
        fninit
        fwait
        lea     ok_msg(%rip), %rdi
        call    serial_puts
        xor     %eax, %eax
        ret

        .section .rodata
ok_msg:
        .asciz  "fwait ok\n"
