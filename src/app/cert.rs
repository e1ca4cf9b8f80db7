//! `sidecar cert`: the development CA and a certificate it signs, with instructions on stdout.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use super::output::{complain, say};
use crate::cli::CertArgs;
use crate::devca::{ensure_ca_and_issue, existing_ca, instructions, trust_nickname};
use crate::devcert::default_state_dir;
use crate::sys::trust_store::{change, Action, Outcome};

pub(super) fn run(args: &CertArgs) -> ExitCode {
    let dir = args.dir.clone().unwrap_or_else(default_state_dir);
    // Absolute, so that the commands printed work from any directory.
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    if args.uninstall {
        return match existing_ca(&dir) {
            Ok((ca_pem, info)) => {
                say(format_args!("Taking the development CA {} out of trust stores:", ca_pem.display()));
                report(&change(Action::Uninstall, &ca_pem, &trust_nickname(&info), &home, &args.trust_stores))
            }
            Err(e) => {
                complain(format_args!("sidecar: error: {e}"));
                ExitCode::from(2)
            }
        };
    }
    match ensure_ca_and_issue(&dir, &args.names) {
        Ok((ca, leaf)) => {
            // A closed stdout (`sidecar cert | head -1`) is no reason to fail: the files are written.
            let _ = std::io::stdout().lock().write_all(instructions(&ca, &leaf).as_bytes());
            if !args.install {
                return ExitCode::SUCCESS;
            }
            say(format_args!("\nInstalling the development CA {} into trust stores:", ca.cert_path.display()));
            report(&change(Action::Install, &ca.cert_path, &trust_nickname(&ca.info), &home, &args.trust_stores))
        }
        Err(e) => {
            complain(format_args!("sidecar: error: {e}"));
            ExitCode::from(2)
        }
    }
}

/// One line per store; exit 0 when every store was changed (or had nothing to change), 1 when
/// some could not be, 2 when none could.
fn report(outcomes: &[Outcome]) -> ExitCode {
    for outcome in outcomes {
        match &outcome.result {
            Ok(done) => say(format_args!("  {done}: {}", outcome.store)),
            Err(e) => complain(format_args!("warning: not changed: {}: {e}", outcome.store)),
        }
    }
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    match failed {
        0 => ExitCode::SUCCESS,
        n if n < outcomes.len() => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}
