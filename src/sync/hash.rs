//! Content hashes: how the sync role tells versions apart and names them.

/// SHA-256 of `data`, lower-case hex.
pub fn content_hash(data: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 12 hex digits of the hash, for names and logs.
pub(crate) fn short_hash(data: &[u8]) -> String {
    content_hash(data)[..12].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha256() {
        assert_eq!(content_hash(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(short_hash(b"abc"), "ba7816bf8f01");
    }
}
