//! The `sync` role: keeps an app's config file in step with a config API.
//!
//! Per destination, a source task ([`source`]) follows etcd, Consul, an HTTP URL or a file and
//! sends what it sees to a worker ([`worker`]), which coalesces bursts and applies a change:
//! hash compare, validation ([`validate`]), atomic write ([`write`]), history ([`history`]),
//! notification ([`notify`]) and health verification with rollback and escalation
//! ([`verify`]). [`SyncManager`] runs the destinations of one process and answers the admin
//! API. This is the engine only: `app` runs it, one destination alone for `sidecar sync`, every
//! `[[sync]]` table of the config file beside `sidecar proxy`.

pub(crate) mod client;
pub(crate) mod dest;
pub(crate) mod etcd_auth;
pub mod fleet;
pub mod hash;
pub(crate) mod history;
pub(crate) mod keyset;
mod notify;
mod pace;
mod process;
mod shell;
pub(crate) mod source;
pub mod spec;
pub(crate) mod status;
pub(crate) mod template;
pub(crate) mod validate;
mod verify;
pub(crate) mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sys::lock;
use history::{HistoryError, Version};
use source::{Source, SourceError};
use spec::{SpecError, SyncSpec};
use status::DestStatus;
use worker::{RollbackRefused, RollbackReport, Worker, WorkerCommand};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("sync {name}: {source}")]
    History { name: String, source: HistoryError },
    #[error("sync {name}: --require-source: {source}")]
    RequireSource { name: String, source: SourceError },
}

/// One running destination, as the admin API sees it.
struct Destination {
    name: String,
    fleet: Option<fleet::FleetSpec>,
    status: Arc<Mutex<DestStatus>>,
    commands: mpsc::Sender<WorkerCommand>,
}

/// The destinations of this process.
pub(crate) struct SyncManager {
    destinations: Vec<Destination>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RollbackError {
    #[error("no sync destination named `{0}`")]
    UnknownName(String),
    #[error(transparent)]
    Refused(#[from] RollbackRefused),
    #[error("the sync worker has stopped (shutting down)")]
    Stopped,
}

impl SyncManager {
    /// Starts every destination. With `--require-source` the source is read here first, and
    /// an unreadable one fails the start; otherwise the file on disk is kept and the source
    /// retried in the background.
    pub(crate) async fn start(
        specs: Vec<SyncSpec>,
        shutdown: CancellationToken,
    ) -> Result<Arc<SyncManager>, SyncError> {
        spec::check_unique(&specs)?;
        let mut prepared = Vec::new();
        for spec in specs {
            let spec = Arc::new(spec);
            let status = Arc::new(Mutex::new(DestStatus::new(&spec.name, &spec.dest, spec.source.to_string())));
            let mut worker = Worker::new(spec.clone(), status.clone())
                .map_err(|source| SyncError::History { name: spec.name.clone(), source })?;
            let mut source = Source::new(&spec);
            if spec.require_source {
                let fetched = source
                    .fetch()
                    .await
                    .map_err(|source| SyncError::RequireSource { name: spec.name.clone(), source })?;
                worker.apply_once(fetched).await;
            }
            prepared.push((spec, status, worker, source));
        }
        let mut destinations = Vec::new();
        let mut tasks = Vec::new();
        for (spec, status, mut worker, source) in prepared {
            let (source_tx, source_rx) = mpsc::channel(16);
            let (command_tx, command_rx) = mpsc::channel(4);
            tracing::info!(
                "sync {}: {}{} -> {}{}",
                spec.name,
                spec.source,
                spec.source_auth.describe().map(|a| format!(" ({a})")).unwrap_or_default(),
                spec.dest.display(),
                if spec.dest.exists() { "" } else { " (does not exist yet)" }
            );
            if spec.source_auth.sent_in_clear(&spec.source) {
                tracing::warn!(
                    "sync {}: credentials go to {} over plain HTTP and can be read on the network; use TLS (etcd+https://, consul+https://, https://)",
                    spec.name,
                    spec.source
                );
            }
            if let Some(publisher) = worker.take_fleet_publisher() {
                if let Some(fleet) = &spec.fleet {
                    tracing::info!(
                        "sync {}: fleet {}{} as instance {} (wave {} of {})",
                        spec.name,
                        fleet.url,
                        fleet.gateway.auth.describe().map(|a| format!(" ({a})")).unwrap_or_default(),
                        fleet.instance,
                        fleet.wave(),
                        fleet.waves
                    );
                }
                if let Some(fleet) = spec.fleet.as_ref().filter(|f| f.sends_password_in_clear()) {
                    tracing::warn!(
                        "sync {}: the fleet's etcd password goes to {} over plain HTTP and can be read on the network; use etcd+https://",
                        spec.name,
                        fleet.url
                    );
                }
                tasks.push(tokio::spawn(publisher.run(shutdown.clone())));
            }
            tasks.push(tokio::spawn(source.run(source_tx, shutdown.clone())));
            tasks.push(tokio::spawn(worker.run(source_rx, command_rx, shutdown.clone())));
            destinations.push(Destination {
                name: spec.name.clone(),
                fleet: spec.fleet.clone(),
                status,
                commands: command_tx,
            });
        }
        Ok(Arc::new(SyncManager { destinations, tasks: Mutex::new(tasks) }))
    }

    pub(crate) fn statuses(&self) -> Vec<DestStatus> {
        self.destinations.iter().map(|d| lock(&d.status).clone()).collect()
    }

    pub(crate) fn status(&self, name: &str) -> Option<DestStatus> {
        self.destinations.iter().find(|d| d.name == name).map(|d| lock(&d.status).clone())
    }

    pub(crate) fn history(&self, name: &str) -> Option<Vec<Version>> {
        self.status(name).map(|s| s.history)
    }

    /// `GET /sync/{name}/fleet`: this instance's part and the fleet as etcd holds it now.
    /// `None` for an unknown name; `Err(None)` without --fleet.
    pub(crate) async fn fleet_view(&self, name: &str) -> Option<Result<serde_json::Value, Option<String>>> {
        let destination = self.destinations.iter().find(|d| d.name == name)?;
        let Some(spec) = &destination.fleet else { return Some(Err(None)) };
        let local = lock(&destination.status).fleet.clone();
        let view = match fleet::read_view(&spec.url, &spec.gateway, Some(name)).await {
            Ok(views) => views.into_iter().next(),
            Err(e) => return Some(Err(Some(format!("fleet {}: {e}", spec.url)))),
        };
        let (instances, rejected) = view.map(|v| (v.instances, v.rejected)).unwrap_or_default();
        Some(Ok(serde_json::json!({
            "name": name,
            "fleet": spec.url.to_string(),
            "instance": spec.instance,
            "wave": spec.wave(),
            "waves": spec.waves,
            "reject_after": spec.reject_after,
            "local": local,
            "instances": instances,
            "rejected": rejected,
        })))
    }

    /// Reasons this process is not ready: destinations never in step with their source.
    pub(crate) fn not_ready(&self) -> Vec<String> {
        self.statuses()
            .into_iter()
            .filter(|s| !s.synced_once)
            .map(|s| match &s.last_error {
                Some(e) => format!("sync {} has not synced yet: {e}", s.name),
                None => format!("sync {} has not synced yet", s.name),
            })
            .collect()
    }

    pub(crate) async fn rollback(&self, name: &str, selector: Option<String>) -> Result<RollbackReport, RollbackError> {
        let destination = self
            .destinations
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| RollbackError::UnknownName(name.to_owned()))?;
        let (reply, answer) = oneshot::channel();
        destination
            .commands
            .send(WorkerCommand::Rollback { selector, reply })
            .await
            .map_err(|_| RollbackError::Stopped)?;
        answer.await.map_err(|_| RollbackError::Stopped)?.map_err(RollbackError::Refused)
    }

    /// Waits (at most `limit`) for the tasks to end after shutdown.
    pub(crate) async fn stopped(&self, limit: Duration) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.tasks));
        let _ = tokio::time::timeout(limit, async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
    }
}
