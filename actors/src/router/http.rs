//! The REST routes. Handlers are thin: parse and validate, find the transaction's actor,
//! send it a message, map the answer to HTTP.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use koukan::range::HeldRange;
use koukan::rest::{
    BODY_BLOB, BlobStatus, BodyRequest, BodyView, CreateRequest, MessageBuilderView,
    RESERVED_BLOB_PREFIX, parse_update, render_read,
};
use koukan::transaction::Body;
use koukan::{Sender, rest_id};
use koukan_db::{
    Append, AppendOutcome, BlobAppend, BlobInfo, NewBody, NewTransaction, Storage, StorageError,
    TxRecord, memory,
};

use super::error::RestError;
use super::output::Output;
use super::registry::Registry;
use super::settings::{SenderError, Settings};
use super::transaction::{Appended, Cancel, Open, Opened, Patch, Reload, TransactionActor};
use crate::rest_server::{self, etag_value, header, method_not_allowed, not_found};

pub struct State {
    pub settings: Arc<Settings>,
    pub storage: Storage,
    pub registry: Registry,
    pub output: Arc<Output>,
}

type Data = web::Data<State>;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/senders/{sender}/transactions")
            .route(web::post().to(create))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/transactions/{id}")
            .route(web::get().to(get))
            .route(web::patch().to(patch))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/transactions/{id}/body")
            .route(web::put().to(put_body))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/transactions/{id}/blob/{blob}")
            .route(web::put().to(put_blob))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/transactions/{id}/cancel")
            .route(web::post().to(cancel))
            .default_service(web::to(method_not_allowed)),
    )
    .default_service(web::to(not_found));
}

fn base_of(settings: &Settings, finalized: bool) -> &str {
    // An unfinished blob must be uploaded to the replica holding the lease; a finished one
    // can be reused through any.
    if finalized {
        &settings.service_uri
    } else {
        &settings.session_uri
    }
}

fn body_view(settings: &Settings, record: &TxRecord) -> BodyView {
    let id = &record.rest_id;
    match &record.tx.body {
        None => BodyView {
            blob_status: Some(BlobStatus {
                uri: format!("{}/transactions/{id}/body", settings.service_uri),
                finalized: false,
            }),
            message_builder: None,
        },
        Some(Body::Message(b)) => BodyView {
            blob_status: Some(BlobStatus {
                uri: format!(
                    "{}/transactions/{id}/body",
                    base_of(settings, b.finalized())
                ),
                finalized: b.finalized(),
            }),
            message_builder: None,
        },
        Some(Body::MessageBuilder { blobs, .. }) => BodyView {
            blob_status: None,
            message_builder: Some(MessageBuilderView {
                uri: None,
                blob_status: Some(
                    blobs
                        .iter()
                        .map(|(name, b)| {
                            let base = base_of(settings, b.finalized());
                            let status = BlobStatus {
                                uri: format!("{base}/transactions/{id}/blob/{name}"),
                                finalized: b.finalized(),
                            };
                            (name.clone(), status)
                        })
                        .collect(),
                ),
            }),
        },
    }
}

/// Shown for a transaction without retry whose one attempt failed temporarily: storage
/// keeps the internal `oneshot` marker, but clients need a visible end (README decision 1).
pub const REASON_ONESHOT_TEMPFAIL: &str = "upstream temporary failure (no retry)";

fn read_response(status: StatusCode, settings: &Settings, record: &TxRecord) -> HttpResponse {
    let view = body_view(settings, record);
    // While the attempt runs (lease held) the marker means nothing yet; once retry is
    // enabled (the exploder storing and forwarding) storage clears it.
    let oneshot_done = record.tx.final_attempt_reason.is_none()
        && record.final_attempt_reason.as_deref() == Some(koukan_db::ONESHOT)
        && record.lease.is_none();
    let body = if oneshot_done {
        let mut tx = record.tx.clone();
        tx.final_attempt_reason = Some(REASON_ONESHOT_TEMPFAIL.to_string());
        render_read(&tx, Some(&view))
    } else {
        render_read(&record.tx, Some(&view))
    };
    HttpResponse::build(status)
        .insert_header(("etag", record.version.to_string()))
        .content_type("application/json")
        .body(body)
}

fn valid_id(id: &str) -> Result<(), RestError> {
    if rest_id::is_valid_rest_id(id) {
        Ok(())
    } else {
        Err(RestError::NotFound("unknown tx"))
    }
}

/// Finds the actor and subscribes, or redirects to the replica holding the lease.
async fn open(
    state: &State,
    id: &str,
    req: &HttpRequest,
) -> Result<
    (
        Addr<TransactionActor>,
        tokio::sync::watch::Receiver<Arc<TxRecord>>,
    ),
    RestError,
> {
    valid_id(id)?;
    let addr = state.registry.lookup(id).await?;
    match addr.send(Open).await.map_err(crashed)?? {
        Opened::Ready(rx) => Ok((addr, rx)),
        Opened::Elsewhere(uri) => Err(RestError::Redirect(format!("{uri}{}", req.path()))),
    }
}

fn crashed(e: actix::MailboxError) -> RestError {
    RestError::Internal(format!("transaction actor unavailable: {e}"))
}

/// The record a `Prefer: wait` request is answered with.
async fn settled(rx: tokio::sync::watch::Receiver<Arc<TxRecord>>, wait: Duration) -> Arc<TxRecord> {
    rest_server::wait_settled(rx, wait, |r| r.tx.settled(r.input_done)).await
}

async fn create(
    state: Data,
    path: web::Path<String>,
    http_req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, RestError> {
    let sender = path.into_inner();
    let req = CreateRequest::parse(&body).map_err(|e| RestError::BadRequest(e.to_string()))?;
    let policy = state
        .settings
        .senders
        .resolve(&sender, req.tag.as_deref())
        .map_err(|e| match e {
            SenderError::UnknownSender => RestError::NotFound("unknown sender"),
            SenderError::UnknownTag => RestError::BadRequest("unknown sender tag".into()),
            SenderError::NoTags => RestError::BadRequest("sender has no tags".into()),
        })?;
    let mut tx = req.tx;
    tx.sender = Some(Sender::new(sender, req.tag));
    tx.retry = policy.retry;
    tx.notification = policy.notification;
    if !policy.incremental && (tx.mail_from.is_none() || tx.rcpt_to.len() != 1) {
        return Err(RestError::BadRequest(
            "transaction creation to non-incremental endpoint must contain mail_from and exactly 1 rcpt_to".into(),
        ));
    }
    let body = match req.body {
        None if policy.incremental => NewBody::None,
        None => NewBody::Upload,
        Some(BodyRequest::Inline(s)) => NewBody::Inline(Bytes::from(s)),
        Some(BodyRequest::Reuse(uri)) => NewBody::Reuse(uri),
        Some(BodyRequest::MessageBuilder { spec, blobs }) => {
            NewBody::MessageBuilder { spec, blobs }
        }
    };
    // Cut-through: the attempt starts here when there is capacity; otherwise the
    // transaction waits, unleased, for the dequeuer.
    let leased = state.output.has_capacity();
    // The SMTP-facing side of an exploder: nothing it answers needs it stored (the exploder
    // stores each recipient before its RCPT is accepted, and its DATA answer comes from
    // them), so it lives in this actor's memory; its body is still a stored blob.
    let in_memory = state.settings.smtp_in_memory
        && leased
        && policy.incremental
        && !tx.retry
        && !tx.notification
        && body == NewBody::None;
    let mut attempt = 0;
    let record = loop {
        let new = NewTransaction {
            rest_id: rest_id::new_rest_id(state.settings.rest_id_entropy),
            tx: tx.clone(),
            body: body.clone(),
            leased,
            start_attempt: leased,
        };
        if in_memory {
            // A random id collided with a live transaction: draw another.
            let record = memory::create(state.storage.session_id(), &new)?;
            match state.registry.get(&record.rest_id) {
                None => break record,
                Some(_) if attempt < 3 => attempt += 1,
                Some(_) => return Err(RestError::Internal("no unused transaction id".into())),
            }
            continue;
        }
        match state.storage.create(new).await {
            Ok(record) => break record,
            // A random id collided: draw another.
            Err(StorageError::Duplicate) if attempt < 3 => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    };
    if !leased {
        state.output.kick_dequeue();
    }
    let location = format!(
        "{}/transactions/{}",
        state.settings.session_uri, record.rest_id
    );
    let wait = rest_server::prefer_wait(&http_req);
    let mut resp = read_response(StatusCode::CREATED, &state.settings, &record);
    if leased {
        let addr = state.output.deliver(record);
        if let Some(wait) = wait
            && let Ok(Ok(Opened::Ready(rx))) = addr.send(Open).await
        {
            let record = settled(rx, wait).await;
            resp = read_response(StatusCode::CREATED, &state.settings, &record);
            rest_server::preference_applied(&mut resp);
        }
    }
    resp.headers_mut().insert(
        actix_web::http::header::LOCATION,
        location
            .parse()
            .map_err(|_| RestError::Internal("bad location".into()))?,
    );
    Ok(resp)
}

async fn get(
    state: Data,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, RestError> {
    let id = path.into_inner();
    let etag = header(&req, "if-none-match").map(str::to_string);
    let timeout = match &etag {
        Some(_) => rest_server::request_timeout(&req)?,
        None => Duration::ZERO,
    };
    let (addr, mut rx) = open(&state, &id, &req).await?;
    let current = rx.borrow_and_update().clone();
    let Some(raw_etag) = etag else {
        return Ok(read_response(StatusCode::OK, &state.settings, &current));
    };
    let etag = etag_value(&raw_etag).to_string();
    if current.version.to_string() != etag {
        return Ok(read_response(StatusCode::OK, &state.settings, &current));
    }
    let changed = tokio::time::timeout(timeout, async {
        rx.wait_for(|r| r.version.to_string() != etag)
            .await
            .map(|r| r.clone())
    })
    .await;
    if let Ok(Ok(record)) = changed {
        return Ok(read_response(StatusCode::OK, &state.settings, &record));
    }
    // Writes by another replica are not notified here: check the database once.
    if !current.in_memory()
        && let Some((version, _)) = state.storage.version(&id).await?
        && version.to_string() != etag
    {
        let record = addr.send(Reload).await.map_err(crashed)??;
        return Ok(read_response(StatusCode::OK, &state.settings, &record));
    }
    Ok(HttpResponse::NotModified()
        .insert_header(("etag", raw_etag))
        .finish())
}

async fn patch(
    state: Data,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, RestError> {
    let id = path.into_inner();
    let is_json = header(&req, "content-type").is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    let update = if is_json {
        Some(
            parse_update(&body)
                .map_err(|e| RestError::BadRequest(format!("invalid request: {e}")))?,
        )
    } else if !body.is_empty() {
        return Err(RestError::BadRequest(
            "a PATCH with a body must be application/json".into(),
        ));
    } else {
        None
    };
    if header(&req, "if-none-match").is_some() {
        rest_server::request_timeout(&req)?;
    }
    let if_match = header(&req, "if-match")
        .map(|v| etag_value(v).to_string())
        .ok_or_else(|| RestError::BadRequest("etags required for update".into()))?;
    let (addr, _rx) = open(&state, &id, &req).await?;
    let record = addr
        .send(Patch { if_match, update })
        .await
        .map_err(crashed)??;
    Ok(read_response(StatusCode::OK, &state.settings, &record))
}

async fn put_body(
    state: Data,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, RestError> {
    upload(state, path.into_inner(), None, req, payload).await
}

async fn put_blob(
    state: Data,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, RestError> {
    let (id, blob) = path.into_inner();
    upload(state, id, Some(blob), req, payload).await
}

fn held(blob: &BlobInfo) -> HeldRange {
    HeldRange {
        length: blob.length,
        total: blob.total,
    }
}

async fn upload(
    state: Data,
    id: String,
    blob: Option<String>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, RestError> {
    let plan = rest_server::upload(&req)?;
    let (addr, rx) = open(&state, &id, &req).await?;
    let record = rx.borrow().clone();
    let name = match blob {
        None if matches!(record.tx.body, Some(Body::MessageBuilder { .. })) => {
            return Err(RestError::Conflict(
                "a message-builder transaction has no raw body to upload".into(),
            ));
        }
        None => BODY_BLOB.to_string(),
        Some(b) if b.starts_with(RESERVED_BLOB_PREFIX) => {
            return Err(RestError::NotFound("unknown blob"));
        }
        Some(b) => b,
    };
    let mut create_body = false;
    if record.blob(&name).is_none() {
        // Only the raw body of an incremental transaction is created by its first upload.
        if name != BODY_BLOB || record.tx.body.is_some() || plan.offset != 0 {
            return Err(RestError::NotFound("unknown blob"));
        }
        create_body = true;
    }

    let chunk_size = state.settings.chunk_size.max(1);
    let mut offset = plan.offset;
    let mut buf = BytesMut::new();
    let mut last: Option<BlobInfo> = None;
    // The version this request's own writes produced, for the answer's etag.
    let mut version_written: Option<i64> = None;
    let mut ended = false;
    while !ended {
        // Fill one batch (or reach the end of the request).
        while buf.len() < chunk_size {
            match payload.next().await {
                Some(chunk) => {
                    let chunk =
                        chunk.map_err(|e| RestError::BadRequest(format!("reading body: {e}")))?;
                    if plan.finalize_only && !chunk.is_empty() {
                        return Err(RestError::BadRequest(
                            "x-finalize-blob-length with non-empty PUT".into(),
                        ));
                    }
                    buf.extend_from_slice(&chunk);
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        let data = buf.split().freeze();
        if data.is_empty() && last.is_some() && !plan.finalize_at_end {
            break;
        }
        let total = if ended && plan.finalize_at_end {
            Some(offset + data.len() as u64)
        } else {
            plan.total
        };
        let len = data.len() as u64;
        let outcome = if record.in_memory() {
            // The blob alone is stored; the actor folds the append into its record.
            let blob_id = last.as_ref().or(record.blob(&name)).map(|b| b.blob_id);
            state
                .storage
                .append_blob(BlobAppend {
                    blob_id,
                    offset,
                    data,
                    total,
                })
                .await?
        } else {
            state
                .storage
                .append(Append {
                    rest_id: id.clone(),
                    blob: name.clone(),
                    create_body: create_body && last.is_none(),
                    offset,
                    data,
                    total,
                })
                .await?
        };
        match outcome {
            AppendOutcome::Ok { blob, version } => {
                if version.is_some() || record.in_memory() {
                    let moved = addr
                        .send(Appended {
                            blob: blob.clone(),
                            version,
                            created: create_body,
                        })
                        .await
                        .map_err(crashed)?;
                    if moved.is_some() {
                        version_written = moved;
                    }
                }
                last = Some(blob);
                offset += len;
            }
            AppendOutcome::Mismatch { blob } => return Err(RestError::Range(held(&blob))),
            AppendOutcome::UnknownTx => return Err(RestError::NotFound("unknown transaction")),
            AppendOutcome::UnknownBlob => return Err(RestError::NotFound("unknown blob")),
            AppendOutcome::LeasedElsewhere { uri } => {
                return Err(RestError::Redirect(format!(
                    "{}{}",
                    uri.trim_end_matches('/'),
                    req.path()
                )));
            }
        }
    }
    let blob = last.ok_or_else(|| RestError::Internal("upload wrote nothing".into()))?;
    if let Some(wait) = rest_server::prefer_wait(&req)
        && blob.finalized()
    {
        let record = settled(rx, wait).await;
        let resp = read_response(StatusCode::OK, &state.settings, &record);
        return Ok(rest_server::settled_upload(resp, &held(&blob)));
    }
    let mut resp = HttpResponse::Ok();
    if let Some(v) = version_written {
        resp.insert_header(("etag", v.to_string()));
    }
    Ok(resp
        .insert_header(("content-range", held(&blob).header()))
        .content_type("application/json")
        .body("{}"))
}

async fn cancel(state: Data, path: web::Path<String>) -> Result<HttpResponse, RestError> {
    let id = path.into_inner();
    valid_id(&id)?;
    let addr = state.registry.lookup(&id).await?;
    addr.send(Cancel).await.map_err(crashed)??;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .finish())
}
