//! The SMTP gateway: a stateless bridge between SMTP and the router's REST API.
//!
//! * `inbound`: SMTP listeners (MX, submission, implicit TLS); each session drives a router
//!   transaction through the incremental REST dialect.
//! * `outbound`: the REST listener the router delivers to; each transaction becomes an
//!   SMTP/LMTP delivery to the destination's hosts.

pub mod inbound;
pub mod outbound;

use std::net::SocketAddr;
use std::sync::Arc;

use koukan::config::GatewayConfig;
use thiserror::Error;

use inbound::{InboundError, SmtpListeners};
use outbound::{OutboundError, OutboundOptions, RestListener};

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("rest_listener: {0}")]
    Outbound(#[from] OutboundError),
    #[error("smtp_listener: {0}")]
    Inbound(#[from] InboundError),
}

/// A running gateway: both halves.
pub struct Gateway {
    /// Where the router delivers (REST).
    pub rest_addr: SocketAddr,
    /// One per `smtp_listener.services` entry, in order.
    pub smtp_addrs: Vec<SocketAddr>,
    pub rest: RestListener,
    smtp: SmtpListeners,
}

impl Gateway {
    /// Starts the REST listener and the SMTP listeners. Must run inside an actix system;
    /// the returned server future completes when the REST server stops.
    pub async fn start(
        cfg: Arc<GatewayConfig>,
    ) -> Result<(Gateway, actix_web::dev::Server), GatewayError> {
        Self::start_with(cfg, OutboundOptions::default()).await
    }

    pub async fn start_with(
        cfg: Arc<GatewayConfig>,
        opts: OutboundOptions,
    ) -> Result<(Gateway, actix_web::dev::Server), GatewayError> {
        let (rest, server) = RestListener::start(cfg.clone(), opts).await?;
        let smtp = match SmtpListeners::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                rest.shutdown().await;
                return Err(e.into());
            }
        };
        Ok((
            Gateway {
                rest_addr: rest.addr,
                smtp_addrs: smtp.addrs.clone(),
                rest,
                smtp,
            },
            server,
        ))
    }

    /// Clean stop: no new SMTP connections or REST requests; sessions finish or QUIT.
    pub async fn shutdown(&self) {
        self.smtp.shutdown().await;
        self.rest.shutdown().await;
    }
}
