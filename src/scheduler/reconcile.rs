//! Reconciliation (I2): storage and metadata are made to agree. Objects nobody accounts
//! for (crash leftovers) and older than a grace period are deleted through the pipeline;
//! rows whose object is missing are repaired (unlinked, so the next pull refetches);
//! leftover temporary files go. With `verify`, stored blobs are re-hashed and mismatches
//! quarantined. Runs at server start-up, every `storage.reconcile_interval`, and as
//! `regcache fsck`. On a shared store (S3, GCS) orphans are deleted only while the
//! prefix's owner marker names this instance: under another instance's prefix they are
//! that instance's blobs, not leftovers.

use super::{deletes::DISABLED_REASON, Scheduler};
use crate::metadata::{now_secs, MetadataError};
use crate::oci::{Digest, Sha256Writer};
use crate::storage::{PrefixOwner, StorageError};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::time::Duration;

/// Listed objects checked against metadata per query batch.
const CHECK_BATCH: usize = 500;
/// Blob rows read per page when looking for missing objects.
const ROW_PAGE: u32 = 5000;
/// Temporary files younger than this are never swept, whatever `reconcile_grace` says:
/// a live transfer is writing them (start-up empties the directory anyway).
const TEMP_FILE_MIN_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, Default)]
pub struct ReconcileOptions {
    pub dry_run: bool,
    pub verify: bool,
}

/// What a pass found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileReport {
    pub objects_scanned: u64,
    pub rows_scanned: u64,
    /// Objects no row accounts for (crash leftovers), old enough to go.
    pub orphan_objects: u64,
    pub orphan_bytes: u64,
    /// Orphans queued for deletion (0 on a dry run).
    pub orphans_queued: u64,
    /// Orphans younger than the grace period, left alone this time.
    pub orphans_too_young: u64,
    /// Rows whose object is missing.
    pub missing_objects: u64,
    /// Of those, rows repaired (0 on a dry run).
    pub rows_repaired: u64,
    /// Temporary files older than the grace period (leftovers of a dead transfer).
    pub temp_files_stale: u64,
    /// Of those, removed (0 on a dry run).
    pub temp_files_removed: u64,
    pub blobs_verified: u64,
    pub blobs_corrupt: u64,
    pub blobs_quarantined: u64,
    /// The instance whose owner marker is on the store's prefix, when it is not this one:
    /// orphans were then counted but none deleted.
    pub prefix_owner: Option<String>,
    /// Multipart uploads a crash or a failed write left open (S3, GCS).
    pub stale_uploads: u64,
    /// Of those, aborted in the store (0 on a dry run).
    pub uploads_aborted: u64,
    /// Bundle imports not heard from for longer than the grace period (and 10 minutes):
    /// their holds were dropped.
    pub imports_abandoned: u64,
    /// Blobs only those imports held, queued for deletion.
    pub import_blobs_queued: u64,
    /// Work directories of imports no longer running, removed (or that would be).
    pub import_dirs_removed: u64,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("abandoning stale imports: {0}")]
    Imports(String),
}

/// Progress reporting for a terminal (`regcache fsck`); the server passes `()`.
pub trait Progress: Sync {
    fn phase(&self, _name: &str, _total: Option<u64>) {}
    fn advance(&self, _n: u64) {}
}

impl Progress for () {}

pub(super) async fn run(s: Scheduler) {
    loop {
        match reconcile(&s, ReconcileOptions::default(), &()).await {
            Ok(r) if r.prefix_owner.is_some() => tracing::error!(
                owner.instance = r.prefix_owner.as_deref().unwrap_or_default(),
                orphans.kept = r.orphan_objects,
                "the storage prefix belongs to another regcache instance: its objects were not deleted; give each instance its own prefix"
            ),
            Ok(r)
                if r.orphan_objects
                    + r.missing_objects
                    + r.temp_files_stale
                    + r.stale_uploads
                    + r.imports_abandoned
                    + r.import_dirs_removed
                    > 0 =>
            {
                tracing::info!(
                    orphans.queued = r.orphans_queued,
                    rows.repaired = r.rows_repaired,
                    temp_files.removed = r.temp_files_removed,
                    uploads.aborted = r.uploads_aborted,
                    imports.abandoned = r.imports_abandoned,
                    import_blobs.queued = r.import_blobs_queued,
                    "reconciliation repaired storage and metadata"
                );
            }
            Ok(_) => tracing::debug!("reconciliation found storage and metadata in agreement"),
            Err(e) => tracing::warn!(error = %e, "reconciliation failed"),
        }
        let interval = s.settings.reconcile_interval;
        if interval.is_zero() || s.pause(interval).await {
            return;
        }
    }
}

/// One reconciliation pass.
pub async fn reconcile(
    s: &Scheduler,
    opts: ReconcileOptions,
    progress: &dyn Progress,
) -> Result<ReconcileReport, ReconcileError> {
    let mut report = ReconcileReport {
        dry_run: opts.dry_run,
        ..ReconcileReport::default()
    };
    let now = now_secs();
    let grace = i64::try_from(s.settings.reconcile_grace.as_secs()).unwrap_or(i64::MAX);
    (report.stale_uploads, report.uploads_aborted) = super::uploads::abort_stale(s, opts.dry_run).await?;
    // Imports live beside the temporary directory (`data_dir/imports`).
    if let Some(data_dir) = s.tmp_dir.as_deref().and_then(std::path::Path::parent) {
        (
            report.imports_abandoned,
            report.import_blobs_queued,
            report.import_dirs_removed,
        ) = crate::bundle::abandon_stale_imports(&s.meta, data_dir, grace, opts.dry_run)
            .await
            .map_err(|e| ReconcileError::Imports(e.to_string()))?;
    }
    // Orphans are handled as on a dry run under a prefix another instance owns.
    if let PrefixOwner::Other { instance, .. } = prefix_owner(s, now, opts.dry_run).await? {
        report.prefix_owner = Some(instance);
    }
    let orphan_opts = ReconcileOptions {
        dry_run: opts.dry_run || report.prefix_owner.is_some(),
        ..opts
    };
    progress.phase("listing storage", None);
    let mut listed = Listed::default();
    let mut batch = Vec::new();
    let mut objects = s.store.list_blobs().boxed();
    while let Some(obj) = objects.try_next().await? {
        report.objects_scanned += 1;
        progress.advance(1);
        match obj.digest {
            Some(d) => {
                listed.insert(&d);
                batch.push((d, obj.size, obj.modified_unix));
            }
            None if now - obj.modified_unix >= grace => {
                // A stray key under the blob prefix: no digest to queue it under.
                report.orphan_objects += 1;
                report.orphan_bytes += obj.size;
                if !orphan_opts.dry_run {
                    s.store.delete_key(&obj.key).await?;
                    report.orphans_queued += 1;
                }
            }
            None => report.orphans_too_young += 1,
        }
        if batch.len() >= CHECK_BATCH {
            check_objects(s, &mut batch, now, grace, orphan_opts, &mut report).await?;
        }
        if s.shutdown.is_cancelled() {
            return Ok(report);
        }
    }
    check_objects(s, &mut batch, now, grace, orphan_opts, &mut report).await?;
    listed.seal();

    progress.phase("checking rows", None);
    let mut after = String::new();
    loop {
        let rows = s.meta.blob_rows_after(after.clone(), ROW_PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.0.clone();
        for (digest, _size) in rows {
            report.rows_scanned += 1;
            progress.advance(1);
            if listed.contains(&digest) {
                continue;
            }
            // Not listed: confirm (it may have been written since the listing).
            let Ok(parsed) = digest.parse::<Digest>() else {
                continue;
            };
            if s.store.size_of(&parsed).await?.is_some() {
                continue;
            }
            report.missing_objects += 1;
            if !opts.dry_run {
                s.meta.forget_blob(&digest).await?;
                report.rows_repaired += 1;
            }
        }
        if s.shutdown.is_cancelled() {
            return Ok(report);
        }
    }

    if let Some(tmp) = &s.tmp_dir {
        let age = s.settings.reconcile_grace.max(TEMP_FILE_MIN_AGE);
        (report.temp_files_stale, report.temp_files_removed) = sweep_temp(tmp, age, opts.dry_run);
    }
    if opts.verify {
        verify(s, &listed, opts, progress, &mut report).await?;
    }
    if report.orphans_queued + report.import_blobs_queued > 0 {
        s.deletes_due.notify_one();
    }
    Ok(report)
}

/// The owner of the store's prefix, claimed for this instance when it has no marker (not
/// on a dry run, which changes nothing).
async fn prefix_owner(s: &Scheduler, now: i64, dry_run: bool) -> Result<PrefixOwner, ReconcileError> {
    let instance = s.meta.instance_id(now).await?;
    if dry_run {
        return Ok(s.store.prefix_owner(&instance).await?);
    }
    let data_dir = s
        .tmp_dir
        .as_ref()
        .and_then(|t| t.parent())
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    Ok(s.store.claim_prefix(&instance, &data_dir, now).await?)
}

async fn check_objects(
    s: &Scheduler,
    batch: &mut Vec<(Digest, u64, i64)>,
    now: i64,
    grace: i64,
    opts: ReconcileOptions,
    report: &mut ReconcileReport,
) -> Result<(), ReconcileError> {
    if batch.is_empty() {
        return Ok(());
    }
    let digests = batch.iter().map(|(d, _, _)| d.to_string()).collect();
    let known = s.meta.accounted_digests(digests, now).await?;
    for (digest, size, modified) in batch.drain(..) {
        let d = digest.to_string();
        if known.contains(&d) {
            continue;
        }
        if now - modified < grace {
            report.orphans_too_young += 1;
            continue;
        }
        report.orphan_objects += 1;
        report.orphan_bytes += size;
        if !opts.dry_run {
            let deferred = (!s.settings.deletes_enabled).then_some(DISABLED_REASON);
            if s.meta.enqueue_delete(&d, size, "orphan", deferred, now).await? {
                report.orphans_queued += 1;
            }
        }
    }
    Ok(())
}

async fn verify(
    s: &Scheduler,
    listed: &Listed,
    opts: ReconcileOptions,
    progress: &dyn Progress,
    report: &mut ReconcileReport,
) -> Result<(), ReconcileError> {
    progress.phase("verifying blobs", Some(listed.len() as u64));
    let mut after = String::new();
    loop {
        let rows = s.meta.blob_rows_after(after.clone(), ROW_PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.0.clone();
        for (digest, _) in rows {
            let Ok(parsed) = digest.parse::<Digest>() else {
                continue;
            };
            if !listed.contains(&digest) {
                continue;
            }
            let mut hasher = Sha256Writer::default();
            let mut body = match s.store.open(&parsed, None).await {
                Ok(b) => b,
                Err(StorageError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut read_ok = true;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => hasher.update(&c),
                    Err(_) => {
                        read_ok = false;
                        break;
                    }
                }
            }
            report.blobs_verified += 1;
            progress.advance(1);
            if read_ok && hasher.finish() == parsed {
                continue;
            }
            report.blobs_corrupt += 1;
            tracing::warn!(blob.digest = %digest, "stored blob does not match its digest");
            if !opts.dry_run {
                s.store.quarantine(&parsed).await?;
                s.meta.forget_blob(&digest).await?;
                report.blobs_quarantined += 1;
            }
            if s.shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The digests a storage listing found, as sorted raw 32-byte sha256 values: a million
/// objects take 32 MB here, where a set of digest strings took about 90 MB and pushed the
/// server's peak RSS over its budget while reconciliation ran beside expiry.
#[derive(Default)]
struct Listed(Vec<[u8; 32]>);

impl Listed {
    fn insert(&mut self, digest: &Digest) {
        let mut raw = [0u8; 32];
        // Digests are validated when parsed; one that does not decode is simply not kept,
        // and its row is then confirmed against storage one by one.
        if hex::decode_to_slice(digest.hex(), &mut raw).is_ok() {
            self.0.push(raw);
        }
    }

    /// Sorts for lookups; call once the listing is complete.
    fn seal(&mut self) {
        self.0.sort_unstable();
        self.0.dedup();
    }

    fn contains(&self, digest: &str) -> bool {
        let mut raw = [0u8; 32];
        digest
            .strip_prefix("sha256:")
            .is_some_and(|hex| hex::decode_to_slice(hex, &mut raw).is_ok())
            && self.0.binary_search(&raw).is_ok()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Removes temporary files older than `grace` (none on a dry run): (stale, removed).
fn sweep_temp(dir: &std::path::Path, grace: Duration, dry_run: bool) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let (mut stale, mut removed) = (0, 0);
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= grace);
        if old {
            stale += 1;
            if !dry_run && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    (stale, removed)
}
