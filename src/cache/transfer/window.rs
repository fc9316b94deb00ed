//! One transfer's shared state: the bytes received and not yet let go, in memory (the
//! window), the readable prefix of its temporary file, and the clients following it. The
//! transfer task fills it; each follower (`follower.rs`) takes its bytes from memory, or
//! from the file when it is behind the window. Nothing here blocks or waits under a lock.

use super::follower::Follower;
use crate::cache::CacheError;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// Bytes kept in memory per transfer. While caching, the last this many bytes stay for
/// followers a little behind (older ones are read back from the file), and the upstream
/// is not read further ahead of the disk than this. When passing through (no file), this
/// is how far the fastest follower may run ahead of the slowest before the upstream read
/// waits: the transfer's memory, whatever its size or its followers' speed. 8 MiB is a
/// few milliseconds of a fast client on loopback, so a fast one is rarely held back.
pub(super) const WINDOW_BYTES: u64 = 8 * 1024 * 1024;

/// Where a transfer is.
#[derive(Debug, Clone)]
pub(super) enum Phase {
    Starting,
    Streaming,
    /// Verified, and committed unless caching was given up: followers get their last byte.
    Complete {
        size: u64,
    },
    Failed(CacheError),
}

/// See the module documentation.
#[derive(Debug)]
pub(in crate::cache) struct Transfer {
    inner: Mutex<Inner>,
    /// Bumped when followers may have something new: bytes, the file, an outcome.
    pub(super) news: watch::Sender<()>,
    /// Bumped when a follower moves on or leaves: a transfer paced by its followers waits
    /// for it.
    pub(super) moved: watch::Sender<()>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) phase: Phase,
    /// As the upstream announced it.
    pub(super) size: Option<u64>,
    /// Contiguous bytes `window_start..received`, each with its offset.
    pub(super) chunks: VecDeque<(u64, Bytes)>,
    pub(super) window_start: u64,
    pub(super) received: u64,
    /// Bytes hashed so far.
    pub(super) hashed: u64,
    /// Bytes `0..written` can be read from `file`.
    pub(super) written: u64,
    pub(super) file: Option<Arc<File>>,
    /// `false`: passing through, nothing is written.
    pub(super) caching: bool,
    /// Follower id → position. A follower that holds its withheld tail has left it.
    pub(super) followers: HashMap<u64, u64>,
    pub(super) next_follower: u64,
    /// Followers not yet dropped, holding a tail or not.
    pub(super) live: usize,
}

/// Received bytes to hash or write, from `offset`.
#[derive(Debug)]
pub(super) struct Batch {
    pub offset: u64,
    pub chunks: Vec<Bytes>,
    pub len: u64,
}

impl Transfer {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                phase: Phase::Starting,
                size: None,
                chunks: VecDeque::new(),
                window_start: 0,
                received: 0,
                hashed: 0,
                written: 0,
                file: None,
                caching: true,
                followers: HashMap::new(),
                next_follower: 0,
                live: 0,
            }),
            news: watch::Sender::new(()),
            moved: watch::Sender::new(()),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change is complete before the lock is released, so a panic elsewhere
        // leaves the state consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tell_followers(&self) {
        self.news.send_replace(());
    }

    /// The upstream answered: `size` as announced; `file` is where bytes are cached
    /// (`None`: passed through from the start).
    pub(super) fn start(&self, size: Option<u64>, file: Option<Arc<File>>) {
        {
            let mut s = self.lock();
            s.phase = Phase::Streaming;
            s.size = size;
            s.caching = file.is_some();
            s.file = file;
        }
        self.tell_followers();
    }

    pub(super) fn push(&self, chunk: Bytes) {
        {
            let mut s = self.lock();
            let at = s.received;
            s.received += chunk.len() as u64;
            s.chunks.push_back((at, chunk));
        }
        self.tell_followers();
    }

    pub(super) fn received(&self) -> u64 {
        self.lock().received
    }

    /// Whether the upstream may be read further: while caching, hashing and the disk are
    /// at most a window behind; when passing through, hashing and the slowest follower.
    pub(super) fn has_room(&self) -> bool {
        let s = self.lock();
        let behind = if s.caching {
            s.hashed.min(s.written)
        } else {
            s.hashed.min(s.window_start)
        };
        s.received - behind < WINDOW_BYTES
    }

    /// Up to `max` received bytes not yet hashed.
    pub(super) fn next_to_hash(&self, max: u64) -> Option<Batch> {
        let s = self.lock();
        s.batch(s.hashed, max)
    }

    /// Up to `max` received bytes not yet written, and the file, while caching.
    pub(super) fn next_to_write(&self, max: u64) -> Option<(Arc<File>, Batch)> {
        let s = self.lock();
        let file = s.file.clone().filter(|_| s.caching)?;
        Some((file, s.batch(s.written, max)?))
    }

    pub(super) fn hashed(&self, len: u64) {
        let mut s = self.lock();
        s.hashed += len;
        s.trim();
    }

    /// A batch was written: late joiners can read it from the file.
    pub(super) fn written(&self, len: u64) {
        {
            let mut s = self.lock();
            if s.caching {
                s.written += len;
                s.trim();
            }
        }
        self.tell_followers();
    }

    /// Stops caching: from now on bytes pass through memory only, at the pace of the
    /// slowest follower; the file stays readable for followers behind the window.
    pub(super) fn stop_caching(&self) {
        {
            let mut s = self.lock();
            s.caching = false;
            s.trim();
        }
        self.tell_followers();
    }

    pub(super) fn is_caching(&self) -> bool {
        self.lock().caching
    }

    /// Clients following this transfer.
    pub(super) fn followers(&self) -> usize {
        self.lock().live
    }

    /// A receiver the task waits on while followers hold it back.
    pub(super) fn watch_followers(&self) -> watch::Receiver<()> {
        self.moved.subscribe()
    }

    pub(super) fn complete(&self, size: u64) {
        self.lock().phase = Phase::Complete { size };
        self.tell_followers();
    }

    /// Fails every follower (unless the transfer already completed).
    pub(super) fn fail(&self, e: CacheError) {
        {
            let mut s = self.lock();
            if !matches!(s.phase, Phase::Complete { .. }) {
                s.phase = Phase::Failed(e);
            }
        }
        self.tell_followers();
    }

    /// A new transfer and its first follower.
    pub(super) fn with_follower() -> (Arc<Self>, Follower) {
        let transfer = Self::new();
        let follower = transfer.register();
        (transfer, follower)
    }

    /// A new follower at byte 0; `None` when those bytes are gone (passed through).
    pub(super) fn follow(self: &Arc<Self>) -> Option<Follower> {
        {
            let s = self.lock();
            if s.window_start > 0 && s.file.as_ref().is_none_or(|_| s.written < s.window_start) {
                return None;
            }
        }
        Some(self.register())
    }

    fn register(self: &Arc<Self>) -> Follower {
        let mut s = self.lock();
        let id = s.next_follower;
        s.next_follower += 1;
        s.live += 1;
        s.followers.insert(id, 0);
        drop(s);
        Follower::new(self.clone(), id)
    }
}

impl Inner {
    /// Up to `max` received bytes from `offset` (which is in the window).
    fn batch(&self, offset: u64, max: u64) -> Option<Batch> {
        if offset >= self.received {
            return None;
        }
        let first = self
            .chunks
            .partition_point(|(at, c)| at + c.len() as u64 <= offset);
        let mut batch = Batch {
            offset,
            chunks: Vec::new(),
            len: 0,
        };
        for (at, chunk) in self.chunks.iter().skip(first) {
            let from = usize::try_from(offset + batch.len - at).unwrap_or(0);
            let part = chunk.slice(from..);
            batch.len += part.len() as u64;
            batch.chunks.push(part);
            if batch.len >= max {
                break;
            }
        }
        Some(batch)
    }

    /// Lets go of what no one needs: while caching, hashed and written bytes older than
    /// the window; when passing through, bytes every follower has taken (and the file,
    /// once no follower is behind the window).
    pub(super) fn trim(&mut self) {
        let keep_from = if self.caching {
            let kept = self.received.saturating_sub(WINDOW_BYTES);
            self.written.min(self.hashed).min(kept)
        } else {
            let slowest = self.followers.values().copied().min().unwrap_or(self.received);
            self.hashed.min(slowest)
        };
        while let Some((at, chunk)) = self.chunks.front() {
            let end = at + chunk.len() as u64;
            if end > keep_from {
                break;
            }
            self.window_start = end;
            self.chunks.pop_front();
        }
        if !self.caching && self.file.is_some() {
            let slowest = self.followers.values().copied().min().unwrap_or(u64::MAX);
            if slowest >= self.window_start {
                self.file = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::follower::READ_CHUNK_BYTES;
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: usize = 1024 * 1024;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Pushes `bytes` in `chunk`-sized pieces, hashing (and writing, with a file) each
    /// batch the way the transfer task does.
    fn feed(t: &Transfer, bytes: &[u8], chunk: usize) {
        for piece in bytes.chunks(chunk) {
            t.push(Bytes::copy_from_slice(piece));
            while let Some((file, batch)) = t.next_to_write(MIB as u64) {
                let mut at = batch.offset;
                for c in &batch.chunks {
                    file.write_all_at(c, at).unwrap();
                    at += c.len() as u64;
                }
                t.written(batch.len);
            }
            while let Some(batch) = t.next_to_hash(MIB as u64) {
                t.hashed(batch.len);
            }
        }
    }

    async fn drain(f: &mut Follower) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = f.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    fn temp_file() -> Arc<File> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    #[tokio::test]
    async fn the_last_byte_waits_for_verification() {
        let (t, mut f) = Transfer::with_follower();
        t.start(Some(10), Some(temp_file()));
        let bytes = data(10);
        feed(&t, &bytes, 10);
        assert_eq!(f.wait_started().await.unwrap(), Some(10));
        f.seek(0, None).await.unwrap();
        assert_eq!(f.next().await.unwrap().unwrap(), &bytes[..9]);
        let last = tokio::time::timeout(std::time::Duration::from_millis(50), f.next()).await;
        assert!(
            last.is_err(),
            "the last byte is withheld until the transfer completes"
        );
        t.complete(10);
        assert_eq!(drain(&mut f).await, &bytes[9..]);
    }

    #[tokio::test]
    async fn a_failed_transfer_fails_its_followers_without_their_last_byte() {
        let (t, mut f) = Transfer::with_follower();
        t.start(None, None);
        feed(&t, &data(100), 100);
        f.seek(0, None).await.unwrap();
        assert_eq!(f.next().await.unwrap().unwrap().len(), 99);
        t.fail(CacheError::DigestMismatch {
            expected: "a".into(),
            actual: "b".into(),
        });
        assert!(f.next().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_late_joiner_reads_the_written_prefix_from_the_file_then_memory() {
        let (t, first) = Transfer::with_follower();
        drop(first);
        let size = 3 * WINDOW_BYTES as usize;
        t.start(Some(size as u64), Some(temp_file()));
        let bytes = data(size);
        feed(&t, &bytes[..size - MIB], 64 * 1024);
        assert!(t.lock().window_start > 0, "the start left memory");
        let mut late = t.follow().expect("a caching transfer takes late joiners");
        late.seek(0, None).await.unwrap();
        let first = late.next().await.unwrap().unwrap();
        assert_eq!(first.len() as u64, READ_CHUNK_BYTES, "from the file");
        feed(&t, &bytes[size - MIB..], 64 * 1024);
        t.complete(size as u64);
        let mut got = first.to_vec();
        got.extend(drain(&mut late).await);
        assert!(got == bytes);
    }

    #[tokio::test]
    async fn passing_through_goes_at_the_pace_of_the_slowest_follower() {
        let (t, mut slow) = Transfer::with_follower();
        let mut fast = t.follow().unwrap();
        t.start(None, None);
        let chunk = 256 * 1024;
        let mut sent = 0;
        while t.has_room() {
            feed(&t, &data(chunk), chunk);
            sent += chunk;
            assert!(sent <= WINDOW_BYTES as usize + chunk, "memory is bounded");
        }
        // The fast follower takes all but the withheld last byte; the window stays full
        // while the slow one has taken nothing.
        fast.seek(0, None).await.unwrap();
        slow.seek(0, None).await.unwrap();
        let mut taken = 0;
        while taken < sent - 1 {
            taken += fast.next().await.unwrap().unwrap().len();
        }
        assert!(!t.has_room(), "the slowest follower holds the transfer back");
        let moved = slow.next().await.unwrap().unwrap();
        assert!(!moved.is_empty());
        assert!(t.has_room(), "bytes every follower took are let go");
        assert_eq!(t.lock().window_start, moved.len() as u64);
        // A client arriving now cannot be given byte 0: it starts its own transfer.
        assert!(t.follow().is_none());
        drop(slow);
        drop(fast);
        assert_eq!(t.followers(), 0);
    }

    #[tokio::test]
    async fn a_range_that_has_arrived_does_not_hold_a_paced_transfer_back() {
        let (t, mut ranged) = Transfer::with_follower();
        let mut whole = t.follow().unwrap();
        t.start(Some(2 * WINDOW_BYTES), None);
        let bytes = data(2 * WINDOW_BYTES as usize);
        feed(&t, &bytes[..100], 100);
        ranged.seek(10, Some(20)).await.unwrap();
        whole.seek(0, None).await.unwrap();
        assert_eq!(ranged.next().await.unwrap().unwrap(), &bytes[10..19]);
        // Its last byte is set aside, and it no longer paces the transfer.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), ranged.next()).await;
        assert!(pending.is_err(), "withheld until verified");
        feed(&t, &bytes[100..], 64 * 1024);
        let mut got = Vec::new();
        while got.len() < bytes.len() - 1 {
            got.extend_from_slice(&whole.next().await.unwrap().unwrap());
        }
        t.complete(bytes.len() as u64);
        assert_eq!(drain(&mut ranged).await, &bytes[19..20]);
        got.extend(drain(&mut whole).await);
        assert!(got == bytes);
    }
}
