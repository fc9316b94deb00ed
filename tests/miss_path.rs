//! The miss path (I1): content is committed only once verified; a digest mismatch or a
//! truncated upstream body stores nothing and fails the client's transfer; concurrent
//! misses share one upstream GET and are served as bytes arrive; a transfer completes
//! into the cache even when the client that started it leaves.

mod common;

use common::app::{error_code, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Blob, Image};
use common::wait_until_async;
use futures::StreamExt;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

/// Asserts that a client's download of `path` fails: an error status, or a body that
/// breaks off (never a complete body, right or wrong).
async fn assert_transfer_fails(app: &TestApp, path: &str, expected: &Blob) {
    let resp = app.get(path).await;
    let status = resp.status().as_u16();
    let body = resp.bytes().await;
    if status == 200 {
        assert!(
            body.is_err(),
            "a 200 body that failed verification must break off, got {:?} bytes",
            body.map(|b| b.len())
        );
    } else {
        assert!(body.is_ok_and(|b| b != expected.bytes));
    }
}

fn assert_nothing_stored(app: &TestApp, digest: &str) {
    let rows: i64 = app
        .db()
        .query_row("SELECT count(*) FROM blobs WHERE digest = ?1", [digest], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(rows, 0, "no blob row for {digest}");
    let links: i64 = app
        .db()
        .query_row(
            "SELECT count(*) FROM repo_blobs WHERE digest = ?1",
            [digest],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(links, 0);
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        !app.stored_blob_files()
            .iter()
            .any(|p| p.to_string_lossy().contains(hex)),
        "no object stored for {digest}"
    );
}

async fn wait_tmp_empty(app: &TestApp) {
    wait_until_async("temporary files are removed", DEADLINE, || async {
        app.tmp_files() == 0
    })
    .await;
}

#[tokio::test]
async fn digest_mismatch_stores_nothing_and_fails_the_client() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("mismatch", &[300_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let layer = &image.layers[0];
    upstream.corrupt_blob(&layer.digest);
    let app = TestApp::start(&upstream.url()).await;
    let path = format!("/v2/r/blobs/{}", layer.digest);

    assert_transfer_fails(&app, &path, layer).await;
    wait_tmp_empty(&app).await;
    assert_nothing_stored(&app, &layer.digest);

    // The next request tries again, and once the upstream is honest it is cached.
    upstream.heal_blob(&layer.digest);
    assert_eq!(ok_bytes(app.get(&path).await).await, layer.bytes);
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 1);
}

#[tokio::test]
async fn truncated_upstream_body_stores_nothing() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("truncate", &[400_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let layer = &image.layers[0];
    upstream.truncate_blob(&layer.digest, 100_000);
    let app = TestApp::start(&upstream.url()).await;
    let path = format!("/v2/r/blobs/{}", layer.digest);

    assert_transfer_fails(&app, &path, layer).await;
    wait_tmp_empty(&app).await;
    assert_nothing_stored(&app, &layer.digest);
    upstream.heal_blob(&layer.digest);
    assert_eq!(ok_bytes(app.get(&path).await).await, layer.bytes);
}

#[tokio::test]
async fn twenty_concurrent_misses_cost_one_upstream_get() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("concurrent", &[2_000_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let layer = image.layers[0].clone();
    // Slow enough that every request joins while the one transfer is running.
    upstream.slow_blob(&layer.digest, 64 * 1024, Duration::from_millis(10));
    let app = std::sync::Arc::new(TestApp::start(&upstream.url()).await);

    let path = format!("/v2/r/blobs/{}", layer.digest);
    let mut handles = Vec::new();
    for _ in 0..20 {
        let (app, path) = (app.clone(), path.clone());
        handles.push(tokio::spawn(async move { ok_bytes(app.get(&path).await).await }));
    }
    for h in handles {
        assert_eq!(
            h.await.unwrap(),
            layer.bytes,
            "every client gets the whole, correct body"
        );
    }
    assert_eq!(upstream.blob_gets(&layer.digest), 1, "exactly one upstream GET");
}

#[tokio::test]
async fn waiting_clients_are_served_as_bytes_arrive() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("streaming", &[1_000_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let layer = &image.layers[0];
    // About 2 s for the whole body.
    upstream.slow_blob(&layer.digest, 50_000, Duration::from_millis(100));
    let app = TestApp::start(&upstream.url()).await;
    let path = format!("/v2/r/blobs/{}", layer.digest);

    let first = app.get(&path).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers()["content-length"],
        layer.len().to_string().as_str()
    );
    // A second client joins the running transfer...
    let second = app.get(&path).await;
    let mut first_stream = first.bytes_stream();
    let mut second_stream = second.bytes_stream();
    let a = first_stream.next().await.unwrap().unwrap();
    let b = second_stream.next().await.unwrap().unwrap();
    // ...and both have bytes while the upstream is still sending: nothing is committed yet.
    assert!(!a.is_empty() && !b.is_empty());
    assert_eq!(
        app.count("SELECT count(*) FROM blobs"),
        0,
        "bytes flowed before the transfer ended"
    );
    let mut rest = a.to_vec();
    while let Some(chunk) = first_stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, layer.bytes);
    assert_eq!(upstream.blob_gets(&layer.digest), 1);
}

#[tokio::test]
async fn transfer_completes_into_the_cache_after_the_client_leaves() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("disconnect", &[800_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let layer = &image.layers[0];
    upstream.slow_blob(&layer.digest, 40_000, Duration::from_millis(20));
    let app = TestApp::start(&upstream.url()).await;
    let path = format!("/v2/r/blobs/{}", layer.digest);

    let resp = app.get(&path).await;
    let mut stream = resp.bytes_stream();
    assert!(!stream.next().await.unwrap().unwrap().is_empty());
    drop(stream);

    wait_until_async("the abandoned transfer is committed", DEADLINE, || async {
        app.count("SELECT count(*) FROM blobs") == 1
    })
    .await;
    upstream.reset_log();
    assert_eq!(ok_bytes(app.get(&path).await).await, layer.bytes);
    assert_eq!(upstream.blob_gets(&layer.digest), 0);
}

#[tokio::test]
async fn range_on_a_cold_and_on_a_warm_blob() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("range", &[500_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let layer = &image.layers[0];
    let app = TestApp::start(&upstream.url()).await;
    let path = format!("/v2/r/blobs/{}", layer.digest);
    let size = layer.len();

    // Cold: the range is answered from the one full transfer, which is cached.
    let resp = app.get_range(&path, "bytes=1000-1999").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-1999/{size}").as_str()
    );
    assert_eq!(resp.headers()["content-length"], "1000");
    assert_eq!(ok_bytes(resp).await, layer.bytes.slice(1000..2000));
    wait_until_async("the cold blob is cached", DEADLINE, || async {
        app.count("SELECT count(*) FROM blobs") == 1
    })
    .await;

    upstream.reset_log();
    let resp = app.get_range(&path, "bytes=-100").await;
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes {}-{}/{size}", size - 100, size - 1).as_str()
    );
    assert_eq!(ok_bytes(resp).await, layer.bytes.slice(size - 100..));
    let resp = app.get_range(&path, &format!("bytes={}-", size - 10)).await;
    assert_eq!(ok_bytes(resp).await, layer.bytes.slice(size - 10..));
    let resp = app.get_range(&path, &format!("bytes={size}-")).await;
    assert_eq!(error_code(resp).await, (416, "RANGE_INVALID".into()));
    assert!(upstream.log().is_empty(), "warm ranges never reach the upstream");
}

#[tokio::test]
async fn missing_object_is_repaired_and_refetched() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("repair", &[10_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let layer = &image.layers[0];
    let app = TestApp::start(&upstream.url()).await;
    let path = format!("/v2/r/blobs/{}", layer.digest);
    ok_bytes(app.get(&path).await).await;
    for f in app.stored_blob_files() {
        std::fs::remove_file(f).unwrap();
    }
    // The row claimed an object that is gone: the request is still served, from upstream.
    assert_eq!(ok_bytes(app.get(&path).await).await, layer.bytes);
    assert_eq!(upstream.blob_gets(&layer.digest), 2);
    assert_eq!(app.stored_blob_files().len(), 1);
}

#[tokio::test]
async fn a_client_joining_late_reads_the_start_from_the_file_on_the_same_transfer() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("late", &[24 << 20], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let layer = image.layers[0].clone();
    upstream.slow_blob(&layer.digest, 256 * 1024, Duration::from_millis(20));
    let app = std::sync::Arc::new(TestApp::start(&upstream.url()).await);
    let path = format!("/v2/r/blobs/{}", layer.digest);

    let (first_app, first_path) = (app.clone(), path.clone());
    let first = tokio::spawn(async move { ok_bytes(first_app.get(&first_path).await).await });
    // Past the 8 MiB kept in memory: the start of the blob is only in the file now.
    wait_until_async("over 9 MiB are written", DEADLINE, || async {
        app.largest_tmp_file() >= 9 << 20
    })
    .await;
    let late = app.get(&path).await;
    assert_eq!(
        app.count("SELECT count(*) FROM blobs"),
        0,
        "the late client came while the transfer was running"
    );
    assert_eq!(ok_bytes(late).await, layer.bytes, "the late client");
    assert_eq!(first.await.unwrap(), layer.bytes);
    assert_eq!(
        upstream.blob_gets(&layer.digest),
        1,
        "it joined the running transfer"
    );
}

#[tokio::test]
async fn a_panicking_transfer_fails_its_clients_alone_and_releases_its_key() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("panics", &[1_000_000, 500_000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let (doomed, other) = (image.layers[0].clone(), image.layers[1].clone());
    upstream.slow_blob(&doomed.digest, 50_000, Duration::from_millis(20));
    let app = std::sync::Arc::new(TestApp::start(&upstream.url()).await);
    regcache::fault::panic_once("cache.transfer", &doomed.digest);
    let path = format!("/v2/r/blobs/{}", doomed.digest);

    let mut clients = Vec::new();
    for _ in 0..2 {
        let (app, path, doomed) = (app.clone(), path.clone(), doomed.clone());
        clients.push(tokio::spawn(async move {
            tokio::time::timeout(DEADLINE, assert_transfer_fails(&app, &path, &doomed))
                .await
                .expect("a client of a panicked transfer gets an answer")
        }));
    }
    let other_path = format!("/v2/r/blobs/{}", other.digest);
    assert_eq!(
        ok_bytes(app.get(&other_path).await).await,
        other.bytes,
        "other transfers go on"
    );
    for c in clients {
        c.await.unwrap();
    }
    wait_tmp_empty(&app).await;
    assert_eq!(app.count("SELECT count(*) FROM write_intents"), 0);
    // The key was released: the next request starts a new transfer, which works.
    let body = tokio::time::timeout(DEADLINE, async { ok_bytes(app.get(&path).await).await })
        .await
        .expect("the next request is answered");
    assert_eq!(body, doomed.bytes);
    wait_until_async("the blob is cached", DEADLINE, || async {
        app.count("SELECT count(*) FROM blobs") == 2
    })
    .await;
}
