//! Queueing `[[prefetch]]` lists on their cadence: one queued or running job per list,
//! and the time each was last queued, so a restart does not run a list again early.

use super::jobs::insert_job;
use super::{Metadata, MetadataError};
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

impl Metadata {
    /// Queues a prefetch job for the list `name` when it never ran or last ran a cadence
    /// ago and none is queued or running; records the run in the same transaction.
    /// Returns the job queued, if any.
    pub async fn enqueue_due_prefetch(
        &self,
        name: &str,
        args: Value,
        cadence_secs: i64,
        max_attempts: i64,
        now: i64,
    ) -> Result<Option<i64>, MetadataError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let last: Option<i64> = tx
                .query_row(
                    "SELECT last_run_at FROM prefetch_runs WHERE name = ?1",
                    [&name],
                    |r| r.get(0),
                )
                .optional()?;
            if last.is_some_and(|l| l.saturating_add(cadence_secs) > now) {
                return Ok(None);
            }
            let (id, new) = insert_job(
                tx,
                "prefetch",
                &args,
                Some(&format!("prefetch:{name}")),
                max_attempts,
                now,
            )?;
            if !new {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO prefetch_runs (name, last_run_at) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET last_run_at = excluded.last_run_at",
                params![name, now],
            )?;
            Ok(Some(id))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_list_is_queued_once_per_cadence_and_never_twice_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Metadata::open(&dir.path().join("regcache.db")).unwrap();
        let args = serde_json::json!({ "name": "base", "list": "/l.toml" });
        let first = meta
            .enqueue_due_prefetch("base", args.clone(), 100, 5, 1000)
            .await
            .unwrap();
        assert!(first.is_some());
        assert_eq!(
            meta.enqueue_due_prefetch("base", args.clone(), 100, 5, 1050)
                .await
                .unwrap(),
            None
        );
        // Due again, but the first is still queued: not a second one.
        assert_eq!(
            meta.enqueue_due_prefetch("base", args.clone(), 100, 5, 1200)
                .await
                .unwrap(),
            None
        );
        let job = meta.job(first.unwrap()).await.unwrap().unwrap();
        assert_eq!((job.kind.as_str(), job.state.as_str()), ("prefetch", "queued"));
        assert!(meta
            .enqueue_due_prefetch("other", args, 100, 5, 1200)
            .await
            .unwrap()
            .is_some());
    }
}
