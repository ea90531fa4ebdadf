//! The keep-alive connection pool behind every [`RestTransaction`](super::RestTransaction).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use koukan::config::TlsVerify;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::ClientError;

/// Connections kept per pool; hanging GETs each hold one while they wait.
const MAX_CONNECTIONS: usize = 4096;
/// Idle keep-alive connections are closed after this.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Where the system CA bundle usually lives (no native-roots crate in the graph).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// A cheap handle on an awc client; clones share one connection pool.
#[derive(Clone)]
pub struct HttpClient {
    pub(crate) awc: awc::Client,
}

thread_local! {
    static POOLS: RefCell<Vec<(TlsVerify, HttpClient)>> = const { RefCell::new(Vec::new()) };
}

impl HttpClient {
    /// This thread's pool for `verify`, created on first use. awc clients cannot cross
    /// threads, so "shared" means shared by every transaction of one arbiter.
    pub fn shared(verify: &TlsVerify) -> Result<HttpClient, ClientError> {
        if let Some(c) =
            POOLS.with_borrow(|p| p.iter().find(|(v, _)| v == verify).map(|(_, c)| c.clone()))
        {
            return Ok(c);
        }
        let c = HttpClient::new(verify)?;
        POOLS.with_borrow_mut(|p| p.push((verify.clone(), c.clone())));
        Ok(c)
    }

    /// A private pool (tests, or a caller that wants its own).
    pub fn new(verify: &TlsVerify) -> Result<HttpClient, ClientError> {
        let tls = tls_config(verify)?;
        let connector = awc::Connector::new()
            .rustls_0_23(Arc::new(tls))
            .limit(MAX_CONNECTIONS)
            .conn_keep_alive(KEEP_ALIVE)
            .timeout(Duration::from_secs(10));
        let awc = awc::Client::builder()
            .connector(connector)
            // Each request sets its own timeout.
            .disable_timeout()
            .max_redirects(10)
            .finish();
        Ok(HttpClient { awc })
    }
}

fn tls_err(detail: impl std::fmt::Display) -> ClientError {
    ClientError::Tls {
        detail: detail.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(path: &std::path::Path, roots: &mut RootCertStore) -> Result<(), ClientError> {
    let pem = std::fs::read(path).map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
        // Bundles carry the odd certificate rustls cannot use; skipping it is harmless.
        let _ = roots.add(cert);
    }
    Ok(())
}

/// A rustls client configuration honouring `verify` (also used by the SMTP tools).
pub fn tls_client_config(verify: &TlsVerify) -> Result<ClientConfig, ClientError> {
    tls_config(verify)
}

fn tls_config(verify: &TlsVerify) -> Result<ClientConfig, ClientError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let config = match verify {
        TlsVerify::Disabled => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::tls::AcceptAnyCert(provider())))
            .with_no_client_auth(),
        TlsVerify::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            load_roots(path, &mut roots)?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsVerify::System => {
            let mut roots = RootCertStore::empty();
            if let Some(p) = SYSTEM_BUNDLES
                .iter()
                .map(std::path::Path::new)
                .find(|p| p.exists())
            {
                load_roots(p, &mut roots)?;
            }
            // No bundle: plain HTTP still works; HTTPS fails at connect with a clear error.
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(config)
}
