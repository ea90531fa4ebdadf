//! The message body as an output chain sees it: stored blobs read on demand, with bytes
//! that filters prepend (trace headers, signatures) — never copied whole.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use serde_json::Value;
use thiserror::Error;

use super::LocalFuture;

#[derive(Clone, Debug, Error)]
#[error("body: {0}")]
pub struct BodyError(pub String);

/// The bytes of a stored blob.
pub trait BlobSource {
    /// Bytes available now.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All bytes are there (`len` is final).
    fn finalized(&self) -> bool;
    /// Up to `max` bytes from `offset`; empty at the end.
    fn read(&self, offset: u64, max: usize) -> LocalFuture<'_, Result<Bytes, BodyError>>;
}

/// A piece of a raw message.
#[derive(Clone)]
pub enum Segment {
    Bytes(Bytes),
    Blob(Rc<dyn BlobSource>),
}

impl Segment {
    fn len(&self) -> u64 {
        match self {
            Segment::Bytes(b) => b.len() as u64,
            Segment::Blob(b) => b.len(),
        }
    }
}

/// A message body.
#[derive(Clone)]
pub enum MessageBody {
    /// An RFC 822 message: its segments concatenated.
    Raw(Vec<Segment>),
    /// A message-builder spec and its blobs by id (rendered to MIME by `message_builder`).
    Builder {
        spec: Value,
        blobs: BTreeMap<String, Rc<dyn BlobSource>>,
    },
}

impl std::fmt::Debug for MessageBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessageBody::Raw(s) => write!(
                f,
                "Raw({} segments, {} bytes)",
                s.len(),
                self.len().unwrap_or(0)
            ),
            MessageBody::Builder { blobs, .. } => write!(f, "Builder({} blobs)", blobs.len()),
        }
    }
}

impl MessageBody {
    pub fn blob(source: Rc<dyn BlobSource>) -> Self {
        MessageBody::Raw(vec![Segment::Blob(source)])
    }

    pub fn bytes(b: impl Into<Bytes>) -> Self {
        MessageBody::Raw(vec![Segment::Bytes(b.into())])
    }

    /// Every byte is known.
    pub fn finalized(&self) -> bool {
        match self {
            MessageBody::Raw(segs) => segs.iter().all(|s| match s {
                Segment::Bytes(_) => true,
                Segment::Blob(b) => b.finalized(),
            }),
            MessageBody::Builder { blobs, .. } => blobs.values().all(|b| b.finalized()),
        }
    }

    /// Bytes available now (raw bodies only).
    pub fn len(&self) -> Option<u64> {
        match self {
            MessageBody::Raw(segs) => Some(segs.iter().map(Segment::len).sum()),
            MessageBody::Builder { .. } => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// The same body with `header` in front (a raw body; a builder body is returned as is).
    pub fn prepend(&self, header: Bytes) -> MessageBody {
        match self {
            MessageBody::Raw(segs) => {
                let mut v = Vec::with_capacity(segs.len() + 1);
                v.push(Segment::Bytes(header));
                v.extend(segs.iter().cloned());
                MessageBody::Raw(v)
            }
            other => other.clone(),
        }
    }

    /// Reads the raw body in chunks of at most `max` bytes.
    pub fn reader(&self, max: usize) -> BodyReader {
        let segments = match self {
            MessageBody::Raw(s) => s.clone(),
            MessageBody::Builder { .. } => Vec::new(),
        };
        BodyReader {
            segments,
            index: 0,
            offset: 0,
            max: max.max(1),
        }
    }

    /// The whole raw body, refused beyond `limit` bytes (for parsers that need it all).
    pub async fn read_all(&self, limit: u64) -> Result<Vec<u8>, BodyError> {
        let len = self
            .len()
            .ok_or_else(|| BodyError("not a raw body".into()))?;
        if len > limit {
            return Err(BodyError(format!(
                "{len} bytes exceed the limit of {limit}"
            )));
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut r = self.reader(1 << 20);
        while let Some(chunk) = r.next().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

/// Sequential reader over a raw body's segments.
pub struct BodyReader {
    segments: Vec<Segment>,
    index: usize,
    offset: u64,
    max: usize,
}

impl BodyReader {
    /// The next chunk, or `None` at the end of the bytes available now.
    pub async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        while let Some(seg) = self.segments.get(self.index) {
            let chunk = match seg {
                Segment::Bytes(b) => {
                    let start = self.offset as usize;
                    let end = (start + self.max).min(b.len());
                    b.slice(start..end)
                }
                Segment::Blob(blob) => blob.read(self.offset, self.max).await?,
            };
            if chunk.is_empty() {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            self.offset += chunk.len() as u64;
            return Ok(Some(chunk));
        }
        Ok(None)
    }
}

/// A blob held in memory (generated messages, tests).
pub struct MemoryBlob(pub Bytes);

impl BlobSource for MemoryBlob {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn finalized(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, max: usize) -> LocalFuture<'_, Result<Bytes, BodyError>> {
        let start = (offset as usize).min(self.0.len());
        let end = (start + max).min(self.0.len());
        let b = self.0.slice(start..end);
        Box::pin(async move { Ok(b) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_concatenate() {
        let body = MessageBody::blob(Rc::new(MemoryBlob(Bytes::from_static(
            b"Subject: x\r\n\r\nhello\r\n",
        ))))
        .prepend(Bytes::from_static(b"Received: by test\r\n"));
        assert_eq!(body.len(), Some(40));
        assert!(body.finalized());
        let all = futures_util::FutureExt::now_or_never(body.read_all(1000))
            .unwrap()
            .unwrap();
        assert_eq!(all, b"Received: by test\r\nSubject: x\r\n\r\nhello\r\n");
        let mut r = body.reader(7);
        let mut n = 0;
        while let Some(c) = futures_util::FutureExt::now_or_never(r.next())
            .unwrap()
            .unwrap()
        {
            assert!(c.len() <= 7);
            n += c.len();
        }
        assert_eq!(n, 40);
        assert!(
            futures_util::FutureExt::now_or_never(body.read_all(10))
                .unwrap()
                .is_err()
        );
    }
}
