//! Cached referrers answers. Their keys are the client's choice (any subject digest, any
//! `artifactType` filter), so what an anonymous client can make regcache store is bounded
//! (I10): at most `PER_REPO_MAX` answers per repository, the oldest dropped first, and
//! each expires with its upstream's ttl (`expires_at`, removed by the expiry loop).

use super::expiry::expiry_sql;
use super::repos::{ensure_repo, repo_id, RepoKey};
use super::{Metadata, MetadataError};
use bytes::Bytes;
use rusqlite::{params, OptionalExtension, Transaction};

/// Answers kept per repository. They serve only while the upstream is unreachable (an
/// online request asks the upstream again), so this keeps the subjects and filters a
/// repository's clients asked for recently (a signature, an SBOM, an attestation for
/// each of a few dozen images) and caps the rows requests with invented digests or
/// artifact types can add.
pub const REFERRERS_PER_REPO_MAX: i64 = 256;

/// A cached referrers answer.
#[derive(Debug, Clone)]
pub struct ReferrersRecord {
    pub media_type: String,
    pub body: Bytes,
    pub filters_applied: Option<String>,
}

impl Metadata {
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

    /// Stores an answer (expiring at `now` + ttl) and drops the repository's oldest past
    /// `REFERRERS_PER_REPO_MAX`, in one transaction.
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
            store(tx, id, &digest, &artifact_type, &record, now)
        })
        .await
    }

    /// Removes at most `limit` answers due at `now`; returns how many went.
    pub async fn expire_referrers(&self, now: i64, limit: u32) -> Result<u64, MetadataError> {
        self.write(move |tx| {
            let due: Vec<(i64, String, String)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT repo_id, digest, artifact_type FROM referrers WHERE expires_at <= ?1 LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![now, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut remove = tx.prepare_cached(
                "DELETE FROM referrers WHERE repo_id = ?1 AND digest = ?2 AND artifact_type = ?3",
            )?;
            for (id, d, a) in &due {
                remove.execute(params![id, d, a])?;
            }
            Ok(due.len() as u64)
        })
        .await
    }
}

/// Stores an answer in repository `repo_id` (expiring at `now` + ttl) and drops the
/// repository's oldest past `REFERRERS_PER_REPO_MAX`, in the caller's transaction.
pub(super) fn store(
    tx: &Transaction<'_>,
    id: i64,
    digest: &str,
    artifact_type: &str,
    record: &ReferrersRecord,
    now: i64,
) -> Result<(), MetadataError> {
    tx.prepare_cached(&format!(
        "INSERT INTO referrers (repo_id, digest, artifact_type, media_type, body, filters_applied, fetched_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, {})
         ON CONFLICT (repo_id, digest, artifact_type) DO UPDATE SET media_type = excluded.media_type,
            body = excluded.body, filters_applied = excluded.filters_applied,
            fetched_at = excluded.fetched_at, expires_at = excluded.expires_at",
        expiry_sql("?7", "?1")
    ))?
    .execute(params![id, digest, artifact_type, record.media_type, &record.body[..], record.filters_applied, now])?;
    // The newest first; the one just stored is never the one dropped.
    let excess: Vec<(String, String)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT digest, artifact_type FROM referrers WHERE repo_id = ?1
              ORDER BY fetched_at DESC LIMIT -1 OFFSET ?2",
        )?;
        let rows = stmt.query_map(params![id, REFERRERS_PER_REPO_MAX], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut drop = tx.prepare_cached(
        "DELETE FROM referrers WHERE repo_id = ?1 AND digest = ?2 AND artifact_type = ?3
          AND NOT (digest = ?4 AND artifact_type = ?5)",
    )?;
    for (d, a) in &excess {
        drop.execute(params![id, d, a, digest, artifact_type])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::AppliedSettings;

    fn record() -> ReferrersRecord {
        ReferrersRecord {
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            body: Bytes::from_static(b"{}"),
            filters_applied: None,
        }
    }

    async fn expiries(meta: &Metadata) -> Vec<Option<i64>> {
        meta.read(|c| {
            let mut stmt = c.prepare("SELECT expires_at FROM referrers ORDER BY artifact_type")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn answers_expire_with_the_ttl_as_it_changes_and_the_oldest_go_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Metadata::open(&dir.path().join("regcache.db")).unwrap();
        let repo = RepoKey {
            upstream: "up".into(),
            name: "r".into(),
        };
        let ttl = |secs| AppliedSettings {
            ttls: vec![("up".into(), secs)],
            delete_enabled: true,
        };
        meta.apply_settings(ttl(100), 0).await.unwrap();
        // Fetched at 1000 + i: the answer of type i is the i-th oldest.
        for i in 0..REFERRERS_PER_REPO_MAX + 3 {
            meta.store_referrers(&repo, "sha256:s", &format!("t{i:04}"), record(), 1000 + i)
                .await
                .unwrap();
        }
        let kept = expiries(&meta).await;
        assert_eq!(kept.len() as i64, REFERRERS_PER_REPO_MAX);
        assert_eq!(kept[0], Some(1000 + 3 + 100), "the three oldest went");

        meta.apply_settings(ttl(0), 5000).await.unwrap();
        assert!(expiries(&meta).await.iter().all(Option::is_none), "ttl 0: never");
        meta.apply_settings(ttl(10), 5000).await.unwrap();
        assert_eq!(
            expiries(&meta).await[0],
            Some(1003 + 10),
            "from when it was fetched"
        );

        assert_eq!(meta.expire_referrers(1000 + 3 + 10, 1000).await.unwrap(), 1);
        let left = REFERRERS_PER_REPO_MAX - 1;
        assert_eq!(meta.expire_referrers(i64::MAX, 1000).await.unwrap() as i64, left);
        assert!(expiries(&meta).await.is_empty());
    }
}
