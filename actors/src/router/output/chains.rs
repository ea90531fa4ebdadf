//! Output chains from the configuration: the filter registry (built-ins and plugins) and
//! the per-attempt chain of a sender.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use koukan::Backoff;
use koukan::config::{FilterConfig, NotificationConfig, ResolvedSender, RouterConfig};
use koukan::filter::{Chain, Filter};
use thiserror::Error;

use super::Output;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BuildError {
    #[error("{path}: filter \"{name}\" is not available in this build")]
    Unavailable { path: String, name: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("sender {sender:?}: {reason}")]
    Sender { sender: String, reason: String },
}

/// What a filter factory may use.
pub struct BuildContext<'a> {
    pub config: &'a RouterConfig,
    /// The sender whose chain is being built.
    pub sender: &'a ResolvedSender,
    pub output: &'a Arc<Output>,
    /// Key path of the entry (for errors).
    pub path: &'a str,
    /// Shared by the `router` filters of one chain: which recipients are routed.
    pub marks: &'a koukan::filter::router::RoutingMarks,
}

/// Builds one kind of filter. `Ok(None)` leaves the entry out of the chain.
pub trait FilterFactory: Send + Sync {
    fn build(
        &self,
        cfg: &FilterConfig,
        ctx: &BuildContext<'_>,
    ) -> Result<Option<Box<dyn Filter>>, BuildError>;
}

impl<F> FilterFactory for F
where
    F: Fn(&FilterConfig, &BuildContext<'_>) -> Result<Option<Box<dyn Filter>>, BuildError>
        + Send
        + Sync,
{
    fn build(
        &self,
        cfg: &FilterConfig,
        ctx: &BuildContext<'_>,
    ) -> Result<Option<Box<dyn Filter>>, BuildError> {
        self(cfg, ctx)
    }
}

/// Filter names and their factories: the built-ins plus whatever the program registers.
#[derive(Clone, Default)]
pub struct Filters {
    factories: BTreeMap<String, Arc<dyn FilterFactory>>,
}

impl Filters {
    pub fn register(&mut self, name: impl Into<String>, factory: impl FilterFactory + 'static) {
        self.factories.insert(name.into(), Arc::new(factory));
    }

    /// Adds every factory of `other` (replacing same-named ones).
    pub fn extend(&mut self, other: Filters) {
        self.factories.extend(other.factories);
    }

    /// Registered names (for `LoadOptions::extra_filters`).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// Every chain entry of the configuration has a factory (checked at start, so a
    /// missing filter is a config error, not a failed delivery).
    pub fn check(&self, config: &RouterConfig) -> Result<(), BuildError> {
        for (i, e) in config.endpoints.iter().enumerate() {
            for (j, f) in e.chain.iter().enumerate() {
                if !self.contains(f.name()) {
                    return Err(BuildError::Unavailable {
                        path: format!("endpoint[{i}].chain[{j}].filter"),
                        name: f.name().to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Option<&Arc<dyn FilterFactory>> {
        self.factories.get(name)
    }

    /// Builds one chain entry (`None` when the entry is disabled by its configuration).
    pub fn build(
        &self,
        cfg: &FilterConfig,
        ctx: &BuildContext<'_>,
    ) -> Result<Option<Box<dyn Filter>>, BuildError> {
        let factory = self
            .get(cfg.name())
            .ok_or_else(|| BuildError::Unavailable {
                path: format!("{}.filter", ctx.path),
                name: cfg.name().to_string(),
            })?;
        factory.build(cfg, ctx)
    }
}

/// How the attempts of one output chain are driven (`endpoint[].output_handler`).
#[derive(Clone, Debug)]
pub struct OutputParams {
    pub downstream_timeout: Duration,
    pub upstream_refresh: Duration,
    /// Retry timing; the defaults when `retry_params` is absent, so a transaction with
    /// `retry` never retries in a tight loop.
    pub backoff: Backoff,
    pub bug_retry: Duration,
    pub notification: Option<NotificationConfig>,
}

impl Default for OutputParams {
    fn default() -> Self {
        OutputParams {
            downstream_timeout: Duration::from_secs(60),
            upstream_refresh: Duration::from_secs(30),
            backoff: Backoff::default(),
            bug_retry: Duration::from_secs(3600),
            notification: None,
        }
    }
}

/// A sender's chain, built for one attempt.
pub struct OutputChain {
    pub chain: Chain,
    pub params: OutputParams,
    pub sender: ResolvedSender,
}

/// Builds the output chain of `(name, tag)` from the current configuration.
pub fn build(
    output: &Arc<Output>,
    name: &str,
    tag: Option<&str>,
) -> Result<OutputChain, BuildError> {
    let config = &output.config;
    let sender = config
        .resolve_sender(name, tag)
        // A stored tag the configuration no longer has: fall back to the sender's own chain.
        .or_else(|_| config.resolve_sender(name, None))
        .map_err(|e| BuildError::Sender {
            sender: name.to_string(),
            reason: e.to_string(),
        })?;
    let (index, endpoint) = config
        .endpoints
        .iter()
        .enumerate()
        .find(|(_, e)| e.name == sender.output_chain)
        .ok_or_else(|| BuildError::Sender {
            sender: name.to_string(),
            reason: format!("no output chain {:?}", sender.output_chain),
        })?;
    let mut filters: Vec<Box<dyn Filter>> = Vec::with_capacity(endpoint.chain.len());
    let marks = koukan::filter::router::RoutingMarks::default();
    for (j, f) in endpoint.chain.iter().enumerate() {
        let path = format!("endpoint[{index}].chain[{j}]");
        let ctx = BuildContext {
            config,
            sender: &sender,
            output,
            path: &path,
            marks: &marks,
        };
        if let Some(filter) = output.filters.build(f, &ctx)? {
            filters.push(filter);
        }
    }
    let mut params = OutputParams::default();
    if let Some(oh) = &endpoint.output_handler {
        params.downstream_timeout = oh.downstream_timeout;
        params.upstream_refresh = oh.upstream_refresh;
        if let Some(r) = &oh.retry_params {
            params.backoff = r.backoff();
            params.bug_retry = r.bug_retry;
        }
        params.notification = oh.notification.clone();
    }
    Ok(OutputChain {
        chain: Chain::new(filters),
        params,
        sender,
    })
}
