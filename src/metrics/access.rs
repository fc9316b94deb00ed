//! The layer around every request: runs the handler inside the cache's note
//! (`cache::outcome`), counts the request by upstream, kind and result, counts the body
//! bytes as they are sent, and when the body is done (or dropped, if the client left)
//! writes one access-log line at info, target `regcache::access`. Never logs headers or
//! the query string, so no credential or token can reach the log.

use super::{Answer, Kind, Observer, UpstreamRequests};
use crate::cache::outcome::{noting, Noted};
use crate::upstream::Upstream;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{Method, Uri};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The target access-log lines are written under (filter on it: `RUST_LOG` or
/// `log.level = "warn,regcache::access=info"`).
pub(crate) const TARGET: &str = "regcache::access";

pub(super) async fn observe(
    axum::extract::State(obs): axum::extract::State<Observer>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let settings = obs.settings();
    let kind = Kind::of_path(req.uri().path());
    let pull = settings.metrics && kind == Some(Kind::Manifest) && req.method() == Method::GET;
    let log = settings.access_log.then(|| AccessLine {
        method: req.method().clone(),
        // A clone shares the request's bytes: no copy of the path.
        uri: req.uri().clone(),
        client: ClientAddr(crate::auth::client_addr(req.extensions())),
    });
    let (resp, noted) = noting(pull, next.run(req)).await;
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
    if let (Some(c), Some(kind), Some(answer)) = (&counters, kind, answer) {
        c.count(kind, answer);
    }
    if let (true, Some(repo)) = (status.is_success(), repo) {
        obs.inner.pulls.record(repo);
    }
    // Bytes served count only for answers: an error's body saves no one a download.
    let counters = counters.filter(|_| answer != Some(Answer::Error));
    if counters.is_none() && log.is_none() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let finish = Finish {
        log,
        status: status.as_u16(),
        upstream,
        answer,
        counters,
        bytes: 0,
        started,
    };
    Response::from_parts(parts, Body::new(Observed { inner: body, finish }))
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

impl std::fmt::Display for LoggedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() <= PATH_LOGGED_MAX {
            return f.write_str(self.0);
        }
        let mut end = PATH_LOGGED_MAX;
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{}…", &self.0[..end])
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
        tracing::info!(
            target: TARGET,
            upstream = %self.upstream.as_ref().map_or("-", |u| u.name.as_str()),
            http.method = %line.method,
            http.path = %LoggedPath(line.uri.path()),
            http.status = self.status,
            size_bytes = self.bytes,
            duration_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            cache.result = %self.answer.map_or("-", Answer::label),
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
