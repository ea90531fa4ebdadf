//! STARTTLS and implicit TLS (`spec/gateway.md` §4).

use std::sync::Arc;

use koukan::config::TlsFiles;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::session::{Session, Stop};

/// Server context from the configured certificate chain and key; no client certificates.
pub(super) fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

impl Session {
    pub(super) fn starttls_offered(&self) -> bool {
        self.svc.tls.is_some() && !self.tls
    }

    /// Handshake on the current stream, bounded by the command timeout.
    pub(super) async fn accept_tls(&mut self) -> Result<(), Stop> {
        let config = self.svc.tls.clone().expect("TLS configured");
        let io = self.conn.detach();
        let handshake = TlsAcceptor::from(config).accept(io);
        match actix_rt::time::timeout(self.svc.cfg.command_timeout, handshake).await {
            Ok(Ok(stream)) => {
                self.conn.io = Box::new(stream);
                self.tls = true;
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                Err(Stop::Done)
            }
            Err(_) => Err(Stop::Done),
        }
    }

    pub(super) async fn starttls(&mut self) -> Result<(), Stop> {
        if self.tls {
            self.reply(503, "5.5.1", "Error: TLS already active");
            return Ok(());
        }
        if self.svc.tls.is_none() {
            self.reply(454, "4.7.0", "TLS not available");
            return Ok(());
        }
        self.reply(220, "2.0.0", "Ready to start TLS");
        self.conn.flush().await.map_err(Stop::Io)?;
        // Anything pipelined after STARTTLS was sent in plaintext: it must not be
        // taken as coming from inside TLS (RFC 3207 §4.2).
        self.conn.rbuf.clear();
        // The session starts over (RFC 3207 §4.2): the transaction is cancelled.
        self.reset_tx().await;
        self.helo = None;
        self.auth = None;
        self.accept_tls().await
    }
}
