//! A small HTTP/1.1 client over hyper's connection API, for sources, reload URLs and health
//! checks: one kept-alive connection, TLS for `https`, a deadline on every exchange, and a
//! size cap on every body it buffers. Streaming responses (the etcd watch) get a connection of
//! their own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::sys::human_duration;
use bytes::{Bytes, BytesMut};
use http::header::HOST;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::spec::SourceAuth;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("bad URL {url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot connect to {peer}: {source}")]
    Connect { peer: String, source: std::io::Error },
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls { peer: String, source: std::io::Error },
    #[error("{peer} did not answer within {}", human_duration(*timeout))]
    Timeout { peer: String, timeout: Duration },
    #[error("HTTP exchange with {peer} failed: {}{}", with_causes(source), tls_hint(source, *client_cert))]
    Http { peer: String, source: hyper::Error, client_cert: bool },
    #[error("response from {peer} is larger than {limit} bytes")]
    TooLarge { peer: String, limit: u64 },
    #[error("cannot read CA bundle {}: {message}", path.display())]
    Ca { path: PathBuf, message: String },
    // Named by its files: it may be the source's (--source-cert) or the fleet's (--fleet-cert).
    #[error("cannot use client certificate {} with key {}: {message}", cert.display(), key.display())]
    ClientCert { cert: PathBuf, key: PathBuf, message: String },
    // Never the content: it is a secret.
    #[error("{option} {}: {message}", path.display())]
    Secret { option: &'static str, path: PathBuf, message: String },
}

/// hyper's message and what caused it: "connection error" alone does not say that the server
/// refused the client certificate.
fn with_causes(error: &hyper::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// A TLS alert from the server right after the handshake is how TLS 1.3 servers refuse a
/// client certificate.
fn tls_hint(error: &hyper::Error, client_cert: bool) -> &'static str {
    let text = with_causes(error);
    if !text.contains("alert") {
        ""
    } else if client_cert {
        " (the server refused the TLS connection: is the client certificate (--source-cert, --fleet-cert) signed by a CA it trusts?)"
    } else {
        " (the server refused the TLS connection: does it want a client certificate? give --source-cert and --source-key, or --fleet-cert and --fleet-key for the fleet's etcd)"
    }
}

/// A secret read from a file: never shown, not even by `Debug`.
#[derive(Clone)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// As a header value marked sensitive (hpack and hyper's Debug leave it out).
    pub(crate) fn header(&self, prefix: &str) -> HeaderValue {
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", self.0))
            .expect("read_secret lets through only characters valid in a header");
        value.set_sensitive(true);
        value
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Reads a password or token file, as mounted from a Kubernetes Secret. It is read on every
/// use rather than watched: opening the path follows the `..data` symlink of the moment, so a
/// rotation is seen by the next request with no event to miss, and a read of a small file is
/// nothing next to the request it goes with. A final line break (`echo token > file`) is not
/// part of the secret.
pub(crate) fn read_secret(path: &Path, option: &'static str) -> Result<Secret, ClientError> {
    let fail = |message: String| ClientError::Secret { option, path: path.to_owned(), message };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| fail("is not UTF-8 text".into()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(fail("is empty".into()));
    }
    if text.chars().any(|c| c.is_control() || !c.is_ascii()) {
        return Err(fail("holds a line break, a control character or non-ASCII text (not shown)".into()));
    }
    Ok(Secret(text.to_owned()))
}

/// What `sidecar check` can tell about a source's credentials without contacting it: each file
/// is readable and usable (the certificate and key load and match). Secrets are not shown.
pub(crate) fn check_source_auth(auth: &SourceAuth) -> Vec<ClientError> {
    check_auth_files(auth, "--source-password-file")
}

/// The same for the fleet's etcd (`--fleet-*`, or the etcd source's that it reuses).
pub(crate) fn check_fleet_auth(auth: &SourceAuth) -> Vec<ClientError> {
    check_auth_files(auth, "--fleet-password-file")
}

fn check_auth_files(auth: &SourceAuth, password_option: &'static str) -> Vec<ClientError> {
    let mut problems = Vec::new();
    for (path, option) in [(&auth.password_file, password_option), (&auth.token_file, "--source-token-file")] {
        if let Some(path) = path {
            if let Err(e) = read_secret(path, option) {
                problems.push(e);
            }
        }
    }
    if auth.cert.is_some() || auth.ca.is_some() {
        if let Err(e) = HttpClient::for_source(auth).tls_config() {
            problems.push(e);
        }
    }
    problems
}

/// Device, inode, modification time and length: a change of any means a new file.
type FileStamp = (u64, u64, std::time::SystemTime, u64);

/// What identifies a file's content without reading it.
fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino(), meta.modified().ok()?, meta.len()))
}

impl ClientError {
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }
}

/// A buffered response.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

pub(crate) struct HttpClient {
    /// The TLS configuration, with the stamps of the files it was made from.
    tls: Option<(Arc<rustls::ClientConfig>, Vec<Option<FileStamp>>)>,
    ca_file: Option<PathBuf>,
    /// `--source-cert` and `--source-key`.
    client_cert: Option<(PathBuf, PathBuf)>,
    idle: Option<(String, SendRequest<Full<Bytes>>)>,
}

/// The system CA bundles tried, in order, for https when no CA file is given.
const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

impl HttpClient {
    /// `ca_file` is read the first time an https URL is used.
    pub(crate) fn new(ca_file: Option<&Path>) -> HttpClient {
        HttpClient { tls: None, ca_file: ca_file.map(Path::to_owned), client_cert: None, idle: None }
    }

    /// A client for the source: its CA and, when given, its client certificate.
    pub(crate) fn for_source(auth: &SourceAuth) -> HttpClient {
        let client_cert = match (&auth.cert, &auth.key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            _ => None,
        };
        HttpClient { client_cert, ..HttpClient::new(auth.ca.as_deref()) }
    }

    fn tls_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.ca_file.iter().cloned().collect();
        if let Some((cert, key)) = &self.client_cert {
            files.extend([cert.clone(), key.clone()]);
        }
        files
    }

    /// Made on the first https connection and again when the CA, certificate or key file has
    /// changed (a renewed client certificate is used by the next connection).
    fn tls_config(&mut self) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let stamps: Vec<_> = self.tls_files().iter().map(|p| file_stamp(p)).collect();
        if let Some((config, made_from)) = &self.tls {
            if *made_from == stamps {
                return Ok(config.clone());
            }
        }
        let path = match &self.ca_file {
            Some(path) => path.clone(),
            None => SYSTEM_BUNDLES.iter().map(PathBuf::from).find(|p| p.exists()).ok_or_else(|| ClientError::Ca {
                path: PathBuf::from(SYSTEM_BUNDLES[0]),
                message: "no system CA bundle found; give --source-ca".into(),
            })?,
        };
        let ca_error = |message: String| ClientError::Ca { path: path.clone(), message };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&path).map_err(|e| ca_error(e.to_string()))? {
            let cert = cert.map_err(|e| ca_error(e.to_string()))?;
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ca_error("holds no certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_error(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let fail = |message: String| ClientError::ClientCert { cert: cert.clone(), key: key.clone(), message };
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| fail(format!("certificate: {e}")))?;
                if chain.is_empty() {
                    return Err(fail("the certificate file holds no certificate".into()));
                }
                let private = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(format!("key: {e}")))?;
                builder.with_client_auth_cert(chain, private).map_err(|e| fail(e.to_string()))?
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        // Stamped before reading would miss a change made while reading; after is close enough
        // for files that change once in weeks, and the next change is seen either way.
        self.tls = Some((config.clone(), stamps));
        Ok(config)
    }

    async fn connect(&mut self, uri: &Uri) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let peer = peer_of(uri);
        let authority =
            uri.authority().ok_or_else(|| ClientError::Url { url: uri.to_string(), message: "no host".into() })?;
        let https = uri.scheme_str() == Some("https");
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| ClientError::Connect { peer: peer.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let client_cert = self.client_cert.is_some();
        let http = |source| ClientError::Http { peer: peer.clone(), source, client_cert };
        if https {
            let config = self.tls_config()?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| ClientError::Url { url: uri.to_string(), message: e.to_string() })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| ClientError::Tls { peer: peer.clone(), source })?;
            let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(http)?;
            tokio::spawn(connection);
            Ok(send)
        } else {
            let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(http)?;
            tokio::spawn(connection);
            Ok(send)
        }
    }

    /// Sends `request` (absolute URI) and returns the response head; the body is left to read.
    /// The connection is not pooled: for streams.
    pub(crate) async fn open_stream(
        &mut self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        let uri = request.uri().clone();
        let peer = peer_of(&uri);
        let client_cert = self.client_cert.is_some();
        let exchange = async {
            let mut send = self.connect(&uri).await?;
            send.send_request(origin_form(request)?).await.map_err(|source| ClientError::Http {
                peer: peer.clone(),
                source,
                client_cert,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout { peer: peer.clone(), timeout })?
    }

    /// Sends `request` and reads the whole response, all within `timeout`; a body over
    /// `max_body` bytes is an error (and is not read further).
    pub(crate) async fn fetch(
        &mut self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
        max_body: u64,
    ) -> Result<Reply, ClientError> {
        let uri = request.uri().clone();
        let peer = peer_of(&uri);
        let client_cert = self.client_cert.is_some();
        let key =
            format!("{}://{}", uri.scheme_str().unwrap_or("http"), uri.authority().map(|a| a.as_str()).unwrap_or(""));
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        let build = || {
            let mut request = Request::new(Full::new(body.clone()));
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = parts.uri.clone();
            *request.headers_mut() = parts.headers.clone();
            origin_form(request)
        };
        let exchange = async {
            // A kept-alive connection may have been closed by the server meanwhile: a failure
            // on it is retried once on a fresh one (these requests are idempotent reads, or a
            // reload POST the server never received).
            let mut reused = false;
            let idle = match self.idle.take() {
                Some((k, mut send)) if k == key => send.ready().await.is_ok().then_some(send),
                _ => None,
            };
            let mut send = match idle {
                Some(send) => {
                    reused = true;
                    send
                }
                None => self.connect(&uri).await?,
            };
            let response = match send.send_request(build()?).await {
                Ok(response) => response,
                Err(e) if reused && (e.is_closed() || e.is_incomplete_message() || e.is_canceled()) => {
                    send = self.connect(&uri).await?;
                    send.send_request(build()?).await.map_err(|source| ClientError::Http {
                        peer: peer.clone(),
                        source,
                        client_cert,
                    })?
                }
                Err(source) => return Err(ClientError::Http { peer: peer.clone(), source, client_cert }),
            };
            let (head, body) = response.into_parts();
            let body = read_limited(body, max_body, &peer).await?;
            self.idle = Some((key.clone(), send));
            Ok(Reply { status: head.status, headers: head.headers, body })
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            self.idle = None;
            ClientError::Timeout { peer: peer.clone(), timeout }
        })?
    }
}

/// Reads a body up to `limit` bytes.
pub(crate) async fn read_limited(mut body: Incoming, limit: u64, peer: &str) -> Result<Bytes, ClientError> {
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|source| ClientError::Http { peer: peer.to_owned(), source, client_cert: false })?;
        if let Some(data) = frame.data_ref() {
            if buffer.len() as u64 + data.len() as u64 > limit {
                return Err(ClientError::TooLarge { peer: peer.to_owned(), limit });
            }
            buffer.extend_from_slice(data);
        }
    }
    Ok(buffer.freeze())
}

/// Moves the authority into `Host` and leaves the path: HTTP/1.1 origin-form.
fn origin_form(mut request: Request<Full<Bytes>>) -> Result<Request<Full<Bytes>>, ClientError> {
    let uri = request.uri().clone();
    let authority =
        uri.authority().ok_or_else(|| ClientError::Url { url: uri.to_string(), message: "no host".into() })?;
    let host = HeaderValue::from_str(authority.as_str().rsplit('@').next().unwrap_or(authority.as_str()))
        .map_err(|e| ClientError::Url { url: uri.to_string(), message: e.to_string() })?;
    request.headers_mut().insert(HOST, host);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    *request.uri_mut() = path
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::Url { url: uri.to_string(), message: e.to_string() })?;
    Ok(request)
}

/// host:port for messages, never credentials.
pub(crate) fn peer_of(uri: &Uri) -> String {
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("?");
    authority.rsplit('@').next().unwrap_or(authority).to_owned()
}

/// A request with a body, ready for [`HttpClient::fetch`].
pub(crate) fn request(method: http::Method, uri: &Uri, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body.into()));
    *request.method_mut() = method;
    *request.uri_mut() = uri.clone();
    request
}
