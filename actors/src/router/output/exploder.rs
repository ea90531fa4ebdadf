//! `exploder`: the terminal filter of SMTP-facing (incremental) chains. Each recipient
//! becomes its own stored transaction with its own delivery; the exploder waits a bounded
//! time for their answers (cut-through) and folds them back into the SMTP transaction, or
//! stores and forwards — a 2xx always means the message will be delivered or bounced.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use koukan::config::ExploderFilter;
use koukan::filter::{ChainTx, Filter, LocalFuture, Next};
use koukan::{Response, Sender, Transaction};
use koukan_db::{NewBody, NewTransaction, TxRecord};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Output, shared_body};
use crate::router::transaction::{
    AttachBody, Cancel, EnableRetry, Open, Opened, Ping, TransactionActor,
};

const SAF: &str = "(AsyncFilterWrapper store&forward)";

fn mail_ok() -> Response {
    Response::new(250, "MAIL ok (exploder noop)")
}
fn busy() -> Response {
    Response::new(451, "4.5.3 too many recipients")
}
fn upstream_timeout() -> Response {
    Response::new(450, "upstream timeout (AsyncFilterWrapper)")
}

struct Recipient {
    /// `None`: no transaction could be made for it (busy); it is settled.
    actor: Option<Addr<TransactionActor>>,
    rx: Option<watch::Receiver<Arc<TxRecord>>>,
    /// What downstream was told for its RCPT.
    rcpt: Option<Response>,
    /// Accepted for store-and-forward at RCPT time (msa): retry goes on with the body.
    forward: bool,
    /// The body was passed on.
    has_body: bool,
    data: Option<Response>,
}

impl Recipient {
    /// Accepted downstream: gets the body.
    fn accepted(&self) -> bool {
        self.rcpt.as_ref().is_some_and(Response::ok)
    }
}

pub struct Exploder {
    output: Arc<Output>,
    msa: bool,
    rcpt_timeout: Duration,
    data_timeout: Duration,
    upstream: Sender,
    rcpts: Vec<Recipient>,
    body_passed: bool,
}

impl Exploder {
    pub fn new(output: Arc<Output>, cfg: &ExploderFilter, upstream: Sender) -> Self {
        Exploder {
            output,
            msa: cfg.msa,
            rcpt_timeout: cfg.rcpt_timeout,
            data_timeout: cfg.data_timeout,
            upstream,
            rcpts: Vec::new(),
            body_passed: false,
        }
    }

    /// Creates the transaction of downstream recipient `i`, with its attempt started here.
    async fn add(&self, tx: &ChainTx, i: usize) -> Recipient {
        let mut r = Recipient {
            actor: None,
            rx: None,
            rcpt: None,
            forward: false,
            has_body: false,
            data: None,
        };
        if !self.output.has_capacity() {
            r.rcpt = Some(busy());
            return r;
        }
        let body = match tx.body_finalized() {
            true => shared_body(tx),
            false => NewBody::None,
        };
        r.has_body = !matches!(body, NewBody::None);
        let new = NewTransaction {
            rest_id: koukan::rest_id::new_rest_id(self.output.settings.rest_id_entropy),
            tx: Transaction {
                remote_host: tx.tx.remote_host.clone(),
                local_host: tx.tx.local_host.clone(),
                mail_from: tx.tx.mail_from.clone(),
                rcpt_to: vec![tx.tx.rcpt_to[i].clone()],
                smtp_meta: tx.tx.smtp_meta.clone(),
                sender: Some(self.upstream.clone()),
                ..Default::default()
            },
            body,
            leased: true,
            start_attempt: true,
        };
        let record = match self.output.storage.create(new).await {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(rest_id = %tx.rest_id, "exploder: creating a recipient's transaction: {e}");
                r.rcpt = Some(Response::new(
                    451,
                    "4.3.0 temporary failure storing the recipient",
                ));
                return r;
            }
        };
        let actor = self.output.deliver(record);
        if let Ok(Ok(Opened::Ready(rx))) = actor.send(Open).await {
            r.rx = Some(rx);
        }
        r.actor = Some(actor);
        r
    }

    /// The RCPT answer for a recipient whose transaction says `u` (`None`: no answer in time).
    fn rcpt_answer(&self, u: Option<&Transaction>) -> (Response, bool) {
        let saf = || Response::new(250, format!("RCPT ok {SAF}"));
        let Some(u) = u else {
            return if self.msa {
                (saf(), true)
            } else {
                (upstream_timeout(), false)
            };
        };
        if let Some(m) = u.mail_response.as_ref().filter(|m| m.err()) {
            if m.temp() && self.msa {
                return (saf(), true);
            }
            return (
                Response::new(m.code, "RCPT failed precondition MAIL (AsyncFilterWrapper)"),
                false,
            );
        }
        match u.rcpt_response.first().cloned().flatten() {
            Some(r) if r.temp() && self.msa => (saf(), true),
            Some(r) => (r, false),
            None if self.msa => (saf(), true),
            None => (upstream_timeout(), false),
        }
    }

    async fn wait(
        rx: &mut watch::Receiver<Arc<TxRecord>>,
        deadline: Instant,
        done: impl Fn(&TxRecord) -> bool,
    ) -> Option<Transaction> {
        let r = tokio::time::timeout_at(deadline, rx.wait_for(|r| done(r))).await;
        match r {
            Ok(Ok(rec)) => Some(rec.tx.clone()),
            _ => None,
        }
    }

    /// Answers the new recipients `from..`, waiting at most `rcpt_timeout` for upstream.
    async fn answer_rcpts(&mut self, tx: &mut ChainTx, from: usize) {
        let deadline = Instant::now() + self.rcpt_timeout;
        let waits = self.rcpts[from..].iter_mut().map(|r| async move {
            match (&r.rcpt, r.rx.as_mut()) {
                (None, Some(rx)) => {
                    let answered = |rec: &TxRecord| {
                        rec.tx.mail_response.as_ref().is_some_and(Response::err)
                            || rec.tx.rcpt_response.first().is_some_and(Option::is_some)
                            || rec.is_final()
                    };
                    Some(Self::wait(rx, deadline, answered).await)
                }
                _ => None,
            }
        });
        let results = futures_util::future::join_all(waits).await;
        for (k, state) in results.into_iter().enumerate() {
            let i = from + k;
            if let Some(state) = state {
                let (resp, forward) = self.rcpt_answer(state.as_ref());
                let r = &mut self.rcpts[i];
                if state.is_none() && !forward {
                    // Told the client to try again: this copy must not go out too.
                    if let Some(a) = &r.actor {
                        let _ = a.send(Cancel).await;
                    }
                }
                r.forward = forward;
                r.rcpt = Some(resp);
            }
            if let Some(resp) = self.rcpts[i].rcpt.clone() {
                tx.set_rcpt_response(i, resp);
            }
        }
    }

    /// Passes the finished body to every accepted recipient and decides the DATA answer.
    async fn pass_body(&mut self, tx: &mut ChainTx) {
        self.body_passed = true;
        let body = shared_body(tx);
        for r in self
            .rcpts
            .iter_mut()
            .filter(|r| r.accepted() && !r.has_body)
        {
            if let Some(a) = &r.actor {
                match a.send(AttachBody(body.clone())).await {
                    Ok(Ok(_)) => r.has_body = true,
                    other => {
                        tracing::warn!(rest_id = %tx.rest_id, "exploder: passing the body: {other:?}");
                        r.data = Some(Response::new(
                            451,
                            "4.3.0 temporary failure passing the body",
                        ));
                    }
                }
            }
        }
        // Accepted for store-and-forward at RCPT: retried from here on.
        for r in self.rcpts.iter_mut().filter(|r| r.forward && r.has_body) {
            r.data = Some(Self::enable_retry(r).await);
        }
        let deadline = Instant::now() + self.data_timeout;
        let waits = self.rcpts.iter_mut().map(|r| async move {
            if !r.accepted() || r.data.is_some() {
                return None;
            }
            let rx = r.rx.as_mut()?;
            let answered = |rec: &TxRecord| rec.tx.data_response.is_some() || rec.is_final();
            Some(Self::wait(rx, deadline, answered).await)
        });
        let results = futures_util::future::join_all(waits).await;
        for (i, state) in results.into_iter().enumerate() {
            let Some(state) = state else { continue };
            let data = state.as_ref().and_then(|s| s.data_response.clone());
            let r = &mut self.rcpts[i];
            r.data = Some(match data {
                Some(d) if d.temp() && self.msa => Self::enable_retry(r).await,
                Some(d) => d,
                None if self.msa => Self::enable_retry(r).await,
                None => {
                    if let Some(a) = &r.actor {
                        let _ = a.send(Cancel).await;
                    }
                    upstream_timeout()
                }
            });
        }
        tx.tx.data_response = self.fan_in().await;
    }

    /// Turns on retry and bounces for a recipient: it will be delivered or bounced.
    async fn enable_retry(r: &mut Recipient) -> Response {
        r.forward = true;
        // A transaction that already ended for good without a DATA answer (e.g. its own
        // downstream timeout) can be neither retried nor bounced: accepting it would
        // drop the message (R1). The client must retry.
        if let Some(rec) = r.rx.as_ref().map(|rx| rx.borrow().clone())
            && rec.is_final()
            && rec.tx.data_response.is_none()
        {
            return Response::new(451, "4.4.0 upstream transaction ended without a response");
        }
        match &r.actor {
            Some(a) => match a.send(EnableRetry).await {
                Ok(Ok(_)) => Response::new(250, format!("DATA ok {SAF}")),
                _ => Response::new(451, "4.3.0 temporary failure storing the message"),
            },
            None => busy(),
        }
    }

    /// The one DATA answer for downstream.
    async fn fan_in(&mut self) -> Option<Response> {
        if self.rcpts.len() == 1 {
            return self.rcpts[0].data.clone();
        }
        let accepted: Vec<usize> = (0..self.rcpts.len())
            .filter(|i| self.rcpts[*i].accepted())
            .collect();
        let first = accepted.first().and_then(|i| self.rcpts[*i].data.clone())?;
        if accepted.iter().all(|i| {
            self.rcpts[*i]
                .data
                .as_ref()
                .is_some_and(|d| d.major() == first.major())
        }) {
            return Some(Response::new(
                first.code,
                format!("{} (Exploder same response)", first.message),
            ));
        }
        // Mixed: the failed ones are retried and bounced on their own.
        for i in accepted {
            let r = &mut self.rcpts[i];
            if r.data.as_ref().is_some_and(|d| !d.ok()) && !r.forward {
                Self::enable_retry(r).await;
            }
        }
        Some(Response::new(250, "DATA ok (Exploder store&forward)"))
    }

    async fn cancel(&mut self) {
        for r in &self.rcpts {
            if r.data.is_none()
                && let Some(a) = &r.actor
            {
                let _ = a.send(Cancel).await;
            }
        }
    }

    /// Keeps the recipients' transactions alive while downstream is slow.
    async fn ping(&self) {
        for r in &self.rcpts {
            let live = r.rx.as_ref().is_some_and(|rx| !rx.borrow().is_final());
            if live && let Some(a) = &r.actor {
                let _ = a.send(Ping).await;
            }
        }
    }
}

impl Filter for Exploder {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, _next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if tx.tx.cancelled {
                self.cancel().await;
                return;
            }
            if tx.tx.mail_from.is_some() && tx.tx.mail_response.is_none() {
                tx.tx.mail_response = Some(mail_ok());
            }
            let from = self.rcpts.len();
            // Recipients that arrived together are created together: their creates share
            // a commit instead of queueing behind each other.
            let added = futures_util::future::join_all(
                (from..tx.tx.rcpt_to.len()).map(|i| self.add(tx, i)),
            )
            .await;
            self.rcpts.extend(added);
            if self.rcpts.len() > from {
                self.answer_rcpts(tx, from).await;
            } else if tx.heartbeat {
                self.ping().await;
            }
            if !self.body_passed && tx.body_finalized() && tx.tx.data_response.is_none() {
                if self.rcpts.iter().any(Recipient::accepted) {
                    self.pass_body(tx).await;
                } else if self.rcpts.is_empty() {
                    tx.tx.data_response = Some(Response::new(
                        503,
                        "5.5.1 failed precondition: no recipients",
                    ));
                }
            }
        })
    }
}
