//! The test PKI, made with rcgen at test time, and real TLS clients (rustls under hyper), one
//! that verifies the sidecar's certificate and one that accepts any.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use super::{empty, TestBody};

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

pub struct IssuedCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "sidecar test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let ca_pem = ca.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        TestPki { dir, ca_pem, ca }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a leaf for `names`, valid from `not_before_days` to `not_after_days` relative to
    /// now, writes it as `{stem}.crt` / `{stem}.key` (PKCS#8) and returns the paths.
    pub fn issue_with(&self, stem: &str, names: &[&str], not_before_days: i64, not_after_days: i64) -> IssuedCert {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(not_before_days);
        params.not_after = now + time::Duration::days(not_after_days);
        let serial: [u8; 8] = rand_serial();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_path = self.dir.path().join(format!("{stem}.crt"));
        let key_path = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let serial = serial.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        IssuedCert { cert: cert_path, key: key_path, serial }
    }

    pub fn issue(&self, stem: &str) -> IssuedCert {
        self.issue_with(stem, &["localhost", "127.0.0.1"], -1, 30)
    }
}

fn rand_serial() -> [u8; 8] {
    static COUNTER: AtomicUsize = AtomicUsize::new(1);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mixed = nanos ^ ((COUNTER.fetch_add(1, Ordering::SeqCst) as u64) << 48) ^ (std::process::id() as u64) << 20;
    let mut bytes = mixed.to_be_bytes();
    bytes[0] = (bytes[0] & 0x7f) | 0x10; // positive, and no leading zero byte to trim
    bytes
}

// ---------------------------------------------------------------------------------------------
// Real TLS clients.
// ---------------------------------------------------------------------------------------------

pub fn client_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// An HTTP/2 client from the h2 crate (for frames hyper's client will not send: resets, a
/// window never opened) over a verified TLS session with the sidecar; the task drives its
/// connection.
pub async fn h2_client(
    sidecar: &super::Sidecar,
    pki: &TestPki,
    builder: &h2::client::Builder,
) -> (h2::client::SendRequest<bytes::Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let config = client_config(pki.ca_pem.as_bytes(), &[b"h2"]);
    let tls = tls_connect(sidecar.addr, config, "localhost").await.expect("TLS handshake with the sidecar");
    let (send, connection) = builder.handshake(tls).await.unwrap();
    (send, tokio::spawn(connection))
}

/// An HTTP/1.1 or HTTP/2 connection to the sidecar, over a verified TLS session.
pub enum HttpsConnection {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

impl HttpsConnection {
    pub async fn open(addr: SocketAddr, ca_pem: &[u8], http2: bool) -> HttpsConnection {
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls =
            tls_connect(addr, client_config(ca_pem, alpn), "localhost").await.expect("TLS handshake with the sidecar");
        HttpsConnection::over(tls, http2).await
    }

    /// Speaks HTTP/2 or HTTP/1.1 over an established TLS session, checking that ALPN agreed.
    pub async fn over(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>, http2: bool) -> HttpsConnection {
        let negotiated = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        let io = TokioIo::new(tls);
        if http2 {
            assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]), "ALPN must select h2");
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            HttpsConnection::H2(send)
        } else {
            assert_eq!(negotiated.as_deref(), Some(&b"http/1.1"[..]), "ALPN must select http/1.1");
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn.with_upgrades());
            HttpsConnection::H1(send)
        }
    }

    pub async fn send(&mut self, mut request: Request<TestBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            HttpsConnection::H1(send) => {
                send.ready().await?;
                if !request.headers().contains_key("host") {
                    request.headers_mut().insert("host", "localhost".parse().unwrap());
                }
                send.send_request(request).await
            }
            HttpsConnection::H2(send) => {
                send.ready().await?;
                if request.uri().authority().is_none() {
                    let pq =
                        request.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
                    *request.uri_mut() = format!("https://localhost{pq}").parse().unwrap();
                }
                send.send_request(request).await
            }
        }
    }

    /// GET `path`, returning status, headers and the body as text.
    pub async fn get(&mut self, path: &str) -> (StatusCode, http::HeaderMap, String) {
        let response = self.send(Request::get(path).body(empty()).unwrap()).await.expect("response");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Accepts any server certificate, but still checks the handshake signatures (so the server
/// must hold the key of the certificate it presents).
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client that skips server certificate verification (for names no certificate covers).
pub fn insecure_client_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}
