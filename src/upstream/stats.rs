//! What one upstream saw of regcache: requests by operation and answer, their latency,
//! 429s, bytes fetched, and when it last answered well or badly. Bumped by the client
//! around each request; read by the `/metrics` exposition and the status page.

use crate::counters::{Counter, Histogram, Timestamp, NETWORK_BOUNDS};
use reqwest::{Method, Response, StatusCode};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;

/// What a request to the upstream was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    ManifestGet,
    ManifestHead,
    BlobGet,
    BlobHead,
    Tags,
    Referrers,
    Token,
    Other,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::ManifestGet,
        Op::ManifestHead,
        Op::BlobGet,
        Op::BlobHead,
        Op::Tags,
        Op::Referrers,
        Op::Token,
        Op::Other,
    ];

    /// The `op` label.
    pub fn label(self) -> &'static str {
        match self {
            Op::ManifestGet => "manifest_get",
            Op::ManifestHead => "manifest_head",
            Op::BlobGet => "blob_get",
            Op::BlobHead => "blob_head",
            Op::Tags => "tags",
            Op::Referrers => "referrers",
            Op::Token => "token",
            Op::Other => "other",
        }
    }

    /// The operation of a registry API request, from its method and path (parsed from the
    /// right, like the distribution grammar: names may contain `manifests`).
    pub fn of(method: &Method, url: &url::Url) -> Op {
        let mut segments = url.path().rsplit('/');
        let (last, parent) = (
            segments.next().unwrap_or_default(),
            segments.next().unwrap_or_default(),
        );
        let head = *method == Method::HEAD;
        match (parent, last, head) {
            ("manifests", _, false) => Op::ManifestGet,
            ("manifests", _, true) => Op::ManifestHead,
            ("blobs", _, false) => Op::BlobGet,
            ("blobs", _, true) => Op::BlobHead,
            ("tags", "list", _) => Op::Tags,
            ("referrers", _, _) => Op::Referrers,
            _ => Op::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The `code` label of an answer: the HTTP status, or none when no answer came (connect
/// failure, timeout, reset).
pub type Code = Option<u16>;

#[derive(Debug)]
pub struct UpstreamStats {
    /// Requests by (operation, answer). A mutex is fine here: it is taken once per
    /// upstream request, which costs a network round trip anyway, never per client hit.
    requests: Mutex<BTreeMap<(Op, Code), u64>>,
    latency: [Histogram; Op::ALL.len()],
    throttled: Counter,
    fetched_bytes: Counter,
    last_success: Timestamp,
    last_failure: Timestamp,
}

impl Default for UpstreamStats {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            latency: std::array::from_fn(|_| Histogram::new(NETWORK_BOUNDS)),
            throttled: Counter::default(),
            fetched_bytes: Counter::default(),
            last_success: Timestamp::default(),
            last_failure: Timestamp::default(),
        }
    }
}

impl UpstreamStats {
    /// Awaits `request` (a `send()`), recording its operation, answer and the time until
    /// the response headers came. A 429, a 5xx or no answer counts as a failure; any other
    /// answer (a 404 included) shows the upstream is up.
    pub async fn timed<F>(&self, op: Op, request: F) -> reqwest::Result<Response>
    where
        F: Future<Output = reqwest::Result<Response>>,
    {
        let started = Instant::now();
        let result = request.await;
        self.latency[op.index()].observe(started.elapsed());
        let status = result.as_ref().ok().map(Response::status);
        self.record(op, status);
        result
    }

    fn record(&self, op: Op, status: Option<StatusCode>) {
        let code = status.map(|s| s.as_u16());
        *self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((op, code))
            .or_default() += 1;
        let throttled = status == Some(StatusCode::TOO_MANY_REQUESTS);
        if throttled {
            self.throttled.inc();
        }
        if throttled || status.is_none_or(|s| s.is_server_error()) {
            self.last_failure.set_now();
        } else {
            self.last_success.set_now();
        }
    }

    /// Body bytes received from the upstream (blobs, manifests, tag lists, referrers).
    pub fn fetched(&self, bytes: u64) {
        self.fetched_bytes.add(bytes);
    }

    /// Every (operation, answer) seen so far with its count, in a stable order.
    pub fn requests(&self) -> Vec<(Op, Code, u64)> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|((op, code), n)| (*op, *code, *n))
            .collect()
    }

    pub fn latency(&self, op: Op) -> &Histogram {
        &self.latency[op.index()]
    }

    pub fn throttled(&self) -> u64 {
        self.throttled.get()
    }

    pub fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes.get()
    }

    /// Unix milliseconds of the last good answer, 0 if none yet.
    pub fn last_success_ms(&self) -> u64 {
        self.last_success.millis()
    }

    /// Unix milliseconds of the last failure, 0 if none yet.
    pub fn last_failure_ms(&self) -> u64 {
        self.last_failure.millis()
    }

    /// The upstream's health as the last answer left it.
    pub fn health(&self) -> Health {
        match (self.last_success_ms(), self.last_failure_ms()) {
            (0, 0) => Health::Unknown,
            (ok, failed) if ok >= failed => Health::Up,
            _ => Health::Down,
        }
    }
}

/// How an upstream did on its last request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Nothing asked of it yet.
    Unknown,
    Up,
    /// Its last request failed (no answer, a 5xx or a 429).
    Down,
}

impl Health {
    pub fn label(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_read_from_the_right() {
        let url = |p: &str| url::Url::parse(&format!("http://h{p}")).unwrap();
        let of = |m: Method, p: &str| Op::of(&m, &url(p));
        assert_eq!(of(Method::GET, "/v2/a/manifests/latest"), Op::ManifestGet);
        assert_eq!(of(Method::HEAD, "/v2/a/manifests/latest"), Op::ManifestHead);
        assert_eq!(of(Method::GET, "/v2/manifests/blobs/sha256:ab"), Op::BlobGet);
        assert_eq!(of(Method::HEAD, "/v2/a/blobs/sha256:ab"), Op::BlobHead);
        assert_eq!(of(Method::GET, "/v2/a/tags/list"), Op::Tags);
        assert_eq!(of(Method::GET, "/v2/a/referrers/sha256:ab"), Op::Referrers);
        assert_eq!(of(Method::GET, "/v2/"), Op::Other);
    }

    #[test]
    fn throttling_and_server_errors_are_failures_a_404_is_not() {
        let s = UpstreamStats::default();
        assert_eq!(s.health(), Health::Unknown);
        s.record(Op::BlobGet, Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(s.health(), Health::Down);
        assert_eq!(s.throttled(), 1);
        s.record(Op::BlobGet, Some(StatusCode::NOT_FOUND));
        assert_eq!(s.health(), Health::Up);
        s.record(Op::Token, None);
        assert!(s.last_failure_ms() > 0);
        assert_eq!(
            s.requests(),
            vec![
                (Op::BlobGet, Some(404), 1),
                (Op::BlobGet, Some(429), 1),
                (Op::Token, None, 1)
            ]
        );
    }
}
