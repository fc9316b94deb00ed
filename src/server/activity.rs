//! What one client connection is doing, as its timeouts need it: an IO wrapper that
//! notes reads after an idle spell and writes the socket will not take, and a response
//! body wrapper that counts requests in flight and notes a body the client takes no
//! bytes of. `connection.rs` turns this into deadlines; nothing here closes anything.

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// "Not set", in the millisecond fields below.
const NEVER: u64 = u64::MAX;
/// The phase word: the top bit says idle (else: reading headers), the rest is the
/// phase's start in milliseconds since the connection began.
const IDLE_BIT: u64 = 1 << 63;

/// The timeouts of one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) header: Duration,
    pub(crate) idle: Duration,
    pub(crate) send: Duration,
}

/// Why a connection was closed by its watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// No complete request headers within `server.header_timeout`.
    Header,
    /// No request within `server.idle_timeout` after the last response.
    Idle,
    /// The client took no response bytes for `server.send_timeout`.
    Send,
}

impl Expired {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header_timeout",
            Self::Idle => "idle_timeout",
            Self::Send => "send_timeout",
        }
    }
}

/// Shared between the connection's IO, its response bodies (which HTTP/2 polls on
/// other tasks) and its watchdog; plain atomics, written only on state changes.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    /// Idle bit + phase start, meaningful while no request is in flight. A new
    /// connection is reading headers since 0.
    phase: AtomicU64,
    in_flight: AtomicUsize,
    /// Since when a write has been refused (socket buffer full), or `NEVER`.
    write_blocked_ms: AtomicU64,
    /// Response bodies that handed out a frame and were not asked for the next one yet:
    /// the client (or, with HTTP/2, its flow-control window) is not taking bytes.
    parked: AtomicUsize,
    /// When a response body was last asked for a frame.
    body_polled_ms: AtomicU64,
    /// The watchdog, woken when a response body parks or the last request ends: with
    /// HTTP/2 both happen on a stream's own task, and the connection's task (which
    /// recomputes the deadline whenever it runs) may not run again on its own.
    watchdog: AtomicWaker,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            phase: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            write_blocked_ms: AtomicU64::new(NEVER),
            parked: AtomicUsize::new(0),
            body_polled_ms: AtomicU64::new(0),
            watchdog: AtomicWaker::new(),
        })
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_millis()).unwrap_or(NEVER - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    /// Wakes `waker` when the deadline may have moved without the connection's own task
    /// running (see `watchdog`).
    pub(crate) fn register_watchdog(&self, waker: &std::task::Waker) {
        self.watchdog.register(waker);
    }

    /// The earliest moment one of the timeouts runs out, and which; `None` while nothing
    /// is timed (a request is being answered and the client takes its bytes).
    pub(crate) fn deadline(&self, t: &Timeouts) -> Option<(Instant, Expired)> {
        let mut next: Option<(Instant, Expired)> = None;
        let mut consider = |at: Instant, why: Expired| {
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, why));
            }
        };
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let phase = self.phase.load(Ordering::Acquire);
            let since = self.at(phase & !IDLE_BIT);
            if phase & IDLE_BIT != 0 {
                consider(since + t.idle, Expired::Idle);
            } else {
                consider(since + t.header, Expired::Header);
            }
        }
        let blocked = self.write_blocked_ms.load(Ordering::Acquire);
        if blocked != NEVER {
            consider(self.at(blocked) + t.send, Expired::Send);
        }
        if self.parked.load(Ordering::Acquire) > 0 {
            consider(
                self.at(self.body_polled_ms.load(Ordering::Acquire)) + t.send,
                Expired::Send,
            );
        }
        next
    }

    /// Bytes arrived: after an idle spell they start a request's headers.
    fn on_read(&self) {
        self.on_read_at(Instant::now());
    }

    fn on_read_at(&self, now: Instant) {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return;
        }
        let phase = self.phase.load(Ordering::Acquire);
        if phase & IDLE_BIT != 0 {
            let _ = self
                .phase
                .compare_exchange(phase, self.ms(now), Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn on_write(&self, progressed: bool) {
        self.on_write_at(progressed, Instant::now());
    }

    fn on_write_at(&self, progressed: bool, now: Instant) {
        let blocked = self.write_blocked_ms.load(Ordering::Relaxed);
        if progressed {
            if blocked != NEVER {
                self.write_blocked_ms.store(NEVER, Ordering::Release);
            }
        } else if blocked == NEVER {
            self.write_blocked_ms.store(self.ms(now), Ordering::Release);
        }
    }

    /// A request's headers were read and it is being answered.
    pub(crate) fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            activity: self.clone(),
        }
    }
}

/// One request in flight; the connection goes idle when the last one is dropped (with
/// its response body, once hyper has taken all of it or given up).
#[derive(Debug)]
pub(crate) struct InFlight {
    activity: Arc<Activity>,
}

impl InFlight {
    fn end_at(&self, now: Instant) {
        let a = &self.activity;
        // The phase is set before the count reaches zero, so a watchdog that sees zero
        // also sees the new idle spell, not the previous header phase.
        if a.in_flight.load(Ordering::Acquire) == 1 {
            a.phase.store(IDLE_BIT | a.ms(now), Ordering::Release);
        }
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.watchdog.wake();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end_at(Instant::now());
    }
}

/// A connection's IO, noting reads and refused writes in its [`Activity`].
#[derive(Debug)]
pub(crate) struct TrackedIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> TrackedIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
        if buf.filled().len() > before {
            this.activity.on_read();
        }
        Poll::Ready(r)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.on_write(r.is_ready());
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.on_write(r.is_ready());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.activity.on_write(r.is_ready());
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its request in flight until dropped and notes when the
/// client stops asking for its bytes.
#[derive(Debug)]
pub(crate) struct TrackedBody {
    inner: axum::body::Body,
    in_flight: InFlight,
    /// Handed out a frame and not asked for the next yet.
    parked: bool,
}

impl TrackedBody {
    pub(crate) fn new(inner: axum::body::Body, in_flight: InFlight) -> Self {
        Self {
            inner,
            in_flight,
            parked: false,
        }
    }

    fn unpark(&mut self) {
        if self.parked {
            self.parked = false;
            self.in_flight.activity.parked.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let a = this.in_flight.activity.clone();
        a.body_polled_ms.store(a.now_ms(), Ordering::Release);
        this.unpark();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &r {
            this.parked = true;
            if a.parked.fetch_add(1, Ordering::AcqRel) == 0 {
                a.watchdog.wake();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(30),
        idle: Duration::from_secs(75),
        send: Duration::from_secs(60),
    };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn phases_pick_their_timeout() {
        let a = Activity::new();
        let start = a.start;
        assert_eq!(a.deadline(&T), Some((start + T.header, Expired::Header)));
        let req = a.request_started();
        assert_eq!(a.deadline(&T), None, "nothing is timed while answering");
        req.end_at(start + secs(5));
        std::mem::forget(req);
        assert_eq!(a.deadline(&T), Some((start + secs(5) + T.idle, Expired::Idle)));
        a.on_read_at(start + secs(12));
        assert_eq!(
            a.deadline(&T),
            Some((start + secs(12) + T.header, Expired::Header)),
            "a byte after an idle spell starts the header clock"
        );
        a.on_read_at(start + secs(13));
        assert_eq!(
            a.deadline(&T),
            Some((start + secs(12) + T.header, Expired::Header)),
            "more bytes do not restart it"
        );
    }

    #[test]
    fn a_refused_write_starts_the_send_clock_and_progress_stops_it() {
        let a = Activity::new();
        let start = a.start;
        let _req = a.request_started();
        a.on_write_at(false, start + secs(1));
        a.on_write_at(false, start + secs(3));
        assert_eq!(a.deadline(&T), Some((start + secs(1) + T.send, Expired::Send)));
        a.on_write_at(true, start + secs(4));
        assert_eq!(a.deadline(&T), None);
    }
}
