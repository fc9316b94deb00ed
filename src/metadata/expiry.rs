//! Expiry (I3): due tags, manifest links and blob links are removed in bounded batches,
//! one transaction each; a blob nothing links or references any more becomes a pending
//! delete. With storage deletes off, due entries are kept (still served) and marked
//! deferred instead.

use super::{Metadata, MetadataError};
use rusqlite::{params, Transaction};

/// What one expiry batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiryReport {
    pub tags: u64,
    pub manifest_links: u64,
    pub blob_links: u64,
    pub manifests_removed: u64,
    pub blobs_to_delete: u64,
    pub deferred: u64,
    /// Due links kept because something live still holds them, looked at again later.
    pub postponed: u64,
    /// A due query hit the batch limit: more may be due right now.
    pub more: bool,
    /// Cached referrers answers removed (`Metadata::expire_referrers`, its own batches).
    pub referrers: u64,
}

impl ExpiryReport {
    pub fn entries(&self) -> u64 {
        self.tags + self.manifest_links + self.blob_links + self.deferred
    }
}

/// SQL for "the expiry of something last used at `at` in repository `repo_id`": `at` plus
/// the applied ttl of the repository's upstream, or NULL (never) when that ttl is 0.
pub(super) fn expiry_sql(at: &str, repo_id: &str) -> String {
    format!(
        "(SELECT {at} + u.ttl_secs FROM upstream_settings u JOIN repositories r ON r.upstream = u.upstream
           WHERE r.id = {repo_id} AND u.ttl_secs > 0)"
    )
}

impl Metadata {
    /// Expires at most `limit` due entries of each kind, in one transaction.
    pub async fn expire_due(
        &self,
        now: i64,
        limit: u32,
        deletes_enabled: bool,
    ) -> Result<ExpiryReport, MetadataError> {
        self.write(move |tx| {
            if deletes_enabled {
                expire(tx, now, limit)
            } else {
                defer(tx, now, limit)
            }
        })
        .await
        .inspect(|r| self.stats().expired(r))
    }

    /// The earliest due time of anything not yet expired, to sleep until.
    pub async fn next_due(&self) -> Result<Option<i64>, MetadataError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT min(m) FROM (
                    SELECT min(expires_at) AS m FROM tags WHERE expires_at IS NOT NULL
                    UNION ALL SELECT min(expires_at) FROM repo_manifests WHERE expires_at IS NOT NULL
                    UNION ALL SELECT min(expires_at) FROM repo_blobs WHERE expires_at IS NOT NULL)",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }
}

// Every due query takes rows oldest due first and, within a second, in digest order (the
// due indexes end in the digest, see schema/0005): one batch then changes neighbouring
// entries of every digest-keyed table and index instead of one random page per row.

/// Due tags: their keys, at most `limit`.
const DUE_TAGS: &str =
    "SELECT repo_id, name FROM tags WHERE expires_at <= ?1 ORDER BY expires_at, digest LIMIT ?2";
/// Due manifest links, each with what still holds it: tags of its repository pointing at
/// it, and indexes linked in its repository that list it. The third column is NULL when
/// nothing holds the link (it goes), else the latest due time among its holders (0 when
/// none has one).
const DUE_MANIFEST_LINKS: &str = "SELECT rm.repo_id, rm.digest,
       (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE coalesce(max(e), 0) END FROM (
            SELECT t.expires_at AS e FROM tags t INDEXED BY tags_by_manifest
             WHERE t.digest = rm.digest AND t.repo_id = rm.repo_id
            UNION ALL
            SELECT p.expires_at FROM manifest_refs mr
              JOIN repo_manifests p ON p.digest = mr.manifest_digest AND p.repo_id = rm.repo_id
             WHERE mr.ref_digest = rm.digest AND mr.kind = 'manifest'))
  FROM repo_manifests rm WHERE rm.expires_at <= ?1 ORDER BY rm.expires_at, rm.digest LIMIT ?2";
/// Due blob links, each with what still holds it: manifests linked in its repository that
/// name the blob (third column as for manifest links).
const DUE_BLOB_LINKS: &str = "SELECT rb.repo_id, rb.digest,
       (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE coalesce(max(p.expires_at), 0) END
          FROM manifest_refs mr
          JOIN repo_manifests p ON p.digest = mr.manifest_digest AND p.repo_id = rb.repo_id
         WHERE mr.ref_digest = rb.digest AND mr.kind = 'blob')
  FROM repo_blobs rb WHERE rb.expires_at <= ?1 ORDER BY rb.expires_at, rb.digest LIMIT ?2";

/// Picks due rows with `select` (repository id and second key column) and applies
/// `change` to each by its full primary key. A row-value `IN (subquery)` would let SQLite
/// seek on `repo_id` alone and scan every row of each repository in the batch.
fn change_due(
    tx: &Transaction<'_>,
    select: &str,
    change: &str,
    now: i64,
    limit: u32,
) -> Result<Vec<(i64, String)>, MetadataError> {
    let keys: Vec<(i64, String)> = {
        let mut stmt = tx.prepare_cached(select)?;
        let rows = stmt.query_map(params![now, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut stmt = tx.prepare_cached(change)?;
    for (repo_id, key) in &keys {
        stmt.execute(params![repo_id, key])?;
    }
    Ok(keys)
}

/// Due links of `table` picked by `select` (see `DUE_MANIFEST_LINKS`): the ones nothing
/// holds are removed and their digests returned; a held one is postponed until its
/// holders are due (or one ttl from now when none of them has a due time), so it is not
/// looked at again on every pass while, say, a client keeps pulling the manifest but never
/// the layers it already has. Returns the removed digests, how many were postponed, and
/// whether the batch limit was reached (more may be due).
fn expire_links(
    tx: &Transaction<'_>,
    select: &str,
    table: &str,
    now: i64,
    limit: u32,
) -> Result<(Vec<String>, u64, bool), MetadataError> {
    let due: Vec<(i64, String, Option<i64>)> = {
        let mut stmt = tx.prepare_cached(select)?;
        let rows = stmt.query_map(params![now, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut remove = tx.prepare_cached(&format!("DELETE FROM {table} WHERE repo_id = ?1 AND digest = ?2"))?;
    let mut postpone = tx.prepare_cached(&format!(
        "UPDATE {table} SET expires_at = ?3 WHERE repo_id = ?1 AND digest = ?2"
    ))?;
    let mut one_ttl = tx.prepare_cached(&format!("SELECT {}", expiry_sql("?1", "?2")))?;
    let more = due.len() >= limit as usize;
    let (mut removed, mut postponed) = (Vec::new(), 0);
    for (repo_id, digest, held) in due {
        match held {
            None => {
                remove.execute(params![repo_id, digest])?;
                removed.push(digest);
            }
            Some(until) => {
                let until: Option<i64> = if until > 0 {
                    Some(until)
                } else {
                    one_ttl.query_row(params![now, repo_id], |r| r.get(0))?
                };
                // Never before the next second: a holder due in this very pass (past the
                // batch limit) is looked at again soon, not in a loop.
                postpone.execute(params![repo_id, digest, until.map(|t| t.max(now + 1))])?;
                postponed += 1;
            }
        }
    }
    Ok((removed, postponed, more))
}

fn expire(tx: &Transaction<'_>, now: i64, limit: u32) -> Result<ExpiryReport, MetadataError> {
    let delete_tag = "DELETE FROM tags WHERE repo_id = ?1 AND name = ?2";
    let tags = change_due(tx, DUE_TAGS, delete_tag, now, limit)?;
    let (manifest_links, held_manifests, more_manifests) =
        expire_links(tx, DUE_MANIFEST_LINKS, "repo_manifests", now, limit)?;
    // While manifest links are still due, blob links wait: the blob sweep walks blobs in
    // digest order, unrelated to the manifests', so it would mostly find links whose
    // manifest is due but not yet expired and postpone them, a write each (and again
    // when they come round). Once the manifests are done, it mostly finds them free.
    let (blob_links, held_blobs, more_blobs) = if more_manifests {
        (Vec::new(), 0, true)
    } else {
        expire_links(tx, DUE_BLOB_LINKS, "repo_blobs", now, limit)?
    };
    let mut report = ExpiryReport {
        tags: tags.len() as u64,
        manifest_links: manifest_links.len() as u64,
        blob_links: blob_links.len() as u64,
        postponed: held_manifests + held_blobs,
        more: tags.len() >= limit as usize || more_manifests || more_blobs,
        ..ExpiryReport::default()
    };
    let mut candidates: Vec<String> = blob_links;
    for digest in &manifest_links {
        let (removed, refs) = remove_manifest_if_unlinked(tx, digest)?;
        report.manifests_removed += u64::from(removed);
        candidates.extend(refs);
    }
    candidates.sort();
    candidates.dedup();
    report.blobs_to_delete = enqueue_unreferenced(tx, &candidates, now, "expired", None)?;
    Ok(report)
}

fn defer(tx: &Transaction<'_>, now: i64, limit: u32) -> Result<ExpiryReport, MetadataError> {
    let (mut deferred, mut more) = (0, false);
    for (table, key) in [
        ("tags", "name"),
        ("repo_manifests", "digest"),
        ("repo_blobs", "digest"),
    ] {
        let select = format!(
            "SELECT repo_id, {key} FROM {table} WHERE expires_at <= ?1 ORDER BY expires_at, digest LIMIT ?2"
        );
        let change =
            format!("UPDATE {table} SET deferred = 1, expires_at = NULL WHERE repo_id = ?1 AND {key} = ?2");
        let changed = change_due(tx, &select, &change, now, limit)?.len();
        deferred += changed as u64;
        more |= changed >= limit as usize;
    }
    Ok(ExpiryReport {
        deferred,
        more,
        ..ExpiryReport::default()
    })
}

/// Removes a manifest no repository links any more; returns whether it went and the blobs
/// it named (candidates for deletion).
pub(super) fn remove_manifest_if_unlinked(
    tx: &Transaction<'_>,
    digest: &str,
) -> Result<(bool, Vec<String>), MetadataError> {
    // Cached statements: expiry runs this once per manifest, a million times at scale.
    let linked: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM repo_manifests WHERE digest = ?1)")?
        .query_row([digest], |r| r.get(0))?;
    if linked {
        return Ok((false, Vec::new()));
    }
    let refs: Vec<String> = {
        let mut stmt = tx.prepare_cached(
            "SELECT ref_digest FROM manifest_refs WHERE manifest_digest = ?1 AND kind = 'blob'",
        )?;
        let rows = stmt.query_map([digest], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let removed = tx
        .prepare_cached("DELETE FROM manifests WHERE digest = ?1")?
        .execute([digest])?
        > 0;
    Ok((removed, refs))
}

/// Turns every candidate blob that no repository links, no cached manifest names and no
/// bundle import holds into a pending delete (I3). The delete switch is read from the applied settings in the same
/// transaction: with deletes off the row waits as deferred, saying why. When `job` is
/// given, the blobs are recorded as handed over by that job. Returns how many were queued.
pub(super) fn enqueue_unreferenced(
    tx: &Transaction<'_>,
    candidates: &[String],
    now: i64,
    reason: &str,
    job: Option<i64>,
) -> Result<u64, MetadataError> {
    let deletes_off: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM settings WHERE key = 'storage.delete.enabled' AND value = 'false')",
        [],
        |r| r.get(0),
    )?;
    let (state, deferred_reason) = if deletes_off {
        ("deferred", Some(super::DELETES_DISABLED_REASON))
    } else {
        ("pending", None)
    };
    let mut stmt = tx.prepare_cached(
        "INSERT INTO pending_deletes (digest, size_bytes, reason, state, next_attempt_at, deferred_reason, created_at)
         SELECT b.digest, b.size_bytes, ?3, ?4, ?2, ?5, ?2 FROM blobs b
          WHERE b.digest = ?1
            -- On ?1, not b.digest: SQLite then checks these before it reads the blob's
            -- row, and most candidates of a mass expiry are still linked when first seen.
            AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = ?1)
            AND NOT EXISTS (SELECT 1 FROM manifest_refs mr WHERE mr.ref_digest = ?1 AND mr.kind = 'blob')
            -- Held by a bundle import that has not linked its images yet (schema 0007).
            AND NOT EXISTS (SELECT 1 FROM import_blobs ib WHERE ib.digest = ?1)
         ON CONFLICT (digest) DO NOTHING",
    )?;
    let mut record = tx.prepare_cached(
        "INSERT INTO job_deletes (job_id, digest)
         SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM pending_deletes WHERE digest = ?2) ON CONFLICT DO NOTHING",
    )?;
    let mut queued = 0;
    for digest in candidates {
        queued += stmt.execute(params![digest, now, reason, state, deferred_reason])? as u64;
        if let Some(job) = job {
            record.execute(params![job, digest])?;
        }
    }
    Ok(queued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// `images` cached images in one repository, every tag and link due at 100: per image
    /// a tag, a manifest linked in the repository, and a config and a layer blob, both
    /// linked and named by the manifest.
    fn due_images(images: usize) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        super::super::migrations::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO repositories (id, upstream, name, created_at, last_used_at) VALUES (1, 'hub', 'team/app', 10, 20);
             INSERT INTO upstream_settings (upstream, ttl_secs, applied_at) VALUES ('hub', 80, 10);",
        )
        .unwrap();
        for i in 0..images {
            let (m, c, l) = (
                format!("sha256:m{i}"),
                format!("sha256:c{i}"),
                format!("sha256:l{i}"),
            );
            conn.execute_batch(&format!(
                "INSERT INTO blobs (digest, size_bytes, cached_at, last_used_at) VALUES ('{c}', 2, 10, 20), ('{l}', 3, 10, 20);
                 INSERT INTO manifests (digest, media_type, size_bytes, body, config_digest, cached_at)
                     VALUES ('{m}', 'application/vnd.oci.image.manifest.v1+json', 2, x'7b7d', '{c}', 10);
                 INSERT INTO manifest_refs VALUES ('{m}', '{c}', 'blob'), ('{m}', '{l}', 'blob');
                 INSERT INTO repo_manifests (repo_id, digest, cached_at, last_used_at, expires_at) VALUES (1, '{m}', 10, 20, 100);
                 INSERT INTO repo_blobs (repo_id, digest, cached_at, last_used_at, expires_at)
                     VALUES (1, '{c}', 10, 20, 100), (1, '{l}', 10, 20, 100);
                 INSERT INTO tags (repo_id, name, digest, cached_at, last_used_at, expires_at) VALUES (1, 't{i}', '{m}', 10, 20, 100);"
            ))
            .unwrap();
        }
        conn
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// A mass expiry takes the manifests first and the blob links after them: a blob link
    /// looked at while the manifest naming it is still due would be postponed (a write, and
    /// a second look later) although it goes in the same pass.
    #[test]
    fn blob_links_wait_while_manifest_links_are_due_and_none_is_postponed() {
        const IMAGES: usize = 5;
        const LIMIT: u32 = 2;
        let mut conn = due_images(IMAGES);
        let mut batches = Vec::new();
        loop {
            let tx = conn.transaction().unwrap();
            let report = expire(&tx, 200, LIMIT).unwrap();
            tx.commit().unwrap();
            batches.push(report);
            assert!(batches.len() <= 20, "expiry does not end: {batches:?}");
            if !report.more {
                break;
            }
        }
        // Two full batches of tags and manifests, with no blob link looked at.
        for report in &batches[..2] {
            assert_eq!((report.tags, report.manifest_links, report.blob_links), (2, 2, 0));
            assert!(report.more);
        }
        // The last manifest, then the blob sweep: LIMIT per batch until none is left.
        assert_eq!((batches[2].tags, batches[2].manifest_links), (1, 1));
        let blob_links: u64 = batches.iter().map(|r| r.blob_links).sum();
        assert_eq!(blob_links, 2 * IMAGES as u64);
        assert!(batches[2..].iter().all(|r| r.blob_links <= u64::from(LIMIT)));
        assert_eq!(batches.iter().map(|r| r.postponed).sum::<u64>(), 0, "{batches:?}");
        assert_eq!(
            batches.iter().map(|r| r.blobs_to_delete).sum::<u64>(),
            2 * IMAGES as u64
        );
        for table in ["tags", "repo_manifests", "repo_blobs", "manifests"] {
            assert_eq!(
                count(&conn, &format!("SELECT count(*) FROM {table}")),
                0,
                "{table}"
            );
        }
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM pending_deletes WHERE state = 'pending'"
            ),
            2 * IMAGES as i64
        );
    }

    /// A batch whose limit is filled by removed and postponed links together says more may
    /// be due, though neither count reaches the limit.
    #[test]
    fn a_batch_filled_by_removed_and_postponed_links_asks_for_more() {
        let mut conn = due_images(3);
        // Image 0's tag is used again: its manifest link is held, the other two go.
        conn.execute("UPDATE tags SET expires_at = 500 WHERE name = 't0'", [])
            .unwrap();
        let tx = conn.transaction().unwrap();
        let report = expire(&tx, 200, 3).unwrap();
        tx.commit().unwrap();
        assert_eq!((report.tags, report.manifest_links, report.postponed), (2, 2, 1));
        assert!(report.more, "{report:?}");
        assert_eq!(
            count(
                &conn,
                "SELECT expires_at FROM repo_manifests WHERE digest = 'sha256:m0'"
            ),
            500,
            "postponed to its tag's due time"
        );
    }
}
