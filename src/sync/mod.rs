//! The `sync` role: keeps an app's config file in step with a config API.
//!
//! Per destination, a source task ([`source`]) follows etcd, Consul, an HTTP URL or a file and
//! sends what it sees to a worker ([`worker`]), which coalesces bursts and applies a change:
//! hash compare, validation ([`validate`]), atomic write ([`write`]), history ([`history`]),
//! notification ([`notify`]) and health verification with rollback and escalation
//! ([`verify`]). [`SyncManager`] runs the destinations of one process and answers the admin
//! API; `sidecar sync` runs one destination alone, `sidecar proxy` every `[[sync]]` table of its
//! config file.

pub mod client;
pub mod history;
pub mod notify;
pub mod shell;
pub mod source;
pub mod spec;
pub mod status;
pub mod validate;
pub mod verify;
pub mod worker;
pub mod write;

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::SyncArgs;
use history::{HistoryError, Version};
use source::{Source, SourceError};
use spec::{SpecError, SyncSpec};
use status::DestStatus;
use worker::{RollbackReport, Worker, WorkerCommand};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    File(#[from] crate::config::file::FileError),
    #[error("sync {name}: {source}")]
    History { name: String, source: HistoryError },
    #[error("sync {name}: --require-source: {source}")]
    RequireSource { name: String, source: SourceError },
}

/// One running destination, as the admin API sees it.
struct Destination {
    name: String,
    status: Arc<Mutex<DestStatus>>,
    commands: mpsc::Sender<WorkerCommand>,
}

/// The destinations of this process.
pub struct SyncManager {
    destinations: Vec<Destination>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("no sync destination named `{0}`")]
    UnknownName(String),
    #[error("{0}")]
    Refused(String),
    #[error("the sync worker has stopped (shutting down)")]
    Stopped,
}

impl SyncManager {
    /// The `[[sync]]` tables of the proxy's config file, started; `None` when there are none.
    pub async fn start_from_config_file(
        file: Option<&Path>,
        shutdown: CancellationToken,
    ) -> Result<Option<Arc<SyncManager>>, SyncError> {
        let Some(file) = file else { return Ok(None) };
        let sections = crate::config::file::load_sync_sections(file)?;
        if sections.is_empty() {
            return Ok(None);
        }
        let specs = sections.iter().map(SyncSpec::from_args).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(SyncManager::start(specs, shutdown).await?))
    }

    /// Starts every destination. With `--require-source` the source is read here first, and
    /// an unreadable one fails the start; otherwise the file on disk is kept and the source
    /// retried in the background.
    pub async fn start(specs: Vec<SyncSpec>, shutdown: CancellationToken) -> Result<Arc<SyncManager>, SyncError> {
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
        for (spec, status, worker, source) in prepared {
            let (source_tx, source_rx) = mpsc::channel(16);
            let (command_tx, command_rx) = mpsc::channel(4);
            tracing::info!(
                "sync {}: {} -> {}{}",
                spec.name,
                spec.source,
                spec.dest.display(),
                if spec.dest.exists() { "" } else { " (does not exist yet)" }
            );
            tasks.push(tokio::spawn(source.run(source_tx, shutdown.clone())));
            tasks.push(tokio::spawn(worker.run(source_rx, command_rx, shutdown.clone())));
            destinations.push(Destination { name: spec.name.clone(), status, commands: command_tx });
        }
        Ok(Arc::new(SyncManager { destinations, tasks: Mutex::new(tasks) }))
    }

    pub fn statuses(&self) -> Vec<DestStatus> {
        self.destinations.iter().map(|d| crate::lock(&d.status).clone()).collect()
    }

    pub fn status(&self, name: &str) -> Option<DestStatus> {
        self.destinations.iter().find(|d| d.name == name).map(|d| crate::lock(&d.status).clone())
    }

    pub fn history(&self, name: &str) -> Option<Vec<Version>> {
        self.status(name).map(|s| s.history)
    }

    /// Reasons this process is not ready: destinations never in step with their source.
    pub fn not_ready(&self) -> Vec<String> {
        self.statuses()
            .into_iter()
            .filter(|s| !s.synced_once)
            .map(|s| match &s.last_error {
                Some(e) => format!("sync {} has not synced yet: {e}", s.name),
                None => format!("sync {} has not synced yet", s.name),
            })
            .collect()
    }

    pub async fn rollback(&self, name: &str, selector: Option<String>) -> Result<RollbackReport, RollbackError> {
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
    pub async fn stopped(&self, limit: Duration) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *crate::lock(&self.tasks));
        let _ = tokio::time::timeout(limit, async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
    }
}

/// `sidecar sync`: one destination, until SIGTERM; or `--once`, or `--dry-run`.
pub fn run_sync(args: SyncArgs) -> ExitCode {
    // One destination needs no thread pool: file I/O goes through spawn_blocking.
    let runtime = match crate::cli::current_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let spec = match SyncSpec::from_args(&args) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        };
        if args.dry_run {
            return dry_run(&spec).await;
        }
        if args.once {
            return once(spec).await;
        }
        let shutdown = match crate::shutdown::on_signals() {
            Ok(token) => token,
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                return ExitCode::from(2);
            }
        };
        // Without a handler SIGHUP would end the process; a sync follows its sources anyway.
        if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: nothing to reload (sync follows its sources)");
                }
            });
        }
        let admin = match args.admin {
            Some(addr) => {
                match crate::admin::AdminServer::bind(addr, args.admin_token_file.as_deref(), shutdown.clone()) {
                    Ok(admin) => Some(admin),
                    Err(e) => {
                        tracing::error!("{e}");
                        return ExitCode::from(2);
                    }
                }
            }
            None => None,
        };
        let manager = match SyncManager::start(vec![spec], shutdown.clone()).await {
            Ok(manager) => manager,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        };
        let admin_stop = CancellationToken::new();
        if let Some(mut admin) = admin {
            admin.set_sync(manager.clone());
            tracing::info!("admin API on http://{}", admin.local_addr());
            tokio::spawn(admin.run(admin_stop.clone()));
        }
        shutdown.cancelled().await;
        manager.stopped(Duration::from_secs(5)).await;
        admin_stop.cancel();
        tracing::info!("sync stopped");
        ExitCode::SUCCESS
    })
}

/// `--once`: read the source, apply, exit 0 when the file is in step with it, else 1.
async fn once(spec: SyncSpec) -> ExitCode {
    let spec = Arc::new(spec);
    let status = Arc::new(Mutex::new(DestStatus::new(&spec.name, &spec.dest, spec.source.to_string())));
    let mut worker = match Worker::new(spec.clone(), status) {
        Ok(worker) => worker,
        Err(e) => {
            tracing::error!("sync {}: {e}", spec.name);
            return ExitCode::from(1);
        }
    };
    let fetched = match Source::new(&spec).fetch().await {
        Ok(fetched) => fetched,
        Err(e) => {
            tracing::error!("sync {}: {e}; {} left as it is", spec.name, spec.dest.display());
            return ExitCode::from(1);
        }
    };
    let outcome = worker.apply_once(fetched).await;
    tracing::info!("sync {}: {}", spec.name, outcome.describe());
    if outcome.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `--dry-run`: read the source, check it, print a unified diff against the file on disk.
async fn dry_run(spec: &SyncSpec) -> ExitCode {
    let fetched = match Source::new(spec).fetch().await {
        Ok(fetched) => fetched,
        Err(e) => {
            tracing::error!("sync {}: {e}", spec.name);
            return ExitCode::from(1);
        }
    };
    if let Err(e) = validate::check_content(&fetched.content, spec.validate) {
        tracing::error!("sync {}: the source's version would be refused: {e}", spec.name);
        return ExitCode::from(1);
    }
    if fetched.content.len() as u64 > spec.max_size {
        tracing::error!("sync {}: the source's version would be refused: larger than --max-size", spec.name);
        return ExitCode::from(1);
    }
    let old = std::fs::read(&spec.dest).unwrap_or_default();
    if old == fetched.content {
        println!(
            "{} is in step with {} ({}): nothing would change",
            spec.dest.display(),
            spec.source,
            fetched.revision
        );
        return ExitCode::SUCCESS;
    }
    let old_text = String::from_utf8_lossy(&old);
    let new_text = String::from_utf8_lossy(&fetched.content);
    let diff = similar::TextDiff::from_lines(old_text.as_ref(), new_text.as_ref());
    let dest = spec.dest.display().to_string();
    print!(
        "{}",
        diff.unified_diff().context_radius(3).header(&dest, &format!("{} ({})", spec.source, fetched.revision))
    );
    if !new_text.ends_with('\n') {
        println!();
    }
    ExitCode::SUCCESS
}
