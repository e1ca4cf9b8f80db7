//! The zero-configuration development certificate: self-signed ECDSA P-256 for localhost.

use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::crypto::CryptoProvider;
use time::{Duration, OffsetDateTime};

use crate::tls::{load_cert_pair, LoadedCert, TlsError};

pub const CERT_FILE: &str = "dev-cert.pem";
pub const KEY_FILE: &str = "dev-key.pem";
const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
const VALID_DAYS: i64 = 365;
/// A stored certificate closer than this to expiry is replaced at start.
const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("cannot create state directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot generate the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the development certificate just written is unusable: {0}")]
    Load(#[from] TlsError),
}

/// `$XDG_STATE_HOME/sidecar`, else `~/.local/state/sidecar`, else a directory under the temp dir.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("sidecar");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/sidecar");
    }
    std::env::temp_dir().join("sidecar-state")
}

#[derive(Debug)]
pub struct DevCert {
    pub cert: LoadedCert,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub created: bool,
}

/// Whether a stored development certificate (already loaded and validated) is kept at start:
/// it must stay valid for another month.
pub fn is_reusable(cert: &LoadedCert) -> bool {
    cert.info.not_after - OffsetDateTime::now_utc() > Duration::days(RENEW_BEFORE_DAYS)
}

/// Reuses the certificate in `state_dir` when it is valid for another month, else makes one.
pub fn ensure(provider: &CryptoProvider, state_dir: &Path) -> Result<DevCert, DevCertError> {
    let cert_path = state_dir.join(CERT_FILE);
    let key_path = state_dir.join(KEY_FILE);
    if let Ok(cert) = load_cert_pair(provider, &cert_path, &key_path) {
        if is_reusable(&cert) {
            return Ok(DevCert { cert, cert_path, key_path, created: false });
        }
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
    write_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
    let cert = load_cert_pair(provider, &cert_path, &key_path)?;
    Ok(DevCert { cert, cert_path, key_path, created: true })
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DevCertError> {
    write_file_atomically(path, bytes, mode).map_err(|source| DevCertError::Write { path: path.to_owned(), source })
}

/// Writes `bytes` to `path` by way of a temp file in the same directory, fsynced and renamed
/// over it, so that a reader (or a crash) sees the old file or the new one, never half of one.
/// `mode` holds from the first byte: a key is never readable by others, not even briefly.
pub(crate) fn write_file_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    // A temp file left behind by a crash would keep its old mode through a truncating open.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
