//! How a VM ends. Any thread (a vCPU, a device, the event loop) may ask the VM to stop with
//! a reason; the first reason wins and the event loop is woken through an eventfd.

use std::fmt;
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit status for a guest triple fault (KVM_EXIT_SHUTDOWN).
pub const STATUS_TRIPLE_FAULT: u8 = 100;
/// Exit status for a KVM internal or emulation error hearth could not complete.
pub const STATUS_EMULATION_FAILURE: u8 = 101;
/// Exit status for any other fatal vCPU error.
pub const STATUS_VCPU_FAILURE: u8 = 102;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote its exit status to the control device.
    GuestExit(u8),
    /// The guest reset the machine (i8042 0xFE, reboot).
    Reset,
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u8, rip: u64 },
    /// KVM could not emulate an instruction and hearth could not complete it.
    EmulationFailure { vcpu: u8, detail: String },
    /// Any other fatal vCPU error.
    VcpuFailure { vcpu: u8, detail: String },
    /// hearth received a terminating signal.
    Signal(i32),
    /// The user typed the console's quit sequence (Ctrl-A x).
    ConsoleQuit,
    /// An API client asked the VMM to stop (`PUT /api/v1/vmm.shutdown`).
    Shutdown,
}

impl ExitReason {
    /// hearth's process exit status for this reason.
    pub fn status(&self) -> u8 {
        match self {
            Self::GuestExit(code) => *code,
            Self::Reset | Self::PowerOff | Self::ConsoleQuit | Self::Shutdown => 0,
            Self::TripleFault { .. } => STATUS_TRIPLE_FAULT,
            Self::EmulationFailure { .. } => STATUS_EMULATION_FAILURE,
            Self::VcpuFailure { .. } => STATUS_VCPU_FAILURE,
            Self::Signal(signo) => 128u8.saturating_add(*signo as u8),
        }
    }

    /// Whether the guest or the user ended the VM on purpose (no error line is printed).
    pub fn is_orderly(&self) -> bool {
        matches!(
            self,
            Self::GuestExit(_) | Self::Reset | Self::PowerOff | Self::ConsoleQuit | Self::Shutdown
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::GuestExit(code) => write!(f, "guest exited with status {code}"),
            Self::Reset => write!(f, "guest reset the machine"),
            Self::PowerOff => write!(f, "guest powered off"),
            Self::TripleFault { vcpu, rip } => {
                write!(
                    f,
                    "vCPU {vcpu} triple-faulted (KVM shutdown exit) at rip {rip:#x}"
                )
            }
            Self::EmulationFailure { vcpu, detail } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM could not emulate an instruction: {detail}"
                )
            }
            Self::VcpuFailure { vcpu, detail } => write!(f, "vCPU {vcpu} failed: {detail}"),
            Self::Signal(signo) => write!(f, "stopped by signal {signo}"),
            Self::ConsoleQuit => write!(f, "console quit (Ctrl-A x)"),
            Self::Shutdown => write!(f, "the VMM was shut down through the API"),
        }
    }
}

/// The shared "please stop" channel.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to stop. Only the first reason is kept.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            log::debug!("exit requested: {reason}");
            *slot = Some(reason);
        }
        drop(slot);
        // A full counter (never reached) still leaves the eventfd readable, which is all
        // the event loop needs.
        let _ = self.evt.write(1);
    }

    /// The reason given, once one was.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_requested(&self) -> bool {
        self.reason().is_some()
    }

    /// The eventfd the event loop watches.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_loop() {
        let exit = ExitSignal::new().unwrap();
        assert!(!exit.is_requested());
        exit.request(ExitReason::GuestExit(7));
        exit.request(ExitReason::Reset);
        assert_eq!(exit.reason(), Some(ExitReason::GuestExit(7)));
        assert_eq!(exit.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn statuses() {
        assert_eq!(ExitReason::GuestExit(255).status(), 255);
        assert_eq!(ExitReason::Reset.status(), 0);
        assert_eq!(ExitReason::TripleFault { vcpu: 0, rip: 0 }.status(), 100);
        assert_eq!(ExitReason::Signal(libc::SIGTERM).status(), 143);
        assert!(!ExitReason::Signal(2).is_orderly());
        assert!(ExitReason::PowerOff.is_orderly());
        assert_eq!(ExitReason::Shutdown.status(), 0);
        assert!(ExitReason::Shutdown.is_orderly());
    }
}
