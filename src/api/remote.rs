//! `hearth remote --api-sock PATH <command>`: drives a running VMM through its API
//! socket, as Cloud Hypervisor's `ch-remote` does, with the [`ApiClient`]. Works against
//! hearth in either shape, and (except `shutdown`, hearth's extension) against
//! Firecracker. A refusal is one line with the server's `fault_message`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde::Serialize;

use super::client::{ApiClient, ClientError};
use super::models::{
    ActionType, Balloon, BalloonStatistics, BalloonUpdate, FullVmConfig, InstanceInfo,
    SnapshotCreateParams, SnapshotType, VmState,
};

/// How often `shutdown` looks whether the VMM has removed its socket.
const SOCKET_POLL: Duration = Duration::from_millis(10);

/// `hearth remote` options.
#[derive(Debug, clap::Args)]
pub struct RemoteArgs {
    /// The API socket of the VMM (`hearth run --api-sock`, `hearth --api-sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,

    /// Give up when an answer takes longer than this many seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = super::client::DEFAULT_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: RemoteCommand,
}

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum RemoteCommand {
    /// Print the instance (GET /) and its configuration (GET /vm/config) as JSON.
    Info,
    /// Pause the microVM (PATCH /vm).
    Pause,
    /// Resume a paused microVM (PATCH /vm).
    Resume,
    /// Write a full snapshot of the paused microVM (PUT /snapshot/create).
    Snapshot {
        /// Where the VM state goes.
        #[arg(long, value_name = "PATH")]
        state: PathBuf,
        /// Where the guest memory goes.
        #[arg(long, value_name = "PATH")]
        mem: PathBuf,
    },
    /// The balloon: print its configuration (GET /balloon), or with --stats the guest's
    /// memory statistics (GET /balloon/statistics), or set a new target (PATCH /balloon).
    Balloon {
        /// Inflate or deflate the balloon to this many MiB.
        #[arg(long, value_name = "MIB", conflicts_with = "stats")]
        amount_mib: Option<u32>,
        /// Print the statistics instead of the configuration.
        #[arg(long)]
        stats: bool,
    },
    /// Press Ctrl+Alt+Del on the guest's keyboard (PUT /actions SendCtrlAltDel).
    CtrlAltDel,
    /// Stop the VMM (PUT /api/v1/vmm.shutdown, hearth's extension) and wait until its
    /// socket is gone.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("invalid {flag} \"{path}\"")]
    Path {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot print the answer")]
    Output(#[source] std::io::Error),
    #[error("the VMM accepted the shutdown, but its socket \"{0}\" is still there after {1} s")]
    StillThere(PathBuf, u64),
}

/// What `info` prints.
#[derive(Debug, Serialize)]
pub struct RemoteInfo {
    pub instance: InstanceInfo,
    pub vm_config: FullVmConfig,
}

/// Runs one command; what it prints goes to `out`.
pub fn run(args: &RemoteArgs, out: &mut dyn Write) -> Result<(), RemoteError> {
    let timeout = Duration::from_secs(args.timeout);
    let client = ApiClient::new(&args.api_sock, timeout);
    match &args.command {
        RemoteCommand::Info => {
            let info = RemoteInfo {
                instance: client.instance_info()?,
                vm_config: client.vm_config()?,
            };
            let text =
                serde_json::to_string_pretty(&info).map_err(|e| RemoteError::Output(e.into()))?;
            writeln!(out, "{text}").map_err(RemoteError::Output)?;
        }
        RemoteCommand::Pause => client.set_vm_state(VmState::Paused)?,
        RemoteCommand::Resume => client.set_vm_state(VmState::Resumed)?,
        RemoteCommand::Snapshot { state, mem } => {
            client.create_snapshot(&SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                // The VMM resolves relative paths against its own working directory.
                snapshot_path: absolute("--state", state)?,
                mem_file_path: absolute("--mem", mem)?,
            })?;
        }
        RemoteCommand::Balloon {
            amount_mib: Some(amount_mib),
            ..
        } => client.patch(
            "/balloon",
            &BalloonUpdate {
                amount_mib: *amount_mib,
            },
        )?,
        RemoteCommand::Balloon { stats, .. } => {
            let text = if *stats {
                pretty(&client.get::<BalloonStatistics>("/balloon/statistics")?)
            } else {
                pretty(&client.get::<Balloon>("/balloon")?)
            }
            .map_err(|e| RemoteError::Output(e.into()))?;
            writeln!(out, "{text}").map_err(RemoteError::Output)?;
        }
        RemoteCommand::CtrlAltDel => client.action(ActionType::SendCtrlAltDel)?,
        RemoteCommand::Shutdown => {
            client.shutdown()?;
            // So that a script can start the next VMM on the same path at once: the
            // old one removes its socket file on its way out.
            wait_until_gone(&args.api_sock, timeout)?;
        }
    }
    Ok(())
}

fn pretty<T: Serialize>(value: &T) -> serde_json::Result<String> {
    serde_json::to_string_pretty(value)
}

fn absolute(flag: &'static str, path: &Path) -> Result<PathBuf, RemoteError> {
    std::path::absolute(path).map_err(|source| RemoteError::Path {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn wait_until_gone(socket: &Path, timeout: Duration) -> Result<(), RemoteError> {
    let deadline = Instant::now() + timeout;
    while std::fs::symlink_metadata(socket).is_ok() {
        if Instant::now() >= deadline {
            return Err(RemoteError::StillThere(
                socket.to_path_buf(),
                timeout.as_secs(),
            ));
        }
        std::thread::sleep(SOCKET_POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(argv: &[&str]) -> Result<RemoteArgs, clap::Error> {
        let cli = Cli::try_parse_from(["hearth", "remote"].iter().chain(argv))?;
        cli.check()?;
        let Some(Command::Remote(args)) = cli.command else {
            panic!("expected remote");
        };
        Ok(args)
    }

    #[test]
    fn commands_parse() {
        let args = parse(&["--api-sock", "/run/a.sock", "info"]).unwrap();
        assert_eq!(args.api_sock, PathBuf::from("/run/a.sock"));
        assert_eq!(args.command, RemoteCommand::Info);
        assert_eq!(args.timeout, 60);
        for (word, command) in [
            ("pause", RemoteCommand::Pause),
            ("resume", RemoteCommand::Resume),
            ("ctrl-alt-del", RemoteCommand::CtrlAltDel),
            ("shutdown", RemoteCommand::Shutdown),
            (
                "balloon",
                RemoteCommand::Balloon {
                    amount_mib: None,
                    stats: false,
                },
            ),
        ] {
            assert_eq!(parse(&["--api-sock", "s", word]).unwrap().command, command);
        }
        let args = parse(&[
            "--api-sock",
            "s",
            "--timeout",
            "5",
            "snapshot",
            "--state",
            "vm.state",
            "--mem",
            "vm.mem",
        ])
        .unwrap();
        assert_eq!(args.timeout, 5);
        let balloon = |argv: &[&str]| {
            let mut full = vec!["--api-sock", "s", "balloon"];
            full.extend(argv);
            parse(&full).map(|a| a.command)
        };
        assert_eq!(
            balloon(&["--amount-mib", "64"]).unwrap(),
            RemoteCommand::Balloon {
                amount_mib: Some(64),
                stats: false
            }
        );
        assert!(matches!(
            balloon(&["--stats"]).unwrap(),
            RemoteCommand::Balloon { stats: true, .. }
        ));
        assert!(balloon(&["--stats", "--amount-mib", "1"]).is_err());
        assert!(balloon(&["--amount-mib", "-1"]).is_err());
        assert_eq!(
            args.command,
            RemoteCommand::Snapshot {
                state: "vm.state".into(),
                mem: "vm.mem".into()
            }
        );
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        use clap::error::ErrorKind;
        for (argv, kind) in [
            (&["info"][..], ErrorKind::MissingRequiredArgument),
            (&["--api-sock", "s"], ErrorKind::MissingSubcommand),
            (&["--api-sock", "s", "reboot"], ErrorKind::InvalidSubcommand),
            (
                &["--api-sock", "s", "snapshot", "--state", "x"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["--api-sock", "s", "--timeout", "0", "info"],
                ErrorKind::ValueValidation,
            ),
        ] {
            let err = parse(argv).unwrap_err();
            assert_eq!(err.kind(), kind, "{argv:?}: {err}");
        }
        // Firecracker's --api-sock before the subcommand is not the remote's.
        let cli = Cli::try_parse_from([
            "hearth",
            "--api-sock",
            "s",
            "remote",
            "--api-sock",
            "s",
            "info",
        ])
        .unwrap();
        assert!(cli.check().is_err());
    }

    #[test]
    fn snapshot_paths_are_made_absolute_for_the_vmm() {
        let path = absolute("--state", Path::new("vm.state")).unwrap();
        assert!(path.is_absolute() && path.ends_with("vm.state"));
        let err = absolute("--mem", Path::new("")).unwrap_err();
        assert_eq!(err.to_string(), "invalid --mem \"\"");
    }

    #[test]
    fn shutdown_waits_for_the_socket_to_go() {
        let path = std::env::temp_dir().join(format!("hearth-remote-gone-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let err = wait_until_gone(&path, Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("still there"), "{err}");
        let remover = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                std::fs::remove_file(path).unwrap();
            })
        };
        wait_until_gone(&path, Duration::from_secs(10)).unwrap();
        remover.join().unwrap();
    }
}
