mod common;

// The commands that help around the proxy, run as the real binary: `sidecar check` (validate a
// configuration without starting anything, listing every problem), `sidecar cert` (a local
// development CA and certificates it signs, verified here by a real client against a real
// proxy), and the hidden `sidecar generate` (shell completions and man pages).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;

/// Upper bound for one one-shot command; they normally take milliseconds.
const LIMIT: Duration = Duration::from_secs(20);

/// What a finished command left behind.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The lines of stderr that report a problem.
    fn errors(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("error: ")).collect()
    }

    fn warnings(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("warning: ")).collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `sidecar ARGS` with `envs` and an isolated HOME and XDG_STATE_HOME (so nothing outside
/// the test's temp dir is read or written); killed, failing the test, after `LIMIT` (a `check`
/// that wrongly starts a server must not hang the suite).
fn run_in(home: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut cmd = sidecar_command(args);
    cmd.env("HOME", home).env("XDG_STATE_HOME", home.join("state"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let output = output_within(cmd, LIMIT);
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let lower = run.stderr.to_ascii_lowercase();
    assert!(!lower.contains("panicked") && !lower.contains("backtrace"), "a command must never panic:\n{run:?}");
    run
}

fn sidecar(args: &[&str]) -> Run {
    let home = tempfile::tempdir().unwrap();
    run_in(home.path(), args, &[])
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

fn write_config(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// `sidecar proxy` with the same options, expected to refuse them: its error output.
fn proxy_refuses(args: &[&str]) -> String {
    let mut full = vec!["proxy"];
    full.extend_from_slice(args);
    let run = sidecar(&full);
    assert_eq!(run.code, 2, "the proxy refuses this configuration too: {run:?}");
    run.stderr
}

/// Exit 2 and exactly one problem, containing every needle; and `sidecar proxy` refuses the
/// same options with that same message: check predicts the start.
fn assert_one_problem(args: &[&str], needles: &[&str]) {
    let mut full = vec!["check"];
    full.extend_from_slice(args);
    let run = sidecar(&full);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stdout.is_empty(), "no OK summary when something is wrong: {run:?}");
    let errors = run.errors();
    assert_eq!(errors.len(), 1, "exactly one problem: {run:?}");
    for needle in needles {
        assert!(errors[0].contains(needle), "the problem mentions {needle:?}: {run:?}");
    }
    let message = errors[0].trim_start_matches("error: ");
    let proxy = proxy_refuses(args);
    assert!(proxy.contains(message), "`sidecar proxy` stops with the same message {message:?}; it said:\n{proxy}");
}

// ---------------------------------------------------------------------------------------------
// sidecar check
// ---------------------------------------------------------------------------------------------

#[test]
fn check_accepts_a_good_config_file_and_summarises_its_certificates() {
    let pki = TestPki::new();
    // Far from expiry: the harness's default 30 days would (rightly) draw a warning.
    let leaf = pki.issue_with("leaf", &["localhost", "127.0.0.1"], -1, 200);
    let api = pki.issue_with("api", &["api.example.test"], -1, 200);
    let config = write_config(
        pki.dir.path(),
        "sidecar.toml",
        &format!(
            "[proxy]\nupstream = \"http://127.0.0.1:8080\"\nlisten = \"127.0.0.1:9443\"\ncert = \"{}\"\nkey = \"{}\"\n\
             sni-cert = [\"{}:{}\"]\nclient-ca = \"{}\"\nupstream-timeout = \"30s\"\n",
            s(&leaf.cert),
            s(&leaf.key),
            s(&api.cert),
            s(&api.key),
            s(&pki.ca_path())
        ),
    );
    let run = sidecar(&["check", "--config", s(&config)]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.starts_with("OK:"), "{run:?}");
    for needle in [
        leaf.serial.as_str(),
        api.serial.as_str(),
        s(&leaf.cert),
        s(&api.cert),
        "http://127.0.0.1:8080",
        "127.0.0.1:9443",
        "CN=localhost",
        "api.example.test",
        "sidecar test CA",
        s(&config),
    ] {
        assert!(run.stdout.contains(needle), "the summary mentions {needle}: {run:?}");
    }
    assert!(run.errors().is_empty() && run.warnings().is_empty(), "{run:?}");
}

#[test]
fn check_takes_the_proxy_flags_and_environment_too() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let run =
        sidecar(&["check", "--upstream", "http://127.0.0.1:8080", "--cert", s(&leaf.cert), "--key", s(&leaf.key)]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.starts_with("OK:") && run.stdout.contains(&leaf.serial), "{run:?}");

    let home = tempfile::tempdir().unwrap();
    let run = run_in(
        home.path(),
        &["check"],
        &[("SIDECAR_UPSTREAM", "127.0.0.1:8081"), ("SIDECAR_CERT", s(&leaf.cert)), ("SIDECAR_KEY", s(&leaf.key))],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("http://127.0.0.1:8081") && run.stdout.contains(&leaf.serial), "{run:?}");
}

#[test]
fn check_without_a_certificate_describes_the_development_certificate_and_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let run = run_in(home.path(), &["check", "--upstream", "http://127.0.0.1:8080"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("development certificate") && run.stdout.contains(s(&home.path().join("state/sidecar"))),
        "{run:?}"
    );
    assert!(!home.path().join("state").exists(), "check created the state directory");
}

#[test]
fn check_reports_a_missing_certificate_file() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let missing = pki.dir.path().join("missing.crt");
    assert_one_problem(
        &["--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", "--cert", s(&missing), "--key", s(&leaf.key)],
        &[s(&missing), "No such file"],
    );
}

#[test]
fn check_reports_a_key_that_does_not_match_its_certificate() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let other = pki.issue("other");
    assert_one_problem(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
            "--cert",
            s(&leaf.cert),
            "--key",
            s(&other.key),
        ],
        &["does not match", s(&leaf.cert), s(&other.key)],
    );
}

#[test]
fn check_and_proxy_name_an_encrypted_key_as_encrypted() {
    if !require_tool("openssl") {
        return;
    }
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let encrypted = pki.dir.path().join("encrypted.key");
    let legacy = pki.dir.path().join("legacy.key");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&["pkcs8", "-topk8", "-in", s(&leaf.key), "-out", s(&encrypted), "-passout", "pass:secret"]);
    // The pre-PKCS#8 form: `Proc-Type: 4,ENCRYPTED` inside an EC PRIVATE KEY block.
    openssl(&["ec", "-in", s(&leaf.key), "-out", s(&legacy), "-aes256", "-passout", "pass:secret"]);
    for key in [&encrypted, &legacy] {
        assert_one_problem(
            &["--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", "--cert", s(&leaf.cert), "--key", s(key)],
            &[s(key), "encrypted", "unencrypted", "openssl pkey"],
        );
    }
}

#[test]
fn check_reports_an_expired_certificate() {
    let pki = TestPki::new();
    let old = pki.issue_with("old", &["localhost"], -30, -1);
    assert_one_problem(
        &["--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", "--cert", s(&old.cert), "--key", s(&old.key)],
        &[s(&old.cert), "expired"],
    );
}

#[test]
fn check_reports_a_bad_upstream_in_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "c.toml", "[proxy]\nupstream = \"https://app.internal:8080/v1\"\n");
    assert_one_problem(
        &["--listen", "127.0.0.1:0", "--config", s(&config)],
        &[s(&config), "https://app.internal:8080/v1", "--upstream", "scheme https is not supported"],
    );
}

#[test]
fn check_reports_an_unknown_key_in_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        write_config(dir.path(), "c.toml", "[proxy]\nupstream = \"http://127.0.0.1:9\"\nlisten_adress = \"x\"\n");
    assert_one_problem(
        &["--listen", "127.0.0.1:0", "--config", s(&config)],
        &[s(&config), "no option `listen_adress`"],
    );
}

#[test]
fn check_lists_every_problem_at_once() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let api = pki.issue_with("api", &["api.example.test"], -1, 30);
    let old = pki.issue_with("old", &["old.example.test"], -30, -1);
    let missing = pki.dir.path().join("missing.crt");
    let not_a_ca = write_config(pki.dir.path(), "not-a-ca.pem", "this is not PEM\n");
    let config = write_config(
        pki.dir.path(),
        "broken.toml",
        &format!(
            "[proxy]\nupstream = \"ftp://app:21\"\nbogus-option = 1\nupstream-timeout = \"soon\"\nclient-auth = \"maybe\"\n\
             cert = \"{}\"\nkey = \"{}\"\nsni-cert = [\"{}:{}\", \"{}:{}\"]\nclient-ca = \"{}\"\n[server]\nport = 1\n",
            s(&missing),
            s(&leaf.key),
            s(&api.cert),
            s(&leaf.key),
            s(&old.cert),
            s(&old.key),
            s(&not_a_ca),
        ),
    );
    let home = tempfile::tempdir().unwrap();
    let run = run_in(
        home.path(),
        &["check", "--config", s(&config), "--max-connections", "0", "--admin", "0.0.0.0:9901"],
        &[("SIDECAR_LISTEN", "not-an-address")],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    let expected: Vec<Vec<&str>> = vec![
        vec![s(&config), "no option `bogus-option`"],
        vec![s(&config), "unknown table [server]"],
        vec![s(&config), "ftp://app:21", "--upstream"],
        vec![s(&config), "'soon'", "--upstream-timeout"],
        vec![s(&config), "'maybe'", "--client-auth", "require, request"],
        vec!["SIDECAR_LISTEN", "not-an-address"],
        vec!["--max-connections", "'0'"],
        vec![s(&missing), "No such file"],
        vec!["does not match", s(&api.cert), s(&leaf.key)],
        vec![s(&old.cert), "expired"],
        vec![s(&not_a_ca), "client CA"],
        vec!["0.0.0.0:9901", "admin"],
    ];
    let errors = run.errors();
    for needles in &expected {
        assert!(
            errors.iter().any(|line| needles.iter().all(|n| line.contains(n))),
            "one problem line mentions all of {needles:?}: {run:?}"
        );
    }
    assert_eq!(errors.len(), expected.len(), "one line per problem, none twice: {run:?}");
    assert!(run.stderr.contains(&format!("{} problems", expected.len())), "{run:?}");
}

#[test]
fn check_warns_about_a_certificate_that_expires_within_30_days() {
    let pki = TestPki::new();
    let soon = pki.issue_with("soon", &["localhost"], -300, 10);
    let run =
        sidecar(&["check", "--upstream", "http://127.0.0.1:8080", "--cert", s(&soon.cert), "--key", s(&soon.key)]);
    assert_eq!(run.code, 0, "a certificate that still works is not an error: {run:?}");
    assert!(run.stdout.starts_with("OK:"), "{run:?}");
    let warnings = run.warnings();
    assert_eq!(warnings.len(), 1, "{run:?}");
    assert!(warnings[0].contains(s(&soon.cert)) && warnings[0].contains(&soon.serial), "{run:?}");
    assert!(warnings[0].contains("expires in 9 days") || warnings[0].contains("expires in 10 days"), "{run:?}");
}

#[test]
fn check_binds_no_port_and_contacts_no_upstream() {
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    // Ports held by this test: the one the proxy would serve on, and a stand-in for the app.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let app = TcpListener::bind("127.0.0.1:0").unwrap();
    app.set_nonblocking(true).unwrap();
    let upstream = format!("http://{}", app.local_addr().unwrap());
    let redirect = TcpListener::bind("127.0.0.1:0").unwrap();
    let redirect_addr = redirect.local_addr().unwrap().to_string();
    let args = [
        "--listen",
        listen.as_str(),
        "--redirect-http",
        redirect_addr.as_str(),
        "--upstream",
        upstream.as_str(),
        "--cert",
        s(&leaf.cert),
        "--key",
        s(&leaf.key),
    ];

    let mut full = vec!["check"];
    full.extend_from_slice(&args);
    let run = sidecar(&full);
    assert_eq!(run.code, 0, "check succeeds on a port it could not have bound: {run:?}");
    assert!(run.stdout.contains(&listen), "{run:?}");

    let port = held.local_addr().unwrap().port();
    assert_eq!(listeners_on(port), 1, "the test's listener is still the only one on {port}");
    // A client reaches the test's listener, not anything check left behind.
    let _client = std::net::TcpStream::connect(held.local_addr().unwrap()).unwrap();
    held.set_nonblocking(false).unwrap();
    let (_, peer) = held.accept().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::from([127, 0, 0, 1]));
    match app.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("check connected to the upstream: {other:?}"),
    }
    // The contrast: starting the proxy on that port fails, because the port is taken.
    let stderr = proxy_refuses(&args);
    assert!(stderr.contains(&format!("cannot listen on {listen}")), "{stderr}");
}

#[test]
fn check_accepts_sync_tables_without_contacting_their_sources() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    let source = dir.path().join("source.conf");
    std::fs::write(&source, "answer = 42\n").unwrap();
    let config = write_config(
        dir.path(),
        "with-sync.toml",
        &format!(
            "[proxy]\nupstream = \"http://127.0.0.1:8080\"\n\n[[sync]]\nsource = \"{}\"\ndest = \"{}\"\n",
            s(&source),
            s(&dest)
        ),
    );
    let run = sidecar(&["check", "--config", s(&config)]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("1 [[sync]] destination"), "{run:?}");
    assert!(!dest.exists(), "check must not sync anything");
}

#[test]
fn two_sync_tables_on_one_file_through_a_symlinked_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir_all(&real).unwrap();
    let linked = dir.path().join("linked");
    std::os::unix::fs::symlink(&real, &linked).unwrap();
    let source = dir.path().join("source.conf");
    std::fs::write(&source, "answer = 42\n").unwrap();
    let table = |name: &str, dest: &Path| {
        format!("[[sync]]\nname = \"{name}\"\nsource = \"{}\"\ndest = \"{}\"\n", s(&source), s(dest))
    };
    let config = write_config(
        dir.path(),
        "two-syncs.toml",
        &format!(
            "[proxy]\nupstream = \"http://127.0.0.1:8080\"\n\n{}\n{}",
            table("one", &real.join("app.conf")),
            table("two", &linked.join("app.conf"))
        ),
    );
    let run = sidecar(&["check", "--config", s(&config)]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("two sync destinations write"), "{run:?}");
    let stderr = proxy_refuses(&["--config", s(&config)]);
    assert!(stderr.contains("two sync destinations write"), "{stderr}");
}

#[test]
fn check_usage_errors_are_clap_usage_errors() {
    let run = sidecar(&["check", "--bogus"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--bogus"), "{run:?}");

    let run = sidecar(&["check"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.errors().len(), 1, "{run:?}");
    assert!(run.errors()[0].contains("no upstream"), "{run:?}");
}

#[test]
fn listen_takes_a_port_a_colon_port_or_a_host_name_and_explains_its_forms() {
    let home = tempfile::tempdir().unwrap();
    let check =
        |listen: &str| run_in(home.path(), &["check", "--upstream", "http://127.0.0.1:9", "--listen", listen], &[]);
    for (listen, shown) in [("8443", "https://0.0.0.0:8443 "), (":8443", "https://0.0.0.0:8443 ")] {
        let run = check(listen);
        assert_eq!(run.code, 0, "--listen {listen}: {run:?}");
        assert!(run.stdout.contains(shown), "--listen {listen} is all interfaces: {run:?}");
    }
    let run = check("localhost:8443");
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("https://127.0.0.1:8443 ") || run.stdout.contains("https://[::1]:8443 "), "{run:?}");
    for bad in ["local host", "8443x", "70000", "[::1]"] {
        let run = check(bad);
        assert_eq!(run.code, 2, "--listen {bad}: {run:?}");
        assert!(run.stderr.contains("localhost:8443, :8443, 8443"), "--listen {bad} shows the forms: {run:?}");
    }
    // The same parse serves the admin API's address.
    let run = run_in(home.path(), &["check", "--upstream", "http://127.0.0.1:9", "--admin", "localhost:9901"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
}

// ---------------------------------------------------------------------------------------------
// sidecar cert
// ---------------------------------------------------------------------------------------------

fn pem_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    CertificateDer::pem_slice_iter(&pem).next().expect("a PEM certificate").expect("valid PEM").as_ref().to_vec()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

const P256: &str = "1.2.840.10045.3.1.7";

fn curve_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    let params = cert.public_key().algorithm.parameters.as_ref().expect("EC parameters");
    params.as_oid().expect("a named curve").to_id_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_makes_a_ca_and_a_certificate_that_a_client_trusting_only_the_ca_accepts_from_the_proxy() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("certs");
    let run = run_in(home.path(), &["cert", "--dir", s(&dir)], &[("USER", "alice")]);
    assert_eq!(run.code, 0, "{run:?}");
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let (leaf, leaf_key) = (dir.join("localhost+2.pem"), dir.join("localhost+2-key.pem"));

    // What it prints: where, how to serve, how to trust.
    for needle in [
        "Created the development CA",
        s(&ca),
        &format!("sidecar proxy --upstream http://127.0.0.1:8080 --cert {} --key {}", s(&leaf), s(&leaf_key)),
        &format!(
            "sudo cp {} /usr/local/share/ca-certificates/sidecar-dev-ca.crt && sudo update-ca-certificates",
            s(&ca)
        ),
        "/etc/pki/ca-trust/source/anchors/",
        "update-ca-trust",
        &format!("sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {}", s(&ca)),
        &format!("certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n sidecar-dev-ca -i {}", s(&ca)),
    ] {
        assert!(run.stdout.contains(needle), "the output mentions {needle:?}:\n{}", run.stdout);
    }

    // The certificates themselves.
    let ca_der = pem_der(&ca);
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert!(ca_cert.is_ca(), "the CA is a CA");
    let cn = ca_cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_owned();
    assert!(cn.starts_with("sidecar development CA (alice@") && cn.ends_with(')'), "{cn}");
    assert_eq!(curve_of(&ca_cert), P256);
    let ca_days = (ca_cert.validity().not_after.timestamp() - ca_cert.validity().not_before.timestamp()) / 86400;
    assert!((3640..=3660).contains(&ca_days), "the CA lasts ten years: {ca_days} days");

    let leaf_der = pem_der(&leaf);
    let (_, leaf_cert) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    assert!(!leaf_cert.is_ca());
    assert_eq!(curve_of(&leaf_cert), P256);
    assert_eq!(leaf_cert.issuer(), ca_cert.subject());
    let eku = leaf_cert.extended_key_usage().unwrap().expect("an extended key usage").value;
    assert!(eku.server_auth, "serverAuth");
    let leaf_days = (leaf_cert.validity().not_after.timestamp() - leaf_cert.validity().not_before.timestamp()) / 86400;
    assert!((360..=370).contains(&leaf_days), "the certificate lasts about a year: {leaf_days} days");
    assert_eq!(mode(&ca_key), 0o600, "the CA key is private");
    assert_eq!(mode(&leaf_key), 0o600, "the certificate key is private");

    // A real proxy serving it, and a client trusting only the CA.
    let upstream = Upstream::start().await;
    let url = upstream.url();
    let sidecar = Sidecar::start(&["--upstream", &url, "--cert", s(&leaf), "--key", s(&leaf_key)]);
    let ca_pem = std::fs::read(&ca).unwrap();
    for name in ["localhost", "127.0.0.1", "::1"] {
        let tls = tls_connect(sidecar.addr, client_config(&ca_pem, &[b"http/1.1"]), name).await;
        assert!(tls.is_ok(), "a client trusting only the CA verifies the proxy as {name}: {:?}", tls.err());
    }
    let mut conn = HttpsConnection::open(sidecar.addr, &ca_pem, true).await;
    let (status, _, body) = conn.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from upstream\n"));
    // The verification means something: another CA's clients refuse the same server.
    let stranger = TestPki::new();
    let refused =
        tls_connect(sidecar.addr, client_config(stranger.ca_pem.as_bytes(), &[b"http/1.1"]), "localhost").await;
    assert!(refused.is_err(), "a client trusting another CA must refuse the certificate");
}

#[test]
fn cert_reuses_the_ca_and_issues_a_new_certificate_on_every_run() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("certs");
    let first = run_in(home.path(), &["cert", "--dir", s(&dir)], &[]);
    assert_eq!(first.code, 0, "{first:?}");
    let ca_before = pem_der(&dir.join("ca.pem"));
    let ca_key_before = std::fs::read(dir.join("ca-key.pem")).unwrap();
    let leaf_before = pem_der(&dir.join("localhost+2.pem"));

    let second = run_in(home.path(), &["cert", "--dir", s(&dir)], &[]);
    assert_eq!(second.code, 0, "{second:?}");
    assert!(second.stdout.contains("Reusing the development CA"), "{second:?}");
    assert_eq!(pem_der(&dir.join("ca.pem")), ca_before, "the same CA certificate");
    assert_eq!(std::fs::read(dir.join("ca-key.pem")).unwrap(), ca_key_before, "the same CA key");
    let leaf_after = pem_der(&dir.join("localhost+2.pem"));
    assert_ne!(leaf_after, leaf_before, "a new certificate");
    assert_eq!(mode(&dir.join("localhost+2-key.pem")), 0o600);
    let (_, before) = x509_parser::parse_x509_certificate(&leaf_before).unwrap();
    let (_, after) = x509_parser::parse_x509_certificate(&leaf_after).unwrap();
    assert_ne!(before.raw_serial(), after.raw_serial(), "a new serial");

    // Other names, a wildcard among them, from the same CA; openssl agrees it chains.
    let third = run_in(home.path(), &["cert", "--dir", s(&dir), "app.test", "*.app.test", "10.1.2.3"], &[]);
    assert_eq!(third.code, 0, "{third:?}");
    assert_eq!(pem_der(&dir.join("ca.pem")), ca_before);
    let issued = dir.join("app.test+2.pem");
    let issued_der = pem_der(&issued);
    let (_, app) = x509_parser::parse_x509_certificate(&issued_der).unwrap();
    let san = format!("{:?}", app.subject_alternative_name().unwrap().expect("a subjectAltName").value.general_names);
    assert!(san.contains("\"app.test\"") && san.contains("\"*.app.test\"") && san.contains("[10, 1, 2, 3]"), "{san}");
    if require_tool("openssl") {
        let out = Command::new("openssl")
            .args(["verify", "-purpose", "sslserver", "-CAfile", s(&dir.join("ca.pem")), s(&issued)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `sidecar cert --install` with a temporary HOME, then a real browser through the proxy: no
/// certificate error; after `--uninstall`, the same page is refused again.
#[tokio::test(flavor = "multi_thread")]
async fn cert_install_makes_headless_chromium_trust_the_proxy_and_uninstall_undoes_it() {
    if !require_tool("chromium") || !require_tool("certutil") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("ca");
    // The NSS databases only: the machine's system store is not the test's to change.
    let install = ["cert", "--install", "--trust-stores", "nss", "--dir", s(&dir)];
    let run = run_in(home.path(), &install, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let nssdb = home.path().join(".pki/nssdb");
    assert!(run.stdout.contains(&format!("added: NSS database {} (Chrome/Chromium)", nssdb.display())), "{run:?}");

    let upstream = Upstream::start().await;
    let (cert, key) = (dir.join("localhost+2.pem"), dir.join("localhost+2-key.pem"));
    let sidecar = Sidecar::start(&["--upstream", &upstream.url(), "--cert", s(&cert), "--key", s(&key)]);
    let url = format!("https://localhost:{}/", sidecar.addr.port());
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let shot = shots.join("chromium-after-cert-install.png");
    let (trusted, log) = chromium_load(home.path(), &url, &shot);
    assert!(trusted.contains("hello from upstream"), "Chromium showed:\n{trusted}\n{log}");
    assert!(shot.exists(), "a screenshot of the page: {log}");
    let agent = upstream.last_request().headers["user-agent"].to_str().unwrap().to_owned();
    assert!(agent.contains("HeadlessChrome"), "{agent}");

    let uninstall = ["cert", "--uninstall", "--trust-stores", "nss", "--dir", s(&dir)];
    let run = run_in(home.path(), &uninstall, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(&format!("removed: NSS database {}", nssdb.display())), "{run:?}");
    let (refused, log) = chromium_load(home.path(), &url, &shots.join("chromium-after-cert-uninstall.png"));
    assert!(!refused.contains("hello from upstream"), "the CA is trusted no more:\n{refused}");
    assert!(log.contains("ERR_CERT_AUTHORITY_INVALID"), "{refused}\n{log}");
}

#[test]
fn cert_defaults_to_the_proxy_state_directory() {
    let home = tempfile::tempdir().unwrap();
    let run = run_in(home.path(), &["cert"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let state = home.path().join("state/sidecar");
    assert!(state.join("ca.pem").is_file() && state.join("localhost+2.pem").is_file(), "{run:?}");
    assert!(run.stdout.contains(s(&state.join("ca.pem"))), "{run:?}");

    let elsewhere = home.path().join("elsewhere");
    let run = run_in(home.path(), &["cert"], &[("SIDECAR_STATE_DIR", s(&elsewhere))]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(elsewhere.join("ca.pem").is_file(), "SIDECAR_STATE_DIR, as for the proxy: {run:?}");
}

#[test]
fn cert_refuses_bad_input_with_one_error_line() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let half = home.path().join("half");
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join("ca.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    let broken = home.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("ca.pem"), "not a certificate\n").unwrap();
    std::fs::write(broken.join("ca-key.pem"), "not a key\n").unwrap();
    let (half_ca, half_key, broken_ca) = (half.join("ca.pem"), half.join("ca-key.pem"), broken.join("ca.pem"));
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["cert", "--dir", s(home.path()), "not a name"], vec!["`not a name`"]),
        (vec!["cert", "--dir", s(&file)], vec![s(&file)]),
        (vec!["cert", "--dir", s(&half)], vec![s(&half_ca), s(&half_key)]),
        (vec!["cert", "--dir", s(&broken)], vec![s(&broken_ca), "remove"]),
    ];
    for (args, needles) in cases {
        let run = run_in(home.path(), &args, &[]);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {run:?}");
        assert!(lines[0].starts_with("sidecar: error: "), "{run:?}");
        for needle in needles {
            assert!(lines[0].contains(needle), "{args:?}: mentions {needle:?}: {run:?}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(broken.join("ca.pem")).unwrap(),
        "not a certificate\n",
        "a CA is never silently replaced"
    );
}

// ---------------------------------------------------------------------------------------------
// sidecar generate (hidden)
// ---------------------------------------------------------------------------------------------

#[test]
fn generate_completions_cover_the_commands_and_flags_for_every_shell() {
    let run = sidecar(&["generate", "completions", "bash"]);
    assert_eq!(run.code, 0, "{run:?}");
    for needle in ["sidecar", "proxy", "check", "cert", "--upstream", "--cert", "--sni-cert", "--config"] {
        assert!(run.stdout.contains(needle), "the bash script mentions {needle}");
    }
    if which("bash") {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("sidecar.bash");
        std::fs::write(&script, &run.stdout).unwrap();
        let syntax = Command::new("bash").arg("-n").arg(&script).output().unwrap();
        assert!(syntax.status.success(), "bash -n: {}", String::from_utf8_lossy(&syntax.stderr));
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let run = sidecar(&["generate", "completions", shell]);
        assert_eq!(run.code, 0, "{shell}: {run:?}");
        assert!(run.stdout.contains("upstream") && run.stdout.contains("sidecar"), "{shell}: {run:?}");
    }
    let run = sidecar(&["generate", "completions", "tcsh"]);
    assert_eq!(run.code, 2, "an unknown shell is a usage error: {run:?}");
}

#[test]
fn generate_man_prints_a_page_that_man_can_read() {
    let run = sidecar(&["generate", "man"]);
    assert_eq!(run.code, 0, "{run:?}");
    let roff = &run.stdout;
    // clap_mangen puts two lines defining the apostrophe string before the title.
    let th = roff.lines().position(|l| l.starts_with(".TH SIDECAR 1")).expect("a .TH SIDECAR 1 title line");
    let first_section = roff.lines().position(|l| l.starts_with(".SH")).expect("sections");
    assert!(th < first_section && th <= 2, "the title comes first:\n{roff}");
    assert!(roff.contains(r"\-\-upstream") || roff.contains("--upstream"), "{roff}");
    for command in ["proxy", "sync", "check", "cert"] {
        assert!(roff.contains(&format!(r"sidecar\-{command}(1)")), "the page lists {command}:\n{roff}");
    }
    assert!(!roff.contains("generate") && !roff.contains(r"sidecar\-help"), "no hidden or phantom commands:\n{roff}");

    if which("man") {
        let dir = tempfile::tempdir().unwrap();
        let page = dir.path().join("sidecar.1");
        std::fs::write(&page, roff).unwrap();
        let out = Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "man -l: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("SIDECAR") && text.contains("--upstream"), "man renders it:\n{text}");
    }
}

#[test]
fn generate_man_dir_writes_one_page_per_command() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("man/man1");
    let run = run_in(home.path(), &["generate", "man", "--dir", s(&dir)], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let mut pages: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    pages.sort();
    assert_eq!(
        pages,
        ["sidecar-cert.1", "sidecar-check.1", "sidecar-fleet.1", "sidecar-proxy.1", "sidecar-sync.1", "sidecar.1"]
    );
    for page in &pages {
        assert!(run.stdout.contains(s(&dir.join(page))), "it says it wrote {page}: {run:?}");
        let roff = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(roff.lines().any(|l| l.starts_with(".TH SIDECAR")), "{page}");
    }
    let proxy = std::fs::read_to_string(dir.join("sidecar-proxy.1")).unwrap();
    for needle in [r"\-\-upstream", "SIDECAR_UPSTREAM", r"\-\-sni\-cert", r"\-\-client\-ca"] {
        assert!(proxy.contains(needle), "sidecar-proxy.1 documents {needle}");
    }

    let file = home.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let run = run_in(home.path(), &["generate", "man", "--dir", s(&file)], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.starts_with("sidecar: error: ") && run.stderr.contains(s(&file)), "{run:?}");
}

#[test]
fn generate_is_hidden_from_help() {
    let run = sidecar(&["--help"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stdout.contains("generate"), "{}", run.stdout);
    for command in ["proxy", "sync", "check", "cert"] {
        assert!(run.stdout.contains(&format!("  {command} ")), "`sidecar --help` lists {command}:\n{}", run.stdout);
    }
    // Hidden, not absent.
    let run = sidecar(&["generate", "--help"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("completions") && run.stdout.contains("man"), "{run:?}");
}

// ---------------------------------------------------------------------------------------------
// Closed output streams
// ---------------------------------------------------------------------------------------------

/// The write end of a pipe whose reader has exited: writing to it fails with EPIPE, as for
/// `sidecar check ... | head -1` once head has its line.
fn closed_pipe() -> std::process::Stdio {
    let mut reader = Command::new("true").stdin(std::process::Stdio::piped()).spawn().unwrap();
    let writer = reader.stdin.take().unwrap();
    reader.wait().unwrap();
    writer.into()
}

/// (exit code, what the other stream said) of `sidecar ARGS` with stdout, or else stderr, closed.
fn with_closed(stream: &str, home: &Path, args: &[&str]) -> (i32, String) {
    let mut cmd = sidecar_command(args);
    cmd.env("HOME", home).env("XDG_STATE_HOME", home.join("state"));
    let output = if stream == "stdout" {
        cmd.stdin(std::process::Stdio::null()).stdout(closed_pipe()).stderr(std::process::Stdio::piped());
        cmd.output().unwrap()
    } else {
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(closed_pipe());
        cmd.output().unwrap()
    };
    let other = if stream == "stdout" { &output.stderr } else { &output.stdout };
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(other).into_owned())
}

#[test]
fn no_command_panics_on_a_closed_stdout_or_stderr() {
    let home = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let leaf = pki.issue_with("leaf", &["localhost"], -1, 200);
    let good = ["check", "--upstream", "http://127.0.0.1:9", "--cert", s(&leaf.cert), "--key", s(&leaf.key)];
    let bad = ["check", "--upstream", "http://127.0.0.1:9", "--cert", "/nonexistent.pem", "--key", s(&leaf.key)];
    let cases: [(&str, &[&str], i32); 8] = [
        ("stdout", &good, 0),
        ("stderr", &bad, 2),
        ("stdout", &["cert", "example.test"], 0),
        ("stderr", &["cert", "--dir", "/proc/nope", "example.test"], 2),
        ("stdout", &["generate", "completions", "bash"], 0),
        ("stdout", &["generate", "man"], 0),
        ("stdout", &["--help"], 0),
        ("stderr", &["proxy", "--config", "/nonexistent/sidecar.toml"], 2),
    ];
    for (stream, args, expected) in cases {
        let (code, other) = with_closed(stream, home.path(), args);
        assert_eq!(code, expected, "sidecar {args:?} with {stream} closed; the other stream said:\n{other}");
        assert!(!other.contains("panicked"), "sidecar {args:?} with {stream} closed:\n{other}");
    }
}
