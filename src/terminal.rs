//! Raw mode for an interactive console, restored on every way out: normal return, error
//! return, a terminating signal (handled by the event loop, so the guard drops) and panics
//! (a panic hook restores it before the message is printed).

use std::sync::Mutex;

/// The terminal settings to put back, shared with the panic hook.
static SAVED: Mutex<Option<(i32, libc::termios)>> = Mutex::new(None);

/// Puts the terminal back when dropped.
pub struct RawTerminal {
    _private: (),
}

impl RawTerminal {
    /// Switches `fd` to raw mode if it is a terminal; `None` when it is not. Output
    /// post-processing stays on, so hearth's own stderr lines stay readable.
    pub fn enable(fd: i32) -> Option<Self> {
        Self::enable_with(fd, true)
    }

    /// Raw mode without output post-processing either, for a terminal that relays
    /// another terminal's output: a container's pty in the guest has already turned each
    /// `\n` into `\r\n`, and a second `ONLCR` here would make it `\r\r\n`.
    pub fn enable_passthrough(fd: i32) -> Option<Self> {
        Self::enable_with(fd, false)
    }

    fn enable_with(fd: i32, output_processing: bool) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `original` is a valid termios to write into; fd is a terminal.
        if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
            return None;
        }
        let mut raw = original;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        if output_processing {
            raw.c_oflag |= libc::OPOST | libc::ONLCR;
        }
        // SAFETY: `raw` is a fully initialised termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, original));
        install_panic_hook();
        Some(Self { _private: () })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the saved settings, once (also for paths that exit without unwinding).
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((fd, original)) = saved {
        // SAFETY: `original` came from tcgetattr on the same descriptor.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &original) };
    }
}

fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}
