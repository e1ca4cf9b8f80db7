//! Replies to the HTTP source's polls as the sync role reads them (`HttpSource::read_reply`),
//! and the value then checked as `--validate` would (`validate::check_content`).
//!
//! Input: replies, each a flags byte (unused) then an HTTP/1.1 response, separated by
//! `\n=====\n`. Invariants:
//! - 304 is "unchanged" only after a reply that gave an ETag (the poll then sent
//!   If-None-Match); without one it is refused;
//! - a success passes the body on untouched, its revision the ETag when there is one, else a
//!   hash of the body (the same body, the same revision);
//! - a success whose body was ended only by the connection closing (neither Content-Length
//!   nor chunked framing) is refused: a body cut short cannot be told from a whole one;
//! - 404 is "missing", other failures are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{check_content, ContentFormat, HttpPolls, SourceStep};
use sidecar_fuzz::replies;

fuzz_target!(|data: &[u8]| {
    let mut polls = HttpPolls::new(1 << 20);
    let mut etag_sent = false;
    let mut hashes = std::collections::HashMap::new();
    for reply in replies(data) {
        let (status, body) = (reply.status, reply.body.clone());
        let etag = reply.headers.get("etag").cloned();
        let chunked = reply.headers.get_all("transfer-encoding").iter().any(|v| {
            v.to_str().is_ok_and(|v| v.to_ascii_lowercase().trim_end().ends_with("chunked"))
        });
        let framed = chunked || reply.headers.contains_key("content-length");
        let step = polls.reply(reply.status, reply.headers, reply.body);
        match step {
            SourceStep::Unchanged => assert!(status == 304 && etag_sent, "unchanged without If-None-Match"),
            SourceStep::Value { content, revision } => {
                assert!(status.is_success() && framed, "a value from {status}, framed: {framed}");
                assert_eq!(content, body, "the value is not the body");
                match &etag {
                    Some(etag) => assert_eq!(revision, format!("etag {}", etag.to_str().unwrap_or("?"))),
                    None => {
                        assert!(revision.starts_with("sha256 "), "{revision}");
                        let seen = hashes.entry(content.clone()).or_insert_with(|| revision.clone());
                        assert_eq!(*seen, revision, "one body, two revisions");
                    }
                }
                etag_sent = etag.is_some();
                for format in [None, Some(ContentFormat::Json), Some(ContentFormat::Yaml), Some(ContentFormat::Toml)] {
                    let _ = check_content(&content, format);
                }
            }
            SourceStep::Failed(message) if status.is_success() => {
                assert!(!framed, "a framed success refused: {message}");
                assert!(message.contains("neither Content-Length nor chunked"), "{message}");
            }
            SourceStep::Failed(message) => {
                assert!(!(status == 304 && etag_sent), "refused: {message}");
                assert_eq!(status == 404, message.contains("does not exist"), "{status}: {message}");
            }
            other => panic!("an HTTP reply gave {other:?}"),
        }
    }
});
