//! Upstream-controlled blob sizes are bounded (I10): a `Content-Length` over
//! `storage.max_blob_size` is refused before a byte of the body is read; a body sent
//! without `Content-Length` is cached when it fits, passed through uncached once it grows
//! past the room `storage.max_size` leaves, and cut off past `storage.max_blob_size`.

mod common;

use common::app::{error_code, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Blob, Image};
use common::wait_until_async;
use regcache::config::{ByteSize, Config};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);
const MIB: usize = 1024 * 1024;

async fn setup(layer_size: usize, tweak: impl FnOnce(&mut Config)) -> (FixtureUpstream, TestApp, Blob) {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("bounds", &[layer_size], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let app = TestApp::start_with(&[("fixture", &upstream.url())], tweak).await;
    (upstream, app, image.layers[0].clone())
}

fn size(s: &str) -> ByteSize {
    s.parse().unwrap()
}

async fn assert_nothing_left(app: &TestApp) {
    wait_until_async("temporary files are removed", DEADLINE, || async {
        app.tmp_files() == 0
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 0);
    assert_eq!(app.count("SELECT count(*) FROM write_intents"), 0);
    assert!(app.stored_blob_files().is_empty());
}

#[tokio::test]
async fn a_blob_announced_over_max_blob_size_is_refused_before_its_body_is_read() {
    let (upstream, app, layer) = setup(2 * MIB, |c| c.storage.max_blob_size = size("1MiB")).await;
    // The upstream sends its headers and holds the body back: only a client that does not
    // read the body gets an answer.
    upstream.hold_blob(&layer.digest);
    let resp = tokio::time::timeout(DEADLINE, app.get(&format!("/v2/r/blobs/{}", layer.digest)))
        .await
        .expect("answered without reading the held body");
    let (status, code) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (502, "UNKNOWN"));
    upstream.release_blob(&layer.digest);
    assert_nothing_left(&app).await;
}

#[tokio::test]
async fn a_blob_without_content_length_is_cached_when_it_fits() {
    let (upstream, app, layer) = setup(3 * MIB, |c| c.storage.max_size = Some(size("64MiB"))).await;
    upstream.unsized_blob(&layer.digest);
    let resp = app.get(&format!("/v2/r/blobs/{}", layer.digest)).await;
    assert!(
        resp.headers().get("content-length").is_none(),
        "size unknown, chunked"
    );
    assert_eq!(ok_bytes(resp).await, layer.bytes);
    wait_until_async("the blob is cached", DEADLINE, || async {
        app.count("SELECT count(*) FROM blobs") == 1
    })
    .await;
}

#[tokio::test]
async fn a_blob_without_content_length_past_the_room_under_max_size_is_passed_through() {
    let (upstream, app, layer) = setup(3 * MIB, |c| c.storage.max_size = Some(size("2MiB"))).await;
    upstream.unsized_blob(&layer.digest);
    let path = format!("/v2/r/blobs/{}", layer.digest);
    assert_eq!(ok_bytes(app.get(&path).await).await, layer.bytes, "served whole");
    assert_nothing_left(&app).await;
    assert_eq!(ok_bytes(app.get(&path).await).await, layer.bytes);
    assert_eq!(upstream.blob_gets(&layer.digest), 2, "not cached");
}

#[tokio::test]
async fn a_blob_without_content_length_past_max_blob_size_is_cut_off() {
    let (upstream, app, layer) = setup(3 * MIB, |c| c.storage.max_blob_size = size("2MiB")).await;
    upstream.unsized_blob(&layer.digest);
    let resp = app.get(&format!("/v2/r/blobs/{}", layer.digest)).await;
    let status = resp.status().as_u16();
    let body = resp.bytes().await;
    if status == 200 {
        assert!(body.is_err(), "the body breaks off");
    } else {
        assert_eq!(status, 502);
    }
    assert_nothing_left(&app).await;
}
