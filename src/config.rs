//! Validated runtime configuration of the proxy.
//!
//! Raw input (flags, environment, the TOML file) is parsed by `cli`, which builds the
//! [`ProxyConfig`] snapshot defined here; the server reads it and never mutates it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::Authority;
use http::Uri;

use crate::access_log::{AccessLogFormat, AccessLogTarget};
use crate::devcert::{CERT_FILE, KEY_FILE};
use crate::tls::{CertPair, ClientAuth, TlsInputs};

/// The app behind the proxy: how it is spoken to and where it listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    protocol: UpstreamProtocol,
    address: UpstreamAddress,
    /// The Host field (HTTP/2: `:authority`) for a request that came without one, made once.
    host_header: http::HeaderValue,
}

/// What the proxy speaks to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with the proxy's own client (`http://`, `unix://`).
    Http1,
    /// HTTP/2 with prior knowledge, cleartext (`h2c://`, `h2c+unix://`): gRPC apps.
    H2c,
}

/// Where the app listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddress {
    Tcp(Authority),
    /// A Unix domain socket, by absolute path.
    Unix(PathBuf),
}

/// The upstream URL forms, as an error names them.
const ACCEPTED_UPSTREAMS: &str =
    "http://HOST:PORT (HTTP/1.1), h2c://HOST:PORT (HTTP/2 cleartext, gRPC), unix:///PATH (HTTP/1.1 over a Unix socket) \
     or h2c+unix:///PATH (HTTP/2 over a Unix socket)";

impl Upstream {
    pub(crate) fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    pub(crate) fn address(&self) -> &UpstreamAddress {
        &self.address
    }

    /// The Host field for a request that came without one.
    pub(crate) fn host_header(&self) -> &http::HeaderValue {
        &self.host_header
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.protocol, &self.address) {
            (UpstreamProtocol::Http1, UpstreamAddress::Tcp(authority)) => write!(f, "http://{authority}"),
            (UpstreamProtocol::H2c, UpstreamAddress::Tcp(authority)) => write!(f, "h2c://{authority}"),
            (UpstreamProtocol::Http1, UpstreamAddress::Unix(path)) => write!(f, "unix://{}", path.display()),
            (UpstreamProtocol::H2c, UpstreamAddress::Unix(path)) => write!(f, "h2c+unix://{}", path.display()),
        }
    }
}

/// Accepts `http://host:port` (a bare `host:port` too), `h2c://host:port`, `unix:///path` and
/// `h2c+unix:///path`. Paths are refused rather than silently rewritten, so that what the app
/// sees is exactly what the client asked for.
pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let (scheme, rest) = s.split_once("://").unwrap_or(("http", s));
    let protocol = match scheme.to_ascii_lowercase().as_str() {
        "http" | "unix" => UpstreamProtocol::Http1,
        "h2c" | "h2c+unix" => UpstreamProtocol::H2c,
        "" => return Err(format!("`{s}` has no scheme; use {ACCEPTED_UPSTREAMS}")),
        other => {
            let hint = if other == "https" {
                " (the app is spoken to in cleartext, normally on loopback or a Unix socket)"
            } else {
                ""
            };
            return Err(format!("`{s}`: scheme {other} is not supported{hint}; use {ACCEPTED_UPSTREAMS}"));
        }
    };
    if scheme.to_ascii_lowercase().ends_with("unix") {
        return parse_unix(s, protocol, rest);
    }
    let uri: Uri = format!("http://{rest}").parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    let authority = uri.authority().cloned().ok_or_else(|| format!("`{s}` has no host; use {ACCEPTED_UPSTREAMS}"))?;
    if authority.as_str().contains('@') {
        return Err(format!("`{s}`: credentials in the upstream URL are not supported"));
    }
    if authority.host().is_empty() {
        return Err(format!("`{s}` has no host; use {ACCEPTED_UPSTREAMS}"));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!(
            "`{s}`: a path or query in the upstream URL is not supported; give only {scheme}://HOST:PORT"
        ));
    }
    // Without an explicit port http means 80; keep it explicit so logs and Host are unambiguous.
    let authority = if authority.port_u16().is_some() {
        authority
    } else {
        format!("{authority}:80").parse().map_err(|e| format!("`{s}`: {e}"))?
    };
    let host_header = http::HeaderValue::from_str(authority.as_str()).map_err(|e| format!("`{s}`: {e}"))?;
    Ok(Upstream { protocol, address: UpstreamAddress::Tcp(authority), host_header })
}

/// `unix:///run/app.sock`: the part after `//` is an absolute path (no host).
fn parse_unix(s: &str, protocol: UpstreamProtocol, path: &str) -> Result<Upstream, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "`{s}`: a Unix socket upstream takes an absolute path, three slashes in all: unix:///run/app/app.sock"
        ));
    }
    if path.contains(['?', '#']) || path.ends_with('/') || path.contains('\0') {
        return Err(format!("`{s}`: expected the path of a socket file, as unix:///run/app/app.sock"));
    }
    // The bound the kernel puts on a socket address (sun_path, with its terminating NUL).
    if path.len() > 107 {
        return Err(format!("`{s}`: a Unix socket path is at most 107 bytes long; this one is {}", path.len()));
    }
    // What nginx sends to a Unix-socket upstream, too.
    let host_header = http::HeaderValue::from_static("localhost");
    Ok(Upstream { protocol, address: UpstreamAddress::Unix(PathBuf::from(path)), host_header })
}

/// What is at a Unix socket upstream's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketState {
    /// A socket this user may connect to.
    Ready,
    /// Nothing yet: the app creates it when it starts.
    Missing,
}

/// Whether `path` can be a Unix socket upstream: `Err` names what is wrong with it (not a
/// socket, not writable by this user, which connecting needs).
pub(crate) fn upstream_socket(path: &std::path::Path) -> Result<SocketState, String> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SocketState::Missing),
        Err(e) => return Err(format!("upstream socket {shown}: {e}")),
    };
    if !meta.file_type().is_socket() {
        let kind = if meta.is_dir() { "a directory" } else { "not a socket" };
        return Err(format!("upstream {shown} is {kind}: a unix:// upstream names the socket file the app listens on"));
    }
    let access =
        rustix::fs::accessat(rustix::fs::CWD, path, rustix::fs::Access::WRITE_OK, rustix::fs::AtFlags::EACCESS);
    if access.is_err() {
        return Err(format!(
            "upstream socket {shown} is not writable by this user (uid {}): connecting to a Unix socket needs write \
             permission on it; run the proxy in the app's group and have the app make it group-writable",
            rustix::process::geteuid().as_raw()
        ));
    }
    Ok(SocketState::Ready)
}

/// Treatment of X-Forwarded-* headers that arrive from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardedPolicy {
    /// Remove what the client sent and set our own values.
    Overwrite,
    /// Keep what the client sent; append the peer address to X-Forwarded-For.
    Trust,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Timeouts {
    pub(crate) tls_handshake: Duration,
    pub(crate) header_read: Duration,
    pub(crate) idle: Duration,
    pub(crate) upstream: Duration,
    pub(crate) upstream_connect: Duration,
    pub(crate) upstream_idle: Duration,
    pub(crate) drain: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_header_size: u32,
    pub(crate) max_connections: u32,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CertSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// A self-signed certificate for local development, kept in this directory.
    DevSelfSigned {
        state_dir: PathBuf,
    },
}

/// One immutable snapshot of the proxy's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) upstream: Upstream,
    pub(crate) forwarded: ForwardedPolicy,
    pub(crate) timeouts: Timeouts,
    pub(crate) limits: Limits,
    pub(crate) cert: CertSource,
    pub(crate) sni: Vec<CertPair>,
    pub(crate) client_ca: Option<PathBuf>,
    pub(crate) client_auth: ClientAuth,
    pub(crate) redirect_http: Option<SocketAddr>,
    pub(crate) public_https_port: Option<u16>,
    pub(crate) config_file: Option<PathBuf>,
    pub(crate) reload_debounce: Duration,
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) admin_token_file: Option<PathBuf>,
    /// Time between the shutdown signal and closing the listener; read when shutdown starts,
    /// so a reloaded value applies.
    pub(crate) shutdown_delay: Duration,
    pub(crate) workers: Option<usize>,
    pub(crate) access_log: AccessLogTarget,
    pub(crate) access_log_format: AccessLogFormat,
    /// Every TLS connection starts with a PROXY protocol header naming the real client.
    pub(crate) proxy_protocol: bool,
    pub(crate) upstream_policy: UpstreamPolicy,
}

/// How the proxy treats the app beyond its address: readiness, pooling, protocol switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamPolicy {
    /// Readiness asks the app for this path (2xx required) rather than only connecting.
    pub(crate) health_path: Option<String>,
    /// Upstream connections are reused; off, each request gets its own.
    pub(crate) keepalive: bool,
    /// `Upgrade` protocols tunnelled to the app, lowercase; others are not passed on.
    pub(crate) upgrade_protocols: Vec<String>,
    /// Requests one client connection may start (HTTP/1.1: the last gets `Connection: close`;
    /// HTTP/2: GOAWAY); 0 is no limit.
    pub(crate) max_requests_per_connection: u32,
}

impl ProxyConfig {
    /// A short digest of the effective settings (after flags, environment and file), to tell at
    /// a glance whether two processes run the same configuration.
    pub(crate) fn fingerprint(&self) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, format!("{self:?}").as_bytes());
        digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The files the TLS state is built from.
    pub(crate) fn tls_inputs(&self) -> TlsInputs {
        let default = match &self.cert {
            CertSource::Files { cert, key } => CertPair { cert: cert.clone(), key: key.clone() },
            CertSource::DevSelfSigned { state_dir } => {
                CertPair { cert: state_dir.join(CERT_FILE), key: state_dir.join(KEY_FILE) }
            }
        };
        TlsInputs { default, sni: self.sni.clone(), client_ca: self.client_ca.clone(), client_auth: self.client_auth }
    }

    /// Settings bound to sockets or files opened at start ([`RESTART_ONLY`]). A reload keeps
    /// the running values of these (copied from `running`) and returns the names of those the
    /// new config changed.
    pub(crate) fn keep_restart_only(&mut self, running: &ProxyConfig) -> Vec<&'static str> {
        RESTART_ONLY.iter().filter(|setting| (setting.keep)(self, running)).map(|setting| setting.names).collect()
    }
}

/// A setting bound to sockets, threads or files opened at start: a reload keeps its running
/// value and says so.
pub(crate) struct RestartOnly {
    /// The options, as `--help` and the log name them.
    pub(crate) names: &'static str,
    /// Copies the running value into the new config; `true` when the new one differed.
    keep: fn(&mut ProxyConfig, &ProxyConfig) -> bool,
}

/// Every restart-only setting: the reloader keeps them and `sidecar proxy --help` lists them.
pub(crate) const RESTART_ONLY: [RestartOnly; 8] = [
    RestartOnly { names: "listen", keep: |new, running| keep(&mut new.listen, &running.listen) },
    RestartOnly {
        names: "max-connections",
        keep: |new, running| keep(&mut new.limits.max_connections, &running.limits.max_connections),
    },
    RestartOnly {
        names: "redirect-http/public-https-port",
        keep: |new, running| {
            keep(&mut new.redirect_http, &running.redirect_http)
                | keep(&mut new.public_https_port, &running.public_https_port)
        },
    },
    RestartOnly {
        names: "access-log/access-log-format",
        keep: |new, running| {
            keep(&mut new.access_log, &running.access_log)
                | keep(&mut new.access_log_format, &running.access_log_format)
        },
    },
    RestartOnly { names: "workers", keep: |new, running| keep(&mut new.workers, &running.workers) },
    // It must change together with the balancer in front: flipped live, every connection from
    // the side not yet switched would be refused (or misread) until the other follows.
    RestartOnly {
        names: "proxy-protocol",
        keep: |new, running| keep(&mut new.proxy_protocol, &running.proxy_protocol),
    },
    RestartOnly {
        names: "admin/admin-token-file",
        keep: |new, running| {
            keep(&mut new.admin, &running.admin) | keep(&mut new.admin_token_file, &running.admin_token_file)
        },
    },
    RestartOnly {
        names: "cert/key (switching to or from the development certificate)",
        keep: |new, running| {
            let dev = |cert: &CertSource| matches!(cert, CertSource::DevSelfSigned { .. });
            let changed = dev(&new.cert) != dev(&running.cert) || dev(&new.cert) && new.cert != running.cert;
            if changed {
                new.cert = running.cert.clone();
            }
            changed
        },
    },
];

/// Puts `running` into `new`; `true` when they differed.
fn keep<T: PartialEq + Clone>(new: &mut T, running: &T) -> bool {
    let differed = new != running;
    if differed {
        *new = running.clone();
    }
    differed
}

/// `CERT_FILE:KEY_FILE`, as given to `--sni-cert`.
pub(crate) fn parse_cert_pair(s: &str) -> Result<CertPair, String> {
    match s.split_once(':') {
        Some((cert, key)) if !cert.is_empty() && !key.is_empty() => Ok(CertPair { cert: cert.into(), key: key.into() }),
        _ => Err(format!("`{s}`: expected CERT_FILE:KEY_FILE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_accepts_host_port_and_defaults_port_80() {
        assert_eq!(parse_upstream("http://127.0.0.1:8080").unwrap().to_string(), "http://127.0.0.1:8080");
        assert_eq!(parse_upstream("127.0.0.1:9000").unwrap().to_string(), "http://127.0.0.1:9000");
        assert_eq!(parse_upstream("http://localhost").unwrap().to_string(), "http://localhost:80");
        assert_eq!(parse_upstream("http://[::1]:81/").unwrap().to_string(), "http://[::1]:81");
    }

    #[test]
    fn upstream_refuses_what_it_cannot_honour() {
        for bad in ["https://x:1", "ftp://x", "http://x:1/app", "http://x:1/?q", "http://u:p@x:1", "::::", ""] {
            assert!(parse_upstream(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn upstream_kinds_parse_and_print_as_given() {
        for (given, shown) in [
            ("h2c://127.0.0.1:50051", "h2c://127.0.0.1:50051"),
            ("unix:///run/app/app.sock", "unix:///run/app/app.sock"),
            ("h2c+unix:///tmp/g.sock", "h2c+unix:///tmp/g.sock"),
            ("HTTP://127.0.0.1:1", "http://127.0.0.1:1"),
        ] {
            assert_eq!(parse_upstream(given).unwrap().to_string(), shown);
        }
        let unix = parse_upstream("unix:///run/app.sock").unwrap();
        assert_eq!(unix.address(), &UpstreamAddress::Unix("/run/app.sock".into()));
        assert_eq!((unix.protocol(), unix.host_header().as_bytes()), (UpstreamProtocol::Http1, &b"localhost"[..]));
        assert_eq!(parse_upstream("h2c://app").unwrap().protocol(), UpstreamProtocol::H2c);
    }

    #[test]
    fn a_wrong_scheme_or_socket_path_names_what_is_accepted() {
        let error = parse_upstream("grpc://x:1").unwrap_err();
        assert!(error.contains("h2c://HOST:PORT") && error.contains("unix:///PATH"), "{error}");
        let error = parse_upstream("unix://run/app.sock").unwrap_err();
        assert!(error.contains("absolute path"), "{error}");
        assert!(parse_upstream("unix:///run/").is_err());
        assert!(parse_upstream(&format!("unix:///{}", "a".repeat(120))).unwrap_err().contains("107 bytes"));
    }

    #[test]
    fn host_header_is_the_upstream_authority_with_its_port() {
        assert_eq!(parse_upstream("http://127.0.0.1:8080").unwrap().host_header(), "127.0.0.1:8080");
        assert_eq!(parse_upstream("http://app").unwrap().host_header(), "app:80");
    }
}
