//! The router's output path over real HTTP: an in-process router on a real SQLite file
//! delivering to a test receiver (`support/receiver.rs`).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use awc::Client;
use awc::http::StatusCode;
use koukan::config::{LoadOptions, RouterConfig};
use koukan::rest::BODY_BLOB;
use koukan_actors::client::{ClientSettings, HttpClient, RestTransaction};
use koukan_actors::router::output::Filters;
use koukan_actors::router::{Router, Settings};
use koukan_db::TxRecord;
use mail_parser::MimeHeaders;
use serde_json::{Value, json};
use support::receiver::{Received, Receiver};

/// Hang detector for every wait of these tests.
const LIMIT: Duration = Duration::from_secs(30);
/// How far back the router's clock is moved so that computed retry times are already due.
const SHIFT: i64 = 100_000;

/// Knobs of the test configuration; everything else is fixed.
#[derive(Clone)]
struct Opts {
    dequeue: bool,
    retry_params: String,
    /// `out` endpoint (REST and exploder upstream transactions).
    downstream_timeout: u64,
    upstream_refresh: u64,
    /// `out`'s chain entries before `rest_output`.
    pre_filters: String,
    /// Extra `sender` list entries and `endpoint` list entries.
    senders: String,
    endpoints: String,
    exploder_rcpt_timeout: u64,
    exploder_data_timeout: u64,
    /// `msa`/`ingress` endpoints' `upstream_refresh` (exploder heartbeats upstream).
    exploder_refresh: u64,
    rest_rcpt_timeout: u64,
    /// `storage.store_smtp_transactions`.
    store_smtp: bool,
    /// `executor.output.max_inflight`.
    max_inflight: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            dequeue: false,
            retry_params: "{min_attempt_time: 60, max_attempt_time: 3600, backoff_factor: 1.5, max_attempts: 3, deadline: 86400, bug_retry: 900}".into(),
            downstream_timeout: 30,
            upstream_refresh: 30,
            pre_filters: String::new(),
            senders: String::new(),
            endpoints: String::new(),
            exploder_rcpt_timeout: 1,
            exploder_data_timeout: 2,
            exploder_refresh: 30,
            rest_rcpt_timeout: 4,
            store_smtp: false,
            max_inflight: 100,
        }
    }
}

fn yaml(o: &Opts, port: u16, db: &std::path::Path, receiver: &str) -> String {
    format!(
        r#"global:
  mailer_daemon_mailbox: mailer-daemon@example.com
  dequeue: {dequeue}
  executor:
    output:
      max_inflight: {max_inflight}
rest_listener:
  addr: ["127.0.0.1", {port}]
  session_uri: http://127.0.0.1:{port}
sender:
- name: submission
  output_chain: out
  retry: output_chain
  notification: output_chain
  tag:
  - name: dsn
    notification: null
  - name: oneshot
    retry: null
    notification: null
  - name: upstream
    retry: null
    notification: null
- name: msa
  output_chain: msa
  upstream_sender: submission
  upstream_tag: upstream
- name: ingress
  output_chain: ingress
  upstream_sender: submission
  upstream_tag: upstream
{senders}
endpoint:
- name: out
  output_handler:
    downstream_timeout: {dt}
    upstream_refresh: {ur}
    retry_params: {retry}
    notification:
      sender: submission
      tag: dsn
  chain:
{pre}
  - filter: rest_output
    static_endpoint: {receiver}
    rcpt_timeout: {rest_rcpt}
    data_timeout: {rest_rcpt}
- name: msa
  output_handler:
    downstream_timeout: 60
    upstream_refresh: {xr}
  chain:
  - filter: exploder
    msa: true
    rcpt_timeout: {xrt}
    data_timeout: {xdt}
- name: ingress
  output_handler:
    downstream_timeout: 60
    upstream_refresh: {xr}
  chain:
  - filter: exploder
    msa: false
    rcpt_timeout: {xrt}
    data_timeout: {xdt}
{endpoints}
storage:
  url: sqlite:///{db}
  store_smtp_transactions: {store_smtp}
"#,
        dequeue = o.dequeue,
        max_inflight = o.max_inflight,
        senders = o.senders,
        endpoints = o.endpoints,
        dt = o.downstream_timeout,
        ur = o.upstream_refresh,
        retry = o.retry_params,
        pre = o.pre_filters,
        rest_rcpt = o.rest_rcpt_timeout,
        xr = o.exploder_refresh,
        xrt = o.exploder_rcpt_timeout,
        xdt = o.exploder_data_timeout,
        db = db.display(),
        store_smtp = o.store_smtp,
    )
}

struct Env {
    router: Router,
    base: String,
    client: Client,
    rx: Receiver,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(o: Opts) -> Env {
    start_with(o, Filters::default(), &[]).await
}

/// Starts a router with the built-in filters plus `extra` (registered under `plugins`).
async fn start_with(o: Opts, extra: Filters, plugins: &[&str]) -> Env {
    start_full(o, extra, plugins, Receiver::start()).await
}

/// Starts a router delivering to a receiver already running (whose address the options
/// mention).
async fn start_on(o: Opts, rx: Receiver) -> Env {
    start_full(o, Filters::default(), &[], rx).await
}

async fn start_full(o: Opts, extra: Filters, plugins: &[&str], rx: Receiver) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = yaml(&o, port, &dir.path().join("router.sqlite3"), &rx.endpoint());
    let mut filters = koukan_actors::router::output::builtin_filters();
    filters.extend(extra);
    // As the router binary: every registered name is accepted (`http_hook`, test plugins).
    let is_plugin = |n: &str| plugins.contains(&n) || filters.contains(n);
    let cfg = RouterConfig::from_yaml_str_with(
        &text,
        &LoadOptions {
            extra_filters: Some(&is_plugin),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let mut settings = Settings::from_config(Arc::new(cfg)).unwrap();
    settings.http_workers = 2;
    let (router, server) = Router::start_with(settings, filters).await.unwrap();
    actix_rt::spawn(server);
    Env {
        router,
        base: format!("http://127.0.0.1:{port}"),
        client: Client::builder().timeout(Duration::from_secs(40)).finish(),
        rx,
        _dir: dir,
    }
}

fn rest_id(location: &str) -> String {
    location.rsplit('/').next().unwrap().to_string()
}

impl Env {
    /// A REST submission; returns the transaction's URL.
    async fn submit(&self, sender: &str, mail_from: &str, rcpt: &str, body: &str) -> String {
        let (name, tag) = sender.split_once('/').unwrap_or((sender, ""));
        let mut req = json!({"mail_from": {"m": mail_from}, "rcpt_to": [{"m": rcpt}],
            "body": {"inline": body}});
        if !tag.is_empty() {
            req["sender"] = json!({"name": name, "tag": tag});
        }
        let mut resp = self
            .client
            .post(format!("{}/senders/{name}/transactions", self.base))
            .insert_header(("content-type", "application/json"))
            .send_body(req.to_string())
            .await
            .unwrap();
        let text = resp.body().await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED, "{text:?}");
        resp.headers()
            .get("location")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    }

    async fn read(&self, url: &str) -> Value {
        let mut resp = self.client.get(url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    /// Long-polls the REST view until `done` holds.
    async fn poll_until(&self, url: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + LIMIT;
        let mut etag: Option<String> = None;
        loop {
            let mut req = self.client.get(url);
            if let Some(e) = &etag {
                req = req
                    .insert_header(("if-none-match", e.as_str()))
                    .insert_header(("request-timeout", "5"));
            }
            let mut resp = req.send().await.unwrap();
            if resp.status() == StatusCode::OK {
                etag = Some(
                    resp.headers()
                        .get("etag")
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_string(),
                );
                let v: Value = resp.json().await.unwrap();
                if done(&v) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "gave up polling {url}");
        }
    }

    async fn wait_final(&self, url: &str) -> Value {
        self.poll_until(url, |v| v.get("final_attempt_reason").is_some())
            .await
    }

    async fn record(&self, url: &str) -> TxRecord {
        self.router
            .storage
            .load(&rest_id(url))
            .await
            .unwrap()
            .unwrap()
    }

    /// Waits until attempt `n` of the transaction has ended (its lease released).
    async fn attempt_done(&self, url: &str, n: i64) -> TxRecord {
        let deadline = Instant::now() + LIMIT;
        loop {
            let r = self.record(url).await;
            if r.lease.is_none() && r.attempt_id >= Some(n) {
                return r;
            }
            assert!(Instant::now() < deadline, "attempt {n} never ended: {r:?}");
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_unleased(&self, id: i64) -> TxRecord {
        let deadline = Instant::now() + LIMIT;
        loop {
            let r = self.router.storage.load_id(id).await.unwrap().unwrap();
            if r.lease.is_none() {
                return r;
            }
            assert!(Instant::now() < deadline, "attempt never ended: {r:?}");
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The dequeuer's job, one transaction at a time (tests run with `dequeue: false`):
    /// takes what is due, delivers it and waits for the attempt to end. Returns what ran.
    async fn step(&self) -> Option<TxRecord> {
        let record = self.router.storage.dequeue().await.unwrap()?;
        let id = record.id;
        self.router.output.deliver(record.clone());
        self.wait_unleased(id).await;
        Some(record)
    }

    /// Steps until nothing is due; returns everything that ran.
    async fn drain(&self) -> Vec<TxRecord> {
        let mut ran = Vec::new();
        while let Some(r) = self.step().await {
            ran.push(r);
            assert!(ran.len() < 50, "runaway dequeue: {ran:#?}");
        }
        ran
    }

    async fn body_of(&self, r: &TxRecord) -> Vec<u8> {
        let b = r.blob(BODY_BLOB).unwrap();
        self.router
            .storage
            .read_blob(b.blob_id, 0, b.length as usize)
            .await
            .unwrap()
            .to_vec()
    }

    /// An incremental (SMTP-style) client of sender `sender`.
    async fn smtp(&self, sender: &str) -> RestTransaction {
        let settings = ClientSettings {
            timeout: Duration::from_secs(20),
            data_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let http = HttpClient::new(&Default::default()).unwrap();
        let tx = koukan::Transaction {
            mail_from: Some(koukan::Mailbox::new("alice@example.com")),
            ..Default::default()
        };
        RestTransaction::create(
            http,
            settings,
            &format!("{}/senders/{sender}/transactions", self.base),
            &tx,
            None,
        )
        .await
        .unwrap()
    }
}

const MESSAGE: &str = "From: alice@example.com\r\nTo: x@example.com\r\nSubject: test\r\nMessage-ID: <m1@example.com>\r\n\r\nhello\r\n";

fn code(v: &Value) -> u64 {
    v["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code in {v}"))
}

/// Checks a DSN sent to `alice@example.com` and returns its parsed status text.
fn check_dsn(d: &Received, status: &str) {
    assert_eq!(d.rcpt_to, vec!["alice@example.com".to_string()]);
    assert!(d.body_finalized);
    let msg = mail_parser::MessageParser::default()
        .parse(&d.body)
        .expect("DSN parses");
    let ct = msg.content_type().unwrap();
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("report")),
        "{}",
        String::from_utf8_lossy(&d.body)
    );
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    assert_eq!(
        msg.from().unwrap().first().unwrap().address(),
        Some("mailer-daemon@example.com")
    );
    assert_eq!(msg.in_reply_to().as_text(), Some("m1@example.com"));
    let text = String::from_utf8_lossy(&d.body);
    assert!(text.contains(&format!("Status: {status}")), "{text}");
}

// ---- REST transactions ---------------------------------------------------------------

#[actix_rt::test]
async fn delivered_with_upstream_responses() {
    let env = start(Opts::default()).await;
    let url = env
        .submit("submission", "alice@example.com", "ok@example.net", MESSAGE)
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "upstream response success");
    assert_eq!(v["attempt_count"], 1);
    assert_eq!(
        v["mail_response"],
        json!({"code": 250, "message": "mail ok"})
    );
    assert_eq!(
        v["rcpt_response"],
        json!([{"code": 250, "message": "rcpt ok"}])
    );
    assert_eq!(
        v["data_response"],
        json!({"code": 250, "message": "data ok"})
    );
    let got = env.rx.to("ok");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, MESSAGE.as_bytes(), "byte-exact");
    assert_eq!(got[0].mail_from.as_deref(), Some("alice@example.com"));
    assert!(
        !got[0].cancelled,
        "a delivered transaction is not cancelled"
    );
    // Nothing left to do: no DSN for a delivered message.
    assert!(env.drain().await.is_empty());
    assert!(env.rx.dsns().is_empty());
}

#[actix_rt::test]
async fn backlog_waits_for_capacity_then_drains() {
    // One delivery at a time: the held one takes the slot, the next two wait unleased and
    // go out (in order) once it ends.
    let env = start(Opts {
        dequeue: true,
        max_inflight: 1,
        ..Default::default()
    })
    .await;
    let held = env
        .submit(
            "submission",
            "alice@example.com",
            "hold@example.net",
            MESSAGE,
        )
        .await;
    env.rx
        .wait(LIMIT, "the held transaction", |t| t.len() == 1)
        .await;
    let queued = [
        env.submit(
            "submission",
            "alice@example.com",
            "ok2@example.net",
            MESSAGE,
        )
        .await,
        env.submit(
            "submission",
            "alice@example.com",
            "ok3@example.net",
            MESSAGE,
        )
        .await,
    ];
    for url in &queued {
        let r = env.record(url).await;
        assert_eq!(r.lease, None, "no capacity: stored for the dequeuer");
        assert_eq!(r.final_attempt_reason, None);
    }
    assert!(env.rx.to("ok").is_empty(), "the slot is taken");
    env.rx.release();
    let v = env.wait_final(&held).await;
    assert_eq!(v["final_attempt_reason"], "upstream response success");
    for url in &queued {
        let v = env.wait_final(url).await;
        assert_eq!(v["final_attempt_reason"], "upstream response success");
        assert_eq!(v["attempt_count"], 1);
    }
    let order: Vec<_> = env
        .rx
        .transactions()
        .iter()
        .map(|t| t.rcpt_to.clone())
        .collect();
    assert_eq!(
        order,
        [
            vec!["hold@example.net".to_string()],
            vec!["ok2@example.net".to_string()],
            vec!["ok3@example.net".to_string()]
        ]
    );
}

#[actix_rt::test]
async fn temporary_failures_retry_with_backoff_then_bounce_once() {
    let env = start(Opts::default()).await;
    env.router.output.shift_clock(-SHIFT);
    let url = env
        .submit(
            "submission",
            "alice@example.com",
            "data4@example.net",
            MESSAGE,
        )
        .await;
    for attempt in 1..=2 {
        let r = env.attempt_done(&url, attempt).await;
        assert_eq!(r.tx.final_attempt_reason, None, "attempt {attempt}");
        assert_eq!(r.tx.data_response.as_ref().unwrap().code, 452);
        let next = r.next_attempt_time.expect("retry scheduled");
        // delay = clamp((now - creation) * 1.5, 60, 3600) with `now` moved back: 60. The
        // final write may land in the second after the clock was read.
        let delay = next - (r.last_update - SHIFT);
        assert!(delay == 60 || delay == 59, "delay {delay}");
        if attempt == 2 {
            break;
        }
        // Already due: the next attempt starts at once.
        let ran = env.step().await.expect("retry due");
        assert_eq!(ran.rest_id, rest_id(&url));
    }
    let ran = env.step().await.expect("third attempt due");
    assert_eq!(ran.rest_id, rest_id(&url));
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "retry policy max attempts");
    assert_eq!(v["attempt_count"], 3);
    assert_eq!(env.rx.to("data4").len(), 3);
    // Exactly one DSN, delivered through the notification sender.
    let ran = env.drain().await;
    assert_eq!(ran.len(), 1, "{ran:#?}");
    let dsn = &ran[0];
    assert_eq!(dsn.tx.mail_from.as_ref().unwrap().mailbox, "");
    assert_eq!(dsn.tx.sender.as_ref().unwrap().tag.as_deref(), Some("dsn"));
    assert!(dsn.tx.retry, "the DSN is retried per its sender");
    assert!(!dsn.tx.notification, "no bounces of bounces");
    let dsns = env.rx.dsns();
    assert_eq!(dsns.len(), 1);
    check_dsn(&dsns[0], "4.0.0");
    assert_eq!(dsns[0].data_response.as_ref().unwrap().code, 250);
    assert_eq!(env.body_of(dsn).await, dsns[0].body, "delivered as stored");
}

#[actix_rt::test]
async fn permanent_failure_bounces_at_once() {
    let env = start(Opts::default()).await;
    let url = env
        .submit(
            "submission",
            "alice@example.com",
            "data5@example.net",
            MESSAGE,
        )
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "upstream response permfail");
    assert_eq!(v["attempt_count"], 1);
    assert_eq!(code(&v["data_response"]), 554);
    let ran = env.drain().await;
    assert_eq!(ran.len(), 1);
    let dsns = env.rx.dsns();
    assert_eq!(dsns.len(), 1);
    check_dsn(&dsns[0], "5.0.0");
    let text = String::from_utf8_lossy(&dsns[0].body);
    assert!(
        text.contains("Final-Recipient: rfc822;data5@example.net"),
        "{text}"
    );
    assert!(text.contains("554 5.6.0 data5 says no"), "{text}");

    // An RCPT permfail bounces too.
    let url = env
        .submit(
            "submission",
            "alice@example.com",
            "rcpt5@example.net",
            MESSAGE,
        )
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "upstream rcpt_response permfail");
    assert_eq!(env.drain().await.len(), 1);
    assert_eq!(env.rx.dsns().len(), 2);
}

#[actix_rt::test]
async fn no_bounce_to_the_null_reverse_path() {
    let env = start(Opts::default()).await;
    let url = env
        .submit("submission", "", "data5@example.net", MESSAGE)
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "upstream response permfail");
    assert!(env.drain().await.is_empty(), "no DSN queued");
    assert!(env.rx.dsns().is_empty());
}

#[actix_rt::test]
async fn cancel_stops_retries_without_bounce() {
    let env = start(Opts::default()).await;
    env.router.output.shift_clock(-SHIFT);
    // Between attempts.
    let url = env
        .submit(
            "submission",
            "alice@example.com",
            "data4@example.net",
            MESSAGE,
        )
        .await;
    let r = env.attempt_done(&url, 1).await;
    assert!(r.next_attempt_time.is_some());
    let resp = env
        .client
        .post(format!("{url}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "downstream cancelled");
    assert!(env.drain().await.is_empty(), "no retry, no DSN");
    assert_eq!(env.rx.to("data4").len(), 1);

    // During an attempt: the upstream transaction is cancelled too.
    let url = env
        .submit(
            "submission",
            "alice@example.com",
            "hangdata@example.net",
            MESSAGE,
        )
        .await;
    env.rx
        .wait(LIMIT, "the body", |t| {
            t.iter().any(|t| t.to("hangdata") && t.body_finalized)
        })
        .await;
    env.client
        .post(format!("{url}/cancel"))
        .send()
        .await
        .unwrap();
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "downstream cancelled");
    env.rx
        .wait(LIMIT, "the upstream cancel", |t| {
            t.iter().any(|t| t.to("hangdata") && t.cancelled)
        })
        .await;
    env.attempt_done(&url, 1).await;
    assert!(env.drain().await.is_empty(), "no retry, no DSN");
    assert_eq!(env.rx.to("hangdata").len(), 1);
    assert!(env.rx.dsns().is_empty());
}

#[actix_rt::test]
async fn oneshot_temporary_failure_has_a_visible_end() {
    let env = start(Opts::default()).await;
    let url = env
        .submit(
            "submission/oneshot",
            "alice@example.com",
            "data4@example.net",
            MESSAGE,
        )
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(
        v["final_attempt_reason"],
        "upstream temporary failure (no retry)"
    );
    assert_eq!(code(&v["data_response"]), 452);
    assert!(v.get("retry").is_none());
    let r = env.record(&url).await;
    assert_eq!(
        r.final_attempt_reason.as_deref(),
        Some("oneshot"),
        "storage keeps the marker"
    );
    assert!(env.drain().await.is_empty());
}

// ---- exploder ------------------------------------------------------------------------

/// What an SMTP client of the router got.
#[derive(Debug)]
struct Smtp {
    mail: koukan::Response,
    rcpts: Vec<koukan::Response>,
    data: Option<koukan::Response>,
    url: String,
}

impl Env {
    /// One SMTP-style transaction through the router's incremental dialect: MAIL, each
    /// RCPT (answered before the next is sent), then the body if some RCPT succeeded.
    async fn smtp_tx(&self, sender: &str, rcpts: &[&str]) -> Smtp {
        self.smtp_tx_paused(sender, rcpts, Duration::ZERO).await
    }

    /// As `smtp_tx`, pausing `pause` between the last RCPT and the body while sending a
    /// heartbeat every second.
    async fn smtp_tx_paused(&self, sender: &str, rcpts: &[&str], pause: Duration) -> Smtp {
        let deadline = || std::time::Instant::now() + Duration::from_secs(20);
        let mut c = self.smtp(sender).await;
        let mail = c.wait_mail(deadline()).await.unwrap();
        let mut got = Vec::new();
        for (i, r) in rcpts.iter().enumerate() {
            c.update(&koukan::transaction::Update {
                rcpt_to: vec![koukan::Mailbox::new(*r)],
                ..Default::default()
            })
            .await
            .unwrap();
            got.push(c.wait_rcpt(i, deadline()).await.unwrap());
        }
        let until = Instant::now() + pause;
        while Instant::now() < until {
            actix_rt::time::sleep(Duration::from_secs(1)).await;
            c.heartbeat().await.unwrap();
        }
        let mut data = None;
        if got.iter().any(koukan::Response::ok) {
            c.put_chunk(bytes::Bytes::from_static(MESSAGE.as_bytes()), true)
                .await
                .unwrap();
            data = Some(c.wait_data(deadline()).await.unwrap());
        } else {
            // What an SMTP gateway does on RSET/QUIT after failed recipients.
            c.cancel().await;
        }
        Smtp {
            mail,
            rcpts: got,
            data,
            url: c.url().to_string(),
        }
    }
}

/// Runs every single-recipient cell of router.md §4.4 for one mode, concurrently:
/// (recipient, RCPT code, RCPT message part, DATA code).
async fn table(env: &Env, sender: &str, cells: &[(&str, u16, &str, Option<u16>)]) {
    let runs = cells
        .iter()
        .map(|(rcpt, ..)| async move { env.smtp_tx(sender, &[rcpt]).await });
    let results = futures_util::future::join_all(runs).await;
    for ((rcpt, rcode, rmsg, dcode), got) in cells.iter().zip(results) {
        assert_eq!(got.mail.code, 250, "{rcpt}: {got:?}");
        assert_eq!(got.mail.message, "MAIL ok (exploder noop)");
        assert_eq!(got.rcpts[0].code, *rcode, "{sender} {rcpt}: {got:?}");
        assert!(
            got.rcpts[0].message.contains(rmsg),
            "{sender} {rcpt}: {got:?}"
        );
        assert_eq!(
            got.data.as_ref().map(|d| d.code),
            *dcode,
            "{sender} {rcpt}: {got:?}"
        );
        // Downstream transactions end visibly.
        let v = env.wait_final(&got.url).await;
        assert!(v["final_attempt_reason"].is_string(), "{rcpt}: {v}");
    }
}

#[actix_rt::test]
async fn exploder_msa_table() {
    let env = start(Opts::default()).await;
    env.router.output.shift_clock(-SHIFT);
    let saf = "(AsyncFilterWrapper store&forward)";
    table(
        &env,
        "msa",
        &[
            ("mail4@example.net", 250, saf, Some(250)),
            ("mail5@example.net", 553, "precondition MAIL", None),
            ("hang@example.net", 250, saf, Some(250)),
            ("rcpt4@example.net", 250, saf, Some(250)),
            ("rcpt5@example.net", 550, "rcpt5 says no such user", None),
            ("hangdata@example.net", 250, "rcpt ok", Some(250)),
            ("data4@example.net", 250, "rcpt ok", Some(250)),
            ("data5@example.net", 250, "rcpt ok", Some(554)),
            ("ok@example.net", 250, "rcpt ok", Some(250)),
        ],
    )
    .await;
    // Everything accepted by store-and-forward is now retried and bounced on its own:
    // the temporary failures are due at once, with retry and notification enabled.
    // (`hang`, `hangdata`: once their upstream attempt gave up waiting.)
    let mut due: Vec<String> = Vec::new();
    let deadline = Instant::now() + LIMIT;
    while due.len() < 5 {
        match env.router.storage.dequeue().await.unwrap() {
            Some(r) => {
                assert!(r.tx.retry && r.tx.notification, "{r:?}");
                due.push(r.tx.rcpt_to[0].mailbox.clone());
            }
            None => actix_rt::time::sleep(Duration::from_millis(50)).await,
        }
        assert!(Instant::now() < deadline, "due: {due:?}");
    }
    assert!(env.router.storage.dequeue().await.unwrap().is_none());
    due.sort();
    assert_eq!(
        due,
        [
            "data4@example.net",
            "hang@example.net",
            "hangdata@example.net",
            "mail4@example.net",
            "rcpt4@example.net"
        ]
    );
}

#[actix_rt::test]
async fn exploder_ingress_table() {
    let env = start(Opts::default()).await;
    table(
        &env,
        "ingress",
        &[
            ("mail4@example.net", 451, "precondition MAIL", None),
            ("mail5@example.net", 553, "precondition MAIL", None),
            ("hang@example.net", 450, "upstream timeout", None),
            ("rcpt4@example.net", 450, "rcpt4 says try later", None),
            ("rcpt5@example.net", 550, "rcpt5 says no such user", None),
            ("hangdata@example.net", 250, "rcpt ok", Some(450)),
            ("data4@example.net", 250, "rcpt ok", Some(452)),
            ("data5@example.net", 250, "rcpt ok", Some(554)),
            ("ok@example.net", 250, "rcpt ok", Some(250)),
        ],
    )
    .await;
    // Nothing is stored for later: the client was told to retry or that it failed.
    assert!(env.drain().await.is_empty());
    assert!(env.rx.dsns().is_empty());
    // What timed out never got a body upstream.
    assert!(env.rx.to("hang@").iter().all(|t| t.body.is_empty()));
}

/// The SMTP-facing side of an exploder lives in the router's memory (no row): its body is a
/// stored blob the recipient's transaction shares, and the client follows it to the end.
/// With `storage.store_smtp_transactions` it is stored as well.
#[actix_rt::test]
async fn smtp_facing_transactions_are_kept_in_memory_unless_configured() {
    for store in [false, true] {
        let env = start(Opts {
            store_smtp: store,
            ..Default::default()
        })
        .await;
        let got = env.smtp_tx("ingress", &["ok@example.net"]).await;
        assert_eq!(got.data.as_ref().map(|d| d.code), Some(250), "{got:?}");
        let v = env.wait_final(&got.url).await;
        assert_eq!(code(&v["data_response"]), 250, "{v}");
        let stored = env.router.storage.load(&rest_id(&got.url)).await.unwrap();
        assert_eq!(stored.is_some(), store, "{stored:?}");
        let to = env.rx.to("ok@");
        assert_eq!(to.len(), 1);
        assert_eq!(to[0].body, MESSAGE.as_bytes());
        assert!(to[0].body_finalized, "{:?}", to[0]);
    }
}

/// `Prefer: wait` (RFC 7240) on the router: a create answers once every part it carried
/// has its response, the finalizing PUT once DATA has one; both marked
/// `preference-applied`, with the etag of the state they show.
#[actix_rt::test]
async fn prefer_wait_answers_when_settled() {
    let env = start(Opts::default()).await;
    let post = |sender: &str, json: Value| {
        env.client
            .post(format!("{}/senders/{sender}/transactions", env.base))
            .insert_header(("content-type", "application/json"))
            .insert_header(("prefer", "wait=10"))
            .send_body(json.to_string())
    };
    // A REST submission with its body: answered delivered.
    let mut r = post(
        "submission",
        json!({"mail_from": {"m": "alice@example.com"}, "rcpt_to": [{"m": "ok@example.net"}],
               "body": {"inline": MESSAGE}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers().get("preference-applied").unwrap(), "wait");
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v["data_response"]), 250, "{v}");

    // The SMTP dialect: MAIL and RCPT answered by the create, DATA by the PUT.
    let mut r = post(
        "ingress",
        json!({"mail_from": {"m": "alice@example.com"}, "rcpt_to": [{"m": "ok@example.net"}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers().get("preference-applied").unwrap(), "wait");
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v["mail_response"]), 250, "{v}");
    assert_eq!(code(&v["rcpt_response"][0]), 250, "{v}");
    let url = format!(
        "{}{}",
        env.base,
        r.headers()
            .get("location")
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches(&env.base)
    );
    let mut put = env
        .client
        .put(format!("{url}/body"))
        .insert_header(("prefer", "wait=10"))
        .send_body(MESSAGE)
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(put.headers().get("preference-applied").unwrap(), "wait");
    assert!(put.headers().get("content-range").is_some());
    let etag = put
        .headers()
        .get("etag")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = put.json().await.unwrap();
    assert_eq!(code(&v["data_response"]), 250, "{v}");
    // The state shown is current (or something later moved it on).
    let now = env.client.get(&url).send().await.unwrap();
    let now: i64 = now
        .headers()
        .get("etag")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(now >= etag.parse::<i64>().unwrap(), "{now} < {etag}");
    assert_eq!(env.rx.to("ok@").len(), 2);
}

#[actix_rt::test]
async fn exploder_multi_recipient() {
    let env = start(Opts::default()).await;
    for sender in ["msa", "ingress"] {
        let same = env
            .smtp_tx(sender, &["ok@example.net", "ok2@example.net"])
            .await;
        let d = same.data.unwrap();
        assert_eq!(d.code, 250);
        assert_eq!(d.message, "data ok (Exploder same response)");
        let same = env
            .smtp_tx(sender, &["data5a@example.net", "data5b@example.net"])
            .await;
        assert_eq!(same.data.unwrap().code, 554);
        let same = env
            .smtp_tx(sender, &["data4a@example.net", "data4b@example.net"])
            .await;
        let d = same.data.unwrap();
        match sender {
            // msa stores and forwards each temporary failure.
            "msa" => assert_eq!(d.code, 250, "{d:?}"),
            _ => assert_eq!(
                (d.code, d.message.as_str()),
                (452, "4.3.1 data4 says try later (Exploder same response)")
            ),
        }
    }
    assert_eq!(env.drain().await.len(), 2, "the two msa data4 recipients");
}

#[actix_rt::test]
async fn exploder_mixed_outcome_stores_and_forwards_the_failures() {
    let env = start(Opts::default()).await;
    env.router.output.shift_clock(-SHIFT);
    for sender in ["msa", "ingress"] {
        let got = env
            .smtp_tx(
                sender,
                &["ok@example.net", "data4@example.net", "data5@example.net"],
            )
            .await;
        let d = got.data.unwrap();
        assert_eq!(
            (d.code, d.message.as_str()),
            (250, "DATA ok (Exploder store&forward)"),
            "{sender}"
        );
    }
    assert_eq!(env.rx.to("ok@").len(), 2);
    assert_eq!(env.rx.to("data5").len(), 2);
    // data4 is retried (revived from oneshot) until max_attempts, then bounced; data5,
    // already final, gets only its bounce (a notification pass that must not deliver).
    let ran = env.drain().await;
    let mut kinds: Vec<String> = ran
        .iter()
        .map(|r| {
            format!(
                "{} pending={}",
                r.tx.rcpt_to[0].mailbox, r.notification_pending
            )
        })
        .collect();
    kinds.sort();
    kinds.dedup_by(|a, b| a == b);
    assert_eq!(
        kinds,
        [
            "alice@example.com pending=false",
            "data4@example.net pending=false",
            "data5@example.net pending=true",
        ],
    );
    assert_eq!(ran.iter().filter(|r| r.notification_pending).count(), 2);
    assert_eq!(
        env.rx.to("data5").len(),
        2,
        "no redelivery of a final recipient"
    );
    assert_eq!(env.rx.to("data4").len(), 6, "three attempts each");
    let dsns = env.rx.dsns();
    assert_eq!(dsns.len(), 4, "exactly one per failed recipient");
    for d in &dsns {
        let text = String::from_utf8_lossy(&d.body);
        let status = if text.contains("data5@example.net") {
            "5.0.0"
        } else {
            "4.0.0"
        };
        check_dsn(d, status);
    }
}

#[actix_rt::test]
async fn exploder_late_rcpt_answer() {
    let env = start(Opts {
        dequeue: true,
        ..Default::default()
    })
    .await;
    // Answered upstream after 2 s; the exploder waits 1 s.
    let got = env.smtp_tx("ingress", &["slow2000i@example.net"]).await;
    assert_eq!(got.rcpts[0].code, 450, "{got:?}");
    assert!(got.rcpts[0].message.contains("upstream timeout"));
    let got = env.smtp_tx("msa", &["slow2000m@example.net"]).await;
    assert_eq!(got.rcpts[0].code, 250, "{got:?}");
    assert!(got.rcpts[0].message.contains("store&forward"));
    assert_eq!(got.data.as_ref().unwrap().code, 250);
    assert!(got.data.unwrap().message.contains("store&forward"));
    // The stored recipient is delivered after all.
    env.rx
        .wait(LIMIT, "the late recipient's delivery", |t| {
            t.iter().any(|t| {
                t.to("slow2000m")
                    && t.body == MESSAGE.as_bytes()
                    && t.data_response.as_ref().is_some_and(|d| d.code == 250)
            })
        })
        .await;
    assert!(env.rx.to("slow2000i").iter().all(|t| t.body.is_empty()));
    assert!(env.rx.dsns().is_empty());
}

/// R1: a downstream pausing longer than the upstream chain's `downstream_timeout` (while
/// sending heartbeats) does not lose the message.
#[actix_rt::test]
async fn heartbeats_keep_upstream_transactions_alive() {
    let env = start(Opts {
        downstream_timeout: 2,
        upstream_refresh: 1,
        exploder_refresh: 1,
        exploder_data_timeout: 5,
        ..Default::default()
    })
    .await;
    for (sender, rcpt) in [("msa", "okm@example.net"), ("ingress", "oki@example.net")] {
        let got = env
            .smtp_tx_paused(sender, &[rcpt], Duration::from_secs(5))
            .await;
        assert_eq!(got.rcpts[0].code, 250);
        let d = got.data.unwrap();
        assert_eq!((d.code, d.message.as_str()), (250, "data ok"), "{sender}");
        let t = env.rx.to(rcpt.split('@').next().unwrap());
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].body, MESSAGE.as_bytes());
        assert!(t[0].heartbeats > 0, "upstream kept alive too: {:?}", t[0]);
        let v = env.wait_final(&got.url).await;
        assert_eq!(v["final_attempt_reason"], "upstream response success");
    }
}

/// A filter that panics for recipients `boom…`.
struct Panicky;

impl koukan::filter::Filter for Panicky {
    fn on_update<'a>(
        &'a mut self,
        tx: &'a mut koukan::filter::ChainTx,
        next: koukan::filter::Next<'a>,
    ) -> koukan::filter::LocalFuture<'a, ()> {
        Box::pin(async move {
            if tx.tx.rcpt_to.iter().any(|r| r.mailbox.starts_with("boom")) {
                panic!("test filter panics on purpose");
            }
            next.run(tx).await
        })
    }
}

#[actix_rt::test]
async fn panicking_filter_fails_only_its_attempt() {
    let mut extra = Filters::default();
    extra.register(
        "panicky",
        |_: &koukan::config::FilterConfig,
         _: &koukan_actors::router::output::BuildContext<'_>|
         -> Result<
            Option<Box<dyn koukan::filter::Filter>>,
            koukan_actors::router::output::BuildError,
        > { Ok(Some(Box::new(Panicky))) },
    );
    let env = start_with(
        Opts {
            pre_filters: "  - filter: panicky".into(),
            ..Default::default()
        },
        extra,
        &["panicky"],
    )
    .await;
    let url = env
        .submit(
            "submission",
            "alice@example.com",
            "boom@example.net",
            MESSAGE,
        )
        .await;
    let r = env.attempt_done(&url, 1).await;
    assert_eq!(
        r.tx.final_attempt_reason, None,
        "retried, not failed for good"
    );
    let next = r.next_attempt_time.expect("retry scheduled");
    // bug_retry: 900 s.
    assert!(next - r.last_update >= 899, "{r:?}");
    let v = env.read(&url).await;
    assert_eq!(code(&v["mail_response"]), 450, "{v}");
    assert_eq!(env.router.output.active(), 0, "the attempt's slot is free");
    // The router goes on serving.
    let url = env
        .submit("submission", "alice@example.com", "ok@example.net", MESSAGE)
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "upstream response success");
}

// ---- add_route and http_hook -----------------------------------------------------------

/// A `sor` sender whose chain delivers to the receiver's `/senders/sor` path.
fn sor_yaml(receiver: &str) -> (String, String) {
    (
        "- name: sor\n  output_chain: sor\n  retry: output_chain\n".into(),
        format!(
            "- name: sor\n  output_handler:\n    retry_params: {{}}\n  chain:\n  - filter: rest_output\n    static_endpoint: {receiver}/senders/sor/transactions\n    rcpt_timeout: 4\n"
        ),
    )
}

#[actix_rt::test]
async fn add_route_synchronous_fork() {
    let rx = Receiver::start();
    let (senders, endpoints) = sor_yaml(&rx.base);
    let o = Opts {
        pre_filters: "  - filter: add_route\n    sender: sor".into(),
        senders,
        endpoints,
        ..Default::default()
    };
    let env = start_on(o, rx).await;
    let url = env
        .submit("submission", "alice@example.com", "ok@example.net", MESSAGE)
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "upstream response success");
    let got = env.rx.to("ok");
    let paths: Vec<&str> = got.iter().map(|t| t.sender_path.as_str()).collect();
    assert_eq!(paths, ["sor", "router"], "fork first, then the primary");
    assert!(got.iter().all(|t| t.body == MESSAGE.as_bytes()));

    // The fork's failure answers the primary, which never goes out.
    let url = env
        .submit(
            "submission",
            "alice@example.com",
            "rcpt5@example.net",
            MESSAGE,
        )
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "upstream rcpt_response permfail");
    assert_eq!(
        v["rcpt_response"][0]["message"],
        "5.1.1 rcpt5 says no such user (AddRouteFilter upstream)"
    );
    let got = env.rx.to("rcpt5");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].sender_path, "sor");
}

#[actix_rt::test]
async fn add_route_store_and_forward() {
    let rx = Receiver::start();
    let (senders, endpoints) = sor_yaml(&rx.base);
    let env = start_on(
        Opts {
            dequeue: true,
            pre_filters: "  - filter: add_route\n    sender: sor\n    store_and_forward: true"
                .into(),
            senders,
            endpoints,
            ..Default::default()
        },
        rx,
    )
    .await;
    // The primary fails for good; the stored fork is delivered on its own.
    let url = env
        .submit(
            "submission",
            "alice@example.com",
            "data5@example.net",
            MESSAGE,
        )
        .await;
    let v = env.wait_final(&url).await;
    assert_eq!(v["final_attempt_reason"], "upstream response permfail");
    let got = env
        .rx
        .wait(LIMIT, "both copies", |t| {
            t.iter()
                .filter(|t| t.to("data5") && t.data_response.is_some())
                .count()
                == 2
        })
        .await;
    let mut paths: Vec<&str> = got
        .iter()
        .filter(|t| t.to("data5"))
        .map(|t| t.sender_path.as_str())
        .collect();
    paths.sort();
    assert_eq!(paths, ["router", "sor"]);
    assert!(
        got.iter()
            .filter(|t| t.to("data5"))
            .all(|t| t.body == MESSAGE.as_bytes())
    );
}

#[actix_rt::test]
async fn http_hook_rejects_and_fails_safe() {
    for on_error in ["tempfail", "accept"] {
        let rx = Receiver::start();
        let hook = format!(
            "  - filter: http_hook\n    url: {}/hook\n    timeout: 1\n    on_error: {on_error}",
            rx.base
        );
        let env = start_on(
            Opts {
                pre_filters: hook,
                ..Default::default()
            },
            rx,
        )
        .await;
        let url = env
            .submit("submission", "alice@example.com", "ok@example.net", MESSAGE)
            .await;
        let v = env.wait_final(&url).await;
        assert_eq!(v["final_attempt_reason"], "upstream response success");
        let hooks = env.rx.hooks();
        assert_eq!(hooks[0]["rcpt_to"], json!([{"m": "ok@example.net"}]));
        assert_eq!(hooks[0]["mail_from"], json!({"m": "alice@example.com"}));

        let url = env
            .submit(
                "submission",
                "alice@example.com",
                "hookno@example.net",
                MESSAGE,
            )
            .await;
        let v = env.wait_final(&url).await;
        assert_eq!(v["final_attempt_reason"], "upstream rcpt_response permfail");
        assert_eq!(v["rcpt_response"][0]["message"], "5.7.1 the hook says no");
        assert!(env.rx.to("hookno").is_empty(), "never sent upstream");

        let url = env
            .submit(
                "submission",
                "alice@example.com",
                "hookslow@example.net",
                MESSAGE,
            )
            .await;
        if on_error == "tempfail" {
            let r = env.attempt_done(&url, 1).await;
            assert_eq!(r.tx.mail_response.as_ref().unwrap().code, 451, "{r:?}");
            assert!(r.next_attempt_time.is_some(), "retried later");
            assert!(env.rx.to("hookslow").is_empty());
        } else {
            let v = env.wait_final(&url).await;
            assert_eq!(v["final_attempt_reason"], "upstream response success");
        }
    }
}
