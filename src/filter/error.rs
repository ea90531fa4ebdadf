//! Errors of building a filter from its configuration (config time, before any transaction).

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FilterBuildError {
    /// A key the filter needs is absent or unusable.
    #[error("{filter}: {message}")]
    Config {
        filter: &'static str,
        message: String,
    },
    /// A file named by the configuration cannot be read or parsed (DKIM key).
    #[error("{filter}: {}: {message}", path.display())]
    File {
        filter: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The DNS resolver could not be set up.
    #[error("{filter}: resolver: {message}")]
    Resolver {
        filter: &'static str,
        message: String,
    },
}

impl FilterBuildError {
    pub(crate) fn config(filter: &'static str, message: impl Into<String>) -> Self {
        FilterBuildError::Config {
            filter,
            message: message.into(),
        }
    }
}
