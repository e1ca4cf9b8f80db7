//! The crate's modules are layered: each imports only from its own layer or below, modules of
//! one layer never import each other in a circle, and the jobs that belong to the top (clap and
//! TOML, exit codes, printing a command's output, exiting) stay there. This test reads `src/`
//! as text (std only) so that the rule cannot rot; `lib.rs` shows the same table to readers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, top layer first. A new module must be placed here before it builds.
const LAYERS: &[&[&str]] = &[
    // `fuzz_api` is the fuzz targets' way in (fuzz/): it reaches the parsers of every layer.
    &["app", "fuzz_api"],
    &["cli", "admin"],
    &["server"],
    &["proxy", "sync"],
    &["config", "access_log", "devca"],
    &["tls", "devcert", "transport", "proxy_protocol"],
    &["sys"],
    &["metrics"],
];

/// Only these may use clap's builders and parsers or the TOML reader (a derived
/// `clap::ValueEnum` on a domain enum is fine anywhere).
const INPUT_MODULES: &[&str] = &["app", "cli"];

/// Files that parse TOML that is not the sidecar's own configuration.
const TOML_CONTENT: &[&str] = &[
    // `--validate toml`: the app's config file, checked before it is written.
    "src/sync/validate.rs",
];

/// Only these may exit, return an exit code or print a command's output.
const PROCESS_MODULES: &[&str] = &["app"];

/// A source file as the checks see it: its module path and its text with comments, string
/// contents and `#[cfg(test)]` items removed.
struct Source {
    file: String,
    module: Vec<String>,
    code: String,
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`; `lib.rs` and `main.rs` are the root `[]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if !(parts.is_empty() && (stem == "lib" || stem == "main")) && stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

/// Removes comments, the contents of string and char literals, and every item under
/// `#[cfg(test)]` (unit tests may reach anywhere).
fn strip(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |end| end + 2);
        } else if let Some(len) = raw_string_len(rest) {
            out.push_str("\"\"");
            i += len;
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() && rest.as_bytes()[j] != b'"' {
                j += if rest.as_bytes()[j] == b'\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            i += (j + 1).min(rest.len());
        } else if let Some(len) = char_literal_len(rest) {
            out.push_str("' '");
            i += len;
        } else if rest.starts_with("#[cfg(test)]") {
            i += "#[cfg(test)]".len() + item_len(&text[i + "#[cfg(test)]".len()..]);
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"..."` or `r#"..."#` (any number of hashes), as a length.
fn raw_string_len(rest: &str) -> Option<usize> {
    let after_r = rest.strip_prefix('r')?;
    let hashes = after_r.len() - after_r.trim_start_matches('#').len();
    let body = after_r[hashes..].strip_prefix('"')?;
    let end = format!("\"{}", "#".repeat(hashes));
    Some(1 + hashes + 1 + body.find(&end)? + end.len())
}

/// `'x'`, `'\n'`, `'\''` as a length; lifetimes (`'a`) are not literals.
fn char_literal_len(rest: &str) -> Option<usize> {
    let body = rest.strip_prefix('\'')?;
    let mut chars = body.char_indices();
    let (_, first) = chars.next()?;
    let after = if first == '\\' { chars.nth(1)?.0 } else { chars.next()?.0 };
    (body[after..].starts_with('\'')).then_some(1 + after + 1)
}

/// The length of the item that starts `text` (after an attribute): up to its `;` or through
/// its balanced `{...}` block.
fn item_len(text: &str) -> usize {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            ';' if depth == 0 => return i + 1,
            _ => {}
        }
    }
    text.len()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every top-level module `source` names, outside its own: `crate::x`, `super::..::x` that
/// climbs to the crate root, and the members of `use crate::{x, y::z}`.
fn imports(source: &Source) -> BTreeSet<String> {
    let code = &source.code;
    let mut found = BTreeSet::new();
    let mut at = 0;
    while let Some(pos) = code[at..].find("crate::").map(|p| p + at) {
        at = pos + "crate::".len();
        if pos > 0 && is_ident(code[..pos].chars().next_back().unwrap_or(' ')) {
            continue;
        }
        let rest = &code[at..];
        if rest.starts_with('{') {
            // `use crate::{a::X, b::{Y, Z}}`: the first segment of each top-level member.
            let inner = &rest[1..item_len(rest).saturating_sub(1).max(1)];
            let mut depth = 0;
            let mut member = String::new();
            for c in inner.chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.extend(first_segment(&member));
                        member.clear();
                        continue;
                    }
                    _ => {}
                }
                member.push(c);
            }
        } else {
            found.extend(first_segment(rest));
        }
    }
    // `super::` that climbs out of the top-level module names the crate root.
    let mut at = 0;
    while let Some(pos) = code[at..].find("super::").map(|p| p + at) {
        at = pos + 1;
        if pos > 0 && (is_ident(code[..pos].chars().next_back().unwrap_or(' ')) || code[..pos].ends_with("::")) {
            continue;
        }
        let mut rest = &code[pos..];
        let mut climbs = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = r;
        }
        if climbs >= source.module.len() {
            found.extend(first_segment(rest));
        }
    }
    found.remove(source.module.first().map(String::as_str).unwrap_or(""));
    found
}

fn first_segment(path: &str) -> Option<String> {
    let name: String = path.trim_start().chars().take_while(|c| is_ident(*c)).collect();
    (!name.is_empty() && name != "self").then_some(name)
}

/// Every rule broken by `sources`, one line each.
fn violations(sources: &[Source]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for source in sources {
        let Some(top) = source.module.first() else { continue };
        let Some(own) = layer_of(top) else {
            problems.push(format!("{}: module `{top}` has no layer in tests/layering.rs", source.file));
            continue;
        };
        for target in imports(source) {
            match layer_of(&target) {
                Some(theirs) if theirs < own => problems.push(format!(
                    "{}: `{top}` (layer {own}) imports `{target}` (layer {theirs}), which is above it",
                    source.file
                )),
                Some(_) => {
                    graph.entry(top.clone()).or_default().insert(target);
                }
                None => problems.push(format!("{}: imports `{target}`, which has no layer", source.file)),
            }
        }
        if top == "metrics" && !imports(source).is_empty() {
            problems.push(format!("{}: `metrics` must import nothing from the crate", source.file));
        }
        let code = &source.code;
        if !INPUT_MODULES.contains(&top.as_str()) {
            let clap_uses = code.matches("clap::").count() - code.matches("clap::ValueEnum").count();
            let toml = code.contains("toml::") && !TOML_CONTENT.contains(&source.file.as_str());
            if clap_uses > 0 || toml {
                problems.push(format!("{}: only {INPUT_MODULES:?} may use clap or TOML", source.file));
            }
        }
        if !PROCESS_MODULES.contains(&top.as_str()) {
            for word in ["ExitCode", "process::exit", "println!", "print!(", "eprintln!", "eprint!("] {
                if code.contains(word) {
                    problems.push(format!("{}: `{word}`: only {PROCESS_MODULES:?} exits or prints", source.file));
                }
            }
        }
        // Dependencies are declared at the top, in `use` lines, not as inline paths.
        for line in code.lines() {
            let line = line.trim();
            let in_use =
                line.starts_with("use ") || line.starts_with("pub use ") || line.starts_with("pub(crate) use ");
            if !in_use && line.contains("crate::") {
                problems.push(format!("{}: inline path `{line}`: import it in a `use` line", source.file));
            }
        }
    }
    for cycle in cycles(&graph) {
        problems.push(format!("import cycle between top-level modules: {}", cycle.join(" -> ")));
    }
    problems
}

/// Each cycle of the module graph, once, as the path that closes it.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            found.push(cycle);
            return;
        }
        if !done.insert(node.to_owned()) {
            return;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, found);
        }
        path.pop();
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

fn read_tree(dir: &Path, root: &Path, out: &mut Vec<Source>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).unwrap();
            out.push(Source {
                file: format!("src/{}", relative.display()),
                module: module_path(relative),
                code: strip(&std::fs::read_to_string(&path).unwrap()),
            });
        }
    }
}

fn source(file: &str, text: &str) -> Source {
    Source { file: file.to_owned(), module: module_path(Path::new(file)), code: strip(text) }
}

#[test]
fn every_module_imports_only_from_its_own_layer_or_below() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = Vec::new();
    read_tree(&root, &root, &mut sources);
    let modules: BTreeSet<&str> = sources.iter().filter_map(|s| s.module.first().map(String::as_str)).collect();
    assert!(modules.len() >= 10, "read too few modules from {}: {modules:?}", root.display());
    let problems = violations(&sources);
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}

#[test]
fn the_checks_catch_an_upward_import_a_cycle_and_jobs_out_of_place() {
    let clean = [
        source("server/mod.rs", "use crate::proxy::Forward;\nuse crate::{config::A, sys::lock};\n"),
        source("proxy/h1.rs", "use super::headers::X;\nuse crate::config::B;\n"),
        source("metrics.rs", "use std::sync::OnceLock;\n"),
        source("sys/mod.rs", "//! crate::server in a comment\nconst S: &str = \"crate::app\";\n"),
        source("config.rs", "#[cfg(test)]\nmod tests {\n    use crate::cli::parse_from;\n}\n"),
    ];
    assert_eq!(violations(&clean), Vec::<String>::new());

    let upward = [source("proxy/upstream.rs", "use crate::server::LiveState;\n")];
    assert!(violations(&upward)[0].contains("imports `server`"), "{:?}", violations(&upward));
    let grouped = [source("sync/mod.rs", "use crate::{sys::lock, admin::AdminServer};\n")];
    assert!(violations(&grouped)[0].contains("imports `admin`"), "{:?}", violations(&grouped));
    let climbing = [source("config.rs", "use super::cli::ProxyArgs;\n")];
    assert!(violations(&climbing)[0].contains("imports `cli`"), "{:?}", violations(&climbing));

    let circle = [source("proxy/mod.rs", "use crate::sync::A;\n"), source("sync/mod.rs", "use crate::proxy::B;\n")];
    assert!(violations(&circle).iter().any(|p| p.contains("cycle")), "{:?}", violations(&circle));

    let counters = [source("metrics.rs", "use crate::sys::lock;\n")];
    assert!(violations(&counters).iter().any(|p| p.contains("import nothing")));
    let parsing = [source("server/mod.rs", "fn f() { let c = clap::Command::new(\"x\"); }\n")];
    assert!(violations(&parsing)[0].contains("clap or TOML"));
    let printing = [source("sync/mod.rs", "fn f() -> std::process::ExitCode { println!(\"x\"); todo!() }\n")];
    assert_eq!(violations(&printing).len(), 2, "{:?}", violations(&printing));
    let inline = [source("proxy/mod.rs", "fn f() { crate::metrics::metrics().inc(); }\n")];
    assert!(violations(&inline)[0].contains("inline path"));
    let unplaced = [source("newthing.rs", "fn f() {}\n")];
    assert!(violations(&unplaced)[0].contains("no layer"));
}
