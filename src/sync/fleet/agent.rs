//! The instance's status key: granted a lease, kept alive at a third of its TTL, written again
//! whenever the destination's state changes (and after etcd comes back, the lease was lost,
//! or the key no longer holds what was written), revoked on a clean stop. Rejections that could not be written at once are retried
//! here until etcd takes them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::gateway::{EtcdGateway, GatewayError};
use super::{FleetSpec, InstanceStatus, Keys};
use crate::sync::history::now_rfc3339;
use crate::sync::source::Backoff;
use crate::sync::status::{DestStatus, FleetStatus, SyncState};
use crate::sys::lock;

/// A rejection to write: its key and JSON value.
pub(crate) type PendingWrite = (String, Vec<u8>);

pub(crate) struct StatusPublisher {
    pub(crate) gateway: EtcdGateway,
    pub(crate) spec: Arc<FleetSpec>,
    pub(crate) keys: Keys,
    pub(crate) name: String,
    /// The source as `sidecar fleet rollback` reads it.
    pub(crate) source: String,
    pub(crate) health_checked: bool,
    pub(crate) status: Arc<Mutex<DestStatus>>,
    pub(crate) changed: Arc<Notify>,
    pub(crate) writes: mpsc::UnboundedReceiver<PendingWrite>,
}

/// What the status key says, from the destination's status; `since` is filled by the caller.
fn record(publisher: &StatusPublisher, status: &DestStatus) -> InstanceStatus {
    let state = serde_json::to_value(status.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    // These states are reached only after the app answered its health check (or, for a
    // failure, did not); the others say nothing about it.
    let app_healthy = match status.state {
        _ if !publisher.health_checked => None,
        SyncState::Synced | SyncState::RolledBack | SyncState::WaitingForWave | SyncState::FleetRejected => Some(true),
        SyncState::WaitingForApp | SyncState::Failed => Some(false),
        _ => None,
    };
    InstanceStatus {
        instance: publisher.spec.instance.clone(),
        wave: publisher.spec.wave(),
        applied_hash: status.current_hash.clone(),
        source_revision: status.source_revision.clone(),
        state,
        since: String::new(),
        last_error: status.last_error.clone(),
        app_healthy,
        held_back: status.fleet.as_ref().and_then(|f| f.held_back.clone()),
        source: publisher.source.clone(),
    }
}

impl StatusPublisher {
    fn set(&self, f: impl FnOnce(&mut FleetStatus)) {
        if let Some(fleet) = lock(&self.status).fleet.as_mut() {
            f(fleet);
        }
    }

    /// Logs a failure once (until it changes) and shows it in the status.
    fn failed(&self, error: &GatewayError) {
        let message = format!("fleet {}: {error}", self.spec.url);
        let known = lock(&self.status).fleet.as_ref().and_then(|f| f.etcd_error.clone());
        if known.as_deref() != Some(message.as_str()) {
            tracing::warn!(
                "sync {}: {message}; the status key is written again when etcd answers (local applies go on)",
                self.name
            );
        }
        self.set(|f| {
            f.etcd_error = Some(message);
            f.published = false;
        });
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let ttl = self.spec.lease_ttl;
        let renew_every = (ttl / 3).max(Duration::from_millis(100));
        let mut lease: Option<i64> = None;
        let mut published: Option<InstanceStatus> = None;
        // The last record built, and since when its state and version hold.
        let mut last: Option<InstanceStatus> = None;
        let mut writes: Vec<PendingWrite> = Vec::new();
        let mut backoff = Backoff::new(renew_every);
        let mut renew_at = Instant::now() + renew_every;
        loop {
            let snapshot = record(&self, &lock(&self.status).clone());
            let same_state = last.as_ref().is_some_and(|l| {
                l.state == snapshot.state
                    && l.applied_hash == snapshot.applied_hash
                    && l.held_back == snapshot.held_back
            });
            let since = match &last {
                Some(l) if same_state => l.since.clone(),
                _ => now_rfc3339(),
            };
            let current = InstanceStatus { since, ..snapshot };
            last = Some(current.clone());
            let retry_at = match self.sync_once(&mut lease, &mut published, &current, &mut writes).await {
                Ok(()) => {
                    backoff.reset();
                    None
                }
                Err(e) => {
                    self.failed(&e);
                    Some(Instant::now() + backoff.next_delay())
                }
            };
            tokio::select! {
                _ = self.changed.notified() => {}
                write = self.writes.recv() => match write {
                    Some(write) => writes.push(write),
                    // The worker is gone: so is this destination.
                    None => {
                        self.stop(lease).await;
                        return;
                    }
                },
                _ = sleep_until(retry_at) => {}
                _ = tokio::time::sleep_until(renew_at) => {
                    renew_at = Instant::now() + renew_every;
                    if let Some(id) = lease {
                        match self.gateway.keep_alive(id).await {
                            Ok(true) => {
                                if let Some(status) = &published {
                                    if !self.still_holds(status).await {
                                        published = None;
                                    }
                                }
                            }
                            Ok(false) => {
                                tracing::warn!("sync {}: fleet lease {id:x} expired (etcd unreachable for longer than {}); granting a new one", self.name, humantime::format_duration(ttl));
                                lease = None;
                                published = None;
                            }
                            Err(e) => {
                                self.failed(&e);
                                published = None;
                            }
                        }
                    }
                }
                _ = shutdown.cancelled() => {
                    self.stop(lease).await;
                    return;
                }
            }
        }
    }

    /// Whether etcd still holds `status` as this instance's key. A live lease does not say so:
    /// the key may have been deleted, overwritten by a process with the same --instance, or
    /// etcd restored from a backup taken before the last write.
    async fn still_holds(&mut self, status: &InstanceStatus) -> bool {
        let key = self.keys.instance(&self.spec.instance);
        match self.gateway.get(&key, None).await {
            Ok((Some(kv), _)) if kv.value == serde_json::to_vec(status).unwrap_or_default() => true,
            Ok(_) => {
                tracing::warn!(
                    "sync {}: fleet: {key} no longer holds this instance's status; writing it again",
                    self.name
                );
                false
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    /// Revokes the lease: the status key goes at once rather than after the TTL.
    async fn stop(&mut self, lease: Option<i64>) {
        if let Some(id) = lease {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.gateway.revoke(id)).await;
        }
    }

    /// Writes what is pending and the status when etcd does not hold it yet.
    async fn sync_once(
        &mut self,
        lease: &mut Option<i64>,
        published: &mut Option<InstanceStatus>,
        current: &InstanceStatus,
        writes: &mut Vec<PendingWrite>,
    ) -> Result<(), GatewayError> {
        while let Some((key, value)) = writes.first().cloned() {
            self.gateway.put(&key, &value, None).await?;
            tracing::info!("sync {}: fleet: recorded {key}", self.name);
            writes.remove(0);
        }
        let id = match *lease {
            Some(id) => id,
            None => {
                let id = self.gateway.grant(self.spec.lease_ttl).await?;
                *lease = Some(id);
                *published = None;
                id
            }
        };
        if published.as_ref() == Some(current) {
            return Ok(());
        }
        let value = serde_json::to_vec(current).unwrap_or_default();
        let key = self.keys.instance(&self.spec.instance);
        match self.gateway.put(&key, &value, Some(id)).await {
            Ok(_) => {}
            // Expired while etcd was out of reach: a new lease, then the status again.
            Err(GatewayError::Status { message, .. }) if message.contains("lease not found") => {
                tracing::warn!("sync {}: fleet lease {id:x} expired; granting a new one", self.name);
                let id = self.gateway.grant(self.spec.lease_ttl).await?;
                *lease = Some(id);
                self.gateway.put(&key, &value, Some(id)).await?;
            }
            Err(e) => return Err(e),
        }
        let recovered = lock(&self.status).fleet.as_ref().and_then(|f| f.etcd_error.clone());
        if let Some(error) = recovered {
            tracing::info!("sync {}: fleet etcd answers again (after: {error}); status published", self.name);
        }
        self.set(|f| {
            f.etcd_error = None;
            f.published = true;
        });
        *published = Some(current.clone());
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
