//! The optional access log: one line per request, written by its own thread.
//!
//! Requests hand finished lines to a bounded queue and never wait for the disk: when the queue
//! is full (a stalled disk or pipe), the line is dropped and counted
//! (`sidecar_access_log_dropped_total`) rather than slowing the proxy down. On shutdown the
//! server waits for the writer to catch up (`AccessLog::flush`), so that the last requests'
//! lines are not lost with the process.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, StatusCode, Version};

use crate::metrics::metrics;

/// Lines waiting for the writer; beyond this they are dropped.
const QUEUE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogFormat {
    /// Apache/nginx "combined" plus total time, upstream connect and header times (nginx's
    /// `uct`, `uht`), TLS version, ALPN, host and request id.
    Combined,
    /// One JSON object per line.
    Json,
}

/// Where access-log lines go: `off`, `stdout`, `stderr`, or a file appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    Stderr,
    File(PathBuf),
}

pub(crate) fn parse_target(s: &str) -> Result<AccessLogTarget, String> {
    Ok(match s {
        "" => return Err("empty; use off, stdout, stderr or a file path".into()),
        "off" => AccessLogTarget::Off,
        "stdout" | "-" => AccessLogTarget::Stdout,
        "stderr" => AccessLogTarget::Stderr,
        path => AccessLogTarget::File(path.into()),
    })
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AccessLogError {
    #[error("cannot open access log {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot start the access log writer: {0}")]
    Thread(std::io::Error),
}

/// A handle to the writer thread; cloned into every connection.
#[derive(Clone)]
pub(crate) struct AccessLog {
    queue: SyncSender<Queued>,
    format: AccessLogFormat,
}

/// What the writer thread is handed.
enum Queued {
    Line(String),
    /// Answered once everything queued before it is written and flushed.
    Flush(SyncSender<()>),
}

impl AccessLog {
    /// `None` for `off`.
    pub(crate) fn open(target: &AccessLogTarget, format: AccessLogFormat) -> Result<Option<AccessLog>, AccessLogError> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::Stderr => Box::new(std::io::stderr()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open { path: path.clone(), source })?,
            ),
        };
        AccessLog::writing_to(out, format).map(Some)
    }

    /// Starts the writer thread on `out`.
    fn writing_to(out: Box<dyn Write + Send>, format: AccessLogFormat) -> Result<AccessLog, AccessLogError> {
        let (queue, lines) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("sidecar-access-log".into())
            .spawn(move || write_lines(lines, out))
            .map_err(AccessLogError::Thread)?;
        Ok(AccessLog { queue, format })
    }

    /// Blocks until every line queued so far is written, or `limit` has passed; whether it
    /// was. Called once the connections have drained, before the process exits.
    pub(crate) fn flush(&self, limit: Duration) -> bool {
        let (done, written) = sync_channel(1);
        let deadline = Instant::now() + limit;
        let mut message = Queued::Flush(done);
        // The queue may be full (a slow disk): wait for room as long as the limit allows.
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        written.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }
}

/// Writes in batches: everything queued, then one flush.
fn write_lines(lines: Receiver<Queued>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = lines.recv() {
        let mut ok = true;
        let mut flushed = Vec::new();
        for queued in std::iter::once(first).chain(std::iter::from_fn(|| lines.try_recv().ok())) {
            match queued {
                Queued::Line(line) => ok &= out.write_all(line.as_bytes()).is_ok(),
                Queued::Flush(done) => flushed.push(done),
            }
        }
        if !(ok && out.flush().is_ok()) {
            // Reported once per batch; the proxy keeps serving either way.
            tracing::warn!("cannot write the access log; lines are being lost");
        }
        for done in flushed {
            let _ = done.try_send(());
        }
    }
}

/// Per-connection facts an entry needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionFacts {
    pub(crate) client: IpAddr,
    pub(crate) tls_version: &'static str,
    pub(crate) alpn: &'static str,
}

/// An entry begun when a request arrives and written when its response body ends.
pub(crate) struct PendingEntry {
    log: Arc<AccessLog>,
    started: Instant,
    facts: ConnectionFacts,
    method: Method,
    target: String,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    host: Option<String>,
    request_id: Option<String>,
    /// Connecting to the upstream; zero on a pooled connection, `None` when none was used.
    pub(crate) upstream_connect: Option<Duration>,
    pub(crate) status: StatusCode,
    /// Until the upstream's response head arrived; `None` when the proxy answered itself.
    pub(crate) upstream_time: Option<Duration>,
    pub(crate) bytes: u64,
}

impl PendingEntry {
    pub(crate) fn begin<B>(
        log: &Arc<AccessLog>,
        started: Instant,
        facts: ConnectionFacts,
        request: &Request<B>,
    ) -> PendingEntry {
        let headers = request.headers();
        PendingEntry {
            log: log.clone(),
            started,
            facts,
            method: request.method().clone(),
            target: request
                .uri()
                .path_and_query()
                .map_or_else(|| request.uri().to_string(), |pq| pq.as_str().to_owned()),
            version: request.version(),
            referer: headers.get(http::header::REFERER).cloned(),
            user_agent: headers.get(http::header::USER_AGENT).cloned(),
            host: request_host(request),
            request_id: request_id(headers),
            upstream_connect: None,
            status: StatusCode::OK,
            upstream_time: None,
            bytes: 0,
        }
    }

    /// Formats the line and queues it; never waits.
    pub(crate) fn finish(self) {
        let line = match self.log.format {
            AccessLogFormat::Combined => self.combined(),
            AccessLogFormat::Json => self.json(),
        };
        if let Err(TrySendError::Full(_)) = self.log.queue.try_send(Queued::Line(line)) {
            metrics().access_log_dropped();
        }
    }

    fn combined(&self) -> String {
        let text =
            |v: &Option<HeaderValue>| v.as_ref().and_then(|v| v.to_str().ok()).map_or_else(|| "-".to_owned(), escape);
        format!(
            "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" rt={:.3} uct={} uht={} tls={} alpn={} host=\"{}\" rid=\"{}\"\n",
            self.facts.client,
            clf_time(),
            self.method,
            escape(&self.target),
            self.version,
            self.status.as_u16(),
            self.bytes,
            text(&self.referer),
            text(&self.user_agent),
            self.started.elapsed().as_secs_f64(),
            seconds(self.upstream_connect),
            seconds(self.upstream_time),
            self.facts.tls_version,
            self.facts.alpn,
            self.host.as_deref().map_or_else(|| "-".to_owned(), escape),
            self.request_id.as_deref().map_or_else(|| "-".to_owned(), escape),
        )
    }

    fn json(&self) -> String {
        let text = |v: &Option<HeaderValue>| v.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut line = serde_json::json!({
            "time": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "client": self.facts.client.to_string(),
            "method": self.method.as_str(),
            "path": self.target,
            "protocol": format!("{:?}", self.version),
            "status": self.status.as_u16(),
            "bytes": self.bytes,
            "duration_ms": self.started.elapsed().as_secs_f64() * 1000.0,
            "upstream_ms": self.upstream_time.map(|t| t.as_secs_f64() * 1000.0),
            "upstream_connect_ms": self.upstream_connect.map(|t| t.as_secs_f64() * 1000.0),
            "host": self.host,
            "request_id": self.request_id,
            "tls_version": self.facts.tls_version,
            "alpn": self.facts.alpn,
            "referer": text(&self.referer),
            "user_agent": text(&self.user_agent),
        })
        .to_string();
        line.push('\n');
        line
    }
}

/// Seconds with milliseconds, as nginx logs upstream times; `-` for none.
fn seconds(time: Option<Duration>) -> String {
    time.map_or_else(|| "-".to_owned(), |t| format!("{:.3}", t.as_secs_f64()))
}

/// The authority the client asked for: HTTP/2's `:authority`, else the Host field.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    let host = request.uri().authority().map(|a| a.as_str());
    let host = host.or_else(|| request.headers().get(http::header::HOST).and_then(|v| v.to_str().ok()));
    host.map(str::to_owned)
}

/// `X-Request-ID`, else the trace id of a W3C `traceparent` (`00-TRACEID-PARENTID-FLAGS`).
fn request_id(headers: &http::HeaderMap) -> Option<String> {
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        return Some(id.to_owned());
    }
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    let trace_id = traceparent.split('-').nth(1)?;
    let valid = trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| trace_id.to_owned())
}

/// `10/Oct/2000:13:55:36 +0000`, the common log format's time, in UTC.
fn clf_time() -> String {
    static FORMAT: OnceLock<Vec<time::format_description::BorrowedFormatItem<'static>>> = OnceLock::new();
    let format = FORMAT.get_or_init(|| {
        time::format_description::parse_borrowed::<1>("[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000")
            .unwrap_or_default()
    });
    time::OffsetDateTime::now_utc().format(format).unwrap_or_default()
}

/// Quotes and control characters from the client must not break the line's fields.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_would_break_a_combined_line() {
        assert_eq!(escape("/a\"b\\c\nd"), "/a\\\"b\\\\c\\x0ad");
    }

    #[test]
    fn clf_time_has_the_common_log_shape() {
        let t = clf_time();
        assert_eq!(t.len(), "10/Oct/2000:13:55:36 +0000".len(), "{t}");
        assert!(t.ends_with(" +0000"));
    }

    /// A writer as slow as a stalled disk: every write takes a while.
    struct SlowWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for SlowWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(30));
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_returns_once_every_queued_line_is_written() {
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = AccessLog::writing_to(Box::new(SlowWriter(written.clone())), AccessLogFormat::Combined).unwrap();
        // Lines larger than the writer's buffer, so that each one is a slow write.
        let line = format!("{}\n", "x".repeat(70 * 1024));
        for _ in 0..5 {
            log.queue.try_send(Queued::Line(line.clone())).unwrap();
        }
        assert!(log.flush(Duration::from_secs(10)));
        assert_eq!(written.lock().unwrap().len(), 5 * line.len());
    }

    #[test]
    fn flush_gives_up_at_its_limit() {
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = AccessLog::writing_to(Box::new(SlowWriter(written)), AccessLogFormat::Combined).unwrap();
        let line = format!("{}\n", "x".repeat(70 * 1024));
        for _ in 0..20 {
            log.queue.try_send(Queued::Line(line.clone())).unwrap();
        }
        let started = Instant::now();
        assert!(!log.flush(Duration::from_millis(100)));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
