//! The REST routes the router delivers to (`rest-api.md` §3, §11.5). Handlers parse and
//! validate, then ask the transaction's actor; body bytes go straight from the request to
//! the SMTP session, one chunk at a time.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::BytesMut;
use futures_util::StreamExt;
use koukan::Sender;
use koukan::range::HeldRange;
use koukan::rest::{BodyRequest, CreateRequest, parse_update};
use tokio::sync::watch;

use super::delivery::BodyChunk;
use super::error::RestError;
use super::transaction::{
    BeginUpload, Cancel, EndUpload, GatewayTransaction, Patch, Registry, Touch, TxState, UploadPlan,
};
use crate::rest_server::{self, etag_value, header, method_not_allowed, not_found};

pub struct State {
    pub registry: Registry,
    /// Bytes per hand-off to the SMTP side while reading a PUT.
    pub chunk_size: usize,
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
        web::resource("/transactions/{id}/cancel")
            .route(web::post().to(cancel))
            .default_service(web::to(method_not_allowed)),
    )
    // Message-builder blobs do not exist here: `/blob/...` is an unknown path.
    .default_service(web::to(not_found));
}

fn read_response(status: StatusCode, state: &State, tx: &TxState) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(("etag", tx.version.to_string()))
        .content_type("application/json")
        .body(tx.render(&state.registry.shared().session_uri))
}

/// The state a `Prefer: wait` request is answered with.
async fn settled(rx: watch::Receiver<Arc<TxState>>, wait: Duration) -> Arc<TxState> {
    rest_server::wait_settled(rx, wait, |s| s.tx.settled(s.body.finalized())).await
}

fn lookup(
    state: &State,
    id: &str,
) -> Result<(Addr<GatewayTransaction>, watch::Receiver<Arc<TxState>>), RestError> {
    state.registry.lookup(id).ok_or(RestError::NotFound)
}

fn crashed(e: actix::MailboxError) -> RestError {
    RestError::Internal(format!("transaction actor unavailable: {e}"))
}

async fn create(
    state: Data,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, RestError> {
    let wait = rest_server::prefer_wait(&req);
    let req = CreateRequest::parse(&body).map_err(|e| RestError::BadRequest(e.to_string()))?;
    let tag = req
        .tag
        .ok_or_else(|| RestError::BadRequest("sender.tag is required".into()))?;
    let host = state
        .registry
        .shared()
        .hosts
        .get(&tag)
        .cloned()
        .ok_or_else(|| RestError::BadRequest(format!("unknown sender tag {tag:?}")))?;
    let inline = match req.body {
        None => None,
        Some(BodyRequest::Inline(s)) => Some(bytes::Bytes::from(s)),
        Some(_) => {
            return Err(RestError::BadRequest(
                "the gateway accepts only an inline body or a PUT to /body".into(),
            ));
        }
    };
    let mut tx = req.tx;
    tx.sender = Some(Sender::new(path.into_inner(), Some(tag)));
    let mut snapshot = state.registry.create(tx, host, inline);
    let location = format!(
        "{}/transactions/{}",
        state.registry.shared().session_uri,
        snapshot.id
    );
    let waited = match (wait, state.registry.lookup(&snapshot.id)) {
        (Some(wait), Some((_, rx))) => {
            snapshot = settled(rx, wait).await;
            true
        }
        _ => false,
    };
    let mut resp = read_response(StatusCode::CREATED, &state, &snapshot);
    if waited {
        rest_server::preference_applied(&mut resp);
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
    let (addr, mut rx) = lookup(&state, &id)?;
    addr.do_send(Touch);
    let current = rx.borrow_and_update().clone();
    let Some(raw_etag) = etag else {
        return Ok(read_response(StatusCode::OK, &state, &current));
    };
    let etag = etag_value(&raw_etag).to_string();
    if current.version.to_string() != etag {
        return Ok(read_response(StatusCode::OK, &state, &current));
    }
    let changed = tokio::time::timeout(timeout, async {
        let changed = rx
            .wait_for(|s| s.version.to_string() != etag)
            .await
            .map(|s| s.clone());
        // The actor went away (GC or crash): show what it last published.
        changed.unwrap_or_else(|_| rx.borrow().clone())
    })
    .await;
    match changed {
        Ok(s) => Ok(read_response(StatusCode::OK, &state, &s)),
        Err(_) => Ok(HttpResponse::NotModified()
            .insert_header(("etag", raw_etag))
            .finish()),
    }
}

async fn patch(
    state: Data,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, RestError> {
    let id = path.into_inner();
    let (addr, _) = lookup(&state, &id)?;
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
    let s = addr
        .send(Patch { if_match, update })
        .await
        .map_err(crashed)??;
    Ok(read_response(StatusCode::OK, &state, &s))
}

fn plan_upload(req: &HttpRequest) -> Result<(UploadPlan, bool), RestError> {
    let u = rest_server::upload(req)?;
    let plan = UploadPlan {
        offset: u.offset,
        total: u.total,
        finalize_only: u.finalize_only,
    };
    Ok((plan, u.finalize_at_end))
}

/// Reports the end of an upload to the actor even when the request dies half-way, so the
/// bytes already handed to SMTP are counted and the next PUT can resynchronize.
struct UploadGuard {
    addr: Addr<GatewayTransaction>,
    length: u64,
    finalized: bool,
    declared_total: Option<u64>,
    armed: bool,
}

impl UploadGuard {
    async fn finish(mut self) -> Result<Arc<TxState>, RestError> {
        self.armed = false;
        self.addr
            .send(EndUpload {
                length: self.length,
                finalized: self.finalized,
                declared_total: self.declared_total,
            })
            .await
            .map_err(crashed)
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if self.armed {
            self.addr.do_send(EndUpload {
                length: self.length,
                finalized: false,
                declared_total: self.declared_total,
            });
        }
    }
}

async fn put_body(
    state: Data,
    path: web::Path<String>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, RestError> {
    let id = path.into_inner();
    let (plan, finalize_at_end) = plan_upload(&req)?;
    let (addr, _) = lookup(&state, &id)?;
    let ticket = addr.send(BeginUpload(plan)).await.map_err(crashed)??;
    if let Some(held) = ticket.noop {
        return Ok(upload_ok(held));
    }
    let mut sink = ticket.sink;
    let mut guard = UploadGuard {
        addr,
        length: ticket.offset,
        finalized: false,
        declared_total: plan.total,
        armed: true,
    };
    let chunk_size = state.chunk_size.max(1);
    let mut buf = BytesMut::new();
    let mut ended = plan.finalize_only;
    loop {
        while !ended && buf.len() < chunk_size {
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
                None => ended = true,
            }
        }
        let data = buf.split().freeze();
        let end = guard.length + data.len() as u64;
        if plan.total.is_some_and(|t| end > t) {
            return Err(RestError::BadRequest(
                "body longer than the declared length".into(),
            ));
        }
        let last = match plan.total {
            Some(t) => end == t,
            None => ended && finalize_at_end,
        };
        if !data.is_empty() || last {
            if let Some(s) = &sink
                && s.send(BodyChunk { data, last }).await.is_err()
            {
                // The session is over: keep counting, drop the bytes.
                sink = None;
            }
            guard.length = end;
            guard.finalized = last;
        }
        if ended || last {
            break;
        }
    }
    let s = guard.finish().await?;
    if let Some(wait) = rest_server::prefer_wait(&req)
        && s.body.finalized()
        && let Some((_, rx)) = state.registry.lookup(&id)
    {
        let s = settled(rx, wait).await;
        let resp = read_response(StatusCode::OK, &state, &s);
        return Ok(rest_server::settled_upload(resp, &s.body.held()));
    }
    Ok(upload_ok(s.body.held()))
}

fn upload_ok(held: HeldRange) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("content-range", held.header()))
        .content_type("application/json")
        .body("{}")
}

async fn cancel(state: Data, path: web::Path<String>) -> Result<HttpResponse, RestError> {
    let id = path.into_inner();
    let (addr, _) = lookup(&state, &id)?;
    addr.send(Cancel).await.map_err(crashed)?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .finish())
}
