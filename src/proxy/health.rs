//! Whether the app can take requests, for readiness: checked in the background about once a
//! second (a connection, TCP or Unix socket, or `GET --upstream-health-path` answered 2xx), so that a probe
//! costs the app nothing and gets a cached answer. One failed check is not enough: an app that
//! drops one connection stays ready until the next check fails too.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::http2;
use super::stream::UpstreamStream;
use super::upstream::describe_io;
use crate::config::{ProxyConfig, UpstreamProtocol};

/// Time between two checks.
const INTERVAL: Duration = Duration::from_secs(1);

/// Checks that must fail in a row before the app counts as down.
const FAILURES_TO_DOWN: u32 = 2;

/// The most a first answer to `/readyz` waits for the first check.
const FIRST_CHECK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Unchecked,
    Up,
    Down(String),
}

/// The app's health as last checked.
pub(crate) struct UpstreamHealth {
    state: watch::Sender<Health>,
}

impl Default for UpstreamHealth {
    fn default() -> UpstreamHealth {
        UpstreamHealth { state: watch::Sender::new(Health::Unchecked) }
    }
}

impl UpstreamHealth {
    /// `Err(reason)` while the app is down. Before the first check has ended it waits for it.
    pub(crate) async fn status(&self) -> Result<(), String> {
        let mut seen = self.state.subscribe();
        let checked = tokio::time::timeout(FIRST_CHECK_WAIT, seen.wait_for(|h| *h != Health::Unchecked)).await;
        let current = match checked {
            Ok(Ok(health)) => health.clone(),
            _ => return Err("the upstream has not been checked yet".to_owned()),
        };
        match current {
            Health::Down(reason) => Err(reason),
            _ => Ok(()),
        }
    }

    /// Checks the app with the config `current` returns, until `stop`.
    pub(crate) async fn run(self: Arc<Self>, current: impl Fn() -> Arc<ProxyConfig>, stop: CancellationToken) {
        let mut failures = 0;
        loop {
            let config = current();
            match check(&config).await {
                Ok(()) => {
                    failures = 0;
                    if *self.state.borrow() != Health::Up {
                        tracing::info!("upstream {} is up: ready", config.upstream);
                    }
                    self.state.send_replace(Health::Up);
                }
                Err(reason) => {
                    failures += 1;
                    let down = failures >= FAILURES_TO_DOWN || *self.state.borrow() == Health::Unchecked;
                    if down {
                        let reason = format!("upstream {}: {reason}", config.upstream);
                        if !matches!(*self.state.borrow(), Health::Down(_)) {
                            tracing::warn!("{reason}: not ready");
                        }
                        self.state.send_replace(Health::Down(reason));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// One check, bounded by `--upstream-connect-timeout`.
async fn check(config: &ProxyConfig) -> Result<(), String> {
    let limit = config.timeouts.upstream_connect;
    let work = async {
        let mut tcp = UpstreamStream::connect(config.upstream.address(), limit)
            .await
            .map_err(|e| format!("cannot connect: {}", e.describe()))?;
        let Some(path) = &config.upstream_policy.health_path else { return Ok(()) };
        let host = config.upstream.host_header();
        if config.upstream.protocol() == UpstreamProtocol::H2c {
            return http2::probe(tcp, path, host).await;
        }
        let host = String::from_utf8_lossy(host.as_bytes());
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: sidecar-readiness\r\nconnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.map_err(|e| format!("GET {path}: {}", describe_io(&e)))?;
        // The status line is all a check needs.
        let mut head = Vec::with_capacity(256);
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let mut chunk = [0u8; 256];
            match tcp.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("GET {path}: {}", describe_io(&e))),
            }
        }
        let line = String::from_utf8_lossy(&head);
        let status = line.split(' ').nth(1).and_then(|code| code.parse::<u16>().ok());
        match status {
            Some(code) if (200..300).contains(&code) => Ok(()),
            Some(code) => Err(format!("GET {path} answered {code}")),
            None => Err(format!("GET {path} got no HTTP response")),
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("no answer within {}", humantime::format_duration(limit)))?
}
