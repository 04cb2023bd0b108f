//! The host side of an agent session (see `agent::protocol`): say hello, optionally load
//! an image, start a process, and pump its stdio and signals until it exits.
//!
//! Threads: the caller's thread reads frames from the agent and writes the process's
//! stdout and stderr to ours; one thread copies our stdin to the agent (`-i`); the signal
//! thread (see [`Signals`]) forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 as
//! `Signal` frames and SIGWINCH as `Resize`. Writers share the stream behind a mutex so
//! frames never interleave.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::agent::protocol::{
    read_message, write_message, Message, MountSpec, ProtocolError, RunSpec, AGENT_PORT,
    FORWARDED_SIGNALS, MAX_PAYLOAD, VERSION,
};

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("agent speaks protocol version {0}, this hearth speaks {VERSION}")]
    Version(u32),
    #[error("agent: {0}")]
    Agent(String),
    #[error("agent sent an unexpected {0} message")]
    Unexpected(&'static str),
    #[error("agent closed the connection before the process exited")]
    Closed,
    #[error("accepting the agent's connection: {0}")]
    Accept(io::Error),
    #[error("cannot connect to {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("vsock CONNECT to the agent was refused: {0:?}")]
    Refused(String),
    #[error("reading the image to send: {0}")]
    Image(io::Error),
    #[error("cannot read entropy for the guest: {0}")]
    Entropy(io::Error),
    #[error("the thread that reads the agent's messages ended abnormally")]
    RelayFailed,
    #[error("cannot filter the thread that reads the agent")]
    Seccomp(#[source] crate::seccomp::SeccompError),
}

type SharedStream = Arc<Mutex<UnixStream>>;

/// Catches the forwarded signals on a dedicated thread. Until a session is attached,
/// a terminating signal is only recorded ([`Signals::pending`]), so that a front end
/// still waiting for its VM can stop it and exit 128+signal.
#[derive(Clone)]
pub struct Signals {
    session: Arc<Mutex<Option<(SharedStream, bool)>>>,
    pending: Arc<AtomicI32>,
    /// Terminating signals forwarded in this session; see [`GIVE_UP_AFTER`].
    forwarded: Arc<AtomicI32>,
}

/// A guest that ignores this many forwarded SIGINT/SIGTERM/SIGHUP/SIGQUIT must not keep
/// the front end hostage: it then exits 128+signal at once (a container VM dies with it,
/// through its parent-death signal; a machine's agent kills the orphaned process).
pub const GIVE_UP_AFTER: i32 = 3;

impl Default for Signals {
    /// Signals that are never delivered (for tests and embedders that handle their own).
    fn default() -> Self {
        Signals {
            session: Arc::new(Mutex::new(None)),
            pending: Arc::new(AtomicI32::new(0)),
            forwarded: Arc::new(AtomicI32::new(0)),
        }
    }
}

impl Signals {
    /// Blocks the forwarded signals in this thread (and so in every thread spawned after)
    /// and starts the thread that receives them. Call before spawning other threads.
    pub fn install() -> Self {
        // SAFETY: the sigset is initialised by sigemptyset before use; blocking signals
        // in the calling thread has no memory-safety effects.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in FORWARDED_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
        let signals = Signals::default();
        let me = signals.clone();
        std::thread::spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is a valid sigset and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            me.deliver(sig);
        });
        signals
    }

    fn deliver(&self, sig: i32) {
        if sig == libc::SIGWINCH {
            let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((stream, true)) = &*session {
                if let Some((rows, cols)) = terminal_size() {
                    let mut s = stream.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = write_message(&mut *s, &Message::Resize { rows, cols });
                }
            }
            return;
        }
        let attached = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if attached
            && [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT].contains(&sig)
            && self.forwarded.fetch_add(1, Ordering::SeqCst) + 1 >= GIVE_UP_AFTER
        {
            crate::terminal::restore();
            eprintln!("hearth: the container ignored {GIVE_UP_AFTER} signals; giving up on it");
            std::process::exit(128 + sig);
        }
        self.forward(sig);
    }

    /// Sends `sig` to the attached session's process (a `Signal` frame), or, with none
    /// attached yet, keeps it for the session to send once its process started, as a
    /// signal to this process would be. For callers that get signals another way
    /// (`hearth oci kill` reaches its monitor over a socket).
    pub fn forward(&self, sig: i32) {
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        match &*session {
            Some((stream, _)) => {
                let mut s = stream.lock().unwrap_or_else(|p| p.into_inner());
                let _ = write_message(&mut *s, &Message::Signal(sig));
            }
            None => self.pending.store(sig, Ordering::SeqCst),
        }
    }

    /// A terminating signal received while no session was attached (0 if none).
    pub fn pending(&self) -> i32 {
        self.pending.load(Ordering::SeqCst)
    }

    fn attach(&self, stream: SharedStream, tty: bool) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some((stream, tty));
    }

    fn detach(&self) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The size of our terminal (rows, cols), when stdin or stdout is one.
pub fn terminal_size() -> Option<(u16, u16)> {
    for fd in [0, 1] {
        // SAFETY: an all-zero winsize is valid; TIOCGWINSZ writes into it.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a plain descriptor number; the ioctl fails cleanly if it is
        // not a terminal.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// Connects to a guest listener through the vsock device's Unix socket
/// (`CONNECT <port>` / `OK <port>`), as any host program would.
pub fn connect_vsock(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, SessionError> {
    let connect_err = |source| SessionError::Connect {
        path: socket.display().to_string(),
        source,
    };
    let mut stream = crate::uds::connect(socket).map_err(connect_err)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(connect_err)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(connect_err)?;
    let mut line = String::new();
    // Read byte by byte: nothing after the newline may be consumed.
    let mut reader = BufReader::with_capacity(1, &stream);
    reader.read_line(&mut line).map_err(connect_err)?;
    drop(reader);
    if !line.starts_with("OK ") {
        return Err(SessionError::Refused(line.trim_end().to_string()));
    }
    stream.set_read_timeout(None).map_err(connect_err)?;
    Ok(stream)
}

/// Connects to a machine's agent and says hello.
pub fn connect_agent(socket: &Path, timeout: Duration) -> Result<UnixStream, SessionError> {
    let mut stream = connect_vsock(socket, AGENT_PORT, timeout)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(ProtocolError::from)?;
    hello(&mut stream)?;
    stream.set_read_timeout(None).map_err(ProtocolError::from)?;
    Ok(stream)
}

/// Exchanges `Hello` messages and checks the version.
pub fn hello(stream: &mut UnixStream) -> Result<(), SessionError> {
    write_message(stream, &Message::Hello { version: VERSION })?;
    check_hello(read_message(stream)?)
}

fn check_hello(reply: Option<Message>) -> Result<(), SessionError> {
    match reply {
        Some(Message::Hello { version }) if version == VERSION => Ok(()),
        Some(Message::Hello { version }) => Err(SessionError::Version(version)),
        Some(Message::Error(text)) => Err(SessionError::Agent(text)),
        Some(_) => Err(SessionError::Unexpected("non-hello")),
        None => Err(SessionError::Closed),
    }
}

/// How long an agent that has started its `Hello` gets to finish it.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts the agent's connection on the non-blocking `listener` and says hello;
/// `check` runs between polls and stops the wait with its error (the VMM died, a signal,
/// the clock).
///
/// The agent connects again only once its previous connection is dead, so a newer
/// connection replaces one still waiting for its `Hello`, and one that ends before its
/// `Hello` is forgotten. Both happen to a guest restored from a template, whose vsock
/// connections a reset ends: the guest learns of it asynchronously, and it sends
/// nothing for a connection it drops that way.
pub fn accept_agent<E: From<SessionError>>(
    listener: &UnixListener,
    mut check: impl FnMut() -> Result<(), E>,
) -> Result<UnixStream, E> {
    let mut candidate: Option<UnixStream> = None;
    loop {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if candidate.take().is_some() {
                        log::debug!("the agent connected again; its earlier connection is dead");
                    }
                    stream
                        .set_nonblocking(false)
                        .map_err(SessionError::Accept)?;
                    let sent = write_message(&mut &stream, &Message::Hello { version: VERSION });
                    candidate = sent.is_ok().then_some(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(SessionError::Accept(e).into()),
            }
        }
        if let Some(stream) = candidate.as_ref().filter(|s| ready(&[s.as_raw_fd()], 0)) {
            stream
                .set_read_timeout(Some(HELLO_TIMEOUT))
                .map_err(SessionError::Accept)?;
            match read_message(&mut &*stream) {
                Ok(None) | Err(ProtocolError::Io(_)) => {
                    log::debug!("an agent connection ended before its Hello");
                    candidate = None;
                }
                Ok(reply) => {
                    check_hello(reply)?;
                    stream
                        .set_read_timeout(None)
                        .map_err(SessionError::Accept)?;
                    return Ok(candidate.take().expect("the candidate was just read"));
                }
                Err(e) => return Err(SessionError::from(e).into()),
            }
        }
        check()?;
        let mut fds = vec![listener.as_raw_fd()];
        fds.extend(candidate.as_ref().map(|s| s.as_raw_fd()));
        ready(&fds, ACCEPT_POLL_MS);
    }
}

/// How long one wait of [`accept_agent`] lasts before it checks on the VM again.
const ACCEPT_POLL_MS: i32 = 20;

/// Whether one of `fds` is readable within `timeout_ms`; a failed poll counts as not yet
/// (the caller polls again).
fn ready(fds: &[std::os::fd::RawFd], timeout_ms: i32) -> bool {
    crate::uds::poll_readable(fds, timeout_ms).unwrap_or(false)
}

/// Sends a request that the agent answers with one message.
fn request(stream: &mut UnixStream, msg: &Message) -> Result<Message, SessionError> {
    write_message(stream, msg)?;
    match read_message(stream)? {
        Some(Message::Error(text)) => Err(SessionError::Agent(text)),
        Some(reply) => Ok(reply),
        None => Err(SessionError::Closed),
    }
}

/// Makes sure the machine holds image `digest`, sending `tar` (a tar stream of its root
/// filesystem) if it does not. Returns whether it had to be sent.
pub fn ensure_image(
    stream: &mut UnixStream,
    digest: &str,
    tar: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<bool, SessionError> {
    let query = Message::ImageQuery {
        digest: digest.to_string(),
    };
    match request(stream, &query)? {
        Message::ImageStatus { present: true, .. } => return Ok(false),
        Message::ImageStatus { present: false, .. } => {}
        _ => return Err(SessionError::Unexpected("image query reply")),
    }
    write_message(
        stream,
        &Message::ImageLoad {
            digest: digest.to_string(),
        },
    )?;
    let mut frames = FrameWriter {
        stream,
        buf: Vec::with_capacity(MAX_PAYLOAD),
    };
    tar(&mut frames).map_err(SessionError::Image)?;
    frames.flush().map_err(SessionError::Image)?;
    match request(stream, &Message::ImageEnd)? {
        Message::ImageStatus { present: true, .. } => Ok(true),
        _ => Err(SessionError::Unexpected("image load reply")),
    }
}

/// A `Write` that sends what it is given as `ImageData` frames.
struct FrameWriter<'a> {
    stream: &'a mut UnixStream,
    buf: Vec<u8>,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = MAX_PAYLOAD - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_PAYLOAD {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            write_message(self.stream, &Message::ImageData(chunk)).map_err(io::Error::other)?;
        }
        Ok(())
    }
}

/// Starts `spec` and relays its stdio and our signals until it exits; returns its exit
/// status (the code, or 128 + signal). The stream must have said hello already.
pub fn run_process(
    stream: UnixStream,
    spec: RunSpec,
    signals: &Signals,
) -> Result<i32, SessionError> {
    let mut reader = stream;
    let forward_stdin = spec.stdin;
    let tty = spec.tty;
    let writer: SharedStream =
        Arc::new(Mutex::new(reader.try_clone().map_err(ProtocolError::from)?));
    write_message(
        &mut *writer.lock().unwrap_or_else(|p| p.into_inner()),
        &Message::Run(Box::new(spec)),
    )?;
    match read_message(&mut reader)? {
        Some(Message::Started { .. }) => {}
        Some(Message::Error(text)) => return Err(SessionError::Agent(text)),
        Some(_) => return Err(SessionError::Unexpected("reply to run")),
        None => return Err(SessionError::Closed),
    }
    // With -t and a terminal, keys go to the container's pty unprocessed (Ctrl-C becomes
    // the pty's SIGINT), as with `docker run -it`, and its output comes back as the
    // guest's pty made it.
    let _raw = if tty && forward_stdin {
        crate::terminal::RawTerminal::enable_passthrough(0)
    } else {
        None
    };
    signals.attach(writer.clone(), tty);
    if let Some(sig) = Some(signals.pending()).filter(|&s| s != 0) {
        let mut s = writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = write_message(&mut *s, &Message::Signal(sig));
    }
    if forward_stdin {
        let writer = writer.clone();
        std::thread::spawn(move || pump_stdin(writer));
    }
    // What the agent sends is parsed on a thread of its own, under a seccomp filter
    // (the front end runs as root; the agent is the guest's).
    let relay = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            crate::seccomp::install_now(crate::seccomp::ThreadKind::Relay)
                .map_err(SessionError::Seccomp)?;
            relay_output(&mut reader)
        })
        .map_err(|e| SessionError::Protocol(ProtocolError::Io(e)))?;
    let result = relay.join().unwrap_or(Err(SessionError::RelayFailed));
    signals.detach();
    result
}

fn pump_stdin(writer: SharedStream) {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let msg = match stdin.read(&mut buf) {
            Ok(0) => Message::StdinEof,
            Ok(n) => Message::Stdin(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => Message::StdinEof,
        };
        let eof = msg == Message::StdinEof;
        let mut s = writer.lock().unwrap_or_else(|p| p.into_inner());
        if write_message(&mut *s, &msg).is_err() || eof {
            return;
        }
    }
}

fn relay_output(reader: &mut UnixStream) -> Result<i32, SessionError> {
    let mut stdout = io::stdout();
    let mut stderr = io::stderr();
    loop {
        match read_message(reader)? {
            // A closed stdout (e.g. `| head`) must not stop the container's stderr or
            // its exit status from arriving.
            Some(Message::Stdout(data)) => {
                let _ = stdout.write_all(&data).and_then(|_| stdout.flush());
            }
            Some(Message::Stderr(data)) => {
                let _ = stderr.write_all(&data);
            }
            Some(Message::Exit { status }) => return Ok(status),
            Some(Message::Error(text)) => return Err(SessionError::Agent(text)),
            Some(_) => return Err(SessionError::Unexpected("stream")),
            None => return Err(SessionError::Closed),
        }
    }
}

/// Gives the agent of a VM restored from a template fresh entropy and the wall-clock time
/// (every clone of the template wakes with the same RNG state and the template's clock),
/// and waits until the guest has taken both.
pub fn refresh(stream: &mut UnixStream) -> Result<(), SessionError> {
    let mut entropy = vec![0u8; 64];
    crate::random::fill(&mut entropy).map_err(SessionError::Entropy)?;
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    match request(
        stream,
        &Message::Refresh {
            entropy,
            realtime_ns,
        },
    )? {
        Message::Refreshed => Ok(()),
        _ => Err(SessionError::Unexpected("reply to refresh")),
    }
}

/// Gives a machine's VM its network: eth0's MAC (for a clone of a template), address,
/// route and MTU, and its resolvers.
pub fn configure_network(
    stream: &mut UnixStream,
    setup: crate::agent::protocol::NetSetup,
) -> Result<(), SessionError> {
    match request(stream, &Message::Network(Box::new(setup)))? {
        Message::NetworkReady => Ok(()),
        _ => Err(SessionError::Unexpected("reply to network")),
    }
}

/// Asks a machine's agent to mount a shared folder.
pub fn mount(stream: &mut UnixStream, spec: MountSpec) -> Result<(), SessionError> {
    match request(stream, &Message::Mount(spec))? {
        Message::Mounted => Ok(()),
        _ => Err(SessionError::Unexpected("reply to mount")),
    }
}

/// Asks a machine's agent to stop its containers and power off.
pub fn shutdown(stream: &mut UnixStream) -> Result<(), SessionError> {
    match request(stream, &Message::Shutdown)? {
        Message::Exit { .. } => Ok(()),
        _ => Err(SessionError::Unexpected("reply to shutdown")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{Network, Rootfs};

    /// An agent end of a connection to `path`: it reads the host's Hello, then answers
    /// with its own (`answer`), hangs up (`!answer`), or neither while `keep` holds it.
    fn agent_connects(path: &Path, answer: bool) -> UnixStream {
        let mut stream = UnixStream::connect(path).unwrap();
        assert!(matches!(
            read_message(&mut stream).unwrap(),
            Some(Message::Hello { .. })
        ));
        if answer {
            write_message(&mut stream, &Message::Hello { version: VERSION }).unwrap();
        }
        stream
    }

    fn listener(dir: &crate::testutil::TempDir) -> (UnixListener, std::path::PathBuf) {
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        (listener, path)
    }

    /// A restored guest's first connection can die silently (its late transport reset):
    /// the agent's next connection is the one that gets the session.
    #[test]
    fn a_newer_agent_connection_replaces_a_silent_one() {
        let dir = crate::testutil::TempDir::new("accept-agent");
        let (listener, path) = listener(&dir);
        let agent = std::thread::spawn(move || {
            let silent = agent_connects(&path, false);
            let mut live = agent_connects(&path, true);
            // The host talks on the live one only.
            let msg = read_message(&mut live).unwrap();
            drop(silent);
            msg
        });
        let mut stream = accept_agent::<SessionError>(&listener, || Ok(())).unwrap();
        write_message(&mut stream, &Message::Shutdown).unwrap();
        assert!(matches!(agent.join().unwrap(), Some(Message::Shutdown)));
    }

    #[test]
    fn an_agent_connection_that_ends_before_hello_is_forgotten() {
        let dir = crate::testutil::TempDir::new("accept-agent");
        let (listener, path) = listener(&dir);
        let agent = std::thread::spawn(move || {
            drop(agent_connects(&path, false));
            let mut live = agent_connects(&path, true);
            read_message(&mut live).unwrap()
        });
        let mut stream = accept_agent::<SessionError>(&listener, || Ok(())).unwrap();
        write_message(&mut stream, &Message::Shutdown).unwrap();
        assert!(matches!(agent.join().unwrap(), Some(Message::Shutdown)));
    }

    #[test]
    fn waiting_for_the_agent_stops_when_the_check_fails() {
        let dir = crate::testutil::TempDir::new("accept-agent");
        let (listener, _path) = listener(&dir);
        let mut polls = 0;
        let result = accept_agent::<SessionError>(&listener, || {
            polls += 1;
            if polls == 3 {
                Err(SessionError::Closed)
            } else {
                Ok(())
            }
        });
        assert!(matches!(result, Err(SessionError::Closed)));
    }

    fn spec() -> RunSpec {
        RunSpec {
            argv: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
            user: None,
            hostname: None,
            tty: false,
            stdin: false,
            rootfs: Rootfs::Host,
            volumes: vec![],
            memory_limit: None,
            cpus: None,
            network: Network::Vm,
            net: None,
            name: None,
            term_size: None,
            mac: None,
            files: Vec::new(),
        }
    }

    /// A scripted agent on the other end of a socket pair.
    fn fake_agent(script: impl FnOnce(&mut UnixStream) + Send + 'static) -> UnixStream {
        let (host, mut agent) = UnixStream::pair().unwrap();
        std::thread::spawn(move || script(&mut agent));
        host
    }

    #[test]
    fn run_returns_the_exit_status() {
        let mut host = fake_agent(|a| {
            assert_eq!(
                read_message(a).unwrap(),
                Some(Message::Hello { version: VERSION })
            );
            write_message(a, &Message::Hello { version: VERSION }).unwrap();
            assert!(matches!(read_message(a).unwrap(), Some(Message::Run(_))));
            write_message(a, &Message::Started { pid: 1 }).unwrap();
            write_message(a, &Message::Stdout(Vec::new())).unwrap();
            write_message(a, &Message::Exit { status: 7 }).unwrap();
        });
        hello(&mut host).unwrap();
        let signals = Signals::default();
        assert_eq!(run_process(host, spec(), &signals).unwrap(), 7);
    }

    /// Whether a thread of this process named `name` runs under a seccomp filter.
    fn filtered_thread(name: &str) -> bool {
        let tasks = std::fs::read_dir("/proc/self/task").unwrap();
        tasks.flatten().any(|task| {
            let read = |file| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
            read("comm").trim() == name && read("status").contains("Seccomp:\t2")
        })
    }

    #[test]
    fn the_agent_is_read_on_a_filtered_thread() {
        let mut host = fake_agent(|a| {
            let _ = read_message(a);
            write_message(a, &Message::Hello { version: VERSION }).unwrap();
            let _ = read_message(a);
            write_message(a, &Message::Started { pid: 1 }).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !filtered_thread("relay") && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let status = if filtered_thread("relay") { 0 } else { 1 };
            write_message(a, &Message::Exit { status }).unwrap();
        });
        hello(&mut host).unwrap();
        assert_eq!(run_process(host, spec(), &Signals::default()).unwrap(), 0);
    }

    #[test]
    fn version_mismatch_and_agent_errors_are_reported() {
        let mut host = fake_agent(|a| {
            let _ = read_message(a);
            write_message(a, &Message::Hello { version: 99 }).unwrap();
        });
        assert!(matches!(hello(&mut host), Err(SessionError::Version(99))));

        let host = fake_agent(|a| {
            let _ = read_message(a);
            write_message(a, &Message::Error("exec: nope".into())).unwrap();
        });
        let signals = Signals::default();
        let err = run_process(host, spec(), &signals).unwrap_err().to_string();
        assert_eq!(err, "agent: exec: nope");

        let host = fake_agent(|a| {
            let _ = read_message(a);
            write_message(a, &Message::Started { pid: 1 }).unwrap();
        });
        assert!(matches!(
            run_process(host, spec(), &signals),
            Err(SessionError::Closed)
        ));
    }

    #[test]
    fn images_are_sent_only_when_missing() {
        let mut host = fake_agent(|a| {
            let Some(Message::ImageQuery { digest }) = read_message(a).unwrap() else {
                panic!("expected a query");
            };
            write_message(
                a,
                &Message::ImageStatus {
                    digest: digest.clone(),
                    present: false,
                },
            )
            .unwrap();
            assert!(matches!(
                read_message(a).unwrap(),
                Some(Message::ImageLoad { .. })
            ));
            let mut total = 0;
            loop {
                match read_message(a).unwrap() {
                    Some(Message::ImageData(d)) => {
                        assert!(d.len() <= MAX_PAYLOAD);
                        total += d.len();
                    }
                    Some(Message::ImageEnd) => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(total, 200_000);
            write_message(
                a,
                &Message::ImageStatus {
                    digest,
                    present: true,
                },
            )
            .unwrap();
            let Some(Message::ImageQuery { digest }) = read_message(a).unwrap() else {
                panic!("expected a query");
            };
            write_message(
                a,
                &Message::ImageStatus {
                    digest,
                    present: true,
                },
            )
            .unwrap();
        });
        let sent = ensure_image(&mut host, "sha256:ab", |w| w.write_all(&[1u8; 200_000])).unwrap();
        assert!(sent);
        let sent = ensure_image(&mut host, "sha256:ab", |_| panic!("must not send")).unwrap();
        assert!(!sent);
    }
}
