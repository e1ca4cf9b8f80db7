//! The parsers the fuzz targets in `fuzz/` drive, behind thin functions of this one module, so
//! that the targets depend on nothing else of the crate's layout. What they return are plain
//! types of this module (addresses, byte strings, messages), not the crate's own: the
//! targets compare results, they do not need the internals.
//!
//! Not part of the program: nothing outside `fuzz/` calls this.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};

use crate::cli::file::{load_proxy_defaults, load_sync_sections, read_proxy_defaults};
use crate::cli::{parse_from, Command};
use crate::proxy::h1;
use crate::proxy_protocol;
use crate::sync::client::Reply;
use crate::sync::keyset::{self, KeySet};
use crate::sync::source::consul::{Answer, ConsulSource};
use crate::sync::source::etcd::{self, EtcdSource, WatchEnd};
use crate::sync::source::http::{HttpSource, Poll};
use crate::sync::source::{Backoff, Fetched, SourceError, SourceMsg};
use crate::sync::spec::{check_unique, default_history_dir, NotifySpec, Output, SourceSpec, SyncSpec, ValidateFormat};
use crate::sync::template;
use crate::sync::validate;
use crate::tls::{self, CertInfo, CertPair, ClientAuth, TlsContext, TlsInputs};

/// Why a parser refused its input: its error, rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub message: String,
    /// The input ended before the parser could decide (PROXY v2 only).
    pub truncated: bool,
}

impl Refused {
    fn from(error: impl std::fmt::Display) -> Refused {
        Refused { message: error.to_string(), truncated: false }
    }
}

/// A header field as the parser kept it.
pub type Field = (String, Vec<u8>);

fn fields_of(map: &HeaderMap) -> Vec<Field> {
    map.iter().map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec())).collect()
}

// --- The app's HTTP/1.1 responses: `proxy::h1` ---

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A response head as the proxy forwards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    pub keep_alive: bool,
    /// The forwarded fields, in the order the map yields them.
    pub fields: Vec<Field>,
}

/// One upstream connection's response-head parser, with what it remembers between heads.
#[derive(Debug, Default)]
pub struct ResponseReader(h1::HeadReader);

impl ResponseReader {
    /// `h1::parse_response`: the final head at the start of `buf`, consumed; `None`: more
    /// bytes needed.
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        method: &Method,
        max_head: usize,
    ) -> Result<Option<ResponseHead>, Refused> {
        let Some(head) = h1::parse_response(buf, method, max_head, &mut self.0).map_err(Refused::from)? else {
            return Ok(None);
        };
        let framing = match head.framing {
            h1::Framing::Empty => Framing::Empty,
            h1::Framing::Length(n) => Framing::Length(n),
            h1::Framing::Chunked => Framing::Chunked,
            h1::Framing::UntilClose => Framing::UntilClose,
        };
        Ok(Some(ResponseHead {
            status: head.status.as_u16(),
            framing,
            keep_alive: head.keep_alive,
            fields: fields_of(&head.headers),
        }))
    }
}

/// One step of decoding a chunked body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    More,
}

/// A chunked body's decoder (`h1::decode_chunked`).
#[derive(Debug)]
pub struct ChunkedDecoder(h1::ChunkState);

impl Default for ChunkedDecoder {
    fn default() -> ChunkedDecoder {
        ChunkedDecoder(h1::ChunkState::Size)
    }
}

impl ChunkedDecoder {
    /// Decodes what `buf` holds, consuming it.
    pub fn decode(&mut self, buf: &mut BytesMut, max_trailers: usize) -> Result<Decoded, Refused> {
        Ok(match h1::decode_chunked(&mut self.0, buf, max_trailers).map_err(Refused::from)? {
            h1::Decoded::Data(data) => Decoded::Data(data),
            h1::Decoded::Trailers(trailers) => Decoded::Trailers(trailers),
            h1::Decoded::End => Decoded::End,
            h1::Decoded::More => Decoded::More,
        })
    }
}

/// `h1::chunk_header`: the size line of a chunk of `len` bytes.
pub fn chunk_header(len: usize) -> Bytes {
    h1::chunk_header(len)
}

/// `h1::chunked_end`: the last chunk, trailers and the end of a chunked body.
pub fn chunked_end(trailers: Option<&HeaderMap>) -> Bytes {
    h1::chunked_end(trailers)
}

// --- The PROXY protocol header: `proxy_protocol` ---

/// What a PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    Proxied { source: SocketAddr, destination: SocketAddr },
    Local,
    Unknown,
}

pub const PROXY_V1_MAX_LEN: usize = proxy_protocol::V1_MAX_LEN;
pub const PROXY_V2_MAX_LEN: usize = proxy_protocol::V2_MAX_LEN;
pub const PROXY_V2_SIGNATURE: [u8; 12] = proxy_protocol::V2_SIGNATURE;

fn proxy_header(header: proxy_protocol::Header) -> ProxyHeader {
    match header {
        proxy_protocol::Header::Proxied { source, destination } => ProxyHeader::Proxied { source, destination },
        proxy_protocol::Header::Local => ProxyHeader::Local,
        proxy_protocol::Header::Unknown => ProxyHeader::Unknown,
    }
}

fn proxy_refused(error: proxy_protocol::ProxyHeaderError) -> Refused {
    let truncated = matches!(error, proxy_protocol::ProxyHeaderError::Truncated { .. });
    Refused { message: error.to_string(), truncated }
}

/// `proxy_protocol::parse_v1`: a whole v1 line, `PROXY ` to CRLF.
pub fn proxy_v1(line: &[u8]) -> Result<ProxyHeader, Refused> {
    proxy_protocol::parse_v1(line).map(proxy_header).map_err(proxy_refused)
}

/// `proxy_protocol::parse_v2`: a v2 header at the start of `bytes`, and its length.
pub fn proxy_v2(bytes: &[u8]) -> Result<(ProxyHeader, usize), Refused> {
    proxy_protocol::parse_v2(bytes).map(|(header, len)| (proxy_header(header), len)).map_err(proxy_refused)
}

// --- The sync role's sources: `sync::source` ---

/// What a source made of one reply or watch message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceStep {
    Value {
        content: Bytes,
        revision: String,
    },
    Unchanged,
    /// A message the source passes on as an error; following goes on.
    Error(String),
    /// A query failed: the source retries.
    Failed(String),
    /// etcd: the watch position was compacted; the key is read again.
    Compacted,
    /// etcd: a message with nothing to pass on.
    Ignored,
}

fn step(msg: SourceMsg) -> SourceStep {
    match msg {
        SourceMsg::Value(Fetched { content, revision }) => SourceStep::Value { content, revision },
        SourceMsg::Unchanged => SourceStep::Unchanged,
        SourceMsg::Error { message, .. } | SourceMsg::Refused(message) => SourceStep::Error(message),
    }
}

fn failed(error: SourceError) -> SourceStep {
    SourceStep::Failed(error.to_string())
}

/// The settings of a destination fed by `source`, as flags would give them.
fn spec(source: SourceSpec, max_size: u64) -> SyncSpec {
    let dest = std::path::PathBuf::from("/nonexistent/fuzz/config.json");
    SyncSpec {
        name: "fuzz".into(),
        source,
        history_dir: default_history_dir(&dest, "fuzz"),
        dest,
        notify: NotifySpec::default(),
        health_url: None,
        health_timeout: Duration::from_secs(1),
        kill_after: Duration::from_secs(1),
        validate: None,
        check_cmd: None,
        history_keep: 1,
        poll_interval: Duration::from_secs(1),
        min_quiet: Duration::ZERO,
        max_quiet: Duration::ZERO,
        max_size,
        source_timeout: Duration::from_secs(1),
        source_auth: Default::default(),
        retry_max: Duration::from_secs(1),
        require_source: false,
        max_apply_rate: None,
        apply_jitter: Duration::ZERO,
        fleet: None,
        output: Output::File,
    }
}

/// An etcd watch stream as `EtcdSource` reads it.
pub struct EtcdWatch {
    source: EtcdSource,
    revision: Option<i64>,
    backoff: Backoff,
}

impl EtcdWatch {
    /// Follows `key` (as the source URL names it), values up to `max_size` bytes.
    pub fn new(key: &str, max_size: u64) -> EtcdWatch {
        let base = "http://127.0.0.1:2379/".parse().expect("a valid URL");
        let spec = spec(SourceSpec::Etcd { base, key: key.into() }, max_size);
        let source = EtcdSource::new(&spec, &"http://127.0.0.1:2379/".parse().expect("a valid URL"), key);
        EtcdWatch { source, revision: None, backoff: Backoff::new(Duration::from_secs(1)) }
    }

    /// `etcd::next_line`: the next line of the stream that has anything on it, consumed.
    pub fn next_line(buffer: &mut BytesMut) -> Option<BytesMut> {
        etcd::next_line(buffer)
    }

    /// `EtcdSource::read_message` on one line (trimmed, as the watch loop passes it).
    pub fn message(&mut self, line: &[u8]) -> SourceStep {
        match self.source.read_message(line.trim_ascii(), &mut self.revision, &mut self.backoff) {
            Ok(Some(msg)) => step(msg),
            Ok(None) => SourceStep::Ignored,
            Err(WatchEnd::Compacted) => SourceStep::Compacted,
            Err(WatchEnd::HistoryChanged(why)) => SourceStep::Failed(why),
            Err(WatchEnd::Failed { message, .. }) => SourceStep::Failed(message),
            Err(WatchEnd::Shutdown) => SourceStep::Failed("shutdown".into()),
        }
    }

    /// The revision up to which every change has been seen.
    pub fn revision(&self) -> Option<i64> {
        self.revision
    }
}

/// Consul blocking queries as `ConsulSource` reads their replies.
pub struct ConsulQueries(ConsulSource);

impl ConsulQueries {
    pub fn new(max_size: u64) -> ConsulQueries {
        let base: http::Uri = "http://127.0.0.1:8500/".parse().expect("a valid URL");
        let wait = Duration::from_secs(60);
        let source = SourceSpec::Consul { base: base.clone(), key: "k".into(), wait, extra_query: String::new() };
        ConsulQueries(ConsulSource::new(&spec(source, max_size), &base, "k", wait, ""))
    }

    /// `ConsulSource::read_reply`: a reply to a blocking query, or to a first read.
    pub fn reply(&mut self, status: StatusCode, headers: HeaderMap, body: Bytes, blocking: bool) -> SourceStep {
        match self.0.read_reply(Reply { status, headers, body }, blocking) {
            Ok(Answer::Value { fetched }) => step(SourceMsg::Value(fetched)),
            Ok(Answer::Unchanged) => SourceStep::Unchanged,
            Err(e) => failed(e),
        }
    }
}

/// An HTTP source's polls as `HttpSource` reads their replies.
pub struct HttpPolls(HttpSource);

impl HttpPolls {
    pub fn new(max_size: u64) -> HttpPolls {
        let url: http::Uri = "http://127.0.0.1:8080/config.json".parse().expect("a valid URL");
        HttpPolls(HttpSource::new(&spec(SourceSpec::Http { url: url.clone() }, max_size), &url))
    }

    /// `HttpSource::read_reply`.
    pub fn reply(&mut self, status: StatusCode, headers: HeaderMap, body: Bytes) -> SourceStep {
        match self.0.read_reply(Reply { status, headers, body }) {
            Ok(Poll::Changed(fetched)) => step(SourceMsg::Value(fetched)),
            Ok(Poll::NotModified) => SourceStep::Unchanged,
            Err(e) => failed(e),
        }
    }
}

/// The formats `--validate` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    Json,
    Yaml,
    Toml,
}

/// `validate::check_content`: what the worker checks of a value before writing it.
pub fn check_content(content: &[u8], format: Option<ContentFormat>) -> Result<(), Refused> {
    let format = format.map(|f| match f {
        ContentFormat::Json => ValidateFormat::Json,
        ContentFormat::Yaml => ValidateFormat::Yaml,
        ContentFormat::Toml => ValidateFormat::Toml,
    });
    validate::check_content(content, format).map_err(Refused::from)
}

// --- The TOML config file: `config::file`, `cli`, `sync::spec` ---

/// What `cli::file::read_proxy_defaults` found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// Each `[proxy]` key that names an option, with its values.
    pub defaults: Vec<(String, Vec<String>)>,
    pub problems: Vec<String>,
    pub sync_tables: usize,
}

/// `cli::file::read_proxy_defaults`: every problem of the file collected (`sidecar check`).
pub fn read_config_file(path: &Path) -> Result<ConfigFile, Refused> {
    let found = read_proxy_defaults(path).map_err(Refused::from)?;
    Ok(ConfigFile {
        defaults: found.defaults.into_iter().map(|d| (d.id, d.values)).collect(),
        problems: found.problems.iter().map(ToString::to_string).collect(),
        sync_tables: found.sync_tables,
    })
}

/// `cli::file::load_proxy_defaults`: the first problem, as the proxy stops at it.
pub fn load_config_file(path: &Path) -> Result<usize, Refused> {
    load_proxy_defaults(path).map(|d| d.len()).map_err(Refused::from)
}

/// `cli::parse_from` on `argv`, then the proxy's configuration from it (`ProxyConfig`): its
/// fingerprint, or why the command line with its config file is refused.
pub fn proxy_config(argv: &[&std::ffi::OsStr]) -> Result<String, Refused> {
    let cli = parse_from(argv).map_err(Refused::from)?;
    match cli.command {
        Command::Proxy(args) | Command::Check(args) => Ok(args.to_config().fingerprint()),
        _ => Err(Refused::from("not a proxy command line")),
    }
}

/// The `[[sync]]` tables of a file as `sidecar proxy` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncTables {
    /// Each table made a `SyncSpec`: its source as logs show it, or why not.
    pub specs: Vec<Result<String, Refused>>,
    /// Whether two of them clash (one name, one destination), when all were made.
    pub unique: Result<(), Refused>,
}

/// `cli::file::load_sync_sections`, then `SyncArgs::to_spec` for each table and
/// `check_unique` over them.
pub fn sync_tables(path: &Path) -> Result<SyncTables, Refused> {
    let sections = load_sync_sections(path).map_err(Refused::from)?;
    let specs: Vec<_> = sections.iter().map(|table| table.to_spec()).collect();
    let made: Vec<SyncSpec> = specs.iter().filter_map(|spec| spec.as_ref().ok().cloned()).collect();
    let unique = match made.len() == specs.len() {
        true => check_unique(&made).map_err(Refused::from),
        false => Err(Refused::from("a table was refused")),
    };
    let specs = specs.into_iter().map(|spec| spec.map(|s| s.source.to_string()).map_err(Refused::from)).collect();
    Ok(SyncTables { specs, unique })
}

// --- Certificate and key files: `tls` ---

/// What a person is told about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    pub subject: String,
    pub serial: String,
    pub not_after: i64,
    pub dns_names: Vec<String>,
}

fn summary(info: &CertInfo) -> CertSummary {
    CertSummary {
        subject: info.subject.clone(),
        serial: info.serial.clone(),
        not_after: info.not_after.unix_timestamp(),
        dns_names: info.dns_names.clone(),
    }
}

/// What `sidecar check` reports of the TLS files.
#[derive(Debug)]
pub struct TlsCheck {
    pub pair: Result<CertSummary, Refused>,
    /// The client CA bundle's certificates, when one was given.
    pub client_ca: Option<Result<Vec<CertSummary>, Refused>>,
}

/// The TLS context certificates are loaded with (made once: it holds a ticket key).
pub struct Tls(TlsContext);

impl Tls {
    pub fn new() -> Result<Tls, Refused> {
        TlsContext::new().map(Tls).map_err(Refused::from)
    }

    /// `tls::parse_cert_pair`: a PEM chain and key, validated.
    pub fn cert_pair(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<CertSummary, Refused> {
        let (cert, key) = (Path::new("cert.pem"), Path::new("key.pem"));
        tls::parse_cert_pair(self.0.provider(), cert, cert_pem, key, key_pem)
            .map(|loaded| summary(&loaded.info))
            .map_err(Refused::from)
    }

    /// `TlsContext::check` on files: the pair's result, and the client CA bundle's.
    pub fn check(&self, cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsCheck {
        let checked = self.0.check(&inputs(cert, key, client_ca));
        TlsCheck {
            pair: checked.default.map(|loaded| summary(&loaded.info)).map_err(Refused::from),
            client_ca: checked
                .client_ca
                .map(|ca| ca.map(|infos| infos.iter().map(summary).collect()).map_err(Refused::from)),
        }
    }

    /// `TlsContext::build` on files: the served certificate's summary.
    pub fn build(&self, cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<CertSummary, Refused> {
        self.0
            .build(&inputs(cert, key, client_ca))
            .map(|snapshot| summary(&snapshot.default.info))
            .map_err(Refused::from)
    }
}

/// How many certificates the PEM reader the TLS code uses finds in `pem`.
pub fn pem_certificates(pem: &[u8]) -> usize {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).count()
}

fn inputs(cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsInputs {
    TlsInputs {
        default: CertPair { cert: cert.to_owned(), key: key.to_owned() },
        sni: Vec::new(),
        client_ca: client_ca.map(Path::to_owned),
        client_auth: ClientAuth::Require,
    }
}

// --- Key prefixes: key names as paths, sets, templates ---

/// The relative path the key `name` gets below a `--dest DIR/`, or why it cannot.
pub fn key_file_path(name: &str) -> Result<PathBuf, Refused> {
    keyset::key_path(name).map_err(Refused::from)
}

fn key_set(pairs: &[(String, Vec<u8>)]) -> KeySet {
    KeySet { keys: pairs.iter().map(|(k, v)| (k.clone(), Bytes::copy_from_slice(v))).collect() }
}

/// Every key's path of the set `pairs` (a later pair with the same name wins), or why the set
/// cannot become a directory.
pub fn key_set_paths(pairs: &[(String, Vec<u8>)]) -> Result<Vec<PathBuf>, Refused> {
    let set = key_set(pairs);
    set.paths().map(|paths| paths.into_iter().map(|(path, _)| path).collect()).map_err(Refused::from)
}

/// The set's serialisation, as history keeps it.
pub fn encode_key_set(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    key_set(pairs).encode()
}

/// A serialised set read back, sorted by key.
pub fn decode_key_set(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, Refused> {
    KeySet::decode(data).map(|set| set.keys.into_iter().map(|(k, v)| (k, v.to_vec())).collect()).map_err(Refused::from)
}

/// A template render that failed: the template's name, the line, the message as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRefused {
    pub template: String,
    pub line: usize,
    pub message: String,
}

/// `--template`: `source` (the template file `name`) rendered with the keys `pairs`.
pub fn render_template(name: &str, source: &str, pairs: &[(String, Vec<u8>)]) -> Result<String, TemplateRefused> {
    template::render(name, source, &key_set(pairs)).map_err(|e| TemplateRefused {
        message: e.to_string(),
        template: e.template,
        line: e.line,
    })
}
