//! The miss path: one upstream GET per (repository, digest). The body is written to a
//! temporary file and hashed as it arrives; every waiting client reads that file as it
//! grows. Only verified content is committed (I1), and each client's last byte is held
//! back until then, so a mismatch or truncation fails every transfer that saw the bytes.
//! The download runs as its own task, so it completes even if its first client leaves.

use super::{Cache, CacheError, Target, TransferKey};
use crate::metadata::now_secs;
use crate::oci::{config_created, Digest, Sha256Writer};
use crate::storage::BlobBody;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// Bytes written to the temporary file per blocking call, at most: batches what the
/// upstream has already delivered without waiting for more.
const WRITE_BATCH_BYTES: usize = 1024 * 1024;
/// Bytes a follower reads per step.
const READ_CHUNK_BYTES: u64 = 256 * 1024;
/// Image configs larger than this are not parsed for `created`.
pub(super) const CONFIG_MAX_BYTES: u64 = 1024 * 1024;

/// Where a transfer is; followers watch it.
#[derive(Debug, Clone)]
pub(super) enum State {
    Starting,
    Streaming {
        file: Arc<File>,
        written: u64,
        size: Option<u64>,
    },
    Done {
        file: Arc<File>,
        size: u64,
    },
    Failed(CacheError),
}

impl Cache {
    /// Joins the transfer of `digest` for `t`, starting it if none is running.
    pub(super) fn join_transfer(self: &Arc<Self>, t: &Target, digest: &Digest) -> watch::Receiver<State> {
        let key: TransferKey = (t.key.clone(), digest.clone());
        let mut transfers = super::lock(&self.transfers);
        if let Some(rx) = transfers.get(&key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(State::Starting);
        transfers.insert(key.clone(), rx.clone());
        drop(transfers);
        let (this, t, digest) = (self.clone(), t.clone(), digest.clone());
        self.tasks
            .spawn(async move { this.run_transfer(t, digest, key, tx).await });
        rx
    }

    async fn run_transfer(
        self: Arc<Self>,
        t: Target,
        digest: Digest,
        key: TransferKey,
        tx: watch::Sender<State>,
    ) {
        let tmp = self.tmp_dir.join(format!("{}.part", ulid::Ulid::new()));
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = self.download(&t, &digest, &tmp, &tx) => r,
            () = self.shutdown.cancelled() => Err(CacheError::ShuttingDown),
        };
        // On the filesystem backend a committed file was renamed away; elsewhere, and on
        // failure, the temporary file goes now (readers keep their open handle).
        let _ = tokio::fs::remove_file(&tmp).await;
        super::lock(&self.transfers).remove(&key);
        match result {
            Ok((file, size)) => {
                tracing::info!(
                    repo.name = %t.key, blob.digest = %digest, size_bytes = size,
                    duration_ms = started.elapsed().as_millis() as u64, "blob cached"
                );
                tx.send_replace(State::Done { file, size });
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
                tx.send_replace(State::Failed(e));
            }
            Err(e) => {
                tracing::warn!(repo.name = %t.key, blob.digest = %digest, error = %e, "blob fetch failed");
                tx.send_replace(State::Failed(e));
            }
        }
    }

    async fn download(
        &self,
        t: &Target,
        digest: &Digest,
        tmp: &Path,
        tx: &watch::Sender<State>,
    ) -> Result<(Arc<File>, u64), CacheError> {
        let resp = t.upstream.get_blob(&t.repo, digest).await?;
        let size = resp.content_length();
        let file = Arc::new(create_tmp(tmp.to_owned()).await?);
        tx.send_replace(State::Streaming {
            file: file.clone(),
            written: 0,
            size,
        });
        let upstream_err = |e: reqwest::Error| {
            CacheError::Upstream(crate::upstream::UpstreamError::from_reqwest(&t.upstream.name, &e))
        };
        let mut hasher = Sha256Writer::default();
        let mut written: u64 = 0;
        let mut stream = resp.bytes_stream();
        let mut ended = false;
        while !ended {
            let Some(first) = stream.next().await else {
                break;
            };
            let mut batch: Vec<Bytes> = vec![first.map_err(upstream_err)?];
            let mut batch_len = batch[0].len();
            // Take whatever else has already arrived, without waiting.
            while batch_len < WRITE_BATCH_BYTES {
                match stream.next().now_or_never() {
                    Some(Some(chunk)) => {
                        let chunk = chunk.map_err(upstream_err)?;
                        batch_len += chunk.len();
                        batch.push(chunk);
                    }
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            let received = written + batch_len as u64;
            if let Some(expected) = size.filter(|s| received > *s) {
                return Err(CacheError::Truncated { expected, received });
            }
            hasher = write_and_hash(file.clone(), written, batch, hasher).await?;
            written = received;
            tx.send_modify(|state| {
                if let State::Streaming { written: w, .. } = state {
                    *w = written;
                }
            });
        }
        if let Some(expected) = size.filter(|s| *s != written) {
            return Err(CacheError::Truncated {
                expected,
                received: written,
            });
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(CacheError::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        // I2's order: verified temp file -> write intent -> final key -> commit row. The
        // intent keeps the deletion pipeline off this digest until the row is committed.
        let d = digest.to_string();
        let Some(intent) = self.meta.begin_write(&d, now_secs()).await? else {
            tracing::warn!(repo.name = %t.key, blob.digest = %digest, "blob is being deleted; served without caching");
            return Ok((file, written));
        };
        let committed = async {
            // A multipart upload is on record before its first part is sent (I2).
            let upload = self.store.open_upload(digest, written).await?;
            if let Some(u) = &upload {
                if let Err(e) = self.meta.record_upload(intent, u.key.clone(), u.id.clone()).await {
                    let _ = self.store.abort_upload(u).await;
                    return Err(e.into());
                }
            }
            self.store.put_file(digest, tmp, written, upload.as_ref()).await?;
            Ok::<_, CacheError>(
                self.meta
                    .commit_blob(&t.key, &d, written, intent, now_secs())
                    .await?,
            )
        }
        .await;
        let configs = match committed {
            Ok(configs) => configs,
            Err(e) => {
                let _ = self.meta.abandon_write(intent).await;
                return Err(e);
            }
        };
        if !configs.is_empty() && written <= CONFIG_MAX_BYTES {
            let bytes = read_at(file.clone(), 0, written).await?;
            if let Some(created) = config_created(&bytes) {
                self.meta.set_created(configs, created).await?;
            }
        }
        Ok((file, written))
    }
}

async fn create_tmp(path: PathBuf) -> Result<File, CacheError> {
    Ok(tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
    })
    .await
    .map_err(std::io::Error::other)??)
}

async fn write_and_hash(
    file: Arc<File>,
    offset: u64,
    batch: Vec<Bytes>,
    mut hasher: Sha256Writer,
) -> Result<Sha256Writer, CacheError> {
    Ok(
        tokio::task::spawn_blocking(move || -> std::io::Result<Sha256Writer> {
            let mut at = offset;
            for chunk in &batch {
                file.write_all_at(chunk, at)?;
                hasher.update(chunk);
                at += chunk.len() as u64;
            }
            Ok(hasher)
        })
        .await
        .map_err(std::io::Error::other)??,
    )
}

async fn read_at(file: Arc<File>, offset: u64, len: u64) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Waits until the transfer has an upstream answer: its size (if the upstream said), or
/// its error.
pub(super) async fn wait_started(rx: &mut watch::Receiver<State>) -> Result<Option<u64>, CacheError> {
    loop {
        match &*rx.borrow_and_update() {
            State::Starting => {}
            State::Streaming { size, .. } => return Ok(*size),
            State::Done { size, .. } => return Ok(Some(*size)),
            State::Failed(e) => return Err(e.clone()),
        }
        if rx.changed().await.is_err() {
            return Err(CacheError::ShuttingDown);
        }
    }
}

/// Streams bytes `start..end` (or to the end) of a transfer as they arrive. The last byte
/// is held until the content is verified and committed.
pub(super) fn follow(rx: watch::Receiver<State>, start: u64, end: Option<u64>) -> BlobBody {
    futures::stream::unfold(Some((rx, start)), move |cursor| async move {
        let (mut rx, pos) = cursor?;
        loop {
            let state = rx.borrow_and_update().clone();
            let (file, available, done_size) = match state {
                State::Starting => (None, 0, None),
                State::Streaming { file, written, .. } => (Some(file), written, None),
                State::Done { file, size } => (Some(file), size, Some(size)),
                State::Failed(e) => return Some((Err(std::io::Error::other(e)), None)),
            };
            let stop = match (end, done_size) {
                (Some(e), Some(s)) => e.min(s),
                (Some(e), None) => e,
                (None, Some(s)) => s,
                (None, None) => u64::MAX,
            };
            // Until the content is verified, the last byte written is withheld, so no
            // client ever completes a transfer that verification later fails.
            let limit = if done_size.is_some() {
                stop
            } else {
                available.min(stop).saturating_sub(1)
            };
            if let (Some(file), true) = (file, pos < limit) {
                let len = (limit - pos).min(READ_CHUNK_BYTES);
                return Some(match read_at(file, pos, len).await {
                    Ok(bytes) => (Ok(bytes), Some((rx, pos + len))),
                    Err(e) => (Err(e), None),
                });
            }
            if done_size.is_some() {
                return None;
            }
            if rx.changed().await.is_err() {
                return Some((Err(std::io::Error::other("blob transfer stopped")), None));
            }
        }
    })
    .boxed()
}
