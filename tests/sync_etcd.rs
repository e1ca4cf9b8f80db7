//! `sidecar sync` against a real etcd (v3, through its HTTP/JSON gateway): read then watch,
//! resuming after a disconnect with the changes made meanwhile, a watch that stalls silently
//! (etcd stopped with SIGSTOP), a deleted key, a value over --max-size, an etcd not there at
//! start (kept file, retries; --require-source fails), and --once.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);
const KEY: &str = "/apps/legacy/config.json";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// etcd holding `{"v": 1}` at KEY and, between the sidecar and it, a relay that can cut the
/// watch's connection: (etcd, relay, the source URL through the relay).
async fn etcd_behind_a_relay() -> (Etcd, Relay, String) {
    let etcd = Etcd::start();
    etcd.put(KEY, "{\"v\": 1}");
    let relay = Relay::start(etcd.addr()).await;
    let source = format!("etcd://{}{KEY}", relay.addr);
    (etcd, relay, source)
}

/// config.json in a new temp dir (kept while the dir lives).
fn dest_in_a_temp_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("config.json");
    (dir, dest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_then_watches_and_resumes_from_the_last_revision_after_a_disconnect() {
    if !require_tool("etcd") {
        return;
    }
    let (etcd, relay, source) = etcd_behind_a_relay().await;
    let (_dir, dest) = dest_in_a_temp_dir();
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, &dest).min_quiet("50ms").retry_max("300ms").source_timeout("5s").start()
    });
    tokio::task::block_in_place(|| {
        wait_for_content(&dest, "{\"v\": 1}", T);
        // No polling: only the watch can bring this.
        let started = Instant::now();
        etcd.put(KEY, "{\"v\": 2}");
        wait_for_content(&dest, "{\"v\": 2}", T);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the watch delivered the change in {:?}",
            started.elapsed()
        );

        // Disconnected: two changes happen meanwhile; after the reconnect the watch resumes
        // from the last revision and the newest value is applied.
        relay.cut();
        sync.wait_state("config.json", "not-synced", T);
        etcd.put(KEY, "{\"v\": 3}");
        let last = etcd.put(KEY, "{\"v\": 4}");
        assert_eq!(read_text(&dest), "{\"v\": 2}");
        relay.resume();
        wait_for_content(&dest, "{\"v\": 4}", T);
        // The new watch's first answer (no events yet) reads as synced, at the old revision.
        let status = sync.wait_revision("config.json", &format!("revision {last}"), T);
        assert!(status["counters"]["source_errors"].as_u64().unwrap() >= 1);
    });
}

/// etcd holding "one" at KEY, synced to app.conf with `--source-timeout timeout`, returned
/// right after the watch's silence check found nothing new: (etcd, dir, dest, sync).
fn synced_then_silence_checked(timeout: &str) -> (Etcd, tempfile::TempDir, std::path::PathBuf, SyncProcess) {
    let etcd = Etcd::start();
    etcd.put(KEY, "one");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    let sync =
        SyncCommand::new(etcd.url(KEY), &dest).min_quiet("50ms").retry_max("300ms").source_timeout(timeout).start();
    wait_for_content(&dest, "one", T);
    sync.wait_state("app.conf", "synced", T);
    let before = sync.status("app.conf")["last_sync"].clone();
    wait_until("a silence check", T, || sync.status("app.conf")["last_sync"] != before);
    (etcd, dir, dest, sync)
}

#[test]
fn a_silently_stalled_watch_is_detected_reported_and_reconnected() {
    if !require_tool("etcd") {
        return;
    }
    let (etcd, _dir, dest, sync) = synced_then_silence_checked("1s");
    // A quiet key with a healthy etcd is not a stall: the check after a silent second found
    // nothing new.
    assert_eq!(sync.state("app.conf"), "synced");

    // The server stops answering, without closing anything: no event, no error, no EOF.
    etcd.signal("STOP");
    let status = sync.wait_state("app.conf", "stalled", T);
    assert!(status["last_error"].as_str().unwrap().contains("silent"), "{status:#}");
    assert_eq!(read_text(&dest), "one");
    etcd.signal("CONT");
    sync.wait_state("app.conf", "synced", T);
    etcd.put(KEY, "two");
    wait_for_content(&dest, "two", T);
}

#[test]
fn a_deleted_or_oversized_value_leaves_the_file_and_an_etcd_down_at_start_is_retried() {
    if !require_tool("etcd") {
        return;
    }
    let mut etcd = Etcd::start();
    etcd.put(KEY, "v1");
    etcd.kill();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    write(&dest, "kept\n");

    // --require-source: refuse to start.
    let (code, stderr) = run_to_exit(&[
        "sync",
        "--source",
        &etcd.url(KEY),
        "--dest",
        s(&dest),
        "--require-source",
        "--source-timeout",
        "2s",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--require-source") && stderr.contains(&format!("127.0.0.1:{}", etcd.client_port)),
        "{stderr}"
    );

    // Otherwise: start with the file as it is, not ready, retrying.
    let sync =
        SyncCommand::new(etcd.url(KEY), &dest).min_quiet("50ms").retry_max("500ms").arg("--max-size", "1024").start();
    let status = sync.wait_state("app.conf", "not-synced", T);
    assert!(status["last_error"].as_str().unwrap().contains("cannot connect"), "{status:#}");
    let (code, body) = http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("sync app.conf has not synced yet"), "{body}");
    assert_eq!(read_text(&dest), "kept\n");
    etcd.launch();
    wait_for_content(&dest, "v1", T);
    sync.wait_state("app.conf", "synced", T);
    assert_eq!(http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap().0, 200);

    // Deleted: kept, reported.
    etcd.delete(KEY);
    let status = sync.wait_state("app.conf", "not-synced", T);
    assert!(status["last_error"].as_str().unwrap().contains("was deleted"), "{status:#}");
    assert_eq!(read_text(&dest), "v1");
    // Too large: refused, kept.
    etcd.put(KEY, &"x".repeat(2000));
    let deadline = Instant::now() + T;
    while !sync.status("app.conf")["last_error"].as_str().unwrap_or("").contains("larger than --max-size") {
        assert!(Instant::now() < deadline, "{}", sync.status("app.conf"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_text(&dest), "v1");
    etcd.put(KEY, "v2");
    wait_for_content(&dest, "v2", T);
    sync.wait_state("app.conf", "synced", T);
}

#[test]
fn once_exits_0_in_step_and_1_when_the_key_is_missing() {
    if !require_tool("etcd") {
        return;
    }
    let etcd = Etcd::start();
    etcd.put(KEY, "from etcd\n");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("app.conf");
    let status = sidecar_command(&["sync", "--source", &etcd.url(KEY), "--dest", s(&dest), "--once"])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(read_text(&dest), "from etcd\n");
    let (code, stderr) = run_to_exit(&["sync", "--source", &etcd.url("/no/such/key"), "--dest", s(&dest), "--once"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("key /no/such/key does not exist"), "{stderr}");
    assert_eq!(read_text(&dest), "from etcd\n");
}

#[test]
fn etcd_restarted_on_an_empty_data_dir_is_read_again_though_its_revisions_went_back() {
    if !require_tool("etcd") {
        return;
    }
    let mut etcd = Etcd::start();
    let mut before = 0;
    for v in 1..=6 {
        before = etcd.put(KEY, &format!("{{\"v\": {v}}}"));
    }
    let (_dir, dest) = dest_in_a_temp_dir();
    let sync = SyncCommand::new(etcd.url(KEY), &dest).min_quiet("50ms").retry_max("300ms").source_timeout("5s").start();
    sync.wait_revision("config.json", &format!("revision {before}"), T);

    etcd.restart_empty();
    let after = etcd.put(KEY, "{\"v\": 7}");
    assert!(after < before, "a new data dir starts its revisions again: {after} after {before}");
    wait_for_content(&dest, "{\"v\": 7}", T);
    sync.wait_revision("config.json", &format!("revision {after}"), T);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_value_replayed_after_a_disconnect_does_not_hide_the_good_one_after_it() {
    if !require_tool("etcd") {
        return;
    }
    let (etcd, relay, source) = etcd_behind_a_relay().await;
    let (_dir, dest) = dest_in_a_temp_dir();
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, &dest)
            .arg("--max-size", "1000")
            .min_quiet("50ms")
            .retry_max("300ms")
            .source_timeout("5s")
            .start()
    });
    tokio::task::block_in_place(|| {
        wait_for_content(&dest, "{\"v\": 1}", T);
        // While the sidecar is cut off, a value over --max-size, then a good one: the new
        // watch's replay fails on the first.
        relay.cut();
        sync.wait_state("config.json", "not-synced", T);
        etcd.put(KEY, &"x".repeat(200_000));
        let good = etcd.put(KEY, "{\"v\": 2}");
        relay.resume();
        wait_for_content(&dest, "{\"v\": 2}", T);
        sync.wait_revision("config.json", &format!("revision {good}"), T);
    });
}

#[test]
fn a_stalled_watch_is_reported_within_the_source_timeout() {
    if !require_tool("etcd") {
        return;
    }
    // Stopped right after a silence check, when the watch has the longest to wait.
    let (etcd, _dir, _dest, sync) = synced_then_silence_checked("6s");
    etcd.signal("STOP");
    let stopped = Instant::now();
    sync.wait_state("app.conf", "stalled", T);
    let took = stopped.elapsed();
    etcd.signal("CONT");
    // 6s, with room for a loaded machine; reporting only after twice the timeout takes 12s.
    assert!(took < Duration::from_secs(9), "the stall was reported {took:?} after etcd stopped");
}
