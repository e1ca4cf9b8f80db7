//! Consul KV blocking queries: `GET /v1/kv/KEY?raw&index=N&wait=W` returns when the key's
//! index passes N or after W. Follows Consul's rules for clients: the index from
//! `X-Consul-Index` is kept, reset to 0 when it goes backwards (a restored snapshot, a new
//! cluster) and never below 1 after a response, and the loop is rate-limited so that a server
//! answering at once cannot make it spin.

use std::time::Duration;

use http::{Method, StatusCode, Uri};

use super::{server_says, Backoff, Fetched, Outbox, SourceError, SourceMsg};
use crate::sync::client::{self, ClientError, HttpClient, Reply};
use crate::sync::spec::SyncSpec;

pub(crate) struct ConsulSource {
    client: HttpClient,
    /// `--source-token-file`: the ACL token, read for every query.
    token_file: Option<std::path::PathBuf>,
    base: Uri,
    key: String,
    wait: Duration,
    extra_query: String,
    index: u64,
    timeout: Duration,
    min_gap: Duration,
    max_size: u64,
    retry_max: Duration,
}

pub(crate) enum Answer {
    Value { fetched: Fetched },
    Unchanged,
}

impl ConsulSource {
    pub(crate) fn new(spec: &SyncSpec, base: &Uri, key: &str, wait: Duration, extra_query: &str) -> ConsulSource {
        ConsulSource {
            client: HttpClient::for_source(&spec.source_auth),
            token_file: spec.source_auth.token_file.clone(),
            base: base.clone(),
            key: key.to_owned(),
            wait,
            extra_query: extra_query.to_owned(),
            index: 0,
            // Consul adds up to wait/16 of jitter to the wait.
            timeout: wait + wait / 16 + spec.source_timeout,
            // At most one blocking request per this: Consul's own client guidance.
            min_gap: spec.poll_interval.min(Duration::from_secs(1)),
            max_size: spec.max_size,
            retry_max: spec.retry_max,
        }
    }

    fn url(&self, blocking: bool) -> Result<Uri, SourceError> {
        let mut url = format!("{}v1/kv/{}?raw", self.base, self.key);
        if blocking && self.index > 0 {
            url.push_str(&format!("&index={}&wait={}ms", self.index, self.wait.as_millis()));
        }
        if !self.extra_query.is_empty() {
            url.push('&');
            url.push_str(&self.extra_query);
        }
        url.parse().map_err(|e: http::uri::InvalidUri| {
            SourceError::Client(ClientError::Url { url: url.clone(), message: e.to_string() })
        })
    }

    pub(crate) async fn fetch(&mut self) -> Result<Fetched, SourceError> {
        self.index = 0;
        match self.query(false).await? {
            Answer::Value { fetched } => Ok(fetched),
            Answer::Unchanged => Err(self.protocol("no value")),
        }
    }

    fn protocol(&self, message: &str) -> SourceError {
        SourceError::Protocol {
            peer: client::peer_of(&self.base),
            what: format!("key {}", self.key),
            message: message.into(),
        }
    }

    async fn query(&mut self, blocking: bool) -> Result<Answer, SourceError> {
        let url = self.url(blocking)?;
        let peer = client::peer_of(&self.base);
        let what = format!("key {}", self.key);
        let timeout = if blocking { self.timeout } else { self.timeout - self.wait - self.wait / 16 };
        let mut request = client::request(Method::GET, &url, "");
        // Read for every query: a rotated Secret is used by the next one.
        let token = match &self.token_file {
            Some(path) => Some(client::read_secret(path, "--source-token-file")?),
            None => None,
        };
        if let Some(token) = &token {
            request.headers_mut().insert("x-consul-token", token.header(""));
        }
        let reply = self.client.fetch(request, timeout, self.max_size).await.map_err(|e| match e {
            ClientError::TooLarge { limit, .. } => {
                SourceError::TooLarge { peer: peer.clone(), what: what.clone(), limit }
            }
            other => SourceError::Client(other),
        })?;
        if matches!(reply.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            // Consul says `ACL not found` (unknown token) or `Permission denied` (no rights).
            let said = server_says(&reply.body, &[token.as_ref().map_or("", |t| t.expose())]);
            let sent = match &self.token_file {
                Some(path) => format!("the ACL token in --source-token-file {}", path.display()),
                None => "no ACL token (give --source-token-file)".into(),
            };
            let message = format!("{} {said}; sent {sent}", reply.status);
            return Err(SourceError::Denied { peer: format!("consul {peer}"), what, message });
        }
        self.read_reply(reply, blocking)
    }

    /// What a reply to a query says, with the index brought up to date. Without I/O, so that
    /// the fuzz target reaches it.
    pub(crate) fn read_reply(&mut self, reply: Reply, blocking: bool) -> Result<Answer, SourceError> {
        let peer = client::peer_of(&self.base);
        let what = format!("key {}", self.key);
        let index = reply
            .headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| self.protocol("no X-Consul-Index header (is this a Consul KV endpoint?)"))?;
        let previous = self.index;
        self.index = if index < previous {
            tracing::info!(
                "consul {peer} {what}: X-Consul-Index went back from {previous} to {index}; starting over from 0"
            );
            0
        } else {
            index.max(1)
        };
        match reply.status {
            StatusCode::NOT_FOUND => Err(SourceError::Missing { peer, what }),
            status if status.is_success() => {
                if blocking && index == previous {
                    return Ok(Answer::Unchanged);
                }
                Ok(Answer::Value { fetched: Fetched { content: reply.body, revision: format!("index {index}") } })
            }
            status => Err(SourceError::Status { peer, what, status }),
        }
    }

    pub(crate) async fn run(mut self, out: Outbox) {
        let mut backoff = Backoff::new(self.retry_max);
        loop {
            let started = tokio::time::Instant::now();
            let delay = match self.query(true).await {
                Ok(answer) => {
                    backoff.reset();
                    let msg = match answer {
                        Answer::Value { fetched } => SourceMsg::Value(fetched),
                        Answer::Unchanged => SourceMsg::Unchanged,
                    };
                    if !out.send(msg).await {
                        return;
                    }
                    self.min_gap.saturating_sub(started.elapsed())
                }
                Err(e) => {
                    let stalled = e.is_timeout();
                    if !out.error(&e, stalled).await {
                        return;
                    }
                    backoff.next_delay().max(self.min_gap.saturating_sub(started.elapsed()))
                }
            };
            if !delay.is_zero() && !out.sleep(delay).await {
                return;
            }
            if out.shutdown.is_cancelled() {
                return;
            }
        }
    }
}
