//! Where a destination's content comes from. Each source can be read once (`fetch`, for
//! `--once`, `--dry-run` and the first read at start) and followed (`run`): a task that sends
//! what it sees to the destination's worker, and retries on its own with capped exponential
//! backoff and jitter.

pub(crate) mod consul;
pub(crate) mod etcd;
pub(crate) mod file;
pub(crate) mod http;
pub(crate) mod rendered;

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::ClientError;
use super::etcd_auth::LoginError;
use super::spec::{Output, SourceSpec, SyncSpec};

/// One read of the source.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub(crate) content: Bytes,
    /// The source's own version: etcd mod_revision, X-Consul-Index, ETag, file mtime.
    pub(crate) revision: String,
}

/// What a running source tells the worker.
#[derive(Debug)]
pub(crate) enum SourceMsg {
    /// A value read from the source (possibly the same as before).
    Value(Fetched),
    /// The source answered and nothing changed (a heartbeat: the destination is in sync).
    Unchanged,
    /// The source could not be read. `stalled`: a watch or long poll that went silent.
    Error { message: String, stalled: bool },
    /// The source was read, but what it holds cannot be made into the destination (a
    /// template that does not render): refused, nothing written.
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SourceError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// etcd's login (`--source-user`) failed.
    #[error(transparent)]
    Login(#[from] LoginError),
    #[error("{peer} answered {status} for {what}")]
    Status { peer: String, what: String, status: ::http::StatusCode },
    /// The source refused our credentials or their rights (401, 403, etcd's auth errors).
    #[error("{peer} refused {what}: {message}")]
    Denied { peer: String, what: String, message: String },
    #[error("{what} does not exist at {peer}")]
    Missing { peer: String, what: String },
    #[error("{what} from {peer} is larger than --max-size ({limit} bytes)")]
    TooLarge { peer: String, what: String, limit: u64 },
    #[error("{peer} sent a malformed answer for {what}: {message}")]
    Protocol { peer: String, what: String, message: String },
    #[error("{peer} sent {what} with neither Content-Length nor chunked encoding: a body cut short cannot be told from a whole one, so it is not used")]
    CloseDelimited { peer: String, what: String },
    #[error("cannot read {}: {source}", path.display())]
    File { path: std::path::PathBuf, source: std::io::Error },
    #[error("{} is larger than --max-size ({limit} bytes)", path.display())]
    FileTooLarge { path: std::path::PathBuf, limit: u64 },
    #[error("{0}")]
    Render(String),
}

impl SourceError {
    pub(crate) fn is_timeout(&self) -> bool {
        match self {
            SourceError::Client(e) => e.is_timeout(),
            SourceError::Login(e) => e.is_timeout(),
            _ => false,
        }
    }
}

/// What a server said in an error body, for a message: one line, short, and without any of
/// `secrets` (a server that echoes the request must not make us log the token).
pub(crate) fn server_says(body: &[u8], secrets: &[&str]) -> String {
    let mut text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect::<String>()
        .trim()
        .to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "[redacted]");
    }
    text
}

/// A configured source.
pub(crate) enum Source {
    // Boxed: the etcd source (login, prefix set, two clients) is the largest by far.
    Etcd(Box<etcd::EtcdSource>),
    Http(http::HttpSource),
    Consul(consul::ConsulSource),
    File(file::FileSource),
    Rendered(rendered::RenderedSource),
}

impl Source {
    pub(crate) fn new(spec: &SyncSpec) -> Source {
        let source = Self::reading(spec);
        match &spec.output {
            Output::Template(template) => Source::Rendered(rendered::RenderedSource::new(spec, source, template)),
            Output::File | Output::Directory => source,
        }
    }

    fn reading(spec: &SyncSpec) -> Source {
        match &spec.source {
            SourceSpec::Etcd { base, key } => Source::Etcd(Box::new(etcd::EtcdSource::new(spec, base, key))),
            SourceSpec::Http { url } => Source::Http(http::HttpSource::new(spec, url)),
            SourceSpec::Consul { base, key, wait, extra_query } => {
                Source::Consul(consul::ConsulSource::new(spec, base, key, *wait, extra_query))
            }
            SourceSpec::File { path } => Source::File(file::FileSource::new(spec, path)),
        }
    }

    pub(crate) async fn fetch(&mut self) -> Result<Fetched, SourceError> {
        match self {
            Source::Etcd(s) => s.fetch().await,
            Source::Http(s) => s.fetch().await,
            Source::Consul(s) => s.fetch().await,
            Source::File(s) => s.fetch().await,
            Source::Rendered(s) => s.fetch().await,
        }
    }

    /// Follows the source until `shutdown`, or until the worker is gone.
    pub(crate) async fn run(self, tx: mpsc::Sender<SourceMsg>, shutdown: CancellationToken) {
        let out = Outbox { tx, shutdown };
        match self {
            Source::Etcd(s) => (*s).run(out).await,
            Source::Http(s) => s.run(out).await,
            Source::Consul(s) => s.run(out).await,
            Source::File(s) => s.run(out).await,
            Source::Rendered(s) => s.run(out).await,
        }
    }

    /// `run`, for a source that runs inside another.
    pub(crate) fn run_boxed(self, out: Outbox) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        match self {
            Source::Etcd(s) => Box::pin((*s).run(out)),
            Source::Http(s) => Box::pin(s.run(out)),
            Source::Consul(s) => Box::pin(s.run(out)),
            Source::File(s) => Box::pin(s.run(out)),
            Source::Rendered(s) => Box::pin(s.run(out)),
        }
    }
}

/// The sending side of a running source, with the shutdown it must obey.
pub(crate) struct Outbox {
    tx: mpsc::Sender<SourceMsg>,
    pub(crate) shutdown: CancellationToken,
}

impl Outbox {
    /// `false` when the source should stop (shutdown, or the worker is gone).
    pub(crate) async fn send(&self, msg: SourceMsg) -> bool {
        tokio::select! {
            sent = self.tx.send(msg) => sent.is_ok(),
            _ = self.shutdown.cancelled() => false,
        }
    }

    pub(crate) async fn error(&self, error: &SourceError, stalled: bool) -> bool {
        self.send(SourceMsg::Error { message: error.to_string(), stalled }).await
    }

    /// Sleeps `d`; `false` when shutdown came first.
    pub(crate) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.shutdown.cancelled() => false,
        }
    }
}

/// Capped exponential backoff with jitter: 200ms, 400ms, … up to `cap`, each drawn uniformly
/// from its upper half so that many sidecars do not retry in step.
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
    seed: u64,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);

    pub(crate) fn new(cap: Duration) -> Backoff {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        Backoff { next: Self::FIRST.min(cap), cap, seed: u64::from(nanos) ^ (u64::from(std::process::id()) << 32) | 1 }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST.min(self.cap);
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        // xorshift64: enough randomness for jitter, no dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let full = self.next;
        self.next = (self.next * 2).min(self.cap);
        let half = full / 2;
        half + Duration::from_nanos(self.seed % (half.as_nanos() as u64).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)), "{delays:?}");
        assert!(delays[7] >= Duration::from_secs(1), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }
}
