//! `[[prefetch]]` lists as durable jobs (I4): a loop queues each list on its cadence (one
//! queued or running job per list), and a worker runs the job's list through the same
//! prefetch as the CLI, recording progress on the job's row. A run with failed images is
//! an error (retried with backoff, then `failed` naming each image and why); a run cut
//! short by shutdown continues at the next start.

use super::{run, Event, Reporter, Summary};
use crate::cache::Cache;
use crate::config::PrefetchConfig;
use crate::metadata::{now_secs, Job, RunOutcome};
use crate::scheduler::jobs::{spawn_workers, JobBody};
use crate::scheduler::Scheduler;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The job kinds run here.
pub const PREFETCH_KINDS: &[&str] = &["prefetch"];
/// Prefetch jobs run one at a time: each already fetches several blobs at once, and two
/// lists at once would only share the same link.
const WORKERS: usize = 1;
/// How often the cadence loop looks for lists that are due.
const CADENCE_CHECK_EVERY: Duration = Duration::from_secs(60);
/// How often a running prefetch writes its progress to its row.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Starts the prefetch worker, and the cadence loop when `lists` is not empty; both stop
/// on the scheduler's shutdown.
pub fn spawn_jobs(
    s: &Scheduler,
    cache: Arc<Cache>,
    lists: Vec<PrefetchConfig>,
    tasks: &tokio_util::task::TaskTracker,
) {
    let body: JobBody = {
        let s = s.clone();
        Arc::new(move |job: Job| {
            let (s, cache) = (s.clone(), cache.clone());
            Box::pin(async move { run_job(&s, &cache, &job).await })
        })
    };
    spawn_workers(s, tasks, PREFETCH_KINDS, WORKERS, body);
    if !lists.is_empty() {
        tasks.spawn(cadence(s.clone(), lists));
    }
}

async fn cadence(s: Scheduler, lists: Vec<PrefetchConfig>) {
    loop {
        for p in &lists {
            let args = json!({ "name": p.name, "list": p.list.display().to_string() });
            let cadence = i64::try_from(p.cadence.as_secs()).unwrap_or(i64::MAX);
            match s
                .meta
                .enqueue_due_prefetch(&p.name, args, cadence, s.jobs.max_attempts, now_secs())
                .await
            {
                Ok(Some(id)) => {
                    tracing::info!(job.id = id, prefetch.name = %p.name, "queued a prefetch due on its cadence");
                    s.jobs_due.notify_waiters();
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(prefetch.name = %p.name, error = %e, "queueing a prefetch failed"),
            }
        }
        if s.pause(CADENCE_CHECK_EVERY).await {
            return;
        }
    }
}

/// Counts a job's row shows while it runs.
#[derive(Debug, Default)]
struct JobProgress(Mutex<Value>);

impl JobProgress {
    fn snapshot(&self) -> Value {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Reporter for JobProgress {
    fn event(&self, event: &Event) {
        let mut p = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bump = |p: &mut Value, key: &str, by: u64| {
            let n = p.get(key).and_then(Value::as_u64).unwrap_or(0) + by;
            p[key] = json!(n);
        };
        if !p.is_object() {
            *p = json!({});
        }
        match event {
            Event::Planned {
                images,
                blobs_to_fetch,
                bytes_to_fetch,
            } => {
                p["images"] = json!(images);
                p["blobs_to_fetch"] = json!(blobs_to_fetch);
                p["bytes_to_fetch"] = json!(bytes_to_fetch);
            }
            Event::Blob { size_bytes, .. } => {
                bump(&mut p, "blobs_fetched", 1);
                bump(&mut p, "bytes_fetched", *size_bytes);
            }
            Event::Image(_) => bump(&mut p, "images_done", 1),
            Event::Failed(_) => bump(&mut p, "images_failed", 1),
            Event::Summary(_) => {}
        }
    }
}

async fn run_job(s: &Scheduler, cache: &Arc<Cache>, job: &Job) -> RunOutcome {
    let list = job.args.get("list").and_then(Value::as_str).unwrap_or_default();
    if list.is_empty() {
        return RunOutcome::Error(format!("job arguments {} name no list", job.args));
    }
    if cache.offline() {
        return RunOutcome::Error("proxy.offline = true: a prefetch needs its upstreams".into());
    }
    let path = std::path::PathBuf::from(list);
    let entries = match tokio::task::spawn_blocking(move || crate::imagelist::load(&path)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return RunOutcome::Error(e.to_string()),
        Err(e) => return RunOutcome::Error(format!("reading the image list: {e}")),
    };
    let progress = JobProgress::default();
    let prefetch = run(cache, &entries, &progress, &s.shutdown);
    tokio::pin!(prefetch);
    let summary: Summary = loop {
        tokio::select! {
            summary = &mut prefetch => break summary,
            () = tokio::time::sleep(PROGRESS_EVERY) => {
                if let Err(e) = s.meta.set_job_progress(job.id, progress.snapshot(), now_secs()).await {
                    tracing::warn!(job.id = job.id, error = %e, "recording prefetch progress failed");
                }
            }
        }
    };
    let result = serde_json::to_value(&summary).unwrap_or(Value::Null);
    if s.shutdown.is_cancelled() {
        // Cut short, not failed: what is cached stays, the rest is skipped-or-fetched next run.
        return RunOutcome::Continue(progress.snapshot());
    }
    if summary.failures.is_empty() {
        RunOutcome::Succeeded(result)
    } else {
        RunOutcome::Error(summary.failure_text())
    }
}
