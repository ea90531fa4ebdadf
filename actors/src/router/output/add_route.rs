//! `add_route` (`filters.md` §7.1): forks the transaction to another sender's output chain,
//! in addition to the primary route (e.g. a system of record).
//!
//! * Synchronous: the fork's chain runs inline on every update; if it fails anything, its
//!   failure answers the primary's open requests and the primary chain stops there.
//! * Store-and-forward: once the message is complete, a separate stored transaction of the
//!   fork's sender is created (unleased, so the dequeuer delivers and retries it per that
//!   sender's configuration); the primary is never affected by how it fares.

use std::sync::Arc;

use bytes::BytesMut;
use koukan::config::AddRouteFilter;
use koukan::filter::{ChainTx, Filter, LocalFuture, MessageBody, Next};
use koukan::transaction::Body;
use koukan::{Response, Sender, Transaction};
use koukan_db::{NewBody, NewTransaction};

use super::chains::{self, BuildError, OutputChain};
use super::{Output, shared_body};

const SUFFIX: &str = " (AddRouteFilter upstream)";

fn noop() -> Response {
    Response::new(250, "ok (AddRouteFilter noop)")
}

pub struct AddRoute {
    output: Arc<Output>,
    sender: Sender,
    store_and_forward: bool,
    /// Synchronous mode: the fork's chain and its view of the transaction.
    fork: Option<(OutputChain, ChainTx)>,
    /// Store-and-forward mode: the fork transaction was stored.
    stored: bool,
}

impl AddRoute {
    /// `Ok(None)` when the entry has no sender (disabled, as the configuration warns).
    pub fn new(output: &Arc<Output>, cfg: &AddRouteFilter) -> Result<Option<Self>, BuildError> {
        let Some(name) = cfg.sender.clone() else {
            return Ok(None);
        };
        let sender = Sender::new(name, cfg.tag.clone());
        let fork = if cfg.store_and_forward {
            None
        } else {
            let chain = chains::build(output, &sender.name, sender.tag.as_deref())?;
            let view = ChainTx {
                tx: Transaction {
                    sender: Some(sender.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            Some((chain, view))
        };
        Ok(Some(AddRoute {
            output: output.clone(),
            sender,
            store_and_forward: cfg.store_and_forward,
            fork,
            stored: false,
        }))
    }

    /// Runs the fork's chain on the primary's envelope and body; its failure (if any)
    /// answers the primary's open requests. Returns whether the primary may go on.
    async fn run_fork(&mut self, tx: &mut ChainTx) -> bool {
        let Some((out, view)) = self.fork.as_mut() else {
            return true;
        };
        if tx.tx.cancelled && view.tx.data_response.is_some() {
            return true;
        }
        view.rest_id = tx.rest_id.clone();
        view.tx.remote_host = tx.tx.remote_host.clone();
        view.tx.local_host = tx.tx.local_host.clone();
        view.tx.mail_from = tx.tx.mail_from.clone();
        view.tx.rcpt_to = tx.tx.rcpt_to.clone();
        view.tx.smtp_meta = tx.tx.smtp_meta.clone();
        view.tx.cancelled = tx.tx.cancelled;
        view.body = tx.body.clone();
        view.signals = tx.signals.clone();
        view.heartbeat = tx.heartbeat;
        out.chain.update(view).await;
        let failed = view.mail_failed()
            || view.tx.rcpt_response.iter().flatten().any(Response::err)
            || view.tx.data_response.as_ref().is_some_and(Response::err);
        if !failed || tx.tx.cancelled {
            return true;
        }
        let mark = |r: Option<&Response>| {
            let r = r.cloned().unwrap_or_else(noop);
            Response::new(r.code, format!("{}{SUFFIX}", r.message))
        };
        if tx.tx.mail_from.is_some() && tx.tx.mail_response.is_none() {
            tx.tx.mail_response = Some(mark(view.tx.mail_response.as_ref()));
        }
        for i in tx.pending_rcpts().collect::<Vec<_>>() {
            let r = mark(view.rcpt_response(i));
            tx.set_rcpt_response(i, r);
        }
        if tx.body_finalized() && tx.tx.data_response.is_none() {
            tx.tx.data_response = Some(mark(view.tx.data_response.as_ref()));
        }
        false
    }

    /// Stores the fork transaction once the message is complete. An error is a temporary
    /// failure of the primary: accepting without the fork stored would lose that copy.
    async fn store(&mut self, tx: &mut ChainTx) -> Result<(), String> {
        if self.stored
            || tx.tx.cancelled
            || !tx.body_finalized()
            || tx.tx.mail_from.is_none()
            || tx.tx.rcpt_to.is_empty()
        {
            return Ok(());
        }
        let resolved = self
            .output
            .config
            .resolve_sender(&self.sender.name, self.sender.tag.as_deref())
            .map_err(|e| e.to_string())?;
        let body = match (&tx.tx.body, &tx.body) {
            // The stored raw body is shared, not copied.
            (Some(Body::Message(_)), _) if tx.body_blob.is_some() || !tx.rest_id.is_empty() => {
                shared_body(tx)
            }
            (_, Some(MessageBody::Builder { .. })) => {
                return Err("a message-builder body cannot be forked (render it first)".into());
            }
            (_, Some(body)) => NewBody::Inline(read_all(body).await?),
            (_, None) => return Ok(()),
        };
        let new = NewTransaction {
            rest_id: koukan::rest_id::new_rest_id(self.output.settings.rest_id_entropy),
            tx: Transaction {
                remote_host: tx.tx.remote_host.clone(),
                local_host: tx.tx.local_host.clone(),
                mail_from: tx.tx.mail_from.clone(),
                rcpt_to: tx.tx.rcpt_to.clone(),
                smtp_meta: tx.tx.smtp_meta.clone(),
                sender: Some(self.sender.clone()),
                retry: resolved.retry,
                notification: resolved.notification,
                ..Default::default()
            },
            body,
            leased: false,
            start_attempt: false,
        };
        self.output
            .storage
            .create(new)
            .await
            .map_err(|e| e.to_string())?;
        self.stored = true;
        self.output.kick_dequeue();
        Ok(())
    }
}

async fn read_all(body: &MessageBody) -> Result<bytes::Bytes, String> {
    let mut reader = body.reader(1 << 16);
    let mut buf = BytesMut::new();
    while let Some(chunk) = reader.next().await.map_err(|e| e.to_string())? {
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

impl Filter for AddRoute {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if self.store_and_forward {
                if let Err(e) = self.store(tx).await {
                    tracing::warn!(rest_id = %tx.rest_id, sender = %self.sender.name, "add_route: storing the fork: {e}");
                    tx.fill_inflight(&Response::new(
                        451,
                        "4.3.0 add_route: storing the fork failed",
                    ));
                    return;
                }
            } else if !self.run_fork(tx).await {
                return;
            }
            next.run(tx).await
        })
    }
}
