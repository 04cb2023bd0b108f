//! What a forbidden syscall does: the filters answer it with `SECCOMP_RET_TRAP`, the
//! kernel sends SIGSYS to the thread, and this handler writes one line naming the thread
//! kind and the syscall number to stderr, puts SIGSYS back to its default action and
//! raises it again. SIGSYS is blocked while the handler runs, so the raised one stays
//! pending until the handler returns and then ends the process: its exit is a SIGSYS
//! death (status 128+31 in a shell), as with `SECCOMP_RET_KILL_PROCESS`, plus the line.
//!
//! The handler only calls async-signal-safe functions: write(2), sigaction(2) and
//! raise(3), each of which every allow-list admits.

use std::cell::Cell;
use std::sync::Once;

/// Byte offset of `si_syscall` in the x86-64 `siginfo_t` of a SIGSYS (after `si_signo`,
/// `si_errno`, `si_code`, padding and the 8-byte `si_call_addr`); the libc crate has no
/// accessor for it.
const SI_SYSCALL_OFFSET: usize = 24;

thread_local! {
    /// The filter this thread runs under, for the handler's line. A `const` thread-local
    /// without a destructor is plain TLS: reading it in a signal handler is safe.
    static KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// Records the calling thread's kind for the handler.
pub(super) fn set_thread_kind(name: &'static str) {
    KIND.with(|kind| kind.set(name));
}

/// Installs the SIGSYS handler for the process, once.
pub(super) fn install_handler() -> std::io::Result<()> {
    static INSTALLED: Once = Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        // SAFETY: an all-zero sigaction is valid; the fields that matter are set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action.sa_mask` is a valid sigset to initialise.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is a valid sigaction whose handler has the SA_SIGINFO
        // signature and only calls async-signal-safe functions.
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGSYS the
    // int at SI_SYSCALL_OFFSET is the syscall number (see `struct siginfo` in
    // include/uapi/asm-generic/siginfo.h).
    let syscall = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    // SAFETY: the third argument of a SA_SIGINFO handler is the interrupted thread's
    // ucontext; at a seccomp trap its registers hold the syscall's arguments.
    let gregs = unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let kind = KIND.with(Cell::get);
    let mut line = LineBuf::new();
    line.push(b"hearth: seccomp: the ");
    line.push(kind.as_bytes());
    line.push(b" thread made a forbidden syscall, number ");
    line.push_number(syscall);
    // The first three arguments: an ioctl's request, a socket's family, mmap's flags.
    line.push(b" (arguments ");
    for (i, reg) in [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX]
        .iter()
        .enumerate()
    {
        if i > 0 {
            line.push(b", ");
        }
        line.push_hex(gregs[*reg as usize] as u64);
    }
    line.push(b"); exiting with SIGSYS\n");
    // SAFETY: write(2) reads `line.len` initialised bytes of `line.bytes`.
    unsafe { libc::write(libc::STDERR_FILENO, line.bytes.as_ptr().cast(), line.len) };
    // SAFETY: resetting a signal to its default action and raising it are both
    // async-signal-safe; SIGSYS stays blocked until this handler returns.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// A fixed buffer the handler formats into: no allocation in a signal handler.
struct LineBuf {
    bytes: [u8; 160],
    len: usize,
}

impl LineBuf {
    fn new() -> Self {
        Self {
            bytes: [0; 160],
            len: 0,
        }
    }

    fn push(&mut self, text: &[u8]) {
        let take = text.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + take].copy_from_slice(&text[..take]);
        self.len += take;
    }

    fn push_hex(&mut self, value: u64) {
        let mut digits = [0u8; 16];
        let mut rest = value;
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b"0123456789abcdef"[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[start..]);
    }

    fn push_number(&mut self, value: i32) {
        if value < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut rest = value.unsigned_abs();
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_without_allocating() {
        let mut line = LineBuf::new();
        line.push_number(0);
        line.push(b" ");
        line.push_number(59);
        line.push(b" ");
        line.push_number(-1);
        line.push(b" ");
        line.push_hex(0);
        line.push(b" ");
        line.push_hex(0xae80);
        assert_eq!(&line.bytes[..line.len], b"0 59 -1 0x0 0xae80");
    }

    #[test]
    fn a_long_line_is_cut_not_overflowed() {
        let mut line = LineBuf::new();
        for _ in 0..100 {
            line.push(b"0123456789");
        }
        assert_eq!(line.len, line.bytes.len());
    }
}
