//! Bundle imports (I2, I11): blobs an import committed are held (`import_blobs`) until it
//! links the images that need them, each image in one transaction; an import that stops
//! sending heartbeats is abandoned by reconciliation, and what it held and nothing else
//! uses is queued for deletion.

use super::blobs::link;
use super::expiry::enqueue_unreferenced;
use super::manifests::{cache_manifest, manifest_by_digest, set_tag, ManifestRecord, NewManifest};
use super::referrers::ReferrersRecord;
use super::repos::{ensure_repo, RepoKey};
use super::{Metadata, MetadataError};
use rusqlite::{params, OptionalExtension, Transaction};

/// What holding an already stored blob for an import found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Stored: now held for this import (a pending delete of it was cancelled).
    Stored { size: u64 },
    /// Not stored: the import writes it.
    Absent,
    /// Being deleted right now: it can be neither reused nor written until that is done.
    Deleting,
}

/// An image an import links: its manifests (the top one and the children the bundle or
/// the cache has), every blob they name, and the referrers index entries to record.
#[derive(Debug, Clone)]
pub struct ImportedImage {
    pub repo: RepoKey,
    pub tag: Option<String>,
    /// Pin this reference (the tag, or the top manifest's digest) as the image is linked.
    pub pin: Option<String>,
    pub manifests: Vec<NewManifest>,
    pub blobs: Vec<String>,
    /// (subject digest, descriptor JSON) for manifests with a `subject`.
    pub referrers: Vec<(String, serde_json::Value)>,
}

/// Why an image could not be linked; nothing of it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkRefused {
    #[error("the import was abandoned (no heartbeat for too long) and its blobs released")]
    Abandoned,
    #[error("blob {0} is no longer stored")]
    BlobMissing(String),
    #[error("blob {0} is being deleted by the cache right now")]
    BlobDeleting(String),
}

/// What abandoning stale imports did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AbandonedImports {
    pub imports: u64,
    /// Blobs they held that nothing else uses, queued for deletion.
    pub blobs_queued: u64,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Metadata {
    /// Records an import of `source` starting now; its id holds what it commits.
    pub async fn begin_import(&self, source: &str, now: i64) -> Result<i64, MetadataError> {
        let source = source.to_owned();
        self.write(move |tx| {
            Ok(tx.query_row(
                "INSERT INTO imports (source, started_at, heartbeat_at) VALUES (?1, ?2, ?2) RETURNING id",
                params![source, now],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// The import is alive; `false` when its row is gone (it was abandoned).
    pub async fn import_heartbeat(&self, import: i64, now: i64) -> Result<bool, MetadataError> {
        self.write(move |tx| {
            Ok(tx.execute(
                "UPDATE imports SET heartbeat_at = max(heartbeat_at, ?2) WHERE id = ?1",
                params![import, now],
            )? > 0)
        })
        .await
    }

    /// Holds `digest` for `import` if it is stored already, so it is not written again
    /// (a second run of an interrupted import, or content the cache had).
    pub async fn hold_stored_blob(&self, import: i64, digest: &str, now: i64) -> Result<Held, MetadataError> {
        let digest = digest.to_owned();
        self.write(move |tx| {
            let Some(size) = super::row(
                tx,
                "SELECT size_bytes FROM blobs WHERE digest = ?1",
                [&digest],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            else {
                return Ok(Held::Absent);
            };
            if deleting(tx, &digest)? {
                return Ok(Held::Deleting);
            }
            tx.execute("DELETE FROM pending_deletes WHERE digest = ?1", [&digest])?;
            hold(tx, import, &digest, now)?;
            Ok(Held::Stored { size: to_u64(size) })
        })
        .await
    }

    /// Records a verified blob the import put under its final key, held for the import
    /// (the last step of I2's write order; `intent` goes in the same transaction).
    pub async fn commit_imported_blob(
        &self,
        import: i64,
        digest: &str,
        size: u64,
        intent: i64,
        now: i64,
    ) -> Result<(), MetadataError> {
        let digest = digest.to_owned();
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        self.write(move |tx| {
            tx.execute("DELETE FROM write_intents WHERE id = ?1", [intent])?;
            tx.execute("DELETE FROM pending_deletes WHERE digest = ?1", [&digest])?;
            tx.execute(
                "INSERT INTO blobs (digest, size_bytes, cached_at, last_used_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (digest) DO UPDATE SET last_used_at = max(last_used_at, excluded.last_used_at)",
                params![digest, size, now],
            )?;
            hold(tx, import, &digest, now)?;
            Ok(())
        })
        .await
    }

    /// A manifest the cache has, whatever repository it is linked to (bodies are content
    /// addressed and were verified when cached).
    pub async fn cached_manifest(&self, digest: &str) -> Result<Option<ManifestRecord>, MetadataError> {
        let digest = digest.to_owned();
        self.read(move |c| manifest_by_digest(c, &digest)).await
    }

    /// Links one imported image in one transaction: every blob it names must be stored
    /// (a pending delete is cancelled; one in flight refuses the image), then its
    /// manifests, blob links, tag and referrers entries are recorded. Nothing is linked
    /// when it is refused.
    pub async fn link_imported_image(
        &self,
        import: i64,
        image: ImportedImage,
        now: i64,
    ) -> Result<Result<(), LinkRefused>, MetadataError> {
        self.write(move |tx| {
            let alive: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM imports WHERE id = ?1)",
                [import],
                |r| r.get(0),
            )?;
            if !alive {
                return Ok(Err(LinkRefused::Abandoned));
            }
            for digest in &image.blobs {
                let stored: bool = super::row(
                    tx,
                    "SELECT EXISTS (SELECT 1 FROM blobs WHERE digest = ?1)",
                    [digest],
                    |r| r.get(0),
                )?;
                if !stored {
                    return Ok(Err(LinkRefused::BlobMissing(digest.clone())));
                }
                if deleting(tx, digest)? {
                    return Ok(Err(LinkRefused::BlobDeleting(digest.clone())));
                }
            }
            let repo_id = ensure_repo(tx, &image.repo, now)?;
            for digest in &image.blobs {
                tx.execute("DELETE FROM pending_deletes WHERE digest = ?1", [digest])?;
                link(tx, &image.repo, digest, now)?;
            }
            for m in &image.manifests {
                cache_manifest(tx, repo_id, m, now)?;
            }
            if let (Some(tag), Some(top)) = (&image.tag, image.manifests.first()) {
                set_tag(tx, repo_id, tag, &top.digest, now)?;
            }
            for (subject, descriptor) in &image.referrers {
                add_referrer(tx, repo_id, subject, descriptor, now)?;
            }
            // A pin the bundle carries is added with the image; pins already made for the
            // repository apply to what is imported, as to what is pulled.
            if let Some(reference) = &image.pin {
                tx.execute(
                    "INSERT INTO pins (upstream, repo, reference, created_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO NOTHING",
                    params![image.repo.upstream, image.repo.name, reference, now],
                )?;
            }
            if super::pins::has_pins(tx, &image.repo)? {
                super::pins::refresh(tx, repo_id, &image.repo, now)?;
            }
            tx.execute(
                "UPDATE imports SET heartbeat_at = max(heartbeat_at, ?2) WHERE id = ?1",
                params![import, now],
            )?;
            Ok(Ok(()))
        })
        .await
    }

    /// The import is done: its holds go, and blobs it committed that no image linked are
    /// queued for deletion. Returns how many were queued.
    pub async fn finish_import(&self, import: i64, now: i64) -> Result<u64, MetadataError> {
        self.write(move |tx| release(tx, import, now, "import_unused"))
            .await
    }

    /// Abandons every import whose last heartbeat is before `cutoff`: its holds go, and
    /// what it held that nothing else uses is queued for deletion.
    pub async fn abandon_stale_imports(
        &self,
        cutoff: i64,
        now: i64,
    ) -> Result<AbandonedImports, MetadataError> {
        self.write(move |tx| {
            let stale: Vec<i64> = {
                let mut stmt = tx.prepare("SELECT id FROM imports WHERE heartbeat_at < ?1")?;
                let rows = stmt.query_map([cutoff], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut report = AbandonedImports::default();
            for import in stale {
                report.blobs_queued += release(tx, import, now, "import_abandoned")?;
                report.imports += 1;
            }
            Ok(report)
        })
        .await
    }

    /// The imports on record (running, or interrupted and not yet abandoned): id and
    /// last heartbeat.
    pub async fn imports_on_record(&self) -> Result<Vec<(i64, i64)>, MetadataError> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT id, heartbeat_at FROM imports")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

fn deleting(tx: &Transaction<'_>, digest: &str) -> Result<bool, MetadataError> {
    Ok(super::row(
        tx,
        "SELECT EXISTS (SELECT 1 FROM pending_deletes WHERE digest = ?1 AND state = 'deleting')",
        [digest],
        |r| r.get(0),
    )?)
}

/// Holds `digest` for `import`, which is alive (a heartbeat). An import abandoned meanwhile
/// (silent for longer than reconciliation allows) can hold nothing more.
fn hold(tx: &Transaction<'_>, import: i64, digest: &str, now: i64) -> Result<(), MetadataError> {
    let alive = tx
        .prepare_cached("UPDATE imports SET heartbeat_at = max(heartbeat_at, ?2) WHERE id = ?1")?
        .execute(params![import, now])?
        > 0;
    if !alive {
        return Err(MetadataError::Task(format!(
            "import {import} was abandoned (silent for too long) and its blobs released; run it again"
        )));
    }
    tx.prepare_cached("INSERT INTO import_blobs (digest, import_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING")?
        .execute(params![digest, import])?;
    Ok(())
}

/// Drops `import` and its holds; queues what it held that nothing else uses.
fn release(tx: &Transaction<'_>, import: i64, now: i64, reason: &str) -> Result<u64, MetadataError> {
    let mut held: Vec<String> = {
        let mut stmt = tx.prepare_cached("SELECT digest FROM import_blobs WHERE import_id = ?1")?;
        let rows = stmt.query_map([import], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    held.sort_unstable();
    // The holds go with the row (ON DELETE CASCADE); another import's hold still counts.
    tx.execute("DELETE FROM imports WHERE id = ?1", [import])?;
    enqueue_unreferenced(tx, &held, now, reason, None)
}

/// Adds `descriptor` to the recorded referrers answer of `subject` in the repository
/// (unfiltered), creating it when none is recorded, so clients find signatures and SBOMs
/// of imported images while offline.
fn add_referrer(
    tx: &Transaction<'_>,
    repo_id: i64,
    subject: &str,
    descriptor: &serde_json::Value,
    now: i64,
) -> Result<(), MetadataError> {
    let existing: Option<Vec<u8>> = tx
        .query_row(
            "SELECT body FROM referrers WHERE repo_id = ?1 AND digest = ?2 AND artifact_type = ''",
            params![repo_id, subject],
            |r| r.get(0),
        )
        .optional()?;
    let mut index = existing
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v["manifests"].is_array())
        .unwrap_or_else(|| {
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": crate::oci::OCI_INDEX,
                "manifests": [],
            })
        });
    if let Some(list) = index["manifests"].as_array_mut() {
        if list.iter().any(|d| d["digest"] == descriptor["digest"]) {
            return Ok(());
        }
        list.push(descriptor.clone());
    }
    let body = serde_json::to_vec(&index).map_err(|e| MetadataError::Task(e.to_string()))?;
    let record = ReferrersRecord {
        media_type: crate::oci::OCI_INDEX.to_owned(),
        body: bytes::Bytes::from(body),
        filters_applied: None,
    };
    super::referrers::store(tx, repo_id, subject, "", &record, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{now_secs, AppliedSettings};
    use bytes::Bytes;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    async fn open() -> (tempfile::TempDir, Metadata, RepoKey) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Metadata::open(&dir.path().join("regcache.db")).unwrap();
        meta.apply_settings(
            AppliedSettings {
                ttls: vec![("up".into(), 10)],
                delete_enabled: true,
            },
            now_secs(),
        )
        .await
        .unwrap();
        let repo = RepoKey {
            upstream: "up".into(),
            name: "team/app".into(),
        };
        (dir, meta, repo)
    }

    async fn commit(meta: &Metadata, import: i64, d: &str, now: i64) {
        let intent = meta.begin_write(d, now).await.unwrap().unwrap();
        meta.commit_imported_blob(import, d, 5, intent, now)
            .await
            .unwrap();
    }

    fn image(repo: &RepoKey, blobs: &[String]) -> ImportedImage {
        ImportedImage {
            repo: repo.clone(),
            tag: Some("v1".into()),
            pin: None,
            manifests: vec![NewManifest {
                digest: digest('m'),
                media_type: crate::oci::OCI_MANIFEST.into(),
                body: Bytes::from_static(b"{}"),
                config: Some(blobs[0].clone()),
                blobs: blobs.to_vec(),
                children: Vec::new(),
                subject: None,
                created: None,
            }],
            blobs: blobs.to_vec(),
            referrers: Vec::new(),
        }
    }

    async fn pending(meta: &Metadata, d: &str) -> Option<String> {
        meta.pending_delete_state(d).await.unwrap().map(|s| s.0)
    }

    /// A blob an import committed, and one it holds that the cache had, are not queued for
    /// deletion by expiry or eviction while the import runs; once linked they are ordinary
    /// cached blobs.
    #[tokio::test]
    async fn held_blobs_survive_expiry_and_eviction_until_their_image_is_linked() {
        let (_dir, meta, repo) = open().await;
        let now = now_secs();
        // `b` was cached by a pull; its link is due in 10 s.
        let intent = meta.begin_write(&digest('b'), now).await.unwrap().unwrap();
        meta.commit_blob(&repo, &digest('b'), 5, intent, now)
            .await
            .unwrap();

        let import = meta.begin_import("bundle.tar", now).await.unwrap();
        commit(&meta, import, &digest('a'), now).await;
        assert_eq!(
            meta.hold_stored_blob(import, &digest('b'), now).await.unwrap(),
            Held::Stored { size: 5 }
        );
        assert_eq!(
            meta.hold_stored_blob(import, &digest('z'), now).await.unwrap(),
            Held::Absent
        );

        // Eviction passes held blobs by: b stays linked where a pull cached it.
        assert_eq!(
            meta.evict_lru(u64::MAX, Vec::new(), now + 100).await.unwrap(),
            (0, 0)
        );
        assert_eq!(
            meta.blob_access(&repo, &digest('b')).await.unwrap(),
            crate::metadata::BlobAccess::Linked { size: 5 }
        );
        let report = meta.expire_due(now + 100, 100, true).await.unwrap();
        assert_eq!(report.blob_links, 1, "b's link expired");
        assert_eq!(report.blobs_to_delete, 0, "{report:?}");
        assert_eq!(pending(&meta, &digest('a')).await, None);
        assert_eq!(pending(&meta, &digest('b')).await, None);

        let linked = meta
            .link_imported_image(import, image(&repo, &[digest('a'), digest('b')]), now)
            .await
            .unwrap();
        assert_eq!(linked, Ok(()));
        assert_eq!(
            meta.finish_import(import, now).await.unwrap(),
            0,
            "both are linked"
        );
        assert!(meta.tag(&repo, "v1").await.unwrap().is_some());
        // Now ordinary entries: they expire by ttl.
        let report = meta.expire_due(now + 100, 100, true).await.unwrap();
        assert_eq!(report.blobs_to_delete, 2, "{report:?}");
    }

    /// An import that stops beating is abandoned: what only it held is queued for deletion,
    /// what another import still holds is not; a later link of the abandoned import is
    /// refused, as is one naming a blob that is not stored.
    #[tokio::test]
    async fn abandoned_imports_release_what_only_they_held() {
        let (_dir, meta, repo) = open().await;
        let now = now_secs();
        let dead = meta.begin_import("first.tar", now - 1000).await.unwrap();
        commit(&meta, dead, &digest('c'), now - 1000).await;
        commit(&meta, dead, &digest('d'), now - 1000).await;
        // Reset the heartbeat the commits advanced: the process died 1000 s ago.
        meta.write(move |tx| {
            tx.execute(
                "UPDATE imports SET heartbeat_at = ?2 WHERE id = ?1",
                params![dead, now - 1000],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        let rerun = meta.begin_import("first.tar", now).await.unwrap();
        assert_eq!(
            meta.hold_stored_blob(rerun, &digest('d'), now).await.unwrap(),
            Held::Stored { size: 5 }
        );

        let abandoned = meta.abandon_stale_imports(now - 600, now).await.unwrap();
        assert_eq!(
            abandoned,
            AbandonedImports {
                imports: 1,
                blobs_queued: 1
            }
        );
        assert_eq!(pending(&meta, &digest('c')).await.as_deref(), Some("pending"));
        assert_eq!(pending(&meta, &digest('d')).await, None, "the rerun holds it");
        assert_eq!(meta.imports_on_record().await.unwrap().len(), 1);

        assert_eq!(
            meta.link_imported_image(dead, image(&repo, &[digest('d')]), now)
                .await
                .unwrap(),
            Err(LinkRefused::Abandoned)
        );
        assert_eq!(
            meta.link_imported_image(rerun, image(&repo, &[digest('d'), digest('x')]), now)
                .await
                .unwrap(),
            Err(LinkRefused::BlobMissing(digest('x')))
        );
        assert!(
            meta.tag(&repo, "v1").await.unwrap().is_none(),
            "nothing of it linked"
        );
        // The rerun links, finishes, and its unused hold goes too.
        commit(&meta, rerun, &digest('e'), now).await;
        assert_eq!(
            meta.link_imported_image(rerun, image(&repo, &[digest('d')]), now)
                .await
                .unwrap(),
            Ok(())
        );
        assert_eq!(
            meta.finish_import(rerun, now).await.unwrap(),
            1,
            "e was never linked"
        );
        assert!(meta.imports_on_record().await.unwrap().is_empty());
    }
}
