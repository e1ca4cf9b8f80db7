//! Files as config writers and readers see them.

use std::path::Path;
use std::time::{Duration, Instant};

pub fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
}

/// Reads a file as text, "" when it does not exist.
pub fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Writes by rename, as config writers do (so readers never see half a file).
pub fn replace_file(path: &Path, contents: &str) {
    let temp = path.with_extension("writing");
    std::fs::write(&temp, contents).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Waits until `path` holds exactly `contents`.
pub fn wait_for_content(path: &Path, contents: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = read_text(path);
        if now == contents {
            return;
        }
        assert!(Instant::now() < deadline, "{} holds {now:?}, not {contents:?}, after {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}
