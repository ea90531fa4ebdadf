//! The storage API. Method bodies are implemented in this crate's private modules.

use std::time::Duration;

use bytes::Bytes;
use koukan::Transaction;

use std::future::Future;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use crate::StorageError;
use crate::conn::{Pool, Pooled, establish, migrate};
use crate::ops::{self, Key};
use crate::types::*;
use crate::writer::{Msg, Op, Reply, Writer, run_all};

type Result<T> = std::result::Result<T, StorageError>;

/// Handle to the database; cheap to clone, shared by all actors of a process.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    /// The storage runtime (its own thread): the writer, the pool and every query run there,
    /// so callers may live on any runtime or actix arbiter.
    handle: Handle,
    writer: mpsc::Sender<Msg>,
    pool: Arc<Pool>,
    session: SessionId,
}

impl Storage {
    /// Connects, applies pending migrations, starts the writer task and inserts this
    /// process's session row (`live`, `uri = session_uri`). SQLite: WAL, foreign keys on,
    /// `synchronous=FULL`, busy timeout. Must work when called from inside an actix
    /// (current-thread) runtime. Live sessions with the same `session_uri` are earlier
    /// incarnations of this replica (a crash and restart): they are declared dead at once
    /// and their leases released, fenced as in `recover`.
    pub async fn open(
        backend: Backend,
        session_uri: &str,
        opts: StorageOptions,
    ) -> Result<Storage> {
        let (handle, start) = spawn_runtime().await?;
        let b = backend.clone();
        let pool_size = opts.read_pool_size;
        let setup = handle.spawn(async move {
            migrate(&b).await?;
            let conn = establish(&b).await?;
            let pool = Pool::new(&b, pool_size).await?;
            Ok::<_, StorageError>((conn, pool))
        });
        let (conn, pool) = setup.await.map_err(|_| StorageError::Closed)??;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let count = match backend {
            Backend::Sqlite(_) => 1,
            Backend::Postgres(_) => opts.pg_writers.max(1),
        };
        let (rx, session, acks) = (
            Arc::new(tokio::sync::Mutex::new(rx)),
            Arc::default(),
            Arc::default(),
        );
        let mut conn = Some(conn);
        let writers = (0..count)
            .map(|_| Writer {
                rx: Arc::clone(&rx),
                backend: backend.clone(),
                conn: conn.take(),
                session: Arc::clone(&session),
                max_batch: opts.max_batch.max(1),
                refresh_secs: secs(opts.blob_tx_refresh_interval),
                acks: Arc::clone(&acks),
            })
            .collect();
        start.send(writers).map_err(|_| StorageError::Closed)?;
        let mut inner = Inner {
            handle,
            writer: tx,
            pool: Arc::new(pool),
            session: 0,
        };
        let op = Op::OpenSession {
            uri: session_uri.to_string(),
        };
        inner.session = match write(&inner.writer, op).await? {
            Reply::Session(id) => id,
            _ => return Err(unexpected()),
        };
        Ok(Storage {
            inner: Arc::new(inner),
        })
    }

    pub fn session_id(&self) -> SessionId {
        self.inner.session
    }

    /// DB clock, Unix seconds.
    pub async fn now(&self) -> Result<i64> {
        self.read(|mut p| async move { ops::db_now(&mut p.conn()).await })
            .await
    }

    // ---- sessions ------------------------------------------------------------------

    /// Heartbeat: `last_update = now` if this session is still live. `Ok(false)` means this
    /// session was declared dead: the process must stop writing.
    pub async fn refresh_session(&self) -> Result<bool> {
        match self.write(Op::RefreshSession).await? {
            Reply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    /// Declares sessions whose heartbeat is older than `ttl` dead and releases their leases
    /// in the same SQL transaction, bumping each transaction's version and lease generation
    /// (fencing). Released transactions without `retry` whose attempt was interrupted get
    /// `final_attempt_reason = "attempt interrupted"` and their missing responses filled with
    /// a temporary error in the newest attempt row. Dead sessions older than `ttl` that no
    /// transaction references are deleted.
    pub async fn recover(&self, ttl: Duration) -> Result<Recovery> {
        match self.write(Op::Recover { ttl: secs(ttl) }).await? {
            Reply::Recovery(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    /// Clean shutdown: marks this session dead and releases its leases (fenced, as recover).
    pub async fn end_session(&self) -> Result<()> {
        match self.write(Op::EndSession).await? {
            Reply::Unit => Ok(()),
            _ => Err(unexpected()),
        }
    }

    // ---- transactions -----------------------------------------------------------------

    /// Inserts a transaction (version 1) with its body blobs and refs, in one SQL
    /// transaction. Leased to this session if `new.leased`. `input_done` when every blob is
    /// finalized (an inline body, a reused body, a builder spec whose blobs are all inline or
    /// reused, or no blob at all for a builder spec). Errors: `Duplicate`, `BadReuse`.
    pub async fn create(&self, new: NewTransaction) -> Result<TxRecord> {
        match self.write(Op::Create(Box::new(new))).await? {
            Reply::Record(r) => Ok(*r),
            _ => Err(unexpected()),
        }
    }

    pub async fn load(&self, rest_id: &str) -> Result<Option<TxRecord>> {
        let key = Key::Rest(rest_id.to_string());
        self.read(|mut p| async move { ops::load(&mut p.conn(), key).await })
            .await
    }

    pub async fn load_id(&self, id: DbId) -> Result<Option<TxRecord>> {
        self.read(move |mut p| async move { ops::load(&mut p.conn(), Key::Id(id)).await })
            .await
    }

    /// Cheap probe: `(version, lease_uri)` of a transaction.
    pub async fn version(&self, rest_id: &str) -> Result<Option<(i64, Option<String>)>> {
        let rest_id = rest_id.to_string();
        self.read(|mut p| async move { ops::version_probe(&mut p.conn(), &rest_id).await })
            .await
    }

    /// Compare-and-swap write of the envelope: stores `envelope` (its DB fields: hosts,
    /// mail_from, rcpt_to, smtp_meta, sender, retry, notification, cancelled) if the row is
    /// at `version`; returns the new version. A `retry`/`notification` that appears on a
    /// `oneshot` transaction clears the marker (it becomes retryable again); a notification
    /// that appears on a final transaction without a DSN decision sets `notification_pending`.
    /// `Conflict` when the version moved.
    pub async fn write_envelope(
        &self,
        id: DbId,
        version: i64,
        envelope: &Transaction,
    ) -> Result<i64> {
        let op = Op::WriteEnvelope {
            id,
            version,
            envelope: Box::new(envelope.clone()),
        };
        self.write_version(op).await
    }

    /// Gives a transaction that has no body yet its body (e.g. a reused, finalized blob),
    /// setting `input_done` when complete. `Invalid` if it already has one.
    pub async fn set_body(&self, id: DbId, version: i64, body: NewBody) -> Result<i64> {
        Ok(self.body_set(id, version, body).await?.version)
    }

    /// [`set_body`](Self::set_body) of `record` (at its version), returning the record as
    /// it now stands without reading it back.
    pub async fn set_body_record(&self, mut record: TxRecord, body: NewBody) -> Result<TxRecord> {
        self.body_set(record.id, record.version, body)
            .await?
            .apply(&mut record)?;
        Ok(record)
    }

    async fn body_set(&self, id: DbId, version: i64, body: NewBody) -> Result<ops::BodySet> {
        let op = Op::SetBody {
            id,
            version,
            body: Box::new(body),
        };
        match self.write(op).await? {
            Reply::BodySet(b) => Ok(*b),
            _ => Err(unexpected()),
        }
    }

    /// Version bump only (a heartbeat). Allowed on finished transactions too.
    pub async fn ping(&self, id: DbId, version: i64) -> Result<i64> {
        self.write_version(Op::Ping { id, version }).await
    }

    /// Cancel by a client: `cancelled` in the envelope and `final_attempt_reason =
    /// "downstream cancelled"` unless a real final reason exists (then nothing is written).
    /// Retries version conflicts internally.
    pub async fn cancel(&self, rest_id: &str) -> Result<CancelOutcome> {
        let op = Op::Cancel {
            rest_id: rest_id.to_string(),
            reason: None,
        };
        match self.write(op).await? {
            Reply::Cancel(c) => Ok(c),
            _ => Err(unexpected()),
        }
    }

    /// Ends a transaction for good outside any attempt (e.g. its actor keeps crashing):
    /// sets `final_attempt_reason = reason` unless a real one exists, releases a lease held
    /// by this session, bumps the version. Same outcomes as `cancel`.
    pub async fn fail(&self, rest_id: &str, reason: &str) -> Result<CancelOutcome> {
        let op = Op::Cancel {
            rest_id: rest_id.to_string(),
            reason: Some(reason.to_string()),
        };
        match self.write(op).await? {
            Reply::Cancel(c) => Ok(c),
            _ => Err(unexpected()),
        }
    }

    // ---- blobs ------------------------------------------------------------------------

    /// Appends bytes to a blob (see `AppendOutcome`). Semantics: the append lands iff
    /// `offset == held length`; an offset inside the held data skips the overlap (assumed
    /// identical) and appends the rest; a declared total is write-once and must agree with
    /// any earlier one (else `Mismatch`); an empty remainder still records the declared total.
    /// When the blob becomes finalized the transaction's version is bumped and, if all its
    /// blobs are final, `input_done` set — in the same SQL transaction. A partial append bumps
    /// the version when the transaction was last written more than
    /// `blob_tx_refresh_interval` ago. If another live session holds the lease nothing is
    /// written (`LeasedElsewhere`). Content is stored in chunks, never rewritten whole.
    pub async fn append(&self, append: Append) -> Result<AppendOutcome> {
        match self.write(Op::Append(Box::new(append))).await? {
            Reply::Append(a) => Ok(a),
            _ => Err(unexpected()),
        }
    }

    /// Appends to a blob that belongs to a transaction kept in memory (see [`BlobAppend`]):
    /// the same semantics as [`append`](Self::append) for the blob; `Ok` carries no version
    /// (the transaction is not stored). `UnknownBlob` for an unknown id, or a create at a
    /// non-zero offset.
    pub async fn append_blob(&self, append: BlobAppend) -> Result<AppendOutcome> {
        match self.write(Op::AppendBlob(Box::new(append))).await? {
            Reply::Append(a) => Ok(a),
            _ => Err(unexpected()),
        }
    }

    /// Reads up to `max` bytes of a blob from `offset` (may return less; empty at the end).
    pub async fn read_blob(&self, blob_id: i64, offset: u64, max: usize) -> Result<Bytes> {
        self.read(
            move |mut p| async move { ops::read_blob(&mut p.conn(), blob_id, offset, max).await },
        )
        .await
    }

    // ---- attempts -----------------------------------------------------------------------

    /// Starts an attempt on a transaction leased to this session at `version` (a create
    /// with `leased`): inserts attempt row n+1, bumps the version, and sets the `oneshot`
    /// marker if the transaction has no `retry`. Returns the updated record.
    pub async fn start_attempt(&self, id: DbId, version: i64) -> Result<TxRecord> {
        match self.write(Op::StartAttempt { id, version }).await? {
            Reply::Record(r) => Ok(*r),
            _ => Err(unexpected()),
        }
    }

    /// Takes one due transaction (unleased; no final reason; input done or created by this
    /// session; `next_attempt_time` null or <= now), or one with `notification_pending`,
    /// leases it to this session and starts its attempt (no attempt row for a
    /// notification-only pass). Postgres: `FOR UPDATE SKIP LOCKED`, ordered by
    /// `next_attempt_time`. `None` when nothing is due.
    pub async fn dequeue(&self) -> Result<Option<TxRecord>> {
        match self.write(Op::Dequeue).await? {
            Reply::MaybeRecord(r) => Ok(r.map(|r| *r)),
            _ => Err(unexpected()),
        }
    }

    /// Writes the responses of the current attempt (fenced: the lease must be `lease`).
    /// Returns the new version.
    pub async fn write_attempt(
        &self,
        id: DbId,
        version: i64,
        lease: Lease,
        responses: &Transaction,
    ) -> Result<i64> {
        let op = Op::WriteAttempt {
            id,
            version,
            lease,
            responses: Box::new(responses.clone()),
        };
        self.write_version(op).await
    }

    /// Ends the current attempt (fenced): writes its responses, the final reason (first
    /// real reason wins; a later one is ignored, not an error), `next_attempt_time`, the DSN
    /// bookkeeping, inserts `finish.dsn` if any, and releases the lease — one SQL
    /// transaction. Returns the new version.
    pub async fn finish_attempt(
        &self,
        id: DbId,
        version: i64,
        lease: Lease,
        finish: Finish,
    ) -> Result<i64> {
        Ok(self.finished(id, version, lease, finish).await?.version)
    }

    /// [`finish_attempt`](Self::finish_attempt) of `record` (at its version), returning
    /// the record as it now stands without reading it back.
    pub async fn finish_attempt_record(
        &self,
        mut record: TxRecord,
        lease: Lease,
        finish: Finish,
    ) -> Result<TxRecord> {
        // Only the responses are needed afterwards (not the DSN and its body).
        let responses = finish.responses.clone();
        self.finished(record.id, record.version, lease, finish)
            .await?
            .apply(&mut record, &responses);
        Ok(record)
    }

    async fn finished(
        &self,
        id: DbId,
        version: i64,
        lease: Lease,
        finish: Finish,
    ) -> Result<ops::Finished> {
        let op = Op::FinishAttempt {
            id,
            version,
            lease,
            finish: Box::new(finish),
        };
        match self.write(op).await? {
            Reply::Finished(f) => Ok(f),
            _ => Err(unexpected()),
        }
    }

    // ---- housekeeping -------------------------------------------------------------------

    /// Deletes unleased transactions idle for more than `ttl` that are final (or whose
    /// input never completed), except those with `notification_pending`, then blobs no
    /// transaction references. Returns (transactions, blobs) deleted.
    pub async fn gc(&self, ttl: Duration) -> Result<(u64, u64)> {
        match self.write(Op::Gc { ttl: secs(ttl) }).await? {
            Reply::Gc(t, b) => Ok((t, b)),
            _ => Err(unexpected()),
        }
    }

    /// Stops the writer after draining queued requests.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.writer.send(Msg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Writes queued beyond this make callers wait (backpressure).
const WRITE_QUEUE: usize = 4096;

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn unexpected() -> StorageError {
    StorageError::Database("internal: unexpected writer reply".into())
}

async fn write(writer: &mpsc::Sender<Msg>, op: Op) -> Result<Reply> {
    let (tx, rx) = oneshot::channel();
    writer
        .send(Msg::Op(op, tx))
        .await
        .map_err(|_| StorageError::Closed)?;
    rx.await.map_err(|_| StorageError::Closed)?
}

impl Storage {
    async fn write(&self, op: Op) -> Result<Reply> {
        write(&self.inner.writer, op).await
    }

    async fn write_version(&self, op: Op) -> Result<i64> {
        match self.write(op).await? {
            Reply::Version(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }

    /// Runs a read on a pooled connection, on the storage runtime.
    async fn read<R, F, Fut>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(Pooled) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R>> + Send + 'static,
    {
        let pool = self.inner.pool.clone();
        self.inner
            .handle
            .spawn(async move { f(pool.get().await?).await })
            .await
            .map_err(|_| StorageError::Closed)?
    }
}

/// Starts the storage runtime on its own thread. It runs the writer handed over through the
/// returned sender until the writer exits, then shuts down (on that thread, so dropping the
/// runtime never happens inside someone's async context).
async fn spawn_runtime() -> Result<(Handle, oneshot::Sender<Vec<Writer>>)> {
    let (handle_tx, handle_rx) = oneshot::channel();
    let (start_tx, start_rx) = oneshot::channel::<Vec<Writer>>();
    std::thread::Builder::new()
        .name("koukan-db".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("koukan-db")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                    return;
                }
            };
            let _ = handle_tx.send(Ok(rt.handle().clone()));
            rt.block_on(async move {
                if let Ok(w) = start_rx.await {
                    run_all(w).await;
                }
            });
        })
        .map_err(|e| StorageError::Database(format!("storage thread: {e}")))?;
    let handle = handle_rx
        .await
        .map_err(|_| StorageError::Closed)?
        .map_err(|e| StorageError::Database(format!("storage runtime: {e}")))?;
    Ok((handle, start_tx))
}
