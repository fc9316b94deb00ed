//! Manifests (bodies live here, at most 4 MiB each), their references and repository links.

use super::expiry::expiry_sql;
use super::repos::{ensure_repo, repo_id, RepoKey};
use super::{Metadata, MetadataError};
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

/// A cached manifest as served.
#[derive(Debug, Clone)]
pub struct ManifestRecord {
    pub digest: String,
    pub media_type: String,
    pub body: Bytes,
}

/// A verified manifest about to be cached.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub digest: String,
    pub media_type: String,
    pub body: Bytes,
    pub config: Option<String>,
    pub blobs: Vec<String>,
    pub children: Vec<String>,
    pub subject: Option<String>,
    /// The image config's `created`, when the config is already cached.
    pub created: Option<i64>,
}

pub(super) fn manifest_by_digest(
    c: &Connection,
    digest: &str,
) -> Result<Option<ManifestRecord>, MetadataError> {
    Ok(super::row(
        c,
        "SELECT media_type, body FROM manifests WHERE digest = ?1",
        [digest],
        |r| {
            Ok(ManifestRecord {
                digest: digest.to_owned(),
                media_type: r.get(0)?,
                body: Bytes::from(r.get::<_, Vec<u8>>(1)?),
            })
        },
    )
    .optional()?)
}

impl Metadata {
    /// The manifest `digest` if it is cached and linked to `repo` (I7).
    pub async fn linked_manifest(
        &self,
        repo: &RepoKey,
        digest: &str,
    ) -> Result<Option<ManifestRecord>, MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_owned());
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let linked: bool = super::row(
                c,
                "SELECT EXISTS (SELECT 1 FROM repo_manifests WHERE repo_id = ?1 AND digest = ?2)",
                params![id, digest],
                |r| r.get(0),
            )?;
            if linked {
                manifest_by_digest(c, &digest)
            } else {
                Ok(None)
            }
        })
        .await
    }

    /// Caches a verified manifest under `repo`, and points `tag` at it, in one transaction.
    pub async fn store_manifest(
        &self,
        repo: &RepoKey,
        tag: Option<String>,
        m: NewManifest,
        now: i64,
    ) -> Result<(), MetadataError> {
        let repo = repo.clone();
        self.write(move |tx| {
            let id = ensure_repo(tx, &repo, now)?;
            cache_manifest(tx, id, &m, now)?;
            if let Some(tag) = tag {
                set_tag(tx, id, &tag, &m.digest, now)?;
            }
            // A pinned image's manifests arrive one by one (an index, then its children):
            // each takes its pin as it is cached.
            if super::pins::has_pins(tx, &repo)? {
                super::pins::refresh(tx, id, &repo, now)?;
            }
            Ok(())
        })
        .await
    }

    /// Records an image config's `created` time on the manifests that use it.
    pub async fn set_created(&self, manifests: Vec<String>, created: i64) -> Result<(), MetadataError> {
        self.write(move |tx| {
            let mut stmt = tx.prepare_cached("UPDATE manifests SET created = ?2 WHERE digest = ?1")?;
            for m in &manifests {
                stmt.execute(params![m, created])?;
            }
            Ok(())
        })
        .await
    }

    /// The recorded `created` time of a manifest, if known (for tests and later policies).
    pub async fn manifest_created(&self, digest: &str) -> Result<Option<i64>, MetadataError> {
        let digest = digest.to_owned();
        self.read(move |c| {
            Ok(super::row(
                c,
                "SELECT created FROM manifests WHERE digest = ?1",
                [&digest],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
        })
        .await
    }
}

/// Inserts a verified manifest (once, with its references) and links it to repository
/// `repo_id`, its expiry set from the upstream's ttl.
pub(super) fn cache_manifest(
    tx: &Transaction<'_>,
    repo_id: i64,
    m: &NewManifest,
    now: i64,
) -> Result<(), MetadataError> {
    let size = i64::try_from(m.body.len()).unwrap_or(i64::MAX);
    let inserted = tx.execute(
        "INSERT INTO manifests (digest, media_type, size_bytes, body, config_digest, created, subject_digest, cached_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (digest) DO NOTHING",
        params![m.digest, m.media_type, size, &m.body[..], m.config, m.created, m.subject, now],
    )?;
    if inserted > 0 {
        let mut refs = tx.prepare_cached(
            "INSERT INTO manifest_refs (manifest_digest, ref_digest, kind) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )?;
        for b in &m.blobs {
            refs.execute(params![m.digest, b, "blob"])?;
        }
        for child in &m.children {
            refs.execute(params![m.digest, child, "manifest"])?;
        }
    }
    tx.execute(
        &format!(
            "INSERT INTO repo_manifests (repo_id, digest, cached_at, last_used_at, expires_at)
             VALUES (?1, ?2, ?3, ?3, {})
             ON CONFLICT (repo_id, digest) DO UPDATE SET last_used_at = max(last_used_at, excluded.last_used_at),
                 expires_at = CASE WHEN pinned = 1 THEN NULL ELSE excluded.expires_at END, deferred = 0",
            expiry_sql("?3", "?1")
        ),
        params![repo_id, m.digest, now],
    )?;
    Ok(())
}

/// Points `tag` of repository `repo_id` at the manifest `digest`.
pub(super) fn set_tag(
    tx: &Transaction<'_>,
    repo_id: i64,
    tag: &str,
    digest: &str,
    now: i64,
) -> Result<(), MetadataError> {
    tx.execute(
        &format!(
            "INSERT INTO tags (repo_id, name, digest, cached_at, last_used_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?4, {})
             ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest,
                cached_at = CASE WHEN digest = excluded.digest THEN cached_at ELSE excluded.cached_at END,
                last_used_at = excluded.last_used_at,
                expires_at = CASE WHEN pinned = 1 THEN NULL ELSE excluded.expires_at END, deferred = 0",
            expiry_sql("?4", "?1")
        ),
        params![repo_id, tag, digest, now],
    )?;
    Ok(())
}
