//! Process-wide shutdown: one token, cancelled by SIGTERM or SIGINT, handed to every task.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Spawns a task that cancels the returned token on the first SIGTERM or SIGINT, and exits the
/// process at once on a second one (an operator who presses Ctrl-C twice means it).
pub fn on_signals() -> std::io::Result<CancellationToken> {
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
        tracing::warn!("second signal received: exiting without waiting for the drain");
        std::process::exit(1);
    });
    Ok(token)
}
