//! etcd v3 through its HTTP/JSON gateway: `POST /v3/kv/range` reads the key, then a streaming
//! `POST /v3/watch` follows it from the next revision, with progress notifications asked for.
//! After a watch fails (disconnect, compaction, an event it could not take) the key is read
//! again and watched from that read's revision: the newest value is all the app needs, and a
//! failure between the `created` reply and the replayed events cannot skip them. A revision
//! that goes back or a changed `cluster_id` (etcd restored from a snapshot, or restarted on an
//! empty data dir) drops the remembered revision the same way. A watch silent for half of
//! `--source-timeout` is checked with a read of the key within the other half: a server that
//! does not answer, or a key that changed without an event, means the watch stalled, and it is
//! reconnected.
//!
//! A key ending in `/` is a prefix: the range read and the watch cover `[prefix, range_end)`
//! (the prefix with its last byte incremented), the set read is kept, and each watched event
//! (a put or a delete under the prefix) changes it; the set's revision is the read's or the
//! event's header revision.

use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::header::AUTHORIZATION;
use http::{Method, Uri};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::{Backoff, Fetched, Outbox, SourceError, SourceMsg};
use crate::sync::client::{self, ClientError, HttpClient};
use crate::sync::etcd_auth::{self, etcd_says, is_auth_refusal, token_is_stale, EtcdLogin, LoginError};
use crate::sync::keyset::KeySet;
use crate::sync::spec::SyncSpec;
use crate::sys::human_duration;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub(crate) struct EtcdSource {
    client: HttpClient,
    /// A second client for checks made while the watch holds its own connection.
    watch_client: HttpClient,
    base: Uri,
    key: String,
    key_b64: String,
    timeout: Duration,
    max_size: u64,
    retry_max: Duration,
    /// The `cluster_id` of the answers so far: another one is another etcd's history.
    cluster_id: Option<String>,
    /// `--source-user` and `--source-password-file`, with the token etcd gave for them.
    login: Option<EtcdLogin>,
    /// For a prefix: the end of its range, base64, and the set as last read and watched.
    range_end_b64: Option<String>,
    set: KeySet,
}

/// The key as a range read saw it.
struct Range {
    value: Option<(Bytes, i64)>,
    /// For a prefix: every key under it.
    set: Option<KeySet>,
    revision: i64,
    cluster_id: Option<String>,
}

/// Why a watch stream ended.
pub(crate) enum WatchEnd {
    Shutdown,
    Compacted,
    /// etcd's history is not the one the remembered revision belongs to.
    HistoryChanged(String),
    Failed {
        message: String,
        stalled: bool,
    },
}

/// etcd's gateway writes 64-bit integers as JSON strings.
pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

impl EtcdSource {
    pub(crate) fn new(spec: &SyncSpec, base: &Uri, key: &str) -> EtcdSource {
        EtcdSource {
            client: HttpClient::for_source(&spec.source_auth),
            watch_client: HttpClient::for_source(&spec.source_auth),
            base: base.clone(),
            key: key.to_owned(),
            key_b64: B64.encode(key.as_bytes()),
            timeout: spec.source_timeout,
            max_size: spec.max_size,
            retry_max: spec.retry_max,
            cluster_id: None,
            login: match (&spec.source_auth.user, &spec.source_auth.password_file) {
                (Some(user), Some(path)) => Some(EtcdLogin::new(base, user, path.clone(), "--source-password-file")),
                _ => None,
            },
            range_end_b64: key.ends_with('/').then(|| B64.encode(range_end(key.as_bytes()))),
            set: KeySet::default(),
        }
    }

    /// What a refusal of the key means, in words that say what to fix.
    fn refusal(&self, status: http::StatusCode, said: String) -> SourceError {
        if !is_auth_refusal(status, &said) {
            return SourceError::Status { peer: self.peer(), what: self.what(), status };
        }
        let who = match &self.login {
            Some(login) => format!("user {} (does its role grant read on the key?)", login.user()),
            None => "no user (etcd has auth enabled? give --source-user and --source-password-file)".into(),
        };
        let peer = format!("etcd {}", self.peer());
        SourceError::Denied { peer, what: self.what(), message: format!("{status}: {said}; as {who}") }
    }

    /// The request body's key and, for a prefix, its range end.
    fn key_range(&self) -> Value {
        match &self.range_end_b64 {
            Some(end) => json!({ "key": self.key_b64, "range_end": end }),
            None => json!({ "key": self.key_b64 }),
        }
    }

    /// A key of an answer, base64 as the gateway sends it, as its path below the prefix.
    fn below_prefix(&self, kv: &Value) -> Result<Option<String>, SourceError> {
        let encoded = kv.get("key").and_then(Value::as_str).unwrap_or("");
        let key = B64.decode(encoded).map_err(|e| self.protocol(format!("key is not base64: {e}")))?;
        let Some(below) = key.strip_prefix(self.key.as_bytes()) else { return Ok(None) };
        match std::str::from_utf8(below) {
            Ok(name) => Ok(Some(name.to_owned())),
            Err(_) => Err(self.protocol(format!("key {} is not UTF-8", String::from_utf8_lossy(&key).escape_debug()))),
        }
    }

    fn set_fetched(&self, revision: i64) -> Fetched {
        Fetched { content: Bytes::from(self.set.encode()), revision: format!("revision {revision}") }
    }

    fn peer(&self) -> String {
        client::peer_of(&self.base)
    }

    fn what(&self) -> String {
        format!("key {}", self.key)
    }

    fn endpoint(&self, path: &str) -> Result<Uri, SourceError> {
        let url = format!("{}{path}", self.base);
        url.parse()
            .map_err(|e: http::uri::InvalidUri| SourceError::Client(ClientError::Url { url, message: e.to_string() }))
    }

    fn protocol(&self, message: impl Into<String>) -> SourceError {
        SourceError::Protocol { peer: self.peer(), what: self.what(), message: message.into() }
    }

    /// Base64 bytes for `--max-size` bytes of value, plus room for the JSON around them.
    fn max_json(&self) -> u64 {
        self.max_size / 3 * 4 + 64 * 1024
    }

    fn decode_value(&self, kv: &Value) -> Result<(Bytes, i64), SourceError> {
        let encoded = kv.get("value").and_then(Value::as_str).unwrap_or("");
        let value = B64.decode(encoded).map_err(|e| self.protocol(format!("value is not base64: {e}")))?;
        if value.len() as u64 > self.max_size {
            return Err(SourceError::TooLarge { peer: self.peer(), what: self.what(), limit: self.max_size });
        }
        let modified = kv.get("mod_revision").and_then(int).unwrap_or(0);
        Ok((Bytes::from(value), modified))
    }

    /// Checks an answer's header against what was seen: `Err(why)` when its revision is older
    /// than `known` or its cluster is another one.
    fn check_header(&mut self, header: Option<&Value>, known: Option<i64>) -> Result<(), String> {
        let Some(header) = header else { return Ok(()) };
        if let Some(cluster) = header.get("cluster_id").and_then(Value::as_str) {
            match &self.cluster_id {
                Some(old) if old != cluster => {
                    let why = format!("cluster_id changed from {old} to {cluster}");
                    self.cluster_id = None;
                    return Err(why);
                }
                _ => self.cluster_id = Some(cluster.to_owned()),
            }
        }
        match (header.get("revision").and_then(int), known) {
            (Some(now), Some(known)) if now < known => Err(format!("revision went back from {known} to {now}")),
            _ => Ok(()),
        }
    }

    async fn range(&mut self, use_watch_client: bool, timeout: Duration) -> Result<Range, SourceError> {
        let uri = self.endpoint("v3/kv/range")?;
        let body = self.key_range().to_string();
        let max = self.max_json();
        let client = if use_watch_client { &mut self.watch_client } else { &mut self.client };
        let reply =
            etcd_auth::post(self.login.as_mut(), client, &uri, &body, timeout, max).await.map_err(|e| match e {
                LoginError::Client(ClientError::TooLarge { .. }) => SourceError::TooLarge {
                    peer: client::peer_of(&uri),
                    what: format!("key {}", self.key),
                    limit: self.max_size,
                },
                other => SourceError::Login(other),
            })?;
        if !reply.status.is_success() {
            return Err(self.refusal(reply.status, etcd_says(&reply.body, "")));
        }
        let answer: Value = serde_json::from_slice(&reply.body).map_err(|e| self.protocol(format!("not JSON: {e}")))?;
        let cluster_id = answer.pointer("/header/cluster_id").and_then(Value::as_str).map(str::to_owned);
        let revision =
            answer.pointer("/header/revision").and_then(int).ok_or_else(|| self.protocol("no header.revision"))?;
        let kvs = answer.get("kvs").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        if self.range_end_b64.is_some() {
            let mut set = KeySet::default();
            let mut total = 0u64;
            for kv in kvs {
                let Some(name) = self.below_prefix(kv)? else { continue };
                let (value, _) = self.decode_value(kv)?;
                total += value.len() as u64;
                if total > self.max_size {
                    return Err(SourceError::TooLarge { peer: self.peer(), what: self.what(), limit: self.max_size });
                }
                set.keys.insert(name, value);
            }
            return Ok(Range { value: None, set: Some(set), revision, cluster_id });
        }
        let value = match kvs.first() {
            Some(kv) => Some(self.decode_value(kv)?),
            None => None,
        };
        Ok(Range { value, set: None, revision, cluster_id })
    }

    pub(crate) async fn fetch(&mut self) -> Result<Fetched, SourceError> {
        let range = self.range(false, self.timeout).await?;
        if let Some(set) = range.set {
            self.set = set;
            return Ok(self.set_fetched(range.revision));
        }
        match range.value {
            Some((content, modified)) => Ok(Fetched { content, revision: format!("revision {modified}") }),
            None => Err(SourceError::Missing { peer: self.peer(), what: self.what() }),
        }
    }

    pub(crate) async fn run(mut self, out: Outbox) {
        let mut backoff = Backoff::new(self.retry_max);
        // The last revision up to which every change of the key has been seen.
        let mut revision: Option<i64> = None;
        loop {
            let seen = match revision {
                Some(seen) => seen,
                None => match self.range(false, self.timeout).await {
                    Ok(range) => {
                        self.cluster_id = range.cluster_id.clone();
                        let msg = match range.value {
                            _ if range.set.is_some() => {
                                self.set = range.set.unwrap_or_default();
                                SourceMsg::Value(self.set_fetched(range.revision))
                            }
                            Some((content, modified)) => {
                                SourceMsg::Value(Fetched { content, revision: format!("revision {modified}") })
                            }
                            None => SourceMsg::Error {
                                message: SourceError::Missing { peer: self.peer(), what: self.what() }.to_string(),
                                stalled: false,
                            },
                        };
                        if !out.send(msg).await {
                            return;
                        }
                        revision = Some(range.revision);
                        range.revision
                    }
                    Err(e) => {
                        if !out.error(&e, e.is_timeout()).await || !out.sleep(backoff.next_delay()).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            match self.watch(seen, &mut revision, &out, &mut backoff).await {
                WatchEnd::Shutdown => return,
                WatchEnd::Compacted => {
                    tracing::info!(
                        "etcd {} {}: watch position was compacted; reading the key again",
                        self.peer(),
                        self.what()
                    );
                    revision = None;
                }
                WatchEnd::HistoryChanged(why) => {
                    tracing::warn!(
                        "etcd {} {}: {why} (restored from a snapshot, or a new cluster); reading the key again",
                        self.peer(),
                        self.what()
                    );
                    revision = None;
                }
                WatchEnd::Failed { message, stalled } => {
                    // Read the key before watching again: events the broken watch did not
                    // deliver (or could not take) are not replayed into another failure.
                    revision = None;
                    if !out.send(SourceMsg::Error { message, stalled }).await || !out.sleep(backoff.next_delay()).await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Watches from `seen + 1`, keeping `revision` up to date, until the stream ends.
    async fn watch(&mut self, seen: i64, revision: &mut Option<i64>, out: &Outbox, backoff: &mut Backoff) -> WatchEnd {
        let failed = |message: String, stalled: bool| WatchEnd::Failed { message, stalled };
        let uri = match self.endpoint("v3/watch") {
            Ok(uri) => uri,
            Err(e) => return failed(e.to_string(), false),
        };
        let mut create = self.key_range();
        create["start_revision"] = json!(seen.saturating_add(1).to_string());
        create["progress_notify"] = json!(true);
        let body = json!({ "create_request": create });
        let mut request = client::request(Method::POST, &uri, body.to_string());
        if let Some(token) = self.login.as_ref().and_then(EtcdLogin::current) {
            request.headers_mut().insert(AUTHORIZATION, token);
        }
        let response = match self.client.open_stream(request, self.timeout).await {
            Ok(r) => r,
            Err(e) => {
                let stalled = e.is_timeout();
                return failed(format!("cannot open a watch on {}: {e}", self.peer()), stalled);
            }
        };
        if !response.status().is_success() {
            return failed(
                format!("{} answered {} to a watch of {}", self.peer(), response.status(), self.what()),
                false,
            );
        }
        let mut body = response.into_body();
        let mut buffer = BytesMut::new();
        // Silence for half the timeout, then a read within the other half: a stall is
        // reported within --source-timeout.
        let half = self.timeout / 2;
        loop {
            let frame = tokio::select! {
                frame = tokio::time::timeout(half, body.frame()) => frame,
                _ = out.shutdown.cancelled() => return WatchEnd::Shutdown,
            };
            let frame = match frame {
                Err(_silent) => {
                    // No event and no progress notification for a whole timeout: ask the
                    // server directly, on another connection.
                    let since = human_duration(half);
                    match self.range(true, half).await {
                        Err(e) => {
                            return failed(
                                format!(
                                    "watch on {} silent for {since}, and a read of the key failed: {e}; reconnecting",
                                    self.peer()
                                ),
                                true,
                            )
                        }
                        Ok(range) => {
                            let known = revision.unwrap_or(seen);
                            let header = json!({ "cluster_id": range.cluster_id, "revision": range.revision });
                            if let Err(why) = self.check_header(Some(&header), Some(known)) {
                                return WatchEnd::HistoryChanged(why);
                            }
                            if let Some(set) = range.set.filter(|set| *set != self.set) {
                                self.set = set;
                                let _ = out.send(SourceMsg::Value(self.set_fetched(range.revision))).await;
                                *revision = Some(range.revision);
                                return failed(
                                    format!(
                                        "watch on {} stalled: the keys under {} changed by revision {} with no event; reconnecting",
                                        self.peer(),
                                        self.key,
                                        range.revision
                                    ),
                                    true,
                                );
                            }
                            if let Some((content, modified)) = range.value.filter(|(_, m)| *m > known) {
                                let _ = out
                                    .send(SourceMsg::Value(Fetched {
                                        content,
                                        revision: format!("revision {modified}"),
                                    }))
                                    .await;
                                *revision = Some(range.revision);
                                return failed(
                                    format!(
                                        "watch on {} stalled: revision {modified} of {} came by no event; reconnecting",
                                        self.peer(),
                                        self.what()
                                    ),
                                    true,
                                );
                            }
                            if !out.send(SourceMsg::Unchanged).await {
                                return WatchEnd::Shutdown;
                            }
                            continue;
                        }
                    }
                }
                Ok(None) => return failed(format!("watch stream from {} ended", self.peer()), false),
                Ok(Some(Err(e))) => return failed(format!("watch stream from {} broke: {e}", self.peer()), false),
                Ok(Some(Ok(frame))) => frame,
            };
            let Some(data) = frame.data_ref() else { continue };
            buffer.extend_from_slice(data);
            if buffer.len() as u64 > self.max_json() && !buffer.contains(&b'\n') {
                return failed(
                    SourceError::TooLarge { peer: self.peer(), what: self.what(), limit: self.max_size }.to_string(),
                    false,
                );
            }
            while let Some(line) = next_line(&mut buffer) {
                match self.on_message(line.trim_ascii(), revision, out, backoff).await {
                    Ok(true) => {}
                    Ok(false) => return WatchEnd::Shutdown,
                    Err(end) => return end,
                }
            }
        }
    }

    /// Handles one watch response; `Ok(false)` to stop (shutdown), `Err` to end the stream.
    async fn on_message(
        &mut self,
        line: &[u8],
        revision: &mut Option<i64>,
        out: &Outbox,
        backoff: &mut Backoff,
    ) -> Result<bool, WatchEnd> {
        match self.read_message(line, revision, backoff)? {
            Some(msg) => Ok(out.send(msg).await),
            None => Ok(true),
        }
    }

    /// What one watch response says (`None`: nothing to pass on), with `revision` and
    /// `backoff` brought up to date; `Err` ends the stream. Without I/O, so that the fuzz
    /// target reaches it.
    pub(crate) fn read_message(
        &mut self,
        line: &[u8],
        revision: &mut Option<i64>,
        backoff: &mut Backoff,
    ) -> Result<Option<SourceMsg>, WatchEnd> {
        let failed = |message: String| WatchEnd::Failed { message, stalled: false };
        let message: Value = serde_json::from_slice(line)
            .map_err(|e| failed(self.protocol(format!("watch message is not JSON: {e}")).to_string()))?;
        if let Some(error) = message.get("error") {
            return Err(failed(format!(
                "watch on {} failed: {}",
                self.peer(),
                error.get("message").and_then(Value::as_str).unwrap_or("unknown error")
            )));
        }
        let Some(result) = message.get("result") else { return Ok(None) };
        if result.get("canceled").and_then(Value::as_bool) == Some(true) {
            if result.get("compact_revision").and_then(int).unwrap_or(0) > 0 {
                return Err(WatchEnd::Compacted);
            }
            let reason = result.get("cancel_reason").and_then(Value::as_str).unwrap_or("no reason given");
            if token_is_stale(http::StatusCode::OK, reason) {
                // The key is read again before the next watch: with a new token.
                if let Some(login) = &mut self.login {
                    login.forget();
                }
            }
            return Err(failed(format!("etcd {} cancelled the watch of {}: {reason}", self.peer(), self.what())));
        }
        let header_revision = result.pointer("/header/revision").and_then(int);
        self.check_header(result.get("header"), *revision).map_err(WatchEnd::HistoryChanged)?;
        let events = result.get("events").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        let mut msg = None;
        if self.range_end_b64.is_some() {
            let mut changed = false;
            for event in events {
                let Some(kv) = event.get("kv") else { continue };
                let name = match self.below_prefix(kv) {
                    Ok(Some(name)) => name,
                    Ok(None) => continue,
                    Err(e) => return Err(failed(e.to_string())),
                };
                changed = true;
                if event.get("type").and_then(Value::as_str) == Some("DELETE") {
                    self.set.keys.remove(&name);
                } else {
                    let (value, _) = self.decode_value(kv).map_err(|e| failed(e.to_string()))?;
                    self.set.keys.insert(name, value);
                }
            }
            if changed {
                let at = header_revision.unwrap_or(0);
                msg = Some(SourceMsg::Value(self.set_fetched(at)));
            }
        }
        for event in events.iter().filter(|_| self.range_end_b64.is_none()) {
            let Some(kv) = event.get("kv") else { continue };
            if kv.get("key").and_then(Value::as_str) != Some(self.key_b64.as_str()) {
                continue;
            }
            msg = Some(match event.get("type").and_then(Value::as_str) {
                Some("DELETE") => SourceMsg::Error {
                    message: format!("{} was deleted at {}", self.what(), self.peer()),
                    stalled: false,
                },
                _ => match self.decode_value(kv) {
                    Ok((content, modified)) => {
                        SourceMsg::Value(Fetched { content, revision: format!("revision {modified}") })
                    }
                    Err(e) => SourceMsg::Error { message: e.to_string(), stalled: false },
                },
            });
        }
        let created = result.get("created").and_then(Value::as_bool) == Some(true);
        if created {
            backoff.reset();
            tracing::debug!(
                "etcd {}: watching {} from revision {}",
                self.peer(),
                self.what(),
                // The server's revision, up to i64::MAX: the next one must not overflow.
                revision.unwrap_or(0).saturating_add(1)
            );
        }
        // Only events and progress notifications say that everything up to their revision was
        // delivered; the `created` reply's revision comes before the replayed events.
        if let Some(r) = header_revision.filter(|_| !created) {
            *revision = Some(revision.map_or(r, |old| old.max(r)));
        }
        // Only the last event matters: a burst in one message becomes one change.
        Ok(Some(msg.unwrap_or(SourceMsg::Unchanged)))
    }
}

/// The end of the range of keys that start with `prefix`: the prefix with its last byte that
/// is not 0xff incremented (and what follows it dropped); all keys when there is none.
pub(crate) fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Takes the next line of the watch stream that has anything on it (etcd's gateway ends each
/// JSON message with a newline); `None` until one has arrived whole.
pub(crate) fn next_line(buffer: &mut BytesMut) -> Option<BytesMut> {
    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
        let line = buffer.split_to(end + 1);
        if !line.trim_ascii().is_empty() {
            return Some(line);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::spec::SourceSpec;

    fn source() -> EtcdSource {
        let argv = ["sidecar", "sync", "--source", "etcd://127.0.0.1:2379/k", "--dest", "/tmp/sidecar-test/k"];
        let crate::cli::Command::Sync(args) = crate::cli::parse_from(argv).unwrap().command else {
            unreachable!("a sync command line")
        };
        let spec = args.to_spec().unwrap();
        let SourceSpec::Etcd { base, key } = &spec.source else { unreachable!("an etcd source") };
        EtcdSource::new(&spec, base, key)
    }

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(range_end(b"/apps/x/"), b"/apps/x0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn the_largest_revision_a_server_can_claim_does_not_overflow() {
        // Found by fuzz/etcd_watch: after a header with revision i64::MAX, a `created` message
        // overflowed computing the next revision for its log line (a panic in debug builds).
        let mut source = source();
        let (mut revision, mut backoff) = (None, Backoff::new(Duration::from_secs(1)));
        let logging = tracing_subscriber::fmt().with_max_level(tracing::Level::DEBUG).with_writer(std::io::sink);
        tracing::subscriber::with_default(logging.finish(), || {
            for line in [
                &br#"{"result":{"header":{"revision":"9223372036854775807"}}}"#[..],
                br#"{"result":{"header":{"revision":"9223372036854775807"},"created":true}}"#,
            ] {
                let msg = source.read_message(line, &mut revision, &mut backoff);
                assert!(matches!(msg, Ok(Some(SourceMsg::Unchanged))), "{}", String::from_utf8_lossy(line));
            }
        });
        assert_eq!(revision, Some(i64::MAX));
    }
}
