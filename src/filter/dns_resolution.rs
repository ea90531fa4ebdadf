//! `dns_resolution`: next hops by MX, and DNS results of the envelope addresses
//! (`spec/filters.md` §4.5).
//!
//! The route's host list (`tx.route.resolution`, chosen by `router`) is rewritten into IP
//! addresses: for each host that needs resolution (not an IP literal, and equal to
//! `literal` or ending with `suffix`), MX records by preference, then A and AAAA of each
//! exchanger (RFC 5321 §5.1: no MX ⇒ the name itself is the exchanger; a null MX, RFC 7505,
//! ⇒ the domain accepts no mail). `static_hosts` replaces DNS for those hosts. The outcome
//! per name is OK, NX (the domain does not exist or takes no mail) or TEMP (server failure,
//! timeout, no address).
//!
//! Outcomes of the envelope domains are published as the signal
//! `koukan.mx_resolution.DnsResolutionFilter` for `policy_action` rules. A route whose host
//! list fails does not go upstream without next hops (the reference then fell back to the
//! SMTP client's own address): every request still in flight gets `550 5.1.2` (NX) or
//! `451 4.4.3` (TEMP) here.
//!
//! Answers are cached per filter instance (one attempt): a name asked for by MAIL, RCPT and
//! the route is looked up once.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use serde_json::{Map, Value};

use super::router::parse_addr_spec;
use super::{ChainTx, Filter, FilterBuildError, LocalFuture, Next};
use crate::config::DnsResolutionFilter;
use crate::{HostPort, Response};

/// Signal key (part of the configuration language, `filters.md` §1.2).
pub const SIGNAL: &str = "koukan.mx_resolution.DnsResolutionFilter";

/// Outcome of resolving a name or a host list (wire values of the signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    Nx = 1,
    Temp = 2,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Nx => "NX",
            Outcome::Temp => "TEMP",
        }
    }
}

type Resolved = Result<Vec<HostPort>, Outcome>;

/// The published signal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DnsSignal {
    pub mail_from_result: Option<Outcome>,
    pub rcpt_to_result: Vec<Option<Outcome>>,
    pub resolution_result: Option<Outcome>,
}

impl DnsSignal {
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(r) = self.mail_from_result {
            m.insert("mail_from_result".into(), (r as u8).into());
        }
        if !self.rcpt_to_result.is_empty() {
            let v = self
                .rcpt_to_result
                .iter()
                .map(|r| r.map_or(Value::Null, |r| (r as u8).into()))
                .collect();
            m.insert("rcpt_to_result".into(), Value::Array(v));
        }
        if let Some(r) = self.resolution_result {
            m.insert("resolution_result".into(), (r as u8).into());
        }
        Value::Object(m)
    }
}

pub struct DnsResolution {
    static_hosts: Option<Vec<HostPort>>,
    suffix: Option<String>,
    literal: Option<String>,
    resolver: TokioResolver,
    /// Per name (lower case, no trailing dot): the exchangers' addresses (port 0).
    cache: HashMap<String, Result<Vec<IpAddr>, Outcome>>,
    signal: DnsSignal,
    mail_done: bool,
}

impl DnsResolution {
    /// Uses the system's resolver configuration (`/etc/resolv.conf`), through this
    /// thread's shared resolver: building one reads the system's resolver and TLS root
    /// configuration from disk, far too costly per attempt, and sharing it shares its
    /// cache. One per thread because its sockets belong to the thread's runtime.
    pub fn new(cfg: &DnsResolutionFilter) -> Result<DnsResolution, FilterBuildError> {
        thread_local! {
            static SYSTEM: std::cell::RefCell<Option<TokioResolver>> =
                const { std::cell::RefCell::new(None) };
        }
        let resolver = match SYSTEM.with_borrow(|r| r.clone()) {
            Some(r) => r,
            None => {
                let r = TokioResolver::builder_tokio()
                    .and_then(|b| b.build())
                    .map_err(|e| FilterBuildError::Resolver {
                        filter: "dns_resolution",
                        message: e.to_string(),
                    })?;
                SYSTEM.with_borrow_mut(|s| *s = Some(r.clone()));
                r
            }
        };
        Ok(Self::with_resolver(cfg, resolver))
    }

    /// With a given resolver (shared by many filters, or pointed at a test server).
    pub fn with_resolver(cfg: &DnsResolutionFilter, resolver: TokioResolver) -> DnsResolution {
        DnsResolution {
            static_hosts: cfg.static_hosts.clone(),
            suffix: cfg.suffix.as_ref().map(|s| s.to_ascii_lowercase()),
            literal: cfg.literal.as_ref().map(|s| s.to_ascii_lowercase()),
            resolver,
            cache: HashMap::new(),
            signal: DnsSignal::default(),
            mail_done: false,
        }
    }

    fn needs_resolution(&self, host: &str) -> bool {
        if host.parse::<IpAddr>().is_ok() {
            return false;
        }
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        self.literal.as_ref().is_some_and(|l| *l == h)
            || self
                .suffix
                .as_ref()
                .is_some_and(|s| h.ends_with(s.as_str()))
    }

    /// Resolves a host list: OK with the addresses (original ports, no duplicates), or the
    /// first NX/TEMP.
    pub async fn resolve(&mut self, hosts: &[HostPort]) -> Resolved {
        if hosts.is_empty() {
            return Err(Outcome::Temp);
        }
        let mut out: Vec<HostPort> = Vec::new();
        let push = |out: &mut Vec<HostPort>, h: HostPort| {
            if !out.contains(&h) {
                out.push(h);
            }
        };
        for h in hosts {
            if !self.needs_resolution(&h.host) {
                push(&mut out, h.clone());
            } else if let Some(st) = &self.static_hosts {
                for s in st {
                    push(&mut out, s.clone());
                }
            } else {
                for ip in self.resolve_name(&h.host).await? {
                    push(&mut out, HostPort::new(ip.to_string(), h.port));
                }
            }
        }
        Ok(out)
    }

    async fn resolve_name(&mut self, name: &str) -> Result<Vec<IpAddr>, Outcome> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(r) = self.cache.get(&key) {
            return r.clone();
        }
        let r = self.lookup(&key).await;
        self.cache.insert(key, r.clone());
        r
    }

    async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, Outcome> {
        // Absolute: no search-list expansion of a mail domain.
        let fqdn = format!("{name}.");
        let exchanges = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                mx.sort_by_key(|(p, _)| *p);
                if let [(0, root)] = mx.as_slice()
                    && (root == "." || root.is_empty())
                {
                    return Err(Outcome::Nx); // RFC 7505 null MX
                }
                // A null MX among real ones is meaningless: skip the root name.
                let names: Vec<String> = mx
                    .into_iter()
                    .map(|(_, n)| n)
                    .filter(|n| n != "." && !n.is_empty())
                    .collect();
                if names.is_empty() {
                    vec![fqdn.clone()]
                } else {
                    names
                }
            }
            Err(e) => match classify(&e) {
                Lookup::NxDomain => return Err(Outcome::Nx),
                // No MX: the domain itself is the implicit exchanger (RFC 5321 §5.1).
                Lookup::NoAnswer => vec![fqdn.clone()],
                Lookup::Failure => return Err(Outcome::Temp),
            },
        };
        let mut addrs = Vec::new();
        for ex in &exchanges {
            let ex = if ex.ends_with('.') {
                ex.clone()
            } else {
                format!("{ex}.")
            };
            let (a, aaaa) = futures_util::join!(
                self.resolver.ipv4_lookup(ex.as_str()),
                self.resolver.ipv6_lookup(ex.as_str())
            );
            // Failures of one exchanger are ignored: the others may do.
            for l in [a, aaaa].into_iter().flatten() {
                for r in l.answers() {
                    let ip = match &r.data {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(a) => IpAddr::V6(a.0),
                        _ => continue,
                    };
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
            }
        }
        if addrs.is_empty() {
            return Err(Outcome::Temp);
        }
        Ok(addrs)
    }

    /// The outcome for an envelope address (`None`: nothing to resolve, e.g. `<>`, or an
    /// address that does not parse, which the reference crashed on, F10).
    async fn envelope_outcome(&mut self, addr: &str) -> Option<Outcome> {
        let (_, domain) = parse_addr_spec(addr)?;
        let host = domain
            .strip_prefix('[')
            .and_then(|d| d.strip_suffix(']'))
            .map(|d| d.strip_prefix("IPv6:").unwrap_or(d))
            .unwrap_or(domain);
        Some(match self.resolve(&[HostPort::new(host, 0)]).await {
            Ok(_) => Outcome::Ok,
            Err(o) => o,
        })
    }

    async fn update(&mut self, tx: &mut ChainTx) {
        let mut changed = false;
        if !self.mail_done
            && let Some(m) = &tx.tx.mail_from
        {
            self.mail_done = true;
            let m = m.mailbox.clone();
            self.signal.mail_from_result = self.envelope_outcome(&m).await;
            changed = true;
        }
        for i in self.signal.rcpt_to_result.len()..tx.tx.rcpt_to.len() {
            let r = tx.tx.rcpt_to[i].mailbox.clone();
            let o = self.envelope_outcome(&r).await;
            self.signal.rcpt_to_result.push(o);
            changed = true;
        }
        if let Some(hosts) = tx.route.resolution.clone()
            && hosts.iter().any(|h| self.needs_resolution(&h.host))
        {
            let r = self.resolve(&hosts).await;
            self.signal.resolution_result = Some(match &r {
                Ok(_) => Outcome::Ok,
                Err(o) => *o,
            });
            changed = true;
            match r {
                Ok(list) => tx.route.resolution = Some(list),
                Err(o) => {
                    tx.route.resolution = None;
                    tx.fill_inflight(&route_failure(o, &hosts));
                }
            }
        }
        if changed || tx.signals.contains_key(SIGNAL) {
            tx.signals.insert(SIGNAL.into(), self.signal.to_json());
        }
    }
}

fn route_failure(o: Outcome, hosts: &[HostPort]) -> Response {
    let names = hosts
        .iter()
        .map(|h| h.host.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    match o {
        Outcome::Nx => Response::new(
            550,
            format!("5.1.2 DnsResolutionFilter: {names}: no such domain or no mail accepted"),
        ),
        _ => Response::new(
            451,
            format!("4.4.3 DnsResolutionFilter: {names}: temporary DNS failure"),
        ),
    }
}

enum Lookup {
    NxDomain,
    NoAnswer,
    Failure,
}

fn classify(e: &NetError) -> Lookup {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            Lookup::NxDomain
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => Lookup::NoAnswer,
        _ => Lookup::Failure,
    }
}

impl Filter for DnsResolution {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if !tx.tx.cancelled {
                self.update(tx).await;
            }
            next.run(tx).await
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Mailbox;
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::proto::op::{Message, MessageType, OpCode};
    use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, TXT};
    use hickory_resolver::proto::rr::{Name, Record};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A tiny authoritative DNS server on loopback UDP: `records` by (name, type); names
    /// in `servfail` answer SERVFAIL; other names are NXDOMAIN unless they own a record of
    /// another type (then NOERROR with no answer).
    pub(crate) struct TestDns {
        pub addr: SocketAddr,
        pub queries: Arc<AtomicUsize>,
    }

    pub(crate) type Zone = Vec<(&'static str, RData)>;

    impl TestDns {
        pub(crate) async fn start(zone: Zone, servfail: &[&str]) -> TestDns {
            let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = sock.local_addr().unwrap();
            let zone: Vec<(Name, RData)> = zone
                .into_iter()
                .map(|(n, d)| (Name::from_ascii(n).unwrap(), d))
                .collect();
            let servfail: Vec<Name> = servfail
                .iter()
                .map(|n| Name::from_ascii(n).unwrap())
                .collect();
            let queries = Arc::new(AtomicUsize::new(0));
            let count = queries.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(req) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let mut resp = Message::response(req.metadata.id, OpCode::Query);
                    resp.metadata.message_type = MessageType::Response;
                    resp.metadata.authoritative = true;
                    resp.metadata.recursion_desired = req.metadata.recursion_desired;
                    resp.metadata.recursion_available = true;
                    if let Some(q) = req.queries.first() {
                        resp.add_query(q.clone());
                        let name = q.name();
                        if servfail.iter().any(|s| s == name) {
                            resp.metadata.response_code = ResponseCode::ServFail;
                        } else {
                            let owned: Vec<&(Name, RData)> =
                                zone.iter().filter(|(n, _)| n == name).collect();
                            for (n, d) in &owned {
                                if d.record_type() == q.query_type() {
                                    resp.add_answer(Record::from_rdata(n.clone(), 60, d.clone()));
                                }
                            }
                            if owned.is_empty() {
                                resp.metadata.response_code = ResponseCode::NXDomain;
                            }
                        }
                    }
                    let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
                }
            });
            TestDns { addr, queries }
        }

        pub(crate) fn resolver(&self) -> TokioResolver {
            let mut ns = NameServerConfig::udp_and_tcp(self.addr.ip());
            for c in ns.connections.iter_mut() {
                c.port = self.addr.port();
            }
            let mut opts = ResolverOpts::default();
            opts.timeout = Duration::from_millis(500);
            opts.attempts = 1;
            opts.cache_size = 0;
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
            .with_options(opts)
            .build()
            .unwrap()
        }
    }

    fn mx(p: u16, n: &str) -> RData {
        RData::MX(MX::new(p, Name::from_ascii(n).unwrap()))
    }
    fn a(ip: &str) -> RData {
        RData::A(A(ip.parse().unwrap()))
    }
    fn aaaa(ip: &str) -> RData {
        RData::AAAA(AAAA(ip.parse().unwrap()))
    }

    fn zone() -> Zone {
        vec![
            ("example.com.", mx(20, "mx2.example.com.")),
            ("example.com.", mx(10, "mx1.example.com.")),
            ("mx1.example.com.", a("192.0.2.1")),
            ("mx1.example.com.", aaaa("2001:db8::1")),
            ("mx2.example.com.", a("192.0.2.2")),
            ("mx2.example.com.", a("192.0.2.1")),
            // No MX: implicit MX on the A record.
            ("implicit.example.", a("192.0.2.9")),
            ("nullmx.example.", mx(0, ".")),
            // MX whose exchanger has no address.
            ("dangling.example.", mx(10, "nowhere.example.")),
            // Exists (a TXT record) but has neither MX nor address.
            ("txtonly.example.", RData::TXT(TXT::new(vec!["x".into()]))),
        ]
    }

    async fn filter(cfg: DnsResolutionFilter) -> (DnsResolution, TestDns) {
        let dns = TestDns::start(zone(), &["broken.example."]).await;
        (DnsResolution::with_resolver(&cfg, dns.resolver()), dns)
    }

    fn all() -> DnsResolutionFilter {
        DnsResolutionFilter {
            suffix: Some(String::new()),
            ..Default::default()
        }
    }

    fn hp(h: &str, p: u16) -> HostPort {
        HostPort::new(h, p)
    }

    #[tokio::test]
    async fn mx_by_preference_then_addresses() {
        let (mut f, dns) = filter(all()).await;
        let r = f.resolve(&[hp("Example.COM", 25)]).await.unwrap();
        assert_eq!(
            r,
            vec![
                hp("192.0.2.1", 25),
                hp("2001:db8::1", 25),
                hp("192.0.2.2", 25)
            ]
        );
        // Cached per filter instance.
        let n = dns.queries.load(Ordering::SeqCst);
        f.resolve(&[hp("example.com", 587)]).await.unwrap();
        assert_eq!(dns.queries.load(Ordering::SeqCst), n);
        assert_eq!(
            f.resolve(&[hp("implicit.example", 25)]).await,
            Ok(vec![hp("192.0.2.9", 25)])
        );
        // IP literals and hosts not needing resolution pass verbatim; duplicates dropped.
        assert_eq!(
            f.resolve(&[
                hp("10.0.0.1", 2525),
                hp("implicit.example", 25),
                hp("10.0.0.1", 2525)
            ])
            .await,
            Ok(vec![hp("10.0.0.1", 2525), hp("192.0.2.9", 25)])
        );
    }

    #[tokio::test]
    async fn failures() {
        let (mut f, _dns) = filter(all()).await;
        assert_eq!(
            f.resolve(&[hp("nullmx.example", 25)]).await,
            Err(Outcome::Nx)
        );
        assert_eq!(
            f.resolve(&[hp("nosuch.example", 25)]).await,
            Err(Outcome::Nx)
        );
        assert_eq!(
            f.resolve(&[hp("broken.example", 25)]).await,
            Err(Outcome::Temp)
        );
        assert_eq!(
            f.resolve(&[hp("dangling.example", 25)]).await,
            Err(Outcome::Temp)
        );
        assert_eq!(
            f.resolve(&[hp("txtonly.example", 25)]).await,
            Err(Outcome::Temp)
        );
        assert_eq!(f.resolve(&[]).await, Err(Outcome::Temp));
        // The first failure aborts the list.
        assert_eq!(
            f.resolve(&[hp("example.com", 25), hp("nullmx.example", 25)])
                .await,
            Err(Outcome::Nx)
        );
    }

    #[tokio::test]
    async fn suffix_literal_static() {
        let cfg = DnsResolutionFilter {
            suffix: Some(".COM".into()),
            literal: Some("implicit.example".into()),
            static_hosts: None,
        };
        let (mut f, _dns) = filter(cfg).await;
        assert_eq!(
            f.resolve(&[hp("nosuch.example", 25)]).await,
            Ok(vec![hp("nosuch.example", 25)]),
            "neither suffix nor literal: verbatim"
        );
        assert_eq!(
            f.resolve(&[hp("implicit.example", 25)]).await,
            Ok(vec![hp("192.0.2.9", 25)])
        );
        let cfg = DnsResolutionFilter {
            suffix: Some(String::new()),
            static_hosts: Some(vec![hp("127.0.0.1", 2525), hp("127.0.0.2", 2525)]),
            literal: None,
        };
        let (mut f, dns) = filter(cfg).await;
        assert_eq!(
            f.resolve(&[hp("nosuch.example", 25)]).await,
            Ok(vec![hp("127.0.0.1", 2525), hp("127.0.0.2", 2525)])
        );
        assert_eq!(dns.queries.load(Ordering::SeqCst), 0);
    }

    fn chain_tx(rcpt: &str, route: Vec<HostPort>) -> ChainTx {
        let mut t = ChainTx::default();
        t.tx.mail_from = Some(Mailbox::new("alice@example.com"));
        t.tx.rcpt_to = vec![Mailbox::new(rcpt)];
        t.route.resolution = Some(route);
        t
    }

    #[tokio::test]
    async fn filter_rewrites_route_and_publishes_signal() {
        let (mut f, _dns) = filter(all()).await;
        let mut t = chain_tx("bob@implicit.example", vec![hp("example.com", 25)]);
        f.update(&mut t).await;
        assert_eq!(t.route.resolution.as_ref().unwrap()[0], hp("192.0.2.1", 25));
        assert_eq!(
            t.signals[SIGNAL],
            serde_json::json!({"mail_from_result": 0, "rcpt_to_result": [0], "resolution_result": 0})
        );
        assert!(t.inflight(), "nothing answered");
        // A second recipient, an unresolvable one and an unparseable one.
        t.tx.rcpt_to.push(Mailbox::new("carol@nosuch.example"));
        t.tx.rcpt_to.push(Mailbox::new("not an address"));
        f.update(&mut t).await;
        assert_eq!(
            t.signals[SIGNAL]["rcpt_to_result"],
            serde_json::json!([0, 1, null])
        );
    }

    #[tokio::test]
    async fn null_mx_route_fails_permanently() {
        let (mut f, _dns) = filter(all()).await;
        let mut t = chain_tx("bob@nullmx.example", vec![hp("nullmx.example", 25)]);
        f.update(&mut t).await;
        assert_eq!(t.route.resolution, None);
        assert_eq!(t.tx.mail_response.as_ref().unwrap().code, 550);
        let r = t.rcpt_response(0).unwrap();
        assert_eq!(r.code, 503, "after a failed MAIL: {r}");
        assert_eq!(t.signals[SIGNAL]["rcpt_to_result"], serde_json::json!([1]));
        assert_eq!(t.signals[SIGNAL]["resolution_result"], 1);

        // MAIL already accepted upstream: the recipient itself gets the failure.
        let mut t = chain_tx("bob@nosuch.example", vec![hp("nosuch.example", 25)]);
        t.tx.mail_response = Some(Response::new(250, "ok"));
        f.update(&mut t).await;
        let r = t.rcpt_response(0).unwrap();
        assert_eq!(r.code, 550);
        assert!(r.message.starts_with("5.1.2 "), "{r}");
    }

    #[tokio::test]
    async fn temp_failure_route() {
        let (mut f, _dns) = filter(all()).await;
        let mut t = chain_tx("bob@broken.example", vec![hp("broken.example", 25)]);
        t.tx.mail_response = Some(Response::new(250, "ok"));
        f.update(&mut t).await;
        assert_eq!(t.rcpt_response(0).unwrap().code, 451);
        assert_eq!(t.signals[SIGNAL]["resolution_result"], 2);
        assert_eq!(t.signals[SIGNAL]["mail_from_result"], 0);
    }
}
