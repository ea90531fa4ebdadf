//! `router`: recipient routing (`spec/filters.md` §5).
//!
//! Each pending recipient is offered to the filter's policy. A policy either rejects it
//! (the response becomes the recipient's), routes it (the recipient is marked routed and,
//! unless `dry_run`, `ChainTx::route` is filled), or has no opinion (a later router may
//! route it). The idiomatic last router has no policy and no destination: it rejects every
//! recipient no earlier router took, so an MX is never an open relay.
//!
//! One route per transaction: the router's upstream transactions carry exactly one
//! recipient (the Exploder splits them). If a chain nevertheless sees several recipients,
//! the first one routed decides `tx.route`; a later recipient whose destination differs
//! gets a temporary failure (`451 4.3.0`) instead of being sent to the wrong place.
//!
//! Routers of one chain share their routed marks through a [`RoutingMarks`] handle that
//! the chain builder creates once per chain and passes to each router it builds.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use super::{ChainTx, Filter, FilterBuildError, LocalFuture, Next, Route};
use crate::config::{
    AddressListPolicy, Destination, RestEndpointConfig, RouterConfig, RouterFilter, RoutingPolicy,
};
use crate::{HostPort, Response, Sender};

/// Port of the destination sender's `remote_host` when the value names none (the
/// reference hard-codes 8000, `filters.md` F14; `host:port` in the YAML overrides it).
pub const SHORT_CIRCUIT_PORT: u16 = 8000;

/// What the routers of one chain decided so far: the recipients (by index) that some
/// router routed, and the transaction's route. The chain runs again on every update with a
/// fresh view, so the route is kept here and re-applied.
#[derive(Clone, Debug, Default)]
pub struct RoutingMarks(Rc<RefCell<Marks>>);

#[derive(Debug, Default)]
struct Marks {
    routed: BTreeSet<usize>,
    route: Option<Route>,
}

impl RoutingMarks {
    pub fn is_routed(&self, i: usize) -> bool {
        self.0.borrow().routed.contains(&i)
    }
    fn mark(&self, i: usize) {
        self.0.borrow_mut().routed.insert(i);
    }
    fn route(&self) -> Option<Route> {
        self.0.borrow().route.clone()
    }
    fn set_route(&self, route: &Route) {
        self.0.borrow_mut().route = Some(route.clone());
    }
}

/// What a policy decided for one recipient.
#[derive(Debug, PartialEq)]
enum Decision {
    /// No opinion: a later router may route it.
    Pass,
    Reject(Response),
    Route(Route),
}

/// Resolves a destination's `endpoint` name into a route.
struct Endpoints {
    table: Vec<(String, Route)>,
}

impl Endpoints {
    fn new(
        list: &[RestEndpointConfig],
        resolve_sender: &dyn Fn(&str, Option<&str>) -> Option<SenderOverrides>,
    ) -> Self {
        let table = list
            .iter()
            .map(|e| {
                let mut route = Route {
                    endpoint: e.endpoint.clone(),
                    sender: Some(Sender::new(e.sender.clone(), e.tag.clone())),
                    options: e.options.clone(),
                    ..Default::default()
                };
                if let Some((remote_host, meta)) = resolve_sender(&e.sender, e.tag.as_deref()) {
                    route.remote_host = remote_host.map(|h| short_circuit_host(&h));
                    route.smtp_meta = meta;
                }
                (e.name.clone(), route)
            })
            .collect();
        Endpoints { table }
    }

    /// `None`: the destination does not resolve (unknown endpoint).
    fn route(&self, d: &Destination) -> Option<Route> {
        if *d == Destination::default() {
            // Placeholder (`destination:` with no value), used by dry runs.
            return Some(Route::default());
        }
        let name = d.endpoint.as_ref()?;
        let (_, base) = self.table.iter().find(|(n, _)| n == name)?;
        let mut route = base.clone();
        // A copy per route: the reference mutated the shared options (F11).
        route.options = base.options.overlay(&d.options);
        route.resolution = d.host_list.clone();
        Some(route)
    }
}

type ResolvedMeta = serde_json::Map<String, serde_json::Value>;
/// `remote_host` and `smtp_meta` of a destination's sender, if it is configured here.
type SenderOverrides = (Option<String>, Option<ResolvedMeta>);

fn short_circuit_host(h: &str) -> HostPort {
    if let Some((host, port)) = h.rsplit_once(':')
        && !host.contains(':')
        && let Ok(p) = port.parse::<u16>()
    {
        return HostPort::new(host, p);
    }
    HostPort::new(h, SHORT_CIRCUIT_PORT)
}

enum Policy {
    /// No `policy` key: everything to the filter's destination, or rejected.
    Null(Option<Route>),
    AddressList {
        list: AddressList,
        route: Option<Route>,
    },
    DestDomain {
        route: Option<Route>,
        port: u16,
    },
    /// The original's example plugin policy: never routes anything.
    Hello,
}

/// Recipient matching of the `address_list` policy (and matcher, `filters.md` §3).
#[derive(Clone, Debug)]
pub struct AddressList {
    domains: Vec<String>,
    prefixes: Vec<String>,
    delimiter: Option<String>,
}

impl AddressList {
    pub fn new(p: &AddressListPolicy) -> Self {
        AddressList {
            // Normalized here: the reference compared the YAML entries as given (F6).
            domains: p.domains.iter().map(|d| d.to_lowercase()).collect(),
            prefixes: p.prefixes.iter().map(|d| d.to_lowercase()).collect(),
            delimiter: p.delimiter.clone().filter(|d| !d.is_empty()),
        }
    }

    pub fn matches(&self, addr: &str) -> bool {
        let Some((local, domain)) = parse_addr_spec(addr) else {
            return false;
        };
        let (local, domain) = (local.to_lowercase(), domain.to_lowercase());
        if !self.domains.is_empty() && !self.domains.contains(&domain) {
            return false;
        }
        if self.prefixes.is_empty() {
            return true;
        }
        self.prefixes.iter().any(|p| {
            local == *p
                || self.delimiter.as_ref().is_some_and(|d| {
                    local
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with(d.as_str()))
                })
        })
    }
}

/// Splits an RFC 5322 addr-spec into local part and domain; `None` if it does not parse
/// cleanly (no trailing garbage, no obsolete forms). UTF-8 is accepted (RFC 6532).
pub fn parse_addr_spec(s: &str) -> Option<(&str, &str)> {
    let (local, domain) = s.rsplit_once('@')?;
    let atext = |c: char| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_atom =
        |t: &str| !t.is_empty() && t.split('.').all(|a| !a.is_empty() && a.chars().all(atext));
    let local_ok = if let Some(q) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        let mut esc = false;
        q.chars().all(|c| {
            if esc {
                esc = false;
                return c != '\r' && c != '\n';
            }
            if c == '\\' {
                esc = true;
                return true;
            }
            c != '"' && c != '\r' && c != '\n'
        }) && !esc
    } else {
        dot_atom(local)
    };
    let domain_ok = if let Some(lit) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        !lit.is_empty()
            && lit
                .chars()
                .all(|c| c.is_ascii_graphic() && !"[]\\".contains(c))
    } else {
        dot_atom(domain)
    };
    (local_ok && domain_ok).then_some((local, domain))
}

/// The `router` filter.
pub struct Router {
    policy: Policy,
    dry_run: bool,
    marks: RoutingMarks,
}

impl Router {
    /// `router` is the whole configuration: the `rest_endpoint` table and the `sender`
    /// entries (a destination's sender may carry `remote_host`/`smtp_meta` overrides).
    /// `marks` is shared by every router of the same chain.
    pub fn new(
        cfg: &RouterFilter,
        router: &RouterConfig,
        marks: &RoutingMarks,
    ) -> Result<Router, FilterBuildError> {
        let resolve = |name: &str, tag: Option<&str>| {
            router
                .resolve_sender(name, tag)
                .ok()
                .map(|s| (s.remote_host, s.smtp_meta))
        };
        let endpoints = Endpoints::new(&router.rest_endpoints, &resolve);
        Self::build(cfg, &endpoints, marks)
    }

    /// Like [`Router::new`] with only the `rest_endpoint` table (no sender overrides).
    pub fn with_endpoints(
        cfg: &RouterFilter,
        rest_endpoints: &[RestEndpointConfig],
        marks: &RoutingMarks,
    ) -> Result<Router, FilterBuildError> {
        let endpoints = Endpoints::new(rest_endpoints, &|_, _| None);
        Self::build(cfg, &endpoints, marks)
    }

    fn build(
        cfg: &RouterFilter,
        endpoints: &Endpoints,
        marks: &RoutingMarks,
    ) -> Result<Router, FilterBuildError> {
        let resolve = |d: &Option<Destination>| d.as_ref().and_then(|d| endpoints.route(d));
        let policy = match &cfg.policy {
            None => Policy::Null(resolve(&cfg.destination)),
            Some(RoutingPolicy::AddressList(p)) => Policy::AddressList {
                list: AddressList::new(p),
                route: resolve(&p.destination),
            },
            Some(RoutingPolicy::DestDomain {
                destination,
                dest_port,
            }) => Policy::DestDomain {
                route: endpoints.route(destination),
                port: *dest_port,
            },
            Some(RoutingPolicy::Plugin { name, .. }) if name == "hello" => Policy::Hello,
            Some(RoutingPolicy::Plugin { name, .. }) => {
                return Err(FilterBuildError::config(
                    "router",
                    format!("routing policy plugin \"{name}\" is not available"),
                ));
            }
        };
        Ok(Router {
            policy,
            dry_run: cfg.dry_run,
            marks: marks.clone(),
        })
    }

    fn decide(&self, rcpt: &str) -> Decision {
        match &self.policy {
            Policy::Null(Some(r)) => Decision::Route(r.clone()),
            Policy::Null(None) => Decision::Reject(Response::new(
                550,
                "5.1.1 mailbox does not exist (RecipientRouterFilter null policy)",
            )),
            Policy::AddressList { list, route } => {
                if !list.matches(rcpt) {
                    return Decision::Pass;
                }
                match route {
                    Some(r) => Decision::Route(r.clone()),
                    None => Decision::Reject(Response::new(
                        550,
                        "5.1.1 mailbox does not exist (AddressListPolicy)",
                    )),
                }
            }
            Policy::DestDomain { route, port } => {
                let (Some(route), Some((_, domain))) = (route, parse_addr_spec(rcpt)) else {
                    return Decision::Pass;
                };
                let mut r = route.clone();
                // Not lower-cased, as the reference.
                r.resolution = Some(vec![HostPort::new(domain, *port)]);
                Decision::Route(r)
            }
            Policy::Hello => Decision::Pass,
        }
    }
}

impl Filter for Router {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if !tx.tx.cancelled {
                if tx.route.endpoint.is_none()
                    && let Some(route) = self.marks.route()
                {
                    tx.route = route;
                }
                route_pending(self, tx);
            }
            next.run(tx).await
        })
    }
}

fn route_pending(r: &Router, tx: &mut ChainTx) {
    for i in tx.pending_rcpts().collect::<Vec<_>>() {
        if r.marks.is_routed(i) {
            continue;
        }
        match r.decide(&tx.tx.rcpt_to[i].mailbox) {
            Decision::Pass => {}
            Decision::Reject(resp) => tx.set_rcpt_response(i, resp),
            Decision::Route(route) => {
                if r.dry_run {
                    r.marks.mark(i);
                    continue;
                }
                // The first routed recipient decides the transaction's route.
                let first = !(0..tx.tx.rcpt_to.len()).any(|j| j != i && r.marks.is_routed(j));
                if first {
                    r.marks.set_route(&route);
                    tx.route = route;
                    r.marks.mark(i);
                } else if tx.route == route {
                    r.marks.mark(i);
                } else {
                    tx.set_rcpt_response(
                        i,
                        Response::new(
                            451,
                            "4.3.0 recipient routes elsewhere than the transaction's first \
                             recipient (RecipientRouterFilter)",
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ReceiveParsing, RouteOptions};
    use crate::filter::{Chain, MessageBody};
    use crate::{Mailbox, Response};

    /// Terminal stand-in for rest_output: accepts what is pending, records the route.
    struct Sink(Rc<RefCell<Vec<Route>>>);
    impl Filter for Sink {
        fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, _: Next<'a>) -> LocalFuture<'a, ()> {
            Box::pin(async move {
                self.0.borrow_mut().push(tx.route.clone());
                if tx.tx.mail_from.is_some() && tx.tx.mail_response.is_none() {
                    tx.tx.mail_response = Some(Response::new(250, "ok"));
                }
                for i in tx.pending_rcpts().collect::<Vec<_>>() {
                    tx.set_rcpt_response(i, Response::new(250, "ok"));
                }
                if tx.body_finalized() && tx.rcpt_ok() && tx.tx.data_response.is_none() {
                    tx.tx.data_response = Some(Response::new(250, "ok"));
                }
            })
        }
    }

    const YAML: &str = r#"
rest_listener: {addr: ["127.0.0.1", 8000], session_uri: "http://localhost:8000"}
storage: {url: "sqlite://:memory:"}
sender:
- name: gw
  output_chain: out
  remote_host: router.internal
  smtp_meta: {ehlo_host: router.internal}
rest_endpoint:
- name: inbound-gw
  endpoint: http://gw:8001
  sender: gw
  tag: null
  options: {send_filter_output: true}
- name: receiver
  endpoint: http://rx:8002
  sender: other
endpoint:
- name: out
  chain:
  - filter: rest_output
"#;

    fn config() -> RouterConfig {
        RouterConfig::from_yaml_str(YAML).unwrap()
    }

    fn router_yaml(y: &str) -> RouterFilter {
        let full = format!("{YAML}\n- name: t\n  chain:\n{y}\n  - filter: rest_output\n");
        let c = RouterConfig::from_yaml_str(&full).unwrap();
        let e = c.endpoint("t").unwrap();
        match &e.chain[0] {
            crate::config::FilterConfig::Router(r) => r.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn tx(rcpts: &[&str]) -> ChainTx {
        let mut t = ChainTx::default();
        t.tx.mail_from = Some(Mailbox::new("alice@example.com"));
        t.tx.rcpt_to = rcpts.iter().map(|r| Mailbox::new(*r)).collect();
        t
    }

    fn run(filters: Vec<Box<dyn Filter>>, t: &mut ChainTx) {
        let mut c = Chain::new(filters);
        futures_util::FutureExt::now_or_never(c.update(t)).unwrap();
    }

    fn codes(t: &ChainTx) -> Vec<u16> {
        (0..t.tx.rcpt_to.len())
            .map(|i| t.rcpt_response(i).map_or(0, |r| r.code))
            .collect()
    }

    #[test]
    fn addr_spec() {
        assert_eq!(
            parse_addr_spec("bob@example.com"),
            Some(("bob", "example.com"))
        );
        assert_eq!(parse_addr_spec("\"b b\"@x.y"), Some(("\"b b\"", "x.y")));
        assert_eq!(parse_addr_spec("a@[1.2.3.4]"), Some(("a", "[1.2.3.4]")));
        assert_eq!(
            parse_addr_spec("jösé@bücher.de"),
            Some(("jösé", "bücher.de"))
        );
        for bad in [
            "bob", "@x", "a@", "a..b@x", "a@x..y", "a b@x", "<a@x>", "a@x@",
        ] {
            assert_eq!(parse_addr_spec(bad), None, "{bad}");
        }
    }

    #[test]
    fn address_list_matching() {
        let l = AddressList::new(&AddressListPolicy {
            domains: vec!["Example.COM".into()],
            prefixes: vec!["bob".into()],
            delimiter: Some("+".into()),
            destination: None,
        });
        assert!(l.matches("bob@example.com"));
        assert!(l.matches("BOB@EXAMPLE.com"));
        assert!(l.matches("bob+tag@example.com"));
        assert!(!l.matches("bobby@example.com"));
        assert!(!l.matches("bob-x@example.com"));
        assert!(!l.matches("bob@other.com"));
        assert!(!l.matches("bob+tag"));
        let any_local = AddressList::new(&AddressListPolicy {
            domains: vec!["example.com".into()],
            prefixes: vec![],
            delimiter: None,
            destination: None,
        });
        assert!(any_local.matches("whoever@example.com"));
        let no_delim = AddressList::new(&AddressListPolicy {
            domains: vec![],
            prefixes: vec!["bob".into()],
            delimiter: None,
            destination: None,
        });
        assert!(no_delim.matches("bob@anywhere"));
        assert!(!no_delim.matches("bob+x@anywhere"));
    }

    #[test]
    fn address_list_routes_then_catch_all_rejects() {
        let cfg = config();
        let marks = RoutingMarks::default();
        let r1 = router_yaml(
            "  - filter: router
    policy:
      name: address_list
      domains: [example.com]
      prefixes: [bob]
      delimiter: +
      destination:
        endpoint: inbound-gw
        host_list: [{host: mx.example.com, port: 25}]
        options: {receive_parsing: {max_inline: 10}}",
        );
        let seen = Rc::new(RefCell::new(Vec::new()));
        let filters: Vec<Box<dyn Filter>> = vec![
            Box::new(Router::new(&r1, &cfg, &marks).unwrap()),
            Box::new(Router::new(&router_yaml("  - filter: router"), &cfg, &marks).unwrap()),
            Box::new(Sink(seen.clone())),
        ];
        let mut t = tx(&["bob+x@example.com"]);
        run(filters, &mut t);
        assert_eq!(codes(&t), vec![250]);
        let route = &t.route;
        assert_eq!(route.endpoint.as_deref(), Some("http://gw:8001"));
        assert_eq!(route.sender, Some(Sender::new("gw", None)));
        assert_eq!(
            route.resolution,
            Some(vec![HostPort::new("mx.example.com", 25)])
        );
        assert_eq!(
            route.options,
            RouteOptions {
                send_filter_output: Some(true),
                receive_parsing: Some(ReceiveParsing { max_inline: 10 }),
            }
        );
        assert_eq!(
            route.remote_host,
            Some(HostPort::new("router.internal", SHORT_CIRCUIT_PORT))
        );
        assert_eq!(
            route.smtp_meta.as_ref().unwrap()["ehlo_host"],
            "router.internal"
        );
        assert_eq!(seen.borrow().len(), 1);

        // A later run (the body arrived) gets a fresh view whose recipient is settled: the
        // route chosen before still applies.
        let filters: Vec<Box<dyn Filter>> = vec![
            Box::new(Router::new(&r1, &cfg, &marks).unwrap()),
            Box::new(Sink(seen.clone())),
        ];
        let mut later = tx(&["bob+x@example.com"]);
        later.set_rcpt_response(0, Response::new(250, "ok"));
        later.body = Some(MessageBody::bytes("Subject: x\r\n\r\nx\r\n"));
        run(filters, &mut later);
        assert_eq!(later.route.endpoint.as_deref(), Some("http://gw:8001"));

        // Not on the list: the catch-all rejects it at RCPT (never an open relay).
        let marks = RoutingMarks::default();
        let filters: Vec<Box<dyn Filter>> = vec![
            Box::new(Router::new(&r1, &cfg, &marks).unwrap()),
            Box::new(Router::new(&router_yaml("  - filter: router"), &cfg, &marks).unwrap()),
            Box::new(Sink(seen.clone())),
        ];
        let mut t = tx(&["carol@example.com"]);
        run(filters, &mut t);
        assert_eq!(t.rcpt_response(0).unwrap().code, 550);
        assert_eq!(
            t.rcpt_response(0).unwrap().message,
            "5.1.1 mailbox does not exist (RecipientRouterFilter null policy)"
        );
        assert_eq!(t.route, Route::default());
    }

    #[test]
    fn options_overlay_does_not_leak() {
        let cfg = config();
        let with = router_yaml(
            "  - filter: router
    destination:
      endpoint: inbound-gw
      options: {receive_parsing: null}",
        );
        let without = router_yaml(
            "  - filter: router
    destination: {endpoint: inbound-gw}",
        );
        let a = Router::new(&with, &cfg, &RoutingMarks::default()).unwrap();
        let b = Router::new(&without, &cfg, &RoutingMarks::default()).unwrap();
        let (Decision::Route(ra), Decision::Route(rb)) = (a.decide("x@y"), b.decide("x@y")) else {
            panic!()
        };
        assert!(ra.options.receive_parsing.is_some());
        assert!(rb.options.receive_parsing.is_none());
        assert_eq!(rb.options.send_filter_output, Some(true));
    }

    #[test]
    fn address_list_without_destination_rejects() {
        let cfg = config();
        let no_dest = router_yaml(
            "  - filter: router
    policy: {name: address_list, domains: [example.com]}",
        );
        // An unknown endpoint name (the config loader refuses it; built by hand here).
        let mut unknown = no_dest.clone();
        if let Some(RoutingPolicy::AddressList(p)) = &mut unknown.policy {
            p.destination = Some(Destination {
                endpoint: Some("nope".into()),
                ..Default::default()
            });
        }
        for f in [no_dest, unknown] {
            let r = Router::new(&f, &cfg, &RoutingMarks::default()).unwrap();
            assert_eq!(
                r.decide("bob@example.com"),
                Decision::Reject(Response::new(
                    550,
                    "5.1.1 mailbox does not exist (AddressListPolicy)"
                ))
            );
            assert_eq!(r.decide("bob@other.org"), Decision::Pass);
            assert_eq!(r.decide("not an address"), Decision::Pass);
        }
    }

    #[test]
    fn dest_domain_policy() {
        let cfg = config();
        let r = Router::new(
            &router_yaml(
                "  - filter: router
    policy:
      name: dest_domain
      destination: {endpoint: receiver}
      dest_port: 2525",
            ),
            &cfg,
            &RoutingMarks::default(),
        )
        .unwrap();
        let Decision::Route(route) = r.decide("bob@Example.ORG") else {
            panic!()
        };
        assert_eq!(route.endpoint.as_deref(), Some("http://rx:8002"));
        assert_eq!(
            route.resolution,
            Some(vec![HostPort::new("Example.ORG", 2525)])
        );
        // The receiver's sender is not configured here: no overrides.
        assert_eq!(route.remote_host, None);
        assert_eq!(r.decide("garbage"), Decision::Pass);
    }

    #[test]
    fn dry_run_marks_without_routing() {
        let cfg = config();
        let marks = RoutingMarks::default();
        let seen = Rc::new(RefCell::new(Vec::new()));
        let filters: Vec<Box<dyn Filter>> = vec![
            Box::new(
                Router::new(
                    &router_yaml(
                        "  - filter: router
    dry_run: true
    policy:
      name: address_list
      domains: [example.com]
      destination:",
                    ),
                    &cfg,
                    &marks,
                )
                .unwrap(),
            ),
            Box::new(Router::new(&router_yaml("  - filter: router"), &cfg, &marks).unwrap()),
            Box::new(Sink(seen.clone())),
        ];
        let mut t = tx(&["a@example.com", "b@elsewhere.net", "c@example.com"]);
        let mut c = Chain::new(filters);
        futures_util::FutureExt::now_or_never(c.update(&mut t)).unwrap();
        assert_eq!(codes(&t), vec![250, 550, 250]);
        assert_eq!(t.route, Route::default());
        // A later update (the body) keeps the settled recipients alone.
        t.body = Some(MessageBody::bytes("Subject: x\r\n\r\nx\r\n"));
        futures_util::FutureExt::now_or_never(c.update(&mut t)).unwrap();
        assert_eq!(t.tx.data_response.as_ref().unwrap().code, 250);
    }

    #[test]
    fn several_recipients_one_route() {
        let cfg = config();
        let marks = RoutingMarks::default();
        let seen = Rc::new(RefCell::new(Vec::new()));
        let filters: Vec<Box<dyn Filter>> = vec![
            Box::new(
                Router::new(
                    &router_yaml(
                        "  - filter: router
    policy: {name: dest_domain, destination: {endpoint: receiver}}",
                    ),
                    &cfg,
                    &marks,
                )
                .unwrap(),
            ),
            Box::new(Sink(seen.clone())),
        ];
        let mut t = tx(&["a@one.example", "b@one.example", "c@two.example"]);
        run(filters, &mut t);
        assert_eq!(codes(&t), vec![250, 250, 451]);
        assert_eq!(
            t.route.resolution,
            Some(vec![HostPort::new("one.example", 25)])
        );
    }

    #[test]
    fn plugin_policy_is_a_build_error() {
        let cfg = RouterFilter {
            policy: Some(RoutingPolicy::Plugin {
                name: "nonesuch".into(),
                yaml: serde_json::Value::Null,
            }),
            destination: None,
            dry_run: false,
        };
        assert!(Router::with_endpoints(&cfg, &[], &RoutingMarks::default()).is_err());
        // The original's example plugin exists as a built-in that never routes.
        let hello = RouterFilter {
            policy: Some(RoutingPolicy::Plugin {
                name: "hello".into(),
                yaml: serde_json::Value::Null,
            }),
            destination: None,
            dry_run: false,
        };
        let r = Router::with_endpoints(&hello, &[], &RoutingMarks::default()).unwrap();
        assert_eq!(r.decide("bob@example.com"), Decision::Pass);
    }

    #[test]
    fn short_circuit_port() {
        assert_eq!(short_circuit_host("h"), HostPort::new("h", 8000));
        assert_eq!(short_circuit_host("h:25"), HostPort::new("h", 25));
        assert_eq!(short_circuit_host("::1"), HostPort::new("::1", 8000));
    }
}
