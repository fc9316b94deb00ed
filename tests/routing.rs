//! Routing requests to upstreams: containerd's `?ns=` (an upstream's host:port or its
//! name), a path prefix `/v2/<upstream>/<repo>/…` that is stripped before going
//! upstream, else the default upstream; and what is cached is kept per upstream, so the
//! same repository name on two upstreams never mixes.

mod common;

use common::app::{error_code, ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream};
use common::images::Image;
use serde_json::Value;

const CREATED: &str = "2024-06-01T00:00:00Z";
/// The same repository name exists on both upstreams, with different content.
const REPO: &str = "acme/app";

struct Setup {
    one: FixtureUpstream,
    two: FixtureUpstream,
    image_one: Image,
    image_two: Image,
    app: TestApp,
}

/// Upstream "one" (the default) and "two", each with its own image as `REPO:v1`.
async fn setup() -> Setup {
    let one = FixtureUpstream::start(FixtureOptions::default()).await;
    let two = FixtureUpstream::start(FixtureOptions::default()).await;
    let image_one = Image::new("routing-one", &[2000, 100], CREATED);
    let image_two = Image::new("routing-two", &[3000, 200], CREATED);
    assert_ne!(image_one.manifest.digest, image_two.manifest.digest);
    one.add_image(REPO, Some("v1"), &image_one);
    two.add_image(REPO, Some("v1"), &image_two);
    two.add_image(REPO, Some("only-on-two"), &image_two);
    let app = TestApp::start_with(&[("one", &one.url()), ("two", &two.url())], |_| {}).await;
    Setup {
        one,
        two,
        image_one,
        image_two,
        app,
    }
}

/// `127.0.0.1%3APORT`, as containerd URL-encodes the host.
fn encoded_host(upstream: &FixtureUpstream) -> String {
    upstream.host_port().replace(':', "%3A")
}

/// Pulls `REPO:v1` through `prefix` (`""` or `"two/"`) with `query` (`""` or `"?ns=…"`)
/// and checks every body against `image`.
async fn pull(app: &TestApp, prefix: &str, query: &str, image: &Image) {
    let manifest = ok_bytes(
        app.get_manifest(&format!("/v2/{prefix}{REPO}/manifests/v1{query}"))
            .await,
    )
    .await;
    assert_eq!(
        manifest, image.manifest.bytes,
        "manifest via {prefix:?} {query:?}"
    );
    for blob in image.blobs() {
        let path = format!("/v2/{prefix}{REPO}/blobs/{}{query}", blob.digest);
        assert_eq!(ok_bytes(app.get(&path).await).await, blob.bytes, "{path}");
    }
}

#[tokio::test]
async fn ns_with_the_upstream_host_routes_to_it() {
    let s = setup().await;
    let query = format!("?ns={}", encoded_host(&s.two));
    pull(&s.app, "", &query, &s.image_two).await;
    assert_eq!(s.two.manifest_gets(REPO, "v1"), 1);
    for blob in s.image_two.blobs() {
        assert_eq!(s.two.blob_gets(&blob.digest), 1);
    }
    assert!(s.one.log().is_empty(), "one was asked: {:?}", s.one.log());

    // Unencoded works as well, and so does the host of the default upstream.
    let query = format!("?ns={}", s.two.host_port());
    pull(&s.app, "", &query, &s.image_two).await;
    let query = format!("?ns={}", encoded_host(&s.one));
    pull(&s.app, "", &query, &s.image_one).await;
    assert_eq!(s.one.manifest_gets(REPO, "v1"), 1);
}

#[tokio::test]
async fn ns_with_the_upstream_name_routes_to_it() {
    let s = setup().await;
    pull(&s.app, "", "?ns=two", &s.image_two).await;
    let (tags, _) = tag_page(&s.app, &format!("/v2/{REPO}/tags/list?ns=two")).await;
    assert_eq!(tags, ["only-on-two", "v1"]);
    // A Link keeps `ns`, or following it would list the default upstream's tags.
    let (tags, link) = tag_page(&s.app, &format!("/v2/{REPO}/tags/list?ns=two&n=1")).await;
    assert_eq!(tags, ["only-on-two"]);
    assert_eq!(
        link.as_deref(),
        Some(format!("</v2/{REPO}/tags/list?n=1&last=only-on-two&ns=two>; rel=\"next\"").as_str())
    );
    assert!(s.one.log().is_empty(), "one was asked: {:?}", s.one.log());
}

#[tokio::test]
async fn path_prefix_routes_and_is_stripped() {
    let s = setup().await;
    pull(&s.app, "two/", "", &s.image_two).await;
    let log = s.two.log();
    assert!(!log.is_empty());
    for r in &log {
        assert!(
            r.path.starts_with(&format!("/v2/{REPO}/")),
            "two saw the prefix or another name: {} {}",
            r.method,
            r.path
        );
    }
    assert!(s.one.log().is_empty(), "one was asked: {:?}", s.one.log());

    // Tag lists answer under the name the client used, so their Links lead back here.
    let (tags, link) = tag_page(&s.app, &format!("/v2/two/{REPO}/tags/list?n=1")).await;
    assert_eq!(tags, ["only-on-two"]);
    assert_eq!(
        link.as_deref(),
        Some(format!("</v2/two/{REPO}/tags/list?n=1&last=only-on-two>; rel=\"next\"").as_str())
    );
    assert!(
        s.two
            .requests(reqwest::Method::GET, &format!("/v2/{REPO}/tags/list"))
            >= 1
    );
}

#[tokio::test]
async fn unprefixed_names_go_to_the_default_upstream() {
    let s = setup().await;
    pull(&s.app, "", "", &s.image_one).await;
    assert_eq!(s.one.manifest_gets(REPO, "v1"), 1);
    assert!(s.two.log().is_empty(), "two was asked: {:?}", s.two.log());
    // Only two has this tag; the default upstream does not.
    let (status, code) = error_code(
        s.app
            .get_manifest(&format!("/v2/{REPO}/manifests/only-on-two"))
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
}

#[tokio::test]
async fn cached_content_is_kept_per_upstream() {
    let s = setup().await;
    pull(&s.app, "", "", &s.image_one).await;
    pull(&s.app, "two/", "", &s.image_two).await;

    // Same name, two repositories, each with its own tag.
    let db = s.app.db();
    let mut rows: Vec<(String, String, String)> = db
        .prepare(
            "SELECT r.upstream, r.name, t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id
             WHERE t.name = 'v1' ORDER BY r.upstream",
        )
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows.sort();
    assert_eq!(
        rows,
        [
            (
                "one".to_owned(),
                REPO.to_owned(),
                s.image_one.manifest.digest.clone()
            ),
            (
                "two".to_owned(),
                REPO.to_owned(),
                s.image_two.manifest.digest.clone()
            ),
        ]
    );

    // A blob cached through one is not served under two's repository of the same name:
    // two is asked, and two does not have it.
    let layer_one = &s.image_one.layers[0].digest;
    let (status, code) = error_code(s.app.get(&format!("/v2/two/{REPO}/blobs/{layer_one}")).await).await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));

    // With both upstreams gone, each route is still served its own content from the cache,
    // whichever way it names the upstream.
    s.one.stop().await;
    s.two.stop().await;
    pull(&s.app, "", "", &s.image_one).await;
    pull(&s.app, "two/", "", &s.image_two).await;
    pull(&s.app, "", "?ns=two", &s.image_two).await;
    let query = format!("?ns={}", encoded_host(&s.two));
    pull(&s.app, "", &query, &s.image_two).await;
    pull(&s.app, "one/", "", &s.image_one).await;
}

/// A tag list page: names and `Link`.
async fn tag_page(app: &TestApp, path: &str) -> (Vec<String>, Option<String>) {
    let resp = app.get(path).await;
    let link = resp
        .headers()
        .get(reqwest::header::LINK)
        .map(|v| v.to_str().expect("ASCII Link").to_owned());
    let body: Value = serde_json::from_slice(&ok_bytes(resp).await).expect("tag list JSON");
    let tags = body["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no tags in {body}"))
        .iter()
        .map(|t| t.as_str().expect("tag").to_owned())
        .collect();
    (tags, link)
}
