//! The zero-configuration development certificate: self-signed ECDSA P-256 for localhost.

use std::path::{Path, PathBuf};

use rustls::crypto::CryptoProvider;
use time::{Duration, OffsetDateTime};

use crate::sys::atomic_file::{write_atomic, FileMode, WriteError};
use crate::tls::{load_cert_pair, LoadedCert, TlsError};

pub(crate) const CERT_FILE: &str = "dev-cert.pem";
pub(crate) const KEY_FILE: &str = "dev-key.pem";
const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
const VALID_DAYS: i64 = 365;
/// A stored certificate closer than this to expiry is replaced at start.
const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DevCertError {
    #[error("cannot create state directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("cannot generate the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the development certificate just written is unusable: {0}")]
    Load(#[from] TlsError),
}

/// `$XDG_STATE_HOME/sidecar`, else `~/.local/state/sidecar`, else a directory under the temp dir.
pub(crate) fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("sidecar");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/sidecar");
    }
    std::env::temp_dir().join("sidecar-state")
}

#[derive(Debug)]
pub(crate) struct DevCert {
    pub(crate) cert_path: PathBuf,
    pub(crate) key_path: PathBuf,
    pub(crate) created: bool,
}

/// Whether a stored development certificate (already loaded and validated) is kept at start:
/// it must stay valid for another month.
pub(crate) fn is_reusable(cert: &LoadedCert) -> bool {
    cert.info.not_after - OffsetDateTime::now_utc() > Duration::days(RENEW_BEFORE_DAYS)
}

/// Reuses the certificate in `state_dir` when it is valid for another month, else makes one.
pub(crate) fn ensure(provider: &CryptoProvider, state_dir: &Path) -> Result<DevCert, DevCertError> {
    let cert_path = state_dir.join(CERT_FILE);
    let key_path = state_dir.join(KEY_FILE);
    if load_cert_pair(provider, &cert_path, &key_path).is_ok_and(|cert| is_reusable(&cert)) {
        return Ok(DevCert { cert_path, key_path, created: false });
    }
    std::fs::create_dir_all(state_dir)
        .map_err(|source| DevCertError::CreateDir { path: state_dir.to_owned(), source })?;

    let mut params = rcgen::CertificateParams::new(NAMES.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "sidecar development certificate (localhost)");
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(VALID_DAYS);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;

    // Key first, so that a crash in between never leaves a certificate without its key.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), FileMode::Exactly(0o600))?;
    write_atomic(&cert_path, cert.pem().as_bytes(), FileMode::Exactly(0o644))?;
    // Loaded once more: what was written must be what a start would accept.
    load_cert_pair(provider, &cert_path, &key_path)?;
    Ok(DevCert { cert_path, key_path, created: true })
}
