/*
 * exits: EXIT_COUNT guest writes that each leave the guest (a VM exit handled by hearth),
 * then exit 0. Writes go to the boot-complete port with a value that means nothing
 * (PIO), or to an unused register of the control page (MMIO, with VIA_MMIO), so the
 * devices do no work and the loop measures the exit round trip itself. Used by the
 * criterion benchmark benches/vm_exits.rs.
 */
#include "payload.h"

#ifndef EXIT_COUNT
#error "build with -DEXIT_COUNT=N"
#endif

/* A control-page offset that no register claims: writes are ignored. */
#define CONTROL_UNUSED          (CONTROL_BOOT_COMPLETE + 0x10)

        .text
        .code64
        .globl payload_main
payload_main:
        mov     $EXIT_COUNT, %ecx
        xor     %eax, %eax
#ifdef VIA_MMIO
        mov     $CONTROL_UNUSED, %edx
1:      movb    %al, (%rdx)
#else
        mov     $BOOT_COMPLETE_PORT, %dx
1:      out     %al, %dx
#endif
        dec     %ecx
        jnz     1b
        xor     %eax, %eax
        ret
