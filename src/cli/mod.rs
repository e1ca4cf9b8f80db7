//! Everything that knows clap or the TOML file: the command-line definitions, the config-file
//! layering ([`file`]), `sidecar check`'s reading of them ([`check`]), and the conversion of
//! arguments into the runtime settings the roles take ([`convert`]: `ProxyConfig`, `SyncSpec`).
//!
//! Precedence is flag > environment variable > `--config` file > built-in default. The file's
//! values are injected as clap defaults, so one parser applies all four layers and `--help`
//! shows the built-in defaults.

pub(crate) mod check;
mod convert;
pub mod file;

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::access_log::{parse_target, AccessLogFormat, AccessLogTarget};
use crate::config::{parse_cert_pair, parse_upstream, ForwardedPolicy, Upstream, RESTART_ONLY};
use crate::devca::DEFAULT_NAMES;
use crate::sync::fleet::rollback::{parse_rollback_target, RollbackTarget};
use crate::sync::fleet::{parse_fleet_url, parse_instance, FleetUrl};
use crate::sync::spec::{
    parse_apply_rate, parse_http_url, parse_signal, parse_source, parse_source_header, ApplyRate, SignalName,
    SourceHeader, SourceSpec, ValidateFormat,
};
use crate::sys::logging::LogFormat;
use crate::sys::trust_store::TrustStore;
use crate::tls::{CertPair, ClientAuth};
use file::{load_proxy_defaults, FileError};

#[derive(Debug, Parser)]
#[command(
    name = "sidecar",
    version,
    about = "A small, fast sidecar for legacy HTTP apps: HTTPS termination in front of a plain-HTTP app on loopback.",
    long_about = None,
    after_help = "Quick start (self-signed dev certificate for localhost):\n  sidecar proxy --upstream http://127.0.0.1:8080\n  curl -k https://127.0.0.1:8443/"
)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace (debug and trace are the proxy's own; the
    /// libraries stay at info), or a tracing directive list such as `info,h2=debug` (RUST_LOG,
    /// when set, wins)
    #[arg(long, global = true, env = "SIDECAR_LOG_LEVEL", default_value = "info", value_name = "FILTER")]
    pub log_level: String,

    /// Log lines as human-readable `text` or one JSON object per line (`json`)
    #[arg(long, global = true, env = "SIDECAR_LOG_FORMAT", value_enum, default_value = "text", value_name = "FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Terminate TLS (HTTP/1.1 and HTTP/2) and forward to a plain-HTTP app over pooled HTTP/1.1
    #[command(after_help = proxy_after_help())]
    Proxy(ProxyArgs),
    /// Keep a config file in step with a config API (etcd, Consul, HTTP, a file): write it
    /// atomically, signal the app, verify its health, roll back a bad version
    #[command(after_help = SYNC_AFTER_HELP)]
    Sync(SyncArgs),
    /// Validate the proxy's configuration and every certificate and key it names, without
    /// starting anything: lists every problem found, exit code 0 when none (else 2)
    #[command(after_help = CHECK_AFTER_HELP)]
    Check(ProxyArgs),
    /// Make a local development CA (once) and a certificate signed by it for NAMES; trust the
    /// CA once and browsers, curl and other clients accept the certificate without warnings
    #[command(after_help = CERT_AFTER_HELP)]
    Cert(CertArgs),
    /// The instances that sync one key through etcd with --fleet: what each runs, which
    /// versions the fleet rejected, and a rollback of the whole fleet to an earlier value
    #[command(subcommand, after_help = FLEET_AFTER_HELP)]
    Fleet(FleetCommand),
    /// Shell completions and man pages, generated from these definitions (for packagers)
    #[command(hide = true, subcommand)]
    Generate(GenerateCommand),
}

const CHECK_AFTER_HELP: &str = "\
Takes the same options, environment variables and --config file as `sidecar proxy` and checks
them the way a start does: every value, the [proxy] table of the file, each certificate and key
(parses, the key matches, within its validity), the --sni-cert pairs, the client CA and the
admin token file. Nothing is started: no port is bound, the upstream is not contacted, no file
is written. On success it prints a summary (certificates with subject, serial and expiry) on
stdout; a certificate that expires within 30 days is a warning on stderr. Otherwise every
problem is printed on stderr, one per line, and the exit code is 2.";

const CERT_AFTER_HELP: &str = "\
The CA (ca.pem, ca-key.pem) is made once in DIR and reused; each run issues a new certificate for
NAMES, named after the first one (localhost+2.pem, localhost+2-key.pem). Keys are written with
mode 0600. The output says how to use the certificate with `sidecar proxy` and how to make this
machine, and Firefox, trust the CA. Anyone holding ca-key.pem can make certificates that a
machine trusting the CA accepts: keep it private, and never use the CA outside development.";

const FLEET_AFTER_HELP: &str = "\
Under the --fleet prefix, per sync name: instances/<instance> (each instance's status, under a
lease: it vanishes when the instance dies), rejected/<hash>/<instance> (who rolled a version
back as unhealthy, when, why) and seen/<hash> (when the fleet first saw a version; the waves
count from it). See `sidecar sync --help` for --fleet, --instance and the waves.";

const FLEET_ROLLBACK_AFTER_HELP: &str = "\
Examples:
  sidecar fleet rollback --fleet etcd://etcd:2379/fleet/ --name web --to 4711
  sidecar fleet rollback --fleet etcd://etcd:2379/fleet/ --name web --to 3f2a9c1b07de

The instances apply the value like any change from the source: checked, in their waves, verified
healthy. etcd keeps old revisions until it compacts them; an older one is refused, naming the
oldest revision still kept. A version the fleet rejected is refused too (no instance would apply
it).

It writes the source key: with etcd authentication, --fleet-user's role needs readwrite on that
key (and read on the fleet prefix), not only the read the instances need.";

/// `sidecar fleet ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum FleetCommand {
    /// Print each instance's version, state, since when, and app health, and the rejected
    /// versions (a table, or JSON with --json)
    Status(FleetStatusArgs),
    /// Write an earlier value of the source key back to it (read from etcd's history at its
    /// revision), so that every instance applies it through its normal path
    #[command(after_help = FLEET_ROLLBACK_AFTER_HELP)]
    Rollback(FleetRollbackArgs),
}

/// How `sidecar fleet` reaches etcd.
#[derive(Debug, Clone, Args)]
pub struct FleetEtcdArgs {
    /// Where the fleet's keys are: etcd://HOST:PORT/PREFIX/ (or etcd+https://), as given to
    /// `sidecar sync --fleet`
    #[arg(long, env = "SIDECAR_SYNC_FLEET", value_name = "URL", value_parser = parse_fleet_url)]
    pub fleet: FleetUrl,

    /// PEM CA bundle for etcd+https:// [default: the system bundle]
    #[arg(long, env = "SIDECAR_SYNC_FLEET_CA", value_name = "FILE")]
    pub fleet_ca: Option<PathBuf>,

    /// PEM client certificate for an etcd that wants one (--client-cert-auth); with
    /// --fleet-key
    #[arg(long, env = "SIDECAR_SYNC_FLEET_CERT", value_name = "FILE", requires = "fleet_key")]
    pub fleet_cert: Option<PathBuf>,

    /// PEM private key of --fleet-cert
    #[arg(long, env = "SIDECAR_SYNC_FLEET_KEY", value_name = "FILE", requires = "fleet_cert")]
    pub fleet_key: Option<PathBuf>,

    /// etcd user, for an etcd with authentication enabled; with --fleet-password-file. Its
    /// role must grant read on the fleet prefix (status), and for rollback readwrite on the
    /// source key
    #[arg(long, env = "SIDECAR_SYNC_FLEET_USER", value_name = "NAME", requires = "fleet_password_file")]
    pub fleet_user: Option<String>,

    /// File holding the password of --fleet-user (a mounted Secret). Never logged or shown
    #[arg(long, env = "SIDECAR_SYNC_FLEET_PASSWORD_FILE", value_name = "FILE", requires = "fleet_user")]
    pub fleet_password_file: Option<PathBuf>,

    /// Time allowed for each request to etcd
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Options of `sidecar fleet status`.
#[derive(Debug, Clone, Args)]
pub struct FleetStatusArgs {
    #[command(flatten)]
    pub etcd: FleetEtcdArgs,

    /// Only this sync destination [default: every name under the prefix]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Print JSON (for scripts) instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Options of `sidecar fleet rollback`.
#[derive(Debug, Clone, Args)]
pub struct FleetRollbackArgs {
    #[command(flatten)]
    pub etcd: FleetEtcdArgs,

    /// The sync destination's name (its --name)
    #[arg(long, value_name = "NAME")]
    pub name: String,

    /// The value to go back to: an etcd revision (a number of up to 11 digits, or `r` and a
    /// number: the key's value at that revision) or the hash of a version (at least 6 hex
    /// digits, as `sidecar fleet status` shows it: the newest value with that hash)
    #[arg(long, value_name = "HASH-OR-REVISION", value_parser = parse_rollback_target)]
    pub to: RollbackTarget,

    /// The source key to rewrite [default: the source the instances publish in their status]
    #[arg(long, value_name = "URL", value_parser = parse_source)]
    pub source: Option<SourceSpec>,
}

/// `sidecar proxy --help`'s closing text; the restart-only settings come from the list the
/// reloader uses.
fn proxy_after_help() -> String {
    let restart_only: Vec<&str> = RESTART_ONLY.iter().map(|setting| setting.names).collect();
    format!(
        "\
Every option can also come from its environment variable, or from the [proxy] table of the TOML
file given with --config, whose keys are the long option names:

  [proxy]
  upstream = \"http://127.0.0.1:8080\"
  listen = \"0.0.0.0:8443\"
  cert = \"/etc/tls/tls.crt\"
  key = \"/etc/tls/tls.key\"
  upstream-timeout = \"30s\"

A flag wins over its environment variable, which wins over the file.

Certificates, keys, the client CA and the --config file are watched and reloaded live (also on
SIGHUP): a new file is validated first, and a bad one is refused while the old one keeps
serving. These need a restart (a reload keeps their running values): {}, and the log settings.
Without --cert/--key, a self-signed certificate for localhost, 127.0.0.1 and ::1 is created
under --state-dir and reused on later starts.",
        restart_only.join(", ")
    )
}

const SYNC_AFTER_HELP: &str = "\
Sources: etcd://HOST:PORT/KEY (etcd v3, read then watched), consul://HOST:PORT/KEY[?wait=5m]
(Consul KV blocking queries), http(s)://URL (polled with If-None-Match), file:///PATH or a path
(watched; a mounted ConfigMap's ..data swap is seen). etcd+https:// and consul+https:// use TLS.

A source ending in / is a key prefix (a directory, for a file source): all keys under it, as one
set. Render them into one file with --template FILE, or give a --dest ending in / to get one file
per key (keys named with .., an absolute path, NUL or empty components are refused):
  sidecar sync --source etcd://etcd:2379/apps/legacy/ --template app.conf.j2 --dest /etc/app.conf
  sidecar sync --source consul://consul:8500/apps/legacy/ --dest /etc/app/conf.d/

Credentials come from files (a mounted Secret), read when used so a rotation is picked up:
  etcd:    --source-user app --source-password-file /run/secrets/etcd/password
           --source-cert c.pem --source-key k.pem --source-ca ca.pem  (--client-cert-auth)
  consul:  --source-token-file /run/secrets/consul/token               (X-Consul-Token)
  http(s): --source-token-file FILE (Bearer), or --source-user + --source-password-file
           (Basic), plus --source-header 'X-Tenant: blue' (repeatable)
Secrets never appear in logs, /status, /sync or errors. Pace a fleet's reloads with
--max-apply-rate 3/1m (more changes are coalesced into the next allowed apply) and
--apply-jitter 20s.

On each change: compare by SHA-256 with the file on disk (equal: nothing happens), validate,
write atomically (temp file, fsync, rename, fsync the directory; mode and owner kept), keep a
copy in the history directory, notify the app, and with --health-url verify it, rolling back
to the last good version (and escalating SIGTERM, then SIGKILL) when it stays unhealthy.

Fleets (--fleet etcd://HOST:PORT/PREFIX/): each instance publishes its status under a lease,
records a version it rolled back as unhealthy, and does not apply a version that
--fleet-reject-after instances rejected. With --fleet-waves K, instances fall into K waves by a
hash of --instance; wave i applies a new version --fleet-wave-delay x i after the fleet first
saw it, so a bad version stops at the first wave. The fleet's etcd takes --fleet-ca,
--fleet-cert/--fleet-key and --fleet-user/--fleet-password-file; with an etcd source, each one
not given is the matching --source-* option (same cluster, one set of credentials). See
`sidecar fleet --help`.

Every option also reads its SIDECAR_SYNC_* environment variable. `sidecar proxy --config FILE`
runs each [[sync]] table of FILE (keys are these option names) beside the proxy.";

/// Options of the `sync` role: one destination file kept in step with one source.
#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    /// Where the config comes from: etcd://HOST:PORT/KEY, consul://HOST:PORT/KEY, http(s)://URL,
    /// or a file path; ending in / (etcd, Consul, a directory): every key under that prefix
    #[arg(long, env = "SIDECAR_SYNC_SOURCE", value_name = "URL", value_parser = parse_source)]
    pub source: SourceSpec,

    /// The app's config file to keep in step (written atomically); with a prefix source and a
    /// trailing `/`, a directory: one file per key, the whole set swapped in at once through a
    /// `..data` symlink, as the kubelet updates a mounted ConfigMap
    #[arg(long, env = "SIDECAR_SYNC_DEST", value_name = "FILE")]
    pub dest: PathBuf,

    /// Render the keys under the source's prefix (a source ending in /) into --dest with this
    /// Jinja2 template (minijinja): `{{ keys["db/host"] }}`, `key_or_default("x", "y")`,
    /// `keys_under("db")`, `| parse_json`, `| parse_yaml`, `| to_json`. A missing key or a
    /// template error refuses the render, naming the template's line; the template file is
    /// watched
    #[arg(long, env = "SIDECAR_SYNC_TEMPLATE", value_name = "FILE")]
    pub template: Option<PathBuf>,

    /// Name of this destination in logs and the admin API [default: the --dest file name]
    #[arg(long, env = "SIDECAR_SYNC_NAME", value_name = "NAME")]
    pub name: Option<String>,

    /// File holding the app's pid; re-read before every signal
    #[arg(long, env = "SIDECAR_SYNC_PID_FILE", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Signal every process with this name that this sidecar may signal (same uid unless
    /// root): its comm, the file name of its argv[0], or of its script when argv[0] is an
    /// interpreter (python, node, ruby, perl, java, sh, bash...); for a shared process namespace
    #[arg(long, env = "SIDECAR_SYNC_PROCESS_NAME", value_name = "NAME")]
    pub process_name: Option<String>,

    /// Signal that tells the app to reload, with --pid-file or --process-name
    #[arg(long, env = "SIDECAR_SYNC_SIGNAL", value_name = "SIGNAL", default_value = "HUP", value_parser = parse_signal)]
    pub signal: SignalName,

    /// Send signals to the app's whole process group (its pid as group id)
    #[arg(long, env = "SIDECAR_SYNC_PROCESS_GROUP")]
    pub process_group: bool,

    /// Escalate to SIGKILL even when --process-name matches more than one program
    #[arg(long, env = "SIDECAR_SYNC_KILL_AMBIGUOUS")]
    pub kill_ambiguous: bool,

    /// POST to this URL to make the app reload (any 2xx answer is success)
    #[arg(long, env = "SIDECAR_SYNC_RELOAD_URL", value_name = "URL", value_parser = parse_http_url)]
    pub reload_url: Option<http::Uri>,

    /// Run this shell command to make the app reload (exit 0 is success); it gets
    /// SIDECAR_SYNC_DEST and SIDECAR_SYNC_HASH in its environment
    #[arg(long, env = "SIDECAR_SYNC_EXEC", value_name = "CMD")]
    pub exec: Option<String>,

    /// After notifying the app, poll this URL: it must answer 2xx, without a break, for a fifth
    /// of --health-timeout (at most 3s) within --health-timeout, else the change is rolled back
    #[arg(long, env = "SIDECAR_SYNC_HEALTH_URL", value_name = "URL", value_parser = parse_http_url)]
    pub health_url: Option<http::Uri>,

    /// How long the app has to become healthy after a change
    #[arg(long, env = "SIDECAR_SYNC_HEALTH_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub health_timeout: Duration,

    /// After a rollback that leaves the app unhealthy it gets SIGTERM, and SIGKILL this much
    /// later if it is still there
    #[arg(long, env = "SIDECAR_SYNC_KILL_AFTER", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub kill_after: Duration,

    /// Refuse a new version that does not parse as this format
    #[arg(long, env = "SIDECAR_SYNC_VALIDATE", value_enum, value_name = "FORMAT")]
    pub validate: Option<ValidateFormat>,

    /// Refuse a new version when this shell command fails on it; `{}` is replaced by the path
    /// of the candidate file (in the destination's directory, same extension)
    #[arg(long, env = "SIDECAR_SYNC_CHECK_CMD", value_name = "CMD")]
    pub check_cmd: Option<String>,

    /// Where earlier versions and the last-applied state are kept [default:
    /// .sidecar-history/NAME beside --dest]
    #[arg(long, env = "SIDECAR_SYNC_HISTORY_DIR", value_name = "DIR")]
    pub history_dir: Option<PathBuf>,

    /// How many versions the history keeps
    #[arg(long, env = "SIDECAR_SYNC_HISTORY_KEEP", value_name = "N", default_value = "10", value_parser = clap::value_parser!(usize))]
    pub history_keep: usize,

    /// How often an http(s) source is polled, and a file source re-read besides being watched
    #[arg(long, env = "SIDECAR_SYNC_POLL_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Changes are applied once the source has been quiet this long (a burst becomes one write
    /// and one signal)...
    #[arg(long, env = "SIDECAR_SYNC_MIN_QUIET", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub min_quiet: Duration,

    /// ...or at the latest this long after the first change of a burst
    #[arg(long, env = "SIDECAR_SYNC_MAX_QUIET", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub max_quiet: Duration,

    /// Largest config accepted from the source, in bytes; larger is refused
    #[arg(long, env = "SIDECAR_SYNC_MAX_SIZE", value_name = "BYTES", default_value = "1048576", value_parser = clap::value_parser!(u64).range(1..=1_073_741_824))]
    pub max_size: u64,

    /// Time allowed for one request to the source (a blocking query's wait is added); an etcd
    /// watch silent this long is checked, and reconnected when the server does not answer
    #[arg(long, env = "SIDECAR_SYNC_SOURCE_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub source_timeout: Duration,

    /// PEM CA bundle for https sources [default: the system bundle]
    #[arg(long, env = "SIDECAR_SYNC_SOURCE_CA", value_name = "FILE")]
    pub source_ca: Option<PathBuf>,

    /// etcd user (its token comes from /v3/auth/authenticate and is renewed when etcd says it
    /// expired), or the user of HTTP Basic auth for an http(s) source; with --source-password-file
    #[arg(long, env = "SIDECAR_SYNC_SOURCE_USER", value_name = "NAME", requires = "source_password_file")]
    pub source_user: Option<String>,

    /// File holding the password of --source-user (a mounted Secret); read when it is needed,
    /// so a rotated Secret is picked up. Never logged or shown
    #[arg(long, env = "SIDECAR_SYNC_SOURCE_PASSWORD_FILE", value_name = "FILE", requires = "source_user")]
    pub source_password_file: Option<PathBuf>,

    /// File holding a token: Consul's ACL token (sent as X-Consul-Token) or, for an http(s)
    /// source, a bearer token (Authorization: Bearer). Read for every request, so a rotated
    /// Secret is used at once. Never logged or shown
    #[arg(long, env = "SIDECAR_SYNC_SOURCE_TOKEN_FILE", value_name = "FILE", conflicts_with = "source_user")]
    pub source_token_file: Option<PathBuf>,

    /// PEM client certificate for TLS to the source (etcd --client-cert-auth, mutual TLS);
    /// with --source-key. Reloaded when the files change
    #[arg(long, env = "SIDECAR_SYNC_SOURCE_CERT", value_name = "FILE", requires = "source_key")]
    pub source_cert: Option<PathBuf>,

    /// PEM private key of --source-cert
    #[arg(long, env = "SIDECAR_SYNC_SOURCE_KEY", value_name = "FILE", requires = "source_cert")]
    pub source_key: Option<PathBuf>,

    /// An extra request header for an http(s) source, `Name: value`; repeat for more. Values
    /// are never shown (they may be API keys)
    #[arg(long, env = "SIDECAR_SYNC_SOURCE_HEADER", value_name = "HEADER", value_parser = parse_source_header)]
    pub source_header: Vec<SourceHeader>,

    /// Apply at most N changes per DURATION (e.g. 3/1m); changes beyond that wait for the next
    /// allowed apply and are coalesced into it (the newest value wins). The first value at
    /// start is applied at once and counts
    #[arg(long, env = "SIDECAR_SYNC_MAX_APPLY_RATE", value_name = "N/DURATION", value_parser = parse_apply_rate)]
    pub max_apply_rate: Option<ApplyRate>,

    /// Delay each apply of a change by a random time up to this, so that a fleet watching one
    /// key does not reload at the same instant (not the first apply at start)
    #[arg(long, env = "SIDECAR_SYNC_APPLY_JITTER", value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub apply_jitter: Duration,

    /// Longest wait between retries of a failing source or write (exponential from 200ms,
    /// with jitter)
    #[arg(long, env = "SIDECAR_SYNC_RETRY_MAX", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub retry_max: Duration,

    /// Exit with an error when the source cannot be read at start, instead of starting with
    /// the file on disk and retrying
    #[arg(long, env = "SIDECAR_SYNC_REQUIRE_SOURCE")]
    pub require_source: bool,

    /// Sync one time and exit: 0 when the file is in step with the source, 1 otherwise
    /// (for an init container)
    #[arg(long, env = "SIDECAR_SYNC_ONCE")]
    pub once: bool,

    /// Read the source once, print the difference with the file on disk, change nothing
    #[arg(long, env = "SIDECAR_SYNC_DRY_RUN")]
    pub dry_run: bool,

    /// Coordinate with the other instances that sync this key, through etcd:
    /// etcd://HOST:PORT/PREFIX/ (or etcd+https://, with --fleet-ca). Publishes this
    /// instance's status, shares rejections of unhealthy versions, orders applies in waves
    #[arg(long, env = "SIDECAR_SYNC_FLEET", value_name = "URL", value_parser = parse_fleet_url)]
    pub fleet: Option<FleetUrl>,

    /// With --fleet: PEM CA bundle for an etcd+https:// fleet [default: --source-ca when the
    /// source is etcd, else the system bundle]
    #[arg(long, env = "SIDECAR_SYNC_FLEET_CA", value_name = "FILE")]
    pub fleet_ca: Option<PathBuf>,

    /// With --fleet: PEM client certificate for the fleet's etcd (--client-cert-auth); with
    /// --fleet-key [default: --source-cert when the source is etcd]
    #[arg(long, env = "SIDECAR_SYNC_FLEET_CERT", value_name = "FILE", requires = "fleet_key")]
    pub fleet_cert: Option<PathBuf>,

    /// With --fleet: PEM private key of --fleet-cert [default: --source-key when the source is
    /// etcd]
    #[arg(long, env = "SIDECAR_SYNC_FLEET_KEY", value_name = "FILE", requires = "fleet_cert")]
    pub fleet_key: Option<PathBuf>,

    /// With --fleet: etcd user for the fleet's keys (its role needs readwrite on the fleet
    /// prefix); with --fleet-password-file [default: --source-user when the source is etcd]
    #[arg(long, env = "SIDECAR_SYNC_FLEET_USER", value_name = "NAME", requires = "fleet_password_file")]
    pub fleet_user: Option<String>,

    /// With --fleet: file holding the password of --fleet-user (a mounted Secret), read when a
    /// token is needed. Never logged or shown [default: --source-password-file when the source
    /// is etcd]
    #[arg(long, env = "SIDECAR_SYNC_FLEET_PASSWORD_FILE", value_name = "FILE", requires = "fleet_user")]
    pub fleet_password_file: Option<PathBuf>,

    /// This instance's id in the fleet [default: the host name, which in Kubernetes is the
    /// Pod name]
    #[arg(long, env = "SIDECAR_SYNC_INSTANCE", value_name = "ID", value_parser = parse_instance)]
    pub instance: Option<String>,

    /// With --fleet: a version rolled back as unhealthy by this many instances is not applied
    /// by any other
    #[arg(long, env = "SIDECAR_SYNC_FLEET_REJECT_AFTER", value_name = "N", default_value = "1", value_parser = clap::value_parser!(u32).range(1..))]
    pub fleet_reject_after: u32,

    /// With --fleet: split the instances into this many waves (by a hash of --instance); wave
    /// 0 applies a new version at once and is the canary
    #[arg(long, env = "SIDECAR_SYNC_FLEET_WAVES", value_name = "K", default_value = "1", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub fleet_waves: u32,

    /// With --fleet-waves: wave i applies a new version this much x i after the fleet first
    /// saw it, if no instance rejected it meanwhile. Longer than --health-timeout, so that the
    /// canary's verdict comes first
    #[arg(long, env = "SIDECAR_SYNC_FLEET_WAVE_DELAY", value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub fleet_wave_delay: Duration,

    /// With --fleet: the lease on this instance's status key; the key vanishes this long after
    /// the instance dies (whole seconds; etcd raises a very short one to its minimum)
    #[arg(long, env = "SIDECAR_SYNC_FLEET_LEASE_TTL", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub fleet_lease_ttl: Duration,

    /// Serve the admin API (/healthz, /readyz, /status, /sync) on ADDR; loopback only unless
    /// --admin-token-file is given
    #[arg(long, env = "SIDECAR_SYNC_ADMIN", value_name = "ADDR", value_parser = parse_listen)]
    pub admin: Option<SocketAddr>,

    /// File holding a bearer token required by admin endpoints that change state (rollback)
    #[arg(long, env = "SIDECAR_SYNC_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// Options of `sidecar cert`.
#[derive(Debug, Clone, Args)]
pub struct CertArgs {
    /// Where the CA and the certificates are kept [default: the proxy's state directory,
    /// $XDG_STATE_HOME/sidecar or ~/.local/state/sidecar]
    #[arg(long, env = "SIDECAR_STATE_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Host names (also *.wildcards) and IP addresses the certificate is for
    #[arg(value_name = "NAMES", default_values = DEFAULT_NAMES)]
    pub names: Vec<String>,

    /// Also make this machine trust the CA, as mkcert -install does: the NSS databases of
    /// Chrome/Chromium and Firefox under $HOME (needs certutil) and the system store (needs
    /// root). Says what it changed and what it could not
    #[arg(long, conflicts_with = "uninstall")]
    pub install: bool,

    /// Take the CA out of the trust stores again (issues nothing)
    #[arg(long)]
    pub uninstall: bool,

    /// The trust stores --install and --uninstall change
    #[arg(long, value_enum, value_delimiter = ',', default_value = "system,nss", value_name = "STORES")]
    pub trust_stores: Vec<TrustStore>,
}

/// What `sidecar generate` makes.
#[derive(Debug, Clone, Subcommand)]
pub enum GenerateCommand {
    /// Print a completion script for SHELL on stdout (e.g. `sidecar generate completions bash
    /// > /usr/share/bash-completion/completions/sidecar`)
    Completions {
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write sidecar.1 and one page per command (sidecar-proxy.1, ...) into DIR, or without
    /// --dir print sidecar.1 on stdout (`sidecar generate man | man -l -`)
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Options of the `proxy` role. Durations take units: `500ms`, `10s`, `5m`.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// TOML file supplying defaults for any option below (keys under [proxy])
    #[arg(long, env = "SIDECAR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The app to forward to: http://HOST:PORT (HTTP/1.1, normally on loopback), h2c://HOST:PORT
    /// (HTTP/2 cleartext: gRPC apps), unix:///PATH (HTTP/1.1 over a Unix socket) or
    /// h2c+unix:///PATH. A socket that does not exist yet is fine: 502 until the app creates it
    #[arg(long, env = "SIDECAR_UPSTREAM", value_name = "URL", value_parser = parse_upstream)]
    pub upstream: Upstream,

    /// Address to serve HTTPS on: IP:PORT, [IPv6]:PORT, HOST:PORT (resolved at start), or
    /// PORT and :PORT for all interfaces (port 0 picks a free port, printed at start)
    #[arg(long, env = "SIDECAR_LISTEN", value_name = "ADDR", default_value = "127.0.0.1:8443", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// PEM certificate chain, leaf first. Without it, a self-signed dev certificate is used
    #[arg(long, env = "SIDECAR_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// PEM private key for --cert (PKCS#8, PKCS#1 or SEC1)
    #[arg(long, env = "SIDECAR_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// An extra certificate, served to clients whose SNI matches one of the DNS names in its
    /// subjectAltName (exact or *.wildcard); repeat for more. Others get --cert
    #[arg(long, env = "SIDECAR_SNI_CERTS", value_name = "CERT:KEY", value_delimiter = ',', value_parser = parse_cert_pair)]
    pub sni_cert: Vec<CertPair>,

    /// PEM CA bundle for client certificates (mutual TLS); the verified subject is passed
    /// upstream in X-Client-Cert-Subject, and clients cannot set that header themselves
    #[arg(long, env = "SIDECAR_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// With --client-ca: `require` a client certificate, or only `request` one
    #[arg(long, env = "SIDECAR_CLIENT_AUTH", value_enum, default_value = "require", value_name = "MODE")]
    pub client_auth: ClientAuth,

    /// Quiet time after a change to a watched file (certificates, keys, client CA, --config)
    /// before it is reloaded, so that a burst of writes becomes one reload
    #[arg(long, env = "SIDECAR_RELOAD_DEBOUNCE", value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
    pub reload_debounce: Duration,

    /// Where the dev certificate is kept [default: $XDG_STATE_HOME/sidecar or
    /// ~/.local/state/sidecar]
    #[arg(long, env = "SIDECAR_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// What to do with X-Forwarded-* headers sent by the client: `overwrite` replaces them
    /// (clients cannot spoof them), `trust` keeps them and appends to X-Forwarded-For (only
    /// behind a trusted load balancer)
    #[arg(long, env = "SIDECAR_FORWARDED_HEADERS", value_enum, default_value = "overwrite", value_name = "POLICY")]
    pub forwarded_headers: ForwardedPolicy,

    /// Time allowed for a response to start from the upstream before answering 504
    #[arg(long, env = "SIDECAR_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Time allowed to open a TCP connection to the upstream before answering 502
    #[arg(long, env = "SIDECAR_UPSTREAM_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// An idle keep-alive connection to the upstream is closed after this. Keep it below the
    /// app's own keep-alive timeout (Node.js and uvicorn: 5s), or a request can meet a
    /// connection the app is closing; a new one costs a few microseconds on loopback
    #[arg(long, env = "SIDECAR_UPSTREAM_IDLE_TIMEOUT", value_name = "DURATION", default_value = "4s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Time allowed for a client to finish the TLS handshake
    #[arg(long, env = "SIDECAR_TLS_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Time allowed for a client to send a complete request head, also between keep-alive
    /// requests (cuts off slowloris clients)
    #[arg(long, env = "SIDECAR_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A client connection with no traffic for this long is closed gracefully
    #[arg(long, env = "SIDECAR_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before exiting
    #[arg(long, env = "SIDECAR_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// On SIGTERM/SIGINT, how long to keep accepting and serving new connections (while
    /// /readyz already answers 503) before draining: load balancers and Kubernetes endpoints
    /// stop sending traffic only some time after shutdown starts
    #[arg(long, env = "SIDECAR_SHUTDOWN_DELAY", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Largest request head (request line + headers) accepted, in bytes; larger gets 431
    #[arg(long, env = "SIDECAR_MAX_HEADER_SIZE", value_name = "BYTES", default_value = "65536", value_parser = clap::value_parser!(u32).range(8192..=16_777_216))]
    pub max_header_size: u32,

    /// Most client connections open at once; further clients wait in the listen backlog
    #[arg(long, env = "SIDECAR_MAX_CONNECTIONS", value_name = "N", default_value = "10000", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Also listen for plain HTTP on ADDR and answer every request with a 308 redirect to https
    #[arg(long, env = "SIDECAR_REDIRECT_HTTP", value_name = "ADDR", value_parser = parse_listen)]
    pub redirect_http: Option<SocketAddr>,

    /// Write an access log line per request to `stdout`, `stderr` or a file (appended);
    /// lines are written by their own thread and dropped (counted) rather than slow requests
    #[arg(long, env = "SIDECAR_ACCESS_LOG", value_name = "TARGET", default_value = "off", value_parser = parse_target)]
    pub access_log: AccessLogTarget,

    /// Access log lines as `combined` (nginx/Apache style plus timings, TLS version, ALPN) or
    /// `json`
    #[arg(long, env = "SIDECAR_ACCESS_LOG_FORMAT", value_enum, default_value = "combined", value_name = "FORMAT")]
    pub access_log_format: AccessLogFormat,

    /// Worker threads serving connections, each with its own event loop, listening socket
    /// (SO_REUSEPORT: the kernel spreads new connections) and upstream pool [default: one per CPU]
    #[arg(long, env = "SIDECAR_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// Serve the admin API (/healthz, /readyz, /status, POST /reload) on ADDR; loopback only
    /// unless --admin-token-file is given
    #[arg(long, env = "SIDECAR_ADMIN", value_name = "ADDR", value_parser = parse_listen)]
    pub admin: Option<SocketAddr>,

    /// File holding a bearer token required by admin endpoints that change state
    #[arg(long, env = "SIDECAR_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Expect a PROXY protocol header (v1 or v2) from a load balancer at the start of every
    /// TLS connection and take the client address for X-Forwarded-For from it; a connection
    /// without a valid header is closed. Only behind a balancer that sends one (restart-only)
    // A value, not a bare switch: a flag must be able to turn off what the file or the
    // environment turned on, and `sidecar check` validates options that take values.
    #[arg(
        long,
        env = "SIDECAR_PROXY_PROTOCOL",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub proxy_protocol: bool,

    /// Readiness (/readyz) asks the app for this path and needs a 2xx; without it, a TCP
    /// connection to the app must succeed. Checked in the background about once a second
    #[arg(long, env = "SIDECAR_UPSTREAM_HEALTH_PATH", value_name = "PATH", value_parser = parse_health_path)]
    pub upstream_health_path: Option<String>,

    /// Reuse connections to the app. Turn off for an app that may answer without reading a
    /// request body: the unread body would be read as the next client's request
    #[arg(long, env = "SIDECAR_UPSTREAM_KEEPALIVE", value_name = "BOOL", default_value = "true",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub upstream_keepalive: bool,

    /// Protocols a client may switch to with `Upgrade` (tunnelled to the app after its 101);
    /// others (h2c, say) are not passed on
    #[arg(
        long,
        env = "SIDECAR_UPGRADE_PROTOCOLS",
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "websocket"
    )]
    pub upgrade_protocols: Vec<String>,

    /// Requests one client connection may make; then HTTP/1.1 closes it after the response
    /// and HTTP/2 sends GOAWAY (nginx: 1000). 0: no limit
    #[arg(long, env = "SIDECAR_MAX_REQUESTS_PER_CONNECTION", value_name = "N", default_value = "1000")]
    pub max_requests_per_connection: u32,

    /// HTTPS port written into redirects [default: the --listen port]; set it when a Service
    /// or load balancer maps another port (e.g. 443) to --listen
    #[arg(long, env = "SIDECAR_PUBLIC_HTTPS_PORT", value_name = "PORT")]
    pub public_https_port: Option<u16>,
}

/// A listening address as operators write it: `IP:PORT`, `[IPv6]:PORT`, `HOST:PORT` (resolved
/// now, the first address), or `PORT` and `:PORT` for all IPv4 interfaces (as nginx's `listen
/// 8443` and Go's `:8443`).
pub(crate) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let expected = "expected IP:PORT, [IPv6]:PORT, HOST:PORT, :PORT or PORT \
                    (examples: 127.0.0.1:8443, [::1]:8443, localhost:8443, :8443, 8443)";
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = port_only.parse().map_err(|_| format!("port {port_only} is above 65535; {expected}"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = s.rsplit_once(':').filter(|(host, _)| !host.is_empty() && !host.contains(':')) else {
        return Err(expected.to_owned());
    };
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}; {expected}"))?;
    let mut resolved =
        (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve host {host:?} ({e}); {expected}"))?;
    resolved.next().ok_or_else(|| format!("host {host:?} resolves to no address; {expected}"))
}

fn parse_health_path(s: &str) -> Result<String, String> {
    let valid = s.starts_with('/') && s.bytes().all(|b| b.is_ascii_graphic());
    valid.then(|| s.to_owned()).ok_or_else(|| format!("`{s}`: a path starting with /, without spaces"))
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 5m)"))
}

/// Parses arguments with all four layers applied. `--help`, `--version` and usage errors come
/// back as `clap::Error`, whose `exit()` prints them the conventional way.
pub fn parse_from<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // First pass: only to find --config. Nothing is required yet, since the file may be what
    // supplies a required option.
    let first = Cli::command().ignore_errors(true).try_get_matches_from(&args)?;
    // `check` takes the proxy's options, file included.
    let (subcommand, config_path) = match first.subcommand() {
        Some((name @ ("proxy" | "check"), m)) => (name.to_owned(), m.get_one::<PathBuf>("config").cloned()),
        _ => (String::new(), None),
    };

    let mut command = Cli::command();
    if let Some(path) = &config_path {
        for default in load_proxy_defaults(path)? {
            // A value from the file satisfies a required option.
            let apply = |arg: clap::Arg| arg.default_values(default.values.clone()).required(false);
            command = match default.global {
                true => command.mut_arg(&default.id, apply),
                false => command.mut_subcommand(&subcommand, |sub| sub.mut_arg(&default.id, apply)),
            };
        }
    }
    let matches = command.try_get_matches_from(&args).map_err(|e| {
        let Some(path) = &config_path else { return CliError::Usage(e) };
        // Blame the file only when the command line parses on its own (the file may be what
        // supplies a required option, so a missing one does not count against the command line).
        match Cli::command().try_get_matches_from(&args) {
            Err(own) if own.kind() != ErrorKind::MissingRequiredArgument => CliError::Usage(own),
            _ if e.kind() == ErrorKind::MissingRequiredArgument => CliError::Usage(e),
            _ => CliError::FileValue { path: path.clone(), message: e.kind().to_string(), rendered: e.to_string() },
        }
    })?;
    let cli = Cli::from_arg_matches(&matches)?;
    // clap's `requires` sees only the command line; a value from the file or the environment
    // must not silently fall back to the development certificate.
    if let Command::Proxy(proxy) = &cli.command {
        match (&proxy.cert, &proxy.key) {
            (Some(_), None) => {
                return Err(CliError::Incomplete(
                    "--cert is given (by flag, SIDECAR_CERT or the config file) but --key is not",
                ))
            }
            (None, Some(_)) => {
                return Err(CliError::Incomplete(
                    "--key is given (by flag, SIDECAR_KEY or the config file) but --cert is not",
                ))
            }
            _ => {}
        }
    }
    Ok(cli)
}

/// The proxy's options parsed again from the original command line (so flags and environment
/// still win over the file), for a reload after the `--config` file changed.
pub(crate) fn reparse_proxy_args(argv: &[OsString]) -> Result<ProxyArgs, CliError> {
    match parse_from(argv.iter().cloned())?.command {
        Command::Proxy(args) => Ok(args),
        _ => Err(CliError::Usage(clap::Error::raw(ErrorKind::InvalidSubcommand, "not a proxy command line"))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Incomplete(&'static str),
    #[error(transparent)]
    Usage(#[from] clap::Error),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("config file {}: {}", path.display(), first_line(rendered))]
    FileValue { path: PathBuf, message: String, rendered: String },
}

/// clap renders errors over several lines with usage hints; a log line wants the first.
fn first_line(rendered: &str) -> &str {
    rendered.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").trim_start_matches("error: ")
}

/// The subcommand named on the command line, if it parses that far (`--help` does not).
pub(crate) fn invoked_subcommand(argv: &[OsString]) -> Option<String> {
    let matches = Cli::command().ignore_errors(true).try_get_matches_from(argv).ok()?;
    matches.subcommand_name().map(str::to_owned)
}
