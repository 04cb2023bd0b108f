/*
 * echo: print "echo ready", then echo every byte received on COM1 back to it, until a 'q'
 * arrives: then print "bye" and exit 0. The receive poll has no bound: the test's timeout
 * ends a guest that never gets its 'q'.
 */
#include "payload.h"

        .text
        .code64
        .globl payload_main
payload_main:
        lea     ready_msg(%rip), %rdi
        call    serial_puts
1:      mov     $SERIAL_LSR, %dx
        in      %dx, %al
        test    $SERIAL_LSR_DATA_READY, %al
        jnz     2f
        pause
        jmp     1b
2:      mov     $SERIAL_RBR, %dx
        in      %dx, %al
        cmp     $'q', %al
        je      3f
        call    serial_putc
        jmp     1b
3:      lea     bye_msg(%rip), %rdi
        call    serial_puts
        xor     %eax, %eax
        ret

        .section .rodata
ready_msg:
        .asciz  "echo ready\n"
bye_msg:
        .asciz  "bye\n"
