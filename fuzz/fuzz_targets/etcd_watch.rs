//! etcd's watch stream (JSON messages, one a line) as the sync role's etcd source reads it
//! (`etcd::next_line`, `EtcdSource::read_message`), logging at trace level so that what the log
//! lines compute runs too.
//!
//! Input: a byte choosing `--max-size` and seeding how the stream is cut into reads, then the
//! stream. The watched key is `/k` (`L2s=` in base64). Invariants:
//! - cut into reads in any way, the stream gives the same messages, up to the one that ends it;
//! - each line taken is whole (ends in its only LF) and not blank, and no whole line is left;
//! - the revision seen never goes back;
//! - a value is never larger than `--max-size`, and its revision is a number.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::{EtcdWatch, SourceStep};
use sidecar_fuzz::cuts;

fn watch(stream: &[u8], max_size: u64, reads: &[usize]) -> Vec<SourceStep> {
    let mut watch = EtcdWatch::new("/k", max_size);
    let (mut buffer, mut fed) = (BytesMut::new(), 0);
    let mut steps = Vec::new();
    for &len in reads {
        buffer.extend_from_slice(&stream[fed..fed + len]);
        fed += len;
        while let Some(line) = EtcdWatch::next_line(&mut buffer) {
            assert!(line.ends_with(b"\n") && !line[..line.len() - 1].contains(&b'\n'), "not one line: {line:?}");
            assert!(!line.trim_ascii().is_empty(), "a blank line was passed on");
            let before = watch.revision();
            let step = watch.message(&line);
            let after = watch.revision();
            assert!(before.is_none() || after >= before, "the revision went back: {before:?} -> {after:?}");
            if let SourceStep::Value { content, revision } = &step {
                assert!(content.len() as u64 <= max_size, "a value over --max-size");
                let number = revision.strip_prefix("revision ").and_then(|n| n.parse::<i64>().ok());
                assert!(number.is_some(), "revision {revision:?}");
            }
            let ends = matches!(step, SourceStep::Failed(_) | SourceStep::Compacted);
            steps.push(step);
            if ends {
                return steps;
            }
        }
        assert!(!buffer.contains(&b'\n'), "a whole line was left in the buffer");
    }
    steps
}

fuzz_target!(|data: &[u8]| {
    sidecar_fuzz::log_everything();
    let Some((&flags, stream)) = data.split_first() else { return };
    let max_size = [0, 1, 16, 1 << 20][usize::from(flags & 3)];
    let [whole, bytes, pieces] = cuts(stream.len(), flags >> 2);
    let steps = watch(stream, max_size, &whole);
    assert_eq!(watch(stream, max_size, &bytes), steps, "read a byte at a time");
    assert_eq!(watch(stream, max_size, &pieces), steps, "read in pieces");
});
