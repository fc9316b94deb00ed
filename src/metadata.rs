//! Metadata in SQLite: the only place SQL is written. One writer connection behind a
//! mutex, a few reader connections, WAL, foreign keys on; every call runs on the blocking
//! pool so the async runtime never waits on SQLite. Never touches blob bytes or the network.

mod admin;
mod blobs;
mod cleanup;
mod deletes;
mod eviction;
mod expiry;
mod exports;
mod gauges;
mod imports;
mod instance;
mod jobs;
mod manifests;
mod migrations;
mod pins;
mod pool;
mod prefetch;
mod purge;
mod reconcile;
mod referrers;
mod repos;
mod settings;
mod stats;
mod status;
mod tags;
mod uploads;

pub use admin::{RepoDetail, RepoSummary, TagSummary};
pub use blobs::BlobAccess;
pub use cleanup::{TagDeletion, TagInfo};
pub use deletes::{Backoff, ClaimedDelete};
pub use expiry::ExpiryReport;
pub use exports::ManifestNode;
pub use gauges::{Gauges, LargestRepo, OldestFailing};
pub use imports::{AbandonedImports, Held, ImportedImage, LinkRefused};
pub use jobs::{CancelOutcome, Job, JobBackoff, RunOutcome, SweepReport};
pub use manifests::{ManifestRecord, NewManifest};
pub use pins::{PinInfo, PinOutcome, PinnedRows, UnpinOutcome};
pub use pool::Metadata;
pub use purge::{HandedBlobs, RepoDeleteStep, Unlinked};
pub use referrers::{ReferrersRecord, REFERRERS_PER_REPO_MAX};
pub use repos::{RepoKey, Use};
pub use settings::{AppliedSettings, SettingsChange};
pub use stats::{ExpiredKind, MetadataStats, RemovalReason};
pub use status::{CountBytes, FailingDelete, Status};
pub use tags::TagRecord;
pub use uploads::{StaleUpload, UploadRecord};

/// Errors of the metadata layer.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database schema version {found} is newer than this build knows ({known}); refusing to start")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("database migration refused: {0}")]
    Migration(String),
    #[error("metadata task failed: {0}")]
    Task(String),
    #[error("repository {repo} is being deleted")]
    RepositoryBeingDeleted { repo: String },
}

impl MetadataError {
    /// Whether SQLite could not write for lack of disk space (SQLITE_FULL).
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DiskFull
        )
    }
}

/// Why deletes wait when `storage.delete.enabled` is false, as recorded on deferred rows.
pub const DELETES_DISABLED_REASON: &str = "storage.delete.enabled=false";

/// `query_row` through the connection's statement cache: the hot lookups run thousands of
/// times a second and need not be parsed again each time.
pub(crate) fn row<T, P: rusqlite::Params>(
    c: &rusqlite::Connection,
    sql: &str,
    params: P,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(params, f)
}

/// Current Unix time in seconds.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
