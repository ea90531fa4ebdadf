//! Pieces of the Koukan REST server shared by the router and the gateway: default routes,
//! request headers, and how an upload request declares its place in the blob.

use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse};
use koukan::range::{ContentRange, HeldRange};
use thiserror::Error;

/// Longest a hanging GET waits, whatever the client asks.
pub const MAX_POLL: Duration = Duration::from_secs(30);

/// A request header the server cannot use. The text is the answer's reason.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("invalid request-timeout header")]
    RequestTimeout,
    #[error("invalid content-length")]
    ContentLength,
    #[error("invalid x-finalize-blob-length")]
    FinalizeLength,
    #[error("x-finalize-blob-length with non-empty PUT")]
    FinalizeNotEmpty,
    #[error("bad range")]
    Range,
    #[error("content-range length does not match content-length")]
    RangeLength,
}

pub async fn not_found() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type("application/json")
        .body(r#"{"detail":"Not Found"}"#)
}

pub async fn method_not_allowed() -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .content_type("application/json")
        .body(r#"{"detail":"Method Not Allowed"}"#)
}

pub fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// ETags are compared without surrounding quotes.
pub fn etag_value(s: &str) -> &str {
    s.trim().trim_matches('"')
}

/// How long a hanging GET may wait (`request-timeout`, capped; 30 s when absent).
pub fn request_timeout(req: &HttpRequest) -> Result<Duration, HeaderError> {
    match header(req, "request-timeout") {
        None => Ok(MAX_POLL),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(|s| Duration::from_secs(s).min(MAX_POLL))
            .map_err(|_| HeaderError::RequestTimeout),
    }
}

/// Where an upload request starts and what it declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upload {
    pub offset: u64,
    /// Total length declared by the request (a plain PUT's content-length).
    pub total: Option<u64>,
    /// A plain PUT without content-length: the blob ends where the request ends.
    pub finalize_at_end: bool,
    /// `x-finalize-blob-length`: the request carries no bytes, only the end.
    pub finalize_only: bool,
}

/// `Prefer: wait=N` (RFC 7240) on a create or a body PUT: the client would rather get the
/// answer once the transaction has settled (see `Transaction::settled`), within N seconds
/// (capped like a hanging GET), than poll for it. Servers that ignore it stay correct: the
/// client polls as before. An unusable value is ignored, as RFC 7240 asks.
pub fn prefer_wait(req: &HttpRequest) -> Option<Duration> {
    header(req, "prefer")?
        .split([',', ';'])
        .find_map(|p| p.trim().strip_prefix("wait="))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_POLL))
}

/// The newest state once `settled` holds for it, or once `wait` has passed: what a
/// `Prefer: wait` request is answered with.
pub async fn wait_settled<T: Clone>(
    mut rx: tokio::sync::watch::Receiver<T>,
    wait: Duration,
    settled: impl Fn(&T) -> bool,
) -> T {
    let _ = tokio::time::timeout(wait, rx.wait_for(settled)).await;
    rx.borrow().clone()
}

/// Marks an answer given after a `Prefer: wait`: its body is the transaction's JSON.
pub fn preference_applied(resp: &mut HttpResponse) {
    resp.headers_mut().insert(
        HeaderName::from_static("preference-applied"),
        HeaderValue::from_static("wait"),
    );
}

/// A transaction's JSON answering a body PUT that waited: the upload's `content-range` too.
pub fn settled_upload(mut resp: HttpResponse, held: &HeldRange) -> HttpResponse {
    if let Ok(range) = HeaderValue::from_str(&held.header()) {
        resp.headers_mut()
            .insert(HeaderName::from_static("content-range"), range);
    }
    preference_applied(&mut resp);
    resp
}

/// Reads `content-length`, `content-range` and `x-finalize-blob-length` (`rest-api.md` §3.4).
pub fn upload(req: &HttpRequest) -> Result<Upload, HeaderError> {
    let content_length = match header(req, "content-length") {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<u64>()
                .map_err(|_| HeaderError::ContentLength)?,
        ),
    };
    if let Some(f) = header(req, "x-finalize-blob-length") {
        let n = f
            .trim()
            .parse::<u64>()
            .map_err(|_| HeaderError::FinalizeLength)?;
        if content_length.unwrap_or(0) > 0 {
            return Err(HeaderError::FinalizeNotEmpty);
        }
        return Ok(Upload {
            offset: n,
            total: Some(n),
            finalize_at_end: false,
            finalize_only: true,
        });
    }
    if let Some(r) = header(req, "content-range") {
        let range = ContentRange::parse(r).map_err(|_| HeaderError::Range)?;
        // A range is only trusted with a length to check it against (no chunked encoding).
        if content_length != Some(range.len()) {
            return Err(HeaderError::RangeLength);
        }
        return Ok(Upload {
            offset: range.first,
            total: range.total,
            finalize_at_end: false,
            finalize_only: false,
        });
    }
    Ok(Upload {
        offset: 0,
        total: content_length,
        finalize_at_end: content_length.is_none(),
        finalize_only: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn prefer_wait_parsing() {
        let wait = |v: &str| {
            prefer_wait(
                &TestRequest::default()
                    .insert_header(("prefer", v))
                    .to_http_request(),
            )
        };
        assert_eq!(wait("wait=5"), Some(Duration::from_secs(5)));
        assert_eq!(wait("respond-async, wait=7"), Some(Duration::from_secs(7)));
        assert_eq!(
            wait("handling=lenient; wait=2"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(wait("wait=3600"), Some(MAX_POLL), "capped");
        assert_eq!(wait("wait=soon"), None);
        assert_eq!(wait("return=minimal"), None);
        assert_eq!(prefer_wait(&TestRequest::default().to_http_request()), None);
    }

    #[test]
    fn upload_headers() {
        let req = |h: &[(&str, &str)]| {
            let mut r = TestRequest::put();
            for (k, v) in h {
                r = r.insert_header((*k, *v));
            }
            r.to_http_request()
        };
        assert_eq!(
            upload(&req(&[("content-length", "13")])).unwrap(),
            Upload {
                offset: 0,
                total: Some(13),
                finalize_at_end: false,
                finalize_only: false
            }
        );
        assert!(upload(&req(&[])).unwrap().finalize_at_end);
        assert_eq!(
            upload(&req(&[
                ("content-length", "6"),
                ("content-range", "bytes 7-12/13")
            ]))
            .unwrap(),
            Upload {
                offset: 7,
                total: Some(13),
                finalize_at_end: false,
                finalize_only: false
            }
        );
        assert_eq!(
            upload(&req(&[("content-range", "bytes 7-12/13")])),
            Err(HeaderError::RangeLength)
        );
        assert_eq!(
            upload(&req(&[("content-range", "bytes */13")])),
            Err(HeaderError::Range)
        );
        assert_eq!(
            upload(&req(&[("x-finalize-blob-length", "quux")])),
            Err(HeaderError::FinalizeLength)
        );
        assert_eq!(
            upload(&req(&[
                ("x-finalize-blob-length", "13"),
                ("content-length", "1")
            ])),
            Err(HeaderError::FinalizeNotEmpty)
        );
        assert!(
            upload(&req(&[("x-finalize-blob-length", "13")]))
                .unwrap()
                .finalize_only
        );
        assert_eq!(
            request_timeout(&req(&[("request-timeout", "99")])),
            Ok(MAX_POLL)
        );
        assert_eq!(
            request_timeout(&req(&[("request-timeout", "x")])),
            Err(HeaderError::RequestTimeout)
        );
        assert_eq!(etag_value("\"12\""), "12");
    }
}
