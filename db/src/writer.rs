//! The writer: one task owning one connection. It drains its queue, runs each request in a
//! savepoint of one SQL transaction (a failing request does not abort the batch), commits
//! once and only then answers every caller — group commit, so one fsync serves many writes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use koukan::Transaction;
use tokio::sync::{mpsc, oneshot};

use crate::StorageError;
use crate::conn::{Conn, OwnedConn, establish};
use crate::ops::{self, Result};
use crate::types::*;

pub(crate) enum Op {
    OpenSession {
        uri: String,
    },
    RefreshSession,
    Recover {
        ttl: i64,
    },
    EndSession,
    Create(Box<NewTransaction>),
    WriteEnvelope {
        id: DbId,
        version: i64,
        envelope: Box<Transaction>,
    },
    Ping {
        id: DbId,
        version: i64,
    },
    SetBody {
        id: DbId,
        version: i64,
        body: Box<NewBody>,
    },
    /// `reason: None` is a client cancel; `Some` ends the transaction as failed.
    Cancel {
        rest_id: String,
        reason: Option<String>,
    },
    Append(Box<Append>),
    AppendBlob(Box<BlobAppend>),
    StartAttempt {
        id: DbId,
        version: i64,
    },
    Dequeue,
    WriteAttempt {
        id: DbId,
        version: i64,
        lease: Lease,
        responses: Box<Transaction>,
    },
    FinishAttempt {
        id: DbId,
        version: i64,
        lease: Lease,
        finish: Box<Finish>,
    },
    Gc {
        ttl: i64,
    },
}

pub(crate) enum Reply {
    Session(SessionId),
    Bool(bool),
    Recovery(Recovery),
    Unit,
    Record(Box<TxRecord>),
    MaybeRecord(Option<Box<TxRecord>>),
    Version(i64),
    Finished(ops::Finished),
    BodySet(Box<ops::BodySet>),
    Cancel(CancelOutcome),
    Append(AppendOutcome),
    Gc(u64, u64),
}

pub(crate) type ReplyTx = oneshot::Sender<Result<Reply>>;

pub(crate) enum Msg {
    Op(Op, ReplyTx),
    /// Answer after everything queued before it.
    Close(oneshot::Sender<()>),
}

/// One writer: a connection and the batches it commits. SQLite has exactly one (the
/// database has one write lock); PostgreSQL several, sharing one queue, so one writer's
/// batch is built and run while another's commit is in flight.
pub(crate) struct Writer {
    pub rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Msg>>>,
    pub backend: Backend,
    /// `None` after a failure that may have broken it (and for the writers after the
    /// first, until their first batch).
    pub conn: Option<OwnedConn>,
    /// This process's session, known once `OpenSession` ran on any writer.
    pub session: Arc<AtomicI64>,
    pub max_batch: usize,
    pub refresh_secs: i64,
    /// `Close` acknowledgements, sent once every writer has stopped.
    pub acks: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
}

/// Runs the writers until the queue is closed; then acknowledges `Close`.
pub(crate) async fn run_all(writers: Vec<Writer>) {
    let Some(acks) = writers.first().map(|w| w.acks.clone()) else {
        return;
    };
    let tasks: Vec<_> = writers.into_iter().map(|w| tokio::spawn(w.run())).collect();
    for t in tasks {
        let _ = t.await;
    }
    for ack in acks.lock().unwrap().drain(..) {
        let _ = ack.send(());
    }
}

/// Copies an error for every caller of a failed batch.
fn copy_err(e: &StorageError) -> StorageError {
    match e {
        StorageError::Conflict => StorageError::Conflict,
        StorageError::Closed => StorageError::Closed,
        e => StorageError::Database(e.to_string()),
    }
}

impl Writer {
    pub(crate) async fn run(mut self) {
        let mut batch: Vec<(Op, ReplyTx)> = Vec::new();
        loop {
            let mut stop = false;
            {
                let mut rx = self.rx.lock().await;
                match rx.recv().await {
                    Some(Msg::Op(op, tx)) => batch.push((op, tx)),
                    Some(Msg::Close(ack)) => stop = self.close(&mut rx, ack),
                    None => stop = true,
                }
                while !stop && batch.len() < self.max_batch {
                    match rx.try_recv() {
                        Ok(Msg::Op(op, tx)) => batch.push((op, tx)),
                        Ok(Msg::Close(ack)) => stop = self.close(&mut rx, ack),
                        Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() {
                self.run_batch(std::mem::take(&mut batch)).await;
            }
            if stop {
                return;
            }
        }
    }

    /// `Close`: nothing queued after it runs. The other writers find the queue closed and
    /// stop after their batch; [`run_all`] acknowledges once all have.
    fn close(&self, rx: &mut mpsc::Receiver<Msg>, ack: oneshot::Sender<()>) -> bool {
        self.acks.lock().unwrap().push(ack);
        rx.close();
        while let Ok(m) = rx.try_recv() {
            match m {
                Msg::Op(_, tx) => {
                    let _ = tx.send(Err(StorageError::Closed));
                }
                Msg::Close(ack) => self.acks.lock().unwrap().push(ack),
            }
        }
        true
    }

    async fn run_batch(&mut self, batch: Vec<(Op, ReplyTx)>) {
        if self.conn.is_none() {
            match establish(&self.backend).await {
                Ok(c) => self.conn = Some(c),
                Err(e) => return fail_all(batch, &e),
            }
        }
        let sqlite = matches!(self.backend, Backend::Sqlite(_));
        let single = batch.len() == 1;
        let (session, refresh_secs) = (self.session.load(Ordering::Relaxed), self.refresh_secs);
        let conn = self.conn.as_mut().expect("established above");
        let mut c = conn.borrow();

        // IMMEDIATE: take SQLite's write lock up front; a deferred transaction that reads
        // first can fail with SQLITE_BUSY_SNAPSHOT when another connection wrote meanwhile.
        let begin = if sqlite { "BEGIN IMMEDIATE" } else { "BEGIN" };
        let now = match ops::exec(&mut c, begin).await {
            Ok(()) => ops::db_now(&mut c).await,
            Err(e) => Err(e),
        };
        let now = match now {
            Ok(n) => n,
            Err(e) => {
                let _ = ops::exec(&mut c, "ROLLBACK").await;
                self.conn = None;
                return fail_all(batch, &e);
            }
        };

        let mut results: Vec<(Result<Reply>, ReplyTx)> = Vec::with_capacity(batch.len());
        let mut broken: Option<StorageError> = None;
        // The statements closing the previous request's savepoint; sent together with the
        // next statement to save a round trip per request (it matters on Postgres).
        let mut pending_end: &[&str] = &[];
        for (op, tx) in batch {
            if broken.is_some() {
                results.push((Err(StorageError::Closed), tx));
                continue;
            }
            if !single {
                let sql: Vec<&str> = std::mem::take(&mut pending_end)
                    .iter()
                    .copied()
                    .chain(["SAVEPOINT req"])
                    .collect();
                if let Err(e) = ops::exec_all(&mut c, &sql).await {
                    broken = Some(e);
                    results.push((Err(StorageError::Closed), tx));
                    continue;
                }
            }
            let r = apply(&mut c, now, session, refresh_secs, op).await;
            if !single {
                pending_end = if r.is_ok() {
                    &["RELEASE SAVEPOINT req"]
                } else {
                    &["ROLLBACK TO SAVEPOINT req", "RELEASE SAVEPOINT req"]
                };
            }
            if let Ok(Reply::Session(id)) = &r {
                self.session.store(*id, Ordering::Relaxed);
            }
            results.push((r, tx));
        }

        let outcome = match broken {
            Some(e) => Err(e),
            // A lone failed request: nothing to keep.
            None if single && results[0].0.is_err() => {
                let _ = ops::exec(&mut c, "ROLLBACK").await;
                for (r, tx) in results {
                    let _ = tx.send(r);
                }
                return;
            }
            None => {
                let sql: Vec<&str> = pending_end.iter().copied().chain(["COMMIT"]).collect();
                ops::exec_all(&mut c, &sql).await
            }
        };
        match outcome {
            Ok(()) => {
                for (r, tx) in results {
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                let _ = ops::exec(&mut c, "ROLLBACK").await;
                self.conn = None;
                tracing::warn!("storage batch failed: {e}");
                for (r, tx) in results {
                    let _ = tx.send(match r {
                        Ok(_) => Err(copy_err(&e)),
                        Err(own) => Err(own),
                    });
                }
            }
        }
    }
}

fn fail_all(batch: Vec<(Op, ReplyTx)>, e: &StorageError) {
    for (_, tx) in batch {
        let _ = tx.send(Err(copy_err(e)));
    }
}

async fn apply(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    refresh_secs: i64,
    op: Op,
) -> Result<Reply> {
    Ok(match op {
        Op::OpenSession { uri } => Reply::Session(ops::open_session(c, now, &uri).await?),
        Op::RefreshSession => Reply::Bool(ops::refresh_session(c, now, me).await?),
        Op::Recover { ttl } => Reply::Recovery(ops::recover(c, now, me, ttl).await?),
        Op::EndSession => {
            ops::end_session(c, now, me).await?;
            Reply::Unit
        }
        Op::Create(new) => Reply::Record(Box::new(ops::create_record(c, now, me, &new).await?)),
        Op::WriteEnvelope {
            id,
            version,
            envelope,
        } => Reply::Version(ops::write_envelope(c, now, id, version, &envelope).await?),
        Op::Ping { id, version } => Reply::Version(ops::ping(c, now, id, version).await?),
        Op::SetBody { id, version, body } => {
            Reply::BodySet(Box::new(ops::set_body(c, now, id, version, &body).await?))
        }
        Op::Cancel { rest_id, reason } => {
            Reply::Cancel(ops::cancel(c, now, me, &rest_id, reason.as_deref()).await?)
        }
        Op::Append(a) => Reply::Append(ops::append(c, now, me, refresh_secs, &a).await?),
        Op::AppendBlob(a) => Reply::Append(ops::append_blob(c, now, &a).await?),
        Op::StartAttempt { id, version } => {
            Reply::Record(Box::new(ops::start_attempt(c, now, me, id, version).await?))
        }
        Op::Dequeue => Reply::MaybeRecord(ops::dequeue(c, now, me).await?.map(Box::new)),
        Op::WriteAttempt {
            id,
            version,
            lease,
            responses,
        } => Reply::Version(ops::write_attempt(c, now, id, version, lease, &responses).await?),
        Op::FinishAttempt {
            id,
            version,
            lease,
            finish,
        } => Reply::Finished(ops::finish_attempt(c, now, me, id, version, lease, &finish).await?),
        Op::Gc { ttl } => {
            let (t, b) = ops::gc(c, now, ttl).await?;
            Reply::Gc(t, b)
        }
    })
}
