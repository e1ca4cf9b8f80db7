//! promtool (Debian's `prometheus` package): the Prometheus project's own reading of a
//! `/metrics` exposition.

use std::io::Write;
use std::process::{Command, Stdio};

/// `promtool check metrics` (the linter, which reads Prometheus text 0.0.4): its findings, one
/// per line, or "" when there are none.
pub fn promtool_check_metrics(exposition: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let findings = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.success(), findings.trim().is_empty(), "promtool: {findings}");
    findings
}

/// Reads `exposition` with Prometheus's OpenMetrics parser (`promtool tsdb create-blocks-from
/// openmetrics`, which wants a timestamp on every sample: one is appended); its error if any.
pub fn promtool_parse_open_metrics(exposition: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let timestamped: String = exposition
        .lines()
        .map(|line| if line.starts_with('#') { format!("{line}\n") } else { format!("{line} 1700000000\n") })
        .collect();
    let input = dir.path().join("metrics.om");
    std::fs::write(&input, timestamped).unwrap();
    let output = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&input)
        .arg(dir.path().join("blocks"))
        .output()
        .expect("start promtool");
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout))
    }
}
