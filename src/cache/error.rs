//! Errors of the cache layer. `Clone` because one in-flight fetch answers many requests.

use crate::metadata::MetadataError;
use crate::storage::StorageError;
use crate::upstream::UpstreamError;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("blob {digest} is unknown to this repository")]
    BlobUnknown { digest: String },
    #[error("manifest {reference} is unknown to this repository")]
    ManifestUnknown { reference: String },
    #[error("repository {repo} is unknown")]
    NameUnknown { repo: String },
    #[error("repository {repo} is being deleted; it is served again once the deletion has finished")]
    RepositoryDeleting { repo: String },
    #[error("content does not match its digest: expected {expected}, got {actual}; nothing was stored")]
    DigestMismatch { expected: String, actual: String },
    #[error("upstream sent {received} bytes of {expected}; nothing was stored")]
    Truncated { expected: u64, received: u64 },
    #[error("upstream manifest is invalid: {0}")]
    ManifestInvalid(String),
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("metadata: {0}")]
    Metadata(Arc<MetadataError>),
    #[error("storage: {0}")]
    Storage(Arc<StorageError>),
    #[error("local I/O: {0}")]
    Io(Arc<std::io::Error>),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A computation shared by several requests panicked; the panic was logged with this
    /// id, which every waiter's 500 carries.
    #[error("internal error {error_id} (a panic)")]
    Panicked { error_id: String },
}

/// A fresh id for an error whose details go to the log only: the client's answer and
/// the log line both carry it. A ULID, so ids sort by time.
pub fn new_error_id() -> String {
    ulid::Ulid::new().to_string()
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

impl CacheError {
    /// Whether a stale copy may be served instead (the upstream could not answer).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Upstream(e) if e.is_unavailable())
    }
}

impl From<MetadataError> for CacheError {
    fn from(e: MetadataError) -> Self {
        match e {
            MetadataError::RepositoryBeingDeleted { repo } => Self::RepositoryDeleting { repo },
            other => Self::Metadata(Arc::new(other)),
        }
    }
}

impl From<StorageError> for CacheError {
    fn from(e: StorageError) -> Self {
        Self::Storage(Arc::new(e))
    }
}

impl From<std::io::Error> for CacheError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}
