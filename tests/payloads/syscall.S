/*
 * syscall: user-mode SYSCALL / SYSRETQ end to end, laid out the way a 64-bit kernel does it.
 *
 * Kernel side (CPL 0), set up from the low identity map hearth boots us in:
 *  - the payload's first 2 MiB are made user-accessible (U/S at every level of the boot
 *    identity map), and also mapped supervisor-only in the upper half (0xffffffff80000000 +
 *    physical) through a PML4[511] -> PDPT[510] -> page directory of 2 MiB pages of our own;
 *  - a GDT in the SYSCALL/SYSRET layout (kernel CS 0x08, SS 0x10; user CS32 0x18, SS 0x23,
 *    CS 0x2b) with a 64-bit TSS whose RSP0 is the kernel stack, and TR loaded;
 *  - an IDT (upper-half handlers, DPL 0, no IST): #PF opens with `nopl (%rax)` as Linux's
 *    does with SMAP patched out, #GP, #UD and every other exception print and exit 1;
 *  - EFER.SCE, STAR, LSTAR (upper-half `syscall_entry`, which opens with swapgs), SFMASK
 *    (TF, IF, DF, AC), GS base = USER_GS_MARKER, KERNEL_GS_BASE = the upper-half per-CPU
 *    area, whose slots hold the user RSP scratch, the kernel stack top and counters.
 * Then iretq to user mode (CPL 3, IF 0).
 *
 * User side: all its output and its exit go through syscalls (port I/O at CPL 3 with
 * IOPL 3 #GPs on the nested-PVM host, whose user mode runs natively at host IOPL 0).
 * SYS_WRITE "user mode" (the kernel prints "syscall 1 from rip <RCX>: " and the string),
 * SYSCALL_LOOPS x SYS_TWICE with DF set (result 2n+1, DF back after SYSRETQ, RSP
 * unchanged), a read of a supervisor-only page whose #PF the kernel turns into a jump to a
 * resume address (an ordinary user #PF still reaches the guest's handler), SYS_PF_COUNT
 * and SYS_COUNT to check the kernel's counters, SYS_WRITE "syscall ok" and SYS_EXIT 0.
 * Every syscall passes its own return address in %rsi, and the kernel checks on entry
 * that it runs at CPL 0 with GS base and KERNEL_GS_BASE swapped, RCX = that address and
 * the SFMASK flags clear. Any failed check prints why and exits 1 (SYS_FAIL from user
 * mode).
 *
 * On a nested-PVM host SYSCALL from CPL 3 is left half done (RIP = LSTAR at CPL 3) and the
 * fetch at LSTAR page-faults; hearth's compat layer completes it. Without that layer the
 * #PF handler sees the fault at LSTAR and says so.
 */
#include "payload.h"

#define KERNEL_CS               0x08
#define KERNEL_DS               0x10
#define USER32_CS               0x18    /* STAR[63:48]: SYSRET's selector base */
#define USER_DS                 (0x20 | 3)
#define USER_CS                 (0x28 | 3)
#define TSS_SEL                 0x30

/* Add to a low (identity-mapped) address to get its upper-half, supervisor-only alias:
 * 0xffffffff80000000, as a sign-extended 32-bit immediate. */
#define KERNEL_OFFSET           (-0x80000000)
#define HIGH_PML4_INDEX         511
#define HIGH_PDPT_INDEX         510
#define HIGH_MAP_PAGES          2       /* 2 MiB pages: physical 0-4 MiB */

#define PTE_PRESENT             0x1
#define PTE_WRITABLE            0x2
#define PTE_USER                0x4
#define PTE_PAGE_SIZE           0x80
#define PTE_ADDR_MASK           0x000ffffffffff000
#define PAGE_2M                 0x200000

#define CR4_SMEP                (1 << 20)
#define CR4_SMAP                (1 << 21)

#define MSR_EFER                0xc0000080
#define MSR_STAR                0xc0000081
#define MSR_LSTAR               0xc0000082
#define MSR_SFMASK              0xc0000084
#define MSR_GS_BASE             0xc0000101
#define MSR_KERNEL_GS_BASE      0xc0000102
#define EFER_SCE                0

#define RFLAGS_FIXED            0x2
#define RFLAGS_TF               0x100
#define RFLAGS_IF               0x200
#define RFLAGS_DF               0x400
#define RFLAGS_AC               0x40000
#define SFMASK                  (RFLAGS_TF | RFLAGS_IF | RFLAGS_DF | RFLAGS_AC)

/* GS base while in user mode; the kernel's is the per-CPU area. Canonical, recognisable. */
#define USER_GS_MARKER          0x00007573657267

/* Per-CPU area, reached through %gs after swapgs. */
#define PERCPU_USER_RSP         0
#define PERCPU_KERNEL_RSP       8
#define PERCPU_SYSCALLS         16
#define PERCPU_USER_FAULTS      24
#define PERCPU_SIZE             32

#define SYS_WRITE               1
#define SYS_TWICE               2       /* returns 2 * %rdi + 1 */
#define SYS_COUNT               3       /* returns the number of syscalls so far, this one included */
#define SYS_PF_COUNT            4       /* returns the number of user #PFs the kernel resumed */
#define SYS_FAIL                5       /* prints %rdi and the value %rdx, exits 1 */
#define SYS_EXIT                6       /* exits with status %rdi */
#define SYSCALL_LOOPS           100
#define EXPECTED_SYSCALLS       (1 + SYSCALL_LOOPS + 2)   /* SYS_COUNT counts itself */

#define IDT_ENTRIES             256
#define EXCEPTIONS              32
#define VEC_UD                  6
#define VEC_GP                  13
#define VEC_PF                  14

#define TSS_SIZE                104
#define TSS_RSP0                4
#define TSS_IOMAP_BASE          102

/* The user-mode stack frame at a #PF handler's entry, after PF_SAVED pushes. */
#define PF_SAVED                5
#define PF_ERR                  (PF_SAVED * 8)
#define PF_RIP                  (PF_ERR + 8)
#define PF_CS                   (PF_ERR + 16)

/* Load the upper-half alias of \sym (from low-half code). */
.macro  kaddr sym, reg
        lea     \sym(%rip), \reg
        add     $KERNEL_OFFSET, \reg
.endm

/* Print the NUL-terminated string \msg. Clobbers %rax, %rcx, %rdx, %rdi. */
.macro  puts msg
        lea     \msg(%rip), %rdi
        call    serial_puts
.endm

/* SYSCALL number \nr, passing the expected return address in %rsi. */
.macro  sys nr
        mov     $\nr, %eax
        lea     9f(%rip), %rsi
        syscall
9:
.endm

        .text
        .code64

/* ---------------------------------------------------------------- kernel set-up (CPL 0) */

        .globl payload_main
payload_main:
        /* No SMEP/SMAP: the kernel reads the user's string and runs on pages the user may
         * also touch, as a kernel without those features would. */
        mov     %cr4, %rax
        and     $~(CR4_SMEP | CR4_SMAP), %rax
        mov     %rax, %cr4

        /* User access to the first 2 MiB: U/S in PML4[0], PDPT[0] and PD[0] of the boot map. */
        movabs  $PTE_ADDR_MASK, %r8
        mov     %cr3, %r9
        and     %r8, %r9                        /* PML4 */
        orq     $PTE_USER, (%r9)
        mov     (%r9), %rax
        and     %r8, %rax                       /* PDPT */
        orq     $PTE_USER, (%rax)
        mov     (%rax), %rax
        and     %r8, %rax                       /* page directory for 0-1 GiB */
        mov     (%rax), %rdx
        test    $PTE_PAGE_SIZE, %dl
        jz      no_large_page
        orq     $PTE_USER, (%rax)

        /* The upper half: KERNEL_BASE + x -> x for the first HIGH_MAP_PAGES 2 MiB pages. */
        lea     high_pd(%rip), %rdi
        mov     $(PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE), %eax
        mov     $HIGH_MAP_PAGES, %ecx
1:      mov     %rax, (%rdi)
        add     $PAGE_2M, %rax
        add     $8, %rdi
        dec     %ecx
        jnz     1b
        lea     high_pd(%rip), %rax
        or      $(PTE_PRESENT | PTE_WRITABLE), %rax
        lea     high_pdpt(%rip), %rdi
        mov     %rax, (HIGH_PDPT_INDEX * 8)(%rdi)
        or      $(PTE_PRESENT | PTE_WRITABLE), %rdi
        mov     %rdi, (HIGH_PML4_INDEX * 8)(%r9)
        mov     %cr3, %rax
        mov     %rax, %cr3

        /* TSS: RSP0 = the kernel stack (upper half), no I/O bitmap. */
        lea     tss(%rip), %rdi
        kaddr   kernel_stack_top, %rax
        mov     %rax, TSS_RSP0(%rdi)
        movw    $TSS_SIZE, TSS_IOMAP_BASE(%rdi)

        /* TSS descriptor for the upper-half TSS. */
        kaddr   tss, %rax
        set_tss_descriptor gdt, TSS_SEL, TSS_SIZE

        /* GDT and IDT through their upper-half aliases, as a kernel would. */
        kaddr   gdt, %rax
        load_gdt_and_tss gdtr, KERNEL_CS, KERNEL_DS, TSS_SEL

        xor     %ebx, %ebx
3:      mov     %ebx, %edi
        kaddr   exc_other, %rsi
        call    set_gate
        inc     %ebx
        cmp     $EXCEPTIONS, %ebx
        jb      3b
        mov     $VEC_UD, %edi
        kaddr   exc_ud, %rsi
        call    set_gate
        mov     $VEC_GP, %edi
        kaddr   exc_gp, %rsi
        call    set_gate
        mov     $VEC_PF, %edi
        kaddr   pf_entry, %rsi
        call    set_gate
        lea     idtr(%rip), %rdi
        kaddr   idt, %rax
        mov     %rax, 2(%rdi)
        lidt    (%rdi)

        /* Per-CPU area: the kernel stack SYSCALL switches to. */
        lea     percpu(%rip), %rdi
        kaddr   kernel_stack_top, %rax
        mov     %rax, PERCPU_KERNEL_RSP(%rdi)

        /* SYSCALL: EFER.SCE, STAR, LSTAR, SFMASK; GS bases for user and kernel. */
        mov     $MSR_EFER, %ecx
        rdmsr
        bts     $EFER_SCE, %eax
        wrmsr
        mov     $MSR_STAR, %ecx
        xor     %eax, %eax
        mov     $((USER32_CS << 16) | KERNEL_CS), %edx
        wrmsr
        mov     $MSR_LSTAR, %ecx
        kaddr   syscall_entry, %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr
        mov     $MSR_SFMASK, %ecx
        mov     $SFMASK, %eax
        xor     %edx, %edx
        wrmsr
        mov     $MSR_GS_BASE, %ecx
        movabs  $USER_GS_MARKER, %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr
        mov     $MSR_KERNEL_GS_BASE, %ecx
        kaddr   percpu, %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr

        /* Besides saying so, this gives hearth's compat layer the VM exits after which it
         * looks at LSTAR and the IDT and arms its trap (it polls every 16th exit). A guest
         * that enters user mode and calls SYSCALL with no exit since setting them up beats
         * the trap: hearth cannot complete that first SYSCALL. */
        puts    kernel_ready_msg

        /* To user mode: SS, RSP, RFLAGS, CS, RIP. */
        pushq   $USER_DS
        lea     user_stack_top(%rip), %rax
        push    %rax
        pushq   $RFLAGS_FIXED
        pushq   $USER_CS
        lea     user_main(%rip), %rax
        push    %rax
        iretq

no_large_page:
        puts    no_large_page_msg
        mov     $1, %eax
        ret

/* set_gate: IDT gate %edi -> handler at %rsi (kernel CS, GATE_ATTRS). Clobbers %rax, %rdi. */
set_gate:
        shl     $4, %edi
        lea     idt(%rip), %rax
        add     %rax, %rdi
        mov     %rsi, %rax
        fill_gate $KERNEL_CS
        ret

/* ------------------------------------------------------------------- user mode (CPL 3) */

user_main:
        mov     %rsp, %r12                      /* RSP must come back unchanged */
        lea     user_mode_msg(%rip), %rdi
        sys     SYS_WRITE
        cmp     $(user_mode_msg_end - user_mode_msg), %rax
        jne     bad_write
        cmp     %r12, %rsp
        jne     bad_rsp

        xor     %ebx, %ebx
1:      mov     %rbx, %rdi
        std                                     /* SFMASK clears it; SYSRETQ restores it */
        sys     SYS_TWICE
        pushfq
        pop     %rdx
        cld
        test    $RFLAGS_DF, %edx
        jz      bad_flags
        lea     1(%rbx, %rbx), %rdx
        cmp     %rdx, %rax
        jne     bad_value
        cmp     %r12, %rsp
        jne     bad_rsp
        inc     %ebx
        cmp     $SYSCALL_LOOPS, %ebx
        jb      1b

        /* A read of a supervisor-only page: the kernel's #PF handler resumes at %rsi. */
        lea     probe_resumed(%rip), %rsi
        kaddr   percpu, %rdx
        mov     (%rdx), %rax
        jmp     bad_probe
probe_resumed:
        sys     SYS_PF_COUNT
        cmp     $1, %rax
        jne     bad_probe

        sys     SYS_COUNT
        cmp     $EXPECTED_SYSCALLS, %rax
        jne     bad_count

        lea     syscall_ok_msg(%rip), %rdi
        sys     SYS_WRITE
        xor     %edi, %edi
        sys     SYS_EXIT

bad_write:
        lea     bad_write_msg(%rip), %rdi
        jmp     user_fail
bad_rsp:
        mov     %rsp, %rax
        sub     %r12, %rax
        lea     bad_rsp_msg(%rip), %rdi
        jmp     user_fail
bad_flags:
        mov     %rdx, %rax
        lea     bad_flags_msg(%rip), %rdi
        jmp     user_fail
bad_value:
        lea     bad_value_msg(%rip), %rdi
        jmp     user_fail
bad_probe:
        lea     bad_probe_msg(%rip), %rdi
        jmp     user_fail
bad_count:
        lea     bad_count_msg(%rip), %rdi
user_fail:
        mov     %rax, %rdx
        sys     SYS_FAIL

/* --------------------------------------------- kernel entry points (CPL 0, upper half) */

/* LSTAR. SYSCALL: %rax = number, %rdi = argument, %rsi = the expected return address. */
syscall_entry:
        swapgs
        mov     %rsp, %gs:PERCPU_USER_RSP
        mov     %gs:PERCPU_KERNEL_RSP, %rsp
        push    %rcx                            /* user RIP */
        push    %r11                            /* user RFLAGS */
        push    %rax
        push    %rdi
        push    %rsi
        push    %rdx
        incq    %gs:PERCPU_SYSCALLS

        mov     %cs, %eax
        test    $3, %eax
        jnz     bad_kernel_cpl
        pushfq
        pop     %rax
        test    $SFMASK, %eax
        jnz     bad_kernel_flags
        mov     $MSR_GS_BASE, %ecx
        rdmsr
        shl     $32, %rdx
        or      %rax, %rdx
        lea     percpu(%rip), %rax              /* running in the upper half: its alias */
        cmp     %rax, %rdx
        jne     bad_gs_base
        mov     $MSR_KERNEL_GS_BASE, %ecx
        rdmsr
        shl     $32, %rdx
        or      %rax, %rdx
        movabs  $USER_GS_MARKER, %rax
        cmp     %rax, %rdx
        jne     bad_kernel_gs_base
        mov     8(%rsp), %rsi
        cmp     40(%rsp), %rsi                  /* saved %rcx: where SYSRETQ will go */
        jne     bad_rcx

        mov     24(%rsp), %rax                  /* the syscall number */
        mov     16(%rsp), %rdi                  /* its argument */
        cmp     $SYS_WRITE, %rax
        je      sys_write
        cmp     $SYS_TWICE, %rax
        je      sys_twice
        cmp     $SYS_COUNT, %rax
        je      sys_count
        cmp     $SYS_PF_COUNT, %rax
        je      sys_pf_count
        cmp     $SYS_FAIL, %rax
        je      sys_fail
        cmp     $SYS_EXIT, %rax
        je      sys_exit
        lea     bad_number_msg(%rip), %rdi
        jmp     kernel_fail

sys_write:
        puts    syscall1_msg
        mov     40(%rsp), %rdi                  /* saved %rcx */
        call    puthex
        puts    colon_msg
        mov     16(%rsp), %rdi                  /* the user's string */
        mov     %rdi, %rsi
1:      cmpb    $0, (%rsi)
        je      2f
        inc     %rsi
        jmp     1b
2:      sub     %rdi, %rsi
        push    %rsi                            /* the length, returned */
        call    serial_puts
        pop     %rax
        jmp     sysret_to_user

sys_twice:
        testl   $RFLAGS_DF, 32(%rsp)            /* saved %r11: the user set DF */
        jz      bad_r11
        lea     1(%rdi, %rdi), %rax
        jmp     sysret_to_user

sys_count:
        mov     %gs:PERCPU_SYSCALLS, %rax
        jmp     sysret_to_user

sys_pf_count:
        mov     %gs:PERCPU_USER_FAULTS, %rax
        jmp     sysret_to_user

sys_fail:
        call    serial_puts
        puts    space
        mov     (%rsp), %rdi                    /* saved %rdx: the value */
        call    puthex
        puts    newline
        mov     $1, %edi
        jmp     exit_port

sys_exit:
        jmp     exit_port

sysret_to_user:
        pop     %rdx
        pop     %rsi
        pop     %rdi
        add     $8, %rsp                        /* the syscall number: %rax is the result */
        pop     %r11
        pop     %rcx
        mov     %gs:PERCPU_USER_RSP, %rsp
        swapgs
        sysretq

bad_kernel_cpl:
        lea     bad_kernel_cpl_msg(%rip), %rdi
        jmp     kernel_fail
bad_kernel_flags:
        lea     bad_kernel_flags_msg(%rip), %rdi
        jmp     kernel_fail
bad_gs_base:
        lea     bad_gs_base_msg(%rip), %rdi
        jmp     kernel_fail
bad_kernel_gs_base:
        lea     bad_kernel_gs_base_msg(%rip), %rdi
        jmp     kernel_fail
bad_rcx:
        lea     bad_rcx_msg(%rip), %rdi
        jmp     kernel_fail
bad_r11:
        lea     bad_r11_msg(%rip), %rdi
kernel_fail:
        call    serial_puts
        mov     $1, %edi
        jmp     exit_port

/* #PF. The first instruction is a 3-byte NOP, as in Linux with CLAC patched out, or with
 * PF_ENTRY_ENDBR64 an `endbr64` (Linux with IBT): hearth steps over it after its
 * breakpoint here. */
pf_entry:
#ifdef PF_ENTRY_ENDBR64
        .byte   0xf3, 0x0f, 0x1e, 0xfa          /* endbr64 */
#else
        .byte   0x0f, 0x1f, 0x00                /* nopl (%rax) */
#endif
        push    %rax
        push    %rcx
        push    %rdx
        push    %rdi
        push    %rsi
        mov     %cr2, %rax
        testb   $3, PF_CS(%rsp)
        jz      unexpected_pf
        lea     percpu(%rip), %rcx              /* the user's probe of a supervisor page */
        cmp     %rcx, %rax
        jne     1f
        incq    PERCPU_USER_FAULTS(%rcx)        /* no swapgs here: RIP-relative */
        mov     (%rsp), %rsi                    /* the user's resume address */
        mov     %rsi, PF_RIP(%rsp)
        pop     %rsi
        pop     %rdi
        pop     %rdx
        pop     %rcx
        pop     %rax
        add     $8, %rsp                        /* the error code */
        iretq
1:      lea     syscall_entry(%rip), %rcx
        cmp     %rcx, %rax
        jne     unexpected_pf
        cmp     PF_RIP(%rsp), %rax
        jne     unexpected_pf
        puts    syscall_not_completed_msg
unexpected_pf:
        puts    pf_msg
        mov     %cr2, %rdi
        call    puthex
        lea     PF_ERR(%rsp), %rsi
        jmp     report_frame

/* #GP and #UD: print and exit 1. */
exc_gp:
        puts    gp_msg
        jmp     1f
exc_ud:
        puts    ud_msg
        sub     $8, %rsp                        /* no error code: keep the frame layout */
        jmp     1f
exc_other:
        puts    exception_msg
        sub     $8, %rsp
1:      mov     %rsp, %rsi
/* Print the error code, RIP and CS of the frame at %rsi (error code first), exit 1. */
report_frame:
        push    %rsi
        puts    err_msg
        mov     (%rsp), %rsi
        mov     (%rsi), %rdi
        call    puthex
        puts    rip_msg
        mov     (%rsp), %rsi
        mov     8(%rsi), %rdi
        call    puthex
        puts    cs_msg
        mov     (%rsp), %rsi
        mov     16(%rsi), %rdi
        call    puthex
        puts    newline
        mov     $1, %edi
        jmp     exit_port

/* puthex: write %rdi as 0x and 16 hex digits. Clobbers %rax, %rcx, %rdx, %rdi. */
puthex:
        push    %rbx
        push    %rsi
        mov     %rdi, %rbx
        mov     $'0', %al
        call    serial_putc
        mov     $'x', %al
        call    serial_putc
        mov     $16, %esi
1:      rol     $4, %rbx
        mov     %ebx, %eax
        and     $0xf, %eax
        cmp     $10, %al
        jb      2f
        add     $('a' - '0' - 10), %al
2:      add     $'0', %al
        call    serial_putc
        dec     %esi
        jnz     1b
        pop     %rsi
        pop     %rbx
        ret

        .section .rodata
kernel_ready_msg:
        .asciz  "syscall: kernel ready, entering user mode\n"
no_large_page_msg:
        .asciz  "syscall: the boot map of 0-2 MiB is not a 2 MiB page\n"
user_mode_msg:
        .ascii  "user mode\n"
user_mode_msg_end:
        .byte   0
syscall1_msg:
        .asciz  "syscall 1 from rip "
colon_msg:
        .asciz  ": "
syscall_ok_msg:
        .asciz  "syscall ok\n"
newline:
        .asciz  "\n"
space:
        .asciz  " "
bad_write_msg:
        .asciz  "user: SYS_WRITE returned the wrong length"
bad_rsp_msg:
        .asciz  "user: RSP changed across SYSCALL: RSP moved by"
bad_flags_msg:
        .asciz  "user: DF not restored by SYSRETQ: RFLAGS"
bad_value_msg:
        .asciz  "user: SYS_TWICE returned the wrong value"
bad_probe_msg:
        .asciz  "user: the supervisor-page probe was not resumed once by the #PF handler"
bad_count_msg:
        .asciz  "user: wrong syscall count"
bad_number_msg:
        .asciz  "kernel: unknown syscall number\n"
bad_kernel_cpl_msg:
        .asciz  "kernel: syscall entry not at CPL 0\n"
bad_kernel_flags_msg:
        .asciz  "kernel: SFMASK flags not cleared at syscall entry\n"
bad_gs_base_msg:
        .asciz  "kernel: GS base is not the per-CPU area after swapgs\n"
bad_kernel_gs_base_msg:
        .asciz  "kernel: KERNEL_GS_BASE is not the user's GS base after swapgs\n"
bad_rcx_msg:
        .asciz  "kernel: RCX is not the instruction after SYSCALL\n"
bad_r11_msg:
        .asciz  "kernel: R11 does not hold the user's RFLAGS (DF)\n"
syscall_not_completed_msg:
        .asciz  "syscall: SYSCALL from user mode was left at CPL 3 (#PF fetching LSTAR)\n"
pf_msg:
        .asciz  "syscall: unexpected #PF, cr2 "
gp_msg:
        .asciz  "syscall: unexpected #GP"
ud_msg:
        .asciz  "syscall: unexpected #UD"
exception_msg:
        .asciz  "syscall: unexpected exception"
err_msg:
        .asciz  " err "
rip_msg:
        .asciz  " rip "
cs_msg:
        .asciz  " cs "

        .data
        .balign 16
gdt:
        .quad   0
        .quad   0x00af9b000000ffff              /* 0x08 kernel code, 64-bit */
        .quad   0x00cf93000000ffff              /* 0x10 kernel data */
        .quad   0x00cffb000000ffff              /* 0x18 user code, 32-bit */
        .quad   0x00cff3000000ffff              /* 0x20 user data */
        .quad   0x00affb000000ffff              /* 0x28 user code, 64-bit */
        .quad   0, 0                            /* 0x30 TSS, filled in */
gdt_end:
        .balign 8
        .skip   6                               /* so that the base is 8-byte aligned */
gdtr:
        .word   gdt_end - gdt - 1
        .quad   0                               /* upper-half alias of gdt, filled in */
        .balign 8
        .skip   6
idtr:
        .word   IDT_ENTRIES * GATE_SIZE - 1
        .quad   0                               /* upper-half alias of idt, filled in */
        .balign 16
percpu:
        .skip   PERCPU_SIZE
        .balign 16
tss:
        .skip   TSS_SIZE

        .bss
        .balign 4096
high_pdpt:
        .skip   4096
high_pd:
        .skip   4096
idt:
        .skip   IDT_ENTRIES * GATE_SIZE
        .balign 16
kernel_stack:
        .skip   8192
kernel_stack_top:
user_stack:
        .skip   8192
user_stack_top:
