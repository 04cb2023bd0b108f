/*
 * 64-bit runtime shared by the payloads: the entry point, serial/exit helpers, and the
 * start-up of the other CPUs.
 *
 * hearth enters _start in 64-bit long mode (ELF e_entry, or bzImage load address + 0x200).
 * _start sets up its own stack rather than trusting the boot one, calls payload_main and
 * exits with payload_main's return value (%eax) through the exit port.
 */
#include "payload.h"

#define ICR_POLL_LIMIT  100000
#define IPI_DELAY_TSC   0x100000        /* pause between INIT and each SIPI */

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
/*
 * start_aps: INIT-SIPI-SIPI to every other CPU through the local APIC; each starts in real
 * mode at CS = %edi << 8, IP = 0 (%edi: the SIPI vector, the trampoline's page number).
 * Clobbers %rax, %rcx, %rdx, %rsi, %rdi.
 */
        .globl start_aps
start_aps:
        push    %rbx
        mov     %edi, %edi
        or      $LAPIC_ICR_SIPI_OTHERS, %edi
        mov     $LAPIC_BASE, %ebx
        movl    $0x1ff, LAPIC_SVR(%rbx)         /* software-enable, spurious vector 0xff */
        movl    $0, LAPIC_ICR_HIGH(%rbx)
        movl    $LAPIC_ICR_INIT_OTHERS, LAPIC_ICR_LOW(%rbx)
        call    icr_wait
        call    ipi_delay
        movl    %edi, LAPIC_ICR_LOW(%rbx)
        call    icr_wait
        call    ipi_delay
        movl    %edi, LAPIC_ICR_LOW(%rbx)
        call    icr_wait
        pop     %rbx
        ret

/* icr_wait: wait (bounded) for the ICR's delivery-status bit to clear. %rbx = LAPIC base. */
icr_wait:
        mov     $ICR_POLL_LIMIT, %ecx
1:      testl   $LAPIC_ICR_BUSY, LAPIC_ICR_LOW(%rbx)
        jz      2f
        pause
        dec     %ecx
        jnz     1b
2:      ret

/* read_tsc: %rax = the 64-bit TSC. Clobbers %rdx. */
        .globl read_tsc
read_tsc:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        ret

/* ipi_delay: spin for IPI_DELAY_TSC cycles. Clobbers %rax, %rdx, %rsi. */
ipi_delay:
        call    read_tsc
        lea     IPI_DELAY_TSC(%rax), %rsi
1:      pause
        call    read_tsc
        cmp     %rsi, %rax
        jb      1b
        ret

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
