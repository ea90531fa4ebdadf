//! The SMTP client's byte stream (plain TCP, or TLS after STARTTLS) and the TLS client
//! configuration used for opportunistic STARTTLS.

use std::sync::{Arc, OnceLock};

use tokio_rustls::TlsConnector;

/// The SMTP client's byte stream: plain TCP, or TLS after STARTTLS.
pub type SmtpStream = crate::tls::ClientStream;

/// The shared connector for outbound STARTTLS.
pub fn opportunistic_connector() -> TlsConnector {
    static CONNECTOR: OnceLock<TlsConnector> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(crate::tls::AcceptAnyCert(provider)))
                .with_no_client_auth();
            TlsConnector::from(Arc::new(config))
        })
        .clone()
}
