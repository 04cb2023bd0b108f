//! The `hearth` command: parses the command line, hands it to the library and turns the
//! outcome into an exit status. No VM logic lives here.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    hearth::mark_process_start();
    // The OCI runtime has runc's command line, not clap's: `hearth oci ...`, or this
    // binary run as `hearth-oci` (a symlink engines are pointed at).
    let argv: Vec<String> = std::env::args().collect();
    if argv
        .first()
        .is_some_and(|a| hearth::oci::invoked_as_runtime(a))
    {
        return ExitCode::from(hearth::oci::main(&argv[1..]));
    }
    if argv.get(1).map(String::as_str) == Some("oci") {
        return ExitCode::from(hearth::oci::main(&argv[2..]));
    }
    let cli = hearth::cli::Cli::parse();
    if let Err(err) = cli.check() {
        err.exit();
    }
    match hearth::run_cli(cli) {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            eprintln!("hearth: {}", hearth::error_chain(&err));
            ExitCode::from(1)
        }
    }
}
