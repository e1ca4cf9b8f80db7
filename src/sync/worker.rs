//! One destination's loop: takes what its source sends, coalesces bursts, and applies a change:
//! compare by hash, validate, write atomically, keep in history, notify, verify, roll back.
//! It owns the history and the notifier, so changes to one destination never interleave.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dest;
use super::fleet::agent::StatusPublisher;
use super::fleet::gate::{self, FleetGate, Gate};
use super::hash::content_hash;
use super::history::{now_rfc3339, History, HistoryError, Version, VersionStatus};
use super::notify::{Notifier, NotifyError};
use super::pace::{rfc3339_at, Pacer};
use super::source::{Backoff, Fetched, SourceMsg};
use super::spec::SyncSpec;
use super::status::{DestStatus, Pacing, SyncState};
use super::validate;
use super::verify::{self, Verifier};
use crate::sys::lock;

/// Requests from the admin API.
pub(crate) enum WorkerCommand {
    Rollback { selector: Option<String>, reply: oneshot::Sender<Result<RollbackReport, RollbackRefused>> },
}

/// Why a rollback asked for through the admin API was not attempted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RollbackRefused {
    #[error("sync {name}: no version `{selector}` in the history")]
    NoSuchVersion { name: String, selector: String },
    #[error("sync {name}: the history holds no earlier good version")]
    NoEarlierGood { name: String },
    #[error(transparent)]
    History(#[from] HistoryError),
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RollbackReport {
    pub(crate) name: String,
    pub(crate) version: Version,
    pub(crate) ok: bool,
    pub(crate) outcome: String,
    pub(crate) state: SyncState,
    /// How long the rollback holds: the source's next different value wins over it.
    pub(crate) held_until: String,
}

/// What one attempt to apply a value did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Already in step: nothing written, nobody signalled.
    Unchanged,
    /// Written (or confirmed), the app notified and, if checked, healthy.
    Applied,
    /// A version rejected earlier, offered again by the source: left alone.
    Skipped,
    Refused(String),
    WriteFailed(String),
    /// Written, but the app could not be told: retried like a failed write.
    NotifyFailed(String),
    /// Written, but the app was not healthy before it either: not blamed, probed until it is.
    WaitingForApp(String),
    RolledBack(String),
    Failed(String),
    /// Not this instance's wave yet (--fleet-waves): tried again then.
    Deferred(Instant, String),
    /// Rejected by the fleet (--fleet-reject-after): not written.
    FleetRejected(String),
}

impl Outcome {
    pub(crate) fn is_success(&self) -> bool {
        matches!(self, Outcome::Unchanged | Outcome::Applied)
    }

    /// Whether the file was written (so the app was, or was to be, reloaded): what the apply
    /// rate counts.
    pub(crate) fn reached_the_app(&self) -> bool {
        !matches!(self, Outcome::Unchanged | Outcome::Skipped | Outcome::Refused(_) | Outcome::WriteFailed(_))
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Outcome::Unchanged => "already in step; nothing written".into(),
            Outcome::Applied => "applied".into(),
            Outcome::Skipped => "a rejected version; not applied again".into(),
            Outcome::Refused(m) => format!("refused: {m}"),
            Outcome::WriteFailed(m) => format!("write failed: {m}"),
            Outcome::NotifyFailed(m) => format!("notification failed: {m}"),
            Outcome::WaitingForApp(m) => format!("waiting for the app: {m}"),
            Outcome::RolledBack(m) => format!("rolled back: {m}"),
            Outcome::Failed(m) => format!("failed: {m}"),
            Outcome::Deferred(_, m) => format!("deferred: {m}"),
            Outcome::FleetRejected(m) => format!("not applied: {m}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Source,
    Rollback,
}

pub(crate) struct Worker {
    spec: Arc<SyncSpec>,
    status: Arc<Mutex<DestStatus>>,
    history: History,
    notifier: Notifier,
    verifier: Verifier,
    /// Hash of the last value refused by the checks: not checked again until it changes.
    refused: Option<(String, String)>,
    /// The newest value from the source.
    latest: Option<Fetched>,
    /// The state to show while the source answers: the result of the last apply.
    settled: SyncState,
    /// Whether a value was applied in this run yet (the first is applied without waiting).
    started: bool,
    /// The version an admin API rollback put in place, until the source replaces it.
    rolled_back_to: Option<u64>,
    /// With --fleet: asked before applying, told of rejections and state changes.
    fleet: Option<FleetGate>,
    fleet_publisher: Option<StatusPublisher>,
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

impl Worker {
    pub(crate) fn new(spec: Arc<SyncSpec>, status: Arc<Mutex<DestStatus>>) -> Result<Worker, HistoryError> {
        let history = History::open(&spec.history_dir, spec.history_keep)?;
        for temp in dest::remove_stale(&spec) {
            tracing::info!("sync {}: removed {}, left by a write that did not finish", spec.name, temp.display());
        }
        let notifier = Notifier::new(&spec.notify, spec.source_auth.ca.as_deref());
        let verifier = Verifier::new(spec.health_url.clone(), spec.health_timeout, spec.source_auth.ca.as_deref());
        let (fleet, fleet_publisher) = gate::attach(&spec, &status).unzip();
        let worker = Worker {
            spec,
            status,
            history,
            notifier,
            verifier,
            refused: None,
            latest: None,
            settled: SyncState::Synced,
            started: false,
            rolled_back_to: None,
            fleet,
            fleet_publisher,
        };
        let current = dest::hash(&worker.spec);
        let applied_revision = worker.history.state.applied_revision.clone();
        let rejected = worker.history.state.rejected.clone();
        let versions = worker.history.versions.clone();
        worker.update(|s| {
            s.current_hash = current;
            s.source_revision = applied_revision;
            s.rejected = rejected;
            s.history = versions;
        });
        Ok(worker)
    }

    fn update(&self, f: impl FnOnce(&mut DestStatus)) {
        f(&mut lock(&self.status));
        // Fleet hook: publish my status.
        if let Some(fleet) = &self.fleet {
            fleet.status_changed();
        }
    }

    /// The task that keeps this instance's status key in etcd (with --fleet), to be spawned.
    pub(crate) fn take_fleet_publisher(&mut self) -> Option<StatusPublisher> {
        self.fleet_publisher.take()
    }

    /// Fleet hook, before a version from the source is written: apply, wait, or not at all.
    async fn fleet_gate(&mut self, hash: &str) -> Option<Outcome> {
        let gate = self.fleet.as_mut()?.may_apply(hash).await;
        match gate {
            Gate::Apply => None,
            Gate::WaitUntil(at, why) => {
                tracing::info!("sync {}: {why}", self.name());
                self.settled = SyncState::WaitingForWave;
                // Ready on the version the app last ran confirmed (after a restart, too); not
                // on a file that is not known to be one.
                let last_good = self.history.state.applied_hash.clone();
                self.update(|s| {
                    s.state = SyncState::WaitingForWave;
                    if last_good.is_some() && s.current_hash == last_good {
                        s.synced_once = true;
                    }
                });
                Some(Outcome::Deferred(at, why))
            }
            Gate::Rejected(why) => {
                tracing::warn!("sync {}: {why}", self.name());
                self.settled = SyncState::FleetRejected;
                self.update(|s| {
                    s.error(SyncState::FleetRejected, why.clone());
                    // Ready on the last good version, when there is one on disk: an instance
                    // that starts with no file has nothing to serve.
                    if s.current_hash.is_some() {
                        s.synced_once = true;
                    }
                });
                Some(Outcome::FleetRejected(why))
            }
        }
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    fn save_state(&mut self) {
        if let Err(e) = self.history.save_state() {
            tracing::error!("sync {}: {e}", self.spec.name);
        }
        let rejected = self.history.state.rejected.clone();
        self.update(|s| s.rejected = rejected);
    }

    fn publish_history(&self) {
        let versions = self.history.versions.clone();
        self.update(|s| s.history = versions);
    }

    pub(crate) async fn run(
        mut self,
        mut source: mpsc::Receiver<SourceMsg>,
        mut commands: mpsc::Receiver<WorkerCommand>,
        shutdown: CancellationToken,
    ) {
        let (min_quiet, max_quiet) = (self.spec.min_quiet, self.spec.max_quiet);
        // A burst: the newest value, when the burst began, when it last changed.
        let mut pending: Option<(Fetched, Instant, Instant)> = None;
        let mut retry: Option<(Fetched, Instant)> = None;
        let mut retry_backoff = Backoff::new(self.spec.retry_max);
        // The app is probed until it answers: with the value to confirm (waiting-for-app), or
        // none (after `failed`, to see the restarted app healthy with the last good file).
        let mut probe: Option<(Option<Fetched>, Instant)> = None;
        let mut probe_backoff = Backoff::new(self.spec.retry_max);
        let mut source_failing: Option<String> = None;
        // A change waiting for the slot --max-apply-rate / --apply-jitter gave it.
        let mut pacer = Pacer::new(self.spec.max_apply_rate, self.spec.apply_jitter);
        // The slot is shown as wall-clock time, fixed when it is given.
        let mut paced: Option<(Fetched, Instant, String)> = None;
        self.show_pacing(&mut pacer, None);
        loop {
            let due = pending.as_ref().map(|(_, first, last)| (*last + min_quiet).min(*first + max_quiet));
            let paced_due = paced.as_ref().map(|(_, at, _)| *at);
            let retry_due = retry.as_ref().map(|(_, at)| *at);
            let probe_due = probe.as_ref().map(|(_, at)| *at);
            let to_apply = tokio::select! {
                msg = source.recv() => {
                    let Some(msg) = msg else { return };
                    if !matches!(msg, SourceMsg::Error { .. }) {
                        if let Some(error) = source_failing.take() {
                            tracing::info!("sync {}: source {} answers again (after: {error})", self.name(), self.spec.source);
                        }
                    }
                    match msg {
                        SourceMsg::Value(fetched) => {
                            self.latest = Some(fetched.clone());
                            retry = None;
                            if !self.started {
                                Some(fetched)
                            } else if let Some((waiting, _, _)) = &mut paced {
                                // Coalesced into the apply already scheduled: the newest wins.
                                if waiting.content != fetched.content {
                                    self.update(|s| s.counters.coalesced += 1);
                                }
                                *waiting = fetched;
                                self.show_pacing(&mut pacer, paced.as_ref());
                                self.source_answers_while_paced();
                                None
                            } else {
                                let now = Instant::now();
                                match &mut pending {
                                    Some((value, _, last)) => {
                                        *value = fetched;
                                        *last = now;
                                    }
                                    None => pending = Some((fetched, now, now)),
                                }
                                None
                            }
                        }
                        SourceMsg::Unchanged => {
                            if pending.is_none() && retry.is_none() && paced.is_none() && self.started {
                                let settled = self.settled;
                                self.update(|s| match settled {
                                    SyncState::Synced => s.synced(),
                                    other => s.state = other,
                                });
                            } else if paced.is_some() {
                                self.source_answers_while_paced();
                            }
                            None
                        }
                        SourceMsg::Refused(message) => {
                            // What the source holds now cannot be made into the destination:
                            // nothing older that was waiting is written either.
                            pending = None;
                            retry = None;
                            // Nor the older one waiting for its slot: the source moved past it.
                            if paced.take().is_some() {
                                self.show_pacing(&mut pacer, None);
                            }
                            self.refuse_unrendered(message);
                            None
                        }
                        SourceMsg::Error { message, stalled } => {
                            if source_failing.as_deref() != Some(message.as_str()) {
                                tracing::warn!("sync {}: {message}; keeping {} as it is and retrying", self.name(), self.spec.dest.display());
                            } else {
                                tracing::debug!("sync {}: still failing: {message}", self.name());
                            }
                            source_failing = Some(message.clone());
                            self.update(|s| {
                                s.counters.source_errors += 1;
                                s.error(if stalled { SyncState::Stalled } else { SyncState::NotSynced }, message);
                            });
                            None
                        }
                    }
                }
                _ = sleep_until(due) => {
                    let value = pending.take().map(|(value, _, _)| value);
                    match value {
                        // What is on disk already needs no slot: the apply finds it in step.
                        Some(value)
                            if pacer.is_active()
                                && dest::hash(&self.spec).as_deref() != Some(&*content_hash(&value.content)) =>
                        {
                            let at = pacer.slot(Instant::now());
                            paced = Some((value, at, rfc3339_at(at)));
                            self.show_pacing(&mut pacer, paced.as_ref());
                            // Not `synced`: the source holds a version the file does not.
                            self.update(|s| s.state = SyncState::Paced);
                            None
                        }
                        other => other,
                    }
                }
                _ = sleep_until(paced_due) => paced.take().map(|(value, _, _)| value),
                _ = sleep_until(retry_due) => retry.take().map(|(value, _)| value),
                _ = sleep_until(probe_due) => {
                    let Some((value, _)) = probe.take() else { continue };
                    if !self.verifier.probe().await {
                        probe = Some((value, Instant::now() + probe_backoff.next_delay()));
                        continue;
                    }
                    match value {
                        Some(value) => Some(value),
                        None => {
                            if !self.recover().await {
                                probe = Some((None, Instant::now() + probe_backoff.next_delay()));
                            }
                            None
                        }
                    }
                }
                Some(command) = commands.recv() => {
                    match command {
                        WorkerCommand::Rollback { selector, reply } => {
                            let report = self.rollback(selector).await;
                            let _ = reply.send(report);
                        }
                    }
                    None
                }
                _ = shutdown.cancelled() => return,
            };
            if let Some(value) = to_apply {
                self.started = true;
                probe = None;
                let outcome = self.apply(value.clone(), Origin::Source).await;
                if outcome.reached_the_app() {
                    pacer.record(Instant::now());
                }
                self.show_pacing(&mut pacer, paced.as_ref());
                match outcome {
                    Outcome::WaitingForApp(_) => {
                        probe = Some((Some(value), Instant::now() + probe_backoff.next_delay()))
                    }
                    Outcome::Failed(_) => probe = Some((None, Instant::now() + probe_backoff.next_delay())),
                    // Asked again at its wave's time, unless a newer value replaces it first.
                    Outcome::Deferred(at, _) => retry = Some((value, at)),
                    // A new value from the source replaces `retry`: a retry never outlives its version.
                    Outcome::WriteFailed(_) | Outcome::NotifyFailed(_) => {
                        retry = Some((value, Instant::now() + retry_backoff.next_delay()))
                    }
                    _ => {
                        retry_backoff.reset();
                        probe_backoff.reset();
                    }
                }
            }
        }
    }

    /// The source answers again while a change waits for its slot: the state says so, not the
    /// source error that came in between (which would stay until the slot otherwise).
    fn source_answers_while_paced(&self) {
        let failing = matches!(lock(&self.status).state, SyncState::NotSynced | SyncState::Stalled);
        if failing {
            self.update(|s| s.state = SyncState::Paced);
        }
    }

    /// The pacing part of the status (nothing when applies are not paced).
    fn show_pacing(&self, pacer: &mut Pacer, waiting: Option<&(Fetched, Instant, String)>) {
        if !pacer.is_active() {
            return;
        }
        let pacing = Pacing {
            max_apply_rate: self.spec.max_apply_rate.map(|r| r.to_string()),
            apply_jitter: humantime::format_duration(self.spec.apply_jitter).to_string(),
            applies_in_window: pacer.in_window(Instant::now()),
            next_apply_at: waiting.map(|(_, _, at)| at.clone()),
            next_apply_revision: waiting.map(|(value, _, _)| value.revision.clone()),
        };
        self.update(|s| s.pacing = Some(pacing));
    }

    /// Applies `value` if it differs from what the app has: the numbered steps of a change.
    pub(crate) async fn apply_once(&mut self, value: Fetched) -> Outcome {
        self.started = true;
        self.latest = Some(value.clone());
        loop {
            match self.apply(value.clone(), Origin::Source).await {
                Outcome::Deferred(at, _) => tokio::time::sleep_until(at).await,
                outcome => return outcome,
            }
        }
    }

    async fn apply(&mut self, value: Fetched, origin: Origin) -> Outcome {
        let hash = content_hash(&value.content);
        if origin == Origin::Source {
            // Fleet hook: a version held back before is no longer what the source offers.
            if let Some(fleet) = &self.fleet {
                fleet.offered(&hash);
            }
            if self.history.state.rejected.contains(&hash) {
                tracing::info!(
                    "sync {}: {} was rejected before; not applied again until the source changes",
                    self.name(),
                    short(&hash)
                );
                // The last good version stays: the destination is as settled as it can be.
                self.settled = SyncState::RolledBack;
                self.update(|s| {
                    s.state = SyncState::RolledBack;
                    s.synced_once = true;
                });
                return Outcome::Skipped;
            }
            if let Some(id) = self.rolled_back_to.take() {
                tracing::warn!(
                    "sync {}: the source offers a new version ({}); it replaces the rollback to version {id} made through the admin API",
                    self.name(),
                    short(&hash)
                );
            }
            if !self.history.state.rejected.is_empty() {
                tracing::info!("sync {}: the source offers a new version; earlier rejections are cleared", self.name());
                self.history.state.rejected.clear();
                self.save_state();
            }
            if let Some((refused_hash, reason)) = &self.refused {
                if *refused_hash == hash {
                    return Outcome::Refused(reason.clone());
                }
            }
        }
        if value.content.len() as u64 > self.spec.max_size {
            return self.refuse(
                &hash,
                format!("{} bytes is more than --max-size ({} bytes)", value.content.len(), self.spec.max_size),
            );
        }
        if let Err(e) = dest::check(&self.spec, &value.content) {
            return self.refuse(&hash, e);
        }

        let dest = self.spec.dest.clone();
        let disk_content = dest::read(&self.spec);
        let disk = disk_content.as_deref().map(content_hash);
        let version_id;
        if disk.as_deref() == Some(hash.as_str()) {
            let applied = self.history.state.applied_hash.clone();
            if applied.is_none() || applied.as_deref() == Some(hash.as_str()) {
                // In step already: a restart with nothing changed ends here, without a signal.
                if self.history.good_with_hash(&hash).is_none() {
                    self.keep_in_history(&value.content, &value.revision, &hash, VersionStatus::Initial);
                }
                if applied.is_none() || self.history.state.applied_revision.as_deref() != Some(value.revision.as_str())
                {
                    self.history.state.applied_hash = Some(hash.clone());
                    self.history.state.applied_revision = Some(value.revision.clone());
                    self.save_state();
                }
                tracing::debug!(
                    "sync {}: {} already holds {}; nothing to do",
                    self.name(),
                    dest.display(),
                    short(&hash)
                );
                self.settled = SyncState::Synced;
                self.refused = None;
                self.update(|s| {
                    s.current_hash = Some(hash.clone());
                    s.source_revision = Some(value.revision.clone());
                    s.synced();
                });
                return Outcome::Unchanged;
            }
            // Written but never confirmed: the sidecar stopped between write and verify.
            tracing::info!(
                "sync {}: {} holds {} but the app was not confirmed to run it; notifying it",
                self.name(),
                dest.display(),
                short(&hash)
            );
            version_id = self.history.versions.iter().rev().find(|v| v.hash == hash).map(|v| v.id);
        } else {
            // What is on disk now is kept as a rollback target before it is replaced.
            if let Some(disk_hash) = &disk {
                if self.history.good_with_hash(disk_hash).is_none() {
                    if let Some(old) = disk_content {
                        let revision =
                            self.history.state.applied_revision.clone().unwrap_or_else(|| "found on disk".into());
                        self.keep_in_history(&old, &revision, disk_hash, VersionStatus::Initial);
                    }
                }
            }
            if origin == Origin::Source {
                if let Some(outcome) = self.fleet_gate(&hash).await {
                    return outcome;
                }
            }
            if let Err(outcome) = self.write(&value.content, &hash).await {
                return outcome;
            }
            tracing::info!(
                "sync {}: wrote {} ({} bytes, sha256 {}, {})",
                self.name(),
                dest.display(),
                value.content.len(),
                short(&hash),
                value.revision
            );
            let revision = value.revision.clone();
            self.update(|s| {
                s.counters.writes += 1;
                s.last_change = Some(now_rfc3339());
                s.current_hash = Some(hash.clone());
                s.source_revision = Some(revision);
            });
            version_id = self.keep_in_history(&value.content, &value.revision, &hash, VersionStatus::Applied);
        }

        // An app that is not healthy before the change cannot show that the change is bad.
        let healthy_before = self.verifier.is_configured() && self.verifier.probe().await;
        let notified = self.notify(&hash).await;
        if self.verifier.is_configured() {
            if let Err(reason) = self.verifier.wait_healthy().await {
                if !healthy_before {
                    return self.wait_for_app(&hash, &value.revision, reason, notified.err());
                }
                return self.roll_back_bad(&hash, version_id, reason).await;
            }
            tracing::info!("sync {}: the app is healthy with {}", self.name(), short(&hash));
        }
        self.refused = None;
        if let Err(e) = notified {
            // Not recorded as applied: the retry (or a restart) finds the file written but
            // unconfirmed and notifies again.
            let message =
                format!("{} holds {} but the app was not notified: {e}; retrying", dest.display(), short(&hash));
            self.settled = SyncState::NotifyFailed;
            self.update(|s| {
                s.source_revision = Some(value.revision.clone());
                s.error(SyncState::NotifyFailed, message.clone());
            });
            return Outcome::NotifyFailed(message);
        }
        self.history.state.applied_hash = Some(hash.clone());
        self.history.state.applied_revision = Some(value.revision.clone());
        self.save_state();
        self.settled = SyncState::Synced;
        self.update(|s| {
            s.synced();
            s.source_revision = Some(value.revision.clone());
        });
        Outcome::Applied
    }

    /// The app was not healthy before this version and is not now: the version is kept (not
    /// recorded as applied, so that it is confirmed when the app answers) and the app probed.
    fn wait_for_app(
        &mut self,
        hash: &str,
        revision: &str,
        reason: String,
        notify_error: Option<NotifyError>,
    ) -> Outcome {
        let not_told = notify_error.map(|e| format!("; it was not notified: {e}")).unwrap_or_default();
        let message = format!(
            "the app is not healthy ({reason}) and was not before {} was written either{not_told}; {} is kept and the app probed until it answers",
            short(hash),
            self.spec.dest.display()
        );
        tracing::warn!("sync {}: {message}", self.name());
        self.settled = SyncState::WaitingForApp;
        let revision = revision.to_owned();
        self.update(|s| {
            s.source_revision = Some(revision);
            s.error(SyncState::WaitingForApp, message.clone());
        });
        Outcome::WaitingForApp(message)
    }

    /// After `failed`: the app answers again (the orchestrator restarted it with the last good
    /// file). Once it stays healthy, the state is what it was before the bad version came.
    async fn recover(&mut self) -> bool {
        if self.verifier.wait_healthy().await.is_err() {
            return false;
        }
        let state = if self.history.state.rejected.is_empty() { SyncState::Synced } else { SyncState::RolledBack };
        tracing::info!("sync {}: the app is healthy again with {}", self.name(), self.spec.dest.display());
        self.settled = state;
        self.update(|s| {
            s.synced();
            s.state = state;
        });
        true
    }

    /// Steps 2–3: candidate file (or directory), `--check-cmd` on it, rename into place.
    async fn write(&mut self, content: &bytes::Bytes, hash: &str) -> Result<(), Outcome> {
        let spec = self.spec.clone();
        let bytes = content.clone();
        let prepared = tokio::task::spawn_blocking(move || dest::prepare(&spec, &bytes)).await;
        let candidate = match prepared {
            Ok(Ok(candidate)) => candidate,
            Ok(Err(e)) => return Err(self.write_failed(e)),
            Err(e) => return Err(self.write_failed(format!("write task failed: {e}"))),
        };
        if let Some(cmd) = self.spec.check_cmd.clone() {
            let path = candidate.path();
            if let Err(e) = validate::run_check(&cmd, &path).await {
                drop(candidate);
                return Err(self.refuse(hash, e.to_string()));
            }
        }
        match tokio::task::spawn_blocking(move || candidate.commit()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.write_failed(e)),
            Err(e) => Err(self.write_failed(format!("write task failed: {e}"))),
        }
    }

    /// The source's value could not be made into the destination (a template that does not
    /// render): shown like a refused version, nothing written.
    fn refuse_unrendered(&mut self, reason: String) {
        let message = format!("refused: {reason}; {} left as it is", self.spec.dest.display());
        let repeated = lock(&self.status).last_error.as_deref() == Some(message.as_str());
        if repeated {
            tracing::debug!("sync {}: still {message}", self.name());
        } else {
            tracing::error!("sync {}: {message}", self.name());
        }
        self.settled = SyncState::Refused;
        self.update(|s| {
            if !repeated {
                s.counters.refused += 1;
            }
            s.error(SyncState::Refused, message.clone());
        });
    }

    fn keep_in_history(&mut self, content: &[u8], revision: &str, hash: &str, status: VersionStatus) -> Option<u64> {
        match self.history.record(content, revision, hash, status) {
            Ok(version) => {
                self.publish_history();
                Some(version.id)
            }
            Err(e) => {
                tracing::warn!("sync {}: {e} (the sync goes on without this history entry)", self.name());
                None
            }
        }
    }

    fn refuse(&mut self, hash: &str, reason: String) -> Outcome {
        let message = format!(
            "refused version {} from {}: {reason}; {} left as it is",
            short(hash),
            self.spec.source,
            self.spec.dest.display()
        );
        tracing::error!("sync {}: {message}", self.name());
        self.refused = Some((hash.to_owned(), message.clone()));
        self.settled = SyncState::Refused;
        self.update(|s| {
            s.counters.refused += 1;
            s.error(SyncState::Refused, message.clone());
        });
        Outcome::Refused(message)
    }

    fn write_failed(&mut self, reason: String) -> Outcome {
        let message = format!("{reason}; the old file is intact, retrying");
        tracing::error!("sync {}: {message}", self.name());
        self.update(|s| s.error(SyncState::WriteFailed, message.clone()));
        Outcome::WriteFailed(message)
    }

    async fn notify(&mut self, hash: &str) -> Result<(), NotifyError> {
        if !self.notifier.is_configured() {
            return Ok(());
        }
        match self.notifier.notify(&self.spec.dest, hash).await {
            Ok(done) => {
                tracing::info!("sync {}: notified the app: {done}", self.name());
                self.update(|s| s.counters.notifications += 1);
                Ok(())
            }
            Err(e) => {
                tracing::error!("sync {}: could not notify the app: {e}", self.name());
                if e.is_not_the_app() {
                    self.update(|s| s.counters.refused_signals += 1);
                }
                Err(e)
            }
        }
    }

    /// Step 6's failure path: back to the last good version, notify, verify; escalate if the
    /// app is still unhealthy.
    async fn roll_back_bad(&mut self, bad: &str, bad_id: Option<u64>, reason: String) -> Outcome {
        tracing::error!("sync {}: the app is not healthy with {} ({reason}); rolling back", self.name(), short(bad));
        // Fleet hook: record my rejection, so that the other instances do not apply it.
        if let Some(fleet) = &mut self.fleet {
            fleet.record_rejection(bad, &reason).await;
        }
        if let Some(id) = bad_id {
            if let Err(e) = self.history.set_status(id, VersionStatus::Rejected) {
                tracing::warn!("sync {}: {e}", self.name());
            }
            self.publish_history();
        }
        if !self.history.state.rejected.iter().any(|h| h == bad) {
            self.history.state.rejected.push(bad.to_owned());
        }
        self.save_state();
        self.update(|s| s.counters.rollbacks += 1);

        let applied = self.history.state.applied_hash.clone().filter(|h| h != bad);
        let good = applied
            .as_deref()
            .and_then(|h| self.history.good_with_hash(h))
            .or_else(|| self.history.previous_good(Some(bad)))
            .cloned();
        let Some(good) = good else {
            let message = format!(
                "the app is not healthy with {} ({reason}), and the history holds no earlier version to roll back to",
                short(bad)
            );
            tracing::error!("sync {}: {message}", self.name());
            self.settled = SyncState::Failed;
            self.update(|s| s.error(SyncState::Failed, message.clone()));
            return Outcome::Failed(message);
        };
        let content = match self.history.content(&good) {
            Ok(content) => content,
            Err(e) => {
                let message = format!("cannot roll back: {e}");
                tracing::error!("sync {}: {message}", self.name());
                self.update(|s| s.error(SyncState::Failed, message.clone()));
                return Outcome::Failed(message);
            }
        };
        let spec = self.spec.clone();
        let written = tokio::task::spawn_blocking(move || dest::prepare(&spec, &content)?.commit()).await;
        if let Some(e) = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(e.to_string()),
        } {
            let message = format!("cannot write back version {}: {e}", good.id);
            tracing::error!("sync {}: {message}", self.name());
            self.update(|s| s.error(SyncState::Failed, message.clone()));
            return Outcome::Failed(message);
        }
        tracing::warn!(
            "sync {}: rolled {} back to version {} (sha256 {}, {})",
            self.name(),
            self.spec.dest.display(),
            good.id,
            short(&good.hash),
            good.revision
        );
        self.update(|s| {
            s.counters.writes += 1;
            s.last_change = Some(now_rfc3339());
            s.current_hash = Some(good.hash.clone());
            s.source_revision = Some(good.revision.clone());
        });
        self.history.state.applied_hash = Some(good.hash.clone());
        self.history.state.applied_revision = Some(good.revision.clone());
        self.save_state();
        let notified = self.notify(&good.hash).await;
        match self.verifier.wait_healthy().await {
            Ok(()) => {
                let message = format!(
                    "version {} made the app unhealthy ({reason}); rolled back to version {} (sha256 {}); it is not applied again until the source changes",
                    short(bad),
                    good.id,
                    short(&good.hash)
                );
                tracing::warn!("sync {}: {message}", self.name());
                self.settled = SyncState::RolledBack;
                self.update(|s| {
                    s.error(SyncState::RolledBack, message.clone());
                    s.synced_once = true;
                });
                Outcome::RolledBack(message)
            }
            Err(still) => {
                let why = match &notified {
                    Err(e) if e.is_no_process() => format!("the app's process is gone ({e})"),
                    _ => format!("still unhealthy after the rollback ({still})"),
                };
                let done = if self.notifier.targets_process() {
                    let escalation =
                        verify::escalate(&self.notifier, self.spec.kill_after, self.spec.notify.kill_ambiguous).await;
                    if escalation.delivered {
                        self.update(|s| s.counters.kills += 1);
                    }
                    escalation.report
                } else {
                    "no process to terminate (give --pid-file or --process-name)".into()
                };
                let message = format!("version {} made the app unhealthy ({reason}); {why}; {done}; the last good version {} is on disk for its restart", short(bad), good.id);
                tracing::error!("sync {}: {message}", self.name());
                self.settled = SyncState::Failed;
                self.update(|s| s.error(SyncState::Failed, message.clone()));
                Outcome::Failed(message)
            }
        }
    }

    /// The admin API's rollback: to `selector` (id or hash prefix) or the previous good
    /// version; written, notified and verified like any change. The source's current value is
    /// set aside so that it does not undo the rollback until the source changes.
    async fn rollback(&mut self, selector: Option<String>) -> Result<RollbackReport, RollbackRefused> {
        let current = dest::hash(&self.spec);
        let version = match &selector {
            Some(s) => self
                .history
                .find(s)
                .cloned()
                .ok_or_else(|| RollbackRefused::NoSuchVersion { name: self.name().to_owned(), selector: s.clone() })?,
            None => self
                .history
                .previous_good(current.as_deref())
                .cloned()
                .ok_or_else(|| RollbackRefused::NoEarlierGood { name: self.name().to_owned() })?,
        };
        let content = self.history.content(&version)?;
        for hash in [self.latest.as_ref().map(|l| content_hash(&l.content)), current].into_iter().flatten() {
            if hash != version.hash && !self.history.state.rejected.contains(&hash) {
                self.history.state.rejected.push(hash);
            }
        }
        self.history.state.rejected.retain(|h| *h != version.hash);
        self.save_state();
        tracing::info!(
            "sync {}: rollback to version {} (sha256 {}) asked for by the admin API",
            self.name(),
            version.id,
            short(&version.hash)
        );
        let revision = format!("rollback to version {} ({})", version.id, version.revision);
        let outcome = self.apply(Fetched { content: content.into(), revision }, Origin::Rollback).await;
        self.rolled_back_to = Some(version.id);
        let state = lock(&self.status).state;
        let held: Vec<&str> = self.history.state.rejected.iter().map(|h| short(h)).collect();
        Ok(RollbackReport {
            name: self.spec.name.clone(),
            version,
            ok: outcome.is_success(),
            outcome: outcome.describe(),
            state,
            held_until: format!("the source offers a value other than {}", held.join(" or ")),
        })
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
