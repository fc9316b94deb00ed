//! Choosing what to evict when storage is over its bound: least recently used blobs
//! first, together with the tags and manifests that need them.

use super::expiry::{enqueue_unreferenced, remove_manifest_if_unlinked};
use super::{Metadata, MetadataError};
use std::collections::HashSet;

/// Candidates examined per pass; a pass frees what it can and the next continues.
const CANDIDATES: u32 = 1000;

impl Metadata {
    /// Bytes of blobs stored and not already queued for deletion.
    pub async fn stored_bytes(&self) -> Result<u64, MetadataError> {
        self.read(|c| {
            let n: i64 = c.query_row(
                "SELECT coalesce(sum(size_bytes), 0) FROM blobs b
                  WHERE NOT EXISTS (SELECT 1 FROM pending_deletes p WHERE p.digest = b.digest)",
                [],
                |r| r.get(0),
            )?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    /// Unlinks least recently used blobs (skipping `active` and blobs a bundle import
    /// holds until it links its images), and every tag and manifest
    /// naming them, until `need_bytes` are queued for deletion; one transaction.
    /// Returns (blobs queued, bytes queued).
    pub async fn evict_lru(
        &self,
        need_bytes: u64,
        active: Vec<String>,
        now: i64,
    ) -> Result<(u64, u64), MetadataError> {
        self.write(move |tx| {
            let active: HashSet<String> = active.into_iter().collect();
            let candidates: Vec<(String, i64)> = {
                let mut stmt = tx.prepare(
                    "SELECT digest, size_bytes FROM blobs b
                      WHERE NOT EXISTS (SELECT 1 FROM pending_deletes p WHERE p.digest = b.digest)
                        AND NOT EXISTS (SELECT 1 FROM import_blobs i WHERE i.digest = b.digest)
                        -- Pinned images are exempt: neither a blob a pinned link holds nor
                        -- one a pinned manifest names (evicting it would unlink that manifest).
                        AND NOT EXISTS (SELECT 1 FROM repo_blobs rb INDEXED BY repo_blobs_pinned
                                         WHERE rb.digest = b.digest AND rb.pinned = 1)
                        AND NOT EXISTS (SELECT 1 FROM manifest_refs mr
                                          JOIN repo_manifests rm ON rm.digest = mr.manifest_digest AND rm.pinned = 1
                                         WHERE mr.ref_digest = b.digest AND mr.kind = 'blob')
                      ORDER BY last_used_at LIMIT ?1",
                )?;
                let rows = stmt.query_map([CANDIDATES], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let (mut queued, mut freed) = (0u64, 0u64);
            for (digest, size) in candidates {
                if freed >= need_bytes {
                    break;
                }
                if active.contains(&digest) {
                    continue;
                }
                let manifests: Vec<String> = {
                    let mut stmt = tx.prepare_cached(
                        "SELECT manifest_digest FROM manifest_refs WHERE ref_digest = ?1 AND kind = 'blob'",
                    )?;
                    let rows = stmt.query_map([&digest], |r| r.get(0))?;
                    rows.collect::<Result<_, _>>()?
                };
                for m in &manifests {
                    tx.execute("DELETE FROM tags WHERE digest = ?1", [m])?;
                    tx.execute("DELETE FROM repo_manifests WHERE digest = ?1", [m])?;
                    remove_manifest_if_unlinked(tx, m)?;
                }
                tx.execute("DELETE FROM repo_blobs WHERE digest = ?1", [&digest])?;
                if enqueue_unreferenced(tx, std::slice::from_ref(&digest), now, "evicted", None)? > 0 {
                    queued += 1;
                    freed += u64::try_from(size).unwrap_or(0);
                }
            }
            Ok((queued, freed))
        })
        .await
        .inspect(|(blobs, bytes)| self.stats().evicted(*blobs, *bytes))
    }
}
