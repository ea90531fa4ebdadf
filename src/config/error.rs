//! Configuration errors and warnings.
//!
//! Every semantic error names the key path (`endpoint[2].chain[4].filter`)
//! and the reason, so an operator can find the offending line without a
//! debugger.

use std::fmt;
use std::path::PathBuf;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a wrong, missing or inconsistent value.
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    /// The text is not valid YAML (or not a YAML mapping at the top).
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: u64,
        column: u64,
        message: String,
    },
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    pub(crate) fn invalid(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The key path of an `Invalid` error (`None` for syntax and I/O errors).
    pub fn path(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// Something accepted but probably not intended (unknown or ignored key,
/// discouraged combination). Loading continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a sender name/tag does not resolve (see `RouterConfig::resolve_sender`).
/// Distinct variants let the REST layer answer 404 vs 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    /// No `sender` entry with this name (REST: 404).
    #[error("unknown sender \"{0}\"")]
    UnknownSender(String),
    /// The sender has a tag list that does not contain this tag (REST: 400).
    #[error("sender \"{sender}\" has no tag \"{tag}\"")]
    UnknownTag { sender: String, tag: String },
    /// A tag was requested but the sender defines no tags (REST: 400). The
    /// reference ignores the tag; callers that want that behaviour (e.g.
    /// dequeue of an old transaction) can retry with `tag = None`.
    #[error("sender \"{sender}\" does not accept tags (got \"{tag}\")")]
    TagsNotSupported { sender: String, tag: String },
    /// Neither the sender nor the tag names an output chain.
    #[error("sender \"{sender}\"{} has no output_chain", tag_suffix(tag))]
    NoOutputChain { sender: String, tag: Option<String> },
}

fn tag_suffix(tag: &Option<String>) -> String {
    match tag {
        Some(t) => format!(" tag \"{t}\""),
        None => String::new(),
    }
}
