//! `GET /`: a small server-rendered HTML page for operators (no JavaScript, readable on a
//! phone): hit ratio and bytes saved, storage against `storage.max_size`, upstream
//! health, the largest and most pulled repositories, deletions, recent jobs. Behind the
//! admin token when one is configured (as a Bearer token, or as the password of HTTP
//! Basic auth so a browser can ask for it). Reads through `metrics::Observer`; the HTML
//! itself is written in `status_page/html.rs`.

mod html;

use crate::config::Secret;
use crate::metadata::{Gauges, Job, LargestRepo, RepoKey};
use crate::metrics::{Answer, Observer};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use std::sync::Arc;

/// Recent jobs the page lists.
const RECENT_JOBS: u32 = 10;

pub(crate) fn router(observer: Observer) -> Router {
    Router::new().route("/", get(page)).with_state(observer)
}

async fn page(State(obs): State<Observer>, headers: HeaderMap) -> Response {
    if let Some(token) = &obs.settings().admin_token {
        if !authorized(&headers, token) {
            let mut resp = (StatusCode::UNAUTHORIZED, "the admin token is required\n").into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"regcache\", charset=\"UTF-8\""),
            );
            return resp;
        }
    }
    let view = gather(&obs).await;
    let mut resp = Html(html::render(&view)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A Bearer token, or Basic credentials whose password (any user name) is the token.
fn authorized(headers: &HeaderMap, token: &Secret) -> bool {
    if crate::metrics::bearer_matches(headers, token) {
        return true;
    }
    let Some(encoded) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic ")))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let password = decoded
        .iter()
        .position(|b| *b == b':')
        .map_or(&decoded[..0], |i| &decoded[i + 1..]);
    crate::admin::constant_time_eq(password, token.expose().as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn the_admin_token_as_bearer_or_basic_password() {
        let token = Secret::new("0123456789abcdef");
        let basic = |creds: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            )
        };
        assert!(authorized(&headers("Bearer 0123456789abcdef"), &token));
        assert!(authorized(&headers(&basic("admin:0123456789abcdef")), &token));
        assert!(authorized(&headers(&basic(":0123456789abcdef")), &token));
        assert!(!authorized(&headers(&basic("0123456789abcdef")), &token));
        assert!(!authorized(&headers(&basic("admin:wrong")), &token));
        assert!(!authorized(&headers("Basic !!!"), &token));
        assert!(!authorized(&HeaderMap::new(), &token));
    }
}
