//! Serving manifests: by digest from the cache when linked to the repository; by tag
//! after a cheap upstream HEAD (shared by concurrent requests), falling back to the
//! cached copy when the upstream cannot answer.

use super::{Cache, CacheError, Target};
use crate::metadata::{now_secs, ManifestRecord, NewManifest, Use};
use crate::oci::{config_created, parse_manifest, Digest, Reference, Tag};
use std::sync::Arc;
use std::time::Instant;

impl Cache {
    pub async fn manifest(
        self: &Arc<Self>,
        t: &Target,
        reference: &Reference,
    ) -> Result<ManifestRecord, CacheError> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(t, d).await,
            Reference::Tag(tag) => self.manifest_by_tag(t, tag).await,
        }
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        t: &Target,
        digest: &Digest,
    ) -> Result<ManifestRecord, CacheError> {
        let d = digest.to_string();
        if let Some(m) = self.meta.linked_manifest(&t.key, &d).await? {
            self.uses.record(Use::Manifest(t.key.clone(), d));
            return Ok(m);
        }
        if self.settings.offline {
            return Err(CacheError::ManifestUnknown { reference: d });
        }
        self.fetch_manifest(t, Reference::Digest(digest.clone())).await
    }

    async fn manifest_by_tag(self: &Arc<Self>, t: &Target, tag: &Tag) -> Result<ManifestRecord, CacheError> {
        let Some(cached) = self.meta.tag(&t.key, tag.as_str()).await? else {
            if self.settings.offline {
                return Err(CacheError::ManifestUnknown {
                    reference: tag.to_string(),
                });
            }
            // A fetch is as fresh as a revalidation.
            let m = self.fetch_manifest(t, Reference::Tag(tag.clone())).await?;
            self.mark_checked((t.key.clone(), tag.to_string()));
            return Ok(m);
        };
        let cached = cached.manifest;
        let check_key = (t.key.clone(), tag.to_string());
        let fresh = self.settings.offline
            || (!self.settings.revalidate_after.is_zero()
                && super::lock(&self.checked)
                    .get(&check_key)
                    .is_some_and(|at| at.elapsed() < self.settings.revalidate_after.to_std()));
        if fresh {
            self.record_tag_use(t, tag, &cached);
            return Ok(cached);
        }
        let head =
            tokio::time::timeout(self.settings.revalidate_timeout.to_std(), self.revalidate(t, tag)).await;
        let outcome = match head {
            Err(_elapsed) => Err(None),
            Ok(Ok(Some(upstream_digest))) if upstream_digest == cached.digest => Ok(()),
            // Changed upstream, or a HEAD without a digest: fetch the manifest.
            Ok(Ok(_)) => match self.fetch_manifest(t, Reference::Tag(tag.clone())).await {
                Ok(m) => {
                    self.mark_checked(check_key);
                    return Ok(m);
                }
                Err(e) if e.is_unavailable() => Err(Some(e)),
                Err(e) => return Err(e),
            },
            Ok(Err(e)) if e.is_unavailable() => Err(Some(e)),
            Ok(Err(e)) => return Err(e),
        };
        match outcome {
            Ok(()) => self.mark_checked(check_key),
            Err(e) => {
                let reason = e.map_or_else(|| "revalidation timed out".to_owned(), |e| e.to_string());
                tracing::warn!(repo.name = %t.key, tag.name = %tag, error = %reason, "upstream unavailable; serving cached manifest");
            }
        }
        self.record_tag_use(t, tag, &cached);
        Ok(cached)
    }

    pub(super) fn record_tag_use(&self, t: &Target, tag: &Tag, m: &ManifestRecord) {
        self.uses.record(Use::Tag(t.key.clone(), tag.to_string()));
        self.uses.record(Use::Manifest(t.key.clone(), m.digest.clone()));
    }

    pub(super) fn mark_checked(&self, key: (crate::metadata::RepoKey, String)) {
        if !self.settings.revalidate_after.is_zero() {
            super::lock(&self.checked).insert(key, Instant::now());
        }
    }

    /// One upstream HEAD per tag at a time; returns the upstream's digest for the tag.
    pub(super) async fn revalidate(&self, t: &Target, tag: &Tag) -> Result<Option<String>, CacheError> {
        let key = (t.key.clone(), tag.to_string());
        let (upstream, repo, tag) = (t.upstream.clone(), t.repo.clone(), tag.to_string());
        self.revalidations
            .run(key, move || async move {
                crate::fault::point("cache.revalidate", &format!("{repo}:{tag}"));
                upstream
                    .head_manifest(&repo, &tag)
                    .await
                    .map(|h| h.digest)
                    .map_err(CacheError::from)
            })
            .await
    }

    /// Fetches, verifies and caches a manifest; concurrent requests share one fetch.
    pub(super) async fn fetch_manifest(
        self: &Arc<Self>,
        t: &Target,
        reference: Reference,
    ) -> Result<ManifestRecord, CacheError> {
        let key = (t.key.clone(), reference.to_string());
        let (this, t) = (self.clone(), t.clone());
        self.manifest_fetches
            .run(key, move || async move {
                this.fetch_manifest_once(&t, &reference).await
            })
            .await
    }

    async fn fetch_manifest_once(
        &self,
        t: &Target,
        reference: &Reference,
    ) -> Result<ManifestRecord, CacheError> {
        crate::fault::point("cache.manifest_fetch", &format!("{}:{reference}", t.repo));
        let fetched = match t.upstream.get_manifest(&t.repo, &reference.to_string()).await {
            Err(e) if e.is_not_found() => {
                return Err(CacheError::ManifestUnknown {
                    reference: reference.to_string(),
                })
            }
            other => other?,
        };
        let digest = Digest::of(&fetched.body);
        // I1: a manifest asked for by digest must hash to it; one asked for by tag must
        // match the digest the upstream announced, when it announced a sha256 one.
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => fetched
                .digest_header
                .as_deref()
                .and_then(|h| h.parse::<Digest>().ok()),
        };
        if let Some(expected) = expected.filter(|e| *e != digest) {
            return Err(CacheError::DigestMismatch {
                expected: expected.to_string(),
                actual: digest.to_string(),
            });
        }
        let parsed = parse_manifest(&fetched.body, fetched.content_type.as_deref())
            .map_err(|e| CacheError::ManifestInvalid(e.to_string()))?;
        let created = match &parsed.config {
            Some(config) => self
                .store
                .read_small(config, super::transfer::CONFIG_MAX_BYTES)
                .await
                .ok()
                .flatten()
                .and_then(|bytes| config_created(&bytes)),
            None => None,
        };
        let record = ManifestRecord {
            digest: digest.to_string(),
            media_type: parsed.media_type.clone(),
            body: fetched.body.clone(),
        };
        let tag = match reference {
            Reference::Tag(tag) => Some(tag.to_string()),
            Reference::Digest(_) => None,
        };
        let strings = |v: &[Digest]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        self.meta
            .store_manifest(
                &t.key,
                tag,
                NewManifest {
                    digest: record.digest.clone(),
                    media_type: parsed.media_type,
                    body: fetched.body,
                    config: parsed.config.as_ref().map(ToString::to_string),
                    blobs: strings(&parsed.blobs),
                    children: strings(&parsed.children),
                    subject: parsed.subject.as_ref().map(ToString::to_string),
                    created,
                },
                now_secs(),
            )
            .await?;
        tracing::info!(repo.name = %t.key, manifest.reference = %reference, manifest.digest = %record.digest, "manifest cached");
        Ok(record)
    }
}
