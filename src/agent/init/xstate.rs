//! Does the guest kernel save every register state that user space can use?
//!
//! A kernel booted with `noxsave` switches only the legacy x87/SSE state between tasks.
//! On hardware user space then cannot use AVX (CR4.OSXSAVE stays clear). Under a nested
//! PVM hypervisor it can: user space runs with the host's XCR0, and unless the kernel has
//! the VMM save the extended state for it (hearth's minimal kernel does, see
//! resources/guest-kernel/patches/0005 and `vstate::pv_xstate`), glibc's AVX string
//! functions in one task clobber the YMM registers of another and memory gets corrupted.
//! The agent warns at boot when it finds the guest in that state.

use std::path::Path;

/// XCR0 state components beyond x87 (bit 0) and SSE (bit 1): AVX, AVX-512, AMX, ...
const EXTENDED_STATE: u64 = !0b11;
/// CPUID.1:ECX.OSXSAVE: XGETBV may be executed.
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;

/// XCR0 as user space sees it, when XGETBV is available.
#[cfg(target_arch = "x86_64")]
fn user_xcr0() -> Option<u64> {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    if leaf1.ecx & LEAF1_ECX_OSXSAVE == 0 {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: OSXSAVE is set, so XGETBV with ECX = 0 is defined; it only writes EAX, EDX.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    Some(u64::from(hi) << 32 | u64::from(lo))
}

#[cfg(not(target_arch = "x86_64"))]
fn user_xcr0() -> Option<u64> {
    None
}

/// What the guest kernel logs when the VMM saves extended state for it (patch 0005).
const VMM_SAVES_XSTATE: &str = "x86/fpu: hearth: extended register state saved by the VMM";

/// Whether the kernel switches extended state: its `/proc/cpuinfo` flags include `xsave`,
/// or its log says the VMM does it.
fn kernel_saves_extended_state(cpuinfo: &str, kernel_log: &str) -> bool {
    let xsave = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .is_some_and(|(_, flags)| flags.split_whitespace().any(|f| f == "xsave"));
    xsave || kernel_log.contains(VMM_SAVES_XSTATE)
}

/// The problem, in words, when user space can use state the kernel does not save.
pub fn unsaved_state_warning(xcr0: Option<u64>, cpuinfo: &str, kernel_log: &str) -> Option<String> {
    let xcr0 = xcr0?;
    if xcr0 & EXTENDED_STATE == 0 || kernel_saves_extended_state(cpuinfo, kernel_log) {
        return None;
    }
    Some(format!(
        "user space can use extended register state (XCR0 {xcr0:#x}: AVX and up) that this \
         kernel does not save across task switches (no xsave): programs using AVX may \
         corrupt each other; boot a kernel that has the VMM save it (hearth's guest kernel \
         patch 0005)"
    ))
}

/// The kernel's log buffer (syslog(2) READ_ALL), as far as it goes.
fn kernel_log() -> String {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: the buffer is writable for the length passed.
    let n = unsafe {
        libc::klogctl(
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len() as libc::c_int,
        )
    };
    buf.truncate(n.max(0) as usize);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Logs [`unsaved_state_warning`] for this VM, if any.
pub fn check() {
    let xcr0 = user_xcr0();
    if xcr0.is_none_or(|x| x & EXTENDED_STATE == 0) {
        return;
    }
    let cpuinfo = std::fs::read_to_string(Path::new("/proc/cpuinfo")).unwrap_or_default();
    if let Some(text) = unsaved_state_warning(xcr0, &cpuinfo, &kernel_log()) {
        log::warn!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_XSAVE: &str = "processor\t: 0\nflags\t\t: fpu sse sse2 xsave avx\n";
    const NO_XSAVE: &str = "processor\t: 0\nflags\t\t: fpu sse sse2 xsaveopt_x\n";

    #[test]
    fn warns_only_for_extended_state_the_kernel_does_not_save() {
        let vmm_log = format!("[    4.9] {VMM_SAVES_XSTATE}\n");
        assert!(unsaved_state_warning(Some(0x2e7), NO_XSAVE, "").is_some());
        assert!(unsaved_state_warning(Some(0x3), NO_XSAVE, "").is_none());
        assert!(unsaved_state_warning(Some(0x2e7), WITH_XSAVE, "").is_none());
        assert!(unsaved_state_warning(Some(0x2e7), NO_XSAVE, &vmm_log).is_none());
        assert!(unsaved_state_warning(None, NO_XSAVE, "").is_none());
        assert!(unsaved_state_warning(Some(0x7), "", "").is_some());
    }

    #[test]
    fn this_host_is_consistent() {
        // Wherever the unit tests run, the host kernel saves what it lets them use.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if cpuinfo.is_empty() {
            return;
        }
        assert_eq!(unsaved_state_warning(user_xcr0(), &cpuinfo, ""), None);
    }
}
