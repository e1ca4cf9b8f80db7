mod common;

// SNI certificate selection and mutual TLS, with live reload of both: the real binary, real
// rustls handshakes on ephemeral ports, a real upstream that records what it was sent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Upper bound for a reload to show in the log, and for one request round trip.
const LIMIT: Duration = Duration::from_secs(5);
const H1: &[&[u8]] = &[b"http/1.1"];
const HELLO: &str = "hello from upstream\n";

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// The DER of the first (leaf) certificate in a PEM file.
fn leaf_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .expect("read PEM")
        .next()
        .expect("a certificate")
        .expect("PEM certificate")
        .to_vec()
}

/// The leaf the server presented on `tls`.
fn peer_leaf(tls: &Tls) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().expect("server certificates")[0].to_vec()
}

/// A copy of `config` that never resumes a session, so that every handshake is a full one and
/// sees the server's current certificates and client CA.
fn no_resumption(config: Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    let mut config = (*config).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Trusts `server_ca_pem`, offers http/1.1 and presents `client`'s certificate and key.
fn mtls_config(server_ca_pem: &[u8], client: &IssuedCert) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(server_ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&client.cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(&client.key).unwrap();
    let mut config =
        rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(chain, key).unwrap();
    config.alpn_protocols = H1.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

fn dns(name: &str) -> ServerName<'static> {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    assert!(matches!(name, ServerName::DnsName(_)));
    name
}

/// One HTTP/1.1 GET / over `tls`, bounded by LIMIT. Any failure (TLS alert, reset, timeout)
/// comes back as `Err` with a description.
async fn get(tls: Tls, host: &str, headers: &[(&str, &str)]) -> Result<(StatusCode, String), String> {
    let exchange = async {
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tls))
            .await
            .map_err(|e| format!("{e:?}"))?;
        tokio::spawn(conn);
        let mut request = Request::get("/").header("host", host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = send.send_request(request.body(empty()).unwrap()).await.map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| format!("{e:?}"))?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(LIMIT, exchange).await.unwrap_or_else(|_| Err(format!("no response within {LIMIT:?}")))
}

/// Handshake, then GET; `Err` when either fails.
async fn attempt(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, String), String> {
    let tls = match tokio::time::timeout(LIMIT, connect(addr, config, dns(name))).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(format!("handshake failed: {e}")),
        Err(_) => return Err(format!("handshake not done within {LIMIT:?}")),
    };
    get(tls, name, headers).await
}

fn requests_seen(upstream: &Upstream) -> usize {
    upstream.log.requests.lock().unwrap().len()
}

/// The client must not get a response from the upstream: the handshake or the first request
/// fails (TLS 1.3 reports a refused client certificate on the client's first read), or at
/// least no 200 comes back and the upstream sees nothing.
fn assert_refused(
    what: &str,
    upstream: &Upstream,
    sidecar: &Sidecar,
    result: Result<(StatusCode, String), String>,
    seen_before: usize,
) {
    assert!(
        !matches!(result, Ok((StatusCode::OK, _))),
        "{what}: must be refused, but got {result:?}; log:\n{}",
        sidecar.logs.text()
    );
    assert_eq!(requests_seen(upstream), seen_before, "{what}: no request may reach the upstream ({result:?})");
}

/// Asserts a 200 from the upstream and returns the X-Client-Cert-Subject values it received.
fn assert_ok_subjects(
    what: &str,
    result: Result<(StatusCode, String), String>,
    upstream: &Upstream,
    sidecar: &Sidecar,
) -> Vec<String> {
    match &result {
        Ok((StatusCode::OK, body)) => assert_eq!(body, HELLO, "{what}"),
        other => panic!("{what}: expected 200 from the upstream, got {other:?}; log:\n{}", sidecar.logs.text()),
    }
    upstream
        .last_request()
        .headers
        .get_all("x-client-cert-subject")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// Moves `from` over `to` in one rename, as an editor or a secret-mount update does.
fn rename_over(from: &Path, to: &Path) {
    std::fs::rename(from, to).unwrap_or_else(|e| panic!("rename {} -> {}: {e}", from.display(), to.display()));
}

/// Writes `contents` to a temporary name next to `to` and renames it over `to`.
fn replace_file(to: &Path, contents: &[u8]) {
    let tmp: PathBuf = to.with_file_name(format!("{}.new", to.file_name().unwrap().to_str().unwrap()));
    std::fs::write(&tmp, contents).unwrap();
    rename_over(&tmp, to);
}

/// Installs `next` in place of `current`: key first, then certificate, each by rename.
fn install_pair(next: &IssuedCert, current: &IssuedCert) {
    rename_over(&next.key, &current.key);
    rename_over(&next.cert, &current.cert);
}

// ---------------------------------------------------------------------------------------------
// 1. SNI selection.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sni_picks_exact_then_single_label_wildcard_then_default() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let default = pki.issue_with("default", &["localhost", "127.0.0.1"], -1, 30);
    let api = pki.issue_with("api", &["api.test"], -1, 30);
    let wild = pki.issue_with("wild", &["*.wild.test"], -1, 30);
    let api_pair = format!("{}:{}", s(&api.cert), s(&api.key));
    let wild_pair = format!("{}:{}", s(&wild.cert), s(&wild.key));
    let url = upstream.url();
    let sidecar = Sidecar::start(&[
        "--upstream",
        &url,
        "--cert",
        s(&default.cert),
        "--key",
        s(&default.key),
        "--sni-cert",
        &api_pair,
        "--sni-cert",
        &wild_pair,
    ]);

    let (default_der, api_der, wild_der) = (leaf_der(&default.cert), leaf_der(&api.cert), leaf_der(&wild.cert));
    let verified = client_config(pki.ca_pem.as_bytes(), H1);
    let insecure = insecure_client_config(H1);
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    type Case<'a> = (&'a str, ServerName<'static>, &'a Arc<rustls::ClientConfig>, &'a Vec<u8>, &'a str);
    let cases: Vec<Case> = vec![
        ("api.test", dns("api.test"), &verified, &api_der, "exact SNI match"),
        ("API.Test", dns("API.Test"), &verified, &api_der, "exact SNI match, case-insensitive"),
        ("x.wild.test", dns("x.wild.test"), &verified, &wild_der, "wildcard covers one label"),
        ("a.b.wild.test", dns("a.b.wild.test"), &insecure, &default_der, "a wildcard does not cover two labels"),
        ("wild.test", dns("wild.test"), &insecure, &default_der, "a wildcard does not cover its parent"),
        ("other.test", dns("other.test"), &insecure, &default_der, "unknown name gets the default"),
        ("localhost", dns("localhost"), &verified, &default_der, "the default's own name"),
        ("127.0.0.1", ip, &verified, &default_der, "no SNI (IP address) gets the default"),
    ];
    for (host, name, config, expected, why) in cases {
        let tls = connect(sidecar.addr, no_resumption((*config).clone()), name)
            .await
            .unwrap_or_else(|e| panic!("{host}: handshake failed: {e}; log:\n{}", sidecar.logs.text()));
        let leaf = peer_leaf(&tls);
        let which = [(&default_der, "default"), (&api_der, "api"), (&wild_der, "wildcard")]
            .iter()
            .find(|(der, _)| **der == leaf)
            .map_or("an unknown certificate", |(_, n)| n);
        assert!(leaf == *expected, "{host} ({why}): served {which}");
        let result = get(tls, host, &[]).await;
        assert!(matches!(&result, Ok((StatusCode::OK, body)) if body == HELLO), "{host}: GET gave {result:?}");
    }
    assert_eq!(requests_seen(&upstream), 8);
}

// ---------------------------------------------------------------------------------------------
// 2. SNI certificates reload with the default; a bad SNI key is refused.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sni_and_default_certificates_reload_together_and_a_bad_sni_key_is_refused() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let default = pki.issue_with("default", &["localhost", "127.0.0.1"], -1, 30);
    let api = pki.issue_with("api", &["api.test"], -1, 30);
    let api_pair = format!("{}:{}", s(&api.cert), s(&api.key));
    let url = upstream.url();
    let sidecar = Sidecar::start(&[
        "--upstream",
        &url,
        "--cert",
        s(&default.cert),
        "--key",
        s(&default.key),
        "--sni-cert",
        &api_pair,
        "--reload-debounce",
        "20ms",
    ]);
    let trusted = no_resumption(client_config(pki.ca_pem.as_bytes(), H1));
    let served = |name: &'static str| {
        let (addr, config) = (sidecar.addr, trusted.clone());
        async move {
            let tls =
                connect(addr, config, dns(name)).await.unwrap_or_else(|e| panic!("{name}: handshake failed: {e}"));
            let leaf = peer_leaf(&tls);
            let result = get(tls, name, &[]).await;
            assert!(matches!(result, Ok((StatusCode::OK, _))), "{name}: GET gave {result:?}");
            leaf
        }
    };
    assert_eq!(served("api.test").await, leaf_der(&api.cert));
    assert_eq!(served("localhost").await, leaf_der(&default.cert));

    // New pairs for both, written under other names, then renamed over: key, then certificate;
    // the SNI pair first, the default last.
    let api_next = pki.issue_with("api-next", &["api.test"], -1, 30);
    let default_next = pki.issue_with("default-next", &["localhost", "127.0.0.1"], -1, 30);
    let (api_next_der, default_next_der) = (leaf_der(&api_next.cert), leaf_der(&default_next.cert));
    assert_ne!(api_next.serial, api.serial);
    install_pair(&api_next, &api);
    install_pair(&default_next, &default);

    // The reload that takes in the new default certificate (renamed last) read the new SNI pair too.
    let line = sidecar.logs.wait_for(&format!("serial {}", default_next.serial), LIMIT);
    assert!(line.contains("certificates reloaded"), "{line}");
    let api_line = sidecar.logs.wait_for(&format!("serial {}", api_next.serial), LIMIT);
    assert!(api_line.contains("certificates reloaded") && api_line.contains(s(&api.cert)), "{api_line}");
    assert_eq!(
        served("api.test").await,
        api_next_der,
        "api.test must get the new SNI certificate (serial {})",
        api_next.serial
    );
    assert_eq!(
        served("localhost").await,
        default_next_der,
        "localhost must get the new default (serial {})",
        default_next.serial
    );

    // A key of another certificate over the SNI key: refused, naming the key file.
    let stranger = pki.issue_with("stranger", &["api.test"], -1, 30);
    let refusals = sidecar.logs.count("does not match");
    replace_file(&api.key, &std::fs::read(&stranger.key).unwrap());
    let refused = sidecar.logs.wait_for_nth("does not match", refusals + 1, LIMIT);
    assert!(refused.contains(s(&api.key)), "the error names the SNI key file: {refused}");
    assert!(refused.contains("refused"), "{refused}");
    assert_eq!(served("api.test").await, api_next_der, "api.test keeps the last good SNI certificate");
    assert_eq!(served("localhost").await, default_next_der, "the default stays too");
    assert!(sidecar
        .logs
        .text()
        .lines()
        .filter(|l| l.contains("certificates reloaded"))
        .all(|l| !l.contains(&stranger.serial)));
}

// ---------------------------------------------------------------------------------------------
// 3. and 4. Mutual TLS, required and requested.
// ---------------------------------------------------------------------------------------------

struct Mtls {
    upstream: Upstream,
    /// Issues the server's certificate.
    server_pki: TestPki,
    /// The CA given to --client-ca.
    client_pki: TestPki,
    /// A client CA the proxy does not trust.
    rogue_pki: TestPki,
    client: IssuedCert,
    rogue: IssuedCert,
    sidecar: Sidecar,
}

async fn mtls(extra: &[&str]) -> Mtls {
    let upstream = Upstream::start().await;
    let server_pki = TestPki::new();
    let leaf = server_pki.issue("leaf");
    let client_pki = TestPki::new();
    let client = client_pki.issue_with("client", &["client.test"], -1, 30);
    let rogue_pki = TestPki::new();
    let rogue = rogue_pki.issue_with("rogue", &["client.test"], -1, 30);
    let url = upstream.url();
    let ca = client_pki.ca_path();
    let mut args = vec![
        "--upstream",
        &url,
        "--cert",
        s(&leaf.cert),
        "--key",
        s(&leaf.key),
        "--client-ca",
        s(&ca),
        "--reload-debounce",
        "20ms",
    ];
    args.extend_from_slice(extra);
    let sidecar = Sidecar::start(&args);
    Mtls { upstream, server_pki, client_pki, rogue_pki, client, rogue, sidecar }
}

impl Mtls {
    fn anonymous(&self) -> Arc<rustls::ClientConfig> {
        no_resumption(client_config(self.server_pki.ca_pem.as_bytes(), H1))
    }

    fn with_cert(&self, cert: &IssuedCert) -> Arc<rustls::ClientConfig> {
        no_resumption(mtls_config(self.server_pki.ca_pem.as_bytes(), cert))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn required_client_certificate_is_verified_and_its_subject_replaces_the_clients_claim() {
    let m = mtls(&[]).await;
    assert!(m.sidecar.logs.text().contains("client certificates checked against"), "{}", m.sidecar.logs.text());

    let result = attempt(m.sidecar.addr, m.anonymous(), "localhost", &[]).await;
    assert_refused("no client certificate", &m.upstream, &m.sidecar, result, 0);
    let result =
        attempt(m.sidecar.addr, m.anonymous(), "localhost", &[("x-client-cert-subject", "CN=client.test")]).await;
    assert_refused("no client certificate, claiming a subject", &m.upstream, &m.sidecar, result, 0);

    let result = attempt(m.sidecar.addr, m.with_cert(&m.client), "localhost", &[]).await;
    let subjects = assert_ok_subjects("trusted client certificate", result, &m.upstream, &m.sidecar);
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert!(subjects[0].contains("CN=client.test"), "{subjects:?}");

    let result =
        attempt(m.sidecar.addr, m.with_cert(&m.client), "localhost", &[("X-Client-Cert-Subject", "CN=admin")]).await;
    let subjects = assert_ok_subjects("trusted client certificate, claiming CN=admin", result, &m.upstream, &m.sidecar);
    assert_eq!(subjects.len(), 1, "the client's claim is replaced, not added to: {subjects:?}");
    assert!(subjects[0].contains("CN=client.test") && !subjects[0].contains("admin"), "{subjects:?}");

    let seen = requests_seen(&m.upstream);
    let result = attempt(m.sidecar.addr, m.with_cert(&m.rogue), "localhost", &[]).await;
    assert_refused("certificate from another CA", &m.upstream, &m.sidecar, result, seen);
    let _ = &m.rogue_pki;
}

#[tokio::test(flavor = "multi_thread")]
async fn requested_client_certificate_is_optional_but_a_claimed_subject_never_passes() {
    let m = mtls(&["--client-auth", "request"]).await;

    let result = attempt(m.sidecar.addr, m.anonymous(), "localhost", &[]).await;
    let subjects = assert_ok_subjects("no client certificate", result, &m.upstream, &m.sidecar);
    assert!(subjects.is_empty(), "{subjects:?}");

    let result = attempt(m.sidecar.addr, m.anonymous(), "localhost", &[("X-Client-Cert-Subject", "CN=admin")]).await;
    let subjects = assert_ok_subjects("no client certificate, claiming CN=admin", result, &m.upstream, &m.sidecar);
    assert!(subjects.is_empty(), "a spoofed subject must be stripped: {subjects:?}");

    let result =
        attempt(m.sidecar.addr, m.with_cert(&m.client), "localhost", &[("X-Client-Cert-Subject", "CN=admin")]).await;
    let subjects = assert_ok_subjects("trusted client certificate", result, &m.upstream, &m.sidecar);
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert!(subjects[0].contains("CN=client.test") && !subjects[0].contains("admin"), "{subjects:?}");

    // "request" makes a certificate optional, not unverified.
    let seen = requests_seen(&m.upstream);
    let result = attempt(m.sidecar.addr, m.with_cert(&m.rogue), "localhost", &[]).await;
    assert_refused("certificate from another CA", &m.upstream, &m.sidecar, result, seen);
}

// ---------------------------------------------------------------------------------------------
// 5. The client CA reloads.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn client_ca_is_replaced_live_and_a_garbage_ca_file_is_refused() {
    let m = mtls(&[]).await;
    let next_pki = TestPki::new();
    let next_client = next_pki.issue_with("next-client", &["client.test"], -1, 30);
    let ca_file = m.client_pki.ca_path();

    let result = attempt(m.sidecar.addr, m.with_cert(&m.client), "localhost", &[]).await;
    assert_ok_subjects("old CA, before the change", result, &m.upstream, &m.sidecar);
    let seen = requests_seen(&m.upstream);
    let result = attempt(m.sidecar.addr, m.with_cert(&next_client), "localhost", &[]).await;
    assert_refused("new CA, before the change", &m.upstream, &m.sidecar, result, seen);

    let reloads = m.sidecar.logs.count("certificates reloaded");
    replace_file(&ca_file, next_pki.ca_pem.as_bytes());
    m.sidecar.logs.wait_for_nth("certificates reloaded", reloads + 1, LIMIT);

    let seen = requests_seen(&m.upstream);
    let result = attempt(m.sidecar.addr, m.with_cert(&m.client), "localhost", &[]).await;
    assert_refused("old CA, after the change", &m.upstream, &m.sidecar, result, seen);
    let result = attempt(m.sidecar.addr, m.with_cert(&next_client), "localhost", &[]).await;
    let subjects = assert_ok_subjects("new CA, after the change", result, &m.upstream, &m.sidecar);
    assert!(subjects.len() == 1 && subjects[0].contains("CN=client.test"), "{subjects:?}");

    // Garbage in place of the CA bundle: refused, naming the file; the new CA keeps working.
    let refusals = m.sidecar.logs.count("client CA file");
    replace_file(&ca_file, b"this is not a PEM certificate\n");
    let refused = m.sidecar.logs.wait_for_nth("client CA file", refusals + 1, LIMIT);
    assert!(refused.contains(s(&ca_file)) && refused.contains("refused"), "{refused}");
    let result = attempt(m.sidecar.addr, m.with_cert(&next_client), "localhost", &[]).await;
    assert_ok_subjects("new CA, after the garbage file", result, &m.upstream, &m.sidecar);
    let seen = requests_seen(&m.upstream);
    let result = attempt(m.sidecar.addr, m.with_cert(&m.client), "localhost", &[]).await;
    assert_refused("old CA, after the garbage file", &m.upstream, &m.sidecar, result, seen);
}

/// A client whose CA was removed must not get back in by resuming a session it opened before
/// the change: a resumed handshake restores the client certificate without verifying it again.
#[tokio::test(flavor = "multi_thread")]
async fn client_of_a_removed_ca_cannot_resume_its_old_session() {
    let m = mtls(&[]).await;
    let next_pki = TestPki::new();
    // The same ClientConfig for both connections: it keeps the session tickets, as real clients do.
    let old_client = mtls_config(m.server_pki.ca_pem.as_bytes(), &m.client);

    let tls = connect(m.sidecar.addr, old_client.clone(), dns("localhost")).await.expect("handshake before the change");
    assert_eq!(tls.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
    // Reading the response also takes in the tickets the server sent after the handshake.
    assert_ok_subjects("old CA, before the change", get(tls, "localhost", &[]).await, &m.upstream, &m.sidecar);

    let reloads = m.sidecar.logs.count("certificates reloaded");
    replace_file(&m.client_pki.ca_path(), next_pki.ca_pem.as_bytes());
    m.sidecar.logs.wait_for_nth("certificates reloaded", reloads + 1, LIMIT);

    let seen = requests_seen(&m.upstream);
    let (kind, result) = match connect(m.sidecar.addr, old_client, dns("localhost")).await {
        Ok(tls) => (tls.get_ref().1.handshake_kind(), get(tls, "localhost", &[]).await),
        Err(e) => (None, Err(format!("handshake failed: {e}"))),
    };
    let leaked = (seen < requests_seen(&m.upstream)).then(|| {
        m.upstream.last_request().headers.get("x-client-cert-subject").map(|v| v.to_str().unwrap().to_owned())
    });
    assert!(
        !matches!(result, Ok((StatusCode::OK, _))) && leaked.is_none(),
        "a client of the removed CA got in by resuming (handshake {kind:?}): {result:?}, upstream saw subject {leaked:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Without mutual TLS, nobody can claim a client subject.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn without_client_ca_a_claimed_subject_never_reaches_the_upstream() {
    for policy in ["overwrite", "trust"] {
        let (upstream, pki, sidecar) = proxy_in_front_of_upstream(&["--forwarded-headers", policy]).await;
        let config = no_resumption(client_config(pki.ca_pem.as_bytes(), H1));
        let result = attempt(
            sidecar.addr,
            config,
            "localhost",
            &[("X-Client-Cert-Subject", "CN=admin"), ("x-client-cert-subject", "CN=root")],
        )
        .await;
        let subjects = assert_ok_subjects(policy, result, &upstream, &sidecar);
        assert!(subjects.is_empty(), "--forwarded-headers {policy}: {subjects:?}");

        // HTTP/2 too: header names arrive lower-cased there, through another code path in hyper.
        let mut h2 = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), true).await;
        let response = h2
            .send(Request::get("/").header("x-client-cert-subject", "CN=admin").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            !upstream.last_request().headers.contains_key("x-client-cert-subject"),
            "--forwarded-headers {policy}, HTTP/2"
        );
    }
}
