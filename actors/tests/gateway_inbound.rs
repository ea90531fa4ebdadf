//! The gateway's SMTP listener over real sockets: SMTP clients (raw, mail-send, Python's
//! smtplib) on one side, a router-dialect HTTP server on the other. The fake router
//! answers like the exploder (MAIL 250, RCPT 250 or 550 for `@unrouted.example`, data
//! 250 once the body is final) and records every request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use bytes::Bytes;
use koukan::config::{GatewayConfig, TlsVerify};
use koukan::range::{ContentRange, HeldRange};
use koukan::rest::{BlobStatus, BodyView, render_read};
use koukan::transaction::Update;
use koukan::{HostPort, Mailbox, Response, Sender, Transaction};
use koukan_actors::client::{ClientError, ClientSettings, HttpClient, RestTransaction};
use koukan_actors::gateway::inbound::SmtpListeners;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// The fake router.

#[derive(Clone, Debug)]
enum Ev {
    Create(Value),
    Patch {
        if_match: String,
        content_type: Option<String>,
        json: Option<Value>,
    },
    Put {
        range: Option<String>,
        finalize: Option<String>,
        len: usize,
    },
    Cancel,
}

#[derive(Default)]
struct FakeTx {
    version: u64,
    mail_from: bool,
    remote_host: Option<HostPort>,
    local_host: Option<HostPort>,
    mail_response: Option<Response>,
    rcpts: Vec<String>,
    rcpt_response: Vec<Option<Response>>,
    body: Vec<u8>,
    body_final: bool,
    data_response: Option<Response>,
    cancelled: bool,
}

#[derive(Default)]
struct Knobs {
    /// Answer the next PATCH with 412 (after bumping the version, as a racing writer).
    patch_412_once: bool,
    /// Before the next ranged PUT, pretend a previous attempt stored its first n bytes.
    extra_held_once: Option<usize>,
    /// Store only the first n bytes of the next PUT and say so.
    truncate_once: Option<usize>,
    /// GET answers carry an unknown field.
    bad_get_json: bool,
    /// The data response.
    data_response: Option<Response>,
    /// Delay the MAIL response (version bump after this long).
    mail_delay: Option<Duration>,
    /// Answer MAIL with this instead of 250.
    mail_refusal: Option<Response>,
}

#[derive(Default)]
struct State {
    txs: HashMap<String, FakeTx>,
    events: Vec<Ev>,
    knobs: Knobs,
    next_id: u64,
}

struct Fake {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
    base: Mutex<String>,
}

impl Fake {
    fn events(&self) -> Vec<Ev> {
        self.state.lock().unwrap().events.clone()
    }
    fn creates(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Create(v) => Some(v),
                _ => None,
            })
            .collect()
    }
    fn cancels(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Ev::Cancel))
            .count()
    }
    fn heartbeats(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Ev::Patch { json: None, .. }))
            .count()
    }
    fn puts(&self) -> Vec<(Option<String>, Option<String>, usize)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Put {
                    range,
                    finalize,
                    len,
                } => Some((range, finalize, len)),
                _ => None,
            })
            .collect()
    }
    fn body(&self) -> Vec<u8> {
        let s = self.state.lock().unwrap();
        s.txs
            .values()
            .find(|t| !t.body.is_empty())
            .map(|t| t.body.clone())
            .unwrap_or_default()
    }
    fn tx_flags(&self) -> Vec<(bool, bool)> {
        let s = self.state.lock().unwrap();
        s.txs
            .values()
            .map(|t| (t.body_final, t.cancelled))
            .collect()
    }
}

fn header(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim_matches('"').to_string())
}

fn render(base: &str, id: &str, t: &FakeTx) -> Vec<u8> {
    let tx = Transaction {
        remote_host: t.remote_host.clone(),
        local_host: t.local_host.clone(),
        mail_from: t.mail_from.then(|| Mailbox::new("x")),
        mail_response: t.mail_response.clone(),
        rcpt_to: t.rcpts.iter().map(Mailbox::new).collect(),
        rcpt_response: t.rcpt_response.clone(),
        data_response: t.data_response.clone(),
        cancelled: t.cancelled,
        sender: Some(Sender::new("x", None)),
        ..Default::default()
    };
    let body = BodyView {
        blob_status: Some(BlobStatus {
            uri: format!("{base}/transactions/{id}/body"),
            finalized: t.body_final,
        }),
        message_builder: None,
    };
    render_read(&tx, Some(&body))
}

fn json_reply(status: actix_web::http::StatusCode, etag: u64, body: Vec<u8>) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(("etag", etag.to_string()))
        .content_type("application/json")
        .body(body)
}

fn rcpt_reply(m: &str) -> Response {
    if m.ends_with("@unrouted.example") {
        Response::new(550, "5.1.1 mailbox does not exist")
    } else {
        Response::new(250, "RCPT ok")
    }
}

async fn handle(req: HttpRequest, body: web::Bytes, fake: web::Data<Arc<Fake>>) -> HttpResponse {
    let path = req.path().to_string();
    // `/r/...` is "another replica": redirect, method and body preserved.
    if let Some(rest) = path.strip_prefix("/r") {
        return HttpResponse::PermanentRedirect()
            .insert_header(("location", rest.to_string()))
            .finish();
    }
    let base = fake.base.lock().unwrap().clone();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().as_str().to_string();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["senders", _, "transactions"]) => {
            let v: Value = serde_json::from_slice(&body).unwrap();
            let (id, out, delay) = {
                let mut s = fake.state.lock().unwrap();
                s.events.push(Ev::Create(v.clone()));
                s.next_id += 1;
                let id = format!("tx{}", s.next_id);
                let t = FakeTx {
                    version: 1,
                    mail_from: v.get("mail_from").is_some(),
                    rcpts: v["rcpt_to"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| r["m"].as_str().unwrap().to_string())
                        .collect(),
                    remote_host: serde_json::from_value(v["remote_host"].clone()).ok(),
                    local_host: serde_json::from_value(v["local_host"].clone()).ok(),
                    ..Default::default()
                };
                let out = render(&base, &id, &t);
                s.txs.insert(id.clone(), t);
                (id, out, s.knobs.mail_delay)
            };
            let refusal = fake.state.lock().unwrap().knobs.mail_refusal.clone();
            let set_mail = {
                let fake = fake.get_ref().clone();
                let id = id.clone();
                move || {
                    let mut s = fake.state.lock().unwrap();
                    let t = s.txs.get_mut(&id).unwrap();
                    match &refusal {
                        Some(r) => t.mail_response = Some(r.clone()),
                        None => {
                            t.mail_response = Some(Response::new(250, "MAIL ok (exploder noop)"));
                            // Recipients that came with the create are answered with MAIL.
                            t.rcpt_response = t.rcpts.iter().map(|m| Some(rcpt_reply(m))).collect();
                        }
                    }
                    t.version += 1;
                    drop(s);
                    fake.changed.notify_waiters();
                }
            };
            match delay {
                Some(d) => {
                    actix_rt::spawn(async move {
                        actix_rt::time::sleep(d).await;
                        set_mail();
                    });
                }
                None => set_mail(),
            }
            HttpResponse::Created()
                .insert_header(("location", format!("{base}/transactions/{id}")))
                .insert_header(("etag", "1"))
                .content_type("application/json")
                .body(out)
        }
        ("GET", ["transactions", id]) => {
            let inm = header(&req, "if-none-match");
            let wait = header(&req, "request-timeout")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(30)
                .min(30);
            let deadline = Instant::now() + Duration::from_secs(wait);
            loop {
                let notified = fake.changed.notified();
                {
                    let s = fake.state.lock().unwrap();
                    let Some(t) = s.txs.get(*id) else {
                        return HttpResponse::NotFound().finish();
                    };
                    if inm.as_deref() != Some(&t.version.to_string()) {
                        if s.knobs.bad_get_json {
                            return json_reply(
                                actix_web::http::StatusCode::OK,
                                t.version,
                                br#"{"bogus": 1}"#.to_vec(),
                            );
                        }
                        return json_reply(
                            actix_web::http::StatusCode::OK,
                            t.version,
                            render(&base, id, t),
                        );
                    }
                }
                if actix_rt::time::timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    notified,
                )
                .await
                .is_err()
                {
                    return HttpResponse::NotModified()
                        .insert_header(("etag", inm.unwrap()))
                        .finish();
                }
            }
        }
        ("PATCH", ["transactions", id]) => {
            let if_match = header(&req, "if-match").unwrap_or_default();
            let content_type = header(&req, "content-type");
            let json: Option<Value> = if body.is_empty() {
                None
            } else {
                Some(serde_json::from_slice(&body).unwrap())
            };
            let mut s = fake.state.lock().unwrap();
            s.events.push(Ev::Patch {
                if_match: if_match.clone(),
                content_type,
                json: json.clone(),
            });
            let race = std::mem::take(&mut s.knobs.patch_412_once);
            let Some(t) = s.txs.get_mut(*id) else {
                return HttpResponse::NotFound().finish();
            };
            if race {
                t.version += 1;
            }
            if if_match != t.version.to_string() {
                return HttpResponse::PreconditionFailed().body("update conflict");
            }
            t.version += 1;
            let mut new_rcpts = Vec::new();
            if let Some(j) = &json {
                let offset = j["rcpt_to_list_offset"].as_u64().unwrap_or(0) as usize;
                if offset != t.rcpts.len() {
                    return HttpResponse::BadRequest().body("bad offset");
                }
                for r in j["rcpt_to"].as_array().unwrap() {
                    let m = r["m"].as_str().unwrap().to_string();
                    t.rcpts.push(m.clone());
                    new_rcpts.push(m);
                }
            }
            let out = render(&base, id, t);
            let etag = t.version;
            if !new_rcpts.is_empty() {
                for m in new_rcpts {
                    t.rcpt_response.push(Some(rcpt_reply(&m)));
                }
                t.version += 1;
            }
            drop(s);
            fake.changed.notify_waiters();
            json_reply(actix_web::http::StatusCode::OK, etag, out)
        }
        ("PUT", ["transactions", id, "body"]) => {
            let range = header(&req, "content-range");
            let finalize = header(&req, "x-finalize-blob-length");
            let mut s = fake.state.lock().unwrap();
            s.events.push(Ev::Put {
                range: range.clone(),
                finalize: finalize.clone(),
                len: body.len(),
            });
            let extra = s.knobs.extra_held_once.take();
            let truncate = s.knobs.truncate_once.take();
            let data_response = s
                .knobs
                .data_response
                .clone()
                .unwrap_or_else(|| Response::new(250, "DATA ok (Exploder store&forward)"));
            let Some(t) = s.txs.get_mut(*id) else {
                return HttpResponse::NotFound().finish();
            };
            let held = |t: &FakeTx| HeldRange {
                length: t.body.len() as u64,
                total: t.body_final.then_some(t.body.len() as u64),
            };
            let (offset, total) = match (&range, &finalize) {
                (Some(r), _) => {
                    let r = ContentRange::parse(r).unwrap();
                    assert_eq!(r.len() as usize, body.len());
                    (r.first, r.total)
                }
                (None, Some(f)) => {
                    let n: u64 = f.parse().unwrap();
                    (t.body.len() as u64, Some(n))
                }
                (None, None) => (0, Some(body.len() as u64)),
            };
            if let Some(n) = extra {
                t.body.extend_from_slice(&body[..n]);
            }
            if offset != t.body.len() as u64 || t.body_final {
                return HttpResponse::RangeNotSatisfiable()
                    .insert_header(("content-range", held(t).header()))
                    .body("invalid range");
            }
            let take = truncate.unwrap_or(body.len()).min(body.len());
            t.body.extend_from_slice(&body[..take]);
            if take == body.len() && total == Some(t.body.len() as u64) {
                t.body_final = true;
                t.version += 1;
                t.data_response = Some(data_response);
                t.version += 1;
            }
            let h = held(t).header();
            drop(s);
            fake.changed.notify_waiters();
            HttpResponse::Ok()
                .insert_header(("content-range", h))
                .content_type("application/json")
                .body("{}")
        }
        ("POST", ["transactions", id, "cancel"]) => {
            let mut s = fake.state.lock().unwrap();
            s.events.push(Ev::Cancel);
            if let Some(t) = s.txs.get_mut(*id) {
                t.cancelled = true;
                t.version += 1;
            }
            drop(s);
            fake.changed.notify_waiters();
            HttpResponse::Ok().finish()
        }
        _ => HttpResponse::NotFound().finish(),
    }
}

async fn start_fake() -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake {
        state: Mutex::new(State::default()),
        changed: tokio::sync::Notify::new(),
        base: Mutex::new(String::new()),
    });
    let data = web::Data::new(fake.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(64 << 20))
            .default_service(web::to(handle))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    let base = format!("http://{addr}");
    *fake.base.lock().unwrap() = base.clone();
    actix_rt::spawn(server.run());
    (fake, base)
}

// ---------------------------------------------------------------------------------------
// The gateway.

struct Opts {
    endpoint: String,
    chunk_size: usize,
    refresh: f64,
    tls: Option<(String, String)>,
    smtps: bool,
    secrets: Option<String>,
    max_size: u64,
}

fn opts(base: &str) -> Opts {
    Opts {
        endpoint: format!("{base}/senders/gateway/transactions"),
        chunk_size: 1000,
        refresh: 30.0,
        tls: None,
        smtps: false,
        secrets: None,
        max_size: 100_000,
    }
}

async fn start_gateway(o: &Opts) -> (SmtpListeners, SocketAddr) {
    let mut svc = format!(
        r#"
    - addr: ["127.0.0.1", 0]
      endpoint: router
      sender: gateway
      tag: smtp-mx
      hostname: gw.example
      enable_bdat: true
      max_message_size: {max}
      rcpt_timeout: 5
      data_timeout: 10
      command_timeout: 20
"#,
        max = o.max_size
    );
    if let Some((c, k)) = &o.tls {
        svc.push_str(&format!("      cert: {c}\n      key: {k}\n"));
    }
    if o.smtps {
        svc.push_str("      smtps: true\n");
    }
    if let Some(s) = &o.secrets {
        svc.push_str(&format!("      auth_secrets: {s}\n"));
    }
    let yaml = format!(
        r#"
rest_listener:
  addr: ["127.0.0.1", 0]
  session_uri: http://127.0.0.1:1
smtp_output:
  hosts: {{}}
smtp_listener:
  services:
{svc}
rest_output:
  - name: router
    endpoint: {endpoint}
    chunk_size: {chunk}
    refresh_interval: {refresh}
    rcpt_timeout: 5
    data_timeout: 10
"#,
        endpoint = o.endpoint,
        chunk = o.chunk_size,
        refresh = o.refresh,
    );
    let cfg = GatewayConfig::from_yaml_str(&yaml).unwrap();
    let l = SmtpListeners::start(Arc::new(cfg)).await.unwrap();
    let addr = l.addrs[0];
    (l, addr)
}

// ---------------------------------------------------------------------------------------
// A raw SMTP client: write anything, read whole replies.

struct Raw<S> {
    r: BufReader<S>,
}

#[derive(Debug)]
struct R {
    code: u16,
    text: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    async fn send(&mut self, data: impl AsRef<[u8]>) {
        self.r.get_mut().write_all(data.as_ref()).await.unwrap();
        self.r.get_mut().flush().await.unwrap();
    }

    async fn reply(&mut self) -> R {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = actix_rt::time::timeout(Duration::from_secs(20), self.r.read_line(&mut line))
                .await
                .expect("reply in time")
                .unwrap();
            assert!(n > 0, "connection closed; got so far {text:?}");
            text.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') || line.len() < 4 {
                return R {
                    code: line[..3].parse().unwrap(),
                    text,
                };
            }
        }
    }

    async fn cmd(&mut self, c: &str) -> R {
        self.send(format!("{c}\r\n")).await;
        self.reply().await
    }

    /// Reads until the server closes; what it sent meanwhile.
    async fn closed(&mut self) -> Option<Vec<u8>> {
        let mut rest = Vec::new();
        match actix_rt::time::timeout(Duration::from_secs(10), self.r.read_to_end(&mut rest)).await
        {
            Ok(Ok(_)) | Ok(Err(_)) => Some(rest),
            Err(_) => None,
        }
    }
}

async fn connect(addr: SocketAddr) -> Raw<TcpStream> {
    let s = TcpStream::connect(addr).await.unwrap();
    let mut c = Raw {
        r: BufReader::new(s),
    };
    let g = c.reply().await;
    assert_eq!(g.code, 220, "{g:?}");
    assert!(g.text.contains("gw.example"));
    c
}

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------------------------------
// Tests.

#[actix_rt::test]
async fn pipelined_transaction_maps_to_router_dialect() {
    init();
    let (fake, base) = start_fake().await;
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let mut c = connect(addr).await;
    let ehlo = c.cmd("EHLO client.example").await;
    assert_eq!(ehlo.code, 250);
    for cap in [
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "SIZE 100000",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
    ] {
        assert!(ehlo.text.contains(cap), "{cap} in {}", ehlo.text);
    }
    assert!(!ehlo.text.contains("STARTTLS"));
    assert!(!ehlo.text.contains("AUTH"));

    // One write, four commands.
    c.send(
        "MAIL FROM:<alice@example.com> size=100 BODY=8BITMIME\r\n\
         RCPT TO:<bob@example.com>\r\n\
         RCPT TO:<carol@unrouted.example>\r\n\
         DATA\r\n",
    )
    .await;
    let mail = c.reply().await;
    assert_eq!(mail.code, 250);
    assert!(mail.text.contains("MAIL ok (exploder noop)"), "{mail:?}");
    assert_eq!(c.reply().await.code, 250);
    let bad = c.reply().await;
    assert_eq!(bad.code, 550);
    assert!(bad.text.contains("5.1.1 mailbox does not exist"));
    assert_eq!(c.reply().await.code, 354);
    c.send("Subject: hi\r\n\r\nhello\r\n..dot\r\n.\r\n").await;
    let data = c.reply().await;
    assert_eq!(data.code, 250, "{data:?}");
    assert!(data.text.contains("DATA ok"));
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let create = &fake.creates()[0];
    assert_eq!(
        create["mail_from"],
        json!({"m": "alice@example.com", "e": [{"k": "SIZE", "p": "100"}, {"k": "BODY", "p": "8BITMIME"}]})
    );
    assert_eq!(
        create["smtp_meta"],
        json!({"ehlo_host": "client.example", "esmtp": true, "tls": false, "auth": false})
    );
    assert_eq!(
        create["sender"],
        json!({"name": "gateway", "tag": "smtp-mx"})
    );
    assert_eq!(create["remote_host"][0], "127.0.0.1");
    assert_eq!(create["local_host"][1], addr.port());
    // The recipients pipelined behind MAIL come with the create.
    assert_eq!(
        create["rcpt_to"],
        json!([{"m": "bob@example.com"}, {"m": "carol@unrouted.example"}])
    );
    let patches: Vec<Value> = fake
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Patch {
                json: Some(j),
                content_type,
                ..
            } => {
                assert_eq!(content_type.as_deref(), Some("application/json"));
                Some(j)
            }
            _ => None,
        })
        .collect();
    assert!(patches.is_empty(), "{patches:?}");
    assert_eq!(fake.body(), b"Subject: hi\r\n\r\nhello\r\n.dot\r\n");
    // Small body: one plain PUT.
    assert_eq!(fake.puts(), vec![(None, None, 28)]);
    // The data response settled the transaction: QUIT cancels nothing.
    assert_eq!(fake.cancels(), 0);
    gw.shutdown().await;
}

#[actix_rt::test]
async fn pipelined_recipients_up_to_the_first_with_parameters_go_with_the_create() {
    init();
    let (fake, base) = start_fake().await;
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let mut c = connect(addr).await;
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    c.send(
        "MAIL FROM:<alice@example.com>\r\n\
         RCPT TO:<a@example.com>\r\n\
         RCPT TO:<b@example.com> NOTIFY=NEVER\r\n\
         RCPT TO:<c@example.com>\r\n\
         RSET\r\n",
    )
    .await;
    assert_eq!(c.reply().await.code, 250, "MAIL");
    assert_eq!(c.reply().await.code, 250, "a");
    assert_eq!(c.reply().await.code, 555, "b: parameters refused");
    assert_eq!(c.reply().await.code, 250, "c");
    assert_eq!(c.reply().await.code, 250, "RSET");
    assert_eq!(
        fake.creates()[0]["rcpt_to"],
        json!([{"m": "a@example.com"}]),
        "the create stops at the first recipient the RCPT path must judge"
    );
    let patches: Vec<Value> = fake
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Patch { json: Some(j), .. } => Some(j),
            _ => None,
        })
        .collect();
    assert_eq!(
        patches,
        vec![json!({"rcpt_to": [{"m": "c@example.com"}], "rcpt_to_list_offset": 1})]
    );
    assert_eq!(c.cmd("QUIT").await.code, 221);
    gw.shutdown().await;
}

#[actix_rt::test]
async fn refused_mail_refuses_the_pipelined_recipients() {
    init();
    let (fake, base) = start_fake().await;
    fake.state.lock().unwrap().knobs.mail_refusal =
        Some(Response::new(550, "5.7.1 sender refused"));
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let mut c = connect(addr).await;
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    c.send(
        "MAIL FROM:<alice@example.com>\r\n\
         RCPT TO:<bob@example.com>\r\n\
         RCPT TO:<carol@example.com>\r\n\
         DATA\r\n",
    )
    .await;
    let mail = c.reply().await;
    assert_eq!(mail.code, 550, "{mail:?}");
    assert!(mail.text.contains("sender refused"));
    // The recipient sent with the create is not taken as answered: every RCPT and the
    // DATA get the no-MAIL refusal, as without pipelining.
    for _ in 0..2 {
        let r = c.reply().await;
        assert_eq!(r.code, 503, "{r:?}");
    }
    assert_eq!(c.reply().await.code, 503);
    // No PATCH was sent; the refused transaction was cancelled.
    assert!(
        !fake
            .events()
            .iter()
            .any(|e| matches!(e, Ev::Patch { json: Some(_), .. }))
    );
    assert_eq!(fake.cancels(), 1);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    gw.shutdown().await;
}

#[actix_rt::test]
async fn python_smtplib_with_smtputf8() {
    init();
    let (fake, base) = start_fake().await;
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let script = format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port}, timeout=20)
s.ehlo("py.example")
assert s.has_extn("smtputf8"), s.esmtp_features
refused = s.sendmail("jösé@exämple.com", ["bob@example.com", "x@unrouted.example"],
                     "Subject: ü\r\n\r\nhällo\r\n".encode("utf-8"), mail_options=["SMTPUTF8"])
assert list(refused) == ["x@unrouted.example"], refused
s.quit()
print("ok")
"#,
        port = addr.port()
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let create = &fake.creates()[0];
    assert_eq!(
        create["mail_from"],
        json!({"m": "jösé@exämple.com", "e": [{"k": "SIZE", "p": "23"}, {"k": "SMTPUTF8"}]})
    );
    assert_eq!(fake.body(), "Subject: ü\r\n\r\nhällo\r\n".as_bytes());
    gw.shutdown().await;
}

struct Certs {
    _dir: tempfile::TempDir,
    cert: String,
    key: String,
    secrets: String,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let secrets = dir.path().join("secrets.json");
    // sha256("my-secret")
    std::fs::write(
        &secrets,
        r#"{"my-application": "186ef76e9d6a723ecb570d4d9c287487d001e5d35f7ed4a313350a407950318e"}"#,
    )
    .unwrap();
    Certs {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        secrets: secrets.display().to_string(),
        _dir: dir,
    }
}

fn b64(s: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in s.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[actix_rt::test]
async fn starttls_then_auth() {
    init();
    let (fake, base) = start_fake().await;
    let c = certs();
    let mut o = opts(&base);
    o.tls = Some((c.cert.clone(), c.key.clone()));
    o.secrets = Some(c.secrets.clone());
    let (gw, addr) = start_gateway(&o).await;

    // mail-send's low-level client does the STARTTLS dance.
    let mut client = mail_send::SmtpClient::connect(addr, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(client.read().await.unwrap().code, 220);
    let caps = client.ehlo("tls.example").await.unwrap();
    assert!(caps.has_capability(smtp_proto::EXT_START_TLS));
    assert!(!caps.has_capability(smtp_proto::EXT_AUTH), "AUTH needs TLS");
    let r = client
        .cmd(format!(
            "AUTH PLAIN {}\r\n",
            b64(b"\0my-application\0my-secret")
        ))
        .await
        .unwrap();
    assert_eq!(r.code, 538, "{r:?}");
    let connector = mail_send::smtp::tls::build_tls_connector(true).unwrap();
    let mut client = client.start_tls(&connector, "localhost").await.unwrap();
    let caps = client.ehlo("tls.example").await.unwrap();
    assert!(!caps.has_capability(smtp_proto::EXT_START_TLS));
    assert!(caps.has_capability(smtp_proto::EXT_AUTH));
    let r = client.cmd(b"STARTTLS\r\n").await.unwrap();
    assert_eq!(r.code, 503);
    // Wrong secret, then right one over LOGIN.
    let r = client
        .cmd(format!("AUTH PLAIN {}\r\n", b64(b"\0my-application\0nope")))
        .await
        .unwrap();
    assert_eq!(r.code, 535, "{r:?}");
    let r = client.cmd(b"AUTH CRAM-MD5\r\n").await.unwrap();
    assert_eq!(r.code, 504);
    let r = client.cmd(b"AUTH LOGIN\r\n").await.unwrap();
    assert_eq!((r.code, r.message.as_str()), (334, "VXNlciBOYW1lAA=="));
    let r = client
        .cmd(format!("{}\r\n", b64(b"my-application")))
        .await
        .unwrap();
    assert_eq!(r.code, 334);
    let r = client
        .cmd(format!("{}\r\n", b64(b"my-secret")))
        .await
        .unwrap();
    assert_eq!(r.code, 235, "{r:?}");
    let r = client.cmd(b"AUTH LOGIN\r\n").await.unwrap();
    assert_eq!(r.code, 503, "already authenticated");
    let r = client
        .cmd(b"MAIL FROM:<app@example.com>\r\n")
        .await
        .unwrap();
    assert_eq!(r.code, 250);
    client.cmd(b"QUIT\r\n").await.unwrap();
    let create = &fake.creates()[0];
    assert_eq!(
        create["smtp_meta"],
        json!({"ehlo_host": "tls.example", "esmtp": true, "tls": true, "auth": true})
    );
    // QUIT before DATA cancels.
    wait_for(|| fake.cancels() == 1).await;
    gw.shutdown().await;
}

async fn wait_for(cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "condition not met"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn auth_plain_without_secrets_is_not_offered() {
    init();
    let (_fake, base) = start_fake().await;
    let c = certs();
    let mut o = opts(&base);
    o.tls = Some((c.cert.clone(), c.key.clone()));
    let (gw, addr) = start_gateway(&o).await;
    let client = mail_send::SmtpClient::connect(addr, Duration::from_secs(10))
        .await
        .unwrap();
    let mut client = client;
    client.read().await.unwrap();
    client.ehlo("x").await.unwrap();
    let connector = mail_send::smtp::tls::build_tls_connector(true).unwrap();
    let mut client = client.start_tls(&connector, "localhost").await.unwrap();
    let caps = client.ehlo("x").await.unwrap();
    assert!(!caps.has_capability(smtp_proto::EXT_AUTH));
    let r = client.cmd(b"AUTH PLAIN AGEAYg==\r\n").await.unwrap();
    assert_eq!(r.code, 502);
    gw.shutdown().await;
}

#[actix_rt::test]
async fn implicit_tls() {
    init();
    let (fake, base) = start_fake().await;
    let c = certs();
    let mut o = opts(&base);
    o.tls = Some((c.cert.clone(), c.key.clone()));
    o.smtps = true;
    o.secrets = Some(c.secrets.clone());
    let (gw, addr) = start_gateway(&o).await;

    let connector = mail_send::smtp::tls::build_tls_connector(true).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut c = Raw {
        r: BufReader::new(tls),
    };
    assert_eq!(c.reply().await.code, 220);
    let ehlo = c.cmd("EHLO s.example").await;
    assert!(!ehlo.text.contains("STARTTLS"));
    assert!(
        ehlo.text.contains("AUTH PLAIN LOGIN"),
        "AUTH allowed on smtps"
    );
    assert_eq!(
        c.cmd(&format!(
            "AUTH PLAIN {}",
            b64(b"\0my-application\0my-secret")
        ))
        .await
        .code,
        235
    );
    assert_eq!(c.cmd("MAIL FROM:<a@example.com>").await.code, 250);
    assert_eq!(c.cmd("RSET").await.code, 250);
    assert_eq!(fake.creates()[0]["smtp_meta"]["tls"], json!(true));
    wait_for(|| fake.cancels() == 1).await;

    // No plaintext fallback: a plaintext client gets no greeting.
    let mut p = Raw {
        r: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    };
    p.send("EHLO plain\r\n").await;
    let got = p.closed().await.expect("closed");
    assert!(!got.starts_with(b"220"), "no plaintext greeting");
    gw.shutdown().await;
}

#[actix_rt::test]
async fn bdat_multi_chunk() {
    init();
    let (fake, base) = start_fake().await;
    let mut o = opts(&base);
    o.chunk_size = 4;
    let (gw, addr) = start_gateway(&o).await;
    let mut c = connect(addr).await;
    c.cmd("EHLO x").await;
    // BDAT before any recipient: the chunk is skipped, 503.
    c.send("BDAT 3\r\nabc").await;
    assert_eq!(c.reply().await.code, 503);
    assert_eq!(c.cmd("MAIL FROM:<>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@example.com>").await.code, 250);
    c.send("BDAT 5\r\nhelloBDAT 7\r\n, world").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250);
    assert!(r.text.contains("5 octets received"));
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 503, "DATA after BDAT");
    c.send("BDAT 3 LAST\r\n!\r\n").await;
    let last = c.reply().await;
    assert_eq!(last.code, 250, "{last:?}");
    assert!(last.text.contains("DATA ok"));
    assert_eq!(fake.body(), b"hello, world!\r\n");
    assert_eq!(fake.creates()[0]["mail_from"], json!({"m": ""}));
    // 4-byte chunks: open-ended ranges, then the total.
    let puts = fake.puts();
    assert!(puts.len() >= 4, "{puts:?}");
    assert_eq!(puts[0].0.as_deref(), Some("bytes 0-3/*"));
    assert!(puts.last().unwrap().0.as_deref().unwrap().ends_with("/15"));
    // mail-send's one-chunk bdat() on the same connection.
    let mut m = mail_send::SmtpClient {
        stream: c.r.into_inner(),
        timeout: Duration::from_secs(10),
    };
    m.mail_from("a@example.com", &Default::default())
        .await
        .unwrap();
    m.rcpt_to("b@example.com", &Default::default())
        .await
        .unwrap();
    m.bdat(b"second\r\n").await.unwrap();
    gw.shutdown().await;
}

#[actix_rt::test]
async fn size_limits() {
    init();
    let (fake, base) = start_fake().await;
    let mut o = opts(&base);
    o.max_size = 1000;
    let (gw, addr) = start_gateway(&o).await;
    let mut c = connect(addr).await;
    c.cmd("EHLO x").await;
    assert_eq!(c.cmd("MAIL FROM:<a@example.com> SIZE=1001").await.code, 552);
    assert!(fake.creates().is_empty(), "refused locally");
    assert_eq!(c.cmd("MAIL FROM:<a@example.com> SIZE=10").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<b@example.com>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    let line = "x".repeat(98) + "\r\n";
    c.send(line.repeat(11) + ".\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 552, "{r:?}");
    wait_for(|| fake.cancels() == 1).await;
    assert!(fake.tx_flags().iter().all(|(fin, _)| !fin));
    // The session goes on.
    assert_eq!(c.cmd("NOOP").await.code, 250);
    gw.shutdown().await;
}

#[actix_rt::test]
async fn too_many_recipients() {
    init();
    let (_fake, base) = start_fake().await;
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let mut c = connect(addr).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@example.com>").await;
    let mut batch = String::new();
    for i in 0..101 {
        batch.push_str(&format!("RCPT TO:<r{i}@example.com>\r\n"));
    }
    c.send(batch).await;
    for _ in 0..100 {
        assert_eq!(c.reply().await.code, 250);
    }
    let r = c.reply().await;
    assert_eq!(r.code, 452, "{r:?}");
    assert!(r.text.contains("4.5.3"));
    gw.shutdown().await;
}

#[actix_rt::test]
async fn garbage_and_sequencing() {
    init();
    let (fake, base) = start_fake().await;
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let mut c = connect(addr).await;
    assert_eq!(c.cmd("MAIL FROM:<a@example.com>").await.code, 503);
    c.cmd("EHLO x").await;
    assert_eq!(c.cmd("RCPT TO:<b@example.com>").await.code, 503);
    assert_eq!(c.cmd("DATA").await.code, 503);
    assert_eq!(c.cmd("MAIL FROM:a@example.com").await.code, 501);
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.com> NOTIFY=NEVER").await.code,
        555
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.com> BODY=BINARYMIME")
            .await
            .code,
        555
    );
    assert_eq!(c.cmd("STARTTLS").await.code, 454);
    assert_eq!(c.cmd("VRFY bob").await.code, 252);
    assert_eq!(c.cmd("EXPN list").await.code, 502);
    assert_eq!(c.cmd("HELP").await.code, 214);
    let long = format!("MAIL FROM:<{}@example.com>", "a".repeat(600));
    assert_eq!(c.cmd(&long).await.code, 500);
    let huge = "X".repeat(20000);
    assert_eq!(c.cmd(&huge).await.code, 500);
    assert_eq!(c.cmd("MAIL FROM:<a@example.com>").await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@example.com>").await.code, 503, "nested");
    assert_eq!(
        c.cmd("RCPT TO:<b@example.com> NOTIFY=NEVER").await.code,
        555
    );
    assert_eq!(c.cmd("RCPT TO:<>").await.code, 553);
    assert_eq!(c.cmd("RCPT TO:<b@example.com>").await.code, 250);
    // An overlong body line rejects the message after the dot.
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(format!("ok\r\n{}\r\n.\r\n", "y".repeat(2000))).await;
    let r = c.reply().await;
    assert_eq!(r.code, 500, "{r:?}");
    assert!(r.text.contains("Line too long"));
    wait_for(|| fake.cancels() == 1).await;
    for i in 0..4 {
        let r = c.cmd("FOO bar").await;
        assert_eq!(r.code, 500, "unknown #{i}");
    }
    let r = c.cmd("FOO bar").await;
    assert_eq!(r.code, 502);
    assert!(c.closed().await.is_some());
    gw.shutdown().await;
}

#[actix_rt::test]
async fn disconnect_mid_data_cancels() {
    init();
    let (fake, base) = start_fake().await;
    let mut o = opts(&base);
    o.chunk_size = 10;
    let (gw, addr) = start_gateway(&o).await;
    let mut c = connect(addr).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@example.com>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send("Subject: partial\r\n\r\nsome of the body\r\n").await;
    wait_for(|| !fake.puts().is_empty()).await;
    drop(c);
    wait_for(|| fake.cancels() == 1).await;
    // Nothing was finalized, so nothing was acknowledged.
    assert_eq!(fake.tx_flags(), vec![(false, true)]);
    gw.shutdown().await;
}

#[actix_rt::test]
async fn ten_megabytes_streamed_in_chunks() {
    init();
    let (fake, base) = start_fake().await;
    let mut o = opts(&base);
    o.chunk_size = 1 << 20;
    o.max_size = 32 << 20;
    let (gw, addr) = start_gateway(&o).await;
    let mut c = connect(addr).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@example.com>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    assert_eq!(c.cmd("DATA").await.code, 354);
    let line = "0123456789".repeat(7) + "\r\n";
    let lines = (10 << 20) / line.len() + 1;
    let started = Instant::now();
    let block = line.repeat(1000);
    let mut sent = 0;
    while sent < lines {
        let n = (lines - sent).min(1000);
        if n == 1000 {
            c.send(&block).await;
        } else {
            c.send(line.repeat(n)).await;
        }
        sent += n;
    }
    c.send(".\r\n").await;
    let r = c.reply().await;
    let elapsed = started.elapsed();
    assert_eq!(r.code, 250, "{r:?}");
    let total = lines * line.len();
    let puts = fake.puts();
    assert!(puts.len() >= 10, "{} PUTs", puts.len());
    assert!(puts.iter().all(|(_, _, len)| *len <= 1 << 20));
    assert_eq!(puts[0].0.as_deref(), Some("bytes 0-1048575/*"));
    assert_eq!(puts.iter().map(|p| p.2).sum::<usize>(), total);
    let body = fake.body();
    assert_eq!(body.len(), total);
    assert!(body.chunks(line.len()).all(|l| l == line.as_bytes()));
    eprintln!(
        "10 MB body: {} bytes in {} PUTs, {:?} ({:.1} MB/s)",
        total,
        puts.len(),
        elapsed,
        total as f64 / elapsed.as_secs_f64() / 1e6
    );
    gw.shutdown().await;
}

#[actix_rt::test]
async fn heartbeats_while_idle() {
    init();
    let (fake, base) = start_fake().await;
    let mut o = opts(&base);
    o.refresh = 1.0;
    let (gw, addr) = start_gateway(&o).await;
    let mut c = connect(addr).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@example.com>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    actix_rt::time::sleep(Duration::from_millis(2600)).await;
    assert!(fake.heartbeats() >= 2, "{} heartbeats", fake.heartbeats());
    for e in fake.events() {
        if let Ev::Patch {
            json: None,
            content_type,
            ..
        } = e
        {
            assert_eq!(content_type, None, "heartbeat without content type");
        }
    }
    assert_eq!(c.cmd("DATA").await.code, 354);
    // A slow client's bytes are pushed every refresh interval, not held.
    c.send("x\r\n").await;
    actix_rt::time::sleep(Duration::from_millis(1200)).await;
    c.send("y\r\n").await;
    wait_for(|| fake.puts().len() == 1).await;
    assert_eq!(fake.puts()[0].0.as_deref(), Some("bytes 0-5/*"));
    c.send(".\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(fake.body(), b"x\r\ny\r\n");
    gw.shutdown().await;
}

/// Not a test: messages per second through the gateway into the fake router
/// (`cargo test --test gateway_inbound throughput -- --ignored --nocapture`).
#[actix_rt::test]
#[ignore]
async fn throughput() {
    init();
    let (_fake, base) = start_fake().await;
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let clients = 32;
    let per_client = 50;
    let body = format!(
        "Subject: load\r\n\r\n{}.\r\n",
        ("z".repeat(78) + "\r\n").repeat(12)
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let body = body.clone();
        tasks.push(actix_rt::spawn(async move {
            let mut c = connect(addr).await;
            c.cmd("EHLO load").await;
            for _ in 0..per_client {
                c.send("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
                    .await;
                for code in [250, 250, 354] {
                    assert_eq!(c.reply().await.code, code);
                }
                c.send(&body).await;
                assert_eq!(c.reply().await.code, 250);
            }
            c.cmd("QUIT").await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = clients * per_client;
    let e = started.elapsed();
    eprintln!(
        "{n} messages over {clients} connections in {e:?}: {:.0} msgs/s",
        n as f64 / e.as_secs_f64()
    );
    gw.shutdown().await;
}

#[actix_rt::test]
async fn router_down_is_temporary() {
    init();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let mut c = connect(addr).await;
    c.cmd("EHLO x").await;
    let r = c.cmd("MAIL FROM:<a@example.com>").await;
    assert_eq!(r.code, 451, "{r:?}");
    assert!(
        r.text
            .contains("RestEndpoint._start_upstream_tx http exception")
    );
    assert_eq!(c.cmd("RCPT TO:<b@example.com>").await.code, 503);
    gw.shutdown().await;
}

#[actix_rt::test]
async fn shutdown_cancels_open_transactions() {
    init();
    let (fake, base) = start_fake().await;
    let (gw, addr) = start_gateway(&opts(&base)).await;
    let mut c = connect(addr).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@example.com>").await;
    gw.shutdown().await;
    let r = c.reply().await;
    assert_eq!(r.code, 421);
    assert_eq!(fake.cancels(), 1);
    assert!(
        TcpStream::connect(addr).await.is_err() || {
            let mut r = Raw {
                r: BufReader::new(TcpStream::connect(addr).await.unwrap()),
            };
            r.closed().await.is_some()
        }
    );
}

// ---------------------------------------------------------------------------------------
// The REST client alone.

fn settings() -> ClientSettings {
    ClientSettings {
        timeout: Duration::from_secs(5),
        data_timeout: Duration::from_secs(5),
        chunk_size: 8,
        refresh_interval: None,
        verify: TlsVerify::Disabled,
        // These tests script every request the client makes: no `Prefer: wait`.
        prefer_wait: false,
    }
}

fn envelope() -> Transaction {
    Transaction {
        remote_host: Some(HostPort::new("192.0.2.1", 25)),
        mail_from: Some(Mailbox::new("alice@example.com")),
        sender: Some(Sender::new("gateway", Some("smtp-mx".into()))),
        ..Default::default()
    }
}

async fn client_tx(url: &str) -> RestTransaction {
    let http = HttpClient::new(&TlsVerify::Disabled).unwrap();
    let mut t = RestTransaction::create(http, settings(), url, &envelope(), None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    assert_eq!(t.wait_mail(deadline).await.unwrap().code, 250);
    t.update(&Update {
        rcpt_to: vec![Mailbox::new("bob@example.com")],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(t.wait_rcpt(0, deadline).await.unwrap().code, 250);
    t
}

#[actix_rt::test]
async fn client_resyncs_uploads() {
    init();
    let (fake, base) = start_fake().await;
    let mut t = client_tx(&format!("{base}/senders/gw/transactions")).await;
    t.put_chunk(Bytes::from_static(b"hello, "), false)
        .await
        .unwrap();
    // The server already holds 3 bytes of the next chunk: 416, resend the rest.
    fake.state.lock().unwrap().knobs.extra_held_once = Some(3);
    t.put_chunk(Bytes::from_static(b"world"), false)
        .await
        .unwrap();
    // The server takes only 2 bytes: resend the rest.
    fake.state.lock().unwrap().knobs.truncate_once = Some(2);
    t.put_chunk(Bytes::from_static(b"!\r\nmore"), false)
        .await
        .unwrap();
    t.put_chunk(Bytes::new(), true).await.unwrap();
    assert!(t.body_finalized());
    assert_eq!(fake.body(), b"hello, world!\r\nmore");
    let puts = fake.puts();
    assert_eq!(
        puts.iter()
            .map(|p| p.0.clone().or(p.1.clone()).unwrap())
            .collect::<Vec<_>>(),
        vec![
            "bytes 0-6/*",
            "bytes 7-11/*",
            "bytes 10-11/*",
            "bytes 12-18/*",
            "bytes 14-18/*",
            "19",
        ]
    );
    let d = t
        .wait_data(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.code, 250);
    // After the data response a cancel is not sent.
    t.cancel().await;
    assert_eq!(fake.cancels(), 0);
}

#[actix_rt::test]
async fn client_retries_412_once() {
    init();
    let (fake, base) = start_fake().await;
    let mut t = client_tx(&format!("{base}/senders/gw/transactions")).await;
    fake.state.lock().unwrap().knobs.patch_412_once = true;
    t.update(&Update {
        rcpt_to: vec![Mailbox::new("carol@unrouted.example")],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = t
        .wait_rcpt(1, Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(r.code, 550);
    let patches: Vec<(String, Option<Value>)> = fake
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Patch { if_match, json, .. } => Some((if_match, json)),
            _ => None,
        })
        .collect();
    assert_eq!(patches.len(), 3, "{patches:?}");
    assert_eq!(patches[1].1, patches[2].1, "same PATCH retried");
    assert_ne!(patches[1].0, patches[2].0, "with the re-read etag");
    t.cancel().await;
    assert_eq!(fake.cancels(), 1);
}

#[actix_rt::test]
async fn client_follows_redirects() {
    init();
    let (fake, base) = start_fake().await;
    // Every route under /r answers 308 to the same path without it.
    let mut t = client_tx(&format!("{base}/r/senders/gw/transactions")).await;
    // A stream of uneven pieces becomes 8-byte PUTs (redirected too).
    let pieces = ["hel", "lo, world", "!\r\n", "hi\r\n"]
        .map(|p: &'static str| Bytes::from_static(p.as_bytes()));
    t.put_body(futures_util::stream::iter(pieces))
        .await
        .unwrap();
    let puts: Vec<String> = fake
        .puts()
        .into_iter()
        .map(|p| p.0.or(p.1).unwrap())
        .collect();
    assert_eq!(puts, vec!["bytes 0-7/*", "bytes 8-15/*", "bytes 16-18/19"]);
    let d = t
        .wait_data(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.code, 250);
    assert_eq!(fake.body(), b"hello, world!\r\nhi\r\n");
    assert_eq!(fake.creates().len(), 1);
}

#[actix_rt::test]
async fn client_maps_bad_json_to_450() {
    init();
    let (fake, base) = start_fake().await;
    let http = HttpClient::new(&TlsVerify::Disabled).unwrap();
    fake.state.lock().unwrap().knobs.bad_get_json = true;
    let mut t = RestTransaction::create(
        http,
        settings(),
        &format!("{base}/senders/gw/transactions"),
        &envelope(),
        None,
    )
    .await
    .unwrap();
    let e = t
        .wait_mail(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Create {
                what: "GET err",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.response(),
        Response::new(450, "RestEndpoint._start_upstream_tx GET err")
    );
    // Router down: the create itself.
    let http = HttpClient::new(&TlsVerify::Disabled).unwrap();
    let e = RestTransaction::create(http, settings(), "http://127.0.0.1:9/x", &envelope(), None)
        .await
        .err()
        .unwrap();
    assert_eq!(
        e.response(),
        Response::new(450, "RestEndpoint._start_upstream_tx http exception")
    );
}

#[actix_rt::test]
async fn client_waits_through_304s() {
    init();
    let (fake, base) = start_fake().await;
    fake.state.lock().unwrap().knobs.mail_delay = Some(Duration::from_millis(2500));
    let http = HttpClient::new(&TlsVerify::Disabled).unwrap();
    let mut s = settings();
    s.refresh_interval = Some(Duration::from_secs(1));
    let mut t = RestTransaction::create(
        http,
        s,
        &format!("{base}/senders/gw/transactions"),
        &envelope(),
        None,
    )
    .await
    .unwrap();
    let r = t
        .wait_mail(Instant::now() + Duration::from_secs(6))
        .await
        .unwrap();
    assert_eq!(r.code, 250);
    // Heartbeats went out while waiting.
    assert!(fake.heartbeats() >= 1);
}
