//! Bundles: the cache carried across an air gap as an OCI image layout in a tar (or
//! `.tar.zst`). `export` streams cached images straight from the store into the archive;
//! `import` streams an archive (ours, skopeo's `oci-archive`, or a layout directory) once,
//! verifying every blob as it is written (I1, I11) and linking each image only once every
//! blob it needs is in (one transaction per image). Sits beside `cache`: calls `metadata`,
//! `storage` and `upstream` routing, never HTTP.

mod abandon;
mod digest_list;
mod export;
mod import;
mod intake;
mod layout;
mod link;
mod plan;
mod source;
mod tar_guard;

pub use abandon::abandon_stale_imports;
pub use digest_list::digest_list_path;
pub use export::{export, ExportOptions, ExportReport};
pub use import::{import, ImportOptions, ImportReport};
pub use plan::ExportSelection;

use crate::metadata::MetadataError;
use crate::storage::StorageError;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Errors of bundle export and import. Each names the file, entry, image or blob and what
/// was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// An entry of the bundle is unusable: corrupt, truncated, badly named.
    #[error("bundle {bundle}: entry {entry}: {message}")]
    Entry {
        bundle: String,
        entry: String,
        message: String,
    },
    /// The bundle as a whole is unusable (no index.json, not a tar, …).
    #[error("bundle {bundle}: {message}")]
    Bundle { bundle: String, message: String },
    /// What was asked for cannot be done (an image list entry, a `--since` file, an
    /// upstream name); nothing was written.
    #[error("{0}")]
    Request(String),
    /// Images of the bundle cannot be imported whole; none was linked.
    #[error("{} image(s) cannot be imported whole, so none was linked:\n  {}", .0.len(), .0.join("\n  "))]
    Incomplete(Vec<String>),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("bundle task failed: {0}")]
    Task(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What export and import report as they go: one JSON line each with `--json`, a line
/// or a progress bar on a terminal.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Export: what the bundle will carry.
    Planned {
        images: usize,
        blobs: usize,
        bytes: u64,
        /// Blobs left out because the earlier bundle (`--since`) carried them.
        left_out: usize,
    },
    /// Something was skipped or is odd, and the run goes on.
    Warning { message: String },
    /// A blob or manifest written (export), committed, reused or kept (import).
    Blob {
        digest: String,
        size_bytes: u64,
        action: BlobAction,
    },
    /// Import: an image linked and now served.
    Image { name: String, digest: String },
}

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobAction {
    /// Export: put into the bundle.
    Written,
    /// Import: verified and committed to the store.
    Committed,
    /// Import: already stored (an earlier run, or the cache had it); not written again.
    Reused,
    /// Import: a manifest, verified and kept until its image is linked.
    Manifest,
}

/// Receives events and progress. The CLI draws a bar and prints JSON lines; tests record.
pub trait Progress: Send + Sync {
    /// The number of bytes the run will go through, when known.
    fn start(&self, _total_bytes: Option<u64>) {}
    /// `n` more bytes read (import) or written (export).
    fn advance(&self, _n: u64) {}
    fn event(&self, _e: &Event) {}
}

impl Progress for () {}

/// Where imports keep their work files (manifests until they are linked, the blob being
/// written): `data_dir/imports/<import id>/`. Not `data_dir/tmp`, which a starting server
/// empties and reconciliation sweeps while an import may be running beside it.
pub fn imports_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("imports")
}
