//! The `hearth` command: parses the command line, hands it to the library and turns the
//! outcome into an exit status. No VM logic lives here.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    hearth::mark_process_start();
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
