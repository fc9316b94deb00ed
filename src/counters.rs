//! Lock-free counters and histograms that every layer may bump: a relaxed atomic add per
//! event, no allocation, no lock. Pure (no I/O, no dependencies on other modules); the
//! Prometheus exposition that reads them lives in `metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonic count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A Unix time in milliseconds, 0 until first set.
#[derive(Debug, Default)]
pub struct Timestamp(AtomicU64);

impl Timestamp {
    pub fn set_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.0.fetch_max(now, Ordering::Relaxed);
    }

    /// Milliseconds since the epoch, or 0 when never set.
    pub fn millis(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket bounds (upper, inclusive) of network latencies: 5 ms to 30 s. Upstreams answer
/// a HEAD in milliseconds and a slow blob's headers in seconds; past 30 s the read timeout
/// is near.
pub const NETWORK_BOUNDS: &[Duration] = &[
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(2500),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
];

/// Bucket bounds of SQLite waits and transactions: 50 µs (a point update) to 10 s (the
/// busy timeout).
pub const DATABASE_BOUNDS: &[Duration] = &[
    Duration::from_micros(50),
    Duration::from_micros(100),
    Duration::from_micros(250),
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(2500),
    Duration::from_secs(10),
];

/// A latency histogram over fixed bounds: one atomic per bucket (not cumulative; the
/// exposition sums them) and the sum in nanoseconds; the count is the buckets' sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [Duration],
    /// `bounds.len() + 1` buckets; the last one is above every bound.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

/// What a histogram held at one moment, buckets cumulative as Prometheus wants them.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, `+Inf` excluded.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_secs: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [Duration]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let i = self.bounds.partition_point(|b| *b < d);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The buckets made cumulative. Read without a lock, so a concurrent observation may
    /// be in a bucket and not yet in the sum; `count` is the sum of the buckets, so the
    /// `+Inf` bucket always equals it.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(self.buckets.iter())
            .map(|(bound, n)| {
                total += n.load(Ordering::Relaxed);
                (bound.as_secs_f64(), total)
            })
            .collect();
        total += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: total,
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounds_inclusive() {
        static BOUNDS: &[Duration] = &[Duration::from_millis(10), Duration::from_millis(100)];
        let h = Histogram::new(BOUNDS);
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(2));
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(0.01, 1), (0.1, 2)]);
        assert_eq!(s.count, 3);
        assert!((s.sum_secs - 2.06).abs() < 1e-9);
    }

    #[test]
    fn timestamps_only_move_forward() {
        let t = Timestamp::default();
        assert_eq!(t.millis(), 0);
        t.set_now();
        let first = t.millis();
        assert!(first > 1_600_000_000_000);
        t.0.store(first + 10_000, Ordering::Relaxed);
        t.set_now();
        assert_eq!(t.millis(), first + 10_000);
    }
}
