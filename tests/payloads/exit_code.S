/*
 * exit_code: end the VM with status EXIT_CODE (set at build time), through the control
 * page's exit register, or through the exit port when EXIT_VIA_PORT is defined.
 */
#include "payload.h"

#ifndef EXIT_CODE
#error "build with -DEXIT_CODE=N"
#endif

        .text
        .code64
        .globl payload_main
payload_main:
        mov     $EXIT_CODE, %edi
#ifdef EXIT_VIA_PORT
        jmp     exit_port
#else
        jmp     exit_mmio
#endif
