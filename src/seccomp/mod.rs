//! seccomp filters, one per kind of thread the VMM process runs, and every allow-list
//! they are built from.
//!
//! A guest that takes over a device emulation or a vCPU exit handler holds a thread of
//! this process: these lists decide what it can ask the host kernel for. Each thread
//! kind gets the syscalls its own work needs and nothing else; where a syscall would
//! open far more than that work (ioctl, socket, mmap/mprotect, signals), its arguments
//! are checked too. Anything else traps: the process dies of SIGSYS after one line on
//! stderr naming the thread kind and the syscall number (see [`trap`]).
//!
//! Filters are built with rust-vmm's `seccompiler` from the rules below and installed
//! per thread (`seccomp(2)` without TSYNC), each by the thread itself before it does
//! anything the guest can influence:
//!
//! - `vmm` (the main thread: event loop, devices' queues, the API's actions): in
//!   [`crate::vmm::Vmm::run_with`], after the VM is built and before its vCPUs start;
//! - `vcpu` (`vcpuN`): on its thread, after it receives its vCPU, before the first
//!   KVM_RUN;
//! - `api` (the HTTP server): at its start, before it accepts a connection;
//! - `vm-setup` (PIT and memory slots, done before any vCPU runs): at its start;
//! - `driver` (`hearth restore`'s in-process client): at its start.
//!
//! Every other thread is created by the main thread before it filters itself (a filter
//! is inherited by the threads its thread creates), so no thread runs two filters and
//! the main thread's list needs no `clone`.
//!
//! Filtering is off unless the command that runs a VMM asks for it ([`enable`]): the
//! hearth binary does, for `hearth run`, `hearth restore` and the Firecracker-shaped API
//! mode, unless given `--no-seccomp`; tests and benches that drive a `Vmm` inside their
//! own process stay unfiltered.

mod ioctls;
mod trap;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use ioctls::*;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {0} thread")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of the {0} thread")]
    Apply(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    #[error(
        "this kernel cannot trap syscalls with seccomp filters (--no-seccomp runs without them)"
    )]
    Unsupported(#[source] std::io::Error),
}

/// The kinds of thread a VMM process runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM is built: the event loop and everything it serves.
    Vmm,
    /// A vCPU thread (`vcpuN`).
    Vcpu,
    /// The API socket's HTTP server (`api`).
    Api,
    /// The thread that creates the PIT and the memory slots (`vm-setup`).
    VmSetup,
    /// `hearth restore`'s client of the in-process API (`driver`).
    Driver,
    /// The container front end's reader of its agent's messages (`relay`): the one
    /// thread outside the VMM that parses what a guest sends, and writes the container's
    /// output to the front end's stdout and stderr.
    Relay,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::VmSetup,
        ThreadKind::Driver,
        ThreadKind::Relay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::VmSetup => "vm-setup",
            ThreadKind::Driver => "driver",
            ThreadKind::Relay => "relay",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread runs under a filter (installed by itself or inherited at its start).
    static FILTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread installed a filter: code that runs on any thread (a
/// destructor) asks before a syscall that only unfiltered threads may make.
pub fn thread_is_filtered() -> bool {
    FILTERED.with(std::cell::Cell::get)
}

/// Makes [`install`] filter the threads of this process from now on. Called once by the
/// commands that run a VMM, before they start any thread. Fails, before any thread
/// depends on it, where the kernel has no seccomp filters or cannot trap.
pub fn enable() -> Result<(), SeccompError> {
    let trap: u32 = libc::SECCOMP_RET_TRAP;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 action through the pointer.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &trap as *const u32,
        )
    };
    if ret != 0 {
        return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
    }
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether [`install`] filters.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Installs `kind`'s filter on the calling thread when filtering is enabled; otherwise
/// does nothing.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    install_now(kind)
}

/// [`install`] for a thread that has no one to report a failure to: it ends the process
/// (status 1) with the reason on stderr, as a VMM must not serve unfiltered when filters
/// were asked for. [`enable`] has checked that the kernel can filter, so this is not
/// expected to happen.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("hearth: {}", crate::error_chain(&e));
        std::process::exit(1);
    }
}

/// Installs `kind`'s filter on the calling thread, for good, whether or not [`enable`]
/// was called: for a thread that exists only to do that filtered work (the front end's
/// [`ThreadKind::Relay`]), in a process that runs no VMM.
pub fn install_now(kind: ThreadKind) -> Result<(), SeccompError> {
    let program = compile(kind, std::process::id())?;
    trap::install_handler().map_err(SeccompError::Handler)?;
    trap::set_thread_kind(kind.name());
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Apply(kind.name(), e))?;
    FILTERED.with(|filtered| filtered.set(true));
    log::debug!("seccomp: {} thread filtered", kind.name());
    Ok(())
}

/// The BPF program of `kind` for the process `pid` (signals may only go to its own
/// threads).
pub fn compile(kind: ThreadKind, pid: u32) -> Result<BpfProgram, SeccompError> {
    let rules = rules(kind, pid).map_err(|e| SeccompError::Build(kind.name(), e))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind.name(), e))?;
    filter
        .try_into()
        .map_err(|e| SeccompError::Build(kind.name(), e))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type BackendResult<T> = Result<T, seccompiler::BackendError>;

/// The allow-list of `kind`: syscall number → the argument patterns it is allowed with
/// (an empty list: any arguments).
pub fn rules(kind: ThreadKind, pid: u32) -> BackendResult<Rules> {
    let mut rules = Rules::new();
    runtime(&mut rules, pid)?;
    match kind {
        ThreadKind::Vmm => vmm(&mut rules)?,
        ThreadKind::Vcpu => vcpu(&mut rules)?,
        ThreadKind::Api => api(&mut rules)?,
        ThreadKind::VmSetup => vm_setup(&mut rules)?,
        ThreadKind::Driver => {}
        ThreadKind::Relay => relay(&mut rules),
    }
    Ok(rules)
}

/// What every thread needs from Rust's standard library and glibc (memory, locks,
/// channels, time, logging to stderr, thread exit) and from the SIGSYS handler.
fn runtime(rules: &mut Rules, pid: u32) -> BackendResult<()> {
    allow(
        rules,
        &[
            libc::SYS_brk,
            // glibc's malloc trims, a thread's exit frees its stack, the balloon drops guest
            // pages (MADV_DONTNEED, MADV_REMOVE on shared memory).
            libc::SYS_madvise,
            libc::SYS_munmap,
            libc::SYS_mremap, // realloc of large buffers
            libc::SYS_futex,  // std's Mutex, Condvar, mpsc and thread join
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime, // Instant::now where the vDSO cannot answer
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getrandom, // std's HashMap seeds, once per thread
            libc::SYS_write,     // log lines on stderr; eventfd wake-ups
            libc::SYS_close,
            libc::SYS_rt_sigprocmask, // raise(3) blocks signals around its tgkill
            libc::SYS_rt_sigreturn,   // returning from the vCPU kick and SIGSYS handlers
            libc::SYS_restart_syscall, // the kernel resumes a wait a signal interrupted
            libc::SYS_sigaltstack,    // a Rust thread removes its guard stack as it ends
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    // Memory is never made executable: guest memory, buffers and stacks are data.
    let no_exec = || cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
    rules.insert(libc::SYS_mmap, vec![SeccompRule::new(vec![no_exec()?])?]);
    rules.insert(
        libc::SYS_mprotect,
        vec![SeccompRule::new(vec![no_exec()?])?],
    );
    // Signals only to this process's own threads (vCPU kicks, raise(3) after a trap).
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::Eq,
            u64::from(pid),
        )?])?],
    );
    // Duplicating an eventfd or socket (`try_clone`) and descriptor flags.
    rules.insert(libc::SYS_fcntl, fcntl_rules(&[])?);
    // The SIGSYS handler resets SIGSYS to its default before it raises it again.
    rules.insert(
        libc::SYS_rt_sigaction,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::Eq,
            libc::SIGSYS as u64,
        )?])?],
    );
    Ok(())
}

/// The main thread once the VM runs: the event loop (eventfds, signalfd, the console,
/// virtio queues backed by files, taps and Unix sockets), the API's actions (pause,
/// resume, snapshots, drive swaps, Ctrl-Alt-Del) and the teardown.
fn vmm(rules: &mut Rules) -> BackendResult<()> {
    allow(
        rules,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl, // subscribers added at run time (API connections, vsock)
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_pread64, // virtio-blk; snapshots read /proc/self/pagemap
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_lseek,
            libc::SYS_fsync, // virtio-blk flush; snapshot files
            libc::SYS_fdatasync,
            libc::SYS_fallocate, // virtio-blk discard and write-zeroes
            libc::SYS_ftruncate, // snapshot files
            libc::SYS_rename,    // a snapshot file is written aside, then renamed into place
            libc::SYS_openat,    // snapshots, drive swaps (PATCH /drives), metrics files
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_unlink, // the API and console sockets, removed at exit
            libc::SYS_eventfd2,
            // vsock's host side: a guest connection to host port P connects to the
            // Unix socket `uds_path_P`; host clients connect to `uds_path`.
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            // virtio-net over a stream (passt): a frame and its length in one call,
            // without SIGPIPE when the peer has gone.
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_poll,
            // virtio-fs: the vhost-user back end gets the rings back and forth (pause,
            // resume); its messages carry eventfds (SCM_RIGHTS) (sendmsg: above).
            libc::SYS_recvmsg,
            // Rate limiters resume throttled queues from a timerfd in the event loop.
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
        ],
    );
    // A disk image swapped in through the API is locked (F_OFD_SETLK) as at boot.
    rules.insert(libc::SYS_fcntl, fcntl_rules(&[libc::F_OFD_SETLK])?);
    // Only Unix sockets: vsock's host side is the only socket made at run time.
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )?])?],
    );
    rules.insert(
        libc::SYS_ioctl,
        ioctl_rules(&[
            KVM_IRQ_LINE(), // one-shot interrupts (VM generation ID, Ctrl-Alt-Del)
            KVM_IRQFD(),
            KVM_IOEVENTFD(),
            KVM_GET_CLOCK(), // pause and snapshot keep the guest clock
            KVM_SET_CLOCK(), // resume puts it back
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
            KVM_GET_MSR_INDEX_LIST(), // the first snapshot asks which MSRs to save
            KVM_CHECK_EXTENSION(),
            TUNSETOFFLOAD, // a tap's offloads follow the guest's virtio-net features
            TCGETS,        // the console's terminal, put back in cooked mode at exit
            TCSETS,
            FIONBIO, // accepted sockets are made non-blocking
        ])?,
    );
    Ok(())
}

/// A vCPU thread: KVM_RUN and the vCPU-fd ioctls of its exit handling (the nested-PVM
/// compat layer's register and event fix-ups included), pause and state saving, and
/// the device registers it writes (console output, device activation).
fn vcpu(rules: &mut Rules) -> BackendResult<()> {
    allow(
        rules,
        &[
            libc::SYS_sendto, // console output to a `--serial unix=` client
            // virtio-fs activated or reset by a register write: vhost-user messages to
            // the back end, the memory table and eventfds among them (SCM_RIGHTS).
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
        ],
    );
    rules.insert(
        libc::SYS_ioctl,
        ioctl_rules(&[
            KVM_RUN(),
            KVM_GET_REGS(), // compat layer: instructions completed for the guest
            KVM_SET_REGS(),
            KVM_GET_SREGS(),
            KVM_SET_SREGS(),
            KVM_GET_VCPU_EVENTS(), // compat layer: int3 re-injected as #BP
            KVM_SET_VCPU_EVENTS(),
            KVM_SET_GUEST_DEBUG(), // compat layer: the SYSCALL breakpoint
            KVM_GET_MSRS(),        // held TSC on pause; state saving
            KVM_SET_MSRS(),        // the TSC written back on resume
            KVM_KVMCLOCK_CTRL(),   // a pause tells the guest it was stopped
            KVM_GET_XSAVE(),       // compat layer: the guest's paravirtual xstate; state saving
            KVM_SET_XSAVE(),
            KVM_GET_CPUID2(), // state saving, below
            KVM_GET_XCRS(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_TSC_KHZ(),
            TUNSETOFFLOAD, // virtio-net activated or reset by a register write
        ])?,
    );
    Ok(())
}

/// The API server: accepts connections on its (already bound) socket and passes each
/// request to the main thread through a channel and an eventfd.
fn api(rules: &mut Rules) -> BackendResult<()> {
    allow(
        rules,
        &[
            libc::SYS_poll,
            libc::SYS_accept4,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
        ],
    );
    rules.insert(libc::SYS_ioctl, ioctl_rules(&[FIONBIO])?);
    Ok(())
}

/// The front end's relay: reads the agent's frames from its connection (a Unix socket
/// to the VMM's vsock device) and writes the container's output with `write`.
fn relay(rules: &mut Rules) {
    allow(rules, &[libc::SYS_read, libc::SYS_recvfrom]);
}

/// The `vm-setup` thread: the in-kernel PIT and the guest memory slots.
fn vm_setup(rules: &mut Rules) -> BackendResult<()> {
    rules.insert(
        libc::SYS_ioctl,
        ioctl_rules(&[KVM_CREATE_PIT2(), KVM_SET_USER_MEMORY_REGION()])?,
    );
    Ok(())
}

/// fcntl only to read and set descriptor and file status flags, to duplicate with
/// close-on-exec (`try_clone`), and the `extra` commands: no leases, no owner changes,
/// no pipe resizing.
fn fcntl_rules(extra: &[libc::c_int]) -> BackendResult<Vec<SeccompRule>> {
    [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .map(|cmd| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, cmd as u64)?]))
    .collect()
}

/// ioctl with one of `requests` (the kernel reads the request as 32 bits).
fn ioctl_rules(requests: &[u64]) -> BackendResult<Vec<SeccompRule>> {
    requests
        .iter()
        .map(|&request| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, request)?]))
        .collect()
}

fn allow(rules: &mut Rules, syscalls: &[i64]) {
    for &syscall in syscalls {
        rules.insert(syscall, Vec::new());
    }
}

/// A condition on argument `arg` as the kernel reads it: the low 32 bits (flags,
/// requests, descriptors, families and pids are all `int`s or narrower).
fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> BackendResult<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}
