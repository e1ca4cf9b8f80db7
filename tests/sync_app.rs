//! `sidecar sync` against a real child process standing in for the legacy app
//! (tests/apps/legacy_app.py): SIGHUP from a pid file re-read at each signal, a process found
//! by name and signalled with its process group, a reload URL, health verification with
//! rollback of a bad version that is then not retried, and escalation (SIGTERM, then SIGKILL)
//! when the app stays unhealthy, ignores signals or is not there.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::*;
use sidecar::sync::hash::content_hash;

const T: Duration = Duration::from_secs(30);

/// Waits until the app runs a config whose "v" is `v`.
fn wait_app_version(app: &LegacyApp, v: u64) {
    wait_until(&format!("the app to run v{v}"), T, || app.state()["config"]["v"] == v);
}

#[test]
fn sighup_goes_to_the_pid_in_the_pid_file_read_again_at_every_signal() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest, pid_file) =
        (dir.path().join("source.json"), dir.path().join("config.json"), dir.path().join("app.pid"));
    write(&dest, "{\"v\": 1}");
    write(&source, "{\"v\": 1}");
    let app = LegacyApp::start(&dest, Some(&pid_file));
    let sync = SyncCommand::new(&source, &dest).pid_file(&pid_file).poll_interval("100ms").min_quiet("50ms").start();
    sync.wait_state("config.json", "synced", T);
    assert_eq!(app.hups(), 0, "the file already matched: no signal at start");

    replace_file(&source, "{\"v\": 2}");
    wait_app_version(&app, 2);
    assert_eq!(app.hups(), 1);
    sync.proc.logs.wait_for(&format!("SIGHUP to pid {}", app.pid), T);

    // The app restarts with a new pid: the next change goes to it.
    drop(app);
    let app = LegacyApp::start(&dest, Some(&pid_file));
    replace_file(&source, "{\"v\": 3}");
    wait_app_version(&app, 3);
    assert_eq!(app.hups(), 1);
    sync.proc.logs.wait_for(&format!("SIGHUP to pid {}", app.pid), T);
}

#[test]
fn a_process_found_by_name_is_signalled_with_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    // A name no other test's app has: tests run in parallel.
    let name = format!("legacy-app-{}.py", std::process::id());
    let script = dir.path().join(&name);
    std::fs::copy(legacy_app_script(), &script).unwrap();
    let (source, dest) = (dir.path().join("source.json"), dir.path().join("config.json"));
    write(&dest, "{\"v\": 1}");
    write(&source, "{\"v\": 1}");
    let app = LegacyApp::start_with(&script, &dest, None, true, true);
    app.proc.logs.wait_for("child ready", T);
    let sync = SyncCommand::new(&source, &dest)
        .arg("--process-name", &name)
        .flag("--process-group")
        .poll_interval("100ms")
        .min_quiet("50ms")
        .start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2}");
    wait_app_version(&app, 2);
    app.proc.logs.wait_for("child got SIGHUP", T);
    sync.proc.logs.wait_for(&format!("SIGHUP to process group {}", app.pid), T);
}

#[test]
fn a_reload_url_is_posted() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.json"), dir.path().join("config.json"));
    write(&dest, "{\"v\": 1}");
    write(&source, "{\"v\": 1}");
    let app = LegacyApp::start(&dest, None);
    let reload = format!("http://{}/reload", app.addr);
    let sync =
        SyncCommand::new(&source, &dest).arg("--reload-url", &reload).poll_interval("100ms").min_quiet("50ms").start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2}");
    wait_app_version(&app, 2);
    app.proc.logs.wait_for("reloaded (POST /reload)", T);
    assert_eq!(app.hups(), 0);
}

#[test]
fn an_unhealthy_version_is_rolled_back_marked_rejected_and_not_retried_until_the_source_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest, pid_file) =
        (dir.path().join("source.json"), dir.path().join("config.json"), dir.path().join("app.pid"));
    write(&dest, "{\"v\": 1}");
    write(&source, "{\"v\": 1}");
    let app = LegacyApp::start(&dest, Some(&pid_file));
    // The same sidecar each time it is (re)started in this test.
    let command = SyncCommand::new(&source, &dest)
        .pid_file(&pid_file)
        .health_url(&app.health_url())
        .arg("--health-timeout", "2s")
        .poll_interval("100ms")
        .min_quiet("50ms");
    let sync = command.start();
    sync.wait_state("config.json", "synced", T);

    let bad = "{\"v\": 2, \"healthy\": false}";
    replace_file(&source, bad);
    let status = sync.wait_state("config.json", "rolled-back", T);
    assert_eq!(read_text(&dest), "{\"v\": 1}", "the last good version is back on disk");
    wait_app_version(&app, 1);
    assert_eq!(app.hups(), 2, "signalled for the bad version, then for the rollback");
    assert_eq!(http_exchange(app.addr, "GET", "/healthz", &[], "").unwrap().0, 200);
    assert!(
        status["rejected"].as_array().unwrap().contains(&serde_json::json!(content_hash(bad.as_bytes()))),
        "{status:#}"
    );
    assert!(status["last_error"].as_str().unwrap().contains("503"), "{status:#}");
    let history = http_get_json(sync.admin, "/sync/config.json/history");
    let rejected: Vec<_> =
        history["versions"].as_array().unwrap().iter().filter(|v| v["status"] == "rejected").collect();
    assert_eq!(rejected.len(), 1, "{history:#}");
    assert_eq!(rejected[0]["hash"], content_hash(bad.as_bytes()));

    // The source still offers the bad version: it is not tried again, not even by a new
    // sidecar (the rejection is kept in the state file).
    let (admin_before, mut sync) = (sync.admin, sync);
    sync.proc.signal("TERM");
    assert!(sync.proc.wait_exit(T).success());
    let sync = command.start();
    assert_ne!(sync.admin, admin_before);
    sync.wait_state("config.json", "rolled-back", T);
    sync.proc.logs.wait_for("was rejected before; not applied again", T);
    assert_eq!(app.hups(), 2, "the rejected version was not retried");
    assert_eq!(read_text(&dest), "{\"v\": 1}");
    assert_eq!(
        http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap().0,
        200,
        "held back at the last good version counts as synced"
    );

    // A new version from the source is applied.
    replace_file(&source, "{\"v\": 3}");
    wait_app_version(&app, 3);
    sync.wait_state("config.json", "synced", T);
    assert_eq!(app.hups(), 3);
    assert!(sync.status("config.json")["rejected"].as_array().unwrap().is_empty());
}

#[test]
fn an_app_that_stays_unhealthy_and_ignores_signals_gets_sigterm_then_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest, pid_file) =
        (dir.path().join("source.json"), dir.path().join("config.json"), dir.path().join("app.pid"));
    write(&dest, "{\"v\": 1}");
    write(&source, "{\"v\": 1}");
    let mut app = LegacyApp::start(&dest, Some(&pid_file));
    let sync = SyncCommand::new(&source, &dest)
        .pid_file(&pid_file)
        .health_url(&app.health_url())
        .arg("--health-timeout", "1500ms")
        .arg("--kill-after", "1s")
        .poll_interval("100ms")
        .min_quiet("50ms")
        .start();
    sync.wait_state("config.json", "synced", T);

    // It takes this version, then becomes unhealthy and deaf to SIGHUP and SIGTERM.
    replace_file(&source, "{\"v\": 2, \"healthy\": false, \"ignore_signals\": true}");
    let status = sync.wait_state("config.json", "failed", T);
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains("SIGKILL"), "{status:#}");
    let exit = app.proc.wait_exit(T);
    assert_eq!(exit.signal(), Some(9), "killed by SIGKILL after ignoring SIGTERM: {exit:?}");
    assert!(!app.is_running());
    assert_eq!(read_text(&dest), "{\"v\": 1}", "the last good version is on disk for the restart");
    let log = sync.proc.logs.text();
    assert!(log.contains("rolled") && log.contains("still unhealthy after the rollback"), "{log}");

    // The orchestrator restarts the app: it reads the last good file and is healthy.
    let app = LegacyApp::start(&dest, Some(&pid_file));
    assert_eq!(app.state()["config"]["v"], 1);
}

#[test]
fn a_missing_app_process_is_reported_and_the_last_good_version_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest, pid_file) =
        (dir.path().join("source.json"), dir.path().join("config.json"), dir.path().join("app.pid"));
    write(&dest, "{\"v\": 1}");
    write(&source, "{\"v\": 1}");
    // A pid that no longer exists: the app died and left its pid file behind.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    write(&pid_file, &format!("{dead}\n"));
    let health = format!("http://127.0.0.1:{}/healthz", free_port());
    let sync = SyncCommand::new(&source, &dest)
        .pid_file(&pid_file)
        .health_url(&health)
        .arg("--health-timeout", "1s")
        .poll_interval("100ms")
        .min_quiet("50ms")
        .start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2}");
    let status = sync.wait_state("config.json", "failed", T);
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains(&format!("pid {dead} does not exist")), "{status:#}");
    assert_eq!(read_text(&dest), "{\"v\": 1}", "the last good version is on disk for the app's restart");
    sync.proc.logs.wait_for("could not notify the app", T);
}
