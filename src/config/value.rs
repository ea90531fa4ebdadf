//! Reading typed values out of the YAML tree with key paths.
//!
//! The YAML is first parsed into a `serde_json::Value` (serde-saphyr has no
//! DOM of its own); this module then walks it by hand. Hand-walking instead
//! of `#[derive(Deserialize)]` gives exact key paths in errors, per-key
//! absent/null distinctions and unknown-key warnings.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use super::error::{ConfigError, ConfigWarning};

pub(crate) type Result<T> = std::result::Result<T, ConfigError>;

/// Parses YAML text with YAML 1.1 scalar rules, as PyYAML reads the
/// reference configs: `yes/no/on/off/true/false` in the spellings `yes`,
/// `Yes`, `YES` are booleans (other spellings such as `y` or `yEs` stay
/// strings), `010` is octal, an empty value or `~` is null.
pub(crate) fn parse_yaml(src: &str) -> Result<Value> {
    let lenient = parse_with(src, false)?;
    // serde-saphyr's YAML 1.1 mode also takes `y`/`n` and any
    // capitalisation as booleans; a strict parse tells which scalars were
    // written as something PyYAML would keep as a string.
    let strict = parse_with(src, true)?;
    Ok(restore_strings(lenient, &strict))
}

fn parse_with(src: &str, strict_booleans: bool) -> Result<Value> {
    let opts = serde_saphyr::options! {
        legacy_octal_numbers: true,
        strict_booleans: strict_booleans,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options::<Value>(src, opts).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let mut message = e.to_string();
        // The position is in our own prefix already.
        let suffix = format!(" at line {line}, column {column}");
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
        ConfigError::Syntax {
            line,
            column,
            message,
        }
    })
}

fn is_pyyaml_bool(s: &str) -> bool {
    const WORDS: [&str; 6] = ["yes", "no", "true", "false", "on", "off"];
    WORDS.iter().any(|w| {
        s == *w || s == w.to_uppercase() || {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .is_some_and(|cap| s == cap)
        }
    })
}

fn restore_strings(lenient: Value, strict: &Value) -> Value {
    match (lenient, strict) {
        (Value::Bool(_), Value::String(s)) if !is_pyyaml_bool(s.trim()) => Value::String(s.clone()),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => Value::Array(
            a.into_iter()
                .zip(b)
                .map(|(x, y)| restore_strings(x, y))
                .collect(),
        ),
        (Value::Object(a), Value::Object(b)) => Value::Object(
            a.into_iter()
                .map(|(k, x)| {
                    let x = match b.get(&k) {
                        Some(y) => restore_strings(x, y),
                        None => x,
                    };
                    (k, x)
                })
                .collect(),
        ),
        (v, _) => v,
    }
}

pub(crate) fn key_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

pub(crate) fn index_path(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn expected(path: &str, what: &str, v: &Value) -> ConfigError {
    ConfigError::invalid(path, format!("expected {what}, got {}", kind(v)))
}

pub(crate) fn as_str(path: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(expected(path, "a string", v)),
    }
}

pub(crate) fn as_bool(path: &str, v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        _ => Err(expected(path, "a boolean", v)),
    }
}

pub(crate) fn as_u64(path: &str, v: &Value) -> Result<u64> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| ConfigError::invalid(path, "expected a non-negative integer")),
        _ => Err(expected(path, "a non-negative integer", v)),
    }
}

pub(crate) fn as_f64(path: &str, v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| ConfigError::invalid(path, "expected a number")),
        _ => Err(expected(path, "a number", v)),
    }
}

/// Seconds (int or float, >= 0) as a `Duration`.
pub(crate) fn as_duration(path: &str, v: &Value) -> Result<Duration> {
    let secs = match v {
        Value::Number(_) => as_f64(path, v)?,
        _ => return Err(expected(path, "a duration in seconds", v)),
    };
    Duration::try_from_secs_f64(secs)
        .map_err(|_| ConfigError::invalid(path, "expected a non-negative number of seconds"))
}

pub(crate) fn as_list<'v>(path: &str, v: &'v Value) -> Result<&'v Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(expected(path, "a list", v)),
    }
}

pub(crate) fn as_str_list(path: &str, v: &Value) -> Result<Vec<String>> {
    as_list(path, v)?
        .iter()
        .enumerate()
        .map(|(i, e)| as_str(&index_path(path, i), e))
        .collect()
}

/// A mapping being read; remembers which keys were consumed so the rest
/// can be reported as unknown.
pub(crate) struct Obj<'v> {
    pub path: String,
    pub map: &'v Map<String, Value>,
    used: BTreeSet<&'v str>,
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl<'v> Obj<'v> {
    pub fn new(path: &str, v: &'v Value) -> Result<Self> {
        match v {
            Value::Object(map) => Ok(Obj {
                path: path.to_string(),
                map,
                used: BTreeSet::new(),
            }),
            _ => Err(expected(path, "a mapping", v)),
        }
    }

    /// Like `new`, but null (an empty YAML value) reads as `{}`.
    pub fn new_or_empty(path: &str, v: &'v Value) -> Result<Self> {
        if v.is_null() {
            Ok(Obj {
                path: path.to_string(),
                map: &EMPTY,
                used: BTreeSet::new(),
            })
        } else {
            Self::new(path, v)
        }
    }

    pub fn path_of(&self, key: &str) -> String {
        key_path(&self.path, key)
    }

    /// The raw value; `Some(Null)` for an explicit null.
    pub fn raw(&mut self, key: &str) -> Option<&'v Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.used.insert(k.as_str());
        Some(v)
    }

    /// The value unless absent or null (null usually means "default").
    pub fn get(&mut self, key: &str) -> Option<&'v Value> {
        self.raw(key).filter(|v| !v.is_null())
    }

    pub fn req(&mut self, key: &str) -> Result<&'v Value> {
        self.get(key)
            .ok_or_else(|| ConfigError::invalid(self.path_of(key), "missing"))
    }

    pub fn req_str(&mut self, key: &str) -> Result<String> {
        let v = self.req(key)?;
        as_str(&self.path_of(key), v)
    }

    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| as_str(&self.path_of(key), v))
            .transpose()
    }

    pub fn opt_path(&mut self, key: &str) -> Result<Option<PathBuf>> {
        Ok(self.opt_str(key)?.map(PathBuf::from))
    }

    pub fn bool_or(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => as_bool(&self.path_of(key), v),
            None => Ok(default),
        }
    }

    pub fn opt_u64(&mut self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| as_u64(&self.path_of(key), v))
            .transpose()
    }

    pub fn u64_or(&mut self, key: &str, default: u64) -> Result<u64> {
        Ok(self.opt_u64(key)?.unwrap_or(default))
    }

    pub fn usize_or(&mut self, key: &str, default: usize) -> Result<usize> {
        let v = self.u64_or(key, default as u64)?;
        usize::try_from(v).map_err(|_| ConfigError::invalid(self.path_of(key), "too large"))
    }

    pub fn f64_or(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            Some(v) => as_f64(&self.path_of(key), v),
            None => Ok(default),
        }
    }

    pub fn opt_duration(&mut self, key: &str) -> Result<Option<Duration>> {
        self.get(key)
            .map(|v| as_duration(&self.path_of(key), v))
            .transpose()
    }

    pub fn duration_or(&mut self, key: &str, default_secs: u64) -> Result<Duration> {
        Ok(self
            .opt_duration(key)?
            .unwrap_or(Duration::from_secs(default_secs)))
    }

    /// A key the reference reads but this port does not use.
    pub fn ignore(&mut self, key: &str, why: &str, warnings: &mut Vec<ConfigWarning>) {
        if self.raw(key).is_some() {
            warnings.push(ConfigWarning {
                path: self.path_of(key),
                message: format!("ignored: {why}"),
            });
        }
    }

    /// Marks a key as consumed without reading it (read elsewhere).
    pub fn mark(&mut self, key: &str) {
        let _ = self.raw(key);
    }

    /// Reports every key not consumed as unknown.
    pub fn finish(self, warnings: &mut Vec<ConfigWarning>) {
        for k in self.map.keys() {
            if !self.used.contains(k.as_str()) {
                warnings.push(ConfigWarning {
                    path: key_path(&self.path, k),
                    message: "unknown key".to_string(),
                });
            }
        }
    }
}
