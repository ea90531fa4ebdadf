//! `GatewayTransaction`: one actor per REST transaction the router created here. It owns
//! the in-memory transaction and its version (an LRO: every accepted REST mutation and every
//! completed SMTP step bumps it once), wakes long polls through a watch channel, drives its
//! `OutboundDelivery`, and forgets itself when idle (GC). The [`Registry`] finds actors by
//! rest id and restarts one that crashed from its last published state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use koukan::config::{GatewayConfig, SmtpHostConfig};
use koukan::range::HeldRange;
use koukan::rest::{BlobStatus, BodyView, render_read};
use koukan::transaction::{Update, UpdateError};
use koukan::{Response, Transaction, rest_id};
use tokio::sync::{mpsc, watch};

use super::delivery::{
    BodyChunk, CancelDelivery, DeliveryParams, Envelope, OutboundDelivery, Report, TlsPolicy,
};
use super::error::RestError;

/// Restarts of a crashed transaction actor before it is forgotten.
const MAX_CRASHES: u32 = 3;

/// Settings shared by every transaction of one listener.
pub struct Shared {
    pub session_uri: String,
    pub hosts: BTreeMap<String, Arc<SmtpHostConfig>>,
    pub tls: TlsPolicy,
    pub rest_id_entropy: usize,
    pub gc_interval: Duration,
    pub gc_tx_ttl: Duration,
    pub gc_done_ttl: Duration,
    /// Running SMTP sessions.
    pub live_deliveries: Arc<AtomicUsize>,
}

impl Shared {
    pub fn from_config(cfg: &GatewayConfig, tls: TlsPolicy) -> Shared {
        let l = &cfg.rest_listener;
        Shared {
            session_uri: l.session_uri.trim_end_matches('/').to_string(),
            hosts: cfg
                .smtp_output
                .hosts
                .iter()
                .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
                .collect(),
            tls,
            rest_id_entropy: l.rest_id_entropy,
            gc_interval: l.gc_interval,
            gc_tx_ttl: l.gc_tx_ttl,
            gc_done_ttl: l.gc_done_ttl,
            live_deliveries: Arc::default(),
        }
    }
}

/// Upload progress of the message body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyProgress {
    /// A first PUT happened.
    pub exists: bool,
    pub length: u64,
    /// Declared by a range `/N` or set when finalized.
    pub total: Option<u64>,
}

impl BodyProgress {
    pub fn finalized(&self) -> bool {
        self.exists && self.total == Some(self.length)
    }

    pub fn held(&self) -> HeldRange {
        HeldRange {
            length: self.length,
            total: self.total,
        }
    }
}

/// What readers see: published on every change.
#[derive(Clone, Debug)]
pub struct TxState {
    pub id: String,
    pub version: u64,
    pub tx: Transaction,
    pub body: BodyProgress,
}

impl TxState {
    /// Finished: the data response is in, or the router cancelled.
    pub fn done(&self) -> bool {
        self.tx.data_response.is_some() || self.tx.cancelled
    }

    pub fn render(&self, session_uri: &str) -> Vec<u8> {
        let view = BodyView {
            blob_status: Some(BlobStatus {
                uri: format!("{session_uri}/transactions/{}/body", self.id),
                finalized: self.body.finalized(),
            }),
            message_builder: None,
        };
        render_read(&self.tx, Some(&view))
    }

    /// Sets every response still missing.
    fn fill_missing(&mut self, r: &Response) -> bool {
        let tx = &mut self.tx;
        let mut changed = false;
        if tx.mail_response.is_none() {
            tx.mail_response = Some(r.clone());
            changed = true;
        }
        tx.rcpt_response
            .resize(tx.rcpt_to.len().max(tx.rcpt_response.len()), None);
        for slot in tx.rcpt_response.iter_mut().filter(|s| s.is_none()) {
            *slot = Some(r.clone());
            changed = true;
        }
        if tx.data_response.is_none() {
            tx.data_response = Some(r.clone());
            changed = true;
        }
        changed
    }
}

struct DeliveryLink {
    addr: Addr<OutboundDelivery>,
    envelope: mpsc::UnboundedSender<Envelope>,
    body: mpsc::Sender<BodyChunk>,
}

pub struct GatewayTransaction {
    shared: Arc<Shared>,
    registry: Registry,
    state: TxState,
    watch: watch::Sender<Arc<TxState>>,
    /// Present until the delivery is started in `started()`.
    start: Option<(Arc<SmtpHostConfig>, Option<Bytes>)>,
    delivery: Option<DeliveryLink>,
    /// Response for anything asked after the session ended.
    ended: Option<Response>,
    uploading: bool,
    last_activity: Instant,
}

impl GatewayTransaction {
    fn publish(&mut self) {
        self.state.version += 1;
        self.watch.send_replace(Arc::new(self.state.clone()));
    }

    fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    /// An SMTP step is under way: requests were sent that have no answer yet.
    fn smtp_pending(&self) -> bool {
        if self.delivery.is_none() {
            return false;
        }
        let tx = &self.state.tx;
        (tx.mail_from.is_some() && tx.mail_response.is_none())
            || tx.rcpt_response.len() < tx.rcpt_to.len()
            || tx.rcpt_response.iter().any(Option::is_none)
            || (self.state.body.finalized() && tx.data_response.is_none())
    }

    fn retire(&mut self, ctx: &mut Context<Self>) {
        if let Some(d) = self.delivery.take() {
            d.addr.do_send(CancelDelivery);
        }
        self.registry.remove(&self.state.id, &ctx.address());
        ctx.stop();
    }

    fn gc(&mut self, ctx: &mut Context<Self>) {
        // A delivery that died without reporting its end (a panic): fail what is missing.
        if self.delivery.as_ref().is_some_and(|d| !d.addr.connected()) {
            tracing::error!(id = %self.state.id, "delivery actor crashed");
            self.delivery = None;
            let crashed = Response::new(450, "4.3.0 internal error: delivery crashed");
            self.ended = Some(crashed.clone());
            if !self.state.tx.cancelled && self.state.fill_missing(&crashed) {
                self.publish();
            }
        }
        let idle = self.last_activity.elapsed();
        if self.state.done() {
            if idle >= self.shared.gc_done_ttl {
                tracing::debug!(id = %self.state.id, "forgetting finished transaction");
                self.retire(ctx);
            }
        } else if idle >= self.shared.gc_tx_ttl {
            if self.smtp_pending() {
                // The session's own timeouts bound this wait.
                tracing::warn!(id = %self.state.id, ?idle, "idle transaction still waits on SMTP");
                return;
            }
            tracing::info!(id = %self.state.id, ?idle, "cancelling idle transaction");
            self.retire(ctx);
        }
    }

    fn late_response(&self) -> Response {
        self.ended
            .clone()
            .unwrap_or_else(|| Response::new(503, "5.5.1 failed precondition: delivery ended"))
    }
}

impl Actor for GatewayTransaction {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.shared.gc_interval, |act, ctx| act.gc(ctx));
        let Some((host, inline)) = self.start.take() else {
            return;
        };
        let (envelope, envelope_rx) = mpsc::unbounded_channel();
        // One chunk in flight: a PUT waits until the SMTP side took the previous one.
        let (body, body_rx) = mpsc::channel(1);
        let addr = OutboundDelivery::new(DeliveryParams {
            host,
            remote_host: self.state.tx.remote_host.clone(),
            tls: self.shared.tls,
            report: ctx.address().recipient(),
            envelope: envelope_rx,
            body: body_rx,
            live: self.shared.live_deliveries.clone(),
        })
        .start();
        let tx = &self.state.tx;
        if let Some(m) = &tx.mail_from {
            let _ = envelope.send(Envelope::MailFrom(m.clone()));
        }
        if !tx.rcpt_to.is_empty() {
            let _ = envelope.send(Envelope::Rcpts(tx.rcpt_to.clone()));
        }
        if let Some(data) = inline {
            let _ = body.try_send(BodyChunk { data, last: true });
        }
        self.delivery = Some(DeliveryLink {
            addr,
            envelope,
            body,
        });
    }
}

/// Any REST request resets the idle clock.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Touch;

impl Handler<Touch> for GatewayTransaction {
    type Result = ();
    fn handle(&mut self, _: Touch, _: &mut Self::Context) {
        self.touch();
    }
}

/// A PATCH: heartbeat (`None`) or more envelope.
#[derive(Message)]
#[rtype(result = "Result<Arc<TxState>, RestError>")]
pub struct Patch {
    pub if_match: String,
    pub update: Option<Update>,
}

impl Handler<Patch> for GatewayTransaction {
    type Result = Result<Arc<TxState>, RestError>;

    fn handle(&mut self, msg: Patch, _: &mut Self::Context) -> Self::Result {
        self.touch();
        if msg.if_match != self.state.version.to_string() {
            return Err(RestError::PreconditionFailed);
        }
        if let Some(update) = msg.update.filter(|u| !u.is_empty()) {
            if !update.rcpt_to.is_empty() && self.state.body.exists {
                return Err(RestError::BadRequest(
                    "recipients cannot be added after the body".into(),
                ));
            }
            let had_mail = self.state.tx.mail_from.is_some();
            let before = self.state.tx.rcpt_to.len();
            self.state
                .tx
                .apply(&update)
                .map_err(|e: UpdateError| RestError::BadRequest(format!("invalid request: {e}")))?;
            let tx = &self.state.tx;
            let new_mail = (!had_mail).then(|| tx.mail_from.clone()).flatten();
            let new_rcpts = tx.rcpt_to[before..].to_vec();
            match &self.delivery {
                Some(d) => {
                    if let Some(m) = new_mail {
                        let _ = d.envelope.send(Envelope::MailFrom(m));
                    }
                    if !new_rcpts.is_empty() {
                        let _ = d.envelope.send(Envelope::Rcpts(new_rcpts));
                    }
                }
                None => {
                    let late = self.late_response();
                    self.state.fill_missing(&late);
                }
            }
        }
        self.publish();
        Ok(Arc::new(self.state.clone()))
    }
}

/// Where a PUT starts and what it declares.
#[derive(Clone, Copy, Debug)]
pub struct UploadPlan {
    pub offset: u64,
    pub total: Option<u64>,
    /// `x-finalize-blob-length`: no bytes, only the end.
    pub finalize_only: bool,
}

/// Permission to upload: where the chunks go (`None`: the session is over, bytes are
/// counted and dropped).
pub struct Ticket {
    pub sink: Option<mpsc::Sender<BodyChunk>>,
    pub offset: u64,
    /// Nothing to do (finalizing an already final body at its length).
    pub noop: Option<HeldRange>,
}

#[derive(Message)]
#[rtype(result = "Result<Ticket, RestError>")]
pub struct BeginUpload(pub UploadPlan);

impl Handler<BeginUpload> for GatewayTransaction {
    type Result = Result<Ticket, RestError>;

    fn handle(&mut self, BeginUpload(plan): BeginUpload, _: &mut Self::Context) -> Self::Result {
        self.touch();
        if self.state.tx.cancelled {
            return Err(RestError::Conflict("transaction cancelled"));
        }
        if self.uploading {
            return Err(RestError::Conflict("upload in progress"));
        }
        let b = &self.state.body;
        if plan.finalize_only && b.finalized() && plan.offset == b.length {
            return Ok(Ticket {
                sink: None,
                offset: b.length,
                noop: Some(b.held()),
            });
        }
        let conflicting_total = matches!((b.total, plan.total), (Some(a), Some(c)) if a != c);
        if b.finalized() || plan.offset != b.length || conflicting_total {
            return Err(RestError::Range(b.held()));
        }
        let offset = b.length;
        self.uploading = true;
        self.state.body.exists = true;
        Ok(Ticket {
            sink: self.delivery.as_ref().map(|d| d.body.clone()),
            offset,
            noop: None,
        })
    }
}

/// The end of a PUT (also of a failed one: the bytes queued so far count).
#[derive(Message)]
#[rtype(result = "Arc<TxState>")]
pub struct EndUpload {
    pub length: u64,
    pub finalized: bool,
    pub declared_total: Option<u64>,
}

impl Handler<EndUpload> for GatewayTransaction {
    type Result = Arc<TxState>;

    fn handle(&mut self, msg: EndUpload, _: &mut Self::Context) -> Self::Result {
        self.touch();
        self.uploading = false;
        let b = &mut self.state.body;
        b.length = msg.length;
        if msg.finalized {
            b.total = Some(msg.length);
        } else if msg.declared_total.is_some() {
            b.total = msg.declared_total;
        }
        if self.delivery.is_none() && self.state.body.finalized() {
            let late = self.late_response();
            self.state.fill_missing(&late);
        }
        self.publish();
        Arc::new(self.state.clone())
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel;

impl Handler<Cancel> for GatewayTransaction {
    type Result = ();

    fn handle(&mut self, _: Cancel, _: &mut Self::Context) {
        self.touch();
        // After the data response a cancel changes nothing (and bumps nothing).
        if self.state.tx.data_response.is_some() || self.state.tx.cancelled {
            return;
        }
        self.state.tx.cancelled = true;
        if let Some(d) = &self.delivery {
            d.addr.do_send(CancelDelivery);
        }
        self.publish();
    }
}

impl Handler<Report> for GatewayTransaction {
    type Result = ();

    fn handle(&mut self, msg: Report, _: &mut Self::Context) {
        self.touch();
        let changed = match msg {
            Report::Responses { mail, rcpts, data } => {
                let tx = &mut self.state.tx;
                let mut changed = false;
                if let Some(m) = mail
                    && tx.mail_response.is_none()
                {
                    tx.mail_response = Some(m);
                    changed = true;
                }
                for (i, r) in rcpts {
                    if tx.rcpt_response.len() <= i {
                        tx.rcpt_response.resize(i + 1, None);
                    }
                    if tx.rcpt_response[i].is_none() {
                        tx.rcpt_response[i] = Some(r);
                        changed = true;
                    }
                }
                if let Some(d) = data
                    && tx.data_response.is_none()
                {
                    tx.data_response = Some(d);
                    changed = true;
                }
                changed
            }
            Report::Ended { error } => {
                self.delivery = None;
                let fill = match error {
                    Some(e) => Some(e),
                    None if self.state.tx.cancelled => None,
                    None => Some(Response::new(
                        450,
                        "4.3.0 internal error: delivery ended without a response",
                    )),
                };
                self.ended = fill.clone();
                match fill {
                    Some(e) => self.state.fill_missing(&e),
                    None => false,
                }
            }
        };
        if changed {
            self.publish();
        }
    }
}

/// Stop now (process shutdown): QUIT upstream, forget the transaction.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for GatewayTransaction {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        self.retire(ctx);
    }
}

/// Test hook: panics inside the actor, as a bug would.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

impl Handler<Crash> for GatewayTransaction {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("transaction actor crash requested");
    }
}

struct Entry {
    addr: Addr<GatewayTransaction>,
    state: watch::Receiver<Arc<TxState>>,
    crashes: u32,
}

/// The live transactions of this listener.
#[derive(Clone)]
pub struct Registry {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    shared: Arc<Shared>,
}

impl Registry {
    pub fn new(shared: Arc<Shared>) -> Self {
        Registry {
            entries: Arc::default(),
            shared,
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Creates the transaction (version 2: created, then the create counted) and starts
    /// its delivery.
    pub fn create(
        &self,
        tx: Transaction,
        host: Arc<SmtpHostConfig>,
        inline: Option<Bytes>,
    ) -> Arc<TxState> {
        let mut entries = self.entries.lock().unwrap();
        let id = loop {
            let id = rest_id::new_rest_id(self.shared.rest_id_entropy);
            if !entries.contains_key(&id) {
                break id;
            }
        };
        let body = match &inline {
            Some(b) => BodyProgress {
                exists: true,
                length: b.len() as u64,
                total: Some(b.len() as u64),
            },
            None => BodyProgress::default(),
        };
        let state = TxState {
            id: id.clone(),
            version: 2,
            tx,
            body,
        };
        let (entry, snapshot) = self.spawn(state, Some((host, inline)), 0);
        entries.insert(id, entry);
        snapshot
    }

    fn spawn(
        &self,
        state: TxState,
        start: Option<(Arc<SmtpHostConfig>, Option<Bytes>)>,
        crashes: u32,
    ) -> (Entry, Arc<TxState>) {
        let snapshot = Arc::new(state.clone());
        let (watch, rx) = watch::channel(snapshot.clone());
        let addr = GatewayTransaction {
            shared: self.shared.clone(),
            registry: self.clone(),
            state,
            watch,
            start,
            delivery: None,
            ended: None,
            uploading: false,
            last_activity: Instant::now(),
        }
        .start();
        (
            Entry {
                addr,
                state: rx,
                crashes,
            },
            snapshot,
        )
    }

    /// The actor of `id` and a subscription to its state. An actor that died by panicking
    /// is restarted from its last published state; its SMTP session is gone, so whatever
    /// was still missing fails temporarily (the router retries; nothing is lost).
    pub fn lookup(
        &self,
        id: &str,
    ) -> Option<(Addr<GatewayTransaction>, watch::Receiver<Arc<TxState>>)> {
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.get(id)?;
        if entry.addr.connected() {
            return Some((entry.addr.clone(), entry.state.clone()));
        }
        let crashes = entry.crashes + 1;
        let mut state = (**entry.state.borrow()).clone();
        tracing::error!(id, crashes, "transaction actor crashed; restarting");
        if crashes > MAX_CRASHES {
            entries.remove(id);
            return None;
        }
        let crashed = Response::new(450, "4.3.0 internal error: transaction actor crashed");
        state.fill_missing(&crashed);
        state.version += 1;
        let (entry, _) = self.spawn(state, None, crashes);
        let found = (entry.addr.clone(), entry.state.clone());
        entries.insert(id.to_string(), entry);
        Some(found)
    }

    fn remove(&self, id: &str, addr: &Addr<GatewayTransaction>) {
        let mut entries = self.entries.lock().unwrap();
        if entries.get(id).is_some_and(|e| &e.addr == addr) {
            entries.remove(id);
        }
    }

    /// Stops every transaction (each QUITs its SMTP session) and waits, briefly, for the
    /// sessions to finish.
    pub async fn shutdown(&self, grace: Duration) {
        let addrs: Vec<_> = self
            .entries
            .lock()
            .unwrap()
            .values()
            .map(|e| e.addr.clone())
            .collect();
        for a in addrs {
            a.do_send(Shutdown);
        }
        let deadline = Instant::now() + grace;
        while self.shared.live_deliveries.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
