//! One remote transaction, driven by deltas (`rest-api.md` §11.8, §11.9, §10).

use std::time::{Duration, Instant};

use awc::http::StatusCode;
use awc::http::header::{self, HeaderMap};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use koukan::range::{ContentRange, HeldRange};
use koukan::rest::{ReadTx, render_create, render_update};
use koukan::transaction::Update;
use koukan::{HostPort, Response, Transaction};
use serde_json::{Map, Value};

use super::{ClientError, ClientSettings, HttpClient};

/// Largest JSON answer accepted.
const MAX_JSON: usize = 1 << 20;
/// The original's default timeout for the fire-and-forget cancel.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// Anti-spin: an unchanged poll answered faster than this waits out the rest of it.
const MIN_POLL: Duration = Duration::from_secs(1);
/// Consecutive PUT answers without progress before giving up.
const MAX_PUT_STALLS: u32 = 3;

/// Which step a wait belongs to; it chooses the §10.7 text of a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// After the create: waiting for `mail_response`.
    Create,
    /// After a PATCH: waiting for recipient responses.
    Update,
    /// After the body: waiting for `data_response`.
    Data,
}

impl Phase {
    fn timeout(self) -> ClientError {
        match self {
            Phase::Create => ClientError::Create {
                what: "GET mail_response timeout",
                detail: "deadline passed".into(),
            },
            Phase::Update => ClientError::Update {
                what: "upstream timeout".into(),
                detail: "deadline passed".into(),
            },
            Phase::Data => ClientError::Timeout,
        }
    }

    fn get_err(self, detail: String) -> ClientError {
        match self {
            Phase::Create => ClientError::Create {
                what: "GET err",
                detail,
            },
            Phase::Update => ClientError::Update {
                what: "bad resp GET after POST/PUT".into(),
                detail,
            },
            Phase::Data => ClientError::Get { detail },
        }
    }
}

/// A handle on one transaction of a Koukan REST server.
pub struct RestTransaction {
    http: HttpClient,
    settings: ClientSettings,
    /// The transaction's URL (`location` of the create).
    url: String,
    etag: String,
    /// Everything read so far, merged.
    read: ReadTx,
    sent_remote_host: Option<HostPort>,
    sent_local_host: Option<HostPort>,
    rcpt_sent: usize,
    body_url: String,
    /// Bytes of the body the server confirmed holding.
    body_length: u64,
    body_finalized: bool,
    /// Last request that bumped the remote version.
    last_bump: Instant,
    cancelled: bool,
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn strip_quotes(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix("W/").unwrap_or(s).trim_matches('"')
}

fn is_json(h: &HeaderMap) -> bool {
    header_str(h, "content-type").is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// `request-timeout` for a hanging GET that must be answered within `remaining`.
fn request_timeout(remaining: Duration) -> u64 {
    remaining.as_secs().saturating_sub(1)
}

/// `Prefer: wait` for a request answered within `remaining`.
fn prefer(remaining: Duration) -> (&'static str, String) {
    ("prefer", format!("wait={}", request_timeout(remaining)))
}

/// Joins a possibly relative `location` with the URL it answered.
fn resolve(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let origin_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|s| base[s..].find('/').map(|p| s + p))
        .unwrap_or(base.len());
    if location.starts_with('/') {
        format!("{}{location}", &base[..origin_end])
    } else {
        let dir = base
            .rfind('/')
            .filter(|&i| i >= origin_end)
            .unwrap_or(base.len());
        format!("{}/{location}", &base[..dir])
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn etag(&self) -> Option<String> {
        header_str(&self.headers, "etag").map(|e| strip_quotes(e).to_string())
    }

    fn read_json(&self) -> Result<ReadTx, String> {
        if !is_json(&self.headers) {
            return Err(format!(
                "content-type {:?}",
                header_str(&self.headers, "content-type")
            ));
        }
        ReadTx::parse(&self.body).map_err(|e| e.to_string())
    }
}

/// A transport failure: no answer at all.
struct SendError {
    timeout: bool,
    detail: String,
}

impl From<SendError> for String {
    fn from(e: SendError) -> String {
        e.detail
    }
}

async fn send(
    req: awc::ClientRequest,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<Answer, SendError> {
    let req = req.timeout(timeout);
    let resp = match body {
        Some(b) => req.send_body(b).await,
        None => req.send().await,
    }
    .map_err(|e| SendError {
        timeout: matches!(e, awc::error::SendRequestError::Timeout),
        detail: e.to_string(),
    })?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut resp = resp.timeout(timeout);
    // A broken body is worth one retry like a broken connection.
    let body = resp.body().limit(MAX_JSON).await.map_err(|e| SendError {
        timeout: false,
        detail: e.to_string(),
    })?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

impl RestTransaction {
    /// `POST url` with the envelope of `tx` (and `body`, the create's body member, if
    /// any). Does not wait for responses: call [`wait`](Self::wait) next.
    pub async fn create(
        http: HttpClient,
        settings: ClientSettings,
        url: &str,
        tx: &Transaction,
        body: Option<&Value>,
    ) -> Result<RestTransaction, ClientError> {
        Self::create_with(http, settings, url, tx, body, &Map::new()).await
    }

    /// [`create`](Self::create) with more top-level members in the POST (the router's
    /// `filter_output`, `rest-api.md` §11.6).
    pub async fn create_with(
        http: HttpClient,
        settings: ClientSettings,
        url: &str,
        tx: &Transaction,
        body: Option<&Value>,
        extra: &Map<String, Value>,
    ) -> Result<RestTransaction, ClientError> {
        let err = |what: &'static str, detail: String| ClientError::Create { what, detail };
        let mut json = render_create(tx, body);
        if !extra.is_empty() {
            let mut m: Map<String, Value> =
                serde_json::from_slice(&json).expect("render_create emits an object");
            m.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
            json = serde_json::to_vec(&m).expect("create serializes");
        }
        let json = Bytes::from(json);
        let mut req = http
            .awc
            .post(url)
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .insert_header((
                "request-timeout",
                request_timeout(settings.timeout).to_string(),
            ));
        if settings.prefer_wait {
            req = req.insert_header(prefer(settings.timeout));
        }
        let a = send(req, Some(json), settings.timeout)
            .await
            .map_err(|e| err("http exception", e.detail))?;
        if a.status != StatusCode::CREATED {
            return Err(err("http error ", format!("HTTP {}", a.status)));
        }
        let etag = a
            .etag()
            .ok_or_else(|| err("bad response no etag", "create without etag".into()))?;
        let location = header_str(&a.headers, "location")
            .ok_or_else(|| err("http error ", "create without location".into()))?;
        let url = resolve(url, location);
        let read = a.read_json().map_err(|d| err("bad resp json", d))?;
        let mut t = RestTransaction {
            body_url: format!("{url}/body"),
            http,
            settings,
            url,
            etag,
            read: ReadTx::default(),
            sent_remote_host: tx.remote_host.clone(),
            sent_local_host: tx.local_host.clone(),
            rcpt_sent: tx.rcpt_to.len(),
            body_length: 0,
            body_finalized: false,
            last_bump: Instant::now(),
            cancelled: false,
        };
        t.merge(read, false)
            .map_err(|d| err("bad upstream delta", d))?;
        Ok(t)
    }

    /// The transaction's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// Everything the server reported so far.
    pub fn state(&self) -> &ReadTx {
        &self.read
    }

    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// Recipients sent so far (the next PATCH's `rcpt_to_list_offset`).
    pub fn rcpt_sent(&self) -> usize {
        self.rcpt_sent
    }

    /// Body bytes the server confirmed.
    pub fn body_length(&self) -> u64 {
        self.body_length
    }

    pub fn body_finalized(&self) -> bool {
        self.body_finalized
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// When a request last bumped the remote version.
    pub fn last_bump(&self) -> Instant {
        self.last_bump
    }

    /// When the next heartbeat is due, if heartbeats are on.
    pub fn heartbeat_due(&self) -> Option<Instant> {
        self.settings.refresh_interval.map(|r| self.last_bump + r)
    }

    /// Folds a read view into what is known, enforcing that answers only grow
    /// (`rest-api.md` §11.2 rule 5). A PATCH answer's body member is not trusted.
    fn merge(&mut self, new: ReadTx, from_patch: bool) -> Result<(), String> {
        let old = &self.read;
        for (name, sent, got) in [
            ("remote_host", &self.sent_remote_host, &new.remote_host),
            ("local_host", &self.sent_local_host, &new.local_host),
        ] {
            if let (Some(s), Some(g)) = (sent, got)
                && s != g
            {
                return Err(format!("{name} changed"));
            }
        }
        if new.rcpt_to < self.rcpt_sent {
            return Err("list shrink placeholder rcpt_to".into());
        }
        // A new attempt starts over with no responses (README decision 2).
        let same_attempt = old.attempt_count.is_none() || old.attempt_count == new.attempt_count;
        if same_attempt {
            let kept = |o: &Option<Response>, n: &Option<Response>| o.is_none() || o == n;
            if !kept(&old.mail_response, &new.mail_response) {
                return Err("mail_response changed".into());
            }
            if !kept(&old.data_response, &new.data_response) {
                return Err("data_response changed".into());
            }
            for (i, o) in old.rcpt_response.iter().enumerate() {
                if !kept(o, new.rcpt_response.get(i).unwrap_or(&None)) {
                    return Err(format!("rcpt_response[{i}] changed"));
                }
            }
        }
        if old.final_attempt_reason.is_some()
            && new.final_attempt_reason.is_some()
            && old.final_attempt_reason != new.final_attempt_reason
        {
            return Err("final_attempt_reason changed".into());
        }
        let mut new = new;
        if from_patch {
            new.body = old.body.clone();
        } else if let Some(uri) = new
            .body
            .as_ref()
            .and_then(|b| b.blob_status.as_ref())
            .map(|s| s.uri.clone())
        {
            self.body_url = resolve(&self.url, &uri);
        }
        self.read = new;
        Ok(())
    }

    /// One GET; `hang` makes it a long poll answered within that time. Returns whether
    /// the etag changed.
    async fn get(&mut self, hang: Option<Duration>) -> Result<bool, String> {
        let timeout = hang.unwrap_or(self.settings.timeout);
        let mut tries = 0;
        let a = loop {
            let mut req = self.http.awc.get(&self.url);
            if let Some(h) = hang {
                req = req
                    .insert_header((header::IF_NONE_MATCH, self.etag.as_str()))
                    .insert_header(("request-timeout", request_timeout(h).to_string()));
            }
            match send(req, None, timeout).await {
                Ok(a) => break a,
                // The original's 304 closes the connection; a pooled connection may
                // therefore be dead on the next request. One retry covers it.
                Err(e) if tries == 0 && !e.timeout => tries += 1,
                Err(e) => return Err(e.detail),
            }
        };
        match a.status {
            StatusCode::OK => {
                let etag = a.etag().ok_or("200 without etag")?;
                let read = a.read_json()?;
                self.merge(read, false)?;
                let changed = etag != self.etag;
                self.etag = etag;
                Ok(changed)
            }
            StatusCode::NOT_MODIFIED => match a.etag() {
                Some(e) if e != self.etag => {
                    Err(format!("304 with etag {e}, expected {}", self.etag))
                }
                _ => Ok(false),
            },
            s => Err(format!("HTTP {s}")),
        }
    }

    /// Point read of the current state.
    pub async fn refresh(&mut self) -> Result<(), ClientError> {
        self.get(None)
            .await
            .map(|_| ())
            .map_err(|detail| ClientError::Get { detail })
    }

    /// Long-polls until `done` holds for the state, the deadline passes (→ the phase's
    /// timeout error) or a GET fails. Sends heartbeats when they are due.
    pub async fn wait(
        &mut self,
        phase: Phase,
        deadline: Instant,
        done: impl Fn(&ReadTx) -> bool,
    ) -> Result<(), ClientError> {
        loop {
            if done(&self.read) {
                return Ok(());
            }
            let now = Instant::now();
            if now + MIN_POLL > deadline {
                return Err(phase.timeout());
            }
            if self.heartbeat_due().is_some_and(|due| now >= due) {
                self.heartbeat().await?;
                continue;
            }
            let until = self.heartbeat_due().map_or(deadline, |d| d.min(deadline));
            let started = Instant::now();
            let changed = self
                .get(Some(until.saturating_duration_since(started).max(MIN_POLL)))
                .await
                .map_err(|d| phase.get_err(d))?;
            if !changed && started.elapsed() < MIN_POLL {
                actix_rt::time::sleep_until((started + MIN_POLL).min(deadline).into()).await;
            }
        }
    }

    /// Waits for `mail_response`.
    pub async fn wait_mail(&mut self, deadline: Instant) -> Result<Response, ClientError> {
        self.wait(Phase::Create, deadline, |r| r.mail_response.is_some())
            .await?;
        Ok(self.read.mail_response.clone().expect("waited for it"))
    }

    /// Waits for `mail_response` and, unless MAIL failed, the responses of the first `n`
    /// recipients (a create that carried them).
    pub async fn wait_mail_and_rcpts(
        &mut self,
        n: usize,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        self.wait(Phase::Create, deadline, |r| match &r.mail_response {
            None => false,
            Some(m) => {
                m.err()
                    || (r.rcpt_response.len() >= n
                        && r.rcpt_response[..n].iter().all(Option::is_some))
            }
        })
        .await
    }

    /// Waits for the response to recipient `i`; a failed MAIL answers for it.
    pub async fn wait_rcpt(
        &mut self,
        i: usize,
        deadline: Instant,
    ) -> Result<Response, ClientError> {
        let answered = |r: &ReadTx| {
            r.rcpt_response.get(i).is_some_and(Option::is_some)
                || r.mail_response.as_ref().is_some_and(Response::err)
        };
        self.wait(Phase::Update, deadline, answered).await?;
        Ok(match self.read.rcpt_response.get(i) {
            Some(Some(r)) => r.clone(),
            _ => Response::new(503, "5.5.1 failed precondition: MAIL"),
        })
    }

    /// Waits for `data_response`.
    pub async fn wait_data(&mut self, deadline: Instant) -> Result<Response, ClientError> {
        self.wait(Phase::Data, deadline, |r| r.data_response.is_some())
            .await?;
        Ok(self.read.data_response.clone().expect("waited for it"))
    }

    async fn patch(&mut self, body: Option<Bytes>) -> Result<Answer, SendError> {
        let mut req = self
            .http
            .awc
            .patch(&self.url)
            .insert_header((header::IF_MATCH, self.etag.as_str()))
            .insert_header((
                "request-timeout",
                request_timeout(self.settings.timeout).to_string(),
            ));
        if body.is_some() {
            req = req.insert_header((header::CONTENT_TYPE, "application/json"));
        }
        // A heartbeat is an empty body with no content type and content-length 0.
        send(req, Some(body.unwrap_or_default()), self.settings.timeout).await
    }

    /// Takes a PATCH answer: 200 with an etag; the JSON, when there is one, is merged.
    fn take_patch(&mut self, a: Answer, require_json: bool) -> Result<(), ClientError> {
        let err = |what: &str, detail: String| ClientError::Update {
            what: what.into(),
            detail,
        };
        let etag = a
            .etag()
            .ok_or_else(|| err("bad resp no etag", "PATCH answer without etag".into()))?;
        if require_json || !a.body.is_empty() {
            let read = a.read_json().map_err(|d| err("bad resp json", d))?;
            self.merge(read, true)
                .map_err(|d| err("bad resp json", d))?;
        }
        self.etag = etag;
        self.last_bump = Instant::now();
        Ok(())
    }

    /// Sends a PATCH; on 412 re-reads the transaction and, if `still_valid` holds for
    /// it, retries once (`rest-api.md` §10.3).
    async fn patch_with_retry(
        &mut self,
        body: Option<Bytes>,
        still_valid: impl Fn(&ReadTx) -> bool,
    ) -> Result<(), ClientError> {
        let err = |what: String, detail: String| ClientError::Update { what, detail };
        let mut retried = false;
        loop {
            let a = self
                .patch(body.clone())
                .await
                .map_err(|e| err("timeout".into(), e.detail))?;
            match a.status {
                StatusCode::OK => return self.take_patch(a, body.is_some()),
                StatusCode::PRECONDITION_FAILED if !retried => {
                    retried = true;
                    self.get(None)
                        .await
                        .map_err(|d| err("http err 412".into(), format!("re-read: {d}")))?;
                    if !still_valid(&self.read) {
                        return Err(err(
                            "http err 412".into(),
                            "transaction changed under us".into(),
                        ));
                    }
                }
                s => return Err(err(format!("http err {}", s.as_u16()), format!("HTTP {s}"))),
            }
        }
    }

    /// Adds to the envelope: `mail_from` (if not sent at create) and/or more recipients.
    /// The offset is this handle's count. Does not wait: see [`wait_rcpt`](Self::wait_rcpt).
    pub async fn update(&mut self, update: &Update) -> Result<(), ClientError> {
        if self.cancelled {
            return Err(ClientError::Cancelled);
        }
        if update.is_empty() {
            return self.heartbeat().await;
        }
        let offset = self.rcpt_sent;
        let mut u = update.clone();
        u.rcpt_to_list_offset = offset;
        let body = Bytes::from(render_update(&u));
        self.patch_with_retry(Some(body), |r| r.rcpt_to == offset)
            .await?;
        self.rcpt_sent += update.rcpt_to.len();
        Ok(())
    }

    /// PATCH `{"filter_output": …}`: the signals that changed since the create
    /// (`rest-api.md` §11.6); the receiver merges them by key.
    pub async fn update_filter_output(
        &mut self,
        filter_output: &Map<String, Value>,
    ) -> Result<(), ClientError> {
        if self.cancelled {
            return Err(ClientError::Cancelled);
        }
        let mut m = Map::new();
        m.insert("filter_output".into(), Value::Object(filter_output.clone()));
        let body = Bytes::from(serde_json::to_vec(&m).expect("update serializes"));
        self.patch_with_retry(Some(body), |_| true).await
    }

    /// `POST <body.message_builder.uri>` with the parsed message of a `receive_parsing`
    /// delivery (`rest-api.md` §11.4); the answer lists where each blob goes
    /// ([`blob_uri`](Self::blob_uri)). Unlike the original, the answer's etag is adopted.
    pub async fn post_message_builder(&mut self, spec: &Value) -> Result<(), ClientError> {
        if self.cancelled {
            return Err(ClientError::Cancelled);
        }
        let err = |what: &'static str, detail: String| ClientError::MessageBuilder { what, detail };
        let uri = self
            .read
            .body
            .as_ref()
            .and_then(|b| b.message_builder.as_ref())
            .and_then(|m| m.uri.as_deref())
            .map(|u| resolve(&self.url, u))
            .ok_or_else(|| {
                err(
                    "bad resp no uri",
                    "the receiver gave no body.message_builder.uri".into(),
                )
            })?;
        let req = self
            .http
            .awc
            .post(&uri)
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .insert_header((header::IF_MATCH, self.etag.as_str()))
            .insert_header((
                "request-timeout",
                request_timeout(self.settings.timeout).to_string(),
            ));
        let json = Bytes::from(serde_json::to_vec(spec).expect("spec serializes"));
        let a = send(req, Some(json), self.settings.timeout)
            .await
            .map_err(|e| err(super::MESSAGE_BUILDER_HTTP_ERR, e.detail))?;
        if a.status != StatusCode::OK {
            return Err(err(
                super::MESSAGE_BUILDER_HTTP_ERR,
                format!("HTTP {}", a.status),
            ));
        }
        let read = a.read_json().map_err(|d| err("bad resp json", d))?;
        self.merge(read, false)
            .map_err(|d| err("bad resp json", d))?;
        if let Some(etag) = a.etag() {
            self.etag = etag;
        }
        self.last_bump = Instant::now();
        Ok(())
    }

    /// Where blob `id` of the posted message-builder spec is to be PUT, per the
    /// receiver's `body.message_builder.blob_status`.
    pub fn blob_uri(&self, id: &str) -> Option<String> {
        self.read
            .body
            .as_ref()?
            .message_builder
            .as_ref()?
            .blob_status
            .as_ref()?
            .get(id)
            .map(|s| resolve(&self.url, &s.uri))
    }

    /// Empty PATCH: bumps the remote version so the server does not give up on us.
    pub async fn heartbeat(&mut self) -> Result<(), ClientError> {
        if self.cancelled {
            return Err(ClientError::Cancelled);
        }
        self.patch_with_retry(None, |_| true).await
    }

    /// Sends a heartbeat if one is due.
    pub async fn maybe_heartbeat(&mut self) -> Result<(), ClientError> {
        match self.heartbeat_due() {
            Some(due) if Instant::now() >= due => self.heartbeat().await,
            _ => Ok(()),
        }
    }

    /// Appends `data` to the body at the confirmed length; `last` finalizes it there.
    /// Resynchronizes on a short answer or a 416 by resending from what the server holds
    /// (`rest-api.md` §11.9). An empty last chunk finalizes with `x-finalize-blob-length`.
    pub async fn put_chunk(&mut self, data: Bytes, last: bool) -> Result<(), ClientError> {
        if self.cancelled {
            return Err(ClientError::Cancelled);
        }
        let finalized = put_range(
            &self.http,
            self.settings.data_timeout,
            &self.body_url,
            &mut self.body_length,
            data,
            last,
            self.settings.prefer_wait,
        )
        .await?;
        if let Some(f) = finalized {
            self.body_finalized = true;
            // Finalizing bumps the version on every server. A server that says which
            // version saves the next wait a round trip: it starts from there.
            if let Some(read) = f.settled {
                self.merge(read, false)
                    .map_err(|detail| ClientError::Get { detail })?;
            }
            if !f.etag.is_empty() {
                self.etag = f.etag;
            }
            self.last_bump = Instant::now();
        }
        Ok(())
    }

    /// Uploads a whole blob of a `receive_parsing` delivery to `url` (from
    /// [`blob_uri`](Self::blob_uri)), in `chunk_size` PUTs, finalizing it.
    pub async fn put_blob(&mut self, url: &str, data: Bytes) -> Result<(), ClientError> {
        if self.cancelled {
            return Err(ClientError::Cancelled);
        }
        let url = resolve(&self.url, url);
        let chunk = self.settings.chunk_size.max(1);
        let total = data.len();
        let mut cursor = 0u64;
        loop {
            let start = cursor as usize;
            let end = (start + chunk).min(total);
            let last = end == total;
            put_range(
                &self.http,
                self.settings.data_timeout,
                &url,
                &mut cursor,
                data.slice(start..end),
                last,
                false,
            )
            .await?;
            if last {
                self.last_bump = Instant::now();
                return Ok(());
            }
        }
    }

    /// Uploads a whole body from a stream of pieces, in `chunk_size` PUTs, finalizing
    /// when the stream ends.
    pub async fn put_body<S>(&mut self, mut body: S) -> Result<(), ClientError>
    where
        S: Stream<Item = Bytes> + Unpin,
    {
        let chunk = self.settings.chunk_size.max(1);
        let mut buf = bytes::BytesMut::new();
        while let Some(piece) = body.next().await {
            buf.extend_from_slice(&piece);
            while buf.len() > chunk {
                let c = buf.split_to(chunk).freeze();
                self.put_chunk(c, false).await?;
                self.maybe_heartbeat().await?;
            }
        }
        self.put_chunk(buf.freeze(), true).await
    }

    /// `POST …/cancel`, fire-and-forget, unless a data response already settled the
    /// transaction (README decision 3). Idempotent.
    pub async fn cancel(&mut self) {
        if self.cancelled || self.read.data_response.is_some() {
            return;
        }
        self.cancelled = true;
        let req = self.http.awc.post(format!("{}/cancel", self.url));
        if let Err(e) = send(req, None, CANCEL_TIMEOUT).await {
            tracing::debug!(url = %self.url, error = %e.detail, "cancel failed");
        }
    }
}

/// The answer that finalized a blob.
struct Finalized {
    /// Its etag; empty when it had none.
    etag: String,
    /// The transaction's state, when the server waited for it to settle.
    settled: Option<ReadTx>,
}

/// PUTs `data` at `*cursor` of the blob at `url`; `last` finalizes it at the end of
/// `data`. Resynchronizes on a short answer or a 416 by resending from what the server
/// holds; `*cursor` follows what the server confirmed. Returns what the answer that
/// reported the blob finalized said, `None` if not final. With `prefer_wait` the
/// finalizing request asks to be answered once the transaction has settled.
async fn put_range(
    http: &HttpClient,
    timeout: Duration,
    url: &str,
    cursor: &mut u64,
    data: Bytes,
    last: bool,
    prefer_wait: bool,
) -> Result<Option<Finalized>, ClientError> {
    let base = *cursor;
    let end = base + data.len() as u64;
    let total = last.then_some(end);
    let mut offset = base;
    let mut stalls = 0;
    loop {
        let piece = data.slice((offset - base) as usize..);
        let mut req = http.awc.put(url);
        if last && piece.is_empty() {
            req = req.insert_header(("x-finalize-blob-length", offset.to_string()));
        } else if !(offset == 0 && last) {
            req = req.insert_header((
                header::CONTENT_RANGE,
                ContentRange::for_chunk(offset, piece.len() as u64, total),
            ));
        }
        if last && prefer_wait {
            req = req.insert_header(prefer(timeout));
        }
        let sent_to = offset + piece.len() as u64;
        let a = send(req, Some(piece), timeout)
            .await
            .map_err(|e| ClientError::UploadTransport { detail: e.detail })?;
        if a.status != StatusCode::OK && a.status != StatusCode::RANGE_NOT_SATISFIABLE {
            return Err(ClientError::PutStatus {
                status: a.status.as_u16(),
            });
        }
        let held = match header_str(&a.headers, "content-range") {
            Some(h) => HeldRange::parse(h).map_err(|_| ClientError::BadRange {
                detail: format!("content-range {h:?}"),
            })?,
            // Without the header a 200 took the whole piece (the original's
            // receivers omit it); a 416 says nothing usable.
            None if a.status == StatusCode::OK => HeldRange {
                length: sent_to,
                total,
            },
            None => {
                return Err(ClientError::BadRange {
                    detail: "416 without content-range".into(),
                });
            }
        };
        if held.length > end || held.length > sent_to {
            return Err(ClientError::RangeBeyond {
                detail: format!("server holds {} of {sent_to} sent", held.length),
            });
        }
        if held.length < base {
            // The server lost bytes of an earlier chunk; they are gone here.
            return Err(ClientError::BadRange {
                detail: format!("server holds {}, chunk starts at {base}", held.length),
            });
        }
        if held.length == offset && !(last && held.length == end) {
            stalls += 1;
            if stalls >= MAX_PUT_STALLS {
                return Err(ClientError::BadRange {
                    detail: format!("no progress at {offset}"),
                });
            }
        }
        *cursor = held.length;
        offset = held.length;
        if held.length == end {
            if !last {
                return Ok(None);
            }
            if held.finalized() {
                let settled = match header_str(&a.headers, "preference-applied") {
                    Some(p) if p.trim().eq_ignore_ascii_case("wait") => Some(
                        a.read_json()
                            .map_err(|detail| ClientError::Get { detail })?,
                    ),
                    _ => None,
                };
                return Ok(Some(Finalized {
                    etag: a.etag().unwrap_or_default(),
                    settled,
                }));
            }
            // Everything is there but not finalized (a 416 on a resend): say so.
            stalls += 1;
            if stalls >= MAX_PUT_STALLS {
                return Err(ClientError::BadRange {
                    detail: "body not finalized".into(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_locations() {
        assert_eq!(
            resolve("http://r:8000/senders/x/transactions", "/transactions/abc"),
            "http://r:8000/transactions/abc"
        );
        assert_eq!(
            resolve(
                "http://r:8000/senders/x/transactions",
                "http://o:1/transactions/abc"
            ),
            "http://o:1/transactions/abc"
        );
        assert_eq!(resolve("http://r:8000/a/b", "c"), "http://r:8000/a/c");
        assert_eq!(strip_quotes("\"12\""), "12");
        assert_eq!(request_timeout(Duration::from_millis(2500)), 1);
    }
}
