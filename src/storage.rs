//! Blob storage over `object_store` (filesystem, S3, GCS, memory) under content-addressed
//! keys `blobs/sha256/<2 hex>/<64 hex>`. Knows nothing of repositories or SQLite; callers
//! commit rows only after [`BlobStore::put_file`] returned (I2's write order).

mod backends;
mod delete;
mod disk;
mod list;
mod owner;
mod read;
mod write;

pub use backends::build;
pub use disk::{is_out_of_space, read_record, space, DataDisk, DiskRecord, Space};
pub use list::StoredObject;
pub use owner::{PrefixOwner, OWNER_MARKER};
pub use read::BlobBody;
pub use write::OpenUpload;

use crate::oci::Digest;
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use std::path::PathBuf;
use std::sync::Arc;

/// Errors of the storage layer. Only `NotFound` is branched on by callers.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} not found in storage")]
    NotFound { key: String },
    #[error("storage backend: {0}")]
    Backend(#[from] object_store::Error),
    #[error("storage I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("storage configuration: {0}")]
    Config(String),
}

/// Where blobs live.
#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket (empty for the filesystem).
    prefix: String,
    /// For the filesystem backend, the directory keys are relative to: lets reads stream
    /// the file directly and commits rename instead of copying.
    local_root: Option<PathBuf>,
    fsync: bool,
    description: String,
    /// The same store's multipart API (S3, GCS): large blobs are uploaded in parts under
    /// an upload id the caller records first, so a crash cannot leave one open unseen.
    multipart: Option<Multipart>,
    /// Other regcache instances could use the same bucket prefix (S3, GCS): it carries an
    /// owner marker (`owner.rs`).
    shared: bool,
}

#[derive(Clone)]
struct Multipart(Arc<dyn MultipartStore>);

impl std::fmt::Debug for Multipart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MultipartStore")
    }
}

impl BlobStore {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: String,
        local_root: Option<PathBuf>,
        fsync: bool,
    ) -> Self {
        let description = match &local_root {
            Some(root) => format!("filesystem:{}", root.display()),
            None => format!("{store}"),
        };
        Self {
            store,
            prefix,
            local_root,
            fsync,
            description,
            multipart: None,
            shared: false,
        }
    }

    /// Uploads blobs larger than a part through `multipart`, which must be the same store
    /// as the one given to `new`. Without it every blob is written with one put.
    pub fn with_multipart(mut self, multipart: Arc<dyn MultipartStore>) -> Self {
        self.multipart = Some(Multipart(multipart));
        self
    }

    /// What backs this store, for logs and `check-config`.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// The object key of a blob.
    pub fn key(&self, digest: &Digest) -> ObjectPath {
        let hex = digest.hex();
        let rel = format!("blobs/sha256/{}/{}", &hex[..2], hex);
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix.trim_end_matches('/')))
        }
    }

    /// The file holding a blob, on the filesystem backend (`None` elsewhere), for readers
    /// that copy it whole without going through this process (bundle export).
    pub fn local_blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        self.local_path(&self.key(digest))
    }

    fn local_path(&self, key: &ObjectPath) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(key.as_ref()))
    }

    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

fn not_found_or(key: &ObjectPath, e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound { key: key.to_string() },
        other => StorageError::Backend(other),
    }
}
