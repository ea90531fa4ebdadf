//! SMTP listeners → router (`spec/gateway.md` §2–§4, `rest-api.md` §10).
//!
//! One listener per `smtp_listener.services` entry. Every accepted connection becomes a
//! [`session`] actor on one of a few worker arbiters; the session drives one router
//! transaction per SMTP transaction through the REST client ([`crate::client`]).

mod auth;
mod data;
mod ehlo;
mod mail;
mod proxy;
mod rcpt;
mod reply;
mod session;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix::Actor;
use actix_rt::Arbiter;
use koukan::config::{GatewayConfig, GatewayRestOutput, SmtpServiceConfig};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::client::ClientSettings;

pub use auth::{Secrets, SecretsError};

/// Longest a shutdown waits for sessions to finish their current command.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum InboundError {
    #[error("smtp_listener.services[{index}]: no rest_output named {name:?}")]
    NoEndpoint { index: usize, name: String },
    #[error("smtp_listener.services[{index}]: cannot resolve {addr}: {source}")]
    Resolve {
        index: usize,
        addr: String,
        source: std::io::Error,
    },
    #[error("smtp_listener.services[{index}]: cannot bind {addr}: {source}")]
    Bind {
        index: usize,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("smtp_listener.services[{index}]: TLS: {detail}")]
    Tls { index: usize, detail: String },
    #[error("smtp_listener.services[{index}]: smtps: true needs cert and key")]
    SmtpsWithoutCert { index: usize },
    #[error("smtp_listener.services[{index}]: auth_secrets: {source}")]
    Secrets { index: usize, source: SecretsError },
}

/// Everything a session of one service needs, shared by its sessions.
pub(crate) struct Service {
    pub cfg: SmtpServiceConfig,
    pub rest: GatewayRestOutput,
    pub client: ClientSettings,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub secrets: Option<Secrets>,
    /// Greeting and EHLO name.
    pub hostname: String,
    pub shared: Arc<Shared>,
}

/// State common to all listeners of one [`SmtpListeners`].
pub(crate) struct Shared {
    pub shutdown: watch::Receiver<bool>,
    pub sessions: AtomicUsize,
    pub idle: Notify,
}

impl Shared {
    /// Counts a session for the lifetime of the guard.
    pub fn enter(self: &Arc<Self>) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        SessionGuard(self.clone())
    }
}

pub(crate) struct SessionGuard(Arc<Shared>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0.sessions.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The running SMTP listeners of a gateway.
pub struct SmtpListeners {
    /// Bound addresses, in `smtp_services` order.
    pub addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    shared: Arc<Shared>,
    workers: Vec<Arbiter>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl SmtpListeners {
    /// Binds every `smtp_services` entry (port 0 allowed: `addrs` has the real ports, in
    /// config order).
    pub async fn start(cfg: Arc<GatewayConfig>) -> Result<SmtpListeners, InboundError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (tx, rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            shutdown: rx,
            sessions: AtomicUsize::new(0),
            idle: Notify::new(),
        });

        let mut services = Vec::new();
        let mut listeners = Vec::new();
        for (index, s) in cfg.smtp_services.iter().enumerate() {
            let rest = cfg
                .rest_output(&s.endpoint)
                .ok_or_else(|| InboundError::NoEndpoint {
                    index,
                    name: s.endpoint.clone(),
                })?
                .clone();
            let tls = match &s.tls {
                Some(files) => Some(
                    tls::server_config(files)
                        .map_err(|detail| InboundError::Tls { index, detail })?,
                ),
                None if s.smtps => return Err(InboundError::SmtpsWithoutCert { index }),
                None => None,
            };
            let secrets = match &s.auth_secrets {
                Some(p) => Some(
                    Secrets::load(p).map_err(|source| InboundError::Secrets { index, source })?,
                ),
                None => None,
            };
            let host = format!("{}:{}", s.addr.host, s.addr.port);
            let addr = tokio::net::lookup_host(&host)
                .await
                .and_then(|mut a| {
                    a.next().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                    })
                })
                .map_err(|source| InboundError::Resolve {
                    index,
                    addr: host.clone(),
                    source,
                })?;
            let listener = bind(addr).map_err(|source| InboundError::Bind {
                index,
                addr,
                source,
            })?;
            services.push(Arc::new(Service {
                client: ClientSettings::from(&rest),
                cfg: s.clone(),
                rest,
                tls,
                secrets,
                hostname: s.hostname.clone().unwrap_or_else(hostname),
                shared: shared.clone(),
            }));
            listeners.push(listener);
        }

        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers: Vec<Arbiter> = (0..n).map(|_| Arbiter::new()).collect();
        let handles: Vec<_> = workers.iter().map(Arbiter::handle).collect();

        let mut addrs = Vec::new();
        for (svc, listener) in services.into_iter().zip(listeners) {
            addrs.push(listener.local_addr().expect("bound socket has an address"));
            actix_rt::spawn(accept_loop(svc, listener, handles.clone()));
        }
        Ok(SmtpListeners {
            addrs,
            shutdown: tx,
            shared,
            workers,
        })
    }

    /// Stop accepting; let sessions finish their current command; cancel open router
    /// transactions.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let wait = async {
            loop {
                let idle = self.shared.idle.notified();
                if self.shared.sessions.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        if actix_rt::time::timeout(SHUTDOWN_GRACE, wait).await.is_err() {
            tracing::warn!(
                sessions = self.shared.sessions.load(Ordering::SeqCst),
                "SMTP sessions still open after the shutdown grace period"
            );
        }
        for w in &self.workers {
            w.stop();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    svc: Arc<Service>,
    listener: TcpListener,
    workers: Vec<actix_rt::ArbiterHandle>,
) {
    let mut shutdown = svc.shared.shutdown.clone();
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "SMTP accept failed");
                actix_rt::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let guard = svc.shared.enter();
        let svc = svc.clone();
        let worker = &workers[next % workers.len()];
        next = next.wrapping_add(1);
        // The session actor is created on the worker's thread; only Send things cross.
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(_) => continue,
        };
        session::SessionActor::start_in_arbiter(worker, move |_| {
            session::SessionActor::new(svc, std_stream, peer, guard)
        });
    }
}
