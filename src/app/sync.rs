//! `sidecar sync`: one destination kept in step with its source until SIGTERM; or `--once`
//! (an init container), or `--dry-run` (a diff on stdout).

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::output::say;
use super::{current_thread_runtime, shutdown_on_signals};
use crate::admin::AdminServer;
use crate::cli::SyncArgs;
use crate::sync::dest;
use crate::sync::keyset::KeySet;
use crate::sync::source::Source;
use crate::sync::spec::{Output, SyncSpec};
use crate::sync::status::DestStatus;
use crate::sync::worker::Worker;
use crate::sync::SyncManager;

/// `sidecar sync`: one destination, until SIGTERM; or `--once`, or `--dry-run`.
pub(super) fn run(args: SyncArgs) -> ExitCode {
    // One destination needs no thread pool: file I/O goes through spawn_blocking.
    let runtime = match current_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let spec = match args.to_spec() {
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
        let shutdown = match shutdown_on_signals() {
            Ok(token) => token,
            Err(code) => return code,
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
            Some(addr) => match AdminServer::bind(addr, args.admin_token_file.as_deref(), shutdown.clone()) {
                Ok(admin) => Some(admin),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            },
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
    if let Err(e) = dest::check(spec, &fetched.content) {
        tracing::error!("sync {}: the source's version would be refused: {e}", spec.name);
        return ExitCode::from(1);
    }
    if fetched.content.len() as u64 > spec.max_size {
        tracing::error!("sync {}: the source's version would be refused: larger than --max-size", spec.name);
        return ExitCode::from(1);
    }
    let old = dest::read(spec).unwrap_or_default();
    if old == fetched.content {
        say(format_args!(
            "{} is in step with {} ({}): nothing would change",
            spec.dest.display(),
            spec.source,
            fetched.revision
        ));
        return ExitCode::SUCCESS;
    }
    let source = format!("{} ({})", spec.source, fetched.revision);
    let diff = if spec.output == Output::Directory {
        // One diff per file of the set; a file not there is empty on that side.
        let old = KeySet::decode(&old).unwrap_or_default();
        let new = KeySet::decode(&fetched.content).unwrap_or_default();
        let mut names: Vec<&String> = old.keys.keys().chain(new.keys.keys()).collect();
        names.sort();
        names.dedup();
        let mut out = String::new();
        for name in names {
            let (a, b) = (old.keys.get(name), new.keys.get(name));
            if a != b {
                let file = spec.dest.join(name).display().to_string();
                out.push_str(&unified(
                    a.map_or(&[][..], |v| v),
                    b.map_or(&[][..], |v| v),
                    &file,
                    &format!("{source} {name}"),
                ));
            }
        }
        out
    } else {
        unified(&old, &fetched.content, &spec.dest.display().to_string(), &source)
    };
    // `say` ends the line.
    say(diff.strip_suffix('\n').unwrap_or(&diff));
    ExitCode::SUCCESS
}

fn unified(old: &[u8], new: &[u8], old_name: &str, new_name: &str) -> String {
    let old_text = String::from_utf8_lossy(old);
    let new_text = String::from_utf8_lossy(new);
    let diff = similar::TextDiff::from_lines(old_text.as_ref(), new_text.as_ref());
    diff.unified_diff().context_radius(3).header(old_name, new_name).to_string()
}
