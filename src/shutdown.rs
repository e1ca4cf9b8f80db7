//! Process-wide shutdown: one token, cancelled by SIGTERM or SIGINT, handed to every task.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
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

/// The next connection on `listener`, or `None` once `stop` is cancelled. A failed accept (out
/// of file descriptors or similar) is logged, naming the listener `what` if given, and tried
/// again after a pause instead of spinning.
pub async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: Option<&str>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    match what {
                        Some(what) => tracing::warn!("{what}: accept failed: {e}"),
                        None => tracing::warn!("accept failed: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.cancelled() => return None,
        }
    }
}
