//! The SQLite-backed metrics and the removal counters: stored blobs and bytes, the
//! deletion queue and its oldest failing entry agree with `regcache status --json` run
//! beside the server; expiry, eviction and purges are counted by reason; jobs show by
//! kind and state.

mod common;

use common::app::{config_for, TestApp};
use common::binary::run_ok_async;
use common::failing_store::FailingStore;
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use common::prometheus::{promtool_check_metrics, scrape, Scrape};
use common::wait_until_async;
use regcache::config::{Duration as CfgDuration, Secret};
use std::time::Duration;

/// Bound on waits for background work; the gauges are also up to 10 s old.
const DEADLINE: Duration = Duration::from_secs(60);
const REPO: &str = "team/app";

async fn status_json(config_file: &str) -> serde_json::Value {
    let out = run_ok_async(&["status", "--json", "--config", config_file]).await;
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// A config file for the CLI naming `data_dir`.
fn cli_config(dir: &std::path::Path, data_dir: &std::path::Path) -> String {
    let path = dir.join("regcache.toml");
    std::fs::write(
        &path,
        format!("[server]\ndata_dir = \"{}\"\n", data_dir.display()),
    )
    .unwrap();
    path.display().to_string()
}

async fn metrics(app: &TestApp) -> Scrape {
    scrape(&app.client, &app.url("/metrics")).await
}

fn removed(m: &Scrape, reason: &str) -> u64 {
    m.count("regcache_removed_blobs_total", &[("reason", reason)])
}

#[tokio::test]
async fn stored_counts_and_failing_deletes_agree_with_status() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("metrics-status", &[2_000, 9_000], "2024-02-03T00:00:00Z");
    upstream.add_image(REPO, Some("v1"), &image);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config_file = cli_config(dir.path(), &data_dir);
    let store = FailingStore::in_memory();
    store.fail_deletes_forever();
    let mut config = config_for(&[("fixture", &upstream.url())], &data_dir);
    config.proxy.ttl = CfgDuration::from_secs(1);
    config.storage.delete.retry_initial = CfgDuration::from_secs(1);
    config.storage.delete.retry_max = CfgDuration::from_secs(1);
    let app = TestApp::start_with_store(config, store.as_dyn(), Some(dir)).await;
    app.pull(REPO, "v1", &image).await;
    let blobs = image.blobs().count() as u64;
    let blob_bytes: u64 = image.blobs().map(|b| b.len() as u64).sum();

    wait_until_async("every blob queued and one delete failed", DEADLINE, || async {
        app.count("SELECT count(*) FROM pending_deletes") == blobs as i64
            && app.count("SELECT count(*) FROM pending_deletes WHERE last_error IS NOT NULL") > 0
    })
    .await;
    let m = metrics(&app).await;
    promtool_check_metrics(&m.text);
    let status = status_json(&config_file).await;
    // Blob rows stay until storage confirms their deletion.
    assert_eq!(m.count("regcache_stored_blobs", &[]), blobs);
    assert_eq!(status["blobs"]["count"], blobs);
    assert_eq!(m.count("regcache_stored_bytes", &[]), blob_bytes);
    assert_eq!(status["blobs"]["bytes"], blob_bytes);
    assert_eq!(
        m.count("regcache_repositories", &[]),
        status["repositories"].as_u64().unwrap()
    );
    assert_eq!(m.count("regcache_deletes_pending", &[]), blobs);
    assert_eq!(status["pending_deletes"]["count"], blobs);
    assert_eq!(m.count("regcache_deletes_deferred", &[]), 0);
    assert_eq!(status["deferred_deletes"]["count"], 0);
    let failing = m.count("regcache_deletes_failing", &[]);
    assert!((1..=blobs).contains(&failing), "{failing} failing");
    assert_eq!(
        m.count("regcache_multipart_uploads_open", &[]),
        status["open_uploads"].as_u64().unwrap()
    );
    // The oldest failing delete is the one status names; its age is since it was queued.
    let oldest = status["oldest_failing_delete"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let queued_at = app.count(&format!(
        "SELECT created_at FROM pending_deletes WHERE digest = '{oldest}'"
    ));
    let age = m.value("regcache_deletes_oldest_failing_age_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        age >= 0.0 && (age - (now - queued_at) as f64).abs() <= 12.0,
        "age {age}, queued {} s ago (gauges are at most 10 s old)",
        now - queued_at
    );
    // Expiry: the tag, the manifest link and every blob link, and each blob by reason.
    assert_eq!(removed(&m, "expired"), blobs);
    for (kind, n) in [("tag", 1), ("manifest_link", 1), ("blob_link", blobs)] {
        assert_eq!(
            m.count("regcache_expired_entries_total", &[("kind", kind)]),
            n,
            "{kind}"
        );
    }
    for reason in ["evicted", "purged", "cleanup", "orphan"] {
        assert_eq!(removed(&m, reason), 0, "{reason}");
    }

    store.heal();
    wait_until_async("the metrics show the deletes done", DEADLINE, || async {
        let m = metrics(&app).await;
        m.count("regcache_deletes_pending", &[]) == 0 && m.count("regcache_stored_blobs", &[]) == 0
    })
    .await;
    let m = metrics(&app).await;
    let status = status_json(&config_file).await;
    assert_eq!(m.count("regcache_deletes_failing", &[]), 0);
    assert_eq!(m.value("regcache_deletes_oldest_failing_age_seconds", &[]), 0.0);
    assert!(status["oldest_failing_delete"].is_null());
    assert_eq!(m.count("regcache_stored_bytes", &[]), 0);
    assert_eq!(status["blobs"]["bytes"], 0);
}

#[tokio::test]
async fn eviction_is_counted_by_reason_and_the_bound_is_shown() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("metrics-evict", &[5_000, 7_000], "2024-02-03T00:00:00Z");
    upstream.add_image(REPO, Some("v1"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.storage.max_size = Some("4KiB".parse().unwrap());
    })
    .await;
    app.pull(REPO, "v1", &image).await;
    let blobs = image.blobs().count() as u64;
    let blob_bytes: u64 = image.blobs().map(|b| b.len() as u64).sum();
    // Eviction looks every 10 s; deletion follows; the stored gauges are up to 10 s old.
    wait_until_async(
        "eviction ran and the gauges show its deletes done",
        DEADLINE,
        || async {
            let m = metrics(&app).await;
            removed(&m, "evicted") > 0
                && m.count("regcache_deletes_pending", &[]) == 0
                && m.count("regcache_stored_blobs", &[]) < blobs
        },
    )
    .await;
    let m = metrics(&app).await;
    assert_eq!(m.count("regcache_storage_max_bytes", &[]), 4096);
    let evicted = removed(&m, "evicted");
    assert_eq!(evicted + m.count("regcache_stored_blobs", &[]), blobs);
    assert_eq!(
        m.count("regcache_evicted_bytes_total", &[]) + m.count("regcache_stored_bytes", &[]),
        blob_bytes,
        "what was evicted and what is left add up to what was stored"
    );
    assert!(m.count("regcache_stored_bytes", &[]) <= 4096 * 90 / 100);
    assert_eq!(removed(&m, "expired"), 0);
}

#[tokio::test]
async fn a_purge_shows_as_a_job_and_as_purged_blobs() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("metrics-purge", &[3_000], "2024-02-03T00:00:00Z");
    upstream.add_image(REPO, Some("v1"), &image);
    let token = "admin-token-for-metrics-tests";
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.admin.token = Some(Secret::new(token));
    })
    .await;
    app.pull(REPO, "v1", &image).await;
    let before = metrics(&app).await;
    for state in ["queued", "running", "succeeded", "failed", "cancelled"] {
        assert_eq!(
            before.count("regcache_jobs", &[("kind", "purge"), ("state", state)]),
            0
        );
    }
    let resp = app
        .client
        .delete(app.url("/api/v1/cache"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let blobs = image.blobs().count() as u64;
    wait_until_async(
        "the purge succeeded and its blobs were handed over",
        DEADLINE,
        || async {
            let m = metrics(&app).await;
            m.count("regcache_jobs", &[("kind", "purge"), ("state", "succeeded")]) == 1
                && removed(&m, "purged") == blobs
        },
    )
    .await;
    let m = metrics(&app).await;
    assert_eq!(m.count("regcache_jobs", &[("kind", "cleanup")]), 0);
    assert_eq!(m.count("regcache_jobs", &[("state", "failed")]), 0);
}
