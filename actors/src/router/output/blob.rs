//! Stored blobs as chain bodies: read from storage chunk by chunk, on demand.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use koukan::filter::{BlobSource, BodyError, LocalFuture, MessageBody};
use koukan::rest::BODY_BLOB;
use koukan::transaction::Body;
use koukan_db::{BlobInfo, Storage, TxRecord};

pub struct StoredBlob {
    storage: Storage,
    info: BlobInfo,
}

impl StoredBlob {
    pub fn new(storage: Storage, info: BlobInfo) -> Self {
        StoredBlob { storage, info }
    }
}

impl BlobSource for StoredBlob {
    fn len(&self) -> u64 {
        self.info.length
    }

    fn finalized(&self) -> bool {
        self.info.finalized()
    }

    fn read(&self, offset: u64, max: usize) -> LocalFuture<'_, Result<Bytes, BodyError>> {
        let max = max.min((self.info.length.saturating_sub(offset)) as usize);
        Box::pin(async move {
            if max == 0 {
                return Ok(Bytes::new());
            }
            self.storage
                .read_blob(self.info.blob_id, offset, max)
                .await
                .map_err(|e| BodyError(e.to_string()))
        })
    }
}

/// The body of a stored transaction, if it has one.
pub fn body_of(storage: &Storage, record: &TxRecord) -> Option<MessageBody> {
    match record.tx.body.as_ref()? {
        Body::Message(_) => {
            let info = record.blob(BODY_BLOB)?.clone();
            Some(MessageBody::blob(Rc::new(StoredBlob::new(
                storage.clone(),
                info,
            ))))
        }
        Body::MessageBuilder { spec, blobs } => {
            let mut map: BTreeMap<String, Rc<dyn BlobSource>> = BTreeMap::new();
            for (name, _) in blobs {
                let info = record.blob(name)?.clone();
                map.insert(
                    name.clone(),
                    Rc::new(StoredBlob::new(storage.clone(), info)),
                );
            }
            Some(MessageBody::Builder {
                spec: spec.clone(),
                blobs: map,
            })
        }
    }
}
