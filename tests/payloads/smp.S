/*
 * smp: the BSP starts the other NCPUS-1 CPUs with INIT-SIPI-SIPI through the local APIC and
 * waits (bounded by the TSC) until each has incremented a counter; prints
 * "smp: N cpus up" and exits 0, or "smp: timeout ..." and exits 1.
 *
 * The AP trampoline is real-mode code copied to TRAMPOLINE_BASE (SIPI vector = its page
 * number); it does `lock incl` on a counter inside its own page and halts.
 */
#include "payload.h"

#ifndef NCPUS
#define NCPUS 2
#endif

/* Free low RAM in hearth's layout (between the boot page tables and the command line). */
#define TRAMPOLINE_BASE 0x30000
#define SIPI_VECTOR     (TRAMPOLINE_BASE >> 12)
#define COUNTER_ADDR    (TRAMPOLINE_BASE + (ap_counter - ap_trampoline))

#define WAIT_TSC        10000000000     /* give the APs ~3-5 s of TSC time */

        .text
        .code64
        .globl payload_main
payload_main:
        push    %rbx
        push    %r12

        lea     ap_trampoline(%rip), %rsi
        mov     $TRAMPOLINE_BASE, %edi
        mov     $(ap_trampoline_end - ap_trampoline), %ecx
        rep movsb

        mov     $SIPI_VECTOR, %edi
        call    start_aps

        call    read_tsc
        movabs  $WAIT_TSC, %r12
        add     %rax, %r12
1:      mov     COUNTER_ADDR, %eax
        cmp     $(NCPUS - 1), %eax
        jae     2f
        pause
        call    read_tsc
        cmp     %r12, %rax
        jb      1b

        lea     timeout_msg(%rip), %rdi
        call    serial_puts
        mov     COUNTER_ADDR, %edi
        inc     %edi
        call    serial_putdec
        lea     timeout_of_msg(%rip), %rdi
        call    serial_puts
        mov     $NCPUS, %edi
        call    serial_putdec
        lea     timeout_tail_msg(%rip), %rdi
        call    serial_puts
        mov     $1, %eax
        jmp     3f

2:      lea     up_msg(%rip), %rdi
        call    serial_puts
        mov     COUNTER_ADDR, %edi
        inc     %edi
        call    serial_putdec
        lea     up_tail_msg(%rip), %rdi
        call    serial_puts
        xor     %eax, %eax
3:      pop     %r12
        pop     %rbx
        ret

        .section .rodata
/* Copied to TRAMPOLINE_BASE; entered by SIPI in real mode at CS = SIPI_VECTOR << 8, IP = 0. */
        .balign 16
ap_trampoline:
        .code16
        cli
        lock incl %cs:(ap_counter - ap_trampoline)
1:      cli
        hlt
        jmp     1b
        .balign 4
ap_counter:
        .long   0
ap_trampoline_end:
        .code64

up_msg:
        .asciz  "smp: "
up_tail_msg:
        .asciz  " cpus up\n"
timeout_msg:
        .asciz  "smp: timeout, "
timeout_of_msg:
        .asciz  " of "
timeout_tail_msg:
        .asciz  " cpus up (the APs did not all start)\n"
