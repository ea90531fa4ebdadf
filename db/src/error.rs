use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    /// The row's version (or lease) is not what the caller expected: reload and retry.
    #[error("version conflict")]
    Conflict,
    #[error("transaction not found")]
    NotFound,
    /// A create used a rest id that exists already.
    #[error("duplicate rest id")]
    Duplicate,
    /// A `reuse_uri` names no blob, or one that is not finalized.
    #[error("invalid blob reuse: {0}")]
    BadReuse(String),
    /// The caller asked for something the transaction's state forbids.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("connection pool: {0}")]
    Pool(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The writer task is gone (shutdown).
    #[error("storage is shut down")]
    Closed,
}
