//! Router configuration (`spec/config.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::error::{ConfigError, ConfigWarning, SenderError};
use super::filters::{
    BUILTIN_FILTERS, BUILTIN_MATCHERS, BUILTIN_ROUTING_POLICIES, Destination, FilterConfig,
    Registry, RouteOptions, RoutingPolicy, parse_filter, parse_route_options,
};
use super::value::{self, Obj, Result, as_str, index_path, key_path, parse_yaml};
use super::{
    ExecutorConfig, HostPort, StorageUrl, TlsVerify, addr_pair, cert_key, check_file, executor,
    logging, named_list, read_file,
};
use crate::Backoff;

/// Hooks and overrides for loading a router config.
#[derive(Default)]
pub struct LoadOptions<'a> {
    /// Filter names registered by the program, beyond the built-ins and
    /// `modules.sync_filter`.
    pub extra_filters: Option<&'a dyn Fn(&str) -> bool>,
    /// Routing policy names beyond the built-ins and
    /// `modules.recipient_router_policy`.
    pub extra_routing_policies: Option<&'a dyn Fn(&str) -> bool>,
    /// Matcher names beyond the built-ins and `modules.transaction_matcher`.
    pub extra_matchers: Option<&'a dyn Fn(&str) -> bool>,
    /// If set, every `modules.<kind>.<name>: <target>` must be accepted by
    /// it (the compile-time plugin registry); otherwise targets are not
    /// checked here.
    pub module_target: Option<&'a ModuleCheck>,
    /// Replaces `storage.url` (the shipped quickstart file leaves it out).
    pub storage_url: Option<String>,
    /// Replaces `rest_listener.addr` (test harnesses pick free ports).
    pub rest_listener_addr: Option<HostPort>,
    /// Replaces `rest_listener.session_uri`.
    pub session_uri: Option<String>,
}

/// Decides whether a `modules` target names a registered plugin.
pub type ModuleCheck = dyn Fn(ModuleKind, &str) -> bool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    SyncFilter,
    RecipientRouterPolicy,
    TransactionMatcher,
}

/// The whole router YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub global: RouterGlobal,
    pub rest_listener: RouterRestListener,
    /// YAML `sender`.
    pub senders: Vec<SenderConfig>,
    /// YAML `rest_endpoint`.
    pub rest_endpoints: Vec<RestEndpointConfig>,
    /// YAML `endpoint` (output chains).
    pub endpoints: Vec<EndpointConfig>,
    pub modules: ModulesConfig,
    pub storage: StorageConfig,
    /// `{version: 1, loggers: {name: {level}}}` or anything else; opaque.
    pub logging: Option<Value>,
    warnings: Vec<ConfigWarning>,
}

/// `global`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterGlobal {
    /// Run the dequeue loop on this replica (default true).
    pub dequeue: bool,
    /// `executor.rest` (10, 30 s).
    pub rest_executor: ExecutorConfig,
    /// `executor.output` (10, 30 s).
    pub output_executor: ExecutorConfig,
    /// `From` of generated DSNs; required if any chain has notification.
    pub mailer_daemon_mailbox: Option<String>,
    /// Random bytes per transaction id (default 16).
    pub rest_id_entropy: usize,
}

/// `cert` + `key` of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `rest_listener`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterRestListener {
    pub addr: HostPort,
    /// HTTPS when set (YAML: both `cert` and `key`).
    pub tls: Option<TlsFiles>,
    /// Base URL of this replica.
    pub session_uri: String,
    /// Base URL of the service as a whole (default `session_uri`).
    pub service_uri: String,
    /// Blob PUT buffering in bytes (default 1 MiB).
    pub chunk_size: usize,
}

/// One `sender` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SenderConfig {
    pub name: String,
    pub settings: SenderSettings,
    /// `None`: no tag list (a requested tag is an error, see
    /// `SenderError::TagsNotSupported`).
    pub tags: Option<Vec<SenderTag>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SenderTag {
    pub name: String,
    pub settings: SenderSettings,
}

/// The keys a tag can override; `None` = not set at this level. An
/// explicit null counts as "not set" except for `retry`/`notification`,
/// where null is an override to "off".
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SenderSettings {
    pub output_chain: Option<String>,
    /// `Some(true)` = `retry: output_chain`.
    pub retry: Option<bool>,
    /// `Some(true)` = `notification: output_chain`.
    pub notification: Option<bool>,
    pub upstream_sender: Option<String>,
    pub upstream_tag: Option<String>,
    pub remote_host: Option<String>,
    pub smtp_meta: Option<Map<String, Value>>,
}

impl SenderSettings {
    fn overlay(&self, over: &SenderSettings) -> SenderSettings {
        SenderSettings {
            output_chain: over.output_chain.clone().or(self.output_chain.clone()),
            retry: over.retry.or(self.retry),
            notification: over.notification.or(self.notification),
            upstream_sender: over
                .upstream_sender
                .clone()
                .or(self.upstream_sender.clone()),
            upstream_tag: over.upstream_tag.clone().or(self.upstream_tag.clone()),
            remote_host: over.remote_host.clone().or(self.remote_host.clone()),
            smtp_meta: over.smtp_meta.clone().or(self.smtp_meta.clone()),
        }
    }
}

/// A sender/tag with the tag overlaid and defaults applied (`router.md` §2.6).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSender {
    pub name: String,
    pub tag: Option<String>,
    /// Name of the `endpoint` entry.
    pub output_chain: String,
    /// New transactions get `retry: {}` (`retry: output_chain` and the chain
    /// has an `output_handler`).
    pub retry: bool,
    /// New transactions get `notification: {}` (same gating).
    pub notification: bool,
    /// Exploder upstream sender (default: this sender).
    pub upstream_sender: String,
    /// Exploder upstream tag (default: this tag).
    pub upstream_tag: Option<String>,
    /// For router short-circuit: `remote_host` sent upstream.
    pub remote_host: Option<String>,
    /// Replaces `smtp_meta` sent upstream.
    pub smtp_meta: Option<Map<String, Value>>,
}

impl ResolvedSender {
    /// Whether this sender's chain ends with `exploder` (SMTP-facing).
    pub fn is_incremental(&self, cfg: &RouterConfig) -> bool {
        cfg.endpoint(&self.output_chain)
            .is_some_and(EndpointConfig::is_incremental)
    }

    /// The sender of this sender's Exploder upstream transactions.
    pub fn upstream(&self, cfg: &RouterConfig) -> std::result::Result<ResolvedSender, SenderError> {
        cfg.resolve_sender(&self.upstream_sender, self.upstream_tag.as_deref())
    }
}

/// One `rest_endpoint` entry: a named HTTP destination for routes.
#[derive(Debug, Clone, PartialEq)]
pub struct RestEndpointConfig {
    pub name: String,
    /// Transaction-creation URL. Required by the spec; `None` is accepted
    /// (with a warning) because the reference test config omits it.
    pub endpoint: Option<String>,
    pub sender: String,
    pub tag: Option<String>,
    pub options: RouteOptions,
}

/// One `endpoint` entry: an output chain.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub name: String,
    pub output_handler: Option<OutputHandlerConfig>,
    pub chain: Vec<FilterConfig>,
}

impl EndpointConfig {
    /// Ends with `exploder` (accepts SMTP-style incremental updates).
    pub fn is_incremental(&self) -> bool {
        matches!(self.chain.last(), Some(FilterConfig::Exploder(_)))
    }

    pub fn retry_params(&self) -> Option<&RetryParams> {
        self.output_handler.as_ref()?.retry_params.as_ref()
    }

    pub fn notification(&self) -> Option<&NotificationConfig> {
        self.output_handler.as_ref()?.notification.as_ref()
    }
}

/// `endpoint[].output_handler`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputHandlerConfig {
    /// Default 60 s.
    pub downstream_timeout: Duration,
    /// Default 30 s.
    pub upstream_refresh: Duration,
    /// `None`: no retry scheduling.
    pub retry_params: Option<RetryParams>,
    /// `None`: no DSNs.
    pub notification: Option<NotificationConfig>,
}

/// `output_handler.retry_params`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryParams {
    /// Default 30; `None` (YAML null) = unlimited.
    pub max_attempts: Option<u32>,
    /// Default 60 s.
    pub min_attempt_time: Duration,
    /// Default 3600 s.
    pub max_attempt_time: Duration,
    /// Default 1.5.
    pub backoff_factor: f64,
    /// Default 86400 s; `None` (YAML null) = no deadline.
    pub deadline: Option<Duration>,
    /// Delay after an unexpected internal error (default 3600 s).
    pub bug_retry: Duration,
}

impl Default for RetryParams {
    fn default() -> Self {
        RetryParams {
            max_attempts: Some(30),
            min_attempt_time: Duration::from_secs(60),
            max_attempt_time: Duration::from_secs(3600),
            backoff_factor: 1.5,
            deadline: Some(Duration::from_secs(86400)),
            bug_retry: Duration::from_secs(3600),
        }
    }
}

impl RetryParams {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            max_attempts: self.max_attempts,
            min_attempt_time: self.min_attempt_time,
            max_attempt_time: self.max_attempt_time,
            factor: self.backoff_factor,
            deadline: self.deadline,
        }
    }
}

/// `output_handler.notification`: who sends the DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationConfig {
    pub sender: String,
    pub tag: Option<String>,
}

/// `modules`: plugin name → target (`python.module[:function]` in the
/// reference; the embedding program's registry decides what it means).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModulesConfig {
    pub sync_filter: BTreeMap<String, String>,
    pub recipient_router_policy: BTreeMap<String, String>,
    pub transaction_matcher: BTreeMap<String, String>,
}

/// `storage`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    pub url: StorageUrl,
    /// Session heartbeat period (default 30 s).
    pub session_refresh_interval: Duration,
    /// GC period; `None` (absent, null or 0) = GC disabled.
    pub gc_interval: Option<Duration>,
    /// Default 86400 s.
    pub gc_ttl: Duration,
    /// Default 10 s.
    pub blob_tx_refresh_interval: Duration,
    /// Default 5 s.
    pub cache_ttl: Duration,
    /// Store the SMTP-facing transaction of an exploder chain too (default false: it is
    /// kept in the memory of the replica that took it; its recipients are stored). Needed
    /// when one transaction's requests may reach different replicas (a load balancer
    /// without affinity), or to read such transactions after a restart.
    pub store_smtp_transactions: bool,
}

impl RouterConfig {
    pub fn from_yaml_str(src: &str) -> Result<RouterConfig> {
        Self::from_yaml_str_with(src, &LoadOptions::default())
    }

    pub fn from_yaml_str_with(src: &str, opts: &LoadOptions<'_>) -> Result<RouterConfig> {
        let v = parse_yaml(src)?;
        let mut cfg = parse(&v, opts)?;
        validate(&mut cfg)?;
        Ok(cfg)
    }

    pub fn load(path: impl AsRef<Path>) -> Result<RouterConfig> {
        Self::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: impl AsRef<Path>, opts: &LoadOptions<'_>) -> Result<RouterConfig> {
        Self::from_yaml_str_with(&read_file(path.as_ref())?, opts)
    }

    /// Unknown or ignored keys and discouraged combinations.
    pub fn warnings(&self) -> &[ConfigWarning] {
        &self.warnings
    }

    pub fn endpoint(&self, name: &str) -> Option<&EndpointConfig> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    pub fn sender(&self, name: &str) -> Option<&SenderConfig> {
        self.senders.iter().find(|s| s.name == name)
    }

    pub fn rest_endpoint(&self, name: &str) -> Option<&RestEndpointConfig> {
        self.rest_endpoints.iter().find(|e| e.name == name)
    }

    /// Resolves a sender and optional tag (`router.md` §2.6): the tag entry
    /// is overlaid key by key on the sender entry.
    pub fn resolve_sender(
        &self,
        name: &str,
        tag: Option<&str>,
    ) -> std::result::Result<ResolvedSender, SenderError> {
        let s = self
            .sender(name)
            .ok_or_else(|| SenderError::UnknownSender(name.to_string()))?;
        let settings = match (tag, &s.tags) {
            (None, _) => s.settings.clone(),
            (Some(t), None) => {
                return Err(SenderError::TagsNotSupported {
                    sender: name.into(),
                    tag: t.into(),
                });
            }
            (Some(t), Some(tags)) => {
                let te =
                    tags.iter()
                        .find(|e| e.name == t)
                        .ok_or_else(|| SenderError::UnknownTag {
                            sender: name.into(),
                            tag: t.into(),
                        })?;
                s.settings.overlay(&te.settings)
            }
        };
        let output_chain = settings
            .output_chain
            .ok_or_else(|| SenderError::NoOutputChain {
                sender: name.into(),
                tag: tag.map(str::to_string),
            })?;
        let has_oh = self
            .endpoint(&output_chain)
            .is_some_and(|e| e.output_handler.is_some());
        Ok(ResolvedSender {
            name: name.to_string(),
            tag: tag.map(str::to_string),
            retry: has_oh && settings.retry == Some(true),
            notification: has_oh && settings.notification == Some(true),
            output_chain,
            upstream_sender: settings.upstream_sender.unwrap_or_else(|| name.to_string()),
            upstream_tag: settings.upstream_tag.or(tag.map(str::to_string)),
            remote_host: settings.remote_host,
            smtp_meta: settings.smtp_meta,
        })
    }

    /// Checks that every file the config names exists (TLS cert/key, CA
    /// bundles, DKIM keys). Separate from parsing so parsing stays pure.
    pub fn validate_files(&self) -> Result<()> {
        if let Some(t) = &self.rest_listener.tls {
            check_file("rest_listener.cert", &t.cert)?;
            check_file("rest_listener.key", &t.key)?;
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            for (j, f) in e.chain.iter().enumerate() {
                let p = format!("endpoint[{i}].chain[{j}]");
                match f {
                    FilterConfig::RestOutput(r) => {
                        if let TlsVerify::CaFile(ca) = &r.verify {
                            check_file(&key_path(&p, "verify"), ca)?;
                        }
                    }
                    FilterConfig::DkimSign(d) => {
                        if let Some(k) = &d.key {
                            check_file(&key_path(&p, "key"), k)?;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

fn parse(root: &Value, opts: &LoadOptions<'_>) -> Result<RouterConfig> {
    let mut w = Vec::new();
    let mut top = Obj::new("", root).map_err(|_| {
        ConfigError::invalid(
            "(top level)",
            format!("expected a mapping, got {}", value::kind(root)),
        )
    })?;

    let modules = parse_modules(top.get("modules"), opts, &mut w)?;
    let no = |_: &str| false;
    let extra_f = opts.extra_filters.unwrap_or(&no);
    let extra_p = opts.extra_routing_policies.unwrap_or(&no);
    let extra_m = opts.extra_matchers.unwrap_or(&no);
    let is_plugin_filter = |n: &str| modules.sync_filter.contains_key(n) || extra_f(n);
    let is_plugin_policy = |n: &str| modules.recipient_router_policy.contains_key(n) || extra_p(n);
    let is_plugin_matcher = |n: &str| modules.transaction_matcher.contains_key(n) || extra_m(n);
    let reg = Registry {
        is_plugin_filter: &is_plugin_filter,
        is_plugin_policy: &is_plugin_policy,
        is_plugin_matcher: &is_plugin_matcher,
    };

    let global = parse_global(top.get("global"), &mut w)?;
    let rest_listener = parse_rest_listener(top.raw("rest_listener"), opts, &mut w)?;
    let storage = parse_storage(top.raw("storage"), opts, &mut w)?;

    let mut rest_endpoints = Vec::new();
    for (name, p, v) in named_list("rest_endpoint", top.get("rest_endpoint"))? {
        rest_endpoints.push(parse_rest_endpoint(name, &p, v, &mut w)?);
    }

    let endpoint_list = top.get("endpoint");
    if endpoint_list.is_none() {
        return Err(ConfigError::invalid("endpoint", "missing"));
    }
    let mut endpoints = Vec::new();
    for (name, p, v) in named_list("endpoint", endpoint_list)? {
        endpoints.push(parse_endpoint(name, &p, v, &reg, &mut w)?);
    }

    let mut senders = Vec::new();
    for (name, p, v) in named_list("sender", top.get("sender"))? {
        senders.push(parse_sender(name, &p, v, &mut w)?);
    }

    let logging = logging("logging", top.get("logging"))?;
    top.finish(&mut w);
    Ok(RouterConfig {
        global,
        rest_listener,
        senders,
        rest_endpoints,
        endpoints,
        modules,
        storage,
        logging,
        warnings: w,
    })
}

fn parse_modules(
    v: Option<&Value>,
    opts: &LoadOptions<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<ModulesConfig> {
    let mut m = ModulesConfig::default();
    let Some(v) = v else { return Ok(m) };
    let mut o = Obj::new("modules", v)?;
    let kinds: [(&str, ModuleKind, &[&str], &str); 3] = [
        (
            "sync_filter",
            ModuleKind::SyncFilter,
            BUILTIN_FILTERS,
            "filter",
        ),
        (
            "recipient_router_policy",
            ModuleKind::RecipientRouterPolicy,
            BUILTIN_ROUTING_POLICIES,
            "routing policy",
        ),
        (
            "transaction_matcher",
            ModuleKind::TransactionMatcher,
            BUILTIN_MATCHERS,
            "matcher",
        ),
    ];
    for (key, kind, builtins, what) in kinds {
        let Some(v) = o.get(key) else { continue };
        let p = o.path_of(key);
        let Value::Object(map) = v else {
            return Err(ConfigError::invalid(
                p,
                format!("expected a mapping, got {}", value::kind(v)),
            ));
        };
        let dest = match kind {
            ModuleKind::SyncFilter => &mut m.sync_filter,
            ModuleKind::RecipientRouterPolicy => &mut m.recipient_router_policy,
            ModuleKind::TransactionMatcher => &mut m.transaction_matcher,
        };
        for (name, target) in map {
            let np = key_path(&p, name);
            if builtins.contains(&name.as_str()) {
                return Err(ConfigError::invalid(
                    np,
                    format!("name collides with the built-in {what} \"{name}\""),
                ));
            }
            let target = as_str(&np, target)?;
            if let Some(known) = opts.module_target
                && !known(kind, &target)
            {
                return Err(ConfigError::invalid(
                    np,
                    format!("unknown plugin \"{target}\""),
                ));
            }
            dest.insert(name.clone(), target);
        }
    }
    o.finish(w);
    Ok(m)
}

fn parse_global(v: Option<&Value>, w: &mut Vec<ConfigWarning>) -> Result<RouterGlobal> {
    let null = Value::Null;
    let mut o = Obj::new_or_empty("global", v.unwrap_or(&null))?;
    let dequeue = o.bool_or("dequeue", true)?;
    let (rest_executor, output_executor) = match o.get("executor") {
        None => (
            executor("global.executor.rest", None, 10, 30, w)?,
            executor("global.executor.output", None, 10, 30, w)?,
        ),
        Some(ev) => {
            let mut e = Obj::new("global.executor", ev)?;
            let rest = executor(&e.path_of("rest"), e.get("rest"), 10, 30, w)?;
            let output = executor(&e.path_of("output"), e.get("output"), 10, 30, w)?;
            e.finish(w);
            (rest, output)
        }
    };
    let mailer_daemon_mailbox = o.opt_str("mailer_daemon_mailbox")?;
    let rest_id_entropy = o.usize_or("rest_id_entropy", 16)?;
    if rest_id_entropy == 0 {
        return Err(ConfigError::invalid(
            "global.rest_id_entropy",
            "must be at least 1",
        ));
    }
    o.ignore(
        "gc_interval",
        "not read by the router (see storage.gc_interval)",
        w,
    );
    o.ignore("tx_idle_timeout", "not read by the router", w);
    o.finish(w);
    Ok(RouterGlobal {
        dequeue,
        rest_executor,
        output_executor,
        mailer_daemon_mailbox,
        rest_id_entropy,
    })
}

fn parse_rest_listener(
    v: Option<&Value>,
    opts: &LoadOptions<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<RouterRestListener> {
    let v = v.ok_or_else(|| ConfigError::invalid("rest_listener", "missing"))?;
    let mut o = Obj::new_or_empty("rest_listener", v)?;
    let addr = match (&opts.rest_listener_addr, o.get("addr")) {
        (Some(a), _) => a.clone(),
        (None, Some(v)) => addr_pair("rest_listener.addr", v)?,
        (None, None) => return Err(ConfigError::invalid("rest_listener.addr", "missing")),
    };
    let tls = cert_key(&mut o)?.map(|(cert, key)| TlsFiles { cert, key });
    let yaml_session = o.opt_str("session_uri")?;
    let session_uri = match (&opts.session_uri, yaml_session) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s,
        (None, None) => {
            return Err(ConfigError::invalid("rest_listener.session_uri", "missing"));
        }
    };
    let service_uri = o
        .opt_str("service_uri")?
        .unwrap_or_else(|| session_uri.clone());
    let chunk_size = super::filters::chunk_size(&mut o)?.unwrap_or(1 << 20);
    o.finish(w);
    Ok(RouterRestListener {
        addr,
        tls,
        session_uri,
        service_uri,
        chunk_size,
    })
}

fn parse_storage(
    v: Option<&Value>,
    opts: &LoadOptions<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<StorageConfig> {
    let v = v.ok_or_else(|| ConfigError::invalid("storage", "missing"))?;
    let mut o = Obj::new_or_empty("storage", v)?;
    let yaml_url = o.opt_str("url")?;
    let url_text = match (&opts.storage_url, yaml_url) {
        (Some(u), _) => u.clone(),
        (None, Some(u)) => u,
        (None, None) => return Err(ConfigError::invalid("storage.url", "missing")),
    };
    let url = StorageUrl::parse(&url_text).map_err(|r| ConfigError::invalid("storage.url", r))?;
    // The reference tests truthiness: 0 disables GC like absence does.
    let gc_interval = o.opt_duration("gc_interval")?.filter(|d| !d.is_zero());
    let cfg = StorageConfig {
        url,
        session_refresh_interval: o.duration_or("session_refresh_interval", 30)?,
        gc_interval,
        gc_ttl: o.duration_or("gc_ttl", 86400)?,
        blob_tx_refresh_interval: o.duration_or("blob_tx_refresh_interval", 10)?,
        cache_ttl: o.duration_or("cache_ttl", 5)?,
        store_smtp_transactions: o.bool_or("store_smtp_transactions", false)?,
    };
    if cfg.session_refresh_interval.is_zero() {
        return Err(ConfigError::invalid(
            "storage.session_refresh_interval",
            "must be greater than 0",
        ));
    }
    o.finish(w);
    Ok(cfg)
}

fn parse_rest_endpoint(
    name: String,
    path: &str,
    v: &Value,
    w: &mut Vec<ConfigWarning>,
) -> Result<RestEndpointConfig> {
    let mut o = Obj::new(path, v)?;
    o.mark("name");
    let endpoint = o.opt_str("endpoint")?;
    if endpoint.is_none() {
        w.push(ConfigWarning {
            path: o.path_of("endpoint"),
            message: "missing: routes to this endpoint have no URL".into(),
        });
    }
    let sender = o.req_str("sender")?;
    let tag = o.opt_str("tag")?;
    let options = parse_route_options(&o.path_of("options"), o.get("options"), w)?;
    o.finish(w);
    Ok(RestEndpointConfig {
        name,
        endpoint,
        sender,
        tag,
        options,
    })
}

fn parse_endpoint(
    name: String,
    path: &str,
    v: &Value,
    reg: &Registry<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<EndpointConfig> {
    let mut o = Obj::new(path, v)?;
    o.mark("name");
    o.ignore("msa", "the exploder filter's own msa key is used", w);
    let output_handler = match o.raw("output_handler") {
        None => None,
        Some(v) => Some(parse_output_handler(&o.path_of("output_handler"), v, w)?),
    };
    let chain_path = o.path_of("chain");
    let list = value::as_list(&chain_path, o.req("chain")?)?;
    let chain = list
        .iter()
        .enumerate()
        .map(|(i, f)| parse_filter(&index_path(&chain_path, i), f, reg, w))
        .collect::<Result<Vec<_>>>()?;
    match chain.last() {
        None => return Err(ConfigError::invalid(chain_path, "empty")),
        Some(f) if !f.may_be_terminal() => {
            return Err(ConfigError::invalid(
                index_path(&chain_path, chain.len() - 1),
                format!(
                    "last filter \"{}\" is not terminal (expected rest_output, exploder, exploder_upstream or a plugin)",
                    f.name()
                ),
            ));
        }
        _ => {}
    }
    o.finish(w);
    Ok(EndpointConfig {
        name,
        output_handler,
        chain,
    })
}

fn parse_output_handler(
    path: &str,
    v: &Value,
    w: &mut Vec<ConfigWarning>,
) -> Result<OutputHandlerConfig> {
    let mut o = Obj::new_or_empty(path, v)?;
    let downstream_timeout = o.duration_or("downstream_timeout", 60)?;
    let upstream_refresh = o.duration_or("upstream_refresh", 30)?;
    let retry_params = match o.get("retry_params") {
        None => None,
        Some(v) => Some(parse_retry_params(&o.path_of("retry_params"), v, w)?),
    };
    let notification = match o.get("notification") {
        None => None,
        Some(v) => {
            let mut n = Obj::new(&o.path_of("notification"), v)?;
            let cfg = NotificationConfig {
                sender: n.req_str("sender")?,
                tag: n.opt_str("tag")?,
            };
            n.finish(w);
            Some(cfg)
        }
    };
    o.finish(w);
    Ok(OutputHandlerConfig {
        downstream_timeout,
        upstream_refresh,
        retry_params,
        notification,
    })
}

fn parse_retry_params(path: &str, v: &Value, w: &mut Vec<ConfigWarning>) -> Result<RetryParams> {
    let mut o = Obj::new(path, v)?;
    let d = RetryParams::default();
    // Absent = default; explicit null = no limit.
    let max_attempts = match o.raw("max_attempts") {
        None => d.max_attempts,
        Some(Value::Null) => None,
        Some(v) => {
            let p = o.path_of("max_attempts");
            let n = value::as_u64(&p, v)?;
            Some(u32::try_from(n).map_err(|_| ConfigError::invalid(p, "too large"))?)
        }
    };
    let deadline = match o.raw("deadline") {
        None => d.deadline,
        Some(Value::Null) => None,
        Some(v) => Some(value::as_duration(&o.path_of("deadline"), v)?),
    };
    let min_attempt_time = o.duration_or("min_attempt_time", 60)?;
    let max_attempt_time = o.duration_or("max_attempt_time", 3600)?;
    let backoff_factor = o.f64_or("backoff_factor", d.backoff_factor)?;
    if backoff_factor < 0.0 {
        return Err(ConfigError::invalid(
            o.path_of("backoff_factor"),
            "must not be negative",
        ));
    }
    let bug_retry = o.duration_or("bug_retry", 3600)?;
    o.finish(w);
    Ok(RetryParams {
        max_attempts,
        min_attempt_time,
        max_attempt_time,
        backoff_factor,
        deadline,
        bug_retry,
    })
}

fn parse_sender(
    name: String,
    path: &str,
    v: &Value,
    w: &mut Vec<ConfigWarning>,
) -> Result<SenderConfig> {
    let mut o = Obj::new(path, v)?;
    o.mark("name");
    let settings = parse_sender_settings(&mut o, w)?;
    let tags = match o.get("tag") {
        None => None,
        Some(tv) => {
            let mut tags = Vec::new();
            for (tname, tp, tv) in named_list(&o.path_of("tag"), Some(tv))? {
                let mut t = Obj::new(&tp, tv)?;
                t.mark("name");
                let settings = parse_sender_settings(&mut t, w)?;
                t.finish(w);
                tags.push(SenderTag {
                    name: tname,
                    settings,
                });
            }
            Some(tags)
        }
    };
    o.finish(w);
    Ok(SenderConfig {
        name,
        settings,
        tags,
    })
}

fn parse_sender_settings(o: &mut Obj<'_>, w: &mut Vec<ConfigWarning>) -> Result<SenderSettings> {
    let mut flag = |o: &mut Obj<'_>, key: &str| -> Result<Option<bool>> {
        Ok(match o.raw(key) {
            None => None,
            Some(Value::Null) => Some(false),
            Some(Value::String(s)) if s == "output_chain" => Some(true),
            Some(other) => {
                w.push(ConfigWarning {
                    path: o.path_of(key),
                    message: format!(
                        "{} is treated as null (only \"output_chain\" enables it)",
                        value::kind(other)
                    ),
                });
                Some(false)
            }
        })
    };
    let retry = flag(o, "retry")?;
    let notification = flag(o, "notification")?;
    let smtp_meta = match o.get("smtp_meta") {
        None => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(other) => {
            return Err(ConfigError::invalid(
                o.path_of("smtp_meta"),
                format!("expected a mapping, got {}", value::kind(other)),
            ));
        }
    };
    Ok(SenderSettings {
        output_chain: o.opt_str("output_chain")?,
        retry,
        notification,
        upstream_sender: o.opt_str("upstream_sender")?,
        upstream_tag: o.opt_str("upstream_tag")?,
        remote_host: o.opt_str("remote_host")?,
        smtp_meta,
    })
}

/// Cross-references between sections (`config.md` §4 rules and §11).
fn validate(cfg: &mut RouterConfig) -> Result<()> {
    let mut w = Vec::new();
    validate_senders(cfg, &mut w)?;
    validate_endpoints(cfg, &mut w)?;
    cfg.warnings.extend(w);
    Ok(())
}

fn validate_senders(cfg: &RouterConfig, w: &mut Vec<ConfigWarning>) -> Result<()> {
    for (i, s) in cfg.senders.iter().enumerate() {
        let sp = format!("sender[{i}]");
        let check_chain = |p: &str, c: &Option<String>| -> Result<()> {
            match c {
                Some(c) if cfg.endpoint(c).is_none() => Err(ConfigError::invalid(
                    key_path(p, "output_chain"),
                    format!("no endpoint named \"{c}\""),
                )),
                _ => Ok(()),
            }
        };
        check_chain(&sp, &s.settings.output_chain)?;
        let tags = s.tags.as_deref().unwrap_or_default();
        for (j, t) in tags.iter().enumerate() {
            check_chain(&format!("{sp}.tag[{j}]"), &t.settings.output_chain)?;
        }
        if s.settings.output_chain.is_none() {
            match tags.iter().find(|t| t.settings.output_chain.is_none()) {
                _ if s.tags.is_none() => {
                    return Err(ConfigError::invalid(
                        key_path(&sp, "output_chain"),
                        "missing",
                    ));
                }
                Some(t) => {
                    return Err(ConfigError::invalid(
                        key_path(&sp, "output_chain"),
                        format!("missing (tag \"{}\" does not set one either)", t.name),
                    ));
                }
                None => {}
            }
        }

        // Every resolvable combination: untagged (if it has a chain) and each tag.
        let mut combos: Vec<(String, Option<&str>)> = Vec::new();
        if s.settings.output_chain.is_some() {
            combos.push((sp.clone(), None));
        }
        for (j, t) in tags.iter().enumerate() {
            combos.push((format!("{sp}.tag[{j}]"), Some(t.name.as_str())));
        }
        for (p, tag) in combos {
            let r = cfg
                .resolve_sender(&s.name, tag)
                .map_err(|e| ConfigError::invalid(p.clone(), e.to_string()))?;
            check_resolved(cfg, &p, &r, w)?;
        }
    }
    Ok(())
}

fn check_resolved(
    cfg: &RouterConfig,
    p: &str,
    r: &ResolvedSender,
    w: &mut Vec<ConfigWarning>,
) -> Result<()> {
    let s = cfg.sender(&r.name).expect("resolved");
    let settings = match (&r.tag, &s.tags) {
        (Some(t), Some(tags)) => {
            let te = tags.iter().find(|e| &e.name == t).expect("resolved");
            s.settings.overlay(&te.settings)
        }
        _ => s.settings.clone(),
    };
    let chain = cfg.endpoint(&r.output_chain).expect("checked above");
    let who = match &r.tag {
        Some(t) => format!("sender \"{}\" tag \"{t}\"", r.name),
        None => format!("sender \"{}\"", r.name),
    };
    if settings.notification == Some(true) && settings.retry != Some(true) {
        return Err(ConfigError::invalid(
            key_path(p, "notification"),
            "requires retry: output_chain",
        ));
    }
    if settings.retry == Some(true) {
        if chain.output_handler.is_none() {
            w.push(ConfigWarning {
                path: key_path(p, "retry"),
                message: format!(
                    "no effect: endpoint \"{}\" has no output_handler",
                    chain.name
                ),
            });
        } else if chain.retry_params().is_none() {
            w.push(ConfigWarning {
                path: key_path(p, "retry"),
                message: format!(
                    "endpoint \"{}\" has no output_handler.retry_params",
                    chain.name
                ),
            });
        }
    }
    if r.notification && chain.notification().is_none() {
        w.push(ConfigWarning {
            path: key_path(p, "notification"),
            message: format!(
                "no effect: endpoint \"{}\" has no output_handler.notification",
                chain.name
            ),
        });
    }
    let Some(FilterConfig::Exploder(ex)) = chain.chain.last() else {
        return Ok(());
    };
    for (flag, key) in [(r.retry, "retry"), (r.notification, "notification")] {
        if flag {
            return Err(ConfigError::invalid(
                key_path(p, key),
                format!(
                    "must be null for {who}: its chain \"{}\" ends with exploder",
                    chain.name
                ),
            ));
        }
    }
    let up = r.upstream(cfg).map_err(|e| {
        let key = match e {
            SenderError::UnknownSender(_) => "upstream_sender",
            _ => "upstream_tag",
        };
        ConfigError::invalid(key_path(p, key), format!("exploder upstream: {e}"))
    })?;
    let up_chain = cfg.endpoint(&up.output_chain).expect("validated sender");
    if up_chain.is_incremental() {
        return Err(ConfigError::invalid(
            key_path(p, "upstream_tag"),
            format!(
                "exploder upstream {} uses chain \"{}\", which ends with exploder too",
                describe(&up),
                up_chain.name
            ),
        ));
    }
    if ex.msa {
        // Store-and-forward turns notification on for the upstream tx
        // regardless of its chain (`router.md` §4.1).
        if up_chain.notification().is_none() {
            return Err(ConfigError::invalid(
                key_path(p, "upstream_tag"),
                format!(
                    "exploder (msa) upstream chain \"{}\" needs output_handler.notification",
                    up_chain.name
                ),
            ));
        }
        if up_chain.retry_params().is_none() {
            w.push(ConfigWarning {
                path: key_path(p, "upstream_tag"),
                message: format!(
                    "exploder (msa) upstream chain \"{}\" has no output_handler.retry_params",
                    up_chain.name
                ),
            });
        }
    }
    Ok(())
}

fn describe(r: &ResolvedSender) -> String {
    match &r.tag {
        Some(t) => format!("sender \"{}\" tag \"{t}\"", r.name),
        None => format!("sender \"{}\"", r.name),
    }
}

fn validate_endpoints(cfg: &RouterConfig, w: &mut Vec<ConfigWarning>) -> Result<()> {
    for (i, e) in cfg.endpoints.iter().enumerate() {
        let ep = format!("endpoint[{i}]");
        if let Some(n) = e.notification() {
            let np = format!("{ep}.output_handler.notification");
            if cfg.global.mailer_daemon_mailbox.is_none() {
                return Err(ConfigError::invalid(
                    np,
                    "requires global.mailer_daemon_mailbox",
                ));
            }
            let r = cfg
                .resolve_sender(&n.sender, n.tag.as_deref())
                .map_err(|err| ConfigError::invalid(key_path(&np, "sender"), err.to_string()))?;
            if r.notification {
                w.push(ConfigWarning {
                    path: key_path(&np, "sender"),
                    message: format!(
                        "{} enables notification itself (bounces of bounces)",
                        describe(&r)
                    ),
                });
            }
        }
        for (j, f) in e.chain.iter().enumerate() {
            let fp = format!("{ep}.chain[{j}]");
            match f {
                FilterConfig::Router(r) => {
                    if let Some(d) = &r.destination {
                        check_destination(cfg, &key_path(&fp, "destination"), d)?;
                    }
                    match &r.policy {
                        Some(RoutingPolicy::AddressList(a)) => {
                            if let Some(d) = &a.destination {
                                check_destination(cfg, &format!("{fp}.policy.destination"), d)?;
                            }
                        }
                        Some(RoutingPolicy::DestDomain { destination, .. }) => {
                            check_destination(
                                cfg,
                                &format!("{fp}.policy.destination"),
                                destination,
                            )?;
                        }
                        _ => {}
                    }
                }
                FilterConfig::AddRoute(a) => {
                    if let Some(s) = &a.sender {
                        cfg.resolve_sender(s, a.tag.as_deref()).map_err(|err| {
                            ConfigError::invalid(key_path(&fp, "sender"), err.to_string())
                        })?;
                    } else {
                        w.push(ConfigWarning {
                            path: fp.clone(),
                            message: "add_route without sender is disabled".into(),
                        });
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn check_destination(cfg: &RouterConfig, path: &str, d: &Destination) -> Result<()> {
    if let Some(name) = &d.endpoint
        && cfg.rest_endpoint(name).is_none()
    {
        return Err(ConfigError::invalid(
            key_path(path, "endpoint"),
            format!("no rest_endpoint named \"{name}\""),
        ));
    }
    Ok(())
}
