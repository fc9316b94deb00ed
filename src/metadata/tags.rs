//! Tags, tag lists and cached referrers answers.

use super::manifests::{manifest_by_digest, ManifestRecord};
use super::repos::{ensure_repo, repo_id, RepoKey};
use super::{Metadata, MetadataError};
use bytes::Bytes;
use rusqlite::{params, OptionalExtension};

/// A cached referrers answer.
#[derive(Debug, Clone)]
pub struct ReferrersRecord {
    pub media_type: String,
    pub body: Bytes,
    pub filters_applied: Option<String>,
}

/// A tag and the manifest it points at.
#[derive(Debug, Clone)]
pub struct TagRecord {
    pub manifest: ManifestRecord,
}

impl Metadata {
    pub async fn tag(&self, repo: &RepoKey, tag: &str) -> Result<Option<TagRecord>, MetadataError> {
        let (repo, tag) = (repo.clone(), tag.to_owned());
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let digest: Option<String> = super::row(
                c,
                "SELECT digest FROM tags WHERE repo_id = ?1 AND name = ?2",
                params![id, tag],
                |r| r.get(0),
            )
            .optional()?;
            match digest {
                Some(d) => Ok(manifest_by_digest(c, &d)?.map(|manifest| TagRecord { manifest })),
                None => Ok(None),
            }
        })
        .await
    }

    /// Every tag name the cache knows for `repo` (cached tags and the last upstream list),
    /// or `None` when the repository was never seen.
    pub async fn known_tags(&self, repo: &RepoKey) -> Result<Option<Vec<String>>, MetadataError> {
        let repo = repo.clone();
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let mut stmt = c.prepare("SELECT name FROM tags WHERE repo_id = ?1")?;
            let mut names: Vec<String> = stmt.query_map([id], |r| r.get(0))?.collect::<Result<_, _>>()?;
            let listed: Option<String> =
                super::row(c, "SELECT names FROM tag_lists WHERE repo_id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()?;
            if let Some(json) = listed {
                names.extend(serde_json::from_str::<Vec<String>>(&json).unwrap_or_default());
            }
            names.sort();
            names.dedup();
            Ok(Some(names))
        })
        .await
    }

    /// Keeps the upstream's tag list for offline use.
    pub async fn store_tag_list(
        &self,
        repo: &RepoKey,
        names: &[String],
        now: i64,
    ) -> Result<(), MetadataError> {
        let repo = repo.clone();
        let json = serde_json::to_string(names).unwrap_or_else(|_| "[]".into());
        self.write(move |tx| {
            let id = ensure_repo(tx, &repo, now)?;
            tx.execute(
                "INSERT INTO tag_lists (repo_id, names, fetched_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (repo_id) DO UPDATE SET names = excluded.names, fetched_at = excluded.fetched_at",
                params![id, json, now],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn referrers(
        &self,
        repo: &RepoKey,
        digest: &str,
        artifact_type: &str,
    ) -> Result<Option<ReferrersRecord>, MetadataError> {
        let (repo, digest, artifact_type) = (repo.clone(), digest.to_owned(), artifact_type.to_owned());
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            Ok(super::row(
                c,
                "SELECT media_type, body, filters_applied FROM referrers
                  WHERE repo_id = ?1 AND digest = ?2 AND artifact_type = ?3",
                params![id, digest, artifact_type],
                |r| {
                    Ok(ReferrersRecord {
                        media_type: r.get(0)?,
                        body: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                        filters_applied: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    pub async fn store_referrers(
        &self,
        repo: &RepoKey,
        digest: &str,
        artifact_type: &str,
        record: ReferrersRecord,
        now: i64,
    ) -> Result<(), MetadataError> {
        let (repo, digest, artifact_type) = (repo.clone(), digest.to_owned(), artifact_type.to_owned());
        self.write(move |tx| {
            let id = ensure_repo(tx, &repo, now)?;
            tx.execute(
                "INSERT INTO referrers (repo_id, digest, artifact_type, media_type, body, filters_applied, fetched_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (repo_id, digest, artifact_type) DO UPDATE SET media_type = excluded.media_type,
                    body = excluded.body, filters_applied = excluded.filters_applied, fetched_at = excluded.fetched_at",
                params![id, digest, artifact_type, record.media_type, &record.body[..], record.filters_applied, now],
            )?;
            Ok(())
        })
        .await
    }
}
