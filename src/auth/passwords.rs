//! Checking a Basic login's password: from the verified cache, or one bcrypt check per
//! credential (shared by every request presenting it meanwhile), on the blocking pool
//! behind `bcrypt_slots`, after the client's address waited its turn in the throttle.

use super::credentials::Key;
use super::logins::Logins;
use super::throttle::{Admission, Throttle};
use super::{lock, Access, Client, PasswordCheck, Refused};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Logins waiting for a bcrypt slot at most; past it new ones are answered 429. At about
/// 50–250 ms per check this is already many seconds of work.
const BCRYPT_QUEUE_MAX: usize = 256;

/// bcrypt checks at once: half the cores (at least one, at most four), so a login
/// flood leaves the rest of the machine — and the blocking pool's SQLite work — running.
pub(super) fn bcrypt_slots() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores / 2).clamp(1, 4)
}

impl Access {
    /// Waits until the client's address may have new credentials checked.
    async fn wait_for_slot(&self, client: Client) -> Result<(), Refused> {
        let admission = lock(&self.throttle).admit(client.key, Instant::now());
        match admission {
            Admission::Now => Ok(()),
            Admission::After(wait) => {
                tokio::time::sleep(wait).await;
                Ok(())
            }
            Admission::Refused { retry_after } => Err(Refused::Busy { retry_after }),
        }
    }

    /// A Basic login: from the verified cache, or one bcrypt check shared by every
    /// request presenting the same credentials meanwhile.
    pub(super) async fn check_password(
        &self,
        user: String,
        password: String,
        client: Client,
    ) -> Result<Arc<str>, Refused> {
        let key = self.hasher.basic(&user, &password);
        let logins = self.logins();
        if let Some(name) = lock(&self.verified).get(&key, logins.generation) {
            return Ok(name);
        }
        let cell = lock(&self.checking).entry(key).or_default().clone();
        // Leaves the map when this request is done or dropped, so checks abandoned by
        // clients that went away cannot pile up in it (I10).
        let _entry = CheckingEntry {
            map: &self.checking,
            key,
            cell: cell.clone(),
        };
        cell.get_or_init(|| self.verify_password(user, password, key, logins, client))
            .await
            .clone()
    }

    async fn verify_password(
        &self,
        user: String,
        password: String,
        key: Key,
        logins: Arc<Logins>,
        client: Client,
    ) -> Result<Arc<str>, Refused> {
        self.wait_for_slot(client).await?;
        let Some(check) = logins.password_check(&user) else {
            return Err(self.failed_now(client, &user));
        };
        let permit = {
            let _queued = Queued::enter(&self.bcrypt_waiting).ok_or(Refused::Busy {
                retry_after: Duration::from_secs(1),
            })?;
            // The semaphore is never closed.
            self.bcrypt_slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Refused::Busy {
                    retry_after: Duration::from_secs(1),
                })?
        };
        self.password_checks.fetch_add(1, Ordering::Relaxed);
        // The outcome is recorded inside the blocking task, which runs to its end even if
        // this request is dropped meanwhile: a client that hangs up before its answer is
        // still counted as a failed login (and a good login still cached). The permit
        // moves in with it, so the slot stays taken until bcrypt is done.
        let (throttle, verified) = (self.throttle.clone(), self.verified.clone());
        let generation = logins.generation;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if bcrypt::verify(password.as_bytes(), &check.hash).unwrap_or(false) && check.counts {
                let name: Arc<str> = Arc::from(user.as_str());
                lock(&verified).insert(key, name.clone(), generation);
                tracing::debug!(auth.user = %user, "login verified");
                Ok(name)
            } else {
                Err(failed_password(&throttle, client, &user))
            }
        })
        .await
        .unwrap_or(Err(Refused::BadLogin))
    }

    /// A Basic login that failed before bcrypt: there are no htpasswd users at all.
    fn failed_now(&self, client: Client, user: &str) -> Refused {
        failed_password(&self.throttle, client, user)
    }
}

/// Records a failed password login (which already waited for its slot). The user name is
/// logged to help the operator; the password never is.
fn failed_password(throttle: &Mutex<Throttle>, client: Client, user: &str) -> Refused {
    lock(throttle).failed(client.key, Instant::now());
    tracing::info!(client.addr = %client, auth.kind = "basic", auth.user = %user, "login failed");
    Refused::BadLogin
}

/// A request's hold on a shared bcrypt check: removes the check from the map on drop
/// (unless a newer one took its place). Requests still waiting keep their `Arc`; one
/// arriving later starts a new check, or finds the login cached.
struct CheckingEntry<'a> {
    map: &'a Mutex<HashMap<Key, Arc<PasswordCheck>>>,
    key: Key,
    cell: Arc<PasswordCheck>,
}

impl Drop for CheckingEntry<'_> {
    fn drop(&mut self) {
        let mut map = lock(self.map);
        if map.get(&self.key).is_some_and(|c| Arc::ptr_eq(c, &self.cell)) {
            map.remove(&self.key);
        }
    }
}

/// A place in the bcrypt queue, given back on drop (also when the request is dropped).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(counter: &'a AtomicUsize) -> Option<Self> {
        if counter.fetch_add(1, Ordering::AcqRel) >= BCRYPT_QUEUE_MAX {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(counter))
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{Extensions, HeaderMap, HeaderValue};
    use base64::Engine as _;

    async fn access_with(user: &str, password: &str, cost: u32) -> (Arc<Access>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash(password, cost).unwrap();
        std::fs::write(&path, format!("{user}:{hash}\n")).unwrap();
        let mut config = crate::config::load(None, Vec::new()).unwrap();
        config.auth.htpasswd_file = Some(path);
        (Access::load(&config).await.unwrap(), dir)
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Basic {value}")).unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn checks_abandoned_by_their_clients_leave_nothing_behind() {
        // Cost 12: long enough (~250 ms) that every request below is dropped mid-check.
        let (access, _dir) = access_with("alice", "pw", 12).await;
        for n in 0..20 {
            let headers = basic("alice", &format!("guess-{n}"));
            let gone = tokio::time::timeout(
                Duration::from_millis(1),
                access.authenticate(&headers, &Extensions::new()),
            )
            .await;
            assert!(gone.is_err(), "the check was still running when dropped");
        }
        assert!(
            lock(&access.checking).is_empty(),
            "no entry outlives its requests"
        );
        assert_eq!(access.bcrypt_waiting.load(Ordering::Acquire), 0);
        // The one that reached bcrypt still counts as a failed login once bcrypt is done.
        let key = super::super::Client::of(&Extensions::new()).key;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while lock(&access.throttle).failures(key) != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the abandoned check was not counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The right password still gets in, once the throttle lets this address through.
        let who = access
            .authenticate(&basic("alice", "pw"), &Extensions::new())
            .await;
        assert!(matches!(who, Ok(super::super::Who::Identity { .. })), "{who:?}");
    }

    #[test]
    fn at_most_half_the_cores_and_four_check_at_once() {
        let slots = bcrypt_slots();
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert!(
            (1..=4).contains(&slots) && slots <= cores.max(2) / 2,
            "{slots} of {cores}"
        );
    }
}
