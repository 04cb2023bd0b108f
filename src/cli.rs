//! Command-line interface (clap derive types), and `hearth run`'s flags turned into a
//! [`VmConfig`]; the checks every producer shares are `config`'s. Nothing here touches KVM.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{
    parse_memory_size, split_cmdline, BootSpeedups, ConfigError, CpuProfileChoice, SpecError,
    VmConfig, DEFAULT_CMDLINE,
};

/// hearth: a lightweight KVM microVM monitor.
#[derive(Debug, Parser)]
#[command(name = "hearth", version, about, long_about = None)]
pub struct Cli {
    /// How much hearth itself logs on stderr.
    #[arg(long, value_enum, default_value_t = LogLevel::Warn, global = true)]
    pub log_level: LogLevel,

    /// How hearth's log lines look: text, or one JSON object per line (time, level,
    /// target, message).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// Without a subcommand, hearth behaves like the `firecracker` binary.
    #[command(flatten)]
    pub firecracker: FirecrackerArgs,
}

impl Cli {
    /// Checks what clap cannot: Firecracker's flags go without a subcommand, and without
    /// a subcommand an API socket or a configuration file is needed.
    pub fn check(&self) -> Result<(), clap::Error> {
        use clap::CommandFactory;
        let fc = &self.firecracker;
        let message = match &self.command {
            Some(_) if fc.is_used() => {
                "Firecracker's flags (--api-sock, --config-file, --id, ...) are for hearth \
                 without a subcommand; `hearth run`, `hearth remote` and `hearth restore` \
                 take --api-sock after their name"
            }
            None if fc.api_sock.is_none() && fc.config_file.is_none() => {
                "give a subcommand, or --api-sock PATH (and/or --config-file FILE) to run \
                 as a Firecracker-compatible VMM"
            }
            _ => return Ok(()),
        };
        Err(Cli::command().error(clap::error::ErrorKind::ArgumentConflict, message))
    }
}

/// The flags of the `firecracker` binary, for launchers written for it. Flags for
/// features hearth lacks are accepted by the parser and refused with a clear error.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FirecrackerArgs {
    /// Serve Firecracker's HTTP API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Build the microVM from this Firecracker JSON configuration and start it.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// No API socket (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// MicroVM identifier, reported by `GET /`.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Run without the seccomp filters (for debugging; prints a warning).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Log level: Error, Warning, Info, Debug, Trace or Off (overrides --log-level).
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,
    /// Write hearth's log to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Write the metrics (one JSON object per line) to this file or named pipe, every
    /// 60 s, on FlushMetrics and at exit.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Print the time from process start to the guest's boot-complete signal on stderr.
    #[arg(long)]
    pub boot_timer: bool,
    /// Largest API request body, in bytes (Firecracker's default: 51200).
    #[arg(long, value_name = "BYTES")]
    pub http_api_max_payload_size: Option<usize>,
    /// Accepted: hearth's log lines always show their level.
    #[arg(long)]
    pub show_level: bool,
    /// Accepted: hearth's log lines always show the module they come from.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Accepted and unused (Firecracker's start-time metrics).
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// Accepted and unused (Firecracker's start-time metrics).
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// Accepted and unused (Firecracker's start-time metrics).
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
    /// Refused: hearth's seccomp filters are built in.
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<String>,
    /// Refused: hearth's log cannot be filtered by module.
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// Refused: hearth has no metadata service (MMDS).
    #[arg(long, value_name = "FILE")]
    pub metadata: Option<PathBuf>,
    /// Refused: hearth has no metadata service (MMDS).
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
}

impl FirecrackerArgs {
    fn is_used(&self) -> bool {
        self.api_sock.is_some()
            || self.config_file.is_some()
            || self.no_api
            || self.id.is_some()
            || self.no_seccomp
            || self.level.is_some()
            || self.log_path.is_some()
            || self.metrics_path.is_some()
            || self.boot_timer
            || self.http_api_max_payload_size.is_some()
            || self.show_level
            || self.show_log_origin
            || self.start_time_us.is_some()
            || self.start_time_cpu_us.is_some()
            || self.parent_cpu_time_us.is_some()
            || self.seccomp_filter.is_some()
            || self.module.is_some()
            || self.metadata.is_some()
            || self.mmds_size_limit.is_some()
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel and run it until it exits.
    Run(RunArgs),
    /// Run OCI container images in microVMs.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Long-lived Linux VMs that host several containers.
    #[command(subcommand)]
    Machine(MachineCommand),
    /// The booted-VM snapshots fresh container VMs and machines start from.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Benchmarks: start-up against containers and other VMMs, VM density, snapshots.
    Bench(crate::bench::BenchArgs),
    /// Drive a running VMM through its API socket (info, pause, resume, snapshot,
    /// ctrl-alt-del, shutdown).
    Remote(crate::api::remote::RemoteArgs),
    /// Restore a microVM from a snapshot and run it.
    Restore(crate::api::restore::RestoreArgs),
    /// Pull an image from a registry into hearth's cache (docker's `pull`).
    Pull(crate::image::pull::PullArgs),
}

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// Run a command in a new container: in a fresh microVM, or in a running machine
    /// with --machine. Exits with the command's exit status (125 when hearth fails).
    Run(ContainerRunArgs),
}

/// Options of a process started in a container or a machine, as docker spells them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProcessArgs {
    /// Set an environment variable (KEY=VALUE, or KEY to pass ours). Repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,

    /// User to run as: UID[:GID] or NAME[:GROUP].
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,

    /// Keep stdin open and forward it.
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,

    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
}

/// `hearth container run` options.
#[derive(Debug, clap::Args)]
pub struct ContainerRunArgs {
    #[command(flatten)]
    pub process: ProcessArgs,

    /// Share a host directory (or an ext4 image file): HOSTPATH:GUESTDIR[:ro][:copy]. A
    /// directory is shared over virtio-fs (writes land on the host at once); with `copy`
    /// it is copied into a disk image for this run instead (writes are not copied
    /// back). With --machine, HOSTPATH must lie under one of the machine's --share folders.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:OPTS]")]
    pub volumes: Vec<String>,

    /// The virtio-fs back end (default: virtiofsd on PATH, /usr/lib/qemu/virtiofsd or
    /// /usr/libexec/virtiofsd).
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,

    /// Memory limit of the container; a fresh microVM gets this much plus 64 MiB.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// CPU limit (e.g. 1.5); a fresh microVM gets this many vCPUs, rounded up.
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,

    /// user (the default for a fresh microVM: passt, no root needed), none, or
    /// tap=NAME[,ip=A.B.C.D/N][,gw=A.B.C.D] (fresh microVM only). In a machine: bridge
    /// (the default: an address of its own on the machine's bridge, NAT to the machine's
    /// network) or none.
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,

    /// Publish a container port on the host: [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]
    /// (HOSTIP defaults to 0.0.0.0, as with docker). Repeatable. Through passt for a
    /// fresh microVM; in a machine, over vsock by this process while the container runs.
    #[arg(short = 'p', long = "publish", value_name = "PORTS")]
    pub publish: Vec<String>,

    /// Override the image's entrypoint ("" clears it).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,

    /// Container hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,

    /// Container name (unique in a machine; `hearth machine exec` uses it).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Run inside this running machine instead of a fresh microVM.
    #[arg(long, value_name = "NAME")]
    pub machine: Option<String>,

    /// Guest kernel (default: resources' minimal kernel from the cache).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Give up if the guest agent has not connected after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub boot_timeout: u64,

    /// Boot the fresh microVM's kernel instead of restoring it from a template (a
    /// snapshot of a booted agent VM, made on first use; see `hearth template`).
    #[arg(long)]
    pub no_template: bool,

    /// Run the fresh microVM's VMM without the jail it gets when hearth runs as root
    /// (README "Security: the jail").
    #[arg(long)]
    pub no_jail: bool,

    /// When to pull IMAGE from its registry, if it is a reference.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = crate::image::pull::PullPolicyArg::Missing)]
    pub pull: crate::image::pull::PullPolicyArg,

    #[command(flatten)]
    pub registry: crate::image::pull::RegistryArgs,

    /// The image: an OCI layout directory, an OCI archive, a `docker save` tarball, or a
    /// root filesystem directory or tarball; anything that is not an existing file or
    /// directory is a registry reference (`busybox`, `localhost:5000/x:y`).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Command and arguments (default: the image's entrypoint and cmd).
    #[arg(
        value_name = "CMD",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Boot a named machine in the background and wait until its agent answers.
    Start(MachineStartArgs),
    /// Stop a machine's containers and power it off.
    Stop {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// List machines.
    List,
    /// Run a command in the machine itself (not in a container).
    Run {
        #[command(flatten)]
        process: ProcessArgs,
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(
            value_name = "CMD",
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true
        )]
        command: Vec<String>,
    },
    /// Run a command inside a running container of the machine.
    Exec {
        #[command(flatten)]
        process: ProcessArgs,
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "CONTAINER")]
        container: String,
        #[arg(
            value_name = "CMD",
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true
        )]
        command: Vec<String>,
    },
}

/// `hearth machine start` options.
#[derive(Debug, clap::Args)]
pub struct MachineStartArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    /// vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u64,

    /// Guest RAM (containers' overlays and loaded images live in it).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,

    /// Share a host folder with the machine over virtio-fs: HOST[:GUEST][:ro], mounted at
    /// GUEST (default: the same path as on the host). Repeatable; `container run
    /// --machine -v` takes folders under these.
    #[arg(long = "share", value_name = "HOST[:GUEST][:ro]")]
    pub shares: Vec<String>,

    /// The virtio-fs back end (default: virtiofsd on PATH, /usr/lib/qemu/virtiofsd or
    /// /usr/libexec/virtiofsd).
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,

    /// Guest kernel (default: resources' minimal kernel from the cache).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Give up if the agent has not answered after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub boot_timeout: u64,

    /// Boot the machine's kernel instead of restoring it from a template (a snapshot
    /// of a booted machine, made on first use; see `hearth template`).
    #[arg(long)]
    pub no_template: bool,

    /// Run the machine's VMM without the jail it gets when hearth runs as root
    /// (README "Security: the jail").
    #[arg(long)]
    pub no_jail: bool,

    /// The machine's own network: user (the default: passt, no root needed; its
    /// containers reach it through the machine's NAT) or none.
    #[arg(long, value_name = "MODE", default_value = "user")]
    pub network: String,

    /// Publish a port of the machine itself on the host, through passt:
    /// [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp] (declared at start: passt cannot add
    /// forwards later). Repeatable. Containers publish theirs with `container run -p`.
    #[arg(short = 'p', long = "publish", value_name = "PORTS")]
    pub publish: Vec<String>,
}

/// `hearth template ...`: the snapshots container VMs and machines are restored from.
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// List the templates: key, size, age.
    List,
    /// Delete templates by id (as `list` shows it, or a unique prefix of it).
    Rm {
        #[arg(value_name = "ID", required = true)]
        ids: Vec<String>,
    },
    /// Delete every template, or with --stale only those no current kernel, agent or
    /// hearth binary can use any more.
    Prune {
        /// Keep templates whose kernel, initramfs and hearth binary are unchanged.
        #[arg(long)]
        stale: bool,
    },
}

/// `hearth run` options: the VM either from the flags or from a config file. Both become
/// a [`VmConfig`] checked by [`VmConfig::validate`] (see [`RunArgs::vm_config`]).
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The whole VM from hearth's JSON config file (see README, "File formats") instead of
    /// the flags below.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "kernel", "initrd", "cmdline", "cpus", "memory", "serial", "disks", "nets",
            "vsock", "fs", "rng", "boot_timer", "cpu_profile", "boot_speedups",
        ]
    )]
    pub config: Option<PathBuf>,

    /// Guest kernel: ELF vmlinux (64-bit entry or Xen PVH note) or bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    pub kernel: Option<PathBuf>,

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

    /// A virtio-blk disk backed by a raw image: path=FILE[,ro=on][,id=NAME], limited with
    /// [,bw=BYTES][,iops=N][,burst=BYTES] per second. Repeatable. A comma in a value is
    /// written twice.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,

    /// A virtio-net interface on an existing tap device: tap=NAME[,mac=XX:XX:XX:XX:XX:XX],
    /// limited with [,rx_bw=BYTES][,tx_bw=BYTES][,rx_ops=N][,tx_ops=N][,burst=BYTES] per
    /// second; or on user-mode networking, a passt hearth starts (`user`, publishing
    /// host ports with ports=[IP:]HOSTPORT:GUESTPORT[/udp][+...]); or on the stream
    /// socket of a passt already running (stream=PATH). Repeatable.
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,

    /// A virtio-vsock device: cid=N,socket=PATH. Host programs connect to PATH and send
    /// "CONNECT <port>\n" to reach a guest listener; guest connections to host port P go
    /// to the Unix socket PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,

    /// A virtio-fs shared folder served by a vhost-user back end (virtiofsd) listening on
    /// PATH: tag=NAME,socket=PATH[,num_queues=N][,queue_size=N]. The guest mounts it with
    /// `mount -t virtiofs NAME DIR`. Repeatable; guest RAM is then a shareable memfd.
    #[arg(long = "fs", value_name = "SPEC")]
    pub fs: Vec<String>,

    /// A virtio-rng entropy device, filled from the host's getrandom, so the guest never
    /// waits for entropy. An optional SPEC limits it: [bw=BYTES][,ops=N][,burst=BYTES]
    /// per second.
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "")]
    pub rng: Option<String>,

    /// A virtio-balloon: the guest gives back the memory it frees (free page reporting)
    /// and what the API's PATCH /balloon asks for. An optional SPEC:
    /// [amount_mib=N][,deflate_on_oom=on][,stats_polling_interval_s=S][,free_page_reporting=off]
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "")]
    pub balloon: Option<String>,

    /// Print the time from process start to the guest's boot-complete signal on stderr.
    #[arg(long)]
    pub boot_timer: bool,

    /// Diagnostic: sample each vCPU's instruction pointer every MS milliseconds and log
    /// the most sampled kernel functions every 10 s (each sample at --log-level debug).
    /// A config file sets it as `sample_rip` instead.
    #[arg(long, value_name = "MS", conflicts_with = "config")]
    pub sample_rip: Option<u32>,

    /// Symbols for --sample-rip: a System.map or an ELF with a symbol table (default: the
    /// kernel's own symbols, else System.map in the kernel's directory, else raw addresses).
    #[arg(long, value_name = "PATH", requires = "sample_rip")]
    pub kernel_symbols: Option<PathBuf>,

    /// CPU compatibility profile: `compat` completes what a nested-PVM KVM gets wrong,
    /// `host` passes the host CPU through, `auto` picks by looking at the host.
    #[arg(long, value_enum, default_value_t = CpuProfileChoice::Auto)]
    pub cpu_profile: CpuProfileChoice,

    /// With the compat profile, append boot parameters that spare the guest minutes of
    /// emulated work (never one the command line already sets); `off` appends none.
    #[arg(long, value_enum, default_value_t = BootSpeedups::On)]
    pub boot_speedups: BootSpeedups,

    /// Serve Firecracker's HTTP API on this Unix socket while the VM runs.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    #[command(flatten)]
    pub process: VmmProcessArgs,
}

/// Why `hearth run`'s arguments do not make a VM.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid {flag} \"{spec}\"")]
    Spec {
        flag: &'static str,
        spec: String,
        #[source]
        source: SpecError,
    },
    #[error("--kernel or --config is required")]
    NoKernel,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// How the VMM process runs, whatever VM it runs: shared by `hearth run` and
/// `hearth restore`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct VmmProcessArgs {
    /// Append the metrics (one JSON object per line) to this file or named pipe every
    /// 60 s, on the API's FlushMetrics and at exit.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,

    /// Run without the seccomp filters (for debugging; prints a warning).
    #[arg(long)]
    pub no_seccomp: bool,

    /// The passt binary for user-mode NICs (default: $HEARTH_PASST, else passt on PATH).
    #[arg(long, value_name = "PATH")]
    pub passt: Option<PathBuf>,

    #[command(flatten)]
    pub jail: crate::jail::JailArgs,
}

impl RunArgs {
    /// The VM these arguments describe, validated against this host.
    pub fn vm_config(&self) -> Result<VmConfig, CliError> {
        let config = match &self.config {
            Some(path) => VmConfig::from_file(path)?,
            None => self.config_from_flags()?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the flags' syntax; the values are checked by `validate`.
    fn config_from_flags(&self) -> Result<VmConfig, CliError> {
        fn parse<T: std::str::FromStr<Err = SpecError>>(
            flag: &'static str,
            spec: &str,
        ) -> Result<T, CliError> {
            spec.parse().map_err(|source| CliError::Spec {
                flag,
                spec: spec.to_string(),
                source,
            })
        }
        let kernel = self.kernel.clone().ok_or(CliError::NoKernel)?;
        let vcpu_count = u8::try_from(self.cpus).map_err(|_| ConfigError::VcpuCount(self.cpus))?;
        let (boot_args, init_args) = split_cmdline(&self.cmdline);
        Ok(VmConfig {
            kernel,
            initrd: self.initrd.clone(),
            boot_args,
            init_args,
            vcpu_count,
            mem_size: parse_memory_size(&self.memory)?,
            serial: parse("--serial", &self.serial)?,
            disks: (self.disks.iter())
                .map(|spec| parse("--disk", spec))
                .collect::<Result<_, _>>()?,
            nets: (self.nets.iter())
                .map(|spec| parse("--net", spec))
                .collect::<Result<_, _>>()?,
            vsock: (self.vsock.as_deref())
                .map(|spec| parse("--vsock", spec))
                .transpose()?,
            fs: (self.fs.iter())
                .map(|spec| parse("--fs", spec))
                .collect::<Result<_, _>>()?,
            rng: (self.rng.as_deref())
                .map(|spec| parse("--rng", spec))
                .transpose()?,
            balloon: (self.balloon.as_deref())
                .map(|spec| parse("--balloon", spec))
                .transpose()?,
            boot_timer: self.boot_timer,
            sample_rip: (self.sample_rip).map(|interval_ms| crate::config::RipSamplingConfig {
                interval_ms,
                kernel_symbols: self.kernel_symbols.clone(),
            }),
            cpu_profile: self.cpu_profile,
            boot_speedups: self.boot_speedups,
        })
    }
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for crate::logger::Format {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => Self::Text,
            LogFormat::Json => Self::Json,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MEM_SIZE;
    use crate::devices::virtio::rng::RngConfig;
    use crate::rate_limiter::TokenBucketConfig;

    #[test]
    fn run_defaults() {
        let cli = Cli::try_parse_from(["hearth", "run", "--kernel", "k"]).unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args.cpus, 1);
        assert_eq!(args.memory, "256M");
        assert_eq!(args.serial, "stdio");
        assert_eq!(args.cmdline, DEFAULT_CMDLINE);
        assert_eq!(args.cpu_profile, CpuProfileChoice::Auto);
        assert_eq!(args.boot_speedups, BootSpeedups::On);
        assert_eq!(parse_memory_size(&args.memory).unwrap(), DEFAULT_MEM_SIZE);
        assert_eq!(cli.log_level, LogLevel::Warn);
    }

    fn run_args(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["hearth", "run"].iter().chain(argv))?;
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run");
        };
        Ok(args)
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn flags_make_a_config() {
        let kernel = temp_file("kernel", "k");
        let disk = temp_file("a,b.img", "");
        let args = run_args(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 -- /bin/sh -c true",
            "--cpus",
            "2",
            "--memory",
            "64M",
            "--serial",
            "none",
            "--disk",
            &format!(
                "path={},ro=on,bw=10M,iops=100,burst=1M",
                disk.to_str().unwrap().replace(',', ",,")
            ),
            "--net",
            "tap=tap0,rx_bw=1M,tx_ops=50",
            "--vsock",
            "cid=3,socket=/run/v.sock",
            "--fs",
            "tag=hostshare,socket=/run/fs.sock",
            "--fs",
            "tag=b,socket=/run/b.sock,num_queues=2,queue_size=256",
            "--rng",
            "--cpu-profile",
            "host",
            "--boot-speedups",
            "off",
        ])
        .unwrap();
        let config = args.vm_config().unwrap();
        let mut expected = VmConfig::new(&kernel);
        expected.boot_args = "console=ttyS0".into();
        expected.init_args = Some("/bin/sh -c true".into());
        expected.vcpu_count = 2;
        expected.mem_size = 64 << 20;
        expected.serial = crate::config::SerialConfig::None;
        expected.disks = vec![crate::devices::virtio::block::BlockConfig {
            path: disk,
            read_only: true,
            id: None,
            rate_limiter: crate::rate_limiter::RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig::per_second(10 << 20, Some(1 << 20))),
                ops: Some(TokenBucketConfig::per_second(100, None)),
            },
        }];
        let mut nic: crate::devices::virtio::net::NetConfig = "tap=tap0".parse().unwrap();
        nic.rx_rate_limiter.bandwidth = Some(TokenBucketConfig::per_second(1 << 20, None));
        nic.tx_rate_limiter.ops = Some(TokenBucketConfig::per_second(50, None));
        expected.nets = vec![nic];
        expected.vsock = Some("cid=3,socket=/run/v.sock".parse().unwrap());
        let mut second = crate::devices::virtio::fs::FsConfig::new("b", "/run/b.sock");
        second.num_request_queues = 2;
        second.queue_size = 256;
        expected.fs = vec![
            crate::devices::virtio::fs::FsConfig::new("hostshare", "/run/fs.sock"),
            second,
        ];
        expected.rng = Some(RngConfig::default());
        expected.cpu_profile = CpuProfileChoice::Host;
        expected.boot_speedups = BootSpeedups::Off;
        assert_eq!(config, expected);

        let args = run_args(&[
            "--kernel",
            "k",
            "--sample-rip",
            "5",
            "--kernel-symbols",
            "m",
        ]);
        let sampling = args
            .unwrap()
            .config_from_flags()
            .unwrap()
            .sample_rip
            .unwrap();
        assert_eq!(
            (sampling.interval_ms, sampling.kernel_symbols),
            (5, Some("m".into()))
        );
        assert!(run_args(&["--kernel", "k", "--kernel-symbols", "m"]).is_err());
        assert!(run_args(&["--config", "c", "--sample-rip", "5"]).is_err());

        let args = run_args(&["--kernel", kernel.to_str().unwrap(), "--rng", "bw=4K"]).unwrap();
        let rng = args.vm_config().unwrap().rng.unwrap();
        assert_eq!(
            rng.rate_limiter.bandwidth,
            Some(TokenBucketConfig::per_second(4096, None))
        );
    }

    #[test]
    fn a_config_file_gives_the_same_config_as_the_flags() {
        let kernel = temp_file("kernel-file", "k");
        let flags = run_args(&["--kernel", kernel.to_str().unwrap(), "--memory", "64M"])
            .unwrap()
            .vm_config()
            .unwrap();
        let file = temp_file("vm.json", &flags.to_json().unwrap());
        let args = run_args(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(args.vm_config().unwrap(), flags);
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let kernel = temp_file("kernel-bad", "k");
        let kernel = kernel.to_str().unwrap();
        for (flag, spec, expected) in [
            (
                "--disk",
                "ro=on",
                "invalid --disk \"ro=on\": path=FILE is required",
            ),
            (
                "--net",
                "tap=t,mac=zz",
                "invalid --net \"tap=t,mac=zz\": invalid MAC address \"zz\": expected six hex bytes like 52:54:00:12:34:56",
            ),
            (
                "--vsock",
                "cid=x,socket=/s",
                "invalid --vsock \"cid=x,socket=/s\": cid \"x\" is not a number",
            ),
            (
                "--serial",
                "tcp=1",
                "invalid --serial \"tcp=1\": expected stdio, none, file=PATH or unix=PATH",
            ),
            (
                "--disk",
                "path=/d,bw=ten",
                "invalid --disk \"path=/d,bw=ten\": bw \"ten\" is not a positive whole number with an optional K, M or G suffix",
            ),
            (
                "--net",
                "tap=t,burst=1M",
                "invalid --net \"tap=t,burst=1M\": burst= needs a bandwidth (rx_bw= or tx_bw=)",
            ),
            (
                "--rng",
                "ops=0",
                "invalid --rng \"ops=0\": ops \"0\" is not a positive whole number with an optional K, M or G suffix",
            ),
            (
                "--fs",
                "socket=/s",
                "invalid --fs \"socket=/s\": tag=NAME is required",
            ),
            (
                "--fs",
                "tag=0123456789012345678901234567890123456,socket=/s",
                "virtio-fs tag \"0123456789012345678901234567890123456\" is 37 bytes, longer than 36",
            ),
            (
                "--fs",
                "tag=t,socket=/s,queue_size=100",
                "virtio-fs \"t\": queue size 100 is not a power of two between 2 and 1024",
            ),
            (
                "--cpus",
                "100000",
                "invalid number of vCPUs 100000: must be between 1 and 254",
            ),
        ] {
            let args = run_args(&["--kernel", kernel, flag, spec]).unwrap();
            let err = args.vm_config().unwrap_err();
            assert_eq!(crate::error_chain(&err), expected);
        }
    }

    #[test]
    fn config_excludes_the_vm_flags() {
        assert!(run_args(&["--config", "vm.json"]).is_ok());
        for extra in [
            &["--kernel", "k"][..],
            &["--memory", "1G"],
            &["--disk", "path=d"],
            &["--boot-timer"],
            &["--rng"],
            &["--fs", "tag=t,socket=/s"],
            &["--cpu-profile", "host"],
        ] {
            let argv: Vec<&str> = ["--config", "vm.json"]
                .iter()
                .chain(extra)
                .copied()
                .collect();
            let err = run_args(&argv).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{extra:?}"
            );
        }
        let cli =
            Cli::try_parse_from(["hearth", "run", "--config", "f", "--log-level", "info"]).unwrap();
        assert_eq!(cli.log_level, LogLevel::Info);
    }

    #[test]
    fn container_run_takes_the_command_verbatim() {
        let cli = Cli::try_parse_from([
            "hearth",
            "container",
            "run",
            "-i",
            "-e",
            "A=1",
            "-w",
            "/tmp",
            "img",
            "sh",
            "-c",
            "exit 7",
            "-e",
        ])
        .unwrap();
        let Some(Command::Container(ContainerCommand::Run(args))) = cli.command else {
            panic!("expected container run");
        };
        assert!(args.process.interactive);
        assert_eq!(args.process.env, ["A=1"]);
        assert_eq!(args.process.workdir.as_deref(), Some("/tmp"));
        assert_eq!(args.image, PathBuf::from("img"));
        assert_eq!(args.command, ["sh", "-c", "exit 7", "-e"]);
        assert_eq!(args.network, None);
        assert!(args.publish.is_empty());
        let cli = Cli::try_parse_from([
            "hearth",
            "container",
            "run",
            "-p",
            "8080:80",
            "--publish",
            "127.0.0.1:53:53/udp",
            "img",
        ])
        .unwrap();
        let Some(Command::Container(ContainerCommand::Run(args))) = cli.command else {
            panic!("expected container run");
        };
        assert_eq!(args.publish, ["8080:80", "127.0.0.1:53:53/udp"]);
    }

    #[test]
    fn machine_run_needs_a_command() {
        assert!(Cli::try_parse_from(["hearth", "machine", "run", "dev"]).is_err());
        let cli =
            Cli::try_parse_from(["hearth", "machine", "run", "dev", "--", "uname", "-s"]).unwrap();
        let Some(Command::Machine(MachineCommand::Run { name, command, .. })) = cli.command else {
            panic!("expected machine run");
        };
        assert_eq!(name, "dev");
        assert_eq!(command, ["uname", "-s"]);
    }

    #[test]
    fn kernel_is_required() {
        let err = Cli::try_parse_from(["hearth", "run"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let args = RunArgs {
            kernel: None,
            ..run_args(&["--kernel", "k"]).unwrap()
        };
        assert!(matches!(args.vm_config(), Err(CliError::NoKernel)));
    }

    #[test]
    fn firecracker_shape_flags() {
        let cli = Cli::try_parse_from([
            "hearth",
            "--api-sock",
            "/tmp/a.sock",
            "--id",
            "vm-1",
            "--level",
            "Debug",
            "--no-seccomp",
            "--boot-timer",
            "--start-time-us",
            "5",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        cli.check().unwrap();
        assert_eq!(cli.firecracker.id.as_deref(), Some("vm-1"));
        assert!(cli.firecracker.boot_timer && cli.firecracker.no_seccomp);

        // --no-api needs a configuration file; a bare `hearth` needs something to do.
        assert!(Cli::try_parse_from(["hearth", "--no-api"]).is_err());
        let bare = Cli::try_parse_from(["hearth"]).unwrap();
        assert!(bare.check().is_err());
        let mixed = Cli::try_parse_from(["hearth", "--id", "x", "run", "--kernel", "k"]).unwrap();
        assert!(mixed.check().is_err());
        let run = Cli::try_parse_from([
            "hearth",
            "run",
            "--kernel",
            "k",
            "--api-sock",
            "/s",
            "--metrics-path",
            "/m",
        ])
        .unwrap();
        run.check().unwrap();
        let Some(Command::Run(args)) = run.command else {
            panic!("expected run");
        };
        assert_eq!(args.api_sock, Some(PathBuf::from("/s")));
        assert_eq!(args.process.metrics_path, Some(PathBuf::from("/m")));
    }

    #[test]
    fn log_level_is_global() {
        let cli = Cli::try_parse_from(["hearth", "run", "--kernel", "k", "--log-level", "debug"])
            .unwrap();
        assert_eq!(cli.log_level, LogLevel::Debug);
    }
}
