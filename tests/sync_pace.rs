//! Paced applies: `--max-apply-rate` lets N changes through per window and coalesces the rest
//! into one later apply with the newest value; `--apply-jitter` delays an apply by a random
//! time within its bound. Both show in /sync.

mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn the_rate_applies_n_changes_per_window_and_coalesces_the_rest_into_one_later_apply() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.conf");
    let dest = dir.path().join("app.conf");
    write(&source, "v1");
    let sync = SyncCommand::new(&source, &dest)
        .min_quiet("50ms")
        .arg("--max-quiet", "100ms")
        .arg("--max-apply-rate", "2/5s")
        .start();
    // The first value at start is applied at once and counts; the second change is within the
    // rate too.
    wait_for_content(&dest, "v1", T);
    let first = Instant::now();
    replace_file(&source, "v2");
    wait_for_content(&dest, "v2", T);
    let status = sync.status("app.conf");
    assert_eq!(status["pacing"]["applies_in_window"], 2, "{status:#}");
    assert_eq!(status["pacing"]["max_apply_rate"], "2/5s", "{status:#}");

    // Three more changes within the window: the first waits for a slot, the next two replace it.
    replace_file(&source, "v3");
    let waiting =
        sync.wait_status("app.conf", "a change waiting for its slot", T, |s| s["pacing"]["next_apply_at"].is_string());
    let next_apply_at = waiting["pacing"]["next_apply_at"].as_str().unwrap().to_owned();
    assert_eq!(waiting["state"], "paced", "the file is behind the source: {waiting:#}");
    for (i, value) in ["v4", "v5"].iter().enumerate() {
        replace_file(&source, value);
        sync.wait_status("app.conf", "coalesced", T, |s| s["counters"]["coalesced"] == i as u64 + 1);
    }
    assert_eq!(read_text(&dest), "v2", "applied before its slot");
    let status = sync.status("app.conf");
    assert_eq!(status["pacing"]["next_apply_at"], next_apply_at.as_str(), "coalescing keeps the slot");

    // One apply at the slot, with the newest value; v3 and v4 were never written.
    wait_for_content(&dest, "v5", T);
    let applied_after = first.elapsed();
    assert!(applied_after >= Duration::from_millis(4800), "applied {applied_after:?} after the first");
    assert!(applied_after < Duration::from_secs(8), "applied {applied_after:?} after the first");
    let status = sync.wait_status("app.conf", "no change waiting", T, |s| s["pacing"]["next_apply_at"].is_null());
    assert_eq!(status["state"], "synced", "{status:#}");
    assert_eq!(status["counters"]["writes"], 3, "{status:#}");
    assert_eq!(status["counters"]["coalesced"], 2, "{status:#}");
    let (_, metrics) = http_exchange(sync.admin, "GET", "/metrics", &[], "").expect("GET /metrics");
    assert!(metrics.contains("sidecar_sync_coalesced_total{destination=\"app.conf\"} 2"), "{metrics}");
    let log = sync.proc.logs.text();
    assert!(!log.contains("\"v3\"") && !log.contains("\"v4\""), "{log}");
    eprintln!("paced apply {applied_after:?} after the first of the window (rate 2/5s)");
}

#[test]
fn jitter_delays_each_apply_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.conf");
    let dest = dir.path().join("app.conf");
    write(&source, "v0");
    let sync = SyncCommand::new(&source, &dest).min_quiet("10ms").arg("--apply-jitter", "1500ms").start();
    wait_for_content(&dest, "v0", T);
    let status = sync.status("app.conf");
    assert_eq!(status["pacing"]["apply_jitter"], "1s 500ms", "{status:#}");
    assert!(status["pacing"]["max_apply_rate"].is_null(), "{status:#}");
    let mut delays = Vec::new();
    for round in 1..=4 {
        let value = format!("v{round}");
        let written = Instant::now();
        replace_file(&source, &value);
        wait_for_content(&dest, &value, T);
        delays.push(written.elapsed());
    }
    eprintln!("applies after {delays:?} with --apply-jitter 1500ms");
    // The bound plus the quiet time and the file watch's own delay.
    assert!(delays.iter().all(|d| *d < Duration::from_millis(1500 + 700)), "{delays:?}");
    // Random: four draws within 1.5s are not all alike (the chance that they all fall within
    // 50ms of each other is about 4 * (50/1500)^3, 1.5 in 10 000).
    let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
    assert!(*max - *min > Duration::from_millis(50), "{delays:?}");
}

#[test]
fn a_refused_render_drops_the_change_waiting_for_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    write(&keys.join("host"), "db1");
    let template = dir.path().join("app.conf.j2");
    write(&template, "host={{ keys[\"host\"] }}\n");
    let dest = dir.path().join("app.conf");
    let window = Duration::from_secs(10);
    let sync = SyncCommand::new(format!("{}/", keys.display()), &dest)
        .arg("--template", &template)
        .min_quiet("50ms")
        .arg("--max-quiet", "100ms")
        .arg("--max-apply-rate", "1/10s")
        .start();
    wait_for_content(&dest, "host=db1\n", T);
    let first = Instant::now();

    // A change waits for its slot; then the key it needs is deleted: the source now holds
    // something that cannot be rendered, and the older change must not be written at the slot.
    replace_file(&keys.join("host"), "db2");
    sync.wait_status("app.conf", "a change waiting for its slot", T, |s| s["pacing"]["next_apply_at"].is_string());
    std::fs::remove_file(keys.join("host")).unwrap();
    let status = sync.wait_state("app.conf", "refused", T);
    assert!(status["pacing"]["next_apply_at"].is_null(), "a change still waits: {status:#}");

    // Nothing to wait on for a write that must not happen: past the slot, the file and the
    // state are still what they were.
    std::thread::sleep((first + window + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
    assert_eq!(read_text(&dest), "host=db1\n", "the change the source moved past was written");
    let status = sync.status("app.conf");
    assert_eq!(status["state"], "refused", "{status:#}");
    assert_eq!(status["counters"]["writes"], 1, "{status:#}");
}

#[test]
fn a_source_error_while_a_change_is_paced_clears_when_the_source_answers() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.conf");
    let dest = dir.path().join("app.conf");
    write(&source, "v1");
    let sync = SyncCommand::new(&source, &dest)
        .min_quiet("50ms")
        .arg("--max-quiet", "100ms")
        .arg("--max-apply-rate", "1/1h")
        .start();
    wait_for_content(&dest, "v1", T);
    replace_file(&source, "v2");
    sync.wait_state("app.conf", "paced", T);
    // The source gone for a moment, then back with a newer value: the change waits again, and
    // the state says so rather than the error that is over.
    std::fs::remove_file(&source).unwrap();
    sync.wait_state("app.conf", "not-synced", T);
    write(&source, "v3");
    let status = sync.wait_state("app.conf", "paced", T);
    assert!(status["pacing"]["next_apply_revision"].is_string(), "{status:#}");
    assert_eq!(read_text(&dest), "v1");
}
