//! Errors of the gateway's REST listener and how they look on the wire: a status and a
//! short plain-text reason.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use koukan::range::HeldRange;
use thiserror::Error;

/// Starting the REST listener.
#[derive(Debug, Error)]
pub enum OutboundError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("rest_listener TLS: {0}")]
    Tls(String),
}

/// A REST request that cannot be served.
#[derive(Debug, Error)]
pub enum RestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("transaction not found")]
    NotFound,
    #[error("unknown blob")]
    UnknownBlob,
    #[error("{0}")]
    Conflict(&'static str),
    #[error("update conflict")]
    PreconditionFailed,
    #[error("invalid range")]
    Range(HeldRange),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ResponseError for RestError {
    fn status_code(&self) -> StatusCode {
        match self {
            RestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RestError::NotFound | RestError::UnknownBlob => StatusCode::NOT_FOUND,
            RestError::Conflict(_) => StatusCode::CONFLICT,
            RestError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            RestError::Range(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            RestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status_code());
        match self {
            RestError::Range(held) => {
                r.insert_header(("content-range", held.header()));
            }
            RestError::Internal(m) => tracing::error!("internal error: {m}"),
            _ => {}
        }
        r.content_type("text/plain; charset=utf-8")
            .body(self.to_string())
    }
}

impl From<crate::rest_server::HeaderError> for RestError {
    fn from(e: crate::rest_server::HeaderError) -> Self {
        RestError::BadRequest(e.to_string())
    }
}
