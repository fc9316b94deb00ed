//! One in-flight computation per key: later callers wait on the first one's result.

use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

pub(super) struct SingleFlight<K, V: Clone> {
    flights: Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>,
}

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            flights: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, V: Clone> std::fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SingleFlight")
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `make()` unless a flight for `key` is under way, and returns its result.
    /// If every waiter goes away the flight is dropped; the next caller starts afresh.
    pub(super) async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> V
    where
        F: Future<Output = V> + Send + 'static,
    {
        let flight = {
            let mut flights = super::lock(&self.flights);
            match flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = make().boxed().shared();
                    flights.insert(key.clone(), f.clone());
                    f
                }
            }
        };
        let out = flight.clone().await;
        let mut flights = super::lock(&self.flights);
        if flights.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
            flights.remove(&key);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

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
                    runs.fetch_add(1, Ordering::SeqCst) + 41
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
            assert_eq!(h.await.unwrap(), 41);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(
            super::super::lock(&sf.flights).is_empty(),
            "finished flights are removed"
        );
        // A later call runs again.
        assert_eq!(sf.run("k", || async { 7 }).await, 7);
    }
}
