//! Typed `endpoint[].chain[]` entries (`spec/filters.md`).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use super::error::{ConfigError, ConfigWarning};
use super::value::{self, Obj, Result, as_f64, as_str, as_str_list, index_path, key_path};
use super::{HostPort, TlsVerify, host_port_list, tls_verify};

/// Names of the built-in filters (`router.md` §2.7).
pub const BUILTIN_FILTERS: &[&str] = &[
    "rest_output",
    "dkim_sign",
    "message_parser",
    "remote_host",
    "received_header",
    "dns_resolution",
    "exploder",
    "add_route",
    "router",
    "message_builder",
    "exploder_upstream",
    "policy_action",
    "message_validation",
    "spf_check",
    "dkim_check",
];

/// Built-in routing policies of the `router` filter.
pub const BUILTIN_ROUTING_POLICIES: &[&str] = &["address_list", "dest_domain"];

/// Built-in simple matchers (`filters.md` §3).
pub const BUILTIN_MATCHERS: &[&str] = &[
    "network_address",
    "smtp_tls",
    "smtp_auth",
    "num_rcpts",
    "invalid_mail_from",
    "invalid_rcpt_to",
    "address_list",
];

/// Signal keys usable as `matcher:` names (`filters.md` §1.2); verbatim
/// from the reference because they are part of the configuration language.
pub const SIGNAL_MATCHERS: &[&str] = &[
    "koukan.policy_action_filter.PolicyActionFilter",
    "koukan.remote_host_filter.RemoteHostFilter",
    "koukan.dkim_check_filter.DkimCheckFilter",
    "koukan.spf_check_filter.SpfCheckFilter",
    "koukan.message_validation_filter.MessageValidationFilter",
    "koukan.mx_resolution.DnsResolutionFilter",
];

/// One entry of an output chain.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterConfig {
    RestOutput(RestOutputFilter),
    DkimSign(DkimSignFilter),
    MessageParser,
    RemoteHost,
    ReceivedHeader(ReceivedHeaderFilter),
    DnsResolution(DnsResolutionFilter),
    Exploder(ExploderFilter),
    AddRoute(AddRouteFilter),
    Router(RouterFilter),
    MessageBuilder,
    ExploderUpstream(ExploderUpstreamFilter),
    PolicyAction(PolicyActionFilter),
    MessageValidation,
    SpfCheck(SpfCheckFilter),
    DkimCheck,
    /// A filter registered at runtime (`modules.sync_filter` or the
    /// embedding program); `yaml` is the whole entry including `filter`.
    Plugin {
        name: String,
        yaml: Value,
    },
}

impl FilterConfig {
    /// The `filter:` name.
    pub fn name(&self) -> &str {
        match self {
            FilterConfig::RestOutput(_) => "rest_output",
            FilterConfig::DkimSign(_) => "dkim_sign",
            FilterConfig::MessageParser => "message_parser",
            FilterConfig::RemoteHost => "remote_host",
            FilterConfig::ReceivedHeader(_) => "received_header",
            FilterConfig::DnsResolution(_) => "dns_resolution",
            FilterConfig::Exploder(_) => "exploder",
            FilterConfig::AddRoute(_) => "add_route",
            FilterConfig::Router(_) => "router",
            FilterConfig::MessageBuilder => "message_builder",
            FilterConfig::ExploderUpstream(_) => "exploder_upstream",
            FilterConfig::PolicyAction(_) => "policy_action",
            FilterConfig::MessageValidation => "message_validation",
            FilterConfig::SpfCheck(_) => "spf_check",
            FilterConfig::DkimCheck => "dkim_check",
            FilterConfig::Plugin { name, .. } => name,
        }
    }

    /// Whether the filter may end a chain. Plugins are given the benefit of
    /// the doubt (the reference test config ends chains with one).
    pub fn may_be_terminal(&self) -> bool {
        matches!(
            self,
            FilterConfig::RestOutput(_)
                | FilterConfig::Exploder(_)
                | FilterConfig::ExploderUpstream(_)
                | FilterConfig::Plugin { .. }
        )
    }
}

/// `rest_output`: send the transaction to a Koukan REST endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RestOutputFilter {
    /// Fixed base URL; else the one chosen by a `router` filter.
    pub static_endpoint: Option<String>,
    /// Bound on each update, including the wait for the data response.
    pub rcpt_timeout: Duration,
    /// Bound on each blob PUT request.
    pub data_timeout: Duration,
    pub verify: TlsVerify,
    /// PUT chunk size in bytes; `None` = whole blob.
    pub chunk_size: Option<usize>,
}

/// `dkim_sign`. Without `key` the filter is disabled (dropped from the chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSignFilter {
    pub key: Option<PathBuf>,
    pub domain: Option<String>,
    pub selector: Option<String>,
}

impl DkimSignFilter {
    pub fn is_enabled(&self) -> bool {
        self.key.is_some()
    }
}

/// `received_header`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedHeaderFilter {
    /// `by` host name; `None` = this host's name.
    pub received_hostname: Option<String>,
}

/// `dns_resolution`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsResolutionFilter {
    /// If set, names needing resolution are replaced by this list (no DNS).
    pub static_hosts: Option<Vec<HostPort>>,
    /// Names ending with this (case-insensitive) need resolution; `""` = all.
    pub suffix: Option<String>,
    /// This exact name needs resolution.
    pub literal: Option<String>,
}

/// `exploder`: terminal filter of incremental (SMTP-facing) chains.
#[derive(Debug, Clone, PartialEq)]
pub struct ExploderFilter {
    pub msa: bool,
    /// Default 30 s, 5 s with `msa`.
    pub rcpt_timeout: Duration,
    /// Default 300 s, 30 s with `msa`.
    pub data_timeout: Duration,
}

/// `add_route`: fork the transaction to another sender's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddRouteFilter {
    /// `None` disables the filter (as in the reference).
    pub sender: Option<String>,
    pub tag: Option<String>,
    pub store_and_forward: bool,
}

/// `exploder_upstream` (internal; all keys required).
#[derive(Debug, Clone, PartialEq)]
pub struct ExploderUpstreamFilter {
    pub rcpt_timeout: Duration,
    pub data_timeout: Duration,
    pub store_and_forward: bool,
    pub block_upstream: bool,
    pub notify: bool,
    pub retry: bool,
}

/// `spf_check`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpfCheckFilter {
    pub extra_domains: Vec<String>,
}

/// `router`: recipient routing.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterFilter {
    /// `None`: every recipient goes to `destination` (or is rejected).
    pub policy: Option<RoutingPolicy>,
    /// Used only without `policy`.
    pub destination: Option<Destination>,
    pub dry_run: bool,
}

/// A routing policy of the `router` filter.
#[derive(Debug, Clone, PartialEq)]
pub enum RoutingPolicy {
    AddressList(AddressListPolicy),
    DestDomain {
        /// The key is required; a null value is a placeholder destination.
        destination: Destination,
        dest_port: u16,
    },
    /// `modules.recipient_router_policy` or runtime-registered; `yaml` is
    /// the whole `policy` mapping.
    Plugin {
        name: String,
        yaml: Value,
    },
}

/// Recipients in `domains` (any if empty) whose local part is one of
/// `prefixes` (any if empty), optionally followed by `delimiter`+suffix.
#[derive(Debug, Clone, PartialEq)]
pub struct AddressListPolicy {
    pub domains: Vec<String>,
    pub prefixes: Vec<String>,
    pub delimiter: Option<String>,
    /// `None`: matching recipients are rejected (no destination).
    pub destination: Option<Destination>,
}

/// Where routed recipients go. All fields `None`/empty = placeholder
/// (the YAML had `destination:` with an empty value), used by dry runs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Destination {
    /// Name of a top-level `rest_endpoint` entry.
    pub endpoint: Option<String>,
    /// Next hops handed to the gateway.
    pub host_list: Option<Vec<HostPort>>,
    /// Overlaid on the `rest_endpoint`'s options.
    pub options: RouteOptions,
}

/// Route options; `None` = not set at this level (so overlays work).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteOptions {
    pub send_filter_output: Option<bool>,
    /// Presence enables `message_parser` for the route.
    pub receive_parsing: Option<ReceiveParsing>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveParsing {
    /// Parts up to this many bytes are inlined (default 65536).
    pub max_inline: usize,
}

impl RouteOptions {
    /// `self` with every key set in `over` replaced (a copy: the reference
    /// mutated the shared dict, `filters.md` F11).
    pub fn overlay(&self, over: &RouteOptions) -> RouteOptions {
        RouteOptions {
            send_filter_output: over.send_filter_output.or(self.send_filter_output),
            receive_parsing: over
                .receive_parsing
                .clone()
                .or_else(|| self.receive_parsing.clone()),
        }
    }

    pub fn send_filter_output(&self) -> bool {
        self.send_filter_output.unwrap_or(false)
    }
}

/// `policy_action`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyActionFilter {
    pub tag: String,
    /// Defaults to `tag`.
    pub name: String,
    /// `None` always matches.
    pub r#match: Option<MatchExpr>,
    pub mode: PolicyMode,
    pub action: PolicyAction,
    pub code: u16,
    /// Defaults to `5.6.0 message rejected <name>`.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyMode {
    /// Evaluate on the whole transaction.
    #[default]
    Transaction,
    /// `PER_RCPT`: evaluate once per new recipient.
    PerRcpt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Reject,
    Log,
    Match,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PolicyAction {
    Fixed(ActionKind),
    /// `[[weight, action], ...]`, drawn on each application.
    Weighted(Vec<(f64, ActionKind)>),
}

/// A match expression (`filters.md` §2.2).
#[derive(Debug, Clone, PartialEq)]
pub enum MatchExpr {
    /// `matcher: <name>` plus its arguments (the other keys).
    Leaf {
        matcher: String,
        args: Map<String, Value>,
    },
    Not(Box<MatchExpr>),
    Any(Vec<MatchExpr>),
    All(Vec<MatchExpr>),
}

/// Names registered outside the built-ins, consulted while parsing chains.
pub(crate) struct Registry<'a> {
    pub is_plugin_filter: &'a dyn Fn(&str) -> bool,
    pub is_plugin_policy: &'a dyn Fn(&str) -> bool,
    pub is_plugin_matcher: &'a dyn Fn(&str) -> bool,
}

pub(crate) fn parse_filter(
    path: &str,
    v: &Value,
    reg: &Registry<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<FilterConfig> {
    let mut o = Obj::new(path, v)?;
    let name = o.req_str("filter")?;
    if !BUILTIN_FILTERS.contains(&name.as_str()) {
        if (reg.is_plugin_filter)(&name) {
            return Ok(FilterConfig::Plugin {
                name,
                yaml: v.clone(),
            });
        }
        return Err(ConfigError::invalid(
            o.path_of("filter"),
            format!("unknown filter \"{name}\""),
        ));
    }
    let f = match name.as_str() {
        "rest_output" => {
            let static_endpoint = o.opt_str("static_endpoint")?;
            let rcpt_timeout = o.duration_or("rcpt_timeout", 30)?;
            let data_timeout = o.duration_or("data_timeout", 300)?;
            let verify = tls_verify(&o.path_of("verify"), o.get("verify"))?;
            let chunk_size = chunk_size(&mut o)?;
            o.ignore("static_remote_host", "not used by the reference", w);
            FilterConfig::RestOutput(RestOutputFilter {
                static_endpoint,
                rcpt_timeout,
                data_timeout,
                verify,
                chunk_size,
            })
        }
        "dkim_sign" => {
            let f = DkimSignFilter {
                key: o.opt_path("key")?,
                domain: o.opt_str("domain")?,
                selector: o.opt_str("selector")?,
            };
            if f.key.is_some() {
                for (k, v) in [("domain", &f.domain), ("selector", &f.selector)] {
                    if v.is_none() {
                        return Err(ConfigError::invalid(
                            o.path_of(k),
                            "missing (required when key is set)",
                        ));
                    }
                }
            }
            FilterConfig::DkimSign(f)
        }
        "message_parser" => FilterConfig::MessageParser,
        "remote_host" => FilterConfig::RemoteHost,
        "received_header" => FilterConfig::ReceivedHeader(ReceivedHeaderFilter {
            received_hostname: o.opt_str("received_hostname")?,
        }),
        "dns_resolution" => {
            let static_hosts = match o.get("static_hosts") {
                Some(v) => Some(host_port_list(&o.path_of("static_hosts"), v, w)?),
                None => None,
            };
            let f = DnsResolutionFilter {
                static_hosts,
                suffix: o.opt_str("suffix")?,
                literal: o.opt_str("literal")?,
            };
            o.ignore("overwrite", "not implemented by the reference", w);
            FilterConfig::DnsResolution(f)
        }
        "exploder" => {
            let msa = o.bool_or("msa", false)?;
            let (rcpt, data) = if msa { (5, 30) } else { (30, 300) };
            let f = ExploderFilter {
                msa,
                rcpt_timeout: o.duration_or("rcpt_timeout", rcpt)?,
                data_timeout: o.duration_or("data_timeout", data)?,
            };
            o.ignore(
                "output_chain",
                "the upstream chain comes from the sender's upstream_sender/upstream_tag",
                w,
            );
            FilterConfig::Exploder(f)
        }
        "add_route" => FilterConfig::AddRoute(AddRouteFilter {
            sender: o.opt_str("sender")?,
            tag: o.opt_str("tag")?,
            store_and_forward: o.bool_or("store_and_forward", false)?,
        }),
        "router" => FilterConfig::Router(parse_router(&mut o, reg, w)?),
        "message_builder" => FilterConfig::MessageBuilder,
        "exploder_upstream" => {
            let req_bool = |o: &mut Obj<'_>, k: &str| -> Result<bool> {
                value::as_bool(&o.path_of(k), o.req(k)?)
            };
            let rcpt_timeout =
                value::as_duration(&o.path_of("rcpt_timeout"), o.req("rcpt_timeout")?)?;
            let data_timeout =
                value::as_duration(&o.path_of("data_timeout"), o.req("data_timeout")?)?;
            FilterConfig::ExploderUpstream(ExploderUpstreamFilter {
                rcpt_timeout,
                data_timeout,
                store_and_forward: req_bool(&mut o, "store_and_forward")?,
                block_upstream: req_bool(&mut o, "block_upstream")?,
                notify: req_bool(&mut o, "notify")?,
                retry: req_bool(&mut o, "retry")?,
            })
        }
        "policy_action" => FilterConfig::PolicyAction(parse_policy_action(&mut o, reg, w)?),
        "message_validation" => FilterConfig::MessageValidation,
        "spf_check" => FilterConfig::SpfCheck(SpfCheckFilter {
            extra_domains: match o.get("extra_domains") {
                Some(v) => as_str_list(&o.path_of("extra_domains"), v)?,
                None => Vec::new(),
            },
        }),
        "dkim_check" => FilterConfig::DkimCheck,
        _ => unreachable!("BUILTIN_FILTERS and this match agree"),
    };
    o.finish(w);
    Ok(f)
}

pub(crate) fn chunk_size(o: &mut Obj<'_>) -> Result<Option<usize>> {
    match o.opt_u64("chunk_size")? {
        None => Ok(None),
        Some(0) => Err(ConfigError::invalid(
            o.path_of("chunk_size"),
            "must be at least 1",
        )),
        Some(n) => usize::try_from(n)
            .map(Some)
            .map_err(|_| ConfigError::invalid(o.path_of("chunk_size"), "too large")),
    }
}

fn parse_router(
    o: &mut Obj<'_>,
    reg: &Registry<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<RouterFilter> {
    let policy = match o.get("policy") {
        None => None,
        Some(v) => Some(parse_policy(&o.path_of("policy"), v, reg, w)?),
    };
    let destination = parse_destination(&o.path_of("destination"), o.raw("destination"), w)?;
    if policy.is_some() && destination.is_some() {
        w.push(ConfigWarning {
            path: o.path_of("destination"),
            message: "ignored: the filter has a policy".into(),
        });
    }
    Ok(RouterFilter {
        policy,
        destination,
        dry_run: o.bool_or("dry_run", false)?,
    })
}

fn parse_policy(
    path: &str,
    v: &Value,
    reg: &Registry<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<RoutingPolicy> {
    let mut o = Obj::new(path, v)?;
    let name = o.req_str("name")?;
    let p = match name.as_str() {
        "address_list" => {
            let list = |o: &mut Obj<'_>, k: &str| -> Result<Vec<String>> {
                match o.get(k) {
                    Some(v) => as_str_list(&o.path_of(k), v),
                    None => Ok(Vec::new()),
                }
            };
            let domains = list(&mut o, "domains")?;
            let prefixes = list(&mut o, "prefixes")?;
            RoutingPolicy::AddressList(AddressListPolicy {
                domains,
                prefixes,
                delimiter: o.opt_str("delimiter")?,
                destination: parse_destination(&o.path_of("destination"), o.raw("destination"), w)?,
            })
        }
        "dest_domain" => {
            let destination =
                parse_destination(&o.path_of("destination"), o.raw("destination"), w)?
                    .ok_or_else(|| ConfigError::invalid(o.path_of("destination"), "missing"))?;
            let dest_port = match o.opt_u64("dest_port")? {
                None => 25,
                Some(p) => u16::try_from(p).map_err(|_| {
                    ConfigError::invalid(o.path_of("dest_port"), format!("port {p} out of range"))
                })?,
            };
            RoutingPolicy::DestDomain {
                destination,
                dest_port,
            }
        }
        other if (reg.is_plugin_policy)(other) => {
            return Ok(RoutingPolicy::Plugin {
                name,
                yaml: v.clone(),
            });
        }
        other => {
            return Err(ConfigError::invalid(
                o.path_of("name"),
                format!("unknown routing policy \"{other}\""),
            ));
        }
    };
    o.finish(w);
    Ok(p)
}

/// `raw` is `None` when the key is absent; null or `{}` is a placeholder.
pub(crate) fn parse_destination(
    path: &str,
    raw: Option<&Value>,
    w: &mut Vec<ConfigWarning>,
) -> Result<Option<Destination>> {
    let Some(v) = raw else {
        return Ok(None);
    };
    let mut o = Obj::new_or_empty(path, v)?;
    let endpoint = o.opt_str("endpoint")?;
    let host_list = match o.get("host_list") {
        Some(v) => Some(host_port_list(&o.path_of("host_list"), v, w)?),
        None => None,
    };
    let options = parse_route_options(&o.path_of("options"), o.get("options"), w)?;
    o.finish(w);
    Ok(Some(Destination {
        endpoint,
        host_list,
        options,
    }))
}

pub(crate) fn parse_route_options(
    path: &str,
    v: Option<&Value>,
    w: &mut Vec<ConfigWarning>,
) -> Result<RouteOptions> {
    let Some(v) = v else {
        return Ok(RouteOptions::default());
    };
    let mut o = Obj::new(path, v)?;
    let send_filter_output = match o.get("send_filter_output") {
        Some(v) => Some(value::as_bool(&o.path_of("send_filter_output"), v)?),
        None => None,
    };
    // Presence alone enables parsing, so an empty value counts.
    let receive_parsing = match o.raw("receive_parsing") {
        None => None,
        Some(v) => {
            let mut rp = Obj::new_or_empty(&o.path_of("receive_parsing"), v)?;
            let max_inline = rp.usize_or("max_inline", 65536)?;
            rp.finish(w);
            Some(ReceiveParsing { max_inline })
        }
    };
    o.finish(w);
    Ok(RouteOptions {
        send_filter_output,
        receive_parsing,
    })
}

fn parse_policy_action(
    o: &mut Obj<'_>,
    reg: &Registry<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<PolicyActionFilter> {
    let tag = o.req_str("tag")?;
    let name = o.opt_str("name")?.unwrap_or_else(|| tag.clone());
    let r#match = match o.get("match") {
        Some(v) => Some(parse_match(&o.path_of("match"), v, reg, w)?),
        None => None,
    };
    let mode = match o.opt_str("mode")?.as_deref() {
        None => PolicyMode::Transaction,
        Some("PER_RCPT") => PolicyMode::PerRcpt,
        Some(other) => {
            return Err(ConfigError::invalid(
                o.path_of("mode"),
                format!("expected PER_RCPT, got \"{other}\""),
            ));
        }
    };
    let action = match o.get("action") {
        None => PolicyAction::Fixed(ActionKind::Match),
        Some(v) => parse_action(&o.path_of("action"), v)?,
    };
    let code = match o.opt_u64("code")? {
        None => 550,
        Some(c @ 200..=599) => c as u16,
        Some(c) => {
            return Err(ConfigError::invalid(
                o.path_of("code"),
                format!("{c} is not an SMTP reply code"),
            ));
        }
    };
    let message = o
        .opt_str("message")?
        .unwrap_or_else(|| format!("5.6.0 message rejected {name}"));
    Ok(PolicyActionFilter {
        tag,
        name,
        r#match,
        mode,
        action,
        code,
        message,
    })
}

fn action_kind(path: &str, v: &Value) -> Result<ActionKind> {
    match v.as_str() {
        Some("REJECT") => Ok(ActionKind::Reject),
        Some("LOG") => Ok(ActionKind::Log),
        Some("MATCH") => Ok(ActionKind::Match),
        _ => Err(ConfigError::invalid(
            path,
            format!("expected REJECT, LOG or MATCH, got {}", describe(v)),
        )),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        other => value::kind(other).to_string(),
    }
}

fn parse_action(path: &str, v: &Value) -> Result<PolicyAction> {
    let Value::Array(items) = v else {
        return action_kind(path, v).map(PolicyAction::Fixed);
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = index_path(path, i);
        let (w, a) = match item {
            Value::Array(pair) if pair.len() == 2 && pair[0].is_number() => (&pair[0], &pair[1]),
            _ => return Err(ConfigError::invalid(p, "expected [weight, action]")),
        };
        let weight = as_f64(&p, w)?;
        if weight < 0.0 {
            return Err(ConfigError::invalid(p, "weight must not be negative"));
        }
        out.push((weight, action_kind(&p, a)?));
    }
    if out.iter().map(|(w, _)| w).sum::<f64>() <= 0.0 {
        return Err(ConfigError::invalid(
            path,
            "weights must add up to more than 0",
        ));
    }
    Ok(PolicyAction::Weighted(out))
}

fn parse_match(
    path: &str,
    v: &Value,
    reg: &Registry<'_>,
    w: &mut Vec<ConfigWarning>,
) -> Result<MatchExpr> {
    let o = Obj::new(path, v)?;
    if let Some(m) = o.map.get("matcher") {
        let matcher = as_str(&key_path(path, "matcher"), m)?;
        if !BUILTIN_MATCHERS.contains(&matcher.as_str())
            && !SIGNAL_MATCHERS.contains(&matcher.as_str())
            && !(reg.is_plugin_matcher)(&matcher)
        {
            // Not an error: the reference evaluates it as "precondition
            // unmet" and its own example config has such rules.
            w.push(ConfigWarning {
                path: key_path(path, "matcher"),
                message: format!("unknown matcher \"{matcher}\" (never matches: no such signal)"),
            });
        }
        let mut args = o.map.clone();
        args.remove("matcher");
        return Ok(MatchExpr::Leaf { matcher, args });
    }
    let ops: Vec<&String> = o.map.keys().collect();
    match ops.as_slice() {
        [op] if op.as_str() == "not" => {
            let p = key_path(path, "not");
            Ok(MatchExpr::Not(Box::new(parse_match(
                &p,
                &o.map["not"],
                reg,
                w,
            )?)))
        }
        [op] if op.as_str() == "any" || op.as_str() == "all" => {
            let p = key_path(path, op);
            let list = value::as_list(&p, &o.map[op.as_str()])?;
            let items = list
                .iter()
                .enumerate()
                .map(|(i, e)| parse_match(&index_path(&p, i), e, reg, w))
                .collect::<Result<Vec<_>>>()?;
            Ok(if op.as_str() == "any" {
                MatchExpr::Any(items)
            } else {
                MatchExpr::All(items)
            })
        }
        _ => Err(ConfigError::invalid(
            path,
            "expected `matcher: <name>` or exactly one of `not`, `any`, `all`",
        )),
    }
}
