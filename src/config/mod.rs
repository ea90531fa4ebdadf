//! Typed configuration of the router and the SMTP gateway (YAML).
//!
//! Contract: `spec/config.md` (router) and `spec/gateway.md` §1 (gateway).
//!
//! Conventions:
//! * durations are `std::time::Duration` (YAML: seconds, int or float);
//! * an explicit `null` means "default" except where the spec gives null a
//!   meaning (`retry_params.max_attempts` / `deadline` = no limit, sender
//!   `retry: null` overriding its base sender, `destination:` = placeholder,
//!   `receive_parsing:` = enabled);
//! * YAML 1.1 scalars (`yes/no/on/off`, `010` octal) as PyYAML reads them;
//! * unknown keys are accepted and reported by `warnings()`;
//! * file existence (certs, CA bundles, keys) is checked separately by
//!   `validate_files()` so that parsing stays pure.

mod error;
pub mod filters;
pub mod gateway;
pub mod router;
mod storage_url;
mod value;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub use error::{ConfigError, ConfigWarning, SenderError};
pub use filters::*;
pub use gateway::*;
pub use router::*;
pub use storage_url::{SQLITE_MEMORY, StorageUrl};

pub use crate::transaction::HostPort;
use value::{Obj, Result, as_str, as_u64, index_path};

fn port_of(path: &str, v: &Value) -> Result<u16> {
    let n = as_u64(path, v)?;
    u16::try_from(n).map_err(|_| ConfigError::invalid(path, format!("port {n} out of range")))
}

/// `[host, port]` (listener addresses).
pub(crate) fn addr_pair(path: &str, v: &Value) -> Result<HostPort> {
    let bad = || ConfigError::invalid(path, "expected [host, port]");
    let Value::Array(a) = v else {
        return Err(bad());
    };
    match a.as_slice() {
        [Value::String(h), p @ Value::Number(_)] => Ok(HostPort::new(h.clone(), port_of(path, p)?)),
        _ => Err(bad()),
    }
}

/// `{host, port}` mapping (static_hosts, host_list).
pub(crate) fn host_port_map(
    path: &str,
    v: &Value,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<HostPort> {
    let mut o = Obj::new(path, v)?;
    let host = o.req_str("host")?;
    let port = port_of(&o.path_of("port"), o.req("port")?)?;
    o.finish(warnings);
    Ok(HostPort { host, port })
}

pub(crate) fn host_port_list(
    path: &str,
    v: &Value,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<Vec<HostPort>> {
    value::as_list(path, v)?
        .iter()
        .enumerate()
        .map(|(i, e)| host_port_map(&index_path(path, i), e, warnings))
        .collect()
}

/// TLS server verification for an HTTP client (`verify: true|false|<CA file>`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TlsVerify {
    /// Verify against the system roots (`true`, the default).
    #[default]
    System,
    /// No verification (`false`).
    Disabled,
    /// Verify against this CA bundle (PEM); checked by `validate_files()`.
    CaFile(PathBuf),
}

pub(crate) fn tls_verify(path: &str, v: Option<&Value>) -> Result<TlsVerify> {
    match v {
        None => Ok(TlsVerify::System),
        Some(Value::Bool(true)) => Ok(TlsVerify::System),
        Some(Value::Bool(false)) => Ok(TlsVerify::Disabled),
        Some(Value::String(s)) => Ok(TlsVerify::CaFile(PathBuf::from(s))),
        Some(other) => Err(ConfigError::invalid(
            path,
            format!(
                "expected a boolean or a CA bundle path, got {}",
                value::kind(other)
            ),
        )),
    }
}

/// Bounded task pool settings (`executor.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutorConfig {
    pub max_inflight: usize,
    pub watchdog_timeout: Duration,
}

pub(crate) fn executor(
    path: &str,
    v: Option<&Value>,
    default_inflight: usize,
    default_watchdog_secs: u64,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<ExecutorConfig> {
    let Some(v) = v else {
        return Ok(ExecutorConfig {
            max_inflight: default_inflight,
            watchdog_timeout: Duration::from_secs(default_watchdog_secs),
        });
    };
    let mut o = Obj::new(path, v)?;
    let max_inflight = o.usize_or("max_inflight", default_inflight)?;
    if max_inflight == 0 {
        return Err(ConfigError::invalid(
            o.path_of("max_inflight"),
            "must be at least 1",
        ));
    }
    let watchdog_timeout = o.duration_or("watchdog_timeout", default_watchdog_secs)?;
    o.finish(warnings);
    Ok(ExecutorConfig {
        max_inflight,
        watchdog_timeout,
    })
}

/// Optional `cert` + `key` pair of a TLS listener; both or neither.
pub(crate) fn cert_key(o: &mut Obj<'_>) -> Result<Option<(PathBuf, PathBuf)>> {
    let cert = o.opt_path("cert")?;
    let key = o.opt_path("key")?;
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::invalid(
            o.path_of("key"),
            "missing (required when cert is set)",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            o.path_of("cert"),
            "missing (required when key is set)",
        )),
    }
}

/// `logging`: kept as opaque JSON; only its being a mapping is checked.
pub(crate) fn logging(path: &str, v: Option<&Value>) -> Result<Option<Value>> {
    match v {
        None => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
        Some(other) => Err(ConfigError::invalid(
            path,
            format!("expected a mapping, got {}", value::kind(other)),
        )),
    }
}

pub(crate) fn check_file(path: &str, file: &Path) -> Result<()> {
    if file.is_file() {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            path,
            format!("file \"{}\" does not exist", file.display()),
        ))
    }
}

pub(crate) fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a list of named entries, returning `(name, path, value)`, and
/// rejects missing and duplicate names.
pub(crate) fn named_list<'v>(
    path: &str,
    v: Option<&'v Value>,
) -> Result<Vec<(String, String, &'v Value)>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(String, String, &Value)> = Vec::new();
    for (i, e) in value::as_list(path, v)?.iter().enumerate() {
        let p = index_path(path, i);
        let o = Obj::new(&p, e)?;
        let name_path = o.path_of("name");
        let name = match o.map.get("name") {
            None | Some(Value::Null) => return Err(ConfigError::invalid(name_path, "missing")),
            Some(n) => as_str(&name_path, n)?,
        };
        if let Some(first) = out.iter().position(|(n, _, _)| *n == name) {
            return Err(ConfigError::invalid(
                name_path,
                format!("duplicate name \"{name}\" (also {path}[{first}])"),
            ));
        }
        out.push((name, p, e));
    }
    Ok(out)
}
