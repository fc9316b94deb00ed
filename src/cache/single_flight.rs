//! One in-flight computation per key: later callers wait on the first one's result.
//!
//! A panic inside a computation is caught here (I10): it is logged once with an error id,
//! every waiter gets `CacheError::Panicked` carrying that id, and the key is released like
//! any finished flight, so the next caller starts afresh. Uncaught, the panic would leave
//! a poisoned `Shared` in the map that fails every later caller for the key.

use super::error::{new_error_id, panic_message};
use super::CacheError;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

type Flight<T> = Shared<BoxFuture<'static, Result<T, CacheError>>>;

pub(super) struct SingleFlight<K, T: Clone> {
    flights: Mutex<HashMap<K, Flight<T>>>,
}

impl<K, T: Clone> Default for SingleFlight<K, T> {
    fn default() -> Self {
        Self {
            flights: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, T: Clone> std::fmt::Debug for SingleFlight<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SingleFlight")
    }
}

impl<K, T> SingleFlight<K, T>
where
    K: Eq + Hash + Clone + Debug + Send + Unpin + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Runs `make()` unless a flight for `key` is under way, and returns its result.
    /// A flight whose waiters all went away (clients that hung up) is dropped with the
    /// last of them and leaves the map: keys are chosen by clients, and an abandoned
    /// flight would otherwise keep its key, its memory and any upstream connection it
    /// holds forever (I10). The next caller starts afresh.
    pub(super) async fn run<M, F>(&self, key: K, make: M) -> Result<T, CacheError>
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = Result<T, CacheError>> + Send + 'static,
    {
        let flight = {
            let mut flights = super::lock(&self.flights);
            match flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = contained(key.clone(), make).boxed().shared();
                    flights.insert(key.clone(), f.clone());
                    f
                }
            }
        };
        Waiter {
            flights: &self.flights,
            key,
            awaited: Some(flight.clone()),
            flight,
        }
        .await
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        super::lock(&self.flights).len()
    }

    /// Callers waiting on the flight for `key`.
    #[cfg(test)]
    fn waiting(&self, key: &K) -> usize {
        super::lock(&self.flights)
            .get(key)
            .and_then(Shared::strong_count)
            .map_or(0, |n| n - 1)
    }
}

/// A caller waiting on a flight. When it goes, finished or dropped, the flight leaves
/// the map if it has finished or no other caller waits on it. Waiters clone a flight
/// only under the map's lock, so the count read under it is exact.
struct Waiter<'a, K: Eq + Hash, T: Clone> {
    flights: &'a Mutex<HashMap<K, Flight<T>>>,
    key: K,
    /// The copy this caller polls (a finished `Shared` lets go of the flight).
    awaited: Option<Flight<T>>,
    /// The copy that identifies the flight in the map.
    flight: Flight<T>,
}

impl<K: Eq + Hash + Unpin, T: Clone> Future for Waiter<'_, K, T> {
    type Output = Result<T, CacheError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.awaited.as_mut() {
            Some(awaited) => Pin::new(awaited).poll(cx),
            // Not reached: polled again after its output.
            None => Poll::Pending,
        }
    }
}

impl<K: Eq + Hash, T: Clone> Drop for Waiter<'_, K, T> {
    fn drop(&mut self) {
        // This caller's polled copy first, so that the count below is of the others.
        self.awaited = None;
        let mut flights = super::lock(self.flights);
        if !flights.get(&self.key).is_some_and(|f| f.ptr_eq(&self.flight)) {
            return;
        }
        // A finished flight goes with its first caller (later ones start afresh); an
        // unfinished one when the map's copy and this one are all that is left.
        let finished = self.flight.peek().is_some();
        if finished || self.flight.strong_count().is_none_or(|n| n <= 2) {
            flights.remove(&self.key);
        }
    }
}

/// `make()` run to its end, a panic (in `make` itself or while polling its future)
/// turned into `CacheError::Panicked` after one log line.
async fn contained<K, M, F, T>(key: K, make: M) -> Result<T, CacheError>
where
    K: Debug,
    M: FnOnce() -> F,
    F: Future<Output = Result<T, CacheError>>,
{
    // The flight's own state is dropped with it; the cache's maps stay consistent under
    // a panic (std mutexes, never held across an await, poisoning ignored).
    match AssertUnwindSafe(async move { make().await }).catch_unwind().await {
        Ok(out) => out,
        Err(payload) => {
            let error_id = new_error_id();
            tracing::error!(
                error.id = %error_id,
                flight.key = ?key,
                panic.message = %panic_message(&*payload),
                "a shared computation panicked; its requests fail with this error id"
            );
            Err(CacheError::Panicked { error_id })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_flight_every_caller_left_is_dropped_and_its_key_released() {
        struct CountDrop(Arc<AtomicUsize>);
        impl Drop for CountDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let sf: Arc<SingleFlight<String, usize>> = Arc::default();
        let (started, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        // A caller of a flight that never finishes (an upstream that does not answer).
        let call = |key: String| {
            let (sf, started, dropped) = (sf.clone(), started.clone(), dropped.clone());
            tokio::spawn(async move {
                sf.run(key, move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let held = CountDrop(dropped);
                    async move {
                        let _held = held;
                        std::future::pending::<Result<usize, CacheError>>().await
                    }
                })
                .await
            })
        };
        for i in 0..100 {
            let key = format!("tag-{i}");
            let (first, second) = (call(key.clone()), call(key.clone()));
            while sf.waiting(&key) < 2 {
                tokio::task::yield_now().await;
            }
            // One of two callers leaving keeps the flight for the other.
            first.abort();
            assert!(first.await.unwrap_err().is_cancelled());
            assert_eq!(sf.len(), 1, "the other caller still waits");
            second.abort();
            assert!(second.await.unwrap_err().is_cancelled());
            assert_eq!(sf.len(), 0, "flight {i} was left behind");
        }
        assert_eq!(started.load(Ordering::SeqCst), 100, "one run per key");
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            100,
            "every abandoned run was dropped"
        );
        // The key works again afterwards.
        assert_eq!(sf.run("tag-0".into(), || async { Ok(3) }).await.unwrap(), 3);
        assert_eq!(sf.len(), 0);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let sf: Arc<SingleFlight<&str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut handles = Vec::new();
        for _ in 0..10 {
            let (sf, runs, gate) = (sf.clone(), runs.clone(), gate.clone());
            handles.push(tokio::spawn(async move {
                sf.run("k", || async move {
                    gate.notified().await;
                    Ok(runs.fetch_add(1, Ordering::SeqCst) + 41)
                })
                .await
            }));
        }
        // Wait until the flight exists, then let it finish.
        while super::super::lock(&sf.flights).is_empty() {
            tokio::task::yield_now().await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for h in handles {
            assert_eq!(h.await.unwrap().unwrap(), 41);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(
            super::super::lock(&sf.flights).is_empty(),
            "finished flights are removed"
        );
        // A later call runs again.
        assert_eq!(sf.run("k", || async { Ok(7) }).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_panic_fails_its_waiters_alone_and_releases_the_key() {
        let sf: Arc<SingleFlight<&str, usize>> = Arc::default();
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut handles = Vec::new();
        for _ in 0..3 {
            let (sf, gate) = (sf.clone(), gate.clone());
            handles.push(tokio::spawn(async move {
                sf.run("k", || async move {
                    gate.notified().await;
                    panic!("boom");
                })
                .await
            }));
        }
        while super::super::lock(&sf.flights).is_empty() {
            tokio::task::yield_now().await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        let mut ids = Vec::new();
        for h in handles {
            match h.await.expect("the waiter itself does not panic") {
                Err(CacheError::Panicked { error_id }) => ids.push(error_id),
                other => panic!("{other:?}"),
            }
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "one panic, one id for every waiter: {ids:?}");
        assert!(super::super::lock(&sf.flights).is_empty(), "the key is released");
        // Another key is untouched, and the same key works again.
        assert_eq!(sf.run("other", || async { Ok(1) }).await.unwrap(), 1);
        assert_eq!(sf.run("k", || async { Ok(2) }).await.unwrap(), 2);
        // A panic in `make` itself, before any future exists, is contained too.
        let r = sf.run("k", || -> std::future::Ready<Result<usize, CacheError>> {
            panic!("early")
        });
        assert!(matches!(r.await, Err(CacheError::Panicked { .. })));
        assert!(super::super::lock(&sf.flights).is_empty());
    }
}
