/*
 * boot_signal: report boot complete (123) through the control page, or through port 0x3f0
 * when BOOT_SIGNAL_VIA_PORT is defined; then print "booted" and exit 0.
 */
#include "payload.h"

        .text
        .code64
        .globl payload_main
payload_main:
#ifdef BOOT_SIGNAL_VIA_PORT
        mov     $BOOT_COMPLETE_PORT, %dx
        mov     $BOOT_COMPLETE_VALUE, %al
        out     %al, %dx
#else
        mov     $CONTROL_BOOT_COMPLETE, %edx
        movb    $BOOT_COMPLETE_VALUE, (%rdx)
#endif
        lea     booted_msg(%rip), %rdi
        call    serial_puts
        xor     %eax, %eax
        ret

        .section .rodata
booted_msg:
        .asciz  "booted\n"
