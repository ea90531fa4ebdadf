//! One actor per attempt: runs the transaction through its output chain, writes what
//! upstream answered, and decides — done, retry later, or final — bouncing when due.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use koukan::backoff::Retry;
use koukan::filter::{ChainTx, MessageBody};
use koukan::rest::BODY_BLOB;
use koukan::{Response, Transaction};
use koukan_db::{Finish, Lease, TxRecord};
use tokio::sync::watch;

use super::Output;
use super::blob::body_of;
use super::chains::{self, OutputChain, OutputParams};
use super::notify::{DsnRequest, bounce_response, original_headers};
use crate::router::transaction::{AttemptWrite, TransactionActor};

pub const REASON_SUCCESS: &str = "upstream response success";
pub const REASON_PERMFAIL: &str = "upstream response permfail";
pub const REASON_MAIL_PERMFAIL: &str = "upstream mail_response permfail";
pub const REASON_RCPT_PERMFAIL: &str = "upstream rcpt_response permfail";
pub const REASON_ALL_RCPTS_FAILED: &str = "exploder/oneshot all rcpts failed";
pub const REASON_DOWNSTREAM_TIMEOUT: &str = "downstream timeout";
pub const REASON_NO_CHAIN: &str = "internal error: no output chain for this sender";

/// A request the chain left unanswered: a defect of the chain, retried later.
fn unanswered() -> Response {
    Response::new(
        450,
        "internal error: output chain failed to populate response",
    )
}

pub struct Delivery {
    output: Arc<Output>,
    tx_actor: Addr<TransactionActor>,
    record: Arc<TxRecord>,
    lease: Lease,
    /// Responses written so far, for the write of last resort.
    responses: Rc<RefCell<Transaction>>,
    /// Set once the attempt's final write committed.
    finished: Rc<RefCell<bool>>,
}

impl Delivery {
    pub fn new(
        output: Arc<Output>,
        tx_actor: Addr<TransactionActor>,
        record: Arc<TxRecord>,
    ) -> Option<Self> {
        let lease = record.lease?;
        Some(Delivery {
            output,
            tx_actor,
            record,
            lease,
            responses: Rc::default(),
            finished: Rc::default(),
        })
    }
}

impl Actor for Delivery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let sender = self.record.tx.sender.clone().unwrap_or_default();
        let built = chains::build(&self.output, &sender.name, sender.tag.as_deref());
        let attempt = Attempt {
            output: self.output.clone(),
            tx_actor: self.tx_actor.clone(),
            lease: self.lease,
            record: self.record.clone(),
            responses: self.responses.clone(),
            finished: self.finished.clone(),
        };
        let notify_only = self.record.notification_pending;
        let fut = async move {
            match built {
                // Notification was enabled after the final attempt (storage.md T10/T11):
                // nothing goes upstream again, only the bounce question is settled.
                _ if notify_only => attempt.notify_only(built.ok()).await,
                Ok(chain) => attempt.run(chain).await,
                Err(e) => {
                    tracing::error!(rest_id = %attempt.record.rest_id, "building the output chain: {e}");
                    attempt.abandon(Some(REASON_NO_CHAIN)).await
                }
            }
        };
        ctx.spawn(fut.into_actor(self).map(|_, _, ctx| ctx.stop()));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.output.delivery_ended();
        if *self.finished.borrow() {
            return;
        }
        // The attempt died without its final write (a panic in a filter): end it here so
        // the lease never outlives the work, and retry it later.
        tracing::error!(rest_id = %self.record.rest_id, "delivery ended without finishing its attempt");
        let mut responses = self.responses.borrow().clone();
        let mut view = ChainTx {
            tx: envelope_with(&self.record.tx, &responses),
            ..Default::default()
        };
        view.fill_inflight(&unanswered());
        responses = responses_of(&view.tx);
        let bug_retry = self.output.bug_retry_hint();
        let now = unix_now();
        self.tx_actor.do_send(AttemptWrite {
            lease: self.lease,
            responses: responses.clone(),
            finish: Some(Finish {
                responses,
                final_attempt_reason: None,
                next_attempt_time: Some(now + bug_retry.as_secs() as i64),
                notification_done: false,
                dsn: None,
            }),
        });
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The envelope of `tx` with the responses of this attempt.
fn envelope_with(tx: &Transaction, responses: &Transaction) -> Transaction {
    let mut t = tx.clone();
    t.mail_response = responses.mail_response.clone();
    t.rcpt_response = responses.rcpt_response.clone();
    t.data_response = responses.data_response.clone();
    t.final_attempt_reason = None;
    t
}

fn responses_of(tx: &Transaction) -> Transaction {
    Transaction {
        mail_response: tx.mail_response.clone(),
        rcpt_response: tx.rcpt_response.clone(),
        data_response: tx.data_response.clone(),
        ..Default::default()
    }
}

/// What the chain has seen of the downstream input; a change means "run again".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Input {
    mail_from: bool,
    rcpts: usize,
    body: Option<(u64, bool)>,
    cancelled: bool,
}

impl Input {
    fn of(record: &TxRecord, body: Option<&MessageBody>) -> Input {
        Input {
            mail_from: record.tx.mail_from.is_some(),
            rcpts: record.tx.rcpt_to.len(),
            body: body.map(|b| (b.len().unwrap_or(0), b.finalized())),
            cancelled: record.tx.cancelled,
        }
    }

    /// Nothing more can arrive from downstream.
    fn complete(&self) -> bool {
        self.cancelled || self.body.is_some_and(|(_, done)| done)
    }
}

/// How an attempt ends.
enum Decision {
    Continue,
    Done(Option<&'static str>),
}

fn decide(tx: &ChainTx, downstream_timeout: bool) -> Decision {
    if tx.tx.cancelled {
        // The cancel wrote the final reason already.
        return Decision::Done(None);
    }
    if downstream_timeout {
        return Decision::Done(Some(REASON_DOWNSTREAM_TIMEOUT));
    }
    if let Some(mail) = &tx.tx.mail_response
        && mail.err()
    {
        return Decision::Done(mail.perm().then_some(REASON_MAIL_PERMFAIL));
    }
    let rcpts = tx.tx.rcpt_to.len();
    let all_answered = tx.pending_rcpts().next().is_none();
    if tx.body.is_some() && rcpts > 0 && all_answered && !tx.rcpt_ok() {
        if rcpts > 1 {
            return Decision::Done(Some(REASON_ALL_RCPTS_FAILED));
        }
        let perm = tx.rcpt_response(0).is_some_and(Response::perm);
        return Decision::Done(perm.then_some(REASON_RCPT_PERMFAIL));
    }
    if let Some(data) = &tx.tx.data_response {
        return Decision::Done(if data.ok() {
            Some(REASON_SUCCESS)
        } else if data.perm() {
            Some(REASON_PERMFAIL)
        } else {
            None
        });
    }
    Decision::Continue
}

struct Attempt {
    output: Arc<Output>,
    tx_actor: Addr<TransactionActor>,
    lease: Lease,
    record: Arc<TxRecord>,
    responses: Rc<RefCell<Transaction>>,
    finished: Rc<RefCell<bool>>,
}

impl Attempt {
    async fn subscribe(&self) -> Option<watch::Receiver<Arc<TxRecord>>> {
        match self.tx_actor.send(crate::router::transaction::Open).await {
            Ok(Ok(crate::router::transaction::Opened::Ready(rx))) => Some(rx),
            _ => None,
        }
    }

    async fn run(self, mut out: OutputChain) {
        let Some(mut rx) = self.subscribe().await else {
            tracing::error!(rest_id = %self.record.rest_id, "transaction actor unavailable");
            return;
        };
        let params = out.params.clone();
        let mut last_activity = Instant::now();
        let mut seen_version = -1;
        let mut last_run: Option<Instant> = None;
        let mut last_input: Option<Input> = None;
        let mut written = Transaction::default();
        loop {
            let record = rx.borrow_and_update().clone();
            if record.version != seen_version {
                seen_version = record.version;
                last_activity = Instant::now();
            }
            if record.lease != Some(self.lease) {
                // Fenced: recovery gave the transaction to someone else.
                tracing::warn!(rest_id = %record.rest_id, "lease lost; abandoning the attempt");
                *self.finished.borrow_mut() = true;
                return;
            }
            let body = body_of(&self.output.storage, &record);
            let input = Input::of(&record, body.as_ref());
            let changed = last_input.as_ref() != Some(&input);
            let heartbeat_due = last_run.is_some_and(|t| t.elapsed() >= params.upstream_refresh);
            let timed_out =
                !input.complete() && last_activity.elapsed() >= params.downstream_timeout;
            if !changed && !heartbeat_due && !timed_out {
                let mut deadline = last_run.map_or(Instant::now(), |t| t + params.upstream_refresh);
                if !input.complete() {
                    deadline = deadline.min(last_activity + params.downstream_timeout);
                }
                let _ = tokio::time::timeout_at(deadline.into(), rx.changed()).await;
                continue;
            }
            let mut view = ChainTx {
                rest_id: record.rest_id.clone(),
                body_blob: record.blob(BODY_BLOB).map(|b| b.blob_id),
                tx: envelope_with(&record.tx, &written),
                body,
                heartbeat: !changed,
                ..Default::default()
            };
            let mut cancelled_midway = false;
            if !timed_out {
                // A cancel must not wait for the chain's own timeouts (a DATA wait can take
                // minutes): stop waiting, then tell the chain (rest_output and the exploder
                // cancel what they started upstream).
                let mut follow = rx.clone();
                let cancelled = async move {
                    if follow.wait_for(|r| r.tx.cancelled).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = out.chain.update(&mut view) => {}
                    _ = cancelled, if !view.tx.cancelled => cancelled_midway = true,
                }
            }
            if cancelled_midway {
                view.tx.cancelled = true;
                out.chain.update(&mut view).await;
            }
            last_run = Some(Instant::now());
            last_input = Some(input);
            let mut decision = decide(&view, timed_out);
            if matches!(decision, Decision::Continue)
                && view.inflight()
                && !self.waiting_for_input(&view)
            {
                view.fill_inflight(&unanswered());
                decision = decide(&view, false);
                if matches!(decision, Decision::Continue) {
                    decision = Decision::Done(None);
                }
            }
            let responses = responses_of(&view.tx);
            *self.responses.borrow_mut() = responses.clone();
            match decision {
                Decision::Continue => {
                    if responses != written {
                        match self.write(&responses, None).await {
                            Ok(_) => written = responses,
                            Err(e) => {
                                tracing::warn!(rest_id = %record.rest_id, "writing responses: {e}");
                                return;
                            }
                        }
                    }
                }
                Decision::Done(reason) => {
                    self.finish(&record, &view, &params, &out, reason, responses)
                        .await;
                    // Let upstream know nothing more is coming (e.g. rest_output cancels an
                    // upstream transaction still waiting for a body, or one whose DATA answer
                    // timed out here, so a retry cannot deliver twice).
                    if !view.tx.cancelled
                        && !view.tx.data_response.as_ref().is_some_and(Response::ok)
                    {
                        view.tx.cancelled = true;
                        out.chain.update(&mut view).await;
                    }
                    return;
                }
            }
        }
    }

    /// The only requests still open are ones downstream has not finished sending.
    fn waiting_for_input(&self, view: &ChainTx) -> bool {
        let envelope_answered = (view.tx.mail_from.is_none() || view.tx.mail_response.is_some())
            && (view.mail_failed() || view.pending_rcpts().next().is_none());
        envelope_answered && !view.body_finalized()
    }

    async fn write(
        &self,
        responses: &Transaction,
        finish: Option<Finish>,
    ) -> Result<Arc<TxRecord>, String> {
        match self
            .tx_actor
            .send(AttemptWrite {
                lease: self.lease,
                responses: responses.clone(),
                finish,
            })
            .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn finish(
        &self,
        record: &TxRecord,
        view: &ChainTx,
        params: &OutputParams,
        out: &OutputChain,
        reason: Option<&'static str>,
        responses: Transaction,
    ) {
        let mut final_reason = reason.map(str::to_string);
        let mut next_attempt_time = None;
        let cancelled = view.tx.cancelled;
        // The database clock costs a read, so it is asked only by a retry or a bounce (a
        // delivered message has neither).
        if final_reason.is_none() && !cancelled && record.tx.retry {
            let now = self.output.now().await;
            let attempt = record.attempt_id.unwrap_or(1) as u32;
            match params.backoff.next(attempt, record.creation, now) {
                Retry::At(t) => next_attempt_time = Some(t),
                Retry::GiveUp(r) => final_reason = Some(r.to_string()),
            }
        }
        // Bounces: a client's cancel never bounces (the client knows).
        let mut notification_done = false;
        let mut dsn = None;
        if record.tx.notification {
            notification_done = true;
            if !cancelled {
                let last = final_reason.is_some() || !record.tx.retry;
                let tx = envelope_with(&record.tx, &responses);
                if let Some(response) = bounce_response(&tx, last) {
                    let now = self.output.now().await;
                    dsn = self
                        .dsn(record, view.body.as_ref(), params, out, &tx, &response, now)
                        .await;
                }
            }
        }
        let result = self
            .write(
                &responses,
                Some(Finish {
                    responses: responses.clone(),
                    final_attempt_reason: final_reason,
                    next_attempt_time,
                    notification_done,
                    dsn: dsn.clone(),
                }),
            )
            .await;
        match result {
            Ok(_) => {
                *self.finished.borrow_mut() = true;
                if dsn.is_some() || next_attempt_time.is_some() {
                    self.output.kick_dequeue();
                }
            }
            Err(e) => tracing::error!(rest_id = %record.rest_id, "final write failed: {e}"),
        }
    }

    /// The notification-only pass of a final transaction: a DSN from the stored responses
    /// of its last attempt if they call for one, and `notification_done` either way (a
    /// pass that cannot decide must not be dequeued again forever, storage.md S12).
    async fn notify_only(&self, out: Option<OutputChain>) {
        let record = &self.record;
        let mut dsn = None;
        match &out {
            Some(out) if !record.tx.cancelled => {
                if let Some(response) = bounce_response(&record.tx, true) {
                    let now = self.output.now().await;
                    let body = body_of(&self.output.storage, record);
                    dsn = self
                        .dsn(
                            record,
                            body.as_ref(),
                            &out.params,
                            out,
                            &record.tx,
                            &response,
                            now,
                        )
                        .await;
                }
            }
            Some(_) => {}
            None => {
                tracing::error!(rest_id = %record.rest_id, "no output chain for this sender: no DSN")
            }
        }
        // No responses: the last attempt's stay as they are.
        let finish = Finish {
            responses: Transaction::default(),
            final_attempt_reason: None,
            next_attempt_time: None,
            notification_done: true,
            dsn: dsn.clone(),
        };
        match self.write(&Transaction::default(), Some(finish)).await {
            Ok(_) => {
                *self.finished.borrow_mut() = true;
                if dsn.is_some() {
                    self.output.kick_dequeue();
                }
            }
            Err(e) => tracing::error!(rest_id = %record.rest_id, "notification write failed: {e}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn dsn(
        &self,
        record: &TxRecord,
        body: Option<&MessageBody>,
        params: &OutputParams,
        out: &OutputChain,
        tx: &Transaction,
        response: &Response,
        now: i64,
    ) -> Option<koukan_db::NewTransaction> {
        let Some(notification) = &params.notification else {
            tracing::warn!(rest_id = %record.rest_id, sender = %out.sender.name, "notification enabled but the chain has no notification block: no DSN");
            return None;
        };
        let Some(mailer_daemon) = self.output.config.global.mailer_daemon_mailbox.as_deref() else {
            tracing::warn!("no global.mailer_daemon_mailbox: no DSN");
            return None;
        };
        let retry = self
            .output
            .config
            .resolve_sender(&notification.sender, notification.tag.as_deref())
            .map(|s| s.retry)
            .unwrap_or(false);
        let headers = original_headers(body).await;
        DsnRequest {
            rest_id: koukan::rest_id::new_rest_id(self.output.settings.rest_id_entropy),
            sender: koukan::Sender::new(notification.sender.clone(), notification.tag.clone()),
            retry,
            mailer_daemon,
            tx,
            response,
            headers: &headers,
            arrival: record.creation,
            now,
        }
        .build()
    }

    /// Ends an attempt that cannot run at all.
    async fn abandon(&self, reason: Option<&'static str>) {
        let mut view = ChainTx {
            tx: envelope_with(&self.record.tx, &Transaction::default()),
            ..Default::default()
        };
        view.fill_inflight(&Response::new(450, reason.unwrap_or("internal error")));
        let responses = responses_of(&view.tx);
        let finish = Finish {
            responses: responses.clone(),
            final_attempt_reason: reason.map(str::to_string),
            next_attempt_time: None,
            notification_done: false,
            dsn: None,
        };
        if self.write(&responses, Some(finish)).await.is_ok() {
            *self.finished.borrow_mut() = true;
        }
    }
}
