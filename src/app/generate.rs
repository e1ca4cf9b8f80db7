//! `sidecar generate`: shell completions and man pages. Everything comes from `Cli::command()`,
//! so they always match the binary that made them.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;

use super::output::complain;
use crate::cli::{Cli, GenerateCommand};

#[derive(Debug, thiserror::Error)]
pub(crate) enum GenerateError {
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

/// Writes what `what` asks for on stdout (or into a directory, naming each file on stdout).
pub(super) fn run(what: GenerateCommand) -> ExitCode {
    match generate_to(what, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // Closed by the reader (`sidecar generate ... | head`): it had what it wanted.
        Err(GenerateError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            complain(format_args!("sidecar: error: {e}"));
            ExitCode::from(2)
        }
    }
}

/// A page titled in capitals, as man pages are (`.TH SIDECAR-PROXY 1`), every one naming the
/// release it documents (clap knows the version of the top-level command only).
fn man_page(command: clap::Command) -> clap_mangen::Man {
    let title = command.get_display_name().unwrap_or_else(|| command.get_name()).to_uppercase();
    clap_mangen::Man::new(command).title(title).source(format!("sidecar {}", env!("CARGO_PKG_VERSION")))
}

fn generate_to(what: GenerateCommand, out: &mut dyn std::io::Write) -> Result<(), GenerateError> {
    let mut command = Cli::command();
    let mut text = Vec::new();
    match what {
        GenerateCommand::Completions { shell } => clap_complete::generate(shell, &mut command, "sidecar", &mut text),
        // clap's implicit `help` subcommand would be listed as a page sidecar-help(1) that is
        // never written; `--help` is documented on every page anyway.
        GenerateCommand::Man { dir: None } => {
            man_page(command.disable_help_subcommand(true)).render(&mut text).map_err(GenerateError::Stdout)?
        }
        GenerateCommand::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).map_err(|source| GenerateError::CreateDir { path: dir.clone(), source })?;
            // Built first so that subcommands carry their full names (sidecar-proxy), as
            // clap_mangen::generate_to does; written here to name each file written.
            command = command.disable_help_subcommand(true);
            command.build();
            let pages =
                std::iter::once(command.clone()).chain(command.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
            for page in pages {
                let man = man_page(page);
                let path = dir.join(man.get_filename());
                let mut roff = Vec::new();
                man.render(&mut roff).map_err(|source| GenerateError::Write { path: path.clone(), source })?;
                std::fs::write(&path, roff).map_err(|source| GenerateError::Write { path: path.clone(), source })?;
                writeln!(text, "wrote {}", path.display()).map_err(GenerateError::Stdout)?;
            }
        }
    }
    out.write_all(&text).and_then(|()| out.flush()).map_err(GenerateError::Stdout)
}
