//! `hearth-init`, the guest agent: PID 1 of hearth container VMs and machines.
//!
//! # What the initramfs must contain
//! | path | required | what |
//! |---|---|---|
//! | `/init` | yes | this binary (static; `strip` it when packing) |
//! | `/lib/modules/order` | no | kernel modules to load, one path a line relative to `/lib/modules` (e.g. `vsock.ko`), in load order; blank lines and `#` comments are skipped |
//! | `/lib/modules/<path>.ko` | no | the modules named there, uncompressed, loaded with `finit_module` (already loaded or built in is fine) |
//! | `/bin/busybox` | no | machines: a static busybox; the agent runs `busybox --install -s /bin` |
//!
//! Nothing else is needed: the kernel opens `/dev/console` itself when the initramfs
//! lacks it (if the initramfs has no `/dev/console` node, early kernel messages about
//! "unable to open an initial console" are harmless; the agent logs to /dev/console
//! after mounting devtmpfs). Anything else packed (e.g. `/etc`) is carried over into
//! the VM's root filesystem.
//!
//! # Kernel command line keys
//! * `hearth.mode=container` — connect to the host (CID 2, port [`AGENT_PORT`]), serve
//!   exactly one session, power off.
//! * `hearth.mode=machine` — listen on vsock port [`AGENT_PORT`], serve sessions
//!   concurrently until a `Shutdown`.
//! * `hearth.log=error|warn|info|debug|trace` — agent log level on /dev/console
//!   (default `warn`: quiet unless something goes wrong).
//!
//! Words after a standalone `--` are ignored. The kernel needs devtmpfs, devpts, tmpfs,
//! proc, sysfs, cgroup2 (memory, cpu, pids controllers when limits are used), overlayfs,
//! ext4, namespaces (mount, UTS, IPC, PID, net), vsock (virtio transport), unix98 ptys,
//! memfd, and power-off support (ACPI; reset with `reboot=k` is the fallback).
//!
//! # Boot
//! PID 1 mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /sys/fs/cgroup, /run and /tmp,
//! moves the initramfs contents onto a tmpfs and makes it the root (containers need
//! `pivot_root`, which the initramfs root cannot do), re-executes `/init` from there
//! (freeing the initramfs copy), loads modules, enables cgroup controllers, brings `lo`
//! up, starts the child reaper and serves the protocol (`crate::agent::protocol`).
//! Processes are started by re-executing the binary as `hearth-init sandbox` (see
//! [`sandbox`]). The VM's state: images in `/var/lib/hearth/images/<hex>`, container
//! mount points in `/run/hearth/c/<id>`, cgroups `/sys/fs/cgroup/hearth-<id>` (the id is
//! the container name, or a number; a container VM makes one only for `--memory` or
//! `--cpus` limits). `hearth.log=debug` logs the timed steps of every start
//! ([`timing`]).
//!
//! [`AGENT_PORT`]: crate::agent::protocol::AGENT_PORT

pub mod boot;
pub mod bridge;
mod forward;
pub mod handoff;
pub mod image;
pub mod launch;
pub mod net;
pub mod netlink;
pub mod nft;
pub mod reaper;
pub mod refresh;
pub mod resolve;
pub mod sandbox;
mod serve;
pub mod session;
pub mod shares;
pub mod sys;
pub mod timing;
mod vsock;
pub mod xstate;

use std::ffi::OsStr;

/// The `hearth-init` binary: PID 1 runs the agent; `hearth-init sandbox` (started by
/// the agent) sets up and execs one process.
pub fn main() -> ! {
    if sys::getpid() == 1 {
        boot::pid1();
    }
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(sandbox::SANDBOX_ARG)) {
        std::process::exit(sandbox::main());
    }
    eprintln!("hearth-init: the hearth guest agent; it runs as /init (PID 1) of a hearth VM");
    std::process::exit(2)
}

#[cfg(test)]
pub(crate) mod testutil {
    pub use crate::testutil::TempDir;

    /// Whether the tests run as root (host-mutating tests skip otherwise).
    pub fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
