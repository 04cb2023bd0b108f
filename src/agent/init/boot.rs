//! PID 1 of a hearth VM: mounts, leaving the initramfs, kernel modules, cgroups, the
//! loopback interface, then the agent proper (`serve.rs`) — one session to the host
//! (container VMs) or a vsock listener with a thread per session (machines), over the
//! sockets of `vsock.rs`. PID 1 never exits: every way out, panics included, ends in
//! `sync` and power-off.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::bridge::Bridge;
use super::launch::Launcher;
use super::net;
use super::reaper::{ReapMode, Reaper};
use super::serve;
use super::session::{Agent, AgentConfig, AgentMode};
use super::sys;
use super::xstate;
use crate::agent::protocol::{write_message, Message, MODE_CONTAINER, MODE_MACHINE};
use crate::error_chain;

/// Set in the environment of the agent re-executed from the new root.
const STAGE_ENV: &str = "HEARTH_INIT_STAGE";
/// `PATH` of the agent and of `Rootfs::Host` processes without one.
pub const MACHINE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// What stops the VM from booting into the agent.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot leave the initramfs: {step}")]
    SwitchRoot {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("no hearth.mode= on the kernel command line")]
    NoMode,
    #[error("unknown hearth.mode={0:?} (expected container or machine)")]
    BadMode(String),
    #[error("cannot reach the host on vsock port {port}")]
    Connect {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on vsock port {port}")]
    Listen {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the child reaper")]
    Reaper(#[source] io::Error),
}

/// The agent's keys on the kernel command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootArgs {
    /// `hearth.mode=`.
    pub mode: Option<String>,
    /// `hearth.log=` (error, warn, info, debug, trace).
    pub log: Option<String>,
}

/// Reads the `hearth.*` keys from /proc/cmdline text. Words after a standalone `--` are
/// init's arguments, not kernel parameters; double quotes group words as the kernel does.
pub fn parse_cmdline(text: &str) -> BootArgs {
    let mut args = BootArgs::default();
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut in_word) = (false, false);
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    for w in words {
        if w == "--" {
            break;
        }
        if let Some(v) = w.strip_prefix("hearth.mode=") {
            args.mode = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("hearth.log=") {
            args.log = Some(v.to_string());
        }
    }
    args
}

/// One-line messages on /dev/console: `hearth-init: `, the monotonic clock in ms (since
/// the guest booted, the clock of the step marks, see [`super::timing`]), the text.
struct ConsoleLog {
    out: Mutex<Option<File>>,
}

impl log::Log for ConsoleLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = console_line(sys::monotonic_us(), record.level(), record.args());
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if out.is_none() {
            *out = sys::open(Path::new("/dev/console"), libc::O_WRONLY | libc::O_NOCTTY)
                .ok()
                .map(File::from);
        }
        match out.as_mut() {
            Some(console) => {
                let _ = console.write_all(line.as_bytes());
            }
            None => {
                let _ = io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// One console log line (with its newline), stamped with the monotonic time `now_us`.
fn console_line(now_us: u64, level: log::Level, text: &std::fmt::Arguments) -> String {
    let level = match level {
        log::Level::Error => "error: ",
        log::Level::Warn => "warning: ",
        _ => "",
    };
    let (ms, tenths) = (now_us / 1000, now_us % 1000 / 100);
    format!("hearth-init: [{ms:>7}.{tenths} ms] {level}{text}\n")
}

fn init_logging(level: Option<&str>) {
    static LOGGER: OnceLock<()> = OnceLock::new();
    LOGGER.get_or_init(|| {
        let _ = log::set_boxed_logger(Box::new(ConsoleLog {
            out: Mutex::new(None),
        }));
    });
    let filter = match level {
        Some("off") => log::LevelFilter::Off,
        Some("error") => log::LevelFilter::Error,
        Some("info") => log::LevelFilter::Info,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Warn,
    };
    log::set_max_level(filter);
}

/// Syncs and powers the VM off (reset if power-off is unavailable). Never returns.
pub fn power_off() -> ! {
    sys::sync();
    // SAFETY: reboot only takes the magic command; it returns only on failure.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    // SAFETY: as above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A duplicate of the host connection, for the panic hook's last word.
pub(super) static LAST_WORD: Mutex<Option<File>> = Mutex::new(None);

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        log::error!("{info}");
        // A panic while the lock is held must still power off: never wait for it.
        if let Ok(Some(stream)) = LAST_WORD.try_lock().as_deref() {
            let _ = write_message(
                &mut &*stream,
                &Message::Error(format!("the guest agent failed: {info}")),
            );
        }
        power_off();
    }));
}

type MountSpec = (
    &'static str,
    &'static str,
    &'static str,
    libc::c_ulong,
    Option<&'static str>,
    bool,
);

/// source, target, fstype, flags, data, essential
const EARLY_MOUNTS: [MountSpec; 8] = [
    (
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        true,
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        true,
    ),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
        true,
    ),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
        false,
    ),
    (
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
        false,
    ),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        false,
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
        false,
    ),
    (
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
        false,
    ),
];

/// Mounts the API filesystems; an already mounted one (EBUSY) is fine.
fn early_mounts() -> Result<(), BootError> {
    for (source, target, fstype, flags, data, essential) in EARLY_MOUNTS {
        let path = Path::new(target);
        let _ = sys::mkdir_all(path);
        match sys::mount(Some(source), path, Some(fstype), flags, data) {
            Ok(()) => {}
            Err(e) if sys::is_errno(&e, libc::EBUSY) => {}
            Err(source) if essential => {
                return Err(BootError::Mount {
                    fstype,
                    target,
                    source,
                })
            }
            Err(e) => log::warn!("cannot mount {fstype} on {target}: {e}"),
        }
    }
    Ok(())
}

/// Moves (copy, then delete) the tree at `src` into `dst`, staying on device `dev`.
fn move_tree(src: &Path, dst: &Path, dev: u64, skip: &[&str]) -> io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name();
        if skip.iter().any(|s| name.as_bytes() == s.as_bytes()) {
            continue;
        }
        let from = entry.path();
        let meta = std::fs::symlink_metadata(&from)?;
        if meta.dev() != dev {
            continue;
        }
        let to = dst.join(&name);
        let kind = meta.file_type();
        if kind.is_dir() {
            let _ = std::fs::create_dir(&to);
            move_tree(&from, &to, dev, &[])?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            std::fs::remove_dir(&from)?;
        } else {
            if kind.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            } else if kind.is_file() {
                std::fs::copy(&from, &to)?;
            } else {
                let c = sys::cstr(&to)?;
                // SAFETY: `c` is a valid C string; mode and rdev come from the original node.
                if unsafe { libc::mknod(c.as_ptr(), meta.mode(), meta.rdev()) } < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            std::fs::remove_file(&from)?;
        }
        std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))?;
    }
    Ok(())
}

/// switch_root: moves the initramfs contents onto a tmpfs, moves the API mounts along
/// and makes that tmpfs the root, so that `pivot_root` works for containers.
fn switch_root() -> Result<(), BootError> {
    let step = |step: &str| {
        let step = step.to_string();
        move |source| BootError::SwitchRoot { step, source }
    };
    let new = Path::new("/newroot");
    sys::mkdir_all(new).map_err(step("create /newroot"))?;
    sys::mount(Some("rootfs"), new, Some("tmpfs"), 0, Some("mode=0755"))
        .map_err(step("mount a tmpfs on /newroot"))?;
    let dev = std::fs::metadata("/").map_err(step("stat /"))?.dev();
    let skip = ["newroot", "proc", "sys", "dev", "run", "tmp"];
    move_tree(Path::new("/"), new, dev, &skip).map_err(step("move the initramfs files"))?;
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        let (from, to) = (Path::new("/").join(dir), new.join(dir));
        sys::mkdir_all(&to).map_err(step(&format!("create {}", to.display())))?;
        if let Err(e) = sys::mount(
            Some(&from.to_string_lossy()),
            &to,
            None,
            libc::MS_MOVE,
            None,
        ) {
            // Only /proc, /sys and /dev are essential; the others may have failed to mount.
            if matches!(dir, "proc" | "sys" | "dev") {
                return Err(BootError::SwitchRoot {
                    step: format!("move {}", from.display()),
                    source: e,
                });
            }
            log::warn!("cannot move {}: {e}", from.display());
        }
        let _ = std::fs::remove_dir(&from);
    }
    std::env::set_current_dir(new).map_err(step("enter /newroot"))?;
    sys::mount(Some("."), Path::new("/"), None, libc::MS_MOVE, None)
        .map_err(step("move /newroot onto /"))?;
    sys::chroot(Path::new(".")).map_err(step("chroot"))?;
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Re-executes /init from the new root, so the initramfs copy of the binary is freed.
/// Returns only if exec failed.
fn reexec() {
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != STAGE_ENV)
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{STAGE_ENV}=2")).unwrap_or_default());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let argv = [c"/init".as_ptr(), std::ptr::null()];
    // SAFETY: argv and envp are NUL-terminated arrays of live C strings.
    unsafe { libc::execve(c"/init".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    log::warn!("cannot re-execute /init: {}", io::Error::last_os_error());
}

/// Loads `<dir>/order`'s modules (paths relative to `dir`, one a line) in order.
fn load_modules(dir: &Path) {
    let Ok(order) = sys::read_text(&dir.join("order")) else {
        return;
    };
    for name in order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if Path::new(name)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            log::warn!("skipping module {name:?}: not a relative path");
            continue;
        }
        let path = dir.join(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("cannot open module {}: {e}", path.display());
                continue;
            }
        };
        // SAFETY: the descriptor is open and the parameter string is a valid empty C string.
        let ret =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EEXIST) => {}
                Some(libc::ENOSYS) => {
                    log::warn!(
                        "the kernel cannot load modules; skipping {}",
                        path.display()
                    );
                    return;
                }
                _ => log::warn!("cannot load module {}: {err}", path.display()),
            }
        } else {
            log::debug!("loaded {}", path.display());
        }
    }
}

/// Enables the memory, cpu and pids controllers for child cgroups; returns the root if
/// cgroup v2 is usable.
fn setup_cgroups(root: &Path) -> Option<PathBuf> {
    let available = sys::read_text(&root.join("cgroup.controllers")).ok()?;
    for controller in ["memory", "cpu", "pids"] {
        if available.split_whitespace().any(|c| c == controller) {
            if let Err(e) = sys::write_text(
                &root.join("cgroup.subtree_control"),
                &format!("+{controller}"),
            ) {
                log::warn!("cannot enable the {controller} cgroup controller: {e}");
            }
        }
    }
    Some(root.to_path_buf())
}

fn install_busybox() {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return;
    }
    // Runs before the reaper thread exists, so waiting for it here is safe.
    let status = std::process::Command::new(busybox)
        .args(["--install", "-s", "/bin"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        log::warn!("busybox --install failed: {status:?}");
    }
}

/// Everything PID 1 does, in order. Never returns.
pub fn pid1() -> ! {
    install_panic_hook();
    init_logging(None);
    let mut fatal: Option<String> = None;
    if std::env::var_os(STAGE_ENV).is_none() {
        // Stage 1, in the initramfs.
        match early_mounts().and_then(|()| switch_root()) {
            Ok(()) => reexec(),
            Err(e) => fatal = Some(error_chain(&e)),
        }
    }
    let args = parse_cmdline(&sys::read_text(Path::new("/proc/cmdline")).unwrap_or_default());
    init_logging(args.log.as_deref());
    if let Some(text) = &fatal {
        log::error!("{text}");
    }
    let mode = match args.mode.as_deref() {
        Some(MODE_CONTAINER) => AgentMode::Container,
        Some(MODE_MACHINE) => AgentMode::Machine,
        other => {
            let e = match other {
                None => BootError::NoMode,
                Some(m) => BootError::BadMode(m.to_string()),
            };
            log::error!("{e}");
            // Without a mode nobody is waiting on a known side; a container host listens.
            let _ = fatal.get_or_insert_with(|| e.to_string());
            AgentMode::Container
        }
    };
    load_modules(Path::new("/lib/modules"));
    xstate::check();
    let cgroup_root = setup_cgroups(Path::new("/sys/fs/cgroup"));
    if let Err(e) = net::set_up("lo") {
        log::warn!("{}", error_chain(&e));
    }
    // Still single-threaded: the environment may be changed safely.
    std::env::set_var("PATH", MACHINE_PATH);
    if mode == AgentMode::Machine {
        install_busybox();
    }
    for dir in ["/run/hearth/c", "/var/lib/hearth/images"] {
        if let Err(e) = sys::mkdir_all(Path::new(dir)) {
            log::warn!("cannot create {dir}: {e}");
        }
    }
    let reaper = match Reaper::start(ReapMode::All) {
        Ok(r) => r,
        Err(e) => {
            log::error!("{}", error_chain(&BootError::Reaper(e)));
            power_off();
        }
    };
    // A machine's containers get their own network on a bridge, made once at boot (so
    // a template carries it); a container VM's one container shares the VM's.
    let bridge = match mode {
        AgentMode::Machine => Bridge::setup().map_err(|e| {
            let text = error_chain(&e);
            log::warn!("containers will have no network of their own: {text}");
            text
        }),
        AgentMode::Container => Err("a container VM's container shares the VM's network".into()),
    };
    let launcher = Launcher::current();
    if mode == AgentMode::Container && fatal.is_none() {
        // The container's sandbox process, started before a template snapshot is taken,
        // saves every container of that template its spawn and exec.
        if let Err(e) = launcher.prestart(&reaper) {
            log::warn!("{}", error_chain(&e));
        }
    }
    let agent = Agent::new(
        AgentConfig {
            mode,
            launcher,
            images: PathBuf::from("/var/lib/hearth/images"),
            state_root: PathBuf::from("/run/hearth/c"),
            cgroup_root,
            host_path: MACHINE_PATH.to_string(),
            bridge,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        },
        reaper,
    );
    log::info!("ready ({})", args.mode.as_deref().unwrap_or("?"));
    match mode {
        AgentMode::Container => serve::container_main(&agent, fatal),
        AgentMode::Machine => serve::machine_main(&agent, fatal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::init::testutil::TempDir;

    #[test]
    fn cmdline_keys() {
        let args = parse_cmdline(
            "console=ttyS0 reboot=k panic=1 hearth.mode=machine hearth.log=debug quiet\n",
        );
        assert_eq!(args.mode.as_deref(), Some("machine"));
        assert_eq!(args.log.as_deref(), Some("debug"));
        // The last one wins; words after `--` belong to init.
        let args = parse_cmdline("hearth.mode=machine hearth.mode=container -- hearth.mode=x");
        assert_eq!(args.mode.as_deref(), Some("container"));
        // Quotes group words.
        let args = parse_cmdline("foo=\"a b hearth.mode=x\" hearth.mode=\"container\"");
        assert_eq!(args.mode.as_deref(), Some("container"));
        assert_eq!(parse_cmdline(""), BootArgs::default());
    }

    #[test]
    fn move_tree_moves_files_links_and_dirs() {
        let src = TempDir::new("move-src");
        let dst = TempDir::new("move-dst");
        let s = src.path();
        std::fs::create_dir_all(s.join("lib/modules")).unwrap();
        std::fs::write(s.join("init"), b"binary").unwrap();
        std::fs::set_permissions(s.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(s.join("lib/modules/order"), b"a.ko\n").unwrap();
        std::os::unix::fs::symlink("busybox", s.join("sh")).unwrap();
        std::fs::create_dir(s.join("proc")).unwrap();
        let dev = std::fs::metadata(s).unwrap().dev();
        move_tree(s, dst.path(), dev, &["proc"]).unwrap();
        let d = dst.path();
        assert_eq!(std::fs::read(d.join("init")).unwrap(), b"binary");
        assert_eq!(
            std::fs::metadata(d.join("init")).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(
            std::fs::read(d.join("lib/modules/order")).unwrap(),
            b"a.ko\n"
        );
        assert_eq!(
            std::fs::read_link(d.join("sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(!d.join("proc").exists());
        // The source is emptied except for what was skipped.
        let left: Vec<_> = std::fs::read_dir(s)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("proc")]);
    }

    #[test]
    fn console_lines_carry_the_time() {
        assert_eq!(
            console_line(41_234_567, log::Level::Debug, &format_args!("run 1: plan")),
            "hearth-init: [  41234.5 ms] run 1: plan\n"
        );
        assert_eq!(
            console_line(7_000, log::Level::Warn, &format_args!("x")),
            "hearth-init: [      7.0 ms] warning: x\n"
        );
    }
}
