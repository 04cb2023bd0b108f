/* hello: print a greeting on COM1, exit 0 through the exit port (via _start's return path). */
#include "payload.h"

        .text
        .code64
        .globl payload_main
payload_main:
        lea     hello_msg(%rip), %rdi
        call    serial_puts
        xor     %eax, %eax
        ret

        .section .rodata
hello_msg:
        .asciz  "Hello from hearth payload\n"
