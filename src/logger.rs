//! A small `log` backend: one line per record on stderr, never on stdout (which carries the
//! guest's serial console).

use std::io::Write;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    start: Instant,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.start.elapsed();
        // One write per record so lines from several threads do not interleave.
        let line = format!(
            "[{:>4}.{:06} {:<5} {}] {}\n",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.level(),
            record.target(),
            record.args(),
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`. Calling it twice keeps the first logger and only changes
/// the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_boxed_logger(Box::new(StderrLogger {
        start: crate::process_start(),
    }));
    log::set_max_level(level);
}
