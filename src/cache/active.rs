//! Blobs being served right now, counted per digest. The cache holds a blob here while a
//! response streams it; size-bound eviction (`scheduler::eviction`) reads a snapshot and
//! never picks one of them. Lives in `cache` because the cache fills it, so the scheduler
//! depends on the cache and not the other way round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Blobs being served right now, counted per digest.
#[derive(Debug, Default)]
pub struct ActiveBlobs {
    counts: Mutex<HashMap<String, usize>>,
}

/// Holds a blob in [`ActiveBlobs`] until dropped.
#[derive(Debug)]
pub struct ActiveGuard {
    set: Arc<ActiveBlobs>,
    digest: String,
}

impl ActiveBlobs {
    pub fn hold(self: &Arc<Self>, digest: &str) -> ActiveGuard {
        *self.lock().entry(digest.to_owned()).or_default() += 1;
        ActiveGuard {
            set: self.clone(),
            digest: digest.to_owned(),
        }
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut counts = self.set.lock();
        if let Some(n) = counts.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.digest);
            }
        }
    }
}
