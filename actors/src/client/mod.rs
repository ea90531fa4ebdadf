//! HTTP client of the Koukan REST API (used by the gateway towards the router and by the
//! router's `rest_output` towards gateways and receivers).
//!
//! The unit is [`RestTransaction`]: a handle on one remote transaction driven by deltas
//! (create, add recipients, heartbeat, upload body chunks, wait for responses, cancel).
//! Every HTTP failure becomes a [`ClientError`] whose text is the `450` family of
//! `rest-api.md` §10.7, so a caller can turn it into a transaction response unchanged.
//!
//! awc futures are `!Send`: a handle lives on one actix arbiter, and each arbiter thread
//! has one keep-alive connection pool per TLS policy ([`HttpClient::shared`]).

mod http;
mod transaction;

use std::time::Duration;

use koukan::Response;
use koukan::config::{GatewayRestOutput, TlsVerify};
use thiserror::Error;

pub use http::{HttpClient, tls_client_config};
pub use transaction::{Phase, RestTransaction};

/// Timing and chunking of one client.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientSettings {
    /// Deadline of each create / update step, waits included (`rcpt_timeout`).
    pub timeout: Duration,
    /// HTTP timeout of each body PUT, and default deadline of the data-response wait.
    pub data_timeout: Duration,
    /// Largest body PUT.
    pub chunk_size: usize,
    /// Send an empty PATCH when nothing bumped the remote version for this long
    /// (also while waiting). `None`: never.
    pub refresh_interval: Option<Duration>,
    /// TLS verification for `https://` URLs.
    pub verify: TlsVerify,
    /// Ask the server to answer the create and the finalizing body PUT once the
    /// transaction has settled (RFC 7240 `Prefer: wait`), which saves the long poll after
    /// each. A server that ignores it is polled as before.
    pub prefer_wait: bool,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            timeout: Duration::from_secs(30),
            data_timeout: Duration::from_secs(60),
            chunk_size: 1 << 20,
            refresh_interval: Some(Duration::from_secs(30)),
            verify: TlsVerify::System,
            prefer_wait: true,
        }
    }
}

impl From<&GatewayRestOutput> for ClientSettings {
    fn from(r: &GatewayRestOutput) -> Self {
        ClientSettings {
            timeout: r.rcpt_timeout,
            data_timeout: r.data_timeout,
            chunk_size: r.chunk_size.max(1),
            refresh_interval: Some(r.refresh_interval).filter(|d| !d.is_zero()),
            verify: r.verify.clone(),
            prefer_wait: true,
        }
    }
}

/// A failed exchange. `Display` is the response text of `rest-api.md` §10.7; `detail()`
/// says what actually happened, for logs.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ClientError {
    /// The create POST, or the wait for `mail_response` after it.
    #[error("RestEndpoint._start_upstream_tx {what}")]
    Create { what: &'static str, detail: String },
    /// A PATCH (recipients, heartbeat), or the wait after it.
    #[error("RestEndpoint._maybe_update {what}")]
    Update { what: String, detail: String },
    /// No data response before the deadline.
    #[error("RestEndpoint upstream timeout")]
    Timeout,
    /// A GET while waiting for the data response failed.
    #[error("RestEndpoint upstream invalid resp/delta get")]
    Get { detail: String },
    #[error("RestEndpoint blob upload error")]
    UploadTransport { detail: String },
    #[error("RestEndpoint._put_blob_chunk PUT err")]
    PutStatus { status: u16 },
    #[error("RestEndpoint._put_blob_chunk bad range")]
    BadRange { detail: String },
    /// The server claims bytes that were never sent.
    #[error("invalid resp content-range")]
    RangeBeyond { detail: String },
    #[error("RestEndpoint no endpoint!")]
    NoEndpoint,
    /// The handle was cancelled locally.
    #[error("cancelled")]
    Cancelled,
    #[error("RestEndpoint tls setup failed")]
    Tls { detail: String },
    /// The message-builder POST of a `receive_parsing` delivery (`rest-api.md` §11.4), or
    /// the blob list its answer should have carried.
    #[error("RestEndpoint update_message_builder {what}")]
    MessageBuilder { what: &'static str, detail: String },
}

/// `what` of a refused message-builder POST: the original's odd 400.
pub const MESSAGE_BUILDER_HTTP_ERR: &str = "http err";

impl ClientError {
    /// The transaction response this failure stands for (all temporary, except the two
    /// local conditions the original reports as 550).
    pub fn response(&self) -> Response {
        let code = match self {
            ClientError::NoEndpoint | ClientError::Cancelled => 550,
            ClientError::MessageBuilder { what, .. } if *what == MESSAGE_BUILDER_HTTP_ERR => 400,
            _ => 450,
        };
        Response::new(code, self.to_string())
    }

    /// What happened, for logs.
    pub fn detail(&self) -> String {
        match self {
            ClientError::Create { detail, .. }
            | ClientError::Update { detail, .. }
            | ClientError::Get { detail }
            | ClientError::UploadTransport { detail }
            | ClientError::BadRange { detail }
            | ClientError::RangeBeyond { detail }
            | ClientError::Tls { detail }
            | ClientError::MessageBuilder { detail, .. } => format!("{self}: {detail}"),
            ClientError::PutStatus { status } => format!("{self}: HTTP {status}"),
            _ => self.to_string(),
        }
    }

    /// A deadline passed (as opposed to a broken exchange).
    pub fn is_timeout(&self) -> bool {
        match self {
            ClientError::Timeout => true,
            ClientError::Create { what, .. } => what.contains("timeout"),
            ClientError::Update { what, .. } => what == "upstream timeout",
            _ => false,
        }
    }
}
