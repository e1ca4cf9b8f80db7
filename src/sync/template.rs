//! `--template FILE`: the keys under a prefix rendered into one file with minijinja (Jinja2
//! syntax). The template sees `keys`, a map from each key's path below the prefix to its value,
//! and helpers: `key(name)`, `key_or_default(name, default)`, `keys_under(prefix)`,
//! `parse_json` / `parse_yaml` (as filters and as functions), and the filter `to_json`. Undefined is strict: a missing
//! key refuses the render, as does any template error, always with the template's file and
//! line.

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};

use super::keyset::KeySet;

/// Why a template did not render: the template, the line, what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {template} line {line}: {message}")]
pub struct TemplateError {
    pub(crate) template: String,
    /// 1-based; errors found before any line (none known yet) are put on line 1.
    pub(crate) line: usize,
    pub(crate) message: String,
}

/// Work one render may do (instructions): far more than any config needs, and a bound on a
/// template that loops over `range(10**9)`.
const FUEL: u64 = 5_000_000;
/// Largest rendered output, so that a small template cannot make gigabytes.
const MAX_OUTPUT: usize = 64 * 1024 * 1024;

fn value_of(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::from(text),
        Err(_) => Value::from_bytes(bytes.to_vec()),
    }
}

fn json_value(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (None, Some(u), _) => Value::from(u),
            (_, _, f) => Value::from(f.unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s),
        serde_json::Value::Array(items) => Value::from(items.into_iter().map(json_value).collect::<Vec<_>>()),
        serde_json::Value::Object(map) => {
            Value::from(map.into_iter().map(|(k, v)| (k, json_value(v))).collect::<BTreeMap<String, Value>>())
        }
    }
}

fn yaml_value(v: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match v {
        Yaml::Real(s) => s.parse::<f64>().map(Value::from).unwrap_or_else(|_| Value::from(s.as_str())),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::from(s.as_str()),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Array(items) => Value::from(items.iter().map(yaml_value).collect::<Vec<_>>()),
        Yaml::Hash(map) => {
            Value::from(map.iter().map(|(k, v)| (yaml_value(k), yaml_value(v))).collect::<BTreeMap<Value, Value>>())
        }
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::from(()),
    }
}

fn text_of(value: &Value, what: &str) -> Result<String, Error> {
    if let Some(s) = value.as_str() {
        return Ok(s.to_owned());
    }
    if let Some(b) = value.as_bytes() {
        return String::from_utf8(b.to_vec())
            .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("{what}: the value is not UTF-8")));
    }
    Err(Error::new(ErrorKind::InvalidOperation, format!("{what}: expected a string, got {}", value.kind())))
}

fn parse_json(value: Value) -> Result<Value, Error> {
    let text = text_of(&value, "parse_json")?;
    serde_json::from_str::<serde_json::Value>(&text)
        .map(json_value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("parse_json: not JSON: {e}")))
}

fn parse_yaml(value: Value) -> Result<Value, Error> {
    let text = text_of(&value, "parse_yaml")?;
    let docs = yaml_rust2::YamlLoader::load_from_str(&text)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("parse_yaml: not YAML: {e}")))?;
    Ok(docs.first().map(yaml_value).unwrap_or_else(|| Value::from(())))
}

/// A value as JSON, for `to_json`: Jinja's own printing would write `True` and `None`.
fn json_of(value: &Value, depth: usize) -> Result<serde_json::Value, Error> {
    use minijinja::value::ValueKind;
    if depth > 64 {
        return Err(Error::new(ErrorKind::InvalidOperation, "to_json: nested too deep"));
    }
    Ok(match value.kind() {
        ValueKind::Undefined | ValueKind::None => serde_json::Value::Null,
        ValueKind::Bool => serde_json::Value::Bool(value.is_true()),
        ValueKind::Number => match value.as_i64() {
            Some(i) => serde_json::Value::from(i),
            None => f64::try_from(value.clone())
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
        },
        ValueKind::String => serde_json::Value::from(value.as_str().unwrap_or_default()),
        ValueKind::Bytes => serde_json::Value::from(text_of(value, "to_json")?),
        ValueKind::Map => {
            let mut map = serde_json::Map::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                map.insert(key.to_string(), json_of(&item, depth + 1)?);
            }
            serde_json::Value::Object(map)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            serde_json::Value::Array(value.try_iter()?.map(|v| json_of(&v, depth + 1)).collect::<Result<_, _>>()?)
        }
        other => return Err(Error::new(ErrorKind::InvalidOperation, format!("to_json: cannot write a {other}"))),
    })
}

fn to_json(value: Value) -> Result<String, Error> {
    Ok(json_of(&value, 0)?.to_string())
}

fn environment(keys: Arc<BTreeMap<String, Value>>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // A config file is not HTML, whatever the template's extension.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    // A value that is not UTF-8 would be printed with its bad bytes replaced by U+FFFD: a file
    // that says something the store does not. Refused where it is written instead.
    env.set_formatter(|out, state, value| {
        if value.kind() == minijinja::value::ValueKind::Bytes && value.as_str().is_none() {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "a value that is not UTF-8 cannot be written into the text (its bytes would be replaced)",
            ));
        }
        minijinja::escape_formatter(out, state, value)
    });
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(64);
    // A config file's last line ends with its newline, as the template's does.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().keep_trailing_newline(true).build() {
        env.set_syntax(syntax);
    }
    env.add_filter("parse_json", parse_json);
    env.add_filter("parse_yaml", parse_yaml);
    env.add_function("parse_json", parse_json);
    env.add_filter("to_json", to_json);
    env.add_function("parse_yaml", parse_yaml);
    let map = keys.clone();
    env.add_function("key", move |name: String| -> Result<Value, Error> {
        map.get(&name)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::UndefinedError, format!("key `{name}` is not under the prefix")))
    });
    let map = keys.clone();
    env.add_function("key_or_default", move |name: String, default: Value| map.get(&name).cloned().unwrap_or(default));
    env.add_function("keys_under", move |prefix: String| {
        let below = if prefix.is_empty() || prefix.ends_with('/') { prefix } else { format!("{prefix}/") };
        let found: BTreeMap<String, Value> = keys
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .map(|(k, v)| (k[below.len()..].to_owned(), v.clone()))
            .collect();
        Value::from(found)
    });
    env
}

/// Renders `source` (the template file `name`) with the keys of `set`.
pub(crate) fn render(name: &str, source: &str, set: &KeySet) -> Result<String, TemplateError> {
    let keys: BTreeMap<String, Value> = set.keys.iter().map(|(k, v)| (k.clone(), value_of(v))).collect();
    let keys = Arc::new(keys);
    let env = environment(keys.clone());
    let context = Value::from(BTreeMap::from([("keys".to_owned(), Value::from(keys.as_ref().clone()))]));
    let fail = |e: Error| describe(name, &e);
    let template = env.template_from_named_str(name, source).map_err(fail)?;
    // Written through a bound, so that a loop of large strings stops at the limit instead of
    // holding gigabytes before it is measured.
    let mut output = BoundedOutput(Vec::new());
    template.render_captured_to(context, &mut output).map_err(fail)?;
    String::from_utf8(output.0).map_err(|_| TemplateError {
        template: name.to_owned(),
        line: 1,
        message: "the output is not UTF-8".into(),
    })
}

/// The rendered output, refusing to grow past [`MAX_OUTPUT`].
struct BoundedOutput(Vec<u8>);

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other(format!("the output is larger than {MAX_OUTPUT} bytes")));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Largest template file read.
const MAX_TEMPLATE: u64 = 4 * 1024 * 1024;

/// Reads a template file: a regular file (not a device that never ends) of at most 4 MiB, UTF-8.
pub(crate) fn read_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_TEMPLATE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TEMPLATE {
        return Err(std::io::Error::other(format!("larger than {MAX_TEMPLATE} bytes")));
    }
    Ok(text)
}

/// Checks that `source` compiles (for `sidecar check` and the start).
pub(crate) fn compile(name: &str, source: &str) -> Result<(), TemplateError> {
    let env = environment(Arc::new(BTreeMap::new()));
    env.template_from_named_str(name, source).map(|_| ()).map_err(|e| describe(name, &e))
}

fn describe(name: &str, error: &Error) -> TemplateError {
    let mut message = match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    };
    // The cause of a failed call (our helpers' messages) is worth its line too.
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        message.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    TemplateError {
        template: name.to_owned(),
        line: error.line().unwrap_or(1),
        message: message.chars().map(|c| if c.is_control() { ' ' } else { c }).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn set(pairs: &[(&str, &str)]) -> KeySet {
        KeySet { keys: pairs.iter().map(|(k, v)| (k.to_string(), Bytes::from(v.to_string()))).collect() }
    }

    #[test]
    fn keys_and_helpers_render() {
        let keys = set(&[("db/host", "db1"), ("db/port", "5432"), ("flags", "{\"a\": [1, 2]}"), ("y", "b: {c: 3}")]);
        let template = "host={{ keys[\"db/host\"] }}:{{ key('db/port') }}\n\
            a={{ (keys.flags | parse_json).a[1] }} c={{ parse_yaml(keys.y).b.c }}\n\
            mode={{ key_or_default('mode', 'safe') }} {{ keys['nope'] | default('dflt') }}\n\
            {{ (keys.flags | parse_json) | to_json }} {{ parse_yaml('t: true') | to_json }}\n\
            {% for k, v in keys_under('db') | items %}{{ k }}={{ v }};{% endfor %}\n";
        let out = render("app.tmpl", template, &keys).unwrap();
        assert_eq!(out, "host=db1:5432\na=2 c=3\nmode=safe dflt\n{\"a\":[1,2]} {\"t\":true}\nhost=db1;port=5432;\n");
    }

    #[test]
    fn errors_name_the_template_and_the_line() {
        let keys = set(&[("a", "1")]);
        let missing = render("t.tmpl", "ok\n{{ keys.a }}\n{{ keys['db/host'] }}\n", &keys).unwrap_err();
        assert_eq!((missing.template.as_str(), missing.line), ("t.tmpl", 3), "{missing}");
        assert!(missing.to_string().starts_with("template t.tmpl line 3: "), "{missing}");
        let missing = render("t.tmpl", "\n{{ key('b') }}", &keys).unwrap_err();
        assert_eq!(missing.line, 2, "{missing}");
        assert!(missing.message.contains("key `b` is not under the prefix"), "{missing}");
        let syntax = render("t.tmpl", "a\nb\n{% if %}\n", &keys).unwrap_err();
        assert_eq!(syntax.line, 3, "{syntax}");
        assert!(compile("t.tmpl", "{{ x").is_err());
        let json = render("t.tmpl", "{{ keys.a | parse_json }}{{ 'x' | parse_json }}", &keys).unwrap_err();
        assert!(json.message.contains("not JSON"), "{json}");
        let endless = render("t.tmpl", "{% for i in range(100000000) %}{{ i }}{% endfor %}", &keys).unwrap_err();
        assert!(endless.to_string().starts_with("template t.tmpl line 1"), "{endless}");
    }

    #[test]
    fn a_value_that_is_not_utf8_is_refused_where_it_is_written() {
        let mut keys = set(&[("a", "1")]);
        keys.keys.insert("bin".into(), Bytes::from_static(b"ab\xffcd"));
        assert_eq!(render("t.tmpl", "a={{ keys.a }}\n", &keys).unwrap(), "a=1\n");
        let error = render("t.tmpl", "a={{ keys.a }}\nbin={{ keys.bin }}\n", &keys).unwrap_err();
        assert_eq!(error.line, 2, "{error}");
        assert!(error.message.contains("not UTF-8"), "{error}");
    }

    #[test]
    fn an_output_past_the_limit_stops_while_it_is_written() {
        let keys = set(&[("a", "1")]);
        // Strings of 40 MB, written one after the other: the second crosses the limit and
        // the write fails there (measured only after the render, the whole output was held).
        let huge = "start\n{% for i in range(3) %}\n{{ 'x' * 40000000 }}\n{% endfor %}\n";
        let error = render("t.tmpl", huge, &keys).unwrap_err();
        assert!(error.message.contains("failed to write output"), "{error}");
        assert!(error.message.contains(&format!("larger than {MAX_OUTPUT} bytes")), "{error}");
    }
}
