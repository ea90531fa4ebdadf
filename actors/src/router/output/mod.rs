//! The output path: one [`Delivery`] actor per attempt drives a transaction through its
//! output chain; the [`Dequeuer`] starts attempts that are due.

pub mod add_route;
mod blob;
pub mod chains;
mod delivery;
mod dequeue;
mod dsn;
pub mod exploder;
pub mod http_hook;
mod notify;
pub mod rest_output;

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr};
use koukan::config::RouterConfig;
use koukan::filter::ChainTx;
use koukan::rest::{BODY_BLOB, BlobUri};
use koukan_db::{NewBody, Storage, TxRecord};

pub use chains::{BuildContext, BuildError, FilterFactory, Filters, OutputParams};
pub use delivery::Delivery;
pub use dequeue::{Dequeuer, Freed, Kick};

use koukan::config::FilterConfig;

use super::registry::Registry;
use super::settings::Settings;
use super::transaction::TransactionActor;

/// The raw body of the transaction `tx` runs for, shared (not copied) with a new one: by
/// blob id when known (a transaction kept in memory has no row to name it by).
pub(crate) fn shared_body(tx: &ChainTx) -> NewBody {
    match tx.body_blob {
        Some(id) => NewBody::Blob(id),
        None => NewBody::Reuse(BlobUri {
            tx: tx.rest_id.clone(),
            blob: BODY_BLOB.into(),
        }),
    }
}

/// Shared by every delivery of a router process.
pub struct Output {
    pub storage: Storage,
    pub registry: Registry,
    pub config: Arc<RouterConfig>,
    pub settings: Arc<Settings>,
    pub filters: Filters,
    /// Seconds added to the database clock: tests move time without sleeping.
    clock_offset: AtomicI64,
    active: AtomicUsize,
    max_active: usize,
    dequeuer: Mutex<Option<Addr<Dequeuer>>>,
}

impl Output {
    pub fn new(
        storage: Storage,
        registry: Registry,
        config: Arc<RouterConfig>,
        settings: Arc<Settings>,
        filters: Filters,
    ) -> Arc<Output> {
        let max_active = config.global.output_executor.max_inflight.max(1);
        Arc::new(Output {
            storage,
            registry,
            config,
            settings,
            filters,
            clock_offset: AtomicI64::new(0),
            active: AtomicUsize::new(0),
            max_active,
            dequeuer: Mutex::new(None),
        })
    }

    /// Starts the dequeuer (with `global.dequeue`).
    pub fn start_dequeuer(self: &Arc<Self>) {
        let addr = Dequeuer::new(self.clone()).start();
        *self.dequeuer.lock().unwrap() = Some(addr);
    }

    pub fn kick_dequeue(&self) {
        self.tell_dequeuer(Kick);
    }

    fn tell_dequeuer<M>(&self, msg: M)
    where
        M: actix::Message<Result = ()> + Send + 'static,
        Dequeuer: actix::Handler<M>,
    {
        if let Some(d) = &*self.dequeuer.lock().unwrap() {
            d.do_send(msg);
        }
    }

    pub fn has_capacity(&self) -> bool {
        self.active.load(Ordering::Relaxed) < self.max_active
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Runs the attempt this process holds on `record` (cut-through or dequeued); returns
    /// the transaction's actor.
    pub fn deliver(self: &Arc<Self>, record: TxRecord) -> Addr<TransactionActor> {
        let tx_actor = self.registry.start(record.clone());
        let this = self.clone();
        let actor = tx_actor.clone();
        this.active.fetch_add(1, Ordering::Relaxed);
        // The actor may predate this attempt (it served the previous one, or a long poll):
        // give it the record that holds the lease, and run on whatever is newest.
        actix::spawn(async move {
            let record = actor.send(super::transaction::Adopt(record)).await;
            match record
                .ok()
                .and_then(|r| Delivery::new(this.clone(), actor, r))
            {
                Some(d) => {
                    d.start();
                }
                None => this.delivery_ended(),
            }
        });
        tx_actor
    }

    pub(crate) fn delivery_ended(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.tell_dequeuer(Freed);
    }

    /// The database clock (plus the test offset), Unix seconds.
    pub async fn now(&self) -> i64 {
        let db = match self.storage.now().await {
            Ok(t) => t,
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        };
        db + self.clock_offset.load(Ordering::Relaxed)
    }

    /// Moves this process's clock (tests of retry timing).
    pub fn shift_clock(&self, secs: i64) {
        self.clock_offset.fetch_add(secs, Ordering::Relaxed);
    }

    /// The longest `bug_retry` of any chain: used when an attempt dies without knowing its own.
    pub(crate) fn bug_retry_hint(&self) -> Duration {
        self.config
            .endpoints
            .iter()
            .filter_map(|e| e.retry_params().map(|r| r.bug_retry))
            .max()
            .unwrap_or(Duration::from_secs(3600))
    }
}

/// The filters this build provides, by configuration name.
pub fn builtin_filters() -> Filters {
    use koukan::filter as f;
    let mut filters = Filters::default();
    fn invalid(ctx: &BuildContext<'_>, e: impl std::fmt::Display) -> BuildError {
        BuildError::Invalid {
            path: ctx.path.to_string(),
            reason: e.to_string(),
        }
    }
    fn mismatch(ctx: &BuildContext<'_>) -> BuildError {
        invalid(ctx, "entry does not match its filter name")
    }
    type Built = Result<Option<Box<dyn koukan::filter::Filter>>, BuildError>;
    filters.register(
        "rest_output",
        |cfg: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            match cfg {
                FilterConfig::RestOutput(c) => {
                    Ok(Some(Box::new(rest_output::RestOutput::new(c.clone()))))
                }
                _ => Err(mismatch(ctx)),
            }
        },
    );
    filters.register(
        "exploder",
        |cfg: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            match cfg {
                FilterConfig::Exploder(c) => {
                    let upstream = ctx
                        .sender
                        .upstream(ctx.config)
                        .map_err(|e| invalid(ctx, format!("exploder upstream sender: {e}")))?;
                    let sender = koukan::Sender::new(upstream.name, upstream.tag);
                    Ok(Some(Box::new(exploder::Exploder::new(
                        ctx.output.clone(),
                        c,
                        sender,
                    ))))
                }
                _ => Err(mismatch(ctx)),
            }
        },
    );
    filters.register(
        "add_route",
        |cfg: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            match cfg {
                FilterConfig::AddRoute(c) => add_route::AddRoute::new(ctx.output, c)
                    .map(|r| r.map(|r| Box::new(r) as _))
                    .map_err(|e| invalid(ctx, format!("add_route: {e}"))),
                _ => Err(mismatch(ctx)),
            }
        },
    );
    filters.register(
        "http_hook",
        |cfg: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            match cfg {
                FilterConfig::Plugin { name, yaml } if name == "http_hook" => {
                    http_hook::HttpHookConfig::parse(yaml)
                        .map(|c| Some(Box::new(http_hook::HttpHook::new(c)) as _))
                        .map_err(|e| invalid(ctx, e))
                }
                _ => Err(mismatch(ctx)),
            }
        },
    );
    filters.register(
        "router",
        |cfg: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            match cfg {
                FilterConfig::Router(c) => f::router::Router::new(c, ctx.config, ctx.marks)
                    .map(|r| Some(Box::new(r) as _))
                    .map_err(|e| invalid(ctx, e)),
                _ => Err(mismatch(ctx)),
            }
        },
    );
    filters.register(
        "dns_resolution",
        |cfg: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            match cfg {
                FilterConfig::DnsResolution(c) => f::dns_resolution::DnsResolution::new(c)
                    .map(|r| Some(Box::new(r) as _))
                    .map_err(|e| invalid(ctx, e)),
                _ => Err(mismatch(ctx)),
            }
        },
    );
    filters.register(
        "received_header",
        |cfg: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            match cfg {
                FilterConfig::ReceivedHeader(c) => f::received_header::ReceivedHeader::new(c)
                    .map(|r| Some(Box::new(r) as _))
                    .map_err(|e| invalid(ctx, e)),
                _ => Err(mismatch(ctx)),
            }
        },
    );
    filters.register(
        "dkim_sign",
        |cfg: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            match cfg {
                // Without a key the filter is left out, as configured.
                FilterConfig::DkimSign(c) if !c.is_enabled() => Ok(None),
                FilterConfig::DkimSign(c) => f::dkim_sign::DkimSign::new(c)
                    .map(|r| Some(Box::new(r) as _))
                    .map_err(|e| invalid(ctx, e)),
                _ => Err(mismatch(ctx)),
            }
        },
    );
    filters.register(
        "message_builder",
        |_: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            f::message_builder::MessageBuilder::new()
                .map(|r| Some(Box::new(r) as _))
                .map_err(|e| invalid(ctx, e))
        },
    );
    // The original's example plugin, built in as a pass-through.
    filters.register("hello", |_: &FilterConfig, _: &BuildContext<'_>| -> Built {
        Ok(Some(Box::new(f::hello::Hello)))
    });
    filters.register(
        "message_parser",
        |_: &FilterConfig, ctx: &BuildContext<'_>| -> Built {
            f::message_parser::MessageParser::new()
                .map(|r| Some(Box::new(r) as _))
                .map_err(|e| invalid(ctx, e))
        },
    );
    filters
}
