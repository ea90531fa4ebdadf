//! SMTP gateway configuration (`spec/gateway.md` §1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::error::{ConfigError, ConfigWarning};
use super::router::TlsFiles;
use super::value::{self, Obj, Result, key_path, parse_yaml};
use super::{
    ExecutorConfig, HostPort, TlsVerify, addr_pair, cert_key, check_file, executor, logging,
    named_list, read_file, tls_verify,
};

/// The whole gateway YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub global: GatewayGlobal,
    pub rest_listener: GatewayRestListener,
    pub smtp_output: SmtpOutputConfig,
    /// YAML `smtp_listener.services`.
    pub smtp_services: Vec<SmtpServiceConfig>,
    /// YAML `rest_output` (router endpoints used by the listener).
    pub rest_outputs: Vec<GatewayRestOutput>,
    pub logging: Option<Value>,
    warnings: Vec<ConfigWarning>,
}

/// `global`.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayGlobal {
    /// `executor` (10, 3600 s).
    pub executor: ExecutorConfig,
}

/// `rest_listener`: the REST server the router talks to.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayRestListener {
    pub addr: HostPort,
    pub tls: Option<TlsFiles>,
    /// Base of `Location` headers and body URIs.
    pub session_uri: String,
    /// Default 16.
    pub rest_id_entropy: usize,
    /// Default 1 MiB.
    pub chunk_size: usize,
    /// GC loop period (default 5 s).
    pub gc_interval: Duration,
    /// Unfinished tx idle time before it is cancelled (default 600 s).
    pub gc_tx_ttl: Duration,
    /// Finished tx idle time before it is forgotten (default 10 s).
    pub gc_done_ttl: Duration,
}

/// `smtp_output`.
#[derive(Debug, Clone, PartialEq)]
pub struct SmtpOutputConfig {
    /// Keyed by the tag the router sends in `sender.tag`.
    pub hosts: BTreeMap<String, SmtpHostConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpProtocol {
    Smtp,
    Lmtp,
}

/// `smtp_output.hosts.<tag>`.
#[derive(Debug, Clone, PartialEq)]
pub struct SmtpHostConfig {
    /// Name sent in EHLO/LHLO.
    pub ehlo_host: String,
    /// Connect and per-command socket timeout (default 3300 s; null = 30 s).
    pub timeout: Duration,
    pub protocol: SmtpProtocol,
    /// Use BDAT when the server offers CHUNKING (default false).
    pub enable_bdat: bool,
    /// Bytes per DATA write / BDAT chunk (default 65536).
    pub chunk_size: usize,
}

/// `smtp_listener.services[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SmtpServiceConfig {
    pub addr: HostPort,
    /// Name of a `rest_output` entry.
    pub endpoint: String,
    /// `sender.name` in the create JSON.
    pub sender: String,
    /// `sender.tag`: selects the router output chain.
    pub tag: String,
    /// STARTTLS (or implicit TLS with `smtps`).
    pub tls: Option<TlsFiles>,
    pub smtps: bool,
    /// AUTH secrets file.
    pub auth_secrets: Option<PathBuf>,
    /// Expect a PROXY header within this time (> 0).
    pub proxy_protocol_timeout: Option<Duration>,
    /// Offer CHUNKING/BDAT (default false).
    pub enable_bdat: bool,
    /// Listener-side DATA buffering; `None` = the listener's default.
    pub chunk_size: Option<usize>,
    /// Wait for the router's RCPT response (default 40 s).
    pub rcpt_timeout: Duration,
    /// Wait per DATA push (default 310 s).
    pub data_timeout: Duration,
    /// Rust extension: greeting/EHLO name; `None` = this host's FQDN.
    pub hostname: Option<String>,
    /// Rust extension: `SIZE` limit (default 33554432).
    pub max_message_size: u64,
    /// Rust extension: idle time per client read (default 300 s).
    pub command_timeout: Duration,
}

/// `rest_output[]`: a router endpoint the listener creates transactions at.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayRestOutput {
    pub name: String,
    /// Router create URL (`…/senders/<name>/transactions`).
    pub endpoint: String,
    pub verify: TlsVerify,
    /// Deadline of each REST step (default 30 s).
    pub rcpt_timeout: Duration,
    /// HTTP timeout per body PUT (default 60 s).
    pub data_timeout: Duration,
    /// One value for PUT chunks and listener buffering (default 1 MiB).
    pub chunk_size: usize,
    /// Push buffered data at least this often (default 30 s).
    pub refresh_interval: Duration,
}

impl GatewayConfig {
    pub fn from_yaml_str(src: &str) -> Result<GatewayConfig> {
        parse(&parse_yaml(src)?)
    }

    pub fn load(path: impl AsRef<Path>) -> Result<GatewayConfig> {
        Self::from_yaml_str(&read_file(path.as_ref())?)
    }

    pub fn warnings(&self) -> &[ConfigWarning] {
        &self.warnings
    }

    pub fn rest_output(&self, name: &str) -> Option<&GatewayRestOutput> {
        self.rest_outputs.iter().find(|r| r.name == name)
    }

    /// Startup checks that touch the file system: TLS files, CA bundles,
    /// AUTH secrets exist; `smtps` has a certificate (Python would silently
    /// listen in plaintext).
    pub fn validate_files(&self) -> Result<()> {
        if let Some(t) = &self.rest_listener.tls {
            check_file("rest_listener.cert", &t.cert)?;
            check_file("rest_listener.key", &t.key)?;
        }
        for (i, s) in self.smtp_services.iter().enumerate() {
            let p = format!("smtp_listener.services[{i}]");
            match &s.tls {
                Some(t) => {
                    check_file(&key_path(&p, "cert"), &t.cert)?;
                    check_file(&key_path(&p, "key"), &t.key)?;
                }
                None if s.smtps => {
                    return Err(ConfigError::invalid(
                        key_path(&p, "cert"),
                        "missing (required with smtps: true)",
                    ));
                }
                None => {}
            }
            if let Some(a) = &s.auth_secrets {
                check_file(&key_path(&p, "auth_secrets"), a)?;
            }
        }
        for (i, r) in self.rest_outputs.iter().enumerate() {
            if let TlsVerify::CaFile(ca) = &r.verify {
                check_file(&format!("rest_output[{i}].verify"), ca)?;
            }
        }
        Ok(())
    }
}

fn parse(root: &Value) -> Result<GatewayConfig> {
    let mut w = Vec::new();
    let mut top = Obj::new("", root).map_err(|_| {
        ConfigError::invalid(
            "(top level)",
            format!("expected a mapping, got {}", value::kind(root)),
        )
    })?;

    let global = match top.get("global") {
        None => GatewayGlobal {
            executor: executor("global.executor", None, 10, 3600, &mut w)?,
        },
        Some(v) => {
            let mut o = Obj::new("global", v)?;
            let ex = executor("global.executor", o.get("executor"), 10, 3600, &mut w)?;
            o.finish(&mut w);
            GatewayGlobal { executor: ex }
        }
    };

    let rest_listener = parse_rest_listener(top.raw("rest_listener"), &mut w)?;
    let smtp_output = parse_smtp_output(top.raw("smtp_output"), &mut w)?;

    let mut rest_outputs = Vec::new();
    for (name, p, v) in named_list("rest_output", top.get("rest_output"))? {
        rest_outputs.push(parse_rest_output(name, &p, v, &mut w)?);
    }

    let smtp_services = {
        let v = top
            .raw("smtp_listener")
            .ok_or_else(|| ConfigError::invalid("smtp_listener", "missing"))?;
        let mut o = Obj::new_or_empty("smtp_listener", v)?;
        let list = value::as_list("smtp_listener.services", o.req("services")?)?;
        let mut out = Vec::new();
        for (i, v) in list.iter().enumerate() {
            let p = format!("smtp_listener.services[{i}]");
            let s = parse_service(&p, v, &mut w)?;
            if !rest_outputs.iter().any(|r| r.name == s.endpoint) {
                return Err(ConfigError::invalid(
                    key_path(&p, "endpoint"),
                    format!("no rest_output named \"{}\"", s.endpoint),
                ));
            }
            out.push(s);
        }
        o.finish(&mut w);
        out
    };

    let logging = logging("logging", top.get("logging"))?;
    top.finish(&mut w);
    Ok(GatewayConfig {
        global,
        rest_listener,
        smtp_output,
        smtp_services,
        rest_outputs,
        logging,
        warnings: w,
    })
}

fn parse_rest_listener(
    v: Option<&Value>,
    w: &mut Vec<ConfigWarning>,
) -> Result<GatewayRestListener> {
    let v = v.ok_or_else(|| ConfigError::invalid("rest_listener", "missing"))?;
    let mut o = Obj::new_or_empty("rest_listener", v)?;
    let addr = addr_pair("rest_listener.addr", o.req("addr")?)?;
    let tls = cert_key(&mut o)?.map(|(cert, key)| TlsFiles { cert, key });
    // Python starts without it but fails every request.
    let session_uri = o.req_str("session_uri")?;
    let rest_id_entropy = o.usize_or("rest_id_entropy", 16)?;
    if rest_id_entropy == 0 {
        return Err(ConfigError::invalid(
            "rest_listener.rest_id_entropy",
            "must be at least 1",
        ));
    }
    let chunk_size = super::filters::chunk_size(&mut o)?.unwrap_or(1 << 20);
    let l = GatewayRestListener {
        addr,
        tls,
        session_uri,
        rest_id_entropy,
        chunk_size,
        gc_interval: o.duration_or("gc_interval", 5)?,
        gc_tx_ttl: o.duration_or("gc_tx_ttl", 600)?,
        gc_done_ttl: o.duration_or("gc_done_ttl", 10)?,
    };
    if l.gc_interval.is_zero() {
        return Err(ConfigError::invalid(
            "rest_listener.gc_interval",
            "must be greater than 0",
        ));
    }
    o.ignore("service_uri", "the gateway uses session_uri", w);
    o.ignore("gc_blob_ttl", "not read by the gateway", w);
    o.finish(w);
    Ok(l)
}

fn parse_smtp_output(v: Option<&Value>, w: &mut Vec<ConfigWarning>) -> Result<SmtpOutputConfig> {
    let v = v.ok_or_else(|| ConfigError::invalid("smtp_output", "missing"))?;
    let mut o = Obj::new_or_empty("smtp_output", v)?;
    o.ignore("use_system_smtplib", "Python implementation detail", w);
    let hp = o.path_of("hosts");
    let hosts_v = o
        .raw("hosts")
        .ok_or_else(|| ConfigError::invalid(&hp, "missing"))?;
    let hosts_o = Obj::new_or_empty(&hp, hosts_v)?;
    let mut hosts = BTreeMap::new();
    for (tag, hv) in hosts_o.map {
        let p = key_path(&hp, tag);
        let mut h = Obj::new(&p, hv)?;
        let ehlo_host = h.req_str("ehlo_host")?;
        let timeout = match h.raw("timeout") {
            None => Duration::from_secs(3300),
            // The reference's client falls back to its built-in 30 s.
            Some(Value::Null) => Duration::from_secs(30),
            Some(v) => value::as_duration(&h.path_of("timeout"), v)?,
        };
        let protocol = match h.opt_str("protocol")?.as_deref() {
            None | Some("smtp") => SmtpProtocol::Smtp,
            Some("lmtp") => SmtpProtocol::Lmtp,
            Some(other) => {
                return Err(ConfigError::invalid(
                    h.path_of("protocol"),
                    format!("expected smtp or lmtp, got \"{other}\""),
                ));
            }
        };
        let cfg = SmtpHostConfig {
            ehlo_host,
            timeout,
            protocol,
            enable_bdat: h.bool_or("enable_bdat", false)?,
            chunk_size: super::filters::chunk_size(&mut h)?.unwrap_or(65536),
        };
        h.finish(w);
        hosts.insert(tag.clone(), cfg);
    }
    o.finish(w);
    Ok(SmtpOutputConfig { hosts })
}

fn parse_service(path: &str, v: &Value, w: &mut Vec<ConfigWarning>) -> Result<SmtpServiceConfig> {
    let mut o = Obj::new(path, v)?;
    let addr = addr_pair(&o.path_of("addr"), o.req("addr")?)?;
    let endpoint = o.req_str("endpoint")?;
    let sender = o.req_str("sender")?;
    let tag = o.req_str("tag")?;
    let tls = cert_key(&mut o)?.map(|(cert, key)| TlsFiles { cert, key });
    let smtps = o.bool_or("smtps", false)?;
    if smtps && tls.is_none() {
        // An error in validate_files(); only a warning here so that the
        // reference file (which does this) still parses.
        w.push(ConfigWarning {
            path: o.path_of("smtps"),
            message: "true without cert/key: the listener cannot start".into(),
        });
    }
    let proxy_protocol_timeout = o.opt_duration("proxy_protocol_timeout")?;
    if proxy_protocol_timeout.is_some_and(|d| d.is_zero()) {
        return Err(ConfigError::invalid(
            o.path_of("proxy_protocol_timeout"),
            "must be greater than 0",
        ));
    }
    if proxy_protocol_timeout.is_some() && smtps {
        w.push(ConfigWarning {
            path: o.path_of("proxy_protocol_timeout"),
            message: "combined with smtps: the PROXY header precedes the TLS handshake".into(),
        });
    }
    let s = SmtpServiceConfig {
        addr,
        endpoint,
        sender,
        tag,
        tls,
        smtps,
        auth_secrets: o.opt_path("auth_secrets")?,
        proxy_protocol_timeout,
        enable_bdat: o.bool_or("enable_bdat", false)?,
        chunk_size: super::filters::chunk_size(&mut o)?,
        rcpt_timeout: o.duration_or("rcpt_timeout", 40)?,
        data_timeout: o.duration_or("data_timeout", 310)?,
        hostname: o.opt_str("hostname")?,
        max_message_size: o.u64_or("max_message_size", 33554432)?,
        command_timeout: o.duration_or("command_timeout", 300)?,
    };
    o.finish(w);
    Ok(s)
}

fn parse_rest_output(
    name: String,
    path: &str,
    v: &Value,
    w: &mut Vec<ConfigWarning>,
) -> Result<GatewayRestOutput> {
    let mut o = Obj::new(path, v)?;
    o.mark("name");
    let r = GatewayRestOutput {
        name,
        endpoint: o.req_str("endpoint")?,
        verify: tls_verify(&o.path_of("verify"), o.get("verify"))?,
        rcpt_timeout: o.duration_or("rcpt_timeout", 30)?,
        data_timeout: o.duration_or("data_timeout", 60)?,
        chunk_size: super::filters::chunk_size(&mut o)?.unwrap_or(1 << 20),
        refresh_interval: o.duration_or("refresh_interval", 30)?,
    };
    o.finish(w);
    Ok(r)
}
