//! Headless Chromium (Debian's `chromium`), as a browser on this machine would load a page: it
//! verifies certificates against its NSS database under $HOME, so what `sidecar cert --install`
//! did is what it sees.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::output_within;

/// A page load is seconds; a first start on a busy machine, more.
const CHROMIUM_LIMIT: Duration = Duration::from_secs(90);

/// Loads `url` with `home` as $HOME and a new profile, after writing a screenshot of it to
/// `screenshot`: (the page's DOM, empty when the page did not load; Chromium's log, which names
/// the network error, such as net::ERR_CERT_AUTHORITY_INVALID).
pub fn chromium_load(home: &Path, url: &str, screenshot: &Path) -> (String, String) {
    let run = |action: &str| {
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("chromium");
        cmd.env("HOME", home)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=800,600",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(action)
            .arg(url);
        let output = output_within(cmd, CHROMIUM_LIMIT);
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "chromium {action} {url}: {stderr}\n{stdout}");
        (stdout.into_owned(), stderr.into_owned())
    };
    let _ = std::fs::remove_file(screenshot);
    run(&format!("--screenshot={}", screenshot.display()));
    match screenshot.exists() {
        true => eprintln!("chromium's screenshot of {url}: {}", screenshot.display()),
        false => eprintln!("chromium took no screenshot of {url} (the page did not load)"),
    }
    run("--dump-dom")
}
