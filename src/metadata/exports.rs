//! What a bundle export reads: the cached repositories, their tags and manifests, what
//! each manifest names, the referrers of a manifest, and the sizes of stored blobs.

use super::repos::{repo_id, RepoKey};
use super::{Metadata, MetadataError};
use bytes::Bytes;
use rusqlite::{params, OptionalExtension};
use std::collections::HashMap;

/// A cached manifest with what it names.
#[derive(Debug, Clone)]
pub struct ManifestNode {
    pub digest: String,
    pub media_type: String,
    pub body: Bytes,
    /// Config and layers.
    pub blobs: Vec<String>,
    /// Child manifests of an index.
    pub children: Vec<String>,
}

impl Metadata {
    /// Every repository that is served (not being deleted), by upstream and name.
    pub async fn served_repositories(&self) -> Result<Vec<RepoKey>, MetadataError> {
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

    /// The cached tags of `repo` and the manifest each points at, by name.
    pub async fn cached_tags(&self, repo: &RepoKey) -> Result<Vec<(String, String)>, MetadataError> {
        let repo = repo.clone();
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(Vec::new());
            };
            let mut stmt = c.prepare("SELECT name, digest FROM tags WHERE repo_id = ?1 ORDER BY name")?;
            let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Every manifest linked to `repo`, with its subject (referrers), by digest.
    pub async fn linked_manifests(
        &self,
        repo: &RepoKey,
    ) -> Result<Vec<(String, Option<String>)>, MetadataError> {
        let repo = repo.clone();
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(Vec::new());
            };
            let mut stmt = c.prepare(
                "SELECT rm.digest, m.subject_digest FROM repo_manifests rm
                   JOIN manifests m ON m.digest = rm.digest
                  WHERE rm.repo_id = ?1 ORDER BY rm.digest",
            )?;
            let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// The manifest `digest` if it is linked to `repo` (I7), with what it names.
    pub async fn manifest_node(
        &self,
        repo: &RepoKey,
        digest: &str,
    ) -> Result<Option<ManifestNode>, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_owned());
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let Some((media_type, body)) = super::row(
                c,
                "SELECT m.media_type, m.body FROM manifests m
                   JOIN repo_manifests rm ON rm.digest = m.digest AND rm.repo_id = ?1
                  WHERE m.digest = ?2",
                params![id, digest],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?
            else {
                return Ok(None);
            };
            let mut node = ManifestNode {
                digest: digest.clone(),
                media_type,
                body: Bytes::from(body),
                blobs: Vec::new(),
                children: Vec::new(),
            };
            let mut stmt =
                c.prepare_cached("SELECT ref_digest, kind FROM manifest_refs WHERE manifest_digest = ?1")?;
            let refs = stmt.query_map([&digest], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            for r in refs {
                let (d, kind) = r?;
                if kind == "blob" {
                    node.blobs.push(d);
                } else {
                    node.children.push(d);
                }
            }
            Ok(Some(node))
        })
        .await
    }

    /// Sizes of the blobs among `digests` that are stored and not being deleted.
    pub async fn stored_blob_sizes(
        &self,
        digests: Vec<String>,
    ) -> Result<HashMap<String, u64>, MetadataError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT size_bytes FROM blobs b WHERE digest = ?1
                    AND NOT EXISTS (SELECT 1 FROM pending_deletes p WHERE p.digest = b.digest AND p.state = 'deleting')",
            )?;
            let mut out = HashMap::new();
            for d in digests {
                if let Some(size) = stmt.query_row([&d], |r| r.get::<_, i64>(0)).optional()? {
                    out.insert(d, u64::try_from(size).unwrap_or(0));
                }
            }
            Ok(out)
        })
        .await
    }
}
