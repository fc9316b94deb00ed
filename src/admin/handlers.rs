//! The admin endpoints.

use super::{AdminError, AdminState};
use crate::metadata::{now_secs, CancelOutcome, Job, RepoKey};
use crate::oci::RepoName;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

type S = State<Arc<AdminState>>;

/// Jobs listed at most per request.
const LIST_MAX: u32 = 1000;

/// `upstream/repo...` from a path, validated; Docker Hub names get `library/`.
fn repo_key(state: &AdminState, path: &str) -> Result<RepoKey, AdminError> {
    let (upstream, name) = path
        .trim_matches('/')
        .split_once('/')
        .ok_or_else(|| AdminError::BadRequest(format!("{path:?} is not <upstream>/<repository>")))?;
    let u = state
        .upstreams
        .by_name(upstream)
        .ok_or_else(|| AdminError::NotFound(format!("no upstream is named {upstream:?}")))?;
    let name: RepoName = name
        .parse()
        .map_err(|e: crate::oci::NameError| AdminError::BadRequest(e.to_string()))?;
    let name = if u.docker_hub {
        name.with_library_prefix()
    } else {
        name
    };
    Ok(RepoKey {
        upstream: u.name.clone(),
        name: name.to_string(),
    })
}

fn accepted(job: i64, extra: Value) -> Response {
    let mut body = json!({ "job": job, "location": format!("/api/v1/jobs/{job}") });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/v1/jobs/{job}"))],
        Json(body),
    )
        .into_response()
}

async fn enqueue_purge(state: &AdminState, repo: Option<RepoKey>) -> Result<Response, AdminError> {
    let args = match &repo {
        Some(r) => json!({ "upstream": r.upstream, "repository": r.name }),
        None => json!({}),
    };
    let (id, _) = state
        .meta
        .enqueue_job("purge", args, None, state.max_attempts, now_secs())
        .await?;
    state.jobs_due.notify_waiters();
    Ok(accepted(id, json!({})))
}

pub(super) async fn purge_all(State(state): S) -> Result<Response, AdminError> {
    enqueue_purge(&state, None).await
}

pub(super) async fn purge_repo(State(state): S, Path(path): Path<String>) -> Result<Response, AdminError> {
    let repo = repo_key(&state, &path)?;
    enqueue_purge(&state, Some(repo)).await
}

pub(super) async fn list_jobs(
    State(state): S,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Job>>, AdminError> {
    let state_filter = match q.get("state").map(String::as_str) {
        None => None,
        Some(s @ ("queued" | "running" | "succeeded" | "failed" | "cancelled")) => Some(s.to_owned()),
        Some(other) => {
            return Err(AdminError::BadRequest(format!(
                "state={other:?} is not one of queued, running, succeeded, failed, cancelled"
            )))
        }
    };
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=LIST_MAX).contains(l))
            .ok_or_else(|| {
                AdminError::BadRequest(format!("limit={l:?} is not a number from 1 to {LIST_MAX}"))
            })?,
    };
    Ok(Json(state.meta.jobs(state_filter, limit).await?))
}

fn job_id(raw: &str) -> Result<i64, AdminError> {
    raw.parse()
        .map_err(|_| AdminError::BadRequest(format!("job id {raw:?} is not a number")))
}

pub(super) async fn get_job(State(state): S, Path(id): Path<String>) -> Result<Json<Job>, AdminError> {
    let id = job_id(&id)?;
    state
        .meta
        .job(id)
        .await?
        .map(Json)
        .ok_or_else(|| AdminError::NotFound(format!("no job {id}")))
}

pub(super) async fn cancel_job(State(state): S, Path(id): Path<String>) -> Result<Json<Job>, AdminError> {
    let id = job_id(&id)?;
    match state.meta.cancel_job(id, now_secs()).await? {
        CancelOutcome::Cancelled(job) => Ok(Json(job)),
        CancelOutcome::NotFound => Err(AdminError::NotFound(format!("no job {id}"))),
        CancelOutcome::NotQueued(job) => Err(AdminError::Conflict(format!(
            "job {id} is {}; only queued jobs can be cancelled",
            job.state
        ))),
    }
}

pub(super) async fn list_repos(State(state): S) -> Result<Response, AdminError> {
    Ok(Json(state.meta.repositories(100_000).await?).into_response())
}

pub(super) async fn get_repo(State(state): S, Path(path): Path<String>) -> Result<Response, AdminError> {
    let repo = repo_key(&state, &path)?;
    match state.meta.repository(&repo).await? {
        Some(detail) => Ok(Json(detail).into_response()),
        None => Err(AdminError::NotFound(format!("repository {repo} is not cached"))),
    }
}

pub(super) async fn delete_repo(State(state): S, Path(path): Path<String>) -> Result<Response, AdminError> {
    let repo = repo_key(&state, &path)?;
    match state
        .meta
        .schedule_repo_delete(&repo, state.max_attempts, now_secs())
        .await?
    {
        Some(id) => {
            state.jobs_due.notify_waiters();
            Ok(accepted(
                id,
                json!({ "repository": repo.to_string(), "state": "delete_scheduled" }),
            ))
        }
        None => Err(AdminError::NotFound(format!("repository {repo} is not cached"))),
    }
}

pub(super) async fn not_found() -> AdminError {
    AdminError::NotFound(
        "no admin endpoint here; see /api/v1/jobs, /api/v1/repositories, /api/v1/cache".into(),
    )
}
