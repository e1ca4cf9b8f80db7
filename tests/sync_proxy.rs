//! `[[sync]]` tables in the proxy's config file: one sidecar does both jobs. The proxy's own
//! certificate and key are sync destinations here, and its reload picks the new ones up; the
//! admin API lists the destinations and /readyz waits for them; bad tables stop the start.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxy_runs_sync_tables_and_reloads_a_synced_certificate() {
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let first = pki.issue("first");
    let second = pki.issue("second");
    let dir = tempfile::tempdir().unwrap();
    // What the proxy serves from, and a stand-in for the config API holding the new pair.
    let (cert, key) = (dir.path().join("tls/tls.crt"), dir.path().join("tls/tls.key"));
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let api = dir.path().join("api");
    std::fs::create_dir(&api).unwrap();
    std::fs::copy(&first.cert, api.join("tls.crt")).unwrap();
    std::fs::copy(&first.key, api.join("tls.key")).unwrap();
    let app_source = api.join("app.json");
    write(&app_source, "{\"v\": 1}");
    let app_dest = dir.path().join("app.json");
    let config = dir.path().join("sidecar.toml");
    write(
        &config,
        &format!(
            "[proxy]\nupstream = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nreload-debounce = \"50ms\"\n\n\
             [[sync]]\nname = \"tls-key\"\nsource = \"{}\"\ndest = \"{}\"\nmin-quiet = \"50ms\"\npoll-interval = \"200ms\"\n\n\
             [[sync]]\nname = \"tls-cert\"\nsource = \"file://{}\"\ndest = \"{}\"\nmin_quiet = \"50ms\"\npoll_interval = \"200ms\"\n\n\
             [[sync]]\nsource = \"{}\"\ndest = \"{}\"\nvalidate = \"json\"\nrequire-source = true\nmin-quiet = \"50ms\"\n",
            upstream.url(),
            cert.display(),
            key.display(),
            api.join("tls.key").display(),
            key.display(),
            api.join("tls.crt").display(),
            cert.display(),
            app_source.display(),
            app_dest.display(),
        ),
    );
    let sidecar = Sidecar::start(&["--config", config.to_str().unwrap(), "--admin", "127.0.0.1:0"]);
    let admin = sidecar.admin_addr();
    tokio::task::block_in_place(|| {
        // --require-source: the third table was synced before the proxy said it listens.
        assert_eq!(read_text(&app_dest), "{\"v\": 1}");
        wait_until("ready", T, || http_exchange(admin, "GET", "/readyz", &[], "").is_some_and(|(code, _)| code == 200));
        let all = http_get_json(admin, "/sync");
        let names: Vec<&str> =
            all["destinations"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["tls-key", "tls-cert", "app.json"]);
        assert!(http_get_json(admin, "/status")["sync"].is_array());

        // The config API gets a new certificate: both files are synced, the proxy reloads.
        std::fs::copy(&second.key, api.join("tls.key")).unwrap();
        std::fs::copy(&second.cert, api.join("tls.crt")).unwrap();
        wait_for_content(&cert, &read_text(&second.cert), T);
        wait_for_content(&key, &read_text(&second.key), T);
        sidecar.logs.wait_for(&format!("serial {}", second.serial), T);
    });
    let mut conn = HttpsConnection::open(sidecar.addr, pki.ca_pem.as_bytes(), false).await;
    assert_eq!(conn.get("/").await.0, http::StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_of_sync_tables_get_the_open_file_limit_the_proxy_started_with() {
    let hard = hard_open_file_limit_for_a_child();
    let upstream = Upstream::start().await;
    let pki = TestPki::new();
    let leaf = pki.issue("leaf");
    let dir = tempfile::tempdir().unwrap();
    let (source, dest, seen) = (dir.path().join("source.json"), dir.path().join("app.json"), dir.path().join("seen"));
    write(&source, "{\"v\": 1}");
    let config = dir.path().join("sidecar.toml");
    write(
        &config,
        &format!(
            "[proxy]\nupstream = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [[sync]]\nsource = \"{}\"\ndest = \"{}\"\nrequire-source = true\nmin-quiet = \"20ms\"\n\
             check-cmd = \"test -s {{}} && ulimit -S -n > {}\"\n",
            upstream.url(),
            leaf.cert.display(),
            leaf.key.display(),
            source.display(),
            dest.display(),
            seen.display(),
        ),
    );
    let sidecar = Sidecar::start_with(&["--config", config.to_str().unwrap()], with_open_file_limit(256, hard));
    // The proxy raised its own limit; the check command, run before it listened
    // (require-source), got the one the proxy was started with.
    assert_eq!(open_file_limits(sidecar.pid()), (hard.to_string(), hard.to_string()));
    assert_eq!(read_text(&dest), "{\"v\": 1}", "{}", sidecar.logs.text());
    assert_eq!(read_text(&seen).trim(), "256");
}

#[test]
fn bad_sync_tables_stop_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("s.json");
    write(&source, "{}");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown-key.toml",
            format!("[[sync]]\nsource = \"{}\"\ndest = \"/tmp/x\"\nbogus = 1\n", source.display()),
            "[[sync]] number 1: no option `bogus`",
        ),
        ("not-array.toml", "[sync]\nsource = \"x\"\n".into(), "must be an array of tables"),
        ("missing-dest.toml", format!("[[sync]]\nsource = \"{}\"\n", source.display()), "--dest"),
        (
            "bad-value.toml",
            format!("[[sync]]\nsource = \"{}\"\ndest = \"/tmp/x\"\nhealth-timeout = \"soon\"\n", source.display()),
            "invalid value 'soon'",
        ),
        (
            "process-only.toml",
            format!("[[sync]]\nsource = \"{}\"\ndest = \"/tmp/x\"\nonce = true\n", source.display()),
            "no option `once`",
        ),
        (
            "duplicate.toml",
            format!(
                "[[sync]]\nsource = \"{0}\"\ndest = \"/tmp/a/x\"\n[[sync]]\nsource = \"{0}\"\ndest = \"/tmp/b/x\"\n",
                source.display()
            ),
            "two sync destinations are named `x`",
        ),
        (
            "unknown-table.toml",
            "[proxy]\nupstream-timeout = \"1s\"\n[server]\nlisten = \"x\"\n".into(),
            "unknown table [server]",
        ),
    ];
    for (name, contents, needle) in cases {
        let path = dir.path().join(name);
        write(&path, &contents);
        let (code, stderr) = run_to_exit(&[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
            "--config",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: says {needle:?}:\n{stderr}");
        if name != "duplicate.toml" {
            assert!(stderr.contains(path.to_str().unwrap()), "{name}: names the file:\n{stderr}");
        }
    }
}

#[test]
fn sync_help_lists_every_option_with_its_environment_variable() {
    let output = sidecar_command(&["sync", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--source",
        "--dest",
        "--name",
        "--pid-file",
        "--process-name",
        "--signal",
        "--process-group",
        "--reload-url",
        "--exec",
        "--health-url",
        "--health-timeout",
        "--kill-after",
        "--validate",
        "--check-cmd",
        "--history-dir",
        "--history-keep",
        "--poll-interval",
        "--min-quiet",
        "--max-quiet",
        "--max-size",
        "--require-source",
        "--once",
        "--dry-run",
        "--admin",
        "--admin-token-file",
    ] {
        assert!(help.contains(flag), "{flag} in:\n{help}");
        let env = format!("SIDECAR_SYNC_{}", flag.trim_start_matches("--").replace('-', "_").to_uppercase());
        assert!(help.contains(&env), "{env} in:\n{help}");
    }
    assert!(help.contains("[default: HUP]") && help.contains("[default: 30s]"), "{help}");
    // An environment variable stands in for a flag.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("s.txt");
    write(&source, "from env\n");
    let dest = dir.path().join("d.txt");
    let status = sidecar_command(&["sync", "--once"])
        .env("SIDECAR_SYNC_SOURCE", &source)
        .env("SIDECAR_SYNC_DEST", &dest)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(read_text(Path::new(&dest)), "from env\n");
}
