//! The running VM: starts the vCPU threads, runs the event loop on the calling thread
//! (console input, terminating signals, exit requests), and tears everything down in order:
//! stop and join every vCPU, then restore the terminal.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::api::controller::RuntimeController;
use crate::config::CpuProfile;
use crate::console::{ConsoleInput, InputSource};
use crate::device_manager::EventLoop;
use crate::devices::control::Control;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{InputSpace, SerialDevice};
use crate::devices::virtio::block::Block;
use crate::exit::{ExitReason, ExitSignal};
use crate::terminal::RawTerminal;
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{install_kick_handler, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vm::Vm;

/// Signals that end the VM in an orderly way.
const TERMINATING_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// How often vCPUs are kicked so the compat layer can arm its SYSCALL trap even in a guest
/// that makes few exits.
const COMPAT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long teardown waits for vCPU threads before giving up on joining them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error("cannot create the event loop")]
    EventManager(#[source] event_manager::Error),
    #[error("event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("pause is not supported by this build yet")]
    PauseUnsupported,
}

/// Devices the API changes while the VM runs.
#[derive(Clone)]
pub struct RuntimeDevices {
    /// Where `SendCtrlAltDel` types.
    pub i8042: Arc<Mutex<I8042>>,
    /// The virtio-blk devices, in the order of `VmConfig::disks`.
    pub disks: Vec<Arc<Mutex<Block>>>,
}

/// Whether the guest's vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// The running VM as the API's runtime requests reach it, between two rounds of the
/// event loop.
pub struct RunningVm<'a> {
    pub handles: &'a [VcpuHandle],
    pub exit: &'a ExitSignal,
}

impl RunningVm<'_> {
    /// `PATCH /vm`: pause or resume every vCPU. Pausing is being built on another
    /// branch; until it lands, this is refused (and the VM keeps running).
    pub fn set_state(&mut self, state: RunState) -> Result<(), VmmError> {
        log::debug!("asked to set the VM {state:?}");
        Err(VmmError::PauseUnsupported)
    }
}

/// The serial console's pieces the event loop needs.
pub struct ConsoleSetup {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub space: Arc<InputSpace>,
    pub input: Option<InputSource>,
    pub socket_path: Option<PathBuf>,
}

pub struct Vmm {
    // Kept alive for the VM's lifetime: the VM fd needs the KVM fd, the vCPUs the VM fd and
    // guest memory.
    _kvm: KvmContext,
    _vm: Vm,
    _mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitSignal>,
    event_loop: EventLoop,
    console: ConsoleSetup,
    control: Arc<Control>,
    profile: CpuProfile,
    devices: RuntimeDevices,
    api: Option<RuntimeController>,
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
        devices: RuntimeDevices,
    ) -> Self {
        Self {
            _kvm: kvm,
            _vm: vm,
            _mem: mem,
            vcpus,
            exit,
            event_loop,
            console,
            control,
            profile,
            devices,
            api: None,
        }
    }

    /// Devices the API changes at run time.
    pub fn devices(&self) -> &RuntimeDevices {
        &self.devices
    }

    /// Serve the API's runtime requests from the event loop while the VM runs.
    pub fn serve_api(&mut self, api: RuntimeController) {
        self.api = Some(api);
    }

    /// Runs the guest until something ends it; returns why.
    pub fn run(self) -> Result<ExitReason, VmmError> {
        let Vmm {
            _kvm,
            _vm,
            _mem,
            vcpus,
            exit,
            event_loop: mut manager,
            console,
            control,
            profile,
            devices: _,
            mut api,
        } = self;
        // Terminating signals are blocked in every thread (vCPU threads inherit the mask)
        // and read from a signalfd by the event loop, so teardown always runs.
        let signals = SignalWatcher::new(exit.clone()).map_err(VmmError::Signals)?;
        install_kick_handler()?;
        manager.add_subscriber(Box::new(ExitWatcher(exit.clone())));
        manager.add_subscriber(Box::new(signals));
        if let Some(api) = &api {
            manager.add_subscriber(Box::new(api.waker().map_err(VmmError::Signals)?));
        }

        let raw_terminal = match console.input {
            Some(InputSource::Stdin { interactive: true }) => {
                RawTerminal::enable(libc::STDIN_FILENO)
            }
            _ => None,
        };
        if let Some(input) = console.input {
            manager.add_subscriber(Box::new(ConsoleInput::new(
                console.serial.clone(),
                console.space.clone(),
                input,
                exit.clone(),
            )));
        }

        let mut handles = Vec::with_capacity(vcpus.len());
        let mut result = Ok(());
        for vcpu in vcpus {
            match vcpu.start() {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        if result.is_ok() {
            result = run_event_loop(&mut manager, &handles, &exit, profile, api.as_mut());
        }

        // Whatever happened, stop the vCPUs before leaving.
        if !exit.is_requested() {
            exit.request(ExitReason::VcpuFailure {
                vcpu: 0,
                detail: "VMM stopped".into(),
            });
        }
        stop_vcpus(handles);
        drop(raw_terminal);
        if let Some(path) = &console.socket_path {
            let _ = std::fs::remove_file(path);
        }
        result?;
        if let Some(boot) = control.boot_time() {
            log::debug!("boot complete was signalled after {boot:?}");
        }
        Ok(exit
            .reason()
            .expect("an exit reason is always set before teardown"))
    }
}

/// Dispatches events until an exit is requested, serving API requests between events. In
/// the compat profile the vCPUs are kicked periodically so the PVM layer can arm its
/// SYSCALL trap in quiet guests.
fn run_event_loop(
    manager: &mut EventLoop,
    handles: &[VcpuHandle],
    exit: &ExitSignal,
    profile: CpuProfile,
    mut api: Option<&mut RuntimeController>,
) -> Result<(), VmmError> {
    let compat = profile == CpuProfile::Compat;
    let timeout_ms = if compat {
        COMPAT_POLL_INTERVAL.as_millis() as i32
    } else {
        -1
    };
    let mut last_poll = Instant::now();
    while !exit.is_requested() {
        if let Some(api) = api.as_deref_mut() {
            api.serve(&mut RunningVm { handles, exit });
        }
        manager
            .run_with_timeout(timeout_ms)
            .map_err(VmmError::EventLoop)?;
        if compat && last_poll.elapsed() >= COMPAT_POLL_INTERVAL {
            last_poll = Instant::now();
            handles.iter().for_each(VcpuHandle::kick);
        }
    }
    Ok(())
}

/// Kicks every vCPU until its thread has seen the stop request, then joins it.
fn stop_vcpus(handles: Vec<VcpuHandle>) {
    let deadline = Instant::now() + STOP_TIMEOUT;
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        handles
            .iter()
            .filter(|h| !h.is_finished())
            .for_each(VcpuHandle::kick);
        std::thread::sleep(Duration::from_millis(1));
    }
    for handle in handles {
        if handle.is_finished() {
            handle.join();
        } else {
            log::error!("a vCPU thread did not stop; leaving it behind");
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
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
