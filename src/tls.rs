//! TLS: loading and validating certificate files, and the rustls server configuration.
//!
//! The live state ([`TlsSnapshot`]: the `ServerConfig` with its SNI map and client verifier)
//! sits behind an `ArcSwap`: each handshake loads the current one once, and a reload swaps a
//! fully validated replacement in a single store.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls::{SupportedCipherSuite, Tls13CipherSuite};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::sys::lock;

/// ALPN protocols offered, in server preference order.
pub(crate) const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
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
    #[error(
        "key file {} holds an encrypted (passphrase-protected) private key; the proxy needs it \
         unencrypted: `openssl pkey -in {} -out PLAIN.key`, then keep PLAIN.key mode 0600",
        path.display(),
        path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error("key file {} holds a key of an unsupported type: {reason}", path.display())]
    UnsupportedKey { path: PathBuf, reason: String },
    #[error("key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {} expired at {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("certificate {} is not valid before {not_before}", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("client CA file {} is unusable: {reason}", path.display())]
    BadClientCa { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// What a person wants to know about the certificate being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    pub(crate) subject: String,
    pub(crate) serial: String,
    pub(crate) not_after: OffsetDateTime,
    pub(crate) dns_names: Vec<String>,
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
pub(crate) struct LoadedCert {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) info: CertInfo,
    pub(crate) cert_path: PathBuf,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

/// Loads and validates a PEM chain and key from disk.
pub(crate) fn load_cert_pair(
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<LoadedCert, TlsError> {
    let cert_pem = read("certificate file", cert_path)?;
    let key_pem = read("key file", key_path)?;
    parse_cert_pair(provider, cert_path, &cert_pem, key_path, &key_pem)
}

/// Validates a PEM chain and key already read. Refuses mismatched keys and certificates
/// outside their validity, so a bad file can never replace a good one.
pub(crate) fn parse_cert_pair(
    provider: &CryptoProvider,
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<LoadedCert, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificatePem { path: cert_path.to_owned(), reason: e.to_string() })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: cert_path.to_owned() });
    };
    let info = cert_info(leaf).map_err(|reason| TlsError::BadCertificate { path: cert_path.to_owned(), reason })?;
    check_validity(leaf, cert_path)?;

    if is_encrypted_key(key_pem) {
        return Err(TlsError::EncryptedKey { path: key_path.to_owned() });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
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

/// PKCS#8 `ENCRYPTED PRIVATE KEY`, or the legacy OpenSSL form (`Proc-Type: 4,ENCRYPTED` inside
/// an `RSA`/`EC PRIVATE KEY` block), which the PEM reader would otherwise call "no private key".
fn is_encrypted_key(pem: &[u8]) -> bool {
    let contains = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    contains(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || contains(b"Proc-Type: 4,ENCRYPTED")
}

fn check_validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<(), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TlsError::BadCertificate { path: path.to_owned(), reason: e.to_string() })?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: format_time(validity.not_after.to_datetime()),
        });
    }
    if now < validity.not_before {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: format_time(validity.not_before.to_datetime()),
        });
    }
    Ok(())
}

pub(crate) fn cert_info(leaf: &CertificateDer<'_>) -> Result<CertInfo, String> {
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

/// Picks the certificate for a handshake: exact server name, then `*.parent` wildcard, then
/// the default (also for clients that send no SNI).
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn new(default: &LoadedCert, named: &[LoadedCert]) -> SniResolver {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for cert in named {
            for name in &cert.info.dns_names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()).or_insert_with(|| cert.key.clone()),
                    None => exact.entry(name).or_insert_with(|| cert.key.clone()),
                };
            }
        }
        SniResolver { exact, wildcard, default: default.key.clone() }
    }

    fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name else { return self.default.clone() };
        // rustls hands over SNI already lower-cased and validated as a DNS name.
        if let Some(cert) = self.exact.get(name) {
            return cert.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(cert) = self.wildcard.get(parent) {
                return cert.clone();
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// Whether clients must present a certificate signed by `--client-ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ClientAuth {
    /// Handshakes without a valid client certificate fail.
    Require,
    /// A client certificate is asked for and verified if sent, but not required.
    Request,
}

/// A certificate file and its key file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertPair {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// Every file the TLS state is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsInputs {
    pub(crate) default: CertPair,
    /// Extra certificates, each served for the DNS names in its own subjectAltName.
    pub(crate) sni: Vec<CertPair>,
    pub(crate) client_ca: Option<PathBuf>,
    pub(crate) client_auth: ClientAuth,
}

impl TlsInputs {
    /// The files a watcher should follow.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.default.cert.clone(), self.default.key.clone()];
        for pair in &self.sni {
            files.push(pair.cert.clone());
            files.push(pair.key.clone());
        }
        files.extend(self.client_ca.clone());
        files
    }
}

/// A complete, validated TLS state, ready to be swapped in.
pub(crate) struct TlsSnapshot {
    pub(crate) server_config: Arc<ServerConfig>,
    pub(crate) default: LoadedCert,
    pub(crate) sni: Vec<LoadedCert>,
    pub(crate) client_ca: Option<PathBuf>,
    /// Hash of every input file's path and bytes: equal fingerprints mean nothing changed.
    pub(crate) fingerprint: u64,
}

impl TlsSnapshot {
    pub(crate) fn certs(&self) -> impl Iterator<Item = &LoadedCert> {
        std::iter::once(&self.default).chain(self.sni.iter())
    }
}

/// Resumption state shared by successive `ServerConfig`s, so that sessions survive a
/// certificate reload.
#[derive(Clone)]
struct Resumption {
    /// Hash of the client-auth settings the sessions were made under.
    client_auth: u64,
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
}

impl Resumption {
    fn new(client_auth: u64) -> Result<Resumption, TlsError> {
        Ok(Resumption {
            client_auth,
            sessions: ServerSessionMemoryCache::new(16 * 1024),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
        })
    }
}

/// State that outlives any one `ServerConfig`.
pub(crate) struct TlsContext {
    provider: Arc<CryptoProvider>,
    resumption: std::sync::Mutex<Resumption>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext").finish_non_exhaustive()
    }
}

/// aws-lc-rs with the server's cipher-suite order: AES-128-GCM first, as Go's crypto/tls does
/// on hardware with AES instructions. OpenSSL clients list AES-256-GCM-SHA384 first, and its
/// SHA-384 key schedule was a sixth of the CPU of a full handshake (SHA-256 has hardware
/// instructions, SHA-512 does not); AES-128 also seals bulk data faster. Every suite is still
/// AEAD with forward secrecy; clients that offer only ChaCha20 still get it.
fn provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    static AES_128_GCM: LazyLock<SupportedCipherSuite> = LazyLock::new(|| hmac_key_schedule(TLS13_AES_128_GCM_SHA256));
    static CHACHA20: LazyLock<SupportedCipherSuite> =
        LazyLock::new(|| hmac_key_schedule(TLS13_CHACHA20_POLY1305_SHA256));
    CryptoProvider {
        cipher_suites: vec![
            *AES_128_GCM,
            TLS13_AES_256_GCM_SHA384,
            *CHACHA20,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

/// `suite` (a TLS 1.3 SHA-256 suite) with its key schedule computed by rustls' HKDF over
/// HMAC (RFC 5869) instead of aws-lc's one-shot HKDF, which re-runs the extract step and the
/// HMAC key set-up for every secret it expands. Same algorithm, same bytes: under callgrind the
/// one-shot HKDF was 31% of the instructions of a full handshake.
fn hmac_key_schedule(suite: SupportedCipherSuite) -> SupportedCipherSuite {
    static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&AwsLcHmac(aws_lc_rs::hmac::HMAC_SHA256));
    let SupportedCipherSuite::Tls13(base) = suite else { return suite };
    SupportedCipherSuite::Tls13(Box::leak(Box::new(Tls13CipherSuite {
        common: rustls::CipherSuiteCommon {
            suite: base.common.suite,
            hash_provider: base.common.hash_provider,
            confidentiality_limit: base.common.confidentiality_limit,
        },
        hkdf_provider: &HKDF_SHA256,
        aead_alg: base.aead_alg,
        quic: base.quic,
    })))
}

/// aws-lc-rs HMAC for rustls: a key keeps its padded state, so each use costs only the data.
struct AwsLcHmac(aws_lc_rs::hmac::Algorithm);

impl rustls::crypto::hmac::Hmac for AwsLcHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn rustls::crypto::hmac::Key> {
        Box::new(AwsLcHmacKey(aws_lc_rs::hmac::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }
}

struct AwsLcHmacKey(aws_lc_rs::hmac::Key);

impl rustls::crypto::hmac::Key for AwsLcHmacKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> rustls::crypto::hmac::Tag {
        let mut context = aws_lc_rs::hmac::Context::with_key(&self.0);
        context.update(first);
        for part in middle {
            context.update(part);
        }
        context.update(last);
        rustls::crypto::hmac::Tag::new(context.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

impl TlsContext {
    pub(crate) fn new() -> Result<TlsContext, TlsError> {
        Ok(TlsContext { provider: Arc::new(provider()), resumption: std::sync::Mutex::new(Resumption::new(0)?) })
    }

    pub(crate) fn provider(&self) -> &CryptoProvider {
        &self.provider
    }

    /// Reads every input file once, validates everything, and builds the `ServerConfig`:
    /// TLS 1.2 and 1.3 only, ALPN h2 and http/1.1, resumption by ticket and by session id.
    pub(crate) fn build(&self, inputs: &TlsInputs) -> Result<TlsSnapshot, TlsError> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let mut load = |pair: &CertPair| -> Result<LoadedCert, TlsError> {
            let cert_pem = read("certificate file", &pair.cert)?;
            let key_pem = read("key file", &pair.key)?;
            (&pair.cert, &cert_pem, &pair.key, &key_pem).hash(&mut hasher);
            parse_cert_pair(&self.provider, &pair.cert, &cert_pem, &pair.key, &key_pem)
        };
        let default = load(&inputs.default)?;
        let sni = inputs.sni.iter().map(&mut load).collect::<Result<Vec<_>, _>>()?;

        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let mut client_auth_hasher = std::collections::hash_map::DefaultHasher::new();
        let builder = match &inputs.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let pem = read("client CA file", path)?;
                (path, &pem, inputs.client_auth).hash(&mut hasher);
                (&pem, inputs.client_auth).hash(&mut client_auth_hasher);
                builder.with_client_cert_verifier(self.client_verifier(path, &pem, inputs.client_auth)?)
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(SniResolver::new(&default, &sni)));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        config.ignore_client_order = true;
        // One TLS 1.3 ticket per handshake, as Go's crypto/tls sends: a resumed handshake gets a
        // fresh one, so a client reconnecting one connection at a time always has one. rustls'
        // default of two spends a second ticket's key derivation and sealing (about 2.5% of a
        // full handshake) on clients that open parallel connections from one session.
        config.send_tls13_tickets = 1;
        let resumption = self.resumption_for(client_auth_hasher.finish())?;
        config.session_storage = resumption.sessions;
        config.ticketer = resumption.ticketer;
        Ok(TlsSnapshot {
            server_config: Arc::new(config),
            default,
            sni,
            client_ca: inputs.client_ca.clone(),
            fingerprint: hasher.finish(),
        })
    }

    /// What `build` validates, with every problem collected instead of the first returned, and
    /// nothing built: for `sidecar check`, which reports all that is wrong in one run. Each
    /// pair goes through the same `load_cert_pair` (parse, key match, validity) and the client
    /// CA through the same verifier construction as a start or a reload.
    pub(crate) fn check(&self, inputs: &TlsInputs) -> TlsCheck {
        let load = |pair: &CertPair| load_cert_pair(&self.provider, &pair.cert, &pair.key);
        TlsCheck {
            default: load(&inputs.default),
            sni: inputs.sni.iter().map(|pair| (pair.clone(), load(pair))).collect(),
            client_ca: inputs.client_ca.as_ref().map(|path| {
                let pem = read("client CA file", path)?;
                self.client_verifier(path, &pem, inputs.client_auth)?;
                // The verifier accepted every certificate, so each one parses.
                Ok(CertificateDer::pem_slice_iter(&pem).flatten().filter_map(|der| cert_info(&der).ok()).collect())
            }),
        }
    }

    /// A resumed session carries the client certificate verified when it was made, and rustls
    /// does not verify it again. Sessions therefore must not outlive the client-auth settings
    /// they were made under: when those change, start afresh (a client of a removed CA must
    /// not get back in by resuming). Server-certificate reloads keep sessions resumable.
    fn resumption_for(&self, client_auth: u64) -> Result<Resumption, TlsError> {
        let mut current = lock(&self.resumption);
        if current.client_auth != client_auth {
            *current = Resumption::new(client_auth)?;
        }
        Ok(current.clone())
    }

    fn client_verifier(
        &self,
        path: &Path,
        pem: &[u8],
        mode: ClientAuth,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let bad = |reason: String| TlsError::BadClientCa { path: path.to_owned(), reason };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            // webpki keeps a trust anchor's name and key without parsing them: a certificate
            // broken there would be trusted, yet left out of what `sidecar check` lists.
            cert_info(&cert).map_err(|e| bad(format!("a certificate in it is not valid X.509: {e}")))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no PEM certificate in it".to_owned()));
        }
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone());
        let builder = match mode {
            ClientAuth::Require => builder,
            ClientAuth::Request => builder.allow_unauthenticated(),
        };
        builder.build().map_err(|e| bad(e.to_string()))
    }
}

/// Every TLS input validated on its own, by [`TlsContext::check`].
#[derive(Debug)]
pub(crate) struct TlsCheck {
    pub(crate) default: Result<LoadedCert, TlsError>,
    pub(crate) sni: Vec<(CertPair, Result<LoadedCert, TlsError>)>,
    /// The client CA bundle's certificates, when one is configured.
    pub(crate) client_ca: Option<Result<Vec<CertInfo>, TlsError>>,
}

/// The live TLS state read by every handshake.
pub(crate) struct TlsState {
    current: ArcSwap<TlsSnapshot>,
}

impl TlsState {
    pub(crate) fn new(snapshot: TlsSnapshot) -> TlsState {
        TlsState { current: ArcSwap::from_pointee(snapshot) }
    }

    /// What a new handshake uses; connections keep the config they were accepted with.
    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load().server_config.clone()
    }

    pub(crate) fn current(&self) -> Arc<TlsSnapshot> {
        self.current.load_full()
    }

    /// Installs an already validated snapshot in one store, and returns it.
    pub(crate) fn replace(&self, snapshot: TlsSnapshot) -> Arc<TlsSnapshot> {
        let snapshot = Arc::new(snapshot);
        self.current.store(snapshot.clone());
        snapshot
    }
}

/// The subject of a verified client certificate, for the upstream to see.
pub(crate) fn client_subject(peer_certificates: Option<&[CertificateDer<'static>]>) -> Option<String> {
    let leaf = peer_certificates?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.subject().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn pem(der: &[u8]) -> Vec<u8> {
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = text.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n")).into_bytes()
    }

    #[test]
    fn a_client_ca_certificate_whose_key_does_not_parse_is_refused() {
        // Found by fuzz/tls_files: such a certificate was trusted, and `sidecar check` listed
        // the bundle without it.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        // The P-256 public key's BIT STRING (tag 3, 66 bytes) made an OCTET STRING.
        let at = der.windows(3).position(|w| w == [0x03, 0x42, 0x00]).expect("a P-256 public key");
        let mut broken = der.clone();
        broken[at] = 0x04;

        let context = TlsContext::new().unwrap();
        let path = Path::new("ca.pem");
        assert!(context.client_verifier(path, &pem(&der), ClientAuth::Require).is_ok());
        match context.client_verifier(path, &pem(&broken), ClientAuth::Require) {
            Err(TlsError::BadClientCa { reason, .. }) => assert!(reason.contains("not valid X.509"), "{reason}"),
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a CA certificate with a broken key was trusted"),
        }
    }
}
