//! A small `log` backend: one line per record on stderr (or in the file given with
//! `--log-path` or `PUT /logger`), never on stdout (which carries the guest's serial
//! console). A line is text (`[seconds-since-start LEVEL target] message`) or, with
//! `--log-format json`, one JSON object: `time` (UTC, RFC 3339), `level`, `target`,
//! `message`.
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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where records go instead of stderr, once a log file is set.
static LOG_FILE: Mutex<Option<File>> = Mutex::new(None);

/// Lines one module may print per `WINDOW`.
const BURST: u32 = 20;
const WINDOW: Duration = Duration::from_secs(1);
/// Crates whose messages are about what the guest did: demoted to debug.
const GUEST_DRIVEN_TARGETS: &[&str] = &["virtio_queue"];
/// Modules whose volume the user chose, not the guest: never limited. The RIP sampler
/// logs at the rate it was asked to sample (`--sample-rip`), and a report of 15 lines
/// per vCPU would otherwise lose its tail.
const UNLIMITED_TARGETS: &[&str] = &["hearth::diag::sampler"];

/// How each record is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

struct StderrLogger {
    start: Instant,
    format: Format,
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
        if UNLIMITED_TARGETS.contains(&target) {
            return Verdict::Print { suppressed: 0 };
        }
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
        let stamp = match self.format {
            Format::Text => {
                let elapsed = now.duration_since(self.start);
                format!("{:>4}.{:06}", elapsed.as_secs(), elapsed.subsec_micros())
            }
            Format::Json => rfc3339(SystemTime::now()),
        };
        let level = effective_level(record.level(), record.target());
        let mut text = String::new();
        if suppressed > 0 {
            let note = format!("{suppressed} more messages were suppressed");
            text.push_str(&line(
                self.format,
                &stamp,
                Level::Warn,
                record.target(),
                &note,
            ));
        }
        let message = record.args().to_string();
        text.push_str(&line(self.format, &stamp, level, record.target(), &message));
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

/// One record as one line, newline included.
fn line(format: Format, stamp: &str, level: Level, target: &str, message: &str) -> String {
    match format {
        Format::Text => format!("[{stamp} {level:<5} {target}] {message}\n"),
        Format::Json => {
            let record = serde_json::json!({
                "time": stamp,
                "level": level.as_str(),
                "target": target,
                "message": message,
            });
            format!("{record}\n")
        }
    }
}

/// `time` as `2026-12-06T15:55:13.123456Z`.
fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since_epoch.subsec_micros()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm:
/// shift to years starting in March, so the leap day ends a year, then count 400-year
/// eras).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Installs the logger at `level`, writing `format`. Calling it twice keeps the first
/// logger and only changes the level.
pub fn init(level: LevelFilter, format: Format) {
    let _ = log::set_boxed_logger(Box::new(StderrLogger {
        start: crate::process_start(),
        format,
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
    fn the_rip_sampler_is_not_limited() {
        let mut limiter = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST * 5 {
            let verdict = limiter.check("hearth::diag::sampler", t0);
            assert_eq!(verdict, Verdict::Print { suppressed: 0 });
        }
    }

    #[test]
    fn json_lines_are_one_object_each() {
        let text = line(
            Format::Text,
            "   1.000002",
            Level::Info,
            "hearth::vmm",
            "VM paused",
        );
        assert_eq!(text, "[   1.000002 INFO  hearth::vmm] VM paused\n");
        let stamp = rfc3339(UNIX_EPOCH + Duration::from_micros(1_709_164_800_000_042));
        assert_eq!(stamp, "2024-02-29T00:00:00.000042Z");
        let json = line(
            Format::Json,
            &stamp,
            Level::Warn,
            "hearth::api",
            "a \"quoted\"\nline",
        );
        assert_eq!(json.matches('\n').count(), 1, "{json}");
        let record: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            record,
            serde_json::json!({
                "time": "2024-02-29T00:00:00.000042Z",
                "level": "WARN",
                "target": "hearth::api",
                "message": "a \"quoted\"\nline",
            })
        );
    }

    #[test]
    fn dates_are_gregorian() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(20_818), (2026, 12, 31));
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
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
