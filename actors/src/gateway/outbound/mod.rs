//! REST listener ← router, and SMTP/LMTP delivery.
//!
//! The router creates a transaction here per destination host; each becomes a
//! `GatewayTransaction` actor (the REST state, versions, long polls, GC) driving an
//! `OutboundDelivery` actor (one SMTP/LMTP session to `remote_host`). Nothing is persisted:
//! a lost transaction is retried by the router.

mod delivery;
mod error;
mod http;
mod pool;
mod smtp;
mod stream;
mod transaction;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, dev::ServerHandle, web};
use koukan::config::GatewayConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use delivery::TlsPolicy;
pub use error::{OutboundError, RestError};
pub use smtp::DotStuffer;
pub use transaction::{BodyProgress, Crash, GatewayTransaction, Registry, Shared, TxState};

/// How long a shutdown waits for SMTP sessions to QUIT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Knobs that are not in the YAML.
#[derive(Clone, Debug, Default)]
pub struct OutboundOptions {
    pub tls: TlsPolicy,
    /// HTTP worker threads; `None` = one per core.
    pub http_workers: Option<usize>,
}

/// The running REST listener.
pub struct RestListener {
    pub addr: SocketAddr,
    pub registry: Registry,
    server: ServerHandle,
}

impl RestListener {
    /// Binds `rest_listener.addr` and starts serving. Must run inside an actix system; the
    /// returned server future completes when the server stops.
    pub async fn start(
        cfg: Arc<GatewayConfig>,
        opts: OutboundOptions,
    ) -> Result<(RestListener, actix_web::dev::Server), OutboundError> {
        let l = &cfg.rest_listener;
        let shown = l.addr.to_string();
        let listen_err = |source| OutboundError::Listen {
            addr: shown.clone(),
            source,
        };
        let listener =
            TcpListener::bind((l.addr.host.as_str(), l.addr.port)).map_err(listen_err)?;
        let addr = listener.local_addr().map_err(listen_err)?;
        let registry = Registry::new(Arc::new(Shared::from_config(&cfg, opts.tls)));
        let state = web::Data::new(http::State {
            registry: registry.clone(),
            chunk_size: l.chunk_size,
        });
        let mut server =
            HttpServer::new(move || App::new().app_data(state.clone()).configure(http::routes))
                .shutdown_timeout(5);
        if let Some(n) = opts.http_workers {
            server = server.workers(n);
        }
        let server = match &l.tls {
            None => server.listen(listener),
            Some(tls) => server.listen_rustls_0_23(listener, server_tls(&tls.cert, &tls.key)?),
        }
        .map_err(listen_err)?
        .run();
        Ok((
            RestListener {
                addr,
                registry,
                server: server.handle(),
            },
            server,
        ))
    }

    /// Stops taking requests, then ends every transaction (QUIT upstream).
    pub async fn shutdown(&self) {
        self.server.stop(true).await;
        self.registry.shutdown(SHUTDOWN_GRACE).await;
    }
}

fn server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ServerConfig, OutboundError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| OutboundError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| OutboundError::Tls(format!("{}: {e}", key.display())))?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| OutboundError::Tls(e.to_string()))
}
