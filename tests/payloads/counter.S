/*
 * counter: print "count 1", "count 2", ... on COM1, one line every COUNTER_DELAY_CYCLES
 * TSC cycles (a few milliseconds on any host), then exit 0 after COUNTER_LIMIT lines. The
 * pause/resume test watches the count stop while the VM is paused and go on after. Both
 * can be defined on the command line: `hearth bench snapshot` builds a variant that
 * prints every 100,000 cycles (tens of microseconds) and does not stop.
 */
#include "payload.h"

#ifndef COUNTER_DELAY_CYCLES
#define COUNTER_DELAY_CYCLES    10000000
#endif
#ifndef COUNTER_LIMIT
#define COUNTER_LIMIT           20000
#endif

        .text
        .code64
        .globl payload_main
payload_main:
        push    %rbx
        xor     %ebx, %ebx
1:      inc     %ebx
        lea     count_msg(%rip), %rdi
        call    serial_puts
        mov     %ebx, %edi
        call    serial_putdec
        mov     $'\n', %al
        call    serial_putc
        call    delay
        cmp     $COUNTER_LIMIT, %ebx
        jb      1b
        pop     %rbx
        xor     %eax, %eax
        ret

/* delay: spin until the TSC has advanced by COUNTER_DELAY_CYCLES. Clobbers %rax, %rdx,
 * %rsi. */
delay:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        lea     COUNTER_DELAY_CYCLES(%rax), %rsi
2:      rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        cmp     %rsi, %rax
        jb      2b
        ret

        .section .rodata
count_msg:
        .asciz  "count "
