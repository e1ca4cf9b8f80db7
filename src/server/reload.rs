//! Live reload of certificates and the proxy's own config, with no dropped connection.
//!
//! Triggers (a change in a watched directory, SIGHUP) are debounced into one reload. A reload
//! builds complete new snapshots, validates them, and swaps each in with one store; a bad file
//! is refused with an error naming it, and the running snapshot keeps serving.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::live::{LiveState, ServingSnapshot};
use crate::config::ProxyConfig;
use crate::sys::file_watch::DirectoryWatch;
use crate::sys::parent_dir;
use crate::tls::TlsSnapshot;

/// How long a writer gets to finish a multi-file change (certificate, then key) before an
/// invalid state is reported as an error.
const WRITER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a reload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    FileChange,
    Signal,
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::FileChange => "file change",
            Trigger::Signal => "SIGHUP",
            Trigger::Admin => "admin request",
        }
    }
}

/// Reads the proxy's configuration again, as it was first read (flags and environment still win
/// over the `--config` file), when that file changes. The process entry knows how; the server
/// only calls it.
pub(crate) type ConfigSource = Box<dyn Fn() -> Result<ProxyConfig, ConfigSourceError> + Send>;

/// Why the configuration could not be read again; its message names the file and the cause.
pub(crate) type ConfigSourceError = Box<dyn std::error::Error + Send + Sync>;

/// What one reload did, for logs and callers that asked for it.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ReloadOutcome {
    pub(crate) config_changed: bool,
    pub(crate) tls_changed: bool,
    pub(crate) errors: Vec<String>,
}

pub(crate) struct Reloader {
    live: Arc<LiveState>,
    /// Reads the configuration again when the `--config` file changes.
    config_source: Option<ConfigSource>,
    triggers: mpsc::UnboundedSender<Trigger>,
    receiver: mpsc::UnboundedReceiver<Trigger>,
    requests: mpsc::UnboundedSender<oneshot::Sender<ReloadOutcome>>,
    request_receiver: mpsc::UnboundedReceiver<oneshot::Sender<ReloadOutcome>>,
    watch: Option<DirectoryWatch>,
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Reloader {
    /// Starts watching and takes over SIGHUP right away, so that once the proxy says it is
    /// listening no change can slip by unseen. Must be called within the Tokio runtime.
    pub(crate) fn new(live: Arc<LiveState>, config_source: Option<ConfigSource>) -> Reloader {
        let (triggers, receiver) = mpsc::unbounded_channel();
        let (requests, request_receiver) = mpsc::unbounded_channel();
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let mut reloader =
            Reloader { live, config_source, triggers, receiver, requests, request_receiver, watch: None, hangup };
        reloader.rewatch();
        reloader
    }

    /// A handle that asks for a reload and waits for its outcome (the admin API's).
    pub(crate) fn handle(&self) -> ReloadHandle {
        ReloadHandle(self.requests.clone())
    }

    /// Rebuilds both snapshots now. Public so tests and the admin API can drive it directly.
    pub(crate) fn reload(&mut self, trigger: Trigger) -> ReloadOutcome {
        self.reload_attempt(trigger, true)
    }

    /// With `final_attempt` false, a failure is only noted at debug level and not counted:
    /// the caller will try again (a certificate and its key written one after the other).
    fn reload_attempt(&mut self, trigger: Trigger, final_attempt: bool) -> ReloadOutcome {
        let mut outcome = ReloadOutcome::default();
        let running = self.live.serving.load_full();
        let config = match self.reload_config(&running.config) {
            Ok(Some(new)) => {
                outcome.config_changed = true;
                self.live.serving.store(Arc::new(ServingSnapshot::new(new.clone())));
                // Logged after the store: whoever waits for this line finds it in effect.
                if let Some(file) = &new.config_file {
                    tracing::info!(
                        "config reloaded from {} ({}): upstream {}",
                        file.display(),
                        trigger.as_str(),
                        new.upstream
                    );
                }
                self.live.stats.config_ok.fetch_add(1, Ordering::Relaxed);
                new
            }
            Ok(None) => (*running.config).clone(),
            Err(e) if !final_attempt => {
                tracing::debug!("config reload ({}) not valid yet, will look again: {e}", trigger.as_str());
                outcome.errors.push(e.to_string());
                (*running.config).clone()
            }
            Err(e) => {
                let failed = self.live.stats.config_failed.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    "config reload ({}) refused, the running config stays: {e} ({failed} failed config reloads so far)",
                    trigger.as_str()
                );
                outcome.errors.push(e.to_string());
                (*running.config).clone()
            }
        };

        let current_tls = self.live.tls.current();
        match self.live.tls_context.build(&config.tls_inputs()) {
            Ok(new) if new.fingerprint == current_tls.fingerprint => {
                tracing::debug!("certificate files unchanged ({})", trigger.as_str());
            }
            Ok(new) => {
                // Logged after the store: whoever waits for this line finds it in effect.
                let new = self.live.tls.replace(new);
                log_certificates("certificates reloaded", trigger, &new);
                self.live.stats.tls_ok.fetch_add(1, Ordering::Relaxed);
                outcome.tls_changed = true;
            }
            Err(e) if !final_attempt => {
                tracing::debug!("certificate reload ({}) not valid yet, will look again: {e}", trigger.as_str());
                outcome.errors.push(e.to_string());
            }
            Err(e) => {
                let failed = self.live.stats.tls_failed.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    "certificate reload ({}) refused, still serving serial {}: {e} ({failed} failed certificate reloads so far)",
                    trigger.as_str(),
                    current_tls.default.info.serial,
                );
                outcome.errors.push(e.to_string());
            }
        }
        if !outcome.config_changed && !outcome.tls_changed && outcome.errors.is_empty() {
            tracing::debug!("reload ({}): nothing changed", trigger.as_str());
        }
        outcome
    }

    /// `Ok(None)` when there is no config file or it says what is running already.
    fn reload_config(&self, running: &ProxyConfig) -> Result<Option<ProxyConfig>, ConfigSourceError> {
        let (Some(config_source), Some(file)) = (&self.config_source, &running.config_file) else { return Ok(None) };
        let mut new = config_source()?;
        for setting in new.keep_restart_only(running) {
            tracing::warn!(
                "{} changed `{setting}`: that needs a restart; the running value stays, the rest applies",
                file.display()
            );
        }
        if new == *running {
            return Ok(None);
        }
        Ok(Some(new))
    }

    /// Watches the directories holding every input file (see `file_watch`).
    fn rewatch(&mut self) {
        let running = self.live.serving.load();
        let mut files = running.config.tls_inputs().files();
        files.extend(running.config.config_file.clone());
        let dirs: BTreeSet<PathBuf> = files.iter().map(|f| parent_dir(f)).collect();
        let names: BTreeSet<OsString> = files.iter().filter_map(|f| f.file_name().map(OsStr::to_owned)).collect();
        // The names too: a config that renames a file in the same directory keeps the directory.
        if self.watch.as_ref().is_some_and(|w| w.is_for(&dirs, &names)) {
            return;
        }
        let triggers = self.triggers.clone();
        match DirectoryWatch::new(dirs, names, move || {
            let _ = triggers.send(Trigger::FileChange);
        }) {
            Ok((watch, failed)) => {
                for (dir, e) in failed {
                    tracing::error!("cannot watch {} for changes ({e}); reload with SIGHUP instead", dir.display());
                }
                self.watch = Some(watch);
                // A file replaced after the files were last read but before this watch existed
                // was seen by no watch (the old one listened for other names): look once more.
                // A look that finds nothing new changes and counts nothing.
                let _ = self.triggers.send(Trigger::FileChange);
            }
            Err(e) => tracing::error!("cannot watch files for changes ({e}); reload with SIGHUP instead"),
        }
    }

    /// Runs until `shutdown`: watches files and listens for SIGHUP. File changes are
    /// debounced (a burst becomes one reload once quiet); SIGHUP and admin requests, being
    /// explicit, reload at once.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut hangup = self.hangup.take();
        // A file-triggered reload that fails is tried once more after another quiet period
        // before it is reported: writers often replace a certificate and its key one by one.
        let mut due: Option<(tokio::time::Instant, bool)> = None;
        loop {
            let trigger = tokio::select! {
                Some(trigger) = self.receiver.recv() => trigger,
                Some(reply) = self.request_receiver.recv() => {
                    due = None;
                    let _ = reply.send(self.reload(Trigger::Admin));
                    self.rewatch();
                    continue;
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => Trigger::Signal,
                _ = async { match due { Some((at, _)) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                    let final_attempt = due.take().is_some_and(|(_, retry)| retry);
                    let outcome = self.reload_attempt(Trigger::FileChange, final_attempt);
                    if !outcome.errors.is_empty() && !final_attempt {
                        due = Some((tokio::time::Instant::now() + self.debounce().max(WRITER_GRACE), true));
                    }
                    self.rewatch();
                    continue;
                }
                _ = shutdown.cancelled() => return,
            };
            if trigger == Trigger::FileChange {
                due = Some((tokio::time::Instant::now() + self.debounce(), false));
                continue;
            }
            due = None;
            self.reload(trigger);
            self.rewatch();
        }
    }

    fn debounce(&self) -> std::time::Duration {
        self.live.serving.load().config.reload_debounce
    }
}

/// Asks the running reloader for a reload now.
#[derive(Clone)]
pub(crate) struct ReloadHandle(mpsc::UnboundedSender<oneshot::Sender<ReloadOutcome>>);

impl ReloadHandle {
    /// `None` when the reloader has stopped (the process is shutting down).
    pub(crate) async fn reload(&self) -> Option<ReloadOutcome> {
        let (reply, outcome) = oneshot::channel();
        self.0.send(reply).ok()?;
        outcome.await.ok()
    }
}

pub(crate) fn log_certificates(what: &str, trigger: Trigger, snapshot: &TlsSnapshot) {
    for cert in snapshot.certs() {
        tracing::info!("{what} ({}): {} from {}", trigger.as_str(), cert.info, cert.cert_path.display());
    }
}
