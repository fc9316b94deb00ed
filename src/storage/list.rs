//! Listing stored blobs, and moving a corrupt one aside, for reconciliation.

use super::{BlobStore, StorageError};
use crate::oci::Digest;
use futures::{Stream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;

/// One object found under the blob prefix.
#[derive(Debug, Clone)]
pub struct StoredObject {
    /// `None` when the key is not a blob key (a stray object).
    pub digest: Option<Digest>,
    pub key: String,
    pub size: u64,
    pub modified_unix: i64,
}

impl BlobStore {
    fn blob_prefix(&self) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from("blobs")
        } else {
            ObjectPath::from(format!("{}/blobs", self.prefix.trim_end_matches('/')))
        }
    }

    /// Every object under the blob prefix.
    pub fn list_blobs(&self) -> impl Stream<Item = Result<StoredObject, StorageError>> + '_ {
        let prefix = self.blob_prefix();
        self.store.list(Some(&prefix)).map(|r| {
            let meta = r?;
            let key = meta.location.to_string();
            let digest = key
                .rsplit('/')
                .next()
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
                .filter(|d| self.key(d).as_ref() == key);
            Ok(StoredObject {
                digest,
                key,
                size: meta.size,
                modified_unix: meta.last_modified.timestamp(),
            })
        })
    }

    /// Moves a blob that failed verification to `quarantine/sha256/<hex>` for inspection.
    pub async fn quarantine(&self, digest: &Digest) -> Result<(), StorageError> {
        let to = if self.prefix.is_empty() {
            ObjectPath::from(format!("quarantine/sha256/{}", digest.hex()))
        } else {
            ObjectPath::from(format!(
                "{}/quarantine/sha256/{}",
                self.prefix.trim_end_matches('/'),
                digest.hex()
            ))
        };
        self.store.rename(&self.key(digest), &to).await?;
        Ok(())
    }

    /// Deletes a stray object that is not a blob key (no digest to queue it under).
    pub async fn delete_key(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
