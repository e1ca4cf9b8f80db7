//! The `--config` TOML file: its `[proxy]` table supplies defaults for the proxy's options;
//! each `[[sync]]` table describes one sync destination run beside the proxy.

use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, FromArgMatches};

use super::{Cli, SyncArgs};
use crate::sync::spec::{check_unique, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    // Keys are shown escaped: a quoted TOML key may hold a line break, and the message is one
    // log line.
    #[error("config file {}: unknown table [{}] (known: [proxy], [[sync]])", path.display(), table.escape_debug())]
    UnknownTable { path: PathBuf, table: String },
    #[error("config file {}: [proxy] has no option `{}` (see `sidecar proxy --help`)", path.display(), key.escape_debug())]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {}: `{}` must be a string, number or boolean", path.display(), key.escape_debug())]
    BadValue { path: PathBuf, key: String },
    #[error("config file {}: `sync` must be an array of tables, written [[sync]]", path.display())]
    SyncNotArray { path: PathBuf },
    #[error("config file {}: [[sync]] number {index}: {message}", path.display())]
    Sync { path: PathBuf, index: usize, message: String },
    #[error("config file {}: {source}", path.display())]
    SyncTables { path: PathBuf, source: SpecError },
}

/// A value from the file for one option.
#[derive(Debug)]
pub(crate) struct FileDefault {
    pub(crate) id: String,
    pub(crate) values: Vec<String>,
    /// A top-level option (such as `--log-level`) rather than one of `proxy`'s own.
    pub(crate) global: bool,
}

/// The `[proxy]` defaults of a file together with every problem found in it.
#[derive(Debug)]
pub(crate) struct ProxyDefaults {
    pub(crate) defaults: Vec<FileDefault>,
    /// In the order the proxy meets them; the proxy stops at the first.
    pub(crate) problems: Vec<FileError>,
    /// How many `[[sync]]` tables the file has (0 when they are unusable: that is a problem).
    pub(crate) sync_tables: usize,
}

/// Reads the file and returns a default for each key of `[proxy]`.
/// Keys are long option names; `snake_case` is accepted as well as `kebab-case`.
pub(crate) fn load_proxy_defaults(path: &Path) -> Result<Vec<FileDefault>, FileError> {
    let found = read_proxy_defaults(path)?;
    match found.problems.into_iter().next() {
        Some(first) => Err(first),
        None => Ok(found.defaults),
    }
}

/// Like [`load_proxy_defaults`], but goes on after a bad table or key and collects every
/// problem, for `sidecar check`. Only an unreadable file or broken TOML stops it, since then
/// there is nothing more to look at.
pub(crate) fn read_proxy_defaults(path: &Path) -> Result<ProxyDefaults, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.to_owned(), source })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| FileError::Parse { path: path.to_owned(), message: one_line(&text, &e) })?;

    let command = Cli::command();
    let proxy = command.find_subcommand("proxy").expect("the proxy subcommand is defined in cli.rs");
    let mut defaults = Vec::new();
    let mut problems = Vec::new();
    // Checked here too, so that a bad [[sync]] table stops the start with exit code 2.
    let sync_tables = match load_sync_sections_from(path, &table) {
        Ok(sections) => sections.len(),
        Err(e) => {
            problems.push(e);
            0
        }
    };
    for (name, value) in table {
        if name == "sync" {
            continue;
        }
        if name != "proxy" {
            problems.push(FileError::UnknownTable { path: path.to_owned(), table: name });
            continue;
        }
        let toml::Value::Table(options) = value else {
            problems.push(FileError::UnknownTable { path: path.to_owned(), table: name });
            continue;
        };
        for (key, value) in options {
            let long = key.replace('_', "-");
            let named = |a: &&clap::Arg| a.get_long() == Some(long.as_str()) && long != "config";
            let found = match proxy.get_arguments().find(named) {
                Some(arg) => Some((arg, false)),
                None => command.get_arguments().find(|a| a.is_global_set() && named(a)).map(|arg| (arg, true)),
            };
            let Some((arg, global)) = found else {
                problems.push(FileError::UnknownKey { path: path.to_owned(), key });
                continue;
            };
            let Some(values) = scalar_strings(&value) else {
                problems.push(FileError::BadValue { path: path.to_owned(), key });
                continue;
            };
            defaults.push(FileDefault { id: arg.get_id().to_string(), values, global });
        }
    }
    Ok(ProxyDefaults { defaults, problems, sync_tables })
}

/// Reads the file and returns the options of each `[[sync]]` table, in file order.
pub fn load_sync_sections(path: &Path) -> Result<Vec<SyncArgs>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.to_owned(), source })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| FileError::Parse { path: path.to_owned(), message: one_line(&text, &e) })?;
    load_sync_sections_from(path, &table)
}

/// Options that belong to the process, not to one destination: refused in a [[sync]] table.
const PROCESS_ONLY: [&str; 4] = ["admin", "admin-token-file", "once", "dry-run"];

fn load_sync_sections_from(path: &Path, table: &toml::Table) -> Result<Vec<SyncArgs>, FileError> {
    let Some(value) = table.get("sync") else { return Ok(Vec::new()) };
    let toml::Value::Array(items) = value else { return Err(FileError::SyncNotArray { path: path.to_owned() }) };
    // The same option definitions as `sidecar sync`, without environment variables: one
    // SIDECAR_SYNC_SOURCE cannot mean the same thing for every table.
    let mut command = SyncArgs::augment_args(clap::Command::new("sync").no_binary_name(true).disable_help_flag(true));
    let ids: Vec<clap::Id> = command.get_arguments().map(|a| a.get_id().clone()).collect();
    for id in ids {
        command = command.mut_arg(id, |a| a.env(None));
    }
    let mut sections = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let index = i + 1;
        let fail = |message: String| FileError::Sync { path: path.to_owned(), index, message };
        let toml::Value::Table(options) = item else { return Err(fail("not a table".into())) };
        let mut argv: Vec<String> = Vec::new();
        for (key, value) in options {
            let long = key.replace('_', "-");
            let key = key.escape_debug();
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()) && !PROCESS_ONLY.contains(&long.as_str()))
                .ok_or_else(|| fail(format!("no option `{key}` (see `sidecar sync --help`; admin, once and dry-run are not per destination)")))?;
            if arg.get_action().takes_values() {
                let values = scalar_strings(value)
                    .ok_or_else(|| fail(format!("`{key}` must be a string, number or boolean")))?;
                argv.extend(values.into_iter().map(|v| format!("--{long}={v}")));
            } else {
                match value {
                    toml::Value::Boolean(true) => argv.push(format!("--{long}")),
                    toml::Value::Boolean(false) => {}
                    _ => return Err(fail(format!("`{key}` must be true or false"))),
                }
            }
        }
        let matches =
            command.clone().try_get_matches_from(&argv).map_err(|e| fail(first_error_line(&e.to_string())))?;
        sections.push(SyncArgs::from_arg_matches(&matches).map_err(|e| fail(first_error_line(&e.to_string())))?);
    }
    // Two tables on one file are refused here, so that `check` says what the start would.
    let mut specs = Vec::new();
    for (i, section) in sections.iter().enumerate() {
        let fail = |message: String| FileError::Sync { path: path.to_owned(), index: i + 1, message };
        specs.push(section.to_spec().map_err(|e| fail(e.to_string()))?);
    }
    check_unique(&specs).map_err(|source| FileError::SyncTables { path: path.to_owned(), source })?;
    Ok(sections)
}

/// clap's message on one line, without its usage hints (which speak of a command line).
fn first_error_line(rendered: &str) -> String {
    let line = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    // clap quotes a value as given: a CR in it, which `lines` does not split at, is escaped.
    let line = line.trim_start_matches("error: ");
    line.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_with_a_line_break_is_reported_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[\"a\\nb\"]\n[proxy]\n\"x\\ny\" = 1\nlisten = {}\n[[sync]]\n\"p\\rq\" = 1\n").unwrap();
        let found = read_proxy_defaults(&path).unwrap();
        let problems: Vec<String> = found.problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().all(|p| !p.contains(['\n', '\r'])), "{problems:?}");
        assert!(problems[0].contains("no option `p\\rq`"), "{problems:?}");
        assert!(problems[1].contains("unknown table [a\\nb]"), "{problems:?}");
    }

    #[test]
    fn a_value_with_a_line_break_is_reported_on_one_line() {
        // Found by fuzz/config_toml: clap's message quotes the value, CR included.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[[sync]]\nsource = \"dtec://h/a\\rb\"\ndest = \"/tmp/x\"\n").unwrap();
        let message = load_sync_sections(&path).unwrap_err().to_string();
        assert!(!message.contains(['\r', '\n']) && message.contains("dtec://h/a\\rb"), "{message:?}");
    }

    #[test]
    fn sync_tables_take_templates_and_directories_and_a_broken_template_names_its_line() {
        use crate::sync::spec::Output;
        let dir = tempfile::tempdir().unwrap();
        let (path, template) = (dir.path().join("c.toml"), dir.path().join("app.j2"));
        std::fs::write(&template, "host={{ keys[\"db/host\"] }}\n").unwrap();
        let tables = format!(
            "[[sync]]\nsource = \"etcd://127.0.0.1:2379/apps/x/\"\ndest = \"/tmp/app.conf\"\ntemplate = \"{}\"\n\
             [[sync]]\nsource = \"consul://127.0.0.1:8500/apps/x/\"\ndest = \"/tmp/conf.d/\"\n",
            template.display()
        );
        std::fs::write(&path, &tables).unwrap();
        let sections = load_sync_sections(&path).unwrap();
        let specs: Vec<_> = sections.iter().map(|s| s.to_spec().unwrap()).collect();
        assert_eq!(specs[0].output, Output::Template(template.clone()));
        assert_eq!((specs[1].output.clone(), specs[1].name.as_str()), (Output::Directory, "conf.d"));

        std::fs::write(&template, "a\n{% for %}\n").unwrap();
        let message = load_sync_sections(&path).unwrap_err().to_string();
        assert!(message.contains("[[sync]] number 1") && message.contains("line 2"), "{message}");
        std::fs::write(&template, "ok").unwrap();
        for (table, word) in [
            ("source = \"etcd://h:1/apps/x/\"\ndest = \"/tmp/app.conf\"", "--template FILE"),
            ("source = \"etcd://h:1/apps/x\"\ndest = \"/tmp/conf.d/\"", "needs a key prefix"),
            ("source = \"/srv/keys/\"\ndest = \"/tmp/conf.d/\"\ntemplate = \"/nonexistent/t\"", "must not end in /"),
            (
                "source = \"/srv/keys/\"\ndest = \"/tmp/app.conf\"\ntemplate = \"/nonexistent/t\"",
                "cannot read --template",
            ),
            ("source = \"/srv/keys/\"\ndest = \"/tmp/app.conf\"\ntemplate = \"/dev/zero\"", "not a regular file"),
        ] {
            std::fs::write(&path, format!("[[sync]]\n{table}\n")).unwrap();
            let message = load_sync_sections(&path).unwrap_err().to_string();
            assert!(message.contains(word), "{table}: {message}");
        }
    }

    #[test]
    fn every_problem_is_collected_and_the_proxy_still_gets_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[proxy]\nbogus = 1\nlisten = \"127.0.0.1:1\"\nupstream-timeout = { s = 1 }\n[extra]\nx = 1\n",
        )
        .unwrap();
        let found = read_proxy_defaults(&path).unwrap();
        let problems: Vec<String> = found.problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[1].contains("no option `bogus`") && problems[2].contains("`upstream-timeout` must be"),
            "{problems:?}"
        );
        assert!(problems[0].contains("unknown table [extra]"), "{problems:?}");
        assert_eq!(found.defaults.len(), 1, "the good key is still read");
        assert_eq!(found.defaults[0].id, "listen");
        let first = load_proxy_defaults(&path).unwrap_err().to_string();
        assert_eq!(first, problems[0], "the proxy stops at the first problem, as before");
    }
}
