//! An in-process fake upstream registry for fast tests: serves the pull side of the OCI
//! Distribution API from memory, counts every request, and misbehaves on command (corrupt,
//! truncated or slow bodies, failures, delays, redirects, outages, bearer-token auth).
//! It is deliberately simple and must never grow cache logic of its own.
//!
//! Content is per repository, like a real registry: a blob added to `a/b` is not served
//! under `c/d`. Names may contain slashes, so paths are parsed from the right
//! (`/manifests/`, `/blobs/`, `/referrers/`, `/tags/list`).
//!
//! Every control takes `&self` and is effective immediately, including while requests are
//! in flight; state sits behind a `std::sync::Mutex` never held across an `.await`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::images::{Blob, Image, Index, OCI_INDEX};

/// How the fixture asks for credentials.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Bearer challenges; `/token` hands a token to anyone (like Docker Hub for public
    /// images).
    Anonymous,
    /// Bearer challenges; `/token` requires these Basic credentials, else 401.
    Basic { username: String, password: String },
    /// No tokens: every registry request needs these Basic credentials, and is answered
    /// `401 WWW-Authenticate: Basic` without them (as a plain htpasswd registry does).
    BasicOnly { username: String, password: String },
}

/// How `GET /v2/<name>/tags/list` treats `n` and `last`.
#[derive(Clone, Debug, Default)]
pub enum TagsPaging {
    /// As the spec says: at most `n` tags after `last`, with a `Link` header when more
    /// remain.
    #[default]
    Honour,
    /// Ignore `n` and `last`; always return every tag, no `Link`.
    IgnoreParams,
    /// Paginate by itself in pages of `page_size` whatever `n` the client asked for, with a
    /// `Link: <…?n=…&last=…>; rel="next"` header, so a client must follow Links.
    Paginate { page_size: usize },
}

#[derive(Clone, Debug)]
pub struct FixtureOptions {
    /// `None`: everything is public, `/v2/` answers 200.
    pub auth: Option<Auth>,
    /// `false`: the referrers API answers a plain 404, like registries without it.
    pub referrers_supported: bool,
    pub tags_paging: TagsPaging,
    /// Serve the API under this path (`/mirror` → `/mirror/v2/…`, and `/v2/…` is a 404),
    /// as registries behind Artifactory or Nexus paths are.
    pub path_prefix: String,
}

impl Default for FixtureOptions {
    fn default() -> Self {
        FixtureOptions {
            auth: None,
            referrers_supported: true,
            tags_paging: TagsPaging::Honour,
            path_prefix: String::new(),
        }
    }
}

impl FixtureOptions {
    pub fn basic_auth(mut self, username: &str, password: &str) -> Self {
        self.auth = Some(Auth::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        });
        self
    }

    pub fn anonymous_tokens(mut self) -> Self {
        self.auth = Some(Auth::Anonymous);
        self
    }

    /// Registry requests need Basic credentials directly (no token service).
    pub fn basic_only(mut self, username: &str, password: &str) -> Self {
        self.auth = Some(Auth::BasicOnly {
            username: username.to_owned(),
            password: password.to_owned(),
        });
        self
    }

    /// Serves the API under `prefix` (e.g. `/mirror`); `url()` stays the bare origin.
    pub fn under_path(mut self, prefix: &str) -> Self {
        self.path_prefix = prefix.trim_end_matches('/').to_owned();
        self
    }

    pub fn without_referrers(mut self) -> Self {
        self.referrers_supported = false;
        self
    }

    pub fn tags_paging(mut self, paging: TagsPaging) -> Self {
        self.tags_paging = paging;
        self
    }
}

/// One request as the fixture received it (recorded before any delay or failure).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: Method,
    /// Path and query, e.g. `/v2/library/alpine/tags/list?n=10`.
    pub path: String,
    pub headers: HeaderMap,
}

impl RequestRecord {
    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }

    /// The `Authorization` header, if any (to check that credentials are not forwarded).
    pub fn authorization(&self) -> Option<&str> {
        self.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
    }
}

/// A running fake upstream on `127.0.0.1:<free port>`. Dropping it shuts it down.
#[derive(Debug)]
pub struct FixtureUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    kill: CancellationToken,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    opts: FixtureOptions,
    base_url: String,
    state: Mutex<FixtureState>,
}

#[derive(Debug, Default)]
struct FixtureState {
    repos: HashMap<String, Repo>,
    log: Vec<RequestRecord>,
    /// Issued bearer token → the scopes it grants.
    tokens: HashMap<String, Vec<String>>,
    tokens_issued: u64,
    corrupt: HashSet<String>,
    truncate: HashMap<String, usize>,
    slow: HashMap<String, (usize, Duration)>,
    failure: Option<FailRule>,
    delay: Duration,
    redirect_blobs: Option<String>,
    /// Origin put in front of tag-list `Link`s (`None`: relative links).
    tags_link_base: Option<String>,
    /// The `realm` of bearer challenges (`None`: this fixture's own `/token`).
    token_realm: Option<String>,
    /// The `expires_in` of issued tokens (`None`: 300).
    token_expires_in: Option<Value>,
    /// Cancelled by `stop()`; in-flight delays and slow bodies end with it.
    kill: CancellationToken,
}

#[derive(Debug, Default)]
struct Repo {
    manifests: HashMap<String, Blob>,
    blobs: HashMap<String, Blob>,
    tags: BTreeMap<String, String>,
}

#[derive(Debug)]
struct FailRule {
    status: StatusCode,
    path_contains: Option<String>,
    /// `None`: until cleared.
    remaining: Option<usize>,
    retry_after_secs: Option<u64>,
}

impl FixtureUpstream {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(opts: FixtureOptions) -> FixtureUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fixture upstream: binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("fixture upstream: local_addr");
        let shared = Arc::new(Shared {
            opts,
            base_url: format!("http://{addr}"),
            state: Mutex::new(FixtureState::default()),
        });
        let running = spawn_server(&shared, listener);
        FixtureUpstream {
            shared,
            addr,
            running: Mutex::new(Some(running)),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    // ----- content -------------------------------------------------------------------

    /// Adds the image's manifest, config and layers to `repo`, and tags it if `tag` is set.
    pub fn add_image(&self, repo: &str, tag: Option<&str>, image: &Image) {
        let mut state = self.shared.lock();
        let r = state.repos.entry(repo.to_owned()).or_default();
        r.manifests
            .insert(image.manifest.digest.clone(), image.manifest.clone());
        for blob in image.blobs() {
            r.blobs.insert(blob.digest.clone(), blob.clone());
        }
        if let Some(tag) = tag {
            r.tags.insert(tag.to_owned(), image.manifest.digest.clone());
        }
    }

    /// Adds the index, every child image and their blobs to `repo`; tags the index.
    pub fn add_index(&self, repo: &str, tag: Option<&str>, index: &Index) {
        for (_, image) in &index.images {
            self.add_image(repo, None, image);
        }
        self.add_manifest(repo, index.manifest.clone());
        if let Some(tag) = tag {
            self.set_tag(repo, tag, &index.manifest.digest);
        }
    }

    /// Adds an OCI artifact (built with `Image::artifact`) so it is listed by the
    /// referrers API for its subject.
    pub fn add_referrer(&self, repo: &str, artifact: &Image) {
        self.add_image(repo, None, artifact);
    }

    /// Adds a manifest by digest only (any media type; served with `manifest.media_type`).
    pub fn add_manifest(&self, repo: &str, manifest: Blob) {
        let mut state = self.shared.lock();
        let r = state.repos.entry(repo.to_owned()).or_default();
        r.manifests.insert(manifest.digest.clone(), manifest);
    }

    pub fn add_blob(&self, repo: &str, blob: Blob) {
        let mut state = self.shared.lock();
        let r = state.repos.entry(repo.to_owned()).or_default();
        r.blobs.insert(blob.digest.clone(), blob);
    }

    /// Points `tag` at a manifest digest (which should have been added to `repo`).
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        let mut state = self.shared.lock();
        let r = state.repos.entry(repo.to_owned()).or_default();
        r.tags.insert(tag.to_owned(), digest.to_owned());
    }

    pub fn remove_tag(&self, repo: &str, tag: &str) {
        if let Some(r) = self.shared.lock().repos.get_mut(repo) {
            r.tags.remove(tag);
        }
    }

    pub fn remove_manifest(&self, repo: &str, digest: &str) {
        if let Some(r) = self.shared.lock().repos.get_mut(repo) {
            r.manifests.remove(digest);
        }
    }

    pub fn remove_blob(&self, repo: &str, digest: &str) {
        if let Some(r) = self.shared.lock().repos.get_mut(repo) {
            r.blobs.remove(digest);
        }
    }

    /// Forgets the whole repository (its manifests, blobs and tags).
    pub fn remove_repo(&self, repo: &str) {
        self.shared.lock().repos.remove(repo);
    }

    // ----- observation ---------------------------------------------------------------

    pub fn log(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    pub fn reset_log(&self) {
        self.shared.lock().log.clear();
    }

    /// Requests with this method whose path-and-query contains `path_contains`.
    pub fn requests(&self, method: Method, path_contains: &str) -> usize {
        self.count(|r| r.method == method && r.path.contains(path_contains))
    }

    /// GETs of `/v2/<any repo>/blobs/<digest>`.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.count(|r| r.method == Method::GET && r.path_only().ends_with(&suffix))
    }

    /// GETs of exactly `/v2/<repo>/manifests/<reference>`.
    pub fn manifest_gets(&self, repo: &str, reference: &str) -> usize {
        let path = format!("/v2/{repo}/manifests/{reference}");
        self.count(|r| r.method == Method::GET && r.path_only() == path)
    }

    /// HEADs of exactly `/v2/<repo>/manifests/<reference>`.
    pub fn manifest_heads(&self, repo: &str, reference: &str) -> usize {
        let path = format!("/v2/{repo}/manifests/{reference}");
        self.count(|r| r.method == Method::HEAD && r.path_only() == path)
    }

    /// Requests to the token endpoint (granted or not).
    pub fn token_requests(&self) -> usize {
        self.count(|r| r.path_only() == "/token")
    }

    /// Tokens actually issued.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.lock().tokens_issued
    }

    fn count(&self, pred: impl Fn(&RequestRecord) -> bool) -> usize {
        self.shared.lock().log.iter().filter(|r| pred(r)).count()
    }

    // ----- misbehaviour --------------------------------------------------------------

    /// Serves different bytes of the same length for this digest (blob or manifest), so a
    /// verifying client sees a digest mismatch.
    pub fn corrupt_blob(&self, digest: &str) {
        self.shared.lock().corrupt.insert(digest.to_owned());
    }

    /// Announces the full `Content-Length` but closes the connection after `at_bytes` of
    /// the body (of the response body, so also within a Range).
    pub fn truncate_blob(&self, digest: &str, at_bytes: usize) {
        self.shared.lock().truncate.insert(digest.to_owned(), at_bytes);
    }

    /// Streams this digest's body in chunks of `bytes_per_chunk` with `pause` between
    /// them, so a test can observe a transfer in progress.
    pub fn slow_blob(&self, digest: &str, bytes_per_chunk: usize, pause: Duration) {
        self.shared
            .lock()
            .slow
            .insert(digest.to_owned(), (bytes_per_chunk.max(1), pause));
    }

    /// Undoes `corrupt_blob`, `truncate_blob` and `slow_blob` for this digest.
    pub fn heal_blob(&self, digest: &str) {
        let mut state = self.shared.lock();
        state.corrupt.remove(digest);
        state.truncate.remove(digest);
        state.slow.remove(digest);
    }

    /// Every request (token endpoint included) answers `status` with an OCI error body
    /// until `clear_failure()`. 429 and 503 carry `Retry-After: 1`.
    pub fn fail_with(&self, status: u16) {
        let retry = matches!(status, 429 | 503).then_some(1);
        self.set_failure(status, None, None, retry);
    }

    /// Like `fail_with` with an explicit `Retry-After` in seconds.
    pub fn fail_with_retry_after(&self, status: u16, retry_after_secs: u64) {
        self.set_failure(status, None, None, Some(retry_after_secs));
    }

    /// Only the next `count` requests fail, then service resumes by itself.
    pub fn fail_next(&self, count: usize, status: u16) {
        let retry = matches!(status, 429 | 503).then_some(1);
        self.set_failure(status, None, Some(count), retry);
    }

    /// Only requests whose path-and-query contains `path_contains` fail, until cleared.
    pub fn fail_matching(&self, path_contains: &str, status: u16) {
        self.set_failure(status, Some(path_contains.to_owned()), None, None);
    }

    pub fn clear_failure(&self) {
        self.shared.lock().failure = None;
    }

    fn set_failure(
        &self,
        status: u16,
        path_contains: Option<String>,
        remaining: Option<usize>,
        retry_after_secs: Option<u64>,
    ) {
        let status = StatusCode::from_u16(status)
            .unwrap_or_else(|e| panic!("fixture upstream: bad status {status}: {e}"));
        self.shared.lock().failure = Some(FailRule {
            status,
            path_contains,
            remaining,
            retry_after_secs,
        });
    }

    /// Waits this long before answering each request (`Duration::ZERO` to stop).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Answers blob GETs with `307 Location: <base_url>/v2/<name>/blobs/<digest>` (HEADs
    /// are still served here), like registries that hand blobs off to a CDN or S3.
    pub fn redirect_blobs_to(&self, base_url: &str) {
        self.shared.lock().redirect_blobs = Some(base_url.trim_end_matches('/').to_owned());
    }

    pub fn clear_redirect(&self) {
        self.shared.lock().redirect_blobs = None;
    }

    /// Makes tag-list `Link` headers absolute URLs on `base_url` (another listener, or
    /// this fixture's own `url()`), as a careless or hostile upstream might.
    pub fn link_tags_to(&self, base_url: &str) {
        self.shared.lock().tags_link_base = Some(base_url.trim_end_matches('/').to_owned());
    }

    /// Names `realm` (a full URL) in bearer challenges instead of this fixture's `/token`.
    /// Tokens issued elsewhere are not accepted here.
    pub fn set_token_realm(&self, realm: &str) {
        self.shared.lock().token_realm = Some(realm.to_owned());
    }

    /// Issues tokens with this `expires_in` (any JSON value, absurd ones included).
    pub fn set_token_expires_in(&self, expires_in: Value) {
        self.shared.lock().token_expires_in = Some(expires_in);
    }

    /// Invalidates every issued token: the next request with one gets a 401 challenge.
    pub fn expire_tokens(&self) {
        self.shared.lock().tokens.clear();
    }

    // ----- lifecycle -----------------------------------------------------------------

    /// Closes the listener (the port then refuses connections) and aborts every open
    /// connection, in-flight bodies and delays included. Content and the log are kept.
    pub async fn stop(&self) {
        let running = self.running_slot().take();
        let Some(Running { kill, mut task }) = running else {
            return;
        };
        kill.cancel();
        // Connections die at once (their IO errors); the bound is only a safety net.
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }

    /// Serves again on the same port after `stop()`.
    pub async fn restart(&self) {
        if self.is_running() {
            return;
        }
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("fixture upstream: rebinding {}: {e}", self.addr));
        let running = spawn_server(&self.shared, listener);
        *self.running_slot() = Some(running);
    }

    pub fn is_running(&self) -> bool {
        self.running_slot().is_some()
    }

    fn running_slot(&self) -> MutexGuard<'_, Option<Running>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for FixtureUpstream {
    fn drop(&mut self) {
        if let Some(Running { kill, task }) = self.running_slot().take() {
            kill.cancel();
            task.abort();
        }
    }
}

fn spawn_server(shared: &Arc<Shared>, listener: TcpListener) -> Running {
    let kill = CancellationToken::new();
    shared.lock().kill = kill.clone();
    let app = Router::new().fallback(handle).with_state(Arc::clone(shared));
    let listener = KillableListener {
        inner: listener,
        kill: kill.clone(),
    };
    let shutdown = kill.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        // Errors here only mean the runtime is going away.
        let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    });
    Running { kill, task }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FixtureState> {
        // A panicking test thread must not wedge every later request.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

// ----- request handling --------------------------------------------------------------

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let headers = req.headers().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let (delay, failure, kill) = {
        let mut state = shared.lock();
        state.log.push(RequestRecord {
            method: method.clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned()),
            headers: headers.clone(),
        });
        let failure = take_failure(&mut state, req.uri().to_string().as_str());
        (state.delay, failure, state.kill.clone())
    };
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = kill.cancelled() => return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "stopping"),
        }
    }
    if let Some((status, retry_after)) = failure {
        let mut resp = error(status, failure_code(status), "failure injected by the fixture");
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return resp;
    }
    shared.route(&method, &path, &query, &headers, kill)
}

fn take_failure(state: &mut FixtureState, path: &str) -> Option<(StatusCode, Option<u64>)> {
    let rule = state.failure.as_mut()?;
    if let Some(needle) = &rule.path_contains {
        if !path.contains(needle.as_str()) {
            return None;
        }
    }
    let result = (rule.status, rule.retry_after_secs);
    if let Some(remaining) = rule.remaining.as_mut() {
        *remaining = remaining.saturating_sub(1);
        if *remaining == 0 {
            state.failure = None;
        }
    }
    Some(result)
}

fn failure_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NAME_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNKNOWN",
    }
}

enum Endpoint<'a> {
    Manifest(&'a str),
    Blob(&'a str),
    Referrers(&'a str),
    Tags,
}

/// Splits `<name>/<endpoint>` from the right, since names contain slashes.
fn parse_endpoint(rest: &str) -> Option<(&str, Endpoint<'_>)> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some((name, Endpoint::Tags));
    }
    let (pos, marker) = ["/manifests/", "/blobs/", "/referrers/"]
        .into_iter()
        .filter_map(|marker| rest.rfind(marker).map(|pos| (pos, marker)))
        .max_by_key(|(pos, _)| *pos)?;
    let name = &rest[..pos];
    let reference = &rest[pos + marker.len()..];
    if name.is_empty() || reference.is_empty() || reference.contains('/') {
        return None;
    }
    let endpoint = match marker {
        "/manifests/" => Endpoint::Manifest(reference),
        "/blobs/" => Endpoint::Blob(reference),
        _ => Endpoint::Referrers(reference),
    };
    Some((name, endpoint))
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// What to do to one response body, snapshotted under the lock.
#[derive(Clone, Copy, Debug, Default)]
struct Misbehaviour {
    corrupt: bool,
    truncate_at: Option<usize>,
    slow: Option<(usize, Duration)>,
}

impl Shared {
    fn route(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        kill: CancellationToken,
    ) -> Response {
        if path == "/token" {
            return self.token(query, headers);
        }
        let Some(path) = path.strip_prefix(self.opts.path_prefix.as_str()) else {
            return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not under the fixture's path");
        };
        if method != Method::GET && method != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "the fixture upstream is read-only",
            );
        }
        if path == "/v2/" || path == "/v2" {
            if !self.authorized(headers, None) {
                return self.challenge(None);
            }
            let mut resp = json_response(StatusCode::OK, "application/json", b"{}".to_vec());
            resp.headers_mut().insert(
                "Docker-Distribution-API-Version",
                HeaderValue::from_static("registry/2.0"),
            );
            return resp;
        }
        let Some((name, endpoint)) = path.strip_prefix("/v2/").and_then(parse_endpoint) else {
            return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint");
        };
        if !self.authorized(headers, Some(name)) {
            return self.challenge(Some(name));
        }
        match endpoint {
            Endpoint::Manifest(reference) => self.manifest(method, name, reference, kill),
            Endpoint::Blob(digest) => self.blob(method, name, digest, headers, kill),
            Endpoint::Tags => self.tags(name, query),
            Endpoint::Referrers(digest) => self.referrers(name, digest, query),
        }
    }

    fn manifest(&self, method: &Method, name: &str, reference: &str, kill: CancellationToken) -> Response {
        let (blob, mis) = {
            let state = self.lock();
            let Some(repo) = state.repos.get(name) else {
                return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "repository unknown");
            };
            let digest = if is_digest(reference) {
                reference.to_owned()
            } else {
                match repo.tags.get(reference) {
                    Some(d) => d.clone(),
                    None => return error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", "tag unknown"),
                }
            };
            let Some(blob) = repo.manifests.get(&digest) else {
                return error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", "manifest unknown");
            };
            (blob.clone(), misbehaviour(&state, &digest))
        };
        content_response(
            method,
            &blob.media_type,
            &blob.digest,
            blob.bytes,
            None,
            mis,
            kill,
        )
    }

    fn blob(
        &self,
        method: &Method,
        name: &str,
        digest: &str,
        headers: &HeaderMap,
        kill: CancellationToken,
    ) -> Response {
        if !is_digest(digest) {
            return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest");
        }
        let (blob, mis, redirect) = {
            let state = self.lock();
            let Some(repo) = state.repos.get(name) else {
                return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "repository unknown");
            };
            let Some(blob) = repo.blobs.get(digest) else {
                return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
            };
            (
                blob.clone(),
                misbehaviour(&state, digest),
                state.redirect_blobs.clone(),
            )
        };
        if let (Some(base), true) = (redirect, method == Method::GET) {
            let location = format!("{base}/v2/{name}/blobs/{digest}");
            return Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, location)
                .header(header::CONTENT_LENGTH, 0)
                .body(Body::empty())
                .expect("redirect response");
        }
        let total = blob.bytes.len();
        let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            None => None,
            Some(value) => match parse_range(value, total) {
                Ok(range) => range,
                Err(()) => {
                    return Response::builder()
                        .status(StatusCode::RANGE_NOT_SATISFIABLE)
                        .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                        .header(header::CONTENT_LENGTH, 0)
                        .body(Body::empty())
                        .expect("416 response");
                }
            },
        };
        content_response(
            method,
            "application/octet-stream",
            digest,
            blob.bytes,
            range,
            mis,
            kill,
        )
    }

    fn tags(&self, name: &str, query: &str) -> Response {
        let params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let param = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let all: Vec<String> = {
            let state = self.lock();
            let Some(repo) = state.repos.get(name) else {
                return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "repository unknown");
            };
            repo.tags.keys().cloned().collect()
        };
        let (last, page) = match &self.opts.tags_paging {
            TagsPaging::IgnoreParams => (None, None),
            TagsPaging::Honour => (param("last"), param("n").and_then(|n| n.parse::<usize>().ok())),
            TagsPaging::Paginate { page_size } => (param("last"), Some(*page_size)),
        };
        let after: Vec<&String> = all
            .iter()
            .filter(|t| last.as_ref().is_none_or(|l| t.as_str() > l.as_str()))
            .collect();
        let take = page.unwrap_or(after.len()).min(after.len());
        let tags: Vec<&String> = after[..take].to_vec();
        let body = serde_json::to_vec(&json!({ "name": name, "tags": tags })).expect("tags list JSON");
        let mut resp = json_response(StatusCode::OK, "application/json", body);
        if let (Some(n), Some(last_tag), true) = (page, tags.last(), take < after.len()) {
            let base = self.lock().tags_link_base.clone().unwrap_or_default();
            let prefix = &self.opts.path_prefix;
            let link = format!("<{base}{prefix}/v2/{name}/tags/list?n={n}&last={last_tag}>; rel=\"next\"");
            resp.headers_mut()
                .insert(header::LINK, HeaderValue::from_str(&link).expect("Link header"));
        }
        resp
    }

    fn referrers(&self, name: &str, digest: &str, query: &str) -> Response {
        if !self.opts.referrers_supported {
            // What registries without the API (distribution 2.8) answer: a bare 404.
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Body::from("404 page not found\n"))
                .expect("404 response");
        }
        if !is_digest(digest) {
            return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest");
        }
        let filter = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "artifactType")
            .map(|(_, v)| v.into_owned());
        let mut found: Vec<Value> = Vec::new();
        {
            let state = self.lock();
            if let Some(repo) = state.repos.get(name) {
                for manifest in repo.manifests.values() {
                    let Ok(body) = serde_json::from_slice::<Value>(&manifest.bytes) else {
                        continue;
                    };
                    if body["subject"]["digest"] != json!(digest) {
                        continue;
                    }
                    let artifact_type = body["artifactType"]
                        .as_str()
                        .or_else(|| body["config"]["mediaType"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    if filter.as_ref().is_some_and(|f| *f != artifact_type) {
                        continue;
                    }
                    let mut descriptor = manifest.descriptor();
                    descriptor["artifactType"] = json!(artifact_type);
                    if body["annotations"].is_object() {
                        descriptor["annotations"] = body["annotations"].clone();
                    }
                    found.push(descriptor);
                }
            }
        }
        found.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
        let body = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found });
        let mut resp = json_response(
            StatusCode::OK,
            OCI_INDEX,
            serde_json::to_vec(&body).expect("referrers JSON"),
        );
        if filter.is_some() {
            resp.headers_mut()
                .insert("OCI-Filters-Applied", HeaderValue::from_static("artifactType"));
        }
        resp
    }

    fn token(&self, query: &str, headers: &HeaderMap) -> Response {
        if let Some(Auth::Basic { username, password }) = &self.opts.auth {
            let expected = format!("Basic {}", base64(format!("{username}:{password}").as_bytes()));
            let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if given != Some(expected.as_str()) {
                let mut resp = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "bad credentials");
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"fixture\""),
                );
                return resp;
            }
        }
        // `scope` may repeat, and one value may hold several space-separated scopes.
        let scopes: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| {
                v.split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let (token, expires_in) = {
            let mut state = self.lock();
            state.tokens_issued += 1;
            let token = format!("fixture-token-{}", state.tokens_issued);
            state.tokens.insert(token.clone(), scopes);
            (token, state.token_expires_in.clone().unwrap_or(json!(300)))
        };
        let body = json!({ "token": token, "access_token": token, "expires_in": expires_in });
        json_response(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&body).expect("token JSON"),
        )
    }

    /// With auth on, a request needs a token issued by `/token` that grants pull on `name`
    /// (`/v2/` itself needs any valid token).
    fn authorized(&self, headers: &HeaderMap, name: Option<&str>) -> bool {
        if self.opts.auth.is_none() {
            return true;
        }
        if let Some(Auth::BasicOnly { username, password }) = &self.opts.auth {
            let expected = format!("Basic {}", base64(format!("{username}:{password}").as_bytes()));
            return headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
                == Some(expected.as_str());
        }
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let state = self.lock();
        let Some(scopes) = state.tokens.get(token) else {
            return false;
        };
        let Some(name) = name else {
            return true;
        };
        scopes.iter().any(|scope| {
            scope
                .strip_prefix("repository:")
                .and_then(|rest| rest.rsplit_once(':'))
                .is_some_and(|(repo, actions)| {
                    repo == name && actions.split(',').any(|a| a == "pull" || a == "*")
                })
        })
    }

    fn challenge(&self, name: Option<&str>) -> Response {
        if let Some(Auth::BasicOnly { .. }) = &self.opts.auth {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication required",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fixture\""),
            );
            return resp;
        }
        let realm = (self.lock().token_realm.clone()).unwrap_or_else(|| format!("{}/token", self.base_url));
        let mut value = format!("Bearer realm=\"{realm}\",service=\"fixture\"");
        if let Some(name) = name {
            value.push_str(&format!(",scope=\"repository:{name}:pull\""));
        }
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&value).expect("challenge header"),
        );
        resp
    }
}

fn misbehaviour(state: &FixtureState, digest: &str) -> Misbehaviour {
    Misbehaviour {
        corrupt: state.corrupt.contains(digest),
        truncate_at: state.truncate.get(digest).copied(),
        slow: state.slow.get(digest).copied(),
    }
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` → inclusive `(start, end)`. `Ok(None)` means
/// "ignore the header and send everything" (several ranges, other units), `Err` means 416.
fn parse_range(value: &str, total: usize) -> Result<Option<(usize, usize)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (start, end) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: usize = suffix.parse().map_err(|_| ())?;
            if n == 0 || total == 0 {
                return Err(());
            }
            (total.saturating_sub(n), total - 1)
        }
        (start, "") => (start.parse().map_err(|_| ())?, total.saturating_sub(1)),
        (start, end) => {
            let start: usize = start.parse().map_err(|_| ())?;
            let end: usize = end.parse().map_err(|_| ())?;
            (start, end.min(total.saturating_sub(1)))
        }
    };
    if start >= total || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

fn content_response(
    method: &Method,
    media_type: &str,
    digest: &str,
    data: Bytes,
    range: Option<(usize, usize)>,
    mis: Misbehaviour,
    kill: CancellationToken,
) -> Response {
    let total = data.len();
    let data = if mis.corrupt {
        // Same length, different bytes: flip every bit.
        Bytes::from(data.iter().map(|b| !b).collect::<Vec<u8>>())
    } else {
        data
    };
    let (status, body) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, data.slice(start..=end)),
        None => (StatusCode::OK, data),
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, media_type)
        .header("Docker-Content-Digest", digest)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest}\""));
    if let Some((start, end)) = range {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{total}"));
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        misbehaving_body(body, mis, kill)
    };
    builder.body(body).expect("content response")
}

/// How long a truncated body waits after its last byte before failing (see below).
const TRUNCATE_FLUSH_GRACE: Duration = Duration::from_millis(50);

/// The body as-is, or a stream that is slow and/or ends with an error after
/// `truncate_at` bytes (hyper then drops the connection: the client sees fewer bytes than
/// `Content-Length` promised).
fn misbehaving_body(data: Bytes, mis: Misbehaviour, kill: CancellationToken) -> Body {
    if mis.truncate_at.is_none() && mis.slow.is_none() {
        return Body::from(data);
    }
    let limit = mis.truncate_at.map_or(data.len(), |t| t.min(data.len()));
    let truncated = limit < data.len();
    let (chunk, pause) = mis.slow.unwrap_or((64 * 1024, Duration::ZERO));
    let stream = futures::stream::unfold(0usize, move |pos| {
        let data = data.clone();
        let kill = kill.clone();
        async move {
            if pos > limit {
                return None;
            }
            if pos == limit {
                if !truncated {
                    return None;
                }
                // hyper drops its unflushed buffer when the body fails, so give it time to
                // send the bytes before the cut; otherwise the client may see fewer bytes
                // than `at_bytes`, or not even the headers.
                tokio::select! {
                    () = tokio::time::sleep(TRUNCATE_FLUSH_GRACE) => {}
                    () = kill.cancelled() => {}
                }
                let err = io::Error::new(io::ErrorKind::ConnectionAborted, "truncated");
                return Some((Err(err), limit + 1));
            }
            if pos > 0 && !pause.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = kill.cancelled() => {
                        let err = io::Error::new(io::ErrorKind::ConnectionAborted, "stopped");
                        return Some((Err(err), limit + 1));
                    }
                }
            }
            let end = (pos + chunk).min(limit);
            Some((Ok(data.slice(pos..end)), end))
        }
    });
    Body::from_stream(stream)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
    json_response(
        status,
        "application/json",
        serde_json::to_vec(&body).expect("error JSON"),
    )
}

fn json_response(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .expect("JSON response")
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ----- a listener whose connections can be killed ------------------------------------

/// Wraps accepted streams so that cancelling `kill` makes every read and write fail:
/// hyper then drops the connection, so `stop()` really ends keep-alive and in-flight
/// connections instead of waiting for them to finish.
struct KillableListener {
    inner: TcpListener,
    kill: CancellationToken,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let killed = Box::pin(self.kill.clone().cancelled_owned());
                    return (
                        KillableStream {
                            inner: stream,
                            kill: self.kill.clone(),
                            killed,
                        },
                        addr,
                    );
                }
                // Out of file descriptors and the like: back off briefly, as axum does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

struct KillableStream {
    inner: TcpStream,
    kill: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableStream {
    /// Registers the waker with the kill signal and reports whether it fired.
    fn is_killed(&mut self, cx: &mut Context<'_>) -> bool {
        self.kill.is_cancelled() || self.killed.as_mut().poll(cx).is_ready()
    }
}

fn killed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "fixture upstream stopped")
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_killed(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.is_killed(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_killed(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl FixtureUpstream {
    /// Serves every tagged manifest of the OCI image layout at `dir` (index.json with
    /// `org.opencontainers.image.ref.name` annotations, blobs/sha256/...) under `repo`:
    /// manifests, indexes and their children, configs and layers.
    pub fn add_oci_layout(&self, repo: &str, dir: &std::path::Path) {
        let read = |digest: &str| -> bytes::Bytes {
            let hex = digest.trim_start_matches("sha256:");
            let path = dir.join("blobs/sha256").join(hex);
            bytes::Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        };
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json"))
                .expect("index.json is JSON");
        let mut stack: Vec<(serde_json::Value, Option<String>)> = index["manifests"]
            .as_array()
            .expect("index.json lists manifests")
            .iter()
            .map(|d| {
                let tag = d["annotations"][super::images::REF_NAME_ANNOTATION]
                    .as_str()
                    .map(str::to_owned);
                (d.clone(), tag)
            })
            .collect();
        while let Some((desc, tag)) = stack.pop() {
            let digest = desc["digest"].as_str().expect("descriptor digest").to_owned();
            let media_type = desc["mediaType"]
                .as_str()
                .expect("descriptor mediaType")
                .to_owned();
            let body = read(&digest);
            let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest is JSON");
            self.add_manifest(repo, Blob::new(&media_type, body));
            if let Some(tag) = tag {
                self.set_tag(repo, &tag, &digest);
            }
            for child in manifest["manifests"].as_array().into_iter().flatten() {
                stack.push((child.clone(), None));
            }
            for blob in manifest["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(manifest.get("config"))
            {
                let d = blob["digest"].as_str().expect("blob digest");
                let mt = blob["mediaType"].as_str().unwrap_or("application/octet-stream");
                self.add_blob(repo, Blob::new(mt, read(d)));
            }
        }
    }
}
