//! The `--config` TOML file: its `[proxy]` table supplies defaults for the proxy's options.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("config file {}: unknown table [{table}] (known: [proxy])", path.display())]
    UnknownTable { path: PathBuf, table: String },
    #[error("config file {}: [proxy] has no option `{key}` (see `sidecar proxy --help`)", path.display())]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {}: `{key}` must be a string, number or boolean", path.display())]
    BadValue { path: PathBuf, key: String },
}

/// A value from the file for one option.
#[derive(Debug)]
pub struct FileDefault {
    pub id: String,
    pub values: Vec<String>,
    /// A top-level option (such as `--log-level`) rather than one of `proxy`'s own.
    pub global: bool,
}

/// Reads the file and returns a default for each key of `[proxy]`.
/// Keys are long option names; `snake_case` is accepted as well as `kebab-case`.
pub fn load_proxy_defaults(path: &Path) -> Result<Vec<FileDefault>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.to_owned(), source })?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| FileError::Parse { path: path.to_owned(), message: one_line(&text, &e) })?;

    let command = crate::cli::Cli::command();
    let proxy = command.find_subcommand("proxy").expect("the proxy subcommand is defined in cli.rs");
    let mut defaults = Vec::new();
    for (name, value) in table {
        if name != "proxy" {
            return Err(FileError::UnknownTable { path: path.to_owned(), table: name });
        }
        let toml::Value::Table(options) = value else {
            return Err(FileError::UnknownTable { path: path.to_owned(), table: name });
        };
        for (key, value) in options {
            let long = key.replace('_', "-");
            let named = |a: &&clap::Arg| a.get_long() == Some(long.as_str()) && long != "config";
            let (arg, global) = match proxy.get_arguments().find(named) {
                Some(arg) => (arg, false),
                None => command
                    .get_arguments()
                    .find(|a| a.is_global_set() && named(a))
                    .map(|arg| (arg, true))
                    .ok_or_else(|| FileError::UnknownKey { path: path.to_owned(), key: key.clone() })?,
            };
            let values = scalar_strings(&value).ok_or_else(|| FileError::BadValue { path: path.to_owned(), key: key.clone() })?;
            defaults.push(FileDefault { id: arg.get_id().to_string(), values, global });
        }
    }
    Ok(defaults)
}

/// `line L, column C: message`: toml's own rendering spans several lines, a log line must not.
fn one_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', "; ");
    let Some(span) = error.span() else { return message };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}: {message}")
}

fn scalar_strings(value: &toml::Value) -> Option<Vec<String>> {
    match value {
        toml::Value::String(s) => Some(vec![s.clone()]),
        toml::Value::Integer(i) => Some(vec![i.to_string()]),
        toml::Value::Float(f) => Some(vec![f.to_string()]),
        toml::Value::Boolean(b) => Some(vec![b.to_string()]),
        toml::Value::Array(items) => items.iter().map(|v| scalar_strings(v)?.into_iter().next()).collect(),
        _ => None,
    }
}
