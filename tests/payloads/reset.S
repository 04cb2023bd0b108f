/* reset: pulse the reset line through the i8042; hearth treats that as a clean exit (0). */
#include "payload.h"

        .text
        .code64
        .globl payload_main
payload_main:
        mov     $I8042_CMD_RESET, %al
        out     %al, $I8042_COMMAND_PORT
        lea     ignored_msg(%rip), %rdi
        call    serial_puts
        mov     $1, %eax
        ret

        .section .rodata
ignored_msg:
        .asciz  "reset: i8042 reset ignored\n"
