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

#[derive(Debug, Default)]
pub(super) struct UseBuffer {
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
}

pub(super) async fn flush_loop(buffer: &UseBuffer, meta: &Metadata, shutdown: &CancellationToken) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = shutdown.cancelled() => true,
        };
        let batch = buffer.take();
        let count = batch.len();
        if let Err(e) = meta.record_uses(batch).await {
            tracing::warn!(error = %e, uses.count = count, "could not record last-used times");
        }
        if stopping {
            return;
        }
    }
}
