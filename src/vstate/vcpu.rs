//! vCPUs: their boot-time register state, their threads, and the run loop. Exits are only
//! dispatched: port I/O to the PIO bus, MMIO to the MMIO bus, and the few exits the
//! nested-PVM layer completes to `pvm`. Anything else ends the VM with a reason.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::{self, boot::BootProtocol};
use crate::config::CpuProfile;
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::GuestMemory;
use crate::vstate::pv_xstate;
use crate::vstate::pvm::{Fixup, PvmFixups};
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up the CPUID of vCPU {index}")]
    Cpuid {
        index: u8,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot set up the registers of vCPU {index}")]
    Registers {
        index: u8,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {index}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: vm_memory::GuestAddress,
    pub protocol: BootProtocol,
}

/// The signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) kick handler: its only job is to make KVM_RUN return EINTR.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::SignalHandler)
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: Arc<ExitSignal>,
    mem: GuestMemory,
    pvm: Option<PvmFixups>,
}

impl Vcpu {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &Vm,
        index: u8,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        exit: Arc<ExitSignal>,
        mem: GuestMemory,
        profile: CpuProfile,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            index,
            fd,
            io_bus,
            mmio_bus,
            exit,
            mem,
            pvm: (profile == CpuProfile::Compat).then(|| PvmFixups::new(index)),
        })
    }

    /// CPUID, MSRs, FPU and LAPIC for every vCPU; registers and segments for the boot vCPU
    /// (the others wait for INIT/SIPI from it, handled by the in-kernel LAPIC).
    pub fn configure(
        &self,
        kvm: &KvmContext,
        vcpu_count: u8,
        boot: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let regs_err =
            |e: Box<dyn std::error::Error + Send + Sync>| VcpuError::Registers { index, source: e };
        let mut cpuid = kvm.supported_cpuid().map_err(|e| VcpuError::Cpuid {
            index,
            source: Box::new(e),
        })?;
        let options = arch::cpuid::CpuidOptions {
            cpu_index: index,
            cpu_count: vcpu_count,
            hide_pvm_unsupported: self.pvm.is_some(),
        };
        arch::cpuid::normalize(&mut cpuid, &options).map_err(|e| VcpuError::Cpuid {
            index,
            source: Box::new(e),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(|e| VcpuError::Cpuid {
            index,
            source: Box::new(e),
        })?;
        arch::regs::setup_msrs(&self.fd).map_err(|e| regs_err(Box::new(e)))?;
        arch::regs::setup_fpu(&self.fd).map_err(|e| regs_err(Box::new(e)))?;
        arch::regs::setup_lint(&self.fd).map_err(|e| regs_err(Box::new(e)))?;
        if let Some(boot) = boot {
            arch::regs::setup_sregs(&self.mem, &self.fd, boot.protocol)
                .map_err(|e| regs_err(Box::new(e)))?;
            arch::regs::setup_regs(&self.fd, boot.entry, boot.protocol)
                .map_err(|e| regs_err(Box::new(e)))?;
        }
        Ok(())
    }

    /// Starts the vCPU's thread.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run())
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle { index, thread })
    }

    fn run(mut self) {
        while !self.exit.is_requested() {
            match self.run_once() {
                Ok(()) => {}
                Err(reason) => {
                    self.exit.request(reason);
                    break;
                }
            }
        }
        if let Some(pvm) = &self.pvm {
            log::info!("vCPU {}: compat fixups: {:?}", self.index, pvm.stats);
        }
    }

    /// One KVM_RUN and the handling of its exit. `Err` carries why the VM must stop.
    fn run_once(&mut self) -> Result<(), ExitReason> {
        let index = self.index;
        let outcome = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                let compat = self.pvm.as_mut().is_some_and(|p| p.on_io_in(port, data));
                if !compat && !self.io_bus.read(u64::from(port), data) {
                    log::trace!("vCPU {index}: unclaimed port read {port:#x}");
                    data.fill(0xff);
                }
                Outcome::Handled
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                // The compat layer's xstate requests need the vCPU, which `data` borrows.
                match (
                    pv_xstate::Request::for_port(port),
                    pv_xstate::written_value(data),
                ) {
                    (Some(request), Some(value)) if self.pvm.is_some() => {
                        Outcome::PvXstate { request, value }
                    }
                    _ => {
                        if !self.io_bus.write(u64::from(port), data) {
                            log::trace!("vCPU {index}: unclaimed port write {port:#x} {data:x?}");
                        }
                        Outcome::Handled
                    }
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio_bus.read(addr, data) {
                    log::debug!("vCPU {index}: unclaimed MMIO read {addr:#x}");
                    data.fill(0xff);
                }
                Outcome::Handled
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio_bus.write(addr, data) {
                    log::debug!("vCPU {index}: unclaimed MMIO write {addr:#x} {data:x?}");
                }
                Outcome::Handled
            }
            Ok(VcpuExit::Shutdown) => Outcome::TripleFault,
            Ok(VcpuExit::InternalError) => Outcome::InternalError,
            Ok(VcpuExit::Debug(debug)) => Outcome::Debug(debug.pc),
            Ok(VcpuExit::SystemEvent(kind, _)) => Outcome::SystemEvent(kind),
            Ok(VcpuExit::Hlt) => Outcome::Fatal("halted with no in-kernel irqchip".into()),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Outcome::Fatal(format!("VM entry failed, hardware reason {reason:#x}"))
            }
            // A kick: the loop re-checks for a stop request.
            Ok(VcpuExit::Intr) => Outcome::Handled,
            Ok(other) => Outcome::Fatal(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => Outcome::Handled,
            // An AP that just got INIT/SIPI can report EAGAIN once on this host: run again.
            Err(e) if e.errno() == libc::EAGAIN => Outcome::Handled,
            Err(e) => Outcome::Fatal(format!("KVM_RUN failed: {e}")),
        };

        match outcome {
            Outcome::PvXstate { request, value } => {
                if let Some(pvm) = self.pvm.as_mut() {
                    pvm.on_xstate_request(&self.fd, &self.mem, request, value);
                }
                Ok(())
            }
            Outcome::Handled => {
                if let Some(pvm) = self.pvm.as_mut() {
                    pvm.poll(&self.fd, &self.mem);
                }
                Ok(())
            }
            Outcome::TripleFault => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                Err(ExitReason::TripleFault { vcpu: index, rip })
            }
            Outcome::InternalError => self.on_internal_error(),
            Outcome::Debug(pc) => match self.pvm.as_mut() {
                Some(pvm) => match pvm.on_debug_exit(&self.fd, &self.mem, pc) {
                    Ok(Fixup::Completed) => Ok(()),
                    Ok(Fixup::NotHandled(detail)) => Err(ExitReason::VcpuFailure {
                        vcpu: index,
                        detail,
                    }),
                    Err(e) => Err(ExitReason::VcpuFailure {
                        vcpu: index,
                        detail: format!("debug exit at {pc:#x}: {e}"),
                    }),
                },
                None => Err(ExitReason::VcpuFailure {
                    vcpu: index,
                    detail: format!("unexpected debug exit at {pc:#x}"),
                }),
            },
            Outcome::SystemEvent(kind) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Err(ExitReason::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Err(ExitReason::Reset),
                other => Err(ExitReason::VcpuFailure {
                    vcpu: index,
                    detail: format!("unexpected system event {other}"),
                }),
            },
            Outcome::Fatal(detail) => Err(ExitReason::VcpuFailure {
                vcpu: index,
                detail,
            }),
        }
    }

    fn on_internal_error(&mut self) -> Result<(), ExitReason> {
        let index = self.index;
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member the kernel filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        let detail = match self.pvm.as_mut() {
            Some(pvm) => match pvm.on_emulation_failure(&self.fd, &self.mem) {
                Ok(Fixup::Completed) => return Ok(()),
                Ok(Fixup::NotHandled(detail)) => detail,
                Err(e) => e.to_string(),
            },
            None => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                format!("rip {rip:#x}")
            }
        };
        log::debug!(
            "vCPU {index}: internal error suberror {} data {data:x?}",
            internal.suberror
        );
        Err(ExitReason::EmulationFailure {
            vcpu: index,
            detail: format!("suberror {}, {detail}", internal.suberror),
        })
    }
}

enum Outcome {
    Handled,
    PvXstate {
        request: pv_xstate::Request,
        value: u32,
    },
    TripleFault,
    InternalError,
    Debug(u64),
    SystemEvent(u32),
    Fatal(String),
}

/// A running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts KVM_RUN so the thread sees a pending stop (or re-polls the compat layer).
    pub fn kick(&self) {
        if let Err(e) = self.thread.kill(kick_signal()) {
            log::debug!("vCPU {}: kick failed: {e}", self.index);
        }
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    pub fn join(self) {
        if self.thread.join().is_err() {
            log::error!("vCPU {} thread panicked", self.index);
        }
    }
}
