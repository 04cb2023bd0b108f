//! The running VM: starts the vCPU threads, runs the event loop on the calling thread
//! (console input, terminating signals, exit requests, the periodic metrics flush, and a
//! [`ControlHook`] for whoever drives the VM: pause, resume), and tears everything down in order: stop and join every
//! vCPU, restore the terminal, then close the VM.

pub mod control;
pub mod persist;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::kvm_clock_data;

use crate::api::controller::RuntimeController;
use crate::config::CpuProfile;
use crate::console::{ConsoleInput, InputSource};
use crate::device_manager::{DeviceManagerError, EventLoop, MmioDeviceManager};
use crate::devices::control::Control;
use crate::devices::legacy::cmos::Cmos;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{InputSpace, SerialDevice};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::Net;
use crate::devices::vmgenid::VmGenId;
use crate::exit::{ExitReason, ExitSignal};
use crate::metrics::PeriodicFlush;
use crate::terminal::RawTerminal;
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{
    install_kick_handler, MsrIndex, Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuState,
};
use crate::vstate::vm::{Vm, VmError, VmState};

pub use control::{control_channel, ControlChannel, ControlError, VmmController};

/// Signals that end the VM in an orderly way.
const TERMINATING_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// How often vCPUs are kicked so the compat layer can arm its SYSCALL trap even in a guest
/// that makes few exits.
const COMPAT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long teardown waits for vCPU threads before giving up on joining them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a pause or resume waits for every vCPU to answer. A vCPU answers as soon as
/// its KVM_RUN returns, which a kick makes immediate; this only bounds a vCPU stuck in a
/// device (a console write to a stalled terminal).
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("cannot create the event loop")]
    EventManager(#[source] event_manager::Error),
    #[error("event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("the VM is {0:?}; it must be {1:?}")]
    State(RunState, RunState),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error("cannot take the snapshot")]
    Snapshot(#[source] crate::snapshot::SnapshotError),
}

/// Devices the VMM reaches after the build: the API changes some while the VM runs, and a
/// snapshot saves them.
#[derive(Clone)]
pub struct RuntimeDevices {
    /// Where `SendCtrlAltDel` types.
    pub i8042: Arc<Mutex<I8042>>,
    /// The virtio-blk devices, in the order of `VmConfig::disks`.
    pub disks: Vec<Arc<Mutex<Block>>>,
    /// The virtio-net devices, in the order of `VmConfig::nets`.
    pub nets: Vec<Arc<Mutex<Net>>>,
    /// The balloon, which `PATCH /balloon` inflates and `GET /balloon/statistics` reads.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    pub cmos: Arc<Mutex<Cmos>>,
    /// Where the guest finds the VM generation ID, for snapshots.
    pub vmgenid: VmGenId,
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Built; its vCPUs have not started.
    Created,
    /// vCPUs running.
    Running,
    /// Every vCPU parked and the guest clock saved; [`Vmm::resume`] goes on.
    Paused,
}

/// The serial console's pieces the event loop needs.
pub struct ConsoleSetup {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub space: Arc<InputSpace>,
    pub input: Option<InputSource>,
    pub socket_path: Option<PathBuf>,
}

/// Drives a running VM from the event-loop thread: the API server, or an embedding
/// program through [`control_channel`]. [`Vmm::run_with`] calls it there, with the
/// `Vmm` in hand.
pub trait ControlHook {
    /// Once, after the vCPUs started and before the first event-loop wait: the place to
    /// add subscribers (an API socket) with [`Vmm::event_loop`].
    fn start(&mut self, vmm: &mut Vmm) {
        let _ = vmm;
    }

    /// After every event-loop wake-up (events dispatched, or the loop's timeout): carry out
    /// what was asked for meanwhile, e.g. [`Vmm::pause`] and [`Vmm::resume`].
    fn after_events(&mut self, vmm: &mut Vmm);
}

/// The hook of a VM nobody drives.
struct NoControl;

impl ControlHook for NoControl {
    fn after_events(&mut self, _: &mut Vmm) {}
}

pub struct Vmm {
    // Kept alive for the VM's lifetime: the VM fd needs the KVM fd, the vCPUs the VM fd and
    // guest memory. Fields drop in order: the VM closes before its memory is unmapped.
    vm: Vm,
    mem: GuestMemory,
    kvm: KvmContext,
    /// Built vCPUs, until they start.
    vcpus: Vec<Vcpu>,
    /// Their threads, once started.
    handles: Vec<VcpuHandle>,
    exit: Arc<ExitSignal>,
    event_loop: EventLoop,
    console: ConsoleSetup,
    control: Arc<Control>,
    profile: CpuProfile,
    /// The virtio devices: paused with the vCPUs, saved in snapshots.
    mmio_devices: MmioDeviceManager,
    devices: RuntimeDevices,
    /// The API's runtime side, when the VM has an API socket.
    api: Option<RuntimeController>,
    state: RunState,
    /// The guest's kvmclock when it was paused.
    paused_clock: Option<kvm_clock_data>,
    /// What a vCPU's saved state includes, read from KVM on the first save.
    msr_index: Option<MsrIndex>,
    /// Start the vCPUs parked and the devices paused (a VM restored from a snapshot and
    /// not resumed yet).
    start_paused: bool,
    /// How often running vCPUs are kicked for the RIP sampler, when it is on.
    sample_interval: Option<Duration>,
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kvm: KvmContext,
        vm: Vm,
        mem: GuestMemory,
        vcpus: Vec<Vcpu>,
        exit: Arc<ExitSignal>,
        event_loop: EventLoop,
        console: ConsoleSetup,
        control: Arc<Control>,
        profile: CpuProfile,
        mmio_devices: MmioDeviceManager,
        devices: RuntimeDevices,
    ) -> Self {
        Self {
            vm,
            mem,
            kvm,
            vcpus,
            handles: Vec::new(),
            exit,
            event_loop,
            console,
            control,
            profile,
            mmio_devices,
            devices,
            api: None,
            state: RunState::Created,
            paused_clock: None,
            msr_index: None,
            start_paused: false,
            sample_interval: None,
        }
    }

    /// Kicks the running vCPUs every `interval` for their RIP samplers (see
    /// `diag::sampler`), in either CPU profile; the compat layer's poll is never slowed.
    pub fn kick_every(&mut self, interval: Duration) {
        self.sample_interval = Some(interval);
    }

    /// Makes the VM start paused, as if paused with the guest's kvmclock at `clock`:
    /// [`Vmm::resume`] then sets the clock and lets it run. For a VM restored from a
    /// snapshot that is not to run yet.
    pub fn start_paused(&mut self, clock: kvm_clock_data) {
        self.start_paused = true;
        self.paused_clock = Some(clock);
    }

    /// Devices the API changes at run time.
    pub fn devices(&self) -> &RuntimeDevices {
        &self.devices
    }

    /// Serve the API's runtime requests from the event loop while the VM runs (the
    /// controller is the run's [`ControlHook`]).
    pub fn serve_api(&mut self, api: RuntimeController) {
        self.api = Some(api);
    }

    /// Runs the guest until something ends it; returns why.
    pub fn run(mut self) -> Result<ExitReason, VmmError> {
        match self.api.take() {
            Some(mut api) => self.run_with(&mut api),
            None => self.run_with(&mut NoControl),
        }
    }

    /// Like [`Vmm::run`], with `control` called on the event-loop thread (see
    /// [`ControlHook`]).
    pub fn run_with(mut self, control: &mut dyn ControlHook) -> Result<ExitReason, VmmError> {
        // Terminating signals are blocked in every thread (vCPU threads inherit the mask)
        // and read from a signalfd by the event loop, so teardown always runs.
        let signals = SignalWatcher::new(self.exit.clone()).map_err(VmmError::Signals)?;
        install_kick_handler()?;
        self.event_loop
            .add_subscriber(Box::new(ExitWatcher(self.exit.clone())));
        self.event_loop.add_subscriber(Box::new(signals));
        match PeriodicFlush::new() {
            Ok(flusher) => {
                self.event_loop.add_subscriber(Box::new(flusher));
            }
            Err(e) => log::warn!("no periodic metrics flush: cannot create its timer: {e}"),
        }

        let raw_terminal = match self.console.input {
            Some(InputSource::Stdin { interactive: true }) => {
                RawTerminal::enable(libc::STDIN_FILENO)
            }
            _ => None,
        };
        if let Some(input) = self.console.input.take() {
            self.event_loop.add_subscriber(Box::new(ConsoleInput::new(
                self.console.serial.clone(),
                self.console.space.clone(),
                input,
                self.exit.clone(),
            )));
        }

        // The VM is built and no guest instruction has run: from here on this thread
        // only serves the VM (the vCPU threads filter themselves as they start).
        let mut result = crate::seccomp::install(crate::seccomp::ThreadKind::Vmm)
            .map_err(VmmError::from)
            .and_then(|()| self.start_vcpus());
        if result.is_ok() {
            control.start(&mut self);
            result = self.dispatch_until_exit(control);
        }

        // Whatever happened, stop the vCPUs before leaving.
        if !self.exit.is_requested() {
            self.exit.request(ExitReason::VcpuFailure {
                vcpu: 0,
                detail: "VMM stopped".into(),
            });
        }
        self.stop_vcpus();
        // The last counts, vCPU exits included, as Firecracker writes them at exit.
        crate::metrics::flush_and_log();
        drop(raw_terminal);
        if let Some(path) = &self.console.socket_path {
            let _ = std::fs::remove_file(path);
        }
        result?;
        if let Some(boot) = self.control.boot_time() {
            log::debug!("boot complete was signalled after {boot:?}");
        }
        Ok(self
            .exit
            .reason()
            .expect("an exit reason is always set before teardown"))
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// The event loop, to add subscribers to (see [`ControlHook::start`]).
    pub fn event_loop(&mut self) -> &mut EventLoop {
        &mut self.event_loop
    }

    /// The VM's stop channel: [`ExitSignal::request`] ends the run.
    pub fn exit_signal(&self) -> &Arc<ExitSignal> {
        &self.exit
    }

    /// Pauses a running VM: returns once every vCPU is out of KVM_RUN and parked, with the
    /// guest's kvmclock saved and each vCPU's TSC held (so the guest does not see the pause
    /// as a clock jump), and each vCPU's kvmclock told it was stopped. The serial console
    /// keeps working. On an error the VM is left running.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        self.expect_state(RunState::Running)?;
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        let parked = self.park_vcpus(deadline);
        // vCPUs first: a parked vCPU can no longer reset or start a device. Then no queue
        // is processed while the VM is paused (the serial console stays live).
        let paused = parked
            .and_then(|()| Ok(self.vm.save_clock()?))
            .and_then(|clock| {
                self.mmio_devices.pause_all(&mut self.event_loop)?;
                Ok(clock)
            });
        match paused {
            Ok(clock) => {
                self.paused_clock = Some(clock);
                self.state = RunState::Paused;
                log::info!("VM paused");
                Ok(())
            }
            Err(e) => {
                // Put back any vCPU that did park.
                self.release_vcpus();
                Err(e)
            }
        }
    }

    /// Asks every vCPU to pause, then waits until each has parked.
    fn park_vcpus(&self, deadline: Instant) -> Result<(), VmmError> {
        for handle in &self.handles {
            handle.send_event(VcpuEvent::Pause)?;
        }
        for handle in &self.handles {
            handle.wait_for(&VcpuEvent::Pause, deadline)?;
        }
        Ok(())
    }

    /// Resumes a paused VM: the guest's kvmclock goes on from where it was paused, then
    /// every vCPU runs again, its TSC too going on from where it parked. Returns once every vCPU has answered.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        self.expect_state(RunState::Paused)?;
        // Devices first, before any vCPU can notify them.
        self.mmio_devices.resume_all(&mut self.event_loop)?;
        if let Some(clock) = self.paused_clock.take() {
            if let Err(e) = self.vm.restore_clock(&clock) {
                self.paused_clock = Some(clock);
                return Err(e.into());
            }
        }
        self.state = RunState::Running;
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        for handle in &self.handles {
            handle.send_event(VcpuEvent::Resume)?;
        }
        for handle in &self.handles {
            handle.wait_for(&VcpuEvent::Resume, deadline)?;
        }
        log::info!("VM resumed");
        Ok(())
    }

    /// The state of every vCPU of a paused VM, in index order.
    pub fn save_vcpu_states(&mut self) -> Result<Vec<VcpuState>, VmmError> {
        self.expect_state(RunState::Paused)?;
        let msrs = match &self.msr_index {
            Some(msrs) => msrs.clone(),
            None => {
                let msrs: MsrIndex = self.kvm.msr_index_list()?.into();
                self.msr_index.insert(msrs).clone()
            }
        };
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        self.handles
            .iter()
            .map(|h| h.save_state(msrs.clone(), deadline).map_err(VmmError::from))
            .collect()
    }

    /// The VM's own state (interrupt controllers, PIT, the clock as it was paused).
    pub fn save_vm_state(&self) -> Result<VmState, VmmError> {
        self.expect_state(RunState::Paused)?;
        let clock = self.paused_clock.expect("a paused VM has its clock saved");
        Ok(self.vm.save_state(clock)?)
    }

    fn expect_state(&self, wanted: RunState) -> Result<(), VmmError> {
        match self.state {
            state if state != wanted => Err(VmmError::State(state, wanted)),
            _ => Ok(()),
        }
    }

    /// After a failed pause: every vCPU runs again (those that never parked answer both).
    fn release_vcpus(&mut self) {
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        for handle in &self.handles {
            if handle.send_event(VcpuEvent::Resume).is_ok() {
                if let Err(e) = handle.wait_for(&VcpuEvent::Resume, deadline) {
                    log::warn!("{}", crate::error_chain(&e));
                }
            }
        }
    }

    fn start_vcpus(&mut self) -> Result<(), VmmError> {
        if self.start_paused {
            self.mmio_devices.pause_all(&mut self.event_loop)?;
        }
        for vcpu in std::mem::take(&mut self.vcpus) {
            let handle = if self.start_paused {
                vcpu.start_paused()?
            } else {
                vcpu.start()?
            };
            self.handles.push(handle);
        }
        self.state = if self.start_paused {
            log::info!("VM paused");
            RunState::Paused
        } else {
            RunState::Running
        };
        Ok(())
    }

    /// Dispatches events until an exit is requested. Running vCPUs are kicked
    /// periodically, parked ones left alone: in the compat profile so the PVM layer can arm
    /// its SYSCALL trap in quiet guests, and for the RIP sampler when it is on.
    fn dispatch_until_exit(&mut self, control: &mut dyn ControlHook) -> Result<(), VmmError> {
        let compat = (self.profile == CpuProfile::Compat).then_some(COMPAT_POLL_INTERVAL);
        let kick_interval = match (self.sample_interval, compat) {
            (Some(sample), Some(poll)) => Some(sample.min(poll)),
            (sample, poll) => sample.or(poll),
        };
        let mut last_kick = Instant::now();
        while !self.exit.is_requested() {
            // Until the next kick is due, so an early wake-up does not push it back.
            let timeout_ms = kick_interval.map_or(-1, |interval| {
                let left = interval.saturating_sub(last_kick.elapsed());
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            });
            self.event_loop
                .run_with_timeout(timeout_ms)
                .map_err(VmmError::EventLoop)?;
            control.after_events(self);
            if let Some(interval) = kick_interval {
                if last_kick.elapsed() >= interval {
                    last_kick = Instant::now();
                    if self.state == RunState::Running {
                        self.handles.iter().for_each(VcpuHandle::kick);
                    }
                }
            }
        }
        Ok(())
    }

    /// Tells every vCPU to finish (one kick each: `immediate_exit` makes it certain) and
    /// joins them.
    fn stop_vcpus(&mut self) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let handles = std::mem::take(&mut self.handles);
        for handle in &handles {
            // One that already ended (it asked for the stop) needs nothing.
            let _ = handle.send_event(VcpuEvent::Finish);
        }
        for handle in handles {
            handle.join(deadline);
        }
    }
}

/// Wakes the event loop when any thread requests an exit.
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
}

/// Turns SIGINT, SIGTERM and SIGHUP into exit requests.
struct SignalWatcher {
    fd: OwnedFd,
    exit: Arc<ExitSignal>,
}

impl SignalWatcher {
    fn new(exit: Arc<ExitSignal>) -> std::io::Result<Self> {
        Ok(Self {
            fd: terminating_signalfd()?,
            exit,
        })
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and so in threads it starts
/// afterwards) and returns a signalfd that reads them. Call it before starting threads
/// that must not take those signals.
pub fn terminating_signalfd() -> std::io::Result<OwnedFd> {
    let set = block_terminating_signals()?;
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread; returns that set.
pub fn block_terminating_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for signo in TERMINATING_SIGNALS {
        // SAFETY: as above; `signo` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, signo) };
    }
    // SAFETY: `set` is initialised; the old mask is not needed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(ret));
    }
    Ok(set)
}

/// The number of the signal waiting on a signalfd from [`terminating_signalfd`], if any.
pub fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data; read fills it or fails.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading at most `size` bytes into `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n as usize == size).then_some(info.ssi_signo as i32)
}

impl MutEventSubscriber for SignalWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch the signalfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(signo) = read_signal(&self.fd) {
            log::info!("received signal {signo}");
            self.exit.request(ExitReason::Signal(signo));
        }
    }
}
