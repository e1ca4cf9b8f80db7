//! `sidecar cert`: a local development CA, made once per machine, and certificates it signs,
//! in the manner of mkcert.
//!
//! The proxy's zero-configuration certificate (devcert.rs) is self-signed, so every client has
//! to be told to skip verification. A CA that is trusted once makes every certificate it signs
//! verify like a real one, in browsers, curl and code alike. The CA is ECDSA P-256, valid ten
//! years and reused by later runs; each run issues a fresh leaf (ECDSA P-256, about a year,
//! serverAuth). Keys are written 0600, every file atomically.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use time::{Duration, OffsetDateTime};

use crate::sys::atomic_file::{write_atomic, FileMode, WriteError};
use crate::tls::{cert_info, load_cert_pair, CertInfo, TlsError};

/// What `sidecar cert` issues for when no name is given: what a browser on this machine uses.
pub(crate) const DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
pub(crate) const CA_CERT_FILE: &str = "ca.pem";
pub(crate) const CA_KEY_FILE: &str = "ca-key.pem";
const CA_ORGANIZATION: &str = "sidecar development CA";
const CA_VALID_DAYS: i64 = 3650;
const LEAF_VALID_DAYS: i64 = 365;
/// Back-dating, so that a client whose clock is a little behind accepts a fresh certificate.
const BACKDATE: Duration = Duration::days(1);
/// X.520's upper bound for a common name; longer ones are refused by some verifiers.
const MAX_COMMON_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DevCaError {
    #[error("`{name}` is not a host name (such as localhost, app.test or *.app.test) or an IP address")]
    BadName { name: String },
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{} exists but {} does not: remove it to make a new CA, or use another --dir", present.display(), missing.display())]
    HalfCa { present: PathBuf, missing: PathBuf },
    #[error("the development CA {} is unusable: {reason}; remove {} and {} to make a new one, or use another --dir", cert.display(), cert.display(), key.display())]
    UnusableCa { cert: PathBuf, key: PathBuf, reason: String },
    #[error("no development CA to take out of trust stores: cannot read {}: {source}", path.display())]
    NoCa { path: PathBuf, source: std::io::Error },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the system's random number generator failed")]
    Random,
    #[error("the certificate just made for {name} does not verify against the CA {}: {reason}", ca.display())]
    SelfCheck { name: String, ca: PathBuf, reason: String },
    #[error("the certificate just written is unusable: {0}")]
    Load(#[from] TlsError),
}

/// The development CA, loaded or just made, ready to sign.
pub(crate) struct DevCa {
    pub(crate) cert_path: PathBuf,
    pub(crate) key_path: PathBuf,
    pub(crate) info: CertInfo,
    pub(crate) der: CertificateDer<'static>,
    /// Made by this run (it must be trusted before its certificates are accepted).
    pub(crate) created: bool,
    /// The CA this run replaced because it had expired, by its expiry.
    pub(crate) replaced_expired: Option<String>,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate issued by the CA and written to disk.
pub(crate) struct Issued {
    pub(crate) cert_path: PathBuf,
    pub(crate) key_path: PathBuf,
    pub(crate) info: CertInfo,
    pub(crate) names: Vec<String>,
}

/// Makes or reuses the CA in `dir` and issues a certificate for `names` (checked first).
pub(crate) fn ensure_ca_and_issue(dir: &Path, names: &[String]) -> Result<(DevCa, Issued), DevCaError> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let names = check_names(names)?;
    let ca = ensure_ca(&provider, dir)?;
    let leaf = issue(&provider, &ca, dir, &names)?;
    Ok((ca, leaf))
}

/// The name the CA goes by in trust stores: its serial makes it this CA's, so that
/// `--uninstall` takes out this one and no other. No colons: certutil reads `A:B` as token A.
pub(crate) fn trust_nickname(info: &CertInfo) -> String {
    format!("{CA_ORGANIZATION} {}", info.serial.replace(':', ""))
}

/// The CA certificate already in `dir` (for `--uninstall`: nothing is made).
pub(crate) fn existing_ca(dir: &Path) -> Result<(PathBuf, CertInfo), DevCaError> {
    use rustls::pki_types::pem::PemObject;
    let path = dir.join(CA_CERT_FILE);
    let pem = std::fs::read(&path).map_err(|source| DevCaError::NoCa { path: path.clone(), source })?;
    let unusable = |reason: String| DevCaError::UnusableCa { cert: path.clone(), key: dir.join(CA_KEY_FILE), reason };
    let der = CertificateDer::from_pem_slice(&pem).map_err(|e| unusable(e.to_string()))?;
    let info = cert_info(&der).map_err(unusable)?;
    Ok((path, info))
}

/// Validates NAMES (host names, `*.` wildcards, IP addresses) and drops repeats.
pub(crate) fn check_names(names: &[String]) -> Result<Vec<String>, DevCaError> {
    let mut checked: Vec<String> = Vec::new();
    for name in names {
        let bad = || DevCaError::BadName { name: name.clone() };
        if name.parse::<IpAddr>().is_err() {
            let host = name.strip_prefix("*.").unwrap_or(name);
            // rustls' own rules for a DNS name, so that what is issued is what clients can ask for.
            match ServerName::try_from(host) {
                Ok(ServerName::DnsName(_)) => {}
                _ => return Err(bad()),
            }
        }
        if !checked.contains(name) {
            checked.push(name.clone());
        }
    }
    if checked.is_empty() {
        return Err(DevCaError::BadName { name: String::new() });
    }
    Ok(checked)
}

/// Reuses the CA in `dir` when both its files are there and valid; makes one when neither is,
/// or when the old one has expired. Anything else is an error rather than a silent
/// replacement: the old CA may be trusted somewhere, and replacing it would break that.
pub(crate) fn ensure_ca(provider: &CryptoProvider, dir: &Path) -> Result<DevCa, DevCaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (false, false) => create_ca(provider, dir, None),
        (true, false) => Err(DevCaError::HalfCa { present: cert_path, missing: key_path }),
        (false, true) => Err(DevCaError::HalfCa { present: key_path, missing: cert_path }),
        (true, true) => match load_cert_pair(provider, &cert_path, &key_path) {
            Err(TlsError::Expired { not_after, .. }) => create_ca(provider, dir, Some(not_after)),
            Err(e) => Err(DevCaError::UnusableCa { cert: cert_path, key: key_path, reason: e.to_string() }),
            Ok(loaded) => load_ca(cert_path, key_path, loaded.info),
        },
    }
}

/// The CA's subject, also rebuilt from a stored CA to sign with it: rcgen writes a leaf's
/// issuer from these parameters, and it must equal the CA's subject byte for byte.
fn ca_params(common_name: &str) -> Result<CertificateParams, DevCaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name.push(DnType::CommonName, common_name);
    // Leaves only: a stolen development CA key cannot mint intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn create_ca(provider: &CryptoProvider, dir: &Path, replaced_expired: Option<String>) -> Result<DevCa, DevCaError> {
    std::fs::create_dir_all(dir).map_err(|source| DevCaError::CreateDir { path: dir.to_owned(), source })?;
    let mut params = ca_params(&ca_common_name())?;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(CA_VALID_DAYS);
    params.serial_number = Some(random_serial()?);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    // Key first, so that a crash in between never leaves a CA certificate without its key.
    write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write(&cert_path, cert.pem().as_bytes(), 0o644)?;
    // Read back through the proxy's loader: what was written parses, and the key matches.
    let loaded = load_cert_pair(provider, &cert_path, &key_path)?;
    Ok(DevCa {
        cert_path,
        key_path,
        info: loaded.info,
        der: cert.der().clone(),
        created: true,
        replaced_expired,
        issuer: Issuer::new(params, key),
    })
}

/// A stored CA (already validated: parses, key matches, within validity) made ready to sign.
fn load_ca(cert_path: PathBuf, key_path: PathBuf, info: CertInfo) -> Result<DevCa, DevCaError> {
    let unusable = |reason: String| DevCaError::UnusableCa { cert: cert_path.clone(), key: key_path.clone(), reason };
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| unusable(format!("cannot read {}: {e}", path.display())))
    };
    let cert_pem = read(&cert_path)?;
    let key_pem = read(&key_path)?;
    let der = {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| unusable(e.to_string()))?
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| unusable(e.to_string()))?;
    if !parsed.is_ca() {
        return Err(unusable("it is not a CA certificate".into()));
    }
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| unusable("it has no common name".into()))?
        .to_owned();
    let key = KeyPair::from_pem(&key_pem).map_err(|e| unusable(format!("{}: {e}", key_path.display())))?;
    let issuer = Issuer::new(ca_params(&common_name)?, key);
    Ok(DevCa { cert_path, key_path, info, der: der.into_owned(), created: false, replaced_expired: None, issuer })
}

/// Issues a new leaf for `names`, checks it against the CA as a client would, and writes it as
/// `<first name>[+N].pem` and `...-key.pem` (mkcert's naming).
pub(crate) fn issue(provider: &CryptoProvider, ca: &DevCa, dir: &Path, names: &[String]) -> Result<Issued, DevCaError> {
    let first = names.first().ok_or_else(|| DevCaError::BadName { name: String::new() })?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "sidecar development certificate");
    params.distinguished_name.push(DnType::CommonName, truncate(first, MAX_COMMON_NAME));
    params.is_ca = IsCa::ExplicitNoCa;
    // ECDSA keys only sign; keyEncipherment is for RSA key transport.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    // Never beyond the CA: a leaf outliving its issuer would stop verifying early anyway.
    params.not_after = (now + Duration::days(LEAF_VALID_DAYS)).min(ca.info.not_after);
    params.serial_number = Some(random_serial()?);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    verify_against_ca(provider, ca, cert.der(), names)?;

    let base = file_base(names);
    let cert_path = dir.join(format!("{base}.pem"));
    let key_path = dir.join(format!("{base}-key.pem"));
    write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write(&cert_path, cert.pem().as_bytes(), 0o644)?;
    // The proxy's own loader: parses, key matches, within validity.
    let loaded = load_cert_pair(provider, &cert_path, &key_path)?;
    Ok(Issued { cert_path, key_path, info: loaded.info, names: names.to_vec() })
}

/// Verifies the new leaf for every name with rustls' WebPKI verifier and only the CA as root,
/// as a client that trusts the CA will. Catches a reused CA whose subject did not round-trip.
fn verify_against_ca(
    provider: &CryptoProvider,
    ca: &DevCa,
    leaf: &CertificateDer<'_>,
    names: &[String],
) -> Result<(), DevCaError> {
    let fail =
        |name: &str, reason: String| DevCaError::SelfCheck { name: name.to_owned(), ca: ca.cert_path.clone(), reason };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).map_err(|e| fail("the CA", e.to_string()))?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider.clone()))
            .build()
            .map_err(|e| fail("the CA", e.to_string()))?;
    for name in names {
        // A client asks for a concrete name; any label stands for the wildcard.
        let asked = match name.strip_prefix("*.") {
            Some(parent) => format!("wildcard-check.{parent}"),
            None => name.clone(),
        };
        let server_name = ServerName::try_from(asked).map_err(|e| fail(name, e.to_string()))?;
        verifier
            .verify_server_cert(leaf, &[], &server_name, &[], UnixTime::now())
            .map_err(|e| fail(name, e.to_string()))?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DevCaError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DevCaError::CreateDir { path: dir.to_owned(), source })?;
    }
    Ok(write_atomic(path, bytes, FileMode::Exactly(mode))?)
}

/// `localhost+2` for localhost, 127.0.0.1 and ::1; characters unfit for a file name replaced.
fn file_base(names: &[String]) -> String {
    let first = names.first().map(String::as_str).unwrap_or("cert").replace('*', "_wildcard").replace(':', "_");
    match names.len() {
        0 | 1 => first,
        n => format!("{first}+{}", n - 1),
    }
}

/// `sidecar development CA (user@host)`: which machine's CA this is, when it shows up in a
/// trust store list.
fn ca_common_name() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| format!("uid{}", rustix::process::getuid().as_raw()));
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    truncate(&format!("{CA_ORGANIZATION} ({user}@{host})"), MAX_COMMON_NAME)
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// 127 random bits: unique per certificate, positive, and without a leading zero byte.
fn random_serial() -> Result<rcgen::SerialNumber, DevCaError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| DevCaError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// Quotes a path for a POSIX shell when it needs it.
fn sh(path: &Path) -> String {
    let s = path.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What `sidecar cert` prints: what was written, how to use it, how to trust the CA.
pub(crate) fn instructions(ca: &DevCa, leaf: &Issued) -> String {
    let ca_pem = sh(&ca.cert_path);
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    if let Some(expired) = &ca.replaced_expired {
        line(format!("The development CA in {} expired at {expired}; a new one replaces it.", ca.cert_path.display()));
        line("Remove the old one from the trust stores it was added to.".into());
    }
    line(format!(
        "{} the development CA {} (key {})",
        if ca.created { "Created" } else { "Reusing" },
        ca.cert_path.display(),
        ca.key_path.display()
    ));
    line(format!("  {}", ca.info));
    line(format!(
        "Issued a certificate for {}: {} (key {})",
        leaf.names.join(", "),
        leaf.cert_path.display(),
        leaf.key_path.display()
    ));
    line(format!("  {}", leaf.info));
    line(String::new());
    line("Serve it (your app's address as the upstream):".into());
    line(format!(
        "  sidecar proxy --upstream http://127.0.0.1:8080 --cert {} --key {}",
        sh(&leaf.cert_path),
        sh(&leaf.key_path)
    ));
    line(String::new());
    line(format!(
        "Trust the CA{} (once per machine and browser profile):",
        if ca.created { "" } else { ", if not done yet" }
    ));
    line(format!(
        "  Debian/Ubuntu:   sudo cp {ca_pem} /usr/local/share/ca-certificates/sidecar-dev-ca.crt && sudo update-ca-certificates"
    ));
    line(format!(
        "  Fedora/RHEL:     sudo cp {ca_pem} /etc/pki/ca-trust/source/anchors/sidecar-dev-ca.pem && sudo update-ca-trust"
    ));
    line(format!("  macOS:           sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {ca_pem}"));
    line(format!("  Firefox/NSS:     certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n sidecar-dev-ca -i {ca_pem}"));
    line("                   (Firefox profiles: the same with -d sql:<profile directory>; certutil is in libnss3-tools / nss-tools)".into());
    line(format!("  curl, just once: curl --cacert {ca_pem} https://localhost:8443/"));
    line("  Or in one step:  sidecar cert --install (NSS databases via certutil; the system store as root)".into());
    line(String::new());
    line(format!(
        "Keep {} private: whoever has it can make certificates that a machine trusting this CA accepts.",
        ca.key_path.display()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_host_names_wildcards_or_ip_addresses() {
        assert_eq!(
            check_names(&names(&["localhost", "127.0.0.1", "::1", "*.app.test", "localhost"])).unwrap().len(),
            4
        );
        for bad in ["", "a b", "*", "*.", "app..test", "http://x", "a/b", "*.*.test"] {
            assert!(check_names(&names(&[bad])).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn files_are_named_like_mkcert_does() {
        assert_eq!(file_base(&names(&["localhost", "127.0.0.1", "::1"])), "localhost+2");
        assert_eq!(file_base(&names(&["*.app.test"])), "_wildcard.app.test");
        assert_eq!(file_base(&names(&["::1", "x"])), "__1+1");
    }

    #[test]
    fn shell_quoting_only_when_needed() {
        assert_eq!(sh(Path::new("/a/b+2.pem")), "/a/b+2.pem");
        assert_eq!(sh(Path::new("/my dir/it's.pem")), r"'/my dir/it'\''s.pem'");
    }
}
