//! One client's cursor in a transfer (`window.rs`): it takes its bytes from the window in
//! memory, or from the temporary file while it is behind the window, and its last byte
//! only once the content is verified. It never blocks or waits holding a lock: a client
//! that stalls holds a position, never a thread of the blocking pool or a SQLite
//! connection (a read from the file is one short blocking job, done only when asked for).

use super::window::{Phase, Transfer};
use crate::cache::CacheError;
use bytes::Bytes;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::watch;

/// Bytes a follower behind the window reads from the file per step.
pub(super) const READ_CHUNK_BYTES: u64 = 256 * 1024;

/// What a follower does next, decided under the lock and done after it.
enum Step {
    Send(Bytes),
    ReadFile { file: Arc<File>, len: u64, tail: bool },
    Wait,
    End,
    Fail(std::io::Error),
}

/// One client's cursor in a transfer. Dropping it leaves the transfer.
#[derive(Debug)]
pub(in crate::cache) struct Follower {
    transfer: Arc<Transfer>,
    id: u64,
    pos: u64,
    /// Exclusive end of the range asked for; `None`: to the end of the blob.
    end: Option<u64>,
    /// The withheld last bytes, taken once all else was sent, released on verification.
    tail: Option<Bytes>,
    news: watch::Receiver<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        {
            let mut s = self.transfer.lock();
            s.followers.remove(&self.id);
            s.live -= 1;
            if !s.caching {
                s.trim();
            }
        }
        self.transfer.moved.send_replace(());
    }
}

impl Follower {
    pub(super) fn new(transfer: Arc<Transfer>, id: u64) -> Self {
        let news = transfer.news.subscribe();
        Self {
            transfer,
            id,
            pos: 0,
            end: None,
            tail: None,
            news,
        }
    }

    /// Waits until the upstream answered: its size (if announced), or its error.
    pub(in crate::cache) async fn wait_started(&mut self) -> Result<Option<u64>, CacheError> {
        loop {
            self.news.borrow_and_update();
            {
                let s = self.transfer.lock();
                match &s.phase {
                    Phase::Starting => {}
                    Phase::Streaming => return Ok(s.size),
                    Phase::Complete { size } => return Ok(Some(*size)),
                    Phase::Failed(e) => return Err(e.clone()),
                }
            }
            if self.news.changed().await.is_err() {
                return Err(CacheError::ShuttingDown);
            }
        }
    }

    /// Moves to `start..end` (`end` exclusive; `None`: to the end), then waits until the
    /// first of those bytes arrived or the transfer ended, so that a transfer failing
    /// before sending this client anything answers it with an error, not a cut body.
    pub(in crate::cache) async fn seek(&mut self, start: u64, end: Option<u64>) -> Result<(), CacheError> {
        self.pos = start;
        self.end = end;
        self.transfer.lock().followers.insert(self.id, start);
        self.transfer.moved.send_replace(());
        loop {
            self.news.borrow_and_update();
            {
                let s = self.transfer.lock();
                match &s.phase {
                    Phase::Failed(e) => return Err(e.clone()),
                    Phase::Complete { .. } => return Ok(()),
                    _ if s.received > start => return Ok(()),
                    _ => {}
                }
            }
            if self.news.changed().await.is_err() {
                return Err(CacheError::ShuttingDown);
            }
        }
    }

    /// The next bytes for this client; `None` at the end.
    pub(in crate::cache) async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            self.news.borrow_and_update();
            let step = self.step();
            match step {
                Step::Send(bytes) => return Some(Ok(bytes)),
                Step::End => return None,
                Step::Fail(e) => return Some(Err(e)),
                Step::ReadFile { file, len, tail } => {
                    let bytes = match read_at(file, self.pos, len).await {
                        Ok(bytes) => bytes,
                        Err(e) => return Some(Err(e)),
                    };
                    self.advance(len);
                    if !tail {
                        return Some(Ok(bytes));
                    }
                    self.hold_tail(bytes);
                }
                Step::Wait => {
                    if self.news.changed().await.is_err() {
                        return Some(Err(std::io::Error::other("blob transfer stopped")));
                    }
                }
            }
        }
    }

    fn step(&mut self) -> Step {
        let mut s = self.transfer.lock();
        let done = match &s.phase {
            Phase::Failed(e) => return Step::Fail(std::io::Error::other(e.clone())),
            Phase::Complete { size } => Some(*size),
            Phase::Starting | Phase::Streaming => None,
        };
        if done.is_some() {
            if let Some(tail) = self.tail.take() {
                return Step::Send(tail);
            }
        }
        let stop = match (self.end, done) {
            (Some(e), Some(d)) => e.min(d),
            (e, d) => e.or(d).unwrap_or(u64::MAX),
        };
        if self.pos >= stop {
            return if done.is_some() { Step::End } else { Step::Wait };
        }
        let available = s.received.min(stop);
        // Until the content is verified the last byte is withheld (I1), so no client ever
        // completes a transfer that verification then fails.
        let limit = if done.is_some() {
            available
        } else if available == stop {
            // Everything this client asked for has arrived: its last byte is set aside,
            // so that it no longer holds back a transfer it follows.
            stop - 1
        } else {
            available.saturating_sub(1)
        };
        let take_tail = done.is_none() && available == stop && self.pos == stop - 1;
        if self.pos >= limit && !take_tail {
            return Step::Wait;
        }
        let upto = if take_tail { stop } else { limit };
        if self.pos >= s.window_start {
            let i = s
                .chunks
                .partition_point(|(at, c)| at + c.len() as u64 <= self.pos);
            let Some((at, chunk)) = s.chunks.get(i) else {
                return Step::Wait;
            };
            let from = self.pos - at;
            let to = (upto - at).min(chunk.len() as u64);
            let bytes = chunk.slice(usize::try_from(from).unwrap_or(0)..usize::try_from(to).unwrap_or(0));
            let len = bytes.len() as u64;
            drop(s);
            self.advance(len);
            if take_tail {
                self.hold_tail(Bytes::copy_from_slice(&bytes));
                return Step::Wait;
            }
            return Step::Send(bytes);
        }
        match &s.file {
            Some(file) if self.pos < s.written => {
                let len = (s.written.min(upto) - self.pos).min(READ_CHUNK_BYTES);
                Step::ReadFile {
                    file: file.clone(),
                    len,
                    tail: take_tail,
                }
            }
            _ => {
                s.followers.remove(&self.id);
                Step::Fail(std::io::Error::other(
                    "the bytes this client needs were let go while the blob was passed through",
                ))
            }
        }
    }

    /// Records the new position, for the transfer's pacing.
    fn advance(&mut self, len: u64) {
        self.pos += len;
        let mut s = self.transfer.lock();
        if let Some(p) = s.followers.get_mut(&self.id) {
            *p = self.pos;
        }
        let paced = !s.caching;
        if paced {
            s.trim();
        }
        drop(s);
        if paced {
            self.transfer.moved.send_replace(());
        }
    }

    /// Keeps the withheld bytes and stops holding the transfer back.
    fn hold_tail(&mut self, bytes: Bytes) {
        self.tail = Some(bytes);
        self.transfer.lock().followers.remove(&self.id);
        self.transfer.moved.send_replace(());
    }
}

pub(super) async fn read_at(file: Arc<File>, offset: u64, len: u64) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}
