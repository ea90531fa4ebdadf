//! One suite, run against SQLite (always) and PostgreSQL (when `KOUKAN_TEST_POSTGRES` names
//! a server, e.g. `postgres://postgres@127.0.0.1:5432`; each test gets its own database).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use koukan::rest::{BODY_BLOB, BlobSource, BlobUri};
use koukan::rest_id::new_rest_id;
use koukan::transaction::{BlobState, Body};
use koukan::{Mailbox, Response, Sender, Transaction};
use koukan_db::*;

// ---- harness ------------------------------------------------------------------------------

/// A fresh database; dropped (Postgres) when the test ends, pass or fail.
struct Db {
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgGuard>,
}

struct PgGuard {
    server: String,
    name: String,
}

impl Drop for PgGuard {
    fn drop(&mut self) {
        // Drop runs outside async; use a private runtime on a private thread.
        let (server, name) = (self.server.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = AsyncPgConnection::establish(&format!("{server}/postgres")).await
                {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Db {
    fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        Db {
            backend: Backend::Sqlite(dir.path().join("koukan.db")),
            _dir: Some(dir),
            pg: None,
        }
    }

    async fn postgres() -> Option<Db> {
        let Ok(server) = std::env::var("KOUKAN_TEST_POSTGRES") else {
            eprintln!("skipping Postgres: KOUKAN_TEST_POSTGRES not set");
            return None;
        };
        let server = server.trim_end_matches('/').to_string();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "koukan_test_{}_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = AsyncPgConnection::establish(&format!("{server}/postgres"))
            .await
            .unwrap_or_else(|e| panic!("KOUKAN_TEST_POSTGRES={server} unreachable: {e}"));
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(Db {
            backend: Backend::Postgres(format!("{server}/{name}")),
            _dir: None,
            pg: Some(PgGuard { server, name }),
        })
    }

    async fn open(&self, uri: &str) -> Storage {
        self.open_with(uri, opts()).await
    }

    async fn open_with(&self, uri: &str, o: StorageOptions) -> Storage {
        let _ = &self.pg;
        Storage::open(self.backend.clone(), uri, o).await.unwrap()
    }
}

fn opts() -> StorageOptions {
    StorageOptions {
        // No keep-alive bumps unless a test asks for them.
        blob_tx_refresh_interval: Duration::from_secs(3600),
        ..Default::default()
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::Db::sqlite();
                    super::$name(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::Db::postgres().await else { return };
                    super::$name(&db).await;
                }
            )*
        }
    };
}

suite!(
    create_bodies,
    create_errors,
    load_version_cas,
    cancel_and_fail,
    append_semantics,
    append_finalize_edges,
    append_create_body_and_keepalive,
    append_leased_elsewhere,
    read_blob_chunks,
    attempts_oneshot,
    attempts_retry_and_dsn,
    final_reason_first_wins,
    dequeue_order_and_due,
    dequeue_two_sessions,
    notification_pending,
    sessions_recover,
    sessions_end,
    gc,
    create_with_attempt,
    set_body_reuses,
    restart_takes_back_leases,
    memory_transaction,
    concurrent_writes,
);

// ---- helpers ------------------------------------------------------------------------------

fn envelope(retry: bool, notification: bool) -> Transaction {
    Transaction {
        mail_from: Some(Mailbox::new("alice@example.com")),
        rcpt_to: vec![Mailbox::new("bob@example.com")],
        retry,
        notification,
        sender: Some(Sender::new("submission", None)),
        ..Default::default()
    }
}

fn new_tx(body: NewBody, leased: bool, retry: bool) -> NewTransaction {
    NewTransaction {
        rest_id: new_rest_id(16),
        tx: envelope(retry, false),
        body,
        leased,
        start_attempt: false,
    }
}

fn inline(s: &str) -> NewBody {
    NewBody::Inline(Bytes::copy_from_slice(s.as_bytes()))
}

fn body_uri(rest_id: &str) -> BlobUri {
    BlobUri {
        tx: rest_id.to_string(),
        blob: BODY_BLOB.to_string(),
    }
}

fn append(rest_id: &str, offset: u64, data: &[u8], total: Option<u64>) -> Append {
    Append {
        rest_id: rest_id.to_string(),
        blob: BODY_BLOB.to_string(),
        create_body: false,
        offset,
        data: Bytes::copy_from_slice(data),
        total,
    }
}

fn ok_blob(o: AppendOutcome) -> (BlobInfo, Option<i64>) {
    match o {
        AppendOutcome::Ok { blob, version } => (blob, version),
        other => panic!("expected Ok, got {other:?}"),
    }
}

fn mismatch(o: AppendOutcome) -> BlobInfo {
    match o {
        AppendOutcome::Mismatch { blob } => blob,
        other => panic!("expected Mismatch, got {other:?}"),
    }
}

fn responses(code: u16) -> Transaction {
    Transaction {
        mail_response: Some(Response::new(250, "ok")),
        rcpt_response: vec![Some(Response::new(250, "ok"))],
        data_response: Some(Response::new(code, "data")),
        ..Default::default()
    }
}

fn lease(r: &TxRecord) -> Lease {
    r.lease.expect("leased")
}

// ---- tests --------------------------------------------------------------------------------

async fn create_bodies(db: &Db) {
    let s = db.open("http://a").await;

    let none = s.create(new_tx(NewBody::None, true, true)).await.unwrap();
    assert_eq!(none.version, 1);
    assert_eq!(none.tx.body, None);
    assert!(!none.input_done);
    assert_eq!(none.lease.map(|l| l.session), Some(s.session_id()));
    assert_eq!(none.lease_uri.as_deref(), Some("http://a"));
    assert_eq!(none.creation_session, Some(s.session_id()));

    let up = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    assert!(!up.input_done);
    assert_eq!(up.tx.body, Some(Body::Message(BlobState::default())));
    assert_eq!(up.lease, None);
    assert_eq!(up.blob(BODY_BLOB).unwrap().length, 0);

    let inl = s
        .create(new_tx(inline("hello"), false, true))
        .await
        .unwrap();
    assert!(inl.input_done);
    let b = inl.blob(BODY_BLOB).unwrap().clone();
    assert!(b.finalized());
    assert_eq!(
        inl.tx.body,
        Some(Body::Message(BlobState {
            length: 5,
            total: Some(5)
        }))
    );
    assert_eq!(&s.read_blob(b.blob_id, 0, 100).await.unwrap()[..], b"hello");

    // Reuse shares the blob (refcount), no copy.
    let re = s
        .create(new_tx(NewBody::Reuse(body_uri(&inl.rest_id)), false, true))
        .await
        .unwrap();
    assert!(re.input_done);
    assert_eq!(re.blob(BODY_BLOB).unwrap().blob_id, b.blob_id);

    // Message builder: create + inline + reuse.
    let mb_src = s
        .create(NewTransaction {
            body: NewBody::MessageBuilder {
                spec: serde_json::json!({"text_body": [{"content": {"create_id": "inline0"}}]}),
                blobs: vec![("inline0".into(), BlobSource::Inline("part".into()))],
            },
            ..new_tx(NewBody::None, false, true)
        })
        .await
        .unwrap();
    assert!(mb_src.input_done, "inline-only builder is done at once");
    let spec = serde_json::json!({"headers": [["subject", "x"]], "text_body": []});
    let mb = s
        .create(NewTransaction {
            body: NewBody::MessageBuilder {
                spec: spec.clone(),
                blobs: vec![
                    ("up".into(), BlobSource::Create),
                    ("inline1".into(), BlobSource::Inline("text".into())),
                    (
                        "inline0".into(),
                        BlobSource::Reuse(BlobUri {
                            tx: mb_src.rest_id.clone(),
                            blob: "inline0".into(),
                        }),
                    ),
                ],
            },
            ..new_tx(NewBody::None, false, true)
        })
        .await
        .unwrap();
    assert!(!mb.input_done);
    assert_eq!(mb.blobs.len(), 3);
    assert_eq!(
        mb.blob("inline0").unwrap().blob_id,
        mb_src.blob("inline0").unwrap().blob_id
    );
    match &mb.tx.body {
        Some(Body::MessageBuilder { spec: got, blobs }) => {
            assert_eq!(got, &spec);
            assert_eq!(blobs.len(), 3);
        }
        other => panic!("{other:?}"),
    }
    // Uploading the created part completes the input.
    let r = s
        .append(Append {
            blob: "up".into(),
            ..append(&mb.rest_id, 0, b"att", Some(3))
        })
        .await
        .unwrap();
    let (_, v) = ok_blob(r);
    assert_eq!(v, Some(2));
    let mb = s.load(&mb.rest_id).await.unwrap().unwrap();
    assert!(mb.input_done);

    let empty_mb = s
        .create(NewTransaction {
            body: NewBody::MessageBuilder {
                spec: serde_json::json!({"headers": []}),
                blobs: vec![],
            },
            ..new_tx(NewBody::None, false, true)
        })
        .await
        .unwrap();
    assert!(empty_mb.input_done);
}

async fn create_errors(db: &Db) {
    let s = db.open("http://a").await;
    let unknown = s
        .create(new_tx(NewBody::Reuse(body_uri("nope")), false, true))
        .await;
    assert!(
        matches!(unknown, Err(StorageError::BadReuse(_))),
        "{unknown:?}"
    );
    let up = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    let unfinished = s
        .create(new_tx(NewBody::Reuse(body_uri(&up.rest_id)), false, true))
        .await;
    assert!(
        matches!(unfinished, Err(StorageError::BadReuse(_))),
        "{unfinished:?}"
    );
    // A failed create leaves nothing behind, and the writer keeps going.
    let dup = NewTransaction {
        rest_id: up.rest_id.clone(),
        ..new_tx(inline("x"), false, true)
    };
    assert!(matches!(s.create(dup).await, Err(StorageError::Duplicate)));
    let ok = s.create(new_tx(inline("x"), false, true)).await.unwrap();
    assert_eq!(ok.version, 1);
}

async fn load_version_cas(db: &Db) {
    let s = db.open("http://a").await;
    let t = s.create(new_tx(inline("x"), true, true)).await.unwrap();
    let loaded = s.load(&t.rest_id).await.unwrap().unwrap();
    assert_eq!(loaded, t);
    assert_eq!(s.load_id(t.id).await.unwrap().unwrap(), t);
    assert_eq!(s.load("missing").await.unwrap(), None);
    assert_eq!(s.load_id(-5).await.unwrap(), None);
    assert_eq!(
        s.version(&t.rest_id).await.unwrap(),
        Some((1, Some("http://a".into())))
    );
    assert_eq!(s.version("missing").await.unwrap(), None);

    let mut env = t.tx.clone();
    env.rcpt_to.push(Mailbox::new("carol@example.com"));
    assert_eq!(s.write_envelope(t.id, 1, &env).await.unwrap(), 2);
    assert!(matches!(
        s.write_envelope(t.id, 1, &env).await,
        Err(StorageError::Conflict)
    ));
    assert_eq!(s.ping(t.id, 2).await.unwrap(), 3);
    assert!(matches!(s.ping(t.id, 2).await, Err(StorageError::Conflict)));
    assert!(matches!(s.ping(-1, 1).await, Err(StorageError::NotFound)));
    let r = s.load_id(t.id).await.unwrap().unwrap();
    assert_eq!(r.version, 3);
    assert_eq!(r.tx.rcpt_to.len(), 2);
    assert!(r.creation > 0 && r.last_update >= r.creation);
    let now = s.now().await.unwrap();
    assert!((now - r.last_update).abs() < 60);
}

async fn cancel_and_fail(db: &Db) {
    let s = db.open("http://a").await;
    let t = s.create(new_tx(inline("x"), false, true)).await.unwrap();
    let v = match s.cancel(&t.rest_id).await.unwrap() {
        CancelOutcome::Cancelled { version } => version,
        o => panic!("{o:?}"),
    };
    assert_eq!(v, 2);
    let r = s.load(&t.rest_id).await.unwrap().unwrap();
    assert!(r.tx.cancelled);
    assert_eq!(r.tx.final_attempt_reason.as_deref(), Some(REASON_CANCELLED));
    assert!(!r.notification_pending);
    // Already final: nothing written, no version bump.
    assert_eq!(
        s.cancel(&t.rest_id).await.unwrap(),
        CancelOutcome::AlreadyFinal { version: 2 }
    );
    assert_eq!(s.cancel("missing").await.unwrap(), CancelOutcome::NotFound);

    // fail(): final reason, lease released, DSN question open.
    let mut n = new_tx(inline("x"), true, true);
    n.tx.notification = true;
    let t = s.create(n).await.unwrap();
    match s.fail(&t.rest_id, "stuck").await.unwrap() {
        CancelOutcome::Cancelled { version } => assert_eq!(version, 2),
        o => panic!("{o:?}"),
    }
    let r = s.load(&t.rest_id).await.unwrap().unwrap();
    assert_eq!(r.lease, None);
    assert_eq!(r.tx.final_attempt_reason.as_deref(), Some("stuck"));
    assert!(r.notification_pending);
    assert!(!r.tx.cancelled);
}

async fn append_semantics(db: &Db) {
    let s = db.open("http://a").await;
    let t = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    let id = &t.rest_id;
    let (b, v) = ok_blob(s.append(append(id, 0, b"abcde", None)).await.unwrap());
    assert_eq!((b.length, b.total, v), (5, None, None));
    // Gap: nothing changes, the held length is reported.
    let m = mismatch(s.append(append(id, 10, b"zz", None)).await.unwrap());
    assert_eq!(m.length, 5);
    // Overlap: the held prefix is skipped.
    let (b, _) = ok_blob(s.append(append(id, 3, b"defgh", None)).await.unwrap());
    assert_eq!(b.length, 8);
    // Declare the total; a different total later is refused.
    let (b, v) = ok_blob(s.append(append(id, 8, b"", Some(10))).await.unwrap());
    assert_eq!((b.length, b.total, v), (8, Some(10), None));
    let m = mismatch(s.append(append(id, 8, b"ij", Some(12))).await.unwrap());
    assert_eq!((m.length, m.total), (8, Some(10)));
    // Too much data for the declared total.
    mismatch(s.append(append(id, 8, b"ijk", None)).await.unwrap());
    assert_eq!(s.load(id).await.unwrap().unwrap().version, 1);
    // Finalizing bumps the version and sets input_done.
    let (b, v) = ok_blob(s.append(append(id, 8, b"ij", Some(10))).await.unwrap());
    assert!(b.finalized());
    assert_eq!(v, Some(2));
    let r = s.load(id).await.unwrap().unwrap();
    assert!(r.input_done);
    assert_eq!(r.version, 2);
    // A resent last chunk is fine and bumps nothing.
    let (b, v) = ok_blob(s.append(append(id, 8, b"ij", Some(10))).await.unwrap());
    assert!(b.finalized());
    assert_eq!(v, None);
    assert_eq!(
        &s.read_blob(b.blob_id, 0, 100).await.unwrap()[..],
        b"abcdefghij"
    );
    assert_eq!(&s.read_blob(b.blob_id, 4, 3).await.unwrap()[..], b"efg");
    assert!(s.read_blob(b.blob_id, 10, 3).await.unwrap().is_empty());
    assert!(matches!(
        s.append(append("missing", 0, b"", None)).await.unwrap(),
        AppendOutcome::UnknownTx
    ));
    assert!(matches!(
        s.append(Append {
            blob: "other".into(),
            ..append(id, 0, b"", None)
        })
        .await
        .unwrap(),
        AppendOutcome::UnknownBlob
    ));
}

async fn append_finalize_edges(db: &Db) {
    let s = db.open("http://a").await;
    // S11: the whole body was already held; the resend that declares the total finalizes.
    let t = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    ok_blob(s.append(append(&t.rest_id, 0, b"abc", None)).await.unwrap());
    let (b, v) = ok_blob(
        s.append(append(&t.rest_id, 0, b"abc", Some(3)))
            .await
            .unwrap(),
    );
    assert!(b.finalized());
    assert_eq!(v, Some(2));
    let r = s.load(&t.rest_id).await.unwrap().unwrap();
    assert!(r.input_done && r.blob(BODY_BLOB).unwrap().finalized());

    // An empty message.
    let t = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    let (b, v) = ok_blob(s.append(append(&t.rest_id, 0, b"", Some(0))).await.unwrap());
    assert!(b.finalized() && b.length == 0);
    assert_eq!(v, Some(2));
    assert!(s.load(&t.rest_id).await.unwrap().unwrap().input_done);
}

async fn append_create_body_and_keepalive(db: &Db) {
    let s = db
        .open_with(
            "http://a",
            StorageOptions {
                blob_tx_refresh_interval: Duration::ZERO,
                ..Default::default()
            },
        )
        .await;
    let t = s.create(new_tx(NewBody::None, false, true)).await.unwrap();
    assert!(matches!(
        s.append(append(&t.rest_id, 0, b"ab", None)).await.unwrap(),
        AppendOutcome::UnknownBlob
    ));
    let create = |offset, data: &[u8], total| Append {
        create_body: true,
        ..append(&t.rest_id, offset, data, total)
    };
    assert!(matches!(
        s.append(create(3, b"ab", None)).await.unwrap(),
        AppendOutcome::UnknownBlob
    ));
    let (b, v) = ok_blob(s.append(create(0, b"ab", None)).await.unwrap());
    assert_eq!(b.length, 2);
    assert_eq!(v, Some(2), "creating the body bumps the version");
    // Keep-alive: interval 0, so every partial append bumps.
    let (_, v) = ok_blob(s.append(create(2, b"cd", None)).await.unwrap());
    assert_eq!(v, Some(3));
    let (b, v) = ok_blob(s.append(create(4, b"e", Some(5))).await.unwrap());
    assert!(b.finalized());
    assert_eq!(v, Some(4));
    let r = s.load(&t.rest_id).await.unwrap().unwrap();
    assert!(r.input_done);
    assert_eq!(
        r.tx.body,
        Some(Body::Message(BlobState {
            length: 5,
            total: Some(5)
        }))
    );
}

async fn append_leased_elsewhere(db: &Db) {
    let a = db.open("http://a").await;
    let b = db.open("http://b").await;
    let t = a.create(new_tx(NewBody::Upload, true, true)).await.unwrap();
    assert_eq!(
        b.append(append(&t.rest_id, 0, b"x", None)).await.unwrap(),
        AppendOutcome::LeasedElsewhere {
            uri: "http://a".into()
        }
    );
    assert_eq!(
        b.version(&t.rest_id).await.unwrap(),
        Some((1, Some("http://a".into())))
    );
    let (blob, _) = ok_blob(a.append(append(&t.rest_id, 0, b"x", None)).await.unwrap());
    assert_eq!(blob.length, 1);
}

fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 12345;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

async fn read_blob_chunks(db: &Db) {
    let s = db.open("http://a").await;
    let data = pattern(3 * 1024 * 1024 + 777);
    let t = s
        .create(new_tx(
            NewBody::Inline(Bytes::from(data.clone())),
            false,
            true,
        ))
        .await
        .unwrap();
    let id = t.blob(BODY_BLOB).unwrap().blob_id;
    assert_eq!(
        &s.read_blob(id, 0, usize::MAX).await.unwrap()[..],
        &data[..]
    );
    let mb = 1usize << 20;
    for (off, len) in [
        (mb - 10, 100),
        (2 * mb - 1, 2),
        (5, mb * 2),
        (3 * mb, 10_000),
    ] {
        let got = s.read_blob(id, off as u64, len).await.unwrap();
        let end = (off + len).min(data.len());
        assert_eq!(&got[..], &data[off..end], "read {off}+{len}");
    }
    assert!(
        s.read_blob(id, data.len() as u64, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        s.read_blob(-1, 0, 10).await,
        Err(StorageError::NotFound)
    ));

    // Uploaded in uneven pieces.
    let t = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    let mut off = 0;
    for piece in data.chunks(700_001) {
        let end = off + piece.len();
        let total = (end == data.len()).then_some(data.len() as u64);
        ok_blob(
            s.append(append(&t.rest_id, off as u64, piece, total))
                .await
                .unwrap(),
        );
        off = end;
    }
    let id = s
        .load(&t.rest_id)
        .await
        .unwrap()
        .unwrap()
        .blob(BODY_BLOB)
        .unwrap()
        .blob_id;
    for (off, len) in [(0, data.len()), (699_990, 30), (1_400_000, mb + 3)] {
        let got = s.read_blob(id, off as u64, len).await.unwrap();
        assert_eq!(&got[..], &data[off..off + len], "read {off}+{len}");
    }
}

async fn attempts_oneshot(db: &Db) {
    let s = db.open("http://a").await;
    let t = s.create(new_tx(inline("x"), true, false)).await.unwrap();
    let r = s.start_attempt(t.id, t.version).await.unwrap();
    assert_eq!(r.version, 2);
    assert_eq!(r.final_attempt_reason.as_deref(), Some(ONESHOT));
    assert_eq!(r.tx.final_attempt_reason, None);
    assert_eq!(r.attempt_id, Some(1));
    assert_eq!(r.tx.attempt_count, Some(1));
    let l = lease(&r);
    assert_eq!(l.session, s.session_id());
    assert!(l.generation > lease(&t).generation);
    // Stale version, wrong generation: refused.
    assert!(matches!(
        s.start_attempt(t.id, t.version).await,
        Err(StorageError::Conflict)
    ));
    let bad = Lease {
        generation: l.generation + 1,
        ..l
    };
    assert!(matches!(
        s.write_attempt(r.id, r.version, bad, &responses(250)).await,
        Err(StorageError::Conflict)
    ));
    let mut partial = Transaction {
        mail_response: Some(Response::new(250, "ok")),
        ..Default::default()
    };
    let v = s.write_attempt(r.id, r.version, l, &partial).await.unwrap();
    assert_eq!(v, 3);
    let r2 = s.load_id(t.id).await.unwrap().unwrap();
    assert_eq!(r2.tx.mail_response, partial.mail_response);
    assert_eq!(r2.tx.data_response, None);
    partial = responses(250);
    let v = s
        .finish_attempt(
            r.id,
            v,
            l,
            Finish {
                responses: partial.clone(),
                final_attempt_reason: Some("upstream response success".into()),
                notification_done: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let done = s.load_id(t.id).await.unwrap().unwrap();
    assert_eq!(done.version, v);
    assert_eq!(done.lease, None);
    assert_eq!(
        done.tx.final_attempt_reason.as_deref(),
        Some("upstream response success")
    );
    assert_eq!(done.tx.data_response, partial.data_response);
    assert!(done.is_final() && !done.notification_pending);
    // After release the old lease cannot write.
    assert!(matches!(
        s.write_attempt(t.id, v, l, &partial).await,
        Err(StorageError::Conflict)
    ));
    assert!(s.dequeue().await.unwrap().is_none());
}

async fn attempts_retry_and_dsn(db: &Db) {
    let s = db.open("http://a").await;
    let mut n = new_tx(inline("x"), true, true);
    n.tx.notification = true;
    let t = s.create(n).await.unwrap();
    let r = s.start_attempt(t.id, t.version).await.unwrap();
    assert_eq!(r.final_attempt_reason, None);
    let now = s.now().await.unwrap();
    let v = s
        .finish_attempt(
            r.id,
            r.version,
            lease(&r),
            Finish {
                responses: responses(450),
                next_attempt_time: Some(now + 3600),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let w = s.load_id(t.id).await.unwrap().unwrap();
    assert_eq!(w.version, v);
    assert_eq!(w.lease, None);
    assert_eq!(w.next_attempt_time, Some(now + 3600));
    assert_eq!(w.final_attempt_reason, None);
    assert!(s.dequeue().await.unwrap().is_none(), "not due yet");

    // A downstream write does not move the due time.
    let v = s.write_envelope(w.id, w.version, &w.tx).await.unwrap();
    assert_eq!(v, w.version + 1);
    let w = s.load_id(w.id).await.unwrap().unwrap();
    assert_eq!(w.next_attempt_time, Some(now + 3600));

    // An attempt that ends for good inserts its DSN in the same SQL transaction.
    let dsn_id = new_rest_id(16);
    let dsn = NewTransaction {
        rest_id: dsn_id.clone(),
        tx: envelope(true, false),
        body: inline("bounce"),
        leased: true, // ignored: DSNs are left for the dequeuer
        start_attempt: false,
    };
    let t3 = s.create(new_tx(inline("y"), true, true)).await.unwrap();
    let a3 = s.start_attempt(t3.id, t3.version).await.unwrap();
    let v3 = s
        .finish_attempt(
            a3.id,
            a3.version,
            lease(&a3),
            Finish {
                responses: responses(550),
                final_attempt_reason: Some("upstream response permfail".into()),
                notification_done: true,
                dsn: Some(dsn),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(v3, a3.version + 1);
    let d = s.load(&dsn_id).await.unwrap().unwrap();
    assert_eq!(d.lease, None);
    assert!(d.input_done);
    let got = s.dequeue().await.unwrap().expect("the DSN is due");
    assert_eq!(got.rest_id, dsn_id);
    assert_eq!(got.attempt_id, Some(1));
    assert_eq!(got.lease.map(|l| l.session), Some(s.session_id()));

    // A failing DSN insert (duplicate rest id) rolls back the whole finish.
    let t4 = s.create(new_tx(inline("z"), true, true)).await.unwrap();
    let a4 = s.start_attempt(t4.id, t4.version).await.unwrap();
    let dup = NewTransaction {
        rest_id: dsn_id.clone(),
        ..new_tx(inline("b"), false, true)
    };
    let e = s
        .finish_attempt(
            a4.id,
            a4.version,
            lease(&a4),
            Finish {
                final_attempt_reason: Some("upstream response permfail".into()),
                dsn: Some(dup),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(e, Err(StorageError::Duplicate)), "{e:?}");
    let still = s.load_id(t4.id).await.unwrap().unwrap();
    assert_eq!(still.version, a4.version);
    assert!(still.lease.is_some() && still.final_attempt_reason.is_none());
}

async fn final_reason_first_wins(db: &Db) {
    let s = db.open("http://a").await;
    let t = s.create(new_tx(inline("x"), true, true)).await.unwrap();
    let r = s.start_attempt(t.id, t.version).await.unwrap();
    // A cancel lands mid-attempt.
    assert!(matches!(
        s.cancel(&t.rest_id).await.unwrap(),
        CancelOutcome::Cancelled { .. }
    ));
    assert!(matches!(
        s.write_attempt(r.id, r.version, lease(&r), &responses(250))
            .await,
        Err(StorageError::Conflict)
    ));
    let cur = s.load_id(t.id).await.unwrap().unwrap();
    assert_eq!(cur.lease, r.lease, "cancel does not steal the lease");
    let v = s
        .finish_attempt(
            cur.id,
            cur.version,
            lease(&cur),
            Finish {
                responses: responses(250),
                final_attempt_reason: Some("upstream response success".into()),
                notification_done: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let end = s.load_id(t.id).await.unwrap().unwrap();
    assert_eq!(end.version, v);
    assert_eq!(
        end.tx.final_attempt_reason.as_deref(),
        Some(REASON_CANCELLED)
    );
    assert_eq!(end.tx.data_response, Some(Response::new(250, "data")));
    assert_eq!(end.lease, None);
}

async fn dequeue_order_and_due(db: &Db) {
    let s = db.open("http://a").await;
    assert!(s.dequeue().await.unwrap().is_none());
    let now = s.now().await.unwrap();
    // Three retryable transactions, attempted once each, due at different times.
    let mut ids = Vec::new();
    for due in [now - 10, now + 3600, now - 100] {
        let t = s.create(new_tx(inline("x"), true, true)).await.unwrap();
        let a = s.start_attempt(t.id, t.version).await.unwrap();
        s.finish_attempt(
            a.id,
            a.version,
            lease(&a),
            Finish {
                next_attempt_time: Some(due),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        ids.push(t.id);
    }
    // Unleased and incomplete, created by someone else: never dequeued here... but this
    // session created it, so it is eligible (and due at once).
    let mine = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    let first = s.dequeue().await.unwrap().unwrap();
    assert_eq!(first.id, mine.id, "no due time sorts first");
    let second = s.dequeue().await.unwrap().unwrap();
    assert_eq!(second.id, ids[2]);
    assert_eq!(second.attempt_id, Some(2));
    assert_eq!(second.final_attempt_reason, None);
    let third = s.dequeue().await.unwrap().unwrap();
    assert_eq!(third.id, ids[0]);
    assert!(s.dequeue().await.unwrap().is_none(), "the last is not due");

    // Another session does not take an incomplete tx it did not create.
    let b = db.open("http://b").await;
    let other = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    assert!(b.dequeue().await.unwrap().is_none());
    let got = s.dequeue().await.unwrap().unwrap();
    assert_eq!(got.id, other.id);
}

async fn dequeue_two_sessions(db: &Db) {
    let a = db.open("http://a").await;
    let b = db.open("http://b").await;
    const N: usize = 40;
    for _ in 0..N {
        a.create(new_tx(inline("x"), false, true)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for s in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(r) = s.dequeue().await.unwrap() {
                assert_eq!(r.lease.unwrap().session, s.session_id());
                got.push(r.id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), N, "every row exactly once");
    assert_eq!(unique.len(), N);
}

async fn notification_pending(db: &Db) {
    let s = db.open("http://a").await;
    // Final without a DSN decision, notification enabled afterwards (T10).
    let t = s.create(new_tx(inline("x"), true, true)).await.unwrap();
    let a = s.start_attempt(t.id, t.version).await.unwrap();
    let v = s
        .finish_attempt(
            a.id,
            a.version,
            lease(&a),
            Finish {
                responses: responses(550),
                final_attempt_reason: Some("upstream response permfail".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let r = s.load_id(t.id).await.unwrap().unwrap();
    assert!(!r.notification_pending, "no notification requested");
    assert!(s.dequeue().await.unwrap().is_none());
    let mut env = r.tx.clone();
    env.notification = true;
    let v = s.write_envelope(t.id, v, &env).await.unwrap();
    let r = s.load_id(t.id).await.unwrap().unwrap();
    assert!(r.notification_pending);
    let p = s.dequeue().await.unwrap().expect("notification pass");
    assert_eq!(p.id, t.id);
    assert_eq!(p.version, v + 1);
    assert_eq!(
        p.attempt_id,
        Some(1),
        "no attempt row for a notification pass"
    );
    assert_eq!(p.tx.data_response, Some(Response::new(550, "data")));
    s.finish_attempt(
        p.id,
        p.version,
        lease(&p),
        Finish {
            notification_done: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = s.load_id(t.id).await.unwrap().unwrap();
    assert!(!r.notification_pending);
    assert_eq!(r.tx.data_response, Some(Response::new(550, "data")));
    assert!(s.dequeue().await.unwrap().is_none());

    // A oneshot tx revived by enabling retry (store-and-forward).
    let t = s.create(new_tx(inline("x"), true, false)).await.unwrap();
    let a = s.start_attempt(t.id, t.version).await.unwrap();
    let v = s
        .finish_attempt(a.id, a.version, lease(&a), Finish::default())
        .await
        .unwrap();
    assert_eq!(
        s.load_id(t.id)
            .await
            .unwrap()
            .unwrap()
            .final_attempt_reason
            .as_deref(),
        Some(ONESHOT)
    );
    assert!(s.dequeue().await.unwrap().is_none());
    let mut env = a.tx.clone();
    env.retry = true;
    s.write_envelope(t.id, v, &env).await.unwrap();
    let again = s.dequeue().await.unwrap().unwrap();
    assert_eq!(again.id, t.id);
    assert_eq!(again.attempt_id, Some(2));
}

async fn sessions_recover(db: &Db) {
    let a = db.open("http://a").await;
    let b = db.open("http://b").await;
    assert!(a.refresh_session().await.unwrap());
    // A retryable tx and a oneshot tx, both mid-attempt in session a.
    let retry = a.create(new_tx(inline("x"), true, true)).await.unwrap();
    let ra = a.start_attempt(retry.id, retry.version).await.unwrap();
    let mut n = new_tx(inline("y"), true, false);
    n.tx.notification = true;
    let once = a.create(n).await.unwrap();
    let oa = a.start_attempt(once.id, once.version).await.unwrap();
    let partial = Transaction {
        mail_response: Some(Response::new(250, "ok")),
        ..Default::default()
    };
    let ov = a
        .write_attempt(oa.id, oa.version, lease(&oa), &partial)
        .await
        .unwrap();

    let rec = b.recover(Duration::ZERO).await.unwrap();
    assert_eq!(rec.dead_sessions, vec![a.session_id()]);
    assert_eq!(rec.released, vec![retry.id]);
    assert_eq!(rec.interrupted, vec![once.id]);
    // b itself is never declared dead by its own recovery.
    assert!(b.refresh_session().await.unwrap());
    assert!(!a.refresh_session().await.unwrap());

    let r = b.load_id(retry.id).await.unwrap().unwrap();
    assert_eq!(r.lease, None);
    assert_eq!(r.version, ra.version + 1);
    assert_eq!(r.final_attempt_reason, None);
    // Fenced: the old holder cannot write, even with the current version.
    assert!(matches!(
        a.write_attempt(ra.id, ra.version, lease(&ra), &responses(250))
            .await,
        Err(StorageError::Conflict)
    ));
    assert!(matches!(
        a.write_attempt(r.id, r.version, lease(&ra), &responses(250))
            .await,
        Err(StorageError::Conflict)
    ));
    // A dead session cannot lease anything.
    assert!(a.dequeue().await.is_err());

    let o = b.load_id(once.id).await.unwrap().unwrap();
    assert_eq!(o.version, ov + 1);
    assert_eq!(o.lease, None);
    assert_eq!(
        o.tx.final_attempt_reason.as_deref(),
        Some(REASON_INTERRUPTED)
    );
    assert_eq!(o.tx.mail_response, Some(Response::new(250, "ok")));
    let data = o.tx.data_response.clone().unwrap();
    assert!(data.temp(), "{data:?}");
    assert!(o.tx.rcpt_response[0].as_ref().unwrap().temp());
    assert!(o.notification_pending, "the DSN question is open");

    // The released retryable tx is retried elsewhere (at-least-once).
    let d = b.dequeue().await.unwrap().unwrap();
    assert_eq!(d.id, retry.id);
    assert_eq!(d.attempt_id, Some(2));
    assert!(lease(&d).generation > lease(&ra).generation);
    let p = b.dequeue().await.unwrap().unwrap();
    assert_eq!(p.id, once.id, "then the DSN pass");
    assert_eq!(p.attempt_id, Some(1));

    // A second pass finds nothing new.
    let again = b.recover(Duration::ZERO).await.unwrap();
    assert!(again.dead_sessions.is_empty() && again.released.is_empty());
}

async fn sessions_end(db: &Db) {
    let a = db.open("http://a").await;
    let b = db.open("http://b").await;
    let t = a.create(new_tx(inline("x"), true, true)).await.unwrap();
    let r = a.start_attempt(t.id, t.version).await.unwrap();
    a.end_session().await.unwrap();
    assert!(!a.refresh_session().await.unwrap());
    let x = b.load_id(t.id).await.unwrap().unwrap();
    assert_eq!(x.lease, None);
    assert_eq!(x.version, r.version + 1);
    assert!(matches!(
        a.finish_attempt(x.id, x.version, lease(&r), Finish::default())
            .await,
        Err(StorageError::Conflict)
    ));
    assert!(matches!(
        a.create(new_tx(inline("x"), true, true)).await,
        Err(StorageError::Invalid(_))
    ));
    a.close().await;
    assert!(matches!(
        a.ping(t.id, x.version).await,
        Err(StorageError::Closed)
    ));
    assert_eq!(b.dequeue().await.unwrap().unwrap().id, t.id);
}

async fn gc(db: &Db) {
    let s = db.open("http://a").await;
    // Final: collected. Its body blob is shared with a live tx, so the blob stays.
    let fin = s
        .create(new_tx(inline("shared"), false, true))
        .await
        .unwrap();
    let keep = s
        .create(new_tx(NewBody::Reuse(body_uri(&fin.rest_id)), false, true))
        .await
        .unwrap();
    s.cancel(&fin.rest_id).await.unwrap();
    // Final with an own blob: both go.
    let lone = s.create(new_tx(inline("lone"), false, true)).await.unwrap();
    s.cancel(&lone.rest_id).await.unwrap();
    // Incomplete input: collected.
    let inc = s
        .create(new_tx(NewBody::Upload, false, true))
        .await
        .unwrap();
    // Leased: kept.
    let leased = s.create(new_tx(NewBody::Upload, true, true)).await.unwrap();
    // Pending DSN: kept.
    let mut n = new_tx(inline("x"), true, true);
    n.tx.notification = true;
    let pend = s.create(n).await.unwrap();
    s.fail(&pend.rest_id, "stuck").await.unwrap();

    assert_eq!(s.gc(Duration::from_secs(3600)).await.unwrap(), (0, 0));
    let (txs, blobs) = s.gc(Duration::ZERO).await.unwrap();
    assert_eq!(txs, 3);
    assert_eq!(blobs, 2, "lone body and the incomplete upload");
    assert!(s.load_id(fin.id).await.unwrap().is_none());
    assert!(s.load_id(lone.id).await.unwrap().is_none());
    assert!(s.load_id(inc.id).await.unwrap().is_none());
    let k = s.load_id(keep.id).await.unwrap().unwrap();
    let shared = k.blob(BODY_BLOB).unwrap().blob_id;
    assert_eq!(&s.read_blob(shared, 0, 100).await.unwrap()[..], b"shared");
    assert!(s.load_id(leased.id).await.unwrap().is_some());
    assert!(s.load_id(pend.id).await.unwrap().is_some());
    assert!(
        s.read_blob(lone.blob(BODY_BLOB).unwrap().blob_id, 0, 1)
            .await
            .is_err()
    );
}

/// Storage does its work on its own runtime: the runtime that opened it may go away (an
/// actix arbiter stopping) and callers on any other runtime keep working.
#[test]
fn outlives_the_opening_runtime() {
    let db = Db::sqlite();
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let s = rt().block_on(db.open("http://a"));
    let t = rt()
        .block_on(s.create(new_tx(inline("x"), true, true)))
        .unwrap();
    let other = rt();
    other.block_on(async {
        let r = s.start_attempt(t.id, t.version).await.unwrap();
        assert_eq!(r.attempt_id, Some(1));
        assert_eq!(s.load_id(t.id).await.unwrap().unwrap().version, 2);
    });
}

async fn create_with_attempt(db: &Db) {
    let s = &db.open("http://a").await;
    let r = s
        .create(NewTransaction {
            start_attempt: true,
            ..new_tx(NewBody::Inline(Bytes::from_static(b"x")), true, false)
        })
        .await
        .unwrap();
    assert_eq!(r.attempt_id, Some(1), "attempt 1 started with the row");
    assert_eq!(r.tx.attempt_count, Some(1));
    assert_eq!(
        r.final_attempt_reason.as_deref(),
        Some(ONESHOT),
        "no retry: one attempt"
    );
    assert!(r.lease.is_some());
    // Unleased creates ignore the flag: the dequeuer starts their attempt.
    let u = s
        .create(NewTransaction {
            start_attempt: true,
            ..new_tx(NewBody::None, false, true)
        })
        .await
        .unwrap();
    assert_eq!(u.attempt_id, None);
    assert!(u.lease.is_none());
}

async fn set_body_reuses(db: &Db) {
    let s = &db.open("http://a").await;
    let src = s
        .create(new_tx(
            NewBody::Inline(Bytes::from_static(b"Subject: x\r\n\r\nhi\r\n")),
            false,
            false,
        ))
        .await
        .unwrap();
    let dst = s.create(new_tx(NewBody::None, false, false)).await.unwrap();
    assert!(!dst.input_done);
    let uri = koukan::rest::BlobUri {
        tx: src.rest_id.clone(),
        blob: koukan::rest::BODY_BLOB.into(),
    };
    assert!(matches!(
        s.set_body(dst.id, dst.version + 1, NewBody::Reuse(uri.clone()))
            .await,
        Err(StorageError::Conflict)
    ));
    let v = s
        .set_body(dst.id, dst.version, NewBody::Reuse(uri.clone()))
        .await
        .unwrap();
    assert_eq!(v, dst.version + 1);
    let after = s.load_id(dst.id).await.unwrap().unwrap();
    assert!(after.input_done);
    let (body, src_body) = (
        after.blob(koukan::rest::BODY_BLOB).unwrap(),
        src.blob(koukan::rest::BODY_BLOB).unwrap(),
    );
    assert_eq!(body.blob_id, src_body.blob_id, "shared, not copied");
    assert!(body.finalized());
    // A second body is refused.
    assert!(matches!(
        s.set_body(dst.id, v, NewBody::Reuse(uri)).await,
        Err(StorageError::Invalid(_))
    ));
}

async fn restart_takes_back_leases(db: &Db) {
    let old = db.open("http://replica-1").await;
    let leased = old
        .create(new_tx(
            NewBody::Inline(Bytes::from_static(b"x")),
            true,
            true,
        ))
        .await
        .unwrap();
    assert!(leased.lease.is_some());
    // The same replica starts again (a crash and restart): its old session is dead at once.
    let new = db.open("http://replica-1").await;
    let after = new.load_id(leased.id).await.unwrap().unwrap();
    assert_eq!(
        after.lease, None,
        "released without waiting for the liveness timeout"
    );
    assert!(after.version > leased.version, "fenced");
    assert!(
        !old.refresh_session().await.unwrap(),
        "the old incarnation learns it is dead"
    );
    // Another replica's session is left alone.
    let other = db.open("http://replica-2").await;
    assert!(new.refresh_session().await.unwrap());
    assert!(other.refresh_session().await.unwrap());
}

fn blob_append(blob_id: Option<i64>, offset: u64, data: &[u8], total: Option<u64>) -> BlobAppend {
    BlobAppend {
        blob_id,
        offset,
        data: Bytes::copy_from_slice(data),
        total,
    }
}

/// A transaction kept in memory: no row, its body a stored blob of its own that stored
/// transactions share by id; the state changes mirror the stored ones.
async fn memory_transaction(db: &Db) {
    let s = &db.open("http://a").await;
    let mut new = new_tx(NewBody::None, true, false);
    new.start_attempt = true;
    let mut r = memory::create(s.session_id(), &new).unwrap();
    assert!(r.in_memory());
    assert_eq!(r.lease.map(|l| l.session), Some(s.session_id()));
    assert_eq!((r.attempt_id, r.tx.attempt_count), (Some(1), Some(1)));
    assert!(s.load(&r.rest_id).await.unwrap().is_none(), "no row");
    // Only leased, started, bodiless creates qualify.
    assert!(memory::create(s.session_id(), &new_tx(NewBody::None, false, false)).is_err());

    // The first append creates the blob; the record's version moves when the body
    // appears and when it is complete.
    let hour = Duration::from_secs(3600);
    let (b, v) = ok_blob(
        s.append_blob(blob_append(None, 0, b"Subject: x\r\n", None))
            .await
            .unwrap(),
    );
    assert_eq!((v, b.length, b.total), (None, 12, None));
    let v0 = r.version;
    assert_eq!(memory::appended(&mut r, &b, hour), Some(v0 + 1));
    assert!(matches!(
        r.tx.body,
        Some(Body::Message(BlobState {
            length: 12,
            total: None
        }))
    ));
    assert!(!r.input_done);
    // A gap, an unknown blob and a create past offset 0 are refused.
    assert_eq!(
        mismatch(
            s.append_blob(blob_append(Some(b.blob_id), 20, b"x", None))
                .await
                .unwrap()
        )
        .length,
        12
    );
    assert_eq!(
        s.append_blob(blob_append(Some(b.blob_id + 1000), 0, b"x", None))
            .await
            .unwrap(),
        AppendOutcome::UnknownBlob
    );
    assert_eq!(
        s.append_blob(blob_append(None, 5, b"x", None))
            .await
            .unwrap(),
        AppendOutcome::UnknownBlob
    );
    let (b2, _) = ok_blob(
        s.append_blob(blob_append(Some(b.blob_id), 12, b"\r\nhi\r\n", Some(18)))
            .await
            .unwrap(),
    );
    assert!(b2.finalized());
    assert_eq!(memory::appended(&mut r, &b2, hour), Some(v0 + 2));
    assert!(r.input_done);

    // Unreferenced but fresh: GC leaves it for the recipients to share.
    assert_eq!(s.gc(hour).await.unwrap(), (0, 0));
    let dst = s
        .create(new_tx(NewBody::Blob(b.blob_id), false, false))
        .await
        .unwrap();
    assert!(dst.input_done);
    assert_eq!(
        dst.blob(BODY_BLOB).unwrap().blob_id,
        b.blob_id,
        "shared, not copied"
    );
    assert_eq!(
        &s.read_blob(b.blob_id, 0, 100).await.unwrap()[..],
        b"Subject: x\r\n\r\nhi\r\n"
    );
    // An open blob cannot be shared; once idle past the TTL and unreferenced, GC takes it.
    let (open, _) = ok_blob(
        s.append_blob(blob_append(None, 0, b"x", None))
            .await
            .unwrap(),
    );
    assert!(matches!(
        s.create(new_tx(NewBody::Blob(open.blob_id), false, false))
            .await,
        Err(StorageError::BadReuse(_))
    ));
    assert_eq!(s.gc(Duration::ZERO).await.unwrap(), (0, 1));
    assert!(s.read_blob(b.blob_id, 0, 1).await.is_ok(), "still shared");

    // Attempt writes are fenced on the lease, the first final reason wins, a cancel after
    // the end changes nothing.
    let l = lease(&r);
    let stale = Lease {
        generation: l.generation + 1,
        ..l
    };
    assert!(matches!(
        memory::write_attempt(&mut r, stale, &responses(250)),
        Err(StorageError::Conflict)
    ));
    let v = r.version;
    memory::write_attempt(&mut r, l, &responses(250)).unwrap();
    assert_eq!(r.version, v + 1);
    assert_eq!(r.tx.data_response.as_ref().map(|d| d.code), Some(250));
    let finish = Finish {
        responses: responses(250),
        final_attempt_reason: Some("delivered".into()),
        ..Default::default()
    };
    memory::finish_attempt(&mut r, l, &finish).unwrap();
    assert!(r.is_final() && r.lease.is_none());
    assert_eq!(r.tx.final_attempt_reason.as_deref(), Some("delivered"));
    assert!(matches!(
        memory::finish_attempt(&mut r, l, &finish),
        Err(StorageError::Conflict)
    ));
    let v = r.version;
    assert_eq!(
        memory::cancel(&mut r),
        CancelOutcome::AlreadyFinal { version: v }
    );

    // A cancel before the end: visible at once, with the reason stored ones get.
    let mut c = memory::create(s.session_id(), &new).unwrap();
    assert_ne!(c.id, r.id);
    assert!(matches!(
        memory::cancel(&mut c),
        CancelOutcome::Cancelled { .. }
    ));
    assert!(c.tx.cancelled && c.is_final());
    assert_eq!(c.tx.final_attempt_reason.as_deref(), Some(REASON_CANCELLED));
}

/// Many callers at once (on PostgreSQL spread over several writer connections): every
/// transaction's writes land in order, and `close` answers only after all of them.
async fn concurrent_writes(db: &Db) {
    let s = db.open("http://a").await;
    let runs = (0..64).map(|i| {
        let s = s.clone();
        async move {
            let mut new = new_tx(inline(&format!("body {i}")), true, false);
            new.start_attempt = true;
            let r = s.create(new).await.unwrap();
            let l = lease(&r);
            let v = s
                .write_attempt(r.id, r.version, l, &responses(250))
                .await
                .unwrap();
            let finish = Finish {
                responses: responses(250),
                final_attempt_reason: Some("delivered".into()),
                ..Default::default()
            };
            s.finish_attempt(r.id, v, l, finish).await.unwrap();
            r.id
        }
    });
    let ids = futures_util::future::join_all(runs).await;
    for id in ids {
        let r = s.load_id(id).await.unwrap().unwrap();
        assert_eq!(r.tx.final_attempt_reason.as_deref(), Some("delivered"));
        assert_eq!(r.tx.data_response.as_ref().map(|d| d.code), Some(250));
        assert!(r.lease.is_none());
    }
    // Writes queued before `close` are answered; later ones are refused.
    let pending = (0..16).map(|_| s.create(new_tx(NewBody::None, false, false)));
    let (done, ()) = tokio::join!(futures_util::future::join_all(pending), s.close());
    assert!(
        done.iter()
            .all(|r| r.is_ok() || matches!(r, Err(StorageError::Closed)))
    );
    assert!(matches!(
        s.create(new_tx(NewBody::None, false, false)).await,
        Err(StorageError::Closed)
    ));
}
