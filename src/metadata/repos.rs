//! Repositories and the "last used" bookkeeping shared by everything cached under them.

use super::expiry::expiry_sql;
use super::{Metadata, MetadataError};
use rusqlite::{params, Connection, OptionalExtension};

/// A repository as the cache knows it: which upstream, and its name there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoKey {
    pub upstream: String,
    pub name: String,
}

impl std::fmt::Display for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.upstream, self.name)
    }
}

/// Something a request used, recorded so expiry can tell what is still wanted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Use {
    Blob(RepoKey, String),
    Manifest(RepoKey, String),
    Tag(RepoKey, String),
}

/// The id of `repo` for serving: `None` if never cached, an error while it is being
/// deleted (it is no longer served).
pub(super) fn repo_id(conn: &Connection, repo: &RepoKey) -> Result<Option<i64>, MetadataError> {
    match repo_row(conn, repo)? {
        Some((id, state)) if state == "active" => Ok(Some(id)),
        Some(_) => Err(MetadataError::RepositoryBeingDeleted {
            repo: repo.to_string(),
        }),
        None => Ok(None),
    }
}

/// The id and state of `repo`, whatever its state.
pub(super) fn repo_row(conn: &Connection, repo: &RepoKey) -> Result<Option<(i64, String)>, MetadataError> {
    Ok(super::row(
        conn,
        "SELECT id, state FROM repositories WHERE upstream = ?1 AND name = ?2",
        params![repo.upstream, repo.name],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?)
}

/// The id of `repo`, creating it; an error while it is being deleted, so nothing is
/// cached into a repository on its way out.
pub(super) fn ensure_repo(conn: &Connection, repo: &RepoKey, now: i64) -> Result<i64, MetadataError> {
    let (id, state): (i64, String) = super::row(
        conn,
        "INSERT INTO repositories (upstream, name, created_at, last_used_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (upstream, name) DO UPDATE SET last_used_at = max(last_used_at, excluded.last_used_at)
         RETURNING id, state",
        params![repo.upstream, repo.name, now],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if state != "active" {
        return Err(MetadataError::RepositoryBeingDeleted {
            repo: repo.to_string(),
        });
    }
    Ok(id)
}

impl Metadata {
    /// Whether anything was ever cached under `repo`.
    pub async fn repo_known(&self, repo: &RepoKey) -> Result<bool, MetadataError> {
        let repo = repo.clone();
        self.read(move |c| Ok(repo_id(c, &repo)?.is_some())).await
    }

    /// Records a batch of uses at their times, in one transaction. Rows that no longer
    /// exist are skipped: a use never resurrects what was removed.
    pub async fn record_uses(&self, uses: Vec<(Use, i64)>) -> Result<(), MetadataError> {
        if uses.is_empty() {
            return Ok(());
        }
        self.write(move |tx| {
            let mut repo_stmt = tx.prepare_cached(
                "UPDATE repositories SET last_used_at = max(last_used_at, ?3) WHERE upstream = ?1 AND name = ?2",
            )?;
            let mut blob_stmt = tx.prepare_cached(
                &format!(
                    "UPDATE repo_blobs SET last_used_at = max(last_used_at, ?4), deferred = 0,
                            expires_at = CASE WHEN pinned = 1 THEN NULL ELSE {} END
                      WHERE digest = ?3 AND repo_id = (SELECT id FROM repositories WHERE upstream = ?1 AND name = ?2)",
                    expiry_sql("max(repo_blobs.last_used_at, ?4)", "repo_blobs.repo_id")
                ),
            )?;
            let mut blob_row_stmt =
                tx.prepare_cached("UPDATE blobs SET last_used_at = max(last_used_at, ?2) WHERE digest = ?1")?;
            let mut manifest_stmt = tx.prepare_cached(
                &format!(
                    "UPDATE repo_manifests SET last_used_at = max(last_used_at, ?4), deferred = 0,
                            expires_at = CASE WHEN pinned = 1 THEN NULL ELSE {} END
                      WHERE digest = ?3 AND repo_id = (SELECT id FROM repositories WHERE upstream = ?1 AND name = ?2)",
                    expiry_sql("max(repo_manifests.last_used_at, ?4)", "repo_manifests.repo_id")
                ),
            )?;
            let mut tag_stmt = tx.prepare_cached(
                &format!(
                    "UPDATE tags SET last_used_at = max(last_used_at, ?4), deferred = 0,
                            expires_at = CASE WHEN pinned = 1 THEN NULL ELSE {} END
                      WHERE name = ?3 AND repo_id = (SELECT id FROM repositories WHERE upstream = ?1 AND name = ?2)",
                    expiry_sql("max(tags.last_used_at, ?4)", "tags.repo_id")
                ),
            )?;
            for (u, at) in &uses {
                let (repo, key) = match u {
                    Use::Blob(r, d) => {
                        blob_stmt.execute(params![r.upstream, r.name, d, at])?;
                        blob_row_stmt.execute(params![d, at])?;
                        (r, d)
                    }
                    Use::Manifest(r, d) => {
                        manifest_stmt.execute(params![r.upstream, r.name, d, at])?;
                        (r, d)
                    }
                    Use::Tag(r, t) => {
                        tag_stmt.execute(params![r.upstream, r.name, t, at])?;
                        (r, t)
                    }
                };
                let _ = key;
                repo_stmt.execute(params![repo.upstream, repo.name, at])?;
            }
            Ok(())
        })
        .await
    }
}
