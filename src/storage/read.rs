//! Reading blobs back: the filesystem streams the file as memory-mapped windows handed
//! to hyper without a copy (object_store's local stream reads 8 KiB at a time into user
//! space, far below the disk's and the socket's speed); other backends use ranged GETs.

use super::{not_found_or, BlobStore, StorageError};
use crate::oci::Digest;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

/// Size of one mapped window when streaming a local file, and the alignment of windows
/// in the file (a multiple of every page size, as mapping offsets must be). Large enough
/// that mapping, pre-faulting and unmapping cost little per byte; small enough that the
/// windows in flight per stream stay cheap in RSS.
const LOCAL_WINDOW_BYTES: u64 = 2 * 1024 * 1024;
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

/// Streams `range` of `file` as memory-mapped windows, so the only copy of the bytes is
/// the kernel's, from the page cache into the socket.
///
/// Each window is its own mapping of at most `LOCAL_WINDOW_BYTES`, aligned to that size
/// in the file (so every mapping offset is page-aligned; an unaligned range start maps
/// from the window's start and slices). A window is mapped and pre-faulted
/// (`MAP_POPULATE`) by one short call on the blocking pool, so the async runtime never
/// waits on the disk or takes page faults while hyper writes it; the window is unmapped
/// when hyper drops the last `Bytes` of it.
///
/// The stream maps `READ_AHEAD_WINDOWS` windows ahead: handing out window k starts mapping
/// k + 2, which overlaps mapping with sending; at most `MAPPING_MAX` windows are being mapped at once
/// across all streams. Nothing else runs between polls, so a client that stops reading
/// holds no thread of the blocking pool (a thread blocked on a full channel per stalled
/// client would drain the pool, and every SQLite call waits on that pool), only the
/// windows already mapped: about four per stream, counted in RSS while mapped.
///
/// Mapping is safe because a committed blob file is never written again: it is written
/// as a temp file and renamed into place, deletion unlinks it and quarantine renames it,
/// and neither disturbs a live mapping. Only an outside actor truncating the file under a
/// mapping could fault (SIGBUS); the length is re-checked before each window so a file
/// found shorter than expected ends the body with an error instead.
fn read_ahead(file: std::fs::File, range: Range<u64>) -> BlobBody {
    let mut windows = Windows {
        file: Arc::new(file),
        next_at: range.start,
        end: range.end,
        queue: VecDeque::with_capacity(READ_AHEAD_WINDOWS),
    };
    futures::stream::poll_fn(move |cx| windows.poll_next(cx)).boxed()
}

/// Windows mapped (or being mapped) ahead of the one hyper is sending. Two give the
/// blocking pool a window's sending time and more to map the next one, which matters on a
/// busy machine where its thread may wait for a core; each costs a mapped window in RSS.
const READ_AHEAD_WINDOWS: usize = 2;

/// The windows of one stream, in order.
struct Windows {
    file: Arc<std::fs::File>,
    /// Where the next window not yet started begins.
    next_at: u64,
    end: u64,
    /// Each started window with the offset it starts at.
    queue: VecDeque<(u64, Next)>,
}

impl Windows {
    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        loop {
            while self.queue.len() < READ_AHEAD_WINDOWS && self.next_at < self.end {
                let at = self.next_at;
                self.next_at = (at - at % LOCAL_WINDOW_BYTES + LOCAL_WINDOW_BYTES).min(self.end);
                self.queue.push_back((at, Next::start(&self.file, at, self.end)));
            }
            let Some((at, front)) = self.queue.front_mut() else {
                return Poll::Ready(None);
            };
            let at = *at;
            let mapped = match front {
                Next::Waiting(permit) => match std::task::ready!(permit.as_mut().poll(cx)) {
                    Ok(permit) => {
                        *front = Next::Mapping(map(&self.file, at, self.end, permit));
                        continue;
                    }
                    Err(closed) => Err(std::io::Error::other(closed)),
                },
                Next::Mapping(handle) => std::task::ready!(Pin::new(handle).poll(cx))
                    .map_err(std::io::Error::other)
                    .and_then(|window| window),
            };
            self.queue.pop_front();
            match &mapped {
                // An error ends the body.
                Err(_) => {
                    self.queue.clear();
                    self.next_at = self.end;
                }
                // The file ended inside this window (it is shorter than its recorded
                // size): map again from there, which fails with `UnexpectedEof`.
                Ok(bytes)
                    if at + (bytes.len() as u64) < self.queue.front().map_or(self.next_at, |(a, _)| *a) =>
                {
                    self.queue.clear();
                    self.next_at = at + bytes.len() as u64;
                }
                Ok(_) => {}
            }
            return Poll::Ready(Some(mapped));
        }
    }
}

/// Windows being mapped at once, across all streams. Mapping is page-table work (or disk
/// reads on a cold page cache) on the blocking pool; a burst of clients must not fill
/// that pool with mapping threads that SQLite calls then compete with for the cores.
/// Sixteen keep a disk's queue busy on a cold cache and cost nothing on a warm one.
const MAPPING_MAX: usize = 16;
static MAPPING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAPPING_MAX);

/// The next window of a stream.
enum Next {
    /// Waiting for a place among the `MAPPING_MAX` windows being mapped.
    Waiting(Pin<Box<dyn Future<Output = PermitResult> + Send>>),
    /// Being mapped on the blocking pool.
    Mapping(tokio::task::JoinHandle<Result<Bytes, std::io::Error>>),
}

type PermitResult = Result<tokio::sync::SemaphorePermit<'static>, tokio::sync::AcquireError>;

impl Next {
    /// Starts mapping the window at `at` at once when there is a place (the common case:
    /// the read-ahead overlaps sending), else waits for one on the stream's next poll.
    fn start(file: &Arc<std::fs::File>, at: u64, end: u64) -> Next {
        match MAPPING.try_acquire() {
            Ok(permit) => Next::Mapping(map(file, at, end, permit)),
            Err(_) => Next::Waiting(Box::pin(MAPPING.acquire())),
        }
    }
}

fn map(
    file: &Arc<std::fs::File>,
    at: u64,
    end: u64,
    permit: tokio::sync::SemaphorePermit<'static>,
) -> tokio::task::JoinHandle<Result<Bytes, std::io::Error>> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let window = map_window(&file, at, end);
        drop(permit);
        window
    })
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
