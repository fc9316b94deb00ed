//! Seeing what the cache does, over HTTP: `GET /metrics` in the Prometheus text format,
//! `/livez` and `/readyz`, one access-log line and the request counters per request, and
//! the figures the status page shows. It reads the cache, metadata and upstreams and
//! changes nothing, except the one row `/readyz` writes to prove the database takes
//! writes. Counters are atomics bumped where things happen (`counters`); SQLite-backed
//! gauges are read at most every few seconds (`snapshot`), never per request.

mod access;
mod access_line;
mod disk;
mod exposition;
mod families;
mod health;
mod pulls;
mod requests;
mod snapshot;

pub(crate) use requests::{Answer, Kind, UpstreamRequests};

use crate::cache::Cache;
use crate::config::{Config, Secret};
use crate::metadata::{Gauges, LargestRepo, MetadataError, RepoKey};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How old the SQLite gauges may be when served. Reading them is one scan of the blobs
/// table (about 0.1 s at a million blobs, on a reader connection); Prometheus scrapes
/// every 15-60 s, so this only merges scrapes and page views that come close together.
const GAUGES_MAX_AGE: Duration = Duration::from_secs(10);
/// How old the status page's largest repositories may be: ranking them joins every blob
/// link to its blob (seconds at a million links), so it is redone at most this often.
const LARGEST_MAX_AGE: Duration = Duration::from_secs(600);
/// Repositories the status page ranks.
pub(crate) const TOP_REPOSITORIES: usize = 10;

/// What the observability routes and the access-log layer share; cheap to clone.
#[derive(Debug, Clone)]
pub struct Observer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cache: Arc<Cache>,
    /// Who may see the status page: decided as for the admin API.
    access: Arc<crate::auth::Access>,
    requests: requests::RequestCounters,
    pulls: pulls::Pulls,
    gauges: snapshot::Cached<Gauges>,
    largest: snapshot::Cached<Vec<LargestRepo>>,
    readiness: health::Readiness,
    settings: Settings,
    started_at: SystemTime,
}

/// The config this module acts on.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) metrics: bool,
    pub(crate) access_log: bool,
    metrics_token: Option<Secret>,
    metrics_listen: Option<String>,
    /// `[auth]` is in use: the status page is then never open to anonymous clients.
    pub(crate) auth_enabled: bool,
    admin_listen: bool,
    pub(crate) max_size: Option<u64>,
    data_dir: std::path::PathBuf,
}

impl Observer {
    pub fn new(config: &Config, cache: Arc<Cache>, access: Arc<crate::auth::Access>) -> Self {
        Self {
            inner: Arc::new(Inner {
                requests: requests::RequestCounters::new(cache.upstreams()),
                cache,
                access,
                pulls: pulls::Pulls::default(),
                gauges: snapshot::Cached::new(GAUGES_MAX_AGE),
                largest: snapshot::Cached::new(LARGEST_MAX_AGE),
                readiness: health::Readiness::default(),
                settings: Settings {
                    metrics: config.metrics.enabled,
                    access_log: config.log.access,
                    metrics_token: config.metrics.token.clone(),
                    metrics_listen: config.metrics.listen.clone(),
                    auth_enabled: config.auth_enabled(),
                    admin_listen: config.admin.listen.is_some(),
                    max_size: config.storage.max_size.map(|s| s.as_u64()),
                    data_dir: config.server.data_dir.clone(),
                },
                started_at: SystemTime::now(),
            }),
        }
    }

    /// Routes on the registry's listener: `/livez`, `/readyz`, `/metrics` (unless it has
    /// its own listener or is off) and the status page `/` (unless the admin API has its
    /// own listener, which then serves it).
    pub fn registry_routes(&self) -> Router {
        let mut routes = self.health_routes();
        if self.inner.settings.metrics && self.inner.settings.metrics_listen.is_none() {
            routes = routes.merge(self.metrics_route());
        }
        if !self.inner.settings.admin_listen {
            routes = routes.merge(crate::status_page::router(self.clone()));
        }
        routes
    }

    /// Routes added to the admin API's own listener: the status page.
    pub fn admin_routes(&self) -> Router {
        if self.inner.settings.admin_listen {
            crate::status_page::router(self.clone())
        } else {
            Router::new()
        }
    }

    /// `app` with the access log and the request counters around every request; `app`
    /// unchanged when both are off.
    pub fn layer(&self, app: Router) -> Router {
        if !(self.inner.settings.metrics || self.inner.settings.access_log) {
            return app;
        }
        app.layer(access::ObserveLayer(self.clone()))
    }

    /// What `metrics.listen` serves when it is set: `/metrics`, `/livez`, `/readyz`.
    pub fn metrics_app(&self) -> Router {
        self.layer(self.metrics_route().merge(self.health_routes()))
    }

    fn health_routes(&self) -> Router {
        Router::new()
            .route("/livez", get(health::livez))
            .route("/readyz", get(health::readyz))
            .with_state(self.clone())
    }

    fn metrics_route(&self) -> Router {
        Router::new()
            .route("/metrics", get(serve_metrics))
            .with_state(self.clone())
    }

    pub(crate) fn access(&self) -> &crate::auth::Access {
        &self.inner.access
    }

    pub(crate) fn cache(&self) -> &Arc<Cache> {
        &self.inner.cache
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub(crate) fn started_at(&self) -> SystemTime {
        self.inner.started_at
    }

    /// Client-request counters of every upstream.
    pub(crate) fn requests(&self) -> impl Iterator<Item = &Arc<UpstreamRequests>> {
        self.inner.requests.iter()
    }

    /// The SQLite gauges, at most `GAUGES_MAX_AGE` old, and how long reading them took.
    pub(crate) async fn gauges(&self) -> Result<(Arc<Gauges>, Duration), MetadataError> {
        let meta = self.inner.cache.metadata().clone();
        let fresh = self
            .inner
            .gauges
            .get(|| async move { meta.gauges().await })
            .await?;
        Ok((fresh.value, fresh.took))
    }

    /// The largest repositories, at most `LARGEST_MAX_AGE` old, and when they were ranked.
    pub(crate) async fn largest_repositories(
        &self,
    ) -> Result<(Arc<Vec<LargestRepo>>, SystemTime), MetadataError> {
        let meta = self.inner.cache.metadata().clone();
        let fresh = self
            .inner
            .largest
            .get(|| async move { meta.largest_repositories(TOP_REPOSITORIES as u32).await })
            .await?;
        Ok((fresh.value, SystemTime::now() - fresh.at.elapsed()))
    }

    /// (size, available) bytes of the data directory's filesystem.
    pub(crate) fn data_dir_space(&self) -> Option<(u64, u64)> {
        disk::space(&self.inner.settings.data_dir)
    }

    /// The most pulled repositories since start.
    pub(crate) fn most_pulled(&self) -> Vec<(RepoKey, u64)> {
        self.inner.pulls.top(TOP_REPOSITORIES)
    }
}

/// `GET /metrics`: the exposition, behind `metrics.token` when one is set.
async fn serve_metrics(State(obs): State<Observer>, headers: HeaderMap) -> Response {
    if let Some(token) = &obs.inner.settings.metrics_token {
        if !crate::auth::bearer_matches(&headers, token) {
            let mut resp = (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"regcache metrics\""),
            );
            return resp;
        }
    }
    let body = families::render(&obs).await;
    ([(header::CONTENT_TYPE, exposition::CONTENT_TYPE)], body).into_response()
}
