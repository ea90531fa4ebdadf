//! A Koukan REST receiver for tests (`rest-api.md` §11.2): a real actix-web server on its own
//! thread and actix system, so it serves in-process routers and router processes alike.
//!
//! Answers are chosen by the recipient's local part:
//!
//! | local part | answer |
//! |---|---|
//! | `mail4…` / `mail5…` | MAIL 450 / 550 (the recipient then gets no answer of its own) |
//! | `rcpt4…` / `rcpt5…` | RCPT 450 / 550 |
//! | `data4…` / `data5…` | DATA 450 / 550 |
//! | `slow<ms>…` | RCPT 250 after `<ms>` milliseconds (default 2000) |
//! | `hang…` | RCPT never answered |
//! | `hangdata…` | DATA never answered |
//! | `hold…` | DATA 250 once [`Receiver::release`] was called (held until then) |
//! | anything else | 250 |
//!
//! Everything received is recorded: envelopes, bodies byte-exact, heartbeats, cancels.
//!
//! `POST /hook` is an `http_hook` endpoint: it records the JSON and answers by recipient:
//! `hookno…` → RCPT 550, `hookslow…` → answers after 3 s, anything else → `{}`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use koukan::range::{ContentRange, HeldRange};
use koukan::rest::{BlobStatus, BodyView, CreateRequest, parse_update, render_read};
use koukan::{Mailbox, Response, Sender, Transaction};
use tokio::sync::watch;

/// What the receiver saw of one transaction.
#[derive(Clone, Debug, Default)]
pub struct Received {
    pub id: String,
    /// `sender` name from the create's path, and the tag from its JSON.
    pub sender_path: String,
    pub sender: Option<Sender>,
    pub mail_from: Option<String>,
    pub rcpt_to: Vec<String>,
    pub remote_host: Option<koukan::HostPort>,
    pub body: Vec<u8>,
    pub body_finalized: bool,
    pub cancelled: bool,
    /// Empty PATCHes.
    pub heartbeats: usize,
    /// PATCHes with an update.
    pub updates: usize,
    pub mail_response: Option<Response>,
    pub rcpt_response: Vec<Option<Response>>,
    pub data_response: Option<Response>,
}

impl Received {
    /// The recipient's local part is `prefix…`.
    pub fn to(&self, local: &str) -> bool {
        self.rcpt_to.iter().any(|r| r.starts_with(local))
    }

    /// A bounce: from the null reverse path to the tests' sender, `alice@example.com`.
    pub fn is_dsn(&self) -> bool {
        self.mail_from.as_deref() == Some("") && self.rcpt_to == ["alice@example.com"]
    }
}

struct Tx {
    tx: Transaction,
    version: u64,
    total: Option<u64>,
    rec: Received,
    watch: watch::Sender<u64>,
}

struct Inner {
    base: String,
    txs: HashMap<String, Tx>,
    order: Vec<String>,
    next: u64,
    /// `hold…` data responses wait while this is true.
    hold: watch::Sender<bool>,
    /// Bumped on every change: what [`Receiver::wait`] follows.
    generation: watch::Sender<u64>,
    hooks: Vec<serde_json::Value>,
}

type Shared = Arc<Mutex<Inner>>;

fn local(m: &str) -> &str {
    m.split('@').next().unwrap_or(m)
}

/// The RCPT answer now, or `Some(delay)` for a late one, or `None` for never.
enum Rcpt {
    Now(Response),
    Later(Duration),
    Never,
}

fn rcpt_rule(rcpt: &str) -> Rcpt {
    let l = local(rcpt);
    if l.starts_with("rcpt4") {
        Rcpt::Now(Response::new(450, "4.2.1 rcpt4 says try later"))
    } else if l.starts_with("rcpt5") {
        Rcpt::Now(Response::new(550, "5.1.1 rcpt5 says no such user"))
    } else if l.starts_with("hangdata") {
        Rcpt::Now(Response::new(250, "rcpt ok"))
    } else if l.starts_with("hang") {
        Rcpt::Never
    } else if let Some(rest) = l.strip_prefix("slow") {
        let ms: String = rest.chars().take_while(char::is_ascii_digit).collect();
        Rcpt::Later(Duration::from_millis(ms.parse().unwrap_or(2000)))
    } else {
        Rcpt::Now(Response::new(250, "rcpt ok"))
    }
}

fn mail_rule(rcpts: &[Mailbox]) -> Response {
    for r in rcpts {
        let l = local(&r.mailbox);
        if l.starts_with("mail4") {
            return Response::new(451, "4.3.0 mail4 says try later");
        }
        if l.starts_with("mail5") {
            return Response::new(553, "5.7.1 mail5 says no");
        }
    }
    Response::new(250, "mail ok")
}

impl Inner {
    fn bump(&mut self, id: &str) {
        if let Some(t) = self.txs.get_mut(id) {
            t.version += 1;
            t.rec.mail_response = t.tx.mail_response.clone();
            t.rec.rcpt_response = t.tx.rcpt_response.clone();
            t.rec.data_response = t.tx.data_response.clone();
            t.watch.send_replace(t.version);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    fn view(&self, id: &str) -> Option<HttpResponse> {
        let t = self.txs.get(id)?;
        let body = BodyView {
            blob_status: Some(BlobStatus {
                uri: format!("{}/transactions/{id}/body", self.base),
                finalized: t.rec.body_finalized,
            }),
            message_builder: None,
        };
        Some(
            HttpResponse::build(StatusCode::OK)
                .insert_header(("etag", t.version.to_string()))
                .content_type("application/json")
                .body(render_read(&t.tx, Some(&body))),
        )
    }
}

/// Gives recipient `i` of `id` its answer per its rule (now, later, never).
fn answer_rcpt(shared: &Shared, g: &mut Inner, id: &str, i: usize) {
    let Some(t) = g.txs.get_mut(id) else { return };
    if t.tx.mail_response.as_ref().is_some_and(Response::err) {
        return;
    }
    if t.tx.rcpt_response.len() <= i {
        t.tx.rcpt_response.resize(i + 1, None);
    }
    match rcpt_rule(&t.tx.rcpt_to[i].mailbox) {
        Rcpt::Now(r) => t.tx.rcpt_response[i] = Some(r),
        Rcpt::Never => {}
        Rcpt::Later(d) => {
            let shared = shared.clone();
            let id = id.to_string();
            actix_rt::spawn(async move {
                actix_rt::time::sleep(d).await;
                let mut g = shared.lock().unwrap();
                if let Some(t) = g.txs.get_mut(&id) {
                    t.tx.rcpt_response[i] = Some(Response::new(250, "rcpt ok (late)"));
                    g.bump(&id);
                }
            });
        }
    }
}

/// The body is complete: answer DATA per the recipients' rules.
fn answer_data(shared: &Shared, g: &mut Inner, id: &str) {
    let Some(t) = g.txs.get_mut(id) else { return };
    let accepted: Vec<String> =
        t.tx.rcpt_to
            .iter()
            .zip(t.tx.rcpt_response.iter())
            .filter(|(_, r)| r.as_ref().is_some_and(Response::ok))
            .map(|(m, _)| local(&m.mailbox).to_string())
            .collect();
    if accepted.iter().any(|l| l.starts_with("hangdata")) {
        return;
    }
    let data = if accepted.iter().any(|l| l.starts_with("data5")) {
        Response::new(554, "5.6.0 data5 says no")
    } else if accepted.iter().any(|l| l.starts_with("data4")) {
        Response::new(452, "4.3.1 data4 says try later")
    } else {
        Response::new(250, "data ok")
    };
    if accepted.iter().any(|l| l.starts_with("hold")) {
        let mut gate = g.hold.subscribe();
        let shared = shared.clone();
        let id = id.to_string();
        actix_rt::spawn(async move {
            let _ = gate.wait_for(|held| !held).await;
            let mut g = shared.lock().unwrap();
            if let Some(t) = g.txs.get_mut(&id) {
                t.tx.data_response = Some(data);
                g.bump(&id);
            }
        });
        return;
    }
    t.tx.data_response = Some(data);
}

async fn create(
    shared: web::Data<Shared>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let req = match CreateRequest::parse(&body) {
        Ok(r) => r,
        Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
    };
    let mut g = shared.lock().unwrap();
    g.next += 1;
    let id = format!("rx{}", g.next);
    let mut tx = Transaction {
        remote_host: req.tx.remote_host.clone(),
        local_host: req.tx.local_host.clone(),
        mail_from: req.tx.mail_from.clone(),
        rcpt_to: req.tx.rcpt_to.clone(),
        ..Default::default()
    };
    if tx.mail_from.is_some() {
        tx.mail_response = Some(mail_rule(&tx.rcpt_to));
    }
    let rec = Received {
        id: id.clone(),
        sender_path: path.into_inner(),
        sender: req
            .tx
            .sender
            .clone()
            .or_else(|| req.tag.clone().map(|t| Sender::new(String::new(), Some(t)))),
        mail_from: tx.mail_from.as_ref().map(|m| m.mailbox.clone()),
        rcpt_to: tx.rcpt_to.iter().map(|m| m.mailbox.clone()).collect(),
        remote_host: tx.remote_host.clone(),
        ..Default::default()
    };
    let n = tx.rcpt_to.len();
    g.txs.insert(
        id.clone(),
        Tx {
            tx,
            version: 1,
            total: None,
            rec,
            watch: watch::channel(1).0,
        },
    );
    g.order.push(id.clone());
    for i in 0..n {
        answer_rcpt(shared.get_ref(), &mut g, &id, i);
    }
    g.bump(&id);
    let location = format!("{}/transactions/{id}", g.base);
    let mut resp = g.view(&id).expect("just inserted");
    *resp.status_mut() = StatusCode::CREATED;
    resp.headers_mut()
        .insert(actix_web::http::header::LOCATION, location.parse().unwrap());
    resp
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn get(shared: web::Data<Shared>, path: web::Path<String>, req: HttpRequest) -> HttpResponse {
    let id = path.into_inner();
    let etag = header(&req, "if-none-match").map(|e| e.trim_matches('"').to_string());
    let wait: Duration = header(&req, "request-timeout")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(5), Duration::from_secs);
    let mut rx = {
        let g = shared.lock().unwrap();
        let Some(t) = g.txs.get(&id) else {
            return HttpResponse::NotFound().finish();
        };
        match &etag {
            Some(e) if *e == t.version.to_string() => t.watch.subscribe(),
            _ => return g.view(&id).unwrap(),
        }
    };
    let etag = etag.unwrap();
    let changed = tokio::time::timeout(wait, rx.wait_for(|v| v.to_string() != etag)).await;
    if matches!(changed, Ok(Ok(_))) {
        return shared.lock().unwrap().view(&id).unwrap();
    }
    HttpResponse::NotModified()
        .insert_header(("etag", etag))
        .finish()
}

async fn patch(
    shared: web::Data<Shared>,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let id = path.into_inner();
    let mut g = shared.lock().unwrap();
    if !g.txs.contains_key(&id) {
        return HttpResponse::NotFound().finish();
    }
    if body.is_empty() {
        g.txs.get_mut(&id).unwrap().rec.heartbeats += 1;
    } else {
        let update = match parse_update(&body) {
            Ok(u) => u,
            Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
        };
        let t = g.txs.get_mut(&id).unwrap();
        t.rec.updates += 1;
        if let Some(m) = &update.mail_from
            && t.tx.mail_from.is_none()
        {
            t.tx.mail_from = Some(m.clone());
            t.rec.mail_from = Some(m.mailbox.clone());
            t.tx.mail_response = Some(mail_rule(&update.rcpt_to));
        }
        let from = t.tx.rcpt_to.len();
        for m in &update.rcpt_to {
            t.tx.rcpt_to.push(m.clone());
            t.rec.rcpt_to.push(m.mailbox.clone());
        }
        let to = t.tx.rcpt_to.len();
        for i in from..to {
            answer_rcpt(shared.get_ref(), &mut g, &id, i);
        }
    }
    g.bump(&id);
    g.view(&id).unwrap()
}

async fn put_body(
    shared: web::Data<Shared>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let id = path.into_inner();
    let mut g = shared.lock().unwrap();
    let Some(t) = g.txs.get_mut(&id) else {
        return HttpResponse::NotFound().finish();
    };
    let held = t.rec.body.len() as u64;
    let (offset, total) = if let Some(f) = header(&req, "x-finalize-blob-length") {
        let n: u64 = f.trim().parse().unwrap_or(0);
        (n, Some(n))
    } else if let Some(r) = header(&req, "content-range") {
        match ContentRange::parse(r) {
            Ok(r) => (r.first, r.total),
            Err(_) => return HttpResponse::BadRequest().body("bad content-range"),
        }
    } else {
        (0, Some(body.len() as u64))
    };
    let range = |t: &Tx| {
        HeldRange {
            length: t.rec.body.len() as u64,
            total: t.total,
        }
        .header()
    };
    if offset > held || (t.total.is_some() && total.is_some() && t.total != total) {
        return HttpResponse::RangeNotSatisfiable()
            .insert_header(("content-range", range(t)))
            .finish();
    }
    let skip = (held - offset) as usize;
    if skip < body.len() {
        t.rec.body.extend_from_slice(&body[skip..]);
    }
    if total.is_some() {
        t.total = total;
    }
    let finalized = t.total == Some(t.rec.body.len() as u64);
    let newly = finalized && !t.rec.body_finalized;
    t.rec.body_finalized = finalized;
    let content_range = range(t);
    if newly {
        answer_data(shared.get_ref(), &mut g, &id);
        g.bump(&id);
    } else {
        g.generation.send_modify(|g| *g += 1);
    }
    HttpResponse::Ok()
        .insert_header(("content-range", content_range))
        .content_type("application/json")
        .body("{}")
}

async fn cancel(shared: web::Data<Shared>, path: web::Path<String>) -> HttpResponse {
    let id = path.into_inner();
    let mut g = shared.lock().unwrap();
    let Some(t) = g.txs.get_mut(&id) else {
        return HttpResponse::NotFound().finish();
    };
    t.rec.cancelled = true;
    t.tx.cancelled = true;
    g.bump(&id);
    HttpResponse::Ok().finish()
}

async fn hook(shared: web::Data<Shared>, body: web::Json<serde_json::Value>) -> HttpResponse {
    let v = body.into_inner();
    let rcpts: Vec<String> = v["rcpt_to"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["m"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    {
        let mut g = shared.lock().unwrap();
        g.hooks.push(v);
        g.generation.send_modify(|g| *g += 1);
    }
    if rcpts.iter().any(|r| local(r).starts_with("hookslow")) {
        actix_rt::time::sleep(Duration::from_secs(3)).await;
    }
    let answers: Vec<serde_json::Value> = rcpts
        .iter()
        .map(|r| match local(r) {
            l if l.starts_with("hookno") => {
                serde_json::json!({"code": 550, "message": "5.7.1 the hook says no"})
            }
            _ => serde_json::Value::Null,
        })
        .collect();
    HttpResponse::Ok().json(serde_json::json!({"rcpt_response": answers}))
}

/// A running receiver; stopped when dropped.
pub struct Receiver {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    shared: Shared,
    system: actix_rt::System,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts serving on a free port, on a thread of its own.
    pub fn start() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shared: Shared = Arc::new(Mutex::new(Inner {
            base: base.clone(),
            txs: HashMap::new(),
            order: Vec::new(),
            next: 0,
            hold: watch::channel(true).0,
            generation: watch::channel(0).0,
            hooks: Vec::new(),
        }));
        let (started, ready) = std::sync::mpsc::channel();
        let data = web::Data::new(shared.clone());
        let thread = std::thread::spawn(move || {
            let sys = actix_rt::System::new();
            sys.block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(data.clone())
                        .app_data(web::PayloadConfig::new(64 << 20))
                        .route("/senders/{sender}/transactions", web::post().to(create))
                        .route("/transactions/{id}", web::get().to(get))
                        .route("/transactions/{id}", web::patch().to(patch))
                        .route("/transactions/{id}/body", web::put().to(put_body))
                        .route("/transactions/{id}/cancel", web::post().to(cancel))
                        .route("/hook", web::post().to(hook))
                })
                .workers(2)
                .shutdown_timeout(1)
                .listen(listener)
                .unwrap()
                .run();
                started.send(actix_rt::System::current()).unwrap();
                let _ = server.await;
            });
        });
        let system = ready.recv().unwrap();
        Receiver {
            base,
            shared,
            system,
            thread: Some(thread),
        }
    }

    /// The create URL for `static_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("{}/senders/router/transactions", self.base)
    }

    /// Every transaction so far, in creation order.
    pub fn transactions(&self) -> Vec<Received> {
        let g = self.shared.lock().unwrap();
        g.order.iter().map(|id| g.txs[id].rec.clone()).collect()
    }

    /// Transactions to a recipient whose local part starts with `local` (bounces excluded).
    pub fn to(&self, local: &str) -> Vec<Received> {
        self.transactions()
            .into_iter()
            .filter(|t| !t.is_dsn() && t.to(local))
            .collect()
    }

    /// Bounces received.
    pub fn dsns(&self) -> Vec<Received> {
        self.transactions()
            .into_iter()
            .filter(Received::is_dsn)
            .collect()
    }

    /// The JSON every `/hook` call carried.
    pub fn hooks(&self) -> Vec<serde_json::Value> {
        self.shared.lock().unwrap().hooks.clone()
    }

    /// Lets held (`hold…`) data responses go.
    pub fn release(&self) {
        self.shared.lock().unwrap().hold.send_replace(false);
    }

    /// Waits until `done` holds for what was received; panics after `limit` (a hang
    /// detector, not a timing assertion).
    pub async fn wait(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let mut rx = self.shared.lock().unwrap().generation.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let txs = self.transactions();
            if done(&txs) {
                return txs;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!("receiver: gave up waiting for {what}; got {txs:#?}");
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // The server thread ends with its system; nothing waits for it.
        self.system.stop();
        drop(self.thread.take());
    }
}
