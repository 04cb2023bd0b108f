//! hearth: a lightweight KVM microVM monitor built on the rust-vmm crates.
//!
//! The binary (`src/main.rs`) is a thin shell around [`run_cli`]; everything that builds
//! and runs a VM lives in this library so that tests and benchmarks drive the same code.

pub mod agent;
pub mod api;
pub mod arch;
pub mod bench;
pub mod builder;
pub mod cli;
pub mod config;
pub mod console;
pub mod container;
pub mod device_manager;
pub mod devices;
pub mod diag;
pub mod exit;
pub mod fsutil;
pub mod image;
pub mod jail;
pub mod logger;
pub mod metrics;
pub mod net;
pub mod oci;
pub mod random;
pub mod rate_limiter;
pub mod seccomp;
pub mod snapshot;
pub mod terminal;
#[cfg(test)]
pub(crate) mod testutil;
pub mod uds;
pub mod vmm;
pub mod vstate;

use std::sync::OnceLock;
use std::time::Instant;

use crate::cli::{Cli, Command};
use crate::config::VmConfig;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records the moment the process started; the boot timer measures from here. Call it
/// first thing in `main`.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

/// When the process started (or, if `mark_process_start` was never called, first asked).
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// Everything that can stop hearth before or while running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Build(#[from] builder::BuildError),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
    #[error(transparent)]
    Api(#[from] api::shape::ShapeError),
    #[error(transparent)]
    Remote(#[from] api::remote::RemoteError),
    #[error(transparent)]
    Restore(#[from] api::restore::RestoreError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error(transparent)]
    Passt(#[from] net::passt::PasstError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
}

/// Runs a parsed command line; returns the process exit status.
pub fn run_cli(cli: Cli) -> Result<u8, Error> {
    logger::init(cli.log_level.into(), cli.log_format.into());
    let Some(command) = cli.command else {
        choose_seccomp(cli.firecracker.no_seccomp)?;
        return Ok(api::shape::run_firecracker(&cli.firecracker)?);
    };
    match command {
        Command::Run(args) => {
            let mut config = args.vm_config()?;
            let mut api_sock = args.api_sock.clone();
            // Opened before the jail, which keeps the descriptor (and not the path).
            if let Some(path) = &args.process.metrics_path {
                metrics::init(path)?;
            }
            // passt is started (and stopped when this returns) by the process that stays
            // outside the jail; the jailed VMM inherits only its socket.
            let host_networks = net::prepare(&config.nets, args.process.passt.as_deref())?;
            if let Some(jail) = args.process.jail.config()? {
                let mut sockets: Vec<&mut std::path::PathBuf> = api_sock.iter_mut().collect();
                match jail::enter(&jail, &mut config, &mut sockets)? {
                    jail::Side::Parent(status) => return Ok(status),
                    // The supervisor stops passt; this process's copy of the pids (in
                    // another pid namespace now) means nothing.
                    jail::Side::Jailed => host_networks.forget(),
                }
            }
            choose_seccomp(args.process.no_seccomp)?;
            match &api_sock {
                Some(path) => Ok(api::shape::run_with_api(&config, path)?),
                None => run_vm(&config),
            }
        }
        // Like docker, failures of hearth itself (as opposed to the container's own exit
        // status) exit 125.
        Command::Container(cli::ContainerCommand::Run(args)) => Ok(container::run::run(&args)
            .unwrap_or_else(|err| {
                eprintln!("hearth: {}", error_chain(&err));
                125
            })),
        Command::Machine(cmd) => Ok(container::machine::command(&cmd).unwrap_or_else(|err| {
            eprintln!("hearth: {}", error_chain(&err));
            125
        })),
        Command::Template(cmd) => Ok(container::template::command(&cmd).unwrap_or_else(|err| {
            eprintln!("hearth: {}", error_chain(&err));
            1
        })),
        Command::Pull(args) => {
            let options = args
                .registry
                .options(args.quiet)
                .map_err(image::ImageError::from)?;
            image::pull::command(&args.reference, &options).map_err(image::ImageError::from)?;
            Ok(0)
        }
        Command::Bench(args) => Ok(bench::run(args)?),
        Command::Remote(args) => {
            api::remote::run(&args, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        Command::Restore(args) => {
            if let Some(path) = &args.process.metrics_path {
                metrics::init(path)?;
            }
            choose_seccomp(args.process.no_seccomp)?;
            Ok(api::restore::run(&args)?)
        }
    }
}

/// For the commands that run a VMM: its threads are filtered (see [`seccomp`]) unless
/// the user turned that off.
fn choose_seccomp(no_seccomp: bool) -> Result<(), Error> {
    if no_seccomp {
        eprintln!(
            "hearth: warning: --no-seccomp: the VMM runs without seccomp filters, so a guest \
             that compromises it can make any syscall"
        );
    } else {
        seccomp::enable()?;
    }
    Ok(())
}

/// Boots the configured VM and runs it to the end. An abnormal end (triple fault,
/// emulation failure, signal) is reported on stderr in one line.
pub fn run_vm(config: &VmConfig) -> Result<u8, Error> {
    let vmm = builder::build_vm(config, process_start())?;
    let reason = vmm.run()?;
    Ok(report_exit(&reason))
}

/// Says why the VM stopped (one line on stderr when it was not orderly) and returns the
/// process exit status for it.
pub fn report_exit(reason: &exit::ExitReason) -> u8 {
    if reason.is_orderly() {
        log::info!("{reason}");
    } else {
        eprintln!("hearth: {reason}");
    }
    reason.status()
}

/// "outer: inner: innermost", the way errors are shown to the user.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Transparent wrappers repeat their inner message; show it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_is_one_line() {
        let err = Outer(std::io::Error::new(std::io::ErrorKind::NotFound, "inner"));
        assert_eq!(error_chain(&err), "outer: inner");
    }
}
