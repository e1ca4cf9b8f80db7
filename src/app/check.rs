//! `sidecar check`: prints what `cli::check` found.

use std::ffi::OsString;
use std::process::ExitCode;

use crate::cli::check;

/// Runs the check and prints it: the summary on stdout, warnings and problems on stderr.
pub(super) fn run(argv: &[OsString]) -> ExitCode {
    let report = match check::run(argv) {
        Ok(report) => report,
        // A malformed command line (unknown flag, missing value): clap's usual usage error.
        Err(e) => e.exit(),
    };
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    if report.problems.is_empty() {
        println!("OK: `sidecar proxy` would start with this configuration (nothing was started)");
        for line in &report.summary {
            println!("  {line}");
        }
        return ExitCode::SUCCESS;
    }
    for problem in &report.problems {
        eprintln!("error: {problem}");
    }
    let n = report.problems.len();
    eprintln!("sidecar check: {n} problem{} found; `sidecar proxy` would not start", if n == 1 { "" } else { "s" });
    ExitCode::from(2)
}
