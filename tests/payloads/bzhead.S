/*
 * The first 0x200 bytes of a test bzImage's protected-mode code (Linux's startup_32 slot,
 * at code32_start). hearth must enter at startup_64 (load address + 0x200) in long mode;
 * landing here instead prints a diagnostic and exits with status 3. bzimage.ld places
 * _start right after this section and fails the link if it outgrows 0x200 bytes.
 */
#include "payload.h"

        .section .head32, "ax"
        .code32
        .globl startup_32
startup_32:
        cli
        cld
        mov     $stack32_top, %esp
        mov     $wrong_entry_msg, %esi
        call    serial_puts32
        mov     $3, %al
        jmp     exit32
        .code64

        .section .rodata
wrong_entry_msg:
        .asciz  "bzImage payload: entered at the 32-bit entry (code32_start) instead of startup_64\n"
