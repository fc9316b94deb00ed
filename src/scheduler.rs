//! Scheduled work whose state lives only in SQLite (I3, I4, I6): expiry, the deletion
//! pipeline, reconciliation and size-bound eviction. Each loop polls its indexed due times
//! (so work due in the next seconds is noticed), can be woken early, and returns on
//! shutdown. Calls `metadata` and `storage`; never HTTP, never upstreams.

mod deletes;
mod eviction;
mod expiry;
pub mod jobs;
mod policy;
pub mod reconcile;
mod uploads;

pub use deletes::run_deletes_once;
pub use jobs::JobSettings;
pub use policy::Decision;

use crate::cache::ActiveBlobs;
use crate::config::Config;
use crate::metadata::{Backoff, Metadata};
use crate::storage::BlobStore;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often each loop looks for due work when nothing woke it. Short, so ttls of
/// seconds work; cheap, because every check is one indexed query.
const POLL: Duration = Duration::from_secs(1);

/// What the loops need from the config.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub deletes_enabled: bool,
    pub delete_workers: usize,
    pub backoff: Backoff,
    pub reconcile_interval: Duration,
    pub reconcile_grace: Duration,
    /// (high watermark, low watermark) in bytes.
    pub size_bound: Option<(u64, u64)>,
}

impl SchedulerSettings {
    pub fn from_config(c: &Config) -> Self {
        let secs = |d: crate::config::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        Self {
            deletes_enabled: c.storage.delete.enabled,
            delete_workers: c.storage.delete.workers,
            backoff: Backoff {
                initial_secs: secs(c.storage.delete.retry_initial),
                max_secs: secs(c.storage.delete.retry_max),
            },
            reconcile_interval: c.storage.reconcile_interval.to_std(),
            reconcile_grace: c.storage.reconcile_grace.to_std(),
            size_bound: c.storage.max_size.map(|m| {
                let high = m.as_u64();
                (high, high / 100 * u64::from(c.storage.low_watermark_percent))
            }),
        }
    }
}

/// The shared parts every loop works with.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub meta: Metadata,
    pub store: BlobStore,
    pub settings: SchedulerSettings,
    pub tmp_dir: Option<PathBuf>,
    pub active: Arc<ActiveBlobs>,
    /// Wakes the deletion workers when expiry queued something.
    pub deletes_due: Arc<Notify>,
    pub jobs: JobSettings,
    /// Wakes job workers when a job was queued or finished.
    pub jobs_due: Arc<Notify>,
    /// The server's buffered uses (cleanup flushes them before deleting); none in the CLI.
    pub uses: Option<Arc<crate::cache::UseBuffer>>,
    pub shutdown: CancellationToken,
}

impl Scheduler {
    /// Starts every loop on `tasks`; each returns when `shutdown` fires.
    pub fn spawn(self, tasks: &TaskTracker) {
        tasks.spawn(expiry::run(self.clone()));
        tasks.spawn(deletes::run(self.clone()));
        tasks.spawn(reconcile::run(self.clone()));
        tasks.spawn(uploads::run(self.clone()));
        jobs::spawn(&self, tasks);
        if self.settings.size_bound.is_some() {
            tasks.spawn(eviction::run(self));
        }
    }

    /// Sleeps `d`, or returns `true` at once when shutting down.
    pub async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => false,
            () = self.shutdown.cancelled() => true,
        }
    }
}
