//! Running a user's shell command (`--exec`, `--check-cmd`): bounded in time, killed on drop,
//! its output reduced to one line for logs and the admin API.

use std::time::Duration;

use crate::sys::open_files::started_with_for;

/// Why a command did not succeed.
#[derive(Debug)]
pub(crate) enum ShellFailure {
    Timeout,
    Spawn(std::io::Error),
    Failed { status: String, output: String },
}

/// `sh -c SCRIPT` with `envs`, no stdin; `Ok` when it exits 0 within `timeout`.
pub(crate) async fn run(
    script: &str,
    envs: &[(&str, &std::ffi::OsStr)],
    timeout: Duration,
) -> Result<(), ShellFailure> {
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c").arg(script).stdin(std::process::Stdio::null()).kill_on_drop(true);
    started_with_for(&mut command);
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = match tokio::time::timeout(timeout, command.output()).await {
        Err(_) => return Err(ShellFailure::Timeout),
        Ok(Err(source)) => return Err(ShellFailure::Spawn(source)),
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    Err(ShellFailure::Failed { status: output.status.to_string(), output: one_line_excerpt(&text) })
}

/// At most 300 bytes of `text`, on one line.
pub(crate) fn one_line_excerpt(text: &str) -> String {
    let text = text.trim().replace('\n', "; ");
    if text.len() <= 300 {
        return text;
    }
    let mut end = 300;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
