//! `sidecar check`: validates what `sidecar proxy` would be started with (flags, environment,
//! the `--config` file, and every file they name) without starting anything, and reports every
//! problem at once rather than the first. `app` prints the [`Report`].
//!
//! The proxy's parse ([`super::parse_from`]) stops at the first bad value, which is right
//! for a start but makes fixing a config a loop of one error per run. Here the command line is
//! read with every value taken as a plain string, each option's winning value (flag >
//! environment > file, as for the proxy) is then run through that option's own clap value
//! parser one by one, and the certificates go through the same loading code as a start
//! ([`crate::tls::TlsContext::check`]). When nothing is wrong, the proxy's own parse is run on the
//! same command line as a last word, so `check` cannot accept what `proxy` refuses.
//!
//! Nothing here binds a socket, connects anywhere or writes a file.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::{Resettable, ValueParser};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command, CommandFactory, FromArgMatches, ValueEnum};
use time::OffsetDateTime;

use super::file::{load_sync_sections, read_proxy_defaults};
use super::{parse_from, Cli, CliError, ProxyArgs};
use crate::admin;
use crate::config::{upstream_socket, CertSource, ProxyConfig, SocketState, Upstream, UpstreamAddress};
use crate::devcert;
use crate::sync::client::{check_fleet_auth, check_source_auth};
use crate::sync::spec::SourceAuth;
use crate::tls::{CertInfo, LoadedCert, TlsContext};

/// A certificate closer than this to its expiry is reported as a warning.
pub(crate) const EXPIRY_WARNING_DAYS: i64 = 30;

/// Stands in for a missing or invalid upstream (already reported as a problem) so that the
/// rest of the configuration can still be checked through the proxy's own `ProxyConfig`. It is
/// never shown, and nothing is ever contacted.
const STAND_IN_UPSTREAM: &str = "--upstream=http://upstream.invalid:1";

/// The outcome of a check: problems make the proxy refuse to start (exit 2); warnings do not.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) problems: Vec<String>,
    pub(crate) warnings: Vec<String>,
    /// What the proxy would run with, one item per line, printed after "OK".
    pub(crate) summary: Vec<String>,
}

/// Where an option's value came from, for naming it in a problem.
enum Origin<'a> {
    Flag,
    Env(&'a OsStr),
    File(&'a std::path::Path),
}

impl Origin<'_> {
    fn describe(&self, error: &clap::Error) -> String {
        let message = error_line(error);
        match self {
            // clap names the flag and the value already.
            Origin::Flag => message,
            Origin::Env(name) => format!("{}: {message}", name.to_string_lossy()),
            // The same wording as the proxy's start-up error for a bad value in the file.
            Origin::File(path) => format!("config file {}: {message}", path.display()),
        }
    }
}

/// clap's rendering of a value error on one line: the first line, plus the list of possible
/// values when clap gives one (on a line of its own).
fn error_line(error: &clap::Error) -> String {
    let rendered = error.to_string();
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("").trim_start_matches("error: ").to_owned();
    match lines.find(|l| l.starts_with("[possible values:")) {
        Some(possible) => format!("{first} {possible}"),
        None => first,
    }
}

/// Every option of `check` (the proxy's) that takes a value, plus the global ones.
fn options(strict: &Command) -> Vec<Arg> {
    let check = strict.find_subcommand("check").expect("the check subcommand is defined in cli.rs");
    check
        .get_arguments()
        .chain(strict.get_arguments().filter(|a| a.is_global_set()))
        .filter(|a| a.get_action().takes_values() && a.get_long().is_some())
        .cloned()
        .collect()
}

/// The command line as given, with no value judged yet: every value is a plain string and
/// nothing is required, so a bad or missing value is not the end of the check.
fn lenient(strict: Command) -> Command {
    strict.mut_subcommand("check", |mut sub| {
        let ids: Vec<clap::Id> =
            sub.get_arguments().filter(|a| a.get_action().takes_values()).map(|a| a.get_id().clone()).collect();
        for id in ids {
            sub = sub
                .mut_arg(id, |a| a.required(false).requires(Resettable::Reset).value_parser(ValueParser::os_string()));
        }
        sub
    })
}

/// One value at a time through the options' real parsers, without environment variables (the
/// values are passed explicitly, whichever layer they came from).
fn validator(options: &[Arg]) -> Command {
    let command = Command::new("sidecar check").no_binary_name(true).disable_help_flag(true).disable_version_flag(true);
    options.iter().fold(command, |command, arg| {
        command.arg(arg.clone().env(None).global(false).required(false).requires(Resettable::Reset))
    })
}

fn raw_values(matches: &ArgMatches, id: &str) -> Vec<OsString> {
    match matches.try_get_raw(id) {
        Ok(Some(values)) => values.map(OsStr::to_os_string).collect(),
        _ => Vec::new(),
    }
}

/// Checks the configuration `argv` (a full `sidecar check ...` command line) describes.
/// `Err` only for a command line clap cannot read at all.
pub(crate) fn run(argv: &[OsString]) -> Result<Report, clap::Error> {
    let strict = Cli::command();
    let options = options(&strict);
    let matches = lenient(strict).try_get_matches_from(argv)?;
    let Some(given) = matches.subcommand_matches("check") else {
        return Err(clap::Error::raw(
            clap::error::ErrorKind::InvalidSubcommand,
            "not a `sidecar check` command line\n",
        ));
    };
    let mut report = Report::default();

    // The file's [proxy] table, with every problem in it.
    let config_path = given.try_get_one::<OsString>("config").ok().flatten().map(PathBuf::from);
    let mut file_values: HashMap<String, Vec<String>> = HashMap::new();
    let mut sync_tables = 0;
    if let Some(path) = &config_path {
        match read_proxy_defaults(path) {
            Ok(found) => {
                report.problems.extend(found.problems.iter().map(ToString::to_string));
                sync_tables = found.sync_tables;
                // A later key for the same option wins, as it does for the proxy.
                file_values.extend(found.defaults.into_iter().map(|d| (d.id, d.values)));
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }

    // Each option's winning value through its own parser; the good ones are kept.
    let validator = validator(&options);
    let mut valid: Vec<OsString> = Vec::new();
    let mut upstream_given = false;
    for arg in &options {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        let (values, origin) = match given.value_source(id) {
            Some(ValueSource::CommandLine) => (raw_values(given, id), Origin::Flag),
            Some(ValueSource::EnvVariable) => (raw_values(given, id), Origin::Env(arg.get_env().unwrap_or_default())),
            // Not given, or only clap's built-in default: the file's value, if any, wins.
            _ => match (file_values.get(id), &config_path) {
                (Some(values), Some(path)) => (values.iter().map(OsString::from).collect(), Origin::File(path)),
                _ => continue,
            },
        };
        upstream_given |= id == "upstream";
        for value in values {
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(&value);
            match validator.clone().try_get_matches_from([&flag]) {
                Ok(_) => valid.push(flag),
                Err(e) => report.problems.push(origin.describe(&e)),
            }
        }
    }
    if !upstream_given {
        report.problems.push(
            "no upstream: give --upstream URL, SIDECAR_UPSTREAM, or `upstream` in the [proxy] table of the --config file".into(),
        );
    }

    // The proxy's own config from the valid values, so that the same code decides which files
    // are used (the dev certificate, SNI pairs, client CA) as at a start.
    let upstream =
        validator.clone().try_get_matches_from(&valid).ok().and_then(|m| m.get_one::<Upstream>("upstream").cloned());
    if upstream.is_none() {
        valid.push(STAND_IN_UPSTREAM.into());
    }
    let resolved = validator.try_get_matches_from(&valid).and_then(|m| Ok((ProxyArgs::from_arg_matches(&m)?, m)));
    let (args, resolved) = match resolved {
        Ok(both) => both,
        Err(e) => {
            // Every value passed its parser above, so this would be a bug in this module;
            // report it rather than claim the configuration is fine.
            report.problems.push(format!("cannot assemble the configuration: {}", error_line(&e)));
            return Ok(report);
        }
    };
    if args.cert.is_some() != args.key.is_some() {
        let (given, missing) = match (&args.cert, &args.key) {
            (Some(path), None) => (format!("cert {}", path.display()), "key"),
            (_, Some(path)) => (format!("key {}", path.display()), "cert"),
            (None, None) => (String::new(), ""),
        };
        report.problems.push(format!(
            "{given} is given without {missing}: give --cert and --key together (or neither, for the development certificate)"
        ));
    }
    let config = args.to_config();
    if let Some(path) = &config.config_file {
        report.summary.push(format!("config file {}", path.display()));
    }
    // Said here because a proxy that wants a header its clients do not send refuses them all.
    let proxy_note =
        if config.proxy_protocol { "; every connection must start with a PROXY protocol header" } else { "" };
    report.summary.push(format!("listen      https://{} (not bound by check{proxy_note})", config.listen));
    if let Some(upstream) = &upstream {
        report.summary.push(format!("upstream    {upstream} (not contacted by check)"));
        if let UpstreamAddress::Unix(path) = upstream.address() {
            check_upstream_socket(path, &mut report);
        }
    }

    check_tls(&config, &mut report);
    check_listeners(&config, &mut report);
    if sync_tables > 0 {
        report.summary.push(format!(
            "sync        {sync_tables} [[sync]] destination(s) in the config file (sources not contacted)"
        ));
        if let Some(path) = &config_path {
            check_sync_tables(path, &mut report);
        }
    }
    let level = resolved.try_get_one::<String>("log_level").ok().flatten().cloned().unwrap_or_default();
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        report.warnings.push(format!("log level `{level}` is not a valid filter; the proxy would log at info"));
    }

    // The proxy's own parse as the last word: `check` must never pass what `proxy` refuses.
    if report.problems.is_empty() {
        if let Err(e) = parse_from(argv.iter().cloned()) {
            report.problems.push(match e {
                CliError::Usage(e) => error_line(&e),
                other => other.to_string(),
            });
        }
    }
    Ok(report)
}

/// Each [[sync]] table's source and credentials: the files are read and the client
/// certificate loaded, the secrets never shown, the source never contacted.
fn check_sync_tables(path: &std::path::Path, report: &mut Report) {
    // Problems with the tables themselves were reported with the file's.
    let Ok(sections) = load_sync_sections(path) else { return };
    for section in sections {
        let Ok(spec) = section.to_spec() else { continue };
        let auth = spec.source_auth.describe().map(|a| format!(" ({a})")).unwrap_or_default();
        report.summary.push(format!("  {}: {}{auth} -> {}", spec.name, spec.source, spec.dest.display()));
        for problem in check_source_auth(&spec.source_auth) {
            report.problems.push(format!("sync {}: {problem}", spec.name));
        }
        if let Some(fleet) = &spec.fleet {
            let auth = fleet_credentials(&fleet.gateway.auth);
            report.summary.push(format!("    fleet {}{auth} as instance {}", fleet.url, fleet.instance));
            for problem in check_fleet_auth(&fleet.gateway.auth) {
                report.problems.push(format!("sync {} fleet: {problem}", spec.name));
            }
        }
    }
}

/// The fleet's credentials by name and path, never their content: ` (user NAME, password file
/// PATH, ...)`, or nothing.
fn fleet_credentials(auth: &SourceAuth) -> String {
    let mut parts = Vec::new();
    if let Some(user) = &auth.user {
        parts.push(format!("user {user}"));
    }
    let files = [
        ("password file", &auth.password_file),
        ("client certificate", &auth.cert),
        ("key", &auth.key),
        ("CA", &auth.ca),
    ];
    for (what, path) in files {
        if let Some(path) = path {
            parts.push(format!("{what} {}", path.display()));
        }
    }
    if parts.is_empty() {
        return String::new();
    }
    format!(" ({})", parts.join(", "))
}

fn days_left(not_after: OffsetDateTime) -> i64 {
    (not_after - OffsetDateTime::now_utc()).whole_days()
}

/// `subject "...", serial ..., expires ... (in N days)`.
fn describe(info: &CertInfo) -> String {
    format!("{info} (in {} days)", days_left(info.not_after))
}

fn warn_if_expiring(report: &mut Report, what: &str, info: &CertInfo) {
    let days = days_left(info.not_after);
    if days < EXPIRY_WARNING_DAYS {
        report.warnings.push(format!(
            "{what} (subject \"{}\", serial {}) expires in {days} day{} ({}): renew it soon",
            info.subject,
            info.serial,
            if days == 1 { "" } else { "s" },
            info.not_after.date()
        ));
    }
}

fn check_tls(config: &ProxyConfig, report: &mut Report) {
    let context = match TlsContext::new() {
        Ok(context) => context,
        Err(e) => {
            report.problems.push(e.to_string());
            return;
        }
    };
    let inputs = config.tls_inputs();
    let checked = context.check(&inputs);
    let problems_before = report.problems.len();
    let mut default_ready = true;
    match (&config.cert, checked.default) {
        (CertSource::Files { .. }, Ok(cert)) => cert_line(report, "cert       ", &cert),
        (CertSource::Files { .. }, Err(e)) => report.problems.push(e.to_string()),
        (CertSource::DevSelfSigned { .. }, Ok(cert)) if devcert::is_reusable(&cert) => {
            cert_line(report, "cert        development certificate", &cert)
        }
        // The proxy makes (or renews) it at start; nothing is wrong, and check writes nothing.
        (CertSource::DevSelfSigned { state_dir }, _) => {
            default_ready = false;
            report.summary.push(format!(
                "cert        none given: a self-signed development certificate for localhost, 127.0.0.1 and ::1 \
                 will be made in {} at start",
                state_dir.display()
            ));
        }
    }
    for (pair, result) in checked.sni {
        match result {
            Ok(cert) => {
                cert_line(report, "sni-cert   ", &cert);
                if !cert.info.dns_names.iter().any(|n| n.parse::<std::net::IpAddr>().is_err()) {
                    report.warnings.push(format!(
                        "--sni-cert {} has no DNS name in its subjectAltName, so no client is ever served it",
                        pair.cert.display()
                    ));
                }
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    match (&inputs.client_ca, checked.client_ca) {
        (Some(path), Some(Ok(cas))) => {
            let mode = inputs.client_auth.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
            report.summary.push(format!(
                "client-ca   {} ({} CA certificate(s), client-auth {mode})",
                path.display(),
                cas.len()
            ));
            for ca in &cas {
                report.summary.push(format!("              {}", describe(ca)));
                warn_if_expiring(report, &format!("client CA in {}", path.display()), ca);
            }
        }
        (_, Some(Err(e))) => report.problems.push(e.to_string()),
        _ => {}
    }
    // Each part is fine: assemble the rustls configuration exactly as a start does.
    if default_ready && report.problems.len() == problems_before {
        if let Err(e) = context.build(&inputs) {
            report.problems.push(e.to_string());
        }
    }
}

fn cert_line(report: &mut Report, label: &str, cert: &LoadedCert) {
    let names = if cert.info.dns_names.is_empty() { "none".to_owned() } else { cert.info.dns_names.join(", ") };
    report.summary.push(format!("{label} {}: {}; names {names}", cert.cert_path.display(), describe(&cert.info)));
    warn_if_expiring(report, &format!("certificate {}", cert.cert_path.display()), &cert.info);
}

/// The listeners' addresses, and the admin API's rules, checked without binding anything.
/// A Unix socket upstream: one that is not there yet is only a warning (an app that starts
/// after the proxy creates it); one that is no socket, or that this user may not connect to,
/// stops the proxy at start as it stops check.
fn check_upstream_socket(path: &std::path::Path, report: &mut Report) {
    match upstream_socket(path) {
        Ok(SocketState::Ready) => {}
        Ok(SocketState::Missing) => report.warnings.push(format!(
            "upstream socket {} does not exist yet: the proxy starts anyway and answers 502 (gRPC: UNAVAILABLE) \
             until the app creates it",
            path.display()
        )),
        Err(problem) => report.problems.push(problem),
    }
}

fn check_listeners(config: &ProxyConfig, report: &mut Report) {
    if let Some(addr) = config.redirect_http {
        report.summary.push(format!("redirect    http://{addr} -> https (not bound by check)"));
    }
    if let Some(addr) = config.admin {
        match admin::settings(addr, config.admin_token_file.as_deref()) {
            Ok(token) => report.summary.push(format!(
                "admin       http://{addr} ({}; not bound by check)",
                if token.is_some() { "bearer token required for changes" } else { "loopback, no token" }
            )),
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    let named: Vec<(&str, SocketAddr)> =
        [("listen", Some(config.listen)), ("redirect-http", config.redirect_http), ("admin", config.admin)]
            .into_iter()
            .filter_map(|(name, addr)| Some((name, addr?)))
            .collect();
    for (i, (a_name, a)) in named.iter().enumerate() {
        for (b_name, b) in &named[i + 1..] {
            // Port 0 picks a free port each time; an unspecified address overlaps every other
            // address of its family on the same port.
            let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            if a.port() != 0 && a.port() == b.port() && a.is_ipv4() == b.is_ipv4() && overlap {
                report.problems.push(format!(
                    "--{a_name} {a} and --{b_name} {b} would both listen on port {}; give each its own",
                    a.port()
                ));
            }
        }
    }
}
