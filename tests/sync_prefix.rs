//! `sidecar sync` with a key prefix as the source (a source ending in /): every key under it
//! rendered into one file with --template (several keys, a missing key, a syntax error, a
//! changed template), or written into a directory, one file per key, swapped in as one set
//! (add, change, delete, with a concurrent reader that must never see a mix of two versions;
//! escaping key names refused; history and rollback of a set). Sources: a directory, the
//! Consul-protocol test server (`?recurse`), and a real etcd (range + watch with range_end).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `PATH/`: a directory, as a source or destination.
fn slash(p: &Path) -> String {
    format!("{}/", p.display())
}

/// A directory source `keys/` with `db/host`, `db/port` and `mode`, and a template beside it.
fn keys_dir(dir: &Path, template: &str) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys");
    std::fs::create_dir_all(keys.join("db")).unwrap();
    write(&keys.join("db/host"), "db1");
    write(&keys.join("db/port"), "5432");
    write(&keys.join("mode"), "fast");
    let template_file = dir.join("app.conf.j2");
    write(&template_file, template);
    (keys, template_file)
}

#[test]
fn a_template_renders_several_keys_again_when_a_key_or_the_template_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, template) = keys_dir(
        dir.path(),
        "host={{ keys[\"db/host\"] }}:{{ keys[\"db/port\"] }}\nmode={{ key_or_default(\"mode\", \"safe\") }}\n",
    );
    let dest = dir.path().join("app.conf");
    // Polling an hour apart: only the watches can bring the changes below.
    let sync = SyncCommand::new(slash(&keys), &dest)
        .arg("--template", &template)
        .poll_interval("1h")
        .min_quiet("50ms")
        .start();
    wait_for_content(&dest, "host=db1:5432\nmode=fast\n", T);
    let status = sync.wait_state("app.conf", "synced", T);
    assert!(status["source_revision"].as_str().unwrap().contains("template "), "{status:#}");

    // A key in a subdirectory, a key removed (the default takes over).
    replace_file(&keys.join("db/host"), "db2");
    wait_for_content(&dest, "host=db2:5432\nmode=fast\n", T);
    std::fs::remove_file(keys.join("mode")).unwrap();
    wait_for_content(&dest, "host=db2:5432\nmode=safe\n", T);

    // The template itself changed: rendered again with the same keys.
    replace_file(&template, "{% for k, v in keys_under(\"db\") | items %}{{ k }}={{ v }}\n{% endfor %}");
    wait_for_content(&dest, "host=db2\nport=5432\n", T);
    // The status follows the rename a moment later.
    let writes = || sync.status("app.conf")["counters"]["writes"].as_u64().unwrap_or(0);
    wait_until("the fourth write counted", T, || writes() >= 4);
    assert_eq!(writes(), 4, "one write per change: {:#}", sync.status("app.conf"));

    // The template gone: refused, the file kept; back as it was: in step again, unwritten.
    let text = read_text(&template);
    std::fs::remove_file(&template).unwrap();
    let status = wait_refused(&sync, "app.conf", "cannot read template");
    assert!(status["last_error"].as_str().unwrap().contains(s(&template)), "{status:#}");
    replace_file(&template, &text);
    sync.wait_state("app.conf", "synced", T);
    assert_eq!(read_text(&dest), "host=db2\nport=5432\n");
    assert_eq!(writes(), 4);
}

#[test]
fn a_missing_key_or_a_template_error_is_refused_naming_the_line_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, template) = keys_dir(dir.path(), "host={{ keys[\"db/host\"] }}\nuser={{ keys[\"db/user\"] }}\n");
    let dest = dir.path().join("app.conf");
    write(&dest, "old\n");
    let sync = SyncCommand::new(slash(&keys), &dest)
        .arg("--template", &template)
        .poll_interval("1h")
        .min_quiet("50ms")
        .start();
    let status = sync.wait_state("app.conf", "refused", T);
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains(&format!("template {} line 2", template.display())), "{status:#}");
    assert_eq!(read_text(&dest), "old\n", "a render that fails writes nothing");
    assert_eq!(status["synced_once"], false, "{status:#}");
    let (_, ready) = http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap();
    assert!(ready.contains("template"), "/readyz says why: {ready}");

    // The key arrives: rendered and written.
    write(&keys.join("db/user"), "app");
    wait_for_content(&dest, "host=db1\nuser=app\n", T);
    sync.wait_state("app.conf", "synced", T);

    // A syntax error on line 3 of a changed template: refused, the file stays.
    replace_file(&template, "a\n{# fine #}\n{% if %}\n");
    let status = sync.wait_state("app.conf", "refused", T);
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("template {} line 3", template.display())) && error.contains("syntax"),
        "{status:#}"
    );
    assert_eq!(read_text(&dest), "host=db1\nuser=app\n");
    assert_eq!(status["counters"]["refused"], 2, "{status:#}");

    // At start, a template that does not compile stops the sidecar with its line.
    let (code, log) = run_to_exit(&["sync", "--source", &slash(&keys), "--dest", s(&dest), "--template", s(&template)]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("line 3"), "{log}");
    // A prefix source with nothing to make of it is refused with what to give.
    let (code, log) = run_to_exit(&["sync", "--source", &slash(&keys), "--dest", s(&dest)]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("--template FILE") && log.contains("ending in /"), "{log}");
}

/// Every key of version `n` holds `v{n}`; odd versions have one more key, `extra`.
fn version(n: u64) -> Vec<(String, String)> {
    let mut keys: Vec<(String, String)> =
        ["a.conf", "b.conf", "nested/c.conf"].iter().map(|k| (format!("apps/x/{k}"), format!("v{n}"))).collect();
    if n % 2 == 1 {
        keys.push(("apps/x/extra".into(), format!("v{n}")));
    }
    keys
}

fn set_version(consul: &LongPollServer, n: u64) {
    let keys = version(n);
    consul.set_keys(&keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(), n + 10);
}

/// What a reader of the directory saw.
#[derive(Default)]
struct ReaderCounts {
    /// Reads during which `..data` did not move: all files must be of one version.
    consistent: AtomicUsize,
    /// Reads that overlapped a swap (retried, as an app would).
    overlapped: AtomicUsize,
}

/// Reads every visible file (through its stable symlink) until `stop`; a read during which
/// `..data` stayed put must show one version in every file. Panics on a mix.
fn read_sets_until(dest: &Path, stop: &AtomicBool, counts: &ReaderCounts) {
    while !stop.load(Ordering::SeqCst) {
        let Ok(before) = std::fs::read_link(dest.join("..data")) else { continue };
        let mut seen: Vec<(String, String)> = Vec::new();
        for name in ["a.conf", "b.conf", "nested/c.conf", "extra"] {
            match std::fs::read_to_string(dest.join(name)) {
                Ok(text) => seen.push((name.to_owned(), text)),
                // A key the set does not have (or no longer has).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("reading {name}: {e}"),
            }
        }
        let after = std::fs::read_link(dest.join("..data")).ok();
        if after.as_deref() != Some(before.as_path()) {
            counts.overlapped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let first = &seen[0].1;
        assert!(seen.iter().all(|(_, v)| v == first), "a mix of versions under {}: {seen:?}", before.display());
        let extra = seen.iter().any(|(name, _)| name == "extra");
        let n: u64 = first.trim_start_matches('v').parse().unwrap();
        assert_eq!(extra, n % 2 == 1, "version {n} with extra={extra}: {seen:?}");
        counts.consistent.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_into_a_directory_changes_as_one_set_for_a_concurrent_reader() {
    let consul = LongPollServer::start().await;
    set_version(&consul, 1);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("conf.d");
    let source = format!("consul://{}/apps/x/", consul.addr);
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, slash(&dest))
            .min_quiet("10ms")
            .arg("--max-quiet", "50ms")
            .poll_interval("10ms")
            .start()
    });
    tokio::task::block_in_place(|| wait_for_content(&dest.join("nested/c.conf"), "v1", T));
    assert_eq!(read_text(&dest.join("extra")), "v1");
    assert_eq!(std::fs::read_link(dest.join("a.conf")).unwrap(), Path::new("..data/a.conf"));
    assert_eq!(std::fs::read_link(dest.join("nested")).unwrap(), Path::new("..data/nested"));

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(ReaderCounts::default());
    let reader = {
        let (dest, stop, counts) = (dest.clone(), stop.clone(), counts.clone());
        std::thread::spawn(move || read_sets_until(&dest, &stop, &counts))
    };
    const VERSIONS: u64 = 40;
    for n in 2..=VERSIONS {
        set_version(&consul, n);
        tokio::task::block_in_place(|| wait_for_content(&dest.join("b.conf"), &format!("v{n}"), T));
    }
    stop.store(true, Ordering::SeqCst);
    reader.join().expect("the reader never saw a mix of versions");
    let (consistent, overlapped) =
        (counts.consistent.load(Ordering::Relaxed), counts.overlapped.load(Ordering::Relaxed));
    eprintln!("reader: {consistent} consistent reads, {overlapped} overlapped a swap");
    assert!(consistent > VERSIONS as usize, "the reader read along: {consistent} consistent reads");

    // The last version is even: `extra` is gone, and so is every older timestamped directory.
    let status = tokio::task::block_in_place(|| sync.wait_revision("conf.d", &format!("index {}", VERSIONS + 10), T));
    assert_eq!(status["counters"]["writes"], VERSIONS, "{status:#}");
    assert!(std::fs::symlink_metadata(dest.join("extra")).is_err(), "a deleted key's file is removed");
    let mut names: Vec<String> =
        std::fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(names[1..], ["..data", "a.conf", "b.conf", "nested"], "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_key_names_and_failed_checks_are_refused_and_nothing_is_written() {
    let consul = LongPollServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out").join("conf.d");
    consul.set_keys(&[("apps/x/ok", "{\"fine\": true}"), ("apps/x/../../evil", "{}")], 2);
    let source = format!("consul://{}/apps/x/", consul.addr);
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, slash(&dest))
            .min_quiet("10ms")
            .poll_interval("10ms")
            .arg("--validate", "json")
            .arg("--check-cmd", "! grep -rq forbidden {}")
            .start()
    });
    tokio::task::block_in_place(|| {
        for (i, (keys, word)) in [
            (vec![("apps/x/ok", "{}"), ("apps/x/../../evil", "{}")], "key `../../evil`"),
            (vec![("apps/x/ok", "{}"), ("apps/x//etc/passwd", "{}")], "key `/etc/passwd`: an absolute path"),
            (vec![("apps/x/ok", "{}"), ("apps/x/a/./b", "{}")], "key `a/./b`"),
            (vec![("apps/x/ok", "{}"), ("apps/x/..data", "{}")], "key `..data`"),
            (vec![("apps/x/ok", "{}"), ("apps/x/ok/b", "{}")], "key `ok` is a file"),
            (vec![("apps/x/ok", "{\"no\": ")], "key `ok`: not valid JSON"),
            (vec![("apps/x/ok", "\"forbidden\"")], "check command"),
        ]
        .into_iter()
        .enumerate()
        {
            consul.set_keys(&keys, 3 + i as u64);
            let status = wait_refused(&sync, "conf.d", word);
            assert!(status["last_error"].as_str().unwrap().contains("left as it is"), "{status:#}");
            assert!(!dest.join("..data").exists(), "nothing written for {keys:?}");
            assert!(!dir.path().join("evil").exists() && !dir.path().join("out/evil").exists());
            let leftovers = std::fs::read_dir(&dest).map(|d| d.flatten().count()).unwrap_or(0);
            assert_eq!(leftovers, 0, "no candidate directory is left behind");
        }
        consul.set_keys(&[("apps/x/ok", "{\"fine\": true}")], 20);
        wait_for_content(&dest.join("ok"), "{\"fine\": true}", T);
        sync.wait_state("conf.d", "synced", T);
    });
}

/// Waits for `name` to be refused with an error that contains `word`.
fn wait_refused(sync: &SyncProcess, name: &str, word: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until(&format!("{name} refused with `{word}`"), T, || {
        last = sync.status(name);
        last["state"] == "refused" && last["last_error"].as_str().is_some_and(|e| e.contains(word))
    });
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_keeps_sets_and_a_rollback_restores_a_whole_set() {
    let consul = LongPollServer::start().await;
    set_version(&consul, 1);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("conf.d");
    let token = dir.path().join("token");
    write(&token, "s3cret\n");
    let source = format!("consul://{}/apps/x/", consul.addr);
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, slash(&dest))
            .min_quiet("10ms")
            .poll_interval("10ms")
            .arg("--admin-token-file", &token)
            .start()
    });
    tokio::task::block_in_place(|| {
        wait_for_content(&dest.join("extra"), "v1", T);
        set_version(&consul, 2);
        wait_for_content(&dest.join("a.conf"), "v2", T);
        wait_until("extra removed", T, || std::fs::symlink_metadata(dest.join("extra")).is_err());
        sync.wait_revision("conf.d", "index 12", T);
        let history = http_get_json(sync.admin, "/sync/conf.d/history");
        assert_eq!(history["versions"].as_array().unwrap().len(), 2, "{history:#}");

        let (code, body) =
            http_exchange(sync.admin, "POST", "/sync/conf.d/rollback", &[("authorization", "Bearer s3cret")], "")
                .unwrap();
        assert_eq!(code, 200, "{body}");
        // The whole first set is back: its extra key too.
        for name in ["a.conf", "b.conf", "nested/c.conf", "extra"] {
            assert_eq!(read_text(&dest.join(name)), "v1", "{name}");
        }
        // Held until the source changes; then its new set wins.
        set_version(&consul, 4);
        sync.wait_revision("conf.d", "index 14", T);
        assert_eq!(read_text(&dest.join("a.conf")), "v4");
        assert!(std::fs::symlink_metadata(dest.join("extra")).is_err());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consul_prefix_renders_through_a_template() {
    let consul = LongPollServer::start().await;
    consul.set_keys(&[("apps/x/db/host", "db1"), ("apps/x/flags", "{\"debug\": true}"), ("apps/xy/other", "no")], 5);
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("app.j2");
    write(&template, "host={{ key(\"db/host\") }} debug={{ (keys.flags | parse_json).debug }} n={{ keys | length }}\n");
    let dest = dir.path().join("app.conf");
    let source = format!("consul://{}/apps/x/", consul.addr);
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, &dest).arg("--template", &template).min_quiet("10ms").poll_interval("10ms").start()
    });
    tokio::task::block_in_place(|| {
        wait_for_content(&dest, "host=db1 debug=True n=2\n", T);
        sync.wait_revision("app.conf", &format!("index 5, template {}", &short(&read_text(&template))), T);
        consul.set_keys(&[("apps/x/db/host", "db2"), ("apps/x/flags", "{\"debug\": false}")], 6);
        wait_for_content(&dest, "host=db2 debug=False n=2\n", T);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_render_stays_refused_while_the_source_answers_unchanged() {
    let consul = LongPollServer::start().await;
    consul.set_keys(&[("apps/x/db/host", "db1"), ("apps/x/db/port", "1")], 5);
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("app.j2");
    write(&template, "host={{ keys[\"db/host\"] }}\nport={{ keys[\"db/port\"] }}\n");
    let dest = dir.path().join("app.conf");
    let source = format!("consul://{}/apps/x/", consul.addr);
    let sync = tokio::task::block_in_place(|| {
        SyncCommand::new(&source, &dest).arg("--template", &template).min_quiet("10ms").poll_interval("10ms").start()
    });
    tokio::task::block_in_place(|| {
        wait_for_content(&dest, "host=db1\nport=1\n", T);
        sync.wait_state("app.conf", "synced", T);
        // The key goes: the render is refused.
        consul.set_keys(&[("apps/x/db/host", "db1")], 6);
        wait_refused(&sync, "app.conf", "line 2");
        // A server answering at once with the same index: "nothing changed", many times over.
        consul.shared.no_block.store(true, Ordering::SeqCst);
        consul.shared.changed.notify_waiters();
        let before = consul.requests().len();
        wait_until("ten more answers", T, || consul.requests().len() > before + 10);
        let status = sync.status("app.conf");
        assert_eq!(status["state"], "refused", "an unchanged source does not make a refused render fine: {status:#}");
        assert_eq!(status["counters"]["refused"], 1, "one refusal, not one per answer: {status:#}");
        assert_eq!(read_text(&dest), "host=db1\nport=1\n");
        consul.shared.no_block.store(false, Ordering::SeqCst);
        consul.set_keys(&[("apps/x/db/host", "db1"), ("apps/x/db/port", "5432")], 7);
        wait_for_content(&dest, "host=db1\nport=5432\n", T);
        sync.wait_state("app.conf", "synced", T);
    });
}

#[test]
fn a_configmap_volume_is_read_through_its_data_link_as_one_set() {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("volume");
    // The kubelet's layout: a timestamped directory, ..data, and a link per key.
    let version = |name: &str, host: &str, port: &str| {
        let at = volume.join(name);
        std::fs::create_dir_all(&at).unwrap();
        write(&at.join("db.host"), host);
        write(&at.join("db.port"), port);
    };
    version("..2026_01_01_00_00_00.1", "db1", "5432");
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", volume.join("..data")).unwrap();
    for key in ["db.host", "db.port"] {
        std::os::unix::fs::symlink(format!("..data/{key}"), volume.join(key)).unwrap();
    }
    let template = dir.path().join("app.j2");
    write(&template, "{% for k, v in keys | items %}{{ k }}={{ v }};{% endfor %}\n");
    let dest = dir.path().join("app.conf");
    let sync = SyncCommand::new(slash(&volume), &dest)
        .arg("--template", &template)
        .poll_interval("1h")
        .min_quiet("10ms")
        .start();
    wait_for_content(&dest, "db.host=db1;db.port=5432;\n", T);
    // The revision names the directory ..data led to (the status follows the rename).
    wait_until("the revision named", T, || {
        sync.status("app.conf")["source_revision"]
            .as_str()
            .is_some_and(|r| r.starts_with("..data -> ..2026_01_01_00_00_00.1, template "))
    });

    // The kubelet's update: a new directory, then ..data swapped by rename.
    version("..2026_01_01_00_00_01.2", "db2", "6432");
    std::os::unix::fs::symlink("..2026_01_01_00_00_01.2", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    wait_for_content(&dest, "db.host=db2;db.port=6432;\n", T);
    sync.wait_state("app.conf", "synced", T);
}

fn short(text: &str) -> String {
    sidecar::sync::hash::content_hash(text.as_bytes())[..12].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_prefix_watch_brings_a_new_key_and_a_deleted_key_into_the_directory() {
    if !require_tool("etcd") {
        return;
    }
    let etcd = Etcd::start();
    etcd.put("/apps/x/a.conf", "a1");
    etcd.put("/apps/x/db/host", "h1");
    // Beside the prefix, not under it.
    etcd.put("/apps/xy", "no");
    etcd.put("/apps/x", "no");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("conf.d");
    let sync = tokio::task::block_in_place(|| {
        // No polling: only the watch can bring the changes.
        SyncCommand::new(etcd.url("/apps/x/"), slash(&dest)).min_quiet("10ms").source_timeout("20s").start()
    });
    tokio::task::block_in_place(|| {
        wait_for_content(&dest.join("db/host"), "h1", T);
        assert_eq!(read_text(&dest.join("a.conf")), "a1");
        let revision = etcd.put("/apps/x/new.conf", "n1");
        wait_for_content(&dest.join("new.conf"), "n1", T);
        sync.wait_revision("conf.d", &format!("revision {revision}"), T);
        etcd.delete("/apps/x/a.conf");
        wait_until("a.conf removed", T, || std::fs::symlink_metadata(dest.join("a.conf")).is_err());
        let revision = etcd.put("/apps/x/db/host", "h2");
        sync.wait_revision("conf.d", &format!("revision {revision}"), T);
        assert_eq!(read_text(&dest.join("db/host")), "h2");
        let mut names: Vec<String> =
            std::fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names[1..], ["..data", "db", "new.conf"], "{names:?}");
        let current = read_text(&dest.join("..data/db/host"));
        assert_eq!(current, "h2");
    });
}

#[test]
fn once_and_dry_run_work_on_a_directory_of_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, _) = keys_dir(dir.path(), "");
    let dest = dir.path().join("out");
    let (source, target) = (slash(&keys), slash(&dest));
    let run = |extra: &[&str]| {
        let mut args = vec!["sync", "--source", &source, "--dest", &target];
        args.extend_from_slice(extra);
        output_within(sidecar_command(&args), Duration::from_secs(20))
    };
    let dry = run(&["--dry-run"]);
    assert!(dry.status.success(), "{dry:?}");
    let diff = String::from_utf8_lossy(&dry.stdout);
    assert!(diff.contains("+db1") && diff.contains("db/host") && diff.contains("+fast"), "{diff}");
    assert!(!dest.exists(), "--dry-run writes nothing");

    let once = run(&["--once"]);
    assert!(once.status.success(), "{}", String::from_utf8_lossy(&once.stderr));
    assert_eq!(read_text(&dest.join("db/port")), "5432");
    write(&keys.join("mode"), "slow");
    let diff = run(&["--dry-run"]);
    let diff = String::from_utf8_lossy(&diff.stdout);
    assert!(diff.contains("-fast") && diff.contains("+slow") && !diff.contains("db/host"), "{diff}");
    let again = run(&["--once"]);
    assert!(again.status.success());
    assert_eq!(read_text(&dest.join("mode")), "slow");
}
