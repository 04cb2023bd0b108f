//! hearth's serial console input against the `echo` payload (tests/payloads/echo.S), which
//! prints "echo ready", echoes every byte it receives on COM1 and quits on 'q': stdin
//! forwarding, the serial Unix socket, and raw mode with the Ctrl-A x escape on a terminal.
//! Each test skips when /dev/kvm is unavailable.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    announce_skip, assert_exit_code, assert_stdout_contains, describe, kvm_available, payload,
    payload_command, stderr_of, stdout_of, Capture, Format, Need, Running, TempDir, HEARTH,
    PAYLOAD_MEMORY, RUN_TIMEOUT,
};

/// How long hearth may take to create its serial socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

fn echo_payload() -> PathBuf {
    payload("echo", Format::Elf64)
}

/// Input written to a pipe on hearth's stdin reaches the guest's UART, in order, and the
/// guest's output comes back on stdout.
#[test]
fn stdin_is_forwarded_to_the_guest() {
    if !kvm_available() {
        return;
    }
    let mut vm = Running::start(payload_command(&echo_payload(), &[]), Stdio::piped());
    vm.send(b"hello\n");
    vm.send(b"q");
    let out = vm.finish(RUN_TIMEOUT);
    assert_exit_code(&out, 0);
    assert_stdout_contains(&out, "echo ready\nhello\nbye\n");
}

/// SIGTERM, SIGINT and SIGHUP end the VM through the event loop: the vCPUs are stopped and
/// joined, and hearth exits with 128 + the signal number.
#[test]
fn terminating_signals_stop_the_vm_cleanly() {
    if !kvm_available() {
        return;
    }
    for (signal, status) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let vm = Running::start(payload_command(&echo_payload(), &[]), Stdio::piped());
        vm.expect_stdout(b"echo ready");
        vm.signal(signal);
        let out = vm.finish(RUN_TIMEOUT);
        assert_exit_code(&out, status);
        assert!(
            stderr_of(&out).contains(&format!("stopped by signal {signal}")),
            "expected the signal to be reported\n{}",
            describe(&out)
        );
    }
}

/// `--serial unix=PATH`: hearth replaces a stale socket at PATH (but not a live one),
/// listens, sends the guest's
/// output to the client and the client's input to the guest, keeps its own stdout free of
/// guest output, and removes the socket when it exits.
#[test]
fn serial_unix_socket_carries_both_directions() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serial-unix");
    // Deeper than a socket address holds (107 bytes), as a deep checkout makes it.
    let socket_dir = dir.join(&"deeper-than-a-unix-socket-address".repeat(3));
    fs::create_dir(&socket_dir).expect("create the socket's directory");
    let socket = socket_dir.join("serial.sock");
    // A socket file nobody listens on, as a crashed earlier run would leave.
    drop(hearth::uds::bind(&socket).expect("bind the stale socket"));

    let serial = format!("unix={}", socket.display());
    let vm = Running::start(
        payload_command(&echo_payload(), &["--serial", &serial]),
        Stdio::null(),
    );

    let mut client = connect(&socket, &vm);
    // A second VM on the same path is refused, in one line, and does not take the
    // console over: the first VM's client goes on working below.
    let second = common::run_with_timeout(
        payload_command(&echo_payload(), &["--serial", &serial]),
        RUN_TIMEOUT,
    );
    assert_exit_code(&second, 1);
    let stderr = common::stderr_of(&second);
    assert!(
        stderr.lines().count() == 1 && stderr.contains("is in use by another process"),
        "{}",
        describe(&second)
    );
    let from_guest = Capture::start(client.try_clone().expect("clone the socket"));
    // Guest output from before a client connects is dropped, so "echo ready" may be
    // missed: the echo of our own bytes shows that both directions work.
    for (input, reply) in [(&b"abc"[..], &b"abc"[..]), (b"q", b"bye\n")] {
        client.write_all(input).expect("write to the serial socket");
        assert!(
            from_guest.wait_for(reply, RUN_TIMEOUT),
            "sent {:?} through the socket but the guest did not reply {:?}; the socket \
             received {:?}\n{}",
            String::from_utf8_lossy(input),
            String::from_utf8_lossy(reply),
            String::from_utf8_lossy(&from_guest.contents()),
            vm.describe_so_far()
        );
    }

    let out = vm.finish(RUN_TIMEOUT);
    assert_exit_code(&out, 0);
    let stdout = stdout_of(&out);
    assert!(
        !["echo ready", "abc", "bye"]
            .iter()
            .any(|s| stdout.contains(s)),
        "guest output leaked to hearth's stdout\n{}",
        describe(&out)
    );
    assert!(
        fs::symlink_metadata(&socket).is_err(),
        "{} still exists after hearth exited\n{}",
        socket.display(),
        describe(&out)
    );
}

/// Connects to hearth's serial socket once it listens there, within [`SOCKET_TIMEOUT`].
fn connect(socket: &Path, vm: &Running) -> UnixStream {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        match hearth::uds::connect(socket) {
            Ok(stream) => return stream,
            Err(e) if Instant::now() >= deadline => panic!(
                "cannot connect to {} within {SOCKET_TIMEOUT:?}: {e}\n{}",
                socket.display(),
                vm.describe_so_far()
            ),
            // Not there yet, or still the stale socket nobody listens on.
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// On a terminal, hearth switches stdin to raw mode: the guest gets each byte as it is
/// typed, with no line editing or echo by the terminal; Ctrl-A x quits with status 0, and
/// the terminal's settings are restored on the way out.
///
/// hearth runs in a pseudo-terminal made by util-linux `script`, in a shell that records
/// the terminal settings before and after it. The test writes "hi" and Ctrl-B (0x02) with
/// no newline: in canonical mode the guest would get nothing until a newline and the
/// terminal would echo Ctrl-B as "^B", so a raw 0x02 echoed after "hi" comes from the guest
/// through raw mode.
#[test]
fn tty_console_raw_mode_ctrl_a_x_quits_and_restores() {
    if !kvm_available() {
        return;
    }
    if !script_available() {
        announce_skip(
            Need::Tools,
            "util-linux `script` is not installed; cannot run hearth on a terminal",
        );
        return;
    }
    let hearth_run = format!(
        "{} run --kernel {} --memory {PAYLOAD_MEMORY}",
        shell_quote(HEARTH),
        shell_quote(echo_payload().to_str().expect("UTF-8 payload path")),
    );
    let session = format!(
        "before=$(stty -g)\n\
         {hearth_run}\n\
         status=$?\n\
         echo \"hearth status=$status\"\n\
         if [ \"$(stty -g)\" = \"$before\" ]; then echo 'terminal settings restored'; \
         else echo 'terminal settings changed'; fi\n\
         stty -a\n"
    );
    let mut script = Command::new("script");
    // -E always: keep the terminal's usual echo, which `script` turns off by default when
    // its own stdin is not a terminal.
    script
        .args(["--quiet", "--return", "--flush", "--echo", "always"])
        .arg("--command")
        .arg(&session)
        .arg("/dev/null")
        .env("SHELL", "/bin/sh");
    let mut tty = Running::start(script, Stdio::piped());

    // The guest prints only once hearth has set up the terminal.
    tty.expect_stdout(b"echo ready");
    tty.send(b"hi\x02");
    tty.expect_stdout(b"hi\x02");
    tty.send(b"\x01x");
    let out = tty.finish(RUN_TIMEOUT);

    // The terminal turns "\n" into "\r\n" on output.
    let text = stdout_of(&out).replace("\r\n", "\n");
    assert!(
        text.contains("hearth status=0\n"),
        "hearth did not exit 0 on Ctrl-A x\n{}",
        describe(&out)
    );
    assert!(
        text.contains("terminal settings restored\n"),
        "hearth left the terminal settings changed\n{}",
        describe(&out)
    );
    let stty = &text[text.find("terminal settings").unwrap_or(0)..];
    let flags: Vec<&str> = stty.split_whitespace().collect();
    assert!(
        flags.contains(&"icanon") && flags.contains(&"echo"),
        "the terminal is not back in canonical mode with echo\n{}",
        describe(&out)
    );
    assert_exit_code(&out, 0);
}

fn script_available() -> bool {
    Command::new("script")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success())
}

/// `s` as one single-quoted word for /bin/sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
