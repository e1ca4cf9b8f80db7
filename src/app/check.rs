//! `sidecar check`: prints what `cli::check` found.

use std::ffi::OsString;
use std::process::ExitCode;

use super::output::{complain, say};
use crate::cli::check;

/// Runs the check and prints it: the summary on stdout, warnings and problems on stderr.
pub(super) fn run(argv: &[OsString]) -> ExitCode {
    let report = match check::run(argv) {
        Ok(report) => report,
        // A malformed command line (unknown flag, missing value): clap's usual usage error.
        Err(e) => e.exit(),
    };
    for warning in &report.warnings {
        complain(format_args!("warning: {warning}"));
    }
    if report.problems.is_empty() {
        say("OK: `sidecar proxy` would start with this configuration (nothing was started)");
        for line in &report.summary {
            say(format_args!("  {line}"));
        }
        return ExitCode::SUCCESS;
    }
    for problem in &report.problems {
        complain(format_args!("error: {problem}"));
    }
    let n = report.problems.len();
    let plural = if n == 1 { "" } else { "s" };
    complain(format_args!("sidecar check: {n} problem{plural} found; `sidecar proxy` would not start"));
    ExitCode::from(2)
}
