//! REST errors and how they look on the wire: a status and a short plain-text reason.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use koukan::range::HeldRange;
use koukan_db::StorageError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("update conflict")]
    PreconditionFailed,
    /// Served by another replica.
    #[error("redirect")]
    Redirect(String),
    #[error("invalid range")]
    Range(HeldRange),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl From<crate::rest_server::HeaderError> for RestError {
    fn from(e: crate::rest_server::HeaderError) -> Self {
        RestError::BadRequest(e.to_string())
    }
}

impl From<StorageError> for RestError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NotFound => RestError::NotFound("unknown tx"),
            StorageError::Conflict => RestError::PreconditionFailed,
            StorageError::BadReuse(m) => RestError::BadRequest(format!("invalid blob reuse: {m}")),
            StorageError::Invalid(m) => RestError::BadRequest(m),
            StorageError::Closed => RestError::Unavailable("shutting down".into()),
            other => RestError::Internal(other.to_string()),
        }
    }
}

impl ResponseError for RestError {
    fn status_code(&self) -> StatusCode {
        match self {
            RestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RestError::NotFound(_) => StatusCode::NOT_FOUND,
            RestError::Conflict(_) => StatusCode::CONFLICT,
            RestError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            RestError::Redirect(_) => StatusCode::PERMANENT_REDIRECT,
            RestError::Range(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            RestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status_code());
        match self {
            RestError::Redirect(location) => {
                return r.insert_header(("location", location.as_str())).finish();
            }
            RestError::Range(held) => {
                r.insert_header(("content-range", held.header()));
            }
            RestError::Unavailable(_) => {
                r.insert_header(("retry-after", "1"));
            }
            RestError::Internal(m) => tracing::error!("internal error: {m}"),
            _ => {}
        }
        r.content_type("text/plain; charset=utf-8")
            .body(self.to_string())
    }
}
