//! TLS: loading and validating certificate files, and the rustls server configuration.
//!
//! The live `ServerConfig` sits behind an `ArcSwap`: each handshake loads the current one once,
//! and a reload swaps a fully validated replacement in a single store.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// ALPN protocols offered, in server preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("certificate file {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("certificate file {} is not valid PEM: {reason}", path.display())]
    BadCertificatePem { path: PathBuf, reason: String },
    #[error("certificate in {} cannot be parsed as X.509: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("key file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("key file {} holds a key of an unsupported type: {reason}", path.display())]
    UnsupportedKey { path: PathBuf, reason: String },
    #[error("key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {} expired at {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("certificate {} is not valid before {not_before}", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// What a person wants to know about the certificate being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub serial: String,
    pub not_after: OffsetDateTime,
    pub dns_names: Vec<String>,
}

impl fmt::Display for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subject \"{}\", serial {}, expires {}", self.subject, self.serial, format_time(self.not_after))
    }
}

fn format_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// A certificate chain and its key, validated: they parse, match, and are within validity.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub cert_path: PathBuf,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

/// Loads and validates a PEM chain and key. Refuses mismatched keys and expired certificates,
/// so a bad file can never replace a good one.
pub fn load_cert_pair(provider: &CryptoProvider, cert_path: &Path, key_path: &Path) -> Result<LoadedCert, TlsError> {
    let cert_pem = read("certificate file", cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificatePem { path: cert_path.to_owned(), reason: e.to_string() })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: cert_path.to_owned() });
    };
    let info = cert_info(leaf).map_err(|reason| TlsError::BadCertificate { path: cert_path.to_owned(), reason })?;
    check_validity(leaf, cert_path)?;

    let key_pem = read("key file", key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::BadKey { path: key_path.to_owned(), reason: e.to_string() })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::UnsupportedKey { path: key_path.to_owned(), reason: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // `Unknown`: the key type cannot report its public key; the handshake would still fail
        // loudly on a mismatch, and refusing every such key would be worse.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err(TlsError::KeyMismatch { cert: cert_path.to_owned(), key: key_path.to_owned() }),
    }
    Ok(LoadedCert { key: Arc::new(certified), info, cert_path: cert_path.to_owned() })
}

fn check_validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<(), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TlsError::BadCertificate { path: path.to_owned(), reason: e.to_string() })?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(TlsError::Expired { path: path.to_owned(), not_after: format_time(validity.not_after.to_datetime()) });
    }
    if now < validity.not_before {
        return Err(TlsError::NotYetValid { path: path.to_owned(), not_before: format_time(validity.not_before.to_datetime()) });
    }
    Ok(())
}

pub fn cert_info(leaf: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n) => dns_names.push((*n).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                        dns_names.push(std::net::IpAddr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                        dns_names.push(std::net::IpAddr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string(),
        not_after: cert.validity().not_after.to_datetime(),
        dns_names,
    })
}

/// Serves one certificate to every client, whatever name it asks for.
#[derive(Debug)]
struct SingleCert(Arc<CertifiedKey>);

impl ResolvesServerCert for SingleCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// State that outlives any one `ServerConfig`, so sessions resume across certificate reloads.
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext").finish_non_exhaustive()
    }
}

impl TlsContext {
    pub fn new() -> Result<TlsContext, TlsError> {
        Ok(TlsContext {
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            sessions: ServerSessionMemoryCache::new(16 * 1024),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
        })
    }

    pub fn provider(&self) -> &CryptoProvider {
        &self.provider
    }

    /// TLS 1.2 and 1.3 only, ALPN h2 and http/1.1, resumption by ticket and by session id.
    pub fn server_config(&self, cert: &LoadedCert) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCert(cert.key.clone())));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        config.session_storage = self.sessions.clone();
        config.ticketer = self.ticketer.clone();
        Ok(Arc::new(config))
    }
}

/// The live TLS state read by every handshake.
pub struct TlsState {
    config: ArcSwap<ServerConfig>,
    cert: ArcSwap<LoadedCert>,
}

impl TlsState {
    pub fn new(context: &TlsContext, cert: LoadedCert) -> Result<TlsState, TlsError> {
        let config = context.server_config(&cert)?;
        Ok(TlsState { config: ArcSwap::new(config), cert: ArcSwap::from_pointee(cert) })
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    pub fn cert(&self) -> Arc<LoadedCert> {
        self.cert.load_full()
    }

    /// Installs an already validated certificate; handshakes from now on use it.
    pub fn replace(&self, context: &TlsContext, cert: LoadedCert) -> Result<(), TlsError> {
        let config = context.server_config(&cert)?;
        self.config.store(config);
        self.cert.store(Arc::new(cert));
        Ok(())
    }
}
