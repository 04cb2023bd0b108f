/*
 * 64-bit runtime shared by the payloads: the entry point and serial/exit helpers.
 *
 * hearth enters _start in 64-bit long mode (ELF e_entry, or bzImage load address + 0x200).
 * _start sets up its own stack rather than trusting the boot one, calls payload_main and
 * exits with payload_main's return value (%eax) through the exit port.
 */
#include "payload.h"

        .section .text.entry, "ax"
        .code64
        .globl _start
_start:
        cli
        cld
        lea     stack_top(%rip), %rsp
        call    payload_main
        mov     %eax, %edi
        jmp     exit_port

        .text

/* serial_putc: write %al to COM1 once its transmitter is ready. Clobbers %ecx, %edx. */
        .globl serial_putc
serial_putc:
        push    %rax
        mov     $SERIAL_POLL_LIMIT, %ecx
        mov     $SERIAL_LSR, %dx
1:      in      %dx, %al
        test    $SERIAL_LSR_THR_EMPTY, %al
        jnz     2f
        pause
        dec     %ecx
        jnz     1b
2:      pop     %rax
        mov     $SERIAL_THR, %dx
        out     %al, %dx
        ret

/* serial_puts: write the NUL-terminated string at %rdi. Clobbers %rax, %rcx, %rdx, %rdi. */
        .globl serial_puts
serial_puts:
1:      movzbl  (%rdi), %eax
        test    %al, %al
        jz      2f
        call    serial_putc
        inc     %rdi
        jmp     1b
2:      ret

/* serial_putdec: write %edi in decimal. Clobbers %rax, %rcx, %rdx, %rsi, %rdi. */
        .globl serial_putdec
serial_putdec:
        sub     $16, %rsp
        lea     15(%rsp), %rsi
        movb    $0, (%rsi)
        mov     %edi, %eax
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %ecx
        add     $'0', %dl
        dec     %rsi
        mov     %dl, (%rsi)
        test    %eax, %eax
        jnz     1b
        mov     %rsi, %rdi
        call    serial_puts
        add     $16, %rsp
        ret

/* exit_port: end the VM with status %dil through the exit port. Does not return. */
        .globl exit_port
exit_port:
        mov     %edi, %eax
        out     %al, $EXIT_PORT
        jmp     exit_ignored

/* exit_mmio: end the VM with status %dil through the control page. Does not return. */
        .globl exit_mmio
exit_mmio:
        mov     $CONTROL_EXIT, %edx
        mov     %dil, (%rdx)
        jmp     exit_ignored

/* The VMM should have stopped the VM already: say so, and park the vCPU. */
exit_ignored:
        lea     exit_ignored_msg(%rip), %rdi
        call    serial_puts
        .globl halt_forever
halt_forever:
        cli
        hlt
        jmp     halt_forever

        .section .rodata
exit_ignored_msg:
        .asciz  "payload: exit request ignored by the VMM\n"

        .bss
        .balign 16
stack:
        .skip   8192
stack_top:
