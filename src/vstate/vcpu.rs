//! vCPUs: their boot-time register state, their threads, and the run loop.
//!
//! Each exit is classified by [`exit::classify`] and only dispatched: port I/O to the PIO
//! bus, MMIO to the MMIO bus, the exits an architecture quirk layer completes to its
//! [`CompatHook`]; anything else ends the VM with a reason.
//!
//! A vCPU thread takes [`VcpuEvent`]s from its [`VcpuHandle`] through a channel and answers
//! with [`VcpuResponse`]s. The handle kicks the thread out of KVM_RUN with a signal whose
//! handler also sets the run page's `immediate_exit`, so a kick that lands just before
//! KVM_RUN is not lost: that KVM_RUN returns at once and the thread reads its events. A
//! paused vCPU is parked on the channel, not in KVM_RUN, so kicks do not wake it.
//!
//! The thread is started with the vCPU ([`Vcpu::new`]) and waits, idle, until
//! [`Vcpu::start`] hands the vCPU over; it answers at once, so a start returns once the
//! vCPU runs (or is parked). A new thread waits for the scheduler to place it, on a busy
//! host until the next tick (3-8 ms were seen on the project's 2-core machines between
//! spawning a vCPU thread and its first instruction, after the VM was otherwise ready); a
//! waiting thread that is woken runs at once. Firecracker's vCPU threads also exist before
//! they run.

pub mod exit;
pub mod state;

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::{self, boot::BootProtocol};
use crate::config::CpuProfile;
use crate::devices::bus::Bus;
use crate::diag::RipSampler;
use crate::exit::{ExitReason, ExitSignal};
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::Vm;

pub use exit::{classify, CompatHook, Completion, KvmExit, VcpuAction, MAX_HOOK_PORT_ACCESS};
pub use state::{MsrIndex, StateError, VcpuState};

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
    #[error("vCPU {index} has stopped")]
    Stopped { index: u8 },
    #[error("vCPU {index} did not answer {event} in time")]
    NoAnswer { index: u8, event: &'static str },
    #[error("vCPU {index} could not {event}: {reason}")]
    Refused {
        index: u8,
        event: &'static str,
        reason: String,
    },
    #[error("cannot restore the state of vCPU {index}")]
    Restore {
        index: u8,
        #[source]
        source: StateError,
    },
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: vm_memory::GuestAddress,
    pub protocol: BootProtocol,
}

/// What a vCPU thread is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Leave KVM_RUN (completing any port or MMIO access in flight) and park.
    Pause,
    /// Run again after a pause.
    Resume,
    /// Answer with the vCPU's state, saving these MSRs; only a paused vCPU does.
    SaveState(MsrIndex),
    /// End the thread.
    Finish,
}

impl VcpuEvent {
    fn name(&self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SaveState(_) => "save its state",
            Self::Finish => "finish",
        }
    }
}

/// A vCPU thread's answer to an event (`Finish` has none: the thread ends).
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<VcpuState>),
    /// The event could not be carried out; the vCPU is as it was.
    Refused(String),
}

/// How long a start may take to reach the vCPU's thread.
const VCPU_START_TIMEOUT: Duration = Duration::from_secs(5);

/// The signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// The run page of the vCPU this thread runs, for the kick handler; null elsewhere.
    static KICK_TARGET: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs the kick handler: it sets `immediate_exit` in the interrupted thread's run
/// page, so KVM_RUN returns EINTR whether the signal lands in it or just before it.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let run = KICK_TARGET.with(Cell::get);
        if !run.is_null() {
            // SAFETY: a non-null target is the run page of the VcpuFd this thread owns;
            // `KickTarget` clears it before that fd can be dropped. The byte is written
            // volatile because KVM reads it, not this thread's code.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    }
    register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::SignalHandler)
}

/// Publishes a vCPU's run page to this thread's kick handler while it lives.
struct KickTarget;

impl KickTarget {
    fn register(fd: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        KICK_TARGET.with(|target| target.set(run));
        Self
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KICK_TARGET.with(|target| target.set(std::ptr::null_mut()));
    }
}

/// What one KVM_RUN amounted to, when the VM goes on.
#[derive(Debug, PartialEq, Eq)]
enum Ran {
    /// An exit was handled.
    Exit,
    /// A kick (or `immediate_exit`) interrupted it.
    Interrupted,
}

/// How many KVM_RUNs with `immediate_exit` set a pause waits for KVM to report the
/// interruption: each completes what the last exit left pending, and only a `rep` string
/// access spanning pages makes more than one exit before that.
const MAX_SETTLE_RUNS: usize = 64;

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: Arc<ExitSignal>,
    mem: GuestMemory,
    compat: Option<Box<dyn CompatHook>>,
    /// The guest TSC when the vCPU parked, written back when it resumes (see
    /// [`arch::tsc`]).
    held_tsc: Option<u64>,
    /// The thread that will run this vCPU, until it is handed over.
    thread: Option<VcpuThread>,
    /// Samples RIP after the VMM's kicks (`--sample-rip`).
    sampler: Option<RipSampler>,
}

/// A vCPU thread waiting for its vCPU (see the module documentation), and the channels
/// its [`VcpuHandle`] will use.
struct VcpuThread {
    handoff: Sender<(Vcpu, bool)>,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: JoinHandle<()>,
}

impl VcpuThread {
    fn spawn(index: u8) -> Result<Self, VcpuError> {
        let (handoff, taken) = mpsc::channel::<(Vcpu, bool)>();
        let (events, event_rx) = mpsc::channel();
        let (response_tx, responses) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // The thread may start before the VMM blocks the terminating signals for
                // its signalfd (`hearth run` builds the VM first), so it blocks them
                // itself: they must reach the event loop, not end the process here.
                if let Err(e) = crate::vmm::block_terminating_signals() {
                    log::warn!("vCPU {index}: cannot block the terminating signals: {e}");
                }
                // A vCPU dropped unstarted (a build that failed) closes the channel.
                if let Ok((vcpu, paused)) = taken.recv() {
                    // Before the first KVM_RUN. A failure leaves `start_with` without an
                    // answer, which it reports, and stops the VM.
                    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                        vcpu.exit.request(ExitReason::VcpuFailure {
                            vcpu: index,
                            detail: crate::error_chain(&e),
                        });
                        return;
                    }
                    vcpu.run(event_rx, response_tx, paused);
                }
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(Self {
            handoff,
            events,
            responses,
            thread,
        })
    }
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
            compat: (profile == CpuProfile::Compat).then(|| arch::compat_hook(index)),
            held_tsc: None,
            thread: Some(VcpuThread::spawn(index)?),
            sampler: None,
        })
    }

    /// Samples this vCPU's RIP with `sampler` while it runs; the VMM must kick it at the
    /// sampling interval ([`crate::vmm::Vmm::kick_every`]).
    pub fn sample_rip(&mut self, sampler: RipSampler) {
        self.sampler = Some(sampler);
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
            hide_pvm_unsupported: self.compat.is_some(),
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

    /// Loads a saved vCPU's state into this one, instead of [`Vcpu::configure`]: it then
    /// goes on where the saved one stopped.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        let index = self.index;
        state::restore(&self.fd, state).map_err(|source| VcpuError::Restore { index, source })?;
        match (self.compat.as_mut(), &state.compat) {
            (Some(hook), Some(saved)) => {
                hook.restore_state(&self.fd, saved)
                    .map_err(|e| VcpuError::Restore {
                        index,
                        source: StateError::Compat(e),
                    })?
            }
            (None, None) => {}
            // Another CPU profile than the saved vCPU's: its hook starts afresh, or the
            // saved hook state has no one to go to.
            _ => log::warn!("vCPU {index}: restored under another CPU profile than it was saved"),
        }
        Ok(())
    }

    /// Starts the vCPU's thread, running.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        self.start_with(false)
    }

    /// Starts the vCPU's thread parked, as after a pause: it enters KVM_RUN only at the
    /// first `Resume` (a VM restored from a snapshot and not resumed yet).
    pub fn start_paused(self) -> Result<VcpuHandle, VcpuError> {
        self.start_with(true)
    }

    /// Hands the vCPU to its thread and waits (at most [`VCPU_START_TIMEOUT`]) until the
    /// thread has taken it: running, or parked when `paused`.
    fn start_with(mut self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let thread = match self.thread.take() {
            Some(thread) => thread,
            None => VcpuThread::spawn(index)?,
        };
        let handle = VcpuHandle {
            index,
            events: thread.events,
            responses: thread.responses,
            thread: thread.thread,
        };
        thread
            .handoff
            .send((self, paused))
            .map_err(|_| VcpuError::Stopped { index })?;
        let taken = if paused {
            VcpuEvent::Pause
        } else {
            VcpuEvent::Resume
        };
        handle.wait_for(&taken, Instant::now() + VCPU_START_TIMEOUT)?;
        Ok(handle)
    }

    /// The thread: runs the guest, reading events between exits, until told to finish,
    /// the VM is to stop, or the handle is gone.
    fn run(mut self, events: Receiver<VcpuEvent>, responses: Sender<VcpuResponse>, paused: bool) {
        let _kick_target = KickTarget::register(&mut self.fd);
        // What `start_with` waits for.
        let started = if paused {
            VcpuResponse::Paused
        } else {
            VcpuResponse::Resumed
        };
        if responses.send(started).is_err() {
            return;
        }
        let mut paused = paused;
        if paused {
            // Restored and not resumed yet: its TSC waits, like a paused vCPU's.
            self.hold_tsc();
        }
        loop {
            let event = if paused {
                match events.recv() {
                    Ok(event) => event,
                    Err(_) => break,
                }
            } else {
                match events.try_recv() {
                    Ok(event) => event,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        if self.exit.is_requested() {
                            break;
                        }
                        match self.run_once() {
                            Ok(ran) => {
                                if let Some(sampler) = self.sampler.as_mut() {
                                    sampler.after_run(&self.fd, ran == Ran::Interrupted);
                                }
                            }
                            Err(reason) => {
                                self.exit.request(reason);
                                break;
                            }
                        }
                        continue;
                    }
                }
            };
            let response = match event {
                VcpuEvent::SaveState(msrs) if paused => {
                    let compat = self.compat.as_ref().map(|hook| hook.save_state());
                    match state::save(&self.fd, &msrs, compat) {
                        Ok(mut state) => {
                            // The TSC as it was paused, like the VM's kvmclock: the time
                            // since is no more part of the guest's than a resume's.
                            if let Some(tsc) = self.held_tsc {
                                state.set_tsc(tsc);
                            }
                            VcpuResponse::State(Box::new(state))
                        }
                        Err(e) => VcpuResponse::Refused(crate::error_chain(&e)),
                    }
                }
                VcpuEvent::SaveState(_) => VcpuResponse::Refused("it is running".into()),
                VcpuEvent::Pause if paused => VcpuResponse::Paused,
                VcpuEvent::Pause => match self.park() {
                    Ok(()) => {
                        paused = true;
                        VcpuResponse::Paused
                    }
                    Err(reason) => {
                        self.exit.request(reason);
                        break;
                    }
                },
                VcpuEvent::Resume => {
                    self.release_tsc();
                    paused = false;
                    VcpuResponse::Resumed
                }
                VcpuEvent::Finish => break,
            };
            if responses.send(response).is_err() {
                break;
            }
        }
        if let Some(hook) = &self.compat {
            log::info!("vCPU {}: {}", self.index, hook.summary());
        }
        if let Some(sampler) = self.sampler.as_mut() {
            sampler.finish();
        }
    }

    /// Leaves the vCPU consistent for a pause: KVM finishes a port or MMIO access it
    /// handed out only on the next KVM_RUN, so one more runs with `immediate_exit` set
    /// (which lets no guest instruction run after that access). Then tells a guest with
    /// kvmclock that it was stopped, so its watchdogs do not take the pause for a hang,
    /// and holds its TSC (a guest clocked by the TSC would otherwise jump on resume).
    fn park(&mut self) -> Result<(), ExitReason> {
        self.fd.set_kvm_immediate_exit(1);
        let mut settled = false;
        for _ in 0..MAX_SETTLE_RUNS {
            if self.run_once()? == Ran::Interrupted {
                settled = true;
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        if !settled {
            log::warn!(
                "vCPU {}: paused with an access still in flight after {MAX_SETTLE_RUNS} runs",
                self.index
            );
        }
        match self.fd.kvmclock_ctrl() {
            Ok(()) => {}
            // The guest has not set up kvmclock (or this KVM lacks the ioctl).
            Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENOTTY => {}
            Err(e) => log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL failed: {e}", self.index),
        }
        self.hold_tsc();
        Ok(())
    }

    /// Keeps the guest TSC of this stopped vCPU, for [`Vcpu::release_tsc`].
    fn hold_tsc(&mut self) {
        match arch::tsc::read(&self.fd) {
            Ok(tsc) => self.held_tsc = Some(tsc),
            // The pause goes on; the guest will see its length in its TSC.
            Err(e) => log::warn!("vCPU {}: {}", self.index, crate::error_chain(&e)),
        }
    }

    /// Before running again after a pause: the guest TSC goes on from where it parked.
    fn release_tsc(&mut self) {
        if let Some(tsc) = self.held_tsc.take() {
            if let Err(e) = arch::tsc::write(&self.fd, tsc) {
                log::warn!("vCPU {}: {}", self.index, crate::error_chain(&e));
            }
        }
    }

    /// One KVM_RUN and the handling of its exit. `Err` carries why the VM must stop.
    fn run_once(&mut self) -> Result<Ran, ExitReason> {
        let index = self.index;
        let exit = KvmExit::from_run(self.fd.run());
        let action = classify(index, &exit, self.compat.as_deref());
        crate::metrics::METRICS.vcpu.record_exit(&exit, &action);
        // A hook's port write needs the vCPU, which `exit` borrows: copy the bytes out.
        let mut hook_write = None;
        let action = match (action, exit) {
            (VcpuAction::IoBus, KvmExit::PortIn { port, data }) => {
                if !self.io_bus.read(u64::from(port), data) {
                    crate::metrics::METRICS.vcpu.unclaimed_io.inc();
                    log::trace!("vCPU {index}: unclaimed port read {port:#x}");
                    data.fill(0xff);
                }
                VcpuAction::Resume
            }
            (VcpuAction::IoBus, KvmExit::PortOut { port, data }) => {
                if !self.io_bus.write(u64::from(port), data) {
                    crate::metrics::METRICS.vcpu.unclaimed_io.inc();
                    log::trace!("vCPU {index}: unclaimed port write {port:#x} {data:x?}");
                }
                VcpuAction::Resume
            }
            (VcpuAction::MmioBus, KvmExit::MmioRead { addr, data }) => {
                if !self.mmio_bus.read(addr, data) {
                    crate::metrics::METRICS.vcpu.unclaimed_mmio.inc();
                    log::debug!("vCPU {index}: unclaimed MMIO read {addr:#x}");
                    data.fill(0xff);
                }
                VcpuAction::Resume
            }
            (VcpuAction::MmioBus, KvmExit::MmioWrite { addr, data }) => {
                if !self.mmio_bus.write(addr, data) {
                    crate::metrics::METRICS.vcpu.unclaimed_mmio.inc();
                    log::debug!("vCPU {index}: unclaimed MMIO write {addr:#x} {data:x?}");
                }
                VcpuAction::Resume
            }
            (VcpuAction::CompatPort, KvmExit::PortIn { port, data }) => {
                if let Some(hook) = self.compat.as_mut() {
                    hook.port_read(port, data);
                }
                VcpuAction::Resume
            }
            (VcpuAction::CompatPort, KvmExit::PortOut { port, data }) => {
                // `classify` offers a hook no access longer than the buffer.
                let mut bytes = [0u8; MAX_HOOK_PORT_ACCESS];
                let len = data.len().min(MAX_HOOK_PORT_ACCESS);
                bytes[..len].copy_from_slice(&data[..len]);
                hook_write = Some((port, bytes, len));
                VcpuAction::Resume
            }
            (action, _) => action,
        };

        let ran = match action {
            VcpuAction::Resume => Ran::Exit,
            VcpuAction::Interrupted => {
                self.fd.set_kvm_immediate_exit(0);
                Ran::Interrupted
            }
            VcpuAction::CompatDebug { pc } => {
                let completion = match self.compat.as_mut() {
                    Some(hook) => hook.debug_exit(&self.fd, &self.mem, pc),
                    None => Completion::NotHandled(format!("unexpected debug exit at {pc:#x}")),
                };
                if let Completion::NotHandled(detail) = completion {
                    return Err(ExitReason::VcpuFailure {
                        vcpu: index,
                        detail,
                    });
                }
                Ran::Exit
            }
            VcpuAction::CompatEmulation | VcpuAction::EmulationFailure => {
                self.on_internal_error()?;
                Ran::Exit
            }
            VcpuAction::TripleFault => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(ExitReason::TripleFault { vcpu: index, rip });
            }
            VcpuAction::Stop(reason) => return Err(reason),
            // Bus and port actions were carried out above while the exit's data was at hand.
            VcpuAction::IoBus | VcpuAction::MmioBus | VcpuAction::CompatPort => Ran::Exit,
        };

        if let Some(hook) = self.compat.as_mut() {
            if let Some((port, bytes, len)) = hook_write {
                hook.port_write(&self.fd, &self.mem, port, &bytes[..len]);
            }
            hook.after_exit(&self.fd, &self.mem);
        }
        Ok(ran)
    }

    /// KVM_EXIT_INTERNAL_ERROR: the hook may complete the instruction; otherwise the VM
    /// stops, with the instruction's place in the reason.
    fn on_internal_error(&mut self) -> Result<(), ExitReason> {
        let index = self.index;
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member the kernel filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        let fetched = exit::fetched_instruction(internal.suberror, data);
        let detail = match self.compat.as_mut() {
            Some(hook) => match hook.emulation_failure(&self.fd, &self.mem, fetched.as_deref()) {
                Completion::Completed => return Ok(()),
                Completion::NotHandled(detail) => detail,
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

/// A running vCPU thread and its event channel.
pub struct VcpuHandle {
    index: u8,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Queues `event` and kicks the thread so it sees it now.
    pub fn send_event(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Stopped { index: self.index })?;
        self.kick();
        Ok(())
    }

    /// Waits until `deadline` for the thread's answer to `event`; answers to earlier
    /// events are skipped.
    pub fn wait_for(&self, event: &VcpuEvent, deadline: Instant) -> Result<(), VcpuError> {
        match event {
            VcpuEvent::Finish => {
                if self.wait_stopped(deadline) {
                    Ok(())
                } else {
                    Err(self.no_answer(event))
                }
            }
            _ => self.answer(event, deadline).map(drop),
        }
    }

    /// Asks a paused vCPU for its state, saving the MSRs in `msrs`.
    pub fn save_state(&self, msrs: MsrIndex, deadline: Instant) -> Result<VcpuState, VcpuError> {
        let event = VcpuEvent::SaveState(msrs);
        self.send_event(event.clone())?;
        match self.answer(&event, deadline)? {
            Some(state) => Ok(*state),
            None => Err(self.no_answer(&event)),
        }
    }

    /// The answer to `event` (a state for `SaveState`), skipping older answers.
    fn answer(
        &self,
        event: &VcpuEvent,
        deadline: Instant,
    ) -> Result<Option<Box<VcpuState>>, VcpuError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let response = match self.responses.recv_timeout(left) {
                Ok(response) => response,
                Err(RecvTimeoutError::Timeout) => return Err(self.no_answer(event)),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VcpuError::Stopped { index: self.index })
                }
            };
            match (event, response) {
                (VcpuEvent::Pause, VcpuResponse::Paused)
                | (VcpuEvent::Resume, VcpuResponse::Resumed) => return Ok(None),
                (VcpuEvent::SaveState(_), VcpuResponse::State(state)) => return Ok(Some(state)),
                (VcpuEvent::SaveState(_), VcpuResponse::Refused(reason)) => {
                    return Err(VcpuError::Refused {
                        index: self.index,
                        event: event.name(),
                        reason,
                    })
                }
                _ => {}
            }
        }
    }

    fn no_answer(&self, event: &VcpuEvent) -> VcpuError {
        VcpuError::NoAnswer {
            index: self.index,
            event: event.name(),
        }
    }

    /// Waits until `deadline` for the thread to end; whether it did.
    fn wait_stopped(&self, deadline: Instant) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => return self.thread.is_finished(),
            }
        }
    }

    /// Interrupts KVM_RUN: the thread reads its events (and the compat hook polls).
    pub fn kick(&self) {
        if let Err(e) = self.thread.kill(kick_signal()) {
            log::debug!("vCPU {}: kick failed: {e}", self.index);
        }
    }

    /// Joins the thread once it has ended, waiting no later than `deadline`.
    pub fn join(self, deadline: Instant) {
        if !self.wait_stopped(deadline) {
            log::error!("vCPU {} did not stop; leaving it behind", self.index);
            return;
        }
        if self.thread.join().is_err() {
            log::error!("vCPU {} thread panicked", self.index);
        }
    }
}
