//! `hearth bench` command-line options (clap derive types).

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};

/// `hearth bench`: start-up and density benchmarks against real processes.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Start-up time of hearth VMs, containers and other VMMs, interleaved.
    Startup(StartupArgs),
    /// Start many microVMs at once: time to boot, memory, clean stop.
    Density(DensityArgs),
    /// Snapshot creation and restore latency of hearth (and Firecracker), interleaved.
    Snapshot(SnapshotArgs),
}

#[derive(Debug, clap::Args)]
pub struct StartupArgs {
    /// Measured runs per case.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub runs: usize,

    /// Unmeasured runs per case first.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warmup: usize,

    /// Where startup.json, startup.svg and startup.md go (created if missing).
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub output: PathBuf,

    /// Comma-separated cases, or `all`: hearth-tiny, hearth-linux, hearth-container,
    /// hearth-container-template, hearth-machine, hearth-machine-start,
    /// hearth-machine-start-template, crun, runc, podman-hearth, podman-crun, unshare,
    /// qemu-tiny, qemu-linux, firecracker-tiny, firecracker-linux.
    #[arg(long, value_name = "LIST", default_value = "all")]
    pub include: String,

    /// The command every case runs in its root filesystem (split at spaces).
    #[arg(long, value_name = "COMMAND", default_value = "/bin/true")]
    pub command: String,

    /// An extra flag for the `hearth run` of the hearth-tiny and hearth-linux cases
    /// (e.g. `--hearth-flag=--no-seccomp`, to measure what the filters cost); repeatable.
    /// The report notes it on those cases.
    #[arg(long = "hearth-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub hearth_flags: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct DensityArgs {
    /// How many microVMs to start at once.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub vms: usize,

    /// Guest RAM of each VM (tiny, linux; default 64M); for container guests the
    /// containers' memory limit (`hearth container run --memory`: the VM gets 64 MiB
    /// more; default none, a 256 MiB VM).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// What each VM runs: the tiny payload that idles after signalling boot, the
    /// minimal Linux kernel running `sleep`, or a container (`hearth container run` of
    /// the busybox rootfs running `sleep`, restored from one template).
    #[arg(long, value_enum, default_value_t = DensityGuest::Tiny)]
    pub guest: DensityGuest,

    /// Where density.json goes (created if missing).
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub output: PathBuf,

    /// Seconds to wait for every VM to signal boot (containers: to print that they run).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Measured snapshot creations per VM and restores per case.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub runs: usize,

    /// Unmeasured rounds of each first.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warmup: usize,

    /// Comma-separated cases, or `all`: hearth-tiny, hearth-linux, firecracker-tiny.
    #[arg(long, value_name = "LIST", default_value = "all")]
    pub include: String,

    /// Comma-separated guest RAM sizes (whole MiB), each case runs at every one.
    #[arg(long, value_name = "SIZES", default_value = "128M,1G")]
    pub memory: String,

    /// Where snapshot.json, snapshot.svg and snapshot.md go (created if missing).
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub output: PathBuf,

    /// Where the snapshot files are written (their on-disk size is this file system's);
    /// default: the temporary directory.
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,

    /// Seconds a Linux guest may take to boot to its output loop.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    pub timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DensityGuest {
    Tiny,
    Linux,
    Container,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    use super::*;

    #[test]
    fn startup_defaults_and_options() {
        let cli = Cli::try_parse_from([
            "hearth",
            "bench",
            "startup",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--include",
            "hearth-tiny,unshare",
            "--output",
            "/tmp/x",
        ])
        .unwrap();
        let Some(Command::Bench(BenchArgs {
            command: BenchCommand::Startup(args),
        })) = cli.command
        else {
            panic!("not bench startup");
        };
        assert_eq!((args.runs, args.warmup), (2, 0));
        assert_eq!(args.include, "hearth-tiny,unshare");
        assert_eq!(args.output, PathBuf::from("/tmp/x"));
        assert_eq!(args.command, "/bin/true");
        assert!(args.hearth_flags.is_empty());
    }

    #[test]
    fn startup_hearth_flags_repeat_and_may_start_with_dashes() {
        let cli = Cli::try_parse_from([
            "hearth",
            "bench",
            "startup",
            "--hearth-flag=--no-seccomp",
            "--hearth-flag",
            "--log-level=debug",
        ])
        .unwrap();
        let Some(Command::Bench(BenchArgs {
            command: BenchCommand::Startup(args),
        })) = cli.command
        else {
            panic!("not bench startup");
        };
        assert_eq!(args.hearth_flags, ["--no-seccomp", "--log-level=debug"]);
    }

    #[test]
    fn snapshot_defaults() {
        let cli = Cli::try_parse_from(["hearth", "bench", "snapshot"]).unwrap();
        let Some(Command::Bench(BenchArgs {
            command: BenchCommand::Snapshot(args),
        })) = cli.command
        else {
            panic!("not bench snapshot");
        };
        assert_eq!((args.runs, args.warmup), (20, 1));
        assert_eq!(
            (args.include.as_str(), args.memory.as_str()),
            ("all", "128M,1G")
        );
        assert_eq!(args.snapshot_dir, None);
    }

    #[test]
    fn density_defaults() {
        let cli = Cli::try_parse_from(["hearth", "bench", "density", "--vms", "5"]).unwrap();
        let Some(Command::Bench(BenchArgs {
            command: BenchCommand::Density(args),
        })) = cli.command
        else {
            panic!("not bench density");
        };
        assert_eq!(args.vms, 5);
        assert_eq!(args.memory, None);
        assert_eq!(args.guest, DensityGuest::Tiny);
    }

    #[test]
    fn density_of_containers() {
        let cli = Cli::try_parse_from([
            "hearth",
            "bench",
            "density",
            "--guest",
            "container",
            "--memory",
            "32M",
        ])
        .unwrap();
        let Some(Command::Bench(BenchArgs {
            command: BenchCommand::Density(args),
        })) = cli.command
        else {
            panic!("not bench density");
        };
        assert_eq!(args.guest, DensityGuest::Container);
        assert_eq!(args.memory.as_deref(), Some("32M"));
        assert!(Cli::try_parse_from(["hearth", "bench", "density", "--guest", "docker"]).is_err());
    }
}
