//! Checks a candidate before it is written: empty content, `--validate FORMAT`, and
//! `--check-cmd` (run against the candidate file itself).

use std::path::Path;
use std::time::Duration;

use super::shell::{self, ShellFailure};
use super::spec::ValidateFormat;
use crate::sys::human_duration;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ValidateError {
    #[error("the source gave an empty value")]
    Empty,
    #[error("not valid {format}: {message}")]
    Format { format: &'static str, message: String },
    #[error("check command `{cmd}` failed ({status}): {output}")]
    CheckFailed { cmd: String, status: String, output: String },
    #[error("check command `{cmd}` could not run: {source}")]
    CheckSpawn { cmd: String, source: std::io::Error },
    #[error("check command `{cmd}` did not finish within {}", human_duration(*timeout))]
    CheckTimeout { cmd: String, timeout: Duration },
}

/// How long a check command may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn check_content(content: &[u8], format: Option<ValidateFormat>) -> Result<(), ValidateError> {
    if content.iter().all(u8::is_ascii_whitespace) {
        return Err(ValidateError::Empty);
    }
    let Some(format) = format else { return Ok(()) };
    let text = |name: &'static str| {
        std::str::from_utf8(content)
            .map_err(|e| ValidateError::Format { format: name, message: format!("not UTF-8: {e}") })
    };
    match format {
        ValidateFormat::Json => serde_json::from_slice::<serde::de::IgnoredAny>(content)
            .map(|_| ())
            .map_err(|e| ValidateError::Format { format: "JSON", message: e.to_string() }),
        ValidateFormat::Toml => text("TOML")?
            .parse::<toml::Table>()
            .map(|_| ())
            .map_err(|e| ValidateError::Format { format: "TOML", message: e.message().trim().replace('\n', "; ") }),
        ValidateFormat::Yaml => yaml_rust2::YamlLoader::load_from_str(text("YAML")?)
            .map(|_| ())
            .map_err(|e| ValidateError::Format { format: "YAML", message: e.to_string() }),
    }
}

/// Runs `sh -c CMD` with `{}` replaced by the (quoted) candidate path.
pub(crate) async fn run_check(cmd: &str, candidate: &Path) -> Result<(), ValidateError> {
    let quoted = shell_quote(&candidate.to_string_lossy());
    let script = if cmd.contains("{}") { cmd.replace("{}", &quoted) } else { format!("{cmd} {quoted}") };
    shell::run(&script, &[], CHECK_TIMEOUT).await.map_err(|failure| match failure {
        ShellFailure::Timeout => ValidateError::CheckTimeout { cmd: cmd.to_owned(), timeout: CHECK_TIMEOUT },
        ShellFailure::Spawn(source) => ValidateError::CheckSpawn { cmd: cmd.to_owned(), source },
        ShellFailure::Failed { status, output } => ValidateError::CheckFailed { cmd: cmd.to_owned(), status, output },
    })
}

/// Single-quotes for sh.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_checked() {
        assert!(check_content(b"{\"a\": 1}", Some(ValidateFormat::Json)).is_ok());
        assert!(check_content(b"{\"a\": ", Some(ValidateFormat::Json)).is_err());
        assert!(check_content(b"a: [1, 2]\n", Some(ValidateFormat::Yaml)).is_ok());
        assert!(check_content(b"a: [1, 2\n", Some(ValidateFormat::Yaml)).is_err());
        assert!(check_content(b"a = 1\n", Some(ValidateFormat::Toml)).is_ok());
        assert!(check_content(b"a = \n", Some(ValidateFormat::Toml)).is_err());
        assert!(matches!(check_content(b" \n", None), Err(ValidateError::Empty)));
        assert!(check_content(b"anything", None).is_ok());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}
