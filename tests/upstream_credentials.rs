//! Upstream credentials never leave the upstream's origin (I9): a tag-list `Link` to
//! another origin is not followed (and nothing reaches that host), one on the upstream's
//! own origin is; Basic credentials are not forwarded on a blob redirect to another host;
//! an absurd token lifetime neither panics nor breaks pulls; and an upstream URL's path
//! is where the requests go.

mod common;

use common::app::{ok_bytes, TestApp};
use common::fixture_upstream::{FixtureOptions, FixtureUpstream, TagsPaging};
use common::images::Image;
use regcache::config::Secret;
use reqwest::Method;
use serde_json::{json, Value};

const CREATED: &str = "2024-06-01T00:00:00Z";
const REPO: &str = "acme/app";
const USER: &str = "user";
const PASSWORD: &str = "pass";
const TAGS: &[&str] = &["a", "b", "c", "d", "e"];

fn with_credentials(c: &mut regcache::config::Config) {
    c.upstream[0].username = Some(USER.into());
    c.upstream[0].password = Some(Secret::new(PASSWORD));
}

/// `opts` paginating tag lists two at a time, with `TAGS` on one image in `REPO`.
async fn upstream_with_pages(opts: FixtureOptions) -> (FixtureUpstream, Image) {
    let upstream = FixtureUpstream::start(opts.tags_paging(TagsPaging::Paginate { page_size: 2 })).await;
    let image = Image::new("credentials", &[500], CREATED);
    upstream.add_image(REPO, Some(TAGS[0]), &image);
    for tag in &TAGS[1..] {
        upstream.set_tag(REPO, tag, &image.manifest.digest);
    }
    (upstream, image)
}

async fn tag_list(app: &TestApp) -> Vec<String> {
    let body: Value =
        serde_json::from_slice(&ok_bytes(app.get(&format!("/v2/{REPO}/tags/list")).await).await)
            .expect("tag list JSON");
    serde_json::from_value(body["tags"].clone()).expect("tags")
}

/// A foreign host serving the same tags, publicly: if regcache followed a Link there, it
/// would get an answer (and the test would see the extra tags).
async fn foreign_host(image: &Image) -> FixtureUpstream {
    let foreign = FixtureUpstream::start(FixtureOptions::default()).await;
    foreign.add_image(REPO, Some(TAGS[0]), image);
    for tag in &TAGS[1..] {
        foreign.set_tag(REPO, tag, &image.manifest.digest);
    }
    foreign
}

#[tokio::test]
async fn a_tag_list_link_to_another_origin_is_not_followed_and_gets_no_credentials() {
    // A bearer token fetched with Basic credentials, and Basic credentials sent directly.
    for opts in [
        FixtureOptions::default().basic_auth(USER, PASSWORD),
        FixtureOptions::default().basic_only(USER, PASSWORD),
    ] {
        let (upstream, image) = upstream_with_pages(opts.clone()).await;
        let foreign = foreign_host(&image).await;
        upstream.link_tags_to(&foreign.url());
        let app = TestApp::start_with(&[("fixture", &upstream.url())], with_credentials).await;

        let listed = tag_list(&app).await;
        let reached = foreign.log();
        assert!(
            reached.is_empty(),
            "{opts:?}: the foreign host was asked: {:?}",
            reached
                .iter()
                .map(|r| (r.path.clone(), r.authorization().map(str::to_owned)))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            listed,
            ["a", "b"],
            "{opts:?}: the first page, from the upstream itself"
        );
        // The upstream itself did get its credentials: the page was read.
        let listed = upstream
            .log()
            .into_iter()
            .filter(|r| r.path_only().ends_with("/tags/list"))
            .filter(|r| r.authorization().is_some())
            .count();
        assert_eq!(listed, 1, "{opts:?}");
    }
}

#[tokio::test]
async fn a_tag_list_link_to_the_upstreams_own_origin_is_followed() {
    let (upstream, _image) = upstream_with_pages(FixtureOptions::default().basic_auth(USER, PASSWORD)).await;
    upstream.link_tags_to(&upstream.url());
    let app = TestApp::start_with(&[("fixture", &upstream.url())], with_credentials).await;
    assert_eq!(tag_list(&app).await, TAGS);
    let pages = upstream
        .log()
        .into_iter()
        .filter(|r| r.path_only().ends_with("/tags/list") && r.authorization().is_some())
        .count();
    assert_eq!(pages, 3, "three pages of two, each with the token");
}

#[tokio::test]
async fn basic_credentials_are_not_forwarded_on_a_blob_redirect_to_another_host() {
    let registry = FixtureUpstream::start(FixtureOptions::default().basic_only(USER, PASSWORD)).await;
    let cdn = FixtureUpstream::start(FixtureOptions::default()).await;
    let image = Image::new("credentials-redirect", &[3000], CREATED);
    registry.add_image(REPO, Some("v1"), &image);
    cdn.add_image(REPO, None, &image);
    registry.redirect_blobs_to(&cdn.url());
    let app = TestApp::start_with(&[("fixture", &registry.url())], with_credentials).await;

    app.pull(REPO, "v1", &image).await;
    let cdn_log = cdn.log();
    assert_eq!(cdn_log.len(), image.blobs().count(), "{cdn_log:?}");
    for r in &cdn_log {
        assert_eq!(
            r.authorization(),
            None,
            "the password went to the CDN: {}",
            r.path
        );
    }
    let registry_blob_gets: Vec<_> = registry
        .log()
        .into_iter()
        .filter(|r| r.method == Method::GET && r.path_only().contains("/blobs/"))
        .filter(|r| r.authorization().is_some_and(|a| a.starts_with("Basic ")))
        .collect();
    assert_eq!(
        registry_blob_gets.len(),
        image.blobs().count(),
        "the registry itself gets them"
    );
}

#[tokio::test]
async fn an_absurd_token_lifetime_is_clamped_and_pulls_work() {
    let upstream = FixtureUpstream::start(FixtureOptions::default().anonymous_tokens()).await;
    let image = Image::new("credentials-lifetime", &[700], CREATED);
    upstream.add_image(REPO, Some("v1"), &image);
    upstream.set_token_expires_in(json!(u64::MAX));
    let app = TestApp::start(&upstream.url()).await;

    app.pull(REPO, "v1", &image).await;
    app.pull(REPO, "v1", &image).await;
    assert_eq!(upstream.token_requests(), 1, "the token was cached and reused");
}

#[tokio::test]
async fn requests_go_under_the_upstream_urls_path() {
    let (upstream, image) =
        upstream_with_pages(FixtureOptions::default().anonymous_tokens().under_path("/mirror")).await;
    let mirror = format!("{}/mirror/", upstream.url());
    let app = TestApp::start(&mirror).await;

    app.pull(REPO, TAGS[0], &image).await;
    assert_eq!(tag_list(&app).await, TAGS, "pages under the path are followed");
    let log = upstream.log();
    assert!(log.len() > 3, "{log:?}");
    for r in log.iter().filter(|r| r.path_only() != "/token") {
        assert!(
            r.path.starts_with("/mirror/v2/"),
            "asked outside the path: {}",
            r.path
        );
    }
}
