//! Command-line interface (clap derive types). Turning these into validated configuration
//! happens in `config`; nothing here touches KVM.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::DEFAULT_CMDLINE;

/// hearth: a lightweight KVM microVM monitor.
#[derive(Debug, Parser)]
#[command(name = "hearth", version, about, long_about = None)]
pub struct Cli {
    /// How much hearth itself logs on stderr.
    #[arg(long, value_enum, default_value_t = LogLevel::Warn, global = true)]
    pub log_level: LogLevel,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel and run it until it exits.
    Run(RunArgs),
    /// Benchmarks: start-up against containers and other VMMs, and VM density.
    Bench(crate::bench::BenchArgs),
}

/// `hearth run` options. Values are checked in `config::VmConfig::from_args`, before
/// /dev/kvm is opened.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest kernel: ELF vmlinux (64-bit entry or Xen PVH note) or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk loaded high in guest RAM.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line. Arguments after ` -- ` are passed to the guest's init.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u64,

    /// Guest RAM, in bytes or with a K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub memory: String,

    /// Where the guest's serial console goes: stdio, none, file=PATH or unix=PATH.
    #[arg(long, value_name = "SPEC", default_value = "stdio")]
    pub serial: String,

    /// A virtio-blk disk backed by a raw image: path=FILE[,ro=on][,id=NAME]. Repeatable.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,

    /// A virtio-net interface on an existing tap device: tap=NAME[,mac=XX:XX:XX:XX:XX:XX].
    /// Repeatable.
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,

    /// A virtio-vsock device: cid=N,socket=PATH. Host programs connect to PATH and send
    /// "CONNECT <port>\n" to reach a guest listener; guest connections to host port P go
    /// to the Unix socket PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,

    /// Print the time from process start to the guest's boot-complete signal on stderr.
    #[arg(long)]
    pub boot_timer: bool,

    /// CPU compatibility profile: `compat` completes what a nested-PVM KVM gets wrong,
    /// `host` passes the host CPU through, `auto` picks by looking at the host.
    #[arg(long, value_enum, default_value_t = CpuProfileChoice::Auto)]
    pub cpu_profile: CpuProfileChoice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CpuProfileChoice {
    Auto,
    Host,
    Compat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_defaults() {
        let cli = Cli::try_parse_from(["hearth", "run", "--kernel", "k"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.cpus, 1);
        assert_eq!(args.memory, "256M");
        assert_eq!(args.serial, "stdio");
        assert_eq!(args.cmdline, DEFAULT_CMDLINE);
        assert_eq!(args.cpu_profile, CpuProfileChoice::Auto);
        assert_eq!(cli.log_level, LogLevel::Warn);
    }

    #[test]
    fn kernel_is_required() {
        assert!(Cli::try_parse_from(["hearth", "run"]).is_err());
    }

    #[test]
    fn log_level_is_global() {
        let cli = Cli::try_parse_from(["hearth", "run", "--kernel", "k", "--log-level", "debug"])
            .unwrap();
        assert_eq!(cli.log_level, LogLevel::Debug);
    }
}
