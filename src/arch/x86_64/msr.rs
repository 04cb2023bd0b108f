//! The model-specific registers hearth names, each numbered once: the boot values in
//! `regs.rs`, the nested-PVM layer's SYSCALL completion in `pvm/`, and (through
//! `KVM_GET_MSR_INDEX_LIST`) the saved vCPU state all refer to these.

/// Time-stamp counter.
pub const IA32_TSC: u32 = 0x10;
/// SYSENTER target code segment, stack and entry point (legacy fast system call).
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
/// Miscellaneous features; bit 0 enables fast-string operations.
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
/// Default memory type and MTRR enable bits.
pub const MTRR_DEF_TYPE: u32 = 0x2ff;
/// SYSCALL/SYSRET segment selectors: kernel CS in bits 47:32, SYSRET's base in 63:48.
pub const STAR: u32 = 0xc000_0081;
/// 64-bit SYSCALL entry point.
pub const LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode SYSCALL entry point.
pub const CSTAR: u32 = 0xc000_0083;
/// RFLAGS bits SYSCALL clears.
pub const SYSCALL_MASK: u32 = 0xc000_0084;
/// The GS base `swapgs` exchanges with the active one.
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;

#[cfg(test)]
mod tests {
    use super::*;

    /// The SYSCALL MSRs are consecutive architecturally; a typo in one shows up here.
    #[test]
    fn syscall_msrs_are_consecutive() {
        assert_eq!([STAR + 1, STAR + 2, STAR + 3], [LSTAR, CSTAR, SYSCALL_MASK]);
        assert_eq!(
            [IA32_SYSENTER_CS + 1, IA32_SYSENTER_CS + 2],
            [IA32_SYSENTER_ESP, IA32_SYSENTER_EIP]
        );
    }
}
