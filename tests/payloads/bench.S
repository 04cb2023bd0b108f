/*
 * bench: the benchmark's tiny guest, the same image for every VMM (`hearth bench`).
 *
 * Reports boot complete (123 to port 0x3f0) and ends the VM with status 0 through the
 * exit port. A VMM without hearth's exit port gets an i8042 reset next (Firecracker stops
 * on it), and one that ignores that too leaves the vCPU halted. With IDLE defined it
 * halts after the boot signal instead and waits to be stopped from the host (density and
 * memory measurements).
 *
 * Both entries do the same: the Xen PHYS32_ENTRY note (32-bit, paging off; QEMU's and
 * hearth's PVH boot) and the ELF entry (64-bit; vmlinux-style loaders such as
 * Firecracker's). Only port I/O is used, so paging and stack do not matter.
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
        mov     $BOOT_COMPLETE_PORT, %dx
        mov     $BOOT_COMPLETE_VALUE, %al
        out     %al, %dx
#ifdef IDLE
1:      hlt
        jmp     1b
#else
        xor     %eax, %eax
        out     %al, $EXIT_PORT
        mov     $I8042_CMD_RESET, %al
        out     %al, $I8042_COMMAND_PORT
1:      hlt
        jmp     1b
#endif

        .code64
        .globl payload_main
payload_main:
        mov     $BOOT_COMPLETE_PORT, %dx
        mov     $BOOT_COMPLETE_VALUE, %al
        out     %al, %dx
#ifdef IDLE
        jmp     halt_forever
#else
        xor     %eax, %eax
        out     %al, $EXIT_PORT
        mov     $I8042_CMD_RESET, %al
        out     %al, $I8042_COMMAND_PORT
        jmp     halt_forever
#endif
