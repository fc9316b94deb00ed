//! A value read from SQLite, kept for a while: concurrent readers share one refresh and
//! reuse its result until it is `max_age` old, so scrapes and page views cost at most one
//! query per period however many come.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) struct Cached<T> {
    max_age: Duration,
    /// Held across the refresh on purpose: later callers wait for it instead of starting
    /// their own.
    slot: tokio::sync::Mutex<Option<Fresh<T>>>,
}

/// A value and when and how fast it was read.
#[derive(Debug)]
pub(super) struct Fresh<T> {
    pub(super) value: Arc<T>,
    pub(super) at: Instant,
    pub(super) took: Duration,
}

impl<T> Clone for Fresh<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            at: self.at,
            took: self.took,
        }
    }
}

impl<T> Cached<T> {
    pub(super) fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    /// The kept value if young enough, else `refresh()`'s (kept when it succeeds).
    pub(super) async fn get<E, F>(&self, refresh: impl FnOnce() -> F) -> Result<Fresh<T>, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(fresh) = slot.as_ref().filter(|f| f.at.elapsed() < self.max_age) {
            return Ok(fresh.clone());
        }
        let started = Instant::now();
        let value = refresh().await?;
        let fresh = Fresh {
            value: Arc::new(value),
            at: Instant::now(),
            took: started.elapsed(),
        };
        *slot = Some(fresh.clone());
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn refreshes_once_per_period() {
        let reads = AtomicUsize::new(0);
        let read = || async { Ok::<_, ()>(reads.fetch_add(1, Ordering::SeqCst)) };
        let c = Cached::new(Duration::from_secs(3600));
        assert_eq!(*c.get(read).await.unwrap().value, 0);
        assert_eq!(*c.get(read).await.unwrap().value, 0);
        let c = Cached::new(Duration::ZERO);
        assert_eq!(*c.get(read).await.unwrap().value, 1);
        assert_eq!(*c.get(read).await.unwrap().value, 2);
        // A failed refresh keeps nothing and reports its error.
        assert_eq!(
            c.get(|| async { Err::<usize, _>("down") }).await.unwrap_err(),
            "down"
        );
    }
}
