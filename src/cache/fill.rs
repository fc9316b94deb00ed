//! Filling the cache on purpose (prefetch): the pull's own paths — the shared manifest
//! fetch and revalidation HEAD, the one transfer per (repository, digest) that hashes,
//! verifies and commits (I1, I2), the upstream check before linking a blob cached for
//! another repository (I7) — waiting for the commit instead of streaming to a client.
//! Unlike a client's request, an upstream that cannot answer is an error here, never a
//! stale copy served in silence.

use super::transfer::State;
use super::{Cache, CacheError, Target};
use crate::metadata::{now_secs, BlobAccess, ManifestRecord, Use};
use crate::oci::{Digest, Reference};
use std::sync::Arc;

/// What filling one blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobFill {
    /// Already stored and linked under the repository (now linked, if it was stored for
    /// another repository and the upstream confirmed it for this one).
    Cached { size: u64 },
    /// Fetched from the upstream, verified and committed.
    Fetched { size: u64 },
    /// Fetched and verified, but not stored: its digest was being deleted at that moment
    /// (the deletion pipeline owns the key); a later run stores it.
    NotStored,
}

impl Cache {
    /// Makes the manifest `reference` of `t` current: a tag already cached costs one
    /// upstream HEAD and is fetched again only when the upstream's digest differs; a digest
    /// linked to the repository costs nothing (content-addressed). Returns the manifest
    /// and whether it was fetched. Records the use, as a pull does.
    pub async fn refresh_manifest(
        self: &Arc<Self>,
        t: &Target,
        reference: &Reference,
    ) -> Result<(ManifestRecord, bool), CacheError> {
        let tag = match reference {
            Reference::Digest(d) => {
                let key = d.to_string();
                if let Some(m) = self.meta.linked_manifest(&t.key, &key).await? {
                    self.uses.record(Use::Manifest(t.key.clone(), key));
                    return Ok((m, false));
                }
                return Ok((self.fetch_manifest(t, reference.clone()).await?, true));
            }
            Reference::Tag(tag) => tag,
        };
        let check_key = (t.key.clone(), tag.to_string());
        if let Some(cached) = self.meta.tag(&t.key, tag.as_str()).await? {
            let upstream_digest = match self.revalidate(t, tag).await {
                Err(CacheError::Upstream(e)) if e.is_not_found() => {
                    return Err(CacheError::ManifestUnknown {
                        reference: tag.to_string(),
                    })
                }
                other => other?,
            };
            if upstream_digest.as_deref() == Some(cached.manifest.digest.as_str()) {
                self.mark_checked(check_key);
                self.record_tag_use(t, tag, &cached.manifest);
                return Ok((cached.manifest, false));
            }
        }
        let m = self.fetch_manifest(t, reference.clone()).await?;
        self.mark_checked(check_key);
        Ok((m, true))
    }

    /// Makes `digest` stored and linked under `t`. A blob already there is checked to be in
    /// storage (a row without its object is repaired and fetched again, as a pull does);
    /// a missing one goes through the miss path's transfer, shared with any client asking
    /// for it at the same time. `progress` is told of bytes as they arrive.
    pub async fn fill_blob(
        self: &Arc<Self>,
        t: &Target,
        digest: &Digest,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<BlobFill, CacheError> {
        let d = digest.to_string();
        let stored = match self.meta.blob_access(&t.key, &d).await? {
            BlobAccess::Linked { size } => Some(size),
            BlobAccess::Referenced { size } => {
                self.meta.link_blob(&t.key, &d, now_secs()).await?.then_some(size)
            }
            // Cached for another repository: only the upstream may say this one has it.
            BlobAccess::Elsewhere { size } => match t.upstream.head_blob(&t.repo, digest).await {
                Ok(_) => self.meta.link_blob(&t.key, &d, now_secs()).await?.then_some(size),
                Err(e) if e.is_not_found() => return Err(CacheError::BlobUnknown { digest: d }),
                Err(e) => return Err(e.into()),
            },
            BlobAccess::Unknown => None,
        };
        if let Some(size) = stored {
            if self.store.size_of(digest).await?.is_some() {
                self.uses.record(Use::Blob(t.key.clone(), d));
                return Ok(BlobFill::Cached { size });
            }
            tracing::warn!(repo.name = %t.key, blob.digest = %digest, "blob missing from storage; refetching");
            self.meta.forget_blob(&d).await?;
        }
        let mut rx = self.join_transfer(t, digest);
        let mut reported = 0;
        let size = loop {
            let state = rx.borrow_and_update().clone();
            match state {
                State::Starting => {}
                State::Streaming { written, .. } => {
                    progress(written.saturating_sub(reported));
                    reported = reported.max(written);
                }
                State::Done { size, .. } => {
                    progress(size.saturating_sub(reported));
                    break size;
                }
                State::Failed(CacheError::Upstream(e)) if e.is_not_found() => {
                    return Err(CacheError::BlobUnknown { digest: d })
                }
                State::Failed(e) => return Err(e),
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::ShuttingDown);
            }
        };
        // A transfer that found its digest being deleted serves its clients without
        // storing: say so rather than count the blob as cached.
        Ok(match self.meta.blob_access(&t.key, &d).await? {
            BlobAccess::Linked { .. } => BlobFill::Fetched { size },
            _ => BlobFill::NotStored,
        })
    }
}
