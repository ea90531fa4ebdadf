//! Configuration loading: reference files, our own files, defaults, errors,
//! sender resolution.

use std::path::PathBuf;
use std::time::Duration;

use koukan::config::*;

const REF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/koukan-reference/config/"
);
const OURS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/");

fn ref_router() -> RouterConfig {
    // The quickstart file leaves storage.url to the operator.
    let opts = LoadOptions {
        storage_url: Some("sqlite:///koukan.sqlite3".into()),
        ..Default::default()
    };
    RouterConfig::load_with(format!("{REF}router.yaml"), &opts).unwrap()
}

#[test]
fn reference_router_loads() {
    let cfg = ref_router();
    assert!(cfg.global.dequeue);
    assert_eq!(cfg.global.rest_executor.max_inflight, 10);
    assert_eq!(
        cfg.global.output_executor.watchdog_timeout,
        Duration::from_secs(60)
    );
    assert_eq!(cfg.global.rest_id_entropy, 4);
    assert_eq!(cfg.rest_listener.addr, HostPort::new("localhost", 8000));
    assert_eq!(cfg.rest_listener.service_uri, "http://localhost:8000");
    assert_eq!(cfg.senders.len(), 3);
    assert_eq!(cfg.endpoints.len(), 5);
    assert_eq!(cfg.storage.gc_interval, Some(Duration::from_secs(30)));
    assert_eq!(cfg.storage.gc_ttl, Duration::from_secs(3600));
    assert_eq!(cfg.modules.sync_filter["hello"], "koukan.hello_filter");

    let sink = cfg.rest_endpoint("sink").unwrap();
    assert!(sink.options.send_filter_output());
    let ingress = cfg.endpoint("ingress").unwrap();
    let rp = ingress.retry_params().unwrap();
    assert_eq!(rp.max_attempts, Some(3));
    assert_eq!(rp.deadline, Some(Duration::from_secs(30)));
    // `receive_parsing:` with an empty value enables parsing with defaults.
    let FilterConfig::Router(r) = &ingress.chain[5] else {
        panic!("{:?}", ingress.chain[5]);
    };
    let Some(RoutingPolicy::AddressList(a)) = &r.policy else {
        panic!()
    };
    assert_eq!(a.delimiter.as_deref(), Some("+"));
    let d = a.destination.as_ref().unwrap();
    assert_eq!(d.endpoint.as_deref(), Some("receiver"));
    assert_eq!(
        d.options.receive_parsing,
        Some(ReceiveParsing { max_inline: 65536 })
    );
    // the `hello` filter is a plugin from modules.sync_filter
    let sub = cfg.endpoint("submission").unwrap();
    assert!(
        sub.chain
            .iter()
            .any(|f| matches!(f, FilterConfig::Plugin { name, .. } if name == "hello"))
    );
    // known problems of the shipped file surface as warnings
    let w: Vec<String> = cfg.warnings().iter().map(|w| w.to_string()).collect();
    assert!(
        w.contains(
            &"endpoint[3].chain[13].overwrite: ignored: not implemented by the reference"
                .to_string()
        ),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.starts_with("endpoint[2].chain[11].match.matcher: unknown matcher"))
    );
}

#[test]
fn reference_test_router_loads() {
    // The test harness injects a `sync` filter and the listener.
    let sync = |n: &str| n == "sync";
    let opts = LoadOptions {
        extra_filters: Some(&sync),
        storage_url: Some("sqlite://".into()),
        rest_listener_addr: Some(HostPort::new("127.0.0.1", 0)),
        session_uri: Some("http://127.0.0.1:1".into()),
        ..Default::default()
    };
    let cfg =
        RouterConfig::load_with(format!("{REF}router_service_test-router.yaml"), &opts).unwrap();
    assert!(!cfg.global.dequeue);
    assert!(cfg.storage.url.is_memory());
    assert_eq!(cfg.storage.gc_interval, None);
    assert_eq!(cfg.storage.gc_ttl, Duration::ZERO);
    // `retry_params: {}` = all defaults
    assert_eq!(
        cfg.endpoint("sor").unwrap().retry_params(),
        Some(&RetryParams::default())
    );
    let rp = cfg.endpoint("submission").unwrap().retry_params().unwrap();
    assert_eq!(rp.backoff_factor, 0.0);
    assert_eq!(rp.bug_retry, Duration::from_secs(1));
    let w: Vec<String> = cfg.warnings().iter().map(|w| w.to_string()).collect();
    assert!(w.contains(&"global.tx_idle_timeout: ignored: not read by the router".to_string()));

    // Without the harness's filter the file is rejected.
    let opts = LoadOptions {
        storage_url: Some("sqlite://".into()),
        rest_listener_addr: Some(HostPort::new("127.0.0.1", 0)),
        session_uri: Some("http://127.0.0.1:1".into()),
        ..Default::default()
    };
    let err = RouterConfig::load_with(format!("{REF}router_service_test-router.yaml"), &opts)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "endpoint[1].chain[1].filter: unknown filter \"sync\""
    );
}

#[test]
fn reference_gateway_loads() {
    let cfg = GatewayConfig::load(format!("{REF}gateway.yaml")).unwrap();
    assert_eq!(cfg.global.executor.max_inflight, 100);
    assert_eq!(cfg.rest_listener.addr, HostPort::new("localhost", 8001));
    assert_eq!(cfg.rest_listener.gc_tx_ttl, Duration::from_secs(300));
    assert_eq!(cfg.rest_listener.gc_done_ttl, Duration::from_secs(10));
    let out = &cfg.smtp_output.hosts["outbound"];
    assert_eq!(out.ehlo_host, "localhost");
    assert!(out.enable_bdat);
    assert_eq!(out.protocol, SmtpProtocol::Smtp);
    assert_eq!(out.timeout, Duration::from_secs(3300));
    assert_eq!(cfg.smtp_services.len(), 3);
    assert!(cfg.smtp_services[2].smtps);
    assert_eq!(cfg.smtp_services[0].rcpt_timeout, Duration::from_secs(40));
    let mx = cfg.rest_output("mx").unwrap();
    assert_eq!(mx.verify, TlsVerify::CaFile(PathBuf::from("localhost.crt")));
    assert_eq!(mx.refresh_interval, Duration::from_secs(5));
    assert!(cfg.logging.is_some());
    // smtps without a certificate: parses (warning), refused at startup.
    assert_eq!(
        cfg.warnings()[0].to_string(),
        "smtp_listener.services[2].smtps: true without cert/key: the listener cannot start"
    );
    assert_eq!(
        cfg.validate_files().unwrap_err().to_string(),
        "smtp_listener.services[2].cert: missing (required with smtps: true)"
    );
}

#[test]
fn our_configs_load() {
    let r = RouterConfig::load(format!("{OURS}router.yaml")).unwrap();
    assert!(r.warnings().is_empty(), "{:?}", r.warnings());
    assert_eq!(
        r.storage.url,
        StorageUrl::Sqlite {
            path: "koukan.sqlite3".into()
        }
    );
    assert_eq!(r.rest_listener.addr, HostPort::new("127.0.0.1", 8000));
    r.validate_files().unwrap();
    let sub = r.resolve_sender("submission", None).unwrap();
    assert!(sub.retry && sub.notification);
    assert!(!sub.is_incremental(&r));
    let msa = r.resolve_sender("submission", Some("smtp-msa")).unwrap();
    assert!(msa.is_incremental(&r));
    assert!(!msa.upstream(&r).unwrap().is_incremental(&r));
    let mx = r.resolve_sender("ingress", Some("smtp-mx")).unwrap();
    assert!(mx.is_incremental(&r));

    let g = GatewayConfig::load(format!("{OURS}gateway.yaml")).unwrap();
    assert!(g.warnings().is_empty(), "{:?}", g.warnings());
    g.validate_files().unwrap();
    assert_eq!(g.smtp_services[0].addr, HostPort::new("127.0.0.1", 1025));
    assert_eq!(g.smtp_services[1].addr, HostPort::new("127.0.0.1", 1587));
    // every gateway listener feeds a router sender/tag that exists
    for s in &g.smtp_services {
        r.resolve_sender(&s.sender, Some(&s.tag)).unwrap();
    }
}

const HEAD: &str = "
rest_listener: {addr: [127.0.0.1, 8000], session_uri: 'http://127.0.0.1:8000'}
storage: {url: 'sqlite://'}
";

const SIMPLE: &str = "
sender:
- name: s
  output_chain: out
endpoint:
- name: out
  chain:
  - filter: rest_output
";

fn router(body: &str) -> Result<RouterConfig, ConfigError> {
    RouterConfig::from_yaml_str(&format!("{HEAD}{body}"))
}

fn router_err(body: &str) -> String {
    router(body).unwrap_err().to_string()
}

#[test]
fn router_defaults() {
    let cfg = router(
        "
sender:
- name: s
  output_chain: out
endpoint:
- name: out
  output_handler:
    retry_params: {}
  chain:
  - filter: exploder
  - filter: rest_output
",
    )
    .unwrap();
    let g = &cfg.global;
    assert!(g.dequeue);
    assert_eq!(g.rest_executor.max_inflight, 10);
    assert_eq!(g.rest_executor.watchdog_timeout, Duration::from_secs(30));
    assert_eq!(g.output_executor.max_inflight, 10);
    assert_eq!(g.mailer_daemon_mailbox, None);
    assert_eq!(g.rest_id_entropy, 16);
    let l = &cfg.rest_listener;
    assert_eq!(l.service_uri, l.session_uri);
    assert_eq!(l.chunk_size, 1048576);
    assert_eq!(l.tls, None);
    let st = &cfg.storage;
    assert_eq!(st.session_refresh_interval, Duration::from_secs(30));
    assert_eq!(st.gc_interval, None);
    assert_eq!(st.gc_ttl, Duration::from_secs(86400));
    assert_eq!(st.blob_tx_refresh_interval, Duration::from_secs(10));
    assert_eq!(st.cache_ttl, Duration::from_secs(5));
    assert!(!st.store_smtp_transactions);
    let ep = cfg.endpoint("out").unwrap();
    let oh = ep.output_handler.as_ref().unwrap();
    assert_eq!(oh.downstream_timeout, Duration::from_secs(60));
    assert_eq!(oh.upstream_refresh, Duration::from_secs(30));
    let rp = oh.retry_params.as_ref().unwrap();
    assert_eq!(rp.max_attempts, Some(30));
    assert_eq!(rp.min_attempt_time, Duration::from_secs(60));
    assert_eq!(rp.max_attempt_time, Duration::from_secs(3600));
    assert_eq!(rp.backoff_factor, 1.5);
    assert_eq!(rp.deadline, Some(Duration::from_secs(86400)));
    assert_eq!(rp.bug_retry, Duration::from_secs(3600));
    assert_eq!(rp.backoff(), koukan::Backoff::default());
    let FilterConfig::Exploder(ex) = &ep.chain[0] else {
        panic!()
    };
    assert!(!ex.msa);
    assert_eq!(ex.rcpt_timeout, Duration::from_secs(30));
    assert_eq!(ex.data_timeout, Duration::from_secs(300));
    let FilterConfig::RestOutput(ro) = &ep.chain[1] else {
        panic!()
    };
    assert_eq!(ro.rcpt_timeout, Duration::from_secs(30));
    assert_eq!(ro.data_timeout, Duration::from_secs(300));
    assert_eq!(ro.verify, TlsVerify::System);
    assert_eq!(ro.chunk_size, None);
    assert!(!ep.is_incremental());
}

#[test]
fn null_means_no_limit_and_msa_defaults() {
    let cfg = router(
        "
sender:
- name: s
  output_chain: out
endpoint:
- name: out
  output_handler:
    retry_params:
      max_attempts:
      deadline: ~
  chain:
  - filter: exploder
    msa: yes
  - filter: policy_action
    tag: t
    action: [[0.9, LOG], [0.1, REJECT]]
  - filter: rest_output
    verify: off
",
    )
    .unwrap();
    let ep = cfg.endpoint("out").unwrap();
    let rp = ep.retry_params().unwrap();
    assert_eq!(rp.max_attempts, None);
    assert_eq!(rp.deadline, None);
    let FilterConfig::Exploder(ex) = &ep.chain[0] else {
        panic!()
    };
    assert!(ex.msa);
    assert_eq!(ex.rcpt_timeout, Duration::from_secs(5));
    assert_eq!(ex.data_timeout, Duration::from_secs(30));
    let FilterConfig::PolicyAction(pa) = &ep.chain[1] else {
        panic!()
    };
    assert_eq!(pa.name, "t");
    assert_eq!(pa.code, 550);
    assert_eq!(pa.message, "5.6.0 message rejected t");
    assert_eq!(pa.mode, PolicyMode::Transaction);
    assert_eq!(
        pa.action,
        PolicyAction::Weighted(vec![(0.9, ActionKind::Log), (0.1, ActionKind::Reject)])
    );
    let FilterConfig::RestOutput(ro) = &ep.chain[2] else {
        panic!()
    };
    assert_eq!(ro.verify, TlsVerify::Disabled);
}

#[test]
fn yaml_11_scalars() {
    let cfg = router(&format!(
        "global:\n  dequeue: no\n  rest_id_entropy: 010\n  executor: {{rest: {{max_inflight: 0x10}}}}\n{SIMPLE}"
    ))
    .unwrap();
    assert!(!cfg.global.dequeue);
    assert_eq!(cfg.global.rest_id_entropy, 8);
    assert_eq!(cfg.global.rest_executor.max_inflight, 16);
    // `y` and odd capitalisations stay strings, as in PyYAML
    let cfg = router(&format!(
        "global: {{mailer_daemon_mailbox: y, dequeue: OFF}}\n{SIMPLE}- name: yEs\n  chain: [{{filter: rest_output}}]\n"
    ))
    .unwrap();
    assert_eq!(cfg.global.mailer_daemon_mailbox.as_deref(), Some("y"));
    assert!(!cfg.global.dequeue);
    assert!(cfg.endpoint("yEs").is_some());
    assert_eq!(
        router_err(&format!("global: {{dequeue: n}}\n{SIMPLE}")),
        "global.dequeue: expected a boolean, got a string"
    );
}

#[test]
fn unknown_keys_warn() {
    let cfg = router(&format!(
        "colour: blue\nglobal: {{dequeue: On, frobnicate: 1}}\n{SIMPLE}"
    ))
    .unwrap();
    let w: Vec<String> = cfg.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(w, ["global.frobnicate: unknown key", "colour: unknown key"]);
}

fn check(body: &str, expected: &str) {
    assert_eq!(router_err(body), expected, "for:\n{body}");
}

#[test]
fn bad_unknown_filter() {
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - filter: message_builder
  - filter: dkimm
  - filter: rest_output
",
        "endpoint[0].chain[1].filter: unknown filter \"dkimm\"",
    );
}

#[test]
fn bad_listener_addr() {
    let e = RouterConfig::from_yaml_str(&format!(
        "rest_listener: {{addr: 'localhost:8000', session_uri: x}}\nstorage: {{url: 'sqlite://'}}\n{SIMPLE}"
    ))
    .unwrap_err();
    assert_eq!(e.to_string(), "rest_listener.addr: expected [host, port]");
    let e = RouterConfig::from_yaml_str(&format!(
        "rest_listener: {{addr: [localhost, 70000], session_uri: x}}\nstorage: {{url: 'sqlite://'}}\n{SIMPLE}"
    ))
    .unwrap_err();
    assert_eq!(e.to_string(), "rest_listener.addr: port 70000 out of range");
}

#[test]
fn bad_sender_chain() {
    check(
        "
sender:
- name: s
  output_chain: out
- name: t
  output_chain: foo
endpoint:
- name: out
  chain: [{filter: rest_output}]
",
        "sender[1].output_chain: no endpoint named \"foo\"",
    );
    check(
        "
sender:
- name: s
  output_chain: out
  tag:
  - name: x
    output_chain: nope
endpoint:
- name: out
  chain: [{filter: rest_output}]
",
        "sender[0].tag[0].output_chain: no endpoint named \"nope\"",
    );
}

#[test]
fn bad_storage() {
    let e = RouterConfig::from_yaml_str(&format!(
        "rest_listener: {{addr: [h, 1], session_uri: x}}\nstorage: {{gc_ttl: 5}}\n{SIMPLE}"
    ))
    .unwrap_err();
    assert_eq!(e.to_string(), "storage.url: missing");
    let e = RouterConfig::from_yaml_str(&format!(
        "rest_listener: {{addr: [h, 1], session_uri: x}}\nstorage: {{url: 'sqlite://', gc_ttl: -5}}\n{SIMPLE}"
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "storage.gc_ttl: expected a non-negative number of seconds"
    );
    let e = RouterConfig::from_yaml_str(&format!(
        "rest_listener: {{addr: [h, 1], session_uri: x}}\nstorage: {{url: 'mysql://db'}}\n{SIMPLE}"
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "storage.url: unsupported database \"mysql\" (expected sqlite or postgresql)"
    );
    let e = RouterConfig::from_yaml_str(&format!(
        "rest_listener: {{addr: [h, 1], session_uri: x}}\nstorage: {{url: 'sqlite://', store_smtp_transactions: sometimes}}\n{SIMPLE}"
    ))
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("storage.store_smtp_transactions:"),
        "{e}"
    );
}

#[test]
fn bad_duplicates() {
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain: [{filter: rest_output}]
- name: out
  chain: [{filter: rest_output}]
",
        "endpoint[1].name: duplicate name \"out\" (also endpoint[0])",
    );
    check(
        &format!(
            "{SIMPLE}- name: out2\n  chain: [{{filter: rest_output}}]\nrest_endpoint: [{{name: a, sender: x}}, {{name: a, sender: y}}]\n"
        ),
        "rest_endpoint[1].name: duplicate name \"a\" (also rest_endpoint[0])",
    );
    check(
        "
sender:
- name: s
  output_chain: out
  tag: [{name: a}, {name: a}]
endpoint:
- name: out
  chain: [{filter: rest_output}]
",
        "sender[0].tag[1].name: duplicate name \"a\" (also sender[0].tag[0])",
    );
}

#[test]
fn bad_notification() {
    check(
        "
sender: [{name: s, output_chain: out, notification: output_chain}]
endpoint:
- name: out
  output_handler: {retry_params: {}}
  chain: [{filter: rest_output}]
",
        "sender[0].notification: requires retry: output_chain",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  output_handler:
    notification: {sender: s}
  chain: [{filter: rest_output}]
",
        "endpoint[0].output_handler.notification: requires global.mailer_daemon_mailbox",
    );
    check(
        "
global: {mailer_daemon_mailbox: md@example.com}
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  output_handler:
    notification: {sender: s, tag: dsn}
  chain: [{filter: rest_output}]
",
        "endpoint[0].output_handler.notification.sender: sender \"s\" does not accept tags (got \"dsn\")",
    );
}

const EXPLODER_CHAINS: &str = "
endpoint:
- name: smtp
  output_handler: {}
  chain: [{filter: exploder}]
- name: out
  output_handler: {retry_params: {}}
  chain: [{filter: rest_output}]
";

#[test]
fn bad_exploder_wiring() {
    // upstream sender does not exist
    check(
        &format!(
            "sender: [{{name: s, output_chain: smtp, upstream_sender: ghost}}]{EXPLODER_CHAINS}"
        ),
        "sender[0].upstream_sender: exploder upstream: unknown sender \"ghost\"",
    );
    // upstream is the sender itself: would explode forever
    check(
        &format!("sender: [{{name: s, output_chain: smtp}}]{EXPLODER_CHAINS}"),
        "sender[0].upstream_tag: exploder upstream sender \"s\" uses chain \"smtp\", which ends with exploder too",
    );
    // upstream tag missing
    check(
        &format!(
            "sender:\n- name: s\n  output_chain: out\n  tag:\n  - {{name: mx, output_chain: smtp, upstream_tag: up}}\n{EXPLODER_CHAINS}"
        ),
        "sender[0].tag[0].upstream_tag: exploder upstream: sender \"s\" has no tag \"up\"",
    );
    // retry inherited by the exploder tag
    check(
        &format!(
            "sender:\n- name: s\n  output_chain: out\n  retry: output_chain\n  tag:\n  - {{name: mx, output_chain: smtp}}\n{EXPLODER_CHAINS}"
        ),
        "sender[0].tag[0].retry: must be null for sender \"s\" tag \"mx\": its chain \"smtp\" ends with exploder",
    );
}

#[test]
fn bad_chains() {
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain: [{filter: router}]
",
        "endpoint[0].chain[0]: last filter \"router\" is not terminal (expected rest_output, exploder, exploder_upstream or a plugin)",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain: []
",
        "endpoint[0].chain: empty",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - {filter: policy_action, action: REJECT}
  - filter: rest_output
",
        "endpoint[0].chain[0].tag: missing",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - {filter: policy_action, tag: t, action: [[0.9, LOG], 0.1]}
  - filter: rest_output
",
        "endpoint[0].chain[0].action[1]: expected [weight, action]",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - {filter: policy_action, tag: t, action: DROP}
  - filter: rest_output
",
        "endpoint[0].chain[0].action: expected REJECT, LOG or MATCH, got \"DROP\"",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - filter: policy_action
    tag: t
    match: {not: {matcher: smtp_tls}, any: []}
  - filter: rest_output
",
        "endpoint[0].chain[0].match: expected `matcher: <name>` or exactly one of `not`, `any`, `all`",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - {filter: dkim_sign, key: k.pem, domain: example.com}
  - filter: rest_output
",
        "endpoint[0].chain[0].selector: missing (required when key is set)",
    );
}

#[test]
fn bad_routes() {
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - filter: router
    policy: {name: dest_domain, destination: {endpoint: gw}}
  - filter: rest_output
",
        "endpoint[0].chain[0].policy.destination.endpoint: no rest_endpoint named \"gw\"",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - filter: router
    policy: {name: dest_domain}
  - filter: rest_output
",
        "endpoint[0].chain[0].policy.destination: missing",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - filter: router
    policy: {name: mx_lookup}
  - filter: rest_output
",
        "endpoint[0].chain[0].policy.name: unknown routing policy \"mx_lookup\"",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
rest_endpoint: [{name: gw, endpoint: 'http://x/senders/r/transactions'}]
endpoint:
- name: out
  chain: [{filter: rest_output}]
",
        "rest_endpoint[0].sender: missing",
    );
    check(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain:
  - {filter: add_route, sender: sor}
  - filter: rest_output
",
        "endpoint[0].chain[0].sender: unknown sender \"sor\"",
    );
}

#[test]
fn bad_misc() {
    check(
        &format!("modules:\n  sync_filter: {{router: my.router}}\n{SIMPLE}"),
        "modules.sync_filter.router: name collides with the built-in filter \"router\"",
    );
    let e = RouterConfig::from_yaml_str(&format!(
        "rest_listener: {{addr: [h, 1], session_uri: x, cert: c.pem}}\nstorage: {{url: 'sqlite://'}}\n{SIMPLE}"
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "rest_listener.key: missing (required when cert is set)"
    );
    check(
        &format!("global: {{dequeue: maybe}}\n{SIMPLE}"),
        "global.dequeue: expected a boolean, got a string",
    );
    check(
        "sender: [{name: s}]\nendpoint: [{name: out, chain: [{filter: rest_output}]}]\n",
        "sender[0].output_chain: missing",
    );
    assert_eq!(
        RouterConfig::from_yaml_str("- a\n- b\n")
            .unwrap_err()
            .to_string(),
        "(top level): expected a mapping, got a list"
    );
}

#[test]
fn syntax_error_has_position() {
    let e = router("sender: [unclosed\nendpoint: {}\n").unwrap_err();
    match &e {
        ConfigError::Syntax { line, .. } => assert!(*line >= 3, "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "line 5, column 9: illegal placement of ':' indicator"
    );
}

#[test]
fn validate_files_names_key() {
    let cfg = router(
        "
sender: [{name: s, output_chain: out}]
endpoint:
- name: out
  chain: [{filter: rest_output, verify: /nonexistent/ca.pem}]
",
    )
    .unwrap();
    assert_eq!(
        cfg.validate_files().unwrap_err().to_string(),
        "endpoint[0].chain[0].verify: file \"/nonexistent/ca.pem\" does not exist"
    );
}

#[test]
fn sender_resolution() {
    let cfg = ref_router();
    let s = cfg.resolve_sender("submission", None).unwrap();
    assert_eq!(s.output_chain, "submission");
    assert!(s.retry);
    assert!(!s.notification);
    assert_eq!(s.upstream_sender, "submission");
    assert_eq!(s.upstream_tag, None);

    let msa = cfg.resolve_sender("submission", Some("smtp-msa")).unwrap();
    assert_eq!(msa.output_chain, "submission_exploder");
    assert!(!msa.retry, "tag's retry: null overrides the sender");
    assert!(msa.is_incremental(&cfg));
    let up = msa.upstream(&cfg).unwrap();
    assert_eq!(up.tag.as_deref(), Some("smtp-msa-upstream"));
    assert_eq!(up.output_chain, "submission");
    assert!(!up.retry);
    assert!(!up.is_incremental(&cfg));

    // the notification tag inherits retry from the sender
    assert!(
        cfg.resolve_sender("submission", Some("notification"))
            .unwrap()
            .retry
    );

    let sc = cfg
        .resolve_sender("ingress", Some("short_circuit"))
        .unwrap();
    assert_eq!(sc.output_chain, "ingress");
    assert_eq!(sc.remote_host.as_deref(), Some("127.0.0.1"));
    assert_eq!(sc.smtp_meta.unwrap()["ehlo_host"], "localhost");

    // `sor` has no output_handler on its chain: retry can never be on
    assert!(!cfg.resolve_sender("sor", None).unwrap().retry);

    assert_eq!(
        cfg.resolve_sender("nobody", None),
        Err(SenderError::UnknownSender("nobody".into()))
    );
    assert_eq!(
        cfg.resolve_sender("ingress", Some("nope")),
        Err(SenderError::UnknownTag {
            sender: "ingress".into(),
            tag: "nope".into()
        })
    );
    assert_eq!(
        cfg.resolve_sender("sor", Some("x")),
        Err(SenderError::TagsNotSupported {
            sender: "sor".into(),
            tag: "x".into()
        })
    );
}

#[test]
fn sender_without_own_chain() {
    // allowed when every tag names one; untagged use then fails
    let cfg = router(
        "
sender:
- name: s
  tag: [{name: a, output_chain: out}]
endpoint: [{name: out, chain: [{filter: rest_output}]}]
",
    )
    .unwrap();
    assert!(cfg.resolve_sender("s", Some("a")).is_ok());
    assert_eq!(
        cfg.resolve_sender("s", None),
        Err(SenderError::NoOutputChain {
            sender: "s".into(),
            tag: None
        })
    );
}

const GW_HEAD: &str = "
rest_listener: {addr: [127.0.0.1, 8001], session_uri: 'http://127.0.0.1:8001'}
smtp_output: {hosts: {}}
";

fn gateway_err(body: &str) -> String {
    GatewayConfig::from_yaml_str(&format!("{GW_HEAD}{body}"))
        .unwrap_err()
        .to_string()
}

#[test]
fn gateway_defaults() {
    let g = GatewayConfig::from_yaml_str(&format!(
        "{GW_HEAD}smtp_listener:\n  services: [{{addr: [h, 25], endpoint: r, sender: s, tag: t}}]\nrest_output: [{{name: r, endpoint: 'http://r'}}]\n"
    ))
    .unwrap();
    assert_eq!(g.global.executor.max_inflight, 10);
    assert_eq!(
        g.global.executor.watchdog_timeout,
        Duration::from_secs(3600)
    );
    let l = &g.rest_listener;
    assert_eq!(l.rest_id_entropy, 16);
    assert_eq!(l.chunk_size, 1048576);
    assert_eq!(l.gc_interval, Duration::from_secs(5));
    assert_eq!(l.gc_tx_ttl, Duration::from_secs(600));
    assert_eq!(l.gc_done_ttl, Duration::from_secs(10));
    let s = &g.smtp_services[0];
    assert!(!s.smtps && !s.enable_bdat);
    assert_eq!(s.chunk_size, None);
    assert_eq!(s.rcpt_timeout, Duration::from_secs(40));
    assert_eq!(s.data_timeout, Duration::from_secs(310));
    assert_eq!(s.max_message_size, 33554432);
    let r = &g.rest_outputs[0];
    assert_eq!(r.verify, TlsVerify::System);
    assert_eq!(r.rcpt_timeout, Duration::from_secs(30));
    assert_eq!(r.data_timeout, Duration::from_secs(60));
    assert_eq!(r.chunk_size, 1048576);
    assert_eq!(r.refresh_interval, Duration::from_secs(30));

    let g = GatewayConfig::from_yaml_str(
        "rest_listener: {addr: [h, 1], session_uri: x}\nsmtp_output:\n  hosts:\n    out: {ehlo_host: e, timeout: null, protocol: lmtp}\nsmtp_listener: {services: []}\n",
    )
    .unwrap();
    let h = &g.smtp_output.hosts["out"];
    assert_eq!(h.timeout, Duration::from_secs(30));
    assert_eq!(h.protocol, SmtpProtocol::Lmtp);
    assert_eq!(h.chunk_size, 65536);
    assert!(!h.enable_bdat);
}

#[test]
fn gateway_errors() {
    assert_eq!(
        gateway_err(
            "smtp_listener:\n  services: [{addr: [h, 25], endpoint: mx, sender: s, tag: t}]\n"
        ),
        "smtp_listener.services[0].endpoint: no rest_output named \"mx\""
    );
    assert_eq!(gateway_err("rest_output: []\n"), "smtp_listener: missing");
    assert_eq!(
        GatewayConfig::from_yaml_str(
            "rest_listener: {addr: [h, 1], session_uri: x}\nsmtp_output:\n  hosts:\n    out: {ehlo_host: e, protocol: esmtp}\nsmtp_listener: {services: []}\n"
        )
        .unwrap_err()
        .to_string(),
        "smtp_output.hosts.out.protocol: expected smtp or lmtp, got \"esmtp\""
    );
    assert_eq!(
        GatewayConfig::from_yaml_str(
            "rest_listener: {addr: [h, 1]}\nsmtp_output: {hosts: {}}\nsmtp_listener: {services: []}\n"
        )
        .unwrap_err()
        .to_string(),
        "rest_listener.session_uri: missing"
    );
    let g = GatewayConfig::from_yaml_str(&format!(
        "{GW_HEAD}smtp_listener: {{services: []}}\nrest_output: [{{name: r, endpoint: 'https://r', verify: /nonexistent/ca.pem}}]\n"
    ))
    .unwrap();
    assert_eq!(
        g.validate_files().unwrap_err().to_string(),
        "rest_output[0].verify: file \"/nonexistent/ca.pem\" does not exist"
    );
}
