/*
 * hello, PVH flavour: the Xen PHYS32_ENTRY note points at pvh_start, entered in 32-bit
 * protected mode with paging off and %ebx = hvm_start_info. It checks the start-info magic,
 * prints the same greeting as hello.S and exits 0 through the exit port.
 *
 * The ELF entry (e_entry) is the 64-bit _start instead: a VMM that ignores the PVH note gets
 * a clear message and exit status 3 rather than garbage.
 */
#include "payload.h"

        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* n_namesz: "Xen\0" */
        .long   4                       /* n_descsz: a 32-bit physical address */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
        .asciz  "Xen"
        .balign 4
        .long   pvh_start
        .balign 4

        .text
        .code32
        .globl pvh_start
pvh_start:
        cli
        cld
        mov     $stack32_top, %esp
        cmpl    $XEN_HVM_START_MAGIC, (%ebx)
        jne     1f
        mov     $hello_msg, %esi
        call    serial_puts32
        xor     %eax, %eax
        jmp     exit32
1:      mov     $bad_magic_msg, %esi
        call    serial_puts32
        mov     $3, %al
        jmp     exit32

        .code64
        .globl payload_main
payload_main:
        lea     wrong_entry_msg(%rip), %rdi
        call    serial_puts
        mov     $3, %eax
        ret

        .section .rodata
hello_msg:
        .asciz  "Hello from hearth payload\n"
bad_magic_msg:
        .asciz  "hello_pvh: %ebx does not point at hvm_start_info (bad magic)\n"
wrong_entry_msg:
        .asciz  "hello_pvh: entered at the 64-bit ELF entry instead of the PVH entry\n"
