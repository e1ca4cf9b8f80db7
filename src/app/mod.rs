//! The process: the subcommand named on the command line, its runtime, signals, logging, what
//! it prints and its exit code. One file per command; each assembles its role from the layers
//! below and is the only place that exits.

mod cert;
mod check;
mod fleet;
mod generate;
mod output;
mod proxy;
mod sync;

use std::ffi::OsString;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use output::complain;

use crate::cli::{invoked_subcommand, parse_from, CliError, Command};
use crate::sys::logging;
use crate::sys::shutdown::on_signals;

/// The process entry point: parse, set up logging, run the role, map failure to exit code 2.
pub fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // `check` parses the same options its own way, so that it can report every bad value
    // rather than stop at the first as `parse_from` does.
    if invoked_subcommand(&argv).as_deref() == Some("check") {
        return check::run(&argv);
    }
    let cli = match parse_from(argv.clone()) {
        Ok(cli) => cli,
        Err(CliError::Usage(e)) => e.exit(),
        Err(e) => {
            complain(format_args!("sidecar: error: {e}"));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Proxy(args) => {
            logging::init(&cli.log_level, cli.log_format);
            proxy::run(args, argv)
        }
        Command::Sync(args) => {
            logging::init(&cli.log_level, cli.log_format);
            sync::run(args)
        }
        // One-shot commands print their results; they have nothing to log.
        Command::Check(_) => check::run(&argv),
        Command::Cert(args) => cert::run(&args),
        Command::Fleet(command) => fleet::run(command),
        Command::Generate(what) => generate::run(what),
    }
}

/// The runtime a role's control thread runs on; failing to build one is a start-up error.
fn current_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        tracing::error!("cannot start the async runtime: {e}");
        ExitCode::from(2)
    })
}

/// The shutdown token, cancelled by SIGTERM or SIGINT; a second signal exits at once. Failing
/// to install the handlers is a start-up error.
fn shutdown_on_signals() -> Result<CancellationToken, ExitCode> {
    let exit_now = || {
        tracing::warn!("second signal received: exiting without waiting for the drain");
        std::process::exit(1);
    };
    on_signals(exit_now).map_err(|e| {
        tracing::error!("cannot install signal handlers: {e}");
        ExitCode::from(2)
    })
}
