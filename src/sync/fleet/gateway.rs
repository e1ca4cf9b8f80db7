//! The etcd v3 calls the fleet makes, through the same HTTP/JSON gateway and HTTP client as the
//! etcd source: range (at a revision, by prefix, counted), put (under a lease), a
//! create-if-absent transaction, lease grant, keepalive and revoke, and the compaction point.
//! Every call logs in the way the etcd source does (one code path, [`crate::sync::etcd_auth`]):
//! `--fleet-user` and `--fleet-password-file`, the token renewed when etcd says it is stale.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Method, StatusCode, Uri};
use serde_json::{json, Value};

use crate::sync::client::{self, ClientError, HttpClient};
use crate::sync::etcd_auth::{self, etcd_says, is_auth_refusal, EtcdLogin, LoginError};
use crate::sync::source::etcd::{int, next_line, range_end};
use crate::sync::spec::SourceAuth;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Largest answer read from etcd: a fleet's status and rejection keys are small JSON values.
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

/// How the fleet talks to etcd: its credentials and its time limit, for every call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GatewayOptions {
    /// `--fleet-ca` (for `etcd+https://`; the system bundle without it), the client
    /// certificate (`--fleet-cert`, `--fleet-key`), and the user (`--fleet-user`,
    /// `--fleet-password-file`). Only those fields are used. With an etcd source, each one not
    /// given is the source's.
    pub(crate) auth: SourceAuth,
    /// Time allowed for one call.
    pub(crate) timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum GatewayError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Login(#[from] LoginError),
    #[error("etcd {peer} answered {status} to {call}: {message}")]
    Status { peer: String, call: &'static str, status: StatusCode, message: String },
    /// Refused for want of credentials or rights.
    #[error("etcd {peer} refused {call}: {message}; {hint}")]
    Denied { peer: String, call: &'static str, message: String, hint: String },
    #[error("etcd {peer} sent a malformed answer to {call}: {message}")]
    Protocol { peer: String, call: &'static str, message: String },
    #[error("etcd {peer}: revision {revision} of {key} has been compacted")]
    Compacted { peer: String, key: String, revision: i64 },
}

/// One key as a range read returns it.
#[derive(Debug, Clone)]
pub(crate) struct Kv {
    pub(crate) key: String,
    pub(crate) value: Bytes,
    pub(crate) mod_revision: i64,
}

pub(crate) struct EtcdGateway {
    client: HttpClient,
    /// Whether a client certificate is presented (for the hint in a refused handshake).
    client_cert_sent: bool,
    base: Uri,
    timeout: Duration,
    /// `--fleet-user` and `--fleet-password-file`, with the token etcd gave for them.
    login: Option<EtcdLogin>,
}

impl EtcdGateway {
    pub(crate) fn new(base: &Uri, options: &GatewayOptions) -> EtcdGateway {
        EtcdGateway {
            client: HttpClient::for_source(&options.auth),
            client_cert_sent: options.auth.cert.is_some(),
            base: base.clone(),
            timeout: options.timeout,
            login: match (&options.auth.user, &options.auth.password_file) {
                (Some(user), Some(path)) => Some(EtcdLogin::new(base, user, path.clone(), "--fleet-password-file")),
                _ => None,
            },
        }
    }

    /// What to change when etcd refuses a call for want of credentials or rights.
    fn hint(&self, call: &str) -> String {
        let writes = matches!(call, "put" | "txn" | "lease grant" | "lease keepalive" | "lease revoke");
        match &self.login {
            Some(login) => format!(
                "as user {} (does its role grant {} on the fleet prefix{}?)",
                login.user(),
                if writes { "readwrite" } else { "read" },
                if call == "put" { ", or on the source key for a fleet rollback" } else { "" }
            ),
            None => "etcd has authentication enabled: give --fleet-user and --fleet-password-file".into(),
        }
    }

    pub(crate) fn peer(&self) -> String {
        client::peer_of(&self.base)
    }

    async fn call(&mut self, call: &'static str, path: &str, body: Value) -> Result<Value, GatewayError> {
        let url = format!("{}{path}", self.base);
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Url { url: url.clone(), message: e.to_string() })?;
        let reply =
            etcd_auth::post(self.login.as_mut(), &mut self.client, &uri, &body.to_string(), self.timeout, MAX_ANSWER)
                .await?;
        let answer: Result<Value, _> = serde_json::from_slice(&reply.body);
        if !reply.status.is_success() {
            let message = etcd_says(&reply.body, "");
            if is_auth_refusal(reply.status, &message) {
                let hint = self.hint(call);
                return Err(GatewayError::Denied { peer: self.peer(), call, message, hint });
            }
            return Err(GatewayError::Status { peer: self.peer(), call, status: reply.status, message });
        }
        answer.map_err(|e| GatewayError::Protocol { peer: self.peer(), call, message: format!("not JSON: {e}") })
    }

    fn kvs(&self, call: &'static str, answer: &Value) -> Result<Vec<Kv>, GatewayError> {
        let protocol = |message: String| GatewayError::Protocol { peer: self.peer(), call, message };
        let mut found = Vec::new();
        for kv in answer.get("kvs").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
            let key = B64
                .decode(kv.get("key").and_then(Value::as_str).unwrap_or(""))
                .map_err(|e| protocol(format!("key is not base64: {e}")))?;
            let value = B64
                .decode(kv.get("value").and_then(Value::as_str).unwrap_or(""))
                .map_err(|e| protocol(format!("value is not base64: {e}")))?;
            found.push(Kv {
                key: String::from_utf8_lossy(&key).into_owned(),
                value: Bytes::from(value),
                mod_revision: kv.get("mod_revision").and_then(int).unwrap_or(0),
            });
        }
        Ok(found)
    }

    /// `key` now, or as it was at `revision`; with the store's current revision.
    pub(crate) async fn get(&mut self, key: &str, revision: Option<i64>) -> Result<(Option<Kv>, i64), GatewayError> {
        let mut body = json!({ "key": B64.encode(key) });
        if let Some(revision) = revision {
            body["revision"] = json!(revision.to_string());
        }
        let answer = match self.call("range", "v3/kv/range", body).await {
            Err(GatewayError::Status { message, .. }) if message.contains("required revision has been compacted") => {
                return Err(GatewayError::Compacted {
                    peer: self.peer(),
                    key: key.to_owned(),
                    revision: revision.unwrap_or(0),
                })
            }
            other => other?,
        };
        let current = answer.pointer("/header/revision").and_then(int).unwrap_or(0);
        Ok((self.kvs("range", &answer)?.into_iter().next(), current))
    }

    /// Every key that starts with `prefix`.
    pub(crate) async fn get_prefix(&mut self, prefix: &str) -> Result<Vec<Kv>, GatewayError> {
        let body = json!({ "key": B64.encode(prefix), "range_end": B64.encode(range_end(prefix.as_bytes())) });
        let answer = self.call("range", "v3/kv/range", body).await?;
        self.kvs("range", &answer)
    }

    /// How many keys start with `prefix`.
    pub(crate) async fn count_prefix(&mut self, prefix: &str) -> Result<u64, GatewayError> {
        let body = json!({ "key": B64.encode(prefix), "range_end": B64.encode(range_end(prefix.as_bytes())), "count_only": true });
        let answer = self.call("range", "v3/kv/range", body).await?;
        // etcd leaves out a count of 0.
        Ok(answer.get("count").and_then(int).unwrap_or(0).max(0) as u64)
    }

    /// Writes `key`, attached to `lease` when given; returns the new revision.
    pub(crate) async fn put(&mut self, key: &str, value: &[u8], lease: Option<i64>) -> Result<i64, GatewayError> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(lease) = lease {
            body["lease"] = json!(lease.to_string());
        }
        let answer = self.call("put", "v3/kv/put", body).await?;
        Ok(answer.pointer("/header/revision").and_then(int).unwrap_or(0))
    }

    /// Creates `key` with `value` unless it exists (one transaction: the first writer wins),
    /// and returns what it holds afterwards.
    pub(crate) async fn create_or_get(&mut self, key: &str, value: &[u8]) -> Result<Bytes, GatewayError> {
        let key64 = B64.encode(key);
        let body = json!({
            "compare": [{ "key": key64, "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": [{ "request_put": { "key": key64, "value": B64.encode(value) } }],
            "failure": [{ "request_range": { "key": key64 } }],
        });
        let answer = self.call("txn", "v3/kv/txn", body).await?;
        if answer.get("succeeded").and_then(Value::as_bool) == Some(true) {
            return Ok(Bytes::copy_from_slice(value));
        }
        let range = answer.pointer("/responses/0/response_range").cloned().unwrap_or(Value::Null);
        self.kvs("txn", &range)?.into_iter().next().map(|kv| kv.value).ok_or_else(|| GatewayError::Protocol {
            peer: self.peer(),
            call: "txn",
            message: format!("{key} neither created nor found"),
        })
    }

    /// A new lease of `ttl`; its id.
    pub(crate) async fn grant(&mut self, ttl: Duration) -> Result<i64, GatewayError> {
        let answer =
            self.call("lease grant", "v3/lease/grant", json!({ "TTL": ttl.as_secs().max(1).to_string() })).await?;
        answer.get("ID").and_then(int).ok_or_else(|| GatewayError::Protocol {
            peer: self.peer(),
            call: "lease grant",
            message: "no lease ID".into(),
        })
    }

    /// Renews `lease`; `false` when etcd no longer knows it (it expired).
    pub(crate) async fn keep_alive(&mut self, lease: i64) -> Result<bool, GatewayError> {
        let answer = self.call("lease keepalive", "v3/lease/keepalive", json!({ "ID": lease.to_string() })).await?;
        // An expired lease comes back without a TTL (0).
        Ok(answer.pointer("/result/TTL").and_then(int).unwrap_or(0) > 0)
    }

    /// Ends `lease` and deletes the keys attached to it.
    pub(crate) async fn revoke(&mut self, lease: i64) -> Result<(), GatewayError> {
        self.call("lease revoke", "v3/lease/revoke", json!({ "ID": lease.to_string() })).await.map(drop)
    }

    /// The oldest revision etcd still keeps (its compaction point), asked as a watch from
    /// revision 1 that etcd cancels naming it; `None` when nothing was compacted.
    pub(crate) async fn oldest_revision(&mut self, key: &str) -> Result<Option<i64>, GatewayError> {
        let body = json!({ "create_request": { "key": B64.encode(key), "start_revision": "1" } });
        let uri: Uri = format!("{}v3/watch", self.base).parse().map_err(|e: http::uri::InvalidUri| {
            ClientError::Url { url: self.base.to_string(), message: e.to_string() }
        })?;
        let mut request = client::request(Method::POST, &uri, body.to_string());
        if let Some(login) = &mut self.login {
            request.headers_mut().insert(AUTHORIZATION, login.token(&mut self.client, self.timeout).await?);
        }
        let response = self.client.open_stream(request, self.timeout).await?;
        let mut body = response.into_body();
        let mut buffer = bytes::BytesMut::new();
        let peer = self.peer();
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let frame = match tokio::time::timeout_at(deadline, http_body_util::BodyExt::frame(&mut body)).await {
                // Not cancelled within the timeout: the watch from revision 1 was accepted.
                Err(_) | Ok(None) => return Ok(None),
                Ok(Some(Err(source))) => {
                    return Err(ClientError::Http { peer, source, client_cert: self.client_cert_sent }.into())
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Some(data) = frame.data_ref() else { continue };
            buffer.extend_from_slice(data);
            while let Some(line) = next_line(&mut buffer) {
                let message: Value = serde_json::from_slice(line.trim_ascii()).map_err(|e| GatewayError::Protocol {
                    peer: peer.clone(),
                    call: "watch",
                    message: format!("not JSON: {e}"),
                })?;
                if let Some(compacted) = message.pointer("/result/compact_revision").and_then(int).filter(|r| *r > 0) {
                    return Ok(Some(compacted));
                }
                // Events replayed from revision 1: nothing was compacted.
                if message.pointer("/result/events").is_some() {
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(range_end(b"/fleet/"), b"/fleet0".to_vec());
        assert_eq!(range_end("a\u{7f}".as_bytes()), b"a\x80".to_vec());
    }
}
