//! An http(s) URL polled at `--poll-interval` with `If-None-Match`: a 304 costs the server
//! nothing and tells us nothing changed. A body with neither Content-Length nor chunked framing
//! ends when the connection closes, so a body cut short looks complete: it is refused.

use std::time::Duration;

use base64::Engine as _;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, ETAG, IF_NONE_MATCH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use super::{server_says, Backoff, Fetched, Outbox, SourceError, SourceMsg};
use crate::sync::client::{self, ClientError, HttpClient, Reply};
use crate::sync::hash::short_hash;
use crate::sync::spec::{SourceAuth, SyncSpec};

pub(crate) struct HttpSource {
    client: HttpClient,
    auth: SourceAuth,
    url: Uri,
    etag: Option<HeaderValue>,
    interval: Duration,
    timeout: Duration,
    max_size: u64,
    retry_max: Duration,
}

/// What one poll saw.
pub(crate) enum Poll {
    Changed(Fetched),
    NotModified,
}

impl HttpSource {
    pub(crate) fn new(spec: &SyncSpec, url: &Uri) -> HttpSource {
        HttpSource {
            client: HttpClient::for_source(&spec.source_auth),
            auth: spec.source_auth.clone(),
            url: url.clone(),
            etag: None,
            interval: spec.poll_interval,
            timeout: spec.source_timeout,
            max_size: spec.max_size,
            retry_max: spec.retry_max,
        }
    }

    pub(crate) async fn fetch(&mut self) -> Result<Fetched, SourceError> {
        self.etag = None;
        match self.poll().await? {
            Poll::Changed(fetched) => Ok(fetched),
            Poll::NotModified => Err(SourceError::Protocol {
                peer: client::peer_of(&self.url),
                what: self.url.path().to_owned(),
                message: "304 Not Modified without If-None-Match".into(),
            }),
        }
    }

    async fn poll(&mut self) -> Result<Poll, SourceError> {
        let mut request = client::request(Method::GET, &self.url, "");
        if let Some(etag) = &self.etag {
            request.headers_mut().insert(IF_NONE_MATCH, etag.clone());
        }
        for header in &self.auth.headers {
            request.headers_mut().append(header.name.clone(), header.value.clone());
        }
        // Read for every poll: a rotated Secret is used by the next one.
        let mut secret = None;
        if let Some(path) = &self.auth.token_file {
            let token = client::read_secret(path, "--source-token-file")?;
            request.headers_mut().insert(AUTHORIZATION, token.header("Bearer "));
            secret = Some(token);
        } else if let (Some(user), Some(path)) = (&self.auth.user, &self.auth.password_file) {
            let password = client::read_secret(path, "--source-password-file")?;
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.expose()));
            let mut value = HeaderValue::from_str(&format!("Basic {basic}")).map_err(|_| SourceError::Denied {
                peer: client::peer_of(&self.url),
                what: self.url.path().to_owned(),
                message: format!("--source-user {user} cannot be sent in a header"),
            })?;
            value.set_sensitive(true);
            request.headers_mut().insert(AUTHORIZATION, value);
            secret = Some(password);
        }
        let peer = client::peer_of(&self.url);
        let what = self.url.path().to_owned();
        let reply = self.client.fetch(request, self.timeout, self.max_size).await.map_err(|e| match e {
            ClientError::TooLarge { limit, .. } => {
                SourceError::TooLarge { peer: peer.clone(), what: what.clone(), limit }
            }
            other => SourceError::Client(other),
        })?;
        if matches!(reply.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let said = server_says(&reply.body, &[secret.as_ref().map_or("", |s| s.expose())]);
            let hint = match (&self.auth.token_file, &self.auth.user) {
                (Some(path), _) => format!("the token in --source-token-file {}", path.display()),
                (None, Some(user)) => format!("user {user} with the password in --source-password-file"),
                (None, None) => {
                    "no credentials given (--source-token-file, or --source-user with --source-password-file)".into()
                }
            };
            let said = if said.is_empty() { String::new() } else { format!(" ({said})") };
            return Err(SourceError::Denied {
                peer: format!("{}://{peer}", self.url.scheme_str().unwrap_or("http")),
                what,
                message: format!("{}{said}; sent {hint}", reply.status),
            });
        }
        self.read_reply(reply)
    }

    /// What a reply to a poll says, with the ETag kept for the next one. Without I/O, so that
    /// the fuzz target reaches it.
    pub(crate) fn read_reply(&mut self, reply: Reply) -> Result<Poll, SourceError> {
        let peer = client::peer_of(&self.url);
        let what = self.url.path().to_owned();
        match reply.status {
            StatusCode::NOT_MODIFIED if self.etag.is_some() => Ok(Poll::NotModified),
            StatusCode::NOT_FOUND => Err(SourceError::Missing { peer, what }),
            status if status.is_success() => {
                if is_close_delimited(&reply.headers) {
                    return Err(SourceError::CloseDelimited { peer, what });
                }
                self.etag = reply.headers.get(ETAG).cloned();
                let revision = match &self.etag {
                    Some(etag) => format!("etag {}", etag.to_str().unwrap_or("?")),
                    None => format!("sha256 {}", short_hash(&reply.body)),
                };
                Ok(Poll::Changed(Fetched { content: reply.body, revision }))
            }
            status => Err(SourceError::Status { peer, what, status }),
        }
    }

    pub(crate) async fn run(mut self, out: Outbox) {
        let mut backoff = Backoff::new(self.retry_max);
        loop {
            let wait = match self.poll().await {
                Ok(Poll::Changed(fetched)) => {
                    backoff.reset();
                    if !out.send(SourceMsg::Value(fetched)).await {
                        return;
                    }
                    self.interval
                }
                Ok(Poll::NotModified) => {
                    backoff.reset();
                    if !out.send(SourceMsg::Unchanged).await {
                        return;
                    }
                    self.interval
                }
                Err(e) => {
                    // A refused body (too large) will be refused again: keep the normal pace.
                    let delay =
                        if matches!(e, SourceError::TooLarge { .. }) { self.interval } else { backoff.next_delay() };
                    if !out.error(&e, e.is_timeout()).await {
                        return;
                    }
                    delay
                }
            };
            if !out.sleep(wait).await {
                return;
            }
        }
    }
}

/// A body framed only by the connection's close, whose end cannot be told from a cut.
fn is_close_delimited(headers: &HeaderMap) -> bool {
    let chunked = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().trim_end().ends_with("chunked")));
    !chunked && !headers.contains_key(CONTENT_LENGTH)
}
