//! The deletion workers (I3, I4): claim due deletes, delete the objects (bounded
//! concurrency, bulk where possible), then record the outcome. Failures keep their row and
//! back off; with deletes switched off, pending deletes wait as deferred.

use super::{Scheduler, POLL};
use crate::metadata::{now_secs, MetadataError};
use crate::oci::Digest;
use futures::StreamExt;

/// Deletes claimed per round; one bulk request on S3 takes up to 1000.
const CLAIM_BATCH: u32 = 256;
/// Longest a part of a round may take before it counts as failed; well inside the claim
/// lease, so no other worker can take the rows back while this one still might delete.
const DELETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
pub(super) use crate::metadata::DELETES_DISABLED_REASON as DISABLED_REASON;

pub(super) async fn run(s: Scheduler) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = s.deletes_due.notified() => {}
            () = s.shutdown.cancelled() => return,
        }
        if let Err(e) = run_deletes_once(&s).await {
            tracing::warn!(error = %e, "deletion pass failed; retrying");
        }
    }
}

/// Works the queue until nothing is due. Returns (deleted, failed).
pub async fn run_deletes_once(s: &Scheduler) -> Result<(u64, u64), MetadataError> {
    if !s.settings.deletes_enabled {
        s.meta.defer_pending_deletes(DISABLED_REASON).await?;
        return Ok((0, 0));
    }
    let (mut deleted, mut failed_total) = (0, 0);
    loop {
        let claimed = s.meta.claim_deletes(now_secs(), CLAIM_BATCH).await?;
        if claimed.is_empty() {
            break;
        }
        let digests: Vec<Digest> = claimed.iter().filter_map(|c| c.digest.parse().ok()).collect();
        // Rows whose digest does not parse cannot name an object: drop them as done.
        let unparsable: Vec<String> = claimed
            .iter()
            .filter(|c| c.digest.parse::<Digest>().is_err())
            .map(|c| c.digest.clone())
            .collect();
        let chunk = digests.len().div_ceil(s.settings.delete_workers).max(1);
        let parts: Vec<Vec<Digest>> = digests.chunks(chunk).map(<[Digest]>::to_vec).collect();
        let results: Vec<_> = futures::stream::iter(parts.into_iter().map(|part| {
            let store = s.store.clone();
            async move {
                match tokio::time::timeout(DELETE_TIMEOUT, store.delete_many(&part)).await {
                    Ok(outcome) => outcome,
                    // A store that never answers must not stall the queue: the part counts
                    // as failed and is retried with backoff like any failure.
                    Err(_) => (
                        Vec::new(),
                        part.iter()
                            .map(|d| (d.clone(), "storage delete timed out".to_owned()))
                            .collect(),
                    ),
                }
            }
        }))
        .buffer_unordered(s.settings.delete_workers)
        .collect()
        .await;
        let mut done: Vec<String> = unparsable;
        let mut failed = Vec::new();
        for (ok, bad) in results {
            done.extend(ok.iter().map(ToString::to_string));
            for (digest, error) in bad {
                tracing::warn!(blob.digest = %digest, error = %error, "blob delete failed; will retry");
                failed.push((digest.to_string(), error));
            }
        }
        deleted += done.len() as u64;
        failed_total += failed.len() as u64;
        let stop = !failed.is_empty();
        s.meta
            .finish_deletes(done, failed, now_secs(), s.settings.backoff)
            .await?;
        // After a failure the failed rows are not due again for a while; leave the rest
        // of the queue to the next round rather than hammer a failing store.
        if stop || s.shutdown.is_cancelled() {
            break;
        }
    }
    if deleted > 0 {
        tracing::info!(
            blobs.deleted = deleted,
            blobs.failed = failed_total,
            "deleted blobs from storage"
        );
    }
    Ok((deleted, failed_total))
}
