//! Connections for both backends, and the `run!` macro that expands one diesel-DSL body for
//! each of them so queries are written once.

use diesel::result::{ConnectionError, Error as DieselError};
use diesel::sqlite::SqliteConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::{SpawnBlocking, SyncConnectionWrapper};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::StorageError;
use crate::types::Backend;

/// SQLite connections run each statement inline on the calling thread instead of through
/// `spawn_blocking`: the writer owns a dedicated thread, and readers run on the storage
/// runtime's own workers, so blocking there stalls nobody else — and a thread hand-off per
/// statement would cost more than most statements.
pub(crate) type SqliteConn = SyncConnectionWrapper<SqliteConnection, Inline>;

/// A [`SpawnBlocking`] that runs the task immediately.
pub(crate) struct Inline;

impl SpawnBlocking for Inline {
    fn spawn_blocking<'a, R>(
        &mut self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> BoxFuture<'a, Result<R, Box<dyn std::error::Error + Send + Sync + 'static>>>
    where
        R: Send + 'static,
    {
        futures_util::future::ready(Ok(task())).boxed()
    }

    fn get_runtime() -> Self {
        Inline
    }
}

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Per-connection SQLite settings. `synchronous=FULL`: a commit is durable before it is
/// acknowledged; the busy timeout lets several writers (other handles or processes) queue.
const SQLITE_PRAGMAS: &str =
    "PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;";

/// A borrowed connection of either backend.
pub(crate) enum Conn<'a> {
    Sqlite(&'a mut SqliteConn),
    Pg(&'a mut AsyncPgConnection),
}

/// An owned connection of either backend (the writer's; only one exists, so its size
/// does not matter).
#[allow(clippy::large_enum_variant)]
pub(crate) enum OwnedConn {
    Sqlite(SqliteConn),
    Pg(AsyncPgConnection),
}

impl OwnedConn {
    pub(crate) fn borrow(&mut self) -> Conn<'_> {
        match self {
            OwnedConn::Sqlite(c) => Conn::Sqlite(c),
            OwnedConn::Pg(c) => Conn::Pg(c),
        }
    }
}

/// `run!(conn, |c| body)`: evaluates `body` with `c` bound to the concrete connection of
/// whichever backend `conn` (a `&mut Conn`) holds. The body must have the same type for both.
macro_rules! run {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::conn::Conn::Sqlite(inner) => {
                let $c: &mut $crate::conn::SqliteConn = &mut **inner;
                $body
            }
            $crate::conn::Conn::Pg(inner) => {
                let $c: &mut ::diesel_async::AsyncPgConnection = &mut **inner;
                $body
            }
        }
    };
}
pub(crate) use run;

impl From<DieselError> for StorageError {
    fn from(e: DieselError) -> Self {
        StorageError::Database(e.to_string())
    }
}

impl From<ConnectionError> for StorageError {
    fn from(e: ConnectionError) -> Self {
        StorageError::Database(format!("connect: {e}"))
    }
}

/// Applies pending migrations. Runs on a blocking thread of the storage runtime because the
/// migration harness is synchronous (and diesel-async's own harness would `block_in_place`,
/// which panics under actix).
pub(crate) async fn migrate(backend: &Backend) -> Result<(), StorageError> {
    let backend = backend.clone();
    tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
        let mig =
            |e: Box<dyn std::error::Error + Send + Sync>| StorageError::Migration(e.to_string());
        match backend {
            Backend::Sqlite(path) => {
                let mut c: SqliteConnection = diesel::Connection::establish(&sqlite_url(&path))?;
                // WAL is a property of the file: set once, before any pooled connection.
                diesel::connection::SimpleConnection::batch_execute(
                    &mut c,
                    &format!("PRAGMA journal_mode = WAL; {SQLITE_PRAGMAS}"),
                )?;
                c.run_pending_migrations(SQLITE_MIGRATIONS).map_err(mig)?;
            }
            Backend::Postgres(url) => {
                let mut c: AsyncConnectionWrapper<AsyncPgConnection> =
                    diesel::Connection::establish(&url)?;
                c.run_pending_migrations(PG_MIGRATIONS).map_err(mig)?;
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| StorageError::Migration(format!("migration task: {e}")))?
}

pub(crate) fn sqlite_url(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

pub(crate) async fn establish_sqlite(url: &str) -> Result<SqliteConn, ConnectionError> {
    let mut c = SqliteConn::establish(url).await?;
    c.batch_execute(SQLITE_PRAGMAS)
        .await
        .map_err(ConnectionError::CouldntSetupConfiguration)?;
    Ok(c)
}

pub(crate) async fn establish(backend: &Backend) -> Result<OwnedConn, StorageError> {
    Ok(match backend {
        Backend::Sqlite(path) => OwnedConn::Sqlite(establish_sqlite(&sqlite_url(path)).await?),
        Backend::Postgres(url) => OwnedConn::Pg(AsyncPgConnection::establish(url).await?),
    })
}

type SqliteManager = AsyncDieselConnectionManager<SqliteConn>;
type PgManager = AsyncDieselConnectionManager<AsyncPgConnection>;

/// The read pool.
pub(crate) enum Pool {
    Sqlite(bb8::Pool<SqliteManager>),
    Pg(bb8::Pool<PgManager>),
}

/// A connection checked out of the read pool.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Pooled {
    Sqlite(bb8::PooledConnection<'static, SqliteManager>),
    Pg(bb8::PooledConnection<'static, PgManager>),
}

impl Pooled {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Pooled::Sqlite(c) => Conn::Sqlite(c),
            Pooled::Pg(c) => Conn::Pg(c),
        }
    }
}

fn pool_err<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Pool(e.to_string())
}

impl Pool {
    pub(crate) async fn new(backend: &Backend, size: u32) -> Result<Pool, StorageError> {
        let size = size.max(1);
        Ok(match backend {
            Backend::Sqlite(path) => {
                let mut cfg = ManagerConfig::<SqliteConn>::default();
                // Fast: a broken local file connection surfaces on first use anyway.
                cfg.recycling_method = RecyclingMethod::Fast;
                cfg.custom_setup = Box::new(|url| {
                    let url = url.to_string();
                    async move { establish_sqlite(&url).await }.boxed()
                });
                let mgr = SqliteManager::new_with_config(sqlite_url(path), cfg);
                Pool::Sqlite(
                    bb8::Pool::builder()
                        .max_size(size)
                        .build(mgr)
                        .await
                        .map_err(pool_err)?,
                )
            }
            Backend::Postgres(url) => {
                let mut cfg = ManagerConfig::<AsyncPgConnection>::default();
                cfg.recycling_method = RecyclingMethod::Fast;
                let mgr = PgManager::new_with_config(url.clone(), cfg);
                Pool::Pg(
                    bb8::Pool::builder()
                        .max_size(size)
                        .build(mgr)
                        .await
                        .map_err(pool_err)?,
                )
            }
        })
    }

    pub(crate) async fn get(&self) -> Result<Pooled, StorageError> {
        Ok(match self {
            Pool::Sqlite(p) => Pooled::Sqlite(p.get_owned().await.map_err(pool_err)?),
            Pool::Pg(p) => Pooled::Pg(p.get_owned().await.map_err(pool_err)?),
        })
    }
}
