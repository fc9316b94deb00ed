//! The miss path: one upstream GET per (repository, digest), run as its own task so it
//! completes even if its first client leaves. Bytes reach the waiting clients from memory
//! as they arrive (`window.rs`) while, behind them, one blocking job at a time writes
//! them to a temporary file and hashes them; a client joining late reads the written
//! prefix from the file, then continues from memory. Only verified content is committed
//! (I1), and each client's last byte is withheld until then, so a mismatch or truncation
//! fails every client that saw the bytes. When the temporary file cannot be written (a
//! full disk, a quota, an I/O error) the transfer passes through: the clients already
//! waiting still get the complete, verified bytes, nothing is cached, the file goes (I10).

mod follower;
mod window;

use super::{Cache, CacheError, Target, TransferKey};
use crate::metadata::now_secs;
use crate::oci::{config_created, Digest, Sha256Writer};
use crate::storage::{is_out_of_space, BlobBody};
use follower::read_at;
pub(super) use follower::Follower;
use futures::{FutureExt, StreamExt};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
pub(super) use window::Transfer as SharedTransfer;
use window::{Batch, Transfer};

/// Bytes hashed, or written, per blocking job, at most: big enough that a job's cost is
/// the work, small enough that hashing and writing stay close behind the network. One
/// hashing and one writing job run at a time per transfer, side by side (each costs about
/// as much CPU as the other; one after the other, they were the slowest part).
const JOB_BYTES: u64 = 1024 * 1024;
/// Image configs larger than this are not parsed for `created`.
pub(super) const CONFIG_MAX_BYTES: u64 = 1024 * 1024;

/// How a transfer that did not fail ended.
enum Ended {
    Cached(u64),
    /// Verified and served, not cached (passed through, or the commit failed).
    Served(u64),
    /// Passing through with no client left to serve: stopped.
    Abandoned,
}

/// A blocking job: its result, once joined.
type Job<T> = Option<tokio::task::JoinHandle<T>>;

impl Cache {
    /// Follows the transfer of `digest` for `t` from byte 0, starting it if none is
    /// running (or the running one passes through and has let byte 0 go).
    pub(super) fn join_transfer(self: &Arc<Self>, t: &Target, digest: &Digest) -> Follower {
        let key: TransferKey = (t.key.clone(), digest.clone());
        let mut transfers = super::lock(&self.transfers);
        if let Some(follower) = transfers.get(&key).and_then(|tr| tr.follow()) {
            self.transfer_joins.inc();
            return follower;
        }
        let (transfer, follower) = Transfer::with_follower();
        transfers.insert(key.clone(), transfer.clone());
        drop(transfers);
        let (this, t, digest) = (self.clone(), t.clone(), digest.clone());
        self.tasks
            .spawn(async move { this.run_transfer(t, digest, key, transfer).await });
        follower
    }

    /// Removes `tr` from the running transfers, unless another took its key already.
    fn forget_transfer(&self, key: &TransferKey, tr: &Arc<Transfer>) {
        let mut transfers = super::lock(&self.transfers);
        if transfers.get(key).is_some_and(|t| Arc::ptr_eq(t, tr)) {
            transfers.remove(key);
        }
    }

    async fn run_transfer(self: Arc<Self>, t: Target, digest: Digest, key: TransferKey, tr: Arc<Transfer>) {
        let tmp = self.tmp_dir.join(format!("{}.part", ulid::Ulid::new()));
        let started = std::time::Instant::now();
        // The write intent being held, so that a panic does not leave it behind. (One a
        // shutdown leaves is cleared at the next start, like a crash's.)
        let intent = Mutex::new(None);
        let mut panic = false;
        let result = tokio::select! {
            r = AssertUnwindSafe(self.download(&t, &digest, &key, &tr, &tmp, &intent)).catch_unwind() => {
                r.unwrap_or_else(|p| {
                    panic = true;
                    Err(panicked(&t, &digest, p.as_ref()))
                })
            }
            () = self.shutdown.cancelled() => Err(CacheError::ShuttingDown),
        };
        // On the filesystem backend a committed file was renamed away; elsewhere, and on
        // failure, the temporary file goes now (followers keep their open handle).
        let _ = tokio::fs::remove_file(&tmp).await;
        let held = super::lock(&intent).take();
        if let (true, Some(id)) = (panic, held) {
            let _ = self.meta.abandon_write(id).await;
        }
        self.forget_transfer(&key, &tr);
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(Ended::Cached(size)) => {
                tracing::info!(repo.name = %t.key, blob.digest = %digest, size_bytes = size, duration_ms, "blob cached");
                tr.complete(size);
            }
            Ok(Ended::Served(size)) => {
                tracing::info!(repo.name = %t.key, blob.digest = %digest, size_bytes = size, duration_ms, "blob served without caching");
                tr.complete(size);
            }
            Ok(Ended::Abandoned) => {
                tracing::info!(repo.name = %t.key, blob.digest = %digest, "no client waits for a blob that is not being cached; transfer stopped");
                tr.fail(CacheError::ShuttingDown);
            }
            // An unreachable upstream is warned about once per cause where it becomes the
            // client's 503 (`upstream::warn_unavailable`), not once per blob.
            Err(
                e @ CacheError::Upstream(
                    crate::upstream::UpstreamError::Unreachable { .. }
                    | crate::upstream::UpstreamError::Timeout { .. },
                ),
            ) => {
                tracing::debug!(repo.name = %t.key, blob.digest = %digest, error = %e, "blob fetch failed");
                tr.fail(e);
            }
            Err(e) => {
                tracing::warn!(repo.name = %t.key, blob.digest = %digest, error = %e, "blob fetch failed");
                tr.fail(e);
            }
        }
    }

    async fn download(
        &self,
        t: &Target,
        digest: &Digest,
        key: &TransferKey,
        tr: &Arc<Transfer>,
        tmp: &Path,
        intent: &Mutex<Option<i64>>,
    ) -> Result<Ended, CacheError> {
        let resp = t.upstream.get_blob(&t.repo, digest).await?;
        let size = resp.content_length();
        let max = self.settings.max_blob_size;
        // Refused before a byte of the body is read; dropping the answer closes it.
        if let Some(size) = size.filter(|s| *s > max) {
            return Err(CacheError::BlobTooLarge { size, max });
        }
        // Without a Content-Length, caching stops where the room under the size bound ends.
        let cache_limit = match size {
            Some(size) => size,
            None => self.room_for_unsized().await,
        };
        let file = self.open_temp(tmp, size).await;
        tr.start(size, file.clone());
        if file.is_none() {
            // A late client could not get the bytes this one lets go: it starts its own.
            self.forget_transfer(key, tr);
        }
        let upstream_err = |e: reqwest::Error| {
            CacheError::Upstream(crate::upstream::UpstreamError::from_reqwest(&t.upstream.name, &e))
        };
        let mut stream = resp.bytes_stream();
        let mut hasher = Some(Sha256Writer::default());
        let mut hashing: Job<(Sha256Writer, u64)> = None;
        let mut writing: Job<(u64, std::io::Result<()>)> = None;
        let mut ended = false;
        let mut moved = tr.watch_followers();
        loop {
            if hashing.is_none() {
                if let Some(batch) = tr.next_to_hash(JOB_BYTES) {
                    let h = hasher.take().unwrap_or_default();
                    hashing = Some(tokio::task::spawn_blocking(move || hash(batch, h)));
                }
            }
            if writing.is_none() {
                if let Some((file, batch)) = tr.next_to_write(JOB_BYTES) {
                    writing = Some(tokio::task::spawn_blocking(move || write(&file, batch)));
                }
            }
            if ended && hashing.is_none() && writing.is_none() {
                break;
            }
            if !tr.is_caching() && tr.followers() == 0 {
                return Ok(Ended::Abandoned);
            }
            let can_read = !ended && tr.has_room();
            moved.borrow_and_update();
            tokio::select! {
                done = joined(&mut hashing) => {
                    hashing = None;
                    let (h, len) = done?;
                    hasher = Some(h);
                    tr.hashed(len);
                }
                done = joined(&mut writing) => {
                    writing = None;
                    match done? {
                        (len, Ok(())) => tr.written(len),
                        (_, Err(e)) => {
                            if tr.is_caching() {
                                tr.stop_caching();
                                self.pass_through(key, tr, tmp, size.unwrap_or(0), &e, is_out_of_space(&e)).await;
                            }
                        }
                    }
                }
                next = stream.next(), if can_read => match next {
                    None => ended = true,
                    Some(chunk) => {
                        let chunk = chunk.map_err(upstream_err)?;
                        t.upstream.stats.fetched(chunk.len() as u64);
                        let received = tr.received() + chunk.len() as u64;
                        if let Some(expected) = size.filter(|s| received > *s) {
                            return Err(CacheError::Truncated { expected, received });
                        }
                        if received > max {
                            return Err(CacheError::BlobTooLarge { size: received, max });
                        }
                        if received > cache_limit && tr.is_caching() {
                            tr.stop_caching();
                            let why = format!("a blob sent without Content-Length grew past the {cache_limit} bytes storage.max_size leaves");
                            self.pass_through(key, tr, tmp, received, &why, false).await;
                        }
                        tr.push(chunk);
                        crate::fault::point("cache.transfer", &digest.to_string());
                    }
                },
                _ = moved.changed(), if !can_read && !ended => {}
            }
        }
        let received = tr.received();
        if let Some(expected) = size.filter(|s| *s != received) {
            return Err(CacheError::Truncated { expected, received });
        }
        let actual = hasher.take().unwrap_or_default().finish();
        if actual != *digest {
            return Err(CacheError::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        let Some(file) = file.filter(|_| tr.is_caching()) else {
            return Ok(Ended::Served(received));
        };
        match self.commit(t, digest, tmp, &file, received, intent).await {
            Ok(true) => Ok(Ended::Cached(received)),
            Ok(false) => Ok(Ended::Served(received)),
            Err(e) => {
                // The bytes are verified: the clients get them, only caching is lost.
                if super::out_of_space(&e) {
                    self.disk.out_of_space("blob commit", received, &e);
                } else {
                    tracing::warn!(repo.name = %t.key, blob.digest = %digest, error = %e, "could not cache a verified blob; served without caching");
                }
                Ok(Ended::Served(received))
            }
        }
    }

    /// Gives up caching: late clients start their own transfer, the temporary file goes
    /// (its open handle stays readable for the clients behind), and the reason is logged,
    /// once per episode when the disk is full.
    async fn pass_through(
        &self,
        key: &TransferKey,
        tr: &Arc<Transfer>,
        tmp: &Path,
        needed_bytes: u64,
        why: &(dyn std::fmt::Display + Sync),
        out_of_space: bool,
    ) {
        self.forget_transfer(key, tr);
        let _ = tokio::fs::remove_file(tmp).await;
        if out_of_space {
            self.disk.out_of_space("blob temporary file", needed_bytes, why);
        } else {
            tracing::warn!(repo.name = %key.0, blob.digest = %key.1, error = %why, "cannot cache this blob; passing it through");
        }
    }

    /// The temporary file, or `None` to pass through: when the blob will not fit in the
    /// free space, or the file cannot be created.
    async fn open_temp(&self, tmp: &Path, size: Option<u64>) -> Option<Arc<File>> {
        if let (Some(size), Ok(space)) = (size, crate::storage::space(&self.tmp_dir)) {
            if space.free_bytes < size {
                let why = format!("{size} bytes needed, {} free", space.free_bytes);
                self.disk.out_of_space("blob temporary file", size, &why);
                return None;
            }
        }
        match create_tmp(tmp.to_owned()).await {
            Ok(file) => Some(Arc::new(file)),
            Err(e) if is_out_of_space(&e) => {
                self.disk
                    .out_of_space("blob temporary file", size.unwrap_or(0), &e);
                None
            }
            Err(e) => {
                tracing::warn!(path = %tmp.display(), error = %e, "cannot create a temporary file; passing the blob through");
                None
            }
        }
    }

    /// For a blob of unknown size: `storage.max_blob_size`, and no more than the room the
    /// size bound leaves.
    async fn room_for_unsized(&self) -> u64 {
        let max = self.settings.max_blob_size;
        let Some(bound) = self.settings.max_size else {
            return max;
        };
        match self.meta.stored_bytes().await {
            Ok(stored) => max.min(bound.saturating_sub(stored)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored bytes; a blob of unknown size is passed through");
                0
            }
        }
    }

    /// I2's order: verified temp file -> write intent -> final key -> commit row. The
    /// intent keeps the deletion pipeline off this digest until the row is committed.
    /// `Ok(false)`: the digest is being deleted, so it is served without caching.
    async fn commit(
        &self,
        t: &Target,
        digest: &Digest,
        tmp: &Path,
        file: &Arc<File>,
        size: u64,
        intent_slot: &Mutex<Option<i64>>,
    ) -> Result<bool, CacheError> {
        let d = digest.to_string();
        let Some(intent) = self.meta.begin_write(&d, now_secs()).await? else {
            tracing::warn!(repo.name = %t.key, blob.digest = %digest, "blob is being deleted; served without caching");
            return Ok(false);
        };
        *super::lock(intent_slot) = Some(intent);
        let committed = async {
            // A multipart upload is on record before its first part is sent (I2).
            let upload = self.store.open_upload(digest, size).await?;
            if let Some(u) = &upload {
                if let Err(e) = self.meta.record_upload(intent, u.key.clone(), u.id.clone()).await {
                    let _ = self.store.abort_upload(u).await;
                    return Err(e.into());
                }
            }
            self.store.put_file(digest, tmp, size, upload.as_ref()).await?;
            Ok::<_, CacheError>(
                self.meta
                    .commit_blob(&t.key, &d, size, intent, now_secs())
                    .await?,
            )
        }
        .await;
        *super::lock(intent_slot) = None;
        let configs = match committed {
            Ok(configs) => configs,
            Err(e) => {
                let _ = self.meta.abandon_write(intent).await;
                return Err(e);
            }
        };
        if !configs.is_empty() && size <= CONFIG_MAX_BYTES {
            let bytes = read_at(file.clone(), 0, size).await?;
            if let Some(created) = config_created(&bytes) {
                self.meta.set_created(configs, created).await?;
            }
        }
        Ok(true)
    }
}

/// The error a panicking transfer leaves its clients, logged once here under the error id
/// their 500s carry.
fn panicked(t: &Target, digest: &Digest, panic: &(dyn std::any::Any + Send)) -> CacheError {
    let error_id = super::new_error_id();
    tracing::error!(
        error.id = %error_id, repo.name = %t.key, blob.digest = %digest,
        panic.message = %super::panic_message(panic),
        "blob transfer panicked; its clients fail, the next request starts afresh"
    );
    CacheError::Panicked { error_id }
}

async fn create_tmp(path: PathBuf) -> std::io::Result<File> {
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
    })
    .await
    .map_err(std::io::Error::other)?
}

fn hash(batch: Batch, mut hasher: Sha256Writer) -> (Sha256Writer, u64) {
    for chunk in &batch.chunks {
        hasher.update(chunk);
    }
    (hasher, batch.len)
}

fn write(file: &File, batch: Batch) -> (u64, std::io::Result<()>) {
    let mut at = batch.offset;
    let wrote = batch.chunks.iter().try_for_each(|chunk| {
        file.write_all_at(chunk, at)?;
        at += chunk.len() as u64;
        Ok(())
    });
    (batch.len, wrote)
}

/// The result of the job in `job`, when there is one; pending forever otherwise.
async fn joined<T>(job: &mut Job<T>) -> Result<T, CacheError> {
    match job.as_mut() {
        Some(j) => j
            .await
            .map_err(|e| CacheError::Io(Arc::new(std::io::Error::other(e)))),
        None => std::future::pending().await,
    }
}

/// A follower's bytes as a response body; the follower leaves when the body is dropped.
pub(super) fn follow(follower: Follower) -> BlobBody {
    futures::stream::unfold(
        follower,
        |mut f| async move { f.next().await.map(|chunk| (chunk, f)) },
    )
    .boxed()
}
