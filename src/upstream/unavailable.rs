//! The warning an operator needs when clients get `503 UNAVAILABLE` because an upstream
//! cannot be reached: one line per upstream and cause, repeated at most once a minute with
//! how many requests failed meanwhile, so an outage neither goes unseen nor floods the log.

use super::UpstreamError;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the same upstream and cause is warned about again while it lasts.
const REPEAT_AFTER: Duration = Duration::from_secs(60);
/// Distinct (upstream, cause) pairs remembered; past it the memory starts over (a burst
/// of distinct causes then logs once more each, rather than growing without bound).
const MAX_KEYS: usize = 256;

#[derive(Debug)]
struct Seen {
    last_logged: Instant,
    failed_since: u64,
}

/// When each (upstream, cause) was last warned about.
#[derive(Debug, Default)]
struct Limiter {
    seen: HashMap<(String, String), Seen>,
}

impl Limiter {
    /// Whether to warn now, and if so how many requests failed since the last warning
    /// (this one included).
    fn hit(&mut self, key: (String, String), now: Instant) -> Option<u64> {
        if self.seen.len() >= MAX_KEYS && !self.seen.contains_key(&key) {
            self.seen.clear();
        }
        match self.seen.entry(key) {
            Entry::Vacant(v) => {
                v.insert(Seen {
                    last_logged: now,
                    failed_since: 0,
                });
                Some(1)
            }
            Entry::Occupied(mut o) => {
                let s = o.get_mut();
                s.failed_since += 1;
                if now.duration_since(s.last_logged) < REPEAT_AFTER {
                    return None;
                }
                let failed = s.failed_since;
                s.last_logged = now;
                s.failed_since = 0;
                Some(failed)
            }
        }
    }
}

static LIMITER: Mutex<Option<Limiter>> = Mutex::new(None);

/// Called where an unreachable or timed-out upstream becomes a client's 503: warns the
/// first time for this upstream and cause, then at most once per [`REPEAT_AFTER`].
pub fn warn_unavailable(e: &UpstreamError) {
    let (upstream, kind, message) = match e {
        UpstreamError::Unreachable { upstream, message } => (upstream, "unreachable", message),
        UpstreamError::Timeout { upstream, message } => (upstream, "timed out", message),
        _ => return,
    };
    let cause = format!("{kind}: {}", root_cause(message));
    let failed = match LIMITER.lock() {
        Ok(mut l) => l
            .get_or_insert_with(Limiter::default)
            .hit((upstream.clone(), cause.clone()), Instant::now()),
        Err(_) => return,
    };
    let Some(failed) = failed else { return };
    tracing::warn!(
        upstream.name = %upstream,
        error.cause = %cause,
        requests.failed = failed,
        error = %message,
        "upstream cannot be reached: clients get 503 UNAVAILABLE for what is not cached"
    );
}

/// The innermost cause of an error chain written `outer: inner: innermost`, which is the
/// same for every request that fails the same way (the outer parts name the URL).
fn root_cause(message: &str) -> &str {
    message.rsplit(": ").next().unwrap_or(message).trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_the_innermost_part() {
        assert_eq!(
            root_cause("error sending request for url (http://127.0.0.1:1/v2/a/blobs/x): client error (Connect): tcp connect error: Connection refused (os error 111)"),
            "Connection refused (os error 111)"
        );
        assert_eq!(root_cause("plain"), "plain");
    }

    #[test]
    fn once_per_upstream_and_cause_then_once_a_minute_with_the_count() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let key = |u: &str, c: &str| (u.to_owned(), c.to_owned());
        assert_eq!(l.hit(key("hub", "refused"), t0), Some(1));
        for s in 1..60 {
            assert_eq!(l.hit(key("hub", "refused"), t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(l.hit(key("hub", "dns"), t0), Some(1), "another cause");
        assert_eq!(l.hit(key("ghcr", "refused"), t0), Some(1), "another upstream");
        assert_eq!(
            l.hit(key("hub", "refused"), t0 + Duration::from_secs(61)),
            Some(60),
            "59 suppressed, and this one"
        );
        assert_eq!(l.hit(key("hub", "refused"), t0 + Duration::from_secs(62)), None);
    }
}
