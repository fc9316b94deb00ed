//! Reloading the identity files: a `stat` of each every second, and a new snapshot when
//! one changed. A file that cannot be used is logged once and the previous logins stay.

use super::{lock, logins, Access};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the identity files are looked at for changes (one `stat` each): a change
/// takes effect within this.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

impl Access {
    /// Re-reads the identity files when one changes (looked at every second) until
    /// `shutdown`. A file that cannot be used is logged and the previous snapshot stays.
    pub async fn watch_files(self: Arc<Self>, shutdown: CancellationToken) {
        let files = logins::watched_files(&self.auth);
        if files.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(RELOAD_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let watched = files.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || logins::fingerprint(&watched)).await else {
                continue;
            };
            if *lock(&self.fingerprint) == now {
                continue;
            }
            // Remembered even if the new files are bad, so a bad file is reported once.
            *lock(&self.fingerprint) = now;
            self.reload().await;
        }
    }

    async fn reload(&self) {
        let generation = self.logins().generation + 1;
        let (auth, hasher) = (self.auth.clone(), self.hasher.clone());
        let read = tokio::task::spawn_blocking(move || logins::read(&auth, &hasher, generation)).await;
        match read {
            Ok(Ok(logins)) => {
                let (users, tokens) = (logins.users(), logins.tokens());
                *self
                    .logins
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(logins);
                lock(&self.verified).clear(generation);
                tracing::info!(
                    auth.users = users,
                    auth.tokens = tokens,
                    "identity files reloaded"
                );
            }
            Ok(Err(e)) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "an identity file changed but cannot be used; the previous logins stay in force");
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "reloading the identity files failed");
            }
        }
    }
}
