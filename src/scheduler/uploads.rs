//! Stale multipart uploads (I2): those a failed write or a dead process left open are
//! aborted within a minute, and by every reconciliation pass (`regcache fsck` included).
//! They are never a live write's: those stay on their write intent until they complete
//! or are abandoned.

use super::Scheduler;
use crate::metadata::MetadataError;
use crate::storage::OpenUpload;
use std::time::Duration;

/// How often the stale-upload table is looked at; one indexed read when it is empty.
const CHECK_EVERY: Duration = Duration::from_secs(60);
/// Uploads aborted per pass; the next pass takes the rest.
const PER_PASS: u32 = 1000;

/// Reconciliation takes the uploads of a dead process at start-up; this loop the ones
/// failed writes leave afterwards.
pub(super) async fn run(s: Scheduler) {
    loop {
        if s.pause(CHECK_EVERY).await {
            return;
        }
        match abort_stale(&s, false).await {
            Ok((_, 0)) => {}
            Ok((_, aborted)) => tracing::info!(uploads.aborted = aborted, "aborted stale multipart uploads"),
            Err(e) => tracing::warn!(error = %e, "aborting stale multipart uploads failed; retrying"),
        }
    }
}

/// Aborts up to `PER_PASS` stale uploads (none on a dry run). Returns (found, aborted).
/// A failed abort stays on record with its error and is retried by the next pass.
pub(super) async fn abort_stale(s: &Scheduler, dry_run: bool) -> Result<(u64, u64), MetadataError> {
    let (mut found, mut aborted) = (0, 0);
    for stale in s.meta.stale_uploads(PER_PASS).await? {
        found += 1;
        if dry_run || s.shutdown.is_cancelled() {
            continue;
        }
        let upload = OpenUpload {
            key: stale.upload.key.clone(),
            id: stale.upload.id.clone(),
        };
        match s.store.abort_upload(&upload).await {
            Ok(()) => {
                s.meta.forget_stale_upload(stale.upload).await?;
                aborted += 1;
            }
            Err(e) => {
                tracing::warn!(
                    object.key = %stale.upload.key,
                    upload.id = %stale.upload.id,
                    attempts = stale.attempts + 1,
                    error = %e,
                    "could not abort a stale multipart upload; the next pass retries"
                );
                s.meta.stale_upload_failed(stale.upload, e.to_string()).await?;
            }
        }
    }
    Ok((found, aborted))
}
