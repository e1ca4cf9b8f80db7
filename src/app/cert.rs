//! `sidecar cert`: the development CA and a certificate it signs, with instructions on stdout.

use std::io::Write as _;
use std::process::ExitCode;

use super::output::complain;
use crate::cli::CertArgs;
use crate::devca::{ensure_ca_and_issue, instructions};
use crate::devcert::default_state_dir;

pub(super) fn run(args: &CertArgs) -> ExitCode {
    let dir = args.dir.clone().unwrap_or_else(default_state_dir);
    // Absolute, so that the commands printed work from any directory.
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    match ensure_ca_and_issue(&dir, &args.names) {
        Ok((ca, leaf)) => {
            // A closed stdout (`sidecar cert | head -1`) is no reason to fail: the files are written.
            let _ = std::io::stdout().lock().write_all(instructions(&ca, &leaf).as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            complain(format_args!("sidecar: error: {e}"));
            ExitCode::from(2)
        }
    }
}
