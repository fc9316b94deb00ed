//! Manifest GETs per repository since start, for the status page's "most pulled". Split
//! over shards by the repository's hash, so two requests contend only when they hash to
//! the same shard; bounded, because clients choose repository names.

use crate::metadata::RepoKey;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Mutex;

/// Shards: four times the cores of a small server, so contention stays rare.
const SHARDS: usize = 16;
/// Repositories counted per shard (16 384 in all, about 2 MiB at most). Past that, new
/// names are not counted: the busiest repositories are the ones seen early and often, and
/// anonymous clients must not grow this without bound (I10).
const PER_SHARD_MAX: usize = 1024;

/// FNV-1a: a few nanoseconds for a short name where SipHash took a measurable share of a
/// warm request. Flooding is not a concern: each shard is bounded and the names a client
/// can choose only land in the shards, never grow them past the bound.
#[derive(Debug, Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Counts = HashMap<RepoKey, u64, BuildHasherDefault<Fnv>>;

#[derive(Debug)]
pub(super) struct Pulls {
    shards: [Mutex<Counts>; SHARDS],
}

impl Default for Pulls {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl Pulls {
    pub(super) fn record(&self, repo: RepoKey) {
        let mut h = Fnv::default();
        repo.hash(&mut h);
        // The high bits: FNV's low bits mix least.
        let shard = &self.shards[(h.finish() >> 60) as usize % SHARDS];
        let mut counts = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = counts.len() >= PER_SHARD_MAX;
        match counts.get_mut(&repo) {
            Some(n) => *n += 1,
            None if !full => {
                counts.insert(repo, 1);
            }
            None => {}
        }
    }

    /// The `n` most pulled repositories, most first (ties by name).
    pub(super) fn top(&self, n: usize) -> Vec<(RepoKey, u64)> {
        let mut all: Vec<(RepoKey, u64)> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> RepoKey {
        RepoKey {
            upstream: "hub".into(),
            name: name.into(),
        }
    }

    #[test]
    fn counts_and_ranks_and_stays_bounded() {
        let p = Pulls::default();
        for _ in 0..3 {
            p.record(key("a"));
        }
        p.record(key("b"));
        for i in 0..(SHARDS * PER_SHARD_MAX + 100) {
            p.record(key(&format!("many/{i}")));
        }
        let top = p.top(2);
        assert_eq!(top[0], (key("a"), 3));
        assert_eq!(top[1].1, 1);
        let tracked: usize = p.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(tracked <= SHARDS * PER_SHARD_MAX);
    }
}
