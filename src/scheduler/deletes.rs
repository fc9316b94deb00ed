//! The deletion workers (I3, I4): claim due deletes, delete the objects (bounded
//! concurrency, bulk where possible), then record the outcome. Failures keep their row and
//! back off; with deletes switched off, pending deletes wait as deferred.

use super::{Scheduler, POLL};
use crate::metadata::{now_secs, ClaimedDelete, MetadataError};
use crate::oci::Digest;
use futures::StreamExt;

/// Deletes claimed per round at first; one bulk request on S3 takes up to 1000.
const CLAIM_BATCH: u32 = 256;
/// While batches succeed the claim doubles up to this: a long queue (a mass expiry) gets
/// through in fewer writer turns, which it shares with expiry's batches. As many as one
/// expiry batch queues at most (`scheduler::expiry`'s 4000 blob links), so the deletes
/// keep pace turn for turn.
const MAX_CLAIM: u32 = 4096;
/// Longest a part of a round may take before it counts as failed; well inside the claim
/// lease, so no other worker can take the rows back while this one still might delete.
const DELETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
pub(super) use crate::metadata::DELETES_DISABLED_REASON as DISABLED_REASON;

/// What became of a batch in storage: the digests confirmed gone, and the failures with
/// their error.
type Outcome = (Vec<String>, Vec<(String, String)>);

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
///
/// A two-stage pipeline with one batch in storage at a time: while a batch's objects are
/// deleted, the writer records the previous batch's outcome and claims the next one, in
/// one transaction. Storage and SQLite work side by side, and the queue costs one writer
/// turn per batch.
pub async fn run_deletes_once(s: &Scheduler) -> Result<(u64, u64), MetadataError> {
    if !s.settings.deletes_enabled {
        s.meta.defer_pending_deletes(DISABLED_REASON).await?;
        return Ok((0, 0));
    }
    let (mut deleted, mut failed_total) = (0, 0);
    let mut in_hand = s.meta.claim_deletes(now_secs(), CLAIM_BATCH).await?;
    let mut outcome: Option<Outcome> = None;
    // After a failure the failed rows are not due again for a while; leave the rest of the
    // queue to the next round rather than hammer a failing store.
    let mut stop = false;
    let mut claim = CLAIM_BATCH;
    while !in_hand.is_empty() || outcome.is_some() {
        let batch = std::mem::take(&mut in_hand);
        let recorded = outcome.take();
        if recorded.as_ref().is_some_and(|(_, failed)| failed.is_empty()) {
            claim = claim.saturating_mul(2).min(MAX_CLAIM);
        }
        let (done, failed) = recorded.unwrap_or_default();
        deleted += done.len() as u64;
        failed_total += failed.len() as u64;
        stop |= !failed.is_empty() || s.shutdown.is_cancelled();
        // Only a batch that went to storage has an outcome to record next turn; the next
        // claim waits until this one is in storage's hands (one batch at a time).
        let next = if stop || batch.is_empty() { 0 } else { claim };
        let record = async {
            if done.is_empty() && failed.is_empty() && next == 0 {
                return Ok(Vec::new());
            }
            let now = now_secs();
            s.meta
                .finish_deletes(done, failed, now, s.settings.backoff, next)
                .await
        };
        let (claimed, result) = tokio::join!(record, delete_batch(s, &batch));
        if !batch.is_empty() {
            outcome = Some(result);
        }
        in_hand = claimed?;
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

/// Deletes one claimed batch from storage, split over the configured workers. Returns the
/// digests confirmed gone and the failures with their error (each logged).
async fn delete_batch(s: &Scheduler, claimed: &[ClaimedDelete]) -> Outcome {
    // Rows whose digest does not parse cannot name an object: drop them as done.
    let mut done: Vec<String> = Vec::new();
    let mut digests: Vec<Digest> = Vec::with_capacity(claimed.len());
    for c in claimed {
        match c.digest.parse::<Digest>() {
            Ok(d) => digests.push(d),
            Err(_) => done.push(c.digest.clone()),
        }
    }
    if digests.is_empty() {
        return (done, Vec::new());
    }
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
    let mut failed = Vec::new();
    for (ok, bad) in results {
        done.extend(ok.iter().map(ToString::to_string));
        for (digest, error) in bad {
            tracing::warn!(blob.digest = %digest, error = %error, "blob delete failed; will retry");
            failed.push((digest.to_string(), error));
        }
    }
    (done, failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ActiveBlobs;
    use crate::metadata::Metadata;
    use crate::scheduler::{JobSettings, SchedulerSettings};
    use std::sync::Arc;

    /// A scheduler over a fresh data dir with the embedded defaults (filesystem storage).
    fn scheduler(dir: &std::path::Path) -> Scheduler {
        let data_dir = dir.display().to_string();
        let config = crate::config::load(None, [("REGCACHE_SERVER__DATA_DIR".to_owned(), data_dir)]).unwrap();
        Scheduler {
            meta: Metadata::open(&dir.join("regcache.db")).unwrap(),
            store: crate::storage::build(&config.storage, dir).unwrap(),
            settings: SchedulerSettings::from_config(&config),
            tmp_dir: None,
            active: Arc::new(ActiveBlobs::default()),
            deletes_due: Arc::default(),
            jobs: JobSettings::from_config(&config),
            jobs_due: Arc::default(),
            uses: None,
            shutdown: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Queues `n` orphan deletes (more than two claims' worth) and returns their digests.
    async fn queue_orphans(s: &Scheduler, n: usize) -> Vec<Digest> {
        let mut digests = Vec::new();
        for i in 0..n {
            let d = Digest::of(format!("orphan {i}").as_bytes());
            assert!(s
                .meta
                .enqueue_delete(&d.to_string(), 1, "orphan", None, now_secs())
                .await
                .unwrap());
            digests.push(d);
        }
        digests
    }

    fn object_path(dir: &std::path::Path, d: &Digest) -> std::path::PathBuf {
        let hex = d.hex();
        dir.join("store/blobs/sha256").join(&hex[..2]).join(hex)
    }

    #[tokio::test]
    async fn the_pipeline_works_the_whole_queue_across_batches() {
        let dir = tempfile::tempdir().unwrap();
        let s = scheduler(dir.path());
        let n = CLAIM_BATCH as usize * 2 + 37;
        let digests = queue_orphans(&s, n).await;
        // Every other object exists; the rest are already gone (not-found counts as deleted).
        for d in digests.iter().step_by(2) {
            let path = object_path(dir.path(), d);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
        }
        assert_eq!(run_deletes_once(&s).await.unwrap(), (n as u64, 0));
        assert!(digests.iter().all(|d| !object_path(dir.path(), d).exists()));
        for d in &digests {
            assert_eq!(s.meta.pending_delete_state(&d.to_string()).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn after_a_failing_batch_the_pipeline_stops_claiming() {
        let dir = tempfile::tempdir().unwrap();
        let s = scheduler(dir.path());
        let n = CLAIM_BATCH as usize * 4;
        let digests = queue_orphans(&s, n).await;
        // A directory where each object should be: every unlink fails (not "not found").
        for d in &digests {
            std::fs::create_dir_all(object_path(dir.path(), d).join("inside")).unwrap();
        }
        let (deleted, failed) = run_deletes_once(&s).await.unwrap();
        assert_eq!(deleted, 0);
        // The failing batch, plus the one claimed while it was in storage's hands.
        assert!(
            failed >= u64::from(CLAIM_BATCH) && failed <= 2 * u64::from(CLAIM_BATCH),
            "{failed}"
        );
        let mut untouched = 0;
        for d in &digests {
            let (state, attempts, error) = s
                .meta
                .pending_delete_state(&d.to_string())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(state, "pending", "no claim is left behind");
            match attempts {
                0 => untouched += 1,
                1 => assert!(error.unwrap().contains("removing"), "the error is kept"),
                other => panic!("{other} attempts in one pass"),
            }
        }
        assert_eq!(
            untouched as u64,
            n as u64 - failed,
            "the rest waits for the next pass"
        );
    }
}
