//! `/livez` and `/readyz`: ready while the database takes a write and the blob store
//! answers; 503 with a JSON reason when the store fails or the database is locked by
//! another writer; an unreachable upstream is reported but leaves the cache ready.

mod common;

use common::app::{config_for, TestApp};
use common::failing_store::{FailingStore, INJECTED};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use common::wait_until_async;
use serde_json::Value;
use std::time::Duration;

/// Readiness results are reused for a second, and a database check waits 3 s at most.
const DEADLINE: Duration = Duration::from_secs(30);

async fn readyz(app: &TestApp) -> (u16, Value) {
    let resp = app.get("/readyz").await;
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json",
        "readiness answers JSON whatever the status"
    );
    (status, resp.json().await.unwrap())
}

async fn wait_ready_status(app: &TestApp, what: &str, want: u16) -> Value {
    let last = std::sync::Mutex::new(Value::Null);
    wait_until_async(what, DEADLINE, || async {
        let (status, body) = readyz(app).await;
        *last.lock().unwrap() = body;
        status == want
    })
    .await;
    last.into_inner().unwrap()
}

#[tokio::test]
async fn a_failing_store_makes_the_cache_unready_until_it_heals() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&[("fixture", &upstream.url())], dir.path());
    let store = FailingStore::in_memory();
    let app = TestApp::start_with_store(config, store.as_dyn(), Some(dir)).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["database"]["ok"], true);
    assert_eq!(body["storage"]["ok"], true);
    assert!(body.get("reason").is_none(), "{body}");

    store.fail_reads();
    let body = wait_ready_status(&app, "the failing store shows", 503).await;
    assert_eq!(body["status"], "unready");
    assert_eq!(body["storage"]["ok"], false);
    assert_eq!(body["database"]["ok"], true, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("storage: ") && reason.contains(INJECTED),
        "{reason}"
    );
    assert!(body["storage"]["error"].as_str().unwrap().contains(INJECTED));
    let live = app.get("/livez").await;
    assert_eq!(live.status(), 200, "the process still answers");

    store.heal();
    let body = wait_ready_status(&app, "the healed store shows", 200).await;
    assert_eq!(body["storage"]["ok"], true);
}

#[tokio::test]
async fn a_database_that_takes_no_write_makes_the_cache_unready() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start(&upstream.url()).await;
    assert_eq!(readyz(&app).await.0, 200);
    // Another process holding SQLite's write lock: regcache's writes wait, then time out.
    let db = rusqlite::Connection::open(app.data_dir().join("regcache.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let body = wait_ready_status(&app, "the locked database shows", 503).await;
    assert_eq!(body["database"]["ok"], false);
    assert_eq!(body["storage"]["ok"], true);
    assert!(
        body["reason"].as_str().unwrap().starts_with("database: "),
        "{body}"
    );
    db.execute_batch("ROLLBACK").unwrap();
    wait_ready_status(&app, "the released database shows", 200).await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_reported_and_the_cache_stays_ready() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("health-upstream", &[2000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let (_, body) = readyz(&app).await;
    assert_eq!(
        body["upstreams"][0]["health"], "unknown",
        "nothing asked yet: {body}"
    );
    app.pull("team/app", "v1", &image).await;
    assert_eq!(readyz(&app).await.1["upstreams"][0]["health"], "up");

    upstream.stop().await;
    // Served stale from the cache; the failed revalidation marks the upstream down.
    app.pull("team/app", "v1", &image).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    let up = &body["upstreams"][0];
    assert_eq!(up["name"], "fixture");
    assert_eq!(up["health"], "down", "{body}");
    assert!(up["last_failure_unix_ms"].as_u64().unwrap() >= up["last_success_unix_ms"].as_u64().unwrap());
}
