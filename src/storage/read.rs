//! Reading blobs back: the filesystem streams the file in large reads (object_store's
//! local stream reads 8 KiB at a time, far below the disk's speed); other backends use
//! ranged GETs.

use super::{not_found_or, BlobStore, StorageError};
use crate::oci::Digest;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use std::io::SeekFrom;
use std::ops::Range;

/// Read size when streaming a local file: large enough to run near the disk's speed,
/// small enough that many concurrent readers stay cheap.
const LOCAL_READ_BYTES: usize = 512 * 1024;
/// Chunks read ahead of the client per stream: reading overlaps sending, and memory per
/// stream stays under (1 + this) × `LOCAL_READ_BYTES`.
const READ_AHEAD_CHUNKS: usize = 2;

/// A blob's bytes on their way out.
pub type BlobBody = BoxStream<'static, Result<Bytes, std::io::Error>>;

impl BlobStore {
    /// Streams `range` (or all) of a blob. `NotFound` when the object is missing.
    pub async fn open(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<BlobBody, StorageError> {
        let key = self.key(digest);
        if let Some(path) = self.local_path(&key) {
            let io = |source: std::io::Error| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    StorageError::NotFound { key: key.to_string() }
                } else {
                    StorageError::Io {
                        path: path.display().to_string(),
                        source,
                    }
                }
            };
            let (file, len) = tokio::task::spawn_blocking({
                let path = path.clone();
                move || {
                    let file = std::fs::File::open(path)?;
                    let len = file.metadata()?.len();
                    Ok::<_, std::io::Error>((file, len))
                }
            })
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
            .map_err(io)?;
            let range = range.unwrap_or(0..len);
            return Ok(read_ahead(file, range));
        }
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&key, options)
            .await
            .map_err(|e| not_found_or(&key, e))?;
        Ok(result.into_stream().map_err(std::io::Error::other).boxed())
    }

    /// Reads a small blob whole (image configs), refusing anything over `max_bytes`.
    pub async fn read_small(&self, digest: &Digest, max_bytes: u64) -> Result<Option<Bytes>, StorageError> {
        let key = self.key(digest);
        let meta = match self.store.head(&key).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if meta.size > max_bytes {
            return Ok(None);
        }
        match self.store.get(&key).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the object exists, and its size.
    pub async fn size_of(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let key = self.key(digest);
        match self.store.head(&key).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Streams `range` of `file` from one blocking thread that reads ahead into fresh
/// buffers handed straight to the response (no copy through an intermediate buffer, no
/// hand-off to the blocking pool per read). The thread stops when the client goes away.
fn read_ahead(mut file: std::fs::File, range: Range<u64>) -> BlobBody {
    use std::io::{Read, Seek};
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(READ_AHEAD_CHUNKS);
    tokio::task::spawn_blocking(move || {
        if range.start > 0 {
            if let Err(e) = file.seek(SeekFrom::Start(range.start)) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
        let mut left = range.end.saturating_sub(range.start);
        while left > 0 {
            let want = left.min(LOCAL_READ_BYTES as u64);
            // read_to_end fills the spare capacity without zeroing it first.
            let mut buf = Vec::with_capacity(want as usize);
            let chunk = match (&mut file).take(want).read_to_end(&mut buf) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob file is shorter than its size",
                )),
                Ok(n) => {
                    left -= n as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>) -> BlobBody {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, StorageConfig};

    async fn collect(body: BlobBody) -> Vec<u8> {
        let chunks: Vec<Bytes> = body.try_collect().await.unwrap();
        chunks.concat()
    }

    async fn roundtrip(config: StorageConfig) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::build(&config, dir.path()).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let tmp = dir.path().join("upload.tmp");
        std::fs::write(&tmp, &data).unwrap();
        store.put_file(&digest, &tmp, data.len() as u64).await.unwrap();
        let all: Vec<u8> = collect(store.open(&digest, None).await.unwrap()).await;
        assert_eq!(all, data);
        let part: Vec<u8> = collect(store.open(&digest, Some(10..20)).await.unwrap()).await;
        assert_eq!(part, &data[10..20]);
        assert_eq!(store.size_of(&digest).await.unwrap(), Some(data.len() as u64));
        let missing = Digest::of(b"missing");
        assert!(matches!(
            store.open(&missing, None).await,
            Err(StorageError::NotFound { .. })
        ));
        assert_eq!(store.size_of(&missing).await.unwrap(), None);
    }

    #[tokio::test]
    async fn filesystem_roundtrip() {
        roundtrip(StorageConfig::default()).await;
    }

    #[tokio::test]
    async fn memory_roundtrip() {
        roundtrip(StorageConfig {
            backend: Backend::Memory,
            ..StorageConfig::default()
        })
        .await;
    }
}
