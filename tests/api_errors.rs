//! The registry API's errors (I8): every refusal is the distribution spec's error JSON
//! with the right code, status and headers, and bad input changes nothing — no row in
//! SQLite, no object in storage, no request to the upstream.

mod common;

use common::app::{error_code, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::{Blob, Image, OCI_MANIFEST};
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;
use serde_json::json;

const CREATED: &str = "2024-03-01T00:00:00Z";
const REPO: &str = "acme/app";
/// The spec's limit on manifest size, which regcache enforces on what upstreams send.
const MANIFEST_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Every table that records cached state; bad input must leave them all empty.
const STATE_TABLES: &[&str] = &[
    "repositories",
    "manifests",
    "manifest_refs",
    "repo_manifests",
    "tags",
    "blobs",
    "repo_blobs",
    "tag_lists",
    "referrers",
];

async fn started() -> (FixtureUpstream, TestApp, Image) {
    let upstream = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("api-errors", &[3000, 100], CREATED);
    upstream.add_image(REPO, Some("v1"), &image);
    let app = TestApp::start(&upstream.url()).await;
    (upstream, app, image)
}

fn header(resp: &reqwest::Response, name: impl reqwest::header::AsHeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header").to_owned())
}

/// Checks that `resp` is the spec's error JSON with `status` and `code`, carrying
/// `Docker-Distribution-API-Version` like every other response.
async fn assert_error(resp: reqwest::Response, status: u16, code: &str) {
    let what = format!("{} {}", resp.url(), resp.status());
    assert_eq!(
        header(&resp, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0"),
        "{what}: API version header on an error"
    );
    assert!(
        header(&resp, CONTENT_TYPE).is_some_and(|c| c.starts_with("application/json")),
        "{what}: error body is JSON"
    );
    assert_eq!(error_code(resp).await, (status, code.to_owned()), "{what}");
}

/// Nothing is recorded in SQLite or storage.
fn assert_nothing_recorded(app: &TestApp, what: &str) {
    for table in STATE_TABLES {
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM {table}")),
            0,
            "{what}: rows in {table}"
        );
    }
    assert_eq!(
        app.stored_blob_files(),
        Vec::<std::path::PathBuf>::new(),
        "{what}"
    );
    assert_eq!(app.tmp_files(), 0, "{what}: temporary files left");
}

fn random_digest(seed: &str) -> String {
    Blob::random(seed, 32).digest
}

/// A valid image manifest of exactly `size` bytes (padded with an annotation) referring
/// to `image`'s config and layers.
fn manifest_of_size(image: &Image, size: usize) -> Blob {
    let body = |pad: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": image.config.descriptor(),
            "layers": image.layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
            "annotations": { "org.regcache.test.padding": pad },
        }))
        .expect("manifest JSON")
    };
    let base = body("").len();
    assert!(size >= base, "a manifest cannot be smaller than {base} bytes");
    let manifest = Blob::new(OCI_MANIFEST, body(&"x".repeat(size - base)));
    assert_eq!(manifest.len(), size);
    manifest
}

#[tokio::test]
async fn base_endpoint_announces_the_api_version() {
    let (upstream, app, _) = started().await;
    for path in ["/v2/", "/v2"] {
        let resp = app.get(path).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(
            header(&resp, "docker-distribution-api-version").as_deref(),
            Some("registry/2.0"),
            "{path}"
        );
    }
    // A path that is no registry endpoint at all is still answered in the spec's terms.
    assert_error(app.get("/v2/acme/app/nonsense/x").await, 404, "NOT_FOUND").await;
    assert!(
        upstream.log().is_empty(),
        "the base endpoint never asks the upstream"
    );
}

#[tokio::test]
async fn invalid_names_are_refused_before_anything_happens() {
    let (upstream, app, image) = started().await;
    let layer = &image.layers[0].digest;
    let paths = [
        "/v2/Acme/app/manifests/v1".to_owned(),
        "/v2/ACME/APP/manifests/v1".to_owned(),
        "/v2/acme//app/manifests/v1".to_owned(),
        "/v2/acme/app-/manifests/v1".to_owned(),
        format!("/v2/acme//app/blobs/{layer}"),
        format!("/v2/UPPER/blobs/{layer}"),
        "/v2/acme/App/tags/list".to_owned(),
        format!("/v2/acme/App/referrers/{}", image.manifest.digest),
        format!("/v2/{}/manifests/v1", "a".repeat(256)),
    ];
    for path in &paths {
        assert_error(app.get(path).await, 400, "NAME_INVALID").await;
        let head = app.head(path).await;
        assert_eq!(head.status(), 400, "HEAD {path}");
    }
    assert!(upstream.log().is_empty(), "upstream asked: {:?}", upstream.log());
    assert_nothing_recorded(&app, "invalid names");
}

#[tokio::test]
async fn invalid_digests_are_refused_before_anything_happens() {
    let (upstream, app, _) = started().await;
    let upper = format!("sha256:{}", "A".repeat(64));
    let short = format!("sha256:{}", "a".repeat(63));
    let bad = [
        "sha256:zz",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha512:abc",
        upper.as_str(),
        short.as_str(),
        "sha256:",
    ];
    for digest in bad {
        for path in [
            format!("/v2/{REPO}/blobs/{digest}"),
            format!("/v2/{REPO}/manifests/{digest}"),
            format!("/v2/{REPO}/referrers/{digest}"),
        ] {
            assert_error(app.get(&path).await, 400, "DIGEST_INVALID").await;
        }
    }
    assert!(upstream.log().is_empty(), "upstream asked: {:?}", upstream.log());
    assert_nothing_recorded(&app, "invalid digests");
}

#[tokio::test]
async fn invalid_tags_are_refused_before_anything_happens() {
    let (upstream, app, _) = started().await;
    let long = "t".repeat(129);
    for tag in ["-bad", ".bad", "bad+tag", "bad%20tag", long.as_str()] {
        assert_error(
            app.get_manifest(&format!("/v2/{REPO}/manifests/{tag}")).await,
            400,
            "TAG_INVALID",
        )
        .await;
    }
    // 128 characters is the longest tag the spec allows: asked upstream, unknown there.
    let longest = "t".repeat(128);
    assert_error(
        app.get_manifest(&format!("/v2/{REPO}/manifests/{longest}")).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_eq!(upstream.log().len(), 1, "only the valid tag reaches the upstream");
    assert_nothing_recorded(&app, "invalid tags");
}

#[tokio::test]
async fn unknown_manifests_are_manifest_unknown_and_not_recorded() {
    let (upstream, app, _) = started().await;
    let missing = random_digest("no such manifest");
    assert_error(
        app.get_manifest(&format!("/v2/{REPO}/manifests/nope")).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_error(
        app.get_manifest(&format!("/v2/{REPO}/manifests/{missing}")).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let head = app.head(&format!("/v2/{REPO}/manifests/{missing}")).await;
    assert_eq!(head.status(), 404);
    assert_eq!(upstream.manifest_gets(REPO, "nope"), 1);
    assert!(upstream.manifest_gets(REPO, &missing) >= 1);
    assert_nothing_recorded(&app, "unknown manifests");
}

#[tokio::test]
async fn unknown_blobs_are_blob_unknown_and_not_recorded() {
    let (upstream, app, _) = started().await;
    let missing = random_digest("no such blob");
    let path = format!("/v2/{REPO}/blobs/{missing}");
    assert_error(app.get(&path).await, 404, "BLOB_UNKNOWN").await;
    assert_eq!(app.head(&path).await.status(), 404);
    assert_eq!(upstream.blob_gets(&missing), 1);
    assert_nothing_recorded(&app, "unknown blob");
}

#[tokio::test]
async fn tags_of_a_repository_the_upstream_does_not_know_are_name_unknown() {
    let (upstream, app, _) = started().await;
    assert_error(app.get("/v2/nobody/here/tags/list").await, 404, "NAME_UNKNOWN").await;
    assert_eq!(upstream.requests(Method::GET, "/v2/nobody/here/tags/list"), 1);
    assert_nothing_recorded(&app, "unknown repository");
}

#[tokio::test]
async fn push_and_delete_are_unsupported() {
    let (upstream, app, image) = started().await;
    let digest = &image.manifest.digest;
    let requests = [
        (Method::POST, "/v2/x/blobs/uploads/".to_owned()),
        (Method::POST, format!("/v2/{REPO}/blobs/uploads/?digest={digest}")),
        (Method::PATCH, "/v2/x/blobs/uploads/3f1c9a55".to_owned()),
        (
            Method::PUT,
            format!("/v2/x/blobs/uploads/3f1c9a55?digest={digest}"),
        ),
        (Method::PUT, "/v2/x/manifests/latest".to_owned()),
        (Method::PUT, format!("/v2/{REPO}/manifests/v1")),
        (Method::DELETE, format!("/v2/{REPO}/manifests/{digest}")),
        (
            Method::DELETE,
            format!("/v2/{REPO}/blobs/{}", image.layers[0].digest),
        ),
    ];
    for (method, path) in requests {
        let resp = app
            .client
            .request(method.clone(), app.url(&path))
            .header(CONTENT_TYPE, OCI_MANIFEST)
            .body(image.manifest.bytes.clone())
            .send()
            .await
            .expect("request to regcache");
        assert_error(resp, 405, "UNSUPPORTED").await;
    }
    assert!(upstream.log().is_empty(), "upstream asked: {:?}", upstream.log());
    assert_nothing_recorded(&app, "push attempts");
    // The image the DELETE named is still served.
    let body = ok_bytes(app.get_manifest(&format!("/v2/{REPO}/manifests/v1")).await).await;
    assert_eq!(body, image.manifest.bytes);
}

#[tokio::test]
async fn upstream_rate_limit_is_passed_on_with_retry_after() {
    let (upstream, app, image) = started().await;
    let other = Image::new("api-errors-other", &[500], CREATED);
    upstream.add_image(REPO, Some("v2"), &other);
    // Cached before the limit hits, so it must keep being served.
    ok_bytes(app.get_manifest(&format!("/v2/{REPO}/manifests/v1")).await).await;
    upstream.reset_log();

    upstream.fail_with_retry_after(429, 30);
    for path in [
        format!("/v2/{REPO}/manifests/v2"),
        format!("/v2/{REPO}/manifests/{}", other.manifest.digest),
        format!("/v2/{REPO}/blobs/{}", other.layers[0].digest),
    ] {
        let resp = app.get_manifest(&path).await;
        assert_eq!(header(&resp, RETRY_AFTER).as_deref(), Some("30"), "{path}");
        assert_error(resp, 429, "TOOMANYREQUESTS").await;
    }
    assert_eq!(
        upstream.manifest_gets(REPO, "v2"),
        1,
        "a 429 is passed on, not retried against the upstream"
    );
    let cached = app.get_manifest(&format!("/v2/{REPO}/manifests/v1")).await;
    assert_eq!(
        ok_bytes(cached).await,
        image.manifest.bytes,
        "a rate limit serves the cached tag"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM manifests WHERE digest = '{}'",
            other.manifest.digest
        )),
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 0);

    // The refusal was not remembered: once the upstream recovers, the pull works.
    upstream.clear_failure();
    let body = ok_bytes(app.get_manifest(&format!("/v2/{REPO}/manifests/v2")).await).await;
    assert_eq!(body, other.manifest.bytes);
}

#[tokio::test]
async fn manifests_over_4_mib_from_upstream_are_refused_and_not_stored() {
    let (upstream, app, image) = started().await;
    let at_limit = manifest_of_size(&image, MANIFEST_MAX_BYTES);
    let over = manifest_of_size(&image, MANIFEST_MAX_BYTES + 1);
    upstream.add_manifest(REPO, at_limit.clone());
    upstream.add_manifest(REPO, over.clone());
    upstream.set_tag(REPO, "at-limit", &at_limit.digest);
    upstream.set_tag(REPO, "over", &over.digest);

    for reference in ["over", over.digest.as_str()] {
        let resp = app
            .get_manifest(&format!("/v2/{REPO}/manifests/{reference}"))
            .await;
        assert_error(resp, 502, "MANIFEST_INVALID").await;
    }
    assert_nothing_recorded(&app, "oversized manifest");

    // Exactly 4 MiB is allowed.
    let body = ok_bytes(app.get_manifest(&format!("/v2/{REPO}/manifests/at-limit")).await).await;
    assert_eq!(body.len(), MANIFEST_MAX_BYTES);
    assert_eq!(body, at_limit.bytes);
    assert_eq!(app.count("SELECT count(*) FROM manifests"), 1);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM manifests WHERE digest = '{}'",
            over.digest
        )),
        0
    );
}

#[tokio::test]
async fn unsatisfiable_and_malformed_ranges_are_range_invalid() {
    let (upstream, app, image) = started().await;
    let layer = &image.layers[0];
    let size = layer.len();
    let path = format!("/v2/{REPO}/blobs/{}", layer.digest);
    assert_eq!(ok_bytes(app.get(&path).await).await, layer.bytes);

    for range in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
        "bytes=-0".to_owned(),
    ] {
        let resp = app.get_range(&path, &range).await;
        assert_eq!(
            header(&resp, CONTENT_RANGE),
            Some(format!("bytes */{size}")),
            "{range}"
        );
        assert_error(resp, 416, "RANGE_INVALID").await;
    }
    for malformed in ["bytes=abc-def", "bytes=9-1", "bytes=-", "bytes=5"] {
        assert_error(app.get_range(&path, malformed).await, 416, "RANGE_INVALID").await;
    }
    // The blob is intact and was fetched once.
    let tail = app.get_range(&path, "bytes=-10").await;
    assert_eq!(tail.status(), 206);
    assert_eq!(ok_bytes(tail).await, layer.bytes.slice(size - 10..));
    assert_eq!(upstream.blob_gets(&layer.digest), 1);
    assert_eq!(app.count("SELECT count(*) FROM blobs"), 1);
}

#[tokio::test]
async fn bad_pagination_number_is_refused_before_asking_upstream() {
    let (upstream, app, _) = started().await;
    for n in ["abc", "-1", "1.5"] {
        assert_error(
            app.get(&format!("/v2/{REPO}/tags/list?n={n}")).await,
            400,
            "PAGINATION_NUMBER_INVALID",
        )
        .await;
    }
    assert!(upstream.log().is_empty(), "upstream asked: {:?}", upstream.log());
    assert_nothing_recorded(&app, "bad pagination");
}

#[tokio::test]
async fn unknown_namespace_is_name_unknown() {
    let (upstream, app, image) = started().await;
    for path in [
        format!("/v2/{REPO}/manifests/v1?ns=quay.io"),
        format!("/v2/{REPO}/blobs/{}?ns=quay.io", image.layers[0].digest),
        format!("/v2/{REPO}/tags/list?ns=example.com%3A5000"),
    ] {
        assert_error(app.get_manifest(&path).await, 404, "NAME_UNKNOWN").await;
    }
    assert!(upstream.log().is_empty(), "upstream asked: {:?}", upstream.log());
    assert_nothing_recorded(&app, "unknown namespace");
}

#[tokio::test]
async fn unreachable_upstream_on_uncached_content_is_unavailable() {
    let (upstream, app, image) = started().await;
    upstream.stop().await;
    for path in [
        format!("/v2/{REPO}/manifests/v1"),
        format!("/v2/{REPO}/manifests/{}", image.manifest.digest),
        format!("/v2/{REPO}/blobs/{}", image.layers[0].digest),
    ] {
        assert_error(app.get_manifest(&path).await, 503, "UNAVAILABLE").await;
    }
    assert_nothing_recorded(&app, "unreachable upstream");
}
