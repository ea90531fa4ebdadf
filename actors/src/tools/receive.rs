//! `koukan receive`: a REST receiver application (the example receiver of `tools.md` §5,
//! contract `rest-api.md` §11.2–§11.4) that writes each message to a folder.
//!
//! It implements every receiver route: create, long-polled GET, PATCH (heartbeats,
//! `filter_output`, more recipients), the message-builder POST of `receive_parsing`
//! routes, blob and body PUTs with `content-range` / `x-finalize-blob-length` (always
//! answered with `content-range`, §11.9), cancel. Every request is accepted with 250s.
//!
//! Files, when a folder is given: `<id>.msg` (raw message), `<id>.json` (the create JSON
//! with the merged `filter_output` and the responses), `<id>.msg.json` (parsed message),
//! `<id>.<blob id>` (each blob). Tests start it in-process with [`Receiver::start`] and
//! read [`Receiver::messages`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::http::header::HeaderMap;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use koukan::range::{ContentRange, HeldRange};
use serde_json::{Map, Value, json};
use thiserror::Error;
use tokio::sync::watch;

/// Largest request body (a whole message PUT without chunking).
const MAX_PAYLOAD: usize = 256 << 20;
/// Longest hanging GET.
const MAX_POLL: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ReceiverError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct ReceiverOptions {
    pub listen: SocketAddr,
    /// Write each message here.
    pub dir: Option<PathBuf>,
    /// Absolute base of the URLs handed out (`location`, upload URIs); default
    /// `http://<bound address>`.
    pub base_url: Option<String>,
}

impl ReceiverOptions {
    pub fn new(listen: SocketAddr) -> Self {
        ReceiverOptions {
            listen,
            dir: None,
            base_url: None,
        }
    }
}

/// One uploaded blob (or the raw body).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upload {
    pub data: Vec<u8>,
    pub finalized: bool,
}

/// One transaction as the receiver saw it.
#[derive(Clone, Debug, Default)]
pub struct ReceivedMessage {
    pub id: String,
    /// Sender name from the URL path.
    pub sender: String,
    /// The create JSON as posted; recipients added by PATCH are appended to `rcpt_to` and
    /// `filter_output` updates are merged into it.
    pub tx_json: Value,
    /// The raw message, once finalized.
    pub body: Option<Vec<u8>>,
    /// The parsed message POSTed by a `receive_parsing` route.
    pub message_json: Option<Value>,
    /// Blobs by id.
    pub blobs: BTreeMap<String, Upload>,
    pub cancelled: bool,
    /// Empty PATCHes received.
    pub heartbeats: usize,
    /// Paths of the files written.
    pub files: Vec<PathBuf>,
}

struct Tx {
    msg: ReceivedMessage,
    version: u64,
    rcpts: usize,
    raw: Upload,
    /// `create_id`s of the posted spec; `None` until the POST.
    blob_ids: Option<Vec<String>>,
    last_access: Instant,
}

struct State {
    base: String,
    dir: Option<PathBuf>,
    txs: Mutex<BTreeMap<String, Tx>>,
    /// Bumped on every change, for hanging GETs.
    changed: watch::Sender<u64>,
}

/// A running receiver.
pub struct Receiver {
    pub addr: SocketAddr,
    /// `http://addr`: append `/senders/<name>/transactions` for a router's
    /// `rest_endpoint`.
    pub base_url: String,
    state: Arc<State>,
    server: ServerHandle,
}

impl Receiver {
    /// Binds and serves on the current actix system.
    pub async fn start(opts: ReceiverOptions) -> Result<Receiver, ReceiverError> {
        let listen_err = |source| ReceiverError::Listen {
            addr: opts.listen,
            source,
        };
        if let Some(d) = &opts.dir {
            std::fs::create_dir_all(d).map_err(|source| ReceiverError::Dir {
                path: d.clone(),
                source,
            })?;
        }
        let listener = std::net::TcpListener::bind(opts.listen).map_err(listen_err)?;
        let addr = listener.local_addr().map_err(listen_err)?;
        let base = opts
            .base_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"))
            .trim_end_matches('/')
            .to_string();
        let state = Arc::new(State {
            base: base.clone(),
            dir: opts.dir.clone(),
            txs: Mutex::default(),
            changed: watch::channel(0).0,
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(MAX_PAYLOAD))
                .route("/senders/{sender}/transactions", web::post().to(create))
                .route("/transactions/{id}", web::get().to(get))
                .route("/transactions/{id}", web::patch().to(patch))
                .route(
                    "/transactions/{id}/message_builder",
                    web::post().to(message_builder),
                )
                .route("/transactions/{id}/body", web::put().to(put_body))
                .route("/transactions/{id}/blob/{blob}", web::put().to(put_blob))
                .route("/transactions/{id}/cancel", web::post().to(cancel))
        })
        .workers(2)
        .shutdown_timeout(1)
        .listen(listener)
        .map_err(listen_err)?
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Ok(Receiver {
            addr,
            base_url: base,
            state,
            server: handle,
        })
    }

    /// Every transaction so far, in id order.
    pub fn transactions(&self) -> Vec<ReceivedMessage> {
        let txs = self.state.txs.lock().unwrap();
        txs.values().map(|t| t.msg.clone()).collect()
    }

    /// Transactions whose raw message arrived.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.transactions()
            .into_iter()
            .filter(|m| m.body.is_some())
            .collect()
    }

    /// Waits until `n` messages arrived or the timeout passes; returns whether they did.
    pub async fn wait_messages(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.state.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if self.messages().len() >= n {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return self.messages().len() >= n;
            }
        }
    }

    /// Stops serving.
    pub async fn stop(&self) {
        self.server.stop(true).await;
    }
}

fn json_response(status: StatusCode, tx: &Tx, base: &str) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(("etag", tx.version.to_string()))
        .insert_header(("content-type", "application/json"))
        .body(serde_json::to_vec(&read_json(tx, base)).expect("read json serializes"))
}

fn error(status: StatusCode, text: &str) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(("content-type", "text/plain"))
        .body(text.to_string())
}

fn ok() -> Value {
    json!({"code": 250, "message": "ok"})
}

/// The read view of §11.3: placeholders for what was sent, 250s for everything.
fn read_json(tx: &Tx, base: &str) -> Value {
    let url = format!("{base}/transactions/{}", tx.msg.id);
    let create = tx.msg.tx_json.as_object();
    let mut m = Map::new();
    for key in ["remote_host", "local_host"] {
        if let Some(v) = create.and_then(|c| c.get(key)) {
            m.insert(key.into(), v.clone());
        }
    }
    if create.is_some_and(|c| c.contains_key("mail_from")) {
        m.insert("mail_from".into(), json!({}));
        m.insert("mail_response".into(), ok());
    }
    if tx.rcpts > 0 {
        m.insert("rcpt_to".into(), Value::Array(vec![json!({}); tx.rcpts]));
        m.insert("rcpt_response".into(), Value::Array(vec![ok(); tx.rcpts]));
    }
    if create.is_some_and(|c| c.contains_key("sender")) {
        m.insert("sender".into(), json!({}));
    }
    if tx.raw.finalized {
        m.insert("data_response".into(), ok());
    }
    if tx.msg.cancelled {
        m.insert("cancelled".into(), Value::Bool(true));
    }
    let mut body = Map::new();
    body.insert(
        "blob_status".into(),
        json!({"uri": format!("{url}/body"), "finalized": tx.raw.finalized}),
    );
    let mb = match &tx.blob_ids {
        None => json!({"uri": format!("{url}/message_builder")}),
        Some(ids) => {
            let status: Map<String, Value> = ids
                .iter()
                .map(|id| {
                    let done = tx.msg.blobs.get(id).is_some_and(|b| b.finalized);
                    (
                        id.clone(),
                        json!({"uri": format!("{url}/blob/{id}"), "finalized": done}),
                    )
                })
                .collect();
            json!({"blob_status": status})
        }
    };
    body.insert("message_builder".into(), mb);
    m.insert("body".into(), Value::Object(body));
    Value::Object(m)
}

fn is_json(h: &HeaderMap) -> bool {
    h.get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// A JSON object request body, or the status and text of the refusal.
fn parse_object(
    req: &HttpRequest,
    body: &[u8],
) -> Result<Map<String, Value>, (StatusCode, &'static str)> {
    if !is_json(req.headers()) {
        return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "bad content-type"));
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err((StatusCode::BAD_REQUEST, "bad json")),
    }
}

fn new_id() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::rng();
    (0..16)
        .map(|_| CHARS[r.random_range(0..CHARS.len())] as char)
        .collect()
}

impl State {
    fn bump(&self, tx: &mut Tx) {
        tx.version += 1;
        tx.last_access = Instant::now();
        self.changed.send_modify(|v| *v += 1);
    }

    fn write_file(&self, tx: &mut Tx, suffix: &str, data: &[u8]) {
        let Some(dir) = &self.dir else {
            return;
        };
        let path = dir.join(format!("{}.{suffix}", tx.msg.id));
        match std::fs::write(&path, data) {
            Ok(()) => {
                if !tx.msg.files.contains(&path) {
                    tx.msg.files.push(path);
                }
            }
            Err(e) => tracing::warn!("writing {}: {e}", path.display()),
        }
    }

    /// `<id>.json`: the envelope with the responses, written when the message is complete.
    fn write_tx_json(&self, tx: &mut Tx) {
        let mut j = tx.msg.tx_json.clone();
        if let Value::Object(m) = &mut j {
            m.insert("mail_response".into(), ok());
            m.insert("rcpt_response".into(), Value::Array(vec![ok(); tx.rcpts]));
            m.insert("data_response".into(), ok());
        }
        let text = serde_json::to_vec_pretty(&j).expect("json serializes");
        self.write_file(tx, "json", &text);
    }
}

async fn create(
    state: web::Data<State>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let m = match parse_object(&req, &body) {
        Ok(m) => m,
        Err((status, text)) => return error(status, text),
    };
    let rcpts = m
        .get("rcpt_to")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let id = new_id();
    let tx = Tx {
        msg: ReceivedMessage {
            id: id.clone(),
            sender: path.into_inner(),
            tx_json: Value::Object(m),
            ..Default::default()
        },
        version: 1,
        rcpts,
        raw: Upload::default(),
        blob_ids: None,
        last_access: Instant::now(),
    };
    let resp = json_response(StatusCode::CREATED, &tx, &state.base);
    let location = format!("{}/transactions/{id}", state.base);
    tracing::info!(id, "receiver: new transaction");
    state.txs.lock().unwrap().insert(id, tx);
    state.changed.send_modify(|v| *v += 1);
    let mut resp = resp;
    resp.headers_mut().insert(
        actix_web::http::header::LOCATION,
        location.parse().expect("location is a header value"),
    );
    resp
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn get(state: web::Data<State>, req: HttpRequest, path: web::Path<String>) -> HttpResponse {
    let id = path.into_inner();
    let wait = header(&req, "request-timeout")
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, |s| Duration::from_secs(s).min(MAX_POLL));
    let etag = header(&req, "if-none-match").map(|e| e.trim().trim_matches('"').to_string());
    let deadline = Instant::now() + wait;
    let mut rx = state.changed.subscribe();
    loop {
        {
            let mut txs = state.txs.lock().unwrap();
            let Some(tx) = txs.get_mut(&id) else {
                return error(StatusCode::NOT_FOUND, "unknown transaction");
            };
            tx.last_access = Instant::now();
            let current = tx.version.to_string();
            let unchanged = etag.as_deref() == Some(current.as_str());
            if !unchanged {
                return json_response(StatusCode::OK, tx, &state.base);
            }
            if Instant::now() >= deadline {
                return HttpResponse::NotModified()
                    .insert_header(("etag", current))
                    .finish();
            }
            rx.borrow_and_update();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

async fn patch(
    state: web::Data<State>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let id = path.into_inner();
    let update = if req.headers().get("content-type").is_none() {
        if !body.is_empty() {
            return error(StatusCode::BAD_REQUEST, "body without content-type");
        }
        None
    } else {
        match parse_object(&req, &body) {
            Ok(m) => Some(m),
            Err((status, text)) => return error(status, text),
        }
    };
    let mut txs = state.txs.lock().unwrap();
    let Some(tx) = txs.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "unknown transaction");
    };
    match update {
        None => tx.msg.heartbeats += 1,
        Some(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("filter_output", Value::Object(fo)) => {
                        if let Value::Object(create) = &mut tx.msg.tx_json {
                            let merged = create.entry("filter_output").or_insert_with(|| json!({}));
                            if let Value::Object(merged) = merged {
                                merged.extend(fo);
                            }
                        }
                    }
                    ("rcpt_to", Value::Array(more)) => {
                        tx.rcpts += more.len();
                        if let Value::Object(create) = &mut tx.msg.tx_json
                            && let Value::Array(list) =
                                create.entry("rcpt_to").or_insert_with(|| json!([]))
                        {
                            list.extend(more);
                        }
                    }
                    ("rcpt_to_list_offset", _) => {}
                    ("mail_from", v) => {
                        if let Value::Object(create) = &mut tx.msg.tx_json {
                            create.insert("mail_from".into(), v);
                        }
                    }
                    _ => return error(StatusCode::BAD_REQUEST, "unsupported update"),
                }
            }
        }
    }
    state.bump(tx);
    json_response(StatusCode::OK, tx, &state.base)
}

/// Collects the `create_id`s of every part of a spec, wherever they are nested.
fn create_ids(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(content)) = m.get("content")
                && let Some(Value::String(id)) = content.get("create_id")
                && !out.contains(id)
            {
                out.push(id.clone());
            }
            for (k, child) in m {
                if k != "content" {
                    create_ids(child, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| create_ids(c, out)),
        _ => {}
    }
}

async fn message_builder(
    state: web::Data<State>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let id = path.into_inner();
    let spec = match parse_object(&req, &body) {
        Ok(m) => Value::Object(m),
        Err((status, text)) => return error(status, text),
    };
    let mut txs = state.txs.lock().unwrap();
    let Some(tx) = txs.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "unknown transaction");
    };
    if tx.msg.cancelled {
        return error(StatusCode::BAD_REQUEST, "transaction cancelled");
    }
    if tx.blob_ids.is_some() {
        return error(StatusCode::BAD_REQUEST, "message builder already received");
    }
    let mut ids = Vec::new();
    create_ids(&spec, &mut ids);
    let text = serde_json::to_vec_pretty(&spec).expect("json serializes");
    state.write_file(tx, "msg.json", &text);
    tx.msg.message_json = Some(spec);
    tx.blob_ids = Some(ids);
    state.bump(tx);
    json_response(StatusCode::OK, tx, &state.base)
}

/// Applies one upload request to `blob` (`rest-api.md` §3.4): a whole blob, a
/// `content-range` chunk, or an `x-finalize-blob-length` finalization. Returns the status
/// and whether the blob changed.
fn upload(req: &HttpRequest, blob: &mut Upload, data: &[u8]) -> Result<(StatusCode, bool), String> {
    let len = blob.data.len() as u64;
    if let Some(f) = header(req, "x-finalize-blob-length") {
        let n: u64 = f.trim().parse().map_err(|_| "bad x-finalize-blob-length")?;
        if !data.is_empty() {
            return Err("x-finalize-blob-length with a body".into());
        }
        if blob.finalized {
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, false));
        }
        if n != len {
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, false));
        }
        blob.finalized = true;
        return Ok((StatusCode::OK, true));
    }
    let Some(r) = header(req, "content-range") else {
        // The whole blob in one request.
        if blob.finalized {
            let same = blob.data == data;
            let status = if same {
                StatusCode::OK
            } else {
                StatusCode::RANGE_NOT_SATISFIABLE
            };
            return Ok((status, false));
        }
        blob.data = data.to_vec();
        blob.finalized = true;
        return Ok((StatusCode::OK, true));
    };
    let r = ContentRange::parse(r).map_err(|_| format!("bad content-range {r:?}"))?;
    if r.len() != data.len() as u64 {
        return Err("content-range does not match the body length".into());
    }
    if blob.finalized || r.first > len {
        // A finished blob or a gap: say what we hold.
        return Ok((StatusCode::RANGE_NOT_SATISFIABLE, false));
    }
    if r.last < len {
        // Nothing new; it may still finalize what we hold.
        if r.last + 1 == len && r.total == Some(len) {
            blob.finalized = true;
            return Ok((StatusCode::OK, true));
        }
        return Ok((StatusCode::RANGE_NOT_SATISFIABLE, false));
    }
    // Overlap with what we hold: keep ours, append the rest.
    let skip = (len - r.first) as usize;
    blob.data.extend_from_slice(&data[skip..]);
    if r.total == Some(r.last + 1) {
        blob.finalized = true;
    }
    Ok((StatusCode::OK, true))
}

fn held(blob: &Upload) -> String {
    let length = blob.data.len() as u64;
    HeldRange {
        length,
        total: blob.finalized.then_some(length),
    }
    .header()
}

enum Target {
    Body,
    Blob(String),
}

fn put(state: &State, req: &HttpRequest, id: &str, target: Target, data: &[u8]) -> HttpResponse {
    let mut txs = state.txs.lock().unwrap();
    let Some(tx) = txs.get_mut(id) else {
        return error(StatusCode::NOT_FOUND, "unknown transaction");
    };
    if tx.msg.cancelled {
        return error(StatusCode::BAD_REQUEST, "transaction cancelled");
    }
    let blob = match &target {
        Target::Body => &mut tx.raw,
        Target::Blob(b) => {
            if !tx.blob_ids.as_ref().is_some_and(|ids| ids.contains(b)) {
                return error(StatusCode::NOT_FOUND, "blob not found");
            }
            tx.msg.blobs.entry(b.clone()).or_default()
        }
    };
    let (status, changed) = match upload(req, blob, data) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let range = held(blob);
    let done = blob.finalized;
    if changed && done {
        let data = blob.data.clone();
        match &target {
            Target::Body => {
                state.write_file(tx, "msg", &data);
                tx.msg.body = Some(data);
                state.write_tx_json(tx);
                tracing::info!(id, "receiver: message received");
            }
            Target::Blob(b) => state.write_file(tx, b, &data),
        }
    }
    if changed {
        state.bump(tx);
    }
    HttpResponse::build(status)
        .insert_header(("content-range", range))
        .finish()
}

async fn put_body(
    state: web::Data<State>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    put(&state, &req, &path.into_inner(), Target::Body, &body)
}

async fn put_blob(
    state: web::Data<State>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let (id, blob) = path.into_inner();
    put(&state, &req, &id, Target::Blob(blob), &body)
}

async fn cancel(state: web::Data<State>, path: web::Path<String>) -> HttpResponse {
    let mut txs = state.txs.lock().unwrap();
    let Some(tx) = txs.get_mut(&path.into_inner()) else {
        return error(StatusCode::NOT_FOUND, "unknown transaction");
    };
    if !tx.msg.cancelled && !tx.raw.finalized {
        tx.msg.cancelled = true;
        state.bump(tx);
    }
    HttpResponse::Ok().finish()
}
