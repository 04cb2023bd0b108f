//! The VMM processes of `hearth bench snapshot`: a VM booted through the API and paused
//! to be snapshotted ([`SourceVm`]), and one restore into a new process
//! ([`restore_once`]). hearth and Firecracker are driven alike, through the same API
//! requests from the same client (`api::client`), so each figure means the same for both.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Guest, Vmm, LINUX_COMMAND, LINUX_READY_LINE};
use crate::api::client::{ApiClient, ClientError};
use crate::api::restore::RESTORE_TIMER_MARKER;
use crate::bench::fixtures::linux;
use crate::bench::memory::{restored_vmm_memory, VmmMemory};
use crate::bench::process::{Invocation, Spawned};

/// How long any one API request may take (a Firecracker memory file of 1 GiB is written
/// in full).
const API_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a client tries to connect to an API socket that is not there yet.
const CONNECT_RETRY: Duration = Duration::from_micros(100);
/// How long the bench sleeps between looks at a child it waits for: only its own
/// wake-ups, the times come from the threads reading the child's output.
const POLL: Duration = Duration::from_millis(1);
/// How long the tiny guest may take to print after start.
const TINY_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restored VM may take to print: the tiny guest prints within microseconds
/// of running, the Linux guest once its emulated kernel gets a line out.
const TINY_RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
const LINUX_RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a VMM may take to end after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of a VMM's output or log quoted in an error.
const TAIL_LINES: usize = 3;

/// The programs and images the VMs are made of.
pub(super) struct Env<'a> {
    pub hearth: &'a Path,
    pub firecracker: Option<&'a Path>,
    /// The tiny guest, an ELF entered in 64-bit mode (hearth and Firecracker alike).
    pub ticker: &'a Path,
    /// The minimal kernel and the test initramfs.
    pub linux: Result<(PathBuf, PathBuf), String>,
    pub linux_ready_timeout: Duration,
}

impl Env<'_> {
    /// A VMM in Firecracker's shape, serving the API on `socket`. Firecracker logs to
    /// stdout unless told otherwise; its log goes to `log`, so stdout is the console.
    fn api_vmm(&self, vmm: Vmm, socket: &Path, log: &Path) -> Result<Invocation, String> {
        Ok(match vmm {
            Vmm::Hearth => Invocation::new(self.hearth).arg("--api-sock").arg(socket),
            Vmm::Firecracker => {
                let firecracker = self
                    .firecracker
                    .ok_or_else(|| "firecracker is not on PATH".to_owned())?;
                Invocation::new(firecracker)
                    .arg("--api-sock")
                    .arg(socket)
                    .arg("--log-path")
                    .arg(log)
            }
        })
    }
}

/// A snapshot's two files.
#[derive(Clone, Debug)]
pub(super) struct SnapshotFiles {
    pub state: PathBuf,
    pub mem: PathBuf,
}

/// Allocated and apparent sizes of a snapshot's files, in bytes.
#[derive(Clone, Copy, Debug)]
pub(super) struct FileSizes {
    pub mem_disk: u64,
    pub mem: u64,
    pub state_disk: u64,
    pub state: u64,
}

impl SnapshotFiles {
    pub fn sizes(&self) -> Result<FileSizes, String> {
        let meta = |path: &Path| {
            std::fs::metadata(path).map_err(|e| format!("cannot stat \"{}\": {e}", path.display()))
        };
        let (mem, state) = (meta(&self.mem)?, meta(&self.state)?);
        Ok(FileSizes {
            mem_disk: mem.blocks() * 512,
            mem: mem.len(),
            state_disk: state.blocks() * 512,
            state: state.len(),
        })
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.mem);
    }
}

/// A VM booted to be snapshotted: running its guest, then paused for good.
pub(super) struct SourceVm {
    child: Spawned,
    client: ApiClient,
    log: PathBuf,
    /// From spawn to the guest's output that says it runs.
    pub ready: Duration,
}

impl SourceVm {
    /// Starts `vmm` with an API socket in `dir`, configures and starts `guest` with
    /// `mib` of RAM through the API, waits for its output, and pauses it.
    pub fn boot(env: &Env, vmm: Vmm, guest: Guest, mib: u64, dir: &Path) -> Result<Self, String> {
        let socket = dir.join("source.sock");
        let log = dir.join("source.log");
        let mut inv = env.api_vmm(vmm, &socket, &log)?;
        let (boot_source, timeout) = match guest {
            Guest::Tiny => (
                json!({
                    "kernel_image_path": env.ticker,
                    "boot_args": linux::BASE_CMDLINE,
                }),
                TINY_READY_TIMEOUT,
            ),
            Guest::Linux => {
                let (kernel, initrd) = env.linux.clone()?;
                inv = inv.output_line(LINUX_READY_LINE);
                (
                    json!({
                        "kernel_image_path": kernel,
                        "initrd_path": initrd,
                        "boot_args": linux::cmdline("", LINUX_COMMAND),
                    }),
                    env.linux_ready_timeout,
                )
            }
        };
        let mut child = Spawned::start(&inv).map_err(|e| crate::error_chain(&e))?;
        let client = ApiClient::new(&socket, API_TIMEOUT);
        let deadline = child.started() + timeout;
        let machine = json!({"vcpu_count": 1, "mem_size_mib": mib});
        let result = (|| {
            put_when_listening(&mut child, &client, "/machine-config", &machine, deadline)?;
            put(&client, "/boot-source", &boot_source)?;
            put(
                &client,
                "/actions",
                &json!({"action_type": "InstanceStart"}),
            )?;
            let ready = match guest {
                Guest::Tiny => wait_for(&mut child, deadline, "guest output", |c| {
                    c.first_output_at()
                })?,
                Guest::Linux => wait_for(&mut child, deadline, "the guest's loop", |c| {
                    c.output_line_at()
                })?,
            };
            // The guest keeps printing until it is paused; pausing answers once every
            // vCPU is out of the guest.
            patch(&client, "/vm", &json!({"state": "Paused"}))?;
            Ok(ready.duration_since(child.started()))
        })();
        match result {
            Ok(ready) => Ok(SourceVm {
                child,
                client,
                log,
                ready,
            }),
            Err(e) => Err(with_log_tail(e, &log)),
        }
    }

    /// `PUT /snapshot/create` into `files`: the time from sending the request to reading
    /// its answer.
    pub fn create(&self, files: &SnapshotFiles) -> Result<Duration, String> {
        let body = json!({
            "snapshot_type": "Full",
            "snapshot_path": files.state,
            "mem_file_path": files.mem,
        });
        let start = Instant::now();
        put(&self.client, "/snapshot/create", &body).map_err(|e| with_log_tail(e, &self.log))?;
        Ok(start.elapsed())
    }

    /// Stops the VMM with SIGTERM.
    pub fn stop(self) -> Result<(), String> {
        let result = stop(self.child);
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(self.client.socket());
        result
    }
}

/// How a snapshot is restored.
#[derive(Clone, Copy, Debug)]
pub(super) enum Restorer {
    /// `hearth restore --restore-timer`.
    HearthRestore,
    /// `PUT /snapshot/load` with `resume_vm` into a new VMM with an API socket.
    ApiLoad(Vmm),
}

/// One restore, measured.
#[derive(Clone, Copy, Debug)]
pub(super) struct Restored {
    /// Spawn to the vCPUs running (see `report::RestoreSample`).
    pub vcpus: Duration,
    /// Spawn to the first byte of guest output.
    pub output: Duration,
    pub memory: VmmMemory,
}

/// Restores `snapshot` of a `guest` with `mib` of RAM into a new process, waits for its
/// first output, reads its memory, and stops it. Run `n`'s socket and log go in `dir`.
pub(super) fn restore_once(
    env: &Env,
    restorer: Restorer,
    guest: Guest,
    mib: u64,
    snapshot: &SnapshotFiles,
    dir: &Path,
    n: usize,
) -> Result<Restored, String> {
    let socket = dir.join(format!("restore-{n}.sock"));
    let log = dir.join(format!("restore-{n}.log"));
    let inv = match restorer {
        Restorer::HearthRestore => Invocation::new(env.hearth)
            .arg("restore")
            .arg("--state")
            .arg(&snapshot.state)
            .arg("--mem")
            .arg(&snapshot.mem)
            .arg("--restore-timer")
            .boot_marker(RESTORE_TIMER_MARKER),
        Restorer::ApiLoad(vmm) => env.api_vmm(vmm, &socket, &log)?,
    };
    let timeout = match guest {
        Guest::Tiny => TINY_RESTORE_TIMEOUT,
        Guest::Linux => LINUX_RESTORE_TIMEOUT,
    };
    let result = (|| {
        let mut child = Spawned::start(&inv).map_err(|e| crate::error_chain(&e))?;
        let deadline = child.started() + timeout;
        let vcpus_at = match restorer {
            Restorer::HearthRestore => {
                wait_for(&mut child, deadline, "the restore-timer line", |c| {
                    c.boot_at()
                })?
            }
            Restorer::ApiLoad(_) => {
                let load = json!({
                    "snapshot_path": snapshot.state,
                    "mem_backend": {"backend_type": "File", "backend_path": snapshot.mem},
                    "resume_vm": true,
                });
                let client = ApiClient::new(&socket, API_TIMEOUT);
                put_when_listening(&mut child, &client, "/snapshot/load", &load, deadline)?;
                Instant::now()
            }
        };
        let output_at = wait_for(&mut child, deadline, "guest output", |c| {
            c.first_output_at()
        })?;
        let memory = restored_vmm_memory(child.pid(), mib << 20, &snapshot.mem)
            .map_err(|e| crate::error_chain(&e));
        let started = child.started();
        stop(child)?;
        Ok(Restored {
            vcpus: vcpus_at.duration_since(started),
            output: output_at.duration_since(started),
            memory: memory?,
        })
    })();
    let result = result.map_err(|e| with_log_tail(e, &log));
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&log);
    result
}

/// Waits until `event` has happened to `child` (its time, from the threads reading the
/// child's output), the child ends, or `deadline` passes.
fn wait_for(
    child: &mut Spawned,
    deadline: Instant,
    what: &str,
    event: impl Fn(&Spawned) -> Option<Instant>,
) -> Result<Instant, String> {
    loop {
        if let Some(at) = event(child) {
            return Ok(at);
        }
        if let Some(exit) = child.poll(POLL).map_err(|e| crate::error_chain(&e))? {
            return Err(format!(
                "the VMM ended ({}) before {what}{}",
                exit.status,
                tail_of(child)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no {what} within {:.0} s{}",
                deadline.duration_since(child.started()).as_secs_f64(),
                tail_of(child)
            ));
        }
    }
}

fn tail_of(child: &Spawned) -> String {
    let tail = child.output_tail(TAIL_LINES);
    if tail.is_empty() {
        tail
    } else {
        format!(": {tail}")
    }
}

/// `PUT path` as soon as the child's API socket takes connections: the socket appears
/// some time after the spawn, and the first request is the first thing a client can do.
fn put_when_listening(
    child: &mut Spawned,
    client: &ApiClient,
    path: &str,
    body: &serde_json::Value,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        match client.call("PUT", path, Some(body)) {
            Ok(_) => return Ok(()),
            Err(ClientError::Connect { .. }) => {}
            Err(e) => return Err(crate::error_chain(&e)),
        }
        if let Some(exit) = child
            .poll(Duration::ZERO)
            .map_err(|e| crate::error_chain(&e))?
        {
            return Err(format!(
                "the VMM ended ({}) before its API socket took connections{}",
                exit.status,
                tail_of(child)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no API socket at \"{}\" in time{}",
                client.socket().display(),
                tail_of(child)
            ));
        }
        std::thread::sleep(CONNECT_RETRY);
    }
}

fn put(client: &ApiClient, path: &str, body: &serde_json::Value) -> Result<(), String> {
    client.put(path, body).map_err(|e| crate::error_chain(&e))
}

fn patch(client: &ApiClient, path: &str, body: &serde_json::Value) -> Result<(), String> {
    client.patch(path, body).map_err(|e| crate::error_chain(&e))
}

/// SIGTERM to the VMM's process group, then waits for it to end.
fn stop(mut child: Spawned) -> Result<(), String> {
    child.signal_group(libc::SIGTERM);
    let exit = child
        .wait(STOP_TIMEOUT)
        .map_err(|e| crate::error_chain(&e))?;
    if exit.timed_out {
        return Err(format!(
            "the VMM ignored SIGTERM for {} s; killed",
            STOP_TIMEOUT.as_secs()
        ));
    }
    Ok(())
}

/// `error`, with the last lines of a Firecracker log when there is one (Firecracker
/// says why it refused something there, not on stderr).
fn with_log_tail(error: String, log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return error;
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return error;
    }
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join(" | ");
    format!("{error} (log: {tail})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_allocated_and_apparent() {
        let dir = std::env::temp_dir().join(format!("hearth-snapvm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = SnapshotFiles {
            state: dir.join("vm.state"),
            mem: dir.join("vm.mem"),
        };
        std::fs::write(&files.state, [7u8; 5000]).unwrap();
        // A sparse file: 1 MiB long, one 4 KiB page written at its end.
        let mem = std::fs::File::create(&files.mem).unwrap();
        mem.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&mem, &[1u8; 4096], (1 << 20) - 4096).unwrap();
        drop(mem);
        let sizes = files.sizes().unwrap();
        assert_eq!((sizes.mem, sizes.state), (1 << 20, 5000));
        assert!(
            sizes.mem_disk >= 4096 && sizes.mem_disk < 1 << 20,
            "{sizes:?}"
        );
        assert!(sizes.state_disk >= 5000, "{sizes:?}");
        files.remove();
        assert!(files.sizes().unwrap_err().contains("vm.mem"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_tail_joins_the_error() {
        let dir = std::env::temp_dir().join(format!("hearth-snaplog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("fc.log");
        assert_eq!(with_log_tail("refused".into(), &log), "refused");
        std::fs::write(&log, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(
            with_log_tail("refused".into(), &log),
            "refused (log: b | c | d)"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
