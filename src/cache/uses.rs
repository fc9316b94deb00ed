//! Recording what requests used without a database write per request: uses collect in
//! memory and are written in one transaction every few seconds, and at shutdown. A flush
//! that fails (a full disk, a busy database) keeps its uses for the next one.

use crate::metadata::{now_secs, Metadata, MetadataError, Use};
use crate::storage::DataDisk;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often recorded uses reach SQLite. Expiry works in minutes to days, so seconds of
/// delay cost nothing; a crash loses at most this much "last used" precision.
const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Distinct uses held between flushes; past this, further uses wait for the next flush
/// (they are refreshed by the next request anyway).
const PENDING_MAX: usize = 100_000;

/// Uses recorded in memory until the next flush; shared with the cleanup jobs, which flush
/// it right before a compare-and-delete so "pulled since evaluation" sees recent pulls.
#[derive(Debug, Default)]
pub struct UseBuffer {
    pending: Mutex<HashMap<Use, i64>>,
}

impl UseBuffer {
    pub(super) fn record(&self, used: Use) {
        let mut pending = super::lock(&self.pending);
        if pending.len() < PENDING_MAX || pending.contains_key(&used) {
            pending.insert(used, now_secs());
        }
    }

    fn take(&self) -> Arc<[(Use, i64)]> {
        std::mem::take(&mut *super::lock(&self.pending))
            .into_iter()
            .collect()
    }

    /// Puts back what a failed flush took, merged with uses recorded since: the later
    /// time of each wins, and the bound holds for entries not already pending.
    fn put_back(&self, uses: &[(Use, i64)]) {
        let mut pending = super::lock(&self.pending);
        for (used, at) in uses {
            let room = pending.len() < PENDING_MAX;
            match pending.entry(used.clone()) {
                Entry::Occupied(mut e) => {
                    if *e.get() < *at {
                        e.insert(*at);
                    }
                }
                Entry::Vacant(e) if room => {
                    e.insert(*at);
                }
                Entry::Vacant(_) => {}
            }
        }
    }

    /// Uses waiting for the next flush.
    pub fn pending(&self) -> usize {
        super::lock(&self.pending).len()
    }

    /// Writes every recorded use to SQLite now; on failure they stay for the next flush.
    pub async fn flush(&self, meta: &Metadata) -> Result<(), MetadataError> {
        let taken = self.take();
        if let Err(e) = meta.record_uses(taken.clone()).await {
            self.put_back(&taken);
            return Err(e);
        }
        Ok(())
    }
}

/// Flushes every `FLUSH_EVERY` and at shutdown, and checks whether a full disk has
/// space again. A failing flush is logged when it starts failing and when it recovers,
/// not every time: a full disk is logged once per episode by `disk`.
pub(super) async fn flush_loop(
    buffer: &UseBuffer,
    meta: &Metadata,
    disk: &DataDisk,
    shutdown: &CancellationToken,
) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = shutdown.cancelled() => true,
        };
        disk.check();
        match buffer.flush(meta).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("last-used times recorded again");
            }
            Ok(()) => {}
            Err(e) if e.is_disk_full() => {
                failing = true;
                disk.out_of_space("last-used times", 0, &e);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, uses.pending = buffer.pending(), "could not record last-used times; kept for the next flush");
            }
            Err(e) => tracing::debug!(error = %e, "could not record last-used times"),
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::RepoKey;

    #[test]
    fn uses_a_failed_flush_took_come_back_and_the_later_time_wins() {
        let buffer = UseBuffer::default();
        let repo = RepoKey {
            upstream: "u".into(),
            name: "r".into(),
        };
        let a = Use::Tag(repo.clone(), "a".into());
        let b = Use::Tag(repo, "b".into());
        buffer.record(a.clone());
        buffer.record(b.clone());
        let taken = buffer.take();
        assert_eq!(buffer.pending(), 0);
        // While the flush ran, `a` was used again (later).
        super::super::lock(&buffer.pending).insert(a.clone(), i64::MAX);
        buffer.put_back(&taken);
        let pending = super::super::lock(&buffer.pending).clone();
        assert_eq!(pending.len(), 2, "nothing lost");
        assert_eq!(pending[&a], i64::MAX, "the later use wins");
        assert!(pending[&b] <= now_secs());
    }
}
