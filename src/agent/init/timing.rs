//! Step marks of a process start, for the debug log (`hearth.log=debug`): where the time
//! between the agent receiving a `Run` and the process's exit goes.
//!
//! Every mark is a CLOCK_MONOTONIC time ([`sys::monotonic_us`]), shared by the agent and
//! the sandbox processes. The sandbox collects its marks in memory and sends them to the
//! agent on the sync pipe (`mark <us> <step>` lines, in the same write as its `pid`, `ok`
//! or `error` line); the agent logs the whole timeline once the process has exited, so
//! that the slow serial console is not written while the start is being timed. The
//! sandbox's supervisor outlives the sync pipe: it reports the container's end on a
//! second pipe ([`LATE_MARKS_FD`]), read when the timeline is logged.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use super::sys;

/// Prefix of a mark line on the sync pipe.
const MARK_PREFIX: &str = "mark ";

/// Descriptor of the sandbox's pipe for marks after the sync pipe has closed (only
/// passed when the plan asks for marks).
pub const LATE_MARKS_FD: RawFd = 5;

/// The marks of one run, kept by the agent.
pub struct Marks {
    label: String,
    start_us: u64,
    steps: Option<Mutex<Vec<(u64, String)>>>,
    /// The read end of the sandbox's late-marks pipe.
    late: Mutex<Option<File>>,
}

impl Marks {
    /// Starts a timeline now; it records nothing unless debug logging is on.
    pub fn start(label: &str) -> Self {
        Self {
            label: label.to_string(),
            start_us: sys::monotonic_us(),
            steps: log::log_enabled!(log::Level::Debug).then(|| Mutex::new(Vec::new())),
            late: Mutex::new(None),
        }
    }

    /// Whether marks are being recorded (the sandbox is then asked for its own).
    pub fn enabled(&self) -> bool {
        self.steps.is_some()
    }

    /// Records that `step` has just ended.
    pub fn mark(&self, step: &str) {
        if self.steps.is_some() {
            self.at(sys::monotonic_us(), step.to_string());
        }
    }

    /// Records a step that ended at `us` (a mark from the sandbox).
    pub fn at(&self, us: u64, step: String) {
        if let Some(steps) = &self.steps {
            steps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((us, step));
        }
    }

    /// Takes the read end of the sandbox's late-marks pipe.
    pub fn set_late(&self, pipe: File) {
        *self.late.lock().unwrap_or_else(|p| p.into_inner()) = Some(pipe);
    }

    /// Adds what the late-marks pipe holds (without waiting for more).
    fn read_late(&self) {
        let Some(mut pipe) = self.late.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let _ = sys::set_nonblocking(pipe.as_raw_fd(), true);
        let mut text = Vec::new();
        let _ = (&mut pipe).take(64 * 1024).read_to_end(&mut text);
        for line in String::from_utf8_lossy(&text).lines() {
            if let Some((us, step)) = parse_mark_line(line) {
                self.at(us, format!("sandbox: {step}"));
            }
        }
    }

    /// The timeline in time order: one line per step, with the time since the start and
    /// since the previous step.
    pub fn lines(&self) -> Vec<String> {
        let Some(steps) = &self.steps else {
            return Vec::new();
        };
        self.read_late();
        let mut steps = steps.lock().unwrap_or_else(|p| p.into_inner()).clone();
        steps.sort_by_key(|(us, _)| *us);
        let mut prev = self.start_us;
        steps
            .into_iter()
            .map(|(us, step)| {
                let line = format!(
                    "{}: {:>8} ms (+{:>7}) {step}",
                    self.label,
                    ms(us.saturating_sub(self.start_us)),
                    ms(us.saturating_sub(prev))
                );
                prev = prev.max(us);
                line
            })
            .collect()
    }

    /// Logs the timeline at debug level.
    pub fn log(&self) {
        for line in self.lines() {
            log::debug!("{line}");
        }
    }
}

/// Microseconds as milliseconds with one decimal.
fn ms(us: u64) -> String {
    format!("{}.{}", us / 1000, us % 1000 / 100)
}

/// A mark as a sync pipe line (with its newline).
pub fn mark_line(us: u64, step: &str) -> String {
    format!("{MARK_PREFIX}{us} {}\n", step.replace('\n', " "))
}

/// Reads a sync pipe line written by [`mark_line`].
pub fn parse_mark_line(line: &str) -> Option<(u64, String)> {
    let (us, step) = line.strip_prefix(MARK_PREFIX)?.split_once(' ')?;
    Some((us.parse().ok()?, step.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_lines_round_trip() {
        let line = mark_line(1_234_567, "mount overlay on /run/x\n");
        assert_eq!(line, "mark 1234567 mount overlay on /run/x \n");
        assert_eq!(
            parse_mark_line(line.trim_end()),
            Some((1_234_567, "mount overlay on /run/x".to_string()))
        );
        assert_eq!(parse_mark_line("mark x y"), None);
        assert_eq!(parse_mark_line("ok"), None);
    }

    #[test]
    fn timelines_are_sorted_with_deltas() {
        let marks = Marks {
            label: "run c1".into(),
            start_us: 1_000_000,
            steps: Some(Mutex::new(Vec::new())),
            late: Mutex::new(None),
        };
        marks.at(1_250_000, "b".into());
        marks.at(1_012_300, "a".into());
        assert_eq!(
            marks.lines(),
            vec![
                "run c1:     12.3 ms (+   12.3) a",
                "run c1:    250.0 ms (+  237.7) b",
            ]
        );
        let off = Marks {
            label: "x".into(),
            start_us: 0,
            steps: None,
            late: Mutex::new(None),
        };
        off.mark("a");
        assert!(!off.enabled());
        assert!(off.lines().is_empty());
    }

    #[test]
    fn late_marks_are_read_from_their_pipe() {
        let marks = Marks {
            label: "r".into(),
            start_us: 0,
            steps: Some(Mutex::new(Vec::new())),
            late: Mutex::new(None),
        };
        let (r, w) = sys::pipe().unwrap();
        let mut w = File::from(w);
        std::io::Write::write_all(&mut w, mark_line(2_000, "init exited").as_bytes()).unwrap();
        marks.set_late(File::from(r));
        marks.at(1_000, "a".into());
        // The writer is still open: what is there is read, without waiting for EOF.
        assert_eq!(
            marks.lines(),
            vec![
                "r:      1.0 ms (+    1.0) a",
                "r:      2.0 ms (+    1.0) sandbox: init exited",
            ]
        );
    }
}
