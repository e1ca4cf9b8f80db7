//! Key names under a prefix as the files of a `--dest DIR/` (`keyset::key_path`, `KeySet::paths`)
//! and a set's serialisation as history keeps it (`KeySet::encode` / `decode`).
//!
//! Input: key names, one per line (a line `name=value` gives the key a value). Invariants:
//! - a name is refused exactly when it is empty, holds NUL, starts with `/`, has an empty, `.`
//!   or `..` component or one longer than 255 bytes, or its first component starts with `..`
//!   (the directory's own `..data`); the message names the key;
//! - an accepted name maps to a relative path of plain components, the name's own, which stays
//!   inside any directory it is joined to;
//! - a set is refused exactly when one of its names is, or one key is a file where another
//!   needs a directory; an accepted set gives one path per key;
//! - a set's serialisation reads back as the same set, and any strict prefix of it is refused.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{decode_key_set, encode_key_set, key_file_path, key_set_paths};

/// Whether `name` has a part that would leave or alias the directory, written independently
/// of the code under test.
fn escapes(name: &str) -> bool {
    name.is_empty()
        || name.contains('\0')
        || name.starts_with('/')
        || name.split('/').any(|c| c.is_empty() || c == "." || c == ".." || c.len() > 255)
        || name.split('/').next().is_some_and(|first| first.starts_with(".."))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut pairs: Vec<(String, Vec<u8>)> = Vec::new();
    for line in text.split('\n') {
        let (name, value) = line.split_once('=').unwrap_or((line, ""));
        match key_file_path(name) {
            Ok(path) => {
                assert!(!escapes(name), "{name:?} accepted as {path:?}");
                assert!(path.is_relative(), "{name:?} -> {path:?}");
                assert!(path.components().all(|c| matches!(c, Component::Normal(_))), "{name:?} -> {path:?}");
                assert_eq!(path.to_str(), Some(name), "the path is the name's own");
                let base = Path::new("/srv/conf.d");
                assert!(base.join(&path).starts_with(base));
            }
            Err(refused) => {
                assert!(escapes(name), "{name:?} refused: {}", refused.message);
                assert!(refused.message.starts_with("key `"), "the message names the key: {}", refused.message);
            }
        }
        pairs.push((name.to_owned(), value.as_bytes().to_vec()));
    }

    let unique: BTreeMap<&str, &[u8]> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let clash = unique.keys().any(|a| unique.keys().any(|b| b.len() > a.len() && b.starts_with(a) && b.as_bytes()[a.len()] == b'/'));
    match key_set_paths(&pairs) {
        Ok(paths) => {
            assert!(!unique.keys().any(|k| escapes(k)) && !clash, "{pairs:?} accepted");
            assert_eq!(paths.len(), unique.len());
        }
        Err(refused) => {
            assert!(unique.keys().any(|k| escapes(k)) || clash, "{pairs:?} refused: {}", refused.message);
        }
    }

    let encoded = encode_key_set(&pairs);
    let decoded = decode_key_set(&encoded).expect("a serialised set reads back");
    let expected: Vec<(String, Vec<u8>)> = unique.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
    assert_eq!(decoded, expected);
    let cut = data.len() % encoded.len();
    assert!(decode_key_set(&encoded[..cut]).is_err(), "a copy cut at {cut} of {} bytes was read", encoded.len());
});
