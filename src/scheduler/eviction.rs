//! Size-bound eviction: past `storage.max_size`, the least recently used blobs (with the
//! tags and manifests that need them) are expired through the deletion pipeline until the
//! low watermark is reached. Blobs being served right now are never chosen.

use super::Scheduler;
use crate::metadata::now_secs;
use std::time::Duration;

/// How often stored bytes are compared with the bound. A sum over the blobs table; every
/// ten seconds is cheap even at a million blobs.
const CHECK_EVERY: Duration = Duration::from_secs(10);

pub(super) async fn run(s: Scheduler) {
    let Some((high, low)) = s.settings.size_bound else {
        return;
    };
    loop {
        if s.pause(CHECK_EVERY).await {
            return;
        }
        match evict_over_bound(&s, high, low).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(
                    blobs.evicted = n,
                    max_size_bytes = high,
                    "evicted least recently used blobs"
                );
                s.deletes_due.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "eviction pass failed; retrying"),
        }
    }
}

/// Evicts until stored bytes are at most `low`, when they are over `high`. Returns how
/// many blobs were queued for deletion.
pub(super) async fn evict_over_bound(
    s: &Scheduler,
    high: u64,
    low: u64,
) -> Result<u64, crate::metadata::MetadataError> {
    let stored = s.meta.stored_bytes().await?;
    if stored <= high {
        return Ok(0);
    }
    if !s.settings.deletes_enabled {
        tracing::warn!(
            stored_bytes = stored,
            max_size_bytes = high,
            "over storage.max_size but deletes are off"
        );
        return Ok(0);
    }
    let (queued, _) = s
        .meta
        .evict_lru(stored - low, s.active.snapshot(), now_secs())
        .await?;
    if queued == 0 {
        tracing::warn!(
            stored_bytes = stored,
            max_size_bytes = high,
            "over storage.max_size but nothing can be evicted: what is stored is pinned or being served"
        );
    }
    Ok(queued)
}
