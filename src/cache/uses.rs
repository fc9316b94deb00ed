//! Recording what requests used without a database write per request: uses collect in
//! memory and are written in one transaction every few seconds, and at shutdown.

use crate::metadata::{now_secs, Metadata, Use};
use std::collections::HashMap;
use std::sync::Mutex;
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

    fn take(&self) -> Vec<(Use, i64)> {
        std::mem::take(&mut *super::lock(&self.pending))
            .into_iter()
            .collect()
    }

    /// Writes every recorded use to SQLite now.
    pub async fn flush(&self, meta: &Metadata) -> Result<(), crate::metadata::MetadataError> {
        meta.record_uses(self.take()).await
    }
}

pub(super) async fn flush_loop(buffer: &UseBuffer, meta: &Metadata, shutdown: &CancellationToken) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = shutdown.cancelled() => true,
        };
        if let Err(e) = buffer.flush(meta).await {
            tracing::warn!(error = %e, "could not record last-used times");
        }
        if stopping {
            return;
        }
    }
}
