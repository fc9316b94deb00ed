//! Tags and tag lists.

use super::manifests::{manifest_by_digest, ManifestRecord};
use super::repos::{ensure_repo, repo_id, RepoKey};
use super::{Metadata, MetadataError};
use rusqlite::{params, OptionalExtension};

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
}
