//! Imports that stopped: one not heard from for long enough is abandoned (its holds go,
//! and what only it held is queued for deletion), and the work directories of imports no
//! longer running are removed. A running import says it is alive with a heartbeat.

use super::{imports_dir, BundleError};
use crate::metadata::{now_secs, Metadata};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// How often a running import says it is alive (see `STALE_AFTER_SECS`).
const HEARTBEAT: Duration = Duration::from_secs(30);
/// An import not heard from for this long (20 missed heartbeats), or for
/// `storage.reconcile_grace` if longer, is abandoned: its holds go and what only it held
/// is queued for deletion. Long enough that a rerun after an interruption still finds
/// its blobs; reconciliation and every import check for abandoned ones.
const STALE_AFTER_SECS: i64 = 600;
/// The work directory of an import not heard from for this long (4 missed heartbeats) is
/// removed: its process is gone, and a partial blob file in it may be large.
const WORK_DIR_STALE_SECS: i64 = 120;

/// Abandons imports not heard from for `max(grace_secs, STALE_AFTER_SECS)` (their holds
/// go; what only they held is queued for deletion) and removes work directories of
/// imports no longer running. Returns (imports abandoned, blobs queued, dirs removed);
/// with `dry_run`, changes nothing and counts only the directories.
pub async fn abandon_stale_imports(
    meta: &Metadata,
    data_dir: &Path,
    grace_secs: i64,
    dry_run: bool,
) -> Result<(u64, u64, u64), BundleError> {
    let now = now_secs();
    let (imports, queued) = if dry_run {
        (0, 0)
    } else {
        let cutoff = now.saturating_sub(grace_secs.max(STALE_AFTER_SECS));
        let r = meta.abandon_stale_imports(cutoff, now).await?;
        (r.imports, r.blobs_queued)
    };
    // Listed before the imports on record are read: an import records itself before it
    // creates its directory, so every directory listed here has its row by then.
    let dir = imports_dir(data_dir);
    let entries: Vec<std::fs::DirEntry> = match std::fs::read_dir(&dir) {
        Ok(d) => d.flatten().collect(),
        Err(_) => return Ok((imports, queued, 0)),
    };
    let running: HashMap<i64, i64> = meta.imports_on_record().await?.into_iter().collect();
    let mut removed = 0;
    for e in entries {
        let alive = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i64>().ok())
            .and_then(|id| running.get(&id))
            .is_some_and(|beat| now - beat < WORK_DIR_STALE_SECS);
        if !alive && (dry_run || std::fs::remove_dir_all(e.path()).is_ok()) {
            removed += 1;
        }
    }
    Ok((imports, queued, removed))
}

/// Beats every `HEARTBEAT` while the import runs; stops when dropped.
pub(super) struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    pub(super) fn start(meta: Metadata, import: i64) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match meta.import_heartbeat(import, now_secs()).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!(import.id = import, error = %e, "import heartbeat failed"),
                }
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}
