//! `message_parser` (placeholder).
use std::collections::BTreeMap;
use std::rc::Rc;

use serde_json::Value;

use super::BlobSource;

/// A message parsed for a REST receiver.
#[derive(Clone)]
pub struct ParsedMessage {
    pub json: Value,
    pub blobs: BTreeMap<String, Rc<dyn BlobSource>>,
}

impl std::fmt::Debug for ParsedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParsedMessage({} blobs)", self.blobs.len())
    }
}
