//! Pausing a real Linux guest (issue 9): a guest paused for 20 s and resumed sees its
//! uptime advance by far less than 20 s, because hearth holds its clocks still while it is
//! paused. The guest prints its uptime and wall-clock time in a loop on the serial console;
//! the test pauses and resumes it with `hearth remote`, the real client, and ends it with
//! `hearth remote shutdown`. Artifacts: see tests/common/linux.rs.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::linux::{linux_args, minimal_guest, MINIMAL_TIMEOUT};
use common::{assert_exit_code, describe, hearth, kvm_available, run_with_timeout};
use common::{Running, TempDir, RUN_TIMEOUT};

/// The guest's loop: its clocksource once, then `TICK <uptime> <unix time>` lines. `\$`
/// reaches the inner shell as `$` (the test init runs the text after ` -- ` with `sh -c`,
/// which would expand it first). Reading /proc/uptime with the shell's `read` spares a fork,
/// which costs the emulated guest kernel most of a second on a nested-PVM host.
const TICK_LOOP: &str = r#"sh -c "echo CLOCKSOURCE \$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); while read -r up idle < /proc/uptime; do echo TICK \$up \$(date +%s); sleep 0.5; done""#;

/// How long the guest stays paused.
const PAUSE: Duration = Duration::from_secs(20);

/// The largest uptime step across the pause that counts as "the clock did not jump". A
/// held clock steps by one turn of the loop, 1-2 s here (the guest kernel's code is
/// emulated, so forks and exits are slow) and a few seconds more on a loaded host; a
/// clock that ran on through the pause steps by the whole 20 s and then that turn. Half
/// the pause keeps a wide margin on both sides.
const MAX_STEP: f64 = PAUSE.as_secs_f64() / 2.0;

/// One line of the guest's loop.
#[derive(Clone, Copy, Debug)]
struct Tick {
    uptime: f64,
    unix_time: u64,
}

/// The complete `TICK` lines of the console log so far (other lines are kernel messages).
fn ticks(console: &Path) -> Vec<Tick> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    complete
        .lines()
        .filter_map(|line| {
            let mut fields = line
                .trim_end_matches('\r')
                .strip_prefix("TICK ")?
                .split(' ');
            let uptime = fields.next()?.parse().ok()?;
            let unix_time = fields.next()?.parse().ok()?;
            Some(Tick { uptime, unix_time })
        })
        .collect()
}

/// A Linux guest running [`TICK_LOOP`] under `hearth run --api-sock`.
struct TickingGuest {
    running: Running,
    sock: std::path::PathBuf,
    console: std::path::PathBuf,
    _dir: TempDir,
}

impl TickingGuest {
    fn boot(cpus: &str) -> TickingGuest {
        let dir = TempDir::new(&format!("linux-pause-{cpus}"));
        let sock = dir.join("api.sock");
        let console = dir.join("console.log");
        let serial = format!("file={}", console.display());
        let sock_arg = sock.display().to_string();
        let args = linux_args(
            &minimal_guest(),
            TICK_LOOP,
            &[
                "--memory",
                "128M",
                "--cpus",
                cpus,
                "--serial",
                &serial,
                "--api-sock",
                &sock_arg,
            ],
        );
        let mut cmd = hearth();
        cmd.args(&args);
        TickingGuest {
            running: Running::start(cmd, Stdio::null()),
            sock,
            console,
            _dir: dir,
        }
    }

    fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// What the VMM and the guest printed so far, for failure messages.
    fn describe(&self) -> String {
        format!(
            "{}\n--- console ---\n{}",
            self.running.describe_so_far(),
            self.console_text()
        )
    }

    /// Waits until the guest has printed more than `count` ticks; returns them all.
    #[track_caller]
    fn wait_for_ticks(&mut self, count: usize, timeout: Duration) -> Vec<Tick> {
        let deadline = Instant::now() + timeout;
        loop {
            let ticks = ticks(&self.console);
            if ticks.len() > count {
                return ticks;
            }
            assert!(
                self.running.is_running() && Instant::now() < deadline,
                "the guest did not print more than {count} ticks within {timeout:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `hearth remote --api-sock SOCK ARGS...`, which must succeed.
    #[track_caller]
    fn remote(&self, args: &[&str]) -> Output {
        let mut cmd = hearth();
        cmd.arg("remote")
            .arg("--api-sock")
            .arg(&self.sock)
            .args(args);
        let out = run_with_timeout(cmd, RUN_TIMEOUT);
        assert!(
            out.status.success(),
            "hearth remote {args:?} failed\n{}\n--- the VMM ---\n{}",
            describe(&out),
            self.describe()
        );
        out
    }
}

/// Boots the minimal kernel with `cpus` vCPUs, pauses it for [`PAUSE`] once it ticks, and
/// checks that it printed nothing meanwhile, that its uptime stepped by less than
/// [`MAX_STEP`] across the pause, and that it ticks on afterwards.
fn uptime_does_not_jump_across_a_pause(cpus: &str) {
    let mut guest = TickingGuest::boot(cpus);
    guest.wait_for_ticks(2, MINIMAL_TIMEOUT);

    guest.remote(&["pause"]);
    let paused_at = Instant::now();
    let at_pause = guest.console_text();
    let before = ticks(&guest.console);
    while paused_at.elapsed() < PAUSE {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            guest.console_text(),
            at_pause,
            "the guest printed while paused ({:?} in)\n{}",
            paused_at.elapsed(),
            guest.describe()
        );
    }
    guest.remote(&["resume"]);
    let paused_for = paused_at.elapsed();
    // A few turns of the loop: it goes on, with its clock.
    let after = guest.wait_for_ticks(before.len() + 2, Duration::from_secs(300));

    let last = before[before.len() - 1];
    let next = after[before.len()];
    let step = next.uptime - last.uptime;
    let normal: Vec<f64> = after
        .windows(2)
        .enumerate()
        .filter(|&(i, _)| i + 1 != before.len())
        .map(|(_, pair)| pair[1].uptime - pair[0].uptime)
        .collect();
    let clocksource = guest
        .console_text()
        .lines()
        .find_map(|l| l.strip_prefix("CLOCKSOURCE ").map(str::to_owned))
        .unwrap_or_default();
    eprintln!(
        "{cpus} vCPU(s), clocksource {clocksource}, paused {paused_for:.1?}: uptime {:.2} -> \
         {:.2} s (step {step:.2} s; other steps {:.2}-{:.2} s), unix time step {} s",
        last.uptime,
        next.uptime,
        normal.iter().copied().fold(f64::INFINITY, f64::min),
        normal.iter().copied().fold(0.0, f64::max),
        next.unix_time as i64 - last.unix_time as i64,
    );
    assert!(
        step > 0.0 && step < MAX_STEP,
        "uptime stepped by {step:.2} s across a {paused_for:?} pause (bound {MAX_STEP} s)\n{}",
        guest.describe()
    );
    assert!(
        after[before.len()..]
            .windows(2)
            .all(|pair| pair[1].uptime > pair[0].uptime),
        "the guest's uptime did not go on after the resume\n{}",
        guest.describe()
    );

    guest.remote(&["shutdown"]);
    let out = guest.running.finish(RUN_TIMEOUT);
    assert_exit_code(&out, 0);
}

#[test]
fn paused_linux_guest_uptime_does_not_jump_1_vcpu() {
    if !kvm_available() {
        return;
    }
    uptime_does_not_jump_across_a_pause("1");
}

#[test]
fn paused_linux_guest_uptime_does_not_jump_2_vcpus() {
    if !kvm_available() {
        return;
    }
    uptime_does_not_jump_across_a_pause("2");
}
