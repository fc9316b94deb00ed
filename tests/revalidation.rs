//! Tag manifests are revalidated with one upstream HEAD (shared by concurrent requests);
//! when the upstream cannot answer the cached copy is served; `proxy.offline` never
//! contacts an upstream; digest requests never revalidate.

mod common;

use common::app::{error_code, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use regcache::config::Duration as CfgDuration;
use reqwest::Method;
use std::sync::Arc;
use std::time::Duration;

async fn warm(app: &TestApp, image: &Image, repo: &str, tag: &str) {
    ok_bytes(app.get_manifest(&format!("/v2/{repo}/manifests/{tag}")).await).await;
    for b in image.blobs() {
        ok_bytes(app.get(&format!("/v2/{repo}/blobs/{}", b.digest)).await).await;
    }
}

#[tokio::test]
async fn every_tag_request_is_one_head_and_a_moved_tag_is_followed() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let v1 = Image::new("moving-1", &[100], "2024-01-01T00:00:00Z");
    let v2 = Image::new("moving-2", &[100], "2024-02-01T00:00:00Z");
    upstream.add_image("r", Some("latest"), &v1);
    let app = TestApp::start(&upstream.url()).await;
    warm(&app, &v1, "r", "latest").await;
    upstream.reset_log();

    for _ in 0..3 {
        let body = ok_bytes(app.get_manifest("/v2/r/manifests/latest").await).await;
        assert_eq!(body, v1.manifest.bytes);
    }
    assert_eq!(
        upstream.manifest_heads("r", "latest"),
        3,
        "default: revalidate on every request"
    );
    assert_eq!(upstream.requests(Method::GET, "/manifests/"), 0);

    upstream.add_image("r", Some("latest"), &v2);
    let resp = app.get_manifest("/v2/r/manifests/latest").await;
    assert_eq!(
        resp.headers()["docker-content-digest"],
        v2.manifest.digest.as_str()
    );
    assert_eq!(ok_bytes(resp).await, v2.manifest.bytes);
    let tag_digest: String = app
        .db()
        .query_row("SELECT digest FROM tags WHERE name = 'latest'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tag_digest, v2.manifest.digest);
    // The old manifest stays reachable by digest.
    let old = app
        .get_manifest(&format!("/v2/r/manifests/{}", v1.manifest.digest))
        .await;
    assert_eq!(ok_bytes(old).await, v1.manifest.bytes);
}

#[tokio::test]
async fn concurrent_tag_requests_share_one_head() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("shared-head", &[100], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let app = Arc::new(TestApp::start(&upstream.url()).await);
    warm(&app, &image, "r", "t").await;
    upstream.reset_log();
    // Every HEAD takes 500 ms, so all requests below overlap the first one.
    upstream.set_delay(Duration::from_millis(500));
    let mut handles = Vec::new();
    for _ in 0..16 {
        let app = app.clone();
        handles.push(tokio::spawn(async move {
            ok_bytes(app.get_manifest("/v2/r/manifests/t").await).await
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), image.manifest.bytes);
    }
    assert_eq!(upstream.manifest_heads("r", "t"), 1);
}

#[tokio::test]
async fn digest_requests_never_revalidate_and_interval_skips_heads() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("interval", &[100], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], |c| {
        c.proxy.revalidate_after = CfgDuration::from_secs(3600);
    })
    .await;
    warm(&app, &image, "r", "t").await;
    upstream.reset_log();
    for _ in 0..3 {
        ok_bytes(
            app.get_manifest(&format!("/v2/r/manifests/{}", image.manifest.digest))
                .await,
        )
        .await;
        ok_bytes(app.get_manifest("/v2/r/manifests/t").await).await;
    }
    assert!(
        upstream.log().is_empty(),
        "fresh tags and digests need no upstream: {:?}",
        upstream.log()
    );
}

#[tokio::test]
async fn unreachable_or_failing_upstream_serves_cached_tags() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("stale", &[1000, 2000], "2024-01-01T00:00:00Z");
    let other = Image::new("never-cached", &[10], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    upstream.add_image("r", Some("uncached"), &other);
    let app = TestApp::start(&upstream.url()).await;
    warm(&app, &image, "r", "t").await;

    // 5xx: the cached manifest is served.
    upstream.fail_with(503);
    assert_eq!(
        ok_bytes(app.get_manifest("/v2/r/manifests/t").await).await,
        image.manifest.bytes
    );
    // Rate limited: likewise.
    upstream.fail_with_retry_after(429, 10);
    assert_eq!(
        ok_bytes(app.get_manifest("/v2/r/manifests/t").await).await,
        image.manifest.bytes
    );
    upstream.clear_failure();
    // Slower than the revalidation timeout: likewise, within about that timeout.
    upstream.set_delay(Duration::from_secs(10));
    let started = std::time::Instant::now();
    assert_eq!(
        ok_bytes(app.get_manifest("/v2/r/manifests/t").await).await,
        image.manifest.bytes
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    upstream.set_delay(Duration::ZERO);
    // Gone: likewise, and so is everything the image needs.
    upstream.stop().await;
    warm(&app, &image, "r", "t").await;
    // Something never cached cannot be served.
    let (status, code) = error_code(app.get_manifest("/v2/r/manifests/uncached").await).await;
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"));
}

#[tokio::test]
async fn offline_mode_never_contacts_the_upstream() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("offline", &[1000], "2024-01-01T00:00:00Z");
    let other = Image::new("offline-other", &[1000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    upstream.add_image("r", Some("other"), &other);
    let mut app = TestApp::start(&upstream.url()).await;
    warm(&app, &image, "r", "t").await;

    app.restart_with(|c| c.proxy.offline = true).await;
    upstream.reset_log();
    warm(&app, &image, "r", "t").await;
    assert_eq!(
        error_code(app.get_manifest("/v2/r/manifests/other").await).await,
        (404, "MANIFEST_UNKNOWN".into())
    );
    let blob = format!("/v2/r/blobs/{}", other.layers[0].digest);
    assert_eq!(
        error_code(app.get(&blob).await).await,
        (404, "BLOB_UNKNOWN".into())
    );
    assert!(
        upstream.log().is_empty(),
        "offline sent requests: {:?}",
        upstream.log()
    );
}
