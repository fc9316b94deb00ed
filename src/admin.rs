//! The admin API (`/api/v1/...`): purge, jobs, repositories and repository deletion, JSON
//! in and out, behind the admin token or an identity with `admin` (`auth::Access::
//! admin_access`). Every accepted request
//! becomes a job row (I4) and is answered `202 Accepted` with the job's location; workers
//! do the work. Calls `metadata` only; never storage or upstreams.

mod auth;
mod error;
mod handlers;

pub use error::AdminError;

use crate::auth::Access;
use crate::metadata::Metadata;
use crate::upstream::Upstreams;
use axum::routing::{delete, get};
use axum::Router;
use std::sync::Arc;
use tokio::sync::Notify;

/// What the admin handlers need.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub meta: Metadata,
    pub upstreams: Upstreams,
    /// Who may use the admin API: the admin token, or identities with `admin`.
    pub access: Arc<Access>,
    pub max_attempts: i64,
    /// Wakes job workers when a job is queued.
    pub jobs_due: Arc<Notify>,
}

pub fn router(state: AdminState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/api/v1/cache", delete(handlers::purge_all))
        .route("/api/v1/cache/{*repo}", delete(handlers::purge_repo))
        .route("/api/v1/jobs", get(handlers::list_jobs))
        .route(
            "/api/v1/jobs/{id}",
            get(handlers::get_job).delete(handlers::cancel_job),
        )
        .route("/api/v1/repositories", get(handlers::list_repos))
        .route(
            "/api/v1/repositories/{*repo}",
            get(handlers::get_repo).delete(handlers::delete_repo),
        )
        .route("/api/v1/{*rest}", axum::routing::any(handlers::not_found))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ))
        .with_state(state)
}
