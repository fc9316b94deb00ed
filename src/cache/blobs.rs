//! Serving blobs: hits from storage, misses through one shared transfer, and blobs cached
//! for another repository only after the upstream confirms them for this one (I7).

use super::transfer::{follow, wait_started};
use super::{Cache, CacheError, Target};
use crate::metadata::{now_secs, BlobAccess, Use};
use crate::oci::Digest;
use crate::storage::{BlobBody, StorageError};
use std::ops::Range;
use std::sync::Arc;

/// A single byte range as a client asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-b` (inclusive) or `bytes=a-`.
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// The half-open range this selects in a blob of `size` bytes.
    pub fn resolve(self, size: u64) -> Result<Range<u64>, CacheError> {
        let r = match self {
            Self::From { start, end } => start..end.map_or(size, |e| e.saturating_add(1).min(size)),
            Self::Suffix(n) => size.saturating_sub(n)..size,
        };
        if r.start >= r.end {
            return Err(CacheError::RangeNotSatisfiable { size });
        }
        Ok(r)
    }
}

/// What the HTTP layer sends back for a blob.
pub struct BlobResponse {
    /// The blob's full size, when known.
    pub size: Option<u64>,
    /// The part being sent, when a range was asked for and honoured.
    pub range: Option<Range<u64>>,
    /// `None` for HEAD.
    pub body: Option<BlobBody>,
}

impl std::fmt::Debug for BlobResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobResponse")
            .field("size", &self.size)
            .field("range", &self.range)
            .field("streaming", &self.body.is_some())
            .finish()
    }
}

impl Cache {
    /// GET (`head == false`) or HEAD of a blob under `t`.
    pub async fn blob(
        self: &Arc<Self>,
        t: &Target,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<BlobResponse, CacheError> {
        let d = digest.to_string();
        let stored = match self.meta.blob_access(&t.key, &d).await? {
            BlobAccess::Linked { size } => Some(size),
            // Linking cancels a pending delete (a rescue); a blob being deleted right now
            // is fetched again instead.
            BlobAccess::Referenced { size } => {
                self.meta.link_blob(&t.key, &d, now_secs()).await?.then_some(size)
            }
            BlobAccess::Elsewhere { size } => {
                if self.settings.offline {
                    return Err(CacheError::BlobUnknown { digest: d });
                }
                // Cached for another repository: only the upstream may say this one has it.
                match t.upstream.head_blob(&t.repo, digest).await {
                    Ok(_) => self.meta.link_blob(&t.key, &d, now_secs()).await?.then_some(size),
                    Err(e) if e.is_not_found() => return Err(CacheError::BlobUnknown { digest: d }),
                    Err(e) => return Err(e.into()),
                }
            }
            BlobAccess::Unknown => None,
        };
        if let Some(size) = stored {
            match self.serve_stored(t, digest, size, range, head).await {
                Err(CacheError::Storage(e)) if matches!(*e, StorageError::NotFound { .. }) => {
                    // The row claimed an object storage does not have (I2): repair the row
                    // and fetch again.
                    tracing::warn!(repo.name = %t.key, blob.digest = %digest, "blob missing from storage; refetching");
                    self.meta.forget_blob(&d).await?;
                }
                other => return other,
            }
        }
        if self.settings.offline {
            return Err(CacheError::BlobUnknown { digest: d });
        }
        if head {
            let size = match t.upstream.head_blob(&t.repo, digest).await {
                Ok(size) => size,
                Err(e) if e.is_not_found() => return Err(CacheError::BlobUnknown { digest: d }),
                Err(e) => return Err(e.into()),
            };
            return Ok(BlobResponse {
                size,
                range: None,
                body: None,
            });
        }
        self.serve_transfer(t, digest, range).await
    }

    async fn serve_stored(
        &self,
        t: &Target,
        digest: &Digest,
        size: u64,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<BlobResponse, CacheError> {
        let range = range.map(|r| r.resolve(size)).transpose()?;
        let body = if head {
            if self.store.size_of(digest).await?.is_none() {
                return Err(StorageError::NotFound {
                    key: digest.to_string(),
                }
                .into());
            }
            None
        } else {
            // Held before the object is opened and until the body ends: eviction never
            // picks a blob being served, from storage as from a transfer.
            let guard = self.active.hold(&digest.to_string());
            let body = self.store.open(digest, range.clone()).await?;
            Some(hold_while_streaming(body, guard))
        };
        self.uses.record(Use::Blob(t.key.clone(), digest.to_string()));
        Ok(BlobResponse {
            size: Some(size),
            range,
            body,
        })
    }

    async fn serve_transfer(
        self: &Arc<Self>,
        t: &Target,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobResponse, CacheError> {
        let mut rx = self.join_transfer(t, digest);
        let size = match wait_started(&mut rx).await {
            Ok(size) => size,
            Err(CacheError::Upstream(e)) if e.is_not_found() => {
                return Err(CacheError::BlobUnknown {
                    digest: digest.to_string(),
                })
            }
            Err(e) => return Err(e),
        };
        // Without a size from the upstream a range cannot be resolved yet: send it all.
        let range = match (range, size) {
            (Some(r), Some(size)) => Some(r.resolve(size)?),
            _ => None,
        };
        let (start, end) = range.as_ref().map_or((0, None), |r| (r.start, Some(r.end)));
        let guard = self.active.hold(&digest.to_string());
        Ok(BlobResponse {
            size,
            range,
            body: Some(hold_while_streaming(follow(rx, start, end), guard)),
        })
    }
}

/// Keeps `guard` alive until the body is finished or dropped.
fn hold_while_streaming(body: BlobBody, guard: super::ActiveGuard) -> BlobBody {
    use futures::StreamExt;
    body.map(move |chunk| {
        let _held = &guard;
        chunk
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_like_rfc_9110() {
        let from = |start, end| ByteRange::From { start, end };
        assert_eq!(from(0, Some(9)).resolve(100).unwrap(), 0..10);
        assert_eq!(from(90, None).resolve(100).unwrap(), 90..100);
        assert_eq!(from(90, Some(500)).resolve(100).unwrap(), 90..100);
        assert_eq!(ByteRange::Suffix(10).resolve(100).unwrap(), 90..100);
        assert_eq!(ByteRange::Suffix(500).resolve(100).unwrap(), 0..100);
        assert!(from(100, None).resolve(100).is_err());
        assert!(ByteRange::Suffix(0).resolve(100).is_err());
        assert!(from(0, None).resolve(0).is_err());
    }
}
