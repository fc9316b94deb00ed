//! Job workers (I4, I5): claim a job with a lease, run its body while a heartbeat keeps
//! the lease, record the outcome. A job reads its arguments from its own row only. The
//! sweeper takes back what dead workers held; the cleanup loop queues policies on cadence.

use super::policy::{evaluate, CompiledPolicy, Decision};
use super::{Scheduler, POLL};
use crate::config::CleanupPolicy;
use crate::glob::Glob;
use crate::metadata::{now_secs, Job, JobBackoff, RepoDeleteStep, RepoKey, RunOutcome};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the cleanup loop looks for repositories whose policy is due.
const CLEANUP_CHECK_EVERY: Duration = Duration::from_secs(60);
/// How long a purge waits for the blobs it handed over to be deleted before it reports
/// what became of them; whatever is still retrying is reported as pending.
const PURGE_WAIT: Duration = Duration::from_secs(30);

/// What the job loops need from the config.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub workers: usize,
    pub delete_workers: usize,
    pub max_attempts: i64,
    pub backoff: JobBackoff,
    pub max_run_time: Duration,
    pub delete_batch: u32,
    pub stale_after: Duration,
    pub sweep_interval: Duration,
    pub policies: Vec<CleanupPolicy>,
}

impl JobSettings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        let secs = |d: crate::config::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let j = &c.jobs;
        Self {
            workers: j.workers,
            delete_workers: j.delete_workers,
            max_attempts: i64::from(j.max_attempts),
            backoff: JobBackoff {
                initial_secs: secs(j.retry_initial),
                max_secs: secs(j.retry_max),
            },
            max_run_time: j.max_run_time.to_std(),
            delete_batch: j.delete_batch,
            stale_after: j.stale_after.to_std(),
            sweep_interval: j.sweep_interval.to_std(),
            policies: c.cleanup.policy.clone(),
        }
    }

    pub fn lease_secs(&self) -> i64 {
        i64::try_from(self.stale_after.as_secs())
            .unwrap_or(i64::MAX)
            .max(1)
    }
}

const GENERAL_KINDS: &[&str] = &["purge", "cleanup"];
const DELETE_KINDS: &[&str] = &["delete_repository"];

/// One run of a claimed job, for kinds whose work lives above the scheduler (a prefetch
/// needs the cache): the worker claims, heartbeats and records the outcome as for its own.
pub type JobBody = Arc<dyn Fn(Job) -> BoxFuture<'static, RunOutcome> + Send + Sync>;

pub(super) fn spawn(s: &Scheduler, tasks: &tokio_util::task::TaskTracker) {
    let own: JobBody = {
        let s = s.clone();
        Arc::new(move |job: Job| {
            let s = s.clone();
            Box::pin(async move { run_body(&s, &job).await })
        })
    };
    spawn_workers(s, tasks, GENERAL_KINDS, s.jobs.workers, own.clone());
    spawn_workers(s, tasks, DELETE_KINDS, s.jobs.delete_workers, own);
    tasks.spawn(sweeper(s.clone()));
    if !s.jobs.policies.is_empty() {
        tasks.spawn(cleanup_cadence(s.clone()));
    }
}

/// Starts `n` workers claiming jobs of `kinds` and running `body` for each.
pub fn spawn_workers(
    s: &Scheduler,
    tasks: &tokio_util::task::TaskTracker,
    kinds: &'static [&'static str],
    n: usize,
    body: JobBody,
) {
    for _ in 0..n {
        tasks.spawn(worker(s.clone(), kinds, body.clone()));
    }
}

async fn worker(s: Scheduler, kinds: &'static [&'static str], body: JobBody) {
    // Logged when claims start failing (a full disk, say) and when they work again, not
    // every second in between.
    let mut claims_failing = false;
    loop {
        let claimed = s.meta.claim_job(kinds, now_secs(), s.jobs.lease_secs()).await;
        if claimed.is_ok() && claims_failing {
            claims_failing = false;
            tracing::info!("claiming jobs works again");
        }
        match claimed {
            Ok(Some(job)) => run_claimed(&s, job, &body).await,
            Ok(None) => {
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    () = s.jobs_due.notified() => {}
                    () = s.shutdown.cancelled() => return,
                }
            }
            Err(e) => {
                if !claims_failing {
                    claims_failing = true;
                    tracing::warn!(error = %e, "claiming a job failed; retrying every second");
                }
                if s.pause(POLL).await {
                    return;
                }
            }
        }
        if s.shutdown.is_cancelled() {
            return;
        }
    }
}

/// Runs one claimed job with a heartbeat, and records its outcome.
async fn run_claimed(s: &Scheduler, job: Job, body: &JobBody) {
    let started = Instant::now();
    let (id, kind) = (job.id, job.kind.clone());
    tracing::info!(job.id = id, job.kind = %kind, job.run = job.runs, "job started");
    let lease = s.jobs.lease_secs();
    let beat = Duration::from_secs(u64::try_from(lease / 3).unwrap_or(1).max(1));
    let body = body(job.clone());
    tokio::pin!(body);
    let outcome = loop {
        tokio::select! {
            outcome = &mut body => break outcome,
            () = tokio::time::sleep(beat) => {
                let progress = s.meta.job(id).await.ok().flatten().map_or(Value::Null, |j| j.progress);
                if let Err(e) = s.meta.heartbeat_job(id, progress, now_secs(), lease).await {
                    tracing::warn!(job.id = id, error = %e, "job heartbeat failed");
                }
            }
        }
    };
    match &outcome {
        RunOutcome::Succeeded(_) => {
            tracing::info!(job.id = id, job.kind = %kind, duration_ms = started.elapsed().as_millis() as u64, "job succeeded")
        }
        RunOutcome::Continue(_) => {
            tracing::info!(job.id = id, job.kind = %kind, "job ran out of its time budget; continues")
        }
        RunOutcome::Error(e) => tracing::warn!(job.id = id, job.kind = %kind, error = %e, "job run failed"),
    }
    record_outcome(s, id, outcome, lease).await;
    if kind != "delete_repository" {
        s.jobs_due.notify_one();
    }
}

/// Records how a run ended. A failure (a full disk: SQLite cannot grow its log) is
/// retried, 250 ms doubling to 5 s, for as long as the lease lasts, so the outcome is
/// kept as soon as space allows; after that the lease lapses and the sweeper hands the
/// job out again.
async fn record_outcome(s: &Scheduler, id: i64, outcome: RunOutcome, lease_secs: i64) {
    let give_up = Instant::now() + Duration::from_secs(u64::try_from(lease_secs).unwrap_or(1));
    let mut wait = Duration::from_millis(250);
    let mut failures = 0u32;
    loop {
        let Err(e) = s
            .meta
            .finish_job(id, outcome.clone(), now_secs(), s.jobs.backoff)
            .await
        else {
            if failures > 0 {
                tracing::info!(job.id = id, failures, "recorded the job outcome after retrying");
            }
            return;
        };
        failures += 1;
        if failures == 1 {
            tracing::warn!(job.id = id, error = %e, "recording a job outcome failed; retrying while the lease lasts");
        }
        if Instant::now() + wait > give_up || s.shutdown.is_cancelled() {
            tracing::warn!(job.id = id, error = %e, failures, "gave up recording a job outcome; the lease lapses and the job runs again");
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = s.shutdown.cancelled() => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

async fn run_body(s: &Scheduler, job: &Job) -> RunOutcome {
    let result = match job.kind.as_str() {
        "purge" => purge(s, job).await,
        "delete_repository" => delete_repository(s, job).await,
        "cleanup" => cleanup(s, job).await,
        other => Err(format!("unknown job kind {other:?}")),
    };
    result.unwrap_or_else(RunOutcome::Error)
}

fn repo_arg(args: &Value) -> Result<Option<RepoKey>, String> {
    match (
        args.get("upstream").and_then(Value::as_str),
        args.get("repository").and_then(Value::as_str),
    ) {
        (Some(upstream), Some(name)) => Ok(Some(RepoKey {
            upstream: upstream.to_owned(),
            name: name.to_owned(),
        })),
        (None, None) => Ok(None),
        _ => Err(format!("job arguments {args} name half a repository")),
    }
}

async fn purge(s: &Scheduler, job: &Job) -> Result<RunOutcome, String> {
    let repo = repo_arg(&job.args)?;
    let unlinked = if job.progress.get("phase").and_then(Value::as_str) == Some("unlinked") {
        job.progress["unlinked"].clone()
    } else {
        let u = s
            .meta
            .purge(job.id, repo, now_secs())
            .await
            .map_err(|e| e.to_string())?;
        serde_json::to_value(u).unwrap_or(Value::Null)
    };
    s.deletes_due.notify_one();
    let blobs = wait_for_handed_blobs(s, job.id).await?;
    Ok(RunOutcome::Succeeded(
        json!({ "unlinked": unlinked, "blobs": blobs }),
    ))
}

/// Waits (bounded) until the deletion pipeline has dealt with what `job` handed over.
async fn wait_for_handed_blobs(s: &Scheduler, job: i64) -> Result<Value, String> {
    let deadline = Instant::now() + PURGE_WAIT;
    loop {
        let h = s.meta.handed_blobs(job).await.map_err(|e| e.to_string())?;
        if h.pending == 0 || Instant::now() >= deadline || s.shutdown.is_cancelled() {
            return Ok(serde_json::to_value(h).unwrap_or(Value::Null));
        }
        s.deletes_due.notify_one();
        if s.pause(Duration::from_millis(100)).await {
            return Ok(serde_json::to_value(h).unwrap_or(Value::Null));
        }
    }
}

async fn delete_repository(s: &Scheduler, job: &Job) -> Result<RunOutcome, String> {
    let repo = repo_arg(&job.args)?.ok_or("delete_repository needs a repository")?;
    let deadline = Instant::now() + s.jobs.max_run_time;
    loop {
        let (step, total) = s
            .meta
            .delete_repo_batch(job.id, &repo, s.jobs.delete_batch, now_secs())
            .await
            .map_err(|e| e.to_string())?;
        s.deletes_due.notify_one();
        let removed = serde_json::to_value(total).unwrap_or(Value::Null);
        if step == RepoDeleteStep::Finished {
            let blobs = s.meta.handed_blobs(job.id).await.map_err(|e| e.to_string())?;
            return Ok(RunOutcome::Succeeded(
                json!({ "removed": removed, "blobs": blobs }),
            ));
        }
        if Instant::now() >= deadline || s.shutdown.is_cancelled() {
            return Ok(RunOutcome::Continue(json!({ "removed": removed })));
        }
    }
}

async fn cleanup(s: &Scheduler, job: &Job) -> Result<RunOutcome, String> {
    let repo = repo_arg(&job.args)?.ok_or("cleanup needs a repository")?;
    // The policy is part of the job's row: what runs is what was accepted.
    let policy: CleanupPolicy =
        serde_json::from_value(job.args["policy"].clone()).map_err(|e| format!("job's policy: {e}"))?;
    let compiled = CompiledPolicy::new(&policy)?;
    let evaluated_at = now_secs();
    let Some(tags) = s.meta.tags_for_cleanup(&repo).await.map_err(|e| e.to_string())? else {
        return Ok(RunOutcome::Succeeded(json!({
            "policy": policy.name, "evaluated": 0, "deleted": [], "note": "repository is gone or being deleted"
        })));
    };
    let decisions = evaluate(&compiled, &tags, evaluated_at);
    let doomed: Vec<(String, String)> = decisions
        .iter()
        .filter(|d| d.delete)
        .map(|d| (d.tag.clone(), d.digest.clone()))
        .collect();
    if let Some(uses) = &s.uses {
        uses.flush(&s.meta).await.map_err(|e| e.to_string())?;
    }
    let outcome = s
        .meta
        .delete_tags_if_unchanged(job.id, &repo, doomed, evaluated_at, now_secs())
        .await
        .map_err(|e| e.to_string())?;
    s.deletes_due.notify_one();
    Ok(RunOutcome::Succeeded(json!({
        "policy": policy.name,
        "evaluated": decisions.len(),
        "deleted": outcome.deleted,
        "kept_moved": outcome.kept_moved,
        "kept_pulled": outcome.kept_pulled,
        "kept_pinned": outcome.kept_pinned,
        "unlinked": outcome.unlinked,
    })))
}

async fn sweeper(s: Scheduler) {
    loop {
        let stale = i64::try_from(s.jobs.stale_after.as_secs()).unwrap_or(i64::MAX);
        match s.meta.sweep(now_secs(), stale).await {
            Ok(r) => {
                let mut states = r
                    .jobs_by_state
                    .iter()
                    .map(|(st, n)| format!("{st}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                if states.is_empty() {
                    // An empty field reads as a logging bug.
                    states = "none".to_owned();
                }
                tracing::info!(
                    jobs.requeued = r.jobs_requeued, repositories.reset = r.repositories_reset,
                    jobs.by_state = %states, "sweeper ran"
                );
                if r.jobs_requeued + r.repositories_reset > 0 {
                    s.jobs_due.notify_waiters();
                }
            }
            Err(e) => tracing::warn!(error = %e, "sweeper failed"),
        }
        if s.pause(s.jobs.sweep_interval).await {
            return;
        }
    }
}

/// Queues cleanup jobs for the repositories each policy is due for.
pub async fn queue_cleanups(s: &Scheduler, force: bool) -> Result<Vec<i64>, String> {
    let repos = s.meta.active_repos().await.map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for p in &s.jobs.policies {
        let glob = Glob::new(&p.repositories)?;
        let matching: Vec<RepoKey> = repos
            .iter()
            .filter(|r| glob.matches(&r.to_string()))
            .cloned()
            .collect();
        let cadence = i64::try_from(p.cadence.as_secs()).unwrap_or(i64::MAX);
        let policy = serde_json::to_value(p).map_err(|e| e.to_string())?;
        ids.extend(
            s.meta
                .enqueue_due_cleanups(
                    &p.name,
                    policy,
                    matching,
                    cadence,
                    force,
                    s.jobs.max_attempts,
                    now_secs(),
                )
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(ids)
}

/// What every policy would do now, without changing anything (`cleanup run --dry-run`).
pub async fn dry_run_cleanups(s: &Scheduler) -> Result<Vec<(String, RepoKey, Vec<Decision>)>, String> {
    let repos = s.meta.active_repos().await.map_err(|e| e.to_string())?;
    let now = now_secs();
    let mut out = Vec::new();
    for p in &s.jobs.policies {
        let glob = Glob::new(&p.repositories)?;
        let compiled = CompiledPolicy::new(p)?;
        for repo in repos.iter().filter(|r| glob.matches(&r.to_string())) {
            if let Some(tags) = s.meta.tags_for_cleanup(repo).await.map_err(|e| e.to_string())? {
                out.push((p.name.clone(), repo.clone(), evaluate(&compiled, &tags, now)));
            }
        }
    }
    Ok(out)
}

async fn cleanup_cadence(s: Scheduler) {
    loop {
        match queue_cleanups(&s, false).await {
            Ok(ids) if !ids.is_empty() => {
                tracing::info!(
                    jobs.queued = ids.len(),
                    "queued cleanup jobs due on their cadence"
                );
                s.jobs_due.notify_waiters();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "queueing cleanups failed"),
        }
        if s.pause(CLEANUP_CHECK_EVERY).await {
            return;
        }
    }
}
