//! Process-wide shutdown: one token, cancelled by SIGTERM or SIGINT, handed to every task.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::open_files::accept_error_hint;
use crate::metrics::metrics;

/// Spawns a task that cancels the returned token on the first SIGTERM or SIGINT, and calls
/// `on_second` on a second one (an operator who presses Ctrl-C twice means it).
pub(crate) fn on_signals(on_second: impl FnOnce() + Send + 'static) -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("received {name}: shutting down");
        trigger.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        on_second();
    });
    Ok(token)
}

/// The next connection on `listener`, or `None` once `stop` is cancelled. A failed accept (out
/// of file descriptors or similar) is logged, naming the listener `what` and its address, and
/// tried again after a pause instead of spinning; a run of failures is logged every 10 seconds.
pub(crate) async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    metrics().accept_failed();
                    let now = tokio::time::Instant::now();
                    if last_warning.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10)) {
                        last_warning = Some(now);
                        let on = listener.local_addr().map(|a| format!(" on {a}")).unwrap_or_default();
                        match accept_error_hint(&e) {
                            Some(hint) => tracing::warn!("{what}{on}: accept failed: {e}: {hint}"),
                            None => tracing::warn!("{what}{on}: accept failed: {e}"),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.cancelled() => return None,
        }
    }
}
