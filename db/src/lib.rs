//! Koukan durable storage: the SQL schema and migrations for SQLite and PostgreSQL, and the
//! [`Storage`] API the router's actors use.
//!
//! Every write goes through one writer task that batches concurrent requests into a single
//! SQL transaction (group commit): each request runs in its own savepoint, the batch commits
//! once, and only then is each caller answered. Reads use a separate connection pool.

mod cached;
mod conn;
mod error;
pub mod memory;
mod ops;
mod schema;
mod storage;
mod types;
mod writer;

pub use error::StorageError;
pub use storage::Storage;
pub use types::*;
