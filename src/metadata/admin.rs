//! What the admin API and the CLI show about repositories.

use super::repos::{repo_row, RepoKey};
use super::{Metadata, MetadataError};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct RepoSummary {
    pub upstream: String,
    pub name: String,
    pub state: String,
    pub tag_count: u64,
    pub manifest_count: u64,
    pub blob_count: u64,
    /// Bytes of the blobs linked to it.
    pub bytes: u64,
    pub created_at: i64,
    pub last_pulled: i64,
    /// Pinned tags and manifest links (exempt from expiry, eviction and cleanup).
    pub pinned_tags: u64,
    pub pinned_manifests: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TagSummary {
    pub name: String,
    pub digest: String,
    /// The manifest's size plus the blobs it names (for an index, its own size).
    pub size: u64,
    pub created: Option<i64>,
    pub last_pulled: i64,
    pub pinned: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepoDetail {
    #[serde(flatten)]
    pub summary: RepoSummary,
    pub tags: Vec<TagSummary>,
}

const SUMMARY: &str = "SELECT r.upstream, r.name, r.state,
        (SELECT count(*) FROM tags WHERE repo_id = r.id),
        (SELECT count(*) FROM repo_manifests WHERE repo_id = r.id),
        (SELECT count(*) FROM repo_blobs WHERE repo_id = r.id),
        (SELECT coalesce(sum(b.size_bytes), 0) FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest WHERE rb.repo_id = r.id),
        r.created_at, r.last_used_at,
        (SELECT count(*) FROM tags WHERE repo_id = r.id AND pinned = 1),
        (SELECT count(*) FROM repo_manifests WHERE repo_id = r.id AND pinned = 1)
   FROM repositories r";

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<RepoSummary> {
    let n = |i: usize| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
    Ok(RepoSummary {
        upstream: r.get(0)?,
        name: r.get(1)?,
        state: r.get(2)?,
        tag_count: n(3)?,
        manifest_count: n(4)?,
        blob_count: n(5)?,
        bytes: n(6)?,
        created_at: r.get(7)?,
        last_pulled: r.get(8)?,
        pinned_tags: n(9)?,
        pinned_manifests: n(10)?,
    })
}

impl Metadata {
    pub async fn repositories(&self, limit: u32) -> Result<Vec<RepoSummary>, MetadataError> {
        self.read(move |c| {
            let mut stmt = c.prepare(&format!("{SUMMARY} ORDER BY r.upstream, r.name LIMIT ?1"))?;
            let rows = stmt.query_map([limit], summary)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// One repository with its tags; `None` once it is gone.
    pub async fn repository(&self, repo: &RepoKey) -> Result<Option<RepoDetail>, MetadataError> {
        let repo = repo.clone();
        self.read(move |c| {
            let Some((id, _)) = repo_row(c, &repo)? else { return Ok(None) };
            let summary = c.query_row(&format!("{SUMMARY} WHERE r.id = ?1"), [id], summary)?;
            let mut stmt = c.prepare(
                "SELECT t.name, t.digest,
                        m.size_bytes + coalesce((SELECT sum(b.size_bytes) FROM manifest_refs mr JOIN blobs b ON b.digest = mr.ref_digest
                                                  WHERE mr.manifest_digest = m.digest AND mr.kind = 'blob'), 0),
                        m.created, t.last_used_at, t.pinned
                   FROM tags t JOIN manifests m ON m.digest = t.digest WHERE t.repo_id = ?1 ORDER BY t.name",
            )?;
            let tags = stmt
                .query_map([id], |r| {
                    Ok(TagSummary {
                        name: r.get(0)?,
                        digest: r.get(1)?,
                        size: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                        created: r.get(3)?,
                        last_pulled: r.get(4)?,
                        pinned: r.get(5)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(Some(RepoDetail { summary, tags }))
        })
        .await
    }
}
