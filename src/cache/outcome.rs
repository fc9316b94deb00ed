//! How the cache answered the request in hand (hit, revalidated, miss, stale) and which
//! upstream and repository it was routed to, for metrics and the access log. The cache
//! notes it with one call where it decides; the HTTP layer runs the handler inside
//! [`noting`] and reads the note when the handler returns. A task-local rather than a
//! return value, so no cache signature carries it; outside [`noting`] (background work,
//! tests calling the cache directly) the calls do nothing.

use super::Target;
use crate::metadata::RepoKey;
use crate::upstream::Upstream;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::sync::Arc;

/// How a request was answered, weakest first: when several are noted (a hit whose object
/// turned out missing and was fetched again; a changed tag whose fetch failed and was
/// served from the cache), the strongest one is the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// From the cache, nothing asked upstream.
    Hit = 1,
    /// From the cache after the upstream confirmed it (a tag's HEAD, a blob cached for
    /// another repository).
    Revalidated = 2,
    /// Fetched from the upstream.
    Miss = 3,
    /// From the cache because the upstream could not answer.
    Stale = 4,
}

impl Outcome {
    fn from_u8(v: u8) -> Option<Outcome> {
        match v {
            1 => Some(Outcome::Hit),
            2 => Some(Outcome::Revalidated),
            3 => Some(Outcome::Miss),
            4 => Some(Outcome::Stale),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Note {
    outcome: Cell<u8>,
    upstream: RefCell<Option<Arc<Upstream>>>,
    /// Only kept when asked for (manifest requests count pulls per repository), since it
    /// costs two string copies.
    repo: RefCell<Option<RepoKey>>,
    want_repo: bool,
}

tokio::task_local! {
    static NOTE: Note;
}

/// What the cache noted while a request was handled.
#[derive(Debug, Default)]
pub struct Noted {
    pub outcome: Option<Outcome>,
    pub upstream: Option<Arc<Upstream>>,
    pub repo: Option<RepoKey>,
}

/// Runs `handler`, collecting what the cache notes while it runs. `want_repo`: also keep
/// the repository it was routed to.
pub async fn noting<F: Future>(want_repo: bool, handler: F) -> (F::Output, Noted) {
    let note = Note {
        outcome: Cell::new(0),
        upstream: RefCell::new(None),
        repo: RefCell::new(None),
        want_repo,
    };
    let mut scoped = std::pin::pin!(NOTE.scope(note, handler));
    let out = scoped.as_mut().await;
    let noted = scoped.take_value().map_or_else(Noted::default, |n| Noted {
        outcome: Outcome::from_u8(n.outcome.get()),
        upstream: n.upstream.into_inner(),
        repo: n.repo.into_inner(),
    });
    (out, noted)
}

/// Notes how the request is being answered; the strongest note wins.
pub(super) fn report(outcome: Outcome) {
    let _ = NOTE.try_with(|n| n.outcome.set(n.outcome.get().max(outcome as u8)));
}

/// Notes where the request was routed.
pub(super) fn routed(t: &Target) {
    let _ = NOTE.try_with(|n| {
        *n.upstream.borrow_mut() = Some(t.upstream.clone());
        if n.want_repo {
            *n.repo.borrow_mut() = Some(t.key.clone());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_strongest_note_wins_and_nothing_leaks_out_of_scope() {
        let (v, noted) = noting(false, async {
            report(Outcome::Miss);
            report(Outcome::Hit);
            7
        })
        .await;
        assert_eq!((v, noted.outcome), (7, Some(Outcome::Miss)));
        let (_, noted) = noting(false, async { report(Outcome::Stale) }).await;
        assert_eq!(noted.outcome, Some(Outcome::Stale));
        let (_, noted) = noting(false, async {}).await;
        assert_eq!(noted.outcome, None);
        // Outside a scope a report is ignored, not a panic.
        report(Outcome::Hit);
    }
}
