//! Certificate, key and client CA files as the proxy loads them (`tls::parse_cert_pair`, and
//! `TlsContext::check` and `build` on files).
//!
//! Input: a flags byte, then the certificate chain, the key and the client CA bundle separated
//! by `\n%%\n`. Flag bits 0-2: the chain, key or bundle is DER, wrapped in PEM here (so that
//! mutations reach the X.509 and key parsers rather than break the base64); bit 3: a client
//! CA is configured. Invariants:
//! - the pair parsed from memory and from files gives the same result;
//! - `sidecar check` (which collects problems) passes exactly when a start (`build`) would,
//!   and both describe the same certificate;
//! - a client CA bundle that is accepted lists every certificate in it;
//! - an accepted certificate has not expired.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{pem_certificates, Tls};
use sidecar_fuzz::{scratch_dir, split};

static TLS: LazyLock<Tls> = LazyLock::new(|| Tls::new().expect("a TLS context"));
static DIR: LazyLock<PathBuf> = LazyLock::new(scratch_dir);

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n").into_bytes();
    for line in body.as_bytes().chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let parts = split(rest, b"\n%%\n");
    let part = |i: usize, label: &str| {
        let raw = parts.get(i).copied().unwrap_or_default();
        if flags & (1 << i) != 0 {
            pem(label, raw)
        } else {
            raw.to_vec()
        }
    };
    let (cert, key, ca) = (part(0, "CERTIFICATE"), part(1, "PRIVATE KEY"), part(2, "CERTIFICATE"));
    let with_ca = flags & 8 != 0;

    let in_memory = TLS.cert_pair(&cert, &key);
    let (cert_path, key_path, ca_path) = (DIR.join("cert.pem"), DIR.join("key.pem"), DIR.join("ca.pem"));
    std::fs::write(&cert_path, &cert).expect("the scratch directory is writable");
    std::fs::write(&key_path, &key).expect("the scratch directory is writable");
    std::fs::write(&ca_path, &ca).expect("the scratch directory is writable");
    let ca_path = with_ca.then_some(ca_path.as_path());

    let checked = TLS.check(&cert_path, &key_path, ca_path);
    assert_eq!(checked.pair.as_ref().ok(), in_memory.as_ref().ok(), "memory and files disagree");
    if let Some(Ok(listed)) = &checked.client_ca {
        assert_eq!(listed.len(), pem_certificates(&ca), "the client CA bundle is listed short");
    }
    let built = TLS.build(&cert_path, &key_path, ca_path);
    let check_passes = checked.pair.is_ok() && !matches!(checked.client_ca, Some(Err(_)));
    assert_eq!(check_passes, built.is_ok(), "check says {checked:?}, a start says {built:?}");
    if let (Ok(pair), Ok(served)) = (&checked.pair, &built) {
        assert_eq!(pair, served, "check and a start describe different certificates");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(pair.not_after >= now - 60, "an expired certificate accepted: {pair:?}");
    }
});
