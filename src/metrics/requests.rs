//! Client requests per upstream, by kind and result, and the bytes served for them. Each
//! count is one relaxed atomic add on counters found by the upstream's place in a short
//! list: no map, no lock, no allocation per request.

use crate::counters::Counter;
use crate::upstream::{Upstream, Upstreams};
use std::sync::Arc;

/// What a registry request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Manifest,
    Blob,
    Tags,
    Referrers,
}

impl Kind {
    pub(crate) const ALL: [Kind; 4] = [Kind::Manifest, Kind::Blob, Kind::Tags, Kind::Referrers];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
            Kind::Tags => "tags",
            Kind::Referrers => "referrers",
        }
    }

    /// The kind of a `/v2/` path, read from the right as the distribution grammar is
    /// (repository names may contain `manifests`); `None` for anything else.
    pub(crate) fn of_path(path: &str) -> Option<Kind> {
        let rest = path.strip_prefix("/v2/")?.as_bytes();
        // Bytes, not chars: this runs on every request.
        let slash = rest.iter().rposition(|b| *b == b'/')?;
        let last = &rest[slash + 1..];
        let parent = &rest[rest[..slash]
            .iter()
            .rposition(|b| *b == b'/')
            .map_or(0, |i| i + 1)..slash];
        match (parent, last) {
            (b"manifests", _) => Some(Kind::Manifest),
            (b"blobs", _) => Some(Kind::Blob),
            (b"tags", b"list") => Some(Kind::Tags),
            (b"referrers", _) => Some(Kind::Referrers),
            _ => None,
        }
    }
}

/// How a request was answered: the cache's note, or an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    Hit,
    Revalidated,
    Miss,
    Stale,
    /// Any response with status 400 or more.
    Error,
}

impl Answer {
    pub(crate) const ALL: [Answer; 5] = [
        Answer::Hit,
        Answer::Revalidated,
        Answer::Miss,
        Answer::Stale,
        Answer::Error,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Answer::Hit => "hit",
            Answer::Revalidated => "revalidated",
            Answer::Miss => "miss",
            Answer::Stale => "stale",
            Answer::Error => "error",
        }
    }

    pub(crate) fn from_outcome(o: crate::cache::outcome::Outcome) -> Answer {
        use crate::cache::outcome::Outcome;
        match o {
            Outcome::Hit => Answer::Hit,
            Outcome::Revalidated => Answer::Revalidated,
            Outcome::Miss => Answer::Miss,
            Outcome::Stale => Answer::Stale,
        }
    }
}

/// The counters of one upstream.
#[derive(Debug)]
pub(crate) struct UpstreamRequests {
    pub(crate) upstream: Arc<Upstream>,
    counts: [[Counter; Answer::ALL.len()]; Kind::ALL.len()],
    served_bytes: Counter,
}

impl UpstreamRequests {
    pub(crate) fn count(&self, kind: Kind, answer: Answer) {
        self.counts[kind as usize][answer as usize].inc();
    }

    pub(crate) fn get(&self, kind: Kind, answer: Answer) -> u64 {
        self.counts[kind as usize][answer as usize].get()
    }

    pub(crate) fn served(&self, bytes: u64) {
        self.served_bytes.add(bytes);
    }

    pub(crate) fn served_bytes(&self) -> u64 {
        self.served_bytes.get()
    }

    /// Requests answered `answer`, of every kind.
    pub(crate) fn total(&self, answer: Answer) -> u64 {
        Kind::ALL.iter().map(|k| self.get(*k, answer)).sum()
    }
}

/// The counters of every configured upstream.
#[derive(Debug)]
pub(crate) struct RequestCounters {
    list: Vec<Arc<UpstreamRequests>>,
}

impl RequestCounters {
    pub(crate) fn new(upstreams: &Upstreams) -> Self {
        Self {
            list: upstreams
                .iter()
                .map(|u| {
                    Arc::new(UpstreamRequests {
                        upstream: u.clone(),
                        counts: Default::default(),
                        served_bytes: Counter::default(),
                    })
                })
                .collect(),
        }
    }

    /// The counters of `upstream` (a handful of upstreams: a pointer comparison each).
    pub(crate) fn of(&self, upstream: &Arc<Upstream>) -> Option<&Arc<UpstreamRequests>> {
        self.list.iter().find(|c| Arc::ptr_eq(&c.upstream, upstream))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<UpstreamRequests>> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_read_from_the_right() {
        assert_eq!(Kind::of_path("/v2/a/manifests/latest"), Some(Kind::Manifest));
        assert_eq!(
            Kind::of_path("/v2/blobs/manifests/sha256:1"),
            Some(Kind::Manifest)
        );
        assert_eq!(Kind::of_path("/v2/manifests/blobs/sha256:1"), Some(Kind::Blob));
        assert_eq!(Kind::of_path("/v2/a/b/tags/list"), Some(Kind::Tags));
        assert_eq!(Kind::of_path("/v2/a/referrers/sha256:1"), Some(Kind::Referrers));
        assert_eq!(Kind::of_path("/v2/"), None);
        assert_eq!(Kind::of_path("/v2/_catalog"), None);
        assert_eq!(Kind::of_path("/metrics"), None);
    }
}
