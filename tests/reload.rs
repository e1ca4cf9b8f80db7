//! Hot reload: certificates and the proxy config swapped under a running proxy, bad files
//! refused while the old ones keep serving, and a load test that counts failed requests.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;

fn leaf_der(cert: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(cert).unwrap().next().unwrap().unwrap().to_vec()
}

/// The leaf a fresh handshake is served.
async fn served_leaf(addr: std::net::SocketAddr, ca: &str) -> Vec<u8> {
    let tls = tls_connect(addr, client_config(ca.as_bytes(), &[b"http/1.1"]), "localhost").await.expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Polls fresh handshakes until `expected` is served; returns how long that took.
async fn wait_until_served(addr: std::net::SocketAddr, ca: &str, expected: &[u8], since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(10);
    loop {
        if served_leaf(addr, ca).await == expected {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "the new certificate was not served within 10 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Replaces `dir/name` the way editors and `mv` do: write a temp file, rename over.
fn rename_over(source: &Path, dir: &Path, name: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(source, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn install_pair(pair: &IssuedCert, dir: &Path) {
    rename_over(&pair.key, dir, "tls.key");
    rename_over(&pair.cert, dir, "tls.crt");
}

struct Fixture {
    upstream: Upstream,
    pki: TestPki,
    dir: tempfile::TempDir,
    sidecar: Sidecar,
}

async fn start(extra: &[&str]) -> Fixture {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    install_pair(&pki.issue("first"), dir.path());
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let url = upstream.url();
    let mut args = vec!["--upstream", &url, "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()];
    if !extra.contains(&"--reload-debounce") {
        args.extend_from_slice(&["--reload-debounce", "20ms"]);
    }
    args.extend_from_slice(extra);
    let sidecar = Sidecar::start(&args);
    Fixture { upstream, pki, dir, sidecar }
}

#[tokio::test(flavor = "multi_thread")]
async fn rename_over_swaps_the_certificate_and_open_connections_keep_working() {
    let f = start(&[]).await;
    let mut open_h2 = HttpsConnection::open(f.sidecar.addr, f.pki.ca_pem.as_bytes(), true).await;
    let mut open_h1 = HttpsConnection::open(f.sidecar.addr, f.pki.ca_pem.as_bytes(), false).await;
    assert_eq!(open_h2.get("/").await.0, StatusCode::OK);

    let second = f.pki.issue("second");
    install_pair(&second, f.dir.path());
    let latency = wait_until_served(f.sidecar.addr, &f.pki.ca_pem, &leaf_der(&second.cert), Instant::now()).await;
    eprintln!("rename-over visible after {latency:?}");
    f.sidecar.logs.wait_for(&format!("serial {}", second.serial), Duration::from_secs(5));

    for _ in 0..5 {
        assert_eq!(open_h2.get("/").await.0, StatusCode::OK, "an open HTTP/2 connection survives the swap");
        assert_eq!(open_h1.get("/").await.0, StatusCode::OK, "an open HTTP/1.1 connection survives the swap");
    }
    drop(f.upstream);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_files_rewritten_in_place_are_seen() {
    // `cp new.pem tls.crt` and `cat > tls.crt` keep the inode: no rename for the watch to see,
    // only the write, and the close that ends it.
    let f = start(&[]).await;
    let second = f.pki.issue("second");
    std::fs::write(f.dir.path().join("tls.key"), std::fs::read(&second.key).unwrap()).unwrap();
    std::fs::write(f.dir.path().join("tls.crt"), std::fs::read(&second.cert).unwrap()).unwrap();
    let latency = wait_until_served(f.sidecar.addr, &f.pki.ca_pem, &leaf_der(&second.cert), Instant::now()).await;
    eprintln!("in-place rewrite visible after {latency:?}");
    f.sidecar.logs.wait_for(&format!("serial {}", second.serial), Duration::from_secs(5));
    drop(f.upstream);
}

/// The masks of the inotify watches `pid` holds, from /proc/PID/fdinfo.
fn inotify_watch_masks(pid: u32) -> Vec<u32> {
    let mut masks = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if std::fs::read_link(fd.path()).is_ok_and(|target| target.to_string_lossy().contains("inotify")) {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()));
            for word in info.unwrap_or_default().split_whitespace() {
                if let Some(hex) = word.strip_prefix("mask:") {
                    masks.push(u32::from_str_radix(hex, 16).unwrap());
                }
            }
        }
    }
    masks
}

/// Context switches of the process's file-watching thread so far.
fn watcher_thread_switches(pid: u32) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("notify-rs") {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            return status
                .lines()
                .filter(|l| l.contains("voluntary_ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        }
    }
    panic!("no notify-rs thread in /proc/{pid}/task");
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_to_other_files_beside_the_certificate_do_not_wake_the_proxy() {
    // A log written next to the certificate (an app's, a load generator's) used to wake the
    // watcher thread at every write(), with an inotify event for each write and each open.
    const IN_ACCESS: u32 = 0x1;
    const IN_MODIFY: u32 = 0x2;
    const IN_CLOSE_WRITE: u32 = 0x8;
    const IN_CLOSE_NOWRITE: u32 = 0x10;
    const IN_OPEN: u32 = 0x20;
    const IN_MOVED_TO: u32 = 0x80;
    const IN_CREATE: u32 = 0x100;
    let f = start(&[]).await;
    let masks = inotify_watch_masks(f.sidecar.pid());
    assert_eq!(masks.len(), 1, "one watch, on the certificates' directory: {masks:x?}");
    let mask = masks[0];
    assert_eq!(
        mask & (IN_ACCESS | IN_MODIFY | IN_OPEN | IN_CLOSE_NOWRITE),
        0,
        "mask {mask:#x} asks for reads and writes"
    );
    assert_eq!(
        mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE),
        IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE,
        "mask {mask:#x}"
    );

    use std::io::Write;
    let mut logs = [
        std::fs::File::create(f.dir.path().join("a.log")).unwrap(),
        std::fs::File::create(f.dir.path().join("b.log")).unwrap(),
    ];
    let mut client = HttpsConnection::open(f.sidecar.addr, f.pki.ca_pem.as_bytes(), false).await;
    let before = watcher_thread_switches(f.sidecar.pid());
    // As an app logs what it serves: a line per request, to alternate files so that inotify
    // cannot merge an event into the one before.
    for i in 0..400 {
        assert_eq!(client.get("/").await.0, StatusCode::OK);
        logs[i % 2].write_all(format!("request {i}\n").as_bytes()).unwrap();
    }
    // What does concern it still gets through, after everything before it in the queue.
    let second = f.pki.issue("second");
    install_pair(&second, f.dir.path());
    wait_until_served(f.sidecar.addr, &f.pki.ca_pem, &leaf_der(&second.cert), Instant::now()).await;
    let woken = watcher_thread_switches(f.sidecar.pid()) - before;
    assert!(woken < 30, "the watcher thread woke {woken} times for 400 writes to other files and one swap");
    drop(f.upstream);
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_data_symlink_swap_is_seen() {
    // The layout kubelet gives a mounted Secret: files are symlinks through `..data`, which is
    // itself a symlink to a timestamped directory, swapped atomically by a rename.
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path();
    let publish = |pair: &IssuedCert, version: &str| {
        let dir = m.join(version);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(&pair.cert, dir.join("tls.crt")).unwrap();
        std::fs::copy(&pair.key, dir.join("tls.key")).unwrap();
        std::os::unix::fs::symlink(version, m.join("..data_tmp")).unwrap();
        std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
    };
    let first = pki.issue("first");
    publish(&first, "..2026_11_25_00_00_00.1");
    std::os::unix::fs::symlink("..data/tls.crt", m.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", m.join("tls.key")).unwrap();
    let url = upstream.url();
    let cert = m.join("tls.crt");
    let key = m.join("tls.key");
    let sidecar = Sidecar::start(&[
        "--upstream",
        &url,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--reload-debounce",
        "20ms",
    ]);
    assert_eq!(served_leaf(sidecar.addr, &pki.ca_pem).await, leaf_der(&first.cert));

    for round in 0..3 {
        let next = pki.issue(&format!("next{round}"));
        let started = Instant::now();
        publish(&next, &format!("..2026_11_25_00_00_0{round}.2"));
        let latency = wait_until_served(sidecar.addr, &pki.ca_pem, &leaf_der(&next.cert), started).await;
        eprintln!("..data swap {round} visible after {latency:?}");
    }
}

/// Each kind of bad file is refused, named in the log, counted, and the old certificate
/// keeps serving; the next good write is picked up.
#[tokio::test(flavor = "multi_thread")]
async fn bad_certificate_files_are_refused_and_the_old_one_keeps_serving() {
    let f = start(&[]).await;
    let dir = f.dir.path();
    let serving = leaf_der(&dir.join("tls.crt"));
    let other = f.pki.issue("other");
    let expired = f.pki.issue_with("expired", &["localhost"], -10, -1);
    let good_pem = std::fs::read_to_string(other.cert.clone()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let write_scratch = |name: &str, contents: &str| -> PathBuf {
        let p = scratch.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    };

    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let cases: Vec<Case> = vec![
        ("mismatched key", Box::new(|| rename_over(&other.key, dir, "tls.key")), "does not match"),
        (
            "truncated PEM",
            Box::new(|| rename_over(&write_scratch("t.pem", &good_pem[..good_pem.len() / 2]), dir, "tls.crt")),
            "tls.crt",
        ),
        ("expired certificate", Box::new(|| install_pair(&expired, dir)), "expired"),
        (
            "garbage",
            Box::new(|| rename_over(&write_scratch("g.pem", "not a certificate\n"), dir, "tls.crt")),
            "holds no PEM certificate",
        ),
        ("empty key", Box::new(|| rename_over(&write_scratch("e.pem", ""), dir, "tls.key")), "tls.key"),
    ];
    let original = IssuedCert {
        cert: f.pki.dir.path().join("first.crt"),
        key: f.pki.dir.path().join("first.key"),
        serial: String::new(),
    };
    for (n, (what, break_it, expected_error)) in cases.iter().enumerate() {
        install_pair(&original, dir);
        break_it();
        let line =
            f.sidecar.logs.wait_for(&format!("({} failed certificate reloads so far)", n + 1), Duration::from_secs(10));
        assert!(line.contains(expected_error), "{what}: the error names the problem: {line}");
        assert!(line.contains("refused, still serving"), "{what}: {line}");
        assert_eq!(
            served_leaf(f.sidecar.addr, &f.pki.ca_pem).await,
            serving,
            "{what}: the old certificate keeps serving"
        );
        let mut conn = HttpsConnection::open(f.sidecar.addr, f.pki.ca_pem.as_bytes(), false).await;
        assert_eq!(conn.get("/").await.0, StatusCode::OK, "{what}: requests keep working");
    }
    let good = f.pki.issue("good");
    install_pair(&good, dir);
    wait_until_served(f.sidecar.addr, &f.pki.ca_pem, &leaf_der(&good.cert), Instant::now()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_at_once() {
    // A debounce of an hour: only the signal can make the new file visible within the test.
    let f = start(&["--reload-debounce", "1h"]).await;
    let second = f.pki.issue("second");
    install_pair(&second, f.dir.path());
    assert_ne!(
        served_leaf(f.sidecar.addr, &f.pki.ca_pem).await,
        leaf_der(&second.cert),
        "file changes wait for the debounce"
    );
    f.sidecar.signal("HUP");
    let latency = wait_until_served(f.sidecar.addr, &f.pki.ca_pem, &leaf_der(&second.cert), Instant::now()).await;
    f.sidecar.logs.wait_for("certificates reloaded (SIGHUP)", Duration::from_secs(5));
    eprintln!("SIGHUP reload visible after {latency:?}");
}

fn config_toml(upstream: &str, extra: &str) -> String {
    format!("[proxy]\nupstream = \"{upstream}\"\n{extra}\n")
}

fn write_config(dir: &Path, contents: &str) {
    let tmp = dir.join(".sidecar.toml.tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, dir.join("sidecar.toml")).unwrap();
}

/// Which of the two upstreams served a request on a fresh connection. The request carries a
/// unique marker, so concurrent traffic cannot confuse the answer.
async fn fresh_connection_reaches(sidecar: &Sidecar, ca: &str, a: &Upstream, b: &Upstream) -> char {
    static PROBE: AtomicU64 = AtomicU64::new(0);
    let marker = PROBE.fetch_add(1, Ordering::Relaxed).to_string();
    let mut conn = HttpsConnection::open(sidecar.addr, ca.as_bytes(), false).await;
    let response = conn.send(http::Request::get("/").header("x-probe", &marker).body(empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let saw = |u: &Upstream| {
        u.log.requests.lock().unwrap().iter().any(|r| r.headers.get("x-probe").is_some_and(|v| v == marker.as_str()))
    };
    match (saw(a), saw(b)) {
        (true, false) => 'a',
        (false, true) => 'b',
        other => panic!("probe {marker} seen by (a, b) = {other:?}"),
    }
}

async fn wait_until_reaches(
    sidecar: &Sidecar,
    ca: &str,
    a: &Upstream,
    b: &Upstream,
    want: char,
    since: Instant,
) -> Duration {
    loop {
        if fresh_connection_reaches(sidecar, ca, a, b).await == want {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(10), "config change not visible within 10 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_files_renamed_by_the_config_are_watched_under_their_new_names() {
    // The config moves the certificate to other names in the same directory: the watch on that
    // directory stays, and what it listens for must follow the names.
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config_for = |name: &str| {
        let (cert, key) = (dir.path().join(format!("{name}.crt")), dir.path().join(format!("{name}.key")));
        let extra = format!("cert = \"{}\"\nkey = \"{}\"\nreload-debounce = \"20ms\"", cert.display(), key.display());
        config_toml(&upstream.url(), &extra)
    };
    let install_as = |pair: &IssuedCert, name: &str| {
        rename_over(&pair.key, dir.path(), &format!("{name}.key"));
        rename_over(&pair.cert, dir.path(), &format!("{name}.crt"));
    };
    install_as(&pki.issue("first"), "a");
    write_config(dir.path(), &config_for("a"));
    let sidecar = Sidecar::start(&["--config", dir.path().join("sidecar.toml").to_str().unwrap()]);

    let second = pki.issue("second");
    install_as(&second, "b");
    write_config(dir.path(), &config_for("b"));
    wait_until_served(sidecar.addr, &pki.ca_pem, &leaf_der(&second.cert), Instant::now()).await;

    let third = pki.issue("third");
    install_as(&third, "b");
    wait_until_served(sidecar.addr, &pki.ca_pem, &leaf_der(&third.cert), Instant::now()).await;
    drop(upstream);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_file_reload_applies_to_new_connections_and_refuses_bad_files() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let dir = tempfile::tempdir().unwrap();
    let extra =
        format!("cert = \"{}\"\nkey = \"{}\"\nreload-debounce = \"20ms\"", leaf.cert.display(), leaf.key.display());
    write_config(dir.path(), &config_toml(&a.url(), &extra));
    let config = dir.path().join("sidecar.toml");
    let sidecar = Sidecar::start(&["--config", config.to_str().unwrap()]);
    assert_eq!(fresh_connection_reaches(&sidecar, &pki.ca_pem, &a, &b).await, 'a');

    let mut kept = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(kept.get("/").await.0, StatusCode::OK);

    write_config(dir.path(), &config_toml(&b.url(), &extra));
    wait_until_reaches(&sidecar, &pki.ca_pem, &a, &b, 'b', Instant::now()).await;
    sidecar.logs.wait_for(&format!("config reloaded from {}", config.display()), Duration::from_secs(5));

    // The connection opened before the change keeps the snapshot it started with.
    let response = kept.send(http::Request::get("/").header("x-probe", "kept").body(empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let marked = |u: &Upstream| {
        u.log.requests.lock().unwrap().iter().any(|r| r.headers.get("x-probe").is_some_and(|v| v == "kept"))
    };
    assert!(marked(&a) && !marked(&b), "an open connection keeps its upstream");

    // Broken TOML and an invalid value are refused; B keeps serving.
    for (n, broken) in ["[proxy\nupstream = ", &config_toml(&a.url(), &format!("{extra}\nupstream-timeout = \"soon\""))]
        .iter()
        .enumerate()
    {
        write_config(dir.path(), broken);
        let line = sidecar.logs.wait_for(&format!("({} failed config reloads so far)", n + 1), Duration::from_secs(10));
        assert!(line.contains(&config.display().to_string()), "the error names the file: {line}");
        assert_eq!(fresh_connection_reaches(&sidecar, &pki.ca_pem, &a, &b).await, 'b');
    }

    // A restart-only change is reported and the rest of the file still applies.
    write_config(dir.path(), &config_toml(&a.url(), &format!("{extra}\nmax-connections = 5")));
    wait_until_reaches(&sidecar, &pki.ca_pem, &a, &b, 'a', Instant::now()).await;
    let line = sidecar.logs.wait_for("needs a restart", Duration::from_secs(5));
    assert!(line.contains("max-connections"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_still_win_over_a_reloaded_config_file() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &config_toml(&b.url(), "reload-debounce = \"20ms\""));
    let config = dir.path().join("sidecar.toml");
    let url = a.url();
    let sidecar = Sidecar::start(&[
        "--config",
        config.to_str().unwrap(),
        "--upstream",
        &url,
        "--cert",
        leaf.cert.to_str().unwrap(),
        "--key",
        leaf.key.to_str().unwrap(),
    ]);
    assert_eq!(fresh_connection_reaches(&sidecar, &pki.ca_pem, &a, &b).await, 'a');
    write_config(dir.path(), &config_toml(&b.url(), "reload-debounce = \"20ms\"\nupstream-timeout = \"7s\""));
    sidecar.logs.wait_for("config reloaded", Duration::from_secs(10));
    assert_eq!(
        fresh_connection_reaches(&sidecar, &pki.ca_pem, &a, &b).await,
        'a',
        "--upstream on the command line wins"
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Clients hammer the proxy (fresh handshakes and keep-alive, HTTP/1.1 and HTTP/2) while the
/// certificate is swapped 100 times and the config 100 times: not one request may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_load_fail_no_request() {
    const SWAPS: usize = 100;
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let pki = TestPki::new();
    let certs = [pki.issue("one"), pki.issue("two")];
    let certs_der = [leaf_der(&certs[0].cert), leaf_der(&certs[1].cert)];
    let dir = tempfile::tempdir().unwrap();
    install_pair(&certs[0], dir.path());
    let tls_files = format!(
        "cert = \"{}\"\nkey = \"{}\"\nreload-debounce = \"10ms\"",
        dir.path().join("tls.crt").display(),
        dir.path().join("tls.key").display()
    );
    write_config(dir.path(), &config_toml(&a.url(), &tls_files));
    let config = dir.path().join("sidecar.toml");
    let sidecar = Sidecar::start(&["--config", config.to_str().unwrap()]);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for worker in 0..4 {
        let (stop, ok, failures, ca) = (stop.clone(), ok.clone(), failures.clone(), pki.ca_pem.clone());
        let addr = sidecar.addr;
        clients.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let http2 = (worker + round) % 2 == 0;
                let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
                let tls = match tls_connect(addr, client_config(ca.as_bytes(), alpn), "localhost").await {
                    Ok(tls) => tls,
                    Err(e) => {
                        failures.lock().unwrap().push(format!("handshake: {e}"));
                        continue;
                    }
                };
                drop(tls);
                let mut conn = HttpsConnection::open(addr, ca.as_bytes(), http2).await;
                for _ in 0..10 {
                    match conn.send(http::Request::get("/").body(empty()).unwrap()).await {
                        Ok(r) if r.status() == StatusCode::OK => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures.lock().unwrap().push(format!("status {}", r.status())),
                        Err(e) => failures.lock().unwrap().push(format!("request: {e}")),
                    }
                }
            }
        }));
    }

    let mut cert_latency = Vec::new();
    for i in 1..=SWAPS {
        let started = Instant::now();
        install_pair(&certs[i % 2], dir.path());
        cert_latency.push(wait_until_served(sidecar.addr, &pki.ca_pem, &certs_der[i % 2], started).await);
    }
    let mut config_latency = Vec::new();
    for i in 1..=SWAPS {
        let (url, want) = if i % 2 == 1 { (b.url(), 'b') } else { (a.url(), 'a') };
        let started = Instant::now();
        write_config(dir.path(), &config_toml(&url, &tls_files));
        config_latency.push(wait_until_reaches(&sidecar, &pki.ca_pem, &a, &b, want, started).await);
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    let failures = failures.lock().unwrap();
    let ok = ok.load(Ordering::Relaxed);
    cert_latency.sort();
    config_latency.sort();
    println!(
        "reload under load: {ok} requests ok, {} failed; certificate swap visible p50 {:?} p99 {:?}; config swap visible p50 {:?} p99 {:?}",
        failures.len(),
        percentile(&cert_latency, 0.5),
        percentile(&cert_latency, 0.99),
        percentile(&config_latency, 0.5),
        percentile(&config_latency, 0.99),
    );
    assert!(
        failures.is_empty(),
        "failed requests or handshakes during reloads: {:?}",
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 1000, "the load ran ({ok} requests)");
    assert_eq!(sidecar.logs.count("refused"), 0, "no reload was refused:\n{}", sidecar.logs.text());
}

/// Sessions outlive a server-certificate reload (only a client-auth change starts afresh,
/// see tests/sni_mtls.rs), so a rotation does not force every client into a full handshake.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_resume_across_a_certificate_reload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::HandshakeKind;
    let f = start(&[]).await;
    let config = client_config(f.pki.ca_pem.as_bytes(), &[b"http/1.1"]);
    // TLS 1.3 tickets arrive after the handshake: read a whole response to collect them.
    let mut before = tls_connect(f.sidecar.addr, config.clone(), "localhost").await.unwrap();
    assert_eq!(before.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
    before.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    before.read_to_end(&mut response).await.unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200"));

    let second = f.pki.issue("second");
    install_pair(&second, f.dir.path());
    // Probe with a separate client, so the session cache under test is not touched.
    wait_until_served(f.sidecar.addr, &f.pki.ca_pem, &leaf_der(&second.cert), Instant::now()).await;
    let after = tls_connect(f.sidecar.addr, config, "localhost").await.unwrap();
    assert_eq!(
        after.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "a session made before the reload resumes after it"
    );
}
