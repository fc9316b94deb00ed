//! Repository isolation (I7): a blob or manifest cached through one repository is served
//! under another only once the upstream confirms that repository has it.

mod common;

use common::app::{error_code, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use reqwest::Method;

#[tokio::test]
async fn a_private_layer_cannot_be_read_by_guessing_its_digest() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let secret = Image::new("private", &[5000], "2024-01-01T00:00:00Z");
    upstream.add_image("private/app", Some("v1"), &secret);
    let app = TestApp::start(&upstream.url()).await;
    for b in secret.blobs() {
        ok_bytes(app.get(&format!("/v2/private/app/blobs/{}", b.digest)).await).await;
    }
    ok_bytes(app.get_manifest("/v2/private/app/manifests/v1").await).await;
    upstream.reset_log();

    let layer = &secret.layers[0];
    let resp = app.get(&format!("/v2/public/app/blobs/{}", layer.digest)).await;
    assert_eq!(error_code(resp).await, (404, "BLOB_UNKNOWN".into()));
    let resp = app.head(&format!("/v2/public/app/blobs/{}", layer.digest)).await;
    assert_eq!(resp.status(), 404);
    let resp = app
        .get_manifest(&format!("/v2/public/app/manifests/{}", secret.manifest.digest))
        .await;
    assert_eq!(error_code(resp).await, (404, "MANIFEST_UNKNOWN".into()));
    // The upstream was asked under the public name, and nothing was linked there.
    assert!(upstream.requests(Method::HEAD, "/v2/public/app/blobs/") >= 1);
    let links: i64 = app.count(
        "SELECT count(*) FROM repo_blobs rb JOIN repositories r ON r.id = rb.repo_id WHERE r.name = 'public/app'",
    );
    assert_eq!(links, 0);
}

#[tokio::test]
async fn a_shared_layer_is_verified_upstream_once_then_served_from_cache() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("shared", &[200_000], "2024-01-01T00:00:00Z");
    upstream.add_image("team/a", Some("v1"), &image);
    upstream.add_image("team/b", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let layer = &image.layers[0];
    ok_bytes(app.get(&format!("/v2/team/a/blobs/{}", layer.digest)).await).await;

    let path_b = format!("/v2/team/b/blobs/{}", layer.digest);
    assert_eq!(ok_bytes(app.get(&path_b).await).await, layer.bytes);
    assert_eq!(
        upstream.blob_gets(&layer.digest),
        1,
        "the bytes were fetched once"
    );
    assert_eq!(
        upstream.requests(Method::HEAD, "/v2/team/b/blobs/"),
        1,
        "verified under b"
    );
    upstream.reset_log();
    assert_eq!(ok_bytes(app.get(&path_b).await).await, layer.bytes);
    assert!(upstream.log().is_empty(), "once linked, b is a plain hit");
}

#[tokio::test]
async fn blobs_of_a_cached_manifest_are_linked_to_its_repository() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("referenced", &[3000], "2024-01-01T00:00:00Z");
    upstream.add_image("x/one", Some("v1"), &image);
    upstream.add_image("x/two", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let layer = &image.layers[0];
    ok_bytes(app.get(&format!("/v2/x/one/blobs/{}", layer.digest)).await).await;
    // x/two's own manifest (from its upstream) names the layer: no further check needed.
    ok_bytes(app.get_manifest("/v2/x/two/manifests/v1").await).await;
    upstream.reset_log();
    assert_eq!(
        ok_bytes(app.get(&format!("/v2/x/two/blobs/{}", layer.digest)).await).await,
        layer.bytes
    );
    assert!(upstream.log().is_empty(), "{:?}", upstream.log());
}
