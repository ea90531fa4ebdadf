//! What the router service needs from its configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use koukan::config::{RouterConfig, StorageUrl};
use koukan_db::Backend;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use super::RouterError;

/// How a sender (and tag) treats its transactions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SenderPolicy {
    /// The output chain ends in the exploder: SMTP-style incremental transactions.
    pub incremental: bool,
    /// New transactions get `retry`.
    pub retry: bool,
    /// New transactions get `notification`.
    pub notification: bool,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SenderError {
    #[error("unknown sender")]
    UnknownSender,
    #[error("unknown tag")]
    UnknownTag,
    #[error("sender has no tags")]
    NoTags,
}

/// Resolves `(sender, tag)` against the configuration.
pub trait SenderResolver: Send + Sync {
    fn resolve(&self, sender: &str, tag: Option<&str>) -> Result<SenderPolicy, SenderError>;
}

#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    pub fn server_config(&self) -> Result<rustls::ServerConfig, RouterError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| RouterError::Tls(format!("{}: {e}", self.cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| RouterError::Tls(format!("{}: {e}", self.key.display())))?;
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| RouterError::Tls(e.to_string()))
    }
}

#[derive(Clone)]
pub struct Settings {
    pub config: Arc<RouterConfig>,
    /// `host:port` to bind (port 0 picks one).
    pub listen: String,
    pub tls: Option<Tls>,
    /// Base URL of this replica.
    pub session_uri: String,
    /// Base URL of the whole service (finalized blobs are served by any replica).
    pub service_uri: String,
    /// A streamed upload is appended to storage in batches of this many bytes.
    pub chunk_size: usize,
    pub rest_id_entropy: usize,
    pub backend: Backend,
    pub senders: Arc<dyn SenderResolver>,
    pub session_refresh_interval: Duration,
    pub gc_interval: Option<Duration>,
    pub gc_ttl: Duration,
    pub blob_tx_refresh_interval: Duration,
    /// Transaction actors with nothing to do stop after this long.
    pub actor_idle: Duration,
    pub http_workers: usize,
    /// Largest create/PATCH JSON accepted.
    pub json_limit: usize,
    /// SMTP-facing transactions of exploder chains are kept in memory, not stored
    /// (`storage.store_smtp_transactions: false`).
    pub smtp_in_memory: bool,
}

impl Settings {
    /// Liveness timeout after which other replicas declare this one dead.
    pub fn session_ttl(&self) -> Duration {
        self.session_refresh_interval * 10
    }
}

/// Sender resolution backed by the router YAML.
pub struct ConfigSenders(pub Arc<RouterConfig>);

impl SenderResolver for ConfigSenders {
    fn resolve(&self, sender: &str, tag: Option<&str>) -> Result<SenderPolicy, SenderError> {
        use koukan::config::SenderError as E;
        let resolved = self.0.resolve_sender(sender, tag).map_err(|e| match e {
            E::UnknownSender(_) => SenderError::UnknownSender,
            E::UnknownTag { .. } => SenderError::UnknownTag,
            E::TagsNotSupported { .. } => SenderError::NoTags,
            // A sender without an output chain cannot take transactions.
            _ => SenderError::UnknownSender,
        })?;
        Ok(SenderPolicy {
            incremental: resolved.is_incremental(&self.0),
            retry: resolved.retry,
            notification: resolved.notification,
        })
    }
}

impl Settings {
    /// The router service settings of a loaded configuration.
    pub fn from_config(cfg: Arc<RouterConfig>) -> Result<Settings, RouterError> {
        let backend = match &cfg.storage.url {
            StorageUrl::Sqlite { .. } if cfg.storage.url.is_memory() => {
                return Err(RouterError::Config(
                    "storage.url: an in-memory SQLite database is not durable; name a file".into(),
                ));
            }
            StorageUrl::Sqlite { path } => Backend::Sqlite(path.clone()),
            StorageUrl::Postgres { url } => Backend::Postgres(url.clone()),
        };
        let l = &cfg.rest_listener;
        let listen = koukan::HostPort::new(l.addr.host.clone(), l.addr.port).to_string();
        Ok(Settings {
            listen,
            tls: l.tls.as_ref().map(|t| Tls {
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            session_uri: l.session_uri.trim_end_matches('/').to_string(),
            service_uri: l.service_uri.trim_end_matches('/').to_string(),
            chunk_size: l.chunk_size,
            rest_id_entropy: cfg.global.rest_id_entropy,
            backend,
            senders: Arc::new(ConfigSenders(cfg.clone())),
            session_refresh_interval: cfg.storage.session_refresh_interval,
            gc_interval: cfg.storage.gc_interval,
            gc_ttl: cfg.storage.gc_ttl,
            blob_tx_refresh_interval: cfg.storage.blob_tx_refresh_interval,
            // An idle actor is only a cache of durable state: keep it as long as the
            // configured cache lifetime.
            actor_idle: cfg.storage.cache_ttl.max(Duration::from_secs(1)),
            http_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            json_limit: 64 << 20,
            smtp_in_memory: !cfg.storage.store_smtp_transactions,
            config: cfg,
        })
    }
}
