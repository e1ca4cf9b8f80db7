//! A local file, such as a key of a mounted ConfigMap. Its directory is watched (see
//! `file_watch`), and it is also re-read every `--poll-interval`, in case an event is lost.
//!
//! A path ending in `/` is a directory whose visible files are the keys of a set (names that
//! start with `..` are the kubelet's `..data` machinery, not keys). A mounted ConfigMap is read
//! through its `..data` symlink, resolved once, so that a swap during the read cannot mix two
//! versions.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Backoff, Fetched, Outbox, SourceError, SourceMsg};
use crate::sync::hash::content_hash;
use crate::sync::keyset::KeySet;
use crate::sync::spec::ends_with_slash;
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
        let read = tokio::task::spawn_blocking(move || {
            if ends_with_slash(&path) {
                read_directory(&path, max)
            } else {
                read_file(&path, max)
            }
        })
        .await;
        read.unwrap_or_else(|e| Err(SourceError::File { path: self.path.clone(), source: std::io::Error::other(e) }))
    }

    pub(crate) async fn run(mut self, out: Outbox) {
        let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
        let every = human_duration(self.interval);
        let on_event = move || {
            let _ = events_tx.send(());
        };
        // Kept alive for the loop; without it, polling alone still works.
        let watch = if ends_with_slash(&self.path) {
            DirectoryWatch::every_name(BTreeSet::from([self.path.clone()]), on_event)
        } else {
            let dirs = BTreeSet::from([parent_dir(&self.path)]);
            let names = self.path.file_name().map(|n| BTreeSet::from([n.to_owned()])).unwrap_or_default();
            DirectoryWatch::new(dirs, names, on_event)
        };
        let _watch = match watch {
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

/// How deep a directory source's subdirectories are read (a symlink loop ends here).
const MAX_DEPTH: usize = 16;

fn read_directory(dir: &Path, max: u64) -> Result<Fetched, SourceError> {
    let file_error = |path: &Path, source| SourceError::File { path: path.to_owned(), source };
    // A ConfigMap: everything from the one timestamped directory `..data` leads to now.
    let (root, revision) = match std::fs::read_link(dir.join("..data")) {
        Ok(target) => (dir.join(&target), format!("..data -> {}", target.display())),
        Err(_) => (dir.to_owned(), String::new()),
    };
    let mut set = KeySet::default();
    let mut total = 0u64;
    let mut newest = std::time::UNIX_EPOCH;
    let mut pending = vec![(root.clone(), String::new(), 0usize)];
    while let Some((at, prefix, depth)) = pending.pop() {
        let entries = std::fs::read_dir(&at).map_err(|e| file_error(&at, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| file_error(&at, e))?;
            let name = entry.file_name();
            if name.as_encoded_bytes().starts_with(b"..") {
                continue;
            }
            let path = entry.path();
            let Some(name) = name.to_str() else {
                return Err(file_error(&path, std::io::Error::other("the file name is not UTF-8")));
            };
            // Symlinks followed: a ConfigMap's visible names are links.
            let metadata = std::fs::metadata(&path).map_err(|e| file_error(&path, e))?;
            let key = format!("{prefix}{name}");
            if metadata.is_dir() {
                if depth + 1 >= MAX_DEPTH {
                    return Err(file_error(
                        &path,
                        std::io::Error::other("directories nested too deep (a symlink loop?)"),
                    ));
                }
                pending.push((path, format!("{key}/"), depth + 1));
                continue;
            }
            newest = newest.max(metadata.modified().unwrap_or(std::time::UNIX_EPOCH));
            total += metadata.len();
            if total > max {
                return Err(SourceError::FileTooLarge { path: dir.to_owned(), limit: max });
            }
            let content = std::fs::read(&path).map_err(|e| file_error(&path, e))?;
            set.keys.insert(key, Bytes::from(content));
        }
    }
    let content = set.encode();
    if content.len() as u64 > max {
        return Err(SourceError::FileTooLarge { path: dir.to_owned(), limit: max });
    }
    let revision = if revision.is_empty() {
        let newest = newest.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        format!("{} files, newest mtime {}.{:09}", set.keys.len(), newest.as_secs(), newest.subsec_nanos())
    } else {
        revision
    };
    Ok(Fetched { content: Bytes::from(content), revision })
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
