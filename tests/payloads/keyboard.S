/*
 * keyboard: waits, polling the i8042 (no interrupts), for the scancodes of Ctrl+Alt+Del
 * pressed and released (set 1: the controller translates at power-on), as hearth's
 * SendCtrlAltDel types them. Ends the VM with status 42 when all eight bytes came in
 * order, with 1 at the first byte that differs. Prints "keyboard ready" first, so a test
 * knows the vCPU runs.
 */
#include "payload.h"

#define I8042_DATA_PORT         0x60
#define I8042_STATUS_OUTPUT     0x01
#define KEYBOARD_OK_STATUS      42

        .text
        .code64
        .globl payload_main
payload_main:
        lea     ready_msg(%rip), %rdi
        call    serial_puts
        lea     expected(%rip), %rsi
        mov     $(expected_end - expected), %ecx
1:      in      $I8042_COMMAND_PORT, %al
        test    $I8042_STATUS_OUTPUT, %al
        jz      1b
        in      $I8042_DATA_PORT, %al
        cmpb    (%rsi), %al
        jne     2f
        inc     %rsi
        dec     %ecx
        jnz     1b
        mov     $KEYBOARD_OK_STATUS, %edi
        jmp     exit_port
2:      mov     $1, %edi
        jmp     exit_port

        .section .rodata
ready_msg:
        .asciz  "keyboard ready\n"
expected:
        /* make Ctrl, Alt, Delete (E0 53); break Delete, Alt, Ctrl */
        .byte   0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d
expected_end:
