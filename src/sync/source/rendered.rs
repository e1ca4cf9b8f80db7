//! `--template`: the keys a prefix source reads, rendered into one file. This wraps the prefix
//! source: each set it sends is rendered, and the template file is watched (and re-read every
//! `--poll-interval`) so that a changed template re-renders the last set. A render that fails
//! (a missing key, a template error, an unreadable template) is sent as refused, naming the
//! template's file and line: nothing is written.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Fetched, Outbox, Source, SourceError, SourceMsg};
use crate::sync::hash::short_hash;
use crate::sync::keyset::KeySet;
use crate::sync::spec::SyncSpec;
use crate::sync::template;
use crate::sys::file_watch::DirectoryWatch;
use crate::sys::parent_dir;

pub(crate) struct RenderedSource {
    inner: Box<Source>,
    template: TemplateFile,
}

/// The template file, re-read every `interval` besides being watched.
struct TemplateFile {
    template: PathBuf,
    interval: Duration,
}

/// Template events closer together than this become one read.
const SETTLE: Duration = Duration::from_millis(50);

impl RenderedSource {
    pub(crate) fn new(spec: &SyncSpec, inner: Source, template: &Path) -> RenderedSource {
        RenderedSource {
            inner: Box::new(inner),
            template: TemplateFile { template: template.to_owned(), interval: spec.poll_interval },
        }
    }

    pub(crate) async fn fetch(&mut self) -> Result<Fetched, SourceError> {
        let set = Box::pin(self.inner.fetch()).await?;
        let text = self.template.read().map_err(SourceError::Render)?;
        render(&self.template.template, &text, &set).map_err(SourceError::Render)
    }

    pub(crate) async fn run(self, out: Outbox) {
        let (tx, mut sets) = mpsc::channel(16);
        let inner_out = Outbox { tx, shutdown: out.shutdown.child_token() };
        // Boxed: a source's future cannot contain itself.
        let inner_run: Pin<Box<dyn Future<Output = ()> + Send>> = self.inner.run_boxed(inner_out);
        let inner_task = tokio::spawn(inner_run);
        self.template.follow(&out, &mut sets).await;
        inner_task.abort();
    }
}

impl TemplateFile {
    fn read(&self) -> Result<String, String> {
        template::read_file(&self.template)
            .map_err(|e| format!("cannot read template {}: {e}", self.template.display()))
    }

    async fn follow(&self, out: &Outbox, sets: &mut mpsc::Receiver<SourceMsg>) {
        let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
        let dirs = BTreeSet::from([parent_dir(&self.template)]);
        let names = self.template.file_name().map(|n| BTreeSet::from([n.to_owned()])).unwrap_or_default();
        let _watch = match DirectoryWatch::new(dirs, names, move || {
            let _ = events_tx.send(());
        }) {
            Ok((watch, _)) => Some(watch),
            Err(e) => {
                tracing::warn!(
                    "cannot watch template {} ({e}); re-reading it every poll interval",
                    self.template.display()
                );
                None
            }
        };
        let mut last_set: Option<Fetched> = None;
        let mut last_text: Option<String> = None;
        loop {
            let rerender = tokio::select! {
                msg = sets.recv() => match msg {
                    None => return,
                    Some(SourceMsg::Value(set)) => {
                        last_set = Some(set);
                        true
                    }
                    Some(other) => {
                        if !out.send(other).await {
                            return;
                        }
                        false
                    }
                },
                Some(()) = events.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while events.try_recv().is_ok() {}
                    false
                }
                _ = tokio::time::sleep(self.interval) => false,
                _ = out.shutdown.cancelled() => return,
            };
            let text = self.read();
            let template_changed = text.as_ref().ok() != last_text.as_ref();
            if !rerender && !template_changed {
                continue;
            }
            // None while unreadable: the template readable again renders again, even unchanged.
            last_text = text.as_ref().ok().cloned();
            let Some(set) = &last_set else { continue };
            if template_changed && !rerender {
                tracing::info!("template {} changed; rendering again", self.template.display());
            }
            let rendered = match text {
                // On a blocking thread: a heavy template (up to its fuel) must not hold up the
                // runtime, which also serves the admin API.
                Ok(text) => {
                    let (path, set) = (self.template.clone(), set.clone());
                    tokio::task::spawn_blocking(move || render(&path, &text, &set))
                        .await
                        .unwrap_or_else(|e| Err(format!("the render task failed: {e}")))
                }
                Err(message) => Err(message),
            };
            let msg = match rendered {
                Ok(fetched) => SourceMsg::Value(fetched),
                Err(message) => SourceMsg::Refused(message),
            };
            if !out.send(msg).await {
                return;
            }
        }
    }
}

/// The set rendered with the template `text` (the file `path`); the revision names the set's
/// and the template's.
fn render(path: &Path, text: &str, set: &Fetched) -> Result<Fetched, String> {
    let keys = KeySet::decode(&set.content).map_err(|e| e.to_string())?;
    let rendered = template::render(&path.display().to_string(), text, &keys).map_err(|e| e.to_string())?;
    Ok(Fetched {
        content: Bytes::from(rendered),
        revision: format!("{}, template {}", set.revision, short_hash(text.as_bytes())),
    })
}
