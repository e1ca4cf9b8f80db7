//! Replies to Consul KV blocking queries as the sync role's Consul source reads them
//! (`ConsulSource::read_reply`), and the value then checked as `--validate` would
//! (`validate::check_content`).
//!
//! Input: replies, each a flags byte (bit 0: a blocking query, else a first read) then an
//! HTTP/1.1 response, separated by `\n=====\n`. Invariants, Consul's rules for clients:
//! - a reply without a numeric `X-Consul-Index` is refused, whatever its status;
//! - the index kept goes back to 0 when the server's goes back, and is at least 1 after a reply;
//! - a blocking query answered at the index it waited on is "unchanged"; any other success
//!   passes the body on untouched, its revision the index;
//! - 404 is "missing", other failures are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{check_content, ConsulQueries, ContentFormat, SourceStep};
use sidecar_fuzz::replies;

fuzz_target!(|data: &[u8]| {
    let mut queries = ConsulQueries::new(1 << 20);
    // The index the source waits on, as Consul's rules keep it.
    let mut waited = 0u64;
    for reply in replies(data) {
        let blocking = reply.flags & 1 == 1;
        let index = reply
            .headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let (status, body) = (reply.status, reply.body.clone());
        let step = queries.reply(reply.status, reply.headers, reply.body, blocking);
        let Some(index) = index else {
            assert!(matches!(step, SourceStep::Failed(_)), "a reply without an index was taken: {step:?}");
            continue;
        };
        let previous = waited;
        waited = if index < previous { 0 } else { index.max(1) };
        match step {
            SourceStep::Unchanged => {
                assert!(blocking && index == previous && status.is_success(), "unchanged at {index} after {previous}")
            }
            SourceStep::Value { content, revision } => {
                assert!(status.is_success() && !(blocking && index == previous), "a value where none was due");
                assert_eq!(content, body, "the value is not the body");
                assert_eq!(revision, format!("index {index}"));
                for format in [None, Some(ContentFormat::Json), Some(ContentFormat::Yaml), Some(ContentFormat::Toml)] {
                    let _ = check_content(&content, format);
                }
            }
            SourceStep::Failed(message) => {
                assert!(!status.is_success(), "a success refused: {message}");
                assert_eq!(status == 404, message.contains("does not exist"), "{status}: {message}");
            }
            other => panic!("a Consul reply gave {other:?}"),
        }
    }
});
