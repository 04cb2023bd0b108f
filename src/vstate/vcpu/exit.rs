//! What a KVM_RUN came back with, in hearth's own terms, and where it goes.
//!
//! [`KvmExit`] describes an exit without KVM's types, so [`classify`] is a pure function that
//! unit tests drive with made-up exits. The vCPU loop only carries out the [`VcpuAction`]:
//! port I/O to the PIO bus, MMIO to the MMIO bus, the exits an architecture quirk layer
//! completes to its [`CompatHook`], and everything else becomes an [`ExitReason`]. No port
//! or address is named here or in the loop: devices claim ranges on the buses, and the
//! hook says which ports it answers itself.

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::CompatState;
use crate::exit::ExitReason;
use crate::vstate::memory::GuestMemory;

/// Largest port access a [`CompatHook`] is offered (a `rep` string access of more bytes
/// always goes to the bus): the loop copies a hook's port write out of the run page, so
/// the hook can use the vCPU while it handles it.
pub const MAX_HOOK_PORT_ACCESS: usize = 8;

/// One KVM_RUN outcome.
#[derive(Debug)]
pub enum KvmExit<'a> {
    PortIn {
        port: u16,
        data: &'a mut [u8],
    },
    PortOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// HLT with no in-kernel irqchip to wait in.
    Halt,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR (details stay in the run page).
    InternalError,
    /// KVM_EXIT_DEBUG at `pc`.
    Debug {
        pc: u64,
    },
    /// KVM_EXIT_SYSTEM_EVENT of this `KVM_SYSTEM_EVENT_*` kind.
    SystemEvent {
        kind: u32,
    },
    /// KVM_EXIT_FAIL_ENTRY with this hardware reason.
    FailEntry {
        reason: u64,
    },
    /// A kick: KVM_EXIT_INTR, or KVM_RUN failing with EINTR (a signal, immediate_exit).
    Interrupted,
    /// KVM_RUN failed with EAGAIN: an AP that just got INIT/SIPI does that once on the
    /// nested PVM host, and runs when asked again.
    Again,
    /// An exit hearth does not expect, described.
    Unexpected(String),
    /// KVM_RUN failed with this error.
    RunFailed(String),
}

impl<'a> KvmExit<'a> {
    /// Describes what `VcpuFd::run` returned.
    pub fn from_run(run: Result<VcpuExit<'a>, kvm_ioctls::Error>) -> Self {
        match run {
            Ok(VcpuExit::IoIn(port, data)) => Self::PortIn { port, data },
            Ok(VcpuExit::IoOut(port, data)) => Self::PortOut { port, data },
            Ok(VcpuExit::MmioRead(addr, data)) => Self::MmioRead { addr, data },
            Ok(VcpuExit::MmioWrite(addr, data)) => Self::MmioWrite { addr, data },
            Ok(VcpuExit::Hlt) => Self::Halt,
            Ok(VcpuExit::Shutdown) => Self::Shutdown,
            Ok(VcpuExit::InternalError) => Self::InternalError,
            Ok(VcpuExit::Debug(debug)) => Self::Debug { pc: debug.pc },
            Ok(VcpuExit::SystemEvent(kind, _)) => Self::SystemEvent { kind },
            Ok(VcpuExit::FailEntry(reason, _)) => Self::FailEntry { reason },
            Ok(VcpuExit::Intr) => Self::Interrupted,
            Ok(other) => Self::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR => Self::Interrupted,
            Err(e) if e.errno() == libc::EAGAIN => Self::Again,
            Err(e) => Self::RunFailed(e.to_string()),
        }
    }
}

/// What the vCPU loop does with an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuAction {
    /// Forward the port access to the PIO bus.
    IoBus,
    /// Forward the access to the MMIO bus.
    MmioBus,
    /// A port access the compat hook claimed.
    CompatPort,
    /// A debug exit for the compat hook.
    CompatDebug { pc: u64 },
    /// An instruction KVM could not emulate, for the compat hook to complete.
    CompatEmulation,
    /// Interrupted by a kick: look at the vCPU's events, then run again.
    Interrupted,
    /// Nothing to do: run again.
    Resume,
    /// The guest triple-faulted; the loop adds where.
    TripleFault,
    /// KVM could not emulate an instruction and no hook completes it; the loop adds where.
    EmulationFailure,
    /// Stop the VM for this reason.
    Stop(ExitReason),
}

/// Where exit `exit` of vCPU `vcpu` goes, given the compat hook (if the vCPU has one).
/// Pure: it looks at the exit and asks the hook only which ports it claims.
pub fn classify(vcpu: u8, exit: &KvmExit, hook: Option<&dyn CompatHook>) -> VcpuAction {
    let hook_claims = |port: u16, len: usize| {
        len <= MAX_HOOK_PORT_ACCESS && hook.is_some_and(|h| h.claims_port(port, len))
    };
    let failure = |detail: String| VcpuAction::Stop(ExitReason::VcpuFailure { vcpu, detail });
    match exit {
        KvmExit::PortIn { port, data } if hook_claims(*port, data.len()) => VcpuAction::CompatPort,
        KvmExit::PortOut { port, data } if hook_claims(*port, data.len()) => VcpuAction::CompatPort,
        KvmExit::PortIn { .. } | KvmExit::PortOut { .. } => VcpuAction::IoBus,
        KvmExit::MmioRead { .. } | KvmExit::MmioWrite { .. } => VcpuAction::MmioBus,
        KvmExit::Debug { pc } if hook.is_some() => VcpuAction::CompatDebug { pc: *pc },
        KvmExit::Debug { pc } => failure(format!("unexpected debug exit at {pc:#x}")),
        KvmExit::InternalError if hook.is_some() => VcpuAction::CompatEmulation,
        KvmExit::InternalError => VcpuAction::EmulationFailure,
        KvmExit::Shutdown => VcpuAction::TripleFault,
        KvmExit::SystemEvent { kind } => match *kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuAction::Stop(ExitReason::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuAction::Stop(ExitReason::Reset),
            other => failure(format!("unexpected system event {other}")),
        },
        KvmExit::Halt => failure("halted with no in-kernel irqchip".into()),
        KvmExit::FailEntry { reason } => {
            failure(format!("VM entry failed, hardware reason {reason:#x}"))
        }
        KvmExit::Interrupted => VcpuAction::Interrupted,
        KvmExit::Again => VcpuAction::Resume,
        KvmExit::Unexpected(what) => failure(format!("unexpected exit {what}")),
        KvmExit::RunFailed(error) => failure(format!("KVM_RUN failed: {error}")),
    }
}

/// Most bytes KVM reports of the instruction its emulator failed on.
const MAX_FETCHED: usize = 15;

/// The instruction bytes KVM's emulator had fetched when it gave up, from a
/// KVM_EXIT_INTERNAL_ERROR's suberror and data: with KVM_INTERNAL_ERROR_EMULATION and the
/// flag KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES in `data[0]`, `data[1..3]`
/// hold (little-endian) a byte count and up to 15 bytes. None when KVM gave none.
pub fn fetched_instruction(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    use kvm_bindings::{
        KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    };
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return None;
    }
    let [flags, low, high, ..] = *data else {
        return None;
    };
    if flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0 {
        return None;
    }
    let mut packed = [0u8; 1 + MAX_FETCHED];
    packed[..8].copy_from_slice(&low.to_le_bytes());
    packed[8..].copy_from_slice(&high.to_le_bytes());
    let len = usize::from(packed[0]);
    (1..=MAX_FETCHED)
        .contains(&len)
        .then(|| packed[1..=len].to_vec())
}

/// What a hook did with an exit offered to it.
#[derive(Debug, PartialEq, Eq)]
pub enum Completion {
    /// The guest's instruction is complete; run the vCPU again.
    Completed,
    /// The hook could not complete it; the VM stops, and this says why.
    NotHandled(String),
}

/// An architecture quirk layer between the vCPU and KVM: on the nested-PVM host, the
/// compatibility layer in `arch::x86_64::pvm`. The vCPU loop calls it on the exits
/// [`classify`] gives it and after every exit that does not stop the VM.
pub trait CompatHook: Send {
    /// Whether a port access of `len` bytes at `port` is the hook's rather than the bus's.
    /// Must not depend on anything but its arguments and the hook's configuration.
    fn claims_port(&self, port: u16, len: usize) -> bool;

    /// A guest read of a claimed port: fill `data`.
    fn port_read(&mut self, port: u16, data: &mut [u8]);

    /// A guest write of `data` to a claimed port.
    fn port_write(&mut self, vcpu: &VcpuFd, mem: &GuestMemory, port: u16, data: &[u8]);

    /// A debug exit at `pc`.
    fn debug_exit(&mut self, vcpu: &VcpuFd, mem: &GuestMemory, pc: u64) -> Completion;

    /// KVM_EXIT_INTERNAL_ERROR: complete the instruction at RIP if the hook knows how.
    /// `fetched` is what KVM's emulator read at RIP, when KVM says
    /// ([`fetched_instruction`]).
    fn emulation_failure(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemory,
        fetched: Option<&[u8]>,
    ) -> Completion;

    /// After every exit that does not stop the VM, kicks included.
    fn after_exit(&mut self, vcpu: &VcpuFd, mem: &GuestMemory);

    /// One line for the log when the vCPU stops (what the hook did).
    fn summary(&self) -> String;

    /// The hook's own state, saved with a paused vCPU's.
    fn save_state(&self) -> CompatState;

    /// Takes over `state` on a vCPU that has not run yet, redoing in KVM whatever the hook
    /// had set up there (KVM saves none of it).
    fn restore_state(&mut self, vcpu: &VcpuFd, state: &CompatState) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the nested PVM host reported for an int3 another vCPU had already patched back
    /// to a nop: 15 bytes, `cc c3 00 00 01 ...`.
    #[test]
    fn reads_the_bytes_kvm_fetched() {
        let data = [1, 0x0100_00c3_cc0f, 0, 0x1000, 0, 0, 0, 0];
        let mut expected = vec![0xcc, 0xc3, 0, 0, 1];
        expected.resize(15, 0);
        assert_eq!(fetched_instruction(1, &data), Some(expected));
        let short = [1, 0x0605_0403_0290_cc02, 0x0f0e_0d0c_0b0a_0907];
        assert_eq!(fetched_instruction(1, &short), Some(vec![0xcc, 0x90]));
        let full = [1, 0x0706_0504_0302_010f, 0x0f0e_0d0c_0b0a_0908];
        assert_eq!(
            fetched_instruction(1, &full),
            Some((1..=15).collect::<Vec<u8>>())
        );
    }

    #[test]
    fn no_fetched_bytes_unless_kvm_says_so() {
        let bytes = 0x0100_00c3_cc0f;
        assert_eq!(fetched_instruction(1, &[0, bytes, 0]), None, "flag clear");
        assert_eq!(
            fetched_instruction(2, &[1, bytes, 0]),
            None,
            "not emulation"
        );
        assert_eq!(fetched_instruction(1, &[1, bytes]), None, "data too short");
        assert_eq!(fetched_instruction(1, &[1, 0xcc00, 0]), None, "no bytes");
        assert_eq!(
            fetched_instruction(1, &[1, 0xcc10, 0]),
            None,
            "more than 15"
        );
    }

    /// A hook that claims 4-byte accesses to one port and does nothing.
    struct ClaimsPort(u16);

    impl CompatHook for ClaimsPort {
        fn claims_port(&self, port: u16, len: usize) -> bool {
            port == self.0 && len == 4
        }
        fn port_read(&mut self, _: u16, _: &mut [u8]) {}
        fn port_write(&mut self, _: &VcpuFd, _: &GuestMemory, _: u16, _: &[u8]) {}
        fn debug_exit(&mut self, _: &VcpuFd, _: &GuestMemory, _: u64) -> Completion {
            Completion::Completed
        }
        fn emulation_failure(
            &mut self,
            _: &VcpuFd,
            _: &GuestMemory,
            _: Option<&[u8]>,
        ) -> Completion {
            Completion::Completed
        }
        fn after_exit(&mut self, _: &VcpuFd, _: &GuestMemory) {}
        fn summary(&self) -> String {
            String::new()
        }
        fn save_state(&self) -> CompatState {
            CompatState::default()
        }
        fn restore_state(&mut self, _: &VcpuFd, _: &CompatState) -> Result<(), String> {
            Ok(())
        }
    }

    const HOOK: ClaimsPort = ClaimsPort(0x510);

    fn with_hook(exit: &KvmExit) -> VcpuAction {
        classify(1, exit, Some(&HOOK))
    }

    fn without_hook(exit: &KvmExit) -> VcpuAction {
        classify(1, exit, None)
    }

    #[test]
    fn port_and_mmio_accesses_go_to_their_bus() {
        let mut four = [0u8; 4];
        for exit in [
            KvmExit::PortIn {
                port: 0x3f8,
                data: &mut [0],
            },
            KvmExit::PortOut {
                port: 0x3f8,
                data: b"x",
            },
        ] {
            assert_eq!(with_hook(&exit), VcpuAction::IoBus);
            assert_eq!(without_hook(&exit), VcpuAction::IoBus);
        }
        let read = KvmExit::MmioRead {
            addr: 0xd000_0000,
            data: &mut four,
        };
        assert_eq!(with_hook(&read), VcpuAction::MmioBus);
        let write = KvmExit::MmioWrite {
            addr: 0xc000_0008,
            data: &[3],
        };
        assert_eq!(without_hook(&write), VcpuAction::MmioBus);
    }

    #[test]
    fn claimed_ports_go_to_the_hook_only_when_there_is_one() {
        let out = KvmExit::PortOut {
            port: 0x510,
            data: &[1, 2, 3, 4],
        };
        assert_eq!(with_hook(&out), VcpuAction::CompatPort);
        assert_eq!(without_hook(&out), VcpuAction::IoBus);
        let mut data = [0u8; 4];
        let read = KvmExit::PortIn {
            port: 0x510,
            data: &mut data,
        };
        assert_eq!(with_hook(&read), VcpuAction::CompatPort);
        // The hook decides by width too: a 1-byte access stays on the bus.
        let narrow = KvmExit::PortOut {
            port: 0x510,
            data: &[1],
        };
        assert_eq!(with_hook(&narrow), VcpuAction::IoBus);
    }

    /// A hook that claims every access still never gets a `rep` string access larger than
    /// the loop's copy buffer.
    #[test]
    fn long_string_accesses_never_reach_a_hook() {
        struct ClaimsAll;
        impl CompatHook for ClaimsAll {
            fn claims_port(&self, _: u16, _: usize) -> bool {
                true
            }
            fn port_read(&mut self, _: u16, _: &mut [u8]) {}
            fn port_write(&mut self, _: &VcpuFd, _: &GuestMemory, _: u16, _: &[u8]) {}
            fn debug_exit(&mut self, _: &VcpuFd, _: &GuestMemory, _: u64) -> Completion {
                Completion::Completed
            }
            fn emulation_failure(
                &mut self,
                _: &VcpuFd,
                _: &GuestMemory,
                _: Option<&[u8]>,
            ) -> Completion {
                Completion::Completed
            }
            fn after_exit(&mut self, _: &VcpuFd, _: &GuestMemory) {}
            fn summary(&self) -> String {
                String::new()
            }
            fn save_state(&self) -> CompatState {
                CompatState::default()
            }
            fn restore_state(&mut self, _: &VcpuFd, _: &CompatState) -> Result<(), String> {
                Ok(())
            }
        }
        let long = [0u8; MAX_HOOK_PORT_ACCESS + 1];
        let exit = KvmExit::PortOut {
            port: 0x80,
            data: &long,
        };
        assert_eq!(classify(0, &exit, Some(&ClaimsAll)), VcpuAction::IoBus);
        let short = KvmExit::PortOut {
            port: 0x80,
            data: &long[..MAX_HOOK_PORT_ACCESS],
        };
        assert_eq!(
            classify(0, &short, Some(&ClaimsAll)),
            VcpuAction::CompatPort
        );
    }

    #[test]
    fn debug_and_emulation_exits_go_to_the_hook_or_stop_the_vm() {
        let debug = KvmExit::Debug {
            pc: 0xffff_ffff_8100_0000,
        };
        assert_eq!(
            with_hook(&debug),
            VcpuAction::CompatDebug {
                pc: 0xffff_ffff_8100_0000
            }
        );
        assert_eq!(
            without_hook(&debug),
            VcpuAction::Stop(ExitReason::VcpuFailure {
                vcpu: 1,
                detail: "unexpected debug exit at 0xffffffff81000000".into()
            })
        );
        assert_eq!(
            with_hook(&KvmExit::InternalError),
            VcpuAction::CompatEmulation
        );
        assert_eq!(
            without_hook(&KvmExit::InternalError),
            VcpuAction::EmulationFailure
        );
    }

    #[test]
    fn guest_ends_and_failures_stop_the_vm() {
        assert_eq!(without_hook(&KvmExit::Shutdown), VcpuAction::TripleFault);
        let power_off = KvmExit::SystemEvent {
            kind: kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN,
        };
        assert_eq!(
            with_hook(&power_off),
            VcpuAction::Stop(ExitReason::PowerOff)
        );
        let reset = KvmExit::SystemEvent {
            kind: kvm_bindings::KVM_SYSTEM_EVENT_RESET,
        };
        assert_eq!(without_hook(&reset), VcpuAction::Stop(ExitReason::Reset));
        for (exit, detail) in [
            (
                KvmExit::SystemEvent { kind: 99 },
                "unexpected system event 99",
            ),
            (KvmExit::Halt, "halted with no in-kernel irqchip"),
            (
                KvmExit::FailEntry { reason: 0x21 },
                "VM entry failed, hardware reason 0x21",
            ),
            (
                KvmExit::Unexpected("Hypercall".into()),
                "unexpected exit Hypercall",
            ),
            (
                KvmExit::RunFailed("Bad address (os error 14)".into()),
                "KVM_RUN failed: Bad address (os error 14)",
            ),
        ] {
            assert_eq!(
                with_hook(&exit),
                VcpuAction::Stop(ExitReason::VcpuFailure {
                    vcpu: 1,
                    detail: detail.into()
                }),
                "{exit:?}"
            );
        }
    }

    #[test]
    fn kicks_and_retries_run_again() {
        assert_eq!(with_hook(&KvmExit::Interrupted), VcpuAction::Interrupted);
        assert_eq!(without_hook(&KvmExit::Again), VcpuAction::Resume);
    }

    #[test]
    fn kvm_results_are_described() {
        let eintr = kvm_ioctls::Error::new(libc::EINTR);
        assert!(matches!(
            KvmExit::from_run(Err(eintr)),
            KvmExit::Interrupted
        ));
        let eagain = kvm_ioctls::Error::new(libc::EAGAIN);
        assert!(matches!(KvmExit::from_run(Err(eagain)), KvmExit::Again));
        let efault = kvm_ioctls::Error::new(libc::EFAULT);
        assert!(matches!(
            KvmExit::from_run(Err(efault)),
            KvmExit::RunFailed(_)
        ));
        let mut data = [0u8; 2];
        assert!(matches!(
            KvmExit::from_run(Ok(VcpuExit::IoIn(0x60, &mut data))),
            KvmExit::PortIn { port: 0x60, data } if data.len() == 2
        ));
        assert!(matches!(
            KvmExit::from_run(Ok(VcpuExit::Intr)),
            KvmExit::Interrupted
        ));
        assert!(matches!(
            KvmExit::from_run(Ok(VcpuExit::IrqWindowOpen)),
            KvmExit::Unexpected(_)
        ));
    }
}
