//! The queries reconciliation needs: which listed objects the metadata accounts for, and
//! the blob rows, page by page.

use super::{Metadata, MetadataError};
use std::collections::HashSet;

impl Metadata {
    /// Those of `digests` that a blob row, a pending delete or a live write intent
    /// accounts for.
    pub async fn accounted_digests(
        &self,
        digests: Vec<String>,
        now: i64,
    ) -> Result<HashSet<String>, MetadataError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM blobs WHERE digest = ?1)
                     OR EXISTS (SELECT 1 FROM pending_deletes WHERE digest = ?1)
                     OR EXISTS (SELECT 1 FROM write_intents WHERE digest = ?1 AND expires_at > ?2)",
            )?;
            let mut known = HashSet::new();
            for d in digests {
                if stmt.query_row(rusqlite::params![d, now], |r| r.get::<_, bool>(0))? {
                    known.insert(d);
                }
            }
            Ok(known)
        })
        .await
    }

    /// Blob rows ordered by digest, after `after`, at most `limit`: (digest, size). Rows
    /// whose delete is in flight are left out: their object is going away on purpose.
    pub async fn blob_rows_after(
        &self,
        after: String,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, MetadataError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT digest, size_bytes FROM blobs b WHERE digest > ?1
                    AND NOT EXISTS (SELECT 1 FROM pending_deletes p WHERE p.digest = b.digest AND p.state = 'deleting')
                  ORDER BY digest LIMIT ?2",
            )?;
            let rows = stmt.query_map(rusqlite::params![after, limit], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                ))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}
