//! Rough throughput check (not a benchmark harness): commits/s and creates/s with 1 and 50
//! concurrent callers. SQLite in a temp dir by default; set `KOUKAN_BENCH_POSTGRES` to a
//! server URL (`postgres://postgres@127.0.0.1:5432`) to run against a fresh database there.
//!
//! `cargo run --release -p koukan-db --example bench`

use std::time::{Duration, Instant};

use bytes::Bytes;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use koukan::rest_id::new_rest_id;
use koukan::{Mailbox, Transaction};
use koukan_db::*;

const RUN: Duration = Duration::from_secs(3);

fn new_tx() -> NewTransaction {
    NewTransaction {
        rest_id: new_rest_id(16),
        tx: Transaction {
            mail_from: Some(Mailbox::new("alice@example.com")),
            rcpt_to: vec![Mailbox::new("bob@example.com")],
            retry: true,
            ..Default::default()
        },
        body: NewBody::Inline(Bytes::from(vec![b'x'; 2048])),
        leased: true,
        start_attempt: false,
    }
}

async fn run(s: &Storage, callers: usize, create: bool) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let t = s.create(new_tx()).await.unwrap();
            let mut v = t.version;
            let mut n = 0u64;
            while start.elapsed() < RUN {
                if create {
                    s.create(new_tx()).await.unwrap();
                } else {
                    v = s.ping(t.id, v).await.unwrap();
                }
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, cleanup) = match std::env::var("KOUKAN_BENCH_POSTGRES") {
        Ok(server) => {
            let name = format!("koukan_bench_{}", std::process::id());
            let mut c = AsyncPgConnection::establish(&format!("{server}/postgres"))
                .await
                .unwrap();
            c.batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            (
                Backend::Postgres(format!("{server}/{name}")),
                Some((c, name)),
            )
        }
        Err(_) => (Backend::Sqlite(dir.path().join("bench.db")), None),
    };
    println!("backend: {backend:?}");
    let s = Storage::open(backend, "http://bench", StorageOptions::default())
        .await
        .unwrap();
    for callers in [1, 50] {
        let commits = run(&s, callers, false).await;
        let creates = run(&s, callers, true).await;
        println!("{callers:>3} callers: {commits:>8.0} commits/s (ping)  {creates:>8.0} creates/s");
    }
    s.close().await;
    drop(s);
    if let Some((mut c, name)) = cleanup {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = c
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await;
    }
}
