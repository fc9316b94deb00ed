//! Reading blobs back: the filesystem streams the file as memory-mapped windows handed
//! to hyper without a copy (object_store's local stream reads 8 KiB at a time into user
//! space, far below the disk's and the socket's speed); other backends use ranged GETs.

use super::{not_found_or, BlobStore, StorageError};
use crate::oci::Digest;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use std::ops::Range;

/// Size of one mapped window when streaming a local file, and the alignment of windows
/// in the file (a multiple of every page size, as mapping offsets must be). Large enough
/// that mapping, pre-faulting and unmapping cost little per byte; small enough that the
/// windows in flight per stream stay cheap in RSS.
const LOCAL_WINDOW_BYTES: u64 = 2 * 1024 * 1024;
/// Windows mapped ahead of the client per stream: mapping overlaps sending. At most this
/// many wait in the channel, one more is being mapped, and hyper holds one or two it is
/// writing, so a stream keeps about (3 + this) × `LOCAL_WINDOW_BYTES` mapped.
const READ_AHEAD_WINDOWS: usize = 1;

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

/// Streams `range` of `file` as memory-mapped windows from one blocking thread, so the
/// only copy of the bytes is the kernel's, from the page cache into the socket.
///
/// Each window is its own mapping of at most `LOCAL_WINDOW_BYTES`, aligned to that size
/// in the file (so every mapping offset is page-aligned; an unaligned range start maps
/// from the window's start and slices). The thread pre-faults a window (`MAP_POPULATE`)
/// before sending it, so the async runtime never waits on the disk or takes page faults
/// while hyper writes it; the window is unmapped when hyper drops the last `Bytes` of it.
/// Mapped pages count in the process's RSS only while mapped, which the bounded channel
/// keeps to a few windows per stream. The thread stops when the client goes away.
///
/// Mapping is safe because a committed blob file is never written again: it is written
/// as a temp file and renamed into place, deletion unlinks it and quarantine renames it,
/// and neither disturbs a live mapping. Only an outside actor truncating the file under a
/// mapping could fault (SIGBUS); the length is re-checked before each window so a file
/// found shorter than expected ends the body with an error instead.
fn read_ahead(file: std::fs::File, range: Range<u64>) -> BlobBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(READ_AHEAD_WINDOWS);
    tokio::task::spawn_blocking(move || {
        let mut at = range.start;
        while at < range.end {
            let window = map_window(&file, at, range.end);
            let next = match &window {
                Ok(bytes) => Some(at + bytes.len() as u64),
                Err(_) => None,
            };
            if tx.blocking_send(window).is_err() {
                return;
            }
            match next {
                Some(n) => at = n,
                None => return,
            }
        }
    });
    tokio_stream_from(rx)
}

/// Maps the window of `file` holding offset `at` (up to `end`, and never past the file's
/// current length) and returns the bytes from `at`. `UnexpectedEof` when the file ends
/// at or before `at`.
fn map_window(file: &std::fs::File, at: u64, end: u64) -> Result<Bytes, std::io::Error> {
    let len = file.metadata()?.len();
    if at >= len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "blob file is shorter than its size",
        ));
    }
    let start = at - at % LOCAL_WINDOW_BYTES;
    let stop = (start + LOCAL_WINDOW_BYTES).min(end).min(len);
    let map_len = usize::try_from(stop - start).map_err(std::io::Error::other)?;
    let skip = usize::try_from(at - start).map_err(std::io::Error::other)?;
    // SAFETY: committed blob files are immutable (see `read_ahead`), and the length
    // checked above bounds the mapping, so the mapped bytes stay valid while it lives.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(start)
            .len(map_len)
            .populate()
            .map(file)?
    };
    Ok(Bytes::from_owner(map).slice(skip..))
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
        store
            .put_file(&digest, &tmp, data.len() as u64, None)
            .await
            .unwrap();
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

    /// Ranges that start anywhere (unaligned, on and beside window boundaries) and cross
    /// windows come back byte for byte, and no chunk is larger than one window.
    #[tokio::test]
    async fn local_ranges_across_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let w = LOCAL_WINDOW_BYTES;
        let len = 3 * w + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        // Both sides of each window boundary and of a page boundary, odd offsets, the ends.
        let mut points: Vec<u64> = (1..=3).flat_map(|k| [k * w - 1, k * w, k * w + 1]).collect();
        points.extend([0, 1, 4095, 4096, 4097, 2 * w + 777, len - 1, len]);
        points.sort_unstable();
        for &start in &points {
            for &end in &points {
                if end < start {
                    continue;
                }
                let file = std::fs::File::open(&path).unwrap();
                let chunks: Vec<Bytes> = read_ahead(file, start..end).try_collect().await.unwrap();
                assert!(chunks.iter().all(|c| !c.is_empty() && c.len() as u64 <= w));
                assert_eq!(
                    chunks.concat(),
                    &data[start as usize..end as usize],
                    "range {start}..{end}"
                );
            }
        }
    }

    /// A file shorter than the range asked for gives its bytes and then an error, never a
    /// short body that looks complete.
    #[tokio::test]
    async fn local_file_shorter_than_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let len = LOCAL_WINDOW_BYTES + 100;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for start in [0, 50, LOCAL_WINDOW_BYTES + 99, len, len + 10] {
            let file = std::fs::File::open(&path).unwrap();
            let items: Vec<_> = read_ahead(file, start..len + 4096).collect().await;
            let (last, body) = items.split_last().unwrap();
            assert_eq!(
                last.as_ref().unwrap_err().kind(),
                std::io::ErrorKind::UnexpectedEof,
                "start {start}"
            );
            let got: Vec<u8> = body.iter().flat_map(|c| c.as_ref().unwrap().to_vec()).collect();
            assert_eq!(got, &data[(start.min(len)) as usize..], "start {start}");
        }
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
