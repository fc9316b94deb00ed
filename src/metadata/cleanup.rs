//! Cleanup policies' queries (design problem 4): evaluation reads recorded metadata only
//! (an image's `created` was recorded when it was cached), and deletion is
//! compare-and-delete: a tag goes only if, in the same transaction, it still points at
//! the evaluated digest and was not pulled since evaluation.

use super::expiry::{enqueue_unreferenced, remove_manifest_if_unlinked};
use super::jobs::insert_job;
use super::purge::Unlinked;
use super::repos::{repo_row, RepoKey};
use super::{Metadata, MetadataError};
use rusqlite::params;
use serde::Serialize;
use serde_json::json;

/// A tag as a policy sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TagInfo {
    pub name: String,
    pub digest: String,
    /// The image's `created` (for an index, its newest child's); `None` when not known.
    pub created: Option<i64>,
    pub cached_at: i64,
    pub last_used_at: i64,
    /// Pinned tags are exempt from cleanup policies.
    pub pinned: bool,
}

/// What a compare-and-delete did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TagDeletion {
    pub deleted: Vec<String>,
    /// Moved to another digest since evaluation: kept.
    pub kept_moved: Vec<String>,
    /// Pulled since evaluation: kept.
    pub kept_pulled: Vec<String>,
    /// Already gone.
    pub missing: Vec<String>,
    /// Pinned since evaluation: kept.
    pub kept_pinned: Vec<String>,
    pub unlinked: Unlinked,
}

impl Metadata {
    /// Repositories that are served (not being deleted).
    pub async fn active_repos(&self) -> Result<Vec<RepoKey>, MetadataError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT upstream, name FROM repositories WHERE state = 'active' ORDER BY upstream, name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(RepoKey {
                    upstream: r.get(0)?,
                    name: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// The tags of `repo` with what a policy needs; `None` when the repository is gone or
    /// being deleted.
    pub async fn tags_for_cleanup(&self, repo: &RepoKey) -> Result<Option<Vec<TagInfo>>, MetadataError> {
        let repo = repo.clone();
        self.read(move |c| {
            let Some((id, state)) = repo_row(c, &repo)? else {
                return Ok(None);
            };
            if state != "active" {
                return Ok(None);
            }
            let mut stmt = c.prepare(
                "SELECT t.name, t.digest,
                        coalesce(m.created, (SELECT max(ch.created) FROM manifest_refs r
                                               JOIN manifests ch ON ch.digest = r.ref_digest
                                              WHERE r.manifest_digest = m.digest AND r.kind = 'manifest')),
                        t.cached_at, t.last_used_at, t.pinned
                   FROM tags t JOIN manifests m ON m.digest = t.digest
                  WHERE t.repo_id = ?1 ORDER BY t.name",
            )?;
            let rows = stmt.query_map([id], |r| {
                Ok(TagInfo {
                    name: r.get(0)?,
                    digest: r.get(1)?,
                    created: r.get(2)?,
                    cached_at: r.get(3)?,
                    last_used_at: r.get(4)?,
                    pinned: r.get(5)?,
                })
            })?;
            Ok(Some(rows.collect::<Result<_, _>>()?))
        })
        .await
    }

    /// Deletes each (tag, digest) that still points at that digest and was not pulled
    /// after `evaluated_at`; then unlinks the manifests those tags held (unless another tag
    /// or a tagged index still needs them) and blob links only they named, handing
    /// unreferenced blobs to the deletion pipeline. One transaction.
    pub async fn delete_tags_if_unchanged(
        &self,
        job: i64,
        repo: &RepoKey,
        tags: Vec<(String, String)>,
        evaluated_at: i64,
        now: i64,
    ) -> Result<TagDeletion, MetadataError> {
        let repo = repo.clone();
        self.write(move |tx| {
            let mut out = TagDeletion::default();
            let Some((id, state)) = repo_row(tx, &repo)? else {
                out.missing = tags.into_iter().map(|t| t.0).collect();
                return Ok(out);
            };
            if state != "active" {
                out.missing = tags.into_iter().map(|t| t.0).collect();
                return Ok(out);
            }
            let mut freed = Vec::new();
            for (name, digest) in tags {
                // Uses are recorded in whole seconds: one in the second of the evaluation may
                // have come after it, so it counts as a pull since evaluation.
                let n = tx.execute(
                    "DELETE FROM tags WHERE repo_id = ?1 AND name = ?2 AND digest = ?3 AND last_used_at < ?4
                        AND pinned = 0",
                    params![id, name, digest, evaluated_at],
                )?;
                if n > 0 {
                    out.deleted.push(name);
                    freed.push(digest);
                    continue;
                }
                let now_points: Option<(String, bool)> = tx
                    .query_row(
                        "SELECT digest, pinned FROM tags WHERE repo_id = ?1 AND name = ?2",
                        params![id, name],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .ok();
                match now_points {
                    Some((d, _)) if d != digest => out.kept_moved.push(name),
                    Some((_, true)) => out.kept_pinned.push(name),
                    Some(_) => out.kept_pulled.push(name),
                    None => out.missing.push(name),
                }
            }
            freed.sort();
            freed.dedup();
            let mut candidates = Vec::new();
            for digest in freed {
                let needed: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM tags INDEXED BY tags_by_manifest WHERE digest = ?2 AND repo_id = ?1)
                         OR EXISTS (SELECT 1 FROM manifest_refs r
                                      JOIN tags t INDEXED BY tags_by_manifest ON t.digest = r.manifest_digest AND t.repo_id = ?1
                                     WHERE r.ref_digest = ?2 AND r.kind = 'manifest')",
                    params![id, digest],
                    |r| r.get(0),
                )?;
                if needed {
                    continue;
                }
                let mut unlink = vec![digest.clone()];
                let mut children: Vec<String> = {
                    let mut stmt = tx.prepare_cached(
                        "SELECT ref_digest FROM manifest_refs WHERE manifest_digest = ?1 AND kind = 'manifest'",
                    )?;
                    let rows = stmt.query_map([&digest], |r| r.get(0))?;
                    rows.collect::<Result<_, _>>()?
                };
                unlink.append(&mut children);
                for m in unlink {
                    let blobs: Vec<String> = {
                        let mut stmt = tx.prepare_cached(
                            "SELECT ref_digest FROM manifest_refs WHERE manifest_digest = ?1 AND kind = 'blob'",
                        )?;
                        let rows = stmt.query_map([&m], |r| r.get(0))?;
                        rows.collect::<Result<_, _>>()?
                    };
                    // A pinned manifest (by digest, or below a pinned index) stays linked.
                    if tx.execute(
                        "DELETE FROM repo_manifests WHERE repo_id = ?1 AND digest = ?2 AND pinned = 0",
                        params![id, m],
                    )? > 0
                    {
                        out.unlinked.manifests += 1;
                    }
                    for b in blobs {
                        let still_named: bool = tx.query_row(
                            "SELECT EXISTS (SELECT 1 FROM manifest_refs r JOIN repo_manifests rm
                                               ON rm.digest = r.manifest_digest AND rm.repo_id = ?1
                                             WHERE r.ref_digest = ?2 AND r.kind = 'blob')",
                            params![id, b],
                            |r| r.get(0),
                        )?;
                        if !still_named
                            && tx.execute(
                                "DELETE FROM repo_blobs WHERE repo_id = ?1 AND digest = ?2 AND pinned = 0",
                                params![id, b],
                            )? > 0
                        {
                            out.unlinked.blob_links += 1;
                        }
                        candidates.push(b);
                    }
                    candidates.extend(remove_manifest_if_unlinked(tx, &m)?.1);
                }
            }
            out.unlinked.tags = out.deleted.len() as u64;
            candidates.sort();
            candidates.dedup();
            out.unlinked.blobs_handed_to_deletion = enqueue_unreferenced(tx, &candidates, now, "cleanup", Some(job))?;
            Ok(out)
        })
        .await
    }

    /// Of `repos`, those the policy is due for (never run, or last run a cadence ago), and
    /// queues a cleanup job for each, recording the run in the same transaction. Returns
    /// the job ids queued.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, every argument named there"
    )]
    pub async fn enqueue_due_cleanups(
        &self,
        policy: &str,
        definition: serde_json::Value,
        repos: Vec<RepoKey>,
        cadence_secs: i64,
        force: bool,
        max_attempts: i64,
        now: i64,
    ) -> Result<Vec<i64>, MetadataError> {
        let policy = policy.to_owned();
        self.write(move |tx| {
            let mut ids = Vec::new();
            for repo in repos {
                let last: Option<i64> = tx
                    .query_row(
                        "SELECT last_run_at FROM cleanup_runs WHERE policy = ?1 AND upstream = ?2 AND repo = ?3",
                        params![policy, repo.upstream, repo.name],
                        |r| r.get(0),
                    )
                    .ok();
                if !force && last.is_some_and(|l| l + cadence_secs > now) {
                    continue;
                }
                let args = json!({ "policy": definition, "upstream": repo.upstream, "repository": repo.name });
                let key = format!("cleanup:{policy}:{repo}");
                let (id, new) = insert_job(tx, "cleanup", &args, Some(&key), max_attempts, now)?;
                if new {
                    tx.execute(
                        "INSERT INTO cleanup_runs (policy, upstream, repo, last_run_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (policy, upstream, repo) DO UPDATE SET last_run_at = excluded.last_run_at",
                        params![policy, repo.upstream, repo.name, now],
                    )?;
                    ids.push(id);
                }
            }
            Ok(ids)
        })
        .await
    }
}
