//! The settings of one sync destination, validated: where the config comes from, where it goes,
//! how the app is told, and how the result is checked. `cli` builds it from `sidecar sync` flags
//! or from a `[[sync]]` table of the config file (same names, same parsers).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

use super::fleet::FleetSpec;
use super::template;
use crate::sys::atomic_file::file_identity;

// Names and paths are shown escaped: one with a line break must not split the message, which
// is a log line or a line of `sidecar check`.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("sync {}: --dest {} has no file name", name.escape_debug(), dest.display().to_string().escape_debug())]
    NoFileName { name: String, dest: PathBuf },
    #[error(
        "sync name `{}` may only hold letters, digits, `.`, `_` and `-` (it is used in admin URLs)",
        .0.escape_debug()
    )]
    BadName(String),
    #[error("two sync destinations are named `{0}`; give each a distinct --name")]
    DuplicateName(String),
    #[error(
        "two sync destinations write {}: {} and {}",
        file.display().to_string().escape_debug(),
        first.display().to_string().escape_debug(),
        second.display().to_string().escape_debug()
    )]
    DuplicateDest { file: PathBuf, first: PathBuf, second: PathBuf },
    #[error("sync {name}: --max-quiet ({max}) is shorter than --min-quiet ({min})")]
    QuietOrder { name: String, min: String, max: String },
    #[error("sync {name}: --history-keep must be at least 1")]
    HistoryKeep { name: String },
    #[error("sync {name}: {message}")]
    Auth { name: String, message: String },
    #[error(
        "sync {name}: the source {source_url} is a key prefix (it ends in /): give --template FILE to render its keys into --dest, or a --dest ending in / for one file per key"
    )]
    PrefixNeedsOutput { name: String, source_url: String },
    #[error("sync {name}: {what} needs a key prefix as the source (a URL or directory ending in /), not {source_url}")]
    NeedsPrefix { name: String, what: &'static str, source_url: String },
    #[error("sync {name}: --template renders one file: its --dest must not end in /")]
    TemplateIntoDirectory { name: String },
    #[error("sync {name}: cannot read --template {}: {source}", path.display())]
    TemplateUnreadable { name: String, path: PathBuf, source: std::io::Error },
    #[error("sync {name}: {error}")]
    Template { name: String, error: template::TemplateError },
}

/// Where a destination's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// etcd v3 through its HTTP/JSON gateway: one key, read then watched.
    Etcd { base: Uri, key: String },
    /// A URL polled with `If-None-Match`.
    Http { url: Uri },
    /// Consul KV blocking queries: `GET {base}/v1/kv/{key}?raw&index=N&wait=W`.
    Consul { base: Uri, key: String, wait: Duration, extra_query: String },
    /// A local file, e.g. a key of a mounted ConfigMap (`..data` symlink swap); a path ending
    /// in `/` is a directory, each visible file a key.
    File { path: PathBuf },
}

impl SourceSpec {
    /// Whether this names the keys under a prefix (ends in `/`) rather than one key.
    pub(crate) fn is_prefix(&self) -> bool {
        match self {
            SourceSpec::Etcd { key, .. } | SourceSpec::Consul { key, .. } => key.ends_with('/'),
            SourceSpec::File { path } => ends_with_slash(path),
            SourceSpec::Http { .. } => false,
        }
    }
}

/// `conf.d/`: a path written as a directory.
pub(crate) fn ends_with_slash(path: &Path) -> bool {
    path.as_os_str().as_encoded_bytes().ends_with(b"/")
}

/// What a destination is made of its source's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    /// The value, as it is, into the file.
    File,
    /// The keys under the prefix, rendered with this template into the file.
    Template(PathBuf),
    /// One file per key under the prefix, swapped in as one set.
    Directory,
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Etcd { base, key } => write!(f, "etcd {}{key}", authority_of(base)),
            SourceSpec::Http { url } => {
                write!(f, "{}://{}{}", url.scheme_str().unwrap_or("http"), authority_of(url), url.path())
            }
            SourceSpec::Consul { base, key, .. } => write!(f, "consul {}/{key}", authority_of(base)),
            SourceSpec::File { path } => write!(f, "file {}", path.display()),
        }
    }
}

/// host:port without any credentials, for logs and status.
fn authority_of(uri: &Uri) -> String {
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    authority.rsplit('@').next().unwrap_or(authority).to_owned()
}

/// `etcd://HOST:PORT/KEY`, `consul://HOST:PORT/KEY[?wait=5m]`, `http(s)://URL`,
/// `file:///PATH` or a plain path. `etcd+https://` and `consul+https://` speak TLS.
pub(crate) fn parse_source(s: &str) -> Result<SourceSpec, String> {
    let Some((scheme, rest)) = s.split_once("://") else {
        if s.is_empty() {
            return Err("empty source".into());
        }
        return Ok(SourceSpec::File { path: PathBuf::from(s) });
    };
    let gateway = |tls: bool| -> Result<(Uri, String, Option<String>), String> {
        let (authority, path_query) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("`{s}` has no HOST:PORT"));
        }
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (path_query, None),
        };
        if path.len() <= 1 {
            return Err(format!("`{s}` names no key (expected {scheme}://HOST:PORT/KEY)"));
        }
        let base: Uri = format!("{}://{authority}/", if tls { "https" } else { "http" })
            .parse()
            .map_err(|e| format!("`{s}`: {e}"))?;
        Ok((base, path.to_owned(), query))
    };
    match scheme {
        "etcd" | "etcd+http" | "etcd+https" => {
            let (base, key, query) = gateway(scheme.ends_with("https"))?;
            if query.is_some() {
                return Err(format!("`{s}`: an etcd source takes no query"));
            }
            Ok(SourceSpec::Etcd { base, key })
        }
        "consul" | "consul+http" | "consul+https" => {
            let (base, key, query) = gateway(scheme.ends_with("https"))?;
            let mut wait = Duration::from_secs(300);
            let mut extra = Vec::new();
            for pair in query.iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("wait", value)) => {
                        wait = humantime::parse_duration(value).map_err(|e| format!("`{s}`: wait={value}: {e}"))?
                    }
                    // The loop sets these itself.
                    _ if pair == "raw" || pair.starts_with("raw=") || pair.starts_with("index=") => {}
                    _ => extra.push(pair.to_owned()),
                }
            }
            if wait.is_zero() {
                return Err(format!("`{s}`: wait must be more than 0"));
            }
            Ok(SourceSpec::Consul {
                base,
                key: key.trim_start_matches('/').to_owned(),
                wait,
                extra_query: extra.join("&"),
            })
        }
        "http" | "https" => {
            let url: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
            if url.authority().is_none() {
                return Err(format!("`{s}` has no host"));
            }
            Ok(SourceSpec::Http { url })
        }
        "file" => {
            if !rest.starts_with('/') {
                return Err(format!("`{s}`: a file URL takes an absolute path (file:///etc/app/config.json)"));
            }
            Ok(SourceSpec::File { path: PathBuf::from(rest) })
        }
        other => {
            Err(format!("`{s}`: unknown source scheme `{other}` (etcd://, consul://, http://, https://, file://)"))
        }
    }
}

/// An `http://` or `https://` URL (for --reload-url and --health-url).
pub(crate) fn parse_http_url(s: &str) -> Result<Uri, String> {
    let url: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    match url.scheme_str() {
        Some("http" | "https") if url.authority().is_some() => Ok(url),
        _ => Err(format!("`{s}`: expected http://HOST:PORT/PATH or https://…")),
    }
}

/// The content checks `--validate` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidateFormat {
    Json,
    Yaml,
    Toml,
}

/// A signal by name (`HUP`, `SIGUSR1`, …), as given to `--signal`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignalName {
    pub name: &'static str,
    pub(crate) signal: rustix::process::Signal,
}

impl fmt::Debug for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.name)
    }
}

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.name)
    }
}

pub(crate) fn parse_signal(s: &str) -> Result<SignalName, String> {
    use rustix::process::Signal;
    let upper = s.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let (name, signal) = match bare {
        "HUP" => ("HUP", Signal::HUP),
        "USR1" => ("USR1", Signal::USR1),
        "USR2" => ("USR2", Signal::USR2),
        "INT" => ("INT", Signal::INT),
        "QUIT" => ("QUIT", Signal::QUIT),
        "TERM" => ("TERM", Signal::TERM),
        "WINCH" => ("WINCH", Signal::WINCH),
        "ALRM" => ("ALRM", Signal::ALARM),
        "CONT" => ("CONT", Signal::CONT),
        _ => return Err(format!("`{s}`: expected one of HUP, USR1, USR2, INT, QUIT, TERM, WINCH, ALRM, CONT")),
    };
    Ok(SignalName { name, signal })
}

/// How the app is told about a new file. Several may be given; all are used, in this order.
#[derive(Debug, Clone, Default)]
pub(crate) struct NotifySpec {
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) process_name: Option<String>,
    pub(crate) signal: Option<SignalName>,
    pub(crate) process_group: bool,
    /// Escalate to SIGKILL even when `process_name` matches more than one program.
    pub(crate) kill_ambiguous: bool,
    pub(crate) reload_url: Option<Uri>,
    pub(crate) exec: Option<String>,
}

impl NotifySpec {
    /// Whether any process is named to be signalled (and so could be escalated against).
    pub(crate) fn targets_process(&self) -> bool {
        self.pid_file.is_some() || self.process_name.is_some()
    }
}

/// `--source-header 'Name: value'`: an extra request header for an http(s) source. The value
/// may be a secret (an API key): it is never shown, only the name.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceHeader {
    pub(crate) name: http::HeaderName,
    pub(crate) value: http::HeaderValue,
}

impl fmt::Debug for SourceHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: [redacted]", self.name)
    }
}

pub(crate) fn parse_source_header(s: &str) -> Result<SourceHeader, String> {
    let Some((name, value)) = s.split_once(':') else {
        return Err("expected `Name: value` (e.g. `X-Api-Version: 2`)".into());
    };
    let name: http::HeaderName =
        name.trim().parse().map_err(|_| format!("`{}` is not a header name", name.trim().escape_debug()))?;
    if matches!(name.as_str(), "host" | "content-length" | "transfer-encoding" | "connection" | "if-none-match") {
        return Err(format!("{name} is set by the sidecar itself"));
    }
    // The value is not quoted back: it may be a secret.
    let mut value = http::HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of {name} holds a character not allowed in a header"))?;
    value.set_sensitive(true);
    Ok(SourceHeader { name, value })
}

/// How the sidecar proves who it is to the source, and which CA it trusts for it. One struct
/// for every source (and for anything else that talks to the same store). It holds file paths,
/// never the secrets themselves: those are read when used, so a rotated Secret is picked up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceAuth {
    /// etcd user, or the user of HTTP Basic auth.
    pub(crate) user: Option<String>,
    pub(crate) password_file: Option<PathBuf>,
    /// Consul ACL token (X-Consul-Token) or HTTP bearer token.
    pub(crate) token_file: Option<PathBuf>,
    /// Client certificate and key (mutual TLS).
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    /// CA bundle for https sources (and the reload and health URLs).
    pub(crate) ca: Option<PathBuf>,
    pub(crate) headers: Vec<SourceHeader>,
}

impl SourceAuth {
    /// Which options a source of this kind can use, refused otherwise: a password given to a
    /// source that would ignore it is a configuration mistake, not something to skip quietly.
    pub(crate) fn check_for(&self, source: &SourceSpec) -> Result<(), String> {
        let (kind, tls) = match source {
            SourceSpec::Etcd { base, .. } => ("an etcd", base.scheme_str() == Some("https")),
            SourceSpec::Consul { base, .. } => ("a consul", base.scheme_str() == Some("https")),
            SourceSpec::Http { url } => ("an http(s)", url.scheme_str() == Some("https")),
            SourceSpec::File { .. } => ("a file", false),
        };
        let refuse = |option: &str| Err(format!("{option} does not apply to {kind} source"));
        let base = match source {
            SourceSpec::Etcd { base, .. } | SourceSpec::Consul { base, .. } => Some(base),
            SourceSpec::Http { url } => Some(url),
            SourceSpec::File { .. } => None,
        };
        if base.and_then(Uri::authority).is_some_and(|a| a.as_str().contains('@')) {
            // Refused here rather than by the URL's parser, whose error would quote it.
            return Err("a source URL with credentials in it (USER:PASSWORD@HOST) is refused: they would show in \
                        process lists, logs and status; use --source-user with --source-password-file, or \
                        --source-token-file"
                .into());
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err("--source-user and --source-password-file go together".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("--source-cert and --source-key go together".into());
        }
        if self.token_file.is_some() && self.user.is_some() {
            return Err("give --source-token-file or --source-user, not both".into());
        }
        if self.cert.is_some() && !tls {
            return Err(format!(
                "--source-cert needs TLS to the source: {kind} source over https (etcd+https://, consul+https://, https://)"
            ));
        }
        match source {
            SourceSpec::Etcd { .. } if self.token_file.is_some() => refuse("--source-token-file (etcd: --source-user)"),
            SourceSpec::Consul { .. } if self.user.is_some() => refuse("--source-user (consul: --source-token-file)"),
            SourceSpec::Etcd { .. } | SourceSpec::Consul { .. } if !self.headers.is_empty() => {
                refuse("--source-header")
            }
            SourceSpec::File { .. } if self.user.is_some() || self.token_file.is_some() || !self.headers.is_empty() => {
                refuse("--source-user, --source-token-file or --source-header")
            }
            _ => Ok(()),
        }
    }

    /// A password or token that would cross the network in clear text: sent over plain HTTP
    /// to a host that is not loopback. Worth a warning, not a refusal (a mesh may encrypt).
    pub(crate) fn sent_in_clear(&self, source: &SourceSpec) -> bool {
        let base = match source {
            SourceSpec::Etcd { base, .. } | SourceSpec::Consul { base, .. } => base,
            SourceSpec::Http { url } => url,
            SourceSpec::File { .. } => return false,
        };
        let host = base.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        let secret = self.password_file.is_some() || self.token_file.is_some() || !self.headers.is_empty();
        secret && base.scheme_str() == Some("http") && !loopback
    }

    /// For status and `sidecar check`: what is used, never the secrets.
    pub(crate) fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(user) = &self.user {
            parts.push(format!("user {user}"));
        }
        if self.token_file.is_some() {
            parts.push("token".to_owned());
        }
        if let Some(cert) = &self.cert {
            parts.push(format!("client certificate {}", cert.display()));
        }
        if !self.headers.is_empty() {
            let names: Vec<&str> = self.headers.iter().map(|h| h.name.as_str()).collect();
            parts.push(format!("headers {}", names.join(", ")));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// `--max-apply-rate N/DURATION`: at most `count` applies in any `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyRate {
    pub(crate) count: u32,
    pub(crate) per: Duration,
}

impl fmt::Display for ApplyRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

pub(crate) fn parse_apply_rate(s: &str) -> Result<ApplyRate, String> {
    let expected = "expected N/DURATION, e.g. 3/1m (at most 3 applies a minute)";
    let (count, per) = s.split_once('/').ok_or_else(|| format!("`{s}`: {expected}"))?;
    let count: u32 = count.trim().parse().map_err(|_| format!("`{s}`: {expected}"))?;
    let per = humantime::parse_duration(per.trim()).map_err(|e| format!("`{s}`: {e}; {expected}"))?;
    if count == 0 || per.is_zero() {
        return Err(format!("`{s}`: N and DURATION must be more than 0"));
    }
    Ok(ApplyRate { count, per })
}

/// One destination's settings.
#[derive(Debug, Clone)]
pub struct SyncSpec {
    pub name: String,
    pub source: SourceSpec,
    pub dest: PathBuf,
    pub(crate) notify: NotifySpec,
    pub(crate) health_url: Option<Uri>,
    pub(crate) health_timeout: Duration,
    pub(crate) kill_after: Duration,
    pub(crate) validate: Option<ValidateFormat>,
    pub(crate) check_cmd: Option<String>,
    pub(crate) history_dir: PathBuf,
    pub(crate) history_keep: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) min_quiet: Duration,
    pub(crate) max_quiet: Duration,
    pub(crate) max_size: u64,
    pub(crate) source_timeout: Duration,
    pub(crate) source_auth: SourceAuth,
    pub(crate) retry_max: Duration,
    pub(crate) require_source: bool,
    pub(crate) max_apply_rate: Option<ApplyRate>,
    pub(crate) apply_jitter: Duration,
    /// `--fleet`: coordinate with the other instances through etcd.
    pub(crate) fleet: Option<FleetSpec>,
    pub(crate) output: Output,
}

impl SyncSpec {
    /// What no single option's parser can check: the quiet window and the history size.
    pub(crate) fn check(&self) -> Result<(), SpecError> {
        if self.max_quiet < self.min_quiet {
            return Err(SpecError::QuietOrder {
                name: self.name.clone(),
                min: humantime::format_duration(self.min_quiet).to_string(),
                max: humantime::format_duration(self.max_quiet).to_string(),
            });
        }
        if self.history_keep == 0 {
            return Err(SpecError::HistoryKeep { name: self.name.clone() });
        }
        self.source_auth
            .check_for(&self.source)
            .map_err(|message| SpecError::Auth { name: self.name.clone(), message })?;
        let name = || self.name.clone();
        let source = || self.source.to_string();
        match (&self.output, self.source.is_prefix()) {
            (Output::File, true) => return Err(SpecError::PrefixNeedsOutput { name: name(), source_url: source() }),
            (Output::Template(_), false) => {
                return Err(SpecError::NeedsPrefix { name: name(), what: "--template", source_url: source() })
            }
            (Output::Directory, false) => {
                return Err(SpecError::NeedsPrefix { name: name(), what: "a --dest ending in /", source_url: source() })
            }
            _ => {}
        }
        if let Output::Template(path) = &self.output {
            if ends_with_slash(&self.dest) {
                return Err(SpecError::TemplateIntoDirectory { name: name() });
            }
            // A template that cannot compile stops the start (and `sidecar check`), with its line.
            let text = template::read_file(path).map_err(|source| SpecError::TemplateUnreadable {
                name: name(),
                path: path.clone(),
                source,
            })?;
            template::compile(&path.display().to_string(), &text)
                .map_err(|error| SpecError::Template { name: name(), error })?;
        }
        if let Some(fleet) = &self.fleet {
            let auth = &fleet.gateway.auth;
            if auth.cert.is_some() && fleet.url.base.scheme_str() != Some("https") {
                let message = format!(
                    "a client certificate for the fleet (--fleet-cert, or the etcd source's --source-cert) needs \
                     TLS to its etcd: --fleet etcd+https://…, not {}",
                    fleet.url
                );
                return Err(SpecError::Auth { name: self.name.clone(), message });
            }
        }
        Ok(())
    }
}

/// The destination's name: the one given, else the destination's file name. It must be usable
/// in admin URLs.
pub(crate) fn name_of(given: Option<&str>, dest: &Path) -> Result<String, SpecError> {
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    let name = match (given, file_name) {
        (Some(name), _) => name.to_owned(),
        (None, Some(file)) => file,
        (None, None) => return Err(SpecError::NoFileName { name: String::new(), dest: dest.to_owned() }),
    };
    if dest.file_name().is_none() {
        return Err(SpecError::NoFileName { name, dest: dest.to_owned() });
    }
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        || name == "."
        || name == ".."
    {
        return Err(SpecError::BadName(name));
    }
    Ok(name)
}

/// `.sidecar-history/<name>` beside the destination: same file system (history copies and the
/// state file survive with the destination), and no extra setting to get right.
pub(crate) fn default_history_dir(dest: &Path, name: &str) -> PathBuf {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    parent.join(".sidecar-history").join(name)
}

/// Refuses two destinations with one name or one file (they would fight over it), also when
/// the paths differ but lead to one file (a symlinked directory, a symlink).
pub fn check_unique(specs: &[SyncSpec]) -> Result<(), SpecError> {
    let files: Vec<PathBuf> = specs.iter().map(|s| file_identity(&s.dest)).collect();
    for (i, a) in specs.iter().enumerate() {
        for (j, b) in specs[..i].iter().enumerate() {
            if a.name == b.name {
                return Err(SpecError::DuplicateName(a.name.clone()));
            }
            if a.dest == b.dest || files[i] == files[j] {
                return Err(SpecError::DuplicateDest {
                    file: files[i].clone(),
                    first: b.dest.clone(),
                    second: a.dest.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            parse_source("etcd://127.0.0.1:2379/apps/legacy/config.json").unwrap(),
            SourceSpec::Etcd {
                base: "http://127.0.0.1:2379/".parse().unwrap(),
                key: "/apps/legacy/config.json".into()
            }
        );
        match parse_source("consul://127.0.0.1:8500/apps/x?wait=30s&dc=eu").unwrap() {
            SourceSpec::Consul { key, wait, extra_query, .. } => {
                assert_eq!(key, "apps/x");
                assert_eq!(wait, Duration::from_secs(30));
                assert_eq!(extra_query, "dc=eu");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_source("http://h:1/c.json").unwrap(), SourceSpec::Http { .. }));
        assert_eq!(parse_source("/etc/x.json").unwrap(), SourceSpec::File { path: "/etc/x.json".into() });
        assert_eq!(parse_source("file:///etc/x.json").unwrap(), SourceSpec::File { path: "/etc/x.json".into() });
        for bad in ["etcd://h:1", "etcd:///k", "gopher://h/k", "file://rel", "", "consul://h:1/k?wait=0s"] {
            assert!(parse_source(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn a_name_or_path_with_a_line_break_stays_on_one_line() {
        // Found by fuzz/config_toml: a [[sync]] dest with a CR in it named the destination, and
        // the error about that name took two lines.
        let spec = |dest: &str| {
            let argv = ["sidecar", "sync", "--source", "/tmp/s", "--dest", dest];
            let crate::cli::Command::Sync(args) = crate::cli::parse_from(argv).unwrap().command else {
                unreachable!("a sync command line")
            };
            args.to_spec()
        };
        let message = spec("/tmp/a\rb").unwrap_err().to_string();
        assert!(message.starts_with("sync name `a\\rb` may only hold"), "{message}");
        let message = spec("/tmp/a\nb/..").unwrap_err().to_string();
        assert!(message.contains("--dest /tmp/a\\nb/.. has no file name"), "{message}");
        let message =
            SpecError::DuplicateDest { file: "/tmp/a\nb".into(), first: "/x".into(), second: "/y".into() }.to_string();
        assert_eq!(message, "two sync destinations write /tmp/a\\nb: /x and /y");
    }

    #[test]
    fn credentials_are_checked_against_the_source_and_never_shown_by_debug() {
        let spec = |argv: &[&str]| {
            let mut full = vec!["sidecar", "sync", "--dest", "/tmp/sidecar-test/c"];
            full.extend_from_slice(argv);
            let crate::cli::Command::Sync(args) = crate::cli::parse_from(full).unwrap().command else {
                unreachable!("a sync command line")
            };
            args.to_spec()
        };
        let ok =
            spec(&["--source", "https://h:1/c", "--source-header", "X-Api-Key: k-53cr3t", "--source-token-file", "/t"])
                .unwrap();
        let debug = format!("{ok:?}");
        assert!(debug.contains("x-api-key: [redacted]") && !debug.contains("k-53cr3t"), "{debug}");
        assert!(!format!("{:?}", ok.source_auth.headers[0].value).contains("k-53cr3t"));
        for (argv, refusal) in [
            (&["--source", "etcd://h:1/k", "--source-token-file", "/t"][..], "does not apply to an etcd source"),
            (&["--source", "consul://h:1/k", "--source-user", "u", "--source-password-file", "/p"], "consul"),
            (&["--source", "/etc/x", "--source-header", "A: b"], "does not apply to a file source"),
            (&["--source", "etcd://h:1/k", "--source-cert", "/c", "--source-key", "/k"], "needs TLS"),
            (&["--source", "http://u:pw-in-url@h:1/c"], "credentials in it"),
        ] {
            let message = spec(argv).unwrap_err().to_string();
            assert!(message.contains(refusal) && !message.contains("pw-in-url"), "{argv:?}: {message}");
        }
        let clear = |source: &str| {
            let auth = SourceAuth { token_file: Some("/t".into()), ..SourceAuth::default() };
            auth.sent_in_clear(&parse_source(source).unwrap())
        };
        assert!(clear("http://config.internal/c") && clear("consul://10.0.0.1:8500/k"));
        assert!(!clear("https://config.internal/c") && !clear("http://127.0.0.1:1/c") && !clear("etcd://[::1]:1/k"));
        assert!(parse_source_header("X-Tenant blue").is_err());
        assert!(parse_source_header("Host: evil").is_err());
        assert!(!parse_source_header("X-A: bad\u{7f}value").unwrap_err().contains("bad"));
        assert_eq!(parse_apply_rate("3/1m").unwrap(), ApplyRate { count: 3, per: Duration::from_secs(60) });
        assert_eq!(parse_apply_rate("3/1m").unwrap().to_string(), "3/1m");
        for bad in ["0/1m", "3/0s", "3", "x/1m", "3/soon"] {
            assert!(parse_apply_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals_parse() {
        assert_eq!(parse_signal("hup").unwrap().name, "HUP");
        assert_eq!(parse_signal("SIGUSR2").unwrap().name, "USR2");
        assert!(parse_signal("KILLALL").is_err());
    }
}
