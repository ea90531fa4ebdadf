//! Values passed to and returned by [`crate::Storage`].

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use koukan::Transaction;
use koukan::rest::{BlobSource, BlobUri};
use serde_json::Value;

/// Internal row id of a transaction.
pub type DbId = i64;
/// Id of one router process lifetime (a row of `sessions`).
pub type SessionId = i64;

/// Which database, already resolved from the config URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A database file; created if missing.
    Sqlite(PathBuf),
    /// A URL tokio-postgres accepts (`postgres://user@host:port/db`).
    Postgres(String),
}

#[derive(Clone, Debug)]
pub struct StorageOptions {
    /// Read connections (the writer has its own).
    pub read_pool_size: u32,
    /// Most requests committed in one SQL transaction.
    pub max_batch: usize,
    /// PostgreSQL: writer connections committing batches side by side (SQLite has one
    /// writer: the database has one write lock).
    pub pg_writers: usize,
    /// A partial blob append bumps the transaction's version (a keep-alive) when the
    /// transaction was last written longer ago than this.
    pub blob_tx_refresh_interval: Duration,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            read_pool_size: 8,
            max_batch: 256,
            pg_writers: 4,
            blob_tx_refresh_interval: Duration::from_secs(10),
        }
    }
}

/// A lease: the session running an attempt, and the generation that fences it. Recovery of
/// a dead session bumps the generation, so the dead holder can never write again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub session: SessionId,
    pub generation: i64,
}

/// One blob of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// `koukan::rest::BODY_BLOB` for the raw body, else the message-builder blob id.
    pub name: String,
    pub blob_id: i64,
    /// Bytes stored so far.
    pub length: u64,
    /// Declared final length, once known.
    pub total: Option<u64>,
}

impl BlobInfo {
    pub fn finalized(&self) -> bool {
        self.total == Some(self.length)
    }
}

/// A transaction as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct TxRecord {
    pub id: DbId,
    pub rest_id: String,
    pub version: i64,
    /// Envelope, body state (`tx.body`), newest attempt's responses, `attempt_count`, and
    /// `final_attempt_reason` (the internal `oneshot` marker is not shown here).
    pub tx: Transaction,
    /// The raw `final_attempt_reason` column, `oneshot` included.
    pub final_attempt_reason: Option<String>,
    /// DB clock, Unix seconds.
    pub creation: i64,
    pub last_update: i64,
    pub input_done: bool,
    pub next_attempt_time: Option<i64>,
    pub creation_session: Option<SessionId>,
    pub lease: Option<Lease>,
    /// `uri` of the live session holding the lease (this one or another).
    pub lease_uri: Option<String>,
    /// Newest attempt id (= `tx.attempt_count`).
    pub attempt_id: Option<i64>,
    pub blobs: Vec<BlobInfo>,
    /// A notification was enabled after the final attempt and no DSN was decided yet.
    pub notification_pending: bool,
}

impl TxRecord {
    pub fn blob(&self, name: &str) -> Option<&BlobInfo> {
        self.blobs.iter().find(|b| b.name == name)
    }
    /// Kept only in memory (the SMTP-facing side of a cut-through exploder): no row,
    /// a negative id.
    pub fn in_memory(&self) -> bool {
        self.id < 0
    }
    /// Done for good: a real final reason (not the internal `oneshot`).
    pub fn is_final(&self) -> bool {
        self.tx.final_attempt_reason.is_some()
    }
}

/// The body given at creation.
#[derive(Clone, Debug, PartialEq)]
pub enum NewBody {
    /// No body yet (incremental transactions create it with the first upload).
    None,
    /// An empty raw body blob, to be uploaded.
    Upload,
    /// The whole raw message; finalized at once.
    Inline(Bytes),
    /// Share a finalized body of another transaction (refcount, no copy).
    Reuse(BlobUri),
    /// Share a finalized blob by its id (the body of a transaction kept in memory).
    Blob(i64),
    /// A message-builder spec (content rewritten to `create_id`s) and its blobs.
    MessageBuilder {
        spec: Value,
        blobs: Vec<(String, BlobSource)>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewTransaction {
    pub rest_id: String,
    /// Envelope: remote/local host, mail_from, rcpt_to, smtp_meta, sender, retry,
    /// notification. Responses are ignored.
    pub tx: Transaction,
    pub body: NewBody,
    /// Leased to this session (its attempt runs here), or left for the dequeuer.
    pub leased: bool,
    /// With `leased`: start attempt 1 in the same commit (cut-through delivery).
    pub start_attempt: bool,
}

/// One blob upload request (a PUT or one batch of a streamed PUT).
#[derive(Clone, Debug, PartialEq)]
pub struct Append {
    pub rest_id: String,
    /// Blob name (`BODY_BLOB` for `/body`).
    pub blob: String,
    /// Create the raw body blob if it does not exist (incremental transactions) — only
    /// when `offset == 0`.
    pub create_body: bool,
    pub offset: u64,
    pub data: Bytes,
    /// Total length declared by this request.
    pub total: Option<u64>,
}

/// One append to a blob no stored transaction refers to yet (the raw body of a transaction
/// kept in memory). `blob_id: None` creates the blob (then `offset` must be 0).
#[derive(Clone, Debug, PartialEq)]
pub struct BlobAppend {
    pub blob_id: Option<i64>,
    pub offset: u64,
    pub data: Bytes,
    pub total: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Appended (or already held). `version` is the transaction's new version when the
    /// append bumped it (blob finalized, body created, or keep-alive).
    Ok {
        blob: BlobInfo,
        version: Option<i64>,
    },
    /// Offset beyond the held length, or a declared total that conflicts: nothing changed.
    Mismatch {
        blob: BlobInfo,
    },
    UnknownTx,
    UnknownBlob,
    /// Another live session holds the lease: redirect there.
    LeasedElsewhere {
        uri: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Now cancelled, at this version.
    Cancelled {
        version: i64,
    },
    /// Already had a final reason: nothing written, version unchanged.
    AlreadyFinal {
        version: i64,
    },
    NotFound,
}

/// How an attempt ends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Finish {
    /// Upstream responses of this attempt (written to the attempt row).
    pub responses: Transaction,
    /// Final reason; `None` keeps the transaction retryable (or `oneshot`).
    pub final_attempt_reason: Option<String>,
    /// Unix seconds; `None` means "as soon as possible" when no final reason.
    pub next_attempt_time: Option<i64>,
    /// The DSN question was decided (sent or not needed): clears `notification_pending`.
    pub notification_done: bool,
    /// A DSN to insert (unleased) in the same SQL transaction as this final write.
    pub dsn: Option<NewTransaction>,
}

/// Sessions declared dead by one recovery pass, and what happened to their transactions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub dead_sessions: Vec<SessionId>,
    /// Released, retryable (or input-incomplete) transactions.
    pub released: Vec<DbId>,
    /// Transactions without retry whose attempt was interrupted: finalized with
    /// `attempt interrupted` and a temporary data response.
    pub interrupted: Vec<DbId>,
}

pub const REASON_INTERRUPTED: &str = "attempt interrupted";
pub const REASON_CANCELLED: &str = "downstream cancelled";
/// Internal marker: a transaction without retry had its one attempt.
pub const ONESHOT: &str = "oneshot";
