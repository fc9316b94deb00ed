//! The layer around every request: runs the handler inside the cache's note
//! (`cache::outcome`), counts the request by upstream, kind and result, counts the body
//! bytes as they are sent, and when the body is done (or dropped, if the client left)
//! writes one access-log line at info, target `regcache::access`. Never logs headers or
//! the query string, so no credential or token can reach the log.

use super::{access_line, Answer, Kind, Observer, UpstreamRequests};
use crate::cache::outcome::{noting, Noted};
use crate::upstream::Upstream;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{Method, Uri};
use axum::response::Response;
use http_body::{Frame, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

/// The target access-log lines are written under (filter on it: `RUST_LOG` or
/// `log.level = "warn,regcache::access=info"`).
pub(crate) const TARGET: &str = "regcache::access";

/// The layer: [`Observe`] around every route. A `tower` layer of its own rather than
/// `axum::middleware::from_fn`, which clones and boxes the inner service per request:
/// measured with callgrind, that was about a quarter of what metrics alone cost a warm
/// request (~2 000 of ~8 000 instructions).
#[derive(Debug, Clone)]
pub(super) struct ObserveLayer(pub(super) Observer);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            obs: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Observe<S> {
    inner: S,
    obs: Observer,
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let begun = Begun::of(&self.obs, &req);
        // The inner service is ready (`poll_ready` above): called here, not cloned.
        let handler = self.inner.call(req);
        let obs = self.obs.clone();
        Box::pin(async move {
            let (resp, noted) = noting(begun.pull, handler).await;
            let resp = match resp {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            Ok(begun.end(&obs, resp, noted))
        })
    }
}

/// What is known of a request before its handler runs.
struct Begun {
    started: Instant,
    kind: Option<Kind>,
    /// A manifest GET: counted as a pull of its repository.
    pull: bool,
    log: Option<AccessLine>,
}

impl Begun {
    fn of(obs: &Observer, req: &Request) -> Self {
        let settings = obs.settings();
        let kind = Kind::of_path(req.uri().path());
        Begun {
            started: Instant::now(),
            kind,
            pull: settings.metrics && kind == Some(Kind::Manifest) && req.method() == Method::GET,
            log: settings.access_log.then(|| AccessLine {
                method: req.method().clone(),
                // A clone shares the request's bytes: no copy of the path.
                uri: req.uri().clone(),
                client: ClientAddr(crate::auth::client_addr(req.extensions())),
            }),
        }
    }

    /// Counts the answer, and wraps its body to count the bytes sent and log the line.
    fn end(self, obs: &Observer, resp: Response, noted: Noted) -> Response {
        let settings = obs.settings();
        let status = resp.status();
        let Noted {
            outcome,
            upstream,
            repo,
        } = noted;
        let answer = if status.as_u16() >= 400 {
            Some(Answer::Error)
        } else {
            outcome.map(Answer::from_outcome)
        };
        let counters = match (&upstream, settings.metrics) {
            (Some(u), true) => obs.inner.requests.of(u).cloned(),
            _ => None,
        };
        if let (Some(c), Some(kind), Some(answer)) = (&counters, self.kind, answer) {
            c.count(kind, answer);
        }
        if let (true, Some(repo)) = (status.is_success(), repo) {
            obs.inner.pulls.record(repo);
        }
        // Bytes served count only for answers: an error's body saves no one a download.
        let counters = counters.filter(|_| answer != Some(Answer::Error));
        if counters.is_none() && self.log.is_none() {
            return resp;
        }
        let (parts, body) = resp.into_parts();
        let finish = Finish {
            log: self.log,
            status: status.as_u16(),
            upstream,
            answer,
            counters,
            bytes: 0,
            started: self.started,
        };
        Response::from_parts(parts, Body::new(Observed { inner: body, finish }))
    }
}

/// What the access-log line needs from the request.
#[derive(Debug)]
struct AccessLine {
    method: Method,
    /// Only its path is logged: the query string may carry anything.
    uri: Uri,
    client: ClientAddr,
}

/// The longest path a line carries: the client chooses the path, and the log writer's
/// queue is bounded in lines, not bytes (I10).
const PATH_LOGGED_MAX: usize = 1024;

/// A request path, cut to `PATH_LOGGED_MAX` bytes (marked with `…`).
struct LoggedPath<'a>(&'a str);

impl<'a> LoggedPath<'a> {
    /// The part of the path logged, and whether it was cut.
    fn kept(&self) -> (&'a str, bool) {
        if self.0.len() <= PATH_LOGGED_MAX {
            return (self.0, false);
        }
        let mut end = PATH_LOGGED_MAX;
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        (&self.0[..end], true)
    }
}

impl std::fmt::Display for LoggedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kept() {
            (kept, false) => f.write_str(kept),
            (kept, true) => write!(f, "{kept}…"),
        }
    }
}

/// The client's address, `-` when unknown; written into the line without a `String`.
#[derive(Debug)]
struct ClientAddr(Option<SocketAddr>);

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

thread_local! {
    /// Each worker thread renders its access-log lines here: no allocation per line.
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

/// Counts what is sent and, when dropped (body done or client gone), logs the request.
#[derive(Debug)]
struct Finish {
    log: Option<AccessLine>,
    status: u16,
    upstream: Option<Arc<Upstream>>,
    answer: Option<Answer>,
    counters: Option<Arc<UpstreamRequests>>,
    bytes: u64,
    started: Instant,
}

impl Finish {
    fn sent(&mut self, n: usize) {
        let n = n as u64;
        self.bytes += n;
        if let Some(c) = &self.counters {
            c.served(n);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let Some(line) = &self.log else { return };
        let duration_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let upstream = self.upstream.as_ref().map_or("-", |u| u.name.as_str());
        let cache_result = self.answer.map_or("-", Answer::label);
        if let Some(style) = crate::log_writer::style() {
            if tracing::enabled!(target: TARGET, tracing::Level::INFO) {
                let (path, path_cut) = LoggedPath(line.uri.path()).kept();
                let fields = access_line::Fields {
                    upstream,
                    method: line.method.as_str(),
                    path,
                    path_cut,
                    status: self.status,
                    size_bytes: self.bytes,
                    duration_us,
                    cache_result,
                    client: line.client.0,
                };
                LINE.with_borrow_mut(|line| {
                    line.clear();
                    access_line::render_into(line, style, SystemTime::now(), TARGET, &fields);
                    crate::log_writer::queue_line(line);
                });
            }
            return;
        }
        tracing::info!(
            target: TARGET,
            upstream = %upstream,
            http.method = %line.method,
            http.path = %LoggedPath(line.uri.path()),
            http.status = self.status,
            size_bytes = self.bytes,
            duration_ms = duration_us as f64 / 1e3,
            cache.result = %cache_result,
            client.addr = %line.client,
            "request"
        );
    }
}

/// A response body that reports each data frame to its [`Finish`].
#[derive(Debug)]
struct Observed {
    inner: Body,
    finish: Finish,
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.finish.sent(data.len());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::{LoggedPath, PATH_LOGGED_MAX};

    #[test]
    fn a_long_path_is_cut_and_marked() {
        let short = "/v2/team/app/manifests/v1";
        assert_eq!(LoggedPath(short).to_string(), short);
        let long = format!("/v2/{}/manifests/v1", "a".repeat(5000));
        let logged = LoggedPath(&long).to_string();
        assert_eq!(logged.len(), PATH_LOGGED_MAX + "…".len());
        assert!(logged.ends_with('…') && long.starts_with(logged.trim_end_matches('…')));
    }
}
