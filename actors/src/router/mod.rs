//! The router service: an actix-web REST API over transaction actors backed by [`Storage`].

mod error;
mod housekeeping;
mod http;
pub mod output;
mod registry;
mod settings;
mod transaction;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix::Actor;
use actix_web::{App, HttpServer, dev::ServerHandle, web};
use koukan_db::{Storage, StorageError, StorageOptions};
use output::Output;
use thiserror::Error;

pub use housekeeping::Housekeeper;
pub use registry::Registry;
pub use settings::{ConfigSenders, SenderError, SenderPolicy, SenderResolver, Settings, Tls};
pub use transaction::{Crash, TransactionActor};

#[derive(Debug, Error)]
pub enum RouterError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Config(String),
}

/// A running router: its HTTP server, storage and actors.
pub struct Router {
    pub addr: SocketAddr,
    pub storage: Storage,
    pub registry: Registry,
    pub output: Arc<Output>,
    server: ServerHandle,
    housekeeper: actix::Addr<Housekeeper>,
}

impl Router {
    /// Opens storage (migrations, session row, recovery) and starts serving. Must be called
    /// inside an actix system. The returned future of `run` completes when the server stops.
    pub async fn start(
        settings: Settings,
    ) -> Result<(Router, actix_web::dev::Server), RouterError> {
        Self::start_with(settings, output::builtin_filters()).await
    }

    /// As [`start`](Self::start), with the output chains built from `filters` (the
    /// built-ins plus whatever the embedding program registers).
    pub async fn start_with(
        settings: Settings,
        filters: output::Filters,
    ) -> Result<(Router, actix_web::dev::Server), RouterError> {
        let settings = Arc::new(settings);
        let storage = Storage::open(
            settings.backend.clone(),
            &settings.session_uri,
            StorageOptions {
                blob_tx_refresh_interval: settings.blob_tx_refresh_interval,
                ..Default::default()
            },
        )
        .await?;
        let registry = Registry::new(storage.clone(), settings.clone());
        filters
            .check(&settings.config)
            .map_err(|e| RouterError::Config(e.to_string()))?;
        let output = Output::new(
            storage.clone(),
            registry.clone(),
            settings.config.clone(),
            settings.clone(),
            filters,
        );
        if settings.config.global.dequeue {
            output.start_dequeuer();
        }
        let housekeeper = Housekeeper::new(storage.clone(), settings.clone()).start();

        let listener =
            TcpListener::bind(&settings.listen).map_err(|source| RouterError::Listen {
                addr: settings.listen.clone(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| RouterError::Listen {
                addr: settings.listen.clone(),
                source,
            })?;
        let state = web::Data::new(http::State {
            settings: settings.clone(),
            storage: storage.clone(),
            registry: registry.clone(),
            output: output.clone(),
        });
        let server =
            HttpServer::new(move || App::new().app_data(state.clone()).configure(http::routes))
                .workers(settings.http_workers)
                .shutdown_timeout(5);
        let server = match &settings.tls {
            None => server.listen(listener),
            Some(tls) => server.listen_rustls_0_23(listener, tls.server_config()?),
        }
        .map_err(|source| RouterError::Listen {
            addr: settings.listen.clone(),
            source,
        })?
        .run();
        let handle = server.handle();
        Ok((
            Router {
                addr,
                storage,
                registry,
                output,
                server: handle,
                housekeeper,
            },
            server,
        ))
    }

    /// Clean shutdown: stop taking requests, let in-flight ones finish, then end the
    /// session so its leases are released at once rather than after the liveness timeout.
    pub async fn shutdown(&self) {
        self.server.stop(true).await;
        tracing::debug!("HTTP server stopped");
        self.housekeeper.do_send(housekeeping::Stop);
        if let Err(e) = self.storage.end_session().await {
            tracing::warn!("ending the storage session: {e}");
        }
        tracing::debug!("storage session ended");
        self.storage.close().await;
        tracing::debug!("storage closed");
    }
}
