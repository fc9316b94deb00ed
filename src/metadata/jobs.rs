//! The jobs table (I4): queued -> running -> succeeded | failed | cancelled. A worker
//! claims a job atomically with a lease and acts on that row alone; every outcome is
//! recorded; retries are bounded with backoff computed in SQL; a sweeper takes back
//! running jobs whose lease lapsed.

use super::{Metadata, MetadataError};
use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;
use serde_json::Value;

/// A job as stored and as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub state: String,
    pub args: Value,
    pub attempts: i64,
    pub runs: i64,
    pub max_attempts: i64,
    pub progress: Value,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub run_after: i64,
}

const JOB_COLUMNS: &str =
    "id, kind, state, args, attempts, runs, max_attempts, progress, result, last_error, \
     created_at, started_at, updated_at, finished_at, run_after";

fn json(text: Option<String>) -> Option<Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        kind: r.get(1)?,
        state: r.get(2)?,
        args: json(r.get(3)?).unwrap_or(Value::Null),
        attempts: r.get(4)?,
        runs: r.get(5)?,
        max_attempts: r.get(6)?,
        progress: json(r.get(7)?).unwrap_or(Value::Null),
        result: json(r.get(8)?),
        error: r.get(9)?,
        created_at: r.get(10)?,
        started_at: r.get(11)?,
        updated_at: r.get(12)?,
        finished_at: r.get(13)?,
        run_after: r.get(14)?,
    })
}

/// How a run of a job ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    Succeeded(Value),
    /// More to do (a time budget ran out): back to the queue at once, not an error.
    Continue(Value),
    /// An error: retried with backoff until `max_attempts`, then `failed`.
    Error(String),
}

/// Retry backoff for jobs: `initial * 2^attempts`, capped.
#[derive(Debug, Clone, Copy)]
pub struct JobBackoff {
    pub initial_secs: i64,
    pub max_secs: i64,
}

/// What cancelling found.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    Cancelled(Job),
    NotFound,
    /// Only queued jobs can be cancelled; this one is in another state.
    NotQueued(Job),
}

/// What a sweep found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    pub jobs_requeued: u64,
    pub repositories_reset: u64,
    pub jobs_by_state: Vec<(String, i64)>,
}

pub(super) fn insert_job(
    tx: &rusqlite::Transaction<'_>,
    kind: &str,
    args: &Value,
    dedupe_key: Option<&str>,
    max_attempts: i64,
    now: i64,
) -> Result<(i64, bool), MetadataError> {
    if let Some(key) = dedupe_key {
        let existing: Option<i64> = tx
            .query_row(
                "SELECT id FROM jobs WHERE dedupe_key = ?1 AND state IN ('queued', 'running')",
                [key],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = existing {
            return Ok((id, false));
        }
    }
    let id = tx.query_row(
        "INSERT INTO jobs (kind, args, state, max_attempts, run_after, created_at, updated_at, dedupe_key)
         VALUES (?1, ?2, 'queued', ?3, ?4, ?4, ?4, ?5) RETURNING id",
        params![kind, args.to_string(), max_attempts, now, dedupe_key],
        |r| r.get(0),
    )?;
    Ok((id, true))
}

impl Metadata {
    /// Queues a job; with a `dedupe_key`, an already queued or running job with that key
    /// is returned instead. Returns (id, whether it is new).
    pub async fn enqueue_job(
        &self,
        kind: &str,
        args: Value,
        dedupe_key: Option<String>,
        max_attempts: i64,
        now: i64,
    ) -> Result<(i64, bool), MetadataError> {
        let kind = kind.to_owned();
        self.write(move |tx| insert_job(tx, &kind, &args, dedupe_key.as_deref(), max_attempts, now))
            .await
    }

    /// Claims the next due job of one of `kinds`, with a lease.
    pub async fn claim_job(
        &self,
        kinds: &'static [&'static str],
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<Job>, MetadataError> {
        self.write(move |tx| {
            let placeholders = kinds
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ");
            Ok(tx
                .query_row(
                    &format!(
                        "UPDATE jobs SET state = 'running', lease_until = ?1 + ?2, runs = runs + 1,
                                started_at = coalesce(started_at, ?1), updated_at = ?1
                          WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND run_after <= ?1
                                         AND kind IN ({placeholders}) ORDER BY run_after, id LIMIT 1)
                          RETURNING {JOB_COLUMNS}"
                    ),
                    params![now, lease_secs],
                    job_from_row,
                )
                .optional()?)
        })
        .await
    }

    /// Extends a running job's lease and records its progress.
    pub async fn heartbeat_job(
        &self,
        id: i64,
        progress: Value,
        now: i64,
        lease_secs: i64,
    ) -> Result<(), MetadataError> {
        self.write(move |tx| {
            tx.execute(
                "UPDATE jobs SET lease_until = ?2 + ?3, progress = ?4, updated_at = ?2 WHERE id = ?1 AND state = 'running'",
                params![id, now, lease_secs, progress.to_string()],
            )?;
            Ok(())
        })
        .await
    }

    /// Records a running job's progress (the heartbeat keeps the lease).
    pub async fn set_job_progress(&self, id: i64, progress: Value, now: i64) -> Result<(), MetadataError> {
        self.write(move |tx| {
            tx.execute(
                "UPDATE jobs SET progress = ?2, updated_at = ?3 WHERE id = ?1 AND state = 'running'",
                params![id, progress.to_string(), now],
            )?;
            Ok(())
        })
        .await
    }

    /// Records how a run ended. Every job reaches a terminal state: errors are retried
    /// with backoff until `max_attempts`, then the job is `failed` with its error.
    pub async fn finish_job(
        &self,
        id: i64,
        outcome: RunOutcome,
        now: i64,
        backoff: JobBackoff,
    ) -> Result<(), MetadataError> {
        self.write(move |tx| {
            match outcome {
                RunOutcome::Succeeded(result) => tx.execute(
                    "UPDATE jobs SET state = 'succeeded', result = ?2, lease_until = NULL, finished_at = ?3,
                            updated_at = ?3, last_error = NULL
                      WHERE id = ?1 AND state = 'running'",
                    params![id, result.to_string(), now],
                )?,
                RunOutcome::Continue(progress) => tx.execute(
                    "UPDATE jobs SET state = 'queued', progress = ?2, lease_until = NULL, run_after = ?3, updated_at = ?3
                      WHERE id = ?1 AND state = 'running'",
                    params![id, progress.to_string(), now],
                )?,
                RunOutcome::Error(error) => tx.execute(
                    "UPDATE jobs SET attempts = attempts + 1, last_error = ?2, lease_until = NULL, updated_at = ?3,
                            state = CASE WHEN attempts + 1 >= max_attempts THEN 'failed' ELSE 'queued' END,
                            finished_at = CASE WHEN attempts + 1 >= max_attempts THEN ?3 END,
                            run_after = ?3 + min(?5, ?4 * (1 << min(attempts, 30)))
                      WHERE id = ?1 AND state = 'running'",
                    params![id, error, now, backoff.initial_secs, backoff.max_secs],
                )?,
            };
            Ok(())
        })
        .await
    }

    pub async fn cancel_job(&self, id: i64, now: i64) -> Result<CancelOutcome, MetadataError> {
        self.write(move |tx| {
            let cancelled = tx
                .query_row(
                    &format!(
                        "UPDATE jobs SET state = 'cancelled', finished_at = ?2, updated_at = ?2
                          WHERE id = ?1 AND state = 'queued' RETURNING {JOB_COLUMNS}"
                    ),
                    params![id, now],
                    job_from_row,
                )
                .optional()?;
            if let Some(job) = cancelled {
                // A cancelled repository deletion leaves the repository served again.
                if job.kind == "delete_repository" {
                    if let (Some(up), Some(name)) = (job.args["upstream"].as_str(), job.args["repository"].as_str()) {
                        tx.execute(
                            "UPDATE repositories SET state = 'active', delete_requested_at = NULL, delete_heartbeat_at = NULL
                              WHERE upstream = ?1 AND name = ?2 AND state = 'delete_scheduled'",
                            params![up, name],
                        )?;
                    }
                }
                return Ok(CancelOutcome::Cancelled(job));
            }
            let job = tx
                .query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"), [id], job_from_row)
                .optional()?;
            Ok(job.map_or(CancelOutcome::NotFound, CancelOutcome::NotQueued))
        })
        .await
    }

    pub async fn job(&self, id: i64) -> Result<Option<Job>, MetadataError> {
        self.read(move |c| {
            Ok(c.query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                job_from_row,
            )
            .optional()?)
        })
        .await
    }

    /// The newest jobs first, optionally of one state.
    pub async fn jobs(&self, state: Option<String>, limit: u32) -> Result<Vec<Job>, MetadataError> {
        self.read(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 IS NULL OR state = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![state, limit], job_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Takes back running jobs whose lease lapsed and repository deletions whose worker
    /// went silent for `stale_secs`; counts jobs per state for the log.
    pub async fn sweep(&self, now: i64, stale_secs: i64) -> Result<SweepReport, MetadataError> {
        self.write(move |tx| {
            let jobs_requeued = tx.execute(
                "UPDATE jobs SET state = 'queued', lease_until = NULL, run_after = ?1, updated_at = ?1
                  WHERE state = 'running' AND lease_until <= ?1",
                [now],
            )? as u64;
            let repositories_reset = tx.execute(
                "UPDATE repositories SET state = 'delete_scheduled'
                  WHERE state = 'delete_ongoing' AND coalesce(delete_heartbeat_at, 0) <= ?1 - ?2",
                params![now, stale_secs],
            )? as u64;
            let mut stmt = tx.prepare("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")?;
            let jobs_by_state = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            Ok(SweepReport {
                jobs_requeued,
                repositories_reset,
                jobs_by_state,
            })
        })
        .await
    }
}
