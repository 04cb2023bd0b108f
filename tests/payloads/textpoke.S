/*
 * textpoke: one vCPU patches code while the other runs it, the way Linux's text_poke_bp
 * does on SMP: the patched byte goes from a one-byte instruction (nop) to int3 and back,
 * with no wait for the other CPU in between.
 *
 * The BSP installs a #BP handler, starts the AP (INIT-SIPI-SIPI, as smp.S), then calls the
 * patch site, `nop; ret`, CALLS times at CPL 0. The AP (its real-mode trampoline: the site
 * lives in the trampoline's page, so no mode switch is needed to write it) writes 0xcc on
 * the nop, then 0x90 back, until the BSP tells it to stop. When the BSP takes the int3, its
 * handler returns past the 0xcc: as Linux's poke handler emulating a patched nop.
 *
 * The AP pokes again only once the BSP has finished the call under way, as Linux waits
 * for every CPU (text_poke_sync) before it patches again.
 *
 * On the nested PVM host KVM's emulator fails the int3 and the VMM completes it. When the
 * AP has written the nop back by then, the code at RIP is a nop where an int3 failed: the
 * VMM must complete the int3 the vCPU fetched (or run the nop), never stop the VM.
 *
 * Prints "textpoke: N int3 taken, M patches" (both vary from run to run) and then
 * "textpoke: CALLS calls through a site being patched", and exits 0. Exit 1: the AP did
 * not start or stop in time; exit 3: a #BP arrived with a return address other than
 * just past the site's first byte.
 */
#include "payload.h"

#ifndef CALLS
#define CALLS           200000
#endif

/* Free low RAM in hearth's layout (between the boot page tables and the command line). */
#define TRAMPOLINE_BASE 0x30000
#define SIPI_VECTOR     (TRAMPOLINE_BASE >> 12)
#define AP_ADDR(label)  (TRAMPOLINE_BASE + ((label) - ap_trampoline))
#define AP_OFF(label)   ((label) - ap_trampoline)

#define BP_VECTOR       3
#define IDT_ENTRIES     256

#define INT3_OPCODE     0xcc
#define NOP_OPCODE      0x90

#define WAIT_TSC        10000000000     /* give the AP ~3-5 s of TSC time to start or stop */

        .text
        .code64
        .globl payload_main
payload_main:
        push    %rbx
        push    %r12

        set_interrupt_gate idt, BP_VECTOR, bp_handler
        lidt    idtr(%rip)

        lea     ap_trampoline(%rip), %rsi
        mov     $TRAMPOLINE_BASE, %edi
        mov     $(ap_trampoline_end - ap_trampoline), %ecx
        rep movsb

        mov     $SIPI_VECTOR, %edi
        call    start_aps

        mov     $AP_ADDR(ap_started), %edi
        call    wait_for_flag
        jc      no_ap

        /* The patching runs now: call the site while the AP rewrites it. */
        mov     $AP_ADDR(site), %ebx
        mov     $CALLS, %r12d
1:      call    *%rbx
        dec     %r12d
        mov     %r12d, AP_ADDR(calls_left)
        jnz     1b

        movl    $1, AP_ADDR(stop)
        mov     $AP_ADDR(ap_done), %edi
        call    wait_for_flag
        jc      no_ap

        cmpl    $0, bad_rip_count(%rip)
        jne     bad_rip

        lea     taken_msg(%rip), %rdi
        call    serial_puts
        mov     bp_count(%rip), %edi
        call    serial_putdec
        lea     patches_msg(%rip), %rdi
        call    serial_puts
        mov     AP_ADDR(patches), %edi
        call    serial_putdec
        lea     done_msg(%rip), %rdi
        call    serial_puts
        mov     $CALLS, %edi
        call    serial_putdec
        lea     done_tail_msg(%rip), %rdi
        call    serial_puts
        xor     %eax, %eax
        jmp     2f

no_ap:  lea     no_ap_msg(%rip), %rdi
        call    serial_puts
        mov     $1, %eax
        jmp     2f

bad_rip:
        lea     bad_rip_msg(%rip), %rdi
        call    serial_puts
        mov     bad_rip_count(%rip), %edi
        call    serial_putdec
        lea     bad_rip_tail_msg(%rip), %rdi
        call    serial_puts
        mov     $3, %eax

2:      pop     %r12
        pop     %rbx
        ret

/*
 * The int3 can only be the site's first byte: count it, and count it as wrong when the
 * frame's RIP is not just past that byte. iretq then resumes at the site's `ret`.
 */
bp_handler:
        incl    bp_count(%rip)
        cmpq    $(AP_ADDR(site) + 1), (%rsp)
        je      1f
        incl    bad_rip_count(%rip)
1:      iretq

/*
 * wait_for_flag: wait (bounded by the TSC) until the 32-bit word at %rdi is nonzero.
 * CF set on timeout. Clobbers %rax, %rdx, %rsi.
 */
wait_for_flag:
        call    read_tsc
        movabs  $WAIT_TSC, %rsi
        add     %rax, %rsi
1:      cmpl    $0, (%rdi)
        jne     2f
        pause
        call    read_tsc
        cmp     %rsi, %rax
        jb      1b
        stc
        ret
2:      clc
        ret

        .section .rodata
/*
 * Copied to TRAMPOLINE_BASE; entered by SIPI in real mode at CS = SIPI_VECTOR << 8, IP = 0.
 * The patch loop writes int3 and the nop back with nothing in between, like the first and
 * last byte writes of a poke seen from a CPU that runs the code in the meantime.
 */
        .balign 16
ap_trampoline:
        .code16
        cli
        lock incl %cs:AP_OFF(ap_started)
1:      movb    $INT3_OPCODE, %cs:AP_OFF(site)
        movb    $NOP_OPCODE, %cs:AP_OFF(site)
        incl    %cs:AP_OFF(patches)
        /* Linux's sync: no new poke until the BSP has finished the call under way. */
        mov     %cs:AP_OFF(calls_left), %eax
2:      cmpl    $0, %cs:AP_OFF(stop)
        jne     3f
        mov     %cs:AP_OFF(calls_left), %edx
        sub     %edx, %eax
        cmp     $2, %eax
        jae     1b
        add     %edx, %eax
        pause
        jmp     2b
3:
        lock incl %cs:AP_OFF(ap_done)
4:      cli
        hlt
        jmp     4b
        .code64
        .balign 16
/* Run by the BSP in 64-bit mode: `nop; ret`, the nop being what the AP patches. */
site:
        nop
        ret
        .balign 4
ap_started:
        .long   0
ap_done:
        .long   0
stop:
        .long   0
patches:
        .long   0
/* The BSP's calls still to make, counting down: the AP's view of its progress. */
calls_left:
        .long   CALLS
ap_trampoline_end:

taken_msg:
        .asciz  "textpoke: "
patches_msg:
        .asciz  " int3 taken, "
done_msg:
        .asciz  " patches\ntextpoke: "
done_tail_msg:
        .asciz  " calls through a site being patched\n"
no_ap_msg:
        .asciz  "textpoke: the patching vCPU did not start or stop in time\n"
bad_rip_msg:
        .asciz  "textpoke: "
bad_rip_tail_msg:
        .asciz  " #BP frames with a return address not just past the int3\n"

        .data
        .balign 16
idtr:
        .word   IDT_ENTRIES * GATE_SIZE - 1
        .quad   idt
bp_count:
        .long   0
bad_rip_count:
        .long   0

        .bss
        .balign 16
idt:
        .skip   IDT_ENTRIES * GATE_SIZE
