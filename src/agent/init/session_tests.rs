//! Sessions over a Unix socket pair, with processes started through the real sandbox
//! path (the test binary re-executes itself as the sandbox). Tests that need root and
//! namespaces skip with a note when they cannot run.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;

use super::*;
use crate::agent::init::reaper::ReapMode;
use crate::agent::init::resolve;
use crate::agent::init::sandbox;
use crate::agent::init::testutil::{is_root, TempDir};
use crate::agent::protocol::{write_data, Network, MAX_PAYLOAD};

struct Harness {
    agent: Arc<Agent>,
    dir: TempDir,
}

fn harness() -> Harness {
    harness_with(false)
}

/// With `prestart`, the launcher has a sandbox waiting for its descriptors.
fn harness_with(prestart: bool) -> Harness {
    let dir = TempDir::new("agent");
    let reaper = Reaper::start(ReapMode::Registered).unwrap();
    let launcher = Launcher::for_tests();
    if prestart {
        launcher.prestart(&reaper).unwrap();
    }
    let agent = Agent::new(
        AgentConfig {
            mode: AgentMode::Machine,
            launcher,
            images: dir.path().join("images"),
            state_root: dir.path().join("state"),
            cgroup_root: None,
            host_path: "/usr/sbin:/usr/bin:/sbin:/bin".into(),
            bridge: Err("no bridge in unit tests".into()),
            resolv_conf: dir.path().join("resolv.conf"),
        },
        reaper,
    );
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    Harness { agent, dir }
}

type Session = JoinHandle<Result<Outcome, SessionError>>;

fn connect(agent: &Arc<Agent>) -> (UnixStream, Session) {
    let (mut host, guest) = UnixStream::pair().unwrap();
    let agent = agent.clone();
    let session = std::thread::spawn(move || agent.serve(guest));
    write_message(&mut host, &Message::Hello { version: VERSION }).unwrap();
    assert_eq!(
        read_message(&mut host).unwrap(),
        Some(Message::Hello { version: VERSION })
    );
    (host, session)
}

fn spec(argv: &[&str]) -> RunSpec {
    RunSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/bin:/bin".into()],
        cwd: "/".into(),
        user: None,
        hostname: None,
        tty: false,
        stdin: false,
        rootfs: Rootfs::Host,
        volumes: Vec::new(),
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

#[derive(Debug, Default)]
struct Transcript {
    started: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<i32>,
    error: Option<String>,
}

impl Transcript {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads until Exit, Error or the end of the stream; `until_started` stops after Started.
fn read_until(host: &mut UnixStream, t: &mut Transcript, stop: impl Fn(&Transcript) -> bool) {
    while !stop(t) {
        match read_message(host).unwrap() {
            Some(Message::Started { pid }) => t.started = Some(pid),
            Some(Message::Stdout(d)) if std::env::var_os("HEARTH_TEST_TRACE").is_some() => {
                eprintln!("stdout {:?}", String::from_utf8_lossy(&d));
                t.stdout.extend(d)
            }
            Some(Message::Stdout(d)) => {
                assert!(d.len() <= MAX_PAYLOAD);
                t.stdout.extend(d)
            }
            Some(Message::Stderr(d)) => t.stderr.extend(d),
            Some(Message::Exit { status }) => {
                t.exit = Some(status);
                return;
            }
            Some(Message::Error(e)) => {
                t.error = Some(e);
                return;
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => return,
        }
    }
}

fn run(agent: &Arc<Agent>, spec: RunSpec) -> Transcript {
    let (mut host, session) = connect(agent);
    write_message(&mut host, &Message::Run(Box::new(spec))).unwrap();
    let mut t = Transcript::default();
    read_until(&mut host, &mut t, |_| false);
    drop(host);
    session.join().unwrap().unwrap();
    t
}

#[test]
fn version_mismatch_is_an_error() {
    let h = harness();
    let (mut host, guest) = UnixStream::pair().unwrap();
    let agent = h.agent.clone();
    let session = std::thread::spawn(move || agent.serve(guest));
    write_message(&mut host, &Message::Hello { version: 99 }).unwrap();
    assert!(matches!(
        read_message(&mut host).unwrap(),
        Some(Message::Hello { .. })
    ));
    match read_message(&mut host).unwrap() {
        Some(Message::Error(text)) => assert!(text.contains("mismatch"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(read_message(&mut host).unwrap(), None);
    assert_eq!(session.join().unwrap().unwrap(), Outcome::Done);
}

#[test]
fn host_process_output_and_status() {
    let h = harness();
    let t = run(&h.agent, spec(&["echo", "hello"]));
    assert!(t.started.unwrap() > 0);
    assert_eq!((t.out().as_str(), t.exit), ("hello\n", Some(0)));

    let mut s = spec(&[
        "sh",
        "-c",
        "echo out; echo err >&2; cd; pwd; echo $HOSTNAME; exit 3",
    ]);
    s.cwd = "/tmp".into();
    let t = run(&h.agent, s);
    assert_eq!(t.stderr, b"err\n");
    let lines: Vec<&str> = t.stdout_lines();
    assert_eq!(lines[..2], ["out", "/root"]);
    assert!(!lines[2].is_empty());
    assert_eq!(t.exit, Some(3));
}

#[test]
fn a_prestarted_sandbox_runs_like_a_spawned_one() {
    let h = harness_with(true);
    let waiting = h.agent.config.launcher.prestarted_pid().unwrap();
    // What the process inherits from how its sandbox was started: session, signal
    // mask and ignored signals, directory, descriptors.
    // The shell reads its own status with builtins only: while it forks a command it
    // may block signals for a moment, which a forked reader could catch.
    let script = "[ \"$(cut -d' ' -f6 /proc/$$/stat)\" = $$ ] && echo leader; \
                  while read -r key value; do \
                  case $key in SigBlk:|SigIgn:) echo \"$key $value\";; esac; \
                  done < /proc/$$/status; pwd; ls /proc/$$/fd; \
                  read line; echo \"$line\" >&2; exit 5";
    let mut s = spec(&["sh", "-c", script]);
    s.stdin = true;
    let run_with_input = |s: RunSpec| {
        let (mut host, session) = connect(&h.agent);
        write_message(&mut host, &Message::Run(Box::new(s))).unwrap();
        write_message(&mut host, &Message::Stdin(b"typed\n".to_vec())).unwrap();
        let mut t = Transcript::default();
        read_until(&mut host, &mut t, |_| false);
        drop(host);
        session.join().unwrap().unwrap();
        t
    };
    let first = run_with_input(s.clone());
    // The waiting process itself became the program (a host process execs in place).
    assert_eq!(first.started, Some(waiting));
    assert_eq!(h.agent.config.launcher.prestarted_pid(), None);
    let second = run_with_input(s);
    assert_ne!(second.started, Some(waiting));
    assert!(first.out().starts_with("leader\n"), "{}", first.out());
    assert_eq!(first.out(), second.out());
    assert_eq!(
        (first.stderr.as_slice(), first.exit),
        (&b"typed\n"[..], Some(5))
    );
    assert_eq!(
        (second.stderr.as_slice(), second.exit),
        (&b"typed\n"[..], Some(5))
    );
}

#[test]
fn a_dead_prestarted_sandbox_is_replaced_by_a_spawned_one() {
    let h = harness_with(true);
    let waiting = h.agent.config.launcher.prestarted_pid().unwrap();
    sys::kill(waiting, libc::SIGKILL).unwrap();
    // The reaper's thread must have collected it before the launch looks.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{waiting}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {waiting} not reaped"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let t = run(&h.agent, spec(&["echo", "hello"]));
    assert_ne!(t.started, Some(waiting));
    assert_eq!((t.out().as_str(), t.exit), ("hello\n", Some(0)));
}

#[test]
fn the_sandbox_role_refuses_to_run_by_hand() {
    let exe = std::env::current_exe().unwrap();
    for args in [&["sandbox"][..], &["sandbox", sandbox::WAIT_ARG]] {
        let out = std::process::Command::new(&exe)
            .args(args)
            .env(sandbox::TEST_SANDBOX_ENV, "1")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("hearth-init: "), "{args:?}: {err}");
    }
}

impl Transcript {
    fn stdout_lines(&self) -> Vec<&str> {
        std::str::from_utf8(&self.stdout).unwrap().lines().collect()
    }
}

#[test]
fn exec_failures_look_like_a_shell() {
    let h = harness();
    let t = run(&h.agent, spec(&["no-such-program-here"]));
    assert!(t.started.is_some());
    let err = String::from_utf8_lossy(&t.stderr);
    assert!(err.contains("executable file not found in $PATH"), "{err}");
    assert_eq!(t.exit, Some(127));
    let t = run(&h.agent, spec(&["/etc/passwd"]));
    assert_eq!(t.exit, Some(126));
    let t = run(&h.agent, spec(&["./nothing"]));
    assert_eq!(t.exit, Some(127));
}

#[test]
fn setup_failures_are_errors() {
    let h = harness();
    let mut s = spec(&["true"]);
    s.user = Some("no-such-user-xyz".into());
    let t = run(&h.agent, s);
    assert!(t.started.is_none());
    assert!(t.error.unwrap().contains("unable to find user"));

    let mut s = spec(&["true"]);
    s.rootfs = Rootfs::Container {
        name: "ghost".into(),
    };
    let t = run(&h.agent, s);
    assert!(t.error.unwrap().contains("no running container"));

    let mut s = spec(&["true"]);
    s.rootfs = Rootfs::Image {
        digest: "sha256:xyz".into(),
    };
    assert!(run(&h.agent, s)
        .error
        .unwrap()
        .contains("invalid image digest"));
}

#[test]
fn stdin_is_forwarded_and_closed() {
    let h = harness();
    let (mut host, session) = connect(&h.agent);
    let mut s = spec(&["sh", "-c", "cat; echo done"]);
    s.stdin = true;
    write_message(&mut host, &Message::Run(Box::new(s))).unwrap();
    write_message(&mut host, &Message::Stdin(b"abc\n".to_vec())).unwrap();
    write_message(&mut host, &Message::Stdin(b"def\n".to_vec())).unwrap();
    write_message(&mut host, &Message::StdinEof).unwrap();
    let mut t = Transcript::default();
    read_until(&mut host, &mut t, |_| false);
    assert_eq!((t.out().as_str(), t.exit), ("abc\ndef\ndone\n", Some(0)));
    drop(host);
    session.join().unwrap().unwrap();

    // Without stdin the process reads /dev/null.
    let t = run(&h.agent, spec(&["sh", "-c", "cat; echo end"]));
    assert_eq!(t.out(), "end\n");
}

#[test]
fn signals_reach_the_process() {
    let h = harness();
    let (mut host, session) = connect(&h.agent);
    write_message(&mut host, &Message::Run(Box::new(spec(&["sleep", "30"])))).unwrap();
    let mut t = Transcript::default();
    read_until(&mut host, &mut t, |t| t.started.is_some());
    write_message(&mut host, &Message::Signal(libc::SIGTERM)).unwrap();
    read_until(&mut host, &mut t, |_| false);
    assert_eq!(t.exit, Some(143));
    drop(host);
    session.join().unwrap().unwrap();
}

#[test]
fn tty_merges_output_and_has_a_size() {
    let h = harness();
    if !Path::new("/dev/ptmx").exists() {
        eprintln!("note: no /dev/ptmx; skipping");
        return;
    }
    let (mut host, session) = connect(&h.agent);
    let mut s = spec(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo tty; stty size; echo err >&2; read x; echo got $x",
    ]);
    s.tty = true;
    s.stdin = true;
    s.term_size = Some((24, 80));
    write_message(&mut host, &Message::Run(Box::new(s))).unwrap();
    write_message(&mut host, &Message::Stdin(b"line\n".to_vec())).unwrap();
    let mut t = Transcript::default();
    read_until(&mut host, &mut t, |_| false);
    let out = t.out();
    assert!(out.contains("tty\r\n"), "{out:?}");
    assert!(out.contains("24 80\r\n"), "{out:?}");
    assert!(out.contains("err\r\n"), "{out:?}");
    assert!(out.contains("got line\r\n"), "{out:?}");
    assert!(t.stderr.is_empty());
    assert_eq!(t.exit, Some(0));
    drop(host);
    session.join().unwrap().unwrap();
}

#[test]
fn large_output_arrives_whole_in_bounded_frames() {
    let h = harness();
    let t = run(&h.agent, spec(&["head", "-c", "3000000", "/dev/zero"]));
    assert_eq!((t.stdout.len(), t.exit), (3_000_000, Some(0)));
}

#[test]
fn background_children_do_not_hold_the_session() {
    let h = harness();
    let start = Instant::now();
    let t = run(&h.agent, spec(&["sh", "-c", "sleep 20 & echo bg"]));
    assert_eq!((t.out().as_str(), t.exit), ("bg\n", Some(0)));
    assert!(start.elapsed() < Duration::from_secs(10));
}

const DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";

#[test]
fn images_load_over_the_session() {
    let h = harness();
    let (mut host, session) = connect(&h.agent);
    let query = Message::ImageQuery {
        digest: DIGEST.into(),
    };
    write_message(&mut host, &query).unwrap();
    assert_eq!(
        read_message(&mut host).unwrap(),
        Some(Message::ImageStatus {
            digest: DIGEST.into(),
            present: false
        })
    );
    let mut b = tar::Builder::new(Vec::new());
    let data = vec![b'x'; 200_000];
    let mut hd = tar::Header::new_gnu();
    hd.set_uid(0);
    hd.set_gid(0);
    hd.set_mtime(0);
    hd.set_size(data.len() as u64);
    hd.set_mode(0o644);
    b.append_data(&mut hd, "big/file", &data[..]).unwrap();
    let tar = b.into_inner().unwrap();
    write_message(
        &mut host,
        &Message::ImageLoad {
            digest: DIGEST.into(),
        },
    )
    .unwrap();
    write_data(&mut host, &tar, Message::ImageData).unwrap();
    write_message(&mut host, &Message::ImageEnd).unwrap();
    assert_eq!(
        read_message(&mut host).unwrap(),
        Some(Message::ImageStatus {
            digest: DIGEST.into(),
            present: true
        })
    );
    // A broken stream is drained to ImageEnd and reported; the session goes on.
    let other = DIGEST.replace("ab", "cd");
    write_message(&mut host, &Message::ImageLoad { digest: other }).unwrap();
    write_data(&mut host, &[7u8; 3000], Message::ImageData).unwrap();
    write_message(&mut host, &Message::ImageEnd).unwrap();
    assert!(matches!(
        read_message(&mut host).unwrap(),
        Some(Message::Error(_))
    ));
    write_message(&mut host, &query).unwrap();
    assert!(matches!(
        read_message(&mut host).unwrap(),
        Some(Message::ImageStatus { present: true, .. })
    ));
    drop(host);
    session.join().unwrap().unwrap();
    let file = h
        .dir
        .path()
        .join("images")
        .join(&DIGEST[7..])
        .join("big/file");
    assert_eq!(std::fs::metadata(file).unwrap().len(), 200_000);
}

/// A busybox root filesystem as image `DIGEST`, or `None` (with a note) when the
/// sandbox cannot be tried here.
fn busybox_image(h: &Harness) -> Option<()> {
    if !is_root() {
        eprintln!("note: not root; skipping the sandbox test");
        return None;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        eprintln!("note: no /bin/busybox; skipping the sandbox test");
        return None;
    }
    let root = h.dir.path().join("images").join(&DIGEST[7..]);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "hostname", "cat", "id", "sleep", "ls", "pwd", "mount", "wc", "ps",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    for dir in ["etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    Some(())
}

fn sandbox_spec(argv: &[&str]) -> RunSpec {
    let mut s = spec(argv);
    s.env = Vec::new();
    s.rootfs = Rootfs::Image {
        digest: DIGEST.into(),
    };
    s.network = Network::None;
    s.hostname = Some("box".into());
    s
}

#[test]
fn sandbox_runs_in_its_own_namespaces() {
    let h = harness();
    if busybox_image(&h).is_none() {
        return;
    }
    let t = run(
        &h.agent,
        sandbox_spec(&[
            "sh",
            "-c",
            "echo $$; hostname; cat /etc/hostname; echo $HOSTNAME $HOME $PATH; \
             ls /proc | grep -c '^[0-9]' ; ls /dev | wc -l; echo x > /tmp/f; cat /tmp/f",
        ]),
    );
    assert_eq!(t.error, None, "{}", String::from_utf8_lossy(&t.stderr));
    let lines = t.stdout_lines();
    assert_eq!(lines[0], "1", "{lines:?}");
    assert_eq!(lines[1], "box");
    assert_eq!(lines[2], "box");
    assert_eq!(lines[3], format!("box /root {}", resolve::DEFAULT_PATH));
    // Only sh itself (and its pipeline) in the PID namespace.
    assert!(lines[4].parse::<u32>().unwrap() <= 3, "{lines:?}");
    assert_eq!(lines[6], "x");
    assert_eq!(t.exit, Some(0));
    // The image is untouched (writes went to the overlay) and the state is cleaned up.
    let image = h.dir.path().join("images").join(&DIGEST[7..]);
    assert!(!image.join("tmp/f").exists());
    assert_eq!(
        std::fs::read_dir(h.dir.path().join("state"))
            .unwrap()
            .count(),
        0
    );

    // Numeric user without passwd entry, cwd created; exit status passes through.
    let mut s = sandbox_spec(&["sh", "-c", "id -u; id -g; pwd; exit 5"]);
    s.user = Some("4242:99".into());
    s.cwd = "/work/dir".into();
    let t = run(&h.agent, s);
    assert_eq!(t.stdout_lines(), ["4242", "99", "/work/dir"]);
    assert_eq!(t.exit, Some(5));

    // A named user from the image's passwd; a missing program.
    let mut s = sandbox_spec(&["sh", "-c", "id -u; echo $HOME"]);
    s.user = Some("app".into());
    assert_eq!(run(&h.agent, s).stdout_lines(), ["1000", "/home/app"]);
    let t = run(&h.agent, sandbox_spec(&["nothing-here"]));
    assert_eq!(t.exit, Some(127));
}

#[test]
fn exec_joins_a_running_container() {
    let h = harness();
    if busybox_image(&h).is_none() {
        return;
    }
    let (mut first, first_session) = connect(&h.agent);
    let mut s = sandbox_spec(&["sh", "-c", "echo hi > /tmp/mark; echo ready; sleep 30"]);
    s.name = Some("c1".into());
    write_message(&mut first, &Message::Run(Box::new(s.clone()))).unwrap();
    let mut t1 = Transcript::default();
    read_until(&mut first, &mut t1, |t| t.stdout.ends_with(b"ready\n"));
    assert_eq!(t1.error, None);

    // Same name again: refused.
    assert!(run(&h.agent, s).error.unwrap().contains("already in use"));

    let mut e = spec(&[
        "sh",
        "-c",
        "cat /tmp/mark; hostname; ps -o pid,args | wc -l",
    ]);
    e.env = Vec::new();
    e.rootfs = Rootfs::Container { name: "c1".into() };
    let t = run(&h.agent, e);
    let lines = t.stdout_lines();
    assert_eq!(lines[..2], ["hi", "box"], "{t:?}");
    assert_eq!(t.exit, Some(0));

    // Another container does not see the first one's files.
    let t = run(&h.agent, sandbox_spec(&["sh", "-c", "cat /tmp/mark"]));
    assert_eq!(t.exit, Some(1));

    write_message(&mut first, &Message::Signal(libc::SIGKILL)).unwrap();
    read_until(&mut first, &mut t1, |_| false);
    assert_eq!(t1.exit, Some(137));
    drop(first);
    first_session.join().unwrap().unwrap();
    assert!(h.agent.registry().is_empty());
}

#[test]
fn shutdown_replies_and_asks_for_power_off() {
    let h = harness();
    let (mut host, session) = connect(&h.agent);
    write_message(&mut host, &Message::Shutdown).unwrap();
    assert_eq!(
        read_message(&mut host).unwrap(),
        Some(Message::Exit { status: 0 })
    );
    assert_eq!(session.join().unwrap().unwrap(), Outcome::PowerOff);
}

#[test]
fn shutdown_kills_running_containers() {
    let h = harness();
    if busybox_image(&h).is_none() {
        return;
    }
    let (mut first, first_session) = connect(&h.agent);
    let s = sandbox_spec(&["sh", "-c", "echo ready; sleep 30"]);
    write_message(&mut first, &Message::Run(Box::new(s))).unwrap();
    let mut t1 = Transcript::default();
    read_until(&mut first, &mut t1, |t| t.stdout.ends_with(b"ready\n"));

    let (mut host, session) = connect(&h.agent);
    write_message(&mut host, &Message::Shutdown).unwrap();
    read_until(&mut first, &mut t1, |_| false);
    assert_eq!(t1.exit, Some(137));
    assert_eq!(
        read_message(&mut host).unwrap(),
        Some(Message::Exit { status: 0 })
    );
    assert_eq!(session.join().unwrap().unwrap(), Outcome::PowerOff);
    drop(first);
    first_session.join().unwrap().unwrap();
}

#[test]
fn forwards_need_a_running_container_on_the_bridge() {
    let h = harness();
    let (mut host, session) = connect(&h.agent);
    let forward = Message::Forward(crate::agent::protocol::ForwardSpec {
        container: "web".into(),
        port: 80,
        transport: crate::agent::protocol::Transport::Tcp,
    });
    write_message(&mut host, &forward).unwrap();
    match read_message(&mut host).unwrap() {
        Some(Message::Error(text)) => assert!(text.contains("no running container"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(session.join().unwrap(), Ok(Outcome::Done)));

    // A container registered without a place on the bridge cannot be forwarded to.
    h.agent.reserve(Some("web")).unwrap();
    let (mut host, session) = connect(&h.agent);
    write_message(&mut host, &forward).unwrap();
    match read_message(&mut host).unwrap() {
        Some(Message::Error(text)) => {
            assert!(text.contains("not on the machine's bridge"), "{text}")
        }
        other => panic!("{other:?}"),
    }
    session.join().unwrap().unwrap();
}
