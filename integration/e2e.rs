//! The whole relay as separate processes: SMTP client → gateway → router → gateway →
//! SMTP/LMTP sink, REST submissions, and a REST receiver behind a `receive_parsing` route.
//! The sinks and the receiver run in the test process so that what arrived can be
//! inspected; the router and gateway are the real binaries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use koukan_actors::tools::receive::{Receiver, ReceiverOptions};
use koukan_actors::tools::rest_send::{self, Message, Outcome, RestSendOptions};
use koukan_actors::tools::send::{self, SendOptions, SendReport};
use koukan_actors::tools::sink::{Received, Sink, SinkOptions};
use serde_json::{Value, json};

use crate::harness::{Process, ROUTER_BIN, free_port, wait_for_port};

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_koukan-gateway");
const TOOLS_BIN: &str = env!("CARGO_BIN_EXE_koukan");
/// Generous bound for a message to cross the stack (a failure, not a measurement).
const ARRIVAL: Duration = Duration::from_secs(60);

/// Runs a tool binary off the test's thread: the in-process sink and receiver share that
/// thread and must keep serving while the tool waits on them.
async fn run_tool(args: Vec<String>) -> std::process::Output {
    actix_rt::task::spawn_blocking(move || Command::new(TOOLS_BIN).args(args).output().unwrap())
        .await
        .unwrap()
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn reference(f: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/koukan-reference")
        .join(f)
}

/// Router, gateway, an SMTP sink, an LMTP sink and a REST receiver.
struct Stack {
    dir: tempfile::TempDir,
    router_port: u16,
    mx: SocketAddr,
    msa: SocketAddr,
    sink: Sink,
    lmtp_sink: Sink,
    receiver: Receiver,
    router: Process,
    gateway: Process,
}

impl Stack {
    async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let sink = Sink::start(SinkOptions::new(local(0))).await.unwrap();
        let mut lmtp = SinkOptions::new(local(0));
        lmtp.lmtp = true;
        let lmtp_sink = Sink::start(lmtp).await.unwrap();
        let receiver = Receiver::start(ReceiverOptions {
            dir: Some(dir.path().join("received")),
            ..ReceiverOptions::new(local(0))
        })
        .await
        .unwrap();
        let (router_port, gw_rest, mx, msa) = (free_port(), free_port(), free_port(), free_port());
        let router_yaml = dir.path().join("router.yaml");
        std::fs::write(
            &router_yaml,
            router_config(
                router_port,
                gw_rest,
                sink.addr.port(),
                lmtp_sink.addr.port(),
                &receiver.base_url,
                &dir.path().join("router.sqlite3"),
            ),
        )
        .unwrap();
        let gateway_yaml = dir.path().join("gateway.yaml");
        std::fs::write(&gateway_yaml, gateway_config(gw_rest, router_port, mx, msa)).unwrap();
        let router = Process::start(ROUTER_BIN, &router_yaml, router_port, dir.path(), "router");
        let mut gateway = Process::start(GATEWAY_BIN, &gateway_yaml, gw_rest, dir.path(), "gw");
        wait_for_port(&mut gateway, mx);
        wait_for_port(&mut gateway, msa);
        Stack {
            router_port,
            mx: local(mx),
            msa: local(msa),
            sink,
            lmtp_sink,
            receiver,
            router,
            gateway,
            dir,
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- router\n{}\n--- gateway\n{}",
            self.router.log(),
            self.gateway.log()
        )
    }

    fn submission_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/senders/submission/transactions",
            self.router_port
        )
    }

    async fn smtp(
        &self,
        server: SocketAddr,
        from: &str,
        to: &[&str],
        message: &[u8],
    ) -> SendReport {
        let opts = SendOptions {
            server: server.to_string(),
            ehlo: "client.test".into(),
            from: from.into(),
            to: to.iter().map(|s| s.to_string()).collect(),
            starttls: false,
            verify: koukan::config::TlsVerify::Disabled,
            auth: None,
            lmtp: false,
            timeout: Duration::from_secs(120),
            message: message.to_vec(),
        };
        send::send(&opts, |_| {})
            .await
            .unwrap_or_else(|e| panic!("SMTP to {server}: {e}\n{}", self.logs()))
    }
}

fn router_config(
    port: u16,
    gateway: u16,
    sink: u16,
    lmtp_sink: u16,
    receiver: &str,
    db: &Path,
) -> String {
    format!(
        r#"global:
  dequeue: true
  executor:
    rest: {{max_inflight: 10, watchdog_timeout: 30}}
    output: {{max_inflight: 100, watchdog_timeout: 330}}
  mailer_daemon_mailbox: mailer-daemon@localhost
rest_listener:
  addr: ["127.0.0.1", {port}]
  session_uri: http://127.0.0.1:{port}
sender:
- name: ingress
  output_chain: ingress
  tag:
  - name: smtp-mx
    output_chain: ingress_exploder
    upstream_tag: smtp-mx-upstream
  - name: smtp-mx-upstream
- name: submission
  output_chain: submission
  retry: output_chain
  notification: output_chain
  tag:
  - name: smtp-msa
    output_chain: submission_exploder
    upstream_tag: smtp-msa-upstream
    retry: null
    notification: null
  - name: smtp-msa-upstream
    retry: null
    notification: null
  - name: notification
    notification: null
rest_endpoint:
- name: gateway
  endpoint: http://127.0.0.1:{gateway}/senders/router/transactions
  sender: router
  tag: outbound
- name: gateway_lmtp
  endpoint: http://127.0.0.1:{gateway}/senders/router/transactions
  sender: router
  tag: outbound-lmtp
- name: receiver
  endpoint: {receiver}/senders/router/transactions
  sender: router
  options:
    receive_parsing: {{max_inline: 10}}
    send_filter_output: true
endpoint:
- name: submission_exploder
  output_handler: {{downstream_timeout: 30, upstream_refresh: 5}}
  chain:
  - filter: exploder
    msa: true
- name: submission
  output_handler:
    downstream_timeout: 30
    upstream_refresh: 5
    retry_params: {{max_attempts: 3, min_attempt_time: 60, max_attempt_time: 3600, backoff_factor: 1.5, deadline: 86400}}
    notification: {{sender: submission, tag: notification}}
  chain:
  - filter: message_builder
  - filter: received_header
    received_hostname: router.test
  - filter: router
    policy:
      name: dest_domain
      destination:
        endpoint: gateway
  - filter: router
  - filter: dns_resolution
    suffix: ''
    static_hosts:
    - host: 127.0.0.1
      port: {sink}
  - filter: rest_output
    rcpt_timeout: 60
    data_timeout: 60
    chunk_size: 1048576
- name: ingress_exploder
  output_handler: {{downstream_timeout: 30, upstream_refresh: 5}}
  chain:
  - filter: router
    dry_run: true
    policy:
      name: address_list
      domains: [example.com, lmtp.example, rcv.example, failover.example]
      destination:
  - filter: router
    dry_run: true
  - filter: exploder
    msa: false
- name: ingress
  output_handler:
    downstream_timeout: 30
    upstream_refresh: 5
    retry_params: {{max_attempts: 3, min_attempt_time: 60, max_attempt_time: 3600, backoff_factor: 1.5, deadline: 86400}}
    notification: {{sender: submission, tag: notification}}
  chain:
  - filter: received_header
    received_hostname: router.test
  - filter: router
    policy:
      name: address_list
      domains: [rcv.example]
      destination:
        endpoint: receiver
  - filter: router
    policy:
      name: address_list
      domains: [lmtp.example]
      destination:
        endpoint: gateway_lmtp
        host_list:
        - host: 127.0.0.1
          port: {lmtp_sink}
  - filter: router
    policy:
      name: address_list
      domains: [example.com]
      destination:
        endpoint: gateway
        host_list:
        - host: 127.0.0.1
          port: {sink}
  # the first next hop refuses connections: rest_output tries the second
  - filter: router
    policy:
      name: address_list
      domains: [failover.example]
      destination:
        endpoint: gateway
        host_list:
        - host: 127.0.0.1
          port: {dead}
        - host: 127.0.0.1
          port: {sink}
  - filter: router
  - filter: message_parser
  - filter: rest_output
    rcpt_timeout: 60
    data_timeout: 60
    chunk_size: 1048576
storage:
  url: sqlite:///{db}
  session_refresh_interval: 30
"#,
        db = db.display(),
        dead = free_port(),
    )
}

fn gateway_config(rest: u16, router: u16, mx: u16, msa: u16) -> String {
    format!(
        r#"global:
  executor: {{max_inflight: 100, watchdog_timeout: 3600}}
rest_listener:
  addr: ["127.0.0.1", {rest}]
  session_uri: http://127.0.0.1:{rest}
  gc_interval: 5
  gc_tx_ttl: 300
  gc_done_ttl: 10
smtp_output:
  hosts:
    outbound:
      ehlo_host: gateway.test
      protocol: smtp
      enable_bdat: true
      timeout: 300
    outbound-lmtp:
      ehlo_host: gateway.test
      protocol: lmtp
      timeout: 300
smtp_listener:
  services:
  - addr: ["127.0.0.1", {mx}]
    endpoint: mx
    sender: ingress
    tag: smtp-mx
  - addr: ["127.0.0.1", {msa}]
    endpoint: msa
    sender: submission
    tag: smtp-msa
rest_output:
- name: mx
  endpoint: http://127.0.0.1:{router}/senders/ingress/transactions
  rcpt_timeout: 120
  data_timeout: 120
  chunk_size: 1048576
  refresh_interval: 5
- name: msa
  endpoint: http://127.0.0.1:{router}/senders/submission/transactions
  rcpt_timeout: 120
  data_timeout: 120
  chunk_size: 1048576
  refresh_interval: 5
"#
    )
}

/// A message of about `size` bytes with a unique subject (lines of 76 characters).
fn message(subject: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: alice@client.test\r\nTo: bob@example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@client.test>\r\n\r\n"
    )
    .into_bytes();
    let mut i = 0usize;
    while m.len() < size {
        // A line starting with a dot now and then exercises transparency.
        let lead = if i.is_multiple_of(7) { "." } else { "" };
        m.extend_from_slice(format!("{lead}{i:08} {}\r\n", "x".repeat(64)).as_bytes());
        i += 1;
    }
    m
}

/// The message as delivered minus the one `Received:` field the router prepends.
fn without_received(data: &[u8]) -> &[u8] {
    assert!(
        data.starts_with(b"Received:"),
        "no Received header first: {:?}",
        String::from_utf8_lossy(&data[..data.len().min(200)])
    );
    let mut pos = 0;
    loop {
        let end = data[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| pos + p + 2)
            .expect("header line ends");
        pos = end;
        if !matches!(data.get(pos), Some(b' ') | Some(b'\t')) {
            return &data[pos..];
        }
    }
}

fn with_subject<'a>(msgs: &'a [Received], subject: &str) -> Vec<&'a Received> {
    let needle = format!("Subject: {subject}\r\n");
    msgs.iter()
        .filter(|m| m.data.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .collect()
}

#[actix_rt::test]
async fn mx_routed_once_unrouted_refused() {
    let s = Stack::start().await;
    let msg = message("mx-routed", 2048);
    let r = s
        .smtp(
            s.mx,
            "alice@client.test",
            &["bob@example.com", "carol@unrouted.test"],
            &msg,
        )
        .await;
    assert_eq!(r.mail.as_ref().unwrap().code, 250, "{r:?}");
    assert_eq!(r.rcpts[0].code, 250, "{r:?}\n{}", s.logs());
    assert!(
        (500..600).contains(&r.rcpts[1].code),
        "unrouted domain: {r:?}"
    );
    assert!(r.data[0].ok(), "{r:?}\n{}", s.logs());
    // One accepted recipient: the data response is the upstream's, so it has arrived.
    let msgs = s.sink.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].rcpt_to, vec!["bob@example.com".to_string()]);
    assert_eq!(msgs[0].mail_from, "alice@client.test");
    assert_eq!(without_received(&msgs[0].data), &msg[..]);
    assert!(s.lmtp_sink.messages().is_empty());
    assert!(s.receiver.transactions().is_empty());
}

#[actix_rt::test]
async fn mx_and_msa_bodies_byte_identical() {
    let s = Stack::start().await;
    let cases: [(&str, SocketAddr, Vec<&str>, usize); 4] = [
        ("mx-1-2k", s.mx, vec!["bob@example.com"], 2048),
        (
            "mx-3-2k",
            s.mx,
            vec!["bob@example.com", "carol@example.com", "dave@example.com"],
            2048,
        ),
        ("mx-1-10m", s.mx, vec!["bob@example.com"], 10 << 20),
        (
            "msa-3-10m",
            s.msa,
            vec!["bob@example.com", "carol@example.org", "dave@example.net"],
            10 << 20,
        ),
    ];
    let mut expected = 0;
    for (subject, server, rcpts, size) in &cases {
        let msg = message(subject, *size);
        let r = s.smtp(*server, "alice@client.test", rcpts, &msg).await;
        assert!(r.delivered(), "{subject}: {r:?}\n{}", s.logs());
        expected += rcpts.len() as u64;
        assert!(
            s.sink.wait_count(expected, ARRIVAL).await,
            "{subject}: {} of {expected} arrived\n{}",
            s.sink.count(),
            s.logs()
        );
        let all = s.sink.messages();
        let got = with_subject(&all, subject);
        // One upstream transaction per recipient (exploder).
        assert_eq!(got.len(), rcpts.len(), "{subject}");
        let mut to: Vec<String> = got.iter().flat_map(|m| m.rcpt_to.clone()).collect();
        to.sort();
        let mut want: Vec<String> = rcpts.iter().map(|r| r.to_string()).collect();
        want.sort();
        assert_eq!(to, want, "{subject}");
        for m in got {
            assert!(
                without_received(&m.data) == &msg[..],
                "{subject}: body differs ({} vs {} bytes)",
                m.data.len(),
                msg.len()
            );
        }
    }
    assert_eq!(s.sink.count(), expected, "no duplicates");
}

#[actix_rt::test]
async fn lmtp_upstream() {
    let s = Stack::start().await;
    let msg = message("lmtp", 4096);
    let r = s
        .smtp(s.mx, "alice@client.test", &["erin@lmtp.example"], &msg)
        .await;
    assert!(r.delivered(), "{r:?}\n{}", s.logs());
    let msgs = s.lmtp_sink.messages();
    assert_eq!(msgs.len(), 1, "{}", s.logs());
    assert_eq!(msgs[0].rcpt_to, vec!["erin@lmtp.example".to_string()]);
    assert_eq!(msgs[0].ehlo, "gateway.test");
    assert_eq!(without_received(&msgs[0].data), &msg[..]);
    assert!(s.sink.messages().is_empty());
}

/// `send_message_builder.json` with its files next to it.
fn builder_spec(dir: &Path) -> PathBuf {
    let spec: Value = serde_json::from_slice(
        &std::fs::read(reference("config/send_message_builder.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("body.html"),
        "<html><body>hello, world!</body></html>\n",
    )
    .unwrap();
    std::fs::write(dir.join("body.txt"), "hello, world!\n").unwrap();
    let mut text = serde_json::to_string_pretty(&spec).unwrap();
    // The reference names paths of its own repository; point them at ours.
    text = text.replace("examples/send_message/", "");
    let path = dir.join("message_builder.json");
    std::fs::write(&path, text).unwrap();
    path
}

fn check_mime(data: &[u8]) {
    let parsed = mail_parser::MessageParser::default()
        .parse(data)
        .expect("MIME parses");
    assert_eq!(parsed.subject(), Some("hello"));
    assert!(parsed.date().is_some(), "date header added by the sender");
    assert!(parsed.message_id().is_some());
    assert_eq!(
        parsed.body_html(0).as_deref().map(str::trim_end),
        Some("<html><body>hello, world!</body></html>")
    );
    assert_eq!(
        parsed.body_text(0).as_deref().map(str::trim_end),
        Some("hello, world!")
    );
}

#[actix_rt::test]
async fn rest_message_builder_arrives_as_mime() {
    let s = Stack::start().await;
    let spec = builder_spec(s.dir.path());
    let opts = RestSendOptions {
        base_url: s.submission_url(),
        mail_from: "alice@client.test".into(),
        tag: None,
        timeout: ARRIVAL,
    };
    let message = Message::builder_file(&spec).unwrap();
    let r = rest_send::send_one(&opts, &message, "bob@example.com", |_| {})
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Success, "{}\n{}", r.json, s.logs());
    assert_eq!(
        r.json["final_attempt_reason"],
        json!("upstream response success")
    );
    let msgs = s.sink.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].rcpt_to, vec!["bob@example.com".to_string()]);
    check_mime(&msgs[0].data);
}

#[actix_rt::test]
async fn receive_parsing_receiver_gets_parsed_json_and_blobs() {
    let s = Stack::start().await;
    let msg = std::fs::read(reference("testdata/multipart.msg")).unwrap();
    let r = s
        .smtp(s.mx, "alice@client.test", &["rcv@rcv.example"], &msg)
        .await;
    assert!(r.delivered(), "{r:?}\n{}", s.logs());
    let got = s.receiver.messages();
    assert_eq!(got.len(), 1, "{}", s.logs());
    let m = &got[0];
    assert_eq!(m.sender, "router");
    assert_eq!(m.tx_json["rcpt_to"], json!([{"m": "rcv@rcv.example"}]));
    assert_eq!(m.tx_json["mail_from"]["m"], json!("alice@client.test"));
    assert_eq!(m.tx_json["sender"]["name"], json!("router"));
    assert!(
        m.tx_json.get("filter_output").is_none_or(Value::is_object),
        "{}",
        m.tx_json
    );
    let body = m.body.as_ref().unwrap();
    assert_eq!(without_received(body), &msg[..]);
    let parsed = m.message_json.as_ref().expect("parsed JSON posted");
    assert!(parsed["parts"].is_object(), "{parsed}");
    assert!(parsed["text_body"].is_array(), "{parsed}");
    // max_inline 10: the parts went as blobs, every one uploaded and finalized.
    assert!(!m.blobs.is_empty(), "{parsed}");
    assert!(m.blobs.values().all(|b| b.finalized));
    let text = parsed.to_string();
    for id in m.blobs.keys() {
        assert!(
            text.contains(&format!("\"create_id\":\"{id}\"")),
            "{id}: {text}"
        );
    }
    // Each blob holds the decoded contents of a part of the message.
    let mime = mail_parser::MessageParser::default().parse(&msg).unwrap();
    for (id, b) in &m.blobs {
        assert!(
            mime.parts.iter().any(|p| p.contents() == &b.data[..]),
            "blob {id} {:?} is no part of the message",
            String::from_utf8_lossy(&b.data)
        );
    }
    // Files as the example receiver writes them.
    for f in [".msg", ".json", ".msg.json"] {
        assert!(
            m.files.iter().any(|p| p.to_string_lossy().ends_with(f)),
            "{f}: {:?}",
            m.files
        );
    }
    assert!(s.sink.messages().is_empty());
}

#[actix_rt::test]
async fn tools_against_the_stack() {
    let s = Stack::start().await;
    // koukan send: delivered → 0, every reply printed.
    let out = run_tool(strings(&[
        "send",
        "--server",
        &s.mx.to_string(),
        "--from",
        "alice@client.test",
        "--to",
        "bob@example.com",
        "--subject",
        "tool-send",
    ]))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", s.logs());
    assert!(stdout.contains("<<< 220 "), "{stdout}");
    assert!(stdout.contains(">>> RCPT TO:<bob@example.com>"), "{stdout}");
    assert!(stdout.contains(">>> DATA"), "{stdout}");
    assert_eq!(s.sink.messages().len(), 1);
    assert!(
        String::from_utf8_lossy(&s.sink.messages()[0].data).contains("Subject: tool-send"),
        "generated message"
    );

    // A refused recipient → 1, with the 5xx printed.
    let out = run_tool(strings(&[
        "send",
        "--server",
        &s.mx.to_string(),
        "--from",
        "alice@client.test",
        "--to",
        "nobody@unrouted.test",
    ]))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("<<< 5")), "{stdout}");

    // Nothing listening → 2.
    let out = run_tool(strings(&[
        "send",
        "--server",
        &format!("127.0.0.1:{}", free_port()),
        "--from",
        "a@b.c",
        "--to",
        "d@e.f",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));

    // koukan rest-send: prints the final JSON, exit 0.
    let spec = builder_spec(s.dir.path());
    let out = run_tool(strings(&[
        "rest-send",
        "--base-url",
        &s.submission_url(),
        "--mail-from",
        "alice@client.test",
        "--message-builder",
        spec.to_str().unwrap(),
        "bob@example.com",
    ]))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.logs()
    );
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["data_response"]["code"], json!(250), "{last}");
    assert!(last["final_attempt_reason"].is_string());
    assert!(s.sink.wait_count(2, ARRIVAL).await);
    check_mime(&s.sink.messages()[1].data);

    // A recipient the router refuses → 1.
    let out = run_tool(strings(&[
        "rest-send",
        "--base-url",
        &s.submission_url(),
        "--mail-from",
        "alice@client.test",
        "--message-builder",
        spec.to_str().unwrap(),
        "not-an-address",
    ]))
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // koukan secret: "<secret> <hash>", the hash of the secret.
    let out = run_tool(strings(&["secret", "--secret", "my-secret"])).await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "my-secret 186ef76e9d6a723ecb570d4d9c287487d001e5d35f7ed4a313350a407950318e"
    );
}

#[actix_rt::test]
async fn next_hop_failover() {
    let s = Stack::start().await;
    let msg = message("failover", 1024);
    let r = s
        .smtp(s.mx, "alice@client.test", &["frank@failover.example"], &msg)
        .await;
    assert!(r.delivered(), "{r:?}\n{}", s.logs());
    let msgs = s.sink.messages();
    assert_eq!(msgs.len(), 1, "{}", s.logs());
    assert_eq!(msgs[0].rcpt_to, vec!["frank@failover.example".to_string()]);
    assert_eq!(without_received(&msgs[0].data), &msg[..]);
}
