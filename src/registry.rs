//! The OCI Distribution pull API (`/v2/...`). Parses and validates the request (I8),
//! routes it to an upstream, calls the cache, and shapes the spec's responses. Holds no
//! state of its own and never touches SQLite, storage or upstreams directly. Who may pull
//! what is asked of `auth` before the cache is.

mod blobs;
mod error;
mod listing;
mod manifests;
mod route;

pub use error::{ErrorCode, RegistryError};

use crate::auth::{Access, Who};
use crate::cache::{Cache, Target};
use crate::oci::RepoName;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::FutureExt;
use route::Endpoint;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

const API_VERSION: &str = "registry/2.0";

/// What every registry request needs.
#[derive(Debug, Clone)]
struct Registry {
    cache: Arc<Cache>,
    access: Arc<Access>,
}

/// The registry API plus `/healthz`.
pub fn router(cache: Arc<Cache>, access: Arc<Access>) -> Router {
    Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .fallback(dispatch)
        .with_state(Registry { cache, access })
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

async fn dispatch(State(registry): State<Registry>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let (parts, _body) = req.into_parts();
    let (method, uri, headers) = (&parts.method, &parts.uri, &parts.headers);
    let path = uri.path().to_owned();
    // A panic fails this request alone, with a 500 whose error id is in the log (I10).
    // Unwind safety: the cache's shared state is behind std mutexes never held across an
    // await (poisoning ignored), and single-flight computations catch their own panics.
    let resp = match AssertUnwindSafe(handle(&registry, method, uri, headers, &parts.extensions))
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
    registry: &Registry,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<Response, RegistryError> {
    crate::fault::point("registry.request", uri.path());
    let Registry { cache, access } = registry;
    // Credentials first: a wrong login is refused whatever it asks for.
    let who = access.authenticate(headers, extensions).await?;
    let endpoint = route::parse(uri.path())?;
    let query: Query = uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let head = *method == Method::HEAD;
    if !(head || *method == Method::GET) {
        return Err(RegistryError::unsupported_push());
    }
    let target = |name: &RepoName| authorized(cache, access, &who, &query, name);
    match endpoint {
        // Docker's login (and its first request of a pull) asks here: with logins
        // configured, an anonymous client is told to log in.
        Endpoint::Base if who == Who::Anonymous && access.has_logins() => {
            Err(RegistryError::login_required())
        }
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
            let t = target(&name)?;
            manifests::get(cache, &t, &reference, head).await
        }
        Endpoint::Blob { name, digest } => {
            let t = target(&name)?;
            blobs::get(cache, &t, &digest, headers, head).await
        }
        Endpoint::Tags { name } => {
            let t = target(&name)?;
            listing::tags(cache, &t, &name, &query, head).await
        }
        Endpoint::Referrers { name, digest } => {
            let t = target(&name)?;
            listing::referrers(cache, &t, &digest, &query, head).await
        }
    }
}

/// The repository a request names, routed, once `who` may pull it: otherwise 401 for an
/// anonymous client that could log in, 403 `DENIED` for anyone else. Asked before the
/// cache or an upstream is, so a refusal says nothing about what exists.
fn authorized(
    cache: &Cache,
    access: &Access,
    who: &Who,
    query: &Query,
    name: &RepoName,
) -> Result<Target, RegistryError> {
    let t = cache.target(query.get("ns").map(String::as_str), name)?;
    if access.may_pull(who, &t.upstream.name, t.repo.as_str()) {
        return Ok(t);
    }
    Err(match who {
        Who::Anonymous if access.has_logins() => RegistryError::login_required(),
        _ => RegistryError::denied(who, &t.upstream.name, t.repo.as_str()),
    })
}

/// An empty body for HEAD, else `body`.
fn body_unless_head(head: bool, body: impl Into<Body>) -> Body {
    if head {
        Body::empty()
    } else {
        body.into()
    }
}
