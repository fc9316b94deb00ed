//! `/livez` (the process answers) and `/readyz`: ready when the database commits a write
//! and the blob store answers a lookup, each within `CHECK_TIMEOUT`. Upstreams are
//! reported as their last request left them but never make the cache unready: serving
//! what is cached while an upstream is down is the cache's job.

use super::Observer;
use crate::metadata::now_secs;
use crate::oci::Digest;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use std::time::{Duration, Instant};

/// How long each check may take. The writer is held at most a couple of seconds by an
/// expiry batch (1.9 s measured at worst); past this the database is not serving writes.
/// Probes should allow a little more (Kubernetes: `timeoutSeconds: 5`).
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// A result this young is answered again instead of checking again, so a flood of
/// probes costs one write and one lookup per second.
const REUSE_FOR: Duration = Duration::from_secs(1);

/// The last readiness result, and the lock that lets one check run at a time.
#[derive(Debug, Default)]
pub(super) struct Readiness {
    last: tokio::sync::Mutex<Option<(Instant, Report)>>,
}

#[derive(Debug, Clone, Serialize)]
struct Check {
    ok: bool,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct UpstreamState {
    name: String,
    /// `up`, `down` (its last request failed) or `unknown` (nothing asked yet).
    health: &'static str,
    last_success_unix_ms: u64,
    last_failure_unix_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct Report {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    database: Check,
    storage: Check,
    upstreams: Vec<UpstreamState>,
}

pub(super) async fn livez() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "live" }))
}

pub(super) async fn readyz(State(obs): State<Observer>) -> (StatusCode, Json<Report>) {
    let mut last = obs.inner.readiness.last.lock().await;
    let report = match last.as_ref().filter(|(at, _)| at.elapsed() < REUSE_FOR) {
        Some((_, r)) => r.clone(),
        None => {
            let r = check(&obs).await;
            *last = Some((Instant::now(), r.clone()));
            r
        }
    };
    drop(last);
    let mut report = report;
    // Upstreams as of now, whether or not the checks were reused.
    report.upstreams = upstreams(&obs);
    let status = if report.reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

async fn check(obs: &Observer) -> Report {
    let meta = obs.cache().metadata();
    let store = obs.cache().store();
    // A fixed key nothing stores: any answer (found or not) shows the store answers.
    let probe = Digest::of(b"regcache readiness probe");
    let (database, storage) = tokio::join!(
        timed(async { meta.probe_write(now_secs()).await.map_err(|e| e.to_string()) }),
        timed(async { store.size_of(&probe).await.map(|_| ()).map_err(|e| e.to_string()) }),
    );
    let reason = [("database", &database), ("storage", &storage)]
        .iter()
        .filter_map(|(what, c)| c.error.as_ref().map(|e| format!("{what}: {e}")))
        .collect::<Vec<_>>();
    Report {
        status: if reason.is_empty() { "ready" } else { "unready" },
        reason: (!reason.is_empty()).then(|| reason.join("; ")),
        database,
        storage,
        upstreams: Vec::new(),
    }
}

async fn timed(f: impl std::future::Future<Output = Result<(), String>>) -> Check {
    let started = Instant::now();
    let result = tokio::time::timeout(CHECK_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())));
    Check {
        ok: result.is_ok(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        error: result.err(),
    }
}

fn upstreams(obs: &Observer) -> Vec<UpstreamState> {
    obs.cache()
        .upstreams()
        .iter()
        .map(|u| UpstreamState {
            name: u.name.clone(),
            health: u.stats.health().label(),
            last_success_unix_ms: u.stats.last_success_ms(),
            last_failure_unix_ms: u.stats.last_failure_ms(),
        })
        .collect()
}
