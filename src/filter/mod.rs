//! Output chains: the filters a transaction passes through on its way out, and the engine
//! that runs them.
//!
//! A chain is middleware: each filter gets the transaction and `next`, the rest of the
//! chain. It may look at or change the transaction before calling `next` (route it, add a
//! header, reject a recipient by giving it a response) and after (inspect what upstream
//! answered). The last filter (`rest_output`, `exploder`) produces the responses.
//!
//! The chain runs once per update of the stored transaction: with the envelope and body as
//! they are now and the responses produced so far. Filters keep their own state between
//! runs (a DNS answer, an upstream transaction); a recipient that already has a response is
//! settled and filters leave it alone.

mod body;
pub mod dkim_sign;
pub mod dns_resolution;
mod error;
pub mod hello;
pub mod message_builder;
pub mod message_parser;
pub mod received_header;
pub mod router;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

pub use body::{BlobSource, BodyError, BodyReader, MemoryBlob, MessageBody, Segment};
pub use error::FilterBuildError;

use crate::config::RouteOptions;
use crate::{HostPort, Response, Sender, Transaction};

pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Where `rest_output` sends the transaction (set by the recipient router).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Route {
    /// Transaction-creation URL of the destination.
    pub endpoint: Option<String>,
    /// Sender/tag to present upstream.
    pub sender: Option<Sender>,
    pub options: RouteOptions,
    /// Next-hop hosts in order (resolved by `dns_resolution`).
    pub resolution: Option<Vec<HostPort>>,
    /// `remote_host`/`smtp_meta` overrides of the destination sender (router short-circuit).
    pub remote_host: Option<HostPort>,
    pub smtp_meta: Option<serde_json::Map<String, Value>>,
}

/// One run of the chain: the transaction as it is now.
#[derive(Clone, Debug, Default)]
pub struct ChainTx {
    /// Public id of the stored transaction (for references to its blobs).
    pub rest_id: String,
    /// Storage id of the raw body's blob, for sharing it by id (the only way for a
    /// transaction kept in memory, which has no row to name it by).
    pub body_blob: Option<i64>,
    /// Envelope and the responses so far (`tx.body` is the stored state; read `body`).
    pub tx: Transaction,
    /// The message as it leaves this point of the chain.
    pub body: Option<MessageBody>,
    pub route: Route,
    /// Signals published by filters, keyed by filter name.
    pub signals: BTreeMap<String, Value>,
    /// Nothing changed downstream: a keep-alive run (e.g. `rest_output` pings upstream).
    pub heartbeat: bool,
    /// The body parsed for a REST receiver (`message_parser`, route option `receive_parsing`);
    /// `body` stays the raw message, sent after the parsed parts.
    pub parsed: Option<message_parser::ParsedMessage>,
}

impl ChainTx {
    /// The body is complete.
    pub fn body_finalized(&self) -> bool {
        self.body.as_ref().is_some_and(MessageBody::finalized)
    }

    pub fn mail_failed(&self) -> bool {
        self.tx.mail_response.as_ref().is_some_and(Response::err)
    }

    pub fn rcpt_response(&self, i: usize) -> Option<&Response> {
        self.tx.rcpt_response.get(i).and_then(Option::as_ref)
    }

    pub fn set_rcpt_response(&mut self, i: usize, r: Response) {
        if self.tx.rcpt_response.len() <= i {
            self.tx.rcpt_response.resize(i + 1, None);
        }
        self.tx.rcpt_response[i] = Some(r);
    }

    /// Some recipient was accepted.
    pub fn rcpt_ok(&self) -> bool {
        self.tx.rcpt_response.iter().flatten().any(Response::ok)
    }

    /// Recipients still waiting for a response.
    pub fn pending_rcpts(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.tx.rcpt_to.len()).filter(|i| self.rcpt_response(*i).is_none())
    }

    /// A request can still make progress but has no response: MAIL; a recipient (unless
    /// MAIL failed); the body once complete, if a recipient was accepted.
    pub fn inflight(&self) -> bool {
        if self.tx.mail_from.is_some() && self.tx.mail_response.is_none() {
            return true;
        }
        if self.mail_failed() {
            return false;
        }
        if self.pending_rcpts().next().is_some() {
            return true;
        }
        self.body_finalized() && self.rcpt_ok() && self.tx.data_response.is_none()
    }

    /// Gives every request that can no longer succeed its precondition failure: recipients
    /// after a failed MAIL, the body when every recipient failed.
    pub fn fill_preconditions(&mut self) {
        if self.mail_failed() {
            for i in self.pending_rcpts().collect::<Vec<_>>() {
                self.set_rcpt_response(i, Response::new(503, "5.5.1 failed precondition: MAIL"));
            }
        }
        let all_answered = self.pending_rcpts().next().is_none() && !self.tx.rcpt_to.is_empty();
        if self.body.is_some() && self.tx.data_response.is_none() && all_answered && !self.rcpt_ok()
        {
            self.tx.data_response = Some(Response::new(
                503,
                "5.5.1 failed precondition: all rcpts failed",
            ));
        }
    }

    /// Answers every request still in flight with `r` (a failure that ends the attempt).
    pub fn fill_inflight(&mut self, r: &Response) {
        if self.tx.mail_from.is_some() && self.tx.mail_response.is_none() {
            self.tx.mail_response = Some(r.clone());
        }
        self.fill_preconditions();
        for i in self.pending_rcpts().collect::<Vec<_>>() {
            self.set_rcpt_response(i, r.clone());
        }
        if self.body_finalized() && self.tx.data_response.is_none() {
            self.tx.data_response = Some(r.clone());
        }
    }
}

/// One stage of an output chain.
pub trait Filter {
    /// Runs this stage; call `next.run(tx)` to pass the transaction on.
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()>;
}

/// The rest of the chain after the current filter.
pub struct Next<'a>(&'a mut [Box<dyn Filter>]);

impl<'a> Next<'a> {
    pub fn run(self, tx: &'a mut ChainTx) -> LocalFuture<'a, ()> {
        match self.0.split_first_mut() {
            Some((first, rest)) => first.on_update(tx, Next(rest)),
            None => Box::pin(async {}),
        }
    }

    /// Nothing follows (the current filter must produce the responses).
    pub fn is_end(&self) -> bool {
        self.0.is_empty()
    }
}

/// The filters of one output chain, built for one transaction's attempt.
#[derive(Default)]
pub struct Chain {
    filters: Vec<Box<dyn Filter>>,
}

impl Chain {
    pub fn new(filters: Vec<Box<dyn Filter>>) -> Self {
        Chain { filters }
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// One pass through every filter.
    pub async fn update(&mut self, tx: &mut ChainTx) {
        Next(&mut self.filters).run(tx).await;
        tx.fill_preconditions();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mailbox;

    /// Rejects recipients at `bad.example` before the rest of the chain sees them.
    struct RejectBad;
    impl Filter for RejectBad {
        fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
            Box::pin(async move {
                for i in tx.pending_rcpts().collect::<Vec<_>>() {
                    if tx.tx.rcpt_to[i].domain() == Some("bad.example") {
                        tx.set_rcpt_response(i, Response::new(550, "5.1.1 no"));
                    }
                }
                next.run(tx).await
            })
        }
    }

    /// Accepts whatever is still pending, and counts its runs.
    struct AcceptAll(usize);
    impl Filter for AcceptAll {
        fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
            Box::pin(async move {
                assert!(next.is_end());
                self.0 += 1;
                if tx.tx.mail_from.is_some() && tx.tx.mail_response.is_none() {
                    tx.tx.mail_response = Some(Response::new(250, "ok"));
                }
                for i in tx.pending_rcpts().collect::<Vec<_>>() {
                    tx.set_rcpt_response(i, Response::new(250, "ok"));
                }
                if tx.body_finalized() && tx.rcpt_ok() {
                    tx.tx.data_response = Some(Response::new(250, "queued"));
                }
            })
        }
    }

    fn run(chain: &mut Chain, tx: &mut ChainTx) {
        futures_util::FutureExt::now_or_never(chain.update(tx)).unwrap();
    }

    #[test]
    fn middleware_order_and_preconditions() {
        let mut chain = Chain::new(vec![Box::new(RejectBad), Box::new(AcceptAll(0))]);
        let mut tx = ChainTx::default();
        tx.tx.mail_from = Some(Mailbox::new("a@x"));
        tx.tx.rcpt_to = vec![
            Mailbox::new("b@bad.example"),
            Mailbox::new("c@good.example"),
        ];
        run(&mut chain, &mut tx);
        assert_eq!(tx.rcpt_response(0).unwrap().code, 550);
        assert_eq!(tx.rcpt_response(1).unwrap().code, 250);
        assert!(!tx.inflight());
        tx.body = Some(MessageBody::bytes("Subject: x\r\n\r\nx\r\n"));
        assert!(tx.inflight());
        run(&mut chain, &mut tx);
        assert_eq!(tx.tx.data_response.as_ref().unwrap().code, 250);
        assert!(!tx.inflight());

        // Every recipient rejected: the body fails its precondition.
        let mut tx = ChainTx::default();
        tx.tx.mail_from = Some(Mailbox::new("a@x"));
        tx.tx.rcpt_to = vec![Mailbox::new("b@bad.example")];
        tx.body = Some(MessageBody::bytes("x"));
        let mut chain = Chain::new(vec![Box::new(RejectBad)]);
        run(&mut chain, &mut tx);
        assert_eq!(tx.tx.data_response.as_ref().unwrap().code, 503);
    }

    #[test]
    fn fill_inflight_respects_mail_failure() {
        let mut tx = ChainTx::default();
        tx.tx.mail_from = Some(Mailbox::new("a@x"));
        tx.tx.mail_response = Some(Response::new(550, "no"));
        tx.tx.rcpt_to = vec![Mailbox::new("b@y")];
        tx.fill_inflight(&Response::new(450, "timeout"));
        assert_eq!(tx.rcpt_response(0).unwrap().code, 503);
    }
}
