//! Tag lists and referrers: asked of the upstream when it answers, kept for when it
//! does not (offline sites still list what they have).

use super::outcome::{report, Outcome};
use super::{Cache, CacheError, Target};
use crate::metadata::{now_secs, ReferrersRecord};
use crate::oci::Digest;

/// The empty image index answered for referrers nobody has recorded.
const EMPTY_INDEX: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

impl Cache {
    /// Every tag of the repository, sorted; pagination is the caller's.
    pub async fn tags(&self, t: &Target) -> Result<Vec<String>, CacheError> {
        if !self.settings.offline {
            match t.upstream.tags(&t.repo).await {
                Ok(mut names) => {
                    report(Outcome::Miss);
                    names.sort();
                    names.dedup();
                    self.meta.store_tag_list(&t.key, &names, now_secs()).await?;
                    return Ok(names);
                }
                Err(e) if e.is_not_found() => {
                    return Err(CacheError::NameUnknown {
                        repo: t.repo.to_string(),
                    })
                }
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(repo.name = %t.key, error = %e, "upstream unavailable; listing cached tags");
                    report(Outcome::Stale);
                    if let Some(names) = self.meta.known_tags(&t.key).await? {
                        return Ok(names);
                    }
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        report(Outcome::Hit);
        self.meta
            .known_tags(&t.key)
            .await?
            .ok_or_else(|| CacheError::NameUnknown {
                repo: t.repo.to_string(),
            })
    }

    /// The referrers index of `digest`, optionally filtered by artifact type.
    pub async fn referrers(
        &self,
        t: &Target,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrersRecord, CacheError> {
        let filter = artifact_type.unwrap_or_default();
        let d = digest.to_string();
        let mut unavailable = None;
        if !self.settings.offline {
            match t.upstream.referrers(&t.repo, digest, artifact_type).await {
                Ok(r) => {
                    report(Outcome::Miss);
                    let record = ReferrersRecord {
                        media_type: r.content_type,
                        body: r.body,
                        filters_applied: r.filters_applied,
                    };
                    self.meta
                        .store_referrers(&t.key, &d, filter, record.clone(), now_secs())
                        .await?;
                    return Ok(record);
                }
                Err(e) if e.is_unavailable() => unavailable = Some(e),
                Err(e) if e.is_not_found() => return Err(CacheError::ManifestUnknown { reference: d }),
                Err(e) => return Err(e.into()),
            }
        }
        report(unavailable.as_ref().map_or(Outcome::Hit, |_| Outcome::Stale));
        if let Some(record) = self.meta.referrers(&t.key, &d, filter).await? {
            return Ok(record);
        }
        match unavailable {
            Some(e) => Err(e.into()),
            None => Ok(ReferrersRecord {
                media_type: "application/vnd.oci.image.index.v1+json".into(),
                body: bytes::Bytes::from_static(EMPTY_INDEX.as_bytes()),
                filters_applied: None,
            }),
        }
    }
}
