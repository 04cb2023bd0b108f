//! Network namespaces for the tests that give hearth a tap: each test creates its own
//! `hearth-*` namespace, puts its tap inside, runs hearth (and any socket code) in there,
//! and always removes it again, so no interface of the caller's namespace is touched.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use super::{announce_skip, describe, kvm_available, Need};

/// A network namespace `<prefix><pid>-<n>` with its loopback up, deleted (with its taps
/// and everything else in it) on drop, also when the test panics.
pub struct NetNs {
    name: String,
    /// Taps made by [`NetNs::add_tap`], deleted explicitly on drop.
    taps: RefCell<Vec<String>>,
}

impl NetNs {
    /// Creates the namespace `<prefix><pid>-<n>`, e.g. `hearth-nettest-1234-0`, replacing
    /// a stale one of the same name. `n` counts the namespaces of this process, so tests
    /// that run at the same time never share (or delete) one another's.
    pub fn new(prefix: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{}-{n}", std::process::id());
        // A leftover from an earlier process with the same pid is stale.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs {
            name,
            taps: RefCell::new(Vec::new()),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS ARGS...`, which must succeed.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> Output {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Creates the tap `tap` in the namespace with the host-side address `cidr`
    /// (e.g. `169.254.77.1/24`) and brings it up.
    #[track_caller]
    pub fn add_tap(&self, tap: &str, cidr: &str) {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        self.taps.borrow_mut().push(tap.to_string());
        self.ip(&["addr", "add", cidr, "dev", tap]);
        self.ip(&["link", "set", tap, "up"]);
    }

    /// `cmd` (program and arguments only) run through `ip netns exec NS`.
    pub fn exec(&self, cmd: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        wrapped
    }

    /// Runs `f` on a new thread that has first entered the namespace (for sockets on the
    /// host side of the tap: a listener, or a client connecting to the guest). A failed
    /// setns is the thread's error.
    pub fn spawn_inside<T, F>(&self, f: F) -> thread::JoinHandle<Result<T, String>>
    where
        F: FnOnce() -> Result<T, String> + Send + 'static,
        T: Send + 'static,
    {
        let name = self.name.clone();
        thread::spawn(move || {
            enter_netns(&name).map_err(|e| format!("setns into {name}: {e}"))?;
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its tap devices too; delete the taps first
        // anyway, so that nothing of them outlives the test even if a process still holds
        // the namespace.
        for tap in self.taps.borrow().iter() {
            let _ = Command::new("ip")
                .args(["-n", &self.name, "link", "del", tap])
                .stderr(Stdio::null())
                .status();
        }
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
    }
}

/// Moves the calling thread (only) into the network namespace `name`.
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    let file = File::open(format!("/var/run/netns/{name}"))?;
    // SAFETY: setns takes a namespace fd, which `file` keeps open for the call, and
    // changes only the calling thread's network namespace; no memory is involved.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `cmd`, which must succeed; returns its output.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed\n{}", describe(&out));
    out
}

/// Whether this machine can run the network tests: KVM, root (namespaces, taps) and
/// iproute2's `ip`. Announces a skip loudly when it cannot; the test should then return.
pub fn net_tests_possible() -> bool {
    if !kvm_available() {
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        announce_skip(
            Need::Root,
            "not root (network namespaces and tap devices need it)",
        );
        return false;
    }
    let ip_works = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ip_works {
        announce_skip(Need::Netns, "`ip` (iproute2) not found");
        return false;
    }
    true
}
