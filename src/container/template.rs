//! Templates: snapshots of booted agent VMs that fresh container VMs and machines are
//! restored from instead of booting.
//!
//! A template is made the first time a VM of its shape is needed: hearth boots the agent
//! VM as usual, waits until the agent is ready for work (a container VM's agent has
//! connected to the host and said hello; a machine's agent answers a session), pauses it
//! through the API and writes a full snapshot. Every later VM of that shape is
//! `hearth restore`d from it, with its own disks, taps and vsock socket given at the
//! load, and its memory mapped copy-on-write from the template's memory file, so clones
//! share the pages they do not change.
//!
//! The shape is the [`TemplateKey`]: everything that makes two booted VMs differ
//! (kernel, agent initramfs, full kernel command line, CPU profile, vCPUs, memory, the
//! device slots, the hearth binary and snapshot format). A template lives in
//! `<cache>/templates/<id>/` (`$HEARTH_TEMPLATES/<id>/` when set) (`template.json`, `state`, `mem`, `boot.log`), `<id>` being
//! a hash of the key; it is built in a temporary directory and renamed into place, under
//! an exclusive lock on `<id>.lock` so that concurrent first uses build it once. One that
//! does not match its key or whose state file fails its checks is rebuilt, with a warning.

use std::fs::{self, File};
use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::session;
use super::virtiofsd::{ShareSpec, SocketDir, Virtiofsd};
use super::vm::{self, VmSpec};
use super::ContainerError;
use crate::agent::protocol::{AGENT_PORT, MODE_CONTAINER};
use crate::api::client::ApiClient;
use crate::api::models::{SnapshotCreateParams, SnapshotType, VmState};
use crate::config::CpuProfile;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::snapshot::{StateFile, FORMAT_VERSION, HEARTH_VERSION};

/// How long the API of a template being made may take to answer (the snapshot writes
/// the whole guest memory).
const API_TIMEOUT: Duration = Duration::from_secs(120);

/// A file the template depends on, by identity: a change of content changes the size,
/// the modification time or (for a replaced file) the inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub len: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

impl FileId {
    pub fn of(path: &Path) -> Result<Self, ContainerError> {
        let path = fs::canonicalize(path)
            .map_err(ContainerError::io(format!("resolving {}", path.display())))?;
        let meta =
            fs::metadata(&path).map_err(ContainerError::io(format!("{}", path.display())))?;
        Ok(Self {
            len: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ino: meta.ino(),
            path,
        })
    }

    /// The file is still there, unchanged.
    fn is_current(&self) -> bool {
        Self::of(&self.path).is_ok_and(|now| now == *self)
    }
}

/// Everything that shapes a booted agent VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateKey {
    /// `hearth.mode=`: container or machine.
    pub mode: String,
    pub kernel: FileId,
    pub initrd: FileId,
    /// The VMM and its device models.
    pub hearth: FileId,
    pub hearth_version: String,
    pub snapshot_format: u32,
    /// The command line the VMM gives the kernel, with the CPU profile's options.
    pub cmdline: String,
    pub cpu_profile: CpuProfile,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// One slot per disk, `true` when read-only; each restore gives every slot an image.
    pub disks: Vec<bool>,
    /// NICs; each restore gives every one a tap.
    pub nets: usize,
    /// virtio-fs devices (tags `hearthfs0`, ...); each restore gives every one a fresh
    /// back end. Absent from keys of before virtio-fs, which had none.
    #[serde(default)]
    pub fs: usize,
    /// Each NIC's kind of back end (`tap`, `user`): a guest that took a tap's offloads
    /// cannot be restored onto passt, which wants whole frames.
    pub nic_kinds: Vec<String>,
    /// The balloon (machines): part of the device slots, and its configuration decides
    /// the features the saved driver negotiated.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
}

/// The kind of back end a NIC has, for [`TemplateKey::nic_kinds`].
fn nic_kind(nic: &crate::devices::virtio::net::NetConfig) -> String {
    use crate::devices::virtio::net::NetBackend;
    match nic.backend {
        NetBackend::Tap(_) => "tap",
        NetBackend::Stream(_) => "stream",
        NetBackend::User(_) => "user",
    }
    .to_string()
}

impl TemplateKey {
    /// The key of VMs started from `spec`.
    pub fn of(spec: &VmSpec) -> Result<Self, ContainerError> {
        let config = spec
            .vm_config()
            .map_err(|e| ContainerError::Spawn(vm::SpawnError::Config(e)))?;
        let cmdline = config
            .kernel_cmdline()
            .map_err(|e| ContainerError::Spawn(vm::SpawnError::Config(e)))?
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let exe = std::env::current_exe().map_err(ContainerError::io("finding hearth"))?;
        Ok(Self {
            mode: spec.mode.to_string(),
            kernel: FileId::of(&spec.kernel)?,
            initrd: FileId::of(&spec.initrd)?,
            hearth: FileId::of(&exe)?,
            hearth_version: HEARTH_VERSION.to_string(),
            snapshot_format: FORMAT_VERSION,
            cmdline,
            cpu_profile: config.resolved_cpu_profile(),
            vcpus: config.vcpu_count,
            memory_mib: spec.memory_mib,
            disks: spec.disks.iter().map(|d| d.read_only).collect(),
            nets: spec.nets.len(),
            nic_kinds: spec.nets.iter().map(nic_kind).collect(),
            fs: spec.fs.len(),
            balloon: spec.balloon.clone(),
        })
    }

    /// The template's directory name: a hash of the key.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// No file it was made from has changed since.
    fn is_current(&self) -> bool {
        self.kernel.is_current() && self.initrd.is_current() && self.hearth.is_current()
    }
}

/// What `template.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub key: TemplateKey,
    /// Seconds since the epoch.
    pub created: u64,
    /// From starting the VMM to the snapshot written.
    pub build_seconds: f64,
}

/// A usable template's files.
#[derive(Debug, Clone)]
pub struct Template {
    pub id: String,
    pub state: PathBuf,
    pub mem: PathBuf,
}

/// The template directory, `<cache>/templates`.
pub struct TemplateStore {
    root: PathBuf,
}

impl TemplateStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$HEARTH_TEMPLATES`, or `templates` in the cache directory.
    pub fn default_location() -> Self {
        match std::env::var_os("HEARTH_TEMPLATES") {
            Some(dir) => Self::new(dir),
            None => Self::new(super::cache_dir().join("templates")),
        }
    }

    /// The template for VMs like `spec`, made now if there is none (or none usable).
    /// `spec`'s disks and taps are used while making it; its state directory is not.
    /// `cancelled` is polled while the template VM boots; when it says so, the build is
    /// abandoned with [`ContainerError::Interrupted`].
    pub fn obtain(
        &self,
        spec: &VmSpec,
        boot_timeout: u64,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Template, ContainerError> {
        let key = TemplateKey::of(spec)?;
        self.obtain_for(&key, &|dir: &Path| {
            build(spec, &key, dir, boot_timeout, cancelled)
        })
    }

    /// The template for `key`, made by `make` (into the empty directory it is given,
    /// which must then hold `state`, `mem` and `template.json`) if there is none usable.
    fn obtain_for(
        &self,
        key: &TemplateKey,
        make: &dyn Fn(&Path) -> Result<(), ContainerError>,
    ) -> Result<Template, ContainerError> {
        let id = key.id();
        let dir = self.root.join(&id);
        if let Ok(template) = check(&dir, key) {
            return Ok(template);
        }
        fs::create_dir_all(&self.root).map_err(ContainerError::io(format!(
            "creating {}",
            self.root.display()
        )))?;
        let _lock = Lock::exclusive(&self.root.join(format!("{id}.lock")))?;
        // Made by another hearth while this one waited for the lock?
        let why = match check(&dir, key) {
            Ok(template) => return Ok(template),
            Err(why) => why,
        };
        if dir.exists() {
            log::warn!("template {id} is unusable ({why}); making it again");
            eprintln!("hearth: template {id} is unusable ({why}); making it again");
            fs::remove_dir_all(&dir)
                .map_err(ContainerError::io(format!("removing {}", dir.display())))?;
        }
        let building = self.root.join(format!(".{id}.{}", std::process::id()));
        let _ = fs::remove_dir_all(&building);
        fs::create_dir_all(&building).map_err(ContainerError::io(format!(
            "creating {}",
            building.display()
        )))?;
        if let Err(e) = make(&building) {
            let _ = fs::remove_dir_all(&building);
            return Err(e);
        }
        fs::rename(&building, &dir).map_err(ContainerError::io(format!(
            "moving the template into {}",
            dir.display()
        )))?;
        check(&dir, key)
            .map_err(|why| ContainerError::Vm(format!("the template just made is unusable: {why}")))
    }

    /// Every template, with its info when readable, sorted by id.
    pub fn entries(&self) -> Vec<(String, Option<TemplateInfo>)> {
        let mut entries: Vec<_> = fs::read_dir(&self.root)
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|name| !name.starts_with('.'))
                    .map(|id| {
                        let info = read_info(&self.root.join(&id));
                        (id, info)
                    })
                    .collect()
            })
            .unwrap_or_default();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries
    }

    /// Deletes the template `id`, under its lock (a template being made is not removed).
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let _lock = Lock::exclusive(&self.root.join(format!("{id}.lock")))?;
        let dir = self.root.join(id);
        fs::remove_dir_all(&dir)
            .map_err(ContainerError::io(format!("removing {}", dir.display())))?;
        let _ = fs::remove_file(self.root.join(format!("{id}.lock")));
        Ok(())
    }

    /// The one template whose id starts with `prefix`.
    pub fn resolve(&self, prefix: &str) -> Result<String, ContainerError> {
        let matches: Vec<String> = self
            .entries()
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !prefix.is_empty() && id.starts_with(prefix))
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(ContainerError::Usage(format!("no template {prefix:?}"))),
            _ => Err(ContainerError::Usage(format!(
                "template id {prefix:?} is ambiguous ({})",
                matches.join(", ")
            ))),
        }
    }
}

fn read_info(dir: &Path) -> Option<TemplateInfo> {
    serde_json::from_slice(&fs::read(dir.join("template.json")).ok()?).ok()
}

/// The template in `dir` if it is complete, made for `key`, and its state file passes
/// the snapshot format's checks; otherwise why not.
fn check(dir: &Path, key: &TemplateKey) -> Result<Template, String> {
    let info = read_info(dir).ok_or("no readable template.json")?;
    if info.key != *key {
        return Err("made for another VM shape".into());
    }
    let state = dir.join("state");
    let mem = dir.join("mem");
    StateFile::read(&state).map_err(|e| crate::error_chain(&e))?;
    let mem_len = fs::metadata(&mem)
        .map_err(|e| format!("memory file: {e}"))?
        .len();
    if mem_len != key.memory_mib << 20 {
        return Err(format!(
            "the memory file holds {mem_len} bytes, not {} MiB",
            key.memory_mib
        ));
    }
    Ok(Template {
        id: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        state,
        mem,
    })
}

/// An exclusive `flock` on a lock file, released when the file is closed (on drop).
struct Lock {
    _file: File,
}

impl Lock {
    fn exclusive(path: &Path) -> Result<Self, ContainerError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(ContainerError::io(format!("opening {}", path.display())))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            eprintln!("hearth: waiting for another hearth to finish the template");
            loop {
                // SAFETY: as above.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    break;
                }
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(ContainerError::io(format!("locking {}", path.display()))(
                        err,
                    ));
                }
            }
        }
        Ok(Self { _file: file })
    }
}

/// Says what is going on while a template is made: a line, then on a terminal the
/// seconds spent booting.
struct Progress {
    tty: bool,
    start: Instant,
    shown: u64,
}

impl Progress {
    fn start(id: &str, mode: &str) -> Self {
        eprintln!(
            "hearth: making template {id} for {mode} VMs: booting the guest once, later starts restore it"
        );
        Self {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            shown: 0,
        }
    }

    fn tick(&mut self) {
        let secs = self.start.elapsed().as_secs();
        if self.tty && secs != self.shown {
            self.shown = secs;
            eprint!("\rhearth: booting the template VM... {secs} s");
            let _ = std::io::stderr().flush();
        }
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
        eprintln!(
            "hearth: template ready after {:.1} s",
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Boots a VM like `spec` in `dir`, waits for its agent, and snapshots it there.
fn build(
    spec: &VmSpec,
    key: &TemplateKey,
    dir: &Path,
    boot_timeout: u64,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), ContainerError> {
    let started = Instant::now();
    let mut progress = Progress::start(&key.id(), &key.mode);
    let mut disks = spec.disks.clone();
    for (index, disk) in disks.iter_mut().enumerate() {
        // An empty image: the guest reads nothing from it, and each restore gives the
        // slot its real image and announces the new size.
        let placeholder = dir.join(format!("slot{index}.img"));
        File::create(&placeholder).map_err(ContainerError::io(format!(
            "creating {}",
            placeholder.display()
        )))?;
        disk.path = placeholder;
    }
    // A throwaway back end per fs slot, sharing an empty folder: the guest's driver
    // probes the device at boot, nothing is mounted before the snapshot, and each
    // restore connects the device to the run's own back end.
    let mut backends = Vec::new();
    let mut fs = spec.fs.clone();
    let sockets = SocketDir::create().map_err(ContainerError::io(
        "creating a directory for virtio-fs sockets",
    ))?;
    if !fs.is_empty() {
        let program = spec
            .virtiofsd
            .as_deref()
            .ok_or_else(|| ContainerError::Vm("a VM with shared folders needs virtiofsd".into()))?;
        let empty = dir.join("empty");
        fs::create_dir(&empty)
            .map_err(ContainerError::io(format!("creating {}", empty.display())))?;
        for (index, device) in fs.iter_mut().enumerate() {
            device.socket = sockets.path().join(format!("fs{index}.sock"));
            let share = ShareSpec {
                folder: empty.clone(),
                read_only: true,
                socket: device.socket.clone(),
                log: dir.join("boot.log"),
                socket_owner: None,
                detached: false,
            };
            backends.push(Virtiofsd::start(program, &share)?);
        }
    }
    // A user-mode NIC is made on a passt of its own that publishes nothing: the ports
    // are the restores' (each restore gets a fresh passt with its VM's ports).
    let nets = (spec.nets.iter())
        .map(|nic| match &nic.backend {
            crate::devices::virtio::net::NetBackend::User(_) => {
                crate::devices::virtio::net::NetConfig {
                    backend: crate::devices::virtio::net::NetBackend::User(Default::default()),
                    ..nic.clone()
                }
            }
            _ => nic.clone(),
        })
        .collect();
    let build_spec = VmSpec {
        disks,
        nets,
        fs,
        vsock_socket: dir.join("v.sock"),
        console_log: dir.join("boot.log"),
        state_dir: dir.to_path_buf(),
        detached: false,
        // A jailed VMM could not write the snapshot: templates are made unjailed (their
        // restores are jailed, with the template's files bound in read-only).
        jail: None,
        ..spec.clone()
    };
    let deadline = Instant::now() + Duration::from_secs(boot_timeout);
    let container = key.mode == MODE_CONTAINER;
    let listener = if container {
        let path = PathBuf::from(format!(
            "{}_{AGENT_PORT}",
            build_spec.vsock_socket.display()
        ));
        let listener = crate::uds::bind(&path).map_err(ContainerError::io(format!(
            "listening on {}",
            path.display()
        )))?;
        listener
            .set_nonblocking(true)
            .map_err(ContainerError::io("listener"))?;
        Some(listener)
    } else {
        None
    };
    let mut child = ChildGuard(vm::spawn(&build_spec)?);
    let mut check = || {
        if let Ok(Some(status)) = child.0.try_wait() {
            return Err(ContainerError::Vm(format!(
                "the template VM stopped ({status}) while booting; console: {}",
                vm::log_tail(&build_spec.console_log, 3)
            )));
        }
        if cancelled() {
            return Err(ContainerError::Interrupted);
        }
        if Instant::now() >= deadline {
            return Err(ContainerError::Vm(format!(
                "the template VM's agent did not answer within {boot_timeout} s; console: {}",
                vm::log_tail(&build_spec.console_log, 3)
            )));
        }
        progress.tick();
        Ok(())
    };
    // The agent is ready for work once it has said hello (a container VM's agent then
    // waits for its request; a machine's agent serves every session alike).
    let _session = match &listener {
        Some(listener) => session::accept_agent(listener, &mut check)?,
        None => loop {
            if build_spec.vsock_socket.exists() {
                let timeout = Duration::from_secs(3);
                if let Ok(stream) = session::connect_agent(&build_spec.vsock_socket, timeout) {
                    break stream;
                }
            }
            check()?;
            std::thread::sleep(Duration::from_millis(20));
        },
    };
    let api = ApiClient::new(build_spec.api_socket(), API_TIMEOUT);
    let api_err = |what: &str| {
        let what = what.to_string();
        move |e: crate::api::client::ClientError| {
            ContainerError::Vm(format!("template VM: {what}: {}", crate::error_chain(&e)))
        }
    };
    api.set_vm_state(VmState::Paused)
        .map_err(api_err("pausing"))?;
    api.create_snapshot(&SnapshotCreateParams {
        snapshot_type: SnapshotType::Full,
        snapshot_path: dir.join("state"),
        mem_file_path: dir.join("mem"),
    })
    .map_err(api_err("snapshotting"))?;
    drop(child);
    drop(backends);
    for (index, _) in spec.disks.iter().enumerate() {
        let _ = fs::remove_file(dir.join(format!("slot{index}.img")));
    }
    let _ = fs::remove_dir(dir.join("empty"));
    write_info(dir, key, started.elapsed())?;
    progress.done();
    Ok(())
}

/// Writes `template.json`, the last file of a template made in `dir`.
fn write_info(dir: &Path, key: &TemplateKey, took: Duration) -> Result<(), ContainerError> {
    let info = TemplateInfo {
        key: key.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_seconds: took.as_secs_f64(),
    };
    let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
    fs::write(dir.join("template.json"), json).map_err(ContainerError::io("writing template.json"))
}

/// The template VM's VMM, killed however the build ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hearth template list|rm|prune`.
pub fn command(cmd: &crate::cli::TemplateCommand) -> Result<u8, ContainerError> {
    use crate::cli::TemplateCommand;
    let store = TemplateStore::default_location();
    match cmd {
        TemplateCommand::List => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{:<16} {:<9} {:>4} {:>7} {:>5} {:>4} {:>9} {:>8}  KERNEL",
                "ID", "MODE", "CPUS", "MEMORY", "DISKS", "NETS", "ON DISK", "STATUS"
            );
            for (id, info) in store.entries() {
                let size = disk_usage(&store.root.join(&id));
                match info {
                    Some(info) => {
                        let k = &info.key;
                        let status = if k.is_current() { "current" } else { "stale" };
                        let _ = writeln!(
                            out,
                            "{:<16} {:<9} {:>4} {:>6}M {:>5} {:>4} {:>8}M {:>8}  {}",
                            id,
                            k.mode,
                            k.vcpus,
                            k.memory_mib,
                            k.disks.len(),
                            k.nets,
                            size >> 20,
                            status,
                            k.kernel.path.display()
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "{id:<16} {:<9} {:>4} {:>7} {:>5} {:>4} {:>8}M {:>8}",
                            "?",
                            "?",
                            "?",
                            "?",
                            "?",
                            size >> 20,
                            "broken"
                        );
                    }
                }
            }
            Ok(0)
        }
        TemplateCommand::Rm { ids } => {
            let resolved = ids
                .iter()
                .map(|prefix| store.resolve(prefix))
                .collect::<Result<Vec<_>, _>>()?;
            for id in resolved {
                store.remove(&id)?;
                println!("removed template {id}");
            }
            Ok(0)
        }
        TemplateCommand::Prune { stale } => {
            for (id, info) in store.entries() {
                let keep = *stale && info.is_some_and(|i| i.key.is_current());
                if !keep {
                    store.remove(&id)?;
                    println!("removed template {id}");
                }
            }
            Ok(0)
        }
    }
}

/// Bytes a directory's files occupy on disk (a template's memory file is sparse).
fn disk_usage(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn key(dir: &Path) -> TemplateKey {
        let file = |name: &str| {
            let path = dir.join(name);
            fs::write(&path, name).unwrap();
            FileId::of(&path).unwrap()
        };
        TemplateKey {
            mode: "container".into(),
            kernel: file("vmlinux"),
            initrd: file("initrd"),
            hearth: file("hearth"),
            hearth_version: HEARTH_VERSION.into(),
            snapshot_format: FORMAT_VERSION,
            cmdline: "console=ttyS0".into(),
            cpu_profile: CpuProfile::Host,
            vcpus: 1,
            memory_mib: 1,
            disks: vec![true],
            nets: 0,
            nic_kinds: Vec::new(),
            fs: 0,
            balloon: None,
        }
    }

    #[test]
    fn every_part_of_the_key_changes_the_id() {
        let dir = TempDir::new("template-key");
        let base = key(dir.path());
        assert_eq!(base.id().len(), 16);
        assert_eq!(base.id(), base.clone().id());
        let mut variants = Vec::new();
        let mut k = base.clone();
        k.vcpus = 2;
        variants.push(k);
        let mut k = base.clone();
        k.balloon = Some(crate::container::machine::machine_balloon());
        variants.push(k);
        let mut k = base.clone();
        k.memory_mib = 2;
        variants.push(k);
        let mut k = base.clone();
        k.disks = vec![true, false];
        variants.push(k);
        let mut k = base.clone();
        k.nets = 1;
        variants.push(k);
        let mut k = base.clone();
        k.fs = 1;
        variants.push(k);
        let mut k = base.clone();
        k.cmdline.push_str(" quiet");
        variants.push(k);
        let mut k = base.clone();
        k.cpu_profile = CpuProfile::Compat;
        variants.push(k);
        let mut k = base.clone();
        k.kernel.len += 1;
        variants.push(k);
        for other in variants {
            assert_ne!(other.id(), base.id(), "{other:?}");
        }
    }

    #[test]
    fn a_changed_kernel_makes_the_key_stale() {
        let dir = TempDir::new("template-stale");
        let k = key(dir.path());
        assert!(k.is_current());
        fs::write(dir.path().join("vmlinux"), "another kernel").unwrap();
        assert!(!k.is_current());
    }

    #[test]
    fn incomplete_foreign_or_corrupt_templates_are_refused() {
        let dir = TempDir::new("template-check");
        let k = key(dir.path());
        let t = dir.path().join("t");
        fs::create_dir(&t).unwrap();
        assert_eq!(check(&t, &k).unwrap_err(), "no readable template.json");
        let info = TemplateInfo {
            key: k.clone(),
            created: 0,
            build_seconds: 0.0,
        };
        fs::write(t.join("template.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        let mut other = k.clone();
        other.vcpus = 4;
        assert_eq!(check(&t, &other).unwrap_err(), "made for another VM shape");
        fs::write(t.join("state"), b"not a snapshot").unwrap();
        let err = check(&t, &k).unwrap_err();
        assert!(err.contains("state"), "{err}");
    }

    /// Makes a template's files as a build would: a valid (empty) state file, a memory
    /// file of the key's size, template.json.
    fn fake_build(dir: &Path, key: &TemplateKey) -> Result<(), ContainerError> {
        use crate::snapshot::{HostFacts, Snapshot};
        use crate::vstate::memory::MemoryLayout;
        let host = HostFacts::for_guest(&[], CpuProfile::Host);
        Snapshot::new(host, MemoryLayout::default(), 0u32)
            .write(&dir.join("state"))
            .unwrap();
        File::create(dir.join("mem"))
            .unwrap()
            .set_len(key.memory_mib << 20)
            .unwrap();
        write_info(dir, key, Duration::ZERO)
    }

    #[test]
    fn concurrent_first_uses_make_one_template_and_corrupt_ones_are_made_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Barrier};

        let dir = TempDir::new("template-once");
        let k = key(dir.path());
        let root = dir.path().join("templates");
        let made = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(3));
        let users: Vec<_> = (0..3)
            .map(|_| {
                let (k, root, made, barrier) =
                    (k.clone(), root.clone(), made.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    TemplateStore::new(root)
                        .obtain_for(&k, &|building: &Path| {
                            made.fetch_add(1, Ordering::SeqCst);
                            // Long enough for the others to find the lock taken.
                            std::thread::sleep(Duration::from_millis(200));
                            fake_build(building, &k)
                        })
                        .unwrap()
                        .id
                })
            })
            .collect();
        let ids: Vec<String> = users.into_iter().map(|u| u.join().unwrap()).collect();
        assert_eq!(made.load(Ordering::SeqCst), 1);
        assert!(ids.iter().all(|id| *id == k.id()), "{ids:?}");

        // A damaged state file is found out and the template made again.
        let store = TemplateStore::new(&root);
        let state = root.join(k.id()).join("state");
        let mut bytes = fs::read(&state).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&state, bytes).unwrap();
        let again = store
            .obtain_for(&k, &|building: &Path| {
                made.fetch_add(1, Ordering::SeqCst);
                fake_build(building, &k)
            })
            .unwrap();
        assert_eq!(made.load(Ordering::SeqCst), 2);
        assert!(StateFile::read(&again.state).is_ok());

        // A failed build leaves nothing behind.
        let mut other = k.clone();
        other.vcpus = 2;
        let err = store
            .obtain_for(&other, &|_: &Path| {
                Err(ContainerError::Vm("no boot".into()))
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "no boot");
        assert_eq!(store.entries().len(), 1);
        assert!(fs::read_dir(&root).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')));
    }

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let dir = TempDir::new("template-ids");
        let store = TemplateStore::new(dir.path());
        for id in ["abc123", "abd456"] {
            fs::create_dir(dir.path().join(id)).unwrap();
        }
        assert_eq!(store.resolve("abc").unwrap(), "abc123");
        assert!(store
            .resolve("ab")
            .unwrap_err()
            .to_string()
            .contains("ambiguous"));
        assert!(store
            .resolve("zz")
            .unwrap_err()
            .to_string()
            .contains("no template"));
        assert!(store.resolve("").is_err());
        store.remove("abc123").unwrap();
        assert_eq!(store.entries().len(), 1);
    }
}
