//! Tag lists and referrers: asked of the upstream when it answers, kept for when it
//! does not (offline sites still list what they have).

use super::{Cache, CacheError, Target};
use crate::metadata::{now_secs, ReferrersRecord};
use crate::oci::Digest;
use std::sync::Arc;

/// The empty image index answered for referrers nobody has recorded.
const EMPTY_INDEX: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

impl Cache {
    /// Every tag of the repository, sorted; pagination is the caller's. Concurrent
    /// requests for one repository share one upstream walk (its pages are bounded in
    /// `upstream::Upstream::tags`).
    pub async fn tags(&self, t: &Target) -> Result<Arc<Vec<String>>, CacheError> {
        if !self.settings.offline {
            let (upstream, repo, key, meta) = (
                t.upstream.clone(),
                t.repo.clone(),
                t.key.clone(),
                self.meta.clone(),
            );
            let walked = self
                .tag_walks
                .run(t.key.clone(), move || async move {
                    crate::fault::point("cache.tag_list", repo.as_str());
                    let mut names = upstream.tags(&repo).await?;
                    names.sort();
                    names.dedup();
                    meta.store_tag_list(&key, &names, now_secs()).await?;
                    Ok(Arc::new(names))
                })
                .await;
            match walked {
                Ok(names) => return Ok(names),
                Err(CacheError::Upstream(e)) if e.is_not_found() => {
                    return Err(CacheError::NameUnknown {
                        repo: t.repo.to_string(),
                    })
                }
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(repo.name = %t.key, error = %e, "upstream unavailable; listing cached tags");
                    if let Some(names) = self.meta.known_tags(&t.key).await? {
                        return Ok(Arc::new(names));
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        self.meta
            .known_tags(&t.key)
            .await?
            .map(Arc::new)
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
