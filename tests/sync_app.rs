//! `sidecar sync` against a real child process standing in for the legacy app
//! (tests/apps/legacy_app.py): SIGHUP from a pid file re-read at each signal, a process found
//! by name and signalled with its process group, a reload URL, health verification with
//! rollback of a bad version that is then not retried, and escalation (SIGTERM, then SIGKILL)
//! when the app stays unhealthy, ignores signals or is not there.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use sidecar::sync::hash::content_hash;

const T: Duration = Duration::from_secs(30);

/// A temp dir with the app's config file and the source both at `{"v": 1}`, and the path for
/// the app's pid file: (dir, source, dest, pid file).
fn files_at_v1() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest, pid_file) =
        (dir.path().join("source.json"), dir.path().join("config.json"), dir.path().join("app.pid"));
    write(&dest, "{\"v\": 1}");
    write(&source, "{\"v\": 1}");
    (dir, source, dest, pid_file)
}

/// `sidecar sync` from `source` to `dest` that sees a change within 100ms and applies it 50ms
/// later.
fn fast_sync(source: &Path, dest: &Path) -> SyncCommand {
    SyncCommand::new(source, dest).poll_interval("100ms").min_quiet("50ms")
}

/// A copy of the stand-in app in `dir` under a name no other test's app has (tests run in
/// parallel), for --process-name: (its file name, its path).
fn app_script_named(dir: &Path, tag: &str) -> (String, PathBuf) {
    let name = format!("legacy-app-{}{tag}.py", std::process::id());
    let script = dir.join(&name);
    std::fs::copy(legacy_app_script(), &script).unwrap();
    (name, script)
}

/// Waits until the app runs a config whose "v" is `v`.
fn wait_app_version(app: &LegacyApp, v: u64) {
    wait_until(&format!("the app to run v{v}"), T, || app.state()["config"]["v"] == v);
}

#[test]
fn sighup_goes_to_the_pid_in_the_pid_file_read_again_at_every_signal() {
    let (_dir, source, dest, pid_file) = files_at_v1();
    let app = LegacyApp::start(&dest, Some(&pid_file));
    let sync = fast_sync(&source, &dest).pid_file(&pid_file).start();
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
    let (dir, source, dest, _) = files_at_v1();
    let (name, script) = app_script_named(dir.path(), "");
    let app = LegacyApp::start_with(&script, &dest, None, true, true);
    app.proc.logs.wait_for("child ready", T);
    let sync = fast_sync(&source, &dest).arg("--process-name", &name).flag("--process-group").start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2}");
    wait_app_version(&app, 2);
    app.proc.logs.wait_for("child got SIGHUP", T);
    sync.proc.logs.wait_for(&format!("SIGHUP to process group {}", app.pid), T);
}

#[test]
fn a_reload_url_is_posted() {
    let (_dir, source, dest, _) = files_at_v1();
    let app = LegacyApp::start(&dest, None);
    let reload = format!("http://{}/reload", app.addr);
    let sync = fast_sync(&source, &dest).arg("--reload-url", &reload).start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2}");
    wait_app_version(&app, 2);
    app.proc.logs.wait_for("reloaded (POST /reload)", T);
    assert_eq!(app.hups(), 0);
}

#[test]
fn an_unhealthy_version_is_rolled_back_marked_rejected_and_not_retried_until_the_source_changes() {
    let (_dir, source, dest, pid_file) = files_at_v1();
    let app = LegacyApp::start(&dest, Some(&pid_file));
    // The same sidecar each time it is (re)started in this test.
    let command =
        fast_sync(&source, &dest).pid_file(&pid_file).health_url(&app.health_url()).arg("--health-timeout", "2s");
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
    let (_dir, source, dest, pid_file) = files_at_v1();
    let mut app = LegacyApp::start(&dest, Some(&pid_file));
    let sync = fast_sync(&source, &dest)
        .pid_file(&pid_file)
        .health_url(&app.health_url())
        .arg("--health-timeout", "1500ms")
        .arg("--kill-after", "1s")
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

    assert_eq!(status["counters"]["kills"], 1, "{status:#}");

    // The orchestrator restarts the app (on the same port): it reads the last good file and is
    // healthy, and the sidecar sees it.
    let app = LegacyApp::start_on_port(&dest, Some(&pid_file), app.addr.port());
    assert_eq!(app.state()["config"]["v"], 1);
    sync.wait_state("config.json", "rolled-back", T);
    assert_eq!(http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap().0, 200);
}

#[test]
fn a_missing_app_process_is_reported_and_the_version_not_blamed() {
    let (_dir, source, dest, pid_file) = files_at_v1();
    // A pid that no longer exists: the app died and left its pid file behind.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    write(&pid_file, &format!("{dead}\n"));
    let health = format!("http://127.0.0.1:{}/healthz", free_port());
    let sync = fast_sync(&source, &dest).pid_file(&pid_file).health_url(&health).arg("--health-timeout", "1s").start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2}");
    // No app before the change, none after: nothing says that the version is bad.
    let status = sync.wait_state("config.json", "waiting-for-app", T);
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains(&format!("pid {dead} does not exist")), "{status:#}");
    assert!(status["rejected"].as_array().unwrap().is_empty(), "{status:#}");
    assert_eq!(read_text(&dest), "{\"v\": 2}", "the version is kept for the app's start");
    sync.proc.logs.wait_for("could not notify the app", T);
}

/// A program that is not the app, killed on drop; `sleep` dies of SIGHUP and SIGTERM, so a
/// signal meant for the app shows as its exit.
fn bystander(program: &str, args: &[&std::ffi::OsStr]) -> Sidecar {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null());
    Sidecar::spawn(cmd)
}

fn still_running(proc: &mut Sidecar) -> bool {
    proc.child.try_wait().unwrap().is_none()
}

#[test]
fn a_stale_pid_file_naming_a_recycled_pid_is_not_signalled_nor_killed() {
    let (_dir, source, dest, pid_file) = files_at_v1();
    // The app's earlier run was SIGKILLed and left its pid file; the pid now belongs to an
    // unrelated process started after the file was written.
    let mut other = bystander("sleep", &["600".as_ref()]);
    write(&pid_file, &format!("{}\n", other.pid()));
    let written = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options().write(true).open(&pid_file).unwrap().set_modified(written).unwrap();
    // The app as it runs now (restarted without a pid file), healthy; it crashes on v2.
    let app = LegacyApp::start(&dest, None);
    let sync = fast_sync(&source, &dest)
        .pid_file(&pid_file)
        .arg("--reload-url", format!("http://{}/reload", app.addr))
        .health_url(&app.health_url())
        .arg("--health-timeout", "1500ms")
        .arg("--kill-after", "1s")
        .start();
    sync.wait_state("config.json", "synced", T);

    // Notified, rolled back, notified again, escalated: no signal reaches the other process.
    replace_file(&source, "{\"v\": 2, \"crash\": true}");
    let status = sync.wait_state("config.json", "failed", T);
    assert!(still_running(&mut other), "the unrelated process got the app's signals: {status:#}");
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains("names a different process"), "{status:#}");
    assert!(status["counters"]["refused_signals"].as_u64().unwrap() >= 2, "{status:#}");
    assert_eq!(status["counters"]["kills"], 0, "no SIGTERM or SIGKILL was delivered: {status:#}");
    sync.proc.logs.wait_for(&format!("names a different process: pid {} (sleep)", other.pid()), T);
    let (_, metrics) = http_exchange(sync.admin, "GET", "/metrics", &[], "").unwrap();
    let line = |name: &str| metrics.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_owned();
    assert!(!line("sidecar_sync_refused_signals_total").ends_with(" 0"), "{metrics}");
    assert!(line("sidecar_sync_kills_total").ends_with(" 0"), "{metrics}");
    assert_eq!(read_text(&dest), "{\"v\": 1}");
}

#[test]
fn a_process_name_matches_the_program_not_a_file_another_program_has_open() {
    let (dir, source, dest, _) = files_at_v1();
    let (name, script) = app_script_named(dir.path(), "-tail");
    let app = LegacyApp::start_with(&script, &dest, None, false, false);
    // Someone follows the script with tail: its name is in tail's command line.
    let mut tail = bystander("tail", &["-f".as_ref(), script.as_os_str()]);
    let sync = fast_sync(&source, &dest).arg("--process-name", &name).start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2}");
    wait_app_version(&app, 2);
    sync.proc.logs.wait_for(&format!("SIGHUP to pid {}", app.pid), T);
    assert!(!sync.proc.logs.text().contains(&format!("pid {}", tail.pid())), "{}", sync.proc.logs.text());
    assert!(still_running(&mut tail), "tail -f on the script got SIGHUP");
}

#[test]
fn an_ambiguous_process_name_gets_sigterm_but_no_sigkill() {
    let (dir, source, dest, _) = files_at_v1();
    let (name, script) = app_script_named(dir.path(), "-twice");
    // Two programs of that name: neither is surely the app.
    let mut first = LegacyApp::start_with(&script, &dest, None, false, false);
    let mut second = LegacyApp::start_with(&script, &dest, None, false, false);
    let sync = fast_sync(&source, &dest)
        .arg("--process-name", &name)
        .health_url(&first.health_url())
        .arg("--health-timeout", "1500ms")
        .arg("--kill-after", "1s")
        .start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2, \"healthy\": false, \"ignore_signals\": true}");
    let status = sync.wait_state("config.json", "failed", T);
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains("no SIGKILL"), "{status:#}");
    sync.proc.logs.wait_for("matches more than one program", T);
    assert!(first.is_running() && second.is_running(), "SIGKILL went to an ambiguous match: {status:#}");
}

#[test]
fn a_failed_notification_is_reported_and_retried_until_it_works() {
    let (dir, source, dest, _) = files_at_v1();
    let (ready, notified) = (dir.path().join("app-ready"), dir.path().join("notified"));
    // The reload command fails until the app is there to take it.
    let reload = format!("test -f '{}' && echo \"$SIDECAR_SYNC_HASH\" >> '{}'", ready.display(), notified.display());
    let sync = fast_sync(&source, &dest).exec(&reload).retry_max("500ms").start();
    sync.wait_state("config.json", "synced", T);

    replace_file(&source, "{\"v\": 2}");
    let status = sync.wait_state("config.json", "notify-failed", T);
    assert!(status["last_error"].as_str().unwrap().contains("not notified"), "{status:#}");
    assert_eq!(read_text(&dest), "{\"v\": 2}", "the file is written; only the notification is missing");
    sync.proc.logs.wait_for_nth("could not notify the app", 2, T);
    assert_eq!(sync.state("config.json"), "notify-failed", "never synced while the app was not told");

    write(&ready, "");
    let status = sync.wait_state("config.json", "synced", T);
    assert_eq!(read_text(&notified).trim(), content_hash(b"{\"v\": 2}"));
    assert!(status["last_error"].is_null(), "the error is over: {status:#}");
}

/// Words such as "999us" or "307ns": the tail of an unrounded duration.
fn sub_millisecond_parts(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            let digits = w.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && matches!(&w[digits.len()..], "us" | "ns")
        })
        .collect()
}

#[test]
fn a_health_check_that_times_out_reports_durations_as_people_write_them() {
    let (_dir, source, dest, _) = files_at_v1();
    // Connections are taken (by the kernel) and never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health = format!("http://{}/healthz", silent.local_addr().unwrap());
    let sync = fast_sync(&source, &dest).health_url(&health).arg("--health-timeout", "2s").start();
    sync.wait_state("config.json", "synced", T);
    replace_file(&source, "{\"v\": 2}");
    let line = sync.proc.logs.wait_for("did not answer within", T);
    assert!(sub_millisecond_parts(&line).is_empty(), "{line}");
    let status = sync.status("config.json");
    assert!(sub_millisecond_parts(&status.to_string()).is_empty(), "{status:#}");
}

#[test]
fn an_app_that_starts_after_the_health_timeout_is_waited_for_and_its_first_config_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest, pid_file) =
        (dir.path().join("source.json"), dir.path().join("config.json"), dir.path().join("app.pid"));
    write(&source, "{\"v\": 1}");
    // The app waits for its first config (and for a database, say) and starts well after
    // --health-timeout.
    let port = free_port();
    let sync = fast_sync(&source, &dest)
        .pid_file(&pid_file)
        .health_url(&format!("http://127.0.0.1:{port}/healthz"))
        .arg("--health-timeout", "1s")
        .retry_max("500ms")
        .start();
    let status = sync.wait_state("config.json", "waiting-for-app", T);
    assert_eq!(read_text(&dest), "{\"v\": 1}");
    assert!(status["rejected"].as_array().unwrap().is_empty(), "not the config's fault: {status:#}");
    assert_eq!(http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap().0, 503);

    let app = LegacyApp::start_on_port(&dest, Some(&pid_file), port);
    assert_eq!(app.state()["config"]["v"], 1);
    let status = sync.wait_state("config.json", "synced", T);
    assert!(status["last_error"].is_null(), "{status:#}");
    assert_eq!(http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap().0, 200);
    let history = http_get_json(sync.admin, "/sync/config.json/history");
    assert!(history["versions"].as_array().unwrap().iter().all(|v| v["status"] != "rejected"), "{history:#}");
}
