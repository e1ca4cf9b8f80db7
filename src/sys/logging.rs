//! Log set-up: `tracing` to stderr, filtered by `--log-level` or `RUST_LOG`.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// The filter for `--log-level`. A plain level is the proxy's own; the libraries under it log at
/// most at `info` even so. Their debug output is per frame and per file event (h2, the file
/// watcher), drowns the proxy's own lines, and with the log file in a watched directory (a
/// certificate's) every line written would be another event to log. A directive list is taken
/// as written.
fn directives(level: &str) -> String {
    match level.to_ascii_lowercase().as_str() {
        own @ ("debug" | "trace") => format!("info,sidecar={own}"),
        _ => level.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `RUST_LOG`, when set, wins over `level` so a developer can raise one module's verbosity.
pub(crate) fn init(level: &str, format: LogFormat) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(directives(level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    // A second init (tests that call into the library twice) is harmless: keep the first.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn debug_and_trace_are_the_proxys_own_and_directive_lists_are_kept() {
        assert_eq!(directives("info"), "info");
        assert_eq!(directives("warn"), "warn");
        assert_eq!(directives("debug"), "info,sidecar=debug");
        assert_eq!(directives("TRACE"), "info,sidecar=trace");
        assert_eq!(directives("info,h2=trace"), "info,h2=trace");
    }
}
