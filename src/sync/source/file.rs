//! A local file, such as a key of a mounted ConfigMap. Its directory is watched (see
//! `file_watch`), and it is also re-read every `--poll-interval`, in case an event is lost.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Backoff, Fetched, Outbox, SourceError, SourceMsg};
use crate::sync::hash::content_hash;
use crate::sync::spec::SyncSpec;
use crate::sys::file_watch::DirectoryWatch;
use crate::sys::{human_duration, parent_dir};

pub(crate) struct FileSource {
    path: PathBuf,
    interval: Duration,
    max_size: u64,
    retry_max: Duration,
}

/// Events in the directory closer together than this become one read.
const SETTLE: Duration = Duration::from_millis(50);

impl FileSource {
    pub(crate) fn new(spec: &SyncSpec, path: &Path) -> FileSource {
        FileSource {
            path: path.to_owned(),
            interval: spec.poll_interval,
            max_size: spec.max_size,
            retry_max: spec.retry_max,
        }
    }

    pub(crate) async fn fetch(&mut self) -> Result<Fetched, SourceError> {
        let path = self.path.clone();
        let max = self.max_size;
        let read = tokio::task::spawn_blocking(move || read_file(&path, max)).await;
        read.unwrap_or_else(|e| Err(SourceError::File { path: self.path.clone(), source: std::io::Error::other(e) }))
    }

    pub(crate) async fn run(mut self, out: Outbox) {
        let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
        let dirs = BTreeSet::from([parent_dir(&self.path)]);
        let names = self.path.file_name().map(|n| BTreeSet::from([n.to_owned()])).unwrap_or_default();
        let every = human_duration(self.interval);
        // Kept alive for the loop; without it, polling alone still works.
        let _watch = match DirectoryWatch::new(dirs, names, move || {
            let _ = events_tx.send(());
        }) {
            Ok((watch, failed)) => {
                for (dir, e) in failed {
                    tracing::warn!(
                        "cannot watch {} ({e}); reading {} every {every}",
                        dir.display(),
                        self.path.display()
                    );
                }
                Some(watch)
            }
            Err(e) => {
                tracing::warn!("cannot watch files ({e}); reading {} every {every}", self.path.display());
                None
            }
        };
        let mut backoff = Backoff::new(self.retry_max);
        let mut last_hash: Option<String> = None;
        loop {
            let wait = match self.fetch().await {
                Ok(fetched) => {
                    backoff.reset();
                    let hash = content_hash(&fetched.content);
                    let msg = if last_hash.as_deref() == Some(hash.as_str()) {
                        SourceMsg::Unchanged
                    } else {
                        SourceMsg::Value(fetched)
                    };
                    last_hash = Some(hash);
                    if !out.send(msg).await {
                        return;
                    }
                    self.interval
                }
                Err(e) => {
                    last_hash = None;
                    if !out.error(&e, false).await {
                        return;
                    }
                    backoff.next_delay().min(self.interval)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Some(()) = events.recv() => {
                    // Let a burst of events (the ..data swap is several) settle, then read once.
                    tokio::time::sleep(SETTLE).await;
                    while events.try_recv().is_ok() {}
                }
                _ = out.shutdown.cancelled() => return,
            }
        }
    }
}

fn read_file(path: &Path, max: u64) -> Result<Fetched, SourceError> {
    let file_error = |source| SourceError::File { path: path.to_owned(), source };
    let metadata = std::fs::metadata(path).map_err(file_error)?;
    if metadata.len() > max {
        return Err(SourceError::FileTooLarge { path: path.to_owned(), limit: max });
    }
    let content = std::fs::read(path).map_err(file_error)?;
    if content.len() as u64 > max {
        return Err(SourceError::FileTooLarge { path: path.to_owned(), limit: max });
    }
    let modified = metadata
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| format!("mtime {}.{:09}", d.as_secs(), d.subsec_nanos()))
        .unwrap_or_else(|| "mtime unknown".into());
    Ok(Fetched { content: Bytes::from(content), revision: modified })
}
