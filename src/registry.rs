//! The OCI Distribution pull API (`/v2/...`). Parses and validates the request (I8),
//! routes it to an upstream, calls the cache, and shapes the spec's responses. Holds no
//! state of its own and never touches SQLite, storage or upstreams directly.

mod blobs;
mod error;
mod listing;
mod manifests;
mod route;

pub use error::{ErrorCode, RegistryError};

use crate::cache::{Cache, Target};
use crate::oci::RepoName;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::FutureExt;
use route::Endpoint;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

const API_VERSION: &str = "registry/2.0";

/// The registry API plus `/healthz`.
pub fn router(cache: Arc<Cache>) -> Router {
    Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .fallback(dispatch)
        .with_state(cache)
        .layer(axum::middleware::map_response(add_api_version))
}

async fn add_api_version(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    resp
}

/// Query parameters as a map (later values win).
pub(crate) type Query = HashMap<String, String>;

async fn dispatch(State(cache): State<Arc<Cache>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let started = std::time::Instant::now();
    let path = uri.path().to_owned();
    // A panic fails this request alone, with a 500 whose error id is in the log (I10).
    // Unwind safety: the cache's shared state is behind std mutexes never held across an
    // await (poisoning ignored), and single-flight computations catch their own panics.
    let resp = match AssertUnwindSafe(handle(&cache, &method, &uri, &headers))
        .catch_unwind()
        .await
    {
        Ok(answer) => answer.unwrap_or_else(IntoResponse::into_response),
        Err(payload) => RegistryError::panicked(&*payload, method.as_str(), &path).into_response(),
    };
    tracing::debug!(
        http.method = %method, http.path = %path, http.status = resp.status().as_u16(),
        duration_ms = started.elapsed().as_millis() as u64, "request"
    );
    resp
}

async fn handle(
    cache: &Arc<Cache>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, RegistryError> {
    crate::fault::point("registry.request", uri.path());
    let endpoint = route::parse(uri.path())?;
    let query: Query = uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let head = *method == Method::HEAD;
    if !(head || *method == Method::GET) {
        return Err(RegistryError::unsupported_push());
    }
    match endpoint {
        Endpoint::Base => {
            Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], "{}").into_response())
        }
        Endpoint::Upload => Err(RegistryError::unsupported_push()),
        Endpoint::Catalog => Err(RegistryError::new(
            ErrorCode::Unsupported,
            axum::http::StatusCode::NOT_FOUND,
            "the catalog is not offered by this pull-through cache",
        )),
        Endpoint::Manifest { name, reference } => {
            let t = target(cache, &query, &name)?;
            manifests::get(cache, &t, &reference, head).await
        }
        Endpoint::Blob { name, digest } => {
            let t = target(cache, &query, &name)?;
            blobs::get(cache, &t, &digest, headers, head).await
        }
        Endpoint::Tags { name } => {
            let t = target(cache, &query, &name)?;
            listing::tags(cache, &t, &name, &query, head).await
        }
        Endpoint::Referrers { name, digest } => {
            let t = target(cache, &query, &name)?;
            listing::referrers(cache, &t, &digest, &query, head).await
        }
    }
}

fn target(cache: &Cache, query: &Query, name: &RepoName) -> Result<Target, RegistryError> {
    Ok(cache.target(query.get("ns").map(String::as_str), name)?)
}

/// An empty body for HEAD, else `body`.
fn body_unless_head(head: bool, body: impl Into<Body>) -> Body {
    if head {
        Body::empty()
    } else {
        body.into()
    }
}
