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

/// A directory laid out as kubelet mounts a Secret: `NAME -> ..data/NAME`, `..data -> ..VERSION`;
/// `set` swaps in a new version the way kubelet does (a new directory, then a rename of a new
/// `..data` symlink over the old one), so a reader sees the old file or the new one, never a mix.
pub struct MountedSecret {
    pub dir: tempfile::TempDir,
    version: u32,
}

impl MountedSecret {
    pub fn new() -> MountedSecret {
        MountedSecret { dir: tempfile::tempdir().unwrap(), version: 0 }
    }

    /// The stable path of `name` (a symlink through `..data`).
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// A new version of the mount holding `name` with `contents` (and nothing else).
    pub fn set(&mut self, name: &str, contents: &str) {
        self.version += 1;
        let mount = self.dir.path();
        let version = format!("..v{}", self.version);
        std::fs::create_dir(mount.join(&version)).unwrap();
        std::fs::write(mount.join(&version).join(name), contents).unwrap();
        std::os::unix::fs::symlink(&version, mount.join("..data_tmp")).unwrap();
        std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        if !mount.join(name).exists() {
            std::os::unix::fs::symlink(format!("..data/{name}"), mount.join(name)).unwrap();
        }
        if self.version > 1 {
            let _ = std::fs::remove_dir_all(mount.join(format!("..v{}", self.version - 1)));
        }
    }
}
