//! Each thread kind's filter, installed in a forked child: a syscall its list allows
//! passes, and a forbidden one kills the child with SIGSYS after the handler's line.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

use super::*;

/// What the child does once its filter is in place.
#[derive(Clone, Copy, Debug)]
enum Attempt {
    Execve,
    InetSocket,
    Ptrace,
    /// Allowed everywhere: the child survives.
    GetPid,
    /// Allowed for the VMM thread only: a Unix socket.
    UnixSocket,
    /// mmap of executable memory.
    ExecMmap,
}

impl Attempt {
    /// The syscall number the handler's line must name when this is refused.
    fn number(self) -> i64 {
        match self {
            Attempt::Execve => libc::SYS_execve,
            Attempt::InetSocket | Attempt::UnixSocket => libc::SYS_socket,
            Attempt::Ptrace => libc::SYS_ptrace,
            Attempt::GetPid => libc::SYS_getpid,
            Attempt::ExecMmap => libc::SYS_mmap,
        }
    }

    /// Makes the syscall; async-signal-safe (the child of a threaded process).
    fn make(self) {
        // SAFETY: each call passes valid (or null, where the kernel accepts it) arguments
        // and its result is ignored: only whether the process survives it matters.
        unsafe {
            match self {
                Attempt::Execve => {
                    let path = c"/bin/true".as_ptr();
                    let argv = [path, std::ptr::null()];
                    libc::execve(path, argv.as_ptr(), std::ptr::null());
                }
                Attempt::InetSocket => {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                }
                Attempt::UnixSocket => {
                    libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                }
                Attempt::Ptrace => {
                    libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                }
                Attempt::GetPid => {
                    libc::getpid();
                }
                Attempt::ExecMmap => {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                }
            }
        }
    }
}

/// How the child ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Exited(i32),
    Signalled(i32),
}

/// Forks a child that installs `kind`'s filter and makes `attempt`; returns how it ended
/// and what it wrote on stderr.
fn run_filtered(kind: ThreadKind, attempt: Attempt) -> (Outcome, String) {
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for the two descriptors pipe2 writes.
    let made = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(made, 0);
    // SAFETY: the child only calls glibc functions that are safe after fork (glibc's
    // malloc is reinitialised in the child; the filter is compiled there, since it names
    // the child's pid) and ends with _exit, so it never returns into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on the child's own descriptors and limits.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::dup2(pipe[1], libc::STDERR_FILENO);
        }
        if install_now(kind).is_err() {
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(90) };
        }
        attempt.make();
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: the write end is ours and closed once; the read end becomes an OwnedFd.
    let mut reader = unsafe {
        libc::close(pipe[1]);
        std::fs::File::from(OwnedFd::from_raw_fd(pipe[0]))
    };
    let mut stderr = String::new();
    reader.read_to_string(&mut stderr).unwrap();
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let outcome = if libc::WIFSIGNALED(status) {
        Outcome::Signalled(libc::WTERMSIG(status))
    } else {
        Outcome::Exited(libc::WEXITSTATUS(status))
    };
    (outcome, stderr)
}

fn assert_killed(kind: ThreadKind, attempt: Attempt) {
    let (outcome, stderr) = run_filtered(kind, attempt);
    assert_eq!(
        outcome,
        Outcome::Signalled(libc::SIGSYS),
        "{kind:?} {attempt:?}: {stderr}"
    );
    let expected = format!(
        "hearth: seccomp: the {} thread made a forbidden syscall, number {} (arguments ",
        kind.name(),
        attempt.number()
    );
    assert!(
        stderr.starts_with(&expected),
        "{kind:?} {attempt:?}: {stderr}"
    );
    assert!(
        stderr.ends_with("); exiting with SIGSYS\n") && stderr.lines().count() == 1,
        "{kind:?} {attempt:?}: {stderr}"
    );
    if let Attempt::InetSocket = attempt {
        assert!(stderr.contains("(arguments 0x2, 0x1, 0x0)"), "{stderr}");
    }
}

fn assert_survives(kind: ThreadKind, attempt: Attempt) {
    let (outcome, stderr) = run_filtered(kind, attempt);
    assert_eq!(
        outcome,
        Outcome::Exited(0),
        "{kind:?} {attempt:?}: {stderr}"
    );
}

#[test]
fn every_kind_dies_of_execve_inet_sockets_and_ptrace() {
    for kind in ThreadKind::ALL {
        for attempt in [Attempt::Execve, Attempt::InetSocket, Attempt::Ptrace] {
            assert_killed(kind, attempt);
        }
    }
}

#[test]
fn every_kind_dies_of_executable_memory() {
    for kind in ThreadKind::ALL {
        assert_killed(kind, Attempt::ExecMmap);
    }
}

#[test]
fn allowed_syscalls_pass() {
    for kind in ThreadKind::ALL {
        assert_survives(kind, Attempt::GetPid);
    }
    assert_survives(ThreadKind::Vmm, Attempt::UnixSocket);
}

#[test]
fn only_the_vmm_thread_makes_sockets() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::VmSetup,
        ThreadKind::Driver,
        ThreadKind::Relay,
    ] {
        assert_killed(kind, Attempt::UnixSocket);
    }
}

#[test]
fn every_filter_compiles() {
    for kind in ThreadKind::ALL {
        let program = compile(kind, 1).unwrap();
        // BPF programs are at most 4096 instructions.
        assert!(program.len() < 4096, "{kind:?}: {}", program.len());
    }
}

/// Syscalls no thread of a running VMM needs and a compromised one would use to leave
/// the filter's reach: run programs, make threads or processes, trace or signal other
/// processes, submit I/O the filter never sees (io_uring), load code into the kernel,
/// change namespaces, mounts or credentials.
const NEVER: [i64; 37] = [
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_kexec_load,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setresuid,
    libc::SYS_capset,
    libc::SYS_prctl,
    libc::SYS_seccomp,
    libc::SYS_open_by_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_pkey_mprotect,
    libc::SYS_personality,
    libc::SYS_mknodat,
];

#[test]
fn no_list_allows_a_way_out() {
    for kind in ThreadKind::ALL {
        let rules = rules(kind, 1).unwrap();
        for syscall in NEVER {
            assert!(
                !rules.contains_key(&syscall),
                "{kind:?} allows syscall {syscall}"
            );
        }
    }
}

#[test]
fn wide_syscalls_are_only_allowed_with_their_arguments_checked() {
    let checked = [
        libc::SYS_ioctl,
        libc::SYS_socket,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_fcntl,
        libc::SYS_tgkill,
        libc::SYS_rt_sigaction,
    ];
    for kind in ThreadKind::ALL {
        let rules = rules(kind, 1).unwrap();
        for syscall in checked {
            if let Some(patterns) = rules.get(&syscall) {
                assert!(!patterns.is_empty(), "{kind:?} allows {syscall} unchecked");
            }
        }
    }
}

/// The counts README.md's "Security: seccomp" table gives: change both together.
#[test]
fn list_sizes_match_the_readme() {
    let sizes: Vec<(ThreadKind, usize)> = ThreadKind::ALL
        .iter()
        .map(|&kind| (kind, rules(kind, 1).unwrap().len()))
        .collect();
    assert_eq!(
        sizes,
        [
            (ThreadKind::Vmm, 61),
            (ThreadKind::Vcpu, 29),
            (ThreadKind::Api, 32),
            (ThreadKind::VmSetup, 26),
            (ThreadKind::Driver, 25),
            (ThreadKind::Relay, 27),
        ]
    );
}
