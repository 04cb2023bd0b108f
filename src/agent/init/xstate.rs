//! Does the guest kernel save every register state that user space can use?
//!
//! A kernel booted with `noxsave` switches only the legacy x87/SSE state between tasks.
//! On hardware user space then cannot use AVX (CR4.OSXSAVE stays clear). Under a nested
//! PVM hypervisor it can: user space runs with the host's XCR0, and unless the kernel has
//! the VMM save the extended state for it (hearth's minimal kernel does, see
//! resources/guest-kernel/patches/0005 and `arch::x86_64::pvm::xstate`), glibc's AVX string
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

/// Whether `/proc/cpuinfo` flags include `xsave`: the kernel switches XSAVE state itself.
fn cpuinfo_has_xsave(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .is_some_and(|(_, flags)| flags.split_whitespace().any(|f| f == "xsave"))
}

/// The problem, in words, when user space can use state the kernel does not save. The
/// kernel's `/proc/cpuinfo` and its log are read only as far as the answer needs them.
pub fn unsaved_state_warning(
    xcr0: Option<u64>,
    cpuinfo: impl FnOnce() -> String,
    kernel_log: impl FnOnce() -> String,
) -> Option<String> {
    let xcr0 = xcr0.filter(|x| x & EXTENDED_STATE != 0)?;
    if cpuinfo_has_xsave(&cpuinfo()) || kernel_log().contains(VMM_SAVES_XSTATE) {
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
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER ignores the buffer arguments.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let mut buf = vec![0u8; size.max(0) as usize];
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
    let cpuinfo = || std::fs::read_to_string(Path::new("/proc/cpuinfo")).unwrap_or_default();
    if let Some(text) = unsaved_state_warning(user_xcr0(), cpuinfo, kernel_log) {
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
        let text = |t: &'static str| move || t.to_string();
        let vmm_log = format!("[    4.9] {VMM_SAVES_XSTATE}\n");
        let none = String::new;
        assert!(unsaved_state_warning(Some(0x2e7), text(NO_XSAVE), none).is_some());
        assert!(unsaved_state_warning(Some(0x3), text(NO_XSAVE), none).is_none());
        assert!(unsaved_state_warning(Some(0x2e7), text(WITH_XSAVE), none).is_none());
        assert!(unsaved_state_warning(Some(0x2e7), text(NO_XSAVE), || vmm_log.clone()).is_none());
        assert!(unsaved_state_warning(None, text(NO_XSAVE), none).is_none());
        assert!(unsaved_state_warning(Some(0x7), none, none).is_some());
    }

    #[test]
    fn this_host_is_consistent() {
        // Wherever the unit tests run, the host kernel saves what it lets them use.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if cpuinfo.is_empty() {
            return;
        }
        assert_eq!(
            unsaved_state_warning(user_xcr0(), || cpuinfo, String::new),
            None
        );
    }
}
