//! `--template`: a template rendered with keys and the helpers the sync role gives it
//! (`template::render`: strict undefined, fuel, key / key_or_default / keys_under /
//! parse_json / parse_yaml).
//!
//! Input: the template, then a line `=====`, then keys, one `name=value` per line. Invariants:
//! - rendering never panics (the fuel bounds the work, the recursion limit the depth);
//! - every error names the template and a line of it: `template NAME line N: ...`, with N
//!   between 1 and the template's line count (+1: the end of the last line).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecar::fuzz_api::render_template;

const NAME: &str = "/etc/app/app.conf.j2";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (template, keys) = text.split_once("\n=====\n").unwrap_or((text, ""));
    let pairs: Vec<(String, Vec<u8>)> = keys
        .lines()
        .map(|line| {
            let (k, v) = line.split_once('=').unwrap_or((line, ""));
            (k.to_owned(), v.as_bytes().to_vec())
        })
        .collect();
    if let Err(refused) = render_template(NAME, template, &pairs) {
        let lines = template.split('\n').count();
        assert_eq!(refused.template, NAME);
        assert!(refused.line >= 1 && refused.line <= lines + 1, "line {} of {lines}: {}", refused.line, refused.message);
        let head = format!("template {NAME} line {}: ", refused.line);
        assert!(refused.message.starts_with(&head), "{}", refused.message);
        assert!(!refused.message[head.len()..].is_empty(), "an error says what went wrong");
    }
});
