/*
 * 32-bit helpers for the entry points that run in protected mode without paging (the PVH
 * entry, and the bzImage's 32-bit entry stub). Addresses are physical and absolute.
 */
#include "payload.h"

        .text
        .code32

/* serial_puts32: write the NUL-terminated string at %esi. Clobbers %eax, %ecx, %edx, %esi. */
        .globl serial_puts32
serial_puts32:
1:      movzbl  (%esi), %eax
        test    %al, %al
        jz      4f
        mov     $SERIAL_POLL_LIMIT, %ecx
        mov     $SERIAL_LSR, %dx
2:      in      %dx, %al
        test    $SERIAL_LSR_THR_EMPTY, %al
        jnz     3f
        pause
        dec     %ecx
        jnz     2b
3:      movzbl  (%esi), %eax
        mov     $SERIAL_THR, %dx
        out     %al, %dx
        inc     %esi
        jmp     1b
4:      ret

/* exit32: end the VM with status %al through the exit port; park the vCPU if ignored. */
        .globl exit32
exit32:
        out     %al, $EXIT_PORT
1:      cli
        hlt
        jmp     1b

        .code64

        .bss
        .balign 16
        .skip   4096
        .globl stack32_top
stack32_top:
