//! Test support shared by the integration and end-to-end tests (`mod common;` in each
//! test file): deterministic images, an in-process fake upstream that misbehaves on
//! command, and harnesses for real external programs. `images`, `fixture_upstream` and
//! `external` never use regcache's own code, so they check regcache rather than agree with
//! it; `harness_selftest` proves they work on their own.

// Each test binary uses a subset of these helpers, and `pub` items here are reachable only
// from the binary that includes the module.
#![allow(dead_code, unreachable_pub)]

pub mod app;
pub mod binary;
pub mod bundles;
pub mod containerd;
pub mod data_dir;
pub mod external;
pub mod failing_store;
pub mod fixture_upstream;
pub mod held;
pub mod images;
pub mod logins;
pub mod logs;
pub mod prometheus;
pub mod tls;
pub mod tmpfs;

use std::future::Future;
use std::time::{Duration, Instant};

/// How often the `wait_until*` helpers re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `f` every 20 ms until it returns true; panics naming `what` after `deadline`.
/// Blocks the thread: in async tests use `wait_until_async`.
pub fn wait_until<F: FnMut() -> bool>(what: &str, deadline: Duration, mut f: F) {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Async `wait_until`: awaits `f()` every 20 ms until it yields true; panics naming `what`
/// after `deadline`. Under `tokio::time::pause()` the deadline is measured in paused time.
pub async fn wait_until_async<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
