//! `GET /`: a small server-rendered HTML page for operators (no JavaScript, readable on a
//! phone): hit ratio and bytes saved, storage against `storage.max_size`, upstream
//! health, the largest and most pulled repositories, deletions, recent jobs. Admitted as
//! the admin API is (`auth::Access::admin_access`): the admin token (as a Bearer token, or
//! as the password of HTTP Basic auth so a browser can ask for it) or an identity a rule
//! gives `admin`; open only when neither an admin token nor `[auth]` is configured. Reads
//! through `metrics::Observer`; the HTML itself is written in `status_page/html.rs`.

mod html;

use crate::auth::AdminAccess;
use crate::metadata::{Gauges, Job, LargestRepo, RepoKey};
use crate::metrics::{Answer, Observer};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

/// Recent jobs the page lists.
const RECENT_JOBS: u32 = 10;

pub(crate) fn router(observer: Observer) -> Router {
    Router::new().route("/", get(page)).with_state(observer)
}

async fn page(State(obs): State<Observer>, req: Request) -> Response {
    match obs.access().admin_access(req.headers(), req.extensions()).await {
        AdminAccess::Granted(_) => {}
        AdminAccess::Disabled if !obs.settings().auth_enabled => {}
        AdminAccess::Disabled => return (
            StatusCode::FORBIDDEN,
            "with [auth] in use the status page needs admin.token or an identity a rule gives admin = true\n",
        )
            .into_response(),
        AdminAccess::Unauthenticated => {
            let mut resp = (
                StatusCode::UNAUTHORIZED,
                "the admin token, or the login of an identity a rule gives admin = true, is required\n",
            )
                .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"regcache\", charset=\"UTF-8\""),
            );
            return resp;
        }
        AdminAccess::Forbidden { identity } => {
            return (
                StatusCode::FORBIDDEN,
                format!("{identity} may not see the status page: no rule gives it admin = true\n"),
            )
                .into_response()
        }
        AdminAccess::Busy { retry_after } => {
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins from this address\n",
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return resp;
        }
    }
    let view = gather(&obs).await;
    let mut resp = Html(html::render(&view)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Everything the page shows, gathered before any HTML is written.
#[derive(Debug)]
struct View {
    version: &'static str,
    uptime_secs: u64,
    now: i64,
    metrics_enabled: bool,
    served: [u64; 5],
    served_bytes: u64,
    fetched_bytes: u64,
    gauges: Result<Arc<Gauges>, String>,
    max_size: Option<u64>,
    upstreams: Vec<UpstreamView>,
    /// The ranking and when it was made (Unix seconds).
    largest: Result<(Arc<Vec<LargestRepo>>, i64), String>,
    most_pulled: Vec<(RepoKey, u64)>,
    jobs: Result<Vec<Job>, String>,
}

#[derive(Debug)]
struct UpstreamView {
    name: String,
    host: String,
    health: crate::upstream::Health,
    last_success_ms: u64,
    last_failure_ms: u64,
    requests: u64,
    throttled: u64,
    fetched_bytes: u64,
}

async fn gather(obs: &Observer) -> View {
    let (mut served, mut served_bytes, mut fetched_bytes) = ([0; 5], 0, 0);
    for r in obs.requests() {
        for (i, answer) in Answer::ALL.into_iter().enumerate() {
            served[i] += r.total(answer);
        }
        served_bytes += r.served_bytes();
    }
    let mut upstreams = Vec::new();
    for u in obs.cache().upstreams().iter() {
        fetched_bytes += u.stats.fetched_bytes();
        upstreams.push(UpstreamView {
            name: u.name.clone(),
            host: u.host.clone(),
            health: u.stats.health(),
            last_success_ms: u.stats.last_success_ms(),
            last_failure_ms: u.stats.last_failure_ms(),
            requests: u.stats.requests().iter().map(|r| r.2).sum(),
            throttled: u.stats.throttled(),
            fetched_bytes: u.stats.fetched_bytes(),
        });
    }
    let largest = obs.largest_repositories().await.map(|(list, at)| {
        let at = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
        (list, at)
    });
    View {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: obs.started_at().elapsed().map_or(0, |d| d.as_secs()),
        now: crate::metadata::now_secs(),
        metrics_enabled: obs.settings().metrics,
        served,
        served_bytes,
        fetched_bytes,
        gauges: obs.gauges().await.map(|(g, _)| g).map_err(|e| e.to_string()),
        max_size: obs.settings().max_size,
        upstreams,
        largest: largest.map_err(|e| e.to_string()),
        most_pulled: obs.most_pulled(),
        jobs: obs
            .cache()
            .metadata()
            .jobs(None, RECENT_JOBS)
            .await
            .map_err(|e| e.to_string()),
    }
}
