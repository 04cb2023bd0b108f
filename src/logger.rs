//! A small `log` backend: one line per record on stderr (or in the file given with
//! `--log-path` or `PUT /logger`), never on stdout (which carries the guest's serial
//! console).
//!
//! A guest can make hearth log: every malformed request it posts may produce a warning,
//! and the `virtio-queue` crate reports a bad ring at error level. So that a malicious
//! guest cannot flood the host's logs, records from `virtio-queue` count as debug
//! (they describe guest behaviour, not hearth failures), and each module may print at most
//! `BURST` lines per second; the rest are counted and summarised once the second is over.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where records go instead of stderr, once a log file is set.
static LOG_FILE: Mutex<Option<File>> = Mutex::new(None);

/// Lines one module may print per `WINDOW`.
const BURST: u32 = 20;
const WINDOW: Duration = Duration::from_secs(1);
/// Crates whose messages are about what the guest did: demoted to debug.
const GUEST_DRIVEN_TARGETS: &[&str] = &["virtio_queue"];

struct StderrLogger {
    start: Instant,
    limiter: Mutex<RateLimiter>,
}

/// Per-target line budget.
#[derive(Default)]
struct RateLimiter {
    windows: HashMap<String, Window>,
}

struct Window {
    started: Instant,
    printed: u32,
    suppressed: u64,
}

/// What to do with one record.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Print it, after a note about `suppressed` earlier lines when non-zero.
    Print {
        suppressed: u64,
    },
    Drop,
}

impl RateLimiter {
    fn check(&mut self, target: &str, now: Instant) -> Verdict {
        let window = self
            .windows
            .entry(target.to_string())
            .or_insert_with(|| Window {
                started: now,
                printed: 0,
                suppressed: 0,
            });
        if now.duration_since(window.started) >= WINDOW {
            let suppressed = window.suppressed;
            *window = Window {
                started: now,
                printed: 1,
                suppressed: 0,
            };
            return Verdict::Print { suppressed };
        }
        if window.printed < BURST {
            window.printed += 1;
            Verdict::Print { suppressed: 0 }
        } else {
            window.suppressed += 1;
            crate::metrics::METRICS.logger.missed_log_count.inc();
            Verdict::Drop
        }
    }
}

fn effective_level(record_level: Level, target: &str) -> Level {
    let guest_driven = GUEST_DRIVEN_TARGETS
        .iter()
        .any(|t| target == *t || target.starts_with(&format!("{t}::")));
    if guest_driven && record_level < Level::Debug {
        Level::Debug
    } else {
        record_level
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        effective_level(metadata.level(), metadata.target()) <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = Instant::now();
        let verdict = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(record.target(), now);
        let Verdict::Print { suppressed } = verdict else {
            return;
        };
        let elapsed = now.duration_since(self.start);
        let stamp = format!("{:>4}.{:06}", elapsed.as_secs(), elapsed.subsec_micros());
        let level = effective_level(record.level(), record.target());
        let mut text = String::new();
        if suppressed > 0 {
            text.push_str(&format!(
                "[{stamp} WARN  {}] {suppressed} more messages were suppressed\n",
                record.target()
            ));
        }
        text.push_str(&format!(
            "[{stamp} {level:<5} {}] {}\n",
            record.target(),
            record.args()
        ));
        // One write per record so lines from several threads do not interleave.
        let mut file = LOG_FILE.lock().unwrap_or_else(|p| p.into_inner());
        match file.as_mut() {
            Some(file) => {
                let _ = file.write_all(text.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`. Calling it twice keeps the first logger and only changes
/// the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_boxed_logger(Box::new(StderrLogger {
        start: crate::process_start(),
        limiter: Mutex::new(RateLimiter::default()),
    }));
    log::set_max_level(level);
}

/// Sends hearth's log to `path` (appended; a named pipe works too) instead of stderr.
pub fn log_to_file(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    *LOG_FILE.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_limited_per_target_and_summarised() {
        let mut limiter = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limiter.check("a", t0), Verdict::Print { suppressed: 0 });
        }
        assert_eq!(limiter.check("a", t0), Verdict::Drop);
        assert_eq!(limiter.check("a", t0), Verdict::Drop);
        // Another module has its own budget.
        assert_eq!(limiter.check("b", t0), Verdict::Print { suppressed: 0 });
        // The next window starts with a summary of what was dropped.
        assert_eq!(
            limiter.check("a", t0 + WINDOW),
            Verdict::Print { suppressed: 2 }
        );
        assert_eq!(
            limiter.check("a", t0 + WINDOW),
            Verdict::Print { suppressed: 0 }
        );
    }

    #[test]
    fn guest_driven_crates_are_demoted() {
        assert_eq!(
            effective_level(Level::Error, "virtio_queue::queue"),
            Level::Debug
        );
        assert_eq!(effective_level(Level::Error, "virtio_queue"), Level::Debug);
        assert_eq!(effective_level(Level::Trace, "virtio_queue"), Level::Trace);
        assert_eq!(effective_level(Level::Error, "hearth::vmm"), Level::Error);
        assert_eq!(effective_level(Level::Warn, "virtio_queue_x"), Level::Warn);
    }
}
