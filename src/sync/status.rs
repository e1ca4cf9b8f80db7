//! What the admin API reports per destination. The worker writes it; readers take a copy.

use serde::Serialize;

use super::history::{now_rfc3339, Version};

/// Where a destination stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum SyncState {
    /// Not read from the source yet.
    Starting,
    /// The file on disk is what the source holds (or what the app last accepted of it).
    Synced,
    /// The source cannot be read; the file on disk is kept.
    NotSynced,
    /// A newer version waits for its slot (--max-apply-rate, --apply-jitter); the file holds
    /// the one before. `pacing.next_apply_at` says when.
    Paced,
    /// A watch or long poll went silent and was reconnected.
    Stalled,
    /// The source's value was refused (empty, too large, invalid, check failed): not written.
    Refused,
    /// The value could not be written (disk full, read-only); retried.
    WriteFailed,
    /// The file is written but the app could not be told (dead pid, reload URL down, the
    /// command failed); retried with backoff until it works or a newer version comes.
    NotifyFailed,
    /// The source's value made the app unhealthy and was rolled back.
    RolledBack,
    /// The app has not been healthy since before the change (not started yet, or down): the
    /// file is kept, not blamed, and the app is probed until it answers.
    WaitingForApp,
    /// Even the last good version left the app unhealthy: it was terminated. The app is
    /// probed until it is healthy again (restarted with the last good file).
    Failed,
    /// With --fleet-waves: a new version waits for this instance's wave; the last good
    /// version stays meanwhile.
    WaitingForWave,
    /// The source's version was rejected by enough instances of the fleet (--fleet-reject-after):
    /// not applied here; the last good version stays.
    FleetRejected,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Counters {
    pub(crate) writes: u64,
    pub(crate) notifications: u64,
    pub(crate) refused: u64,
    pub(crate) rollbacks: u64,
    pub(crate) source_errors: u64,
    /// Times the app was sent SIGTERM (then SIGKILL) after a failed rollback; only signals
    /// that were delivered count.
    pub(crate) kills: u64,
    /// Signals not sent because the pid file named a process that is not the app.
    pub(crate) refused_signals: u64,
    /// Changes that replaced one waiting for its paced apply (--max-apply-rate, --apply-jitter):
    /// never applied themselves, their newest successor was.
    pub(crate) coalesced: u64,
}

/// `--max-apply-rate` and `--apply-jitter` at work.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Pacing {
    /// `N/DURATION`, when a rate is set.
    pub(crate) max_apply_rate: Option<String>,
    pub(crate) apply_jitter: String,
    /// Applies counted in the rate's window when the status last changed.
    pub(crate) applies_in_window: usize,
    /// When the change waiting for its slot will be applied (none waiting: null).
    pub(crate) next_apply_at: Option<String>,
    /// The source revision of that change.
    pub(crate) next_apply_revision: Option<String>,
}

/// This instance in its fleet (`--fleet`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetStatus {
    /// Where the fleet's keys are, without credentials.
    pub(crate) fleet: String,
    pub(crate) instance: String,
    pub(crate) wave: u32,
    /// A newer version from the source that is not applied (yet), and why.
    pub(crate) held_back: Option<String>,
    /// Whether etcd holds this instance's current status.
    pub(crate) published: bool,
    /// The last failure to reach etcd for the fleet's keys; cleared when it answers again.
    pub(crate) etcd_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DestStatus {
    pub(crate) name: String,
    pub(crate) dest: String,
    pub(crate) source: String,
    pub(crate) state: SyncState,
    /// SHA-256 of the file on disk.
    pub(crate) current_hash: Option<String>,
    /// The source's revision of the version on disk.
    pub(crate) source_revision: Option<String>,
    /// Last time the source was read and the file found or made in step with it.
    pub(crate) last_sync: Option<String>,
    /// Last time the file was written.
    pub(crate) last_change: Option<String>,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_time: Option<String>,
    /// Whether the destination has been in step with its source at least once (readiness).
    pub(crate) synced_once: bool,
    /// Hashes not applied again until the source offers something else.
    pub(crate) rejected: Vec<String>,
    pub(crate) counters: Counters,
    /// Present when applies are paced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pacing: Option<Pacing>,
    /// With --fleet: this instance's part in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fleet: Option<FleetStatus>,
    #[serde(skip)]
    pub(crate) history: Vec<Version>,
}

impl DestStatus {
    pub(crate) fn new(name: &str, dest: &std::path::Path, source: String) -> DestStatus {
        DestStatus {
            name: name.to_owned(),
            dest: dest.display().to_string(),
            source,
            state: SyncState::Starting,
            current_hash: None,
            source_revision: None,
            last_sync: None,
            last_change: None,
            last_error: None,
            last_error_time: None,
            synced_once: false,
            rejected: Vec::new(),
            counters: Counters::default(),
            pacing: None,
            fleet: None,
            history: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, state: SyncState, message: String) {
        self.state = state;
        self.last_error = Some(message);
        self.last_error_time = Some(now_rfc3339());
    }

    pub(crate) fn synced(&mut self) {
        self.state = SyncState::Synced;
        self.synced_once = true;
        // In step again: whatever went wrong before is over (its time stays, for the record).
        self.last_error = None;
        self.last_sync = Some(now_rfc3339());
    }
}
