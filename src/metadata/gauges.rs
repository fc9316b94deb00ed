//! The SQL behind `/metrics`, `/readyz` and the status page: what is stored, the deletion
//! queue, jobs by kind and state, the largest repositories, and a write that proves the
//! database takes writes. Each count is chosen to be served by an index or one scan of
//! one table; `metrics` caches the result for a few seconds.

use super::{Metadata, MetadataError};
use rusqlite::{Connection, OptionalExtension};

/// Counts read in one read transaction, so they agree with each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    pub repositories: u64,
    /// Blob rows and their bytes: what `regcache status` prints as blobs.
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Pending deletes not deferred (waiting or being deleted): `status`'s pending deletes.
    pub deletes_pending: u64,
    pub deletes_deferred: u64,
    /// Pending deletes whose last attempt failed.
    pub deletes_failing: u64,
    /// The oldest of those (the one `status` shows).
    pub oldest_failing: Option<OldestFailing>,
    pub open_uploads: u64,
    /// (kind, state, count), every combination present.
    pub jobs: Vec<(String, String, u64)>,
}

/// The failing delete queued first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldestFailing {
    pub digest: String,
    pub attempts: i64,
    pub last_error: String,
    /// When it was queued, Unix seconds.
    pub since: i64,
}

/// A repository and the bytes of the blobs linked to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LargestRepo {
    pub upstream: String,
    pub name: String,
    pub bytes: u64,
    pub blobs: u64,
}

fn count(c: &Connection, sql: &str) -> Result<u64, MetadataError> {
    Ok(u64::try_from(c.query_row(sql, [], |r| r.get::<_, i64>(0))?).unwrap_or(0))
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Metadata {
    /// Reads [`Gauges`]. At a million blobs the blob sum is the one full scan (about
    /// 0.1 s); every other count is an index range.
    pub async fn gauges(&self) -> Result<Gauges, MetadataError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let (blobs, blob_bytes) = tx.query_row(
                "SELECT count(*), coalesce(sum(size_bytes), 0) FROM blobs",
                [],
                |r| Ok((unsigned(r.get(0)?), unsigned(r.get(1)?))),
            )?;
            let (mut deletes_pending, mut deletes_deferred) = (0, 0);
            {
                let mut stmt = tx.prepare("SELECT state, count(*) FROM pending_deletes GROUP BY state")?;
                let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, unsigned(r.get(1)?))))?;
                for row in rows {
                    match row? {
                        (state, n) if state == "deferred" => deletes_deferred += n,
                        (_, n) => deletes_pending += n,
                    }
                }
            }
            let deletes_failing = count(
                &tx,
                "SELECT count(*) FROM pending_deletes WHERE last_error IS NOT NULL",
            )?;
            let oldest_failing = tx
                .query_row(
                    "SELECT digest, attempts, last_error, created_at FROM pending_deletes
                      WHERE last_error IS NOT NULL ORDER BY created_at LIMIT 1",
                    [],
                    |r| {
                        Ok(OldestFailing {
                            digest: r.get(0)?,
                            attempts: r.get(1)?,
                            last_error: r.get(2)?,
                            since: r.get(3)?,
                        })
                    },
                )
                .optional()?;
            let jobs = {
                let mut stmt = tx.prepare("SELECT kind, state, count(*) FROM jobs GROUP BY state, kind")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, unsigned(r.get(2)?))))?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            Ok(Gauges {
                repositories: count(&tx, "SELECT count(*) FROM repositories")?,
                blobs,
                blob_bytes,
                deletes_pending,
                deletes_deferred,
                deletes_failing,
                oldest_failing,
                open_uploads: count(
                    &tx,
                    "SELECT (SELECT count(*) FROM write_intents WHERE upload_id IS NOT NULL)
                          + (SELECT count(*) FROM stale_uploads)",
                )?,
                jobs,
            })
        })
        .await
    }

    /// The `limit` repositories with the most bytes of linked blobs. This joins every blob
    /// link to its blob: seconds at a million links, so callers cache it for minutes.
    pub async fn largest_repositories(&self, limit: u32) -> Result<Vec<LargestRepo>, MetadataError> {
        self.read(move |c| {
            let mut stmt = c.prepare(
                "SELECT r.upstream, r.name, s.bytes, s.blobs
                   FROM (SELECT rb.repo_id, sum(b.size_bytes) AS bytes, count(*) AS blobs
                           FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
                          GROUP BY rb.repo_id ORDER BY bytes DESC LIMIT ?1) s
                   JOIN repositories r ON r.id = s.repo_id
                  ORDER BY s.bytes DESC, r.upstream, r.name",
            )?;
            let rows = stmt.query_map([limit], |r| {
                Ok(LargestRepo {
                    upstream: r.get(0)?,
                    name: r.get(1)?,
                    bytes: unsigned(r.get(2)?),
                    blobs: unsigned(r.get(3)?),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Commits a one-row write: `Ok` proves the database takes writes now.
    pub async fn probe_write(&self, now: i64) -> Result<(), MetadataError> {
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO health_probe (id, checked_at) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                [now],
            )?;
            Ok(())
        })
        .await
    }
}
