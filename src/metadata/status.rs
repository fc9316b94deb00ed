//! What `regcache status` prints: counts and bytes of everything cached, the deletion
//! queue, the oldest failing delete, open multipart uploads and the applied settings.

use super::settings::AppliedSettings;
use super::{Metadata, MetadataError};
use rusqlite::OptionalExtension;
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct CountBytes {
    pub count: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailingDelete {
    pub digest: String,
    pub attempts: i64,
    pub last_error: String,
    pub next_attempt_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub repositories: u64,
    pub tags: u64,
    pub manifests: CountBytes,
    pub blobs: CountBytes,
    pub pending_deletes: CountBytes,
    pub deferred_deletes: CountBytes,
    /// Tags and links kept past their expiry because deletes are off.
    pub deferred_entries: u64,
    pub oldest_failing_delete: Option<FailingDelete>,
    /// Multipart uploads on record: in flight, or left open by a failed write or a crash
    /// until reconciliation has aborted them.
    pub open_uploads: u64,
    /// Pins on record, and how many of them name nothing cached yet.
    pub pins: u64,
    pub pins_not_cached: u64,
    /// Rows pinned (exempt from expiry, eviction and cleanup), and the distinct blobs
    /// pinned links hold.
    pub pinned_tags: u64,
    pub pinned_manifests: u64,
    pub pinned_blobs: CountBytes,
    pub ttls: Vec<(String, i64)>,
    pub delete_enabled: bool,
}

fn count_bytes(c: &rusqlite::Connection, sql: &str) -> Result<CountBytes, MetadataError> {
    Ok(c.query_row(sql, [], |r| {
        Ok(CountBytes {
            count: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
            bytes: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
        })
    })?)
}

fn count(c: &rusqlite::Connection, sql: &str) -> Result<u64, MetadataError> {
    Ok(u64::try_from(c.query_row(sql, [], |r| r.get::<_, i64>(0))?).unwrap_or(0))
}

impl Metadata {
    pub async fn status(&self) -> Result<Status, MetadataError> {
        let AppliedSettings { ttls, delete_enabled } = self.applied_settings().await?;
        self.read(move |c| {
            Ok(Status {
                repositories: count(c, "SELECT count(*) FROM repositories")?,
                tags: count(c, "SELECT count(*) FROM tags")?,
                manifests: count_bytes(c, "SELECT count(*), coalesce(sum(size_bytes), 0) FROM manifests")?,
                blobs: count_bytes(c, "SELECT count(*), coalesce(sum(size_bytes), 0) FROM blobs")?,
                pending_deletes: count_bytes(
                    c,
                    "SELECT count(*), coalesce(sum(size_bytes), 0) FROM pending_deletes WHERE state != 'deferred'",
                )?,
                deferred_deletes: count_bytes(
                    c,
                    "SELECT count(*), coalesce(sum(size_bytes), 0) FROM pending_deletes WHERE state = 'deferred'",
                )?,
                deferred_entries: count(
                    c,
                    "SELECT (SELECT count(*) FROM tags WHERE deferred = 1)
                          + (SELECT count(*) FROM repo_manifests WHERE deferred = 1)
                          + (SELECT count(*) FROM repo_blobs WHERE deferred = 1)",
                )?,
                oldest_failing_delete: c
                    .query_row(
                        "SELECT digest, attempts, last_error, next_attempt_at FROM pending_deletes
                          WHERE last_error IS NOT NULL ORDER BY created_at LIMIT 1",
                        [],
                        |r| {
                            Ok(FailingDelete {
                                digest: r.get(0)?,
                                attempts: r.get(1)?,
                                last_error: r.get(2)?,
                                next_attempt_at: r.get(3)?,
                            })
                        },
                    )
                    .optional()?,
                open_uploads: count(
                    c,
                    "SELECT (SELECT count(*) FROM write_intents WHERE upload_id IS NOT NULL)
                          + (SELECT count(*) FROM stale_uploads)",
                )?,
                pins: count(c, "SELECT count(*) FROM pins")?,
                pins_not_cached: count(
                    c,
                    "SELECT count(*) FROM pins p
                      WHERE NOT EXISTS (SELECT 1 FROM repositories r JOIN tags t ON t.repo_id = r.id
                                         WHERE r.upstream = p.upstream AND r.name = p.repo AND t.name = p.reference)
                        AND NOT EXISTS (SELECT 1 FROM repositories r JOIN repo_manifests rm ON rm.repo_id = r.id
                                         WHERE r.upstream = p.upstream AND r.name = p.repo AND rm.digest = p.reference)",
                )?,
                pinned_tags: count(c, "SELECT count(*) FROM tags WHERE pinned = 1")?,
                pinned_manifests: count(c, "SELECT count(*) FROM repo_manifests WHERE pinned = 1")?,
                // The partial index lists the few pinned links; the blobs are looked up by key.
                pinned_blobs: count_bytes(
                    c,
                    "SELECT count(*), coalesce(sum(size_bytes), 0) FROM blobs
                      WHERE digest IN (SELECT digest FROM repo_blobs WHERE pinned = 1)",
                )?,
                ttls,
                delete_enabled,
            })
        })
        .await
    }
}
