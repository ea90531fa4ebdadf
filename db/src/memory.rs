//! Transactions kept only in memory ([`TxRecord::in_memory`]): the SMTP-facing side of a
//! cut-through exploder, whose recipients are stored transactions of their own. Nothing it
//! answers promises durability (its DATA reply comes from the stored recipients), so its
//! state changes are the stored operations' outcomes applied to the record, with no row and
//! no commit. Its body is a stored blob the recipients share.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use koukan::Transaction;
use koukan::transaction::BlobState;
use koukan::transaction::Body;

use crate::ops::{self, Finished, Result};
use crate::{
    BlobInfo, CancelOutcome, Finish, Lease, NewTransaction, REASON_CANCELLED, SessionId,
    StorageError, TxRecord,
};

/// Ids of in-memory transactions count down from -1, so they never name a row.
static NEXT_ID: AtomicI64 = AtomicI64::new(-1);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The record of a new in-memory transaction: leased to `me` with attempt 1 started, as a
/// stored cut-through create would be. `new` must have no body (incremental).
pub fn create(me: SessionId, new: &NewTransaction) -> Result<TxRecord> {
    let id = NEXT_ID.fetch_sub(1, Ordering::Relaxed);
    ops::memory_record(id, now(), me, new)
}

fn touch(record: &mut TxRecord) -> i64 {
    record.version += 1;
    record.last_update = now();
    record.version
}

/// A version bump (heartbeat, or an envelope the caller already merged).
pub fn ping(record: &mut TxRecord) -> i64 {
    touch(record)
}

fn fence(record: &TxRecord, lease: Lease) -> Result<()> {
    match record.lease == Some(lease) {
        true => Ok(()),
        false => Err(StorageError::Conflict),
    }
}

/// The running attempt's responses so far.
pub fn write_attempt(record: &mut TxRecord, lease: Lease, responses: &Transaction) -> Result<()> {
    fence(record, lease)?;
    touch(record);
    record.tx.mail_response = responses.mail_response.clone();
    record.tx.rcpt_response = responses.rcpt_response.clone();
    record.tx.data_response = responses.data_response.clone();
    Ok(())
}

/// The end of the attempt. Only transactions without notification are kept in memory, so
/// a finish carrying a DSN is refused rather than dropped.
pub fn finish_attempt(record: &mut TxRecord, lease: Lease, finish: &Finish) -> Result<()> {
    fence(record, lease)?;
    if finish.dsn.is_some() {
        return Err(StorageError::Invalid(
            "a transaction kept in memory sends no DSN".into(),
        ));
    }
    let final_attempt_reason = match &finish.final_attempt_reason {
        // First real reason wins (a cancel may have landed during the attempt).
        Some(reason) if !record.is_final() => Some(reason.clone()),
        _ => record.final_attempt_reason.clone(),
    };
    let next_attempt_time = match final_attempt_reason {
        None => finish.next_attempt_time.unwrap_or(0),
        Some(_) => 0,
    };
    Finished {
        version: record.version + 1,
        last_update: now(),
        final_attempt_reason,
        next_attempt_time,
        notification_pending: false,
    }
    .apply(record, &finish.responses);
    Ok(())
}

/// A client cancel.
pub fn cancel(record: &mut TxRecord) -> CancelOutcome {
    if record.is_final() {
        return CancelOutcome::AlreadyFinal {
            version: record.version,
        };
    }
    record.tx.cancelled = true;
    record.final_attempt_reason = Some(REASON_CANCELLED.to_string());
    record.tx.final_attempt_reason = record.final_attempt_reason.clone();
    CancelOutcome::Cancelled {
        version: touch(record),
    }
}

/// Folds a body append (already stored in its blob) into the record. The version moves
/// when the body appears, when it is complete, and as a keep-alive when the record was
/// last written `refresh` ago or more (so a long upload does not look idle); returns the
/// new version then.
pub fn appended(record: &mut TxRecord, blob: &BlobInfo, refresh: Duration) -> Option<i64> {
    let state = BlobState {
        length: blob.length,
        total: blob.total,
    };
    let (created, was_final) = match record.blobs.iter_mut().find(|b| b.name == blob.name) {
        Some(known) => {
            let was_final = known.finalized();
            *known = blob.clone();
            (false, was_final)
        }
        None => {
            record.blobs.push(blob.clone());
            (true, false)
        }
    };
    record.tx.body = Some(Body::Message(state));
    let finalized_now = !was_final && blob.finalized();
    record.input_done = record.blobs.iter().all(BlobInfo::finalized);
    let keep_alive = now() - record.last_update >= refresh.as_secs() as i64;
    (created || finalized_now || keep_alive).then(|| touch(record))
}
