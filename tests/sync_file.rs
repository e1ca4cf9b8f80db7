//! `sidecar sync` with a file source (a plain file, a ConfigMap-style `..data` mount): the steps
//! of a change (hash compare, validation, atomic write keeping mode and owner, history,
//! notification, coalescing), restarts, --once and --dry-run, a full or read-only
//! destination, and the admin API's status, history and rollback.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sidecar::sync::hash::content_hash;

const T: Duration = Duration::from_secs(20);

/// A notifier that appends the new hash to a file: each line is one notification.
fn exec_counter(dir: &Path) -> (PathBuf, String) {
    let file = dir.join("notified.log");
    let cmd = format!("echo \"$SIDECAR_SYNC_HASH\" >> '{}'", file.display());
    (file, cmd)
}

fn count_lines(path: &Path) -> usize {
    read_text(path).lines().count()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Waits for the status's `last_sync` to move `n` times: proof that the source was read again.
fn wait_reads(sync: &SyncProcess, name: &str, n: usize) {
    for _ in 0..n {
        let before = sync.status(name)["last_sync"].clone();
        wait_until("another read of the source", T, || sync.status(name)["last_sync"] != before);
    }
}

#[test]
fn a_change_is_written_atomically_keeping_mode_and_owner_notified_once_and_kept_in_history() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir(&app).unwrap();
    let (source, dest) = (dir.path().join("source.json"), app.join("config.json"));
    write(&dest, "{\"v\": 0}\n");
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o640)).unwrap();
    let root = is_root();
    if root {
        std::os::unix::fs::chown(&dest, Some(1234), Some(2345)).unwrap();
    }
    write(&source, "{\"v\": 1}\n");
    let (notified, exec) = exec_counter(dir.path());
    let sync = SyncCommand::new(&source, &dest)
        .min_quiet("50ms")
        .poll_interval("200ms")
        .arg("--history-keep", "3")
        .exec(&exec)
        .start();
    wait_for_content(&dest, "{\"v\": 1}\n", T);
    wait_until("one notification", T, || count_lines(&notified) == 1);
    assert_eq!(read_text(&notified).trim(), content_hash(b"{\"v\": 1}\n"), "the exec notifier gets the new hash");
    let meta = std::fs::metadata(&dest).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640, "mode kept");
    if root {
        assert_eq!((meta.uid(), meta.gid()), (1234, 2345), "owner kept");
    }

    replace_file(&source, "{\"v\": 2}\n");
    wait_for_content(&dest, "{\"v\": 2}\n", T);
    wait_until("a second notification", T, || count_lines(&notified) == 2);
    let status = sync.wait_state("config.json", "synced", T);
    assert_eq!(status["current_hash"], content_hash(b"{\"v\": 2}\n"));
    assert!(status["source_revision"].as_str().unwrap().starts_with("mtime "), "{status}");
    assert!(status["last_sync"].is_string() && status["last_change"].is_string(), "{status}");
    assert_eq!(status["counters"]["writes"], 2);

    // Step 4: the versions, with time, revision and hash; the one found on disk first.
    let history = http_get_json(sync.admin, "/sync/config.json/history");
    let versions = history["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 3, "{history:#}");
    assert_eq!(versions[0]["status"], "initial");
    assert_eq!(versions[0]["hash"], content_hash(b"{\"v\": 0}\n"));
    assert_eq!(versions[2]["hash"], content_hash(b"{\"v\": 2}\n"));
    assert!(versions[2]["time"].is_string() && versions[2]["revision"].as_str().unwrap().starts_with("mtime"));

    // Only N are kept, on disk too.
    for v in 3..=5 {
        replace_file(&source, &format!("{{\"v\": {v}}}\n"));
        wait_for_content(&dest, &format!("{{\"v\": {v}}}\n"), T);
    }
    let history_dir = app.join(".sidecar-history/config.json");
    // The state file is written last, once the version is recorded and the app notified.
    wait_until("v5 recorded as applied", T, || {
        let state: serde_json::Value =
            serde_json::from_str(&read_text(&history_dir.join("state.json"))).unwrap_or_default();
        state["applied_hash"] == content_hash(b"{\"v\": 5}\n")
    });
    assert_eq!(http_get_json(sync.admin, "/sync/config.json/history")["versions"].as_array().unwrap().len(), 3);
    let copies = std::fs::read_dir(&history_dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('0'))
        .count();
    assert_eq!(copies, 3, "copies in {}", history_dir.display());

    // Atomic replacement leaves nothing behind in the destination's directory.
    let names: Vec<String> =
        std::fs::read_dir(&app).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, vec![".sidecar-history", "config.json"], "no temp files: {names:?}");
}

#[test]
fn equal_content_is_neither_written_nor_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.conf"), dir.path().join("app.conf"));
    write(&source, "same\n");
    write(&dest, "same\n");
    let before = std::fs::metadata(&dest).unwrap();
    let (notified, exec) = exec_counter(dir.path());
    let sync = SyncCommand::new(&source, &dest).poll_interval("100ms").exec(&exec).start();
    sync.wait_state("app.conf", "synced", T);
    // The source rewritten with the same bytes: read again, still nothing to do.
    replace_file(&source, "same\n");
    wait_reads(&sync, "app.conf", 3);
    let after = std::fs::metadata(&dest).unwrap();
    assert_eq!((after.ino(), after.mtime_nsec()), (before.ino(), before.mtime_nsec()), "the file was not rewritten");
    assert_eq!(count_lines(&notified), 0, "nobody was notified");
    assert_eq!(sync.status("app.conf")["counters"]["writes"], 0);
}

#[test]
fn a_restart_with_nothing_changed_notifies_nobody_and_a_change_made_while_down_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.conf"), dir.path().join("app.conf"));
    write(&source, "one\n");
    write(&dest, "zero\n");
    let (notified, exec) = exec_counter(dir.path());
    let command = SyncCommand::new(&source, &dest).poll_interval("100ms").exec(&exec);

    let mut sync = command.start();
    wait_for_content(&dest, "one\n", T);
    wait_until("first notification", T, || count_lines(&notified) == 1);
    sync.proc.signal("TERM");
    assert!(sync.proc.wait_exit(T).success());

    // Nothing changed while it was down: no signal after the restart.
    let mut sync = command.start();
    sync.wait_state("app.conf", "synced", T);
    wait_reads(&sync, "app.conf", 3);
    assert_eq!(count_lines(&notified), 1, "a restart with nothing changed notifies nobody");
    sync.proc.signal("TERM");
    assert!(sync.proc.wait_exit(T).success());

    // A change made while it was down: applied once.
    write(&source, "two\n");
    let sync = command.start();
    wait_for_content(&dest, "two\n", T);
    wait_until("second notification", T, || count_lines(&notified) == 2);
    wait_reads(&sync, "app.conf", 3);
    assert_eq!(count_lines(&notified), 2, "applied once");
}

#[test]
fn a_version_written_but_never_confirmed_is_notified_without_a_rewrite() {
    // The sidecar stopped after the rename and before the app was told: the file holds v2,
    // the state file still says v1 was the last applied.
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.conf"), dir.path().join("app.conf"));
    write(&source, "v2\n");
    write(&dest, "v2\n");
    let history = dir.path().join(".sidecar-history/app.conf");
    std::fs::create_dir_all(&history).unwrap();
    write(
        &history.join("state.json"),
        &format!("{{\"applied_hash\": \"{}\", \"applied_revision\": \"x\"}}", content_hash(b"v1\n")),
    );
    let inode = std::fs::metadata(&dest).unwrap().ino();
    let (notified, exec) = exec_counter(dir.path());
    let sync = SyncCommand::new(&source, &dest).poll_interval("100ms").exec(&exec).start();
    wait_until("the app told about v2", T, || count_lines(&notified) == 1);
    sync.wait_state("app.conf", "synced", T);
    assert_eq!(std::fs::metadata(&dest).unwrap().ino(), inode, "not rewritten");
    sync.proc.logs.wait_for("was not confirmed to run it", T);
    wait_reads(&sync, "app.conf", 2);
    assert_eq!(count_lines(&notified), 1, "told once");
}

#[test]
fn sighup_does_not_stop_sidecar_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.conf"), dir.path().join("app.conf"));
    write(&source, "x\n");
    let mut sync = SyncCommand::new(&source, &dest).start();
    sync.wait_state("app.conf", "synced", T);
    sync.proc.signal("HUP");
    sync.proc.logs.wait_for("SIGHUP: nothing to reload", T);
    assert!(sync.proc.child.try_wait().unwrap().is_none(), "still running");
    sync.proc.signal("TERM");
    assert!(sync.proc.wait_exit(T).success(), "SIGTERM: exit 0");
}

#[test]
fn a_configmap_data_symlink_swap_is_seen() {
    // The layout kubelet makes: config.json -> ..data/config.json, ..data -> ..2024_01, and an
    // update swaps ..data by renaming a new symlink over it.
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("configmap");
    std::fs::create_dir_all(mount.join("..2024_01")).unwrap();
    write(&mount.join("..2024_01/config.json"), "{\"gen\": 1}");
    std::os::unix::fs::symlink("..2024_01", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.json", mount.join("config.json")).unwrap();
    let dest = dir.path().join("config.json");
    // A long poll interval: only the directory watch can explain a quick pick-up.
    let sync = SyncCommand::new(format!("file://{}", mount.join("config.json").display()), &dest)
        .poll_interval("1h")
        .min_quiet("50ms")
        .start();
    wait_for_content(&dest, "{\"gen\": 1}", T);

    std::fs::create_dir_all(mount.join("..2024_02")).unwrap();
    write(&mount.join("..2024_02/config.json"), "{\"gen\": 2}");
    std::os::unix::fs::symlink("..2024_02", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(mount.join("..2024_01")).unwrap();
    wait_for_content(&dest, "{\"gen\": 2}", Duration::from_secs(5));
    sync.wait_state("config.json", "synced", T);
}

#[test]
fn a_source_file_rewritten_in_place_is_seen() {
    // `cat > source.json` keeps the inode: the watch sees only the close that ends the write.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.json");
    write(&source, "{\"gen\": 1}");
    let dest = dir.path().join("app.json");
    let sync = SyncCommand::new(&source, &dest).poll_interval("1h").min_quiet("50ms").start();
    wait_for_content(&dest, "{\"gen\": 1}", T);
    write(&source, "{\"gen\": 2}");
    wait_for_content(&dest, "{\"gen\": 2}", Duration::from_secs(5));
    sync.wait_state("app.json", "synced", T);
}

#[test]
fn invalid_empty_too_large_and_check_failing_versions_are_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.json"), dir.path().join("app.json"));
    write(&source, "{\"v\": 1}");
    let (notified, exec) = exec_counter(dir.path());
    let sync = SyncCommand::new(&source, &dest)
        .poll_interval("100ms")
        .min_quiet("50ms")
        .arg("--validate", "json")
        .arg("--max-size", "64")
        .arg("--check-cmd", "! grep -q forbidden {}")
        .exec(&exec)
        .start();
    wait_for_content(&dest, "{\"v\": 1}", T);
    wait_until("first notification", T, || count_lines(&notified) == 1);

    let refused = |contents: &str, state: &str, says: &str| {
        replace_file(&source, contents);
        let deadline = Instant::now() + T;
        loop {
            let status = sync.status("app.json");
            if status["state"] == state && status["last_error"].as_str().unwrap_or("").contains(says) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{contents:?} not reported as {state} / {says:?}: {status:#}\n{}",
                sync.proc.logs.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(read_text(&dest), "{\"v\": 1}", "{contents:?}: the file is untouched");
    };
    refused("{\"v\": ", "refused", "not valid JSON");
    refused("", "refused", "empty value");
    refused("<html>500 Internal Server Error</html>", "refused", "not valid JSON");
    refused(&format!("{{\"big\": \"{}\"}}", "x".repeat(100)), "not-synced", "larger than --max-size");
    refused("{\"forbidden\": true}", "refused", "check command");
    assert!(sync.status("app.json")["counters"]["refused"].as_u64().unwrap() >= 4);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("sidecar-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "the refused candidate was removed: {leftovers:?}");
    assert_eq!(count_lines(&notified), 1, "nothing refused was signalled");

    replace_file(&source, "{\"v\": 2}");
    wait_for_content(&dest, "{\"v\": 2}", T);
    sync.wait_state("app.json", "synced", T);
    assert_eq!(count_lines(&notified), 2);
}

#[test]
fn a_burst_of_changes_is_coalesced_and_max_quiet_bounds_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.txt"), dir.path().join("app.txt"));
    write(&source, "start\n");
    let (notified, exec) = exec_counter(dir.path());
    let sync = SyncCommand::new(&source, &dest)
        .poll_interval("1h")
        .min_quiet("400ms")
        .arg("--max-quiet", "1500ms")
        .exec(&exec)
        .start();
    wait_for_content(&dest, "start\n", T);
    wait_until("first notification", T, || count_lines(&notified) == 1);

    // 50 changes as fast as they can be made: one write, one notification.
    for i in 0..50 {
        replace_file(&source, &format!("burst {i}\n"));
    }
    wait_for_content(&dest, "burst 49\n", T);
    wait_until("the burst's notification", T, || count_lines(&notified) >= 2);
    assert!(sync.status("app.txt")["counters"]["writes"].as_u64().unwrap() <= 3, "{}", sync.status("app.txt"));
    assert!(count_lines(&notified) <= 3, "50 changes gave {} notifications", count_lines(&notified));

    // Changes every 100 ms never leave 400 ms of quiet: max-quiet still applies one within 1.5 s.
    let before = count_lines(&notified);
    let started = Instant::now();
    let mut applied_during = false;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(4) {
        replace_file(&source, &format!("stream {i}\n"));
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
        applied_during |= read_text(&dest).starts_with("stream ");
    }
    assert!(applied_during, "a version was applied while the changes kept coming (max-quiet)");
    let during = count_lines(&notified) - before;
    assert!((1..=4).contains(&during), "{during} notifications in 4 s of changes every 100 ms");
    wait_for_content(&dest, &format!("stream {}\n", i - 1), T);
}

#[test]
fn once_syncs_one_time_and_dry_run_prints_the_diff() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.ini"), dir.path().join("app.ini"));
    write(&source, "[main]\nport = 8080\nworkers = 4\n");
    write(&dest, "[main]\nport = 8080\nworkers = 2\n");

    let run = |args: &[&str]| {
        let mut full = vec!["sync", "--source", s(&source), "--dest", s(&dest)];
        full.extend_from_slice(args);
        let out = sidecar_command(&full).stdin(Stdio::null()).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("-workers = 2") && stdout.contains("+workers = 4"), "unified diff:\n{stdout}");
    assert!(stdout.contains(s(&dest)), "{stdout}");
    assert_eq!(read_text(&dest), "[main]\nport = 8080\nworkers = 2\n", "--dry-run changes nothing");

    let (code, _, stderr) = run(&["--once"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read_text(&dest), "[main]\nport = 8080\nworkers = 4\n");
    let (code, stdout, _) = run(&["--dry-run"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("nothing would change"), "{stdout}");

    // Source gone: exit 1, file untouched; a refused version: exit 1.
    std::fs::remove_file(&source).unwrap();
    let (code, _, stderr) = run(&["--once"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(s(&source)), "names the source: {stderr}");
    assert_eq!(read_text(&dest), "[main]\nport = 8080\nworkers = 4\n");
    write(&source, "not = [toml\n");
    let (code, _, stderr) = run(&["--once", "--validate", "toml"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not valid TOML"), "{stderr}");
    assert_eq!(read_text(&dest), "[main]\nport = 8080\nworkers = 4\n");
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_or_read_only_destination_keeps_the_old_file_and_is_retried() {
    if !is_root() {
        eprintln!("skipping: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"]).arg(&mnt).status().unwrap();
    if !status.success() {
        assert!(std::env::var_os("CI").is_none(), "mount -t tmpfs failed as root in CI");
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    }
    let _mount = Mount(mnt.clone());
    let (source, dest) = (dir.path().join("source.conf"), mnt.join("app.conf"));
    write(&dest, "old\n");
    write(&source, "old\n");
    let sync = SyncCommand::new(&source, &dest)
        .poll_interval("100ms")
        .min_quiet("50ms")
        .retry_max("300ms")
        .arg("--history-dir", dir.path().join("history"))
        .start();
    sync.wait_state("app.conf", "synced", T);

    // Disk full: fill the tmpfs, then offer a version larger than what is left.
    let filler = mnt.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 64 * 1024]);
    let big = "x".repeat(16 * 1024) + "\n";
    replace_file(&source, &big);
    let status = sync.wait_state("app.conf", "write-failed", T);
    assert!(status["last_error"].as_str().unwrap().contains("No space left"), "{status:#}");
    assert_eq!(read_text(&dest), "old\n", "the old file is intact");
    assert!(
        std::fs::read_dir(&mnt).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("sidecar-tmp")),
        "no partial temp file"
    );
    std::fs::remove_file(&filler).unwrap();
    wait_for_content(&dest, &big, T);
    sync.wait_state("app.conf", "synced", T);

    // Read-only: the same, until it is writable again.
    assert!(Command::new("mount").args(["-o", "remount,ro"]).arg(&mnt).status().unwrap().success());
    replace_file(&source, "after read-only\n");
    let status = sync.wait_state("app.conf", "write-failed", T);
    assert!(status["last_error"].as_str().unwrap().contains("Read-only file system"), "{status:#}");
    assert_eq!(read_text(&dest), big);
    assert!(Command::new("mount").args(["-o", "remount,rw"]).arg(&mnt).status().unwrap().success());
    wait_for_content(&dest, "after read-only\n", T);
}

/// POST /sync/app.conf/rollback to version `id`, with the token these tests use.
fn roll_back_to(sync: &SyncProcess, id: &serde_json::Value) -> (u16, String) {
    let body = format!("{{\"version\": {id}}}");
    http_exchange(sync.admin, "POST", "/sync/app.conf/rollback", &[("authorization", "Bearer s3cret")], &body).unwrap()
}

#[test]
fn admin_rollback_writes_the_previous_version_and_holds_it_until_the_source_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.conf"), dir.path().join("app.conf"));
    let token = dir.path().join("token");
    write(&token, "s3cret\n");
    write(&source, "v1\n");
    let (notified, exec) = exec_counter(dir.path());
    let sync = SyncCommand::new(&source, &dest)
        .poll_interval("100ms")
        .min_quiet("50ms")
        .exec(&exec)
        .arg("--admin-token-file", &token)
        .start();
    wait_for_content(&dest, "v1\n", T);
    replace_file(&source, "v2\n");
    wait_for_content(&dest, "v2\n", T);
    wait_until("two notifications", T, || count_lines(&notified) == 2);

    let (code, _) = http_exchange(sync.admin, "POST", "/sync/app.conf/rollback", &[], "").unwrap();
    assert_eq!(code, 401, "rollback needs the token");
    let (code, _) = http_exchange(sync.admin, "GET", "/sync/app.conf/rollback", &[], "").unwrap();
    assert_eq!(code, 405);
    let (code, _) =
        http_exchange(sync.admin, "POST", "/sync/nope/rollback", &[("authorization", "Bearer s3cret")], "").unwrap();
    assert_eq!(code, 404);

    let (code, body) =
        http_exchange(sync.admin, "POST", "/sync/app.conf/rollback", &[("authorization", "Bearer s3cret")], "")
            .unwrap();
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["version"]["hash"], content_hash(b"v1\n"), "{report:#}");
    let held = report["held_until"].as_str().unwrap_or_default();
    assert!(held.contains(&content_hash(b"v2\n")[..12]), "the report says what undoes it: {report:#}");
    assert_eq!(read_text(&dest), "v1\n");
    assert_eq!(count_lines(&notified), 3, "the rollback notifies like any change");
    // The source still says v2: not re-applied until it changes.
    wait_reads(&sync, "app.conf", 3);
    assert_eq!(read_text(&dest), "v1\n");
    assert!(sync.status("app.conf")["rejected"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(content_hash(b"v2\n"))));

    // A version chosen by id, in the JSON body.
    let history = http_get_json(sync.admin, "/sync/app.conf/history");
    let v2 = history["versions"].as_array().unwrap().iter().find(|v| v["hash"] == content_hash(b"v2\n")).unwrap()["id"]
        .clone();
    let (code, body) = roll_back_to(&sync, &v2);
    assert_eq!(code, 200, "{body}");
    assert_eq!(read_text(&dest), "v2\n");
    let (code, body) = http_exchange(
        sync.admin,
        "POST",
        "/sync/app.conf/rollback?version=ffffff",
        &[("authorization", "Bearer s3cret")],
        "",
    )
    .unwrap();
    assert_eq!(code, 409, "{body}");

    replace_file(&source, "v3\n");
    wait_for_content(&dest, "v3\n", T);
    sync.proc.logs.wait_for("replaces the rollback to version", T);
    let all = http_get_json(sync.admin, "/sync");
    assert_eq!(all["destinations"][0]["name"], "app.conf");
    let (code, body) = http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap();
    assert_eq!(code, 200, "{body}");
}

#[test]
fn rolling_back_and_forth_keeps_one_history_entry_per_version() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.conf"), dir.path().join("app.conf"));
    let token = dir.path().join("token");
    write(&token, "s3cret\n");
    write(&source, "v1\n");
    let sync = SyncCommand::new(&source, &dest)
        .poll_interval("100ms")
        .min_quiet("50ms")
        .arg("--history-keep", "4")
        .arg("--admin-token-file", &token)
        .start();
    wait_for_content(&dest, "v1\n", T);
    for v in ["v2\n", "v3\n"] {
        replace_file(&source, v);
        wait_for_content(&dest, v, T);
    }
    let id_of = |content: &[u8]| {
        let history = http_get_json(sync.admin, "/sync/app.conf/history");
        let versions = history["versions"].as_array().unwrap().clone();
        versions.iter().find(|v| v["hash"] == content_hash(content)).map(|v| v["id"].clone())
    };
    let v1 = id_of(b"v1\n").expect("v1 in the history");
    let v2 = id_of(b"v2\n").expect("v2 in the history");
    for round in 0..5 {
        for (id, content) in [(&v1, "v1\n"), (&v2, "v2\n")] {
            let (code, body) = roll_back_to(&sync, id);
            assert_eq!(code, 200, "round {round}: {body}");
            assert_eq!(read_text(&dest), content);
        }
    }
    let history = http_get_json(sync.admin, "/sync/app.conf/history");
    let hashes: Vec<_> = history["versions"].as_array().unwrap().iter().map(|v| v["hash"].clone()).collect();
    assert_eq!(hashes.len(), 3, "one entry per version: {history:#}");
    assert_eq!(id_of(b"v1\n"), Some(v1), "the version asked for keeps its id and is still there");
}

#[test]
fn a_symlinked_destination_is_written_through_and_stays_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let (etc, shared) = (dir.path().join("etc"), dir.path().join("shared"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    // /etc/app/config.conf -> ../shared/config.conf, as deployments do.
    write(&shared.join("config.conf"), "v1\n");
    let dest = etc.join("config.conf");
    std::os::unix::fs::symlink("../shared/config.conf", &dest).unwrap();
    let source = dir.path().join("source.conf");
    write(&source, "v1\n");
    let sync = SyncCommand::new(&source, &dest).poll_interval("100ms").min_quiet("50ms").start();
    sync.wait_state("config.conf", "synced", T);

    replace_file(&source, "v2\n");
    wait_for_content(&shared.join("config.conf"), "v2\n", T);
    let link = std::fs::symlink_metadata(&dest).unwrap();
    assert!(link.file_type().is_symlink(), "the link was replaced by a regular file");
    assert_eq!(std::fs::read_link(&dest).unwrap(), Path::new("../shared/config.conf"));
    assert_eq!(read_text(&dest), "v2\n");
    let temps = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".sidecar-tmp"))
            .count()
    };
    assert_eq!(temps(&etc) + temps(&shared), 0);
}

#[test]
fn temp_files_left_by_a_crash_mid_write_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.conf"), dir.path().join("app.conf"));
    write(&source, "v1\n");
    write(&dest, "v1\n");
    // What a sidecar killed between writing its temp file and renaming it leaves behind.
    let left = dir.path().join(".sidecar-tmp-4194301-0-app.conf");
    std::fs::write(&left, vec![b'x'; 1_300_000]).unwrap();
    // Another file's temp file is not this destination's to remove.
    let other = dir.path().join(".sidecar-tmp-4194301-0-other.conf");
    write(&other, "x");
    let sync = SyncCommand::new(&source, &dest).poll_interval("100ms").min_quiet("50ms").start();
    sync.wait_state("app.conf", "synced", T);
    assert!(!left.exists(), "the crashed write's temp file is still there");
    assert!(other.exists());
    sync.proc.logs.wait_for("left by a write that did not finish", T);
}

#[test]
fn history_and_state_survive_the_destination_directory_being_deleted_and_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let app_dir = dir.path().join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    let (source, dest) = (dir.path().join("source.conf"), app_dir.join("app.conf"));
    write(&source, "v1\n");
    let sync = SyncCommand::new(&source, &dest).poll_interval("100ms").min_quiet("50ms").retry_max("300ms").start();
    wait_for_content(&dest, "v1\n", T);
    // Synced: the history and state writes that follow the file's are done too.
    sync.wait_state("app.conf", "synced", T);

    std::fs::remove_dir_all(&app_dir).unwrap();
    std::fs::create_dir_all(&app_dir).unwrap();
    replace_file(&source, "v2\n");
    wait_for_content(&dest, "v2\n", T);
    sync.wait_state("app.conf", "synced", T);
    let history_dir = app_dir.join(".sidecar-history/app.conf");
    wait_until("state.json written again", T, || {
        read_text(&history_dir.join("state.json")).contains(&content_hash(b"v2\n"))
    });
    let versions = read_text(&history_dir.join("versions.json"));
    assert!(versions.contains(&content_hash(b"v2\n")), "{versions}");
    let history = http_get_json(sync.admin, "/sync/app.conf/history");
    assert!(history["versions"].as_array().unwrap().iter().any(|v| v["hash"] == content_hash(b"v2\n")), "{history:#}");
}
