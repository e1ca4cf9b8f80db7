//! After the app was told: is it healthy? `--health-url` must answer 2xx without a break for a
//! settle period within `--health-timeout` (a single 2xx could come from the app before it
//! even saw the signal). When even the last good version leaves it unhealthy, escalate:
//! SIGTERM, then SIGKILL after `--kill-after`, so that the orchestrator restarts it (with the
//! last good file on disk).

use std::time::Duration;

use http::{Method, Uri};
use rustix::process::Signal;
use tokio::time::Instant;

use super::client::{self, HttpClient};
use super::notify::Notifier;
use crate::sys::human_duration;

pub(crate) struct Verifier {
    url: Option<Uri>,
    timeout: Duration,
    client: HttpClient,
}

/// The time one health request may take: never less than this, even at the deadline...
const MIN_PROBE: Duration = Duration::from_millis(100);
/// ...and never more than this, however long --health-timeout is.
const MAX_PROBE: Duration = Duration::from_secs(5);

impl Verifier {
    pub(crate) fn new(url: Option<Uri>, timeout: Duration, ca_file: Option<&std::path::Path>) -> Verifier {
        Verifier { url, timeout, client: HttpClient::new(ca_file) }
    }

    pub(crate) fn is_configured(&self) -> bool {
        self.url.is_some()
    }

    /// How long the app must stay healthy: a fifth of the timeout, at most 3 s.
    fn settle(&self) -> Duration {
        (self.timeout / 5).min(Duration::from_secs(3))
    }

    /// One check: whether the app answers 2xx now.
    pub(crate) async fn probe(&mut self) -> bool {
        let Some(url) = self.url.clone() else { return true };
        let budget = self.timeout.clamp(MIN_PROBE, MAX_PROBE);
        matches!(self.client.fetch(client::request(Method::GET, &url, ""), budget, 64 * 1024).await, Ok(r) if r.status.is_success())
    }

    /// `Ok` once healthy for the settle period; `Err(last reason)` at the timeout.
    pub(crate) async fn wait_healthy(&mut self) -> Result<(), String> {
        let Some(url) = self.url.clone() else { return Ok(()) };
        let settle = self.settle();
        let step = (settle / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
        let deadline = Instant::now() + self.timeout;
        let mut healthy_since: Option<Instant> = None;
        let mut last = format!("{url} was not checked");
        // Whether `last` is an answer of the app's (a status), not a failure to get one.
        let mut answered = false;
        loop {
            let now = Instant::now();
            let budget = deadline.saturating_duration_since(now).clamp(MIN_PROBE, MAX_PROBE);
            match self.client.fetch(client::request(Method::GET, &url, ""), budget, 64 * 1024).await {
                Ok(reply) if reply.status.is_success() => {
                    let since = *healthy_since.get_or_insert(now);
                    if Instant::now().duration_since(since) >= settle {
                        return Ok(());
                    }
                }
                Ok(reply) => {
                    healthy_since = None;
                    last = format!("{url} answered {}", reply.status);
                    answered = true;
                }
                Err(e) => {
                    healthy_since = None;
                    // A last probe cut short by the deadline says less than the answer before
                    // it ("answered 503"): keep that one as the reason.
                    let cut_short = e.is_timeout() && budget < self.timeout.clamp(MIN_PROBE, MAX_PROBE);
                    if !(cut_short && answered) {
                        last = e.to_string();
                        answered = false;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(step.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }
}

/// What escalation did, for the log and the status.
pub(crate) struct Escalation {
    pub(crate) report: String,
    /// Whether a SIGTERM or SIGKILL reached the app (what `sync_kills_total` counts).
    pub(crate) delivered: bool,
}

/// SIGTERM to the app, then SIGKILL after `kill_after` if it is still there, both to the
/// processes verified before the SIGTERM. SIGKILL is not sent when `--process-name` matched
/// more than one program, unless `kill_ambiguous`.
pub(crate) async fn escalate(notifier: &Notifier, kill_after: Duration, kill_ambiguous: bool) -> Escalation {
    let not_delivered = |report: String| Escalation { report, delivered: false };
    let targets = match notifier.targets() {
        Ok(targets) if !targets.processes.is_empty() => targets,
        Ok(_) => return not_delivered("no process is named to terminate (--pid-file or --process-name)".into()),
        Err(e) => return not_delivered(format!("nothing to terminate: {e}")),
    };
    if let Err(e) = notifier.signal_targets(&targets, Signal::TERM, "TERM") {
        return not_delivered(format!("SIGTERM failed: {e}"));
    }
    let deadline = Instant::now() + kill_after;
    let alive = || targets.processes.iter().any(|p| p.info.is_running());
    while alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered = |report: String| Escalation { report, delivered: true };
    if !alive() {
        return delivered("sent SIGTERM; the app exited".into());
    }
    let after = human_duration(kill_after);
    if targets.ambiguous && !kill_ambiguous {
        return delivered(format!(
            "sent SIGTERM; still running after {after}, but --process-name matches more than one program, so no SIGKILL (--kill-ambiguous allows it)"
        ));
    }
    match notifier.signal_targets(&targets, Signal::KILL, "KILL") {
        Ok(done) => delivered(format!("sent SIGTERM, and SIGKILL to {done} after {after}")),
        Err(e) => delivered(format!("sent SIGTERM; SIGKILL after {after} failed: {e}")),
    }
}
