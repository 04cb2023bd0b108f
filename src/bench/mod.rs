//! `hearth bench`: measures hearth against real processes, child by child.
//!
//! - `startup.rs`: `hearth bench startup`, the interleaved start-up comparison;
//! - `density.rs`: `hearth bench density`, many microVMs at once (`density_container.rs`:
//!   many container VMs from one template);
//! - `snapshot/`: `hearth bench snapshot`, snapshot creation and restore latency;
//! - `cases.rs`: what each start-up case runs; `process.rs`: spawning, timing, reaping;
//! - `stats.rs`, `report.rs`, `chart.rs`: statistics, Markdown/JSON and SVG output;
//! - `memory.rs`: PSS and guest-RAM accounting of a running VMM;
//! - `fixtures/`: the payloads, initramfs and rootfs, shared with the integration tests.

mod args;
pub mod cases;
pub mod chart;
mod density;
mod density_container;
pub mod fixtures;
pub mod memory;
pub mod process;
pub mod report;
mod snapshot;
mod startup;
pub mod stats;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

pub use args::{BenchArgs, BenchCommand, DensityArgs, DensityGuest, SnapshotArgs, StartupArgs};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    /// A step the whole benchmark depends on failed (e.g. making a template).
    #[error("{0}")]
    Step(String),
    #[error("cannot prepare the benchmark fixtures")]
    Fixtures(#[from] fixtures::FixtureError),
    #[error("cannot write \"{path}\"")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the JSON report")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Chart(#[from] chart::ChartError),
    #[error("cannot find the hearth binary")]
    CurrentExe(#[source] std::io::Error),
}

/// Runs `hearth bench ...`; returns the exit status.
pub fn run(args: BenchArgs) -> Result<u8, BenchError> {
    match args.command {
        BenchCommand::Startup(args) => startup::run(&args),
        BenchCommand::Density(args) => density::run(&args),
        BenchCommand::Snapshot(args) => snapshot::run(&args),
    }
}

/// Progress on stderr: a line rewritten in place on a terminal; on anything else only the
/// lines that matter (no control characters).
pub(crate) struct Progress {
    tty: bool,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// A transient status (terminal only).
    pub(crate) fn status(&self, text: &str) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K{text}");
            let _ = err.flush();
        }
    }

    /// A line that stays.
    pub(crate) fn line(&self, text: &str) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!("{text}");
    }

    /// Clears the transient status.
    pub(crate) fn clear(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

/// A scratch directory for fixtures, removed when dropped.
pub(crate) struct WorkDir(PathBuf);

impl WorkDir {
    pub(crate) fn new(what: &str) -> Self {
        Self::under(&std::env::temp_dir(), what)
    }

    /// One in `parent` rather than the temporary directory.
    pub(crate) fn under(parent: &Path, what: &str) -> Self {
        WorkDir(parent.join(format!("hearth-bench-{what}-{}", std::process::id())))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `contents` to `dir/name`, creating `dir`.
pub(crate) fn write_output(dir: &Path, name: &str, contents: &str) -> Result<PathBuf, BenchError> {
    let output_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BenchError::Output { path, source }
    };
    std::fs::create_dir_all(dir).map_err(output_err(dir))?;
    let path = dir.join(name);
    std::fs::write(&path, contents).map_err(output_err(&path))?;
    Ok(path)
}

/// The running hearth binary, which the cases start as a child.
pub(crate) fn hearth_exe() -> Result<PathBuf, BenchError> {
    std::env::current_exe().map_err(BenchError::CurrentExe)
}
