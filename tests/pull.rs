//! Pulling through regcache from the in-process fixture upstream: manifests by tag and by
//! digest, indexes and their children, blobs, the headers the spec asks for, a warm pull
//! that costs the upstream no blob GET, and a restart that serves everything without it.

mod common;

use common::app::{ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Image, Index, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use reqwest::Method;

async fn pull_image(app: &TestApp, repo: &str, reference: &str, image: &Image) {
    let resp = app
        .get_manifest(&format!("/v2/{repo}/manifests/{reference}"))
        .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["docker-content-digest"], image.manifest.digest.as_str());
    assert_eq!(h["content-type"], image.manifest.media_type.as_str());
    assert_eq!(h["content-length"], image.manifest.len().to_string().as_str());
    assert_eq!(ok_bytes(resp).await, image.manifest.bytes);
    for blob in image.blobs() {
        let resp = app.get(&format!("/v2/{repo}/blobs/{}", blob.digest)).await;
        assert_eq!(resp.headers()["docker-content-digest"], blob.digest.as_str());
        assert_eq!(resp.headers()["content-length"], blob.len().to_string().as_str());
        assert_eq!(ok_bytes(resp).await, blob.bytes, "blob {}", blob.digest);
    }
}

#[tokio::test]
async fn image_by_tag_then_warm_pull_needs_no_upstream_blob_get() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("pull", &[1000, 200_000, 3_000_000], "2024-05-06T07:08:09Z");
    upstream.add_image("team/app", Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;

    pull_image(&app, "team/app", "v1", &image).await;
    for blob in image.blobs() {
        assert_eq!(
            upstream.blob_gets(&blob.digest),
            1,
            "cold pull fetches each blob once"
        );
    }
    assert_eq!(
        upstream.requests(Method::HEAD, "/blobs/"),
        0,
        "a cold blob costs one GET, no HEAD"
    );

    upstream.reset_log();
    pull_image(&app, "team/app", "v1", &image).await;
    pull_image(&app, "team/app", &image.manifest.digest, &image).await;
    assert_eq!(
        upstream.requests(Method::GET, "/blobs/"),
        0,
        "warm pull: zero upstream blob GETs"
    );
    assert_eq!(
        upstream.requests(Method::GET, "/manifests/"),
        0,
        "warm tag: revalidated by HEAD only"
    );
    assert_eq!(upstream.manifest_heads("team/app", "v1"), 1);
}

#[tokio::test]
async fn head_requests_carry_headers_without_body() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("head", &[5000], "2024-01-01T00:00:00Z");
    upstream.add_image("r", Some("t"), &image);
    let app = TestApp::start(&upstream.url()).await;

    // A cold HEAD by tag (how containerd resolves) caches the manifest whole.
    let resp = app
        .client
        .head(app.url("/v2/r/manifests/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        image.manifest.digest.as_str()
    );
    assert_eq!(
        resp.headers()["content-length"],
        image.manifest.len().to_string().as_str()
    );
    assert!(resp.bytes().await.unwrap().is_empty());
    upstream.reset_log();
    let resp = app
        .get_manifest(&format!("/v2/r/manifests/{}", image.manifest.digest))
        .await;
    assert_eq!(ok_bytes(resp).await, image.manifest.bytes);
    assert!(upstream.log().is_empty(), "the digest GET after a HEAD is a hit");

    // HEAD of a cold blob asks the upstream but downloads nothing.
    let layer = &image.layers[0];
    let resp = app.head(&format!("/v2/r/blobs/{}", layer.digest)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], layer.len().to_string().as_str());
    assert_eq!(upstream.blob_gets(&layer.digest), 0);
    // After a GET, HEAD is answered from the cache.
    ok_bytes(app.get(&format!("/v2/r/blobs/{}", layer.digest)).await).await;
    upstream.reset_log();
    let resp = app.head(&format!("/v2/r/blobs/{}", layer.digest)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], layer.len().to_string().as_str());
    assert!(upstream.log().is_empty());
}

#[tokio::test]
async fn multi_arch_index_and_children_are_cached_whole() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let index = Index::new("multi", &["amd64", "arm64"]);
    upstream.add_index("library/multi", Some("latest"), &index);
    let app = TestApp::start(&upstream.url()).await;

    let resp = app.get_manifest("/v2/library/multi/manifests/latest").await;
    assert_eq!(resp.headers()["content-type"], OCI_INDEX);
    assert_eq!(ok_bytes(resp).await, index.manifest.bytes);
    // The upstream was asked with an Accept naming indexes, so it sent the index whole.
    let accept = upstream
        .log()
        .into_iter()
        .find(|r| r.method == Method::GET && r.path.contains("/manifests/"))
        .and_then(|r| {
            r.headers
                .get("accept")
                .map(|v| v.to_str().unwrap_or_default().to_owned())
        })
        .unwrap_or_default();
    assert!(
        accept.contains(OCI_INDEX) && accept.contains(OCI_MANIFEST),
        "{accept}"
    );
    for (_, image) in &index.images {
        pull_image(&app, "library/multi", &image.manifest.digest, image).await;
    }
    upstream.reset_log();
    for (_, image) in &index.images {
        pull_image(&app, "library/multi", &image.manifest.digest, image).await;
    }
    assert!(
        upstream.log().is_empty(),
        "children and blobs are all hits: {:?}",
        upstream.log()
    );
    assert_eq!(
        app.count("SELECT count(*) FROM manifest_refs WHERE kind = 'manifest'"),
        2
    );
}

#[tokio::test]
async fn docker_schema2_images_and_created_time_are_recorded() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::docker("docker", &[4096, 8192], "2023-03-04T05:06:07Z");
    upstream.add_image("d/img", Some("1.0"), &image);
    let app = TestApp::start(&upstream.url()).await;
    let resp = app.get_manifest("/v2/d/img/manifests/1.0").await;
    assert_eq!(resp.headers()["content-type"], DOCKER_MANIFEST);
    ok_bytes(resp).await;
    ok_bytes(app.get(&format!("/v2/d/img/blobs/{}", image.config.digest)).await).await;
    // 2023-03-04T05:06:07Z in Unix seconds.
    let created: i64 = app
        .db()
        .query_row(
            "SELECT created FROM manifests WHERE digest = ?1",
            [&image.manifest.digest],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(created, 1_677_906_367);
    let (size, cached, used): (i64, i64, i64) = app
        .db()
        .query_row(
            "SELECT size_bytes, cached_at, last_used_at FROM blobs WHERE digest = ?1",
            [&image.config.digest],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(size, image.config.len() as i64);
    assert!(cached > 1_700_000_000 && used >= cached);
}

#[tokio::test]
async fn restart_serves_everything_cached_without_the_upstream() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("restart", &[10_000, 50_000], "2024-01-01T00:00:00Z");
    let index = Index::new("restart-index", &["amd64", "arm64"]);
    upstream.add_image("keep/me", Some("v1"), &image);
    upstream.add_index("keep/multi", Some("v2"), &index);
    let mut app = TestApp::start(&upstream.url()).await;
    pull_image(&app, "keep/me", "v1", &image).await;
    ok_bytes(app.get_manifest("/v2/keep/multi/manifests/v2").await).await;
    for (_, child) in &index.images {
        pull_image(&app, "keep/multi", &child.manifest.digest, child).await;
    }

    app.restart_with(|_| {}).await;
    upstream.stop().await;
    pull_image(&app, "keep/me", "v1", &image).await;
    assert_eq!(
        ok_bytes(app.get_manifest("/v2/keep/multi/manifests/v2").await).await,
        index.manifest.bytes
    );
    for (_, child) in &index.images {
        pull_image(&app, "keep/multi", &child.manifest.digest, child).await;
    }
    // Uses recorded before the restart reached SQLite at shutdown.
    assert!(app.count("SELECT count(*) FROM repositories") >= 2);
}

#[tokio::test]
async fn base_endpoint_answers_with_api_version() {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let app = TestApp::start(&upstream.url()).await;
    let resp = app.get("/v2/").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-distribution-api-version"], "registry/2.0");
    assert_eq!(ok_bytes(resp).await.as_ref(), b"{}");
    assert_eq!(app.get("/healthz").await.status(), 200);
}
