//! Pins: images exempt from ttl expiry, size eviction and cleanup policies. `pins` holds
//! what the operator asked for (a tag or a manifest digest of a repository, cached or
//! not); the `pinned` flag on tags, manifest links and blob links is derived from it here,
//! in the transaction that changes either side, and a pinned row has no due time.
//!
//! What a pin covers in its repository: the pinned tag, the manifest it points at (or the
//! pinned digest), the child manifests of a pinned index that are cached there (a
//! prefetch with a platform filter caches only some), and the blob links of all those
//! manifests. Unpinned rows become ordinary entries due at now + ttl.

use super::expiry::expiry_sql;
use super::repos::{repo_row, RepoKey};
use super::{Metadata, MetadataError};
use rusqlite::{params, Transaction};
use serde::Serialize;
use std::collections::BTreeSet;

/// Manifests followed below a pinned one, at most: an index of indexes is rare and shallow;
/// this bounds a malformed reference loop.
const PINNED_MANIFESTS_MAX: usize = 100_000;

/// Rows whose flag a change of pins set or cleared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PinnedRows {
    pub tags: u64,
    pub manifests: u64,
    pub blob_links: u64,
}

impl PinnedRows {
    pub fn total(&self) -> u64 {
        self.tags + self.manifests + self.blob_links
    }
}

/// What `pin` found.
#[derive(Debug, Clone, Serialize)]
pub struct PinOutcome {
    /// False when the same pin was already on record.
    pub new: bool,
    /// Whether the pinned tag or manifest is cached in the repository now (the pin is in
    /// effect); otherwise it takes effect when it is cached.
    pub cached: bool,
    /// The repository is being deleted: the pin applies if it is cached again.
    pub repository_deleting: bool,
    /// Rows that became pinned.
    pub pinned: PinnedRows,
}

/// What `unpin` found.
#[derive(Debug, Clone, Serialize)]
pub struct UnpinOutcome {
    /// False when no such pin was on record.
    pub existed: bool,
    /// Rows that became ordinary entries again (due at now + ttl).
    pub unpinned: PinnedRows,
}

/// A pin as `regcache pin` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PinInfo {
    pub upstream: String,
    pub repository: String,
    pub reference: String,
    pub created_at: i64,
    /// Whether the pinned tag or manifest is cached (the pin is in effect).
    pub cached: bool,
}

impl Metadata {
    /// Pins `reference` (a tag, or a manifest digest) of `repo`, cached or not, and flags
    /// what of it is cached; one transaction.
    pub async fn pin(&self, repo: &RepoKey, reference: &str, now: i64) -> Result<PinOutcome, MetadataError> {
        let (repo, reference) = (repo.clone(), reference.to_owned());
        self.write(move |tx| {
            let new = tx.execute(
                "INSERT INTO pins (upstream, repo, reference, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
                params![repo.upstream, repo.name, reference, now],
            )? > 0;
            let (cached, repository_deleting, pinned) = match repo_row(tx, &repo)? {
                Some((id, state)) if state == "active" => {
                    let (pinned, _) = refresh(tx, id, &repo, now)?;
                    (reference_cached(tx, id, &reference)?, false, pinned)
                }
                Some(_) => (false, true, PinnedRows::default()),
                None => (false, false, PinnedRows::default()),
            };
            Ok(PinOutcome {
                new,
                cached,
                repository_deleting,
                pinned,
            })
        })
        .await
    }

    /// Removes a pin; what it alone held becomes ordinary entries due at now + ttl.
    pub async fn unpin(
        &self,
        repo: &RepoKey,
        reference: &str,
        now: i64,
    ) -> Result<UnpinOutcome, MetadataError> {
        let (repo, reference) = (repo.clone(), reference.to_owned());
        self.write(move |tx| {
            let existed = tx.execute(
                "DELETE FROM pins WHERE upstream = ?1 AND repo = ?2 AND reference = ?3",
                params![repo.upstream, repo.name, reference],
            )? > 0;
            let unpinned = match repo_row(tx, &repo)? {
                Some((id, state)) if state == "active" => refresh(tx, id, &repo, now)?.1,
                _ => PinnedRows::default(),
            };
            Ok(UnpinOutcome { existed, unpinned })
        })
        .await
    }

    /// Every pin on record, with whether it is in effect.
    pub async fn pins(&self) -> Result<Vec<PinInfo>, MetadataError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT p.upstream, p.repo, p.reference, p.created_at,
                        EXISTS (SELECT 1 FROM repositories r
                                  LEFT JOIN tags t ON t.repo_id = r.id AND t.name = p.reference
                                  LEFT JOIN repo_manifests rm ON rm.repo_id = r.id AND rm.digest = p.reference
                                 WHERE r.upstream = p.upstream AND r.name = p.repo AND r.state = 'active'
                                   AND (t.name IS NOT NULL OR rm.digest IS NOT NULL))
                   FROM pins p ORDER BY p.upstream, p.repo, p.reference",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(PinInfo {
                    upstream: r.get(0)?,
                    repository: r.get(1)?,
                    reference: r.get(2)?,
                    created_at: r.get(3)?,
                    cached: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

fn reference_cached(tx: &Transaction<'_>, repo_id: i64, reference: &str) -> Result<bool, MetadataError> {
    Ok(tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM tags WHERE repo_id = ?1 AND name = ?2)
             OR EXISTS (SELECT 1 FROM repo_manifests WHERE repo_id = ?1 AND digest = ?2)",
        params![repo_id, reference],
        |r| r.get(0),
    )?)
}

/// Whether `repo` has any pin on record (cheap: a primary-key prefix).
pub(super) fn has_pins(tx: &Transaction<'_>, repo: &RepoKey) -> Result<bool, MetadataError> {
    Ok(tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM pins WHERE upstream = ?1 AND repo = ?2)")?
        .query_row(params![repo.upstream, repo.name], |r| r.get(0))?)
}

/// Flags a blob link just made as pinned when a pinned manifest of its repository names
/// it (the blobs of a pinned image arrive after its manifest). One indexed probe.
pub(super) fn pin_new_blob_link(
    tx: &Transaction<'_>,
    repo_id: i64,
    digest: &str,
) -> Result<(), MetadataError> {
    tx.prepare_cached(
        "UPDATE repo_blobs SET pinned = 1, expires_at = NULL, deferred = 0
          WHERE repo_id = ?1 AND digest = ?2 AND pinned = 0
            AND EXISTS (SELECT 1 FROM manifest_refs mr
                          JOIN repo_manifests rm ON rm.digest = mr.manifest_digest AND rm.repo_id = ?1 AND rm.pinned = 1
                         WHERE mr.ref_digest = ?2 AND mr.kind = 'blob')",
    )?
    .execute(params![repo_id, digest])?;
    Ok(())
}

/// Makes the `pinned` flags of repository `repo_id` match its pins: rows that should be
/// pinned lose their due time; rows no longer pinned are due at `now` + ttl. Returns the
/// rows pinned and the rows unpinned.
pub(super) fn refresh(
    tx: &Transaction<'_>,
    repo_id: i64,
    repo: &RepoKey,
    now: i64,
) -> Result<(PinnedRows, PinnedRows), MetadataError> {
    let strings = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<BTreeSet<String>, MetadataError> {
        let mut stmt = tx.prepare_cached(sql)?;
        let rows = stmt.query_map(p, |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    let p = params![repo_id, repo.upstream, repo.name];
    let want_tags = strings(
        "SELECT t.name FROM tags t JOIN pins p ON p.upstream = ?2 AND p.repo = ?3 AND p.reference = t.name
          WHERE t.repo_id = ?1",
        p,
    )?;
    // Manifests: the pinned tags' and the pinned digests' that are linked here, then the
    // children of those that are linked here too.
    let mut want_manifests = strings(
        "SELECT t.digest FROM tags t JOIN pins p ON p.upstream = ?2 AND p.repo = ?3 AND p.reference = t.name
          WHERE t.repo_id = ?1
         UNION
         SELECT rm.digest FROM repo_manifests rm JOIN pins p ON p.upstream = ?2 AND p.repo = ?3 AND p.reference = rm.digest
          WHERE rm.repo_id = ?1",
        p,
    )?;
    let mut frontier: Vec<String> = want_manifests.iter().cloned().collect();
    while let Some(m) = frontier.pop() {
        let children = strings(
            "SELECT mr.ref_digest FROM manifest_refs mr
               JOIN repo_manifests rm ON rm.repo_id = ?1 AND rm.digest = mr.ref_digest
              WHERE mr.manifest_digest = ?2 AND mr.kind = 'manifest'",
            params![repo_id, m],
        )?;
        for child in children {
            if want_manifests.len() >= PINNED_MANIFESTS_MAX {
                break;
            }
            if want_manifests.insert(child.clone()) {
                frontier.push(child);
            }
        }
    }
    let mut want_blobs = BTreeSet::new();
    for m in &want_manifests {
        want_blobs.extend(strings(
            "SELECT mr.ref_digest FROM manifest_refs mr
               JOIN repo_blobs rb ON rb.repo_id = ?1 AND rb.digest = mr.ref_digest
              WHERE mr.manifest_digest = ?2 AND mr.kind = 'blob'",
            params![repo_id, m],
        )?);
    }
    let mut pinned = PinnedRows::default();
    let mut unpinned = PinnedRows::default();
    for (table, key, want, pinned_n, unpinned_n) in [
        ("tags", "name", &want_tags, &mut pinned.tags, &mut unpinned.tags),
        (
            "repo_manifests",
            "digest",
            &want_manifests,
            &mut pinned.manifests,
            &mut unpinned.manifests,
        ),
        (
            "repo_blobs",
            "digest",
            &want_blobs,
            &mut pinned.blob_links,
            &mut unpinned.blob_links,
        ),
    ] {
        let have = strings(
            &format!("SELECT {key} FROM {table} WHERE repo_id = ?1 AND pinned = 1"),
            params![repo_id],
        )?;
        let mut pin = tx.prepare_cached(&format!(
            "UPDATE {table} SET pinned = 1, expires_at = NULL, deferred = 0 WHERE repo_id = ?1 AND {key} = ?2"
        ))?;
        for k in want.difference(&have) {
            *pinned_n += pin.execute(params![repo_id, k])? as u64;
        }
        let mut unpin = tx.prepare_cached(&format!(
            "UPDATE {table} SET pinned = 0, deferred = 0, expires_at = {}
              WHERE repo_id = ?1 AND {key} = ?2",
            expiry_sql("?3", "?1")
        ))?;
        for k in have.difference(want) {
            *unpinned_n += unpin.execute(params![repo_id, k, now])? as u64;
        }
    }
    Ok((pinned, unpinned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::NewManifest;

    fn key() -> RepoKey {
        RepoKey {
            upstream: "hub".into(),
            name: "team/app".into(),
        }
    }

    fn image(m: &str, blobs: &[&str]) -> NewManifest {
        NewManifest {
            digest: m.into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: bytes::Bytes::from_static(b"{}"),
            config: Some(blobs[0].into()),
            blobs: blobs.iter().map(|b| (*b).to_owned()).collect(),
            children: Vec::new(),
            subject: None,
            created: None,
        }
    }

    fn index(m: &str, children: &[&str]) -> NewManifest {
        NewManifest {
            digest: m.into(),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            body: bytes::Bytes::from_static(b"{}"),
            config: None,
            blobs: Vec::new(),
            children: children.iter().map(|c| (*c).to_owned()).collect(),
            subject: None,
            created: None,
        }
    }

    async fn open() -> (tempfile::TempDir, Metadata) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Metadata::open(&dir.path().join("regcache.db")).unwrap();
        meta.apply_settings(
            crate::metadata::AppliedSettings {
                ttls: vec![("hub".into(), 100)],
                delete_enabled: true,
            },
            1000,
        )
        .await
        .unwrap();
        (dir, meta)
    }

    async fn commit(meta: &Metadata, digest: &str, now: i64) {
        let intent = meta.begin_write(digest, now).await.unwrap().unwrap();
        meta.commit_blob(&key(), digest, 10, intent, now).await.unwrap();
    }

    /// (pinned, expires_at) of every entry row, by table and key.
    async fn flags(meta: &Metadata) -> Vec<(String, i64, Option<i64>)> {
        meta.read(|c| {
            let mut out = Vec::new();
            for (table, key) in [
                ("tags", "name"),
                ("repo_manifests", "digest"),
                ("repo_blobs", "digest"),
            ] {
                let mut stmt = c.prepare(&format!(
                    "SELECT {key}, pinned, expires_at FROM {table} ORDER BY 1"
                ))?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        format!("{table}:{}", r.get::<_, String>(0)?),
                        r.get(1)?,
                        r.get(2)?,
                    ))
                })?;
                out.extend(rows.collect::<Result<Vec<_>, _>>()?);
            }
            Ok(out)
        })
        .await
        .unwrap()
    }

    /// A pin made before anything is cached takes effect as the index, its cached child
    /// and that child's blobs arrive (a child not cached, as a platform filter leaves it,
    /// is not pinned); unpinning makes every row due at now + ttl; another tag of the same
    /// repository is never touched.
    #[tokio::test]
    async fn a_pin_made_before_caching_takes_effect_as_the_image_arrives_and_unpin_restores_expiry() {
        let (_dir, meta) = open().await;
        let out = meta.pin(&key(), "v1", 1000).await.unwrap();
        assert!(out.new && !out.cached && !out.repository_deleting);
        assert!(!meta.pins().await.unwrap()[0].cached);

        meta.store_manifest(
            &key(),
            Some("v1".into()),
            index("sha256:i", &["sha256:a", "sha256:b"]),
            1001,
        )
        .await
        .unwrap();
        meta.store_manifest(&key(), None, image("sha256:a", &["sha256:ca", "sha256:la"]), 1002)
            .await
            .unwrap();
        commit(&meta, "sha256:ca", 1003).await;
        commit(&meta, "sha256:la", 1003).await;
        // Another tag, not pinned, sharing a layer.
        meta.store_manifest(
            &key(),
            Some("other".into()),
            image("sha256:o", &["sha256:co", "sha256:la"]),
            1004,
        )
        .await
        .unwrap();
        commit(&meta, "sha256:co", 1004).await;
        let f = flags(&meta).await;
        let pinned: Vec<&str> = f.iter().filter(|r| r.1 == 1).map(|r| r.0.as_str()).collect();
        assert_eq!(
            pinned,
            [
                "tags:v1",
                "repo_manifests:sha256:a",
                "repo_manifests:sha256:i",
                "repo_blobs:sha256:ca",
                "repo_blobs:sha256:la"
            ]
        );
        assert!(
            f.iter().all(|r| (r.1 == 1) == r.2.is_none()),
            "pinned rows have no due time: {f:?}"
        );
        assert!(meta.pins().await.unwrap()[0].cached);

        // A ttl change applied at start-up (I6) reschedules ordinary rows only.
        meta.apply_settings(
            crate::metadata::AppliedSettings {
                ttls: vec![("hub".into(), 200)],
                delete_enabled: true,
            },
            1050,
        )
        .await
        .unwrap();
        let f = flags(&meta).await;
        assert!(
            f.iter().all(|r| (r.1 == 1) == r.2.is_none()),
            "after a ttl change: {f:?}"
        );
        // A use does not give a pinned row a due time back.
        meta.record_uses(vec![(crate::metadata::Use::Tag(key(), "v1".into()), 1100)])
            .await
            .unwrap();
        assert!(flags(&meta)
            .await
            .iter()
            .any(|r| r.0 == "tags:v1" && r.2.is_none()));

        let out = meta.unpin(&key(), "v1", 2000).await.unwrap();
        assert!(out.existed);
        assert_eq!(
            out.unpinned,
            PinnedRows {
                tags: 1,
                manifests: 2,
                blob_links: 2
            }
        );
        for (row, pinned, expires) in flags(&meta).await {
            assert_eq!(pinned, 0, "{row}");
            if ["tags:v1", "repo_manifests:sha256:a", "repo_blobs:sha256:ca"].contains(&row.as_str()) {
                assert_eq!(expires, Some(2200), "{row}: due at now + ttl");
            }
        }
        assert!(!meta.unpin(&key(), "v1", 2000).await.unwrap().existed);
    }

    /// A digest pin covers the manifest whatever tags say; a pinned tag that moves carries
    /// the pin to its new manifest, and the old one becomes ordinary.
    #[tokio::test]
    async fn digest_pins_hold_the_manifest_and_a_moved_tag_takes_its_pin_along() {
        let (_dir, meta) = open().await;
        meta.store_manifest(
            &key(),
            Some("v1".into()),
            image("sha256:m1", &["sha256:c1"]),
            1001,
        )
        .await
        .unwrap();
        commit(&meta, "sha256:c1", 1001).await;
        let out = meta.pin(&key(), "v1", 1002).await.unwrap();
        assert!(out.cached);
        assert_eq!(out.pinned.total(), 3);
        meta.store_manifest(
            &key(),
            Some("v1".into()),
            image("sha256:m2", &["sha256:c2"]),
            1003,
        )
        .await
        .unwrap();
        commit(&meta, "sha256:c2", 1003).await;
        let f = flags(&meta).await;
        let get = |k: &str| f.iter().find(|r| r.0 == k).cloned().unwrap();
        assert_eq!(get("repo_manifests:sha256:m2").1, 1);
        assert_eq!(get("repo_blobs:sha256:c2").1, 1);
        assert_eq!(
            get("repo_manifests:sha256:m1"),
            ("repo_manifests:sha256:m1".into(), 0, Some(1103))
        );
        assert_eq!(get("repo_blobs:sha256:c1").1, 0);

        meta.pin(&key(), "sha256:m1", 1004).await.unwrap();
        let f = flags(&meta).await;
        assert!(f
            .iter()
            .any(|r| r.0 == "repo_manifests:sha256:m1" && r.1 == 1 && r.2.is_none()));
        assert!(f.iter().any(|r| r.0 == "repo_blobs:sha256:c1" && r.1 == 1));
    }

    /// Compare-and-delete keeps a tag pinned after its evaluation, and a cleanup that
    /// deletes the tag of a digest-pinned manifest leaves the manifest and its blobs.
    #[tokio::test]
    async fn cleanup_never_deletes_a_pinned_tag_nor_unlinks_a_pinned_manifest() {
        let (_dir, meta) = open().await;
        meta.store_manifest(
            &key(),
            Some("v1".into()),
            image("sha256:m1", &["sha256:c1"]),
            1001,
        )
        .await
        .unwrap();
        meta.store_manifest(&key(), Some("x".into()), image("sha256:m2", &["sha256:c2"]), 1001)
            .await
            .unwrap();
        commit(&meta, "sha256:c1", 1001).await;
        commit(&meta, "sha256:c2", 1001).await;
        meta.pin(&key(), "v1", 1002).await.unwrap();
        meta.pin(&key(), "sha256:m2", 1002).await.unwrap();
        let (job, _) = meta
            .enqueue_job("cleanup", serde_json::json!({}), None, 5, 1003)
            .await
            .unwrap();
        let tags = vec![
            ("v1".to_owned(), "sha256:m1".to_owned()),
            ("x".to_owned(), "sha256:m2".to_owned()),
        ];
        let out = meta
            .delete_tags_if_unchanged(job, &key(), tags, 2000, 2001)
            .await
            .unwrap();
        assert_eq!(out.kept_pinned, ["v1"]);
        assert_eq!(out.deleted, ["x"]);
        assert_eq!((out.unlinked.manifests, out.unlinked.blob_links), (0, 0));
        let f = flags(&meta).await;
        for row in [
            "tags:v1",
            "repo_manifests:sha256:m1",
            "repo_manifests:sha256:m2",
            "repo_blobs:sha256:c2",
        ] {
            assert!(
                f.iter().any(|r| r.0 == row && r.1 == 1),
                "{row} kept pinned: {f:?}"
            );
        }
    }
}
