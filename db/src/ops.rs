//! Every SQL operation, written once against [`Conn`] (the `run!` macro expands each body for
//! both backends). Write operations run inside the writer's SQL transaction; they read the
//! row, compute the new state in Rust and store it with a compare-and-swap on `version`.

use bytes::{Bytes, BytesMut};
use diesel::dsl::not;
use diesel::pg::Pg;
use diesel::query_builder::QueryFragment;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::BigInt;
use diesel::sqlite::Sqlite;
use diesel::{
    AsChangeset, BoolExpressionMethods, ExpressionMethods, JoinOnDsl, NullableExpressionMethods,
    OptionalExtension, QueryDsl, Queryable, QueryableByName, Selectable, SelectableHelper,
};
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use koukan::Response;
use koukan::Transaction;
use koukan::rest::{BODY_BLOB, BlobSource, BlobUri};
use koukan::transaction::{BlobState, Body};

use crate::StorageError;
use crate::cached;
use crate::conn::{Conn, run};
use crate::schema::{attempts, blob_chunks, blobs, sessions, transactions, tx_blobs};
use crate::types::*;

pub(crate) type Result<T> = std::result::Result<T, StorageError>;

/// Largest stored chunk. Reads rely on it: a chunk overlapping `offset` starts after
/// `offset - CHUNK_MAX`, so one indexed range scan finds every chunk of a read.
pub(crate) const CHUNK_MAX: usize = 1 << 20;

/// A transaction row; also the changeset written back by [`cas`].
#[derive(Clone, Debug, Queryable, Selectable, AsChangeset)]
#[diesel(table_name = transactions)]
#[diesel(treat_none_as_null = true)]
pub(crate) struct TxRow {
    pub id: i64,
    pub rest_id: String,
    pub json: String,
    pub input_done: bool,
    pub final_attempt_reason: Option<String>,
    pub creation_session_id: Option<i64>,
    pub lease_session_id: Option<i64>,
    pub lease_generation: i64,
    pub creation: i64,
    pub last_update: i64,
    pub version: i64,
    pub next_attempt_time: i64,
    pub message_builder: Option<String>,
    pub notification: bool,
    pub no_final_notification: bool,
}

impl TxRow {
    fn is_final(&self) -> bool {
        self.final_attempt_reason
            .as_deref()
            .is_some_and(|r| r != ONESHOT)
    }
    fn envelope(&self) -> Result<Transaction> {
        let v: serde_json::Value = serde_json::from_str(&self.json)
            .map_err(|e| StorageError::Corrupt(format!("tx {} json: {e}", self.id)))?;
        Transaction::from_db_json(&v)
            .map_err(|e| StorageError::Corrupt(format!("tx {} envelope: {e}", self.id)))
    }
    /// The next state: version bumped, written now.
    fn next(&self, now: i64) -> TxRow {
        let mut n = self.clone();
        n.version += 1;
        n.last_update = now;
        n
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Key {
    Id(DbId),
    Rest(String),
}

fn corrupt(what: &str, v: i64) -> StorageError {
    StorageError::Corrupt(format!("{what}: {v}"))
}

fn to_u64(what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(what, v))
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StorageError::Invalid(format!("length {v} out of range")))
}

// ---- plumbing ------------------------------------------------------------------------------

pub(crate) async fn exec(c: &mut Conn<'_>, sql: &str) -> Result<()> {
    exec_all(c, &[sql]).await
}

/// Runs parameterless statements in order: on SQLite each kept prepared, on PostgreSQL
/// sent together in one round trip.
pub(crate) async fn exec_all(c: &mut Conn<'_>, sql: &[&str]) -> Result<()> {
    match c {
        Conn::Sqlite(c) => {
            for s in sql {
                cached::sqlite_text(s).execute(&mut **c).await?;
            }
        }
        Conn::Pg(c) => c.batch_execute(&sql.join("; ")).await?,
    }
    Ok(())
}

/// Executes `q` as a statement kept prepared on either backend (see [`cached`]).
async fn execute_cached<Q>(c: &mut Conn<'_>, q: &Q) -> Result<usize>
where
    Q: QueryFragment<Sqlite> + QueryFragment<Pg>,
{
    Ok(match c {
        Conn::Sqlite(c) => cached::sqlite(q)?.execute(&mut **c).await?,
        Conn::Pg(c) => cached::pg(q)?.execute(&mut **c).await?,
    })
}

/// DB clock, Unix seconds (on Postgres: the start of the current SQL transaction).
pub(crate) async fn db_now(c: &mut Conn<'_>) -> Result<i64> {
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = BigInt)]
        now: i64,
    }
    let r: Now = match c {
        // SQLite's clock is this process's clock: no statement needed.
        Conn::Sqlite(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| StorageError::Database(format!("system clock: {e}")))?;
            return to_i64(now.as_secs());
        }
        Conn::Pg(c) => {
            diesel::sql_query(
                "SELECT CAST(FLOOR(EXTRACT(EPOCH FROM CURRENT_TIMESTAMP)) AS BIGINT) AS now",
            )
            .get_result(&mut **c)
            .await?
        }
    };
    Ok(r.now)
}

// Single-row reads use `get_result` (first row, no LIMIT), not `first`: diesel's `first`
// binds `LIMIT ?`, and SQLite (3.4x+, without QPSG) treats a bound LIMIT as a constant
// of the plan, so every re-bind expires the cached statement and each execution was a
// full re-parse and re-plan (`sqlite3Reprepare`: a fifth of the router's CPU under load).
// The queries are by unique key or read few rows, so dropping the LIMIT costs nothing.
// `first` stays where many rows could match (dequeue, recovery).
async fn read_row(c: &mut Conn<'_>, id: DbId) -> Result<Option<TxRow>> {
    Ok(run!(c, |c| transactions::table
        .find(id)
        .select(TxRow::as_select())
        .get_result(c)
        .await
        .optional())?)
}

async fn read_row_rest(c: &mut Conn<'_>, rest_id: &str) -> Result<Option<TxRow>> {
    Ok(run!(c, |c| transactions::table
        .filter(transactions::rest_id.eq(rest_id))
        .select(TxRow::as_select())
        .get_result(c)
        .await
        .optional())?)
}

/// The row at `version`, or `NotFound` / `Conflict`.
async fn row_at(c: &mut Conn<'_>, id: DbId, version: i64) -> Result<TxRow> {
    let row = read_row(c, id).await?.ok_or(StorageError::NotFound)?;
    if row.version != version {
        return Err(StorageError::Conflict);
    }
    Ok(row)
}

/// Stores `new` iff the row is still at `old.version`. Every lease change bumps the
/// version, so this also guards the lease the caller checked on `old`.
async fn cas(c: &mut Conn<'_>, old: &TxRow, new: &TxRow) -> Result<()> {
    let q = diesel::update(
        transactions::table
            .filter(transactions::id.eq(old.id))
            .filter(transactions::version.eq(old.version)),
    )
    .set(new);
    let n = execute_cached(c, &q).await?;
    if n == 1 {
        Ok(())
    } else {
        Err(StorageError::Conflict)
    }
}

fn check_fence(row: &TxRow, lease: Lease) -> Result<()> {
    if row.lease_session_id == Some(lease.session) && row.lease_generation == lease.generation {
        Ok(())
    } else {
        Err(StorageError::Conflict)
    }
}

/// Leases may only be taken by a live session: a lease naming a dead one would never be
/// recovered.
async fn require_live(c: &mut Conn<'_>, me: SessionId) -> Result<String> {
    let live: Option<(bool, String)> = run!(c, |c| sessions::table
        .find(me)
        .select((sessions::live, sessions::uri))
        .get_result(c)
        .await
        .optional())?;
    if let Some((true, uri)) = live {
        Ok(uri)
    } else {
        Err(StorageError::Invalid(
            "this storage session is no longer live".into(),
        ))
    }
}

// ---- load ----------------------------------------------------------------------------------

type BlobRow = (String, i64, i64, Option<i64>);

async fn load_parts(
    c: &mut Conn<'_>,
    key: &Key,
) -> Result<
    Option<(
        TxRow,
        Option<String>,
        Vec<BlobRow>,
        Option<(i64, Option<String>)>,
    )>,
> {
    let found: Option<(TxRow, Option<String>)> = run!(c, |c| {
        let q = transactions::table
            .left_join(
                sessions::table.on(sessions::id
                    .nullable()
                    .eq(transactions::lease_session_id)
                    .and(sessions::live)),
            )
            .select((TxRow::as_select(), sessions::uri.nullable()));
        match key {
            Key::Id(id) => q.filter(transactions::id.eq(*id)).get_result(c).await,
            Key::Rest(r) => q.filter(transactions::rest_id.eq(r)).get_result(c).await,
        }
        .optional()
    })?;
    let Some((row, uri)) = found else {
        return Ok(None);
    };
    let blob_rows: Vec<BlobRow> = run!(c, |c| tx_blobs::table
        .inner_join(blobs::table)
        .filter(tx_blobs::transaction_id.eq(row.id))
        .order(blobs::id.asc())
        .select((tx_blobs::name, blobs::id, blobs::length, blobs::total))
        .load(c)
        .await)?;
    let attempt = newest_attempt(c, row.id).await?;
    Ok(Some((row, uri, blob_rows, attempt)))
}

async fn newest_attempt(c: &mut Conn<'_>, id: DbId) -> Result<Option<(i64, Option<String>)>> {
    Ok(run!(c, |c| attempts::table
        .filter(attempts::transaction_id.eq(id))
        .order(attempts::attempt_id.desc())
        .select((attempts::attempt_id, attempts::responses))
        .get_result(c)
        .await
        .optional())?)
}

fn build_record(
    row: TxRow,
    lease_uri: Option<String>,
    blob_rows: Vec<BlobRow>,
    attempt: Option<(i64, Option<String>)>,
) -> Result<TxRecord> {
    let mut tx = row.envelope()?;
    let blobs = blob_infos(blob_rows)?;
    tx.body = body_of(row.id, &blobs, row.message_builder.as_deref())?;
    let attempt_id = attempt.as_ref().map(|(a, _)| *a);
    if let Some((a, responses)) = attempt {
        tx.attempt_count = Some(u32::try_from(a).map_err(|_| corrupt("attempt id", a))?);
        if let Some(r) = responses {
            let v: serde_json::Value = serde_json::from_str(&r)
                .map_err(|e| StorageError::Corrupt(format!("tx {} responses: {e}", row.id)))?;
            tx.set_responses_json(&v)
                .map_err(|e| StorageError::Corrupt(format!("tx {} responses: {e}", row.id)))?;
        }
    }
    let is_final = row.is_final();
    tx.final_attempt_reason = row.final_attempt_reason.clone().filter(|r| r != ONESHOT);
    Ok(TxRecord {
        id: row.id,
        rest_id: row.rest_id,
        version: row.version,
        tx,
        final_attempt_reason: row.final_attempt_reason,
        creation: row.creation,
        last_update: row.last_update,
        input_done: row.input_done,
        next_attempt_time: (row.next_attempt_time != 0).then_some(row.next_attempt_time),
        creation_session: row.creation_session_id,
        lease: row.lease_session_id.map(|session| Lease {
            session,
            generation: row.lease_generation,
        }),
        lease_uri,
        attempt_id,
        blobs,
        notification_pending: is_final && row.notification && row.no_final_notification,
    })
}

fn blob_infos(rows: Vec<BlobRow>) -> Result<Vec<BlobInfo>> {
    let mut blobs = Vec::with_capacity(rows.len());
    for (name, blob_id, length, total) in rows {
        blobs.push(BlobInfo {
            name,
            blob_id,
            length: to_u64("blob length", length)?,
            total: total.map(|t| to_u64("blob total", t)).transpose()?,
        });
    }
    Ok(blobs)
}

/// The body a transaction's blobs and message-builder spec make.
fn body_of(id: DbId, blobs: &[BlobInfo], message_builder: Option<&str>) -> Result<Option<Body>> {
    let state = |b: &BlobInfo| BlobState {
        length: b.length,
        total: b.total,
    };
    Ok(
        if let Some(b) = blobs.iter().find(|b| b.name == BODY_BLOB) {
            Some(Body::Message(state(b)))
        } else if let Some(spec) = message_builder {
            let spec = serde_json::from_str(spec)
                .map_err(|e| StorageError::Corrupt(format!("tx {id} message_builder: {e}")))?;
            Some(Body::MessageBuilder {
                spec,
                blobs: blobs.iter().map(|b| (b.name.clone(), state(b))).collect(),
            })
        } else if !blobs.is_empty() {
            return Err(StorageError::Corrupt(format!(
                "tx {id} has blobs but no body"
            )));
        } else {
            None
        },
    )
}

/// Loads without a surrounding transaction (the writer already has one).
pub(crate) async fn load_in_tx(c: &mut Conn<'_>, key: &Key) -> Result<Option<TxRecord>> {
    match load_parts(c, key).await? {
        Some((row, uri, b, a)) => build_record(row, uri, b, a).map(Some),
        None => Ok(None),
    }
}

async fn must_load(c: &mut Conn<'_>, id: DbId) -> Result<TxRecord> {
    load_in_tx(c, &Key::Id(id))
        .await?
        .ok_or_else(|| StorageError::Database(format!("tx {id} vanished")))
}

/// Loads from a read connection inside one read-only snapshot, so the row, its blobs and
/// its attempt are consistent with each other.
pub(crate) async fn load(c: &mut Conn<'_>, key: Key) -> Result<Option<TxRecord>> {
    match c {
        Conn::Sqlite(c) => {
            c.transaction(async |c| load_in_tx(&mut Conn::Sqlite(c), &key).await)
                .await
        }
        Conn::Pg(c) => {
            c.build_transaction()
                .repeatable_read()
                .read_only()
                .run(async |c| load_in_tx(&mut Conn::Pg(c), &key).await)
                .await
        }
    }
}

/// `(version, lease_uri)` of a transaction.
pub(crate) async fn version_probe(
    c: &mut Conn<'_>,
    rest_id: &str,
) -> Result<Option<(i64, Option<String>)>> {
    Ok(run!(c, |c| transactions::table
        .left_join(
            sessions::table.on(sessions::id
                .nullable()
                .eq(transactions::lease_session_id)
                .and(sessions::live)),
        )
        .filter(transactions::rest_id.eq(rest_id))
        .select((transactions::version, sessions::uri.nullable()))
        .get_result(c)
        .await
        .optional())?)
}

pub(crate) async fn read_blob(
    c: &mut Conn<'_>,
    blob_id: i64,
    offset: u64,
    max: usize,
) -> Result<Bytes> {
    let start = to_i64(offset)?;
    let end = start.saturating_add(i64::try_from(max).unwrap_or(i64::MAX));
    let lo = start.saturating_sub(CHUNK_MAX as i64);
    let chunks: Vec<(i64, Vec<u8>)> = if max == 0 {
        Vec::new()
    } else {
        run!(c, |c| blob_chunks::table
            .filter(blob_chunks::blob_id.eq(blob_id))
            .filter(blob_chunks::chunk_offset.gt(lo))
            .filter(blob_chunks::chunk_offset.lt(end))
            .order(blob_chunks::chunk_offset.asc())
            .select((blob_chunks::chunk_offset, blob_chunks::data))
            .load(c)
            .await)?
    };
    if chunks.is_empty() {
        let exists: Option<i64> = run!(c, |c| blobs::table
            .find(blob_id)
            .select(blobs::id)
            .get_result(c)
            .await
            .optional())?;
        return match exists {
            Some(_) => Ok(Bytes::new()),
            None => Err(StorageError::NotFound),
        };
    }
    let mut out = BytesMut::with_capacity(max.min(CHUNK_MAX * 4));
    let mut pos = start;
    for (off, data) in chunks {
        let chunk_end = off + data.len() as i64;
        if chunk_end <= pos {
            continue;
        }
        if off > pos {
            return Err(StorageError::Corrupt(format!(
                "blob {blob_id}: gap at {pos}"
            )));
        }
        let from = (pos - off) as usize;
        let to = (end.min(chunk_end) - off) as usize;
        out.extend_from_slice(&data[from..to]);
        pos = off + to as i64;
        if pos >= end {
            break;
        }
    }
    Ok(out.freeze())
}

// ---- sessions -----------------------------------------------------------------------------

pub(crate) async fn open_session(c: &mut Conn<'_>, now: i64, uri: &str) -> Result<SessionId> {
    // Live sessions with this URI are earlier incarnations of this replica (URIs are unique
    // per replica): declare them dead and take their transactions back now, fenced, instead
    // of waiting out the liveness timeout after a crash and restart.
    let stale = run!(c, |c| diesel::update(
        sessions::table
            .filter(sessions::uri.eq(uri))
            .filter(sessions::live)
    )
    .set((sessions::live.eq(false), sessions::last_update.eq(now)))
    .execute(c)
    .await)?;
    if stale > 0 {
        release_dead_leases(c, now, &mut Recovery::default()).await?;
    }
    Ok(run!(c, |c| diesel::insert_into(sessions::table)
        .values((
            sessions::creation.eq(now),
            sessions::live.eq(true),
            sessions::last_update.eq(now),
            sessions::uri.eq(uri),
        ))
        .returning(sessions::id)
        .get_result(c)
        .await)?)
}

pub(crate) async fn refresh_session(c: &mut Conn<'_>, now: i64, me: SessionId) -> Result<bool> {
    let n = run!(c, |c| diesel::update(
        sessions::table
            .filter(sessions::id.eq(me))
            .filter(sessions::live)
    )
    .set(sessions::last_update.eq(now))
    .execute(c)
    .await)?;
    Ok(n == 1)
}

/// Releases every lease held by a session that is not live, fencing each transaction
/// (version and generation bumped). A transaction without retry whose attempt was
/// interrupted (`oneshot`) is finalized as `attempt interrupted`, with its missing
/// responses filled in and its DSN question left open.
async fn release_dead_leases(c: &mut Conn<'_>, now: i64, rec: &mut Recovery) -> Result<()> {
    let rows: Vec<TxRow> = run!(c, |c| transactions::table
        .filter(transactions::lease_session_id.is_not_null())
        .filter(
            transactions::lease_session_id.eq_any(
                sessions::table
                    .filter(not(sessions::live))
                    .select(sessions::id.nullable()),
            ),
        )
        .select(TxRow::as_select())
        .load(c)
        .await)?;
    for row in rows {
        let mut n = row.next(now);
        n.lease_session_id = None;
        n.lease_generation += 1;
        if row.final_attempt_reason.as_deref() == Some(ONESHOT) {
            n.final_attempt_reason = Some(REASON_INTERRUPTED.to_string());
            n.no_final_notification = true;
            fill_interrupted_responses(c, now, &row).await?;
            rec.interrupted.push(row.id);
        } else {
            rec.released.push(row.id);
        }
        cas(c, &row, &n).await?;
    }
    Ok(())
}

async fn fill_interrupted_responses(c: &mut Conn<'_>, now: i64, row: &TxRow) -> Result<()> {
    let Some((attempt_id, responses)) = newest_attempt(c, row.id).await? else {
        return Ok(());
    };
    let env = row.envelope()?;
    let mut r = Transaction::default();
    if let Some(s) = responses {
        // Unreadable responses are replaced rather than blocking recovery.
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) {
            let _ = r.set_responses_json(&v);
        }
    }
    let temp = || Some(Response::new(450, "4.3.0 attempt interrupted"));
    if r.mail_response.is_none() {
        r.mail_response = temp();
    }
    if r.rcpt_response.len() < env.rcpt_to.len() {
        r.rcpt_response.resize(env.rcpt_to.len(), None);
    }
    for rr in r.rcpt_response.iter_mut().filter(|x| x.is_none()) {
        *rr = temp();
    }
    if r.data_response.is_none() {
        r.data_response = temp();
    }
    write_responses(c, now, row.id, attempt_id, &r).await
}

pub(crate) async fn recover(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    ttl: i64,
) -> Result<Recovery> {
    let cutoff = now - ttl;
    let dead: Vec<i64> = run!(c, |c| sessions::table
        .filter(sessions::live)
        .filter(sessions::id.ne(me))
        .filter(sessions::last_update.le(cutoff))
        .select(sessions::id)
        .load(c)
        .await)?;
    if !dead.is_empty() {
        run!(c, |c| diesel::update(
            sessions::table.filter(sessions::id.eq_any(&dead))
        )
        .set((sessions::live.eq(false), sessions::last_update.eq(now)))
        .execute(c)
        .await)?;
    }
    let mut rec = Recovery {
        dead_sessions: dead,
        ..Default::default()
    };
    release_dead_leases(c, now, &mut rec).await?;
    // Dead sessions no transaction mentions any more are only history.
    let old: Vec<i64> = run!(c, |c| sessions::table
        .filter(not(sessions::live))
        .filter(sessions::id.ne(me))
        .filter(sessions::last_update.le(cutoff))
        .select(sessions::id)
        .load(c)
        .await)?;
    for s in old {
        let used: Option<i64> = run!(c, |c| transactions::table
            .filter(
                transactions::creation_session_id
                    .eq(s)
                    .or(transactions::lease_session_id.eq(s)),
            )
            .select(transactions::id)
            .first(c)
            .await
            .optional())?;
        if used.is_none() {
            run!(c, |c| diesel::delete(sessions::table.find(s))
                .execute(c)
                .await)?;
        }
    }
    Ok(rec)
}

pub(crate) async fn end_session(c: &mut Conn<'_>, now: i64, me: SessionId) -> Result<()> {
    run!(c, |c| diesel::update(sessions::table.find(me))
        .set((sessions::live.eq(false), sessions::last_update.eq(now)))
        .execute(c)
        .await)?;
    release_dead_leases(c, now, &mut Recovery::default()).await
}

// ---- blobs ----------------------------------------------------------------------------------

async fn insert_chunks(c: &mut Conn<'_>, blob_id: i64, start: u64, data: &[u8]) -> Result<()> {
    let mut off = start;
    for piece in data.chunks(CHUNK_MAX) {
        let o = to_i64(off)?;
        run!(c, |c| diesel::insert_into(blob_chunks::table)
            .values((
                blob_chunks::blob_id.eq(blob_id),
                blob_chunks::chunk_offset.eq(o),
                blob_chunks::data.eq(piece),
            ))
            .execute(c)
            .await)?;
        off += piece.len() as u64;
    }
    Ok(())
}

/// A blob a body refers to: id, length, total.
type NewBlob = (i64, i64, Option<i64>);

/// A new blob: empty and open (`None`), or holding `data`, finalized.
async fn insert_blob(c: &mut Conn<'_>, now: i64, data: Option<&[u8]>) -> Result<NewBlob> {
    let len = to_i64(data.map_or(0, |d| d.len() as u64))?;
    let total = data.map(|_| len);
    let id: i64 = run!(c, |c| diesel::insert_into(blobs::table)
        .values((
            blobs::length.eq(len),
            blobs::total.eq(total),
            blobs::creation.eq(now),
            blobs::last_update.eq(now),
        ))
        .returning(blobs::id)
        .get_result(c)
        .await)?;
    if let Some(d) = data {
        insert_chunks(c, id, 0, d).await?;
    }
    Ok((id, len, total))
}

/// The id of a finalized blob named by `uri`, for sharing.
async fn reusable_blob(c: &mut Conn<'_>, uri: &BlobUri) -> Result<NewBlob> {
    let found: Option<(i64, i64, Option<i64>)> = run!(c, |c| tx_blobs::table
        .inner_join(transactions::table)
        .inner_join(blobs::table)
        .filter(transactions::rest_id.eq(&uri.tx))
        .filter(tx_blobs::name.eq(&uri.blob))
        .select((blobs::id, blobs::length, blobs::total))
        .get_result(c)
        .await
        .optional())?;
    match found {
        None => Err(StorageError::BadReuse(format!("no blob {}", uri.path()))),
        Some((id, len, total)) if total == Some(len) => Ok((id, len, total)),
        Some(_) => Err(StorageError::BadReuse(format!(
            "blob {} is not finalized",
            uri.path()
        ))),
    }
}

/// A blob's stored length and declared total, if it exists.
async fn blob_state(c: &mut Conn<'_>, id: i64) -> Result<Option<(i64, Option<i64>)>> {
    Ok(run!(c, |c| blobs::table
        .filter(blobs::id.eq(id))
        .select((blobs::length, blobs::total))
        .get_result(c)
        .await
        .optional())?)
}

/// A finalized blob named by its id, for sharing.
async fn shared_blob(c: &mut Conn<'_>, id: i64) -> Result<NewBlob> {
    match blob_state(c, id).await? {
        None => Err(StorageError::BadReuse(format!("no blob {id}"))),
        Some((len, total)) if total == Some(len) => Ok((id, len, total)),
        Some(_) => Err(StorageError::BadReuse(format!(
            "blob {id} is not finalized"
        ))),
    }
}

async fn add_ref(c: &mut Conn<'_>, tx_id: DbId, name: &str, blob_id: i64) -> Result<()> {
    run!(c, |c| diesel::insert_into(tx_blobs::table)
        .values((
            tx_blobs::transaction_id.eq(tx_id),
            tx_blobs::name.eq(name),
            tx_blobs::blob_id.eq(blob_id),
        ))
        .execute(c)
        .await)
    .map_err(|e| match e {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
            StorageError::Invalid(format!("duplicate blob name {name:?}"))
        }
        e => e.into(),
    })?;
    Ok(())
}

/// Refers transaction `tx_id` to its body's blobs; the rows a load would list (by id).
async fn add_refs(
    c: &mut Conn<'_>,
    tx_id: DbId,
    refs: Vec<(&str, NewBlob)>,
) -> Result<Vec<BlobRow>> {
    let mut rows = Vec::with_capacity(refs.len());
    for (name, (blob, length, total)) in refs {
        add_ref(c, tx_id, name, blob).await?;
        rows.push((name.to_string(), blob, length, total));
    }
    rows.sort_by_key(|b| b.1);
    Ok(rows)
}

// ---- transactions ---------------------------------------------------------------------------

/// Creates or looks up the blobs of a body: the refs to add, whether every blob is
/// finalized, and the message-builder spec to store.
async fn body_refs<'b>(
    c: &mut Conn<'_>,
    now: i64,
    body: &'b NewBody,
) -> Result<(Vec<(&'b str, NewBlob)>, bool, Option<String>)> {
    let mut refs: Vec<(&str, NewBlob)> = Vec::new();
    let mut done = true;
    let mut message_builder = None;
    match body {
        NewBody::None => done = false,
        NewBody::Upload => {
            refs.push((BODY_BLOB, insert_blob(c, now, None).await?));
            done = false;
        }
        NewBody::Inline(data) => refs.push((BODY_BLOB, insert_blob(c, now, Some(data)).await?)),
        NewBody::Reuse(uri) => refs.push((BODY_BLOB, reusable_blob(c, uri).await?)),
        NewBody::Blob(id) => refs.push((BODY_BLOB, shared_blob(c, *id).await?)),
        NewBody::MessageBuilder { spec, blobs } => {
            message_builder = Some(spec.to_string());
            for (name, source) in blobs {
                let blob = match source {
                    BlobSource::Create => {
                        done = false;
                        insert_blob(c, now, None).await?
                    }
                    BlobSource::Inline(text) => insert_blob(c, now, Some(text.as_bytes())).await?,
                    BlobSource::Reuse(uri) => reusable_blob(c, uri).await?,
                };
                refs.push((name.as_str(), blob));
            }
        }
    }
    Ok((refs, done, message_builder))
}

/// Gives a transaction without a body its body (the exploder passing the downstream body
/// to a recipient's transaction): refs, `input_done`, and a version bump, atomically.
pub(crate) async fn set_body(
    c: &mut Conn<'_>,
    now: i64,
    id: DbId,
    version: i64,
    body: &NewBody,
) -> Result<BodySet> {
    let row = row_at(c, id, version).await?;
    let has_body: Option<i64> = run!(c, |c| tx_blobs::table
        .filter(tx_blobs::transaction_id.eq(id))
        .select(tx_blobs::blob_id)
        .get_result(c)
        .await
        .optional())?;
    if has_body.is_some() || row.message_builder.is_some() {
        return Err(StorageError::Invalid(format!("tx {id} already has a body")));
    }
    let (refs, done, message_builder) = body_refs(c, now, body).await?;
    let mut n = row.next(now);
    n.input_done = done;
    n.message_builder = message_builder;
    cas(c, &row, &n).await?;
    let blobs = add_refs(c, id, refs).await?;
    Ok(BodySet {
        version: n.version,
        last_update: now,
        input_done: n.input_done,
        blobs,
        message_builder: n.message_builder,
    })
}

/// What [`set_body`] stored: enough to update a record in memory.
#[derive(Clone, Debug)]
pub(crate) struct BodySet {
    pub version: i64,
    pub last_update: i64,
    pub input_done: bool,
    blobs: Vec<BlobRow>,
    message_builder: Option<String>,
}

impl BodySet {
    /// `record` as a fresh load would show it after this body was set.
    pub(crate) fn apply(self, record: &mut TxRecord) -> Result<()> {
        let blobs = blob_infos(self.blobs)?;
        record.tx.body = body_of(record.id, &blobs, self.message_builder.as_deref())?;
        record.blobs = blobs;
        record.version = self.version;
        record.last_update = self.last_update;
        record.input_done = self.input_done;
        Ok(())
    }
}

/// Inserts a transaction with its blobs and refs; returns its id.
pub(crate) async fn create(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    new: &NewTransaction,
    leased: bool,
) -> Result<DbId> {
    Ok(insert_transaction(c, now, me, new, leased, false)
        .await?
        .0
        .id)
}

/// Inserts a transaction with its blobs and refs — with `start`, already in the state
/// [`begin_attempt`] would leave it in (leased, generation 2, version 2, `oneshot` without
/// retry) — and returns the row, its blobs and the lease holder's URI, everything a
/// record needs, so nothing is read back.
async fn insert_transaction(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    new: &NewTransaction,
    leased: bool,
    start: bool,
) -> Result<(TxRow, Vec<BlobRow>, Option<String>)> {
    let uri = if leased {
        Some(require_live(c, me).await?)
    } else {
        None
    };
    // Blobs first: reuse is validated and input_done known before the row exists.
    let (refs, done, message_builder) = body_refs(c, now, &new.body).await?;
    let json = new.tx.to_db_json().to_string();
    let step = i64::from(start);
    let final_attempt_reason = (start && !new.tx.retry).then(|| ONESHOT.to_string());
    let id: DbId = run!(c, |c| diesel::insert_into(transactions::table)
        .values((
            transactions::rest_id.eq(&new.rest_id),
            transactions::json.eq(&json),
            transactions::input_done.eq(done),
            transactions::final_attempt_reason.eq(&final_attempt_reason),
            transactions::creation_session_id.eq(Some(me)),
            transactions::lease_session_id.eq(leased.then_some(me)),
            transactions::lease_generation.eq(i64::from(leased) + step),
            transactions::creation.eq(now),
            transactions::last_update.eq(now),
            transactions::version.eq(1 + step),
            transactions::next_attempt_time.eq(0i64),
            transactions::message_builder.eq(&message_builder),
            transactions::notification.eq(new.tx.notification),
            transactions::no_final_notification.eq(false),
        ))
        .returning(transactions::id)
        .get_result(c)
        .await)
    .map_err(|e| match e {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
            StorageError::Duplicate
        }
        e => e.into(),
    })?;
    let blob_rows = add_refs(c, id, refs).await?;
    let row = TxRow {
        id,
        rest_id: new.rest_id.clone(),
        json,
        input_done: done,
        final_attempt_reason,
        creation_session_id: Some(me),
        lease_session_id: leased.then_some(me),
        lease_generation: i64::from(leased) + step,
        creation: now,
        last_update: now,
        version: 1 + step,
        next_attempt_time: 0,
        message_builder,
        notification: new.tx.notification,
        no_final_notification: false,
    };
    Ok((row, blob_rows, uri))
}

/// The record [`create_record`] would return for a leased, started, bodiless create, for a
/// transaction kept only in memory (`id` is negative: never a row).
pub(crate) fn memory_record(
    id: DbId,
    now: i64,
    me: SessionId,
    new: &NewTransaction,
) -> Result<TxRecord> {
    if new.body != NewBody::None || !new.leased || !new.start_attempt {
        return Err(StorageError::Invalid(
            "only a leased, started transaction without a body is kept in memory".into(),
        ));
    }
    let row = TxRow {
        id,
        rest_id: new.rest_id.clone(),
        json: new.tx.to_db_json().to_string(),
        input_done: false,
        final_attempt_reason: (!new.tx.retry).then(|| ONESHOT.to_string()),
        creation_session_id: Some(me),
        lease_session_id: Some(me),
        lease_generation: 2,
        creation: now,
        last_update: now,
        version: 2,
        next_attempt_time: 0,
        message_builder: None,
        notification: new.tx.notification,
        no_final_notification: false,
    };
    build_record(row, None, Vec::new(), Some((1, None)))
}

pub(crate) async fn create_record(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    new: &NewTransaction,
) -> Result<TxRecord> {
    // Cut-through: the attempt starts in the same commit as the row (no lease without an
    // owner, and one commit fewer per message).
    let start = new.leased && new.start_attempt;
    let (row, blobs, uri) = insert_transaction(c, now, me, new, new.leased, start).await?;
    let attempt = if start {
        // The row is new: its first attempt is attempt 1.
        insert_attempt_id(c, now, row.id, 1).await?;
        Some((1, None))
    } else {
        None
    };
    build_record(row, uri, blobs, attempt)
}

pub(crate) async fn write_envelope(
    c: &mut Conn<'_>,
    now: i64,
    id: DbId,
    version: i64,
    env: &Transaction,
) -> Result<i64> {
    let row = row_at(c, id, version).await?;
    let mut n = row.next(now);
    n.json = env.to_db_json().to_string();
    n.notification = env.notification;
    // Retry or notification enabled later (store-and-forward): retryable again.
    if (env.retry || env.notification) && row.final_attempt_reason.as_deref() == Some(ONESHOT) {
        n.final_attempt_reason = None;
    }
    cas(c, &row, &n).await?;
    Ok(n.version)
}

pub(crate) async fn ping(c: &mut Conn<'_>, now: i64, id: DbId, version: i64) -> Result<i64> {
    bump(c, now, id, version, None).await
}

/// Bumps the version of row `id` iff it is still at `version` (and, with `lease`, still
/// held under that lease): one UPDATE, no read, where a read-then-compare-and-swap would
/// cost two statements and a full-row rewrite. Only a miss reads the row, to tell
/// `NotFound` from `Conflict`.
async fn bump(
    c: &mut Conn<'_>,
    now: i64,
    id: DbId,
    version: i64,
    lease: Option<Lease>,
) -> Result<i64> {
    let set = (
        transactions::version.eq(version + 1),
        transactions::last_update.eq(now),
    );
    let n = match lease {
        Some(l) => {
            let q = diesel::update(
                transactions::table
                    .filter(transactions::id.eq(id))
                    .filter(transactions::version.eq(version))
                    .filter(transactions::lease_session_id.eq(l.session))
                    .filter(transactions::lease_generation.eq(l.generation)),
            )
            .set(set);
            execute_cached(c, &q).await?
        }
        None => {
            let q = diesel::update(
                transactions::table
                    .filter(transactions::id.eq(id))
                    .filter(transactions::version.eq(version)),
            )
            .set(set);
            execute_cached(c, &q).await?
        }
    };
    if n == 1 {
        return Ok(version + 1);
    }
    let row = row_at(c, id, version).await?;
    if let Some(l) = lease {
        check_fence(&row, l)?;
    }
    Err(StorageError::Conflict)
}

/// A client cancel (`reason: None`) or a failure outside any attempt (`Some(reason)`).
pub(crate) async fn cancel(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    rest_id: &str,
    reason: Option<&str>,
) -> Result<CancelOutcome> {
    // Another process may write between our read and the CAS (Postgres): re-read and retry.
    for _ in 0..5 {
        let Some(row) = read_row_rest(c, rest_id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if row.is_final() {
            return Ok(CancelOutcome::AlreadyFinal {
                version: row.version,
            });
        }
        let mut n = row.next(now);
        match reason {
            None => {
                let mut env = row.envelope()?;
                env.cancelled = true;
                n.json = env.to_db_json().to_string();
                n.final_attempt_reason = Some(REASON_CANCELLED.to_string());
                // The client asked for it: no DSN.
                n.no_final_notification = false;
            }
            Some(r) => {
                n.final_attempt_reason = Some(r.to_string());
                // Failed for good: the DSN question is open (sent if notification is on).
                n.no_final_notification = true;
                if row.lease_session_id == Some(me) {
                    n.lease_session_id = None;
                    n.lease_generation += 1;
                }
            }
        }
        match cas(c, &row, &n).await {
            Ok(()) => return Ok(CancelOutcome::Cancelled { version: n.version }),
            Err(StorageError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::Conflict)
}

// ---- append ---------------------------------------------------------------------------------

pub(crate) async fn append(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    refresh_secs: i64,
    a: &Append,
) -> Result<AppendOutcome> {
    let found: Option<(TxRow, Option<String>)> = run!(c, |c| transactions::table
        .left_join(
            sessions::table.on(sessions::id
                .nullable()
                .eq(transactions::lease_session_id)
                .and(sessions::live)),
        )
        .filter(transactions::rest_id.eq(&a.rest_id))
        .select((TxRow::as_select(), sessions::uri.nullable()))
        .get_result(c)
        .await
        .optional())?;
    let Some((row, holder_uri)) = found else {
        return Ok(AppendOutcome::UnknownTx);
    };
    if let (Some(holder), Some(uri)) = (row.lease_session_id, holder_uri)
        && holder != me
    {
        return Ok(AppendOutcome::LeasedElsewhere { uri });
    }
    let blob: Option<(i64, i64, Option<i64>)> = run!(c, |c| tx_blobs::table
        .inner_join(blobs::table)
        .filter(tx_blobs::transaction_id.eq(row.id))
        .filter(tx_blobs::name.eq(&a.blob))
        .select((blobs::id, blobs::length, blobs::total))
        .get_result(c)
        .await
        .optional())?;
    let mut created = false;
    let held = match blob {
        Some((id, len, total)) => Held::stored(id, len, total)?,
        None if a.create_body
            && a.blob == BODY_BLOB
            && a.offset == 0
            && row.message_builder.is_none() =>
        {
            let (id, _, _) = insert_blob(c, now, None).await?;
            add_ref(c, row.id, BODY_BLOB, id).await?;
            created = true;
            Held::empty(id)
        }
        None => return Ok(AppendOutcome::UnknownBlob),
    };
    let (blob, changed) = match append_at(c, now, &a.blob, held, a.offset, &a.data, a.total).await?
    {
        Appended::Done { blob, changed } => (blob, changed),
        Appended::Mismatch(blob) => return Ok(AppendOutcome::Mismatch { blob }),
    };
    let finalized_now = !held.finalized() && blob.finalized();
    let keep_alive = changed && now - row.last_update >= refresh_secs;
    let mut version = None;
    if created || finalized_now || keep_alive {
        let mut n = row.next(now);
        if finalized_now {
            let open: i64 = run!(c, |c| tx_blobs::table
                .inner_join(blobs::table)
                .filter(tx_blobs::transaction_id.eq(row.id))
                .filter(
                    blobs::total
                        .is_null()
                        .or(blobs::total.ne(blobs::length.nullable())),
                )
                .count()
                .get_result(c)
                .await)?;
            n.input_done = n.input_done || open == 0;
        }
        cas(c, &row, &n).await?;
        version = Some(n.version);
    }
    Ok(AppendOutcome::Ok { blob, version })
}

/// A blob's state before an append.
#[derive(Clone, Copy)]
struct Held {
    blob_id: i64,
    length: u64,
    total: Option<u64>,
}

impl Held {
    /// A blob just created.
    fn empty(blob_id: i64) -> Held {
        Held {
            blob_id,
            length: 0,
            total: None,
        }
    }

    /// A blob as its row stores it.
    fn stored(blob_id: i64, length: i64, total: Option<i64>) -> Result<Held> {
        Ok(Held {
            blob_id,
            length: to_u64("blob length", length)?,
            total: total.map(|t| to_u64("blob total", t)).transpose()?,
        })
    }

    fn finalized(&self) -> bool {
        self.total == Some(self.length)
    }
}

enum Appended {
    /// `changed`: bytes or a total were stored.
    Done {
        blob: BlobInfo,
        changed: bool,
    },
    Mismatch(BlobInfo),
}

/// The blob part of an append (the semantics of [`crate::Storage::append`]).
async fn append_at(
    c: &mut Conn<'_>,
    now: i64,
    name: &str,
    held: Held,
    offset: u64,
    data: &[u8],
    total: Option<u64>,
) -> Result<Appended> {
    let info = |length: u64, total: Option<u64>| BlobInfo {
        name: name.to_string(),
        blob_id: held.blob_id,
        length,
        total,
    };
    let mismatch = Appended::Mismatch(info(held.length, held.total));
    let end = offset + data.len() as u64;
    if let Some(t) = total
        && (t < end || t < held.length || held.total.is_some_and(|s| s != t))
    {
        return Ok(mismatch);
    }
    if offset > held.length {
        return Ok(mismatch);
    }
    // The overlap with what is held is assumed identical (a resent chunk).
    let skip = (held.length - offset) as usize;
    let rest: &[u8] = data.get(skip..).unwrap_or(&[]);
    let new_len = held.length + rest.len() as u64;
    let new_total = held.total.or(total);
    if new_total.is_some_and(|t| new_len > t) {
        return Ok(mismatch);
    }
    let changed = !rest.is_empty() || new_total != held.total;
    if changed {
        insert_chunks(c, held.blob_id, held.length, rest).await?;
        let (h, l, t) = (
            to_i64(held.length)?,
            to_i64(new_len)?,
            new_total.map(to_i64).transpose()?,
        );
        let q = diesel::update(
            blobs::table
                .filter(blobs::id.eq(held.blob_id))
                .filter(blobs::length.eq(h)),
        )
        .set((
            blobs::length.eq(l),
            blobs::total.eq(t),
            blobs::last_update.eq(now),
        ));
        let n = execute_cached(c, &q).await?;
        if n != 1 {
            return Err(StorageError::Conflict);
        }
    }
    Ok(Appended::Done {
        blob: info(new_len, new_total),
        changed,
    })
}

/// An append to a blob no stored transaction refers to yet (the body of a transaction
/// kept in memory); `blob_id: None` creates it. The transaction side is the caller's.
pub(crate) async fn append_blob(
    c: &mut Conn<'_>,
    now: i64,
    a: &BlobAppend,
) -> Result<AppendOutcome> {
    let held = match a.blob_id {
        None if a.offset == 0 => Held::empty(insert_blob(c, now, None).await?.0),
        None => return Ok(AppendOutcome::UnknownBlob),
        Some(id) => {
            let Some((len, total)) = blob_state(c, id).await? else {
                return Ok(AppendOutcome::UnknownBlob);
            };
            Held::stored(id, len, total)?
        }
    };
    Ok(
        match append_at(c, now, BODY_BLOB, held, a.offset, &a.data, a.total).await? {
            Appended::Done { blob, .. } => AppendOutcome::Ok {
                blob,
                version: None,
            },
            Appended::Mismatch(blob) => AppendOutcome::Mismatch { blob },
        },
    )
}

// ---- attempts -------------------------------------------------------------------------------

async fn insert_attempt(c: &mut Conn<'_>, now: i64, id: DbId) -> Result<i64> {
    let next = newest_attempt(c, id).await?.map_or(1, |(a, _)| a + 1);
    insert_attempt_id(c, now, id, next).await
}

async fn insert_attempt_id(c: &mut Conn<'_>, now: i64, id: DbId, next: i64) -> Result<i64> {
    run!(c, |c| diesel::insert_into(attempts::table)
        .values((
            attempts::transaction_id.eq(id),
            attempts::attempt_id.eq(next),
            attempts::responses.eq(None::<String>),
            attempts::creation.eq(now),
            attempts::last_update.eq(now),
        ))
        .execute(c)
        .await)?;
    Ok(next)
}

async fn write_responses(
    c: &mut Conn<'_>,
    now: i64,
    id: DbId,
    attempt_id: i64,
    responses: &Transaction,
) -> Result<()> {
    let json = responses.responses_json().to_string();
    let q = diesel::update(
        attempts::table
            .filter(attempts::transaction_id.eq(id))
            .filter(attempts::attempt_id.eq(attempt_id)),
    )
    .set((
        attempts::responses.eq(Some(json)),
        attempts::last_update.eq(now),
    ));
    execute_cached(c, &q).await?;
    Ok(())
}

pub(crate) fn has_responses(t: &Transaction) -> bool {
    t.mail_response.is_some()
        || t.rcpt_response.iter().any(Option::is_some)
        || t.data_response.is_some()
}

/// Takes the lease (if `take`) and starts an attempt on `row`.
async fn begin_attempt(c: &mut Conn<'_>, now: i64, me: SessionId, row: &TxRow) -> Result<TxRecord> {
    let env = row.envelope()?;
    let mut n = row.next(now);
    n.lease_session_id = Some(me);
    n.lease_generation += 1;
    let notification_pass = row.is_final();
    if !notification_pass && !env.retry {
        // A transaction without retry gets exactly one attempt.
        n.final_attempt_reason = Some(ONESHOT.to_string());
    }
    cas(c, row, &n).await?;
    if !notification_pass {
        insert_attempt(c, now, row.id).await?;
    }
    must_load(c, row.id).await
}

pub(crate) async fn start_attempt(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    id: DbId,
    version: i64,
) -> Result<TxRecord> {
    let row = row_at(c, id, version).await?;
    if row.lease_session_id != Some(me) {
        return Err(StorageError::Conflict);
    }
    if row.final_attempt_reason.is_some() {
        // Final, or `oneshot`: its one attempt was made.
        return Err(StorageError::Invalid(format!("tx {id} is not retryable")));
    }
    require_live(c, me).await?;
    begin_attempt(c, now, me, &row).await
}

pub(crate) async fn dequeue(c: &mut Conn<'_>, now: i64, me: SessionId) -> Result<Option<TxRecord>> {
    macro_rules! due {
        () => {
            transactions::table
                .filter(transactions::lease_session_id.is_null())
                .filter(transactions::final_attempt_reason.is_null())
                .filter(transactions::next_attempt_time.le(now))
                .filter(transactions::input_done.or(transactions::creation_session_id.eq(me)))
                .order((
                    transactions::next_attempt_time.asc(),
                    transactions::id.asc(),
                ))
                .select(TxRow::as_select())
        };
    }
    macro_rules! notify {
        () => {
            transactions::table
                .filter(transactions::notification)
                .filter(transactions::no_final_notification)
                .filter(transactions::lease_session_id.is_null())
                .filter(transactions::final_attempt_reason.is_not_null())
                .filter(transactions::final_attempt_reason.ne(ONESHOT))
                .order(transactions::id.asc())
                .select(TxRow::as_select())
        };
    }
    // Postgres: skip rows another replica is dequeuing right now instead of colliding.
    // SQLite: the writer's BEGIN IMMEDIATE already serializes all writers.
    let mut row: Option<TxRow> = match c {
        Conn::Sqlite(c) => due!().first(&mut **c).await.optional()?,
        Conn::Pg(c) => due!()
            .for_update()
            .skip_locked()
            .first(&mut **c)
            .await
            .optional()?,
    };
    if row.is_none() {
        row = match c {
            Conn::Sqlite(c) => notify!().first(&mut **c).await.optional()?,
            Conn::Pg(c) => notify!()
                .for_update()
                .skip_locked()
                .first(&mut **c)
                .await
                .optional()?,
        };
    }
    let Some(row) = row else {
        return Ok(None);
    };
    require_live(c, me).await?;
    begin_attempt(c, now, me, &row).await.map(Some)
}

pub(crate) async fn write_attempt(
    c: &mut Conn<'_>,
    now: i64,
    id: DbId,
    version: i64,
    lease: Lease,
    responses: &Transaction,
) -> Result<i64> {
    let version = bump(c, now, id, version, Some(lease)).await?;
    if has_responses(responses) {
        let (attempt_id, _) = newest_attempt(c, id)
            .await?
            .ok_or_else(|| StorageError::Invalid(format!("tx {id} has no attempt")))?;
        write_responses(c, now, id, attempt_id, responses).await?;
    }
    Ok(version)
}

pub(crate) async fn finish_attempt(
    c: &mut Conn<'_>,
    now: i64,
    me: SessionId,
    id: DbId,
    version: i64,
    lease: Lease,
    f: &Finish,
) -> Result<Finished> {
    let row = row_at(c, id, version).await?;
    check_fence(&row, lease)?;
    let mut n = row.next(now);
    n.lease_session_id = None;
    match &f.final_attempt_reason {
        // First real reason wins (a cancel may have landed during the attempt).
        Some(reason) if !row.is_final() => {
            n.final_attempt_reason = Some(reason.clone());
            n.no_final_notification = !f.notification_done;
        }
        _ => {
            if f.notification_done {
                n.no_final_notification = false;
            }
        }
    }
    n.next_attempt_time = if n.final_attempt_reason.is_none() {
        f.next_attempt_time.unwrap_or(0)
    } else {
        0
    };
    cas(c, &row, &n).await?;
    if has_responses(&f.responses)
        && let Some((attempt_id, _)) = newest_attempt(c, id).await?
    {
        write_responses(c, now, id, attempt_id, &f.responses).await?;
    }
    if let Some(dsn) = &f.dsn {
        create(c, now, me, dsn, false).await?;
    }
    Ok(Finished {
        version: n.version,
        last_update: now,
        final_attempt_reason: n.final_attempt_reason,
        next_attempt_time: n.next_attempt_time,
        notification_pending: n.notification && n.no_final_notification,
    })
}

/// What storage decided when an attempt ended: enough to update a record in memory
/// instead of reading it back.
#[derive(Clone, Debug)]
pub(crate) struct Finished {
    pub version: i64,
    pub last_update: i64,
    /// The raw column (`oneshot` included).
    pub final_attempt_reason: Option<String>,
    pub next_attempt_time: i64,
    /// `notification` and `no_final_notification` (meaningful once final).
    pub notification_pending: bool,
}

impl Finished {
    /// `record` as a fresh load would show it after a finish with `responses` was written
    /// with this result.
    pub(crate) fn apply(&self, record: &mut TxRecord, responses: &Transaction) {
        record.version = self.version;
        record.last_update = self.last_update;
        record.lease = None;
        record.lease_uri = None;
        record.final_attempt_reason = self.final_attempt_reason.clone();
        record.tx.final_attempt_reason = self.final_attempt_reason.clone().filter(|r| r != ONESHOT);
        record.next_attempt_time = (self.next_attempt_time != 0).then_some(self.next_attempt_time);
        record.notification_pending = record.is_final() && self.notification_pending;
        if has_responses(responses) && record.attempt_id.is_some() {
            record.tx.mail_response = responses.mail_response.clone();
            record.tx.rcpt_response = responses.rcpt_response.clone();
            record.tx.data_response = responses.data_response.clone();
        }
    }
}

// ---- gc -------------------------------------------------------------------------------------

pub(crate) async fn gc(c: &mut Conn<'_>, now: i64, ttl: i64) -> Result<(u64, u64)> {
    let cutoff = now - ttl;
    let txs = run!(c, |c| diesel::delete(
        transactions::table
            .filter(transactions::lease_session_id.is_null())
            .filter(transactions::last_update.le(cutoff))
            .filter(
                not(transactions::input_done).or(transactions::final_attempt_reason.is_not_null())
            )
            // A pending DSN keeps the row.
            .filter(not(
                transactions::notification.and(transactions::no_final_notification)
            ))
    )
    .execute(c)
    .await)?;
    // Unreferenced blobs only once idle as long: the body of a transaction kept in memory
    // has no reference until its recipients' transactions share it.
    let blobs_deleted = run!(c, |c| diesel::delete(
        blobs::table
            .filter(blobs::last_update.le(cutoff))
            .filter(not(
                blobs::id.eq_any(tx_blobs::table.select(tx_blobs::blob_id))
            ))
    )
    .execute(c)
    .await)?;
    Ok((txs as u64, blobs_deleted as u64))
}
