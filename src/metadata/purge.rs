//! Purge and repository deletion (I5): what is unlinked and handed to the deletion
//! pipeline, and the job's record of it, commit together.

use super::expiry::{enqueue_unreferenced, remove_manifest_if_unlinked};
use super::jobs::insert_job;
use super::repos::{repo_row, RepoKey};
use super::{Metadata, MetadataError, RemovalReason};
use rusqlite::{params, Transaction};
use serde::Serialize;
use serde_json::{json, Value};

/// Counts of what a purge or a deletion batch removed.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Unlinked {
    pub repositories: u64,
    pub tags: u64,
    pub manifests: u64,
    pub blob_links: u64,
    pub blobs_handed_to_deletion: u64,
}

impl Unlinked {
    fn add(&mut self, o: Unlinked) {
        self.repositories += o.repositories;
        self.tags += o.tags;
        self.manifests += o.manifests;
        self.blob_links += o.blob_links;
        self.blobs_handed_to_deletion += o.blobs_handed_to_deletion;
    }

    pub fn is_empty(&self) -> bool {
        *self == Unlinked::default()
    }
}

/// What became of the blobs a job handed to the deletion pipeline.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HandedBlobs {
    pub handed: u64,
    pub deleted: u64,
    pub deferred: u64,
    pub deferred_reason: Option<String>,
    /// Still queued or being retried (see `last_error`).
    pub pending: u64,
    pub last_error: Option<String>,
    /// Pulled again before they were deleted, so kept.
    pub rescued: u64,
}

/// Removes up to `limit` of each kind of row of repository `id` (all when `None`; manifest
/// links only once no tag is left), hands unreferenced blobs to the deletion pipeline on
/// behalf of `job`.
fn unlink_repo(
    tx: &Transaction<'_>,
    id: i64,
    limit: Option<u32>,
    job: i64,
    now: i64,
) -> Result<Unlinked, MetadataError> {
    let limit = i64::from(limit.unwrap_or(u32::MAX));
    // `repo_id = ?1 AND key IN (…)` seeks each row by its full key; a row-value
    // `(repo_id, key) IN (…)` would scan the whole repository for every batch.
    let tags = tx.execute(
        "DELETE FROM tags WHERE repo_id = ?1 AND name IN (SELECT name FROM tags WHERE repo_id = ?1 LIMIT ?2)",
        params![id, limit],
    )? as u64;
    // Tags name manifests (a foreign key), so a batch unlinks manifests only once no tag of
    // the repository is left; otherwise it would remove a manifest a remaining tag names.
    let tags_left: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM tags WHERE repo_id = ?1)",
        [id],
        |r| r.get(0),
    )?;
    let manifest_limit = if tags_left { 0 } else { limit };
    let manifests: Vec<String> = {
        let mut stmt = tx.prepare_cached(
            "DELETE FROM repo_manifests WHERE repo_id = ?1 AND digest IN (
                SELECT digest FROM repo_manifests WHERE repo_id = ?1 LIMIT ?2) RETURNING digest",
        )?;
        let rows = stmt.query_map(params![id, manifest_limit], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut candidates: Vec<String> = {
        let mut stmt = tx.prepare_cached(
            "DELETE FROM repo_blobs WHERE repo_id = ?1 AND digest IN (
                SELECT digest FROM repo_blobs WHERE repo_id = ?1 LIMIT ?2) RETURNING digest",
        )?;
        let rows = stmt.query_map(params![id, limit], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let blob_links = candidates.len() as u64;
    for m in &manifests {
        candidates.extend(remove_manifest_if_unlinked(tx, m)?.1);
    }
    candidates.sort();
    candidates.dedup();
    let handed = enqueue_unreferenced(tx, &candidates, now, "purged", Some(job))?;
    Ok(Unlinked {
        repositories: 0,
        tags,
        manifests: manifests.len() as u64,
        blob_links,
        blobs_handed_to_deletion: handed,
    })
}

fn remaining(tx: &Transaction<'_>, id: i64) -> Result<bool, MetadataError> {
    Ok(tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM tags WHERE repo_id = ?1)
             OR EXISTS (SELECT 1 FROM repo_manifests WHERE repo_id = ?1)
             OR EXISTS (SELECT 1 FROM repo_blobs WHERE repo_id = ?1)",
        [id],
        |r| r.get(0),
    )?)
}

fn set_progress(tx: &Transaction<'_>, job: i64, progress: &Value, now: i64) -> Result<(), MetadataError> {
    tx.execute(
        "UPDATE jobs SET progress = ?2, updated_at = ?3 WHERE id = ?1",
        params![job, progress.to_string(), now],
    )?;
    Ok(())
}

/// Outcome of one run of a repository deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoDeleteStep {
    /// The repository is gone (deleted now, or was already).
    Finished,
    /// A batch was removed; more remains.
    More,
}

impl Metadata {
    /// Purges everything (`repo` = `None`) or one repository, in one transaction that also
    /// records the counts in the job's progress. Repositories being deleted are left to
    /// their deletion.
    pub async fn purge(&self, job: i64, repo: Option<RepoKey>, now: i64) -> Result<Unlinked, MetadataError> {
        self.write(move |tx| {
            let ids: Vec<i64> = match &repo {
                Some(r) => repo_row(tx, r)?
                    .filter(|(_, s)| s == "active")
                    .map(|(id, _)| id)
                    .into_iter()
                    .collect(),
                None => {
                    let mut stmt = tx.prepare("SELECT id FROM repositories WHERE state = 'active'")?;
                    let rows = stmt.query_map([], |r| r.get(0))?;
                    rows.collect::<Result<_, _>>()?
                }
            };
            let mut total = Unlinked::default();
            for id in ids {
                total.add(unlink_repo(tx, id, None, job, now)?);
                tx.execute("DELETE FROM repositories WHERE id = ?1", [id])?;
                total.repositories += 1;
            }
            set_progress(tx, job, &json!({ "phase": "unlinked", "unlinked": total }), now)?;
            Ok(total)
        })
        .await
        .inspect(|u| {
            self.stats()
                .removed(RemovalReason::Purged, u.blobs_handed_to_deletion)
        })
    }

    /// What became of the blobs `job` handed to the deletion pipeline.
    pub async fn handed_blobs(&self, job: i64) -> Result<HandedBlobs, MetadataError> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT count(*),
                        coalesce(sum(p.digest IS NULL AND b.digest IS NULL), 0),
                        coalesce(sum(p.state = 'deferred'), 0),
                        max(p.deferred_reason),
                        coalesce(sum(p.state IN ('pending', 'deleting')), 0),
                        max(p.last_error),
                        coalesce(sum(p.digest IS NULL AND b.digest IS NOT NULL), 0)
                   FROM job_deletes j
                   LEFT JOIN pending_deletes p ON p.digest = j.digest
                   LEFT JOIN blobs b ON b.digest = j.digest
                  WHERE j.job_id = ?1",
                [job],
                |r| {
                    let n = |i: usize| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
                    Ok(HandedBlobs {
                        handed: n(0)?,
                        deleted: n(1)?,
                        deferred: n(2)?,
                        deferred_reason: r.get(3)?,
                        pending: n(4)?,
                        last_error: r.get(5)?,
                        rescued: n(6)?,
                    })
                },
            )?)
        })
        .await
    }

    /// Marks `repo` for deletion (it stops being served at once) and queues its deletion
    /// job, or returns the job already doing it. `None` when the repository is unknown.
    pub async fn schedule_repo_delete(
        &self,
        repo: &RepoKey,
        max_attempts: i64,
        now: i64,
    ) -> Result<Option<i64>, MetadataError> {
        let repo = repo.clone();
        self.write(move |tx| {
            if repo_row(tx, &repo)?.is_none() {
                return Ok(None);
            }
            tx.execute(
                "UPDATE repositories SET state = 'delete_scheduled', delete_requested_at = ?3
                  WHERE upstream = ?1 AND name = ?2 AND state = 'active'",
                params![repo.upstream, repo.name, now],
            )?;
            let args = json!({ "upstream": repo.upstream, "repository": repo.name });
            let key = format!("delete_repository:{repo}");
            Ok(Some(
                insert_job(tx, "delete_repository", &args, Some(&key), max_attempts, now)?.0,
            ))
        })
        .await
    }

    /// One batch of a repository deletion, with the job's progress and the worker's
    /// heartbeat in the same transaction. The repository row goes last, once nothing of it
    /// remains.
    pub async fn delete_repo_batch(
        &self,
        job: i64,
        repo: &RepoKey,
        limit: u32,
        now: i64,
    ) -> Result<(RepoDeleteStep, Unlinked), MetadataError> {
        let repo = repo.clone();
        self.write(move |tx| {
            let Some((id, _)) = repo_row(tx, &repo)? else {
                return Ok((RepoDeleteStep::Finished, Unlinked::default(), 0));
            };
            tx.execute(
                "UPDATE repositories SET state = 'delete_ongoing', delete_heartbeat_at = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            let batch = unlink_repo(tx, id, Some(limit), job, now)?;
            let previous: Value = tx.query_row("SELECT progress FROM jobs WHERE id = ?1", [job], |r| {
                Ok(serde_json::from_str(&r.get::<_, String>(0)?).unwrap_or(Value::Null))
            })?;
            let mut total: Unlinked = serde_json::from_value(previous["removed"].clone()).unwrap_or_default();
            total.add(batch);
            let step = if remaining(tx, id)? {
                RepoDeleteStep::More
            } else {
                tx.execute("DELETE FROM repositories WHERE id = ?1", [id])?;
                total.repositories += 1;
                RepoDeleteStep::Finished
            };
            set_progress(tx, job, &json!({ "removed": total }), now)?;
            Ok((step, total, batch.blobs_handed_to_deletion))
        })
        .await
        .inspect(|(_, _, handed)| self.stats().removed(RemovalReason::Purged, *handed))
        .map(|(step, total, _)| (step, total))
    }
}
