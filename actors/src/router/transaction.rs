//! One actor per live transaction: it owns the in-memory copy and version, serializes
//! writes, and wakes long polls when the version moves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use koukan::Backoff;
use koukan::Transaction;
use koukan::rest::BODY_BLOB;
use koukan::transaction::Update;
use koukan::transaction::{BlobState, Body};
use koukan_db::{BlobInfo, CancelOutcome, Finish, Lease, Storage, StorageError, TxRecord, memory};
use tokio::sync::watch;

use super::error::RestError;
use super::registry::Registry;
use super::settings::Settings;

/// Records not leased here may have been changed by another replica; re-read them when the
/// copy is older than this.
const UNLEASED_FRESHNESS: Duration = Duration::from_secs(1);

pub struct TransactionActor {
    storage: Storage,
    settings: Arc<Settings>,
    registry: Registry,
    record: Arc<TxRecord>,
    incremental: bool,
    watch: watch::Sender<Arc<TxRecord>>,
    loaded: Instant,
    last_activity: Instant,
    /// Set when the actor stops on purpose; a stop without it is a crash (actix runs
    /// `stopped` even when a handler panicked).
    retiring: bool,
}

impl TransactionActor {
    pub(super) fn new(
        storage: Storage,
        settings: Arc<Settings>,
        registry: Registry,
        record: TxRecord,
    ) -> Self {
        let incremental = record
            .tx
            .sender
            .as_ref()
            .and_then(|s| settings.senders.resolve(&s.name, s.tag.as_deref()).ok())
            .is_some_and(|p| p.incremental);
        let record = Arc::new(record);
        let (watch, _) = watch::channel(record.clone());
        TransactionActor {
            storage,
            settings,
            registry,
            record,
            incremental,
            watch,
            loaded: Instant::now(),
            last_activity: Instant::now(),
            retiring: false,
        }
    }

    fn leased_here(&self) -> bool {
        self.record
            .lease
            .is_some_and(|l| l.session == self.storage.session_id())
    }

    /// Installs a newer copy and wakes every long poll waiting on an older version.
    fn publish(&mut self, record: TxRecord) {
        self.loaded = Instant::now();
        self.last_activity = Instant::now();
        if record.version < self.record.version {
            return;
        }
        self.record = Arc::new(record);
        self.watch.send_replace(self.record.clone());
    }

    /// Applies `change` to an in-memory record and publishes the result.
    fn change_in_memory<R>(&mut self, change: impl FnOnce(&mut TxRecord) -> R) -> R {
        self.last_activity = Instant::now();
        let mut record = (*self.record).clone();
        let out = change(&mut record);
        self.publish(record);
        out
    }

    /// The replica to redirect to, when another live one holds the lease.
    fn elsewhere(&self, record: &TxRecord) -> Option<String> {
        match (&record.lease, &record.lease_uri) {
            (Some(lease), Some(uri))
                if lease.session != self.storage.session_id()
                    && uri.trim_end_matches('/') != self.settings.session_uri =>
            {
                Some(uri.trim_end_matches('/').to_string())
            }
            _ => None,
        }
    }

    fn reload(&self) -> impl Future<Output = Result<TxRecord, RestError>> + 'static {
        let storage = self.storage.clone();
        let rest_id = self.record.rest_id.clone();
        // Nobody else can have written an in-memory transaction: the copy is the truth.
        let current = self.record.in_memory().then(|| (*self.record).clone());
        async move {
            if let Some(record) = current {
                return Ok(record);
            }
            storage
                .load(&rest_id)
                .await?
                .ok_or(RestError::NotFound("unknown tx"))
        }
    }
}

impl Actor for TransactionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let idle = self.settings.actor_idle;
        ctx.run_interval(idle / 2 + Duration::from_millis(1), move |act, ctx| {
            // The state is durable: an idle actor is only a cache and may go.
            if act.watch.receiver_count() == 0 && act.last_activity.elapsed() >= idle {
                act.retiring = true;
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        // A crashed actor stays registered so the registry can count the crash.
        if self.retiring {
            self.registry.remove(&self.record.rest_id, &ctx.address());
        }
    }
}

/// Result of [`Open`].
pub enum Opened {
    /// Follow the transaction: the receiver always holds the newest copy.
    Ready(watch::Receiver<Arc<TxRecord>>),
    /// Another live replica holds the lease: its base URI.
    Elsewhere(String),
}

/// Start serving a request: refresh if needed, check the lease, subscribe.
#[derive(Message)]
#[rtype(result = "Result<Opened, RestError>")]
pub struct Open;

impl Handler<Open> for TransactionActor {
    type Result = AtomicResponse<Self, Result<Opened, RestError>>;

    fn handle(&mut self, _: Open, _: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        let fresh = self.leased_here()
            || self.record.in_memory()
            || self.loaded.elapsed() < UNLEASED_FRESHNESS;
        if fresh {
            let opened = match self.elsewhere(&self.record) {
                Some(uri) => Opened::Elsewhere(uri),
                None => Opened::Ready(self.watch.subscribe()),
            };
            return AtomicResponse::new(Box::pin(fut::ready(Ok(opened))));
        }
        AtomicResponse::new(Box::pin(self.reload().into_actor(self).map(
            |res, act, _| {
                let record = res?;
                if let Some(uri) = act.elsewhere(&record) {
                    return Ok(Opened::Elsewhere(uri));
                }
                act.publish(record);
                Ok(Opened::Ready(act.watch.subscribe()))
            },
        )))
    }
}

/// A PATCH: a heartbeat (`update: None`) or an incremental update.
#[derive(Message)]
#[rtype(result = "Result<Arc<TxRecord>, RestError>")]
pub struct Patch {
    pub if_match: String,
    pub update: Option<Update>,
}

impl Handler<Patch> for TransactionActor {
    type Result = AtomicResponse<Self, Result<Arc<TxRecord>, RestError>>;

    fn handle(&mut self, msg: Patch, _: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        if msg.update.is_some() && !self.incremental {
            return AtomicResponse::new(Box::pin(fut::ready(Err(RestError::BadRequest(
                "endpoint does not accept incremental updates".into(),
            )))));
        }
        // Apply against the newest copy: a blob append may have moved the version.
        let storage = self.storage.clone();
        let current = self.record.clone();
        let reload = self.reload();
        let work = async move {
            let mut record = if current.version.to_string() == msg.if_match {
                (*current).clone()
            } else {
                reload.await?
            };
            if record.version.to_string() != msg.if_match {
                return Err(RestError::PreconditionFailed);
            }
            let mut envelope: Transaction = record.tx.clone();
            let changed = match &msg.update {
                Some(update) => envelope
                    .apply(update)
                    .map_err(|e| RestError::BadRequest(e.to_string()))?,
                None => false,
            };
            let version = if record.in_memory() {
                Ok(memory::ping(&mut record))
            } else if changed {
                storage
                    .write_envelope(record.id, record.version, &envelope)
                    .await
            } else {
                storage.ping(record.id, record.version).await
            }
            .map_err(|e| match e {
                StorageError::Conflict => RestError::PreconditionFailed,
                e => e.into(),
            })?;
            record.version = version;
            if changed {
                let responses = std::mem::take(&mut record.tx);
                record.tx = envelope;
                record.tx.body = responses.body;
                record.tx.mail_response = responses.mail_response;
                record.tx.rcpt_response = responses.rcpt_response;
                record.tx.data_response = responses.data_response;
                record.tx.attempt_count = responses.attempt_count;
                record.tx.final_attempt_reason = responses.final_attempt_reason;
            }
            Ok(record)
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|res, act, _| {
            act.publish(res?);
            Ok(act.record.clone())
        })))
    }
}

/// A blob append landed in storage (sent by the upload handler after a batch that moved
/// the version, and after every batch of an in-memory transaction). Answers the version
/// the append produced, if it moved.
#[derive(Message)]
#[rtype(result = "Option<i64>")]
pub struct Appended {
    pub blob: BlobInfo,
    /// The transaction's new version, if the append bumped it.
    pub version: Option<i64>,
    /// The append created the body blob: reload to pick it up.
    pub created: bool,
}

impl Handler<Appended> for TransactionActor {
    type Result = AtomicResponse<Self, Option<i64>>;

    fn handle(&mut self, msg: Appended, _: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        if self.record.in_memory() {
            let refresh = self.settings.blob_tx_refresh_interval;
            let version = self.change_in_memory(|r| memory::appended(r, &msg.blob, refresh));
            return AtomicResponse::new(Box::pin(fut::ready(version)));
        }
        let Some(version) = msg.version else {
            return AtomicResponse::new(Box::pin(fut::ready(None)));
        };
        if version <= self.record.version {
            return AtomicResponse::new(Box::pin(fut::ready(Some(version))));
        }
        // The append is the only write since our copy: apply it here instead of re-reading
        // the row (a body created by this append, or a gap, needs the durable row).
        if !msg.created && version == self.record.version + 1 {
            let mut record = (*self.record).clone();
            if apply_blob(&mut record, &msg.blob) {
                record.version = version;
                self.publish(record);
                return AtomicResponse::new(Box::pin(fut::ready(Some(version))));
            }
        }
        AtomicResponse::new(Box::pin(self.reload().into_actor(self).map(
            move |res, act, _| {
                match res {
                    Ok(record) => act.publish(record),
                    Err(e) => {
                        tracing::warn!(rest_id = %act.record.rest_id, "reload after append: {e}")
                    }
                }
                Some(version)
            },
        )))
    }
}

/// Folds an appended blob's new state into a record; false if the record does not know it.
fn apply_blob(record: &mut TxRecord, blob: &BlobInfo) -> bool {
    let Some(known) = record.blobs.iter_mut().find(|b| b.name == blob.name) else {
        return false;
    };
    *known = blob.clone();
    let state = BlobState {
        length: blob.length,
        total: blob.total,
    };
    match &mut record.tx.body {
        Some(Body::Message(s)) if blob.name == BODY_BLOB => *s = state,
        Some(Body::MessageBuilder { blobs, .. }) => {
            match blobs.iter_mut().find(|(name, _)| *name == blob.name) {
                Some((_, s)) => *s = state,
                None => return false,
            }
        }
        _ => return false,
    }
    record.input_done = record.blobs.iter().all(BlobInfo::finalized);
    true
}

/// Cancel requested by the client.
#[derive(Message)]
#[rtype(result = "Result<Arc<TxRecord>, RestError>")]
pub struct Cancel;

impl Handler<Cancel> for TransactionActor {
    type Result = AtomicResponse<Self, Result<Arc<TxRecord>, RestError>>;

    fn handle(&mut self, _: Cancel, _: &mut Self::Context) -> Self::Result {
        self.last_activity = Instant::now();
        if self.record.in_memory() {
            self.change_in_memory(memory::cancel);
            return AtomicResponse::new(Box::pin(fut::ready(Ok(self.record.clone()))));
        }
        let storage = self.storage.clone();
        let rest_id = self.record.rest_id.clone();
        let reload = self.reload();
        let work = async move {
            match storage.cancel(&rest_id).await? {
                CancelOutcome::NotFound => Err(RestError::NotFound("unknown tx")),
                CancelOutcome::Cancelled { .. } | CancelOutcome::AlreadyFinal { .. } => {
                    reload.await
                }
            }
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|res, act, _| {
            act.publish(res?);
            Ok(act.record.clone())
        })))
    }
}

/// Re-read the transaction from storage (a long poll timed out; another replica may have
/// written it).
#[derive(Message)]
#[rtype(result = "Result<Arc<TxRecord>, RestError>")]
pub struct Reload;

impl Handler<Reload> for TransactionActor {
    type Result = AtomicResponse<Self, Result<Arc<TxRecord>, RestError>>;

    fn handle(&mut self, _: Reload, _: &mut Self::Context) -> Self::Result {
        AtomicResponse::new(Box::pin(self.reload().into_actor(self).map(
            |res, act, _| {
                act.publish(res?);
                Ok(act.record.clone())
            },
        )))
    }
}

/// Makes the actor panic: used to exercise supervision.
#[doc(hidden)]
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

impl Handler<Crash> for TransactionActor {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("transaction actor {} asked to crash", self.record.rest_id);
    }
}

/// Writes of the attempt running in this process: its responses so far, or its end.
/// Going through the actor keeps one writer per transaction in this process, so the
/// version it holds is current and the write does not race the client's updates.
#[derive(Message)]
#[rtype(result = "Result<Arc<TxRecord>, StorageError>")]
pub struct AttemptWrite {
    pub lease: Lease,
    pub responses: Transaction,
    pub finish: Option<Finish>,
}

/// Conflicts are retried after a reload; more than this many means something is wrong.
const WRITE_TRIES: u32 = 5;

impl Handler<AttemptWrite> for TransactionActor {
    type Result = AtomicResponse<Self, Result<Arc<TxRecord>, StorageError>>;

    fn handle(&mut self, msg: AttemptWrite, _: &mut Self::Context) -> Self::Result {
        if self.record.in_memory() {
            let written = self.change_in_memory(|r| match &msg.finish {
                None => memory::write_attempt(r, msg.lease, &msg.responses),
                Some(f) => memory::finish_attempt(r, msg.lease, f),
            });
            let answer = written.map(|()| self.record.clone());
            return AtomicResponse::new(Box::pin(fut::ready(answer)));
        }
        let lease = msg.lease;
        let msg = Arc::new(msg);
        // Fenced: once the lease moved (recovery), this attempt is void.
        self.versioned_write(
            move |r| r.lease == Some(lease),
            move |s, mut r| {
                let msg = msg.clone();
                async move {
                    match &msg.finish {
                        None => {
                            r.version = s
                                .write_attempt(r.id, r.version, msg.lease, &msg.responses)
                                .await?;
                            r.tx.mail_response = msg.responses.mail_response.clone();
                            r.tx.rcpt_response = msg.responses.rcpt_response.clone();
                            r.tx.data_response = msg.responses.data_response.clone();
                            Ok(Some(r))
                        }
                        // The end of an attempt changes the lease and maybe the final
                        // reason: storage answers with what it decided.
                        Some(f) => Ok(Some(
                            s.finish_attempt_record(r, msg.lease, f.clone()).await?,
                        )),
                    }
                }
            },
        )
    }
}

/// Turns on retries and bounces (the exploder storing and forwarding a recipient).
#[derive(Message)]
#[rtype(result = "Result<Arc<TxRecord>, StorageError>")]
pub struct EnableRetry;

impl Handler<EnableRetry> for TransactionActor {
    type Result = AtomicResponse<Self, Result<Arc<TxRecord>, StorageError>>;

    fn handle(&mut self, _: EnableRetry, _: &mut Self::Context) -> Self::Result {
        self.versioned_write(
            |_| true,
            |s, r| async move {
                let mut envelope = r.tx.clone();
                envelope.retry = true;
                envelope.notification = true;
                s.write_envelope(r.id, r.version, &envelope).await?;
                Ok(None)
            },
        )
    }
}

/// Installs a copy read elsewhere (the dequeuer's, which carries the new attempt and its
/// lease) if it is newer, and answers with the current copy. An actor that outlived the
/// previous attempt would otherwise keep serving — and handing the delivery — a stale copy.
#[derive(Message)]
#[rtype(result = "Arc<TxRecord>")]
pub struct Adopt(pub TxRecord);

impl Handler<Adopt> for TransactionActor {
    type Result = MessageResult<Adopt>;

    fn handle(&mut self, msg: Adopt, _: &mut Self::Context) -> Self::Result {
        if msg.0.version > self.record.version {
            self.publish(msg.0);
        }
        MessageResult(self.record.clone())
    }
}

/// The current copy.
#[derive(Message)]
#[rtype(result = "Arc<TxRecord>")]
pub struct Snapshot;

impl Handler<Snapshot> for TransactionActor {
    type Result = MessageResult<Snapshot>;

    fn handle(&mut self, _: Snapshot, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.record.clone())
    }
}

/// A keep-alive from inside the router (the exploder forwarding a downstream heartbeat to
/// a recipient's transaction).
#[derive(Message)]
#[rtype(result = "Result<Arc<TxRecord>, StorageError>")]
pub struct Ping;

/// Gives the transaction its body (the exploder passing on the downstream body).
#[derive(Message)]
#[rtype(result = "Result<Arc<TxRecord>, StorageError>")]
pub struct AttachBody(pub koukan_db::NewBody);

impl TransactionActor {
    /// Runs a versioned write with the current version and publishes the result. A write
    /// that knows the new record returns it; `None` means "read it back". On a conflict the
    /// record is re-read and, if `still_ours` holds for it, the write is tried again.
    fn versioned_write<F, Fut>(
        &mut self,
        still_ours: impl Fn(&TxRecord) -> bool + 'static,
        write: F,
    ) -> AtomicResponse<Self, Result<Arc<TxRecord>, StorageError>>
    where
        F: Fn(Storage, TxRecord) -> Fut + 'static,
        Fut: Future<Output = Result<Option<TxRecord>, StorageError>> + 'static,
    {
        self.last_activity = Instant::now();
        if self.record.in_memory() {
            return AtomicResponse::new(Box::pin(fut::ready(Err(StorageError::Invalid(
                "not possible on a transaction kept in memory".into(),
            )))));
        }
        let storage = self.storage.clone();
        let record = self.record.clone();
        let work = async move {
            let load = |id| {
                let storage = storage.clone();
                async move { storage.load_id(id).await?.ok_or(StorageError::NotFound) }
            };
            let mut record = (*record).clone();
            for i in 0..WRITE_TRIES {
                match write(storage.clone(), record.clone()).await {
                    Ok(Some(written)) => return Ok(written),
                    Ok(None) => return load(record.id).await,
                    Err(StorageError::Conflict) => {
                        tokio::time::sleep(Backoff::conflict_pause(i)).await;
                        record = load(record.id).await?;
                        if !still_ours(&record) {
                            return Err(StorageError::Conflict);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(StorageError::Conflict)
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|res, act, _| {
            act.publish(res?);
            Ok(act.record.clone())
        })))
    }
}

impl Handler<Ping> for TransactionActor {
    type Result = AtomicResponse<Self, Result<Arc<TxRecord>, StorageError>>;

    fn handle(&mut self, _: Ping, _: &mut Self::Context) -> Self::Result {
        if self.record.in_memory() {
            self.change_in_memory(memory::ping);
            return AtomicResponse::new(Box::pin(fut::ready(Ok(self.record.clone()))));
        }
        // Only the version moves: no need to read the row back.
        self.versioned_write(
            |_| true,
            |s, mut r| async move {
                r.version = s.ping(r.id, r.version).await?;
                Ok(Some(r))
            },
        )
    }
}

impl Handler<AttachBody> for TransactionActor {
    type Result = AtomicResponse<Self, Result<Arc<TxRecord>, StorageError>>;

    fn handle(&mut self, msg: AttachBody, _: &mut Self::Context) -> Self::Result {
        let body = msg.0;
        self.versioned_write(
            |_| true,
            move |s, r| {
                let body = body.clone();
                async move { Ok(Some(s.set_body_record(r, body).await?)) }
            },
        )
    }
}
