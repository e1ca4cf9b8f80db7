//! The keys under a source's prefix, as one value: a sorted map from each key's path below the
//! prefix to its bytes. Its serialisation is deterministic (sorted, length-prefixed), so that
//! the worker compares, keeps in history and rolls back a set exactly as it does one file:
//! through its bytes and their hash.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;

/// The keys below a prefix and their values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeySet {
    pub(crate) keys: BTreeMap<String, Bytes>,
}

/// The first line of a serialised set: what it is, the format's version, then the number of
/// keys (so that a copy cut short between two keys is not taken for a smaller set).
const MAGIC: &[u8] = b"sidecar-keyset 1 ";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeySetError {
    #[error("not a serialised key set (history copy from another kind of destination?)")]
    NotAKeySet,
    #[error("serialised key set cut short or malformed at byte {0}")]
    Malformed(usize),
}

/// Why a key cannot become a file below the destination directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyNameError {
    #[error("key `{}`: an empty name cannot be a file", .0.escape_debug())]
    Empty(String),
    #[error("key `{}`: a NUL byte cannot be in a file name", .0.escape_debug())]
    Nul(String),
    #[error("key `{}`: an absolute path would leave the directory", .0.escape_debug())]
    Absolute(String),
    #[error("key `{}`: an empty path component (`//`, or a `/` at the end)", .0.escape_debug())]
    EmptyComponent(String),
    #[error("key `{}`: a `.` or `..` component would leave or alias the directory", .0.escape_debug())]
    DotComponent(String),
    #[error("key `{}`: names starting with `..` are the directory's own (`..data`)", .0.escape_debug())]
    Reserved(String),
    #[error("key `{}`: a path component longer than 255 bytes", .0.escape_debug())]
    TooLong(String),
    #[error("key `{}` is a file, and key `{}` needs it to be a directory", .0.escape_debug(), .1.escape_debug())]
    FileAndDirectory(String, String),
}

/// The relative path a key's file gets below the destination directory, or why it cannot: an
/// accepted name has only normal components, so its path stays inside the directory.
pub fn key_path(name: &str) -> Result<PathBuf, KeyNameError> {
    let owned = || name.to_owned();
    if name.is_empty() {
        return Err(KeyNameError::Empty(owned()));
    }
    if name.contains('\0') {
        return Err(KeyNameError::Nul(owned()));
    }
    if name.starts_with('/') {
        return Err(KeyNameError::Absolute(owned()));
    }
    let mut path = PathBuf::new();
    for (i, part) in name.split('/').enumerate() {
        match part {
            "" => return Err(KeyNameError::EmptyComponent(owned())),
            "." | ".." => return Err(KeyNameError::DotComponent(owned())),
            // The top level holds `..data`, `..data_tmp` and the timestamped directories.
            _ if i == 0 && part.starts_with("..") => return Err(KeyNameError::Reserved(owned())),
            _ if part.len() > 255 => return Err(KeyNameError::TooLong(owned())),
            _ => path.push(part),
        }
    }
    Ok(path)
}

impl KeySet {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let size = self.keys.iter().map(|(k, v)| k.len() + v.len() + 24).sum::<usize>();
        let mut out = Vec::with_capacity(MAGIC.len() + size);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(format!("{}\n", self.keys.len()).as_bytes());
        for (key, value) in &self.keys {
            out.extend_from_slice(format!("{} {}\n", key.len(), value.len()).as_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(value);
            out.push(b'\n');
        }
        out
    }

    pub(crate) fn decode(data: &[u8]) -> Result<KeySet, KeySetError> {
        let mut rest = data.strip_prefix(MAGIC).ok_or(KeySetError::NotAKeySet)?;
        let eol = rest.iter().position(|b| *b == b'\n').ok_or(KeySetError::Malformed(MAGIC.len()))?;
        let count: usize = std::str::from_utf8(&rest[..eol])
            .ok()
            .filter(|n| !n.starts_with('0') || *n == "0")
            .and_then(|n| n.parse().ok())
            .ok_or(KeySetError::Malformed(MAGIC.len()))?;
        rest = &rest[eol + 1..];
        let mut keys = BTreeMap::new();
        while keys.len() < count {
            let at = data.len() - rest.len();
            let bad = || KeySetError::Malformed(at);
            let eol = rest.iter().position(|b| *b == b'\n').ok_or_else(bad)?;
            let header = std::str::from_utf8(&rest[..eol]).map_err(|_| bad())?;
            let (k, v) = header.split_once(' ').ok_or_else(bad)?;
            let number =
                |s: &str| s.parse::<usize>().ok().filter(|_| !s.starts_with('+') && (s == "0" || !s.starts_with('0')));
            let (k, v) = (number(k).ok_or_else(bad)?, number(v).ok_or_else(bad)?);
            rest = &rest[eol + 1..];
            let end = k.checked_add(v).filter(|end| *end < rest.len()).ok_or_else(bad)?;
            if rest[end] != b'\n' {
                return Err(bad());
            }
            let key = std::str::from_utf8(&rest[..k]).map_err(|_| bad())?.to_owned();
            let value = Bytes::copy_from_slice(&rest[k..end]);
            // Sorted and unique, as `encode` writes them: one set has one serialisation.
            if keys.last_key_value().is_some_and(|(last, _): (&String, _)| *last >= key) {
                return Err(bad());
            }
            keys.insert(key, value);
            rest = &rest[end + 1..];
        }
        if !rest.is_empty() {
            return Err(KeySetError::Malformed(data.len() - rest.len()));
        }
        Ok(KeySet { keys })
    }

    /// Each key's relative path, checked: refused when any name would escape the directory,
    /// or one key's file is where another needs a directory.
    pub(crate) fn paths(&self) -> Result<Vec<(PathBuf, &Bytes)>, KeyNameError> {
        let mut paths = Vec::with_capacity(self.keys.len());
        for (key, value) in &self.keys {
            paths.push((key_path(key)?, value));
        }
        for key in self.keys.keys() {
            let below = format!("{key}/");
            if let Some((other, _)) = self.keys.range(below.clone()..).next().filter(|(k, _)| k.starts_with(&below)) {
                return Err(KeyNameError::FileAndDirectory(key.clone(), other.clone()));
            }
        }
        Ok(paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> KeySet {
        KeySet { keys: pairs.iter().map(|(k, v)| (k.to_string(), Bytes::from(v.to_string()))).collect() }
    }

    #[test]
    fn a_set_round_trips_and_has_one_serialisation() {
        let s = set(&[("db/host", "h\n1"), ("a b", ""), ("x", "3 4\n")]);
        let bytes = s.encode();
        assert_eq!(KeySet::decode(&bytes).unwrap(), s);
        assert_eq!(KeySet::decode(&KeySet::default().encode()).unwrap(), KeySet::default());
        assert_eq!(KeySet::decode(b"{}"), Err(KeySetError::NotAKeySet));
        for cut in MAGIC.len() + 1..bytes.len() {
            assert!(KeySet::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // Out of order: the same set, but not its serialisation.
        let swapped = [MAGIC, b"2\n1 1\nbB\n1 1\naA\n"].concat();
        assert!(KeySet::decode(&swapped).is_err());
    }

    #[test]
    fn key_names_that_would_escape_are_refused() {
        assert_eq!(key_path("db/host").unwrap(), PathBuf::from("db/host"));
        assert_eq!(key_path("a..b/.c/d..").unwrap(), PathBuf::from("a..b/.c/d.."));
        assert_eq!(key_path("x/..data").unwrap(), PathBuf::from("x/..data"));
        for (bad, word) in [
            ("", "empty name"),
            ("../etc/passwd", "`..`"),
            ("a/../../b", "`..`"),
            ("./a", "`.`"),
            ("/etc/passwd", "absolute"),
            ("a//b", "empty path component"),
            ("a/", "empty path component"),
            ("a\0b", "NUL"),
            ("..data", "directory's own"),
        ] {
            let message = key_path(bad).unwrap_err().to_string();
            assert!(message.contains(word) && message.starts_with("key `"), "{bad:?}: {message}");
        }
        let both = set(&[("a", "1"), ("a/b", "2")]).paths().unwrap_err().to_string();
        assert!(both.contains("key `a` is a file") && both.contains("`a/b`"), "{both}");
        assert!(set(&[("a", "1"), ("a.b", "2"), ("ab/c", "3")]).paths().is_ok());
    }
}
