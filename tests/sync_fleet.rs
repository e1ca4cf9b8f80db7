//! Fleet-aware sync (`--fleet`) with a real etcd and several real `sidecar sync` processes,
//! each with its own destination and its own real app (tests/apps/legacy_app.py) that turns
//! unhealthy on a bad config: status keys under leases, a bad version stopped at the first
//! wave and recorded as rejected, `sidecar fleet status` and `sidecar fleet rollback` (also
//! refused for a compacted revision), and etcd out of reach for the fleet keys.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use sidecar::sync::fleet::wave_of;
use sidecar::sync::hash::content_hash;

const T: Duration = Duration::from_secs(30);
const KEY: &str = "/apps/web/config.json";
const PREFIX: &str = "/fleet/";
const NAME: &str = "web";
const V1: &str = "{\"v\": 1}";
const V2: &str = "{\"v\": 2}";
const BAD: &str = "{\"v\": 3, \"healthy\": false}";
const V4: &str = "{\"v\": 4}";
const WITHDRAWN: &str = "{\"v\": 2, \"withdrawn\": true}";
const WAVE_DELAY: Duration = Duration::from_secs(6);

/// One member of the fleet: its app, its sidecar, its destination.
struct Member {
    instance: String,
    dest: PathBuf,
    app: LegacyApp,
    sync: SyncProcess,
    _dir: tempfile::TempDir,
}

/// `count` instance ids, the first in wave 0 of 2 and the others in wave 1.
fn instances_one_canary(count: usize) -> Vec<String> {
    let canary = (0..).map(|i| format!("pod-{i}")).find(|id| wave_of(id, 2) == 0).unwrap();
    let rest = (0..).map(|i| format!("pod-{i}")).filter(|id| wave_of(id, 2) == 1).take(count - 1);
    std::iter::once(canary).chain(rest).collect()
}

fn start_member(etcd: &Etcd, fleet: &str, instance: &str, extra: &[(&str, &str)]) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let (dest, pid_file) = (dir.path().join("config.json"), dir.path().join("app.pid"));
    write(&dest, V1);
    let app = LegacyApp::start(&dest, Some(&pid_file));
    let mut command = SyncCommand::new(etcd.url(KEY), &dest)
        .arg("--name", NAME)
        .min_quiet("50ms")
        .retry_max("500ms")
        .pid_file(&pid_file)
        .health_url(&app.health_url())
        .arg("--health-timeout", "2s")
        .arg("--fleet", fleet)
        .arg("--instance", instance)
        .arg("--fleet-lease-ttl", "2s");
    for (flag, value) in extra {
        command = command.arg(flag, value);
    }
    let sync = command.start();
    Member { instance: instance.to_owned(), dest, app, sync, _dir: dir }
}

/// The status key of every instance, parsed.
fn status_keys(etcd: &Etcd) -> Vec<serde_json::Value> {
    etcd.get_prefix(&format!("{PREFIX}{NAME}/instances/"))
        .into_iter()
        .map(|(_, value)| serde_json::from_str(&value).unwrap())
        .collect()
}

/// Waits until `count` status keys exist and every one shows `content` applied in `state`.
fn wait_status_keys(etcd: &Etcd, count: usize, content: &str, state: &str) -> Vec<serde_json::Value> {
    let hash = content_hash(content.as_bytes());
    let deadline = Instant::now() + T;
    loop {
        let keys = status_keys(etcd);
        if keys.len() == count && keys.iter().all(|k| k["applied_hash"] == hash.as_str() && k["state"] == state) {
            return keys;
        }
        assert!(Instant::now() < deadline, "status keys not all at {content} ({state}): {keys:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A thread that reads `dests` without pause and remembers whether any ever held `needle`.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, Vec<String>)>,
}

impl Poller {
    fn start(dests: Vec<PathBuf>, needle: &'static str) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut reads, mut seen) = (0u64, Vec::new());
            while !flag.load(Ordering::SeqCst) {
                for dest in &dests {
                    reads += 1;
                    if read_text(dest).contains(needle) {
                        seen.push(dest.display().to_string());
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (reads, seen)
        });
        Poller { stop, thread }
    }

    /// Stops and returns (reads made, destinations that held the needle at some read).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn fleet_command(args: &[&str]) -> Output {
    let mut full = vec!["fleet"];
    full.extend_from_slice(args);
    output_within(sidecar_command(&full), EXIT_LIMIT)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn wait_all(members: &[Member], content: &str) {
    for m in members {
        wait_for_content(&m.dest, content, T);
    }
}

#[test]
fn a_bad_version_stops_at_the_first_wave_and_the_fleet_rolls_back_together() {
    if !require_tool("etcd") || !require_tool("python3") {
        return;
    }
    let etcd = Etcd::start();
    let v1_revision = etcd.put(KEY, V1);
    let fleet = etcd.url(PREFIX);
    let ids = instances_one_canary(3);
    let waves = [("--fleet-waves", "2"), ("--fleet-wave-delay", "6s")];
    let mut members: Vec<Member> = ids.iter().map(|id| start_member(&etcd, &fleet, id, &waves)).collect();

    // In step at start: every status key says so.
    let keys = wait_status_keys(&etcd, 3, V1, "synced");
    for key in &keys {
        assert_eq!(key["app_healthy"], true, "{key:#}");
        assert_eq!(key["source_revision"], format!("revision {v1_revision}"), "{key:#}");
        assert_eq!(key["source"], etcd.url(KEY), "{key:#}");
    }
    assert_eq!(keys.iter().filter(|k| k["wave"] == 0).count(), 1, "{keys:#?}");

    // A good version: the canary at once, wave 1 one wave delay later; every status key shows it.
    let put_at = Instant::now();
    etcd.put(KEY, V2);
    wait_for_content(&members[0].dest, V2, T);
    let canary_after = put_at.elapsed();
    assert_eq!(read_text(&members[1].dest), V1, "wave 1 waits");
    let waiting = members[1].sync.wait_state(NAME, "waiting-for-wave", T);
    assert!(waiting["fleet"]["held_back"].as_str().unwrap().contains("waits for wave 1 of 2"), "{waiting:#}");
    wait_all(&members[1..], V2);
    let wave_after = put_at.elapsed();
    assert!(wave_after >= WAVE_DELAY - Duration::from_millis(500), "wave 1 applied after {wave_after:?}");
    eprintln!("good version: canary after {canary_after:?}, wave 1 after {wave_after:?}");
    wait_status_keys(&etcd, 3, V2, "synced");

    // A version withdrawn (the source goes back) before wave 1's time never reaches wave 1,
    // and nobody says it is held back any more.
    let poller = Poller::start(members[1..].iter().map(|m| m.dest.clone()).collect(), "withdrawn");
    let withdrawn_at = Instant::now();
    etcd.put(KEY, WITHDRAWN);
    wait_for_content(&members[0].dest, WITHDRAWN, T);
    members[1].sync.wait_state(NAME, "waiting-for-wave", T);
    etcd.put(KEY, V2);
    wait_for_content(&members[0].dest, V2, T);
    for m in &members[1..] {
        let status = m.sync.wait_state(NAME, "synced", T);
        assert!(status["fleet"]["held_back"].is_null(), "{status:#}");
    }
    // Nothing can be waited for to show that nothing happens: past the wave's time, then look.
    std::thread::sleep((withdrawn_at + WAVE_DELAY + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
    let (_, seen) = poller.finish();
    assert!(seen.is_empty(), "a withdrawn version reached wave 1: {seen:?}");
    let keys = wait_status_keys(&etcd, 3, V2, "synced");
    assert!(keys.iter().all(|k| k["held_back"].is_null()), "{keys:#?}");

    // A bad version: applied by the canary only, rolled back there, recorded as rejected; the
    // others' files never hold it.
    let poller = Poller::start(members[1..].iter().map(|m| m.dest.clone()).collect(), "healthy\": false");
    let bad_hash = content_hash(BAD.as_bytes());
    etcd.put(KEY, BAD);
    members[0].sync.wait_state(NAME, "rolled-back", T);
    assert_eq!(read_text(&members[0].dest), V2, "the canary is back on the last good version");
    let rejected = etcd.get_prefix(&format!("{PREFIX}{NAME}/rejected/{bad_hash}/"));
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].0.ends_with(&members[0].instance), "{rejected:?}");
    let rejection: serde_json::Value = serde_json::from_str(&rejected[0].1).unwrap();
    assert!(rejection["reason"].as_str().unwrap().contains("503"), "{rejection:#}");
    for m in &members[1..] {
        let status = m.sync.wait_state(NAME, "fleet-rejected", T);
        assert!(status["last_error"].as_str().unwrap().contains("rejected by 1 instance(s)"), "{status:#}");
        assert_eq!(read_text(&m.dest), V2);
        assert_eq!(m.app.hups(), 1, "only the good version was signalled");
    }
    let keys = status_keys(&etcd);
    for key in keys.iter().filter(|k| k["wave"] == 1) {
        assert_eq!(key["state"], "fleet-rejected", "{key:#}");
        assert_eq!(key["applied_hash"], content_hash(V2.as_bytes()), "{key:#}");
        assert!(key["held_back"].as_str().unwrap().contains(&bad_hash[..12]), "{key:#}");
    }
    let canary_key = keys.iter().find(|k| k["wave"] == 0).unwrap();
    assert_eq!(canary_key["state"], "rolled-back", "{canary_key:#}");

    // The admin API shows the fleet.
    let view = http_get_json(members[1].sync.admin, &format!("/sync/{NAME}/fleet"));
    assert_eq!(view["instances"].as_array().unwrap().len(), 3, "{view:#}");
    assert_eq!(view["rejected"][0]["hash"], bad_hash.as_str(), "{view:#}");
    assert_eq!(view["local"]["wave"], 1, "{view:#}");
    assert_eq!(view["local"]["published"], true, "{view:#}");

    // A later good version reaches all.
    etcd.put(KEY, V4);
    wait_all(&members, V4);
    wait_status_keys(&etcd, 3, V4, "synced");
    let (reads, seen) = poller.finish();
    assert!(seen.is_empty(), "wave 1 destinations held the bad version: {seen:?}");
    assert!(reads > 1000, "the poller read {reads} times");

    // `sidecar fleet status`: a table for a person, JSON for scripts.
    let out = fleet_command(&["status", "--fleet", &fleet, "--name", NAME]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{table}{}", text(&out.stderr));
    for m in &members {
        assert!(table.contains(&m.instance), "{table}");
    }
    assert!(table.contains(&content_hash(V4.as_bytes())[..12]), "{table}");
    assert!(table.contains(&format!("{} by 1 instance(s)", &bad_hash[..12])), "{table}");
    let out = fleet_command(&["status", "--fleet", &fleet, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["destinations"][0]["instances"].as_array().unwrap().len(), 3, "{json:#}");

    // `sidecar fleet rollback` to an earlier revision: applied by all, through the waves.
    let out = fleet_command(&["rollback", "--fleet", &fleet, "--name", NAME, "--to", &v1_revision.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("from revision {v1_revision}")), "{}", text(&out.stdout));
    assert_eq!(etcd.get(KEY).as_deref(), Some(V1));
    wait_all(&members, V1);
    wait_status_keys(&etcd, 3, V1, "synced");
    // Back to a version the fleet rejected: refused, since no instance would apply it.
    let out = fleet_command(&["rollback", "--fleet", &fleet, "--name", NAME, "--to", &bad_hash[..12]]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is rejected by 1 instance(s)"), "{}", text(&out.stderr));

    // SIGKILL: no goodbye, the key goes with the lease (TTL 2s).
    let killed = members.remove(0);
    let key = format!("{PREFIX}{NAME}/instances/{}", killed.instance);
    assert!(etcd.get(&key).is_some());
    killed.sync.proc.signal("KILL");
    let killed_at = Instant::now();
    wait_until("the killed instance's status key to vanish", T, || etcd.get(&key).is_none());
    let gone_after = killed_at.elapsed();
    assert!(
        gone_after >= Duration::from_millis(500),
        "the key vanished after {gone_after:?}: before its lease ran out"
    );
    eprintln!("status key gone {gone_after:?} after SIGKILL (lease TTL 2s)");
    assert_eq!(status_keys(&etcd).len(), 2);

    // A clean stop revokes the lease: gone at once.
    let stopped = members.remove(0);
    let key = format!("{PREFIX}{NAME}/instances/{}", stopped.instance);
    let mut proc = stopped.sync.proc;
    proc.signal("TERM");
    proc.wait_exit(T);
    assert!(etcd.get(&key).is_none(), "the status key outlived a clean stop");
}

#[test]
fn rollback_finds_a_version_by_hash_and_refuses_a_compacted_revision_naming_the_oldest() {
    if !require_tool("etcd") {
        return;
    }
    let etcd = Etcd::start();
    let fleet = etcd.url(PREFIX);
    let source = etcd.url(KEY);
    let first = etcd.put(KEY, V1);
    etcd.put(KEY, V2);
    let kept = etcd.put(KEY, BAD);
    etcd.put(KEY, V4);
    etcd.compact(kept);

    // No instance publishes the source: it must be named.
    let out = fleet_command(&["rollback", "--fleet", &fleet, "--name", NAME, "--to", &first.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("give --source etcd://HOST:PORT/KEY"), "{}", text(&out.stderr));

    let out = fleet_command(&[
        "rollback",
        "--fleet",
        &fleet,
        "--name",
        NAME,
        "--source",
        &source,
        "--to",
        &first.to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("revision {first} of {KEY} is no longer kept")) && stderr.contains("(compacted)"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("the oldest revision available is {kept}")), "{stderr}");
    assert_eq!(etcd.get(KEY).as_deref(), Some(V4), "nothing written");

    // By hash: found among the revisions still kept...
    let out = fleet_command(&[
        "rollback",
        "--fleet",
        &fleet,
        "--name",
        NAME,
        "--source",
        &source,
        "--to",
        &content_hash(BAD.as_bytes())[..12],
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(etcd.get(KEY).as_deref(), Some(BAD));
    // ...and not behind the compaction point, which is named.
    let out = fleet_command(&[
        "rollback",
        "--fleet",
        &fleet,
        "--name",
        NAME,
        "--source",
        &source,
        "--to",
        &content_hash(V2.as_bytes()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("the oldest available is {kept}")), "{stderr}");
    // Keys under the prefix that are not the fleet's, or do not parse, do not stop the view.
    etcd.put(&format!("{PREFIX}{NAME}/instances/liar"), "not JSON");
    etcd.put(&format!("{PREFIX}{NAME}/unknown"), "{}");
    etcd.put(
        &format!("{PREFIX}{NAME}/rejected/abc/pod-1"),
        "{\"instance\": \"pod-1\", \"at\": \"2026-01-01T00:00:00Z\", \"reason\": \"503\"}",
    );
    let out = fleet_command(&["status", "--fleet", &fleet]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("web: 0 instance(s)") && table.contains("pod-1 at 2026-01-01T00:00:00Z: 503"), "{table}");

    // Asking for the value the key holds writes nothing.
    let out =
        fleet_command(&["rollback", "--fleet", &fleet, "--name", NAME, "--source", &source, "--to", &kept.to_string()]);
    assert!(text(&out.stdout).contains("already: nothing written"), "{}", text(&out.stdout));
}

#[test]
fn etcd_out_of_reach_for_the_fleet_keys_does_not_block_an_apply_and_the_status_comes_back() {
    if !require_tool("etcd") || !require_tool("python3") {
        return;
    }
    // The source and the fleet in two etcds, so that the fleet's can go away alone.
    let source = Etcd::start();
    source.put(KEY, V1);
    let mut fleet_etcd = Etcd::start();
    let fleet = fleet_etcd.url(PREFIX);
    let member = start_member(&source, &fleet, "pod-solo", &[]);
    wait_status_keys(&fleet_etcd, 1, V1, "synced");

    // Silent (SIGSTOP): each fleet request gives up after 5s, and the apply goes on.
    fleet_etcd.signal("STOP");
    let put_at = Instant::now();
    source.put(KEY, V2);
    wait_for_content(&member.dest, V2, T);
    let delayed = put_at.elapsed();
    assert!(delayed < Duration::from_secs(15), "a silent fleet etcd delayed the apply by {delayed:?}");
    eprintln!("apply with the fleet's etcd stopped: {delayed:?}");
    let status = member.sync.status(NAME);
    assert!(status["fleet"]["etcd_error"].as_str().unwrap().contains("did not answer within 5s"), "{status:#}");
    fleet_etcd.signal("CONT");
    wait_status_keys(&fleet_etcd, 1, V2, "synced");

    fleet_etcd.kill();
    let revision = source.put(KEY, V1);
    wait_for_content(&member.dest, V1, T);
    let mut status = member.sync.wait_revision(NAME, &format!("revision {revision}"), T);
    let deadline = Instant::now() + T;
    while status["fleet"]["etcd_error"].is_null() {
        assert!(Instant::now() < deadline, "no fleet error reported: {status:#}");
        std::thread::sleep(Duration::from_millis(50));
        status = member.sync.status(NAME);
    }
    assert!(status["fleet"]["etcd_error"].as_str().unwrap().contains("cannot connect"), "{status:#}");
    assert_eq!(status["fleet"]["published"], false, "{status:#}");
    member.sync.proc.logs.wait_for("applying on the local checks alone", T);
    let (code, body) = http_exchange(member.sync.admin, "GET", &format!("/sync/{NAME}/fleet"), &[], "").unwrap();
    assert_eq!(code, 502, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(view["error"].as_str().unwrap().contains("cannot connect"), "{view:#}");
    assert_eq!(view["local"]["instance"], "pod-solo", "{view:#}");

    // Back: the status is published again (on a new lease: the old one expired meanwhile).
    fleet_etcd.launch();
    wait_status_keys(&fleet_etcd, 1, V1, "synced");
    wait_until("the fleet error to clear", T, || member.sync.status(NAME)["fleet"]["etcd_error"].is_null());
    member.sync.proc.logs.wait_for("fleet etcd answers again", T);

    // A version this instance rejected stays refused while etcd cannot be asked, although the
    // source offered another value in between (which clears the local rejection).
    source.put(KEY, BAD);
    member.sync.wait_state(NAME, "rolled-back", T);
    let bad_hash = content_hash(BAD.as_bytes());
    assert_eq!(fleet_etcd.get_prefix(&format!("{PREFIX}{NAME}/rejected/{bad_hash}/")).len(), 1);
    let revision = source.put(KEY, V4);
    member.sync.wait_revision(NAME, &format!("revision {revision}"), T);
    let poller = Poller::start(vec![member.dest.clone()], "healthy\": false");
    fleet_etcd.kill();
    source.put(KEY, BAD);
    let status = member.sync.wait_state(NAME, "fleet-rejected", T);
    assert!(status["last_error"].as_str().unwrap().contains("etcd cannot be asked again now"), "{status:#}");
    let (_, seen) = poller.finish();
    assert!(seen.is_empty(), "the known-rejected version was written");
    assert_eq!(read_text(&member.dest), V4);

    // A rejection made while etcd is away is written when it is back.
    let other_bad = "{\"v\": 5, \"healthy\": false}";
    source.put(KEY, other_bad);
    member.sync.proc.logs.wait_for("the rejection is written when etcd answers", T);
    member.sync.wait_state(NAME, "rolled-back", T);
    assert_eq!(read_text(&member.dest), V4);
    fleet_etcd.launch();
    let key = format!("{PREFIX}{NAME}/rejected/{}/pod-solo", content_hash(other_bad.as_bytes()));
    wait_until("the rejection to be written after etcd came back", T, || fleet_etcd.get(&key).is_some());
}

#[test]
fn a_fleet_over_tls_uses_the_etcd_sources_ca_and_client_certificate() {
    if !require_tool("etcd") {
        return;
    }
    // One etcd over TLS that also wants a client certificate (--client-cert-auth) holds both
    // the source key and the fleet's keys: the fleet's calls present the source's certificate.
    let etcd = Etcd::start_tls(TestPki::new());
    let tls = etcd.tls.as_ref().unwrap();
    let (pki, client) = (&tls.pki, tls.pki.issue("pod-tls"));
    let fleet = format!("etcd+https://127.0.0.1:{}{PREFIX}", etcd.client_port);
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) =
        (format!("etcd+https://127.0.0.1:{}/config/tls", etcd.client_port), dir.path().join("config.json"));
    etcd.put("/config/tls", V1);
    let sync = SyncCommand::new(&source, &dest)
        .arg("--name", NAME)
        .poll_interval("100ms")
        .min_quiet("50ms")
        .arg("--fleet", &fleet)
        .arg("--instance", "pod-tls")
        .arg("--source-ca", pki.ca_path())
        .arg("--source-cert", &client.cert)
        .arg("--source-key", &client.key)
        .start();
    wait_for_content(&dest, V1, T);
    wait_until("the status key to be published over TLS", T, || sync.status(NAME)["fleet"]["published"] == true);

    let ca = pki.ca_path();
    let (cert, key) = (client.cert.to_str().unwrap(), client.key.to_str().unwrap());
    let out = fleet_command(&[
        "status",
        "--fleet",
        &fleet,
        "--json",
        "--fleet-ca",
        ca.to_str().unwrap(),
        "--fleet-cert",
        cert,
        "--fleet-key",
        key,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let instance = &json["destinations"][0]["instances"][0];
    assert_eq!(instance["instance"], "pod-tls", "{json:#}");
    assert_eq!(instance["applied_hash"], content_hash(V1.as_bytes()), "{json:#}");
    assert_eq!(instance["app_healthy"], serde_json::Value::Null, "no --health-url: not known");

    // A destination without --fleet has no fleet view.
    let plain_source = dir.path().join("source.json");
    write(&plain_source, V1);
    let plain = SyncCommand::new(&plain_source, dir.path().join("other.json")).arg("--name", "plain").start();
    let (code, body) = http_exchange(plain.admin, "GET", "/sync/plain/fleet", &[], "").unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("runs without --fleet"), "{body}");

    // Without the CA the server is not trusted, and the command says what failed.
    let out = fleet_command(&["status", "--fleet", &fleet, "--fleet-cert", cert, "--fleet-key", key]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("TLS handshake with 127.0.0.1"), "{}", text(&out.stderr));
}

const ROOT_PASSWORD: &str = "root-pw-6d1f0a";
const PASSWORD: &str = "app-pw-3c9e72";
const FLEET_PASSWORD: &str = "pod-pw-a81b4d";
const WRONG_PASSWORD: &str = "pod-pw-wrong-07e5c9";

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

/// Stops the member's sidecar for longer than etcd's `--auth-token-ttl 2`, so that etcd forgets
/// its tokens. The wait is etcd's clock, not a condition this test could watch.
fn expire_tokens(member: &Member) {
    member.sync.proc.signal("STOP");
    std::thread::sleep(Duration::from_secs(4));
    member.sync.proc.signal("CONT");
}

#[test]
fn a_fleet_on_an_etcd_with_authentication_logs_in_as_the_sources_user() {
    if !require_tool("etcd") || !require_tool("python3") {
        return;
    }
    // One user whose roles read the source key and read and write the fleet prefix: the same
    // cluster, one set of credentials, given once as --source-*.
    // Tokens live 2s unused, so that one can expire.
    let mut etcd = Etcd::start_with(&["--auth-token-ttl", "2"]);
    let v1_revision = etcd.put(KEY, V1);
    etcd.enable_auth(ROOT_PASSWORD, "app", PASSWORD, KEY);
    etcd.grant_prefix("app", PASSWORD, "fleet", "READWRITE", PREFIX);
    let mut secret = MountedSecret::new();
    secret.set("password", PASSWORD);
    let password_file = secret.path("password");
    let fleet = etcd.url(PREFIX);
    let member = start_member(
        &etcd,
        &fleet,
        "pod-auth",
        &[("--source-user", "app"), ("--source-password-file", path_str(&password_file)), ("--log-level", "debug")],
    );
    wait_status_keys(&etcd, 1, V1, "synced");

    // A bad version: rolled back, and the rejection recorded as user app.
    let bad_hash = content_hash(BAD.as_bytes());
    etcd.put(KEY, BAD);
    member.sync.wait_state(NAME, "rolled-back", T);
    let rejected = format!("{PREFIX}{NAME}/rejected/{bad_hash}/pod-auth");
    wait_until("the rejection to be recorded", T, || etcd.get(&rejected).is_some());
    let status = member.sync.status(NAME);
    assert!(status["fleet"]["etcd_error"].is_null(), "{status:#}");
    // The admin API's fleet view reads etcd as the same user.
    let view = http_get_json(member.sync.admin, &format!("/sync/{NAME}/fleet"));
    assert_eq!(view["rejected"][0]["hash"], bad_hash.as_str(), "{view:#}");

    // `sidecar fleet status` with the user and its password reads the fleet...
    let login = ["--fleet-user", "app", "--fleet-password-file", path_str(&password_file)];
    let out = fleet_command(&[&["status", "--fleet", &fleet, "--json"][..], &login[..]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["destinations"][0]["instances"][0]["instance"], "pod-auth", "{json:#}");
    assert_eq!(json["destinations"][0]["rejected"][0]["hash"], bad_hash.as_str(), "{json:#}");
    // ...and without them says that etcd wants them.
    let out = fleet_command(&["status", "--fleet", &fleet]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("etcd {} refused range", etcd.addr()))
            && stderr.contains("etcd has authentication enabled: give --fleet-user and --fleet-password-file"),
        "{stderr}"
    );

    // A rollback writes the source key, which user app may only read: refused, saying so.
    let out = fleet_command(
        &[&["rollback", "--fleet", &fleet, "--name", NAME, "--to", &v1_revision.to_string()][..], &login[..]].concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("refused put") && stderr.contains("permission denied"), "{stderr}");
    assert!(stderr.contains("as user app (does its role grant readwrite"), "{stderr}");
    assert!(stderr.contains("on the source key for a fleet rollback"), "{stderr}");
    assert_eq!(etcd.get(KEY).as_deref(), Some(BAD), "nothing written");
    assert_no_secret(&format!("{}{}", text(&out.stdout), stderr), &[PASSWORD]);

    // The sidecar stopped for longer than the token's TTL: etcd forgets the token, refuses it
    // once, and the fleet's calls log in again; the status key follows the next version.
    expire_tokens(&member);
    etcd.put(KEY, V2);
    wait_status_keys(&etcd, 1, V2, "synced");
    member.sync.proc.logs.wait_for("the auth token of user app was refused", T);
    assert_no_secret(&member.sync.visible(), &[PASSWORD, ROOT_PASSWORD]);
}

#[test]
fn a_wrong_fleet_password_is_a_clear_error_and_does_not_block_the_local_apply() {
    if !require_tool("etcd") || !require_tool("python3") {
        return;
    }
    // The source reads as user app; the fleet writes as user pod, with a password that is
    // wrong until its Secret is rotated.
    let mut etcd = Etcd::start_with(&["--auth-token-ttl", "2"]);
    etcd.put(KEY, V1);
    etcd.enable_auth(ROOT_PASSWORD, "app", PASSWORD, KEY);
    etcd.grant_prefix("pod", FLEET_PASSWORD, "fleet", "READWRITE", PREFIX);
    let (mut source_secret, mut fleet_secret) = (MountedSecret::new(), MountedSecret::new());
    source_secret.set("password", PASSWORD);
    fleet_secret.set("password", &format!("{WRONG_PASSWORD}\n"));
    let (source_file, fleet_file) = (source_secret.path("password"), fleet_secret.path("password"));
    let member = start_member(
        &etcd,
        &etcd.url(PREFIX),
        "pod-wrong",
        &[
            ("--source-user", "app"),
            ("--source-password-file", path_str(&source_file)),
            ("--fleet-user", "pod"),
            ("--fleet-password-file", path_str(&fleet_file)),
            ("--log-level", "debug"),
        ],
    );
    let revision = etcd.put(KEY, V2);
    wait_for_content(&member.dest, V2, T);
    member.sync.wait_revision(NAME, &format!("revision {revision}"), T);
    let status = member.sync.wait_status(NAME, "a fleet error", T, |s| s["fleet"]["etcd_error"].is_string());
    let error = status["fleet"]["etcd_error"].as_str().unwrap();
    eprintln!("fleet error: {error}");
    assert!(error.contains(&format!("etcd {} refused authentication as user pod", etcd.addr())), "{error}");
    assert!(error.contains("invalid user ID or password") && error.contains("--fleet-password-file"), "{error}");
    assert_eq!(status["fleet"]["published"], false, "{status:#}");
    assert!(status_keys(&etcd).is_empty());

    // The Secret is rotated: the next login reads the new file, and the status is published.
    fleet_secret.set("password", FLEET_PASSWORD);
    wait_status_keys(&etcd, 1, V2, "synced");
    wait_until("the fleet error to clear", T, || member.sync.status(NAME)["fleet"]["etcd_error"].is_null());

    // An expired token: the fleet logs in again, as its own user, on the code path the etcd
    // source uses.
    expire_tokens(&member);
    etcd.put(KEY, V4);
    wait_status_keys(&etcd, 1, V4, "synced");
    member.sync.proc.logs.wait_for("the auth token of user pod was refused", T);
    let (_, view) = http_exchange(member.sync.admin, "GET", &format!("/sync/{NAME}/fleet"), &[], "").unwrap();
    let keys: Vec<String> = etcd.get_prefix(PREFIX).into_iter().map(|(key, value)| format!("{key} {value}")).collect();
    let shown = format!("{}\n{view}\n{}", member.sync.visible(), keys.join("\n"));
    assert_no_secret(&shown, &[PASSWORD, FLEET_PASSWORD, WRONG_PASSWORD, ROOT_PASSWORD]);
}

#[test]
fn a_file_source_reaches_a_fleet_over_tls_with_a_client_certificate_of_its_own() {
    if !require_tool("etcd") {
        return;
    }
    // The source is a file: nothing to lend the fleet, whose etcd wants a client certificate.
    let etcd = Etcd::start_tls(TestPki::new());
    let tls = etcd.tls.as_ref().unwrap();
    let client = tls.pki.issue("pod-file");
    let fleet = format!("etcd+https://127.0.0.1:{}{PREFIX}", etcd.client_port);
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (dir.path().join("source.json"), dir.path().join("config.json"));
    write(&source, V1);
    let sync = SyncCommand::new(&source, &dest)
        .arg("--name", NAME)
        .min_quiet("50ms")
        .arg("--fleet", &fleet)
        .arg("--instance", "pod-file")
        .arg("--fleet-ca", tls.pki.ca_path())
        .arg("--fleet-cert", &client.cert)
        .arg("--fleet-key", &client.key)
        .start();
    wait_for_content(&dest, V1, T);
    let keys = wait_status_keys(&etcd, 1, V1, "synced");
    assert_eq!(keys[0]["instance"], "pod-file", "{keys:#?}");
    replace_file(&source, V2);
    wait_status_keys(&etcd, 1, V2, "synced");
    assert!(sync.status(NAME)["fleet"]["etcd_error"].is_null());

    // Without a certificate etcd refuses the connection, and the error says what to give.
    let out = fleet_command(&["status", "--fleet", &fleet, "--fleet-ca", path_str(&tls.pki.ca_path())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("TLS handshake with 127.0.0.1") || text(&out.stderr).contains("--source-cert"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn sidecar_check_shows_the_fleets_credentials_by_path_and_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("fleet-password");
    write(&password, FLEET_PASSWORD);
    let config = dir.path().join("sidecar.toml");
    let table = |password_file: &std::path::Path| {
        format!(
            "[[sync]]\nsource = \"{}\"\ndest = \"{}\"\nname = \"web\"\nfleet = \"etcd://127.0.0.1:1/fleet/\"\n\
             instance = \"pod-check\"\nfleet-user = \"pod\"\nfleet-password-file = \"{}\"\n",
            path_str(&dir.path().join("source.json")),
            path_str(&dir.path().join("config.json")),
            path_str(password_file)
        )
    };
    let check = || {
        let output = sidecar_command(&["check", "--upstream", "http://127.0.0.1:1", "--config", path_str(&config)])
            .output()
            .unwrap();
        let text = format!("{}{}", text(&output.stdout), text(&output.stderr));
        (output.status.code(), text)
    };
    write(&config, &table(&password));
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("fleet etcd 127.0.0.1:1/fleet/ (user pod, password file {})", password.display())),
        "{out}"
    );
    assert_no_secret(&out, &[FLEET_PASSWORD]);

    // A password file that cannot be read is a problem, named.
    write(&config, &table(&dir.path().join("missing")));
    let (code, out) = check();
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("sync web fleet: --fleet-password-file") && out.contains("missing"), "{out}");
}

#[test]
fn an_instance_that_starts_without_a_file_is_not_ready_on_a_version_the_fleet_rejected() {
    if !require_tool("etcd") {
        return;
    }
    // The fleet rejected the source's current version before this instance (a new Pod) came:
    // it keeps that version out, and with no earlier file it has nothing to serve.
    let etcd = Etcd::start();
    etcd.put(KEY, BAD);
    let bad_hash = content_hash(BAD.as_bytes());
    etcd.put(&format!("{PREFIX}{NAME}/rejected/{bad_hash}/pod-0"), "{\"instance\": \"pod-0\"}");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("config.json");
    let sync = SyncCommand::new(etcd.url(KEY), &dest)
        .arg("--name", NAME)
        .min_quiet("50ms")
        .arg("--fleet", etcd.url(PREFIX))
        .arg("--instance", "pod-new")
        .start();
    let status = sync.wait_state(NAME, "fleet-rejected", T);
    assert!(!dest.exists(), "the rejected version was written: {status:#}");
    let (code, body) = http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap();
    assert_eq!(code, 503, "ready with no file on disk: {body}");
    assert!(body.contains("rejected by 1 instance(s)"), "/readyz says why: {body}");

    // A version the fleet did not reject: written, and ready.
    etcd.put(KEY, V1);
    wait_for_content(&dest, V1, T);
    sync.wait_state(NAME, "synced", T);
    let (code, body) = http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap();
    assert_eq!(code, 200, "{body}");
}

#[test]
fn a_status_key_deleted_while_its_lease_lives_is_written_again() {
    if !require_tool("etcd") {
        return;
    }
    // The lease stays alive, so only reading the key shows that etcd no longer holds it
    // (deleted by hand, by a process with the same --instance, or lost in a restore).
    let etcd = Etcd::start();
    etcd.put(KEY, V1);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("config.json");
    let sync = SyncCommand::new(etcd.url(KEY), &dest)
        .arg("--name", NAME)
        .min_quiet("50ms")
        .arg("--fleet", etcd.url(PREFIX))
        .arg("--instance", "pod-kept")
        .arg("--fleet-lease-ttl", "3s")
        .start();
    wait_status_keys(&etcd, 1, V1, "synced");
    let key = format!("{PREFIX}{NAME}/instances/pod-kept");
    etcd.delete(&key);
    assert!(etcd.get(&key).is_none());
    wait_status_keys(&etcd, 1, V1, "synced");
    sync.proc.logs.wait_for("no longer holds this instance's status", T);

    // Overwritten with something else (a stale copy): written back as well.
    etcd.put(&key, "{\"instance\": \"pod-kept\", \"state\": \"starting\"}");
    wait_status_keys(&etcd, 1, V1, "synced");
}

#[test]
fn an_instance_restarted_while_its_wave_waits_stays_ready_on_its_last_good_version() {
    if !require_tool("etcd") {
        return;
    }
    let etcd = Etcd::start();
    etcd.put(KEY, V1);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("config.json");
    write(&dest, V1);
    let instance = instances_one_canary(2).pop().unwrap();
    let command = SyncCommand::new(etcd.url(KEY), &dest)
        .arg("--name", NAME)
        .min_quiet("50ms")
        .arg("--fleet", etcd.url(PREFIX))
        .arg("--instance", &instance)
        .arg("--fleet-waves", "2")
        .arg("--fleet-wave-delay", "1h");
    let mut sync = command.start();
    sync.wait_state(NAME, "synced", T);
    etcd.put(KEY, V2);
    sync.wait_state(NAME, "waiting-for-wave", T);

    // Restarted (a rolling restart during the rollout): V1 is what it last ran, confirmed.
    sync.proc.signal("TERM");
    sync.proc.wait_exit(T);
    let sync = command.start();
    let status = sync.wait_state(NAME, "waiting-for-wave", T);
    assert_eq!(read_text(&dest), V1, "{status:#}");
    let (code, body) = http_exchange(sync.admin, "GET", "/readyz", &[], "").unwrap();
    assert_eq!(code, 200, "not ready on the last good version while the wave waits: {body}");
}
