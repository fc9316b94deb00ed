//! Blob rows and their repository links (I7).

use super::expiry::expiry_sql;
use super::repos::{ensure_repo, repo_id, RepoKey};
use super::{Metadata, MetadataError};
use rusqlite::{params, OptionalExtension};

/// How a blob relates to the repository it was requested under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobAccess {
    /// Stored and linked to this repository: serve it.
    Linked { size: u64 },
    /// Stored and referenced by a manifest cached under this repository, but not linked
    /// yet: serve it and link it.
    Referenced { size: u64 },
    /// Stored for another repository only: verify upstream under this one first.
    Elsewhere { size: u64 },
    /// Not stored.
    Unknown,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Metadata {
    pub async fn blob_access(&self, repo: &RepoKey, digest: &str) -> Result<BlobAccess, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_owned());
        self.read(move |c| {
            let Some(size) = super::row(
                c,
                "SELECT size_bytes FROM blobs WHERE digest = ?1",
                [&digest],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            else {
                return Ok(BlobAccess::Unknown);
            };
            let size = to_u64(size);
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(BlobAccess::Elsewhere { size });
            };
            let linked: bool = super::row(
                c,
                "SELECT EXISTS (SELECT 1 FROM repo_blobs WHERE repo_id = ?1 AND digest = ?2)",
                params![id, digest],
                |r| r.get(0),
            )?;
            if linked {
                return Ok(BlobAccess::Linked { size });
            }
            let referenced: bool = super::row(
                c,
                "SELECT EXISTS (SELECT 1 FROM manifest_refs mr
                   JOIN repo_manifests rm ON rm.digest = mr.manifest_digest
                  WHERE rm.repo_id = ?1 AND mr.ref_digest = ?2 AND mr.kind = 'blob')",
                params![id, digest],
                |r| r.get(0),
            )?;
            Ok(if referenced {
                BlobAccess::Referenced { size }
            } else {
                BlobAccess::Elsewhere { size }
            })
        })
        .await
    }

    /// Records a verified blob now in storage under its final key and links it to
    /// `repo`, in one transaction (the last step of I2's write order). Returns the
    /// manifests that use this blob as their config and still lack a `created` time.
    /// `intent` is the write intent taken before the object was written; it goes in the
    /// same transaction, and so does any pending delete of the digest (a rescue).
    pub async fn commit_blob(
        &self,
        repo: &RepoKey,
        digest: &str,
        size: u64,
        intent: i64,
        now: i64,
    ) -> Result<Vec<String>, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_owned());
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        self.write(move |tx| {
            tx.execute("DELETE FROM write_intents WHERE id = ?1", [intent])?;
            tx.execute("DELETE FROM pending_deletes WHERE digest = ?1", [&digest])?;
            tx.execute(
                "INSERT INTO blobs (digest, size_bytes, cached_at, last_used_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (digest) DO UPDATE SET last_used_at = max(last_used_at, excluded.last_used_at)",
                params![digest, size, now],
            )?;
            link(tx, &repo, &digest, now)?;
            let mut stmt =
                tx.prepare("SELECT digest FROM manifests WHERE config_digest = ?1 AND created IS NULL")?;
            let rows = stmt.query_map([&digest], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
        .await
    }

    /// Links an already stored blob to `repo` (after it was verified upstream for it). A
    /// pending delete of the blob is cancelled in the same transaction (a rescue); `false`
    /// when the blob is being deleted right now and cannot be linked.
    pub async fn link_blob(&self, repo: &RepoKey, digest: &str, now: i64) -> Result<bool, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_owned());
        self.write(move |tx| {
            let deleting: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM pending_deletes WHERE digest = ?1 AND state = 'deleting')",
                [&digest],
                |r| r.get(0),
            )?;
            if deleting {
                return Ok(false);
            }
            tx.execute("DELETE FROM pending_deletes WHERE digest = ?1", [&digest])?;
            link(tx, &repo, &digest, now)?;
            Ok(true)
        })
        .await
    }

    /// Repairs rows that claim an object storage no longer has (I2): the blob and its
    /// links go, so the next request fetches it again.
    pub async fn forget_blob(&self, digest: &str) -> Result<(), MetadataError> {
        let digest = digest.to_owned();
        self.write(move |tx| {
            tx.execute("DELETE FROM repo_blobs WHERE digest = ?1", [&digest])?;
            // A delete in flight keeps its claim: the worker finishes it, and until then a
            // refetch is served without being stored (see `begin_write`) rather than
            // written under a key the worker is about to unlink.
            tx.execute(
                "DELETE FROM pending_deletes WHERE digest = ?1 AND state != 'deleting'",
                [&digest],
            )?;
            tx.execute("DELETE FROM blobs WHERE digest = ?1", [&digest])?;
            Ok(())
        })
        .await
    }
}

pub(super) fn link(
    tx: &rusqlite::Transaction<'_>,
    repo: &RepoKey,
    digest: &str,
    now: i64,
) -> Result<(), MetadataError> {
    let id = ensure_repo(tx, repo, now)?;
    tx.execute(
        &format!(
            "INSERT INTO repo_blobs (repo_id, digest, cached_at, last_used_at, expires_at) VALUES (?1, ?2, ?3, ?3, {})
             ON CONFLICT (repo_id, digest) DO UPDATE SET last_used_at = max(last_used_at, excluded.last_used_at),
                 expires_at = CASE WHEN pinned = 1 THEN NULL ELSE excluded.expires_at END, deferred = 0",
            expiry_sql("?3", "?1")
        ),
        params![id, digest, now],
    )?;
    super::pins::pin_new_blob_link(tx, id, digest)?;
    Ok(())
}
