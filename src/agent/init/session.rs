//! One protocol session over any byte stream (vsock in the VM, a Unix socket pair in
//! tests): the Hello exchange, image loads (machines), then one `Run` or `Shutdown`.
//!
//! A `Run` is served by a few threads that share the stream: the session thread waits
//! for the exit status; one pump per output stream forwards it in frames of at most
//! 32 KiB; a host reader handles `Stdin`/`StdinEof`/`Signal`/`Resize`; a feeder writes
//! stdin to the process. Nothing buffers without bound: when the host stops reading, a
//! pump blocks in its write and the process blocks on its full pipe; when the process
//! stops reading stdin, the feeder's small queue fills and the host reader stops reading.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bridge::{self, Attachment, Bridge};
use super::forward;
use super::image::ImageStore;
use super::launch::{self, Launch, Launcher, ParentIo};
use super::net;
use super::reaper::Reaper;
use super::refresh;
use super::sandbox::{Lower, Plan, Target};
use super::shares;
use super::sys;
use super::timing::Marks;
use crate::agent::protocol::{
    read_message, write_message, Message, Network, ProtocolError, Rootfs, RunSpec, VERSION,
};
use crate::error_chain;

/// Largest Stdout/Stderr frame the agent sends.
const CHUNK: usize = 32 * 1024;
/// Stdin frames queued for a process that is not reading (each at most MAX_PAYLOAD).
const STDIN_QUEUE: usize = 4;

/// Which kind of VM the agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMode {
    Container,
    Machine,
}

/// What the agent should do after a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The connection ended before the host asked for anything but a [`Message::Refresh`]:
    /// in a container VM restored from a template, the restore reset it (the template's
    /// builder connected, then the VM was saved), and the agent connects again.
    Idle,
    /// The host asked the machine to shut down.
    PowerOff,
}

/// Why a session ended abnormally (after which nothing more can be said to the host).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("cannot start a session thread")]
    Thread(#[source] io::Error),
}

/// Where the agent keeps things and how it starts processes.
pub struct AgentConfig {
    pub mode: AgentMode,
    pub launcher: Launcher,
    /// Unpacked images (machines): `/var/lib/hearth/images`.
    pub images: PathBuf,
    /// Per-container mount points: `/run/hearth/c`.
    pub state_root: PathBuf,
    /// cgroup v2 root for per-container cgroups; `None` runs containers without one.
    pub cgroup_root: Option<PathBuf>,
    /// `PATH` for `Rootfs::Host` processes whose environment has none.
    pub host_path: String,
    /// The bridge of `Network::Bridge` containers, or why there is none.
    pub bridge: Result<Bridge, String>,
    /// Where the VM's resolvers are listed (`/etc/resolv.conf`), for its containers.
    pub resolv_conf: PathBuf,
}

struct Container {
    /// VM pid of the container's PID-namespace init; 0 while it starts.
    target: i32,
    cgroup: Option<PathBuf>,
    /// Its place on the bridge; dropped (veth deleted, address freed) with the entry.
    net: Option<Attachment>,
}

/// State shared by all sessions of one agent.
pub struct Agent {
    config: AgentConfig,
    reaper: Arc<Reaper>,
    images: ImageStore,
    containers: Mutex<HashMap<String, Container>>,
    next_id: AtomicU64,
}

/// The stream, shared by the session's threads; writes are serialized.
struct Link<S> {
    stream: Arc<S>,
    write: Mutex<()>,
}

impl<S> Link<S>
where
    for<'a> &'a S: Read + Write,
{
    fn send(&self, msg: &Message) -> Result<(), ProtocolError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        write_message(&mut &*self.stream, msg)
    }

    fn recv(&self) -> Result<Option<Message>, ProtocolError> {
        read_message(&mut &*self.stream)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Removes a container from the registry when its session ends.
struct NameGuard<'a> {
    agent: &'a Agent,
    name: Option<String>,
}

impl Drop for NameGuard<'_> {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            self.agent.registry().remove(name);
        }
    }
}

impl Agent {
    pub fn new(config: AgentConfig, reaper: Arc<Reaper>) -> Arc<Agent> {
        let images = ImageStore::new(&config.images);
        Arc::new(Agent {
            config,
            reaper,
            images,
            containers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one session to its end.
    pub fn serve<S>(self: &Arc<Self>, stream: S) -> Result<Outcome, SessionError>
    where
        S: std::os::fd::AsRawFd + Send + Sync + 'static,
        for<'a> &'a S: Read + Write,
    {
        let link = Arc::new(Link {
            stream: Arc::new(stream),
            write: Mutex::new(()),
        });
        // Until the host asks for something, a connection that ends is not a failure: a
        // template's builder may have saved the VM at any point after reading our Hello.
        match link.send(&Message::Hello { version: VERSION }) {
            Err(ProtocolError::Io(_)) => return Ok(Outcome::Idle),
            other => other?,
        }
        let hello = match link.recv() {
            Ok(None) | Err(ProtocolError::Io(_)) => return Ok(Outcome::Idle),
            other => other?,
        };
        match hello {
            Some(Message::Hello { version }) if version == VERSION => {}
            Some(Message::Hello { version }) => {
                link.send(&Message::Error(format!(
                    "protocol version mismatch: the agent speaks {VERSION}, the host {version}"
                )))?;
                return Ok(Outcome::Done);
            }
            Some(_) => {
                link.send(&Message::Error("expected Hello first".into()))?;
                return Ok(Outcome::Done);
            }
            None => return Ok(Outcome::Idle),
        }
        let mut idle = true;
        loop {
            let msg = match link.recv() {
                Ok(Some(msg)) => msg,
                Ok(None) | Err(ProtocolError::Io(_)) if idle => return Ok(Outcome::Idle),
                Ok(None) => return Ok(Outcome::Done),
                Err(e) => return Err(e.into()),
            };
            if !matches!(msg, Message::Refresh { .. }) {
                idle = false;
            }
            match msg {
                Message::Refresh {
                    entropy,
                    realtime_ns,
                } => {
                    let refreshed = refresh::reseed(&entropy)
                        .map_err(|e| format!("cannot reseed the guest RNG: {e}"))
                        .and_then(|()| {
                            refresh::set_clock(realtime_ns)
                                .map_err(|e| format!("cannot set the guest clock: {e}"))
                        });
                    match refreshed {
                        Ok(()) => link.send(&Message::Refreshed)?,
                        Err(text) => {
                            link.send(&Message::Error(text))?;
                            return Ok(Outcome::Done);
                        }
                    }
                }
                Message::Network(setup) if self.config.mode == AgentMode::Machine => {
                    match configure_vm_network(&setup, &self.config.resolv_conf) {
                        Ok(()) => link.send(&Message::NetworkReady)?,
                        Err(text) => {
                            link.send(&Message::Error(text))?;
                            return Ok(Outcome::Done);
                        }
                    }
                }
                Message::ImageQuery { digest } if self.config.mode == AgentMode::Machine => {
                    link.send(&match self.images.present(&digest) {
                        Ok(present) => Message::ImageStatus { digest, present },
                        Err(e) => Message::Error(error_chain(&e)),
                    })?;
                }
                Message::ImageLoad { digest } if self.config.mode == AgentMode::Machine => {
                    self.load_image(&link, digest)?;
                }
                Message::Run(spec) => {
                    self.run(&link, *spec)?;
                    return Ok(Outcome::Done);
                }
                Message::Forward(spec) if self.config.mode == AgentMode::Machine => {
                    let address = self.container_address(&spec.container);
                    forward::serve(&*link.stream, &link.write, address, &spec)?;
                    return Ok(Outcome::Done);
                }
                Message::Mount(share) if self.config.mode == AgentMode::Machine => {
                    link.send(&match shares::mount_share(&share) {
                        Ok(()) => Message::Mounted,
                        Err(e) => Message::Error(error_chain(&e)),
                    })?;
                }
                Message::Shutdown => {
                    self.stop_all_containers();
                    link.send(&Message::Exit { status: 0 })?;
                    return Ok(Outcome::PowerOff);
                }
                other => {
                    let text = match other {
                        Message::ImageQuery { .. } | Message::ImageLoad { .. } => {
                            "images can only be loaded into a machine".to_string()
                        }
                        Message::Forward(_) => {
                            "ports are forwarded by vsock only to a machine's containers"
                                .to_string()
                        }
                        other => format!("unexpected message (kind {})", other.encode().0),
                    };
                    link.send(&Message::Error(text))?;
                    return Ok(Outcome::Done);
                }
            }
        }
    }

    fn load_image<S>(&self, link: &Link<S>, digest: String) -> Result<(), SessionError>
    where
        for<'a> &'a S: Read + Write,
    {
        let mut frames = ImageFrames {
            link,
            data: Vec::new(),
            pos: 0,
            ended: false,
            violation: None,
        };
        let result = self.images.load(&digest, &mut frames);
        // The tar reader may stop before the end of the stream (or never start).
        frames.drain();
        if let Some(err) = frames.violation.take() {
            return Err(err.into());
        }
        link.send(&match result {
            Ok(()) => Message::ImageStatus {
                digest,
                present: true,
            },
            Err(e) => Message::Error(error_chain(&e)),
        })?;
        Ok(())
    }

    /// Kills every container (for Shutdown) and waits briefly for their sessions.
    pub fn stop_all_containers(&self) {
        for container in self.registry().values() {
            if container.target > 0 {
                let _ = sys::kill(container.target, libc::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.registry().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The bridge address of the running container `name`.
    fn container_address(&self, name: &str) -> Result<std::net::Ipv4Addr, String> {
        let registry = self.registry();
        let container = registry
            .get(name)
            .ok_or_else(|| format!("no running container named {name:?}"))?;
        container
            .net
            .as_ref()
            .map(|n| n.address)
            .ok_or_else(|| format!("container {name:?} is not on the machine's bridge"))
    }

    /// A network namespace on the bridge for the container `id` (registered already).
    fn attach(&self, id: &str) -> Result<Option<bridge::ContainerNet>, String> {
        let bridge =
            self.config.bridge.as_ref().map_err(|why| {
                format!("the container cannot have a network of its own here: {why}")
            })?;
        let attachment = bridge.attach().map_err(|e| {
            format!(
                "cannot connect the container to the bridge: {}",
                error_chain(&e)
            )
        })?;
        let resolv = std::fs::read_to_string(&self.config.resolv_conf).unwrap_or_default();
        let plan = attachment.plan(bridge::container_resolv_conf(&resolv));
        if let Some(c) = self.registry().get_mut(id) {
            c.net = Some(attachment);
        }
        Ok(plan)
    }

    fn plan(&self, spec: &RunSpec) -> Result<(Plan, Option<String>), String> {
        let target = match &spec.rootfs {
            Rootfs::Host => Target::Host {
                default_path: self.config.host_path.clone(),
            },
            Rootfs::Container { name } => {
                let registry = self.registry();
                let container = registry
                    .get(name)
                    .filter(|c| c.target > 0)
                    .ok_or_else(|| format!("no running container named {name:?}"))?;
                Target::Join {
                    pid: container.target,
                    cgroup: container.cgroup.clone(),
                }
            }
            Rootfs::Device { .. } | Rootfs::Image { .. } => {
                let lower = match &spec.rootfs {
                    Rootfs::Device { path, fstype } => Lower::Device {
                        path: path.clone(),
                        fstype: fstype.clone(),
                    },
                    Rootfs::Image { digest } => {
                        let dir = self.images.path(digest).map_err(|e| error_chain(&e))?;
                        if !dir.is_dir() {
                            return Err(format!("image {digest} is not loaded"));
                        }
                        Lower::Dir(dir)
                    }
                    _ => unreachable!("matched above"),
                };
                let id = self.reserve(spec.name.as_deref())?;
                // A container VM runs one container: without limits to apply, a cgroup
                // of its own would separate it from nothing (and costs a mkdir and an
                // rmdir in cgroupfs, both slow in the guest).
                let alone = self.config.mode == AgentMode::Container;
                let limited = spec.memory_limit.is_some() || spec.cpus.is_some();
                let cgroup = self
                    .config
                    .cgroup_root
                    .as_ref()
                    .filter(|_| limited || !alone)
                    .map(|root| root.join(format!("hearth-{id}")));
                if let Some(c) = self.registry().get_mut(&id) {
                    c.cgroup = cgroup.clone();
                }
                let net = if spec.network == Network::Bridge {
                    match self.attach(&id) {
                        Ok(net) => net,
                        Err(text) => {
                            self.registry().remove(&id);
                            return Err(text);
                        }
                    }
                } else {
                    None
                };
                let plan = Plan {
                    spec: spec.clone(),
                    target: Target::Sandbox {
                        lower,
                        state_dir: self.config.state_root.join(&id),
                        cgroup,
                        alone,
                        net,
                    },
                    marks: false,
                };
                return Ok((plan, Some(id)));
            }
        };
        Ok((
            Plan {
                spec: spec.clone(),
                target,
                marks: false,
            },
            None,
        ))
    }

    /// Picks the container id (its name, or a fresh number) and registers it, so that
    /// `Rootfs::Container` and `Shutdown` find every running container.
    fn reserve(&self, name: Option<&str>) -> Result<String, String> {
        if let Some(name) = name {
            if !valid_name(name) {
                return Err(format!(
                    "invalid container name {name:?} (letters, digits, '_', '.', '-'; at most 64)"
                ));
            }
            let mut registry = self.registry();
            if registry.contains_key(name) {
                return Err(format!("container name {name:?} is already in use"));
            }
            registry.insert(
                name.to_string(),
                Container {
                    target: 0,
                    cgroup: None,
                    net: None,
                },
            );
            return Ok(name.to_string());
        }
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
            let mut registry = self.registry();
            if !registry.contains_key(&id) && !self.config.state_root.join(&id).exists() {
                registry.insert(
                    id.clone(),
                    Container {
                        target: 0,
                        cgroup: None,
                        net: None,
                    },
                );
                return Ok(id);
            }
        }
    }

    fn run<S>(self: &Arc<Self>, link: &Arc<Link<S>>, spec: RunSpec) -> Result<(), SessionError>
    where
        S: Send + Sync + 'static,
        for<'a> &'a S: Read + Write,
    {
        let marks = Marks::start(&format!("run {}", spec.name.as_deref().unwrap_or("-")));
        let result = self.run_marked(link, spec, &marks);
        marks.log();
        result
    }

    fn run_marked<S>(
        self: &Arc<Self>,
        link: &Arc<Link<S>>,
        mut spec: RunSpec,
        marks: &Marks,
    ) -> Result<(), SessionError>
    where
        S: Send + Sync + 'static,
        for<'a> &'a S: Read + Write,
    {
        if spec.argv.is_empty() {
            link.send(&Message::Error("nothing to run: empty argv".into()))?;
            return Ok(());
        }
        // A VM restored from a template learns its disks' sizes asynchronously.
        let disks = match &spec.rootfs {
            Rootfs::Device { path, .. } => Some(path.as_str()),
            _ => None,
        };
        let disks = disks.into_iter().chain(
            (spec.volumes.iter())
                .filter(|v| v.source.is_none())
                .map(|v| v.device.as_str()),
        );
        for disk in disks {
            if let Err(e) = refresh::wait_for_disk(disk) {
                link.send(&Message::Error(format!("disk {disk}: {e}")))?;
                return Ok(());
            }
            refresh::tune_disk(disk);
        }
        let machine = self.config.mode == AgentMode::Machine;
        if let Err(e) =
            shares::write_files(&mut spec).and_then(|()| shares::mount_volumes(&mut spec, machine))
        {
            link.send(&Message::Error(error_chain(&e)))?;
            return Ok(());
        }
        if let Some(mac) = &spec.mac {
            if let Err(e) = net::set_mac("eth0", mac) {
                link.send(&Message::Error(error_chain(&e)))?;
                return Ok(());
            }
        }
        if let Some(config) = &spec.net {
            if let Err(e) = net::configure("eth0", config) {
                link.send(&Message::Error(error_chain(&e)))?;
                return Ok(());
            }
            marks.mark("eth0 configured");
        }
        let (mut plan, name) = match self.plan(&spec) {
            Ok(p) => p,
            Err(text) => {
                link.send(&Message::Error(text))?;
                return Ok(());
            }
        };
        let _name = NameGuard {
            agent: self,
            name: name.clone(),
        };
        plan.marks = marks.enabled();
        marks.mark("planned");
        let launched = launch::launch(&self.reaper, &self.config.launcher, &plan, marks);
        let running = match launched {
            Err(e) => {
                self.cleanup(&plan);
                link.send(&Message::Error(error_chain(&e)))?;
                return Ok(());
            }
            Ok(Launch::Failed { message, exit, .. }) => {
                let _ = exit.recv();
                self.cleanup(&plan);
                link.send(&Message::Error(message))?;
                return Ok(());
            }
            Ok(Launch::Running(running)) => running,
        };
        if let Some(name) = &name {
            if let Some(c) = self.registry().get_mut(name) {
                c.target = running.target;
            }
        }
        link.send(&Message::Started {
            pid: running.target,
        })?;
        marks.mark("Started sent");
        let alone = running.status.is_some();
        let exit = Exit {
            reaped: running.exit,
            early: running.status,
        };
        let status = self.attend(link, running.target, exit, running.io, marks)?;
        if alone {
            // The VM ends with its only container: nothing to clean up but the data of
            // writable volumes, which must be on the host's files before the host,
            // told the status, stops the VM.
            if spec_has_writable_volumes(&plan) {
                sys::sync();
                marks.mark("synced");
            }
        } else {
            self.cleanup(&plan);
            marks.mark("cleaned up");
        }
        drop(_name);
        link.send(&Message::Exit { status })?;
        marks.mark("Exit sent");
        Ok(())
    }

    /// Streams the process's stdio until it exits; returns its shell-style status.
    fn attend<S>(
        &self,
        link: &Arc<Link<S>>,
        target: i32,
        exit: Exit,
        io: ParentIo,
        marks: &Marks,
    ) -> Result<i32, SessionError>
    where
        S: Send + Sync + 'static,
        for<'a> &'a S: Read + Write,
    {
        let (exit_r, exit_w) = sys::pipe().map_err(SessionError::Thread)?;
        let exit_r = Arc::new(exit_r);
        let exited = Arc::new(AtomicBool::new(false));
        let is_pty = io.pty.is_some();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(SessionError::Thread)
        };

        let mut pumps = Vec::new();
        let outputs = [
            (Some(io.stdout), Message::Stdout as fn(Vec<u8>) -> Message),
            (io.stderr, Message::Stderr as fn(Vec<u8>) -> Message),
        ];
        for (file, wrap) in outputs {
            if let Some(file) = file {
                let (link, exit_r) = (link.clone(), exit_r.clone());
                pumps.push(spawn(
                    "pump",
                    Box::new(move || pump(file, &link, wrap, exit_r.as_raw_fd(), is_pty)),
                )?);
            }
        }
        let stdin_tx = match io.stdin {
            Some(file) => {
                let (tx, rx) = mpsc::sync_channel::<Option<Vec<u8>>>(STDIN_QUEUE);
                let exit_r = exit_r.clone();
                pumps.push(spawn(
                    "stdin",
                    Box::new(move || feed(file, rx, exit_r.as_raw_fd(), is_pty)),
                )?);
                Some(tx)
            }
            None => None,
        };
        // The host reader is not joined: it ends when the host closes the stream.
        {
            let (link, exited, pty) = (link.clone(), exited.clone(), io.pty);
            spawn(
                "host-reader",
                Box::new(move || read_host(&link, stdin_tx, pty, target, &exited)),
            )?;
        }

        let status = exit.wait();
        marks.mark("process exited");
        exited.store(true, Ordering::SeqCst);
        drop(exit_w);
        for pump in pumps {
            let _ = pump.join();
        }
        marks.mark("output forwarded");
        Ok(status)
    }

    /// Removes what a sandbox leaves in the VM: its cgroup and its mount-point dirs.
    fn cleanup(&self, plan: &Plan) {
        let Target::Sandbox {
            state_dir, cgroup, ..
        } = &plan.target
        else {
            return;
        };
        if let Some(dir) = cgroup {
            remove_cgroup(dir);
        }
        // Only empty directories: the mounts lived in the container's own namespace.
        for sub in ["lower", "rw", "rootfs", ""] {
            let path = state_dir.join(sub);
            if path.exists() {
                if let Err(e) = std::fs::remove_dir(&path) {
                    log::warn!("cannot remove {}: {e}", path.display());
                }
            }
        }
    }
}

/// The machine's own eth0 (MAC, address, route, MTU) and its resolvers, which its
/// containers' `/etc/resolv.conf` copy.
fn configure_vm_network(
    setup: &crate::agent::protocol::NetSetup,
    resolv_conf: &Path,
) -> Result<(), String> {
    // A gratuitous ARP when eth0 comes up: passt learns the guest's MAC address from the
    // guest's frames, and a machine that has sent none could not be reached through its
    // published ports.
    if let Err(e) = sys::write_text(Path::new("/proc/sys/net/ipv4/conf/eth0/arp_notify"), "1") {
        log::warn!("cannot turn on arp_notify for eth0: {e}");
    }
    if let Some(mac) = &setup.mac {
        net::set_mac("eth0", mac).map_err(|e| error_chain(&e))?;
    }
    net::configure("eth0", &setup.net).map_err(|e| error_chain(&e))?;
    if !setup.net.dns.is_empty() {
        let text: String = (setup.net.dns.iter())
            .map(|server| format!("nameserver {server}\n"))
            .collect();
        // The machine's root (the initramfs's contents) may have no /etc.
        if let Some(dir) = resolv_conf.parent() {
            let _ = sys::mkdir_all(dir);
        }
        std::fs::write(resolv_conf, text)
            .map_err(|e| format!("cannot write {}: {e}", resolv_conf.display()))?;
    }
    Ok(())
}

/// Where a started process's exit status comes from.
struct Exit {
    /// The raw wait status of the process the agent started.
    reaped: Receiver<i32>,
    /// A container alone in its VM: its status from its supervisor, which never ends.
    early: Option<File>,
}

impl Exit {
    /// The process's shell-style status (255 when it cannot be known).
    fn wait(self) -> i32 {
        if let Some(mut file) = self.early {
            let mut bytes = [0u8; 4];
            if file.read_exact(&mut bytes).is_ok() {
                return i32::from_le_bytes(bytes);
            }
            // The supervisor ended without a word (it crashed): its own status tells.
        }
        self.reaped.recv().map(sys::status_code).unwrap_or(255)
    }
}

fn spec_has_writable_volumes(plan: &Plan) -> bool {
    plan.spec.volumes.iter().any(|v| !v.readonly)
}

fn remove_cgroup(dir: &std::path::Path) {
    if !dir.exists() {
        return;
    }
    let kill_file = dir.join("cgroup.kill");
    for attempt in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => {}
        }
        if attempt % 10 == 0 {
            // Whatever is left of the container goes now.
            if sys::write_text(&kill_file, "1").is_err() {
                if let Ok(procs) = sys::read_text(&dir.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
                        let _ = sys::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    log::warn!("cannot remove cgroup {}", dir.display());
}

/// Reads `ImageData` frames as one byte stream, up to `ImageEnd`.
struct ImageFrames<'a, S> {
    link: &'a Link<S>,
    data: Vec<u8>,
    pos: usize,
    ended: bool,
    violation: Option<ProtocolError>,
}

impl<S> ImageFrames<'_, S>
where
    for<'a> &'a S: Read + Write,
{
    fn next_frame(&mut self) -> io::Result<()> {
        let bad = |text: &str| io::Error::new(io::ErrorKind::InvalidData, text.to_string());
        match self.link.recv() {
            Ok(Some(Message::ImageData(data))) => {
                self.data = data;
                self.pos = 0;
                Ok(())
            }
            Ok(Some(Message::ImageEnd)) => {
                self.ended = true;
                Ok(())
            }
            Ok(Some(_)) => {
                self.ended = true;
                self.violation = Some(ProtocolError::Malformed {
                    kind: "image load",
                    reason: "unexpected message before ImageEnd".into(),
                });
                Err(bad("unexpected message during the image load"))
            }
            Ok(None) => {
                self.ended = true;
                self.violation = Some(ProtocolError::Truncated);
                Err(bad("connection closed during the image load"))
            }
            Err(e) => {
                self.ended = true;
                let text = e.to_string();
                self.violation = Some(e);
                Err(bad(&text))
            }
        }
    }

    fn drain(&mut self) {
        while !self.ended {
            if self.next_frame().is_err() {
                break;
            }
        }
    }
}

impl<S> Read for ImageFrames<'_, S>
where
    for<'a> &'a S: Read + Write,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.data.len() {
            if self.ended {
                return Ok(0);
            }
            self.next_frame()?;
        }
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Forwards one output stream as frames. After the process exits (`exit_fd` hangs up)
/// it sends what is still buffered and stops, even if a background process keeps the
/// stream open.
fn pump<S>(
    mut src: File,
    link: &Link<S>,
    wrap: fn(Vec<u8>) -> Message,
    exit_fd: RawFd,
    is_pty: bool,
) where
    for<'a> &'a S: Read + Write,
{
    let mut buf = vec![0u8; CHUNK];
    let mut draining = false;
    loop {
        if !draining {
            let mut fds = [
                libc::pollfd {
                    fd: src.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: exit_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if sys::poll(&mut fds, -1).is_err() {
                return;
            }
            if fds[1].revents != 0 {
                draining = true;
                let _ = sys::set_nonblocking(src.as_raw_fd(), true);
            } else if fds[0].revents == 0 {
                continue;
            }
        }
        match src.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if link.send(&wrap(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A pty may deliver the process's last output a moment after its exit.
                if draining
                    && !(is_pty
                        && sys::wait_fd(src.as_raw_fd(), libc::POLLIN, 100).unwrap_or(false))
                {
                    return;
                }
            }
            // EIO: every pty slave is closed.
            Err(_) => return,
        }
    }
}

/// Writes queued stdin data to the process; `None` closes it (or sends ^D to a pty).
fn feed(mut dst: File, rx: Receiver<Option<Vec<u8>>>, exit_fd: RawFd, is_pty: bool) {
    let _ = sys::set_nonblocking(dst.as_raw_fd(), true);
    loop {
        let item = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(item) => item,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Idle: stop once the process has exited.
                if sys::wait_fd(exit_fd, libc::POLLIN, 0).unwrap_or(true) {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let data = match item {
            Some(data) => data,
            None if is_pty => vec![4],
            None => return,
        };
        let mut rest = &data[..];
        while !rest.is_empty() {
            match dst.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [
                        libc::pollfd {
                            fd: dst.as_raw_fd(),
                            events: libc::POLLOUT,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: exit_fd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    if sys::poll(&mut fds, -1).is_err() || fds[1].revents != 0 {
                        return;
                    }
                }
                // EPIPE: the process closed its stdin.
                Err(_) => return,
            }
        }
        if is_pty && data == [4] {
            return;
        }
    }
}

/// Handles what the host sends while the process runs.
fn read_host<S>(
    link: &Link<S>,
    mut stdin: Option<mpsc::SyncSender<Option<Vec<u8>>>>,
    pty: Option<File>,
    target: i32,
    exited: &AtomicBool,
) where
    for<'a> &'a S: Read + Write,
{
    loop {
        match link.recv() {
            Ok(Some(Message::Stdin(data))) => {
                if let Some(tx) = &stdin {
                    if tx.send(Some(data)).is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some(Message::StdinEof)) => {
                if let Some(tx) = stdin.take() {
                    let _ = tx.send(None);
                }
            }
            Ok(Some(Message::Signal(sig))) => {
                if !exited.load(Ordering::SeqCst) {
                    if let Err(e) = sys::kill(target, sig) {
                        log::debug!("signal {sig} to {target}: {e}");
                    }
                }
            }
            Ok(Some(Message::Resize { rows, cols })) => {
                if let Some(pty) = &pty {
                    let _ = launch::set_winsize(pty.as_raw_fd(), rows, cols);
                }
            }
            Ok(Some(other)) => {
                log::debug!("ignoring message kind {} during a run", other.encode().0);
            }
            Ok(None) | Err(_) => {
                // The host went away: nobody can see the process any more.
                if !exited.load(Ordering::SeqCst) {
                    let _ = sys::kill(target, libc::SIGKILL);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
